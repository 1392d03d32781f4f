/* Row bands: how NCHW tensors travel. A band is rows [h0, h1) of batch item n, all channels, laid
 * out C x (h1-h0) x W inside the band; a band larger than one message is sent as consecutive
 * pieces at byte offsets inside it. These helpers place pieces into a tensor and cut a tensor
 * into pieces; both sides of the wire use them, so the layout is defined once.
 *
 * Threads: any (the daemon's completion-queue thread, the client's caller); no shared state. */
#ifndef CONVD_BAND_H
#define CONVD_BAND_H

#include <stddef.h>
#include <stdint.h>

/* Shape of the tensor bands are cut from, elements of elem_size bytes. */
typedef struct convd_band_shape {
  int64_t n, c, h, w;
  size_t elem_size;
} convd_band_shape;

/* Bytes of band [h0, h1): C * (h1-h0) * W * elem_size. The shape must be one whose total byte
 * size was checked (convd_conv_init), so this cannot overflow. */
size_t convd_band_bytes(const convd_band_shape *s, int64_t h0, int64_t h1);

/* Copies len bytes of band (n, h0, h1) starting at byte offset off of the band from src into
 * the tensor t. The caller has checked that n, h0 < h1 <= H and off + len <= band bytes. */
void convd_band_scatter(void *t, const convd_band_shape *s, int64_t n, int64_t h0, int64_t h1,
                        size_t off, const void *src, size_t len);

/* The reverse: copies len bytes of the band at offset off out of tensor t into dst. */
void convd_band_gather(const void *t, const convd_band_shape *s, int64_t n, int64_t h0, int64_t h1,
                       size_t off, void *dst, size_t len);

/* As convd_band_gather, from a tensor held as rows: row(ctx, n, h, &cstride) returns row h of
 * batch item n with channel c at offset c * cstride (in elements of elem_size; float rows). */
void convd_band_gather_rows(const convd_band_shape *s, int64_t n, int64_t h0, int64_t h1,
                            size_t off, void *dst, size_t len,
                            const float *(*row)(void *ctx, int64_t n, int64_t h, size_t *cstride),
                            void *ctx);

/* Walks a tensor as bands of whole rows, each piece at most max_bytes: bands hold as many rows
 * as fit in max_bytes (at least one), and a single row larger than max_bytes is split into
 * pieces. Usage: init, then while (next) use n/h0/h1/off/len. */
typedef struct convd_band_iter {
  convd_band_shape s;
  size_t max_bytes;
  int64_t rows_per_band;
  /* the current piece */
  int64_t n, h0, h1;
  size_t off, len;
  /* private */
  int started;
  size_t band_len;
} convd_band_iter;

void convd_band_iter_init(convd_band_iter *it, const convd_band_shape *s, size_t max_bytes);
int convd_band_iter_next(convd_band_iter *it);

#endif
