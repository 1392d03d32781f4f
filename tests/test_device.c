/* Every device kind against the reference: all golden conv2d cases and random shapes (groups,
 * depthwise, stride, dilation, asymmetric padding, N > 1, bias), outputs poisoned first; the
 * CPU device's weight cache. `test_device` runs the host kinds (reference, CPU); `test_device
 * --cuda` runs the same cases on the CUDA device, plus chains, and exits 77 (skipped) where no
 * GPU is visible (ctest: device and device_cuda). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_device.h"
#include "device.h"
#include "dtype.h"
#include "err.h"
#include "ref.h"
#include "testutil.h"

static const char *golden_root = GOLDEN_DIR;

typedef int (*make_fn)(convd_device **d, char *err, size_t errlen);
static int make_ref(convd_device **d, char *err, size_t errlen) {
  return convd_device_ref_create("ref0", 1u << 30, d, err, errlen);
}
static int make_cpu(convd_device **d, char *err, size_t errlen) {
  return convd_device_cpu_create("cpu0", 0, 1u << 30, d, err, errlen);
}
/* GPU 0 with a 1 GiB budget; only in `test_device --cuda` (tests/gpu/run.sh). */
static int make_cuda(convd_device **d, char *err, size_t errlen) {
  return convd_device_cuda_create("cuda0", 0, 1u << 30, d, err, errlen);
}
static const struct {
  const char *name;
  make_fn make;
  int gpu;
} kinds[] = {{"reference", make_ref, 0}, {"cpu", make_cpu, 0}, {"cuda", make_cuda, 1}};

/* 1 when kind k belongs to this run: the host kinds without --cuda, the GPU kinds with it
 * (test_main_cuda has checked that a GPU is visible). */
static int kind_available(size_t k) { return kinds[k].gpu == test_cuda; }

static void test_golden_all_devices(void) {
  char names[64][128], err[512];
  int n = golden_list(golden_root, names, 64);
  for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    if (!kind_available(k)) continue;
    convd_device *d;
    ASSERT_OK(kinds[k].make(&d, err, sizeof err), err);
    printf("  device %s: %s\n", convd_device_name(d), convd_device_detail(d));
    for (int i = 0; i < n; i++) {
      golden g;
      ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
      if (strcmp(g.op, "conv2d") != 0) { /* transposes are tested on their own */
        golden_free(&g);
        continue;
      }
      convd_conv c;
      ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
      float *y = malloc(c.output_bytes);
      poison(y, c.output_elems);
      convd_op_io io = convd_op_io_dense(&c, g.x, g.w, 0, g.b, y, NULL);
      ASSERT_OK(convd_device_run(d, &io, err, sizeof err), err);
      char what[256];
      snprintf(what, sizeof what, "%.100s on %s", names[i], kinds[k].name);
      int rc = check_close(what, y, g.expected, c.output_elems);
      free(y);
      golden_free(&g);
      if (rc) {
        FAIL_AT("%s", what);
        convd_device_destroy(d);
        return;
      }
    }
    convd_device_destroy(d);
  }
}

static void test_random_shapes_all_devices(void) {
  char err[512];
  for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    if (!kind_available(k)) continue;
    convd_device *d;
    ASSERT_OK(kinds[k].make(&d, err, sizeof err), err);
    rng r = {0x5eed0300};
    for (int iter = 0; iter < 120; iter++) {
      convd_conv_params p;
      convd_conv_params_default(&p);
      int64_t kind = rng_range(&r, 0, 3);
      p.groups = kind == 1 ? rng_range(&r, 2, 4) : 1;
      p.n = rng_range(&r, 1, 3);
      p.c_per_group = rng_range(&r, 1, 12);
      p.c_in = p.groups * p.c_per_group;
      p.c_out = p.groups * rng_range(&r, 1, 12);
      if (kind == 3) {
        p.groups = p.c_in = rng_range(&r, 2, 16);
        p.c_per_group = 1;
        p.c_out = p.c_in * rng_range(&r, 1, 2);
      }
      p.kh = rng_range(&r, 1, 7), p.kw = rng_range(&r, 1, 7);
      p.stride_h = rng_range(&r, 1, 3), p.stride_w = rng_range(&r, 1, 3);
      p.dil_h = rng_range(&r, 1, 3), p.dil_w = rng_range(&r, 1, 3);
      p.pad_top = rng_range(&r, 0, 3), p.pad_bottom = rng_range(&r, 0, 3);
      p.pad_left = rng_range(&r, 0, 3), p.pad_right = rng_range(&r, 0, 3);
      p.h = rng_range(&r, (p.kh - 1) * p.dil_h + 1, 40);
      p.w = rng_range(&r, (p.kw - 1) * p.dil_w + 1, 40);
      if (kind == 3) { /* few outputs, a long reduction: the CPU device's im2col + sgemm path */
        p.groups = rng_range(&r, 1, 2);
        p.c_per_group = rng_range(&r, 32, 80);
        p.c_in = p.groups * p.c_per_group;
        p.c_out = p.groups * rng_range(&r, 1, 16);
        p.kh = rng_range(&r, 2, 3), p.kw = rng_range(&r, 2, 3);
        p.h = rng_range(&r, (p.kh - 1) * p.dil_h + 1, 7);
        p.w = rng_range(&r, (p.kw - 1) * p.dil_w + 1, 7);
      }
      p.has_bias = (int)rng_range(&r, 0, 1);
      convd_conv c;
      ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
      float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
      float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
      double *want = malloc(c.output_elems * sizeof(double));
      rng_fill(&r, x, c.input_elems);
      rng_fill(&r, w, c.weight_elems);
      rng_fill(&r, b, c.bias_elems);
      convd_ref_conv2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL);
      for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
      poison(y, c.output_elems);
      /* A key per iteration: the cache may keep the block, but never across shapes. */
      convd_op_io io = convd_op_io_dense(&c, x, w, (uint64_t)(iter % 3) + 1, p.has_bias ? b : NULL, y, NULL);
      int rc = convd_device_run(d, &io, err, sizeof err);
      char what[256];
      snprintf(what, sizeof what,
               "%s iteration %d: in %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " w %" PRId64
               "x%" PRId64 "x%" PRId64 "x%" PRId64 " g%" PRId64,
               kinds[k].name, iter, p.n, p.c_in, p.h, p.w, p.c_out, p.c_per_group, p.kh, p.kw,
               p.groups);
      if (rc) FAIL_AT("%s: %s", what, err);
      else if (check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
      free(x), free(w), free(b), free(y), free(ref), free(want);
      if (test_failed) break;
    }
    convd_device_destroy(d);
    if (test_failed) return;
  }
}

