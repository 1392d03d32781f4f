/* GPU benchmark (tests/gpu/run.sh runs it): prints markdown tables.
 *
 * 1. Per shape and precision (float32 strict, TF32, float16, bfloat16): convd's elemental op on
 *    the CUDA device against PyTorch's conv2d on the same GPU (cudnn.benchmark = True), two ways:
 *    the convolution alone (ours: the device's CUDA-event kernel time; PyTorch: tensors already
 *    on the GPU) and the whole op with its copies over the bus (ours: run() from host memory to
 *    host memory; PyTorch: pinned input to the GPU, conv2d, output back).
 * 2. The classic case, 1x1024x1024x1024 / 1024x1024x3x3 p1, through 4096 elemental ops (64 tiles
 *    of 128x128 x 64 input-channel blocks) on every GPU stream, against PyTorch's one conv2d,
 *    with the share of the wall time the GPU spent in convolution kernels.
 * 3. A tiled job on the GPU alone and on the GPU plus a CPU device: the mixed pool must not be
 *    slower.
 * 4. Transpose layers (DCGAN, a segmentation upsampler) through the engine on the GPU streams
 *    (kernel segregation: one forward op per phase) against PyTorch's conv_transpose2d.
 *
 * usage: bench_gpu [--repeats N] [--no-tiled] [--no-torch] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda_device.h"
#include "dtype.h"
#include "engine.h"

typedef struct shape {
  const char *name;
  int64_t n, c, h, w, o, kh, kw, s, pad, groups;
} shape;

static const shape shapes[] = {
    {"1x64x224x224 / 64x64x3x3 p1", 1, 64, 224, 224, 64, 3, 3, 1, 1, 1},
    {"1x256x56x56 / 256x256x3x3 p1", 1, 256, 56, 56, 256, 3, 3, 1, 1, 1},
    {"8x256x56x56 / 256x256x3x3 p1", 8, 256, 56, 56, 256, 3, 3, 1, 1, 1},
    {"16x512x28x28 / 512x512x3x3 p1", 16, 512, 28, 28, 512, 3, 3, 1, 1, 1},
    {"1x512x28x28 / 512x512x1x1", 1, 512, 28, 28, 512, 1, 1, 1, 0, 1},
    {"1x3x1024x1024 / 64x3x7x7 s2 p3", 1, 3, 1024, 1024, 64, 7, 7, 2, 3, 1},
    {"1x32x112x112 depthwise 3x3 p1", 1, 32, 112, 112, 32, 3, 3, 1, 1, 32},
    {"1x1024x130x130 / 1024x16x3x3 (one 4096-plan op)", 1, 16, 130, 130, 1024, 3, 3, 1, 0, 1},
};
#define NSHAPES (sizeof shapes / sizeof shapes[0])

static const struct {
  const char *name, *torch;
  int dtype, tf32;
} modes[] = {{"float32", "f32", CONVD_F32, 0},
             {"TF32", "tf32", CONVD_F32, 1},
             {"float16", "f16", CONVD_F16, 0},
             {"bfloat16", "bf16", CONVD_BF16, 0}};
#define NMODES (sizeof modes / sizeof modes[0])

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void fill(float *p, size_t n, uint64_t seed) {
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < n; i++) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    p[i] = (float)((double)(s >> 40) / (double)(1ull << 24) - 0.5);
  }
}

static convd_conv_params params_of(const shape *s, int dtype, int tf32) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = s->n, p.c_in = s->c, p.h = s->h, p.w = s->w, p.c_out = s->o, p.groups = s->groups;
  p.c_per_group = s->c / s->groups, p.kh = s->kh, p.kw = s->kw;
  p.stride_h = p.stride_w = s->s;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = s->pad;
  p.has_bias = 1;
  p.dtype = dtype;
  p.allow_tf32 = tf32;
  return p;
}

/* PyTorch's seconds for each spec (device-only and with copies), 0 when unavailable. */
static void torch_times(const char *specs, int nspecs, int repeats, double *dev_s, double *copy_s) {
  memset(dev_s, 0, sizeof(double) * (size_t)nspecs);
  memset(copy_s, 0, sizeof(double) * (size_t)nspecs);
  size_t len = strlen(specs) + 512;
  char *cmd = malloc(len);
  snprintf(cmd, len, "/usr/bin/env python3 %s/torch_gpu.py %d %s", GPU_BENCH_DIR, repeats, specs);
  FILE *p = popen(cmd, "r");
  for (int i = 0; p && i < nspecs; i++)
    if (fscanf(p, "%lf %lf", &dev_s[i], &copy_s[i]) != 2) dev_s[i] = copy_s[i] = 0;
  if (p && pclose(p) != 0) fprintf(stderr, "bench_gpu: the PyTorch peer failed (see its stderr)\n");
  free(cmd);
}

