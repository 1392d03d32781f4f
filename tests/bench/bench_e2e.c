/* bench_e2e: what a convolution costs through the daemon, against the same engine in-process,
 * printed as tables (a benchmark, not a test).
 *
 *   bench_e2e [--server HOST:PORT] [--repeats N] [--calls N] [--only PART] [--shape K]
 *             [--no-torch] [--no-python]
 *
 * Without --server it starts the daemon it was built with on 127.0.0.1 (port 0), with its
 * defaults. One client is kept for the whole run. PART: shapes, latency, concurrency.
 *   shapes       per shape: the in-process engine (same build, one CPU device on every thread, the
 *                daemon's default op budget), the streaming call through the library (client),
 *                the server's elapsed and compute seconds as it reports them, wire GB/s (input,
 *                weights, bias and output bytes over the client time), client/engine; PyTorch's
 *                CPU conv2d and the Python client (grpcio, tests/interop's harness) in the same run
 *                when they are there.
 *   latency      Conv2dUnary and streaming Conv2d on 1x1x8x8 / 1x1x3x3, p50 and p99 over --calls.
 *   concurrency  1, 2 and 4 clients (one thread each) on 1x256x56x56: aggregate calls per second.
 *   samehost     the tiled 3x3 and the wire-bound job through loopback TCP, the Unix socket, and
 *                the Unix socket with input and output in a shared-memory region (the client's
 *                tensors live there: filled once before timing, the output read in place),
 *                against the in-process engine in the same run; needs the daemon started here
 *                (it listens on a Unix socket too) or --unix PATH beside --server.
 * --shape K runs only the K-th shape (from 0), e.g. under a profiler. Medians of --repeats runs
 * (default 3) after a warm-up; shapes whose calls are short get about a second's worth of runs. Exits 1 when a call fails. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"
#include "client_params.h"
#include "clock.h"
#include "daemon.h"
#include "engine.h"

typedef struct shape {
  const char *name;
  int64_t n, c, h, w, o, kh, kw, s, p, groups;
} shape;

/* bench_conv's six, the two large tiled jobs and one that is all wire. */
static const shape shapes[] = {
    {"1x64x224x224 / 64x64x3x3 p1", 1, 64, 224, 224, 64, 3, 3, 1, 1, 1},
    {"1x256x56x56 / 256x256x3x3 p1", 1, 256, 56, 56, 256, 3, 3, 1, 1, 1},
    {"1x128x32x32 / 64x128x3x3 p0", 1, 128, 32, 32, 64, 3, 3, 1, 0, 1},
    {"1x512x28x28 / 512x512x1x1", 1, 512, 28, 28, 512, 1, 1, 1, 0, 1},
    {"1x3x1024x1024 / 64x3x7x7 s2 p3", 1, 3, 1024, 1024, 64, 7, 7, 2, 3, 1},
    {"1x32x112x112 depthwise 3x3 p1", 1, 32, 112, 112, 32, 3, 3, 1, 1, 32},
    {"1x64x1024x1024 / 64x64x3x3 p1 (tiled)", 1, 64, 1024, 1024, 64, 3, 3, 1, 1, 1},
    {"1x256x512x512 / 256x256x3x3 p1 (tiled)", 1, 256, 512, 512, 256, 3, 3, 1, 1, 1},
    {"1x64x1024x1024 depthwise 1x1 (wire-bound)", 1, 64, 1024, 1024, 64, 1, 1, 1, 0, 64},
};
#define NSHAPES (sizeof shapes / sizeof shapes[0])
#define NSMALL 6 /* bench_conv's shapes: the first six */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The q-quantile of v (sorted in place). */
static double quantile(double *v, int n, double q) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  int i = (int)(q * (n - 1) + 0.5);
  return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

static void fill(float *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    p[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
  }
}

static void die(const char *what, const char *err) {
  fprintf(stderr, "bench_e2e: %s: %s\n", what, err);
  exit(1);
}

static convd_client_conv_params params_of(const shape *s) {
  convd_client_conv_params p;
  convd_client_conv_params_default(&p);
  p.n = s->n, p.c_in = s->c, p.h = s->h, p.w = s->w;
  p.c_out = s->o, p.c_per_group = s->c / s->groups, p.kh = s->kh, p.kw = s->kw;
  p.stride_h = p.stride_w = s->s;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = s->p;
  p.groups = s->groups;
  p.has_bias = 1;
  return p;
}

