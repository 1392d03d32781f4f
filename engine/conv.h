/* The convolution descriptor: every shape rule and every size derived from a request is checked
 * here, once, before anything is allocated or computed ("describe before execute"). Kernels and
 * the server trust a descriptor that convd_conv_init accepted.
 *
 * Threads: any (the daemon checks requests on its completion-queue thread); no shared state, and
 * a checked descriptor is read-only. */
#ifndef CONVD_CONV_H
#define CONVD_CONV_H

#include <stddef.h>
#include <stdint.h>

#include "convd_fields.h"

/* The largest value any single dimension, padding, stride or dilation may take. Keeping every
 * field below 2^31 keeps all index arithmetic in int64_t free of overflow. */
#define CONVD_DIM_MAX INT64_C(0x7fffffff)

/* What a client asks for, as it asked. Signed so that bad values can be named in errors. */
typedef struct convd_conv_params {
  CONVD_CONV_PARAMS_FIELDS(CONVD_FIELD_DECLARE) /* convd_fields.h; dtype: enum convd_dtype */
} convd_conv_params;

/* A checked convolution: the parameters plus everything derived from them. */
typedef struct convd_conv {
  convd_conv_params p;
  int64_t h_out, w_out;
  size_t input_elems, weight_elems, bias_elems, output_elems;
  size_t input_bytes, weight_bytes, bias_bytes, output_bytes; /* as float32, on the host */
  size_t wire_elem; /* bytes per element on the wire (dtype) */
  size_t input_wire_bytes, weight_wire_bytes, bias_wire_bytes, output_wire_bytes;
  uint64_t macs; /* multiply-accumulates, saturating at UINT64_MAX */
} convd_conv;

/* 1 when a and b describe the same convolution (field by field: padding bytes never count). */
int convd_conv_params_same(const convd_conv_params *a, const convd_conv_params *b);

/* Fills params with the defaults a client may leave out (stride and dilation 1, no padding,
 * groups 1, no bias). Shapes stay zero and must be set. */
void convd_conv_params_default(convd_conv_params *p);

/* Validates p and computes the derived sizes into c. Returns 0, or CONVD_EINVAL with a message
 * that names the offending values, or CONVD_ERANGE when a size does not fit in memory
 * arithmetic. */
int convd_conv_init(convd_conv *c, const convd_conv_params *p, char *err, size_t errlen);

/* Multiplies a*b into *out; returns 0, or -1 when the product overflows size_t. */
int convd_size_mul(size_t a, size_t b, size_t *out);
int convd_size_add(size_t a, size_t b, size_t *out);

/* Parses a byte size: "1048576", "64K", "4M", "2G", "1T" (powers of 1024; "MiB"/"MB" accepted).
 * Returns 0, or -1 when malformed or out of range. */
int convd_parse_size(const char *s, uint64_t *out);

#endif
