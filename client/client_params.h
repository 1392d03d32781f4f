/* In the tree only (client.c, convctl, the tests), never installed: the client's public
 * convd_client_conv_params and the engine's convd_conv_params, field for field, both ways.
 * Pure functions; any thread. */
#ifndef CONVD_CLIENT_PARAMS_H
#define CONVD_CLIENT_PARAMS_H

#include "client.h"
#include "conv.h"

static inline void convd_client_params_to_conv(const convd_client_conv_params *in,
                                               convd_conv_params *out) {
  convd_conv_params_default(out);
  out->n = in->n, out->c_in = in->c_in, out->h = in->h, out->w = in->w;
  out->c_out = in->c_out, out->c_per_group = in->c_per_group, out->kh = in->kh, out->kw = in->kw;
  out->has_bias = in->has_bias;
  out->stride_h = in->stride_h, out->stride_w = in->stride_w;
  out->pad_top = in->pad_top, out->pad_bottom = in->pad_bottom;
  out->pad_left = in->pad_left, out->pad_right = in->pad_right;
  out->dil_h = in->dil_h, out->dil_w = in->dil_w;
  out->groups = in->groups;
  out->transposed = in->transposed;
  out->out_pad_h = in->out_pad_h, out->out_pad_w = in->out_pad_w;
  out->dtype = in->dtype; /* the same numbers: client.c checks at compile time */
  out->allow_tf32 = in->allow_tf32;
}

static inline convd_client_conv_params convd_client_params_from_conv(const convd_conv_params *in) {
  convd_client_conv_params out;
  convd_client_conv_params_default(&out);
  out.n = in->n, out.c_in = in->c_in, out.h = in->h, out.w = in->w;
  out.c_out = in->c_out, out.c_per_group = in->c_per_group, out.kh = in->kh, out.kw = in->kw;
  out.has_bias = in->has_bias;
  out.stride_h = in->stride_h, out.stride_w = in->stride_w;
  out.pad_top = in->pad_top, out.pad_bottom = in->pad_bottom;
  out.pad_left = in->pad_left, out.pad_right = in->pad_right;
  out.dil_h = in->dil_h, out.dil_w = in->dil_w;
  out.groups = in->groups;
  out.transposed = in->transposed;
  out.out_pad_h = in->out_pad_h, out.out_pad_w = in->out_pad_w;
  out.dtype = in->dtype;
  out.allow_tf32 = in->allow_tf32;
  return out;
}

#endif
