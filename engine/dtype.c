/* See dtype.h. Any thread: pure functions of their arguments, no shared state. */
#include "dtype.h"

#include <string.h>

size_t convd_dtype_size(int dtype) {
  switch (dtype) {
    case CONVD_F32: return 4;
    case CONVD_F16: return 2;
    case CONVD_BF16: return 2;
    default: return 0;
  }
}

const char *convd_dtype_name(int dtype) {
  switch (dtype) {
    case CONVD_F32: return "float32";
    case CONVD_F16: return "float16";
    case CONVD_BF16: return "bfloat16";
    default: return "unknown";
  }
}

static uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

float convd_f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13)); /* inf, NaN (payload kept) */
  if (exp != 0) return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
  /* zero and subnormals: man * 2^-24, exact in float32 */
  const float v = (float)man * 0x1p-24f;
  return sign ? -v : v;
}

uint16_t convd_f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) /* inf, or NaN kept quiet and non-zero */
    return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 | ((a >> 13) & 0x3ff) : 0));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds past 65504 */
  if (a < 0x38800000u) { /* below 2^-14: a subnormal (or zero) half */
    if (a < 0x33000000u) return sign; /* at most half of the smallest subnormal: rounds to 0 */
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e; /* value = m * 2^(e-150); in units of 2^-24 */
    uint32_t q = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1))) q++;
    return (uint16_t)(sign | q);
  }
  /* normal: rebias, then round the 13 dropped bits to nearest even (a carry into the exponent
   * is the right result, up to infinity handled above) */
  uint32_t v = a - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1);
  return (uint16_t)(sign | (v >> 13));
}

float convd_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t convd_f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

void convd_dtype_decode(int dtype, const void *src, float *dst, size_t n) {
  const unsigned char *s = src;
  if (dtype == CONVD_F32) {
    memcpy(dst, src, n * 4);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    uint16_t h;
    memcpy(&h, s + 2 * i, 2);
    dst[i] = dtype == CONVD_F16 ? convd_f16_to_f32(h) : convd_bf16_to_f32(h);
  }
}

void convd_dtype_encode(int dtype, const float *src, void *dst, size_t n) {
  unsigned char *d = dst;
  if (dtype == CONVD_F32) {
    memcpy(dst, src, n * 4);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    const uint16_t h = dtype == CONVD_F16 ? convd_f32_to_f16(src[i]) : convd_f32_to_bf16(src[i]);
    memcpy(d + 2 * i, &h, 2);
  }
}

void convd_dtype_round(int dtype, float *x, size_t n) {
  if (dtype == CONVD_F16)
    for (size_t i = 0; i < n; i++) x[i] = convd_f16_to_f32(convd_f32_to_f16(x[i]));
  else if (dtype == CONVD_BF16)
    for (size_t i = 0; i < n; i++) x[i] = convd_bf16_to_f32(convd_f32_to_bf16(x[i]));
}