/* Ops read windows of row bands and write tiles of output rows through strided views: every
 * device kind must honour the strides, for the general path and for the CPU device's own
 * kernels (pointwise as sgemm, depthwise direct, small outputs as im2col + sgemm), and write
 * nothing outside the view. */
static void test_strided_views_all_devices(void) {
  char err[512];
  for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    if (!kind_available(k)) continue;
    convd_device *d;
    ASSERT_OK(kinds[k].make(&d, err, sizeof err), err);
    rng r = {0x5eed0302};
    for (int iter = 0; iter < 120; iter++) {
      convd_conv_params p;
      convd_conv_params_default(&p);
      int64_t kind = iter % 4; /* general, pointwise, depthwise, small spatial */
      p.n = rng_range(&r, 1, 2);
      p.c_per_group = rng_range(&r, 1, 12);
      p.c_in = p.c_per_group;
      p.c_out = rng_range(&r, 1, 12);
      p.kh = rng_range(&r, 1, 5), p.kw = rng_range(&r, 1, 5);
      p.stride_h = rng_range(&r, 1, 3), p.stride_w = rng_range(&r, 1, 3);
      p.dil_h = rng_range(&r, 1, 2), p.dil_w = rng_range(&r, 1, 2);
      p.pad_top = rng_range(&r, 0, 3), p.pad_bottom = rng_range(&r, 0, 3);
      p.pad_left = rng_range(&r, 0, 3), p.pad_right = rng_range(&r, 0, 3);
      if (kind == 1) {
        p.kh = p.kw = 1;
        p.stride_h = p.stride_w = 1;
        p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 0;
      } else if (kind == 2) {
        p.groups = p.c_in = rng_range(&r, 2, 20);
        p.c_per_group = 1;
        p.c_out = p.c_in * rng_range(&r, 1, 3);
        if (iter % 2 == 0) { /* the CPU device's unrolled 3x3 path */
          p.kh = p.kw = 3;
          p.stride_h = p.stride_w = p.dil_h = p.dil_w = 1;
        }
      }
      p.h = rng_range(&r, (p.kh - 1) * p.dil_h + 1, 40);
      p.w = rng_range(&r, (p.kw - 1) * p.dil_w + 1, 40);
      if (kind == 3) { /* few outputs, a long reduction: the CPU device's im2col + sgemm path */
        p.groups = rng_range(&r, 1, 2);
        p.c_per_group = rng_range(&r, 32, 80);
        p.c_in = p.groups * p.c_per_group;
        p.c_out = p.groups * rng_range(&r, 1, 16);
        p.kh = rng_range(&r, 2, 3), p.kw = rng_range(&r, 2, 3);
        p.h = rng_range(&r, (p.kh - 1) * p.dil_h + 1, 7);
        p.w = rng_range(&r, (p.kw - 1) * p.dil_w + 1, 7);
      }
      p.has_bias = (int)rng_range(&r, 0, 1);
      convd_conv c;
      ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
      /* Each tensor sits inside a larger one: extra channels, rows and columns around it (rows
       * stay whole for pointwise ops, as the engine's band windows are, so that the CPU device's
       * sgemm path takes them). */
      const int64_t xcol = kind == 1 ? 0 : 3, ycol = kind == 1 ? 0 : 4;
      const int64_t xc = p.c_in + 2, xh = p.h + 3, xw = p.w + (kind == 1 ? 0 : 5);
      const int64_t wo = p.c_out + 1, wi = p.c_per_group + 2;
      const int64_t yc = p.c_out + 2, yh = c.h_out + 2, yw = c.w_out + (kind == 1 ? 0 : 7);
      size_t xn = (size_t)(p.n * xc * xh * xw), wn = (size_t)(wo * wi * p.kh * p.kw),
             yn = (size_t)(p.n * yc * yh * yw);
      float *xb = malloc(xn * 4), *wb = malloc(wn * 4), *yb = malloc(yn * 4), *b = malloc(c.bias_bytes + 4);
      float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *ref = malloc(c.output_bytes);
      float *y = malloc(c.output_bytes);
      double *want = malloc(c.output_elems * sizeof(double));
      rng_fill(&r, xb, xn);
      rng_fill(&r, wb, wn);
      rng_fill(&r, b, c.bias_elems);
      poison(yb, yn);
      convd_view xv = {xb + (size_t)(1 * xh * xw + 2 * xw + xcol), (size_t)(xc * xh * xw), (size_t)(xh * xw), (size_t)xw};
      convd_view wv = {wb + (size_t)(p.kh * p.kw), /* from input channel 1 of output channel 0 */
                       (size_t)(wi * p.kh * p.kw), (size_t)(p.kh * p.kw), (size_t)p.kw};
      convd_view yv = {yb + (size_t)(1 * yh * yw + 1 * yw + ycol), (size_t)(yc * yh * yw), (size_t)(yh * yw), (size_t)yw};
      /* The same tensors, dense, for the reference. */
      for (int64_t n = 0; n < p.n; n++)
        for (int64_t ch = 0; ch < p.c_in; ch++)
          for (int64_t h = 0; h < p.h; h++)
            for (int64_t x0 = 0; x0 < p.w; x0++)
              x[((n * p.c_in + ch) * p.h + h) * p.w + x0] =
                  xv.p[(size_t)n * xv.ns + (size_t)ch * xv.cs + (size_t)h * xv.hs + (size_t)x0];
      for (int64_t o = 0; o < p.c_out; o++)
        for (int64_t i = 0; i < p.c_per_group; i++)
          memcpy(w + (size_t)((o * p.c_per_group + i) * p.kh * p.kw),
                 wv.p + (size_t)o * wv.ns + (size_t)i * wv.cs, (size_t)(p.kh * p.kw) * 4);
      convd_ref_conv2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL);
      for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
      convd_op_io io = {.conv = &c, .x = xv, .w = wv, .b = p.has_bias ? b : NULL, .y = yv};
      int rc = convd_device_run(d, &io, err, sizeof err);
      /* Read the view back densely, and count what changed outside it. */
      size_t outside = 0, inside = 0;
      for (size_t i = 0; i < yn; i++) outside += yb[i] == yb[i];
      for (int64_t n = 0; n < p.n; n++)
        for (int64_t ch = 0; ch < p.c_out; ch++)
          for (int64_t h = 0; h < c.h_out; h++)
            for (int64_t x0 = 0; x0 < c.w_out; x0++) {
              float v = yv.p[(size_t)n * yv.ns + (size_t)ch * yv.cs + (size_t)h * yv.hs + (size_t)x0];
              y[((n * p.c_out + ch) * c.h_out + h) * c.w_out + x0] = v;
              inside += v == v;
            }
      char what[256];
      snprintf(what, sizeof what,
               "%s strided iteration %d (%s): in %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
               " w %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " g%" PRId64,
               kinds[k].name, iter, kind == 0 ? "general" : kind == 1 ? "pointwise" : "depthwise",
               p.n, p.c_in, p.h, p.w, p.c_out, p.c_per_group, p.kh, p.kw, p.groups);
      if (rc) FAIL_AT("%s: %s", what, err);
      else if (check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
      else if (outside != inside) FAIL_AT("%s wrote %zu elements outside its view", what, outside - inside);
      free(xb), free(wb), free(yb), free(b), free(x), free(w), free(ref), free(y), free(want);
      if (test_failed) break;
    }
    convd_device_destroy(d);
    if (test_failed) return;
  }
}

