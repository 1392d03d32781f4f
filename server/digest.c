/* See digest.h. Threads: any (pure functions). */
#include "digest.h"

#include <xxhash.h>

uint64_t convd_digest_weights(const convd_conv *c, const float *w) {
  const convd_conv_params *p = &c->p;
  /* The shape and dtype seed the hash: the same bytes as another shape are other weights. */
  const int64_t shape[5] = {p->c_out, p->c_per_group, p->kh, p->kw, p->dtype};
  const uint64_t seed = XXH3_64bits(shape, sizeof shape);
  const uint64_t h = XXH3_64bits_withSeed(w, c->weight_elems * sizeof(float), seed);
  return h ? h : 1;
}
