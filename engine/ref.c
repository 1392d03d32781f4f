#include "ref.h"

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
