/* See npy.h. Threads: any; no shared state. */
#include "npy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conv.h"
#include "dtype.h"
#include "err.h"

static const char MAGIC[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};

void convd_npy_free(convd_npy *a) {
  free(a->data);
  a->data = NULL;
}

/* Finds the value text after 'key': in the header dict. */
static const char *dict_value(const char *h, const char *key) {
  char pat[32];
  snprintf(pat, sizeof pat, "'%s'", key);
  const char *p = strstr(h, pat);
  if (p == NULL) return NULL;
  p = strchr(p + strlen(pat), ':');
  if (p == NULL) return NULL;
  p++;
  while (*p == ' ') p++;
  return p;
}

/* The header's descr value: the text inside its quotes (a structured dtype's list: "[...]"). */
static void descr_text(const char *descr, char *out, size_t len) {
  if (descr == NULL) {
    snprintf(out, len, "?");
  } else if (*descr == '\'' || *descr == '"') {
    const char q = *descr++;
    size_t n = 0;
    while (descr[n] && descr[n] != q && n + 1 < len) n++;
    snprintf(out, len, "%.*s", (int)n, descr);
  } else {
    snprintf(out, len, "%s", *descr == '[' ? "[...]" : "?");
  }
}

/* What numpy calls a descr ("<i4": "int32"), for messages; "" when it is none of the usual. */
static const char *descr_kind(const char *d, char *buf, size_t len) {
  static const struct {
    char kind;
    const char *name;
  } kinds[] = {{'f', "float"}, {'i', "int"}, {'u', "uint"}, {'c', "complex"}, {'b', "bool"}};
  const char *t = d[0] == '<' || d[0] == '>' || d[0] == '|' || d[0] == '=' ? d + 1 : d;
  char *end;
  const long bytes = t[0] ? strtol(t + 1, &end, 10) : 0;
  if (t[0] == '\0' || bytes <= 0 || *end != '\0') return "";
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
    if (kinds[i].kind == t[0]) {
      if (t[0] == 'b') snprintf(buf, len, "bool");
      else snprintf(buf, len, "%s%ld", kinds[i].name, bytes * 8);
      return buf;
    }
  return "";
}

