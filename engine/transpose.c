#include "transpose.h"

static int64_t gcd64(int64_t a, int64_t b) {
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
  const int64_t g = gcd64(s, d);
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

void convd_transpose_segregate(const convd_conv *c, const float *w, float *dst, size_t *off) {
  const convd_conv_params *p = &c->p;
  const int64_t opg = p->c_out / p->groups, cpg = p->c_per_group;
  size_t at = 0;
  for (int64_t ry = 0; ry < p->stride_h; ry++)
    for (int64_t rx = 0; rx < p->stride_w; rx++) {
      convd_phase_axis ay, ax;
      convd_phase_axis_make(p->stride_h, p->dil_h, p->kh, p->pad_top, c->h_out, ry, &ay);
      convd_phase_axis_make(p->stride_w, p->dil_w, p->kw, p->pad_left, c->w_out, rx, &ax);
      if (off) off[ry * p->stride_w + rx] = at;
      /* forward block [co][ci_l][u][v] = w[ci][co_l][k0 + (taps-1-u)*kstep][...] (reversed) */
      for (int64_t co = 0; co < p->c_out; co++) {
        const int64_t g = co / opg, col = co % opg;
        for (int64_t cil = 0; cil < cpg; cil++) {
          const int64_t ci = g * cpg + cil;
          const float *src = w + ((size_t)ci * (size_t)opg + (size_t)col) * (size_t)p->kh * (size_t)p->kw;
          for (int64_t u = 0; u < ay.taps; u++) {
            const int64_t ky = ay.k0 + (ay.taps - 1 - u) * ay.kstep;
            for (int64_t v = 0; v < ax.taps; v++) {
              const int64_t kx = ax.k0 + (ax.taps - 1 - v) * ax.kstep;
              dst[at++] = src[(size_t)ky * (size_t)p->kw + (size_t)kx];
            }
          }
        }
      }
    }
}
