/* The scheduler through the engine: tiled == monolithic over random shapes, budgets and device
 * counts; golden cases forced through multi-tile, multi-block plans; load balancing across
 * devices of different speeds; a device failing mid-job; cancellation. The throttled and failing
 * devices below are test-only wrappers around the reference device. `test_sched --cuda` runs
 * the GPU cases instead, and exits 77 (skipped) where no GPU is visible (ctest: sched_cuda). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The wrappers below are devices themselves: they fill a function table, which only device
 * implementations see. Their calls to the device they wrap go through device.h like anyone's. */
#include "device_impl.h"
#include "engine.h"
#include "err.h"
#include "ref.h"
#include "testutil.h"

static const char *golden_root = GOLDEN_DIR;

/* ---- test-only device wrappers ------------------------------------------------------------ */

typedef struct wrap {
  convd_device *inner;
  int delay_us;        /* throttle: sleep after each op */
  int fail_after;      /* fail every op after this many (0 = never) */
  int refuse;          /* supports() says no to every convolution */
  atomic_int ran;
  /* accumulate: takes chains as a GPU does, summing the blocks in its own buffer and writing
   * the tile only at the last block; it checks the engine keeps the chain protocol */
  int accumulate;
  float *sum, *part;
  size_t cap;
  int next_pos, chain_len;
  const float *chain_y;
  atomic_int chains, violations;
} wrap;

static int wrap_supports(void *ctx, const convd_conv *c) {
  wrap *w = ctx;
  return !w->refuse && convd_device_supports(w->inner, c);
}

static int wrap_run(void *ctx, const convd_op_io *io, char *err, size_t errlen) {
  wrap *w = ctx;
  int n = atomic_fetch_add(&w->ran, 1) + 1;
  if (w->fail_after > 0 && n > w->fail_after)
    return convd_errf(err, errlen, CONVD_EDEVICE, "test device failed on purpose after %d ops",
                      w->fail_after);
  int rc;
  if (io->chain_len > 1) {
    const convd_conv *c = io->conv;
    const int64_t oc = c->p.c_out, oh = c->h_out, ow = c->w_out, nn = c->p.n;
    if (!w->accumulate || io->chain_pos != (io->chain_pos == 0 ? 0 : w->next_pos) ||
        (io->chain_pos > 0 && (io->chain_len != w->chain_len || io->y.p != w->chain_y)))
      atomic_fetch_add(&w->violations, 1);
    if (c->output_elems > w->cap) {
      free(w->sum), free(w->part);
      w->sum = malloc(c->output_bytes), w->part = malloc(c->output_bytes);
      w->cap = c->output_elems;
    }
    convd_op_io one = *io;
    one.chain_pos = one.chain_len = 0;
    one.y = convd_view_dense(io->chain_pos == 0 ? w->sum : w->part, oc, oh, ow);
    rc = convd_device_run(w->inner, &one, err, errlen);
    if (rc == 0 && io->chain_pos > 0)
      for (size_t i = 0; i < c->output_elems; i++) w->sum[i] += w->part[i];
    w->next_pos = io->chain_pos + 1;
    w->chain_len = io->chain_len;
    w->chain_y = io->y.p;
    if (rc == 0 && io->chain_pos == io->chain_len - 1) {
      atomic_fetch_add(&w->chains, 1);
      for (int64_t i = 0; i < nn; i++)
        for (int64_t ch = 0; ch < oc; ch++)
          for (int64_t y = 0; y < oh; y++)
            memcpy(io->y.p + (size_t)i * io->y.ns + (size_t)ch * io->y.cs + (size_t)y * io->y.hs,
                   w->sum + (((size_t)i * (size_t)oc + (size_t)ch) * (size_t)oh + (size_t)y) * (size_t)ow,
                   (size_t)ow * sizeof(float));
    }
  } else {
    rc = convd_device_run(w->inner, io, err, errlen);
  }
  if (w->delay_us) {
    struct timespec ts = {0, (long)w->delay_us * 1000};
    nanosleep(&ts, NULL);
  }
  return rc;
}

/* Wrapped devices flushed, all together (the engine flushes a device it takes out of service). */
static atomic_int wrap_flushes;

static void wrap_flush(void *ctx) {
  wrap *w = ctx;
  atomic_fetch_add(&wrap_flushes, 1);
  convd_device_flush_cache(w->inner);
}

static void wrap_destroy(void *ctx) {
  wrap *w = ctx;
  convd_device_destroy(w->inner);
  free(w->sum), free(w->part);
  free(w);
}

static const convd_device_iface wrap_iface = {
    .supports = wrap_supports, .run = wrap_run, .flush_cache = wrap_flush, .destroy = wrap_destroy};

static convd_device *test_wrapped_device(const char *name, int delay_us, int fail_after,
                                         uint64_t budget) {
  char err[128];
  wrap *w = calloc(1, sizeof *w);
  convd_device_ref_create("inner", budget, &w->inner, err, sizeof err);
  w->delay_us = delay_us;
  w->fail_after = fail_after;
  convd_device *d = calloc(1, sizeof *d);
  d->iface = &wrap_iface;
  d->ctx = w;
  d->kind = CONVD_DEVICE_REFERENCE;
  d->memory_budget = budget;
  snprintf(d->name, sizeof d->name, "%s", name);
  snprintf(d->detail, sizeof d->detail, "test-only wrapper (delay %d us, fail after %d)", delay_us,
           fail_after);
  return d;
}

/* ---- helpers ------------------------------------------------------------------------------ */

static convd_conv_params random_params(rng *r) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  int64_t kind = rng_range(r, 0, 3);
  p.groups = kind == 1 ? rng_range(r, 2, 4) : 1;
  p.n = rng_range(r, 1, 2);
  p.c_per_group = rng_range(r, 1, 10);
  p.c_in = p.groups * p.c_per_group;
  p.c_out = p.groups * rng_range(r, 1, 10);
  if (kind == 3) {
    p.groups = p.c_in = rng_range(r, 2, 12);
    p.c_per_group = 1;
    p.c_out = p.c_in * rng_range(r, 1, 2);
  }
  p.kh = rng_range(r, 1, 5), p.kw = rng_range(r, 1, 5);
  p.stride_h = rng_range(r, 1, 3), p.stride_w = rng_range(r, 1, 3);
  p.dil_h = rng_range(r, 1, 2), p.dil_w = rng_range(r, 1, 2);
  p.pad_top = rng_range(r, 0, 4), p.pad_bottom = rng_range(r, 0, 4);
  p.pad_left = rng_range(r, 0, 4), p.pad_right = rng_range(r, 0, 4);
  p.h = rng_range(r, (p.kh - 1) * p.dil_h + 1, 48);
  p.w = rng_range(r, (p.kw - 1) * p.dil_w + 1, 48);
  p.has_bias = (int)rng_range(r, 0, 1);
  return p;
}

