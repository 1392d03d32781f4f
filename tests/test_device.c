/* Every device kind against the reference: all golden conv2d cases and random shapes (groups,
 * depthwise, stride, dilation, asymmetric padding, N > 1, bias), outputs poisoned first; the
 * CPU device's weight cache. */
#include <stdlib.h>
#include <string.h>

#include "device.h"
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
static const struct {
  const char *name;
  make_fn make;
} kinds[] = {{"reference", make_ref}, {"cpu", make_cpu}};

static void test_golden_all_devices(void) {
  char names[64][128], err[512];
  int n = golden_list(golden_root, names, 64);
  for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    convd_device *d;
    ASSERT_OK(kinds[k].make(&d, err, sizeof err), err);
    printf("  device %s: %s\n", d->name, d->detail);
    for (int i = 0; i < n; i++) {
      golden g;
      ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
      if (strcmp(g.op, "conv2d") != 0) continue;
      convd_conv c;
      ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
      float *y = malloc(c.output_bytes);
      poison(y, c.output_elems);
      convd_op_io io = {&c, g.x, g.w, 0, g.b, y, NULL};
      ASSERT_OK(d->iface->run(d->ctx, &io, err, sizeof err), err);
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
      convd_op_io io = {&c, x, w, (uint64_t)(iter % 3) + 1, p.has_bias ? b : NULL, y, NULL};
      int rc = d->iface->run(d->ctx, &io, err, sizeof err);
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
  convd_op_io io = {&c, x, w, 77, NULL, y1, NULL};
  ASSERT_OK(d->iface->run(d->ctx, &io, err, sizeof err), err);
  io.y = y2;
  ASSERT_OK(d->iface->run(d->ctx, &io, err, sizeof err), err);
  ASSERT_TRUE(memcmp(y1, y2, c.output_bytes) == 0);
  if (d->iface->flush_cache) d->iface->flush_cache(d->ctx);
  free(x), free(w), free(y1), free(y2);
  convd_device_destroy(d);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"golden_all_devices", test_golden_all_devices},
      {"random_shapes_all_devices", test_random_shapes_all_devices},
      {"cpu_weight_cache", test_cpu_weight_cache},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
