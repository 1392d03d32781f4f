/* The planner: tiled == monolithic. Random convolutions with random budgets and device counts
 * are cut into ops; each op runs on the reference over its own window and weight block, partial
 * sums are accumulated per output tile, and the result must equal the monolithic reference. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "plan.h"
#include "ref.h"
#include "testutil.h"

typedef struct tensor_rows {
  float *t;
  int64_t c, h, w;
} tensor_rows;

static const float *nchw_row(void *ctx, int64_t n, int64_t h, size_t *cstride) {
  tensor_rows *r = ctx;
  *cstride = (size_t)(r->h * r->w);
  return r->t + ((size_t)n * (size_t)r->c * (size_t)r->h + (size_t)h) * (size_t)r->w;
}

/* Runs every op of the plan on the reference and accumulates; checks each op's footprint. */
static int run_plan(const convd_plan *pl, const float *x, const float *w, const float *b, float *y,
                    uint64_t budget) {
  const convd_conv *c = &pl->conv;
  poison(y, c->output_elems);
  tensor_rows in = {(float *)x, c->p.c_in, c->p.h, c->p.w};
  for (uint64_t i = 0; i < pl->ops; i++) {
    convd_plan_op op;
    convd_plan_op_get(pl, i, &op);
    size_t out_elems = (size_t)(op.oc1 - op.oc0) * (size_t)(op.oh1 - op.oh0) * (size_t)(op.ow1 - op.ow0);
    float *partial = malloc(out_elems * sizeof(float));
    const convd_view pv = convd_view_dense(partial, op.oc1 - op.oc0, op.oh1 - op.oh0, op.ow1 - op.ow0);
    if (op.empty) {
      convd_plan_fill_empty(pl, &op, b, pv);
    } else {
      if (op.local.input_bytes + op.local.weight_bytes + op.local.output_bytes > budget / 2) {
        fprintf(stderr, "  op %" PRIu64 " needs %zu bytes, budget %" PRIu64 "\n", i,
                op.local.input_bytes + op.local.weight_bytes + op.local.output_bytes, budget);
        free(partial);
        return -1;
      }
      if (op.local.output_elems != out_elems) {
        fprintf(stderr, "  op %" PRIu64 ": local conv gives %zu outputs, tile has %zu\n", i,
                op.local.output_elems, out_elems);
        free(partial);
        return -1;
      }
      float *win = malloc(op.local.input_bytes);
      convd_plan_gather_window(pl, &op, nchw_row, &in, win);
      const convd_conv_params *lp = &op.local.p;
      convd_ref_conv2d_view(&op.local, convd_view_dense(win, lp->c_in, lp->h, lp->w),
                            convd_plan_weight_view(pl, &op, w), lp->has_bias ? b + op.oc0 : NULL,
                            pv, NULL);
      free(win);
    }
    /* The op's tile inside y; the first input-channel block writes, the others add. */
    const size_t H = (size_t)c->h_out, W = (size_t)c->w_out;
    convd_view tile = {y + (((size_t)op.n * (size_t)c->p.c_out + (size_t)op.oc0) * H + (size_t)op.oh0) * W +
                           (size_t)op.ow0,
                       (size_t)c->p.c_out * H * W, H * W, W};
    convd_plan_accumulate(pl, &op, partial, tile, op.icblock > 0);
    free(partial);
  }
  return 0;
}

