/* The reference convolution: written to be obviously right, not fast. Every other path is tested
 * against it. float32 in and out, float64 accumulation. Runs on the calling thread (a reference
 * device's worker, a test); no shared state. */
#ifndef CONVD_REF_H
#define CONVD_REF_H

#include <stdatomic.h>

#include "conv.h"
#include "view.h"

/* y = conv2d(x, w) + b for a descriptor accepted by convd_conv_init, on dense NCHW tensors. b may
 * be NULL when the descriptor has no bias. cancel, when not NULL, is polled once per output
 * plane; a non-zero value stops the work and returns CONVD_ECANCELED with y partly written.
 * Returns 0. */
int convd_ref_conv2d(const convd_conv *c, const float *x, const float *w, const float *b, float *y,
                     const atomic_int *cancel);

/* The same on strided views (weights as a view with n = output channel, c = input channel). */
int convd_ref_conv2d_view(const convd_conv *c, convd_view x, convd_view w, const float *b,
                          convd_view y, const atomic_int *cancel);

/* y = conv_transpose2d(x, w) + b (c->p.transposed), written in the scatter form for clarity:
 * weights (C_in, C_out/groups, kH, kW). Returns 0, CONVD_ENOMEM or CONVD_ECANCELED. */
int convd_ref_conv_transpose2d(const convd_conv *c, const float *x, const float *w, const float *b,
                               float *y, const atomic_int *cancel);

#endif