static int npy_read(const char *path, convd_npy *out, int with_data, char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  FILE *f = fopen(path, "rb");
  if (f == NULL) return convd_errf(err, errlen, CONVD_EIO, "%s: %s", path, strerror(errno));
  int rc = 0;
  char *hdr = NULL;
  unsigned char pre[10];
  if (fread(pre, 1, 8, f) != 8 || memcmp(pre, MAGIC, 6) != 0) {
    rc = convd_errf(err, errlen, CONVD_EINVAL, "%s: not a .npy file", path);
    goto out;
  }
  size_t hlen;
  if (pre[6] == 1) {
    if (fread(pre + 8, 1, 2, f) != 2) goto short_read;
    hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
  } else if (pre[6] == 2 || pre[6] == 3) {
    unsigned char l[4];
    if (fread(l, 1, 4, f) != 4) goto short_read;
    hlen = (size_t)l[0] | (size_t)l[1] << 8 | (size_t)l[2] << 16 | (size_t)l[3] << 24;
  } else {
    rc = convd_errf(err, errlen, CONVD_EINVAL, "%s: .npy format version %d is not supported", path,
                    pre[6]);
    goto out;
  }
  if (hlen > (1u << 20)) {
    rc = convd_errf(err, errlen, CONVD_EINVAL, "%s: .npy header of %zu bytes is implausible", path,
                    hlen);
    goto out;
  }
  hdr = malloc(hlen + 1);
  if (hdr == NULL || fread(hdr, 1, hlen, f) != hlen) goto short_read;
  hdr[hlen] = '\0';

  char d[24], kind[24];
  descr_text(dict_value(hdr, "descr"), d, sizeof d);
  /* '<' little-endian; '=' native, which numpy never writes but a hand-made header might */
  if (strcmp(d, "<f4") == 0 || strcmp(d, "=f4") == 0)
    out->elem_size = 4;
  else if (strcmp(d, "<f8") == 0 || strcmp(d, "=f8") == 0)
    out->elem_size = 8;
  else if (strcmp(d, "<f2") == 0 || strcmp(d, "=f2") == 0)
    out->elem_size = 2;
  else {
    const char *k = descr_kind(d, kind, sizeof kind);
    if (d[0] == '>' && d[1] == 'f')
      rc = convd_errf(err, errlen, CONVD_EINVAL,
                      "%s: the array is big-endian %s ('%s'); convd reads little-endian floats: "
                      "convert with a.astype('<f4')",
                      path, k, d);
    else if (d[0] == '[')
      rc = convd_errf(err, errlen, CONVD_EINVAL,
                      "%s: the array has a structured (record) dtype; convd reads arrays of float32, "
                      "float64 or float16: save one field, e.g. a['name'].astype(numpy.float32)",
                      path);
    else
      rc = convd_errf(err, errlen, CONVD_EINVAL,
                      "%s: the array's dtype is %s%s'%s'%s; convd reads float32, float64 and "
                      "float16 ('<f4', '<f8', '<f2'): convert with a.astype(numpy.float32)",
                      path, k[0] ? k : "", k[0] ? " (" : "", d, k[0] ? ")" : "");
    goto out;
  }
  const char *fo = dict_value(hdr, "fortran_order");
  if (fo == NULL || strncmp(fo, "False", 5) != 0) {
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "%s: the array is in Fortran order; convd reads C order: save "
                    "numpy.ascontiguousarray(a)",
                    path);
    goto out;
  }
  const char *sh = dict_value(hdr, "shape");
  if (sh == NULL || *sh != '(') {
    rc = convd_errf(err, errlen, CONVD_EINVAL, "%s: .npy header has no shape", path);
    goto out;
  }
  sh++;
  size_t count = 1;
  for (;;) {
    while (*sh == ' ' || *sh == ',') sh++;
    if (*sh == ')') break;
    char *end;
    errno = 0;
    long long d = strtoll(sh, &end, 10);
    if (end == sh || errno || d < 0 || out->ndim == CONVD_NPY_MAX_DIMS ||
        convd_size_mul(count, (size_t)d, &count)) {
      rc = convd_errf(err, errlen, CONVD_EINVAL, "%s: .npy shape is malformed or too large", path);
      goto out;
    }
    out->shape[out->ndim++] = d;
    sh = end;
  }
  size_t bytes;
  if (convd_size_mul(count, (size_t)out->elem_size, &bytes)) {
    rc = convd_errf(err, errlen, CONVD_EINVAL, "%s: .npy array is too large", path);
    goto out;
  }
  out->count = count;
  out->data_offset = ftell(f);
  if (!with_data) {
    if (fseek(f, 0, SEEK_END) != 0 || ftell(f) - out->data_offset < (long)bytes) goto short_read;
    goto out;
  }
  out->data = malloc(bytes ? bytes : 1);
  if (out->data == NULL) {
    rc = convd_errf(err, errlen, CONVD_ENOMEM, "%s: cannot allocate %zu bytes", path, bytes);
    goto out;
  }
  if (fread(out->data, 1, bytes, f) != bytes) goto short_read;
  goto out;
short_read:
  rc = convd_errf(err, errlen, CONVD_EIO, "%s: file is shorter than its .npy header says", path);
out:
  free(hdr);
  fclose(f);
  if (rc) convd_npy_free(out);
  return rc;
}

int convd_npy_read(const char *path, convd_npy *out, char *err, size_t errlen) {
  return npy_read(path, out, 1, err, errlen);
}

int convd_npy_read_header(const char *path, convd_npy *out, char *err, size_t errlen) {
  return npy_read(path, out, 0, err, errlen);
}