static int spec_append(char *buf, size_t cap, size_t *len, const shape *s, const char *mode) {
  int n = snprintf(buf + *len, cap - *len, " %lld,%lld,%lld,%lld:%lld,%lld,%lld,%lld:%lld,%lld:%lld,%lld:%lld:%s",
                   (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w, (long long)s->o,
                   (long long)(s->c / s->groups), (long long)s->kh, (long long)s->kw, (long long)s->s,
                   (long long)s->s, (long long)s->pad, (long long)s->pad, (long long)s->groups, mode);
  if (n < 0 || (size_t)n >= cap - *len) return -1;
  *len += (size_t)n;
  return 0;
}

static void elemental_table(int repeats, int use_torch) {
  char err[512];
  convd_device *d;
  if (convd_device_cuda_create("cuda0", 0, UINT64_C(2) << 30, &d, err, sizeof err)) {
    fprintf(stderr, "bench_gpu: %s\n", err);
    return;
  }
  printf("GPU device: %s\n\n", convd_device_detail(d));
  double t_dev[NSHAPES * NMODES], t_copy[NSHAPES * NMODES];
  if (use_torch) {
    char specs[8192];
    size_t len = 0;
    for (size_t i = 0; i < NSHAPES; i++)
      for (size_t m = 0; m < NMODES; m++) spec_append(specs, sizeof specs, &len, &shapes[i], modes[m].torch);
    torch_times(specs, (int)(NSHAPES * NMODES), repeats, t_dev, t_copy);
  } else {
    memset(t_dev, 0, sizeof t_dev);
    memset(t_copy, 0, sizeof t_copy);
  }
  printf("| shape | precision | ours kernel GFLOP/s | PyTorch on-GPU GFLOP/s | kernel / PyTorch | ours op with copies GFLOP/s | PyTorch with copies GFLOP/s | op / PyTorch |\n");
  printf("|---|---|---:|---:|---:|---:|---:|---:|\n");
  for (size_t i = 0; i < NSHAPES; i++)
    for (size_t m = 0; m < NMODES; m++) {
      convd_conv_params p = params_of(&shapes[i], modes[m].dtype, modes[m].tf32);
      convd_conv c;
      if (convd_conv_init(&c, &p, err, sizeof err)) continue;
      float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes);
      float *y = malloc(c.output_bytes);
      fill(x, c.input_elems, 1), fill(w, c.weight_elems, 2), fill(b, c.bias_elems, 3);
      convd_dtype_round(p.dtype, x, c.input_elems);
      convd_dtype_round(p.dtype, w, c.weight_elems);
      convd_dtype_round(p.dtype, b, c.bias_elems);
      /* A weight key, as in a job: the block stays on the GPU after the first op. */
      convd_op_io io = convd_op_io_dense(&c, x, w, 0x5eed + i * 16 + m, b, y, NULL);
      int rc = 0;
      for (int k = 0; k < 3 && rc == 0; k++) rc = convd_device_run(d, &io, err, sizeof err);
      double *ts = malloc(sizeof(double) * (size_t)repeats);
      convd_device_stats s0, s1;
      convd_device_stats_get(d, &s0);
      for (int k = 0; k < repeats && rc == 0; k++) {
        double t0 = now();
        rc = convd_device_run(d, &io, err, sizeof err);
        ts[k] = now() - t0;
      }
      convd_device_stats_get(d, &s1);
      const double gflop = 2.0 * (double)c.macs / 1e9;
      const size_t ix = i * NMODES + m;
      if (rc) {
        printf("| %s | %s | failed: %s | | | | | |\n", shapes[i].name, modes[m].name, err);
      } else {
        qsort(ts, (size_t)repeats, sizeof *ts, cmp_double);
        const double op_s = ts[repeats / 2];
        const double kern_s = (double)(s1.kernel_ns - s0.kernel_ns) * 1e-9 / repeats;
        const double ours_k = kern_s > 0 ? gflop / kern_s : 0, ours_op = gflop / op_s;
        const double th_d = t_dev[ix] > 0 ? gflop / t_dev[ix] : 0, th_c = t_copy[ix] > 0 ? gflop / t_copy[ix] : 0;
        printf("| %s | %s | %.0f | %.0f | %.2f | %.0f | %.0f | %.2f |\n", shapes[i].name, modes[m].name,
               ours_k, th_d, th_d > 0 ? ours_k / th_d : 0, ours_op, th_c, th_c > 0 ? ours_op / th_c : 0);
      }
      fflush(stdout);
      free(ts), free(x), free(w), free(b), free(y);
    }
  convd_device_destroy(d);
}