/* Runs conv on e and compares with the monolithic reference. */
static int check_engine(convd_engine *e, const convd_conv *c, rng *r, const char *what,
                        convd_job_stats *st) {
  float *x = malloc(c->input_bytes), *w = malloc(c->weight_bytes), *b = malloc(c->bias_bytes + 4);
  float *y = malloc(c->output_bytes), *ref = malloc(c->output_bytes);
  double *want = malloc(c->output_elems * sizeof(double));
  rng_fill(r, x, c->input_elems);
  rng_fill(r, w, c->weight_elems);
  rng_fill(r, b, c->bias_elems);
  convd_ref_conv2d(c, x, w, c->p.has_bias ? b : NULL, ref, NULL);
  for (size_t i = 0; i < c->output_elems; i++) want[i] = ref[i];
  poison(y, c->output_elems);
  char err[512];
  int rc = convd_engine_run(e, c, x, w, c->p.has_bias ? b : NULL, y, st, err, sizeof err);
  if (rc) fprintf(stderr, "  %s: %s\n", what, err);
  else rc = check_close(what, y, want, c->output_elems);
  free(x), free(w), free(b), free(y), free(ref), free(want);
  return rc;
}

/* ---- tests -------------------------------------------------------------------------------- */

/* One random case of tiled == monolithic on an engine made from o, with a random budget (for
 * its GPUs too when it uses any). Returns 0 when it matched, 1 when the budget was below the
 * smallest op (refused, correctly), -1 after reporting a failure; *ops gets the plan's size. */
static int random_case(rng *r, convd_engine_opts o, const char *label, int iter, uint64_t *ops) {
  char err[512];
  convd_conv_params p = random_params(r);
  convd_conv c;
  if (convd_conv_init(&c, &p, err, sizeof err)) {
    FAIL_AT("%s case %d: %s", label, iter, err);
    return -1;
  }
  uint64_t total = c.input_bytes + c.weight_bytes + c.output_bytes;
  o.device_memory = (uint64_t)rng_range(r, 4096, (int64_t)(3 * total) + 8192);
  if (o.gpus) o.gpu_memory = o.device_memory;
  convd_engine *e;
  if (convd_engine_create(&o, &e, err, sizeof err)) {
    FAIL_AT("%s case %d: %s", label, iter, err);
    return -1;
  }
  convd_plan pl;
  if (convd_engine_plan(e, &c, &pl, err, sizeof err) == CONVD_ELIMIT) {
    convd_engine_destroy(e);
    return 1;
  }
  char what[256];
  snprintf(what, sizeof what, "%s case %d (budget %" PRIu64 ", %" PRIu64 " ops)", label, iter,
           o.device_memory, pl.ops);
  convd_job_stats st = {0};
  int rc = check_engine(e, &c, r, what, &st);
  convd_engine_destroy(e);
  if (rc || st.ops_run != pl.ops) {
    FAIL_AT("%s (%" PRIu64 " ops run)", what, st.ops_run);
    return -1;
  }
  *ops = pl.ops;
  return 0;
}

static void test_property_random_plans(void) {
  rng r = {0x5eed0400};
  int multi = 0, cases = 0;
  for (int iter = 0; iter < 220; iter++) {
    convd_engine_opts o = {.cpu_devices = (int)rng_range(&r, 1, 3), .cpu_threads = 2,
                           .reference = (int)rng_range(&r, 0, 1)};
    char label[64];
    snprintf(label, sizeof label, "%d %s devices", o.cpu_devices, o.reference ? "reference" : "cpu");
    uint64_t ops = 0;
    int rc = random_case(&r, o, label, iter, &ops);
    if (rc < 0) return;
    if (rc > 0) continue;
    multi += ops > 1;
    cases++;
  }
  printf("  %d cases, %d with more than one op\n", cases, multi);
  ASSERT_TRUE(cases >= 200);
  ASSERT_TRUE(multi >= 120);
}

/* Every golden case with a budget that forces several tiles and channel blocks. */
static void test_golden_forced_tiles(void) {
  char names[64][128], err[512];
  int n = golden_list(golden_root, names, 64);
  for (int i = 0; i < n; i++) {
    golden g;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    if (strcmp(g.op, "conv2d") != 0) { /* transposes are tested on their own */
      golden_free(&g);
      continue;
    }
    convd_conv c;
    ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
    /* A budget of about a quarter of one op's worth of everything. */
    uint64_t budget = (c.input_bytes + c.weight_bytes + c.output_bytes) / 2;
    if (budget < 4096) budget = 4096;
    convd_engine_opts o = {.cpu_devices = 2, .cpu_threads = 2, .device_memory = budget};
    convd_engine *e;
    ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
    convd_plan pl;
    ASSERT_OK(convd_engine_plan(e, &c, &pl, err, sizeof err), err);
    float *y = malloc(c.output_bytes);
    poison(y, c.output_elems);
    convd_job_stats st;
    int rc = convd_engine_run(e, &c, g.x, g.w, g.b, y, &st, err, sizeof err);
    char what[300];
    snprintf(what, sizeof what, "%.100s: %" PRIu64 " ops (%" PRId64 "x%" PRId64 " tiles, %" PRId64
             " in-blocks, %" PRId64 " out-blocks)", names[i], pl.ops, pl.tiles_h, pl.tiles_w,
             pl.icblocks, pl.ocblocks);
    if (rc) FAIL_AT("%s: %s", what, err);
    else if (check_close(what, y, g.expected, c.output_elems)) FAIL_AT("%s", what);
    else if (c.output_elems > 64 && pl.ops < 2) FAIL_AT("%s: the budget did not force tiles", what);
    free(y);
    golden_free(&g);
    convd_engine_destroy(e);
    if (test_failed) return;
  }
}

