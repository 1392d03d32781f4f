/* End to end: a real convd process on loopback, driven by convctl and by libconvd_client.
 * Every result is compared element by element with the golden vectors or with the reference
 * computed here, outputs poisoned with NaN beforehand. */
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"
#include "client_params.h"
#include "daemon.h"
#include "npy.h"
#include "dtype.h"
#include "ref.h"
#include "testutil.h"

static const char *golden_root = GOLDEN_DIR;

/* The library's conv calls on the engine's parameters, which the problems and golden cases
 * here hold: streaming, or Conv2dUnary when unary is set. */
static int client_conv(convd_client *cl, int unary, const convd_conv_params *p, const float *x,
                       const float *w, const float *b, float *y, convd_client_stats *st, char *err,
                       size_t errlen) {
  const convd_client_conv_params cp = convd_client_params_from_conv(p);
  return unary ? convd_client_conv2d_unary(cl, &cp, x, w, b, y, st, err, errlen)
               : convd_client_conv2d(cl, &cp, x, w, b, y, st, err, errlen);
}

/* A random convolution with its inputs and the reference answer. */
typedef struct problem {
  convd_conv_params p;
  convd_conv c;
  float *x, *w, *b, *y;
  double *want;
} problem;

static void problem_free(problem *pr) {
  free(pr->x), free(pr->w), free(pr->b), free(pr->y), free(pr->want);
  memset(pr, 0, sizeof *pr);
}

/* Fills inputs; the reference is computed by problem_reference (it may run on another thread). */
static int problem_init(problem *pr, const convd_conv_params *p, rng *r) {
  char err[256];
  memset(pr, 0, sizeof *pr);
  pr->p = *p;
  if (convd_conv_init(&pr->c, p, err, sizeof err)) {
    fprintf(stderr, "  bad problem: %s\n", err);
    return -1;
  }
  pr->x = malloc(pr->c.input_bytes);
  pr->w = malloc(pr->c.weight_bytes);
  pr->b = p->has_bias ? malloc(pr->c.bias_bytes) : NULL;
  pr->y = malloc(pr->c.output_bytes);
  pr->want = malloc(pr->c.output_elems * sizeof(double));
  rng_fill(r, pr->x, pr->c.input_elems);
  rng_fill(r, pr->w, pr->c.weight_elems);
  if (pr->b) rng_fill(r, pr->b, pr->c.bias_elems);
  poison(pr->y, pr->c.output_elems);
  return 0;
}

static void problem_reference(problem *pr) {
  float *ref = malloc(pr->c.output_bytes);
  convd_ref_conv2d(&pr->c, pr->x, pr->w, pr->b, ref, NULL);
  for (size_t i = 0; i < pr->c.output_elems; i++) pr->want[i] = ref[i];
  free(ref);
}

static void *reference_thread(void *arg) {
  problem_reference(arg);
  return NULL;
}

/* A random convolution covering groups/depthwise, stride, dilation, asymmetric padding, N>1. */
static convd_conv_params random_params(rng *r) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  int64_t kind = rng_range(r, 0, 3);
  p.groups = kind == 0 ? 1 : kind == 1 ? rng_range(r, 2, 3) : 1;
  p.n = rng_range(r, 1, 3);
  p.c_per_group = rng_range(r, 1, 6);
  p.c_in = p.groups * p.c_per_group;
  p.c_out = p.groups * rng_range(r, 1, 5);
  if (kind == 3) { /* depthwise */
    p.c_in = p.groups = rng_range(r, 2, 8);
    p.c_per_group = 1;
    p.c_out = p.c_in * rng_range(r, 1, 2);
  }
  p.kh = rng_range(r, 1, 5), p.kw = rng_range(r, 1, 5);
  p.stride_h = rng_range(r, 1, 3), p.stride_w = rng_range(r, 1, 3);
  p.dil_h = rng_range(r, 1, 3), p.dil_w = rng_range(r, 1, 3);
  p.pad_top = rng_range(r, 0, 3), p.pad_bottom = rng_range(r, 0, 3);
  p.pad_left = rng_range(r, 0, 3), p.pad_right = rng_range(r, 0, 3);
  int64_t kh_eff = p.dil_h * (p.kh - 1) + 1, kw_eff = p.dil_w * (p.kw - 1) + 1;
  p.h = rng_range(r, kh_eff > 1 ? kh_eff : 1, 40);
  p.w = rng_range(r, kw_eff > 1 ? kw_eff : 1, 40);
  p.has_bias = (int)rng_range(r, 0, 1);
  return p;
}

/* ---- golden vectors through convctl -------------------------------------------------- */