/* Runs conv on an engine made from o; returns the best of `runs` wall times, and the GPU kernel
 * seconds of that run summed over the engine's CUDA devices. */
static double engine_time(convd_engine_opts o, const convd_conv *c, const float *x, const float *w,
                          const float *b, float *y, int runs, double *kernel_s, uint64_t *ops) {
  char err[512];
  convd_engine *e;
  if (convd_engine_create(&o, &e, err, sizeof err)) {
    fprintf(stderr, "bench_gpu: %s\n", err);
    return 0;
  }
  double best = 0;
  for (int r = 0; r < runs; r++) {
    uint64_t k0 = 0, k1 = 0;
    convd_device_info info;
    for (size_t i = 0; i < convd_engine_device_count(e); i++)
      if (convd_engine_device_info(e, i, &info) == 0) k0 += info.stats.kernel_ns;
    convd_job_stats st;
    double t0 = now();
    if (convd_engine_run(e, c, x, w, b, y, &st, err, sizeof err)) {
      fprintf(stderr, "bench_gpu: %s\n", err);
      convd_engine_destroy(e);
      return 0;
    }
    double t = now() - t0;
    for (size_t i = 0; i < convd_engine_device_count(e); i++)
      if (convd_engine_device_info(e, i, &info) == 0) k1 += info.stats.kernel_ns;
    if (best == 0 || t < best) {
      best = t;
      if (kernel_s) *kernel_s = (double)(k1 - k0) * 1e-9;
      if (ops) *ops = st.ops;
    }
  }
  convd_engine_destroy(e);
  return best;
}

