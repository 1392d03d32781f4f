#include "ref.h"

#include "err.h"

int convd_ref_conv2d(const convd_conv *c, const float *x, const float *w, const float *b, float *y,
                     const atomic_int *cancel) {
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
                const double xv = x[((n * p->c_in + ic) * p->h + ih) * p->w + iw];
                const double wv = w[((oc * p->c_per_group + icg) * p->kh + ki) * p->kw + kj];
                acc += xv * wv;
              }
            }
          }
          y[((n * p->c_out + oc) * c->h_out + oh) * c->w_out + ow] = (float)acc;
        }
      }
    }
  }
  return 0;
}