/* The same key with the same weights hits the cache and gives the same answer. */
static void test_cpu_weight_cache(void) {
  char err[256];
  convd_device *d;
  ASSERT_OK(make_cpu(&d, err, sizeof err), err);
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 32, p.h = 20, p.w = 20, p.c_out = 48, p.c_per_group = 32, p.kh = 3, p.kw = 3;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  rng r = {0x5eed0301};
  float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *y1 = malloc(c.output_bytes),
        *y2 = malloc(c.output_bytes);
  rng_fill(&r, x, c.input_elems);
  rng_fill(&r, w, c.weight_elems);
  convd_op_io io = convd_op_io_dense(&c, x, w, 77, NULL, y1, NULL);
  ASSERT_OK(convd_device_run(d, &io, err, sizeof err), err);
  io.y.p = y2;
  ASSERT_OK(convd_device_run(d, &io, err, sizeof err), err);
  ASSERT_TRUE(memcmp(y1, y2, c.output_bytes) == 0);
  convd_device_flush_cache(d);
  free(x), free(w), free(y1), free(y2);
  convd_device_destroy(d);
}

/* Copies the output tile t (inside a poisoned buffer of buf_elems starting at t.p) into dense y,
 * poisons it again, and returns how many elements of the buffer are not poison: those written
 * outside the tile. */
static size_t tile_to_dense(const convd_conv *c, convd_view t, size_t buf_elems, float *y) {
  const convd_conv_params *p = &c->p;
  for (int64_t on = 0; on < p->n; on++)
    for (int64_t oc = 0; oc < p->c_out; oc++)
      for (int64_t oh = 0; oh < c->h_out; oh++) {
        float *row = t.p + (size_t)on * t.ns + (size_t)oc * t.cs + (size_t)oh * t.hs;
        memcpy(y + (size_t)((on * p->c_out + oc) * c->h_out + oh) * (size_t)c->w_out, row,
               (size_t)c->w_out * sizeof(float));
        for (int64_t ow = 0; ow < c->w_out; ow++) row[ow] = NAN;
      }
  size_t written = 0;
  for (size_t i = 0; i < buf_elems; i++) written += !isnan(t.p[i]);
  return written;
}

/* Chains on the CPU device: a convolution's input-channel blocks handed over in order as one
 * tile's chain (convd_op_io.chain_*), the sum built on the device, y untouched (poisoned) until
 * the last block and then the reference's answer: pointwise (sgemm), few outputs with a long
 * reduction (im2col + sgemm, its smaller last block kept on that path) and oneDNN's direct
 * convolution (sum post-op), float32 and bfloat16, uneven last blocks. A block out of order is
 * refused. */
static void test_cpu_chains(void) {
  if (!convd_device_cpu_is_native()) {
    printf("  no oneDNN in this build: the CPU device takes no chains\n");
    return;
  }
  char err[512];
  convd_device *d;
  ASSERT_OK(make_cpu(&d, err, sizeof err), err);
  ASSERT_TRUE(convd_device_accumulates(d));
  rng r = {0xc4a1};
  for (int iter = 0; iter < 36 && !test_failed; iter++) {
    const int kind = iter % 3; /* 0 pointwise, 1 small spatial, 2 general */
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.n = rng_range(&r, 1, 2);
    p.c_in = p.c_per_group = kind == 1 ? rng_range(&r, 64, 160) : rng_range(&r, 8, 96);
    p.c_out = rng_range(&r, 1, 40);
    if (kind == 0) {
      p.kh = p.kw = 1;
      p.h = rng_range(&r, 1, 20), p.w = rng_range(&r, 1, 20);
    } else {
      p.kh = p.kw = 3;
      p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = (int)rng_range(&r, 0, 1);
      p.h = kind == 1 ? rng_range(&r, 3, 8) : rng_range(&r, 8, 24);
      p.w = kind == 1 ? rng_range(&r, 3, 8) : rng_range(&r, 8, 24);
    }
    p.has_bias = (int)rng_range(&r, 0, 1);
    p.dtype = iter % 4 == 3 ? CONVD_BF16 : CONVD_F32;
    convd_conv c;
    ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
    float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
    double *want = malloc(c.output_elems * sizeof(double));
    rng_fill(&r, x, c.input_elems);
    rng_fill(&r, w, c.weight_elems);
    rng_fill(&r, b, c.bias_elems);
    if (p.dtype == CONVD_BF16) { /* bfloat16 values, so that bf16 units give float32's answer */
      convd_dtype_round(CONVD_BF16, x, c.input_elems);
      convd_dtype_round(CONVD_BF16, w, c.weight_elems);
    }
    convd_ref_conv2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL);
    for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
    /* Every other chain writes a tile inside wider, poisoned rows (a tile of an output band, as
     * the engine hands it over): nothing outside the view may change. */
    const int strided = iter % 2;
    const size_t yhs = (size_t)c.w_out + (strided ? 5 : 0), ycs = (size_t)c.h_out * yhs + (strided ? 3 : 0);
    const size_t yns = (size_t)p.c_out * ycs + (strided ? 7 : 0), yb_elems = (size_t)p.n * yns;
    float *yb = malloc(yb_elems * sizeof(float));
    poison(yb, yb_elems);
    const int64_t icb = rng_range(&r, 2, p.c_in / 2 > 2 ? p.c_in / 2 : 2);
    const int len = (int)((p.c_in + icb - 1) / icb);
    const size_t plane = (size_t)(p.h * p.w), taps = (size_t)(p.kh * p.kw);
    convd_conv *blk = malloc(sizeof *blk * (size_t)len);
    char what[200];
    snprintf(what, sizeof what, "chain %d (%s, %s): %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " -> %" PRId64
             ", %d blocks of %" PRId64, iter, kind == 0 ? "pointwise" : kind == 1 ? "small spatial" : "general",
             convd_dtype_name(p.dtype), p.n, p.c_in, p.h, p.w, p.c_out, len, icb);
    for (int k = 0; k < len && !test_failed; k++) {
      convd_conv_params lp = p;
      lp.c_in = lp.c_per_group = k == len - 1 ? p.c_in - icb * k : icb;
      lp.has_bias = p.has_bias && k == 0;
      ASSERT_OK(convd_conv_init(&blk[k], &lp, err, sizeof err), err);
      convd_op_io io = {.conv = &blk[k],
                        .x = {x + (size_t)(k * icb) * plane, (size_t)p.c_in * plane, plane, (size_t)p.w},
                        .w = {w + (size_t)(k * icb) * taps, (size_t)p.c_in * taps, taps, (size_t)p.kw},
                        .w_key = 0xc4a100 + (uint64_t)(iter * 64 + k),
                        .b = lp.has_bias ? b : NULL,
                        .y = {yb, yns, ycs, yhs},
                        .chain_pos = k,
                        .chain_len = len};
      if (convd_device_run(d, &io, err, sizeof err)) FAIL_AT("%s: block %d: %s", what, k, err);
      if (k < len - 1)
        for (size_t i = 0; i < yb_elems && !test_failed; i++)
          if (!isnan(yb[i])) FAIL_AT("%s: y written at block %d of %d", what, k, len);
    }
    /* the tile back to dense; everything else must still be poison */
    const size_t written = tile_to_dense(&c, (convd_view){yb, yns, ycs, yhs}, yb_elems, y);
    if (!test_failed && written) FAIL_AT("%s: %zu elements written outside the tile", what, written);
    if (!test_failed && check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
    free(blk), free(yb);
    free(x), free(w), free(b), free(y), free(ref), free(want);
  }
  /* a later block with no chain open */
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = p.c_per_group = 8, p.h = p.w = 8, p.c_out = 4, p.kh = p.kw = 3;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  float *buf = calloc(c.input_elems + c.weight_elems + c.output_elems, sizeof(float));
  convd_op_io io = convd_op_io_dense(&c, buf, buf + c.input_elems, 0, NULL, buf + c.input_elems + c.weight_elems, NULL);
  io.chain_pos = 1, io.chain_len = 3;
  ASSERT_EQ_INT(convd_device_run(d, &io, err, sizeof err), CONVD_EINTERNAL);
  ASSERT_CONTAINS(err, "out of order");
  free(buf);
  convd_device_destroy(d);
}

