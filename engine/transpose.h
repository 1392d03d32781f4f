/* Transpose convolution by kernel segregation. Along one axis with stride s, dilation d and
 * padding p, output position o = s*q + r - p takes its products from the kernel taps k with
 * k*d = r (mod s) only: phase r of the output is an ordinary convolution of the *input* (stride 1)
 * with the sub-kernel of those taps, reversed, at dilation d / gcd(s, d). The s_h * s_w phases
 * together compute every output exactly once and no product with an inserted zero; their
 * outputs interleave into the result.
 *
 * Threads: any (the planner on the thread creating a job; segregation on the worker that first
 * needs a job's weights); no shared state. */
#ifndef CONVD_TRANSPOSE_H
#define CONVD_TRANSPOSE_H

#include <stddef.h>
#include <stdint.h>

#include "conv.h"

/* The greatest common divisor of a and b (non-negative; gcd(a, 0) = a). */
int64_t convd_gcd64(int64_t a, int64_t b);

/* One axis of one phase. */
typedef struct convd_phase_axis {
  int64_t r;          /* the phase: outputs o with (o + pad) mod s == r */
  int64_t taps;       /* kernel taps that reach it (0: its outputs are the bias alone) */
  int64_t k0, kstep;  /* those taps are k0, k0 + kstep, ... */
  int64_t dil;        /* the sub-kernel's dilation */
  int64_t m0, mlast;  /* input shifts of the first and last tap: input i = q - m */
  int64_t q0, q1;     /* the phase's q with 0 <= s*q + r - pad < out: [q0, q1) (maybe empty) */
} convd_phase_axis;

/* Phase r (0 <= r < s) of an axis with stride s, dilation d, kernel k, leading padding pad and
 * out outputs. */
void convd_phase_axis_make(int64_t s, int64_t d, int64_t k, int64_t pad, int64_t out, int64_t r,
                           convd_phase_axis *a);

/* The q range all phases of an axis span: [qa, qb). */
void convd_phase_q_range(int64_t s, int64_t pad, int64_t out, int64_t *qa, int64_t *qb);

/* Where phase outputs [qa, qb) of one axis read the input (rows [i0, i1), clipped to [0, in))
 * and the padding of that window as a stride-1 convolution (pad0 before, pad1 after). Returns
 * 0 when the window holds no input row (the outputs are the bias alone). */
int convd_phase_window(const convd_phase_axis *a, int64_t in, int64_t qa, int64_t qb, int64_t *i0,
                       int64_t *i1, int64_t *pad0, int64_t *pad1);

/* The segregated weights of c (a transpose): for each phase (ry, rx), in phase order (ry
 * major), a dense forward weight block (C_out, C_in/groups, taps_y, taps_x) made from the
 * (C_in, C_out/groups, kH, kW) weights w; the blocks partition the weights, so dst holds
 * c->weight_elems floats. off[ry * s_w + rx] receives each block's offset (off may be NULL).
 * Returns 0, or -1 when out of memory (for a few index arrays). */
int convd_transpose_segregate(const convd_conv *c, const float *w, float *dst, size_t *off);

#endif
