/* In the tree only (client.c, convctl, the tests), never installed: the client's public
 * convd_client_conv_params and the engine's convd_conv_params, field for field, both ways.
 * Pure functions; any thread. */
#ifndef CONVD_CLIENT_PARAMS_H
#define CONVD_CLIENT_PARAMS_H

#include "client.h"
#include "conv.h"

#define CONVD_PARAM_COPY(type, name, dims) dst->name = src->name;

static inline void convd_client_params_to_conv(const convd_client_conv_params *src,
                                               convd_conv_params *dst) {
  CONVD_CONV_PARAMS_FIELDS(CONVD_PARAM_COPY) /* dtype: the same numbers, checked in client.c */
}

static inline convd_client_conv_params convd_client_params_from_conv(const convd_conv_params *in) {
  convd_client_conv_params out, *dst = &out;
  const convd_conv_params *src = in;
  CONVD_CONV_PARAMS_FIELDS(CONVD_PARAM_COPY)
  return out;
}

#undef CONVD_PARAM_COPY

#endif