/* The column form of a native transpose ($CONVD_TEST_TRANSPOSE_LAYOUT=4: a 1x1 convolution
 * into c_out*kh*kw channels that col2im sums into y) on the views the engine hands over: the
 * input a window of wider rows, the weights and bias a block of a wider layer's output
 * channels, the output a tile inside wider, poisoned rows that nothing outside may change. */
static void test_cpu_transpose_cols_views(void) {
  if (!convd_device_cpu_is_native()) {
    printf("  no oneDNN in this build: no native transposes\n");
    return;
  }
  char err[512];
  setenv("CONVD_TEST_TRANSPOSE_LAYOUT", "4", 1);
  convd_device *d;
  ASSERT_OK(convd_device_cpu_create("cpu", 2, 64u << 20, &d, err, sizeof err), err);
  unsetenv("CONVD_TEST_TRANSPOSE_LAYOUT");
  rng r = {0xc015};
  for (int iter = 0; iter < 12 && !test_failed; iter++) {
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.transposed = 1;
    p.n = rng_range(&r, 1, 2);
    p.c_in = p.c_per_group = rng_range(&r, 8, 40);
    p.c_out = rng_range(&r, 1, 12);
    const int64_t c_all = p.c_out + rng_range(&r, 0, 9), co0 = rng_range(&r, 0, c_all - p.c_out);
    p.kh = rng_range(&r, 1, 4), p.kw = rng_range(&r, 1, 4);
    p.stride_h = rng_range(&r, 1, 3), p.stride_w = rng_range(&r, 1, 3);
    p.dil_h = rng_range(&r, 1, 2), p.dil_w = rng_range(&r, 1, 2);
    p.pad_top = rng_range(&r, 0, p.kh - 1), p.pad_bottom = rng_range(&r, 0, p.kh - 1);
    p.pad_left = rng_range(&r, 0, p.kw - 1), p.pad_right = rng_range(&r, 0, p.kw - 1);
    p.out_pad_h = rng_range(&r, 0, p.stride_h - 1), p.out_pad_w = rng_range(&r, 0, p.stride_w - 1);
    p.h = rng_range(&r, 1, 12), p.w = rng_range(&r, 1, 12);
    p.has_bias = (int)rng_range(&r, 0, 1);
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) {
      iter--;
      continue;
    }
    const size_t taps = (size_t)(p.kh * p.kw), xhs = (size_t)p.w + 3, xcs = (size_t)p.h * xhs + 2;
    const size_t xns = (size_t)p.c_in * xcs + 5, yhs = (size_t)c.w_out + 5, ycs = (size_t)c.h_out * yhs + 3;
    const size_t yns = (size_t)p.c_out * ycs + 7, yb_elems = (size_t)p.n * yns;
    float *xb = malloc((size_t)p.n * xns * sizeof(float)), *wall = malloc((size_t)(p.c_in * c_all) * taps * sizeof(float));
    float *ball = malloc((size_t)c_all * sizeof(float)), *yb = malloc(yb_elems * sizeof(float));
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *ref = malloc(c.output_bytes);
    float *y = malloc(c.output_bytes);
    double *want = malloc(c.output_elems * sizeof(double));
    rng_fill(&r, xb, (size_t)p.n * xns);
    rng_fill(&r, wall, (size_t)(p.c_in * c_all) * taps);
    rng_fill(&r, ball, (size_t)c_all);
    /* the views' contents, dense, for the reference */
    for (int64_t n = 0; n < p.n; n++)
      for (int64_t ch = 0; ch < p.c_in; ch++)
        for (int64_t h = 0; h < p.h; h++)
          memcpy(x + (size_t)(((n * p.c_in + ch) * p.h + h) * p.w), xb + (size_t)n * xns + (size_t)ch * xcs + (size_t)h * xhs,
                 (size_t)p.w * sizeof(float));
    for (int64_t ci = 0; ci < p.c_in; ci++)
      memcpy(w + (size_t)(ci * p.c_out) * taps, wall + ((size_t)(ci * c_all) + (size_t)co0) * taps,
             (size_t)p.c_out * taps * sizeof(float));
    convd_ref_conv_transpose2d(&c, x, w, p.has_bias ? ball + co0 : NULL, ref, NULL);
    for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
    convd_op_io io = {.conv = &c,
                      .x = {xb, xns, xcs, xhs},
                      .w = {wall + (size_t)co0 * taps, (size_t)c_all * taps, taps, (size_t)p.kw},
                      .w_key = 0xc015000 + (uint64_t)iter,
                      .b = p.has_bias ? ball + co0 : NULL,
                      .y = {yb, yns, ycs, yhs}};
    char what[200];
    for (int run = 0; run < 2 && !test_failed; run++) { /* a new primitive and weights, then the cached ones */
      poison(yb, yb_elems);
      snprintf(what, sizeof what, "column form %d run %d: %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " -> %" PRId64
               " of %" PRId64 " from %" PRId64 ", k%" PRId64 "x%" PRId64 " s%" PRId64 ",%" PRId64 " d%" PRId64 ",%" PRId64,
               iter, run, p.n, p.c_in, p.h, p.w, p.c_out, c_all, co0, p.kh, p.kw, p.stride_h, p.stride_w, p.dil_h, p.dil_w);
      if (convd_device_run(d, &io, err, sizeof err)) FAIL_AT("%s: %s", what, err);
      const size_t written = tile_to_dense(&c, (convd_view){yb, yns, ycs, yhs}, yb_elems, y);
      if (!test_failed && written) FAIL_AT("%s: %zu elements written outside the tile", what, written);
      if (!test_failed && check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
    }
    free(xb), free(wall), free(ball), free(yb), free(x), free(w), free(ref), free(y), free(want);
  }
  /* every one in the column form itself, none on the reference kernel */
  const uint64_t fell_back = convd_device_cpu_reference_transposes(d);
  if (!test_failed && fell_back) FAIL_AT("%llu transposes fell back to the reference kernel", (unsigned long long)fell_back);
  convd_device_destroy(d);
}

