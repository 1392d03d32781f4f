/* bench_conv: convolution throughput per shape, printed as a table (a benchmark, not a test).
 *
 *   bench_conv [--repeats N] [--threads T] [--shape K] [--no-torch] [--no-reference]
 *              [--dtype float32|float16|bfloat16]
 *
 * --shape K runs only the K-th shape (from 0), e.g. under a profiler with many repeats.
 *
 * --dtype float16|bfloat16 prints another table instead: per shape, the CPU tier on float32
 * tensors and on tensors of that type (rounded to it, as a client sends them), both measured in
 * this run, calls interleaved (float32, narrow, float32, ...; medians), their ratio and the largest difference between the two outputs
 * (relative to the float32 output's largest magnitude: what asking for the narrow type costs);
 * it ends with the line `median DTYPE / float32: X` over the dense 3x3 shapes (the depthwise
 * 3x3 runs the same float32 kernel in both and is printed beside them).
 *
 * Columns: GFLOP/s (2 x multiply-adds / median seconds) of the reference kernel (one run),
 * the CPU tier (a whole job through the engine: one CPU device, default op budget), the same job
 * forced into a multi-tile plan, and PyTorch's CPU conv2d measured in the same run with the same
 * thread count (Debian's python3-torch, when installed), with our/PyTorch ratios. The first lines
 * give the machine's fp32 GEMM peak, measured with oneDNN's sgemm, and each shape's fraction of
 * it. A benchmark, not a test: it asserts nothing, and exits 1 (with the reason) when a run fails. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "engine.h"
#include "plan.h"
#include "ref.h"

#ifdef CONVD_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#endif

typedef struct shape {
  const char *name;
  int64_t n, c, h, w, o, kh, kw, sh, sw, ph, pw, groups;
} shape;

static const shape shapes[] = {
    {"1x64x224x224 / 64x64x3x3 p1", 1, 64, 224, 224, 64, 3, 3, 1, 1, 1, 1, 1},
    {"1x256x56x56 / 256x256x3x3 p1", 1, 256, 56, 56, 256, 3, 3, 1, 1, 1, 1, 1},
    {"1x128x32x32 / 64x128x3x3 p0", 1, 128, 32, 32, 64, 3, 3, 1, 1, 0, 0, 1},
    {"1x512x28x28 / 512x512x1x1", 1, 512, 28, 28, 512, 1, 1, 1, 1, 0, 0, 1},
    {"1x3x1024x1024 / 64x3x7x7 s2 p3", 1, 3, 1024, 1024, 64, 7, 7, 2, 2, 3, 3, 1},
    {"1x32x112x112 depthwise 3x3 p1", 1, 32, 112, 112, 32, 3, 3, 1, 1, 1, 1, 32},
};
#define NSHAPES (sizeof shapes / sizeof shapes[0])

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void fill(float *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    p[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
  }
}

/* Median seconds of running conv through an engine. */
static double time_engine(convd_engine *e, const convd_conv *c, const float *x, const float *w,
                          const float *b, float *y, int repeats, uint64_t *ops) {
  char err[256];
  double *t = malloc((size_t)repeats * sizeof *t);
  convd_job_stats st;
  if (convd_engine_run(e, c, x, w, b, y, &st, err, sizeof err)) { /* warm-up */
    fprintf(stderr, "bench_conv: %s\n", err);
    exit(1);
  }
  for (int i = 0; i < repeats; i++) {
    double t0 = now();
    convd_engine_run(e, c, x, w, b, y, &st, err, sizeof err);
    t[i] = now() - t0;
  }
  *ops = st.ops_run;
  double m = median(t, repeats);
  free(t);
  return m;
}

/* Seconds of one run of conv through an engine. */
static double time_once(convd_engine *e, const convd_conv *c, const float *x, const float *w,
                        const float *b, float *y, uint64_t *ops) {
  char err[256];
  convd_job_stats st;
  double t0 = now();
  if (convd_engine_run(e, c, x, w, b, y, &st, err, sizeof err)) {
    fprintf(stderr, "bench_conv: %s\n", err);
    exit(1);
  }
  *ops = st.ops_run;
  return now() - t0;
}

typedef struct gemm_arg {
  int threads;
  double gflops;
} gemm_arg;