/* Devices of relative speed 1:2:4 take about 1/7, 2/7, 4/7 of the ops. */
static void test_balance_1_2_4(void) {
  char err[256];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 4, p.h = 700, p.w = 8, p.c_out = 4, p.c_per_group = 4, p.kh = 1, p.kw = 1;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  /* A budget of one output row per op: 700 ops. */
  uint64_t budget = 2 * 4 * (4 * 8 + 16 + 4 * 8);
  convd_device *devs[3] = {test_wrapped_device("slow", 8000, 0, budget),
                           test_wrapped_device("medium", 4000, 0, budget),
                           test_wrapped_device("fast", 2000, 0, budget)};
  convd_engine_opts o = {.extra = devs, .n_extra = 3, .device_memory = budget};
  convd_engine *e;
  ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
  rng r = {0x5eed0401};
  convd_job_stats st;
  ASSERT_TRUE(check_engine(e, &c, &r, "balanced job", &st) == 0);
  ASSERT_EQ_INT(st.ops, 700);
  const double want[3] = {1.0 / 7, 2.0 / 7, 4.0 / 7};
  for (int i = 0; i < 3; i++) {
    double share = (double)st.ops_per_device[i] / (double)st.ops_run;
    printf("  device %d: %" PRIu64 " ops, share %.3f, expected %.3f\n", i, st.ops_per_device[i],
           share, want[i]);
    if (share < want[i] * 0.9 || share > want[i] * 1.1)
      FAIL_AT("device %d's share %.3f is not within 10%% of %.3f", i, share, want[i]);
  }
  convd_engine_destroy(e);
}

/* A slow device beside a fast one must not make a job finish later: once the engine has
 * measured both (a first job), the slow one takes an op only when it finishes it before the fast
 * one would have finished everything. Checked on the time each device actually spent in the job
 * (slow <= fast + one fast op), not on the nominal delays: under the sanitizers the fast
 * device's ops take longer than its 2 ms. With plain pulling the slow device would take an op
 * every 50 ms to the end and finish last. */
static void test_slow_device_never_delays(void) {
  char err[256];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 4, p.h = 60, p.w = 8, p.c_out = 4, p.c_per_group = 4, p.kh = 1, p.kw = 1;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  uint64_t budget = 2 * 4 * (4 * 8 + 16 + 4 * 8); /* one output row per op: 60 ops */
  convd_device *devs[2] = {test_wrapped_device("slow", 50000, 0, budget),
                           test_wrapped_device("fast", 2000, 0, budget)};
  convd_engine_opts o = {.extra = devs, .n_extra = 2, .device_memory = budget};
  convd_engine *e;
  ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
  rng r = {0x5eed0402};
  convd_job_stats st;
  ASSERT_TRUE(check_engine(e, &c, &r, "first job (measures both devices)", &st) == 0);
  int best_exact = 0;
  for (int round = 0; round < 3; round++) {
    convd_device_info before[2], after[2];
    for (int i = 0; i < 2; i++) convd_engine_device_info(e, (size_t)i, &before[i]);
    ASSERT_TRUE(check_engine(e, &c, &r, "job with both devices measured", &st) == 0);
    for (int i = 0; i < 2; i++) convd_engine_device_info(e, (size_t)i, &after[i]);
    const uint64_t slow = st.ops_per_device[0], fast = st.ops_per_device[1];
    const double slow_s = after[0].busy_seconds - before[0].busy_seconds;
    const double fast_s = after[1].busy_seconds - before[1].busy_seconds;
    printf("  slow device %" PRIu64 " ops in %.0f ms, fast device %" PRIu64 " ops in %.0f ms\n", slow,
           slow_s * 1e3, fast, fast_s * 1e3);
    ASSERT_EQ_INT(slow + fast, 60);
    ASSERT_TRUE(fast > 0);
    /* A busy machine stretches one op now and then after the scheduler has placed it: each
     * round gets half again, and the best round must hold exactly. */
    ASSERT_TRUE(slow_s <= 1.5 * fast_s + fast_s / (double)fast);
    const int exact = slow_s <= fast_s + fast_s / (double)fast;
    best_exact |= exact;
  }
  ASSERT_TRUE(best_exact);
  convd_engine_destroy(e);
}

/* A device that fails mid-job: its op is retried elsewhere, nothing is lost, it is unhealthy. */
typedef struct failed_log {
  int calls;
  unsigned index;
  char why[256];
} failed_log;

static void on_device_failed(void *user, unsigned index, const char *name, const char *why) {
  failed_log *l = user;
  (void)name;
  l->calls++;
  l->index = index;
  snprintf(l->why, sizeof l->why, "%s", why);
}

