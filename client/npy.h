/* NumPy .npy files (format 1.0-3.0, little-endian, C order) of float32, float64 or float16; any
 * other dtype, a big-endian or a Fortran-ordered array is refused with a message that says what
 * the file holds and how to convert it. */
#ifndef CONVD_NPY_H
#define CONVD_NPY_H

#include <stddef.h>
#include <stdint.h>

#define CONVD_NPY_MAX_DIMS 8

typedef struct convd_npy {
  int ndim;
  int64_t shape[CONVD_NPY_MAX_DIMS];
  int elem_size; /* 4 = '<f4', 8 = '<f8', 2 = '<f2' */
  size_t count;  /* elements */
  void *data;    /* count * elem_size bytes, malloc'd (NULL after convd_npy_read_header) */
  long data_offset; /* where the data starts in the file */
} convd_npy;

/* Reads a .npy file. Returns 0 or a negative convd error with the reason in err. */
int convd_npy_read(const char *path, convd_npy *out, char *err, size_t errlen);
void convd_npy_free(convd_npy *a);
/* Reads only the header (shape, dtype, where the data starts), for reading the data in place. */
int convd_npy_read_header(const char *path, convd_npy *out, char *err, size_t errlen);

/* The array's values as a malloc'd float64 array (widening float32 / float16). NULL when out of
 * memory. */
double *convd_npy_to_f64(const convd_npy *a);

/* Creates a float32 .npy file of the given shape with room for all its data (allocated, so a
 * full disk shows now and not half-way through): returns an fd open for writing and the data's
 * offset, or -1 with err set. */
int convd_npy_create_f32(const char *path, const int64_t *shape, int ndim, long *data_offset,
                         char *err, size_t errlen);

/* Writes float32 data of the given shape. */
int convd_npy_write_f32(const char *path, const int64_t *shape, int ndim, const float *data,
                        char *err, size_t errlen);

#endif
