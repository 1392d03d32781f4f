/* bench_transpose: transpose convolution through the engine (one CPU device, the default op
 * budget) against oneDNN's own deconvolution primitive and PyTorch's CPU conv_transpose2d in the
 * same run with the same threads, on DCGAN generator layers and a segmentation upsampler, and
 * against the forward convolution of equal work. A benchmark, not a test.
 *
 *   bench_transpose [--repeats N] [--threads T] [--no-torch]
 *
 * Columns: GFLOP/s (2 x multiply-adds / median seconds; a transpose's multiply-adds are input
 * elements x C_out/groups x kH x kW) of convd, of oneDNN's deconvolution (user tensors in NCHW /
 * PyTorch's layout as convd gets them: the source and destination reorders are timed, the
 * weights reordered once beforehand, as a caller would cache them; convd's calls name their
 * weights by a content key, as the daemon's do, so its devices keep them too), of PyTorch, the
 * ratios; the
 * forward convolution with the same input, channels and kernel at stride 1 and "same" padding
 * (exactly the transpose's multiply-adds) through the engine, and transpose / forward; and
 * memory: the segregated weights (one copy of the weights, rearranged), the most an op uses
 * (input window, weight block and output partial, from the plan), against the zero-inserted
 * input the usual method allocates (never allocated here). */
#include <pthread.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "engine.h"
#include "ref.h"

#ifdef CONVD_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#endif

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

