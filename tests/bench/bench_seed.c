/* bench_seed: the seed's own case end to end (a benchmark, not a test).
 *
 *   bench_seed [--size H] [--channels C] [--no-torch] [--no-daemon] [--no-default]
 *
 * 1xCxHxH input, C -> C 3x3 stride 1 pad 1, float32: by default 1x1024x1024x1024 with 1024
 * output channels (19.8 TFLOP, 4 GiB in and 4 GiB out). Rows of the table, in this order, each
 * run once (a run is a minute or more here):
 *   - the engine in-process on the 4096-op plan (a 40 MiB device budget: 8 x 8 tiles of 128x128
 *     times 64 channel blocks, as `convctl plan --device-memory 40M` prints);
 *   - the engine in-process on its default plan;
 *   - the daemon (started here, `--device-memory 40M`), the tensors streamed through
 *     libconvd_client over loopback TCP, with the daemon's and this process's peak RSS; and the
 *     engine in-process on the daemon's plan (a streamed call's cuts: ops of half its 64 MiB
 *     window, tile rows of four windows), to compare like with like;
 *   - PyTorch's conv2d monolithic on the same machine (tests/bench/torch_seed.py, run after
 *     this process freed its tensors, under an address-space limit so that a shape it cannot
 *     hold fails instead of pushing the machine into swap).
 * Every output is checked at 4096 points against a float64 sum computed here directly from x
 * and w (another way than any kernel), relative to the sum of the terms' magnitudes; the table
 * ends with the ratios the issue asks for. Exits 1 on a failed run or a wrong answer. */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "client.h"
#include "client_params.h"
#include "clock.h"
#include "daemon.h"
#include "engine.h"

#define SAMPLES 4096
#define PLAN_4096_MEMORY ((uint64_t)40 << 20)

static void die(const char *what, const char *err) {
  fprintf(stderr, "bench_seed: %s: %s\n", what, err);
  exit(1);
}

/* Deterministic values in [-0.5, 0.5), cheap enough for 4 GiB. */
static void fill(float *p, size_t n, uint32_t seed) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    p[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
  }
}

typedef struct point {
  int64_t co, h, w;
  double want, mag; /* the float64 sum, and the sum of its terms' magnitudes */
} point;

/* Output element (0, co, h, w) as a float64 sum over the 3x3 window of every input channel. */
static void reference_points(const convd_conv_params *p, const float *x, const float *wt, point *pts, int n,
                             uint32_t seed) {
  for (int i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    pts[i].co = (int64_t)(seed >> 8) % p->c_out;
    seed = seed * 1664525u + 1013904223u;
    pts[i].h = (int64_t)(seed >> 8) % p->h;
    seed = seed * 1664525u + 1013904223u;
    pts[i].w = (int64_t)(seed >> 8) % p->w;
    /* The border rows and columns (padding) are where tiling goes wrong: a quarter there. */
    if (i % 4 == 1) pts[i].h = i % 8 == 1 ? 0 : p->h - 1;
    if (i % 4 == 2) pts[i].w = i % 8 == 2 ? 0 : p->w - 1;
    double s = 0, m = 0;
    for (int64_t ci = 0; ci < p->c_in; ci++)
      for (int64_t a = 0; a < 3; a++)
        for (int64_t b = 0; b < 3; b++) {
          const int64_t hh = pts[i].h + a - 1, ww = pts[i].w + b - 1;
          if (hh < 0 || hh >= p->h || ww < 0 || ww >= p->w) continue;
          const double t = (double)x[(ci * p->h + hh) * p->w + ww] * (double)wt[((pts[i].co * p->c_in + ci) * 3 + a) * 3 + b];
          s += t, m += fabs(t);
        }
    pts[i].want = s, pts[i].mag = m;
  }
}

/* The worst error at the points relative to the terms' magnitude; dies over 1e-5 (float32
 * accumulation of C*9 terms in any order stays far below it). */
static double check_points(const char *what, const convd_conv_params *p, const float *y, const point *pts, int n) {
  double worst = 0;
  for (int i = 0; i < n; i++) {
    const double got = y[(pts[i].co * p->h + pts[i].h) * p->w + pts[i].w];
    const double e = fabs(got - pts[i].want) / (pts[i].mag > 0 ? pts[i].mag : 1);
    if (!(e <= 1e-5)) {
      char msg[256];
      snprintf(msg, sizeof msg, "output (0, %lld, %lld, %lld) = %.9g, expected %.9g", (long long)pts[i].co,
               (long long)pts[i].h, (long long)pts[i].w, got, pts[i].want);
      die(what, msg);
    }
    if (e > worst) worst = e;
  }
  return worst;
}

