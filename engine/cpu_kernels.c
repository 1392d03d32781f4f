/* See cpu_kernels.h. Called on a CPU device's worker thread; each kernel spreads its output
 * planes over an OpenMP team, every thread writing its own planes from its own padded copy. */
#include "cpu_kernels.h"

#include <stdlib.h>
#include <string.h>

/* The zero-padded copy of one input plane a thread works on: bounded, since padding may be far
 * larger than the input it surrounds. */
#define DW_MAX_PLANE_BYTES (UINT64_C(64) << 20)

/* Elements of the padded plane and its slack, saturating (padding may be near 2^31 per side). */
static uint64_t padded_elems(const convd_conv_params *p) {
  const uint64_t ph = (uint64_t)(p->h + p->pad_top + p->pad_bottom);
  const uint64_t pw = (uint64_t)(p->w + p->pad_left + p->pad_right);
  if (ph > (UINT64_C(1) << 30) || pw > (UINT64_C(1) << 30)) return UINT64_MAX / 8;
  return ph * pw + 16 * (uint64_t)p->stride_w + 1;
}

int convd_cpuk_is_depthwise(const convd_conv *conv) {
  const convd_conv_params *p = &conv->p;
  return p->c_per_group == 1 && p->groups == p->c_in && p->groups > 1 &&
         padded_elems(p) * sizeof(float) <= DW_MAX_PLANE_BYTES;
}

/* Output columns per block: one AVX-512 register of accumulators (GCC's vector extension,
 * lowered to whatever registers each ISA clone has). */
#define DW_BLOCK 16
typedef float dw_vec __attribute__((vector_size(DW_BLOCK * sizeof(float))));

/* One output plane of a depthwise convolution from a zero-padded input plane (pw columns, with
 * slack after the plane for a whole last block): per block of DW_BLOCK output columns the sums
 * stay in registers across all kernel taps, and only the valid columns are stored. Cloned per
 * ISA and picked at load time, so that a portable build still runs AVX-512 or AVX2 where the CPU
 * has them. */
/* The common case, 3x3 with unit stride and dilation, with the taps known at compile time: the
 * nine weights stay in registers for the whole plane and each output vector is nine loads and
 * nine FMAs. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void dw_plane_3x3(const convd_conv *conv, const float *restrict pad, size_t pw,
                         const float *restrict k, size_t k_hs, float bias, float *restrict outp,
                         size_t out_hs) {
  const int64_t w_out = conv->w_out;
  dw_vec kv[9];
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++) kv[i * 3 + j] = (dw_vec){0} + k[(size_t)i * k_hs + (size_t)j];
  for (int64_t oh = 0; oh < conv->h_out; oh++) {
    float *restrict out = outp + (size_t)oh * out_hs;
    const float *restrict r0 = pad + (size_t)oh * pw, *restrict r1 = r0 + pw, *restrict r2 = r1 + pw;
    for (int64_t ow0 = 0; ow0 < w_out; ow0 += DW_BLOCK) {
      dw_vec a = (dw_vec){0} + bias, in;
#define TAP(row, j, w)                               \
  memcpy(&in, (row) + ow0 + (j), sizeof in);         \
  a += kv[w] * in;
      TAP(r0, 0, 0) TAP(r0, 1, 1) TAP(r0, 2, 2)
      TAP(r1, 0, 3) TAP(r1, 1, 4) TAP(r1, 2, 5)
      TAP(r2, 0, 6) TAP(r2, 1, 7) TAP(r2, 2, 8)
#undef TAP
      const int64_t n = w_out - ow0 < DW_BLOCK ? w_out - ow0 : DW_BLOCK;
      if (n == DW_BLOCK) memcpy(out + ow0, &a, sizeof a);
      else for (int64_t v = 0; v < n; v++) out[ow0 + v] = a[v];
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void dw_plane(const convd_conv *conv, const float *restrict pad, size_t pw,
                     const float *restrict k, size_t k_hs, float bias, float *restrict outp,
                     size_t out_hs) {
  const convd_conv_params *p = &conv->p;
  const int64_t w_out = conv->w_out, sw = p->stride_w;
  for (int64_t oh = 0; oh < conv->h_out; oh++) {
    float *restrict out = outp + (size_t)oh * out_hs;
    const float *restrict rows = pad + (size_t)(oh * p->stride_h) * pw;
    for (int64_t ow0 = 0; ow0 < w_out; ow0 += DW_BLOCK) {
      dw_vec acc = (dw_vec){0} + bias;
      for (int64_t ki = 0; ki < p->kh; ki++) {
        const float *restrict row = rows + (size_t)(ki * p->dil_h) * pw + (size_t)(ow0 * sw);
        for (int64_t kj = 0; kj < p->kw; kj++) {
          const float *restrict r = row + kj * p->dil_w;
          dw_vec in;
          if (sw == 1) {
            memcpy(&in, r, sizeof in); /* an unaligned load */
          } else {
            for (int v = 0; v < DW_BLOCK; v++) in[v] = r[v * sw];
          }
          acc += k[(size_t)ki * k_hs + (size_t)kj] * in;
        }
      }
      const int64_t n = w_out - ow0 < DW_BLOCK ? w_out - ow0 : DW_BLOCK;
      if (n == DW_BLOCK) memcpy(out + ow0, &acc, sizeof acc);
      else for (int64_t v = 0; v < n; v++) out[ow0 + v] = acc[v];
    }
  }
}

int convd_cpuk_depthwise(const convd_conv *conv, convd_view x, convd_view w, const float *b,
                         convd_view y, int threads) {
  const convd_conv_params *p = &conv->p;
  const int64_t mult = p->c_out / p->groups, planes = p->n * p->c_out;
  const size_t ph = (size_t)(p->h + p->pad_top + p->pad_bottom);
  const size_t pw = (size_t)(p->w + p->pad_left + p->pad_right);
  /* A last block reads up to DW_BLOCK * stride columns past a row's end: slack after the plane
   * keeps those reads inside the buffer (their lanes are not stored). */
  const size_t elems = ph * pw + (size_t)(DW_BLOCK * p->stride_w) + 1;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float *pad = malloc(elems * sizeof(float));
    if (pad == NULL) failed = 1;
    else memset(pad, 0, elems * sizeof(float));
    int64_t have = -1; /* the input plane in pad */
#pragma omp for schedule(static)
    for (int64_t pl = 0; pl < planes; pl++) {
      if (pad == NULL) continue;
      const int64_t n = pl / p->c_out, oc = pl % p->c_out, ic = n * p->c_in + oc / mult;
      if (ic != have) { /* copy the plane inside its zero border (the border stays zero) */
        const float *in = x.p + (size_t)n * x.ns + (size_t)(ic - n * p->c_in) * x.cs;
        for (int64_t h = 0; h < p->h; h++)
          memcpy(pad + (size_t)(h + p->pad_top) * pw + (size_t)p->pad_left, in + (size_t)h * x.hs,
                 (size_t)p->w * sizeof(float));
        have = ic;
      }
      const int is3x3 = p->kh == 3 && p->kw == 3 && p->stride_h == 1 && p->stride_w == 1 &&
                        p->dil_h == 1 && p->dil_w == 1;
      (is3x3 ? dw_plane_3x3 : dw_plane)(conv, pad, pw, w.p + (size_t)oc * w.ns, w.hs,
                                        p->has_bias && b ? b[oc] : 0.0f,
                                        y.p + (size_t)n * y.ns + (size_t)oc * y.cs, y.hs);
    }
    free(pad);
  }
  return failed ? -1 : 0;
}