static double median_of(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Each round's warm-up, on both sides: at least three calls and this long. A fresh thread's
 * OpenMP team ran its first tens of milliseconds up to 25 % slower than later (measured: the
 * same primitive, 1214 us on a fresh thread against 970 us on a long-lived one). */
#define WARM_SECONDS 0.1

/* oneDNN's deconvolution on the transpose c: repeats timings into t (seconds); ok is 0 when it
 * cannot run. */
typedef struct deconv_arg {
  const convd_conv *c;
  const float *x, *w, *b;
  float *y;
  int threads, repeats;
  double *t;
  int ok;
} deconv_arg;

#ifdef CONVD_HAVE_DNNL
#define DN(call)                     \
  do {                               \
    if ((call) != dnnl_success) goto out; \
  } while (0)

static void *deconv_main(void *arg) {
  deconv_arg *a = arg;
  const convd_conv_params *p = &a->c->p;
  omp_set_num_threads(a->threads);
  dnnl_engine_t eng = NULL;
  dnnl_stream_t st = NULL;
  dnnl_primitive_desc_t pd = NULL, rs_pd = NULL, rd_pd = NULL, rw_pd = NULL;
  dnnl_primitive_t prim = NULL, rs = NULL, rd = NULL, rw = NULL;
  dnnl_memory_t usrc = NULL, uwei = NULL, udst = NULL, ubias = NULL, src = NULL, wei = NULL, dst = NULL;
  double *t = a->t;
  DN(dnnl_engine_create(&eng, dnnl_cpu, 0));
  DN(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
  dnnl_dims_t sd = {p->n, p->c_in, p->h, p->w}, dd = {p->n, p->c_out, a->c->h_out, a->c->w_out};
  dnnl_dims_t wd = {p->c_out, p->c_in, p->kh, p->kw};
  /* PyTorch's transpose weights (C_in, C_out, kH, kW) seen as oneDNN's (OC, IC, KH, KW). */
  dnnl_dims_t ws = {p->kh * p->kw, p->c_out * p->kh * p->kw, p->kw, 1};
  dnnl_dims_t bd = {p->c_out}, strides = {p->stride_h, p->stride_w}, dil = {p->dil_h - 1, p->dil_w - 1};
  dnnl_dims_t pl = {p->pad_top, p->pad_left}, pr = {p->pad_bottom - p->out_pad_h, p->pad_right - p->out_pad_w};
  dnnl_memory_desc_t usmd, uwmd, udmd, bmd, asmd, awmd, admd;
  DN(dnnl_memory_desc_init_by_tag(&usmd, 4, sd, dnnl_f32, dnnl_nchw));
  DN(dnnl_memory_desc_init_by_tag(&udmd, 4, dd, dnnl_f32, dnnl_nchw));
  DN(dnnl_memory_desc_init_by_strides(&uwmd, 4, wd, dnnl_f32, ws));
  DN(dnnl_memory_desc_init_by_tag(&bmd, 1, bd, dnnl_f32, dnnl_x));
  /* bfloat16: bf16 input and weights, float32 output and sums, as the CPU device computes it */
  const dnnl_data_type_t cdt = a->c->p.dtype == CONVD_BF16 ? dnnl_bf16 : dnnl_f32;
  DN(dnnl_memory_desc_init_by_tag(&asmd, 4, sd, cdt, dnnl_format_tag_any));
  DN(dnnl_memory_desc_init_by_tag(&admd, 4, dd, dnnl_f32, dnnl_format_tag_any));
  DN(dnnl_memory_desc_init_by_tag(&awmd, 4, wd, cdt, dnnl_format_tag_any));
  dnnl_deconvolution_desc_t desc;
  DN(dnnl_dilated_deconvolution_forward_desc_init(&desc, dnnl_forward_inference, dnnl_deconvolution_direct, &asmd,
                                                 &awmd, p->has_bias ? &bmd : NULL, &admd, strides, dil, pl, pr));
  DN(dnnl_primitive_desc_create(&pd, &desc, NULL, eng, NULL));
  DN(dnnl_primitive_create(&prim, pd));
  const dnnl_memory_desc_t *smd = dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
  const dnnl_memory_desc_t *wmd = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
  const dnnl_memory_desc_t *dmd = dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
  DN(dnnl_memory_create(&usrc, &usmd, eng, (void *)a->x));
  DN(dnnl_memory_create(&uwei, &uwmd, eng, (void *)a->w));
  DN(dnnl_memory_create(&udst, &udmd, eng, a->y));
  DN(dnnl_memory_create(&ubias, &bmd, eng, (void *)a->b));
  DN(dnnl_memory_create(&src, smd, eng, DNNL_MEMORY_ALLOCATE));
  DN(dnnl_memory_create(&wei, wmd, eng, DNNL_MEMORY_ALLOCATE));
  DN(dnnl_memory_create(&dst, dmd, eng, DNNL_MEMORY_ALLOCATE));
  DN(dnnl_reorder_primitive_desc_create(&rs_pd, &usmd, eng, smd, eng, NULL));
  DN(dnnl_reorder_primitive_desc_create(&rd_pd, dmd, eng, &udmd, eng, NULL));
  DN(dnnl_reorder_primitive_desc_create(&rw_pd, &uwmd, eng, wmd, eng, NULL));
  DN(dnnl_primitive_create(&rs, rs_pd));
  DN(dnnl_primitive_create(&rd, rd_pd));
  DN(dnnl_primitive_create(&rw, rw_pd));
  dnnl_exec_arg_t rwa[2] = {{DNNL_ARG_FROM, uwei}, {DNNL_ARG_TO, wei}};
  DN(dnnl_primitive_execute(rw, st, 2, rwa)); /* the weights once, as a caller caches them */
  dnnl_exec_arg_t rsa[2] = {{DNNL_ARG_FROM, usrc}, {DNNL_ARG_TO, src}}, rda[2] = {{DNNL_ARG_FROM, dst}, {DNNL_ARG_TO, udst}};
  dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}, {DNNL_ARG_BIAS, ubias}};
  const double warm_until = now() + WARM_SECONDS;
  for (int r = -3; r < a->repeats; r++) {
    const double t0 = now();
    DN(dnnl_primitive_execute(rs, st, 2, rsa));
    DN(dnnl_primitive_execute(prim, st, p->has_bias ? 4 : 3, args));
    DN(dnnl_primitive_execute(rd, st, 2, rda));
    DN(dnnl_stream_wait(st));
    if (r >= 0) t[r] = now() - t0;
    if (r == -1 && now() < warm_until) r = -2; /* still warming up */
  }
  a->ok = 1;
out:
  dnnl_primitive_t prims[] = {prim, rs, rd, rw};
  for (int i = 0; i < 4; i++)
    if (prims[i]) dnnl_primitive_destroy(prims[i]);
  dnnl_primitive_desc_t pds[] = {pd, rs_pd, rd_pd, rw_pd};
  for (int i = 0; i < 4; i++)
    if (pds[i]) dnnl_primitive_desc_destroy(pds[i]);
  dnnl_memory_t mems[] = {usrc, uwei, udst, ubias, src, wei, dst};
  for (int i = 0; i < 7; i++)
    if (mems[i]) dnnl_memory_destroy(mems[i]);
  if (st) dnnl_stream_destroy(st);
  if (eng) dnnl_engine_destroy(eng);
  return NULL;
}
#endif

/* On a thread of its own that then exits (its OpenMP team with it), as bench_conv's GEMM peak. */
static int deconv_times(deconv_arg *a) {
  a->ok = 0;
#ifdef CONVD_HAVE_DNNL
  pthread_t t;
  if (pthread_create(&t, NULL, deconv_main, a) == 0) pthread_join(t, NULL);
#endif
  return a->ok;
}