static void test_device_failure_mid_job(void) {
  char err[256];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 2, p.c_in = 6, p.h = 60, p.w = 20, p.c_out = 5, p.c_per_group = 6, p.kh = 3, p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  p.has_bias = 1;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  uint64_t budget = 6000;
  convd_device *devs[2] = {test_wrapped_device("flaky", 200, 5, budget),
                           test_wrapped_device("steady", 200, 0, budget)};
  failed_log log = {0};
  convd_engine_opts o = {.extra = devs, .n_extra = 2, .device_memory = budget,
                         .device_failed = on_device_failed, .user = &log};
  const int flushes = atomic_load(&wrap_flushes);
  convd_engine *e;
  ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
  rng r = {0x5eed0402};
  convd_job_stats st;
  ASSERT_TRUE(check_engine(e, &c, &r, "job across a device failure", &st) == 0);
  ASSERT_TRUE(st.ops > 20);
  ASSERT_EQ_INT(st.ops_per_device[0], 5);
  convd_device_info info;
  ASSERT_OK(convd_engine_device_info(e, 0, &info), "info");
  ASSERT_TRUE(!info.healthy);
  ASSERT_CONTAINS(info.detail, "failed on purpose");
  ASSERT_EQ_INT(convd_engine_healthy_devices(e), 1);
  /* Told once, with the device and the reason (the daemon logs it). */
  ASSERT_EQ_INT(log.calls, 1);
  ASSERT_EQ_INT(log.index, 0);
  ASSERT_CONTAINS(log.why, "failed on purpose");
  /* With the last device failing too, a job fails with the reason instead of hanging. */
  convd_engine_destroy(e);
  ASSERT_EQ_INT(atomic_load(&wrap_flushes) - flushes, 1); /* the failed device's cache, once */
  convd_device *bad[1] = {test_wrapped_device("doomed", 0, 1, budget)};
  convd_engine_opts o2 = {.extra = bad, .n_extra = 1, .device_memory = budget};
  ASSERT_OK(convd_engine_create(&o2, &e, err, sizeof err), err);
  float *x = calloc(c.input_elems, 4), *w = calloc(c.weight_elems, 4), *b = calloc(c.bias_elems, 4),
        *y = malloc(c.output_bytes);
  int rc = convd_engine_run(e, &c, x, w, b, y, NULL, err, sizeof err);
  ASSERT_EQ_INT(rc, CONVD_EDEVICE);
  ASSERT_CONTAINS(err, "no healthy device left");
  /* A job that arrives once no device is healthy is refused when it is created. */
  rc = convd_engine_run(e, &c, x, w, b, y, NULL, err, sizeof err);
  ASSERT_EQ_INT(rc, CONVD_EUNAVAIL);
  ASSERT_CONTAINS(err, "retry on another instance");
  convd_engine_destroy(e);
  /* A device whose supports() says no to a job gets none of its ops; a job that no healthy
   * device supports fails when it is created, or once the last one that does has failed. */
  for (int mode = 0; mode < 3; mode++) {
    convd_device *mix[2] = {test_wrapped_device("unable", 0, 0, budget),
                            test_wrapped_device(mode == 2 ? "flaky" : "able", 0, mode == 2 ? 2 : 0, budget)};
    ((wrap *)mix[0]->ctx)->refuse = 1;
    if (mode == 1) convd_device_destroy(mix[1]);
    convd_engine_opts o3 = {.extra = mix, .n_extra = mode == 1 ? 1 : 2, .device_memory = budget};
    ASSERT_OK(convd_engine_create(&o3, &e, err, sizeof err), err);
    if (mode == 0) {
      ASSERT_TRUE(check_engine(e, &c, &r, "job beside a device that does not support it", &st) == 0);
      ASSERT_EQ_INT(st.ops_per_device[0], 0);
      ASSERT_EQ_INT(st.ops_per_device[1], st.ops_run);
    } else {
      rc = convd_engine_run(e, &c, x, w, b, y, NULL, err, sizeof err);
      ASSERT_EQ_INT(rc, mode == 1 ? CONVD_ENOTSUP : CONVD_EDEVICE);
      ASSERT_CONTAINS(err, mode == 1 ? "no healthy device supports this convolution"
                                     : "no healthy device left that supports this convolution");
    }
    convd_engine_destroy(e);
  }
  free(x), free(w), free(b), free(y);
}

/* Transpose convolution through the planner and scheduler: random transposes (strides 1-4,
 * kernels 1-7, dilation, asymmetric padding, output padding, groups, odd and even sizes) with
 * random budgets that force multi-tile, multi-phase, multi-block plans, on CPU and reference
 * devices, against the transpose reference; and every conv_transpose2d golden case forced
 * through small budgets. */
/* A random transpose's output padding (below its stride or dilation), padding and bias, after
 * its geometry: the draws both random-transpose tests share. */
static void random_transpose_tail(rng *r, convd_conv_params *p) {
  p->out_pad_h = rng_range(r, 0, (p->stride_h > p->dil_h ? p->stride_h : p->dil_h) - 1);
  p->out_pad_w = rng_range(r, 0, (p->stride_w > p->dil_w ? p->stride_w : p->dil_w) - 1);
  p->pad_top = rng_range(r, 0, 3), p->pad_bottom = rng_range(r, 0, 3);
  p->pad_left = rng_range(r, 0, 3), p->pad_right = rng_range(r, 0, 3);
  p->has_bias = (int)rng_range(r, 0, 1);
}

static void test_transpose_random_plans(void) {
  rng r = {0x5eed0407};
  char err[512];
  int cases = 0, multi = 0, blocks = 0;
  for (int iter = 0; iter < 150 && !test_failed; iter++) {
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.transposed = 1;
    p.groups = rng_range(&r, 1, 3);
    p.n = rng_range(&r, 1, 2);
    p.c_per_group = rng_range(&r, 1, iter % 2 ? 40 : 8);
    p.c_in = p.groups * p.c_per_group;
    p.c_out = p.groups * rng_range(&r, 1, 8);
    p.kh = rng_range(&r, 1, 7), p.kw = rng_range(&r, 1, 7);
    p.stride_h = rng_range(&r, 1, 4), p.stride_w = rng_range(&r, 1, 4);
    p.dil_h = rng_range(&r, 1, 2), p.dil_w = rng_range(&r, 1, 2);
    p.h = rng_range(&r, 1, 32), p.w = rng_range(&r, 1, 32);
    if (iter % 3 == 0) { /* many channels on a small image: budgets cut channel blocks */
      p.groups = 1;
      p.c_in = p.c_per_group = rng_range(&r, 32, 96);
      p.c_out = rng_range(&r, 8, 32);
      p.h = rng_range(&r, 1, 6), p.w = rng_range(&r, 1, 6);
    }
    random_transpose_tail(&r, &p);
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) continue;
    const uint64_t total = c.input_bytes + c.weight_bytes + c.output_bytes;
    convd_engine_opts o = {.cpu_devices = (int)rng_range(&r, 1, 2), .cpu_threads = 2,
                           .reference = (int)rng_range(&r, 0, 1),
                           .device_memory = (uint64_t)rng_range(&r, 2048, (int64_t)total / 3 + 8192)};
    convd_engine *e;
    ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
    convd_plan pl;
    if (convd_engine_plan(e, &c, &pl, err, sizeof err) == CONVD_ELIMIT) {
      convd_engine_destroy(e);
      continue;
    }
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
    float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
    double *want = malloc(c.output_elems * sizeof(double));
    rng_fill(&r, x, c.input_elems), rng_fill(&r, w, c.weight_elems), rng_fill(&r, b, c.bias_elems);
    convd_ref_conv_transpose2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL);
    for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
    poison(y, c.output_elems);
    convd_job_stats st;
    char what[200];
    snprintf(what, sizeof what, "transpose case %d (s%" PRId64 ",%" PRId64 " k%" PRId64 "x%" PRId64
             " d%" PRId64 ",%" PRId64 " g%" PRId64 ", %" PRIu64 " ops, budget %" PRIu64 ")",
             iter, p.stride_h, p.stride_w, p.kh, p.kw, p.dil_h, p.dil_w, p.groups, pl.ops, o.device_memory);
    int rc = convd_engine_run(e, &c, x, w, p.has_bias ? b : NULL, y, &st, err, sizeof err);
    if (rc) FAIL_AT("%s: %s", what, err);
    else if (check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
    else if (st.ops_run != pl.ops) FAIL_AT("%s: %" PRIu64 " ops run", what, st.ops_run);
    /* with --cuda (tests/gpu/run.sh), the same case on the GPU's streams */
    if (test_cuda && !test_failed) {
      convd_engine_opts og = {.gpus = -1, .gpu_memory = o.device_memory < (1u << 20) ? (1u << 20) : o.device_memory};
      convd_engine *eg;
      ASSERT_OK(convd_engine_create(&og, &eg, err, sizeof err), err);
      poison(y, c.output_elems);
      rc = convd_engine_run(eg, &c, x, w, p.has_bias ? b : NULL, y, &st, err, sizeof err);
      if (rc) FAIL_AT("%s on the GPU: %s", what, err);
      else if (check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs on the GPU", what);
      convd_engine_destroy(eg);
    }
    cases++;
    multi += pl.tiles_h * pl.tiles_w > 1;
    blocks += pl.icblocks > 1;
    free(x), free(w), free(b), free(y), free(ref), free(want);
    convd_engine_destroy(e);
  }
  printf("  %d transposes, %d with several tiles, %d with input-channel blocks\n", cases, multi, blocks);
  ASSERT_TRUE(cases >= 120 && multi >= 40 && blocks >= 10);

  /* golden transposes, forced through small budgets */
  char names[64][128];
  int n = golden_list(golden_root, names, 64), gcases = 0;
  for (int i = 0; i < n && !test_failed; i++) {
    golden g;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    if (strcmp(g.op, "conv_transpose2d") != 0) {
      golden_free(&g);
      continue;
    }
    convd_conv c;
    ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
    for (uint64_t budget = 4096; budget <= 65536; budget *= 4) {
      convd_engine_opts o = {.cpu_devices = 2, .cpu_threads = 2, .device_memory = budget};
      convd_engine *e;
      ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
      float *y = malloc(c.output_bytes);
      poison(y, c.output_elems);
      convd_job_stats st;
      char what[200];
      snprintf(what, sizeof what, "%.120s with budget %" PRIu64, names[i], budget);
      int rc = convd_engine_run(e, &c, g.x, g.w, g.b, y, &st, err, sizeof err);
      if (rc) FAIL_AT("%s: %s", what, err);
      else if (check_close(what, y, g.expected, c.output_elems)) FAIL_AT("%s differs", what);
      free(y);
      convd_engine_destroy(e);
      gcases++;
    }
    golden_free(&g);
  }
  ASSERT_TRUE(gcases >= 12);
}