static void test_tiled_equals_monolithic(void) {
  rng r = {0x5eed0200};
  int multi = 0;
  for (int iter = 0; iter < 250; iter++) {
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.groups = rng_range(&r, 0, 2) == 0 ? rng_range(&r, 2, 4) : 1;
    p.n = rng_range(&r, 1, 2);
    p.c_per_group = rng_range(&r, 1, 9);
    p.c_in = p.groups * p.c_per_group;
    p.c_out = p.groups * rng_range(&r, 1, 9);
    p.kh = rng_range(&r, 1, 5), p.kw = rng_range(&r, 1, 5);
    p.stride_h = rng_range(&r, 1, 3), p.stride_w = rng_range(&r, 1, 3);
    p.dil_h = rng_range(&r, 1, 2), p.dil_w = rng_range(&r, 1, 2);
    p.pad_top = rng_range(&r, 0, 4), p.pad_bottom = rng_range(&r, 0, 4);
    p.pad_left = rng_range(&r, 0, 4), p.pad_right = rng_range(&r, 0, 4);
    p.h = rng_range(&r, (p.kh - 1) * p.dil_h + 1, 48);
    p.w = rng_range(&r, (p.kw - 1) * p.dil_w + 1, 48);
    p.has_bias = (int)rng_range(&r, 0, 1);
    convd_conv c;
    char err[512];
    ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
    /* Budgets from "everything in one op" down to a few hundred bytes. */
    uint64_t budget = (uint64_t)rng_range(&r, 600, (int64_t)(3 * (c.input_bytes + c.weight_bytes + c.output_bytes)));
    convd_plan_opts o = {.devices = (int)rng_range(&r, 1, 4), .device_memory = budget};
    /* a third with a tile-row budget (streamed calls): every tile row of more than one output
     * row within it */
    if (iter % 3 == 0) o.row_bytes = (uint64_t)rng_range(&r, 200, (int64_t)(c.input_bytes + c.output_bytes));
    convd_plan pl;
    int rc = convd_plan_make(&pl, &c, &o, err, sizeof err);
    if (rc == CONVD_ELIMIT) continue; /* a budget below the smallest op: refused, correctly */
    ASSERT_OK(rc, err);
    ASSERT_TRUE(pl.op_bytes <= budget);
    if (o.row_bytes && pl.tile_h > 1) {
      int64_t a, b_, o0, o1;
      convd_plan_tile_row_window(&pl, 0, &a, &b_);
      convd_plan_tile_rows(&pl, 0, &o0, &o1);
      const uint64_t rb = ((uint64_t)(b_ - a) * (uint64_t)p.c_in * (uint64_t)p.w +
                           (uint64_t)(o1 - o0) * (uint64_t)p.c_out * (uint64_t)c.w_out) * 4;
      if (rb > o.row_bytes) FAIL_AT("iteration %d: a tile row of %" PRIu64 " bytes over the row budget %" PRIu64, iter, rb, o.row_bytes);
    }
    multi += pl.ops > 1;
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
    float *y = malloc(c.output_bytes), *want = malloc(c.output_bytes);
    double *want64 = malloc(c.output_elems * sizeof(double));
    rng_fill(&r, x, c.input_elems);
    rng_fill(&r, w, c.weight_elems);
    rng_fill(&r, b, c.bias_elems);
    convd_ref_conv2d(&c, x, w, b, want, NULL);
    for (size_t i = 0; i < c.output_elems; i++) want64[i] = want[i];
    if (run_plan(&pl, x, w, b, y, budget) || check_close("tiled", y, want64, c.output_elems)) {
      char desc[2048];
      convd_plan_describe(&pl, desc, sizeof desc);
      FAIL_AT("iteration %d, budget %" PRIu64 ":\n%s", iter, budget, desc);
      return;
    }
    free(x), free(w), free(b), free(y), free(want), free(want64);
  }
  printf("  %d of the plans had more than one op\n", multi);
  ASSERT_TRUE(multi >= 150);
}

/* The seed case streamed (svc_conv.c's cuts: ops of 32 MiB, tile rows of 256 MiB): tile rows
 * short enough that two of them (what a streamed call holds) stay under 1 GiB. */
static void test_plan_row_budget(void) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = p.c_per_group = 1024, p.h = 1024, p.w = 1024, p.c_out = 1024, p.kh = p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  convd_conv c;
  char err[512];
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  convd_plan_opts o = {.devices = 1, .device_memory = 32u << 20, .row_bytes = 256u << 20};
  convd_plan pl;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  int64_t a, b, o0, o1;
  convd_plan_tile_row_window(&pl, 1, &a, &b);
  convd_plan_tile_rows(&pl, 1, &o0, &o1);
  const uint64_t rb = ((uint64_t)(b - a) * 1024 * 1024 + (uint64_t)(o1 - o0) * 1024 * 1024) * 4;
  printf("  tile rows of %" PRId64 " output rows (%" PRIu64 " bytes), %" PRIu64 " ops\n", pl.tile_h, rb, pl.ops);
  ASSERT_TRUE(rb <= o.row_bytes);
  ASSERT_TRUE(pl.tile_h >= 8); /* not cut further than the budget needs */
  o.row_bytes = 0;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_TRUE(pl.tile_h >= 64); /* without it, the op budget alone decides */
}

