/* See band.h. Any thread: pure functions of their arguments, no shared state. */
#include "band.h"

#include <string.h>

size_t convd_band_bytes(const convd_band_shape *s, int64_t h0, int64_t h1) {
  return (size_t)s->c * (size_t)(h1 - h0) * (size_t)s->w * s->elem_size;
}

/* Both directions walk the band in row segments: band byte b is channel b / (rows*row),
 * band row (b / row) % rows, byte b % row within the row. */
static void band_copy(char *t, const convd_band_shape *s, int64_t n, int64_t h0, int64_t h1,
                      size_t off, char *buf, size_t len, int to_tensor) {
  const size_t row = (size_t)s->w * s->elem_size;
  const size_t rows = (size_t)(h1 - h0);
  while (len > 0) {
    size_t c = off / (rows * row);
    size_t r = (off / row) % rows;
    size_t x = off % row;
    size_t take = row - x < len ? row - x : len;
    size_t t_off = (((size_t)n * (size_t)s->c + c) * (size_t)s->h + (size_t)h0 + r) * row + x;
    if (to_tensor)
      memcpy(t + t_off, buf, take);
    else
      memcpy(buf, t + t_off, take);
    buf += take;
    off += take;
    len -= take;
  }
}

void convd_band_scatter(void *t, const convd_band_shape *s, int64_t n, int64_t h0, int64_t h1,
                        size_t off, const void *src, size_t len) {
  band_copy(t, s, n, h0, h1, off, (char *)src, len, 1);
}

void convd_band_gather(const void *t, const convd_band_shape *s, int64_t n, int64_t h0, int64_t h1,
                       size_t off, void *dst, size_t len) {
  band_copy((char *)t, s, n, h0, h1, off, dst, len, 0);
}

void convd_band_gather_rows(const convd_band_shape *s, int64_t n, int64_t h0, int64_t h1,
                            size_t off, void *dst, size_t len,
                            const float *(*row)(void *ctx, int64_t n, int64_t h, size_t *cstride),
                            void *ctx) {
  const size_t rbytes = (size_t)s->w * s->elem_size;
  const size_t rows = (size_t)(h1 - h0);
  char *out = dst;
  while (len > 0) {
    size_t c = off / (rows * rbytes);
    size_t r = (off / rbytes) % rows;
    size_t x = off % rbytes;
    size_t take = rbytes - x < len ? rbytes - x : len;
    size_t cstride;
    const char *src = (const char *)row(ctx, n, h0 + (int64_t)r, &cstride);
    memcpy(out, src + c * cstride * s->elem_size + x, take);
    out += take;
    off += take;
    len -= take;
  }
}

void convd_band_iter_init(convd_band_iter *it, const convd_band_shape *s, size_t max_bytes) {
  memset(it, 0, sizeof *it);
  it->s = *s;
  it->max_bytes = max_bytes > 0 ? max_bytes : 1;
  size_t row_all = convd_band_bytes(s, 0, 1);
  size_t rows = row_all > 0 ? it->max_bytes / row_all : 1;
  if (rows < 1) rows = 1;
  if (rows > (size_t)s->h) rows = (size_t)s->h;
  it->rows_per_band = (int64_t)rows;
}

int convd_band_iter_next(convd_band_iter *it) {
  if (!it->started) {
    it->started = 1;
    if (it->s.n < 1 || it->s.h < 1) return 0;
    it->n = 0;
    it->h0 = 0;
  } else if (it->off + it->len < it->band_len) {
    it->off += it->len;
    size_t left = it->band_len - it->off;
    it->len = left < it->max_bytes ? left : it->max_bytes;
    return 1;
  } else {
    it->h0 = it->h1;
    if (it->h0 >= it->s.h) {
      it->h0 = 0;
      if (++it->n >= it->s.n) return 0;
    }
  }
  it->h1 = it->h0 + it->rows_per_band < it->s.h ? it->h0 + it->rows_per_band : it->s.h;
  it->band_len = convd_band_bytes(&it->s, it->h0, it->h1);
  it->off = 0;
  it->len = it->band_len < it->max_bytes ? it->band_len : it->max_bytes;
  return 1;
}