/* Native transposes on the CPU device (oneDNN's deconvolution) in each layout it may run them
 * in ($CONVD_TEST_TRANSPOSE_LAYOUT restricts it to one; unset, the device times them and keeps
 * the fastest): random one-group shapes against the reference, each run twice (a new primitive,
 * then the cached one), and the first shapes again after the rest pushed them out of the
 * primitive cache (the remembered layout). */
static void test_cpu_transpose_layouts(void) {
  if (!convd_device_cpu_is_native()) {
    printf("  no oneDNN in this build: no native transposes\n");
    return;
  }
  char err[512];
  static const char *layouts[] = {NULL, "0", "1", "2", "3", "4"};
  for (size_t li = 0; li < sizeof layouts / sizeof layouts[0] && !test_failed; li++) {
    if (layouts[li]) setenv("CONVD_TEST_TRANSPOSE_LAYOUT", layouts[li], 1);
    else unsetenv("CONVD_TEST_TRANSPOSE_LAYOUT");
    convd_device *d;
    ASSERT_OK(convd_device_cpu_create("cpu", 2, 64u << 20, &d, err, sizeof err), err);
    unsetenv("CONVD_TEST_TRANSPOSE_LAYOUT");
    rng r = {0x7a05e + li};
    convd_conv_params first[5];
    double worst = 0;
    int drawn = 0;
    for (int iter = 0; iter < 30 + 5 && !test_failed; iter++) {
      convd_conv_params p;
      if (iter < 30) {
        convd_conv_params_default(&p);
        p.transposed = 1;
        p.n = rng_range(&r, 1, 2);
        p.c_in = p.c_per_group = rng_range(&r, 16, 48);
        p.c_out = rng_range(&r, 1, 24);
        p.kh = rng_range(&r, 1, 5), p.kw = rng_range(&r, 1, 5);
        p.stride_h = rng_range(&r, 1, 3), p.stride_w = rng_range(&r, 1, 3);
        p.dil_h = rng_range(&r, 1, 2), p.dil_w = rng_range(&r, 1, 2);
        p.pad_top = rng_range(&r, 0, p.kh - 1), p.pad_bottom = rng_range(&r, 0, p.kh - 1);
        p.pad_left = rng_range(&r, 0, p.kw - 1), p.pad_right = rng_range(&r, 0, p.kw - 1);
        p.out_pad_h = rng_range(&r, 0, p.stride_h - 1), p.out_pad_w = rng_range(&r, 0, p.stride_w - 1);
        p.h = rng_range(&r, 1, 20), p.w = rng_range(&r, 1, 20);
        p.has_bias = (int)rng_range(&r, 0, 1);
        if (iter < 5) first[iter] = p;
      } else {
        p = first[iter - 30]; /* evicted from the primitive cache by now */
      }
      convd_conv c;
      if (convd_conv_init(&c, &p, err, sizeof err)) { /* a padding past the kernel: draw again */
        if (iter < 5) iter--;
        continue;
      }
      drawn++;
      rng dr = {0xda7a + (uint64_t)iter};
      float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
      float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
      double *want = malloc(c.output_elems * sizeof(double));
      rng_fill(&dr, x, c.input_elems);
      rng_fill(&dr, w, c.weight_elems);
      rng_fill(&dr, b, c.bias_elems);
      convd_ref_conv_transpose2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL);
      for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
      for (int run = 0; run < 2 && !test_failed; run++) {
        poison(y, c.output_elems);
        convd_op_io io = convd_op_io_dense(&c, x, w, (uint64_t)iter + 1, p.has_bias ? b : NULL, y, NULL);
        char what[256];
        snprintf(what, sizeof what,
                 "layout %s, transpose %d run %d: in %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " -> %" PRId64
                 " k%" PRId64 "x%" PRId64 " s%" PRId64 ",%" PRId64 " d%" PRId64 ",%" PRId64 " op%" PRId64 ",%" PRId64,
                 layouts[li] ? layouts[li] : "tuned", iter, run, p.n, p.c_in, p.h, p.w, p.c_out, p.kh, p.kw,
                 p.stride_h, p.stride_w, p.dil_h, p.dil_w, p.out_pad_h, p.out_pad_w);
        if (convd_device_run(d, &io, err, sizeof err)) FAIL_AT("%s: %s", what, err);
        else if (check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
        for (size_t i = 0; i < c.output_elems; i++) {
          const double e = fabs(y[i] - want[i]);
          if (e > worst) worst = e;
        }
      }
      free(x), free(w), free(b), free(y), free(ref), free(want);
    }
    const uint64_t fell_back = convd_device_cpu_reference_transposes(d);
    printf("  layout %s: %d transposes, each twice, max abs error %.2g, %llu on the reference kernel\n",
           layouts[li] ? layouts[li] : "tuned", drawn, worst, (unsigned long long)fell_back);
    /* the layout under test ran every one (Debian's oneDNN 2.6 takes all these shapes in each) */
    if (fell_back > 0) FAIL_AT("layout %s: %llu of %d runs fell back to the reference",
                                                     layouts[li] ? layouts[li] : "tuned", (unsigned long long)fell_back, drawn * 2);
    convd_device_destroy(d);
  }
}

