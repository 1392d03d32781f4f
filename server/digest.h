/* Content digests: what names a tensor by its bytes, so that the same weights sent again (in
 * another call, by another client) are recognised. XXH3 from libxxhash. */
#ifndef CONVD_DIGEST_H
#define CONVD_DIGEST_H

#include <stdint.h>

#include "conv.h"

/* The weights' digest: their float32 values (as widened on arrival), shape and wire dtype.
 * Never 0 (0 means "unknown" to the engine). */
uint64_t convd_digest_weights(const convd_conv *c, const float *w);

#endif
