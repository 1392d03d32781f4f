/* See ref.h. Runs on the thread of whoever calls it (a reference device's worker, a test); no
 * shared state. */
#include "ref.h"

#include <stdlib.h>

#include "err.h"

int convd_ref_conv2d_view(const convd_conv *c, convd_view x, convd_view w, const float *b,
                          convd_view y, const atomic_int *cancel) {
  const convd_conv_params *p = &c->p;
  const int64_t cout_per_group = p->c_out / p->groups;

  for (int64_t n = 0; n < p->n; n++) {
    for (int64_t oc = 0; oc < p->c_out; oc++) {
      if (cancel != NULL && atomic_load_explicit(cancel, memory_order_relaxed))
        return CONVD_ECANCELED;
      const int64_t g = oc / cout_per_group;
      for (int64_t oh = 0; oh < c->h_out; oh++) {
        for (int64_t ow = 0; ow < c->w_out; ow++) {
          double acc = (p->has_bias && b != NULL) ? (double)b[oc] : 0.0;
          for (int64_t icg = 0; icg < p->c_per_group; icg++) {
            const int64_t ic = g * p->c_per_group + icg;
            for (int64_t ki = 0; ki < p->kh; ki++) {
              /* Input row under kernel row ki; rows outside [0, H) are the zero padding. */
              const int64_t ih = oh * p->stride_h - p->pad_top + ki * p->dil_h;
              if (ih < 0 || ih >= p->h) continue;
              for (int64_t kj = 0; kj < p->kw; kj++) {
                const int64_t iw = ow * p->stride_w - p->pad_left + kj * p->dil_w;
                if (iw < 0 || iw >= p->w) continue;
                const double xv = x.p[(size_t)n * x.ns + (size_t)ic * x.cs + (size_t)ih * x.hs + (size_t)iw];
                const double wv = w.p[(size_t)oc * w.ns + (size_t)icg * w.cs + (size_t)ki * w.hs + (size_t)kj];
                acc += xv * wv;
              }
            }
          }
          y.p[(size_t)n * y.ns + (size_t)oc * y.cs + (size_t)oh * y.hs + (size_t)ow] = (float)acc;
        }
      }
    }
  }
  return 0;
}

int convd_ref_conv2d(const convd_conv *c, const float *x, const float *w, const float *b, float *y,
                     const atomic_int *cancel) {
  const convd_conv_params *p = &c->p;
  return convd_ref_conv2d_view(c, convd_view_dense(x, p->c_in, p->h, p->w),
                               convd_view_dense(w, p->c_per_group, p->kh, p->kw), b,
                               convd_view_dense(y, p->c_out, c->h_out, c->w_out), cancel);
}

int convd_ref_conv_transpose2d(const convd_conv *c, const float *x, const float *w, const float *b,
                               float *y, const atomic_int *cancel) {
  const convd_conv_params *p = &c->p;
  const int64_t opg = p->c_out / p->groups, H = c->h_out, W = c->w_out;
  double *acc = calloc((size_t)H * (size_t)W, sizeof *acc);
  if (acc == NULL) return CONVD_ENOMEM;
  for (int64_t n = 0; n < p->n; n++)
    for (int64_t oc = 0; oc < p->c_out; oc++) {
      if (cancel != NULL && atomic_load_explicit(cancel, memory_order_relaxed)) {
        free(acc);
        return CONVD_ECANCELED;
      }
      const int64_t g = oc / opg, ocl = oc % opg;
      for (size_t i = 0; i < (size_t)(H * W); i++) acc[i] = (p->has_bias && b) ? (double)b[oc] : 0.0;
      /* The scatter form: every input element adds its products to the outputs its kernel
       * covers; the padding crops the full output (oy = iy * stride + ky * dilation - pad). */
      for (int64_t icg = 0; icg < p->c_per_group; icg++) {
        const int64_t ic = g * p->c_per_group + icg;
        const float *xp = x + ((size_t)n * (size_t)p->c_in + (size_t)ic) * (size_t)p->h * (size_t)p->w;
        const float *wp = w + ((size_t)ic * (size_t)opg + (size_t)ocl) * (size_t)p->kh * (size_t)p->kw;
        for (int64_t iy = 0; iy < p->h; iy++)
          for (int64_t ix = 0; ix < p->w; ix++) {
            const double xv = xp[(size_t)iy * (size_t)p->w + (size_t)ix];
            for (int64_t ky = 0; ky < p->kh; ky++) {
              const int64_t oy = iy * p->stride_h + ky * p->dil_h - p->pad_top;
              if (oy < 0 || oy >= H) continue;
              for (int64_t kx = 0; kx < p->kw; kx++) {
                const int64_t ox = ix * p->stride_w + kx * p->dil_w - p->pad_left;
                if (ox < 0 || ox >= W) continue;
                acc[(size_t)oy * (size_t)W + (size_t)ox] += xv * (double)wp[(size_t)ky * (size_t)p->kw + (size_t)kx];
              }
            }
          }
      }
      float *yp = y + ((size_t)n * (size_t)p->c_out + (size_t)oc) * (size_t)H * (size_t)W;
      for (size_t i = 0; i < (size_t)(H * W); i++) yp[i] = (float)acc[i];
    }
  free(acc);
  return 0;
}
