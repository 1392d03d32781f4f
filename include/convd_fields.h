/* Field lists (X-macros) of the structs that both the engine's API and the client's public API
 * have: a convolution's parameters, a device's description and its counters. One list each, so
 * the engine's and the client's structs cannot drift apart and convert field by field.
 * Self-contained (stdint.h only) and installed beside client.h. Declarations only: any thread.
 *
 * Each entry is X(type, name, array suffix); declare with CONVD_FIELD_DECLARE. */
#ifndef CONVD_FIELDS_H
#define CONVD_FIELDS_H

#include <stdint.h>

#define CONVD_FIELD_DECLARE(type, name, dims) type name dims;

/* A convolution as a client asks for it, as PyTorch's conv2d / conv_transpose2d take it. */
#define CONVD_CONV_PARAMS_FIELDS(X)                                                               \
  /* input, NCHW */                                                                               \
  X(int64_t, n, ) X(int64_t, c_in, ) X(int64_t, h, ) X(int64_t, w, )                              \
  /* weight: (C_out, C_in/groups, kH, kW) */                                                      \
  X(int64_t, c_out, ) X(int64_t, c_per_group, ) X(int64_t, kh, ) X(int64_t, kw, )                 \
  X(int, has_bias, ) /* bias: (C_out) */                                                          \
  X(int64_t, stride_h, ) X(int64_t, stride_w, )                                                   \
  X(int64_t, pad_top, ) X(int64_t, pad_bottom, ) X(int64_t, pad_left, ) X(int64_t, pad_right, )   \
  X(int64_t, dil_h, ) X(int64_t, dil_w, )                                                         \
  X(int64_t, groups, )                                                                            \
  /* Transpose convolution (conv_transpose2d): weights are (C_in, C_out/groups, kH, kW), c_out  \
   * and c_per_group (= C_in/groups) keep their meaning; the padding crops the full output on    \
   * each side and out_pad_h/w add rows/columns at the bottom/right (each smaller than the       \
   * stride or the dilation of its axis). */                                                      \
  X(int, transposed, ) X(int64_t, out_pad_h, ) X(int64_t, out_pad_w, )                            \
  /* the wire's element type (float32 0, float16 1, bfloat16 2); host math is float32 */          \
  X(int, dtype, )                                                                                 \
  /* 1: float32 ops may run on TF32 tensor cores (10-bit mantissa products) */                    \
  X(int, allow_tf32, )

/* A device as ListDevices describes it (the struct adds its counters as `stats`). */
#define CONVD_DEVICE_INFO_FIELDS(X)                                                               \
  X(unsigned, index, ) X(int, kind, ) /* kind: CPU 1, CUDA 2, reference 3 */                      \
  X(char, name, [64]) X(uint64_t, memory_bytes, ) X(uint64_t, completed_ops, )                    \
  X(double, busy_seconds, ) X(int, healthy, )                                                     \
  X(char, detail, [256]) /* what runs on it, or why it is unhealthy */

/* What a device counts over its life (all optional, zero when not counted). */
#define CONVD_DEVICE_STATS_FIELDS(X)                                                              \
  /* ops whose weight block was / was not cached */                                               \
  X(uint64_t, weight_cache_hits, ) X(uint64_t, weight_cache_misses, )                             \
  X(uint64_t, weight_bytes_loaded, ) /* weight bytes copied into device-owned memory */           \
  X(uint64_t, bytes_to_device, ) X(uint64_t, bytes_from_device, ) /* over the bus (GPU), the link (MPI) */ \
  X(uint64_t, kernel_ns, ) /* time the compute units ran convolutions (GPU: CUDA events) */

#endif