/* The classic case: 1024x1024 image, 1024 bands, 3x3 -> 64 tiles of 128x128 x 64 blocks. */
static void test_plan_4096_ops(void) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 1024, p.h = 1024, p.w = 1024;
  p.c_out = 1024, p.c_per_group = 1024, p.kh = 3, p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  convd_conv c;
  char err[512];
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  convd_plan_opts o = {.devices = 1, .device_memory = 40u << 20};
  convd_plan pl;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_EQ_INT(pl.tile_h, 128);
  ASSERT_EQ_INT(pl.tile_w, 128);
  ASSERT_EQ_INT(pl.icb, 128);
  ASSERT_EQ_INT(pl.ocb, 128);
  ASSERT_EQ_INT(pl.tiles_h * pl.tiles_w, 64);
  ASSERT_EQ_INT(pl.icblocks * pl.ocblocks, 64);
  ASSERT_EQ_INT(pl.ops, 4096);
  char desc[2048];
  convd_plan_describe(&pl, desc, sizeof desc);
  ASSERT_CONTAINS(desc, "elemental ops: 4096");
  /* With memory to spare it is one op; a budget below one output element is refused. */
  o.device_memory = 64ull << 30;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_EQ_INT(pl.ops, 1);
  o.device_memory = 64;
  ASSERT_EQ_INT(convd_plan_make(&pl, &c, &o, err, sizeof err), CONVD_ELIMIT);
  ASSERT_CONTAINS(err, "raise the device memory budget");
}

/* A pointwise layer over budget keeps whole rows: output-channel blocks (the sgemm path), down to
 * 32 channels; only when the input itself does not fit are there tiles. The tiled plan still
 * equals the reference (tiled_equals_monolithic covers the arithmetic; here the shape). */
static void test_plan_pointwise_blocks(void) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 512, p.h = 28, p.w = 28, p.c_out = 512, p.c_per_group = 512, p.kh = 1, p.kw = 1;
  convd_conv c;
  char err[256];
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  convd_plan_opts o = {.devices = 1, .device_memory = 4u << 20}; /* input 1.6 MB, weights 1 MB */
  convd_plan pl;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_EQ_INT(pl.tiles_h * pl.tiles_w, 1);
  ASSERT_EQ_INT(pl.icblocks, 1);
  ASSERT_TRUE(pl.ocblocks > 1 && pl.ocb >= 32);
  ASSERT_TRUE(pl.op_bytes <= o.device_memory);
  /* blocks of 32 that still do not fit (the input is the bulk): the later steps decide, within
   * the budget */
  o.device_memory = 2u << 20;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_TRUE(pl.ops > 1 && pl.op_bytes <= o.device_memory);
  /* a 3x3 layer is not pointwise: tiles before channel blocks, as before */
  p.c_in = p.c_per_group = p.c_out = 64, p.h = p.w = 112;
  p.kh = p.kw = 3, p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  o.device_memory = 8u << 20; /* input 3.2 MB, output 3.2 MB */
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_EQ_INT(pl.ocblocks, 1);
  ASSERT_TRUE(pl.tiles_h * pl.tiles_w > 1);
}

/* Several devices: a large op is cut for balance; a small one is not. */
static void test_plan_balance(void) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 256, p.h = 56, p.w = 56, p.c_out = 256, p.c_per_group = 256, p.kh = 3, p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  convd_conv c;
  char err[256];
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  convd_plan_opts o = {.devices = 1, .device_memory = 1u << 30};
  convd_plan pl;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_EQ_INT(pl.ops, 1);
  o.devices = 2;
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_TRUE(pl.ops >= 4 && pl.ops <= 8);
  p.c_in = p.c_out = p.c_per_group = 4, p.h = p.w = 8;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  ASSERT_OK(convd_plan_make(&pl, &c, &o, err, sizeof err), err);
  ASSERT_EQ_INT(pl.ops, 1);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"tiled_equals_monolithic", test_tiled_equals_monolithic},
      {"plan_4096_ops", test_plan_4096_ops},
      {"plan_row_budget", test_plan_row_budget},
      {"plan_balance", test_plan_balance},
      {"plan_pointwise_blocks", test_plan_pointwise_blocks},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