static void tiled_tables(int use_torch) {
  const shape big = {"1x1024x1024x1024 / 1024x1024x3x3 p1", 1, 1024, 1024, 1024, 1024, 3, 3, 1, 1, 1};
  const size_t tiled_modes[] = {0, 1, 2};
  double t_dev[3] = {0}, t_copy[3] = {0};
  if (use_torch) {
    char specs[1024];
    size_t len = 0;
    for (size_t k = 0; k < 3; k++) spec_append(specs, sizeof specs, &len, &big, modes[tiled_modes[k]].torch);
    torch_times(specs, 3, 3, t_dev, t_copy);
  }
  printf("\n%s through 4096 elemental ops (--op-memory 40M), every GPU stream, best of 2 runs:\n\n", big.name);
  printf("| precision | ops | convd GFLOP/s | GPU kernel time / wall | PyTorch on-GPU GFLOP/s | convd / PyTorch | PyTorch with copies GFLOP/s | convd / PyTorch with copies |\n");
  printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (size_t k = 0; k < 3; k++) {
    const size_t m = tiled_modes[k];
    char err[256];
    convd_conv_params p = params_of(&big, modes[m].dtype, modes[m].tf32);
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) return;
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes);
    float *y = malloc(c.output_bytes);
    if (!x || !w || !b || !y) {
      fprintf(stderr, "bench_gpu: no host memory for the 4096-op case\n");
      free(x), free(w), free(b), free(y);
      return;
    }
    fill(x, c.input_elems, 4), fill(w, c.weight_elems, 5), fill(b, c.bias_elems, 6);
    convd_engine_opts o = {.gpus = -1, .op_memory = 40u << 20};
    double kern = 0;
    uint64_t ops = 0;
    const double t = engine_time(o, &c, x, w, b, y, 2, &kern, &ops);
    const double gflop = 2.0 * (double)c.macs / 1e9;
    printf("| %s | %llu | %.0f | %.2f | %.0f | %.2f | %.0f | %.2f |\n", modes[m].name,
           (unsigned long long)ops, t > 0 ? gflop / t : 0, t > 0 ? kern / t : 0,
           t_dev[k] > 0 ? gflop / t_dev[k] : 0, t > 0 && t_dev[k] > 0 ? t_dev[k] / t : 0,
           t_copy[k] > 0 ? gflop / t_copy[k] : 0, t > 0 && t_copy[k] > 0 ? t_copy[k] / t : 0);
    fflush(stdout);
    free(x), free(w), free(b), free(y);
  }

  /* The mixed pool: a CPU device beside the GPU must not make the job slower. */
  const shape mid = {"1x256x512x512 / 256x256x3x3 p1", 1, 256, 512, 512, 256, 3, 3, 1, 1, 1};
  char err[256];
  convd_conv_params p = params_of(&mid, CONVD_F32, 0);
  convd_conv c;
  if (convd_conv_init(&c, &p, err, sizeof err)) return;
  float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes);
  float *y = malloc(c.output_bytes);
  fill(x, c.input_elems, 7), fill(w, c.weight_elems, 8), fill(b, c.bias_elems, 9);
  const double gflop = 2.0 * (double)c.macs / 1e9;
  convd_engine_opts gpu_only = {.gpus = -1, .op_memory = 8u << 20};
  convd_engine_opts mixed = {.gpus = -1, .cpu_devices = 1, .op_memory = 8u << 20};
  uint64_t ops = 0;
  const double tg = engine_time(gpu_only, &c, x, w, b, y, 3, NULL, &ops);
  const double tm = engine_time(mixed, &c, x, w, b, y, 3, NULL, NULL);
  printf("\n%s, float32, %llu ops (--op-memory 8M), best of 3 runs:\n\n", mid.name, (unsigned long long)ops);
  printf("| pool | seconds | GFLOP/s |\n|---|---:|---:|\n");
  printf("| GPU streams alone | %.3f | %.0f |\n", tg, tg > 0 ? gflop / tg : 0);
  printf("| GPU streams + one CPU device (%ld threads) | %.3f | %.0f |\n", sysconf(_SC_NPROCESSORS_ONLN), tm,
         tm > 0 ? gflop / tm : 0);
  printf("\nmixed / GPU alone time: %.3f (must be <= 1 within noise)\n", tg > 0 ? tm / tg : 0);
  free(x), free(w), free(b), free(y);
}