static void test_golden_convctl(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  char names[64][128], err[512];
  int n = golden_list(golden_root, names, 64), ran = 0;
  for (int i = 0; i < n && !test_failed; i++) {
    golden g;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    const int transposed = strcmp(g.op, "conv_transpose2d") == 0;
    char in[640], wt[640], bs[640], out[8448], stride[64], pad[128], dil[64], groups[32], opad[64];
    snprintf(in, sizeof in, "%s/input.npy", g.dir);
    snprintf(wt, sizeof wt, "%s/weight.npy", g.dir);
    snprintf(bs, sizeof bs, "%s/bias.npy", g.dir);
    snprintf(out, sizeof out, "/tmp/convd-e2e-%d-%s.npy", (int)getpid(), names[i]);
    snprintf(stride, sizeof stride, "%lld,%lld", (long long)g.p.stride_h, (long long)g.p.stride_w);
    snprintf(pad, sizeof pad, "%lld,%lld,%lld,%lld", (long long)g.p.pad_top,
             (long long)g.p.pad_bottom, (long long)g.p.pad_left, (long long)g.p.pad_right);
    snprintf(dil, sizeof dil, "%lld,%lld", (long long)g.p.dil_h, (long long)g.p.dil_w);
    snprintf(groups, sizeof groups, "%lld", (long long)g.p.groups);
    snprintf(opad, sizeof opad, "%lld,%lld", (long long)g.p.out_pad_h, (long long)g.p.out_pad_w);
    char *argv[32] = {CONVCTL_BIN, transposed ? "conv-transpose" : "conv", "--server", d.target,
                      "--input", in, "--weight", wt, "--stride", stride, "--padding", pad,
                      "--dilation", dil, "--groups", groups, "--output", out};
    int argc = 18;
    if (g.p.has_bias) argv[argc++] = "--bias", argv[argc++] = bs;
    if (transposed) argv[argc++] = "--output-padding", argv[argc++] = opad;
    argv[argc] = NULL;
    int rc = test_run(argv, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 120);
    if (rc != 0) {
      char msg[2048] = "";
      test_read_file("/tmp/convd-e2e-convctl.err", msg, sizeof msg);
      FAIL_AT("convctl on %s exited %d: %s", names[i], rc, msg);
    } else {
      convd_npy y;
      if (convd_npy_read(out, &y, err, sizeof err)) {
        FAIL_AT("%s", err);
      } else {
        if (y.ndim != 4 || y.shape[0] != g.output[0] || y.shape[1] != g.output[1] ||
            y.shape[2] != g.output[2] || y.shape[3] != g.output[3] || y.elem_size != 4)
          FAIL_AT("%s: output has the wrong shape or dtype", names[i]);
        else if (check_close(names[i], y.data, g.expected, g.expected_count))
          FAIL_AT("golden case %s through convctl", names[i]);
        convd_npy_free(&y);
      }
      unlink(out);
      ran++;
    }
    golden_free(&g);
  }
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  ASSERT_TRUE(ran >= 19); /* 15 conv2d, 4 conv_transpose2d */
}

/* Golden vectors through the library: unary, and streaming with tiny chunks both ways so that
 * every band is split into pieces. */