/* Transposes of one group with 16+ channels each way run whole on oneDNN's deconvolution (a
 * native plan: one op per batch item) when every device can: random shapes (strides 1-4,
 * kernels 1-7, dilation 1-3, asymmetric padding, output padding, so right-hand crops below zero,
 * N up to 2, bias) against the reference; the same shapes through a budget too small for a
 * whole item, and through the reference device, go by phases and agree too. */
static void test_native_transpose_random(void) {
  if (!convd_device_cpu_is_native()) {
    printf("  no oneDNN in this build: no native transposes to test\n");
    return;
  }
  rng r = {0x5eed0409};
  char err[512];
  int native = 0, phased = 0;
  for (int iter = 0; iter < 60 && !test_failed; iter++) {
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.transposed = 1;
    p.n = rng_range(&r, 1, 2);
    p.c_in = p.c_per_group = rng_range(&r, 16, 40);
    p.c_out = rng_range(&r, 16, 40);
    p.kh = rng_range(&r, 1, 7), p.kw = rng_range(&r, 1, 7);
    p.stride_h = rng_range(&r, 1, 4), p.stride_w = rng_range(&r, 1, 4);
    p.dil_h = rng_range(&r, 1, 3), p.dil_w = rng_range(&r, 1, 3);
    p.h = rng_range(&r, 1, 12), p.w = rng_range(&r, 1, 12);
    random_transpose_tail(&r, &p);
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) continue;
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
    float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
    double *want = malloc(c.output_elems * sizeof(double));
    rng_fill(&r, x, c.input_elems), rng_fill(&r, w, c.weight_elems), rng_fill(&r, b, c.bias_elems);
    convd_ref_conv_transpose2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL);
    for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
    const convd_engine_opts opts[3] = {{.cpu_devices = 1, .cpu_threads = 2},
                                       {.cpu_devices = 2, .cpu_threads = 2, .device_memory = 8192},
                                       {.cpu_devices = 1, .cpu_threads = 2, .reference = 1}};
    for (int k = 0; k < 3 && !test_failed; k++) {
      convd_engine *e;
      ASSERT_OK(convd_engine_create(&opts[k], &e, err, sizeof err), err);
      convd_plan pl;
      if (convd_engine_plan(e, &c, &pl, err, sizeof err) == CONVD_ELIMIT) {
        convd_engine_destroy(e);
        continue;
      }
      char what[200];
      snprintf(what, sizeof what, "native-size transpose %d (%" PRId64 "->%" PRId64 " s%" PRId64 ",%" PRId64
               " k%" PRId64 "x%" PRId64 " d%" PRId64 ",%" PRId64 " p%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
               " op%" PRId64 ",%" PRId64 ", %s plan, %" PRIu64 " ops)",
               iter, p.c_in, p.c_out, p.stride_h, p.stride_w, p.kh, p.kw, p.dil_h, p.dil_w, p.pad_top,
               p.pad_bottom, p.pad_left, p.pad_right, p.out_pad_h, p.out_pad_w, pl.native ? "native" : "phase",
               pl.ops);
      /* native on oneDNN alone, within its budget, and with an output padding below the stride */
      const int want_native = k == 0 && p.out_pad_h < p.stride_h && p.out_pad_w < p.stride_w;
      if (pl.native != want_native) FAIL_AT("%s: expected a %s plan", what, want_native ? "native" : "phase");
      poison(y, c.output_elems);
      convd_job_stats st;
      int rc = convd_engine_run(e, &c, x, w, p.has_bias ? b : NULL, y, &st, err, sizeof err);
      if (rc) FAIL_AT("%s: %s", what, err);
      else if (check_close(what, y, want, c.output_elems)) FAIL_AT("%s differs", what);
      native += pl.native, phased += !pl.native;
      convd_engine_destroy(e);
    }
    free(x), free(w), free(b), free(y), free(ref), free(want);
  }
  printf("  %d native runs, %d by phases\n", native, phased);
  ASSERT_TRUE(native >= 30 && phased >= 100);

  /* A transpose op oneDNN turns down (an output padding up to the dilation, not below the
   * stride, which the planner keeps on phases) handed to the CPU device anyway: the reference
   * kernel computes it, and the device stays in service. */
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.transposed = 1;
  p.n = 1, p.c_in = p.c_per_group = 20, p.c_out = 17, p.h = 9, p.w = 11, p.kh = p.kw = 3;
  p.dil_h = p.dil_w = 2, p.out_pad_h = p.out_pad_w = 1, p.has_bias = 1;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  convd_device *d;
  ASSERT_OK(convd_device_cpu_create("cpu0", 2, 1u << 30, &d, err, sizeof err), err);
  float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes);
  float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
  double *want = malloc(c.output_elems * sizeof(double));
  rng_fill(&r, x, c.input_elems), rng_fill(&r, w, c.weight_elems), rng_fill(&r, b, c.bias_elems);
  convd_ref_conv_transpose2d(&c, x, w, b, ref, NULL);
  for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
  for (int k = 0; k < 2 && !test_failed; k++) { /* twice: the device is still in service */
    poison(y, c.output_elems);
    convd_op_io io = convd_op_io_dense(&c, x, w, 99, b, y, NULL);
    ASSERT_OK(convd_device_run(d, &io, err, sizeof err), err);
    if (check_close("a transpose oneDNN turns down", y, want, c.output_elems)) FAIL_AT("it differs");
  }
  convd_device_destroy(d);
  free(x), free(w), free(b), free(y), free(ref), free(want);
}