typedef struct tensors {
  convd_conv conv;
  float *x, *w, *b, *y;
} tensors;

static void tensors_make(tensors *t, const convd_client_conv_params *cp) {
  char err[256];
  convd_conv_params p;
  convd_client_params_to_conv(cp, &p);
  if (convd_conv_init(&t->conv, &p, err, sizeof err)) die("shape", err);
  t->x = malloc(t->conv.input_bytes);
  t->w = malloc(t->conv.weight_bytes);
  t->b = malloc(t->conv.bias_bytes);
  t->y = malloc(t->conv.output_bytes);
  if (!t->x || !t->w || !t->b || !t->y) die("memory", "out of memory");
  fill(t->x, t->conv.input_elems, 1);
  fill(t->w, t->conv.weight_elems, 2);
  fill(t->b, t->conv.bias_elems, 3);
}

static void tensors_free(tensors *t) { free(t->x), free(t->w), free(t->b), free(t->y); }

/* ---- peers run as subprocesses: one line of seconds per shape ------------------------------ */

/* Runs cmd and reads up to n numbers (0 where a line is missing). */
static void read_seconds(const char *cmd, double *out, size_t n) {
  memset(out, 0, n * sizeof *out);
  FILE *p = popen(cmd, "r");
  if (p == NULL) return;
  for (size_t i = 0; i < n; i++)
    if (fscanf(p, "%lf", &out[i]) != 1) out[i] = 0;
  if (pclose(p) != 0) memset(out, 0, n * sizeof *out);
}

static void shape_args(char *buf, size_t len) {
  size_t at = 0;
  for (size_t i = 0; i < NSHAPES && at < len; i++) {
    const shape *s = &shapes[i];
    at += (size_t)snprintf(buf + at, len - at, " %lld,%lld,%lld,%lld:%lld,%lld,%lld,%lld:%lld,%lld:%lld,%lld:%lld",
                           (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w,
                           (long long)s->o, (long long)(s->c / s->groups), (long long)s->kh,
                           (long long)s->kw, (long long)s->s, (long long)s->s, (long long)s->p,
                           (long long)s->p, (long long)s->groups);
  }
}

/* ---- shapes ---------------------------------------------------------------------------- */

static int only_shape = -1;

#define MAX_SMALL_RUNS 50

static void bench_shapes(const char *target, int repeats, int use_torch, int use_python) {
  char err[512];
  const int threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
  convd_engine *e;
  convd_engine_opts eo = {0};
  if (convd_engine_create(&eo, &e, err, sizeof err)) die("engine", err);
  convd_client *cl;
  convd_client_opts co = {.timeout_seconds = 600};
  if (convd_client_create(target, &co, &cl, err, sizeof err)) die("client", err);

  double torch_s[NSHAPES] = {0}, py_s[NSHAPES] = {0};
  char args[4096], cmd[8192];
  shape_args(args, sizeof args);
  if (use_torch && access("/usr/bin/python3", X_OK) == 0) {
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s/torch_conv.py %d %d%s 2>/dev/null", BENCH_DIR,
             threads, repeats, args);
    read_seconds(cmd, torch_s, NSHAPES);
  }
  if (use_python && access(PY_STUBS "/convd/v1/convd_pb2.py", R_OK) == 0) {
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s/py_client.py %s %s %s %d%s 2>/dev/null",
             BENCH_DIR, target, PY_STUBS, INTEROP_DIR, repeats, args);
    read_seconds(cmd, py_s, NSHAPES);
  }

  printf("## Through the daemon vs in-process (%d threads, median of %d runs or, for calls under "
         "1/%d s, of about a second's worth, at most %d)\n\n",
         threads, repeats, repeats, MAX_SMALL_RUNS);
  printf("| call | in+out MB | engine ms | client ms | server elapsed ms | server compute ms | "
         "wire GB/s | client/engine | PyTorch ms | Python client ms |\n");
  printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  double ratios[NSHAPES];
  for (size_t i = 0; i < NSHAPES; i++) {
    const shape *s = &shapes[i];
    ratios[i] = 0;
    if (only_shape >= 0 && (size_t)only_shape != i) continue;
    convd_client_conv_params cp = params_of(s);
    tensors t;
    tensors_make(&t, &cp);
    const double bytes = (double)(t.conv.input_bytes + t.conv.weight_bytes + t.conv.bias_bytes +
                                  t.conv.output_bytes);
    /* Small calls vary by 2-5x from one call to the next on a shared VM: they get more runs
     * (about a second's worth, at most MAX_SMALL_RUNS) so the medians mean something. */
    convd_client_stats st;
    double t0 = convd_now_seconds(); /* warm-up, not counted */
    if (convd_engine_run(e, &t.conv, t.x, t.w, t.b, t.y, NULL, err, sizeof err)) die(s->name, err);
    if (convd_client_conv2d(cl, &cp, t.x, t.w, t.b, t.y, &st, err, sizeof err)) die(s->name, err);
    const double warm = convd_now_seconds() - t0;
    int n = repeats;
    if (warm > 0 && warm * repeats < 1.0) {
      double fit = 1.0 / warm;
      n = fit > MAX_SMALL_RUNS ? MAX_SMALL_RUNS : fit < repeats ? repeats : (int)fit;
    }
    double *te = calloc((size_t)n, sizeof *te), *tc = calloc((size_t)n, sizeof *tc);
    double *se = calloc((size_t)n, sizeof *se), *sc = calloc((size_t)n, sizeof *sc);
    for (int r = 0; r < n; r++) {
      t0 = convd_now_seconds();
      if (convd_engine_run(e, &t.conv, t.x, t.w, t.b, t.y, NULL, err, sizeof err)) die(s->name, err);
      double t1 = convd_now_seconds();
      if (convd_client_conv2d(cl, &cp, t.x, t.w, t.b, t.y, &st, err, sizeof err)) die(s->name, err);
      double t2 = convd_now_seconds();
      te[r] = t1 - t0, tc[r] = t2 - t1, se[r] = st.elapsed_seconds, sc[r] = st.compute_seconds;
    }
    const double me = quantile(te, n, 0.5), mc = quantile(tc, n, 0.5);
    ratios[i] = mc / me;
    printf("| %s | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | ", s->name, bytes / 1e6,
           me * 1e3, mc * 1e3, quantile(se, n, 0.5) * 1e3, quantile(sc, n, 0.5) * 1e3,
           bytes / mc / 1e9, ratios[i]);
    if (torch_s[i] > 0) printf("%.2f | ", torch_s[i] * 1e3);
    else printf("— | ");
    if (py_s[i] > 0) printf("%.2f |\n", py_s[i] * 1e3);
    else printf("— |\n");
    fflush(stdout);
    free(te), free(tc), free(se), free(sc);
    tensors_free(&t);
  }
  if (only_shape < 0)
    printf("\nMedian client/engine over the first %d shapes (bench_conv's): %.2f\n\n", NSMALL,
           quantile(ratios, NSMALL, 0.5));
  convd_client_destroy(cl);
  convd_engine_destroy(e);
}