static void test_golden_library_small_chunks(void) {
  test_daemon d;
  const char *extra[] = {"--chunk-bytes", "1024", "--max-message-bytes", "65536", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  convd_client *cl;
  char err[1024];
  convd_client_opts o = {.chunk_bytes = 1000, .max_message_bytes = 65536, .timeout_seconds = 120};
  ASSERT_OK(convd_client_create(d.target, &o, &cl, err, sizeof err), err);
  char names[64][128];
  int n = golden_list(golden_root, names, 64);
  for (int i = 0; i < n && !test_failed; i++) {
    golden g;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    if (strcmp(g.op, "conv2d") == 0 || strcmp(g.op, "conv_transpose2d") == 0) {
      convd_conv c;
      convd_conv_init(&c, &g.p, err, sizeof err);
      float *y = malloc(c.output_bytes);
      convd_client_stats st;
      for (int unary = 0; unary < 2 && !test_failed; unary++) {
        poison(y, c.output_elems);
        int rc = client_conv(cl, unary, &g.p, g.x, g.w, g.b, y, &st, err, sizeof err);
        if (unary && (c.output_bytes + 1024 > 65536 ||
                      c.input_bytes + c.weight_bytes + c.bias_bytes + 1024 > 65536)) {
          /* too large for one message under this limit: a clear refusal */
          if (rc != CONVD_CLIENT_ELIMIT || strstr(err, "use the streaming Conv2d") == NULL)
            FAIL_AT("%s unary: expected RESOURCE_EXHAUSTED naming Conv2d, got %d %s", names[i], rc, err);
          continue;
        }
        if (rc) {
          FAIL_AT("%s (%s): %s", names[i], unary ? "unary" : "stream", err);
        } else if (check_close(names[i], y, g.expected, g.expected_count)) {
          FAIL_AT("golden case %s (%s)", names[i], unary ? "unary" : "stream");
        } else if (st.ops_run < 1 || (!unary && st.ops_run != st.elemental_ops) ||
                   st.output_shape[2] != g.output[2]) {
          FAIL_AT("%s: summary says %" PRIu64 " of %" PRIu64 " ops, H_out %" PRId64, names[i],
                  st.ops_run, st.elemental_ops, st.output_shape[2]);
        } else if (!unary && st.bytes_received != c.input_bytes + c.weight_bytes + c.bias_bytes) {
          FAIL_AT("%s: server received %" PRIu64 " tensor bytes", names[i], st.bytes_received);
        }
      }
      free(y);
    }
    golden_free(&g);
  }
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* 1x64x512x512 float32 input (64 MiB), 64->64 3x3: far past one 4 MiB message both ways. */
static void test_chunking_64mib(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  rng r = {0x5eed0064};
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 64, p.h = 512, p.w = 512;
  p.c_out = 64, p.c_per_group = 64, p.kh = 3, p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  p.has_bias = 1;
  problem pr;
  ASSERT_TRUE(problem_init(&pr, &p, &r) == 0);
  ASSERT_EQ_INT(pr.c.input_bytes, 64u << 20);
  /* The local reference runs beside the call: the machine has two cores. */
  pthread_t t;
  pthread_create(&t, NULL, reference_thread, &pr);
  convd_client *cl;
  char err[1024];
  convd_client_opts o = {.timeout_seconds = 900}; /* default 1 MiB chunks, 4 MiB messages */
  ASSERT_OK(convd_client_create(d.target, &o, &cl, err, sizeof err), err);
  convd_client_stats st;
  int rc = client_conv(cl, 0, &p, pr.x, pr.w, pr.b, pr.y, &st, err, sizeof err);
  pthread_join(t, NULL);
  convd_client_destroy(cl);
  ASSERT_OK(rc, err);
  ASSERT_TRUE(check_close("64 MiB input", pr.y, pr.want, pr.c.output_elems) == 0);
  ASSERT_EQ_INT(st.bytes_received, pr.c.input_bytes + pr.c.weight_bytes + pr.c.bias_bytes);
  ASSERT_EQ_INT(st.bytes_sent, pr.c.output_bytes);
  printf("  server: %.2f s elapsed, %.2f s compute\n", st.elapsed_seconds, st.compute_seconds);
  problem_free(&pr);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* Random shapes with a fixed seed, streaming with random chunk sizes and unary, vs reference. */
static void test_random_shapes(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  rng r = {0x5eed00a1};
  char err[1024];
  for (int i = 0; i < 40 && !test_failed; i++) {
    convd_conv_params p = random_params(&r);
    problem pr;
    ASSERT_TRUE(problem_init(&pr, &p, &r) == 0);
    problem_reference(&pr);
    convd_client_opts o = {.chunk_bytes = (size_t)rng_range(&r, 1024, 70000), .timeout_seconds = 60};
    convd_client *cl;
    ASSERT_OK(convd_client_create(d.target, &o, &cl, err, sizeof err), err);
    int unary = i % 3 == 2;
    int rc = client_conv(cl, unary, &p, pr.x, pr.w, pr.b, pr.y, NULL, err, sizeof err);
    convd_client_destroy(cl);
    char what[256];
    snprintf(what, sizeof what,
             "case %d %s: in %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " w %" PRId64 "x%" PRId64
             "x%" PRId64 "x%" PRId64 " g%" PRId64 " s%" PRId64 ",%" PRId64 " d%" PRId64 ",%" PRId64,
             i, unary ? "unary" : "stream", p.n, p.c_in, p.h, p.w, p.c_out, p.c_per_group, p.kh,
             p.kw, p.groups, p.stride_h, p.stride_w, p.dil_h, p.dil_w);
    if (rc) FAIL_AT("%s: %s", what, err);
    else if (check_close(what, pr.y, pr.want, pr.c.output_elems)) FAIL_AT("%s differs", what);
    problem_free(&pr);
  }
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* float16 and bfloat16 through both calls: inputs a client could send (values of the type),
 * narrowed and widened on the way, against the reference on the same values. The daemon
 * computes in float32 and rounds each output once, so the bound is half an ulp of the type at
 * the reference's magnitude plus the float32 accumulation's 1e-5. */
static void test_half_dtypes(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  rng r = {0x5eed00f1};
  char err[1024];
  for (int i = 0; i < 24 && !test_failed; i++) {
    convd_conv_params p = random_params(&r);
    p.dtype = i % 2 ? CONVD_BF16 : CONVD_F16;
    const double half_ulp = p.dtype == CONVD_F16 ? 0x1p-11 : 0x1p-8;
    problem pr;
    ASSERT_TRUE(problem_init(&pr, &p, &r) == 0);
    convd_dtype_round(p.dtype, pr.x, pr.c.input_elems);
    convd_dtype_round(p.dtype, pr.w, pr.c.weight_elems);
    if (pr.b) convd_dtype_round(p.dtype, pr.b, pr.c.bias_elems);
    problem_reference(&pr);
    convd_client_opts o = {.chunk_bytes = (size_t)rng_range(&r, 1024, 9001), .timeout_seconds = 60};
    convd_client *cl;
    ASSERT_OK(convd_client_create(d.target, &o, &cl, err, sizeof err), err);
    int unary = i % 4 >= 2;
    convd_client_stats st;
    int rc = client_conv(cl, unary, &p, pr.x, pr.w, pr.b, pr.y, &st, err, sizeof err);
    convd_client_destroy(cl);
    if (rc) {
      FAIL_AT("case %d (%s, %s): %s", i, convd_dtype_name(p.dtype), unary ? "unary" : "stream", err);
      problem_free(&pr);
      break;
    }
    double scale = 1;
    for (size_t k = 0; k < pr.c.output_elems; k++)
      if (fabs(pr.want[k]) > scale) scale = fabs(pr.want[k]);
    size_t bad = 0, worst_at = 0;
    double worst = 0;
    for (size_t k = 0; k < pr.c.output_elems; k++) {
      const double e = fabs((double)pr.y[k] - pr.want[k]);
      const double tol = half_ulp * fabs(pr.want[k]) + 1e-5 * scale;
      if (!(e <= tol)) bad++;
      if (!(e <= worst)) worst = e, worst_at = k;
    }
    if (bad)
      FAIL_AT("case %d (%s, %s): %zu of %zu elements beyond the bound; worst at %zu: got %a want %a",
              i, convd_dtype_name(p.dtype), unary ? "unary" : "stream", bad, pr.c.output_elems,
              worst_at, pr.y[worst_at], pr.want[worst_at]);
    /* The wire carried 2-byte elements both ways. */
    if (st.bytes_sent != pr.c.output_elems * 2 ||
        st.bytes_received != (pr.c.input_elems + pr.c.weight_elems + pr.c.bias_elems) * 2)
      FAIL_AT("case %d: the server counted %" PRIu64 " bytes in and %" PRIu64 " out, want 2 per element",
              i, st.bytes_received, st.bytes_sent);
    problem_free(&pr);
  }
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* Weight blocks stay on a device across calls, keyed by the weights' content: the same weights
 * sent again (by another connection) load nothing, other weights of the same shape do. */
static void test_weights_reused_across_calls(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  char err[512];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = p.c_per_group = 32, p.h = p.w = 24, p.c_out = 32, p.kh = p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  rng r = {0x5eed00f2};
  problem pr;
  ASSERT_TRUE(problem_init(&pr, &p, &r) == 0);
  problem_reference(&pr);
  uint64_t loaded[4], hits[4];
  for (int call = 0; call < 4 && !test_failed; call++) {
    if (call == 3) { /* other weights, same shape: must not hit the first ones' blocks */
      for (size_t i = 0; i < pr.c.weight_elems; i++) pr.w[i] = -pr.w[i];
      for (size_t i = 0; i < pr.c.output_elems; i++) pr.want[i] = 0;
    }
    convd_client *cl;
    ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
    poison(pr.y, pr.c.output_elems);
    int rc = client_conv(cl, call % 2, &p, pr.x, pr.w, NULL, pr.y, NULL, err, sizeof err);
    if (rc) FAIL_AT("call %d: %s", call, err);
    if (call == 3) problem_reference(&pr);
    if (check_close("weights reuse", pr.y, pr.want, pr.c.output_elems)) FAIL_AT("call %d differs", call);
    convd_client_device *devs;
    size_t n;
    ASSERT_OK(convd_client_list_devices(cl, &devs, &n, err, sizeof err), err);
    loaded[call] = hits[call] = 0;
    for (size_t i = 0; i < n; i++) {
      loaded[call] += devs[i].stats.weight_bytes_loaded;
      hits[call] += devs[i].stats.weight_cache_hits;
    }
    free(devs);
    convd_client_destroy(cl);
  }
  printf("  weight bytes loaded after each call: %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64
         "; cache hits %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n",
         loaded[0], loaded[1], loaded[2], loaded[3], hits[0], hits[1], hits[2], hits[3]);
  ASSERT_TRUE(loaded[0] > 0);
  ASSERT_TRUE(loaded[1] == loaded[0] && loaded[2] == loaded[0]); /* nothing loaded again */
  ASSERT_TRUE(hits[2] > hits[1] && hits[1] > hits[0]);
  ASSERT_TRUE(loaded[3] > loaded[2]); /* new weights were loaded */
  problem_free(&pr);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* A transpose large enough to be tiled, streamed both ways through a daemon with a small op
 * budget: many ops over several tile rows, the result equal to the transpose reference. */
static void test_transpose_streamed_tiled(void) {
  test_daemon d;
  const char *extra[] = {"--device-memory", "256K", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char err[512];
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.transposed = 1;
  p.n = 2, p.c_in = p.c_per_group = 16, p.h = 96, p.w = 80, p.c_out = 12, p.kh = p.kw = 4;
  p.stride_h = p.stride_w = 2, p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  p.has_bias = 1;
  rng r = {0x5eed00f3};
  problem pr;
  ASSERT_TRUE(problem_init(&pr, &p, &r) == 0);
  float *ref = malloc(pr.c.output_bytes);
  ASSERT_OK(convd_ref_conv_transpose2d(&pr.c, pr.x, pr.w, pr.b, ref, NULL), "reference");
  for (size_t i = 0; i < pr.c.output_elems; i++) pr.want[i] = ref[i];
  free(ref);
  convd_client_opts o = {.chunk_bytes = 50000, .timeout_seconds = 120};
  convd_client *cl;
  ASSERT_OK(convd_client_create(d.target, &o, &cl, err, sizeof err), err);
  convd_client_stats st;
  int rc = client_conv(cl, 0, &p, pr.x, pr.w, pr.b, pr.y, &st, err, sizeof err);
  convd_client_destroy(cl);
  if (rc) FAIL_AT("%s", err);
  else if (check_close("streamed tiled transpose", pr.y, pr.want, pr.c.output_elems)) FAIL_AT("differs");
  printf("  %" PRIu64 " elemental ops, output %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 "\n",
         st.elemental_ops, st.output_shape[0], st.output_shape[1], st.output_shape[2], st.output_shape[3]);
  ASSERT_TRUE(st.elemental_ops >= 32);
  problem_free(&pr);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* Several clients at once, each on its own thread and connection. */
typedef struct worker {
  const char *target;
  uint64_t seed;
  int calls, failures;
  uint64_t ops;
  char err[1024];
} worker;

static void *worker_main(void *arg) {
  worker *wk = arg;
  rng r = {wk->seed};
  convd_client *cl;
  convd_client_opts o = {.chunk_bytes = 4096, .timeout_seconds = 120};
  if (convd_client_create(wk->target, &o, &cl, wk->err, sizeof wk->err)) {
    wk->failures++;
    return NULL;
  }
  for (int i = 0; i < 6; i++) {
    convd_conv_params p = random_params(&r);
    problem pr;
    if (problem_init(&pr, &p, &r)) {
      wk->failures++;
      continue;
    }
    problem_reference(&pr);
    convd_client_stats st;
    int rc = client_conv(cl, i % 2, &p, pr.x, pr.w, pr.b, pr.y, &st, wk->err, sizeof wk->err);
    if (rc || check_close("concurrent call", pr.y, pr.want, pr.c.output_elems)) wk->failures++;
    wk->calls++;
    wk->ops += st.ops_run;
    problem_free(&pr);
  }
  convd_client_destroy(cl);
  return NULL;
}

static void test_concurrent_clients(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  enum { N = 4 };
  worker wk[N];
  pthread_t t[N];
  for (int i = 0; i < N; i++) {
    wk[i] = (worker){.target = d.target, .seed = 0x5eed0c00 + (uint64_t)i};
    pthread_create(&t[i], NULL, worker_main, &wk[i]);
  }
  int calls = 0;
  uint64_t call_ops = 0;
  for (int i = 0; i < N; i++) {
    pthread_join(t[i], NULL);
    if (wk[i].failures) FAIL_AT("worker %d: %d failures, last error: %s", i, wk[i].failures, wk[i].err);
    calls += wk[i].calls;
    call_ops += wk[i].ops;
  }
  /* The devices' completed ops are exactly the ops the calls' summaries report. */
  convd_client *cl;
  char err[512];
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  convd_client_device *devs;
  size_t n;
  ASSERT_OK(convd_client_list_devices(cl, &devs, &n, err, sizeof err), err);
  convd_client_destroy(cl);
  ASSERT_TRUE(n >= 1);
  uint64_t ops = 0;
  for (size_t i = 0; i < n; i++) ops += devs[i].completed_ops;
  ASSERT_TRUE(devs[0].healthy && devs[0].memory_bytes > 0 && devs[0].name[0]);
  free(devs);
  ASSERT_EQ_INT(ops, call_ops);
  ASSERT_TRUE(ops >= (uint64_t)calls);
  ASSERT_EQ_INT(calls, N * 6);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* convctl reports the server's message and exits non-zero; `devices` lists the device. */
static void test_convctl_errors_and_devices(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  char x[256], w[256], y[256], err[512], msg[4096];
  snprintf(x, sizeof x, "/tmp/convd-e2e-%d-x.npy", (int)getpid());
  snprintf(w, sizeof w, "/tmp/convd-e2e-%d-w.npy", (int)getpid());
  snprintf(y, sizeof y, "/tmp/convd-e2e-%d-y.npy", (int)getpid());
  float zeros[2 * 4 * 7 * 7] = {0}; /* the larger of the two tensors */
  const int64_t xs[4] = {1, 4, 4, 4}, ws[4] = {2, 4, 7, 7};
  ASSERT_OK(convd_npy_write_f32(x, xs, 4, zeros, err, sizeof err), err);
  ASSERT_OK(convd_npy_write_f32(w, ws, 4, zeros, err, sizeof err), err);
  /* Padding 1 makes the input 6x6, smaller than the 7x7 kernel. The client checks shapes
   * first; --groups 3 would be caught there too, so this message is the local check's. */
  char *argv[] = {CONVCTL_BIN, "conv", "--server", d.target, "--input", x, "--weight", w,
                  "--padding", "1", "--output", y, NULL};
  int rc = test_run(argv, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 60);
  test_read_file("/tmp/convd-e2e-convctl.err", msg, sizeof msg);
  ASSERT_EQ_INT(rc, 1 + 1); /* 2: rejected before sending */
  ASSERT_CONTAINS(msg, "kernel 7x7 is larger than padded input 6x6");
  /* unreachable server: exit 1 with gRPC's reason */
  char *argv2[] = {CONVCTL_BIN, "devices", "--server", "127.0.0.1:1", "--timeout", "5", NULL};
  rc = test_run(argv2, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 60);
  test_read_file("/tmp/convd-e2e-convctl.err", msg, sizeof msg);
  ASSERT_EQ_INT(rc, 1);
  ASSERT_CONTAINS(msg, "UNAVAILABLE");
  char *argv3[] = {CONVCTL_BIN, "devices", "--server", d.target, NULL};
  rc = test_run(argv3, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 60);
  test_read_file("/tmp/convd-e2e-convctl.out", msg, sizeof msg);
  ASSERT_EQ_INT(rc, 0);
  ASSERT_CONTAINS(msg, "cpu0");
  ASSERT_CONTAINS(msg, "healthy");
  /* the container health check: exit 0 and SERVING; an unknown service: exit 1, NOT_FOUND */
  char *argv5[] = {CONVCTL_BIN, "health", "--server", d.target, NULL};
  rc = test_run(argv5, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 60);
  test_read_file("/tmp/convd-e2e-convctl.out", msg, sizeof msg);
  ASSERT_EQ_INT(rc, 0);
  ASSERT_CONTAINS(msg, "SERVING");
  char *argv6[] = {CONVCTL_BIN, "health", "--server", d.target, "--service", "x.Y", NULL};
  rc = test_run(argv6, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 60);
  test_read_file("/tmp/convd-e2e-convctl.err", msg, sizeof msg);
  ASSERT_EQ_INT(rc, 1);
  ASSERT_CONTAINS(msg, "NOT_FOUND");
  /* The file-to-file path checks both files before it sends anything, and a failed call leaves
   * an existing output as it was: an output nobody can create, then a truncated input. */
  const int64_t w3s[4] = {2, 4, 3, 3};
  ASSERT_OK(convd_npy_write_f32(w, w3s, 4, zeros, err, sizeof err), err);
  char nodir[300];
  snprintf(nodir, sizeof nodir, "/tmp/convd-e2e-%d-no-such-dir/y.npy", (int)getpid());
  char *argv7[] = {CONVCTL_BIN, "conv", "--server", d.target, "--input", x, "--weight", w,
                   "--output", nodir, NULL};
  rc = test_run(argv7, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 60);
  test_read_file("/tmp/convd-e2e-convctl.err", msg, sizeof msg);
  ASSERT_EQ_INT(rc, 1);
  ASSERT_CONTAINS(msg, "No such file or directory");
  const int64_t ys[4] = {1, 2, 2, 2};
  const float marker[8] = {7, 7, 7, 7, 7, 7, 7, 7};
  ASSERT_OK(convd_npy_write_f32(y, ys, 4, marker, err, sizeof err), err);
  ASSERT_TRUE(truncate(x, 128 + 60) == 0); /* the header promises 256 bytes of data */
  char *argv8[] = {CONVCTL_BIN, "conv", "--server", d.target, "--input", x, "--weight", w,
                   "--output", y, NULL};
  rc = test_run(argv8, "/tmp/convd-e2e-convctl.out", "/tmp/convd-e2e-convctl.err", 60);
  test_read_file("/tmp/convd-e2e-convctl.err", msg, sizeof msg);
  ASSERT_TRUE(rc != 0);
  ASSERT_CONTAINS(msg, "shorter than its .npy header says");
  convd_npy kept;
  ASSERT_OK(convd_npy_read(y, &kept, err, sizeof err), err);
  ASSERT_TRUE(kept.count == 8 && memcmp(kept.data, marker, sizeof marker) == 0);
  convd_npy_free(&kept);
  unlink(x), unlink(w), unlink(y);
  /* A second daemon on the same port fails to start and says why (no silent port sharing). */
  char *argv4[] = {CONVD_BIN, "--listen", d.target, NULL};
  rc = test_run(argv4, "/tmp/convd-e2e-second.out", "/tmp/convd-e2e-second.err", 30);
  test_read_file("/tmp/convd-e2e-second.err", msg, sizeof msg);
  ASSERT_EQ_INT(rc, 1);
  ASSERT_CONTAINS(msg, "in use");
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* SIGTERM while a call runs: the call still completes correctly and the daemon exits 0. */
typedef struct long_call {
  const char *target;
  problem pr;
  convd_client_stats st;
  int rc;
  char err[1024];
} long_call;

static void *long_call_main(void *arg) {
  long_call *lc = arg;
  convd_client *cl;
  convd_client_opts o = {.timeout_seconds = 300};
  lc->rc = convd_client_create(lc->target, &o, &cl, lc->err, sizeof lc->err);
  if (lc->rc) return NULL;
  lc->rc = client_conv(cl, 0, &lc->pr.p, lc->pr.x, lc->pr.w, lc->pr.b, lc->pr.y, &lc->st, lc->err,
                       sizeof lc->err);
  convd_client_destroy(cl);
  return NULL;
}

/* The drain tests need calls that run a while: their daemons use the (slow) reference kernel. */
static void test_sigterm_drains_calls(void) {
  test_daemon d;
  const char *slow[] = {"--cpu-kernel", "reference", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, slow) == 0);
  rng r = {0x5eed0d00};
  convd_conv_params p;
  convd_conv_params_default(&p);
  /* ~0.6 G multiply-adds: most of a second on the reference, far longer than the signal's delay */
  p.n = 1, p.c_in = 64, p.h = 128, p.w = 128, p.c_out = 64, p.c_per_group = 64, p.kh = 3, p.kw = 3;
  long_call lc = {.target = d.target};
  ASSERT_TRUE(problem_init(&lc.pr, &p, &r) == 0);
  problem_reference(&lc.pr);
  pthread_t t;
  pthread_create(&t, NULL, long_call_main, &lc);
  usleep(100 * 1000);
  double t_signal = 0.1;
  kill(d.pid, SIGTERM);
  /* While it drains, a new call is refused at once. */
  usleep(30 * 1000);
  convd_client *cl;
  char err[512];
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  convd_client_device *devs = NULL;
  size_t n;
  int rc = convd_client_list_devices(cl, &devs, &n, err, sizeof err);
  convd_client_destroy(cl);
  free(devs);
  pthread_join(t, NULL);
  ASSERT_EQ_INT(rc, CONVD_CLIENT_EUNAVAIL);
  ASSERT_CONTAINS(err, "shutting down");
  ASSERT_OK(lc.rc, lc.err);
  /* The server's own clock says the call was still running when the signal arrived. */
  printf("  call lasted %.2f s on the server; SIGTERM came %.2f s after it began at most\n",
         lc.st.elapsed_seconds, t_signal);
  ASSERT_TRUE(lc.st.elapsed_seconds > 2 * t_signal);
  ASSERT_TRUE(check_close("call across SIGTERM", lc.pr.y, lc.pr.want, lc.pr.c.output_elems) == 0);
  ASSERT_TRUE(test_daemon_wait(&d, 60) == 0); /* it exits by itself, with status 0 */
  problem_free(&lc.pr);
}

/* A call that outlives --drain-timeout is cancelled with UNAVAILABLE; the daemon exits 0. */
static void test_drain_timeout_cancels(void) {
  test_daemon d;
  const char *extra[] = {"--drain-timeout", "0.3", "--cpu-kernel", "reference", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  rng r = {0x5eed0d01};
  convd_conv_params p;
  convd_conv_params_default(&p);
  /* ~10 G multiply-adds: a dozen seconds or more on the reference */
  p.n = 1, p.c_in = 128, p.h = 256, p.w = 256, p.c_out = 128, p.c_per_group = 128, p.kh = 3, p.kw = 3;
  long_call lc = {.target = d.target};
  ASSERT_TRUE(problem_init(&lc.pr, &p, &r) == 0);
  pthread_t t;
  pthread_create(&t, NULL, long_call_main, &lc);
  usleep(500 * 1000);
  kill(d.pid, SIGTERM);
  pthread_join(t, NULL);
  ASSERT_EQ_INT(lc.rc, CONVD_CLIENT_EUNAVAIL);
  ASSERT_CONTAINS(lc.err, "drain timeout");
  /* The cancelled job stops within one output plane: the daemon exits long before the job
   * could have finished (tens of seconds here, minutes under sanitizers). */
  ASSERT_TRUE(test_daemon_wait(&d, 20) == 0);
  problem_free(&lc.pr);
}

/* A multi-tile job streams: the first output band reaches the client long before the last tile
 * has run. The daemon runs the reference kernel so that compute, not loopback, sets the pace:
 * the job's 64 ops take most of the call, and the first tile row is a few of them. (Comparing
 * with the end of the client's upload, as this test once did, measured gRPC's buffering: a
 * 64 MiB upload could be all sent 30 ms before the first band of a fast job.) */
static void test_first_band_before_job_ends(void) {
  test_daemon d;
  const char *extra[] = {"--device-memory", "2M", "--cpu-kernel", "reference", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  rng r = {0x5eed0e00};
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 8, p.h = 1024, p.w = 512, p.c_out = 8, p.c_per_group = 8, p.kh = 3, p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  problem pr;
  ASSERT_TRUE(problem_init(&pr, &p, &r) == 0);
  pthread_t t;
  pthread_create(&t, NULL, reference_thread, &pr);
  convd_client *cl;
  char err[512];
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  convd_client_stats st;
  int rc = client_conv(cl, 0, &p, pr.x, pr.w, pr.b, pr.y, &st, err, sizeof err);
  pthread_join(t, NULL);
  convd_client_destroy(cl);
  ASSERT_OK(rc, err);
  ASSERT_TRUE(check_close("streamed multi-tile job", pr.y, pr.want, pr.c.output_elems) == 0);
  printf("  %" PRIu64 " ops; first output band at %.3f s, upload done at %.3f s, call done at %.3f s\n",
         st.elemental_ops, st.first_output_seconds, st.upload_seconds, st.total_seconds);
  ASSERT_TRUE(st.elemental_ops > 1);
  ASSERT_TRUE(st.first_output_seconds > 0);
  /* The first tile row is 4 of the 64 ops: its band comes in the first half of the call. */
  ASSERT_TRUE(st.first_output_seconds < 0.5 * st.total_seconds);
  problem_free(&pr);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

static long daemon_peak_rss_kib(pid_t pid) {
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  if (test_read_file(path, buf, sizeof buf) <= 0) return -1;
  const char *h = strstr(buf, "VmHWM:");
  return h ? strtol(h + 6, NULL, 10) : -1;
}

/* 1x8x8192x4096 float32: 1 GiB in and 1 GiB out through a daemon that must stay small. */
static void test_bounded_memory_1gib(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 8, p.h = 8192, p.w = 4096, p.c_out = 8, p.c_per_group = 8, p.kh = 3, p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  p.has_bias = 1;
  convd_conv c;
  char err[512];
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  ASSERT_EQ_INT(c.input_bytes, 1u << 30);
  rng r = {0x5eed0e01};
  float *x = malloc(c.input_bytes), *y = malloc(c.output_bytes), w[8 * 8 * 9], b[8];
  ASSERT_TRUE(x && y);
  rng_fill(&r, x, c.input_elems);
  rng_fill(&r, w, 8 * 8 * 9);
  rng_fill(&r, b, 8);
  poison(y, c.output_elems);
  long before = daemon_peak_rss_kib(d.pid);
  convd_client *cl;
  convd_client_opts o = {.timeout_seconds = 900};
  ASSERT_OK(convd_client_create(d.target, &o, &cl, err, sizeof err), err);
  convd_client_stats st;
  int rc = client_conv(cl, 0, &p, x, w, b, y, &st, err, sizeof err);
  convd_client_destroy(cl);
  long peak = daemon_peak_rss_kib(d.pid);
  ASSERT_OK(rc, err);
  printf("  %" PRIu64 " ops, %.2f s; daemon peak RSS %ld MiB (%ld MiB before the call)\n",
         st.elemental_ops, st.total_seconds, peak / 1024, before / 1024);
  /* Check the output in strips of 256 rows, each against the reference on its input rows. */
  const int64_t S = 256, W = p.w, H = p.h;
  for (int64_t o0 = 0; o0 < H && !test_failed; o0 += S) {
    int64_t o1 = o0 + S < H ? o0 + S : H, i0 = o0 > 0 ? o0 - 1 : 0, i1 = o1 < H ? o1 + 1 : H;
    convd_conv_params q = p;
    q.h = i1 - i0, q.pad_top = o0 == 0, q.pad_bottom = o1 == H;
    convd_conv cs;
    ASSERT_OK(convd_conv_init(&cs, &q, err, sizeof err), err);
    float *xs = malloc(cs.input_bytes), *ys = malloc(cs.output_bytes);
    double *want = malloc(cs.output_elems * sizeof(double));
    float *got = malloc(cs.output_bytes);
    for (int64_t ch = 0; ch < 8; ch++) {
      memcpy(xs + (size_t)(ch * (i1 - i0) * W), x + (size_t)((ch * H + i0) * W), (size_t)((i1 - i0) * W) * 4);
      memcpy(got + (size_t)(ch * (o1 - o0) * W), y + (size_t)((ch * H + o0) * W), (size_t)((o1 - o0) * W) * 4);
    }
    convd_ref_conv2d(&cs, xs, w, b, ys, NULL);
    for (size_t i = 0; i < cs.output_elems; i++) want[i] = ys[i];
    if (check_close("strip", got, want, cs.output_elems)) FAIL_AT("rows [%" PRId64 ", %" PRId64 ")", o0, o1);
    free(xs), free(ys), free(want), free(got);
  }
  free(x);
  free(y);
#ifdef CONVD_SANITIZE_BUILD
  printf("  (the RSS bound is not checked under AddressSanitizer: its quarantine keeps freed memory)\n");
#else
  ASSERT_TRUE(peak > 0 && peak < 300 * 1024);
#endif
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"golden_convctl", test_golden_convctl},
      {"golden_library_small_chunks", test_golden_library_small_chunks},
      {"random_shapes", test_random_shapes},
      {"half_dtypes", test_half_dtypes},
      {"weights_reused_across_calls", test_weights_reused_across_calls},
      {"transpose_streamed_tiled", test_transpose_streamed_tiled},
      {"concurrent_clients", test_concurrent_clients},
      {"convctl_errors_and_devices", test_convctl_errors_and_devices},
      {"sigterm_drains_calls", test_sigterm_drains_calls},
      {"drain_timeout_cancels", test_drain_timeout_cancels},
      {"chunking_64mib", test_chunking_64mib},
      {"first_band_before_job_ends", test_first_band_before_job_ends},
      {"bounded_memory_1gib", test_bounded_memory_1gib},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