static void *gemm_peak_main(void *p) {
  gemm_arg *g = p;
#ifdef CONVD_HAVE_DNNL
  const int threads = g->threads;
  const int64_t M = 2048, N = 2048, K = 2048;
  float *a = malloc(sizeof(float) * (size_t)(M * K)), *bm = malloc(sizeof(float) * (size_t)(K * N)),
        *cm = malloc(sizeof(float) * (size_t)(M * N));
  fill(a, (size_t)(M * K), 1);
  fill(bm, (size_t)(K * N), 2);
  omp_set_num_threads(threads);
  dnnl_sgemm('N', 'N', M, N, K, 1.0f, a, K, bm, N, 0.0f, cm, N); /* warm-up: threads, JIT */
  double best = 0;
  for (int i = 0; i < 10; i++) {
    double t0 = now();
    dnnl_sgemm('N', 'N', M, N, K, 1.0f, a, K, bm, N, 0.0f, cm, N);
    double g = 2.0 * (double)M * (double)N * (double)K / (now() - t0) / 1e9;
    if (g > best) best = g;
  }
  free(a), free(bm), free(cm);
  g->gflops = best;
#else
  g->gflops = 0;
#endif
  return NULL;
}

/* On a thread of its own that then exits: an OpenMP team left on the main thread would count
 * against libgomp's spinning budget (it throttles spin-waiting once it manages more threads than
 * there are CPUs) and slow every oneDNN call of the engine's worker afterwards. */
static double gemm_peak_gflops(int threads) {
  gemm_arg g = {threads, 0};
  pthread_t t;
  if (pthread_create(&t, NULL, gemm_peak_main, &g) != 0) return 0;
  pthread_join(t, NULL);
  return g.gflops;
}

static void params_of(const shape *s, convd_conv_params *p) {
  convd_conv_params_default(p);
  p->n = s->n, p->c_in = s->c, p->h = s->h, p->w = s->w, p->c_out = s->o, p->groups = s->groups;
  p->c_per_group = s->c / s->groups, p->kh = s->kh, p->kw = s->kw, p->stride_h = s->sh,
  p->stride_w = s->sw, p->pad_top = p->pad_bottom = s->ph, p->pad_left = p->pad_right = s->pw;
  p->has_bias = 1;
}

/* A one-CPU-device engine, its device's detail printed first; NULL (the reason on stderr). */
static convd_engine *announced_engine(const convd_engine_opts *eo) {
  char err[256];
  convd_engine *e;
  if (convd_engine_create(eo, &e, err, sizeof err)) {
    fprintf(stderr, "bench_conv: %s\n", err);
    return NULL;
  }
  convd_device_info info;
  convd_engine_device_info(e, 0, &info);
  printf("CPU device: %s\n", info.detail);
  return e;
}

