/* bench_transpose: transpose convolution by kernel segregation through the engine (one CPU
 * device, the default op budget) against PyTorch's CPU conv_transpose2d in the same run with the
 * same threads, on DCGAN generator layers and a segmentation upsampler. A benchmark, not a test.
 *
 *   bench_transpose [--repeats N] [--threads T] [--no-torch]
 *
 * Columns: GFLOP/s (2 x multiply-adds / median seconds; a transpose's multiply-adds are input
 * elements x C_out/groups x kH x kW), PyTorch's, the ratio; and memory: the segregated weights
 * (one copy of the weights, rearranged) and the most an op uses (input window, weight block and
 * output partial, from the plan), against the zero-inserted input the usual method allocates
 * (never allocated here). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "ref.h"

typedef struct tshape {
  const char *name;
  int64_t n, ci, h, w, co, k, s, p, op;
} tshape;

static const tshape shapes[] = {
    {"DCGAN 1x1024x4x4 -> 512, k4 s2 p1", 1, 1024, 4, 4, 512, 4, 2, 1, 0},
    {"DCGAN 1x512x8x8 -> 256, k4 s2 p1", 1, 512, 8, 8, 256, 4, 2, 1, 0},
    {"DCGAN 1x256x16x16 -> 128, k4 s2 p1", 1, 256, 16, 16, 128, 4, 2, 1, 0},
    {"DCGAN 1x128x32x32 -> 3, k4 s2 p1", 1, 128, 32, 32, 3, 4, 2, 1, 0},
    {"upsampler 1x256x64x64 -> 128, k3 s2 p1 op1", 1, 256, 64, 64, 128, 3, 2, 1, 1},
};
#define NSHAPES (sizeof shapes / sizeof shapes[0])

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  int repeats = 20, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), use_torch = 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
    else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
    else if (strcmp(argv[i], "--no-torch") == 0) use_torch = 0;
    else {
      fprintf(stderr, "usage: bench_transpose [--repeats N] [--threads T] [--no-torch]\n");
      return 2;
    }
  }
  if (repeats < 1 || repeats > 100000) repeats = 20;
  if (threads < 1) threads = 1;
  double torch_s[NSHAPES] = {0};
  if (use_torch && access("/usr/bin/python3", X_OK) == 0) {
    char cmd[4096];
    int n = snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s/torch_transpose.py %d %d", BENCH_DIR, threads, repeats);
    for (size_t i = 0; i < NSHAPES; i++) {
      const tshape *s = &shapes[i];
      n += snprintf(cmd + n, sizeof cmd - (size_t)n, " %lld,%lld,%lld,%lld:%lld,%lld,%lld,%lld:%lld:%lld:%lld",
                    (long long)s->n, (long long)s->ci, (long long)s->h, (long long)s->w, (long long)s->ci,
                    (long long)s->co, (long long)s->k, (long long)s->k, (long long)s->s, (long long)s->p,
                    (long long)s->op);
    }
    n += snprintf(cmd + n, sizeof cmd - (size_t)n, " 2>/dev/null");
    FILE *p = popen(cmd, "r");
    for (size_t i = 0; p && i < NSHAPES; i++)
      if (fscanf(p, "%lf", &torch_s[i]) != 1) torch_s[i] = 0;
    if (p && pclose(p) != 0) memset(torch_s, 0, sizeof torch_s);
  }
  char err[512];
  convd_engine *e;
  convd_engine_opts eo = {.cpu_devices = 1, .cpu_threads = threads};
  if (convd_engine_create(&eo, &e, err, sizeof err)) {
    fprintf(stderr, "bench_transpose: %s\n", err);
    return 1;
  }
  convd_device_info info;
  convd_engine_device_info(e, 0, &info);
  printf("CPU device: %s\nthreads: %d, repeats: %d (median)\n\n", info.detail, threads, repeats);
  printf("| layer | ops | convd GFLOP/s | PyTorch GFLOP/s | convd / PyTorch | max abs error vs reference | segregated weights (bytes) | largest op (bytes) | zero-inserted input (bytes, not allocated) |\n");
  printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  double ratios[NSHAPES];
  int nr = 0;
  for (size_t i = 0; i < NSHAPES; i++) {
    const tshape *s = &shapes[i];
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.transposed = 1;
    p.n = s->n, p.c_in = s->ci, p.h = s->h, p.w = s->w, p.c_out = s->co, p.c_per_group = s->ci;
    p.kh = p.kw = s->k, p.stride_h = p.stride_w = s->s;
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = s->p;
    p.out_pad_h = p.out_pad_w = s->op;
    p.has_bias = 1;
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) {
      fprintf(stderr, "bench_transpose: %s\n", err);
      return 1;
    }
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes);
    float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
    for (size_t k = 0; k < c.input_elems; k++) x[k] = (float)((k * 2654435761u) % 1000) / 500.0f - 1.0f;
    for (size_t k = 0; k < c.weight_elems; k++) w[k] = (float)((k * 40503u) % 1000) / 5000.0f - 0.1f;
    for (size_t k = 0; k < c.bias_elems; k++) b[k] = 0.01f * (float)k;
    convd_job_stats st;
    double *ts = malloc(sizeof(double) * (size_t)repeats);
    int rc = 0;
    for (int k = 0; k < 3 && rc == 0; k++) rc = convd_engine_run(e, &c, x, w, b, y, &st, err, sizeof err);
    for (int k = 0; k < repeats && rc == 0; k++) {
      double t0 = now();
      rc = convd_engine_run(e, &c, x, w, b, y, &st, err, sizeof err);
      ts[k] = now() - t0;
    }
    if (rc) {
      fprintf(stderr, "bench_transpose: %s\n", err);
      return 1;
    }
    convd_ref_conv_transpose2d(&c, x, w, b, ref, NULL);
    double worst = 0;
    for (size_t k = 0; k < c.output_elems; k++) {
      double d = y[k] - ref[k];
      if (d < 0) d = -d;
      if (d > worst) worst = d;
    }
    qsort(ts, (size_t)repeats, sizeof *ts, cmp);
    const double med = ts[repeats / 2], gflop = 2.0 * (double)c.macs / 1e9;
    /* The usual method: the input with stride-1 zeros between its elements and k-1-p zero
     * borders (plus output_padding), convolved with the flipped kernel. */
    const int64_t zh = (p.h - 1) * p.stride_h + 1 + 2 * (p.kh - 1 - p.pad_top) + p.out_pad_h;
    const int64_t zw = (p.w - 1) * p.stride_w + 1 + 2 * (p.kw - 1 - p.pad_left) + p.out_pad_w;
    const double zbytes = 4.0 * (double)p.n * (double)p.c_in * (double)zh * (double)zw;
    const double ours = gflop / med, theirs = torch_s[i] > 0 ? gflop / torch_s[i] : 0;
    if (theirs > 0) ratios[nr++] = ours / theirs;
    convd_plan pl;
    convd_engine_plan(e, &c, &pl, err, sizeof err);
    printf("| %s | %llu | %.1f | %.1f | %.2f | %.2g | %zu | %llu | %.0f |\n", s->name, (unsigned long long)st.ops,
           ours, theirs, theirs > 0 ? ours / theirs : 0, worst, c.weight_bytes,
           (unsigned long long)(pl.op_bytes / 2), zbytes);
    fflush(stdout);
    free(ts), free(x), free(w), free(b), free(y), free(ref);
  }
  convd_engine_destroy(e);
  if (nr) {
    qsort(ratios, (size_t)nr, sizeof *ratios, cmp);
    printf("\nmedian convd / PyTorch: %.2f\n", nr % 2 ? ratios[nr / 2] : 0.5 * (ratios[nr / 2 - 1] + ratios[nr / 2]));
  }
  return 0;
}