int main(int argc, char **argv) {
  int repeats = 20, rounds = 3, dtype = CONVD_F32, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), use_torch = 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
    else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
    else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) rounds = atoi(argv[++i]);
    else if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc && strcmp(argv[i + 1], "bfloat16") == 0) dtype = CONVD_BF16, i++;
    else if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc && strcmp(argv[i + 1], "float32") == 0) i++;
    else if (strcmp(argv[i], "--no-torch") == 0) use_torch = 0;
    else {
      fprintf(stderr, "usage: bench_transpose [--repeats N] [--rounds R] [--threads T] [--no-torch] [--dtype float32|bfloat16]\n");
      return 2;
    }
  }
  if (repeats < 1 || repeats > 100000) repeats = 20;
  if (threads < 1) threads = 1;
  if (rounds < 1 || rounds > repeats) rounds = repeats < 3 ? repeats : 3;
  double torch_s[NSHAPES] = {0};
  if (use_torch && dtype == CONVD_F32 && access("/usr/bin/python3", X_OK) == 0) { /* PyTorch's in float32 only */
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
  printf("CPU device: %s\nthreads: %d, dtype: %s, repeats: %d in %d rounds, convd and oneDNN alternating (median of all)\n\n", info.detail, threads, convd_dtype_name(dtype), ((repeats + rounds - 1) / rounds) * rounds, rounds);
  /* One engine (one OpenMP team) at a time: the peer runs with none of the engine's alive. */
  convd_engine_destroy(e);
  e = NULL;
  printf("| layer | ops | convd GFLOP/s | oneDNN deconvolution GFLOP/s | convd / oneDNN | PyTorch GFLOP/s | "
         "convd / PyTorch | forward conv GFLOP/s (equal work) | transpose / forward | max abs error vs reference | "
         "segregated weights (bytes) | largest op (bytes) | zero-inserted input (bytes, not allocated) |\n");
  printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  double ratios[NSHAPES], vs_dnnl[NSHAPES], vs_fwd[NSHAPES];
  int nr = 0, nd = 0;
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
    p.dtype = dtype;
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) {
      fprintf(stderr, "bench_transpose: %s\n", err);
      return 1;
    }
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes);
    float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes);
    for (size_t k = 0; k < c.input_elems; k++) x[k] = (float)((k * 2654435761u) % 1000) / 500.0f - 1.0f;
    for (size_t k = 0; k < c.weight_elems; k++) w[k] = (float)((k * 40503u) % 1000) / 5000.0f - 0.1f;
    if (dtype == CONVD_BF16) { /* bfloat16 values, as a client sends them (the daemon widens them exactly) */
      convd_dtype_round(CONVD_BF16, x, c.input_elems);
      convd_dtype_round(CONVD_BF16, w, c.weight_elems);
    }
    for (size_t k = 0; k < c.bias_elems; k++) b[k] = 0.01f * (float)k;
    convd_job_stats st;
    /* Rounds: each a fresh engine's timings (its first calls warm up, and tune a native
     * transpose's layout) and then oneDNN's on a thread of their own, so that both sample the
     * same stretches of a shared machine. One OpenMP team at a time: the peer runs with no
     * engine alive. */
    const int per = (repeats + rounds - 1) / rounds;
    double *ts = malloc(sizeof(double) * (size_t)(per * rounds)), *dts = malloc(sizeof(double) * (size_t)(per * rounds));
    int rc = 0, dnnl_ok = 1;
    /* The weights keyed by content, as the daemon keys every call's (its digest): devices keep
     * them reordered across calls, as oneDNN's peer below keeps its. */
    const uint64_t key = 0x7e5700 + i;
    for (int r = 0; r < rounds && rc == 0; r++) {
      rc = convd_engine_create(&eo, &e, err, sizeof err);
      const double warm_until = now() + WARM_SECONDS;
      for (int k = 0; (k < 3 || now() < warm_until) && rc == 0; k++)
        rc = convd_engine_run_keyed(e, &c, x, w, b, y, key, &st, err, sizeof err);
      for (int k = 0; k < per && rc == 0; k++) {
        double t0 = now();
        rc = convd_engine_run_keyed(e, &c, x, w, b, y, key, &st, err, sizeof err);
        ts[r * per + k] = now() - t0;
      }
      if (e) convd_engine_destroy(e);
      e = NULL;
      deconv_arg da = {&c, x, w, b, y, threads, per, dts + r * per, 0};
      dnnl_ok = dnnl_ok && rc == 0 && deconv_times(&da);
    }
    if (rc) {
      fprintf(stderr, "bench_transpose: %s\n", err);
      return 1;
    }
    /* The output checked is convd's (the peer wrote y last): one more call into poisoned y. */
    for (size_t k = 0; k < c.output_elems; k++) y[k] = NAN;
    rc = convd_engine_create(&eo, &e, err, sizeof err);
    if (rc == 0) rc = convd_engine_run_keyed(e, &c, x, w, b, y, key, &st, err, sizeof err);
    if (rc) {
      fprintf(stderr, "bench_transpose: %s\n", err);
      return 1;
    }
    convd_ref_conv_transpose2d(&c, x, w, b, ref, NULL);
    double worst = 0;
    for (size_t k = 0; k < c.output_elems; k++) {
      double d = y[k] - ref[k];
      if (d < 0) d = -d;
      if (isnan(d)) { /* an element not written */
        worst = INFINITY;
        break;
      }
      if (d > worst) worst = d;
    }
    const double med = median_of(ts, per * rounds), gflop = 2.0 * (double)c.macs / 1e9;
    /* The forward convolution of exactly this work: the same input, channels and kernel at
     * stride 1, padded to keep the size (k-1 split top/bottom, the extra one at the bottom). */
    convd_conv_params fp;
    convd_conv_params_default(&fp);
    fp.n = p.n, fp.c_in = p.c_in, fp.h = p.h, fp.w = p.w, fp.c_out = p.c_out, fp.c_per_group = p.c_in;
    fp.kh = fp.kw = p.kh, fp.has_bias = 1, fp.dtype = dtype;
    fp.pad_top = fp.pad_left = (p.kh - 1) / 2, fp.pad_bottom = fp.pad_right = p.kh - 1 - (p.kh - 1) / 2;
    convd_conv fc;
    double fwd = 0;
    if (convd_conv_init(&fc, &fp, err, sizeof err) == 0 && fc.macs == c.macs) {
      float *fw = malloc(fc.weight_bytes), *fy = malloc(fc.output_bytes);
      for (size_t k = 0; k < fc.weight_elems; k++) fw[k] = w[k];
      double *ft = malloc(sizeof(double) * (size_t)repeats);
      for (int k = -3; k < repeats && rc == 0; k++) {
        double t0 = now();
        rc = convd_engine_run_keyed(e, &fc, x, fw, b, fy, key + 0x100, NULL, err, sizeof err);
        if (k >= 0) ft[k] = now() - t0;
      }
      if (rc == 0) fwd = gflop / median_of(ft, repeats);
      free(fw), free(fy), free(ft);
    }
    convd_plan pl;
    convd_engine_plan(e, &c, &pl, err, sizeof err);
    convd_engine_destroy(e);
    e = NULL;
    const double dnnl = dnnl_ok ? gflop / median_of(dts, per * rounds) : 0;
    /* The usual method: the input with stride-1 zeros between its elements and k-1-p zero
     * borders (plus output_padding), convolved with the flipped kernel. */
    const int64_t zh = (p.h - 1) * p.stride_h + 1 + 2 * (p.kh - 1 - p.pad_top) + p.out_pad_h;
    const int64_t zw = (p.w - 1) * p.stride_w + 1 + 2 * (p.kw - 1 - p.pad_left) + p.out_pad_w;
    const double zbytes = 4.0 * (double)p.n * (double)p.c_in * (double)zh * (double)zw;
    const double ours = gflop / med, theirs = torch_s[i] > 0 ? gflop / torch_s[i] : 0;
    if (theirs > 0) ratios[nr++] = ours / theirs;
    if (dnnl > 0 && fwd > 0) vs_dnnl[nd] = ours / dnnl, vs_fwd[nd++] = ours / fwd;
    printf("| %s | %llu | %.1f | %.1f | %.2f | %.1f | %.2f | %.1f | %.2f | %.2g | %zu | %llu | %.0f |\n", s->name,
           (unsigned long long)st.ops, ours, dnnl, dnnl > 0 ? ours / dnnl : 0, theirs, theirs > 0 ? ours / theirs : 0,
           fwd, fwd > 0 ? ours / fwd : 0, worst, c.weight_bytes, (unsigned long long)(pl.op_bytes / 2), zbytes);
    fflush(stdout);
    free(ts), free(dts), free(x), free(w), free(b), free(y), free(ref);
  }
  printf("\n");
  if (nr) printf("median convd / PyTorch: %.2f\n", median_of(ratios, nr));
  if (nd) {
    printf("median convd transpose / forward convolution of equal work: %.2f\n", median_of(vs_fwd, nd));
    printf("median convd / oneDNN deconvolution: %.2f\n", median_of(vs_dnnl, nd));
    printf("min convd / oneDNN deconvolution: %.2f\n", vs_dnnl[0]); /* sorted by median_of */
  }
  return 0;
}