static void poison(float *y, size_t n) {
  for (size_t i = 0; i < n; i++) y[i] = NAN;
}

/* One engine run: seconds, and its ops. */
static double engine_once(uint64_t device_memory, uint64_t op_memory, uint64_t row_bytes, const convd_conv *cv,
                          const float *x, const float *w, float *y, uint64_t *ops) {
  char err[512];
  convd_engine_opts eo = {.device_memory = device_memory, .op_memory = op_memory, .row_bytes = row_bytes};
  convd_engine *e;
  if (convd_engine_create(&eo, &e, err, sizeof err)) die("engine", err);
  convd_job_stats st;
  const double t0 = convd_now_seconds();
  if (convd_engine_run(e, cv, x, w, NULL, y, &st, err, sizeof err)) die("engine run", err);
  const double t = convd_now_seconds() - t0;
  *ops = st.ops_run;
  convd_engine_destroy(e);
  return t;
}

static long vm_hwm_kib(pid_t pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  FILE *f = fopen(path, "r");
  long kib = -1;
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "VmHWM:", 6) == 0) kib = atol(line + 6);
  if (f) fclose(f);
  return kib;
}

int main(int argc, char **argv) {
  int64_t size = 1024, chans = 1024;
  int torch = 1, daemon = 1, deflt = 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--size") == 0 && i + 1 < argc) size = atoll(argv[++i]);
    else if (strcmp(argv[i], "--channels") == 0 && i + 1 < argc) chans = atoll(argv[++i]);
    else if (strcmp(argv[i], "--no-torch") == 0) torch = 0;
    else if (strcmp(argv[i], "--no-daemon") == 0) daemon = 0;
    else if (strcmp(argv[i], "--no-default") == 0) deflt = 0;
    else {
      fprintf(stderr, "usage: bench_seed [--size H] [--channels C] [--no-torch] [--no-daemon] [--no-default]\n");
      return 2;
    }
  }
  if (size < 8 || chans < 1) die("usage", "--size at least 8, --channels at least 1");
  convd_client_conv_params cp;
  convd_client_conv_params_default(&cp);
  cp.n = 1, cp.c_in = chans, cp.h = size, cp.w = size;
  cp.c_out = chans, cp.c_per_group = chans, cp.kh = 3, cp.kw = 3;
  cp.pad_top = cp.pad_bottom = cp.pad_left = cp.pad_right = 1;
  convd_conv_params p;
  convd_client_params_to_conv(&cp, &p);
  convd_conv cv;
  char err[512];
  if (convd_conv_init(&cv, &p, err, sizeof err)) die("shape", err);
  const double flop = 2.0 * (double)cv.output_elems * (double)chans * 9;
  printf("## The seed case: 1x%lldx%lldx%lld / %lldx%lldx3x3 p1, float32 (%.1f TFLOP, %.2f GiB in, %.2f GiB out)\n\n",
         (long long)chans, (long long)size, (long long)size, (long long)chans, (long long)chans, flop / 1e12,
         (double)cv.input_bytes / (1 << 30), (double)cv.output_bytes / (1 << 30));
  float *x = malloc(cv.input_bytes), *w = malloc(cv.weight_bytes), *y = malloc(cv.output_bytes);
  point *pts = malloc(SAMPLES * sizeof *pts);
  if (!x || !w || !y || !pts) die("memory", "cannot allocate the tensors");
  fill(x, cv.input_elems, 1);
  fill(w, cv.weight_elems, 2);
  for (size_t i = 0; i < cv.weight_elems; i++) w[i] *= 0.1f;
  reference_points(&p, x, w, pts, SAMPLES, 3);

  printf("| run | plan ops | seconds | GFLOP/s | worst error at %d points | peak RSS |\n|---|---:|---:|---:|---:|---|\n",
         SAMPLES);
  uint64_t ops4096 = 0, ops_def = 0, ops_d = 0;
  poison(y, cv.output_elems);
  const double t4096 = engine_once(PLAN_4096_MEMORY, 0, 0, &cv, x, w, y, &ops4096);
  printf("| engine in-process, 40 MiB device budget | %llu | %.2f | %.1f | %.1e | |\n", (unsigned long long)ops4096,
         t4096, flop / t4096 / 1e9, check_points("engine (4096-op plan)", &p, y, pts, SAMPLES));
  fflush(stdout);
  double tdef = 0;
  if (deflt) {
    poison(y, cv.output_elems);
    tdef = engine_once(0, 0, 0, &cv, x, w, y, &ops_def);
    printf("| engine in-process, default plan | %llu | %.2f | %.1f | %.1e | |\n", (unsigned long long)ops_def, tdef,
           flop / tdef / 1e9, check_points("engine (default plan)", &p, y, pts, SAMPLES));
    fflush(stdout);
  }
  double td = 0, t_same = 0;
  uint64_t ops_same = 0;
  if (daemon) {
    test_daemon d;
    const char *extra[] = {"--device-memory", "40M", NULL};
    if (test_daemon_start(&d, CONVD_BIN, extra) != 0) die("daemon", "did not start");
    convd_client *cl;
    convd_client_opts co = {.timeout_seconds = 3600};
    if (convd_client_create(d.target, &co, &cl, err, sizeof err)) die("client", err);
    poison(y, cv.output_elems);
    convd_client_stats st;
    const double t0 = convd_now_seconds();
    if (convd_client_conv2d(cl, &cp, x, w, NULL, y, &st, err, sizeof err)) die("daemon call", err);
    td = convd_now_seconds() - t0;
    ops_d = st.elemental_ops;
    const long hwm = vm_hwm_kib(d.pid);
    convd_client_destroy(cl);
    if (test_daemon_stop(&d, 60) != 0) die("daemon", "did not stop cleanly");
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("| daemon, streamed over loopback TCP (`--device-memory 40M`) | %llu | %.2f | %.1f | %.1e | daemon %.0f MiB, "
           "client %.0f MiB (it holds x and y) |\n",
           (unsigned long long)ops_d, td, flop / td / 1e9, check_points("daemon", &p, y, pts, SAMPLES),
           hwm / 1024.0, ru.ru_maxrss / 1024.0);
    fflush(stdout);
    /* A streamed call's ops are cut to half its window (32 MiB) and its tile rows to four
     * windows (256 MiB, svc_conv.c), which changes the 40 MiB budget's plan (even when the op
     * count comes out the same): the same cuts in-process give the daemon's plan. */
    {
      poison(y, cv.output_elems);
      t_same = engine_once(PLAN_4096_MEMORY, (uint64_t)32 << 20, (uint64_t)256 << 20, &cv, x, w, y, &ops_same);
      printf("| engine in-process, the daemon's plan (40 MiB budget, ops cut to 32 MiB, tile rows to 256 MiB) | %llu | %.2f | %.1f | %.1e | |\n",
             (unsigned long long)ops_same, t_same, flop / t_same / 1e9, check_points("engine (daemon's plan)", &p, y, pts, SAMPLES));
      fflush(stdout);
    }
  }
  free(x), free(w), free(y);
  double tt = 0;
  if (torch && access("/usr/bin/python3", X_OK) == 0) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s/torch_seed.py %lld %lld %ld", BENCH_DIR, (long long)chans,
             (long long)size, sysconf(_SC_NPROCESSORS_ONLN));
    FILE *f = popen(cmd, "r");
    char line[512] = "";
    if (f && fgets(line, sizeof line, f)) line[strcspn(line, "\n")] = '\0';
    if (f) pclose(f);
    if (sscanf(line, "seconds %lf", &tt) == 1)
      printf("| PyTorch conv2d, monolithic | 1 | %.2f | %.1f | | |\n", tt, flop / tt / 1e9);
    else
      printf("| PyTorch conv2d, monolithic | | | | | %s |\n", line[0] ? line : "did not run");
  }
  printf("\n");
  if (daemon && ops_d != ops_same)
    printf("(the daemon's plan has %llu ops, the in-process one %llu: not the same plan)\n",
           (unsigned long long)ops_d, (unsigned long long)ops_same);
  if (daemon) printf("daemon / engine on the same plan (%llu ops): %.3f\n", (unsigned long long)ops_d, td / t_same);
  if (deflt) printf("4096-op plan / default plan: %.3f\n", t4096 / tdef);
  if (tt > 0) printf("engine (4096-op plan) / PyTorch monolithic: %.3f\n", t4096 / tt);
  return 0;
}