/* Which precision the CPU device computes each dtype in. Where its detail says "bfloat16 in
 * bf16", a bfloat16 op on tensors that are NOT bfloat16 values must give the float32 answer on
 * the tensors rounded to bfloat16 (the bias stays float32), which differs from the unrounded
 * answer: proof that the bf16 path ran. Everywhere: the same op as float32 and as float16 gives
 * the float32 answer (float32 stays exact; float16 is not narrowed to bf16, whose 8-bit
 * mantissa is outside float16's bound). Shapes reach oneDNN's convolution (not the depthwise,
 * pointwise or small-output kernels), in both its layouts (channels in 16s or not); one weight
 * key for the three dtypes, so the weight cache must keep their layouts apart; half the cases
 * through strided views inside poisoned buffers.
 * CONVD_TEST_EXPECT_BF16=0|1 says which the detail must claim (ctest's device_no_bf16 caps
 * oneDNN's ISA below AVX512-BF16 and expects 0). */
static void test_cpu_bf16_compute(void) {
  char err[512];
  convd_device *d;
  ASSERT_OK(make_cpu(&d, err, sizeof err), err);
  const int bf16 = strstr(convd_device_detail(d), "bfloat16 in bf16") != NULL;
  printf("  %s: bfloat16 computes in %s\n", convd_device_detail(d), bf16 ? "bf16" : "float32");
  const char *expect = getenv("CONVD_TEST_EXPECT_BF16"); /* ctest's device_no_bf16 sets 0 */
  if (expect && atoi(expect) != bf16) FAIL_AT("CONVD_TEST_EXPECT_BF16=%s, but the detail says otherwise", expect);
  rng r = {0x5eedbf16};
  int discriminated = 0, discriminated_t = 0;
  /* 40 forward convolutions, then 20 native transposes (one group, 16+ input channels, dense:
   * a native plan's op; oneDNN's deconvolution) */
  for (int iter = 0; iter < 60 && !test_failed; iter++) {
    const int tr = iter >= 40;
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.groups = iter % 5 == 4 && !tr ? 2 : 1;
    p.n = rng_range(&r, 1, 2);
    p.c_per_group = iter % 2 ? 16 * rng_range(&r, 1, 4) : rng_range(&r, 2, 40);
    p.c_in = p.groups * p.c_per_group;
    p.c_out = p.groups * (iter % 2 ? 16 * rng_range(&r, 1, 3) : rng_range(&r, 1, 40));
    p.kh = rng_range(&r, 2, 5), p.kw = rng_range(&r, 2, 5);
    p.stride_h = rng_range(&r, 1, 2), p.stride_w = rng_range(&r, 1, 2);
    p.dil_h = rng_range(&r, 1, 2), p.dil_w = rng_range(&r, 1, 2);
    p.pad_top = rng_range(&r, 0, 2), p.pad_bottom = rng_range(&r, 0, 2);
    p.pad_left = rng_range(&r, 0, 2), p.pad_right = rng_range(&r, 0, 2);
    p.h = rng_range(&r, 24, 40), p.w = rng_range(&r, 24, 40);
    p.has_bias = (int)rng_range(&r, 0, 1);
    if (tr) {
      p.transposed = 1;
      p.c_in = p.c_per_group = rng_range(&r, 16, 48);
      p.c_out = rng_range(&r, 1, 40);
      p.stride_h = rng_range(&r, 1, 3), p.stride_w = rng_range(&r, 1, 3);
      p.pad_top = rng_range(&r, 0, p.kh - 1), p.pad_bottom = rng_range(&r, 0, p.kh - 1);
      p.pad_left = rng_range(&r, 0, p.kw - 1), p.pad_right = rng_range(&r, 0, p.kw - 1);
      p.out_pad_h = rng_range(&r, 0, p.stride_h - 1), p.out_pad_w = rng_range(&r, 0, p.stride_w - 1);
      p.h = rng_range(&r, 8, 20), p.w = rng_range(&r, 8, 20);
    }
    convd_conv c;
    if (tr && convd_conv_init(&c, &p, err, sizeof err)) { /* an output padding past the dilation: draw again */
      iter--;
      continue;
    }
    ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
    float *xr = malloc(c.input_bytes), *wr = malloc(c.weight_bytes), *y = malloc(c.output_bytes);
    float *ref = malloc(c.output_bytes), *refr = malloc(c.output_bytes);
    double *want = malloc(c.output_elems * sizeof(double)), *wantr = malloc(c.output_elems * sizeof(double));
    rng_fill(&r, x, c.input_elems);
    rng_fill(&r, w, c.weight_elems);
    rng_fill(&r, b, c.bias_elems);
    memcpy(xr, x, c.input_bytes), memcpy(wr, w, c.weight_bytes);
    convd_dtype_round(CONVD_BF16, xr, c.input_elems);
    convd_dtype_round(CONVD_BF16, wr, c.weight_elems);
    const float *bias = p.has_bias ? b : NULL;
    if (tr) {
      convd_ref_conv_transpose2d(&c, x, w, bias, ref, NULL);
      convd_ref_conv_transpose2d(&c, xr, wr, bias, refr, NULL);
    } else {
      convd_ref_conv2d(&c, x, w, bias, ref, NULL);
      convd_ref_conv2d(&c, xr, wr, bias, refr, NULL);
    }
    double max_ref = 1, gap = 0;
    for (size_t i = 0; i < c.output_elems; i++) {
      want[i] = ref[i], wantr[i] = refr[i];
      if (fabs(want[i]) > max_ref) max_ref = fabs(want[i]);
      if (fabs(want[i] - wantr[i]) > gap) gap = fabs(want[i] - wantr[i]);
    }
    *(tr ? &discriminated_t : &discriminated) += gap > 1e-3 * max_ref; /* well beyond check_close's 1e-4 */
    /* Every other case through strided views (a window of a wider band, a tile of wider output
     * rows) inside poisoned buffers: the device's own layout loops must honour the strides and
     * write nothing outside the view. */
    const int strided = iter % 4 >= 2 && !tr;
    const size_t xhs = (size_t)p.w + 5, xcs = (size_t)p.h * xhs + 7, xns = (size_t)p.c_in * xcs + 3;
    const size_t yhs = (size_t)c.w_out + 3, ycs = (size_t)c.h_out * yhs + 2, yns = (size_t)p.c_out * ycs + 9;
    const size_t xb_elems = (size_t)p.n * xns, yb_elems = (size_t)p.n * yns;
    float *xb = malloc(xb_elems * sizeof(float)), *yb = malloc(yb_elems * sizeof(float));
    poison(xb, xb_elems);
    for (int64_t in = 0; in < p.n; in++)
      for (int64_t ic = 0; ic < p.c_in; ic++)
        for (int64_t ih = 0; ih < p.h; ih++)
          memcpy(xb + (size_t)in * xns + (size_t)ic * xcs + (size_t)ih * xhs,
                 x + (size_t)((in * p.c_in + ic) * p.h + ih) * (size_t)p.w, (size_t)p.w * sizeof(float));
    static const int dtypes[] = {CONVD_BF16, CONVD_F32, CONVD_F16};
    for (size_t t = 0; t < 3 && !test_failed; t++) {
      convd_conv ct;
      p.dtype = dtypes[t];
      ASSERT_OK(convd_conv_init(&ct, &p, err, sizeof err), err);
      poison(y, c.output_elems);
      convd_op_io io = convd_op_io_dense(&ct, x, w, 0xbf16, bias, y, NULL);
      if (strided) {
        for (size_t i = 0; i < yb_elems; i++) yb[i] = 12345.0f;
        io.x = (convd_view){xb, xns, xcs, xhs};
        io.y = (convd_view){yb, yns, ycs, yhs};
      }
      char what[256];
      snprintf(what, sizeof what,
               "cpu %s %s %d: in %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " w %" PRId64
               "x%" PRId64 "x%" PRId64 "x%" PRId64 " g%" PRId64,
               convd_dtype_name(p.dtype), tr ? "transpose" : "iteration", iter, p.n, p.c_in, p.h, p.w, p.c_out, p.c_per_group, p.kh,
               p.kw, p.groups);
      int rc = convd_device_run(d, &io, err, sizeof err);
      size_t outside = 0;
      if (strided) { /* back to dense, counting what changed outside the view */
        for (size_t i = 0; i < yb_elems; i++) outside += yb[i] != 12345.0f;
        for (int64_t on = 0; on < p.n; on++)
          for (int64_t oc = 0; oc < p.c_out; oc++)
            for (int64_t oh = 0; oh < c.h_out; oh++) {
              const float *row = yb + (size_t)on * yns + (size_t)oc * ycs + (size_t)oh * yhs;
              memcpy(y + (size_t)((on * p.c_out + oc) * c.h_out + oh) * (size_t)c.w_out, row,
                     (size_t)c.w_out * sizeof(float));
              outside -= (size_t)c.w_out;
            }
      }
      if (rc) FAIL_AT("%s: %s", what, err);
      else if (outside) FAIL_AT("%s: %zu elements written outside the output view", what, outside);
      else if (check_close(what, y, p.dtype == CONVD_BF16 && bf16 ? wantr : want, c.output_elems))
        FAIL_AT("%s: not the float32 answer on the %s inputs", what,
                p.dtype == CONVD_BF16 && bf16 ? "bf16-rounded" : "unrounded");
    }
    convd_device_flush_cache(d);
    free(xb), free(yb);
    free(x), free(w), free(b), free(xr), free(wr), free(y), free(ref), free(refr), free(want), free(wantr);
  }
  /* Each case above tells the two precisions apart only where rounding moved the answer. */
  if (!test_failed && discriminated < 20) FAIL_AT("only %d of 40 cases tell bf16 from float32", discriminated);
  if (!test_failed && discriminated_t < 10) FAIL_AT("only %d of 20 transposes tell bf16 from float32", discriminated_t);
  if (!test_failed && convd_device_cpu_reference_transposes(d) > 0)
    FAIL_AT("%llu transposes fell back to the reference kernel", (unsigned long long)convd_device_cpu_reference_transposes(d));
  convd_device_destroy(d);
}

