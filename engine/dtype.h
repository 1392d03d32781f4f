/* Element types on the wire. The engine holds float32 on the host whatever the wire type:
 * float16 and bfloat16 tensors are widened exactly on arrival (every half/bfloat16 value is a
 * float32 value) and rounded once, to nearest even, on the way out. The reference therefore
 * "upcasts": it sees the same exact values and accumulates in float64. A device may compute in
 * the narrow type (the CUDA device runs float16/bfloat16 on tensor cores; the CPU device runs
 * bfloat16 in bf16 where the CPU has bf16 units, engine/device_cpu.c).
 *
 * Threads: any (the daemon converts on its completion-queue thread, the CUDA device on its
 * worker); no shared state. */
#ifndef CONVD_DTYPE_H
#define CONVD_DTYPE_H

#include <stddef.h>
#include <stdint.h>

enum convd_dtype {
  CONVD_F32 = 0,
  CONVD_F16 = 1,
  CONVD_BF16 = 2,
};

/* Bytes per element; 0 for a value outside the enum. */
size_t convd_dtype_size(int dtype);
const char *convd_dtype_name(int dtype);

/* n elements of type dtype at src (any alignment) into floats. */
void convd_dtype_decode(int dtype, const void *src, float *dst, size_t n);
/* n floats into elements of type dtype at dst (any alignment), rounding to nearest even;
 * NaN stays NaN, values beyond the type's range become infinities. */
void convd_dtype_encode(int dtype, const float *src, void *dst, size_t n);
/* Rounds n floats in place to the nearest value of dtype (tests: inputs a client could send). */
void convd_dtype_round(int dtype, float *x, size_t n);

uint16_t convd_f32_to_f16(float f);
float convd_f16_to_f32(uint16_t h);
uint16_t convd_f32_to_bf16(float f);
float convd_bf16_to_f32(uint16_t h);

#endif
