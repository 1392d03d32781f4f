/* A strided view of a float tensor of up to four dimensions (n, c, h, w), the innermost one
 * unit-stride: element (n, c, h, w) is p[n*ns + c*cs + h*hs + w]. Ops read their input window and
 * weight block, and write their output tile, through views, so that the engine can hand a device
 * a window of a row band or a tile of the output where it lies instead of copying it first.
 * Weights use the same type with n = output channel, c = input channel, h = kernel row.
 * Any thread: a view owns nothing and holds no lock; whoever hands it over keeps it valid. */
#ifndef CONVD_VIEW_H
#define CONVD_VIEW_H

#include <stddef.h>
#include <stdint.h>

typedef struct convd_view {
  float *p;
  size_t ns, cs, hs; /* element strides */
} convd_view;

/* The view of a dense C x H x W (per item) tensor. */
static inline convd_view convd_view_dense(const float *p, int64_t c, int64_t h, int64_t w) {
  convd_view v = {(float *)p, (size_t)(c * h * w), (size_t)(h * w), (size_t)w};
  return v;
}

/* 1 when a view of c x h x w per item is laid out densely (NCHW), as a plain pointer would be. */
static inline int convd_view_is_dense(const convd_view *v, int64_t n, int64_t c, int64_t h,
                                      int64_t w) {
  return v->hs == (size_t)w && (c == 1 || v->cs == (size_t)(h * w)) &&
         (n == 1 || v->ns == (size_t)(c * h * w));
}

#endif