/* Reduced precision, on every golden case and every device kind: float16 and bfloat16 (inputs
 * rounded to the type as a client sends them) and float32 with TF32 allowed. The answer is the
 * float64 reference on the same inputs; the stated bounds, per element, with A the reference
 * on |x|, |w|, |b| (what the sum's rounding errors scale with):
 *   float16   2^-11 |want| + 2^-10 A   (output rounded to half; half intermediates in cuDNN)
 *   bfloat16  2^-8  |want| + 2^-7  A
 *   TF32                     2^-10 A   (both factors rounded to 10-bit mantissas)
 * plus 1e-5 of max(1, max|want|) for float32 accumulation. The reference device computes in
 * float32; the CPU device computes bfloat16 in bf16 where it has the units (test_cpu_bf16_compute:
 * exact products of bfloat16 inputs, float32 sums, so it passes with room to spare too) and the
 * rest in float32; the GPU is what these bounds are for. */
static void test_reduced_precision_all_devices(void) {
  static const struct {
    const char *name;
    int dtype, tf32;
    double rel, abs_sum;
  } modes[] = {{"float16", CONVD_F16, 0, 0x1p-11, 0x1p-10},
               {"bfloat16", CONVD_BF16, 0, 0x1p-8, 0x1p-7},
               {"tf32", CONVD_F32, 1, 0, 0x1p-10}};
  char names[64][128], err[512];
  int n = golden_list(golden_root, names, 64);
  for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    if (!kind_available(k)) continue;
    convd_device *d;
    ASSERT_OK(kinds[k].make(&d, err, sizeof err), err);
    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
      double worst = 0; /* error / bound, the largest seen */
      for (int i = 0; i < n; i++) {
        golden g;
        ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
        if (strcmp(g.op, "conv2d") != 0) {
          golden_free(&g);
          continue;
        }
        g.p.dtype = modes[m].dtype;
        g.p.allow_tf32 = modes[m].tf32;
        convd_conv c;
        ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
        convd_dtype_round(c.p.dtype, g.x, c.input_elems);
        convd_dtype_round(c.p.dtype, g.w, c.weight_elems);
        if (g.b) convd_dtype_round(c.p.dtype, g.b, c.bias_elems);
        float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes), *aref = malloc(c.output_bytes);
        float *ax = malloc(c.input_bytes), *aw = malloc(c.weight_bytes), *ab = malloc(c.bias_bytes + 4);
        for (size_t e = 0; e < c.input_elems; e++) ax[e] = fabsf(g.x[e]);
        for (size_t e = 0; e < c.weight_elems; e++) aw[e] = fabsf(g.w[e]);
        for (size_t e = 0; e < c.bias_elems; e++) ab[e] = fabsf(g.b[e]);
        convd_ref_conv2d(&c, g.x, g.w, g.b, ref, NULL);
        convd_ref_conv2d(&c, ax, aw, g.b ? ab : NULL, aref, NULL);
        poison(y, c.output_elems);
        convd_op_io io = convd_op_io_dense(&c, g.x, g.w, 0, g.b, y, NULL);
        int rc = convd_device_run(d, &io, err, sizeof err);
        double scale = 1;
        for (size_t e = 0; e < c.output_elems; e++)
          if (fabs(ref[e]) > scale) scale = fabs(ref[e]);
        size_t bad = 0, at = 0;
        for (size_t e = 0; e < c.output_elems && rc == 0; e++) {
          const double bound = modes[m].rel * fabs(ref[e]) + modes[m].abs_sum * aref[e] + 1e-5 * scale;
          const double er = fabs((double)y[e] - ref[e]);
          if (!(er <= bound)) bad++, at = e;
          if (er / bound > worst) worst = er / bound;
        }
        if (rc) FAIL_AT("%s %s on %s: %s", names[i], modes[m].name, kinds[k].name, err);
        else if (bad)
          FAIL_AT("%s %s on %s: %zu of %zu elements beyond the bound, e.g. [%zu] got %g want %g (|x||w| %g)",
                  names[i], modes[m].name, kinds[k].name, bad, c.output_elems, at, y[at], ref[at], aref[at]);
        free(y), free(ref), free(aref), free(ax), free(aw), free(ab);
        golden_free(&g);
        if (test_failed) break;
      }
      printf("  %s %s: worst error %.3g of its bound\n", kinds[k].name, modes[m].name, worst);
      if (test_failed) break;
    }
    convd_device_destroy(d);
    if (test_failed) return;
  }
}