/* --dtype: float32 and the narrow type on each shape, through the same engine in this run. */
static int run_dtype(int dtype, int threads, int repeats, int only) {
  char err[256];
  convd_engine_opts eo = {.cpu_devices = 1, .cpu_threads = threads};
  convd_engine *e = announced_engine(&eo);
  if (e == NULL) return 1;
  printf("threads: %d, repeats: %d (median)\n\n", threads, repeats);
  const char *dn = convd_dtype_name(dtype);
  printf("| shape | float32 GFLOP/s | %s GFLOP/s | %s / float32 | max difference / largest float32 output |\n", dn, dn);
  printf("|---|---:|---:|---:|---:|\n");
  double ratios[NSHAPES], dw_ratio = 0;
  int nratios = 0;
  for (size_t i = 0; i < NSHAPES; i++) {
    const shape *s = &shapes[i];
    if (only >= 0 && (size_t)only != i) continue;
    convd_conv_params p;
    params_of(s, &p);
    convd_conv c32, cn;
    if (convd_conv_init(&c32, &p, err, sizeof err)) {
      fprintf(stderr, "bench_conv: %s\n", err);
      return 1;
    }
    p.dtype = dtype;
    if (convd_conv_init(&cn, &p, err, sizeof err)) {
      fprintf(stderr, "bench_conv: %s\n", err);
      return 1;
    }
    float *x = malloc(c32.input_bytes), *w = malloc(c32.weight_bytes), *b = malloc(c32.bias_bytes),
          *y32 = malloc(c32.output_bytes), *yn = malloc(c32.output_bytes);
    float *xn = malloc(c32.input_bytes), *wn = malloc(c32.weight_bytes), *bn = malloc(c32.bias_bytes);
    fill(x, c32.input_elems, 3);
    fill(w, c32.weight_elems, 4);
    fill(b, c32.bias_elems, 5);
    memcpy(xn, x, c32.input_bytes), memcpy(wn, w, c32.weight_bytes), memcpy(bn, b, c32.bias_bytes);
    convd_dtype_round(dtype, xn, c32.input_elems);
    convd_dtype_round(dtype, wn, c32.weight_elems);
    convd_dtype_round(dtype, bn, c32.bias_elems);
    const double flop = 2.0 * (double)c32.macs;
    /* Interleaved, one float32 call then one narrow call, so that anything else the machine
     * runs meanwhile slows both alike. */
    uint64_t ops32 = 0, opsn = 0;
    double *t32s = malloc((size_t)repeats * sizeof *t32s), *tns = malloc((size_t)repeats * sizeof *tns);
    time_once(e, &c32, x, w, b, y32, &ops32); /* warm-up: primitives, OpenMP team */
    time_once(e, &cn, xn, wn, bn, yn, &opsn);
    for (int r = 0; r < repeats; r++) {
      t32s[r] = time_once(e, &c32, x, w, b, y32, &ops32);
      tns[r] = time_once(e, &cn, xn, wn, bn, yn, &opsn);
    }
    const double t32 = median(t32s, repeats), tn = median(tns, repeats);
    free(t32s), free(tns);
    double scale = 0, diff = 0;
    for (size_t k = 0; k < c32.output_elems; k++) {
      if (fabs(y32[k]) > scale) scale = fabs(y32[k]);
      if (fabs(yn[k] - y32[k]) > diff) diff = fabs(yn[k] - y32[k]);
    }
    const double g32 = flop / t32 / 1e9, gn = flop / tn / 1e9;
    if (s->kh == 3 && s->kw == 3 && s->groups == 1) ratios[nratios++] = gn / g32;
    else if (s->kh == 3 && s->kw == 3) dw_ratio = gn / g32;
    printf("| %s | %.1f (%llu op%s) | %.1f (%llu op%s) | %.2f | %.2g |\n", s->name, g32,
           (unsigned long long)ops32, ops32 == 1 ? "" : "s", gn, (unsigned long long)opsn,
           opsn == 1 ? "" : "s", gn / g32, scale > 0 ? diff / scale : 0);
    fflush(stdout);
    free(x), free(w), free(b), free(y32), free(yn), free(xn), free(wn), free(bn);
  }
  convd_engine_destroy(e);
  if (nratios) {
    printf("\n%s / float32 on the %d dense 3x3 shapes:", dn, nratios);
    for (int k = 0; k < nratios; k++) printf(" %.2f", ratios[k]);
    if (dw_ratio > 0) printf(" (the depthwise 3x3, on float32 kernels in both: %.2f)", dw_ratio);
    printf("\nmedian %s / float32: %.2f\n", dn, median(ratios, nratios));
  }
  return 0;
}

