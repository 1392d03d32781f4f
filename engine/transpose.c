/* See transpose.h. Any thread: pure functions of their arguments, no shared state. */
#include "transpose.h"

#include <stdlib.h>

int64_t convd_gcd64(int64_t a, int64_t b) {
  while (b) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

void convd_phase_axis_make(int64_t s, int64_t d, int64_t k, int64_t pad, int64_t out, int64_t r,
                           convd_phase_axis *a) {
  const int64_t g = convd_gcd64(s, d);
  a->r = r;
  a->kstep = s / g;
  a->dil = d / g;
  /* The first tap with k*d = r (mod s): among k < s/g, k*d mod s takes each multiple of g once. */
  a->k0 = -1;
  for (int64_t kk = 0; kk < a->kstep && kk < k; kk++)
    if ((kk * d) % s == r) {
      a->k0 = kk;
      break;
    }
  a->taps = a->k0 < 0 ? 0 : (k - 1 - a->k0) / a->kstep + 1;
  if (a->taps > 0) {
    a->m0 = (a->k0 * d - r) / s;
    a->mlast = a->m0 + (a->taps - 1) * a->dil;
  } else {
    a->m0 = a->mlast = 0;
  }
  /* 0 <= s*q + r - pad <= out - 1 */
  a->q0 = floor_div(pad - r + s - 1, s);
  a->q1 = floor_div(out - 1 + pad - r, s) + 1;
  if (a->q1 < a->q0) a->q1 = a->q0;
}

void convd_phase_q_range(int64_t s, int64_t pad, int64_t out, int64_t *qa, int64_t *qb) {
  *qa = floor_div(pad, s);
  *qb = floor_div(out - 1 + pad, s) + 1;
}

int convd_phase_window(const convd_phase_axis *a, int64_t in, int64_t qa, int64_t qb, int64_t *i0,
                       int64_t *i1, int64_t *pad0, int64_t *pad1) {
  /* Output q reads inputs q - mlast ... q - m0; as a stride-1 convolution of the window starting
   * at i0, output t = q - qa reads i0 + t - pad0 + u * dil for taps u (reversed order). */
  const int64_t lo = qa - a->mlast, hi = qb - a->m0; /* unclipped window [lo, hi) */
  *i0 = lo < 0 ? 0 : lo;
  *i1 = hi > in ? in : hi;
  if (a->taps == 0 || *i1 <= *i0 || qb <= qa) {
    *i0 = *i1 = *pad0 = *pad1 = 0;
    return 0;
  }
  *pad0 = *i0 - lo;
  *pad1 = hi - *i1;
  return 1;
}

/* One axis of the segregation: for each phase r its tap count taps[r], and for each kernel
 * index k the phase (phase_of[k]) and the position within the phase's sub-kernel (pos_of[k])
 * that it lands at (sub-kernels are flipped: the last tap comes first). */
static void axis_taps(int64_t s, int64_t dil, int64_t k, int64_t pad, int64_t out, int64_t *taps,
                      int64_t *phase_of, int64_t *pos_of) {
  for (int64_t r = 0; r < s; r++) {
    convd_phase_axis a;
    convd_phase_axis_make(s, dil, k, pad, out, r, &a);
    taps[r] = a.taps;
    for (int64_t u = 0; u < a.taps; u++) {
      const int64_t kk = a.k0 + (a.taps - 1 - u) * a.kstep;
      phase_of[kk] = r, pos_of[kk] = u;
    }
  }
}

int convd_transpose_segregate(const convd_conv *c, const float *w, float *dst, size_t *off) {
  const convd_conv_params *p = &c->p;
  const int64_t opg = p->c_out / p->groups, cpg = p->c_per_group, sh = p->stride_h, sw = p->stride_w;
  const size_t pairs = (size_t)p->c_out * (size_t)cpg; /* (output channel, input channel) pairs */
  /* Where each kernel row and column goes: its phase, its place in the reversed sub-kernel, and
   * the phases' tap counts. Phase blocks follow each other in phase order (ry major). */
  int64_t ty[4096], tx[4096]; /* stride <= 4096 per axis is checked by convd_conv_init */
  int64_t *ry_of = calloc((size_t)p->kh, sizeof *ry_of), *u_of = calloc((size_t)p->kh, sizeof *u_of);
  int64_t *rx_of = calloc((size_t)p->kw, sizeof *rx_of), *v_of = calloc((size_t)p->kw, sizeof *v_of);
  size_t *base = calloc((size_t)(sh * sw), sizeof *base);
  if (!ry_of || !u_of || !rx_of || !v_of || !base) {
    free(ry_of), free(u_of), free(rx_of), free(v_of), free(base);
    return -1;
  }
  axis_taps(sh, p->dil_h, p->kh, p->pad_top, c->h_out, ty, ry_of, u_of);
  axis_taps(sw, p->dil_w, p->kw, p->pad_left, c->w_out, tx, rx_of, v_of);
  size_t at = 0;
  for (int64_t ry = 0; ry < sh; ry++)
    for (int64_t rx = 0; rx < sw; rx++) {
      if (off) off[ry * sw + rx] = at;
      base[ry * sw + rx] = at;
      at += pairs * (size_t)(ty[ry] * tx[rx]);
    }
  /* Blocks of output x input channels, so that both the reads (the weights of one input channel
   * for a run of output channels are contiguous) and the writes (one output channel's taps for a
   * run of input channels are contiguous within each phase) stay in cache. */
  enum { BLOCK = 32 };
  for (int64_t co0 = 0; co0 < p->c_out; co0 += BLOCK)
    for (int64_t ci0 = 0; ci0 < cpg; ci0 += BLOCK)
      for (int64_t co = co0; co < co0 + BLOCK && co < p->c_out; co++) {
        const int64_t g = co / opg, col = co % opg;
        for (int64_t cil = ci0; cil < ci0 + BLOCK && cil < cpg; cil++) {
          const float *src = w + ((size_t)(g * cpg + cil) * (size_t)opg + (size_t)col) * (size_t)p->kh * (size_t)p->kw;
          const size_t pair = (size_t)co * (size_t)cpg + (size_t)cil;
          for (int64_t ky = 0; ky < p->kh; ky++) {
            const int64_t ry = ry_of[ky], u = u_of[ky];
            for (int64_t kx = 0; kx < p->kw; kx++) {
              const int64_t rx = rx_of[kx], n = ty[ry] * tx[rx];
              dst[base[ry * sw + rx] + pair * (size_t)n + (size_t)(u * tx[rx] + v_of[kx])] = src[ky * p->kw + kx];
            }
          }
        }
      }
  free(ry_of), free(u_of), free(rx_of), free(v_of), free(base);
  return 0;
}