/* ---- same host -------------------------------------------------------------------------- */

static double median_of(double *v, int n) { return quantile(v, n, 0.5); }

static void bench_samehost(const char *tcp, const char *unix_target, int repeats) {
  char err[512];
  convd_engine *e;
  convd_engine_opts eo = {0};
  if (convd_engine_create(&eo, &e, err, sizeof err)) die("engine", err);
  convd_client *ct, *cu;
  convd_client_opts co = {.timeout_seconds = 600};
  if (convd_client_create(tcp, &co, &ct, err, sizeof err)) die("client (TCP)", err);
  if (convd_client_create(unix_target, &co, &cu, err, sizeof err)) die("client (Unix socket)", err);
  static const size_t picks[] = {6, 8}; /* the tiled 3x3 and the wire-bound job */
  printf("## Same host: TCP, Unix socket, Unix socket + shared memory (median of %d runs)\n\n", repeats);
  printf("| call | in+out MB | engine ms | TCP ms | Unix ms | Unix+shm ms | shm GB/s | TCP/shm | "
         "shm/engine |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  int in_place = 0;
  for (size_t k = 0; k < sizeof picks / sizeof picks[0]; k++) {
    const shape *s = &shapes[picks[k]];
    convd_client_conv_params cp = params_of(s);
    tensors t;
    tensors_make(&t, &cp);
    const size_t in_b = t.conv.input_bytes, out_b = t.conv.output_bytes;
    const size_t out_off = (in_b + 4095) / 4096 * 4096;
    convd_client_region *reg;
    if (convd_client_region_create(cu, out_off + out_b, &reg, err, sizeof err)) die("region", err);
    in_place = convd_client_region_in_place(reg);
    char *base = convd_client_region_data(reg);
    memcpy(base, t.x, in_b); /* the client's input lives in the region */
    const convd_client_shm_refs refs = {.input = {convd_client_region_name(reg), 0},
                                        .output = {convd_client_region_name(reg), out_off}};
    convd_client_stats st;
    double *tv[4];
    for (int m = 0; m < 4; m++) tv[m] = calloc((size_t)repeats, sizeof(double));
    for (int r = -1; r < repeats; r++) { /* r = -1: warm-up (and the region's first touch) */
      double t0 = convd_now_seconds();
      if (convd_engine_run(e, &t.conv, t.x, t.w, t.b, t.y, NULL, err, sizeof err)) die(s->name, err);
      double t1 = convd_now_seconds();
      if (convd_client_conv2d(ct, &cp, t.x, t.w, t.b, t.y, &st, err, sizeof err)) die(s->name, err);
      double t2 = convd_now_seconds();
      if (convd_client_conv2d(cu, &cp, t.x, t.w, t.b, t.y, &st, err, sizeof err)) die(s->name, err);
      double t3 = convd_now_seconds();
      if (convd_client_conv2d_shm(cu, &cp, &refs, NULL, t.w, t.b, NULL, &st, err, sizeof err)) die(s->name, err);
      double t4 = convd_now_seconds();
      if (r >= 0) tv[0][r] = t1 - t0, tv[1][r] = t2 - t1, tv[2][r] = t3 - t2, tv[3][r] = t4 - t3;
    }
    /* The region's output is the streamed call's, element for element. */
    if (memcmp(base + out_off, t.y, out_b) != 0) die(s->name, "the shared-memory output differs from the streamed one");
    double me = median_of(tv[0], repeats), mt = median_of(tv[1], repeats), mu = median_of(tv[2], repeats),
           ms = median_of(tv[3], repeats);
    printf("| %s | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", s->name,
           (double)(in_b + out_b) / 1e6, me * 1e3, mt * 1e3, mu * 1e3, ms * 1e3,
           (double)(in_b + out_b) / ms / 1e9, mt / ms, ms / me);
    fflush(stdout);
    for (int m = 0; m < 4; m++) free(tv[m]);
    if (convd_client_region_destroy(cu, reg, err, sizeof err)) die("region", err);
    tensors_free(&t);
  }
  printf("\nUnix+shm: input and output in %s.\n\n",
         in_place ? "a sealed memfd the daemon uses in place" : "a named object the daemon copies from");
  convd_client_destroy(ct);
  convd_client_destroy(cu);
  convd_engine_destroy(e);
}

/* ---- latency --------------------------------------------------------------------------- */

static void bench_latency(const char *target, int calls) {
  char err[512];
  convd_client *cl;
  convd_client_opts co = {.timeout_seconds = 60};
  if (convd_client_create(target, &co, &cl, err, sizeof err)) die("client", err);
  const shape tiny = {"1x1x8x8 / 1x1x3x3", 1, 1, 8, 8, 1, 3, 3, 1, 0, 1};
  convd_client_conv_params cp = params_of(&tiny);
  tensors t;
  tensors_make(&t, &cp);
  double *v = malloc((size_t)calls * sizeof *v);
  printf("## Small-call latency (%s, %d calls each)\n\n| call | p50 us | p99 us |\n|---|---:|---:|\n",
         tiny.name, calls);
  for (int unary = 1; unary >= 0; unary--) {
    for (int i = -10; i < calls; i++) {
      double t0 = convd_now_seconds();
      int rc = unary ? convd_client_conv2d_unary(cl, &cp, t.x, t.w, t.b, t.y, NULL, err, sizeof err)
                     : convd_client_conv2d(cl, &cp, t.x, t.w, t.b, t.y, NULL, err, sizeof err);
      if (rc) die(tiny.name, err);
      if (i >= 0) v[i] = convd_now_seconds() - t0;
    }
    const double p50 = quantile(v, calls, 0.5), p99 = quantile(v, calls, 0.99);
    printf("| %s | %.1f | %.1f |\n", unary ? "Conv2dUnary" : "Conv2d (streaming)", p50 * 1e6,
           p99 * 1e6);
    fflush(stdout);
  }
  printf("\n");
  free(v);
  tensors_free(&t);
  convd_client_destroy(cl);
}

/* ---- concurrency ----------------------------------------------------------------------- */

typedef struct worker {
  const char *target;
  int calls;
  int failed;
  char err[512];
} worker;

static void *client_main(void *arg) {
  worker *wk = arg;
  const shape s = shapes[1];
  convd_client_conv_params cp = params_of(&s);
  tensors t;
  tensors_make(&t, &cp);
  convd_client *cl;
  convd_client_opts co = {.timeout_seconds = 600};
  if (convd_client_create(wk->target, &co, &cl, wk->err, sizeof wk->err)) {
    wk->failed = 1;
  } else {
    for (int i = 0; i < wk->calls && !wk->failed; i++)
      wk->failed = convd_client_conv2d(cl, &cp, t.x, t.w, t.b, t.y, NULL, wk->err, sizeof wk->err) != 0;
    convd_client_destroy(cl);
  }
  tensors_free(&t);
  return NULL;
}

static void bench_concurrency(const char *target, int calls_per_client) {
  printf("## Concurrent clients (%s, %d calls each)\n\n| clients | calls/s | vs one client |\n"
         "|---:|---:|---:|\n", shapes[1].name, calls_per_client);
  double one = 0;
  for (int n = 1; n <= 4; n *= 2) {
    pthread_t th[4];
    worker wk[4];
    double t0 = convd_now_seconds();
    for (int i = 0; i < n; i++) {
      wk[i] = (worker){.target = target, .calls = calls_per_client};
      pthread_create(&th[i], NULL, client_main, &wk[i]);
    }
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    const double rate = n * calls_per_client / (convd_now_seconds() - t0);
    for (int i = 0; i < n; i++)
      if (wk[i].failed) die("concurrent client", wk[i].err);
    if (n == 1) one = rate;
    printf("| %d | %.1f | %.2f |\n", n, rate, rate / one);
    fflush(stdout);
  }
  printf("\n");
}

int main(int argc, char **argv) {
  const char *server = NULL, *only = NULL, *unix_path = NULL;
  int repeats = 3, calls = 1000, use_torch = 1, use_python = 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--server") == 0 && i + 1 < argc) server = argv[++i];
    else if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
    else if (strcmp(argv[i], "--calls") == 0 && i + 1 < argc) calls = atoi(argv[++i]);
    else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) only = argv[++i];
    else if (strcmp(argv[i], "--shape") == 0 && i + 1 < argc) only_shape = atoi(argv[++i]);
    else if (strcmp(argv[i], "--unix") == 0 && i + 1 < argc) unix_path = argv[++i];
    else if (strcmp(argv[i], "--no-torch") == 0) use_torch = 0;
    else if (strcmp(argv[i], "--no-python") == 0) use_python = 0;
    else {
      fprintf(stderr, "usage: bench_e2e [--server HOST:PORT] [--repeats N] [--calls N] "
                      "[--only shapes|latency|concurrency|samehost] [--unix PATH] [--shape K] [--no-torch] "
                      "[--no-python]\n");
      return 2;
    }
  }
  if (repeats < 1 || calls < 1) die("usage", "--repeats and --calls must be at least 1");
  if (only_shape >= 0) use_torch = use_python = 0; /* peers run every shape */
  test_daemon d;
  char sock[128], unix_target[160] = "";
  if (server == NULL) {
    snprintf(sock, sizeof sock, "/tmp/convd-bench-%d.sock", (int)getpid());
    char listen_arg[160];
    snprintf(listen_arg, sizeof listen_arg, "unix:%s", sock);
    const char *const extra[] = {"--listen", listen_arg, NULL};
    if (test_daemon_start(&d, CONVD_BIN, extra)) die("daemon", "it did not start");
    server = d.target;
    unix_path = sock;
  }
  if (unix_path) snprintf(unix_target, sizeof unix_target, "unix:%s", unix_path);
  printf("bench_e2e: server %s%s\n\n", server, server == d.target ? " (started here)" : "");
  if (only == NULL || strcmp(only, "shapes") == 0) bench_shapes(server, repeats, use_torch, use_python);
  if (only == NULL || strcmp(only, "latency") == 0) bench_latency(server, calls);
  if (only == NULL || strcmp(only, "concurrency") == 0) bench_concurrency(server, 8);
  if ((only == NULL || strcmp(only, "samehost") == 0) && unix_target[0])
    bench_samehost(server, unix_target, repeats);
  if (server == d.target && test_daemon_stop(&d, 30) != 0) die("daemon", "it did not exit cleanly");
  return 0;
}