/* A job with a content key, run to its end (the engine's own convd_engine_run names no key). */
typedef struct keyed_done {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done, status;
} keyed_done;
static void k_rows(void *user, int64_t n, int64_t h0, int64_t h1) { (void)user, (void)n, (void)h0, (void)h1; }
static void k_done(void *user, int status, const char *err, const convd_job_stats *st) {
  keyed_done *k = user;
  (void)err, (void)st;
  pthread_mutex_lock(&k->mu);
  k->done = 1;
  k->status = status;
  pthread_cond_signal(&k->cv);
  pthread_mutex_unlock(&k->mu);
}
static int run_keyed(convd_engine *e, const convd_conv *c, float *x, float *w, float *b, float *y,
                     uint64_t key) {
  keyed_done k = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
  convd_job_cbs cb = {.user = &k, .rows_ready = k_rows, .done = k_done};
  convd_job *j;
  char err[256];
  if (convd_job_create(e, c, &cb, &j, err, sizeof err)) return -1;
  convd_job_set_output(j, y);
  convd_job_set_weights_key(j, key);
  convd_job_set_weights(j, w, b, CONVD_LEND);
  const size_t slab = (size_t)(c->p.c_in * c->p.h * c->p.w);
  for (int64_t n = 0; n < c->p.n; n++)
    convd_job_put_band(j, n, 0, c->p.h, x + (size_t)n * slab, CONVD_LEND, err, sizeof err);
  pthread_mutex_lock(&k.mu);
  while (!k.done) pthread_cond_wait(&k.cv, &k.mu);
  pthread_mutex_unlock(&k.mu);
  convd_job_destroy(j);
  return k.status;
}

/* A transpose's segregated weights are kept by content key: a later job naming the same key
 * uses them (here, on purpose, with other weights in hand: the key is the contract), a job with
 * another key or none segregates its own. */
static void test_transpose_segregated_cache(void) {
  char err[256];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.transposed = 1;
  p.n = 1, p.c_in = p.c_per_group = 6, p.h = 9, p.w = 7, p.c_out = 5, p.kh = p.kw = 4;
  p.stride_h = p.stride_w = 2, p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  /* the reference device keeps no weights of its own: what it gets is what the engine kept */
  convd_engine_opts o = {.cpu_devices = 1, .cpu_threads = 2, .reference = 1};
  convd_engine *e;
  ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
  rng r = {0x5eed0408};
  float *x = malloc(c.input_bytes), *w1 = malloc(c.weight_bytes), *w2 = malloc(c.weight_bytes);
  float *y = malloc(c.output_bytes), *ref1 = malloc(c.output_bytes), *ref2 = malloc(c.output_bytes);
  double *want = malloc(c.output_elems * sizeof(double));
  rng_fill(&r, x, c.input_elems), rng_fill(&r, w1, c.weight_elems), rng_fill(&r, w2, c.weight_elems);
  convd_ref_conv_transpose2d(&c, x, w1, NULL, ref1, NULL);
  convd_ref_conv_transpose2d(&c, x, w2, NULL, ref2, NULL);
  const struct {
    float *w;
    uint64_t key;
    const float *ref;
    const char *what;
  } runs[] = {{w1, 77, ref1, "w1 keyed 77"},
              {w2, 77, ref1, "w2 under key 77: the cached segregation of w1"},
              {w2, 78, ref2, "w2 keyed 78"},
              {w2, 0, ref2, "w2 without a key"}};
  for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
    poison(y, c.output_elems);
    ASSERT_EQ_INT(run_keyed(e, &c, x, runs[i].w, NULL, y, runs[i].key), 0);
    for (size_t k = 0; k < c.output_elems; k++) want[k] = runs[i].ref[k];
    if (check_close(runs[i].what, y, want, c.output_elems)) {
      FAIL_AT("%s", runs[i].what);
      break;
    }
  }
  free(x), free(w1), free(w2), free(y), free(ref1), free(ref2), free(want);
  convd_engine_destroy(e);
}

/* Priorities: a high-priority job created after a long low-priority one has its ops run first
 * and ends while the low one still has most of its ops left; the admission limit on pending
 * ops refuses a job that would go over it and takes it once the others are done. */
typedef struct prio_state {
  pthread_mutex_t mu;
  int order[8], n;
  uint64_t low_done_at_high_end; /* ops of the low job done when the high one ended */
  convd_job *low;
} prio_state;
typedef struct prio_user {
  prio_state *st;
  int which;
} prio_user;
static void p_rows(void *user, int64_t n, int64_t h0, int64_t h1) { (void)user, (void)n, (void)h0, (void)h1; }
static void p_done(void *user, int status, const char *err, const convd_job_stats *st) {
  prio_user *u = user;
  (void)status, (void)err;
  pthread_mutex_lock(&u->st->mu);
  u->st->order[u->st->n++] = u->which;
  pthread_mutex_unlock(&u->st->mu);
  (void)st;
}

