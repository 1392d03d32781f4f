/* NumPy .npy files (format 1.0-3.0, little-endian, C order) of float32 or float64. */
#ifndef CONVD_NPY_H
#define CONVD_NPY_H

#include <stddef.h>
#include <stdint.h>

#define CONVD_NPY_MAX_DIMS 8

typedef struct convd_npy {
  int ndim;
  int64_t shape[CONVD_NPY_MAX_DIMS];
  int elem_size; /* 4 = '<f4', 8 = '<f8' */
  size_t count;  /* elements */
  void *data;    /* count * elem_size bytes, malloc'd */
} convd_npy;

/* Reads a .npy file. Returns 0 or a negative convd error with the reason in err. */
int convd_npy_read(const char *path, convd_npy *out, char *err, size_t errlen);
void convd_npy_free(convd_npy *a);

/* The array's values as a malloc'd float64 array (converting float32). NULL when out of memory. */
double *convd_npy_to_f64(const convd_npy *a);

/* Writes float32 data of the given shape. */
int convd_npy_write_f32(const char *path, const int64_t *shape, int ndim, const float *data,
                        char *err, size_t errlen);

#endif