/* A chain on a device that accumulates (the GPU, the oneDNN CPU device): the input channels of random ops cut into
 * blocks, run block after block with chain_pos/chain_len; y stays untouched until the last block
 * and then holds the whole sum. */
static void test_chains_on_accumulating_devices(void) {
  char err[512];
  for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    if (!kind_available(k)) continue;
    convd_device *d;
    ASSERT_OK(kinds[k].make(&d, err, sizeof err), err);
    if (!convd_device_accumulates(d)) {
      convd_device_destroy(d);
      continue;
    }
    rng r = {0x5eed0301};
    for (int iter = 0; iter < 40 && !test_failed; iter++) {
      convd_conv_params p;
      convd_conv_params_default(&p);
      p.n = rng_range(&r, 1, 2);
      p.c_in = p.c_per_group = rng_range(&r, 4, 64);
      p.c_out = rng_range(&r, 1, 32);
      p.kh = rng_range(&r, 1, 5), p.kw = rng_range(&r, 1, 5);
      p.pad_top = rng_range(&r, 0, 2), p.pad_bottom = rng_range(&r, 0, 2);
      p.pad_left = rng_range(&r, 0, 2), p.pad_right = rng_range(&r, 0, 2);
      p.stride_h = p.stride_w = rng_range(&r, 1, 2);
      p.h = rng_range(&r, p.kh, 30), p.w = rng_range(&r, p.kw, 30);
      p.has_bias = (int)rng_range(&r, 0, 1);
      p.dtype = iter % 4 == 3 ? CONVD_F16 : CONVD_F32;
      convd_conv c;
      ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
      float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
      float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
      double *want = malloc(c.output_elems * sizeof(double));
      rng_fill(&r, x, c.input_elems);
      rng_fill(&r, w, c.weight_elems);
      rng_fill(&r, b, c.bias_elems);
      convd_dtype_round(p.dtype, x, c.input_elems);
      convd_dtype_round(p.dtype, w, c.weight_elems);
      convd_dtype_round(p.dtype, b, c.bias_elems);
      convd_ref_conv2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL);
      for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
      poison(y, c.output_elems);
      const int64_t blocks = rng_range(&r, 2, p.c_in < 6 ? p.c_in : 6);
      const int64_t per = (p.c_in + blocks - 1) / blocks;
      int rc = 0, touched = 0;
      int64_t nb = (p.c_in + per - 1) / per;
      for (int64_t bk = 0; bk < nb && rc == 0; bk++) {
        convd_conv_params bp = p;
        bp.c_in = bp.c_per_group = (bk + 1) * per < p.c_in ? per : p.c_in - bk * per;
        bp.has_bias = p.has_bias && bk == 0;
        convd_conv bc;
        ASSERT_OK(convd_conv_init(&bc, &bp, err, sizeof err), err);
        convd_op_io io = {.conv = &bc,
                          .x = {x + (size_t)(bk * per * p.h * p.w), (size_t)(p.c_in * p.h * p.w),
                                (size_t)(p.h * p.w), (size_t)p.w},
                          .w = {w + (size_t)(bk * per * p.kh * p.kw), (size_t)(p.c_in * p.kh * p.kw),
                                (size_t)(p.kh * p.kw), (size_t)p.kw},
                          .b = bp.has_bias ? b : NULL,
                          .y = convd_view_dense(y, p.c_out, c.h_out, c.w_out),
                          .chain_pos = (int)bk,
                          .chain_len = (int)nb};
        rc = convd_device_run(d, &io, err, sizeof err);
        if (bk < nb - 1)
          for (size_t i = 0; i < c.output_elems; i++) touched += !isnan(y[i]);
      }
      char what[160];
      snprintf(what, sizeof what, "%s chain %d (%" PRId64 " blocks of %" PRId64 " channels, %s)",
               kinds[k].name, iter, nb, per, convd_dtype_name(p.dtype));
      if (rc) FAIL_AT("%s: %s", what, err);
      else if (touched) FAIL_AT("%s: y was written before the last block", what);
      else if (p.dtype == CONVD_F32 && check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
      else if (p.dtype != CONVD_F32)
        for (size_t i = 0; i < c.output_elems; i++)
          if (!(fabs(y[i] - want[i]) <= 2e-2 * (1 + fabs(want[i])))) {
            FAIL_AT("%s: [%zu] got %g want %g", what, i, y[i], want[i]);
            break;
          }
      free(x), free(w), free(b), free(y), free(ref), free(want);
    }
    convd_device_destroy(d);
    if (test_failed) return;
  }
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"golden_all_devices", test_golden_all_devices},
      {"random_shapes_all_devices", test_random_shapes_all_devices},
      {"strided_views_all_devices", test_strided_views_all_devices},
      {"cpu_weight_cache", test_cpu_weight_cache},
      {"reduced_precision_all_devices", test_reduced_precision_all_devices},
      {"cpu_bf16_compute", test_cpu_bf16_compute},
      {"cpu_transpose_layouts", test_cpu_transpose_layouts},
      {"cpu_transpose_cols_views", test_cpu_transpose_cols_views},
      {"cpu_chains", test_cpu_chains},
      {"chains_on_accumulating_devices", test_chains_on_accumulating_devices},
  };
  /* The same cases on the GPU kinds, chains among them (the CPU device's too, above). */
  static const test_case cuda_tests[] = {
      {"golden_all_devices", test_golden_all_devices},
      {"random_shapes_all_devices", test_random_shapes_all_devices},
      {"strided_views_all_devices", test_strided_views_all_devices},
      {"reduced_precision_all_devices", test_reduced_precision_all_devices},
      {"chains_on_accumulating_devices", test_chains_on_accumulating_devices},
  };
  return test_main_cuda(argc, argv, tests, sizeof tests / sizeof tests[0], cuda_tests,
                        sizeof cuda_tests / sizeof cuda_tests[0]);
}