double *convd_npy_to_f64(const convd_npy *a) {
  double *d = malloc((a->count ? a->count : 1) * sizeof *d);
  if (d == NULL) return NULL;
  if (a->elem_size == 8)
    memcpy(d, a->data, a->count * sizeof *d);
  else if (a->elem_size == 2)
    for (size_t i = 0; i < a->count; i++) d[i] = convd_f16_to_f32(((const uint16_t *)a->data)[i]);
  else
    for (size_t i = 0; i < a->count; i++) d[i] = ((const float *)a->data)[i];
  return d;
}

/* The header of a float32 array: magic, version 1.0, the dict padded so that the data starts at
 * a multiple of 64. Returns its length, or 0 when shp does not fit. */
static size_t header_f32(const int64_t *shape, int ndim, unsigned char *out, size_t cap,
                         size_t *count) {
  char dict[256], shp[160] = "";
  size_t n = 0;
  *count = 1;
  for (int i = 0; i < ndim; i++) {
    n += (size_t)snprintf(shp + n, sizeof shp - n, "%lld,%s", (long long)shape[i],
                          i + 1 < ndim ? " " : "");
    *count *= (size_t)shape[i];
  }
  if (ndim > 1) shp[strlen(shp) - 1] = '\0'; /* (a, b) but (a,) for one dimension */
  int dl = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }",
                    shp);
  const size_t total = 10 + (size_t)dl + 1, pad = (64 - total % 64) % 64;
  const size_t hlen = (size_t)dl + pad + 1;
  if (10 + hlen > cap) return 0;
  memcpy(out, MAGIC, 6);
  out[6] = 1, out[7] = 0;
  out[8] = (unsigned char)(hlen & 0xff), out[9] = (unsigned char)(hlen >> 8);
  memcpy(out + 10, dict, (size_t)dl);
  memset(out + 10 + dl, ' ', pad);
  out[10 + hlen - 1] = '\n';
  return 10 + hlen;
}

int convd_npy_create_f32(const char *path, const int64_t *shape, int ndim, long *data_offset,
                         char *err, size_t errlen) {
  unsigned char hdr[512];
  size_t count;
  const size_t hl = header_f32(shape, ndim, hdr, sizeof hdr, &count);
  if (hl == 0) return convd_errf(err, errlen, CONVD_EINVAL, "%s: shape too long for a header", path);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return convd_errf(err, errlen, CONVD_EIO, "%s: %s", path, strerror(errno));
  const off_t size = (off_t)hl + (off_t)(count * sizeof(float));
  int rc = pwrite(fd, hdr, hl, 0) == (ssize_t)hl ? 0 : errno;
  if (rc == 0) rc = posix_fallocate(fd, 0, size);
  if (rc == EOPNOTSUPP || rc == EINVAL) rc = ftruncate(fd, size) ? errno : 0; /* no fallocate here */
  if (rc) {
    close(fd);
    unlink(path);
    return convd_errf(err, errlen, CONVD_EIO, "%s: cannot make room for %lld bytes: %s", path,
                      (long long)size, strerror(rc));
  }
  *data_offset = (long)hl;
  return fd;
}

int convd_npy_write_f32(const char *path, const int64_t *shape, int ndim, const float *data,
                        char *err, size_t errlen) {
  unsigned char hdr[512];
  size_t count;
  const size_t hl = header_f32(shape, ndim, hdr, sizeof hdr, &count);
  if (hl == 0) return convd_errf(err, errlen, CONVD_EINVAL, "%s: shape too long for a header", path);
  FILE *f = fopen(path, "wb");
  if (f == NULL) return convd_errf(err, errlen, CONVD_EIO, "%s: %s", path, strerror(errno));
  int ok = fwrite(hdr, 1, hl, f) == hl && fwrite(data, sizeof(float), count, f) == count;
  if (fclose(f) != 0) ok = 0;
  if (!ok) return convd_errf(err, errlen, CONVD_EIO, "%s: write failed: %s", path, strerror(errno));
  return 0;
}
