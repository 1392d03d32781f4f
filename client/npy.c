#include "npy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conv.h"
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

int convd_npy_read(const char *path, convd_npy *out, char *err, size_t errlen) {
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

  const char *descr = dict_value(hdr, "descr");
  if (descr && (strncmp(descr, "'<f4'", 5) == 0 || strncmp(descr, "'=f4'", 5) == 0))
    out->elem_size = 4;
  else if (descr && (strncmp(descr, "'<f8'", 5) == 0 || strncmp(descr, "'=f8'", 5) == 0))
    out->elem_size = 8;
  else {
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "%s: dtype %.8s is not supported: convd reads little-endian float32 ('<f4') "
                    "or float64 ('<f8'); convert with a.astype(numpy.float32)",
                    path, descr ? descr : "?");
    goto out;
  }
  const char *fo = dict_value(hdr, "fortran_order");
  if (fo == NULL || strncmp(fo, "False", 5) != 0) {
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "%s: array is in Fortran order; save a C-ordered array "
                    "(numpy.ascontiguousarray)",
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

double *convd_npy_to_f64(const convd_npy *a) {
  double *d = malloc((a->count ? a->count : 1) * sizeof *d);
  if (d == NULL) return NULL;
  if (a->elem_size == 8)
    memcpy(d, a->data, a->count * sizeof *d);
  else
    for (size_t i = 0; i < a->count; i++) d[i] = ((const float *)a->data)[i];
  return d;
}

int convd_npy_write_f32(const char *path, const int64_t *shape, int ndim, const float *data,
                        char *err, size_t errlen) {
  char dict[256], shp[160] = "";
  size_t count = 1, n = 0;
  for (int i = 0; i < ndim; i++) {
    n += (size_t)snprintf(shp + n, sizeof shp - n, "%lld,%s", (long long)shape[i],
                          i + 1 < ndim ? " " : "");
    count *= (size_t)shape[i];
  }
  if (ndim > 1) shp[strlen(shp) - 1] = '\0'; /* (a, b) but (a,) for one dimension */
  int dl = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }",
                    shp);
  /* Pad with spaces so that magic + length + header + '\n' is a multiple of 64. */
  size_t total = 10 + (size_t)dl + 1;
  size_t pad = (64 - total % 64) % 64;
  size_t hlen = (size_t)dl + pad + 1;
  FILE *f = fopen(path, "wb");
  if (f == NULL) return convd_errf(err, errlen, CONVD_EIO, "%s: %s", path, strerror(errno));
  unsigned char pre[10];
  memcpy(pre, MAGIC, 6);
  pre[6] = 1;
  pre[7] = 0;
  pre[8] = (unsigned char)(hlen & 0xff);
  pre[9] = (unsigned char)(hlen >> 8);
  int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(dict, 1, (size_t)dl, f) == (size_t)dl;
  for (size_t i = 0; ok && i < pad; i++) ok = fputc(' ', f) != EOF;
  ok = ok && fputc('\n', f) != EOF;
  ok = ok && fwrite(data, sizeof(float), count, f) == count;
  if (fclose(f) != 0) ok = 0;
  if (!ok) return convd_errf(err, errlen, CONVD_EIO, "%s: write failed: %s", path, strerror(errno));
  return 0;
}