static void transpose_table(int repeats, int use_torch) {
  static const struct {
    const char *name;
    int64_t ci, h, co, k, s, p, op;
  } t[] = {{"DCGAN 1x1024x4x4 -> 512, k4 s2 p1", 1024, 4, 512, 4, 2, 1, 0},
           {"DCGAN 1x512x8x8 -> 256, k4 s2 p1", 512, 8, 256, 4, 2, 1, 0},
           {"DCGAN 1x256x16x16 -> 128, k4 s2 p1", 256, 16, 128, 4, 2, 1, 0},
           {"DCGAN 1x128x32x32 -> 3, k4 s2 p1", 128, 32, 3, 4, 2, 1, 0},
           {"upsampler 1x256x64x64 -> 128, k3 s2 p1 op1", 256, 64, 128, 3, 2, 1, 1}};
  const size_t nt = sizeof t / sizeof t[0];
  double t_dev[8] = {0}, t_copy[8] = {0};
  if (use_torch) {
    char specs[2048];
    size_t len = 0;
    for (size_t i = 0; i < nt; i++)
      len += (size_t)snprintf(specs + len, sizeof specs - len, " T:1,%lld,%lld,%lld:%lld,%lld,%lld:%lld:%lld:%lld:f32",
                              (long long)t[i].ci, (long long)t[i].h, (long long)t[i].h, (long long)t[i].ci,
                              (long long)t[i].co, (long long)t[i].k, (long long)t[i].s, (long long)t[i].p,
                              (long long)t[i].op);
    torch_times(specs, (int)nt, repeats, t_dev, t_copy);
  }
  printf("\nTranspose layers, float32, through the engine on every GPU stream (host memory to host memory):\n\n");
  printf("| layer | ops | convd GFLOP/s | PyTorch on-GPU GFLOP/s | PyTorch with copies GFLOP/s | convd / PyTorch with copies |\n");
  printf("|---|---:|---:|---:|---:|---:|\n");
  char err[512];
  convd_engine *e;
  convd_engine_opts o = {.gpus = -1};
  if (convd_engine_create(&o, &e, err, sizeof err)) {
    fprintf(stderr, "bench_gpu: %s\n", err);
    return;
  }
  for (size_t i = 0; i < nt; i++) {
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.transposed = 1;
    p.n = 1, p.c_in = p.c_per_group = t[i].ci, p.h = p.w = t[i].h, p.c_out = t[i].co;
    p.kh = p.kw = t[i].k, p.stride_h = p.stride_w = t[i].s;
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = t[i].p;
    p.out_pad_h = p.out_pad_w = t[i].op;
    p.has_bias = 1;
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) continue;
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes), *y = malloc(c.output_bytes);
    fill(x, c.input_elems, 11), fill(w, c.weight_elems, 12), fill(b, c.bias_elems, 13);
    convd_job_stats st;
    double *ts = malloc(sizeof(double) * (size_t)repeats);
    int rc = 0;
    for (int k = 0; k < 3 && rc == 0; k++) rc = convd_engine_run(e, &c, x, w, b, y, &st, err, sizeof err);
    for (int k = 0; k < repeats && rc == 0; k++) {
      double t0 = now();
      rc = convd_engine_run(e, &c, x, w, b, y, &st, err, sizeof err);
      ts[k] = now() - t0;
    }
    if (rc == 0) {
      qsort(ts, (size_t)repeats, sizeof *ts, cmp_double);
      const double gflop = 2.0 * (double)c.macs / 1e9, ours = gflop / ts[repeats / 2];
      printf("| %s | %llu | %.0f | %.0f | %.0f | %.2f |\n", t[i].name, (unsigned long long)st.ops, ours,
             t_dev[i] > 0 ? gflop / t_dev[i] : 0, t_copy[i] > 0 ? gflop / t_copy[i] : 0,
             t_copy[i] > 0 ? ours / (gflop / t_copy[i]) : 0);
    } else {
      printf("| %s | failed: %s | | | | |\n", t[i].name, err);
    }
    fflush(stdout);
    free(ts), free(x), free(w), free(b), free(y);
  }
  convd_engine_destroy(e);
}

int main(int argc, char **argv) {
  int repeats = 20, tiled = 1, use_torch = 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
    else if (strcmp(argv[i], "--no-tiled") == 0) tiled = 0;
    else if (strcmp(argv[i], "--no-torch") == 0) use_torch = 0;
    else {
      fprintf(stderr, "usage: bench_gpu [--repeats N] [--no-tiled] [--no-torch]\n");
      return 2;
    }
  }
  if (repeats < 1 || repeats > 10000) repeats = 20;
  char why[256] = "";
  if (convd_cuda_device_count(why, sizeof why) == 0) {
    printf("bench_gpu: no GPU here (%s); nothing to measure\n", why);
    return 0;
  }
  elemental_table(repeats, use_torch);
  if (tiled) tiled_tables(use_torch);
  transpose_table(repeats, use_torch);
  return 0;
}