static void test_priority_and_admission(void) {
  char err[256];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = p.c_per_group = 4, p.h = 64, p.w = 64, p.c_out = 4, p.kh = p.kw = 3;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  const uint64_t budget = 8192;
  convd_device *devs[1] = {test_wrapped_device("slow", 3000, 0, budget)};
  convd_engine_opts o = {.extra = devs, .n_extra = 1, .device_memory = budget, .max_pending_ops = 0};
  convd_engine *e;
  ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
  convd_plan pl;
  ASSERT_OK(convd_engine_plan(e, &c, &pl, err, sizeof err), err);
  ASSERT_TRUE(pl.ops >= 16);
  float *x = calloc(c.input_elems, 4), *w = calloc(c.weight_elems, 4);
  float *y0 = malloc(c.output_bytes), *y1 = malloc(c.output_bytes);
  prio_state st = {.mu = PTHREAD_MUTEX_INITIALIZER};
  prio_user u_low = {&st, 0}, u_high = {&st, 1};
  convd_job_cbs cb_low = {.user = &u_low, .rows_ready = p_rows, .done = p_done};
  convd_job_cbs cb_high = {.user = &u_high, .rows_ready = p_rows, .done = p_done};
  convd_job *low, *high;
  ASSERT_OK(convd_job_create(e, &c, &cb_low, &low, err, sizeof err), err);
  convd_job_set_priority(low, -1);
  convd_job_set_output(low, y0);
  convd_job_set_weights(low, w, NULL, CONVD_LEND);
  ASSERT_OK(convd_job_put_band(low, 0, 0, p.h, x, CONVD_LEND, err, sizeof err), err);
  ASSERT_OK(convd_job_create(e, &c, &cb_high, &high, err, sizeof err), err);
  convd_job_set_priority(high, 5);
  convd_job_set_output(high, y1);
  convd_job_set_weights(high, w, NULL, CONVD_LEND);
  ASSERT_OK(convd_job_put_band(high, 0, 0, p.h, x, CONVD_LEND, err, sizeof err), err);
  convd_engine_load ld;
  int measured = 0;
  for (int i = 0; i < 20000; i++) { /* at most 20 s */
    pthread_mutex_lock(&st.mu);
    int n = st.n;
    pthread_mutex_unlock(&st.mu);
    if (n == 2) break;
    if (n == 1 && st.order[0] == 1 && !measured) {
      measured = 1;
      convd_engine_load_get(e, &ld);
      st.low_done_at_high_end = pl.ops - ld.pending_ops; /* the high job has none left */
    }
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  ASSERT_EQ_INT(st.n, 2);
  ASSERT_EQ_INT(st.order[0], 1); /* the high-priority job ended first */
  printf("  %" PRIu64 " ops per job; the low-priority one had done %" PRIu64 " when the high one ended\n",
         pl.ops, st.low_done_at_high_end);
  ASSERT_TRUE(st.low_done_at_high_end < pl.ops / 2);
  convd_job_destroy(low);
  convd_job_destroy(high);
  convd_engine_load_get(e, &ld);
  ASSERT_TRUE(ld.jobs == 0 && ld.pending_ops == 0 && ld.ready_ops == 0 && ld.bytes_held == 0);
  convd_engine_destroy(e);

  /* Admission: room for one plan's ops, not two. */
  convd_device *d2[1] = {test_wrapped_device("slow", 0, 0, budget)};
  convd_engine_opts o2 = {.extra = d2, .n_extra = 1, .device_memory = budget,
                          .max_pending_ops = pl.ops + pl.ops / 2};
  ASSERT_OK(convd_engine_create(&o2, &e, err, sizeof err), err);
  ASSERT_OK(convd_job_create(e, &c, &cb_low, &low, err, sizeof err), err);
  ASSERT_EQ_INT(convd_job_create(e, &c, &cb_high, &high, err, sizeof err), CONVD_ELIMIT);
  ASSERT_CONTAINS(err, "--max-queue-ops");
  convd_job_cancel(low);
  for (int i = 0; i < 5000; i++) {
    pthread_mutex_lock(&st.mu);
    int n = st.n;
    pthread_mutex_unlock(&st.mu);
    if (n == 3) break;
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  convd_job_destroy(low);
  ASSERT_OK(convd_job_create(e, &c, &cb_high, &high, err, sizeof err), err); /* room again */
  convd_job_cancel(high);
  for (int i = 0; i < 5000; i++) { /* st.n is written by the workers, under st.mu */
    pthread_mutex_lock(&st.mu);
    int n = st.n;
    pthread_mutex_unlock(&st.mu);
    if (n >= 4) break;
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  convd_job_destroy(high);
  convd_engine_destroy(e);
  free(x), free(w), free(y0), free(y1);
}

/* Devices that accumulate (as GPUs do, cuDNN's beta = 1) get each tile's input-channel blocks
 * as one chain and write the tile once; beside a CPU device, and when one fails in the middle
 * of a chain (every block of it runs again elsewhere), the result still equals the reference. */
static void test_chains_accumulate_on_device(void) {
  rng r = {0x5eed0406};
  char err[256];
  int chained_jobs = 0, cases = 0;
  for (int iter = 0; iter < 60 && !test_failed; iter++) {
    /* Many channels on small images, so that budgets cut channel blocks. */
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.n = rng_range(&r, 1, 2);
    p.c_in = p.c_per_group = rng_range(&r, 16, 96);
    p.c_out = rng_range(&r, 2, 24);
    p.kh = rng_range(&r, 1, 3), p.kw = rng_range(&r, 1, 3);
    p.h = rng_range(&r, 4, 20), p.w = rng_range(&r, 4, 20);
    p.pad_top = p.pad_left = rng_range(&r, 0, 1);
    p.pad_bottom = p.pad_right = rng_range(&r, 0, 2);
    p.stride_h = p.stride_w = rng_range(&r, 1, 2);
    p.has_bias = (int)rng_range(&r, 0, 1);
    convd_conv c;
    ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
    const uint64_t total = c.input_bytes + c.weight_bytes + c.output_bytes;
    const uint64_t budget = (uint64_t)rng_range(&r, 4096, (int64_t)total / 2 + 8192);
    const int mode = iter % 3; /* 0 one accumulating device, 1 with a CPU device, 2 one fails */
    convd_device *devs[2] = {test_wrapped_device("acc", 0, mode == 2 ? (int)rng_range(&r, 1, 6) : 0, budget),
                             test_wrapped_device("plain", mode == 1 ? 300 : 0, 0, budget)};
    wrap *acc = devs[0]->ctx;
    acc->accumulate = 1;
    devs[0]->accumulates = 1;
    convd_engine_opts o = {.extra = devs, .n_extra = mode == 0 ? 1 : 2, .device_memory = budget};
    if (mode == 0) convd_device_destroy(devs[1]);
    convd_engine *e;
    ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
    convd_plan pl;
    if (convd_engine_plan(e, &c, &pl, err, sizeof err) == CONVD_ELIMIT) {
      convd_engine_destroy(e);
      continue;
    }
    char what[160];
    snprintf(what, sizeof what, "case %d mode %d (%" PRIu64 " ops, %" PRId64 " channel blocks)", iter,
             mode, pl.ops, pl.icblocks);
    convd_job_stats st;
    int rc = check_engine(e, &c, &r, what, &st);
    const int chains = atomic_load(&acc->chains), bad = atomic_load(&acc->violations);
    convd_engine_destroy(e);
    if (rc) {
      FAIL_AT("%s differs from the reference", what);
      return;
    }
    if (bad) {
      FAIL_AT("%s: %d chain protocol violations", what, bad);
      return;
    }
    if (mode == 0 && pl.icblocks > 1 && chains == 0) {
      FAIL_AT("%s: the lone accumulating device got no chain", what);
      return;
    }
    chained_jobs += chains > 0;
    cases++;
  }
  printf("  %d cases, %d ran chains\n", cases, chained_jobs);
  ASSERT_TRUE(cases >= 40);
  ASSERT_TRUE(chained_jobs >= 10);
}

/* Cancelling drops queued ops: a slow job ends early with CONVD_ECANCELED. */
typedef struct cancel_state {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done, status;
  convd_job_stats st;
} cancel_state;

static void c_rows(void *user, int64_t n, int64_t h0, int64_t h1) { (void)user, (void)n, (void)h0, (void)h1; }
static void c_done(void *user, int status, const char *err, const convd_job_stats *st) {
  cancel_state *s = user;
  (void)err;
  pthread_mutex_lock(&s->mu);
  s->done = 1, s->status = status, s->st = *st;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

static void test_cancel_drops_queued_ops(void) {
  char err[256];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 2, p.h = 400, p.w = 4, p.c_out = 2, p.c_per_group = 2, p.kh = 1, p.kw = 1;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  uint64_t budget = 2 * 4 * (2 * 4 + 4 + 2 * 4);
  convd_device *devs[1] = {test_wrapped_device("slow", 5000, 0, budget)};
  convd_engine_opts o = {.extra = devs, .n_extra = 1, .device_memory = budget};
  convd_engine *e;
  ASSERT_OK(convd_engine_create(&o, &e, err, sizeof err), err);
  cancel_state s = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, {0}};
  convd_job_cbs cbs = {.user = &s, .rows_ready = c_rows, .done = c_done};
  convd_job *j;
  ASSERT_OK(convd_job_create(e, &c, &cbs, &j, err, sizeof err), err);
  ASSERT_EQ_INT(convd_job_plan(j)->ops, 400);
  float *w = calloc(c.weight_elems, 4), *x = calloc(c.input_elems, 4);
  convd_job_set_weights(j, w, NULL, CONVD_GIVE);
  ASSERT_OK(convd_job_put_band(j, 0, 0, p.h, x, CONVD_LEND, err, sizeof err), err);
  struct timespec ts = {0, 30 * 1000 * 1000};
  nanosleep(&ts, NULL);
  convd_job_cancel(j);
  pthread_mutex_lock(&s.mu);
  while (!s.done) pthread_cond_wait(&s.cv, &s.mu);
  pthread_mutex_unlock(&s.mu);
  ASSERT_EQ_INT(s.status, CONVD_ECANCELED);
  printf("  %" PRIu64 " of 400 ops ran before the cancel took\n", s.st.ops_run);
  ASSERT_TRUE(s.st.ops_run < 100);
  convd_job_destroy(j);
  free(x);
  convd_engine_destroy(e);
}

/* With --cuda (tests/gpu/run.sh): random plans on the GPU alone, on the GPU beside a CPU
 * device (the heterogeneous pool), and on two device instances sharing the one GPU (the code
 * path of several GPUs). */
static void test_gpu_random_plans(void) {
  static const struct {
    const char *name;
    int cpu_devices, instances;
  } configs[] = {{"gpu", 0, 1}, {"gpu+cpu", 1, 1}, {"2 instances of one gpu", 0, 2}};
  rng r = {0x5eed0401};
  for (size_t k = 0; k < sizeof configs / sizeof configs[0]; k++) {
    int multi = 0, cases = 0;
    for (int iter = 0; iter < 60; iter++) {
      convd_engine_opts o = {.cpu_devices = configs[k].cpu_devices, .cpu_threads = 2, .gpus = -1,
                             .gpu_instances = configs[k].instances};
      uint64_t ops = 0;
      int rc = random_case(&r, o, configs[k].name, iter, &ops);
      if (rc < 0) return;
      if (rc > 0) continue;
      multi += ops > 1;
      cases++;
    }
    printf("  %s: %d cases, %d with more than one op\n", configs[k].name, cases, multi);
  }
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"property_random_plans", test_property_random_plans},
      {"golden_forced_tiles", test_golden_forced_tiles},
      {"balance_1_2_4", test_balance_1_2_4},
      {"slow_device_never_delays", test_slow_device_never_delays},
      {"device_failure_mid_job", test_device_failure_mid_job},
      {"cancel_drops_queued_ops", test_cancel_drops_queued_ops},
      {"chains_accumulate_on_device", test_chains_accumulate_on_device},
      {"priority_and_admission", test_priority_and_admission},
      {"transpose_random_plans", test_transpose_random_plans},
      {"native_transpose_random", test_native_transpose_random},
      {"transpose_segregated_cache", test_transpose_segregated_cache},
  };
  /* test_sched --cuda: plans on the GPU, and every random transpose run on the GPU as well. */
  static const test_case cuda_tests[] = {
      {"gpu_random_plans", test_gpu_random_plans},
      {"transpose_random_plans", test_transpose_random_plans},
  };
  return test_main_cuda(argc, argv, tests, sizeof tests / sizeof tests[0], cuda_tests,
                        sizeof cuda_tests / sizeof cuda_tests[0]);
}