int main(int argc, char **argv) {
  int repeats = 7, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), use_torch = 1, use_ref = 1;
  int only = -1, dtype = CONVD_F32;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
    else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
    else if (strcmp(argv[i], "--shape") == 0 && i + 1 < argc) only = atoi(argv[++i]);
    else if (strcmp(argv[i], "--no-torch") == 0) use_torch = 0;
    else if (strcmp(argv[i], "--no-reference") == 0) use_ref = 0;
    else if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc) {
      const char *v = argv[++i];
      dtype = strcmp(v, "float32") == 0 ? CONVD_F32 : strcmp(v, "float16") == 0 ? CONVD_F16
            : strcmp(v, "bfloat16") == 0 ? CONVD_BF16 : -1;
      if (dtype < 0) {
        fprintf(stderr, "bench_conv: --dtype takes float32, float16 or bfloat16, not %s\n", v);
        return 2;
      }
    } else {
      fprintf(stderr, "usage: bench_conv [--repeats N] [--threads T] [--shape K] [--no-torch] [--no-reference]"
                      " [--dtype float32|float16|bfloat16]\n");
      return 2;
    }
  }
  if (repeats < 1 || repeats > 100000) repeats = 7;
  if (dtype != CONVD_F32) return run_dtype(dtype, threads, repeats, only);

  /* PyTorch first, in one process, while nothing else runs. */
  double torch_s[NSHAPES] = {0};
  if (use_torch && access("/usr/bin/python3", X_OK) == 0) {
    char cmd[4096];
    int n = snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s/torch_conv.py %d %d", BENCH_DIR, threads, repeats);
    for (size_t i = 0; i < NSHAPES; i++) {
      const shape *s = &shapes[i];
      n += snprintf(cmd + n, sizeof cmd - (size_t)n,
                    " %lld,%lld,%lld,%lld:%lld,%lld,%lld,%lld:%lld,%lld:%lld,%lld:%lld",
                    (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w,
                    (long long)s->o, (long long)(s->c / s->groups), (long long)s->kh,
                    (long long)s->kw, (long long)s->sh, (long long)s->sw, (long long)s->ph,
                    (long long)s->pw, (long long)s->groups);
    }
    n += snprintf(cmd + n, sizeof cmd - (size_t)n, " 2>/dev/null");
    FILE *p = popen(cmd, "r");
    for (size_t i = 0; p && i < NSHAPES; i++)
      if (fscanf(p, "%lf", &torch_s[i]) != 1) torch_s[i] = 0;
    if (p && pclose(p) != 0) memset(torch_s, 0, sizeof torch_s);
  }

  double peak = gemm_peak_gflops(threads);
  char err[256];
  convd_engine_opts eo = {.cpu_devices = 1, .cpu_threads = threads};
  convd_engine *e = announced_engine(&eo);
  if (e == NULL) return 1;
  /* One engine at a time: an idle engine's worker keeps its OpenMP team, which makes libgomp
   * throttle spin-waiting for the engine being measured (more threads than CPUs). */
  convd_engine_destroy(e);
  printf("threads: %d, repeats: %d (median), fp32 GEMM peak (oneDNN sgemm 2048^3): %.1f GFLOP/s\n\n",
         threads, repeats, peak);
  printf("| shape | reference GFLOP/s | CPU tier GFLOP/s | %% of GEMM peak | forced tiles (ops) GFLOP/s | tiles/single | PyTorch GFLOP/s | CPU tier / PyTorch |\n");
  printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  double ratios[NSHAPES];
  int nratios = 0;
  for (size_t i = 0; i < NSHAPES; i++) {
    const shape *s = &shapes[i];
    if (only >= 0 && (size_t)only != i) continue;
    convd_conv_params p;
    params_of(s, &p);
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) {
      fprintf(stderr, "bench_conv: %s\n", err);
      return 1;
    }
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes),
          *y = malloc(c.output_bytes);
    fill(x, c.input_elems, 3);
    fill(w, c.weight_elems, 4);
    fill(b, c.bias_elems, 5);
    const double flop = 2.0 * (double)c.macs;
    double ref_g = 0;
    if (use_ref) {
      double t0 = now();
      convd_ref_conv2d(&c, x, w, b, y, NULL);
      ref_g = flop / (now() - t0) / 1e9;
    }
    uint64_t ops1, opsk;
    convd_engine_create(&eo, &e, err, sizeof err);
    double t1 = time_engine(e, &c, x, w, b, y, repeats, &ops1);
    convd_engine_destroy(e);
    /* Forced tiles: the largest budget that gives at least 16 ops. */
    convd_plan pl;
    convd_plan_opts po = {.devices = 1, .device_memory = 2 * (c.input_bytes + c.weight_bytes + c.output_bytes)};
    do {
      po.device_memory = po.device_memory * 7 / 8;
      convd_plan_make(&pl, &c, &po, err, sizeof err);
    } while (pl.ops < 16 && po.device_memory > 4096);
    convd_engine *ek;
    convd_engine_opts eko = {.cpu_devices = 1, .cpu_threads = threads, .device_memory = po.device_memory};
    convd_engine_create(&eko, &ek, err, sizeof err);
    double tk = time_engine(ek, &c, x, w, b, y, repeats, &opsk);
    convd_engine_destroy(ek);
    double g1 = flop / t1 / 1e9, gk = flop / tk / 1e9, gt = torch_s[i] > 0 ? flop / torch_s[i] / 1e9 : 0;
    char ref_col[32] = "-", torch_col[32] = "-", ratio_col[32] = "-";
    if (use_ref) snprintf(ref_col, sizeof ref_col, "%.2f", ref_g);
    if (gt > 0) {
      snprintf(torch_col, sizeof torch_col, "%.1f", gt);
      snprintf(ratio_col, sizeof ratio_col, "%.2f", g1 / gt);
      ratios[nratios++] = g1 / gt;
    }
    printf("| %s | %s | %.1f (%llu op%s) | %.0f %% | %.1f (%llu) | %.2f | %s | %s |\n", s->name,
           ref_col, g1, (unsigned long long)ops1, ops1 == 1 ? "" : "s", peak > 0 ? 100 * g1 / peak : 0,
           gk, (unsigned long long)opsk, t1 / tk, torch_col, ratio_col);
    fflush(stdout);
    free(x), free(w), free(b), free(y);
  }
  if (nratios) printf("\nmedian CPU tier / PyTorch ratio: %.2f over %d shapes\n", median(ratios, nratios), nratios);
  return 0;
}
