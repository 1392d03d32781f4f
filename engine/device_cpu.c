/* The CPU device: oneDNN's forward convolution (direct algorithm, so results differ from the
 * reference only by float32 summation order), its weights reordered once per block into the
 * layout oneDNN prefers and kept in a small LRU cache. A bfloat16 request on a CPU with bf16
 * units (AVX512-BF16 or AMX, found at creation) runs that convolution with bf16 input and
 * weights, float32 accumulation and a float32 output: its tensors hold bfloat16 values already,
 * so the conversion in the reorders is exact and only the summation order differs from float32.
 * Everything else (float32, float16, and the depthwise, pointwise and small-spatial kernels)
 * computes in float32. oneDNN is built on OpenMP in Debian: each
 * device sets its own thread count on its worker thread, so several CPU devices can split the
 * host.
 *
 * Threads: run() and flush_cache() on the device's worker thread only, so the caches, staging
 * buffers and oneDNN stream of a context take no lock; stats() reads the counters, kept with
 * relaxed atomics, from any thread. */
#include <float.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "cpu_kernels.h"
#include "device_impl.h"
#include "dtype.h"
#include "err.h"
#include "ref.h"

#ifdef CONVD_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#define WCACHE_ENTRIES 32

typedef struct wcache_entry {
  uint64_t key;
  dnnl_memory_desc_t md; /* the layout the weights were reordered into */
  dnnl_memory_t mem;
  uint64_t last_use;
} wcache_entry;

#define PCACHE_ENTRIES 16

/* A ready primitive for one op shape: creating the descriptor walks oneDNN's implementation
 * list, which costs more than a small convolution. */
typedef struct prim_entry {
  convd_conv_params key;
  int with_bias, bf16;
  int sum;    /* adds onto its output (a chain's later blocks: oneDNN's sum post-op) */
  int layout; /* a transpose's: its index in transpose_layouts */
  dnnl_primitive_desc_t pd;
  dnnl_primitive_t prim;
  uint64_t last_use;
} prim_entry;

#define RCACHE_ENTRIES 32

/* A ready reorder between two layouts: an op reorders its input window in and its tile out, and
 * the same views recur from op to op. */
typedef struct reorder_entry {
  dnnl_memory_desc_t from, to;
  dnnl_primitive_desc_t pd;
  dnnl_primitive_t prim;
  uint64_t last_use;
} reorder_entry;

/* The layout a transpose shape was tuned to (transpose_prim), kept past the primitive. */
#define TUNED_ENTRIES 64
typedef struct tuned_entry {
  convd_conv_params key;
  int bf16, layout, used;
} tuned_entry;

typedef struct cpu_ctx {
  int threads;
  int bf16; /* 1: bfloat16 requests convolve in bf16 (the CPU has bf16 units) */
  int amx;  /* 1: those units are AMX tiles */
  prim_entry prims[PCACHE_ENTRIES];
  reorder_entry reorders[RCACHE_ENTRIES];
  tuned_entry tuned[TUNED_ENTRIES];
  unsigned tuned_next;
  int only_layout; /* -1, or the one transpose layout to use ($CONVD_TEST_TRANSPOSE_LAYOUT, tests) */
  uint64_t ref_transposes; /* relaxed atomics: convd_device_cpu_reference_transposes reads it */
  dnnl_engine_t eng;
  dnnl_stream_t stream;
  wcache_entry cache[WCACHE_ENTRIES];
  uint64_t tick;
  convd_device_stats st; /* updated with relaxed atomics: read from other threads */
  /* Primitives take their scratchpad from us (user mode): by default oneDNN keeps it in
   * thread-local storage of the creating thread, counted by the primitives alive on that thread,
   * so destroying a device from another thread than its worker leaked it. */
  dnnl_primitive_attr_t attr;
  dnnl_primitive_attr_t attr_sum; /* the same, plus a sum post-op: dst += conv */
  /* A chain's sum (convd_op_io.chain_*): the tile in the primitive's output layout, or dense for
   * the sgemm paths, built up block by block and copied into y at the last one. */
  void *acc_buf;
  size_t acc_cap;
  dnnl_memory_desc_t acc_md;
  int chain_next, chain_len; /* the block expected next (0: none open), of how many */
  int chain_path;            /* the open chain's: 0 oneDNN's convolution, 1 pointwise, 2 small-spatial */
  /* reused staging for src/dst in oneDNN's blocked layouts, and the scratchpad */
  void *src_buf, *dst_buf, *scratch_buf;
  size_t src_cap, dst_cap, scratch_cap;
} cpu_ctx;

#define DNNL_TRY(call)                                                                        \
  do {                                                                                        \
    dnnl_status_t st_ = (call);                                                               \
    if (st_ != dnnl_success) {                                                                \
      rc = convd_errf(err, errlen, CONVD_EDEVICE, "oneDNN %s failed with status %d (%s:%d)", \
                      #call, (int)st_, __FILE__, __LINE__);                                   \
      goto out;                                                                               \
    }                                                                                         \
  } while (0)

static int grow(void **buf, size_t *cap, size_t want) {
  if (want <= *cap) return 0;
  void *p = NULL;
  if (posix_memalign(&p, 64, want ? want : 64)) return -1;
  free(*buf);
  *buf = p;
  *cap = want;
  return 0;
}

/* The scratchpad memory pd needs, in the device's reused buffer; NULL when it needs none. */
static int scratchpad(cpu_ctx *c, const_dnnl_primitive_desc_t pd, dnnl_memory_t *out, char *err,
                      size_t errlen) {
  int rc = 0;
  *out = NULL;
  const dnnl_memory_desc_t *md = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
  size_t size = md ? dnnl_memory_desc_get_size(md) : 0;
  if (size == 0) return 0;
  if (grow(&c->scratch_buf, &c->scratch_cap, size))
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory for a scratchpad");
  DNNL_TRY(dnnl_memory_create(out, md, c->eng, c->scratch_buf));
out:
  return rc;
}

static int cpu_supports(void *ctx, const convd_conv *conv) {
  (void)ctx, (void)conv;
  return 1;
}

/* Copies memory from into memory to, converting the layout, with a cached reorder primitive. */
static int reorder(cpu_ctx *c, dnnl_memory_t from, dnnl_memory_t to, char *err, size_t errlen) {
  int rc = 0;
  dnnl_primitive_desc_t pd = NULL;
  dnnl_primitive_t prim = NULL;
  dnnl_memory_t scratch = NULL;
  const dnnl_memory_desc_t *fmd, *tmd;
  DNNL_TRY(dnnl_memory_get_memory_desc(from, &fmd));
  DNNL_TRY(dnnl_memory_get_memory_desc(to, &tmd));
  reorder_entry *re = NULL, *victim = &c->reorders[0];
  for (int i = 0; i < RCACHE_ENTRIES && re == NULL; i++) {
    reorder_entry *x = &c->reorders[i];
    if (x->prim && dnnl_memory_desc_equal(&x->from, fmd) && dnnl_memory_desc_equal(&x->to, tmd))
      re = x;
    else if (x->prim == NULL || (victim->prim && x->last_use < victim->last_use))
      victim = x;
  }
  if (re == NULL) {
    DNNL_TRY(dnnl_reorder_primitive_desc_create(&pd, fmd, c->eng, tmd, c->eng, c->attr));
    DNNL_TRY(dnnl_primitive_create(&prim, pd));
    if (victim->prim) dnnl_primitive_destroy(victim->prim);
    if (victim->pd) dnnl_primitive_desc_destroy(victim->pd);
    re = victim;
    re->from = *fmd;
    re->to = *tmd;
    re->pd = pd;
    re->prim = prim;
    pd = NULL; /* the cache owns them */
    prim = NULL;
  }
  re->last_use = ++c->tick;
  if ((rc = scratchpad(c, re->pd, &scratch, err, errlen))) goto out;
  dnnl_exec_arg_t args[3] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratch}};
  DNNL_TRY(dnnl_primitive_execute(re->prim, c->stream, scratch ? 3 : 2, args));
out:
  if (scratch) dnnl_memory_destroy(scratch);
  if (prim) dnnl_primitive_destroy(prim);
  if (pd) dnnl_primitive_desc_destroy(pd);
  return rc;
}

static int same_params(const convd_conv_params *a, const convd_conv_params *b) {
  return a->n == b->n && a->c_in == b->c_in && a->h == b->h && a->w == b->w &&
         a->c_out == b->c_out && a->c_per_group == b->c_per_group && a->kh == b->kh &&
         a->kw == b->kw && a->stride_h == b->stride_h && a->stride_w == b->stride_w &&
         a->pad_top == b->pad_top && a->pad_bottom == b->pad_bottom &&
         a->pad_left == b->pad_left && a->pad_right == b->pad_right && a->dil_h == b->dil_h &&
         a->dil_w == b->dil_w && a->groups == b->groups && a->transposed == b->transposed &&
         a->out_pad_h == b->out_pad_h && a->out_pad_w == b->out_pad_w;
}

static void prim_clear(prim_entry *e) {
  if (e->prim) dnnl_primitive_destroy(e->prim);
  if (e->pd) dnnl_primitive_desc_destroy(e->pd);
  memset(e, 0, sizeof *e);
}

static wcache_entry *cache_find(cpu_ctx *c, uint64_t key, const dnnl_memory_desc_t *md) {
  if (key == 0) return NULL;
  for (int i = 0; i < WCACHE_ENTRIES; i++)
    if (c->cache[i].mem && c->cache[i].key == key && dnnl_memory_desc_equal(&c->cache[i].md, md)) {
      c->cache[i].last_use = ++c->tick;
      return &c->cache[i];
    }
  return NULL;
}

static wcache_entry *cache_slot(cpu_ctx *c) {
  wcache_entry *victim = &c->cache[0];
  for (int i = 0; i < WCACHE_ENTRIES; i++) {
    if (c->cache[i].mem == NULL) return &c->cache[i];
    if (c->cache[i].last_use < victim->last_use) victim = &c->cache[i];
  }
  dnnl_memory_destroy(victim->mem);
  memset(victim, 0, sizeof *victim);
  return victim;
}

/* A 1x1 convolution with unit stride and no padding whose views have whole rows is a matrix
 * product per batch item and group, Y[O x HW] = W[O x I] X[I x HW], that sgemm runs in place on
 * the NCHW views: no reorder in or out. */
/* chained: the product goes to the chain's dense sum, not to y, whose rows may then be a tile's. */
static int is_pointwise(const convd_op_io *io, int chained) {
  const convd_conv_params *p = &io->conv->p;
  return p->kh == 1 && p->kw == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0 &&
         p->pad_bottom == 0 && p->pad_left == 0 && p->pad_right == 0 && io->x.hs == (size_t)p->w &&
         (chained || io->y.hs == (size_t)io->conv->w_out) && io->w.cs == 1;
}

/* yv: where the product goes (io->y, or a chain's sum); add: onto what yv holds (a chain's
 * later blocks). */
static int run_pointwise(const convd_op_io *io, convd_view yv, int add, char *err, size_t errlen) {
  const convd_conv_params *p = &io->conv->p;
  const int64_t og = p->c_out / p->groups, ig = p->c_per_group, hw = p->h * p->w;
  for (int64_t n = 0; n < p->n; n++)
    for (int64_t g = 0; g < p->groups; g++) {
      float *y = yv.p + (size_t)n * yv.ns + (size_t)(g * og) * yv.cs;
      const float *x = io->x.p + (size_t)n * io->x.ns + (size_t)(g * ig) * io->x.cs;
      const float *w = io->w.p + (size_t)(g * og) * io->w.ns;
      float beta = add ? 1.0f : 0.0f;
      if (io->b && !add) { /* the product adds to the bias */
        for (int64_t o = 0; o < og; o++)
          for (int64_t i = 0; i < hw; i++) y[(size_t)o * yv.cs + (size_t)i] = io->b[g * og + o];
        beta = 1.0f;
      }
      dnnl_status_t st = dnnl_sgemm('N', 'N', og, hw, ig, 1.0f, w, (dnnl_dim_t)io->w.ns, x,
                                    (dnnl_dim_t)io->x.cs, beta, y, (dnnl_dim_t)yv.cs);
      if (st != dnnl_success)
        return convd_errf(err, errlen, CONVD_EDEVICE, "oneDNN sgemm (%lld x %lld x %lld) failed with status %d",
                          (long long)og, (long long)hw, (long long)ig, (int)st);
    }
  return 0;
}

/* Few output positions and a long reduction (deep layers on small images, a transpose's phases
 * of a DCGAN generator): oneDNN's direct convolution has too little spatial work to spread and
 * reorders the whole weight block each time; as im2col + sgemm the weights are used where they
 * lie (each output channel's C_in/groups x kH x kW taps are contiguous) and the columns are small. */
#define SMALL_SPATIAL_MAX 64
static int is_small_spatial(const convd_op_io *io, int chained) {
  const convd_conv_params *p = &io->conv->p;
  const int64_t hw = io->conv->h_out * io->conv->w_out, k = p->c_per_group * p->kh * p->kw;
  return hw <= SMALL_SPATIAL_MAX && k >= 256 && (chained || io->y.hs == (size_t)io->conv->w_out) &&
         io->w.hs == (size_t)p->kw && io->w.cs == (size_t)(p->kh * p->kw);
}

static int run_small_spatial(cpu_ctx *c, const convd_op_io *io, convd_view yv, int add, char *err, size_t errlen) {
  const convd_conv *cv = io->conv;
  const convd_conv_params *p = &cv->p;
  const int64_t og = p->c_out / p->groups, ig = p->c_per_group, hw = cv->h_out * cv->w_out;
  const int64_t k = ig * p->kh * p->kw;
  if (grow(&c->src_buf, &c->src_cap, (size_t)(k * hw) * sizeof(float)))
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory staging an op's columns");
  float *cols = c->src_buf;
  for (int64_t n = 0; n < p->n; n++)
    for (int64_t g = 0; g < p->groups; g++) {
      /* cols[(ci, ky, kx)][(oy, ox)]: the input under each tap, zero in the padding */
      float *col = cols;
      for (int64_t ci = 0; ci < ig; ci++) {
        const float *xp = io->x.p + (size_t)n * io->x.ns + (size_t)(g * ig + ci) * io->x.cs;
        for (int64_t ky = 0; ky < p->kh; ky++)
          for (int64_t kx = 0; kx < p->kw; kx++)
            for (int64_t oy = 0; oy < cv->h_out; oy++) {
              const int64_t iy = oy * p->stride_h - p->pad_top + ky * p->dil_h;
              for (int64_t ox = 0; ox < cv->w_out; ox++) {
                const int64_t ix = ox * p->stride_w - p->pad_left + kx * p->dil_w;
                *col++ = iy >= 0 && iy < p->h && ix >= 0 && ix < p->w ? xp[(size_t)iy * io->x.hs + (size_t)ix] : 0.0f;
              }
            }
      }
      float *y = yv.p + (size_t)n * yv.ns + (size_t)(g * og) * yv.cs;
      const float *w = io->w.p + (size_t)(g * og) * io->w.ns;
      float beta = add ? 1.0f : 0.0f;
      if (io->b && !add) {
        for (int64_t o = 0; o < og; o++)
          for (int64_t i = 0; i < hw; i++) y[(size_t)o * yv.cs + (size_t)i] = io->b[g * og + o];
        beta = 1.0f;
      }
      dnnl_status_t st = dnnl_sgemm('N', 'N', og, hw, k, 1.0f, w, (dnnl_dim_t)io->w.ns, cols, hw, beta,
                                    y, (dnnl_dim_t)yv.cs);
      if (st != dnnl_success)
        return convd_errf(err, errlen, CONVD_EDEVICE, "oneDNN sgemm (%lld x %lld x %lld) failed with status %d",
                          (long long)og, (long long)hw, (long long)k, (int)st);
    }
  return 0;
}

/* Below this many multiply-adds an op runs on the worker thread alone: waking a passive OpenMP
 * team costs tens of microseconds, more than such an op computes (a 1x1x8x8 call through the
 * daemon is about 100 us end to end). */
#define CPU_SERIAL_MACS (256 * 1024)

static int threads_for(const cpu_ctx *c, const convd_op_io *io) {
  const convd_conv_params *p = &io->conv->p;
  double macs = (double)p->n * (double)p->c_out * (double)io->conv->h_out * (double)io->conv->w_out *
                (double)p->c_per_group * (double)p->kh * (double)p->kw;
  /* The own depthwise kernel computes about a fifth as many multiply-adds a second as oneDNN's
   * dense ones (21 vs 110 GFLOP/s, bench_conv), so its ops pay for the team's wake-up at a
   * quarter of the size: a 16-op plan of 1x32x112x112 depthwise 3x3 (226 K each) went from 0.55
   * to 0.65-0.86 of one op (AVX2). */
  const double serial = !p->transposed && convd_cpuk_is_depthwise(io->conv) ? CPU_SERIAL_MACS / 4 : CPU_SERIAL_MACS;
  return macs < serial ? 1 : c->threads;
}

/* A whole transpose (a native plan's op: dense views of the item) on the reference kernel. */
static int transpose_by_reference(const convd_op_io *io, char *err, size_t errlen) {
  const convd_conv *cv = io->conv;
  const convd_conv_params *p = &cv->p;
  if (!convd_view_is_dense(&io->x, 1, p->c_in, p->h, p->w) ||
      !convd_view_is_dense(&io->y, 1, p->c_out, cv->h_out, cv->w_out) ||
      !convd_view_is_dense(&io->w, p->c_in, p->c_out / p->groups, p->kh, p->kw))
    return convd_errf(err, errlen, CONVD_EINTERNAL, "a transpose op with strided tensors oneDNN cannot take");
  const int rc = convd_ref_conv_transpose2d(cv, io->x.p, io->w.p, io->b, io->y.p, io->cancel);
  if (rc) return convd_errf(err, errlen, rc, "a transpose op on the reference kernel: %s", convd_strerror(rc));
  return 0;
}

/* The caller's tensors as oneDNN memory descriptors: strided views as they lie (a window of a
 * row band, a tile of the output rows, a block of the weights). */
typedef struct user_mds {
  dnnl_memory_desc_t src, wei, dst, bias;
} user_mds;

/* One convolution on a ready primitive: input, weights and output reordered where the
 * primitive's layouts differ from the caller's (the input into staging, the weights once per
 * key into the cache, the output out of staging). */
/* keep: the output stays in the primitive's layout in dst_buf (a transpose's columns, which
 * col2im sums into y), u->dst and io->y unused. */
static int exec_prim(cpu_ctx *c, const convd_op_io *io, const prim_entry *pe, const user_mds *u, int chained,
                     int last, int keep, char *err, size_t errlen) {
  int rc = 0;
  dnnl_memory_t usr_src = NULL, usr_wei = NULL, usr_dst = NULL, bias = NULL;
  dnnl_memory_t src = NULL, wei_tmp = NULL, dst = NULL, scratch = NULL, acc = NULL;
  const dnnl_memory_desc_t *src_md = dnnl_primitive_desc_query_md(pe->pd, dnnl_query_src_md, 0);
  const dnnl_memory_desc_t *wei_md = dnnl_primitive_desc_query_md(pe->pd, dnnl_query_weights_md, 0);
  const dnnl_memory_desc_t *dst_md = dnnl_primitive_desc_query_md(pe->pd, dnnl_query_dst_md, 0);

  /* Input: used in place when the primitive takes the caller's layout, else reordered into staging. */
  DNNL_TRY(dnnl_memory_create(&usr_src, &u->src, c->eng, (void *)io->x.p));
  if (dnnl_memory_desc_equal(src_md, &u->src)) {
    src = usr_src;
  } else {
    if (grow(&c->src_buf, &c->src_cap, dnnl_memory_desc_get_size(src_md))) goto oom;
    DNNL_TRY(dnnl_memory_create(&src, src_md, c->eng, c->src_buf));
    if ((rc = reorder(c, usr_src, src, err, errlen))) goto out;
  }
  /* Weights: from the cache, or reordered once and cached under the op's key. */
  dnnl_memory_t wei;
  wcache_entry *hit = cache_find(c, io->w_key, wei_md);
  if (io->w_key) __atomic_fetch_add(hit ? &c->st.weight_cache_hits : &c->st.weight_cache_misses, 1, __ATOMIC_RELAXED);
  DNNL_TRY(dnnl_memory_create(&usr_wei, &u->wei, c->eng, (void *)io->w.p));
  if (hit) {
    wei = hit->mem;
  } else if (dnnl_memory_desc_equal(wei_md, &u->wei)) {
    wei = usr_wei;
  } else {
    DNNL_TRY(dnnl_memory_create(&wei_tmp, wei_md, c->eng, DNNL_MEMORY_ALLOCATE));
    if ((rc = reorder(c, usr_wei, wei_tmp, err, errlen))) goto out;
    __atomic_fetch_add(&c->st.weight_bytes_loaded, (uint64_t)dnnl_memory_desc_get_size(wei_md), __ATOMIC_RELAXED);
    wei = wei_tmp;
    if (io->w_key != 0) { /* the cache takes it */
      wcache_entry *e = cache_slot(c);
      e->key = io->w_key;
      e->md = *wei_md;
      e->mem = wei_tmp;
      e->last_use = ++c->tick;
      wei_tmp = NULL;
    }
  }
  if (!keep) DNNL_TRY(dnnl_memory_create(&usr_dst, &u->dst, c->eng, io->y.p));
  if (chained) {
    /* A chain's sum lives in acc_buf, in the layout of its first block's primitive (acc_md);
     * a later block whose primitive wants another layout gets it through dst_buf. */
    if (!pe->sum) {
      if (grow(&c->acc_buf, &c->acc_cap, dnnl_memory_desc_get_size(dst_md))) goto oom;
      c->acc_md = *dst_md;
    }
    DNNL_TRY(dnnl_memory_create(&acc, &c->acc_md, c->eng, c->acc_buf));
    if (dnnl_memory_desc_equal(dst_md, &c->acc_md)) {
      dst = acc;
    } else {
      if (grow(&c->dst_buf, &c->dst_cap, dnnl_memory_desc_get_size(dst_md))) goto oom;
      DNNL_TRY(dnnl_memory_create(&dst, dst_md, c->eng, c->dst_buf));
      if ((rc = reorder(c, acc, dst, err, errlen))) goto out;
    }
  } else if (!keep && dnnl_memory_desc_equal(dst_md, &u->dst)) {
    dst = usr_dst;
  } else {
    if (grow(&c->dst_buf, &c->dst_cap, dnnl_memory_desc_get_size(dst_md))) goto oom;
    DNNL_TRY(dnnl_memory_create(&dst, dst_md, c->eng, c->dst_buf));
  }
  if (io->b) DNNL_TRY(dnnl_memory_create(&bias, &u->bias, c->eng, (void *)io->b));

  if ((rc = scratchpad(c, pe->pd, &scratch, err, errlen))) goto out;
  dnnl_exec_arg_t args[5] = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
  int nargs = 3;
  if (bias) args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, bias};
  if (scratch) args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, scratch};
  DNNL_TRY(dnnl_primitive_execute(pe->prim, c->stream, nargs, args));
  if (chained) {
    if (dst != acc && (rc = reorder(c, dst, acc, err, errlen))) goto out;
    if (last && (rc = reorder(c, acc, usr_dst, err, errlen))) goto out;
  } else if (!keep && dst != usr_dst && (rc = reorder(c, dst, usr_dst, err, errlen))) {
    goto out;
  }
  DNNL_TRY(dnnl_stream_wait(c->stream));
  goto out;
oom:
  rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory staging an op");
out:
  if (src && src != usr_src) dnnl_memory_destroy(src);
  if (dst && dst != usr_dst && dst != acc) dnnl_memory_destroy(dst);
  if (acc) dnnl_memory_destroy(acc);
  if (usr_src) dnnl_memory_destroy(usr_src);
  if (usr_wei) dnnl_memory_destroy(usr_wei);
  if (usr_dst) dnnl_memory_destroy(usr_dst);
  if (wei_tmp) dnnl_memory_destroy(wei_tmp);
  if (bias) dnnl_memory_destroy(bias);
  if (scratch) dnnl_memory_destroy(scratch);
  return rc;
}

/* Drops the cached weights of key in layout md (a layout a transpose was tuned away from). */
static void cache_drop(cpu_ctx *c, uint64_t key, const dnnl_memory_desc_t *md) {
  for (int i = 0; i < WCACHE_ENTRIES; i++)
    if (key && c->cache[i].mem && c->cache[i].key == key && dnnl_memory_desc_equal(&c->cache[i].md, md)) {
      dnnl_memory_destroy(c->cache[i].mem);
      memset(&c->cache[i], 0, sizeof c->cache[i]);
    }
}

/* The layouts a transpose may run its deconvolution in, oneDNN's own choice first. oneDNN picks
 * by format alone, and on these shapes its pick was not the fastest: 1024 -> 512 channels on a
 * 4x4 input ran 1.56x faster in NHWC, a 128 -> 3 output layer 2.8x faster with a plain NCHW
 * input (its GEMM kernel), while on the middle DCGAN layers its pick was best (measured,
 * docs/benchmarks.md). So the device times them on the op's own data the first time it meets
 * a shape, and remembers the winner. */
/* The last is no deconvolution: a 1x1 convolution of the input into c_out x kh x kw channels
 * (one per output channel and tap: a matrix product whose weights oneDNN packs once) that
 * col2im sums into the output; on 512 -> 256 channels on 8x8 it ran 1.4x the deconvolution, on
 * 128 -> 3 2.3x (AVX2, docs/benchmarks.md). */
static const struct {
  dnnl_format_tag_t src, dst;
  int cols; /* 1: the 1x1 convolution and col2im (exec_cols) */
} transpose_layouts[] = {
    {dnnl_format_tag_any, dnnl_format_tag_any, 0},
    {dnnl_nhwc, dnnl_nhwc, 0},
    {dnnl_nchw, dnnl_format_tag_any, 0},
    {dnnl_format_tag_any, dnnl_nchw, 0},
    {dnnl_format_tag_any, dnnl_format_tag_any, 1},
};
#define NLAYOUTS (int)(sizeof transpose_layouts / sizeof transpose_layouts[0])
/* Tuning runs each form once to warm it up, then TUNE_ROUNDS timed rounds, fewer where the
 * rounds would take over TUNE_BUDGET_SECONDS by the warm-up's measure (two, or one when the
 * warm-up alone took that long); a shape whose first run took longer than TUNE_MAX_SECONDS
 * keeps oneDNN's choice instead (the tuning would cost more than it could win back soon). At
 * worst, five forms of a 250 ms op, that is about 2.5 s once per shape. The upsampler layer
 * (1x256x64x64 -> 128, 25 ms a run, 60 ms the first) ran 1.3x faster in the column form. */
#define TUNE_MAX_SECONDS 0.25
#define TUNE_BUDGET_SECONDS 0.5
#define TUNE_ROUNDS 4
/* Another layout replaces oneDNN's choice only when clearly faster (timing noise on a shared
 * machine is a few percent). */
#define TUNE_MARGIN 0.95

static int64_t tuned_layout(const cpu_ctx *c, const convd_conv_params *p, int bf16) {
  for (int i = 0; i < TUNED_ENTRIES; i++)
    if (c->tuned[i].used && c->tuned[i].bf16 == bf16 && same_params(&c->tuned[i].key, p)) return c->tuned[i].layout;
  return -1;
}

static void remember_layout(cpu_ctx *c, const convd_conv_params *p, int bf16, int layout) {
  tuned_entry *t = &c->tuned[c->tuned_next++ % TUNED_ENTRIES];
  t->key = *p;
  t->bf16 = bf16;
  t->layout = layout;
  t->used = 1;
}

/* The column form's intermediate (n x c_out*kh*kw x h x w float32, in dst_buf) is at most this
 * big; it is (kh*kw)/(stride_h*stride_w) times the output, which the planner does not count. */
#define COLS_MAX_BYTES ((double)(64 << 20))

/* The column form's weights as they lie: (C_in, C_out, kH, kW) read as C_out*kH*kW columns of
 * C_in, when the C_out, kH and kW strides make one (a dense block of output channels). Native
 * plans always hand over such weights (convd_plan_weight_view): the primitive and tuned-form
 * caches, keyed by shape, rely on it; other weights get an error, not a wrong answer. */
static int cols_user_wei(const convd_op_io *io, dnnl_memory_desc_t *md) {
  const convd_conv_params *p = &io->conv->p;
  if (io->w.hs != (size_t)p->kw || io->w.cs != (size_t)(p->kh * p->kw)) return 1;
  dnnl_dims_t dims = {p->c_out * p->kh * p->kw, p->c_in, 1, 1};
  dnnl_dims_t strides = {1, (dnnl_dim_t)io->w.ns, 1, 1};
  return dnnl_memory_desc_init_by_strides(md, 4, dims, dnnl_f32, strides) != dnnl_success;
}

/* The column form's 1x1 convolution, or 1 when it does not apply: columns too big, weights
 * that are no matrix, or a column layout col2im cannot read (blocked on anything but channels). */
static int cols_pd(cpu_ctx *c, const convd_op_io *io, dnnl_data_type_t cdt, dnnl_primitive_desc_t *pd) {
  const convd_conv_params *p = &io->conv->p;
  dnnl_memory_desc_t uwei;
  *pd = NULL;
  if (p->groups != 1 || cols_user_wei(io, &uwei)) return 1;
  dnnl_dims_t src_dims = {p->n, p->c_in, p->h, p->w}, dst_dims = {p->n, p->c_out * p->kh * p->kw, p->h, p->w};
  dnnl_dims_t wei_dims = {p->c_out * p->kh * p->kw, p->c_in, 1, 1}, ones = {1, 1}, zeros = {0, 0};
  dnnl_memory_desc_t src, wei, dst;
  dnnl_convolution_desc_t cd;
  if (dnnl_memory_desc_init_by_tag(&src, 4, src_dims, cdt, dnnl_format_tag_any) != dnnl_success ||
      dnnl_memory_desc_init_by_tag(&wei, 4, wei_dims, cdt, dnnl_format_tag_any) != dnnl_success ||
      dnnl_memory_desc_init_by_tag(&dst, 4, dst_dims, dnnl_f32, dnnl_format_tag_any) != dnnl_success ||
      dnnl_convolution_forward_desc_init(&cd, dnnl_forward_inference, dnnl_convolution_direct, &src, &wei, NULL,
                                         &dst, ones, zeros, zeros) != dnnl_success ||
      dnnl_primitive_desc_create(pd, &cd, c->attr, c->eng, NULL) != dnnl_success) {
    *pd = NULL;
    return 1;
  }
  const dnnl_memory_desc_t *cmd = dnnl_primitive_desc_query_md(*pd, dnnl_query_dst_md, 0);
  const dnnl_blocking_desc_t *bd = &cmd->format_desc.blocking;
  if (cmd->format_kind != dnnl_blocked || bd->inner_nblks > 1 || (bd->inner_nblks == 1 && bd->inner_idxs[0] != 1) ||
      (double)dnnl_memory_desc_get_size(cmd) > COLS_MAX_BYTES) { /* its size counts the padded channels */
    dnnl_primitive_desc_destroy(*pd);
    *pd = NULL;
    return 1;
  }
  return 0;
}

/* y = bias + the sum, over the taps that reach each output, of the columns: channel
 * (co*kh + i)*kw + j of input pixel (ih, iw) lands on (ih*stride - pad + i*dil, ...). Each
 * thread builds its own output rows (a row at a time, in cache), adding for every tap row that
 * reaches it each kernel column's run of input pixels. md: the columns' layout (cols_pd let
 * only plain or channel-blocked ones through). */
static int col2im(const convd_op_io *io, const dnnl_memory_desc_t *md, const float *cols, int threads) {
  const convd_conv *cv = io->conv;
  const convd_conv_params *p = &cv->p;
  const int64_t kk = p->kh * p->kw, ncols = p->c_out * kk, ho = cv->h_out, wo = cv->w_out;
  const dnnl_blocking_desc_t *bd = &md->format_desc.blocking;
  const int64_t blk = bd->inner_nblks ? bd->inner_blks[0] : 1, xs = bd->strides[3], sw = p->stride_w;
  int64_t *choff = malloc((size_t)ncols * sizeof *choff), *rtap = malloc((size_t)(ho * p->kh) * 2 * sizeof *rtap);
  int64_t *iw_run = malloc((size_t)p->kw * 2 * sizeof *iw_run);
  int *rn = malloc((size_t)ho * sizeof *rn);
  int rc = 0;
  if (!choff || !rtap || !iw_run || !rn) {
    rc = -1;
    goto out;
  }
  for (int64_t j = 0; j < ncols; j++) choff[j] = md->offset0 + (j / blk) * bd->strides[1] + j % blk;
  /* per output row: the tap rows that reach it (tap row offset in the channels, input row offset) */
  for (int64_t oh = 0; oh < ho; oh++) {
    rn[oh] = 0;
    for (int64_t i = 0; i < p->kh; i++) {
      const int64_t t = oh + p->pad_top - i * p->dil_h;
      if (t < 0 || t % p->stride_h || t / p->stride_h >= p->h) continue;
      int64_t *e = &rtap[(oh * p->kh + rn[oh]++) * 2];
      e[0] = i * p->kw, e[1] = (t / p->stride_h) * bd->strides[2];
    }
  }
  /* per kernel column j: the input columns [lo, hi) whose output column iw*sw - pad + j*dil lies in the row */
  for (int64_t j = 0; j < p->kw; j++) {
    const int64_t off = j * p->dil_w - p->pad_left;
    int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw, hi = (wo - 1 - off) >= 0 ? (wo - 1 - off) / sw + 1 : 0;
    if (hi > p->w) hi = p->w;
    iw_run[2 * j] = lo, iw_run[2 * j + 1] = hi > lo ? hi : lo;
  }
  for (int64_t n = 0; n < p->n; n++) {
    const float *cn0 = cols + n * bd->strides[0];
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t co = 0; co < p->c_out; co++)
      for (int64_t oh = 0; oh < ho; oh++) {
        float *yr = io->y.p + (size_t)n * io->y.ns + (size_t)co * io->y.cs + (size_t)oh * io->y.hs;
        const int64_t *ch = choff + co * kk, *rt = rtap + oh * p->kh * 2;
        const float b = io->b ? io->b[co] : 0.0f;
        for (int64_t ow = 0; ow < wo; ow++) yr[ow] = b;
        for (int r = 0; r < rn[oh]; r++)
          for (int64_t j = 0; j < p->kw; j++) {
            const float *src = cn0 + ch[rt[2 * r] + j] + rt[2 * r + 1];
            const int64_t off = j * p->dil_w - p->pad_left; /* may be negative: no pointer made from it */
            for (int64_t iw = iw_run[2 * j]; iw < iw_run[2 * j + 1]; iw++) yr[off + iw * sw] += src[iw * xs];
          }
      }
  }
out:
  free(choff), free(rtap), free(iw_run), free(rn);
  return rc;
}

/* A transpose in the column form: its 1x1 convolution into dst_buf, then col2im into y. */
static int exec_cols(cpu_ctx *c, const convd_op_io *io, const prim_entry *pe, const user_mds *u, int threads,
                     char *err, size_t errlen) {
  user_mds cu = *u;
  if (cols_user_wei(io, &cu.wei))
    return convd_errf(err, errlen, CONVD_EINTERNAL, "a column-form transpose whose weights are no matrix");
  convd_op_io cio = *io;
  cio.b = NULL; /* col2im adds it */
  const int rc = exec_prim(c, &cio, pe, &cu, 0, 1, 1, err, errlen);
  if (rc) return rc;
  if (col2im(io, dnnl_primitive_desc_query_md(pe->pd, dnnl_query_dst_md, 0), c->dst_buf, threads))
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory summing a transpose's columns");
  return 0;
}

/* One op on a ready primitive: a column-form transpose's, or any other. */
static int run_prim(cpu_ctx *c, const convd_op_io *io, const prim_entry *pe, const user_mds *u, int chained,
                    int last, int threads, char *err, size_t errlen) {
  if (io->conv->p.transposed && transpose_layouts[pe->layout].cols)
    return exec_cols(c, io, pe, u, threads, err, errlen);
  return exec_prim(c, io, pe, u, chained, last, 0, err, errlen);
}

/* The deconvolution of io's transpose in layout i, or 1 when oneDNN has none for it. */
static int transpose_pd(cpu_ctx *c, const convd_op_io *io, const user_mds *u, int i, dnnl_data_type_t cdt,
                        const dnnl_memory_desc_t *any_wei, dnnl_primitive_desc_t *pd) {
  const convd_conv_params *p = &io->conv->p;
  dnnl_dims_t src_dims = {p->n, p->c_in, p->h, p->w};
  dnnl_dims_t dst_dims = {p->n, p->c_out, io->conv->h_out, io->conv->w_out};
  dnnl_dims_t strides = {p->stride_h, p->stride_w};
  dnnl_dims_t dilates = {p->dil_h - 1, p->dil_w - 1};
  dnnl_dims_t pad_l = {p->pad_top, p->pad_left};
  dnnl_dims_t pad_r = {p->pad_bottom - p->out_pad_h, p->pad_right - p->out_pad_w};
  dnnl_memory_desc_t src, dst;
  dnnl_deconvolution_desc_t dd;
  *pd = NULL;
  if (transpose_layouts[i].cols) return cols_pd(c, io, cdt, pd);
  if (dnnl_memory_desc_init_by_tag(&src, 4, src_dims, cdt, transpose_layouts[i].src) != dnnl_success ||
      dnnl_memory_desc_init_by_tag(&dst, 4, dst_dims, dnnl_f32, transpose_layouts[i].dst) != dnnl_success ||
      dnnl_dilated_deconvolution_forward_desc_init(&dd, dnnl_forward_inference, dnnl_deconvolution_direct, &src,
                                                   any_wei, io->b ? &u->bias : NULL, &dst, strides, dilates,
                                                   pad_l, pad_r) != dnnl_success ||
      dnnl_primitive_desc_create(pd, &dd, c->attr, c->eng, NULL) != dnnl_success) {
    *pd = NULL;
    return 1;
  }
  return 0;
}

/* Whether two deconvolutions are the same: one implementation on the same layouts. */
static int same_pd(const_dnnl_primitive_desc_t a, const_dnnl_primitive_desc_t b) {
  const char *ia = NULL, *ib = NULL;
  if (dnnl_primitive_desc_query(a, dnnl_query_impl_info_str, 0, &ia) != dnnl_success ||
      dnnl_primitive_desc_query(b, dnnl_query_impl_info_str, 0, &ib) != dnnl_success || !ia || !ib ||
      strcmp(ia, ib) != 0)
    return 0;
  const dnnl_query_t q[] = {dnnl_query_src_md, dnnl_query_weights_md, dnnl_query_dst_md};
  for (int k = 0; k < 3; k++)
    if (!dnnl_memory_desc_equal(dnnl_primitive_desc_query_md(a, q[k], 0), dnnl_primitive_desc_query_md(b, q[k], 0)))
      return 0;
  return 1;
}

/* Drops the weights candidate k put into the cache while it was timed, unless the candidate
 * that is kept uses the same layout of them. */
static void drop_candidate_weights(cpu_ctx *c, const convd_op_io *io, const prim_entry *k, const prim_entry *keep) {
  const dnnl_memory_desc_t *md = dnnl_primitive_desc_query_md(k->pd, dnnl_query_weights_md, 0);
  if (keep == NULL || !dnnl_memory_desc_equal(md, dnnl_primitive_desc_query_md(keep->pd, dnnl_query_weights_md, 0)))
    cache_drop(c, io->w_key, md);
}

/* A transpose's primitive into *out, in the form tuned for its shape, tuning it now if the
 * shape is new: each candidate runs the op itself (1 + up to TUNE_ROUNDS times). *ran is
 * 1 when the output is computed already (the winner ran last). Returns 1 when no form takes
 * it (neither oneDNN's deconvolution nor the column form). Only the first candidate (oneDNN's
 * own choice, or the column form where oneDNN has none) may fail the op: another one that fails
 * is left out, as one its kernel list turns down. */
static int transpose_prim(cpu_ctx *c, const convd_op_io *io, const user_mds *u, int bf16,
                          const dnnl_memory_desc_t *any_wei, int threads, prim_entry *out, int *ran, char *err,
                          size_t errlen) {
  int rc = 0;
  *ran = 0;
  prim_entry cand[NLAYOUTS];
  memset(cand, 0, sizeof cand);
  int n = 0;
  const int64_t known = tuned_layout(c, &io->conv->p, bf16);
  for (int i = 0; i < NLAYOUTS; i++) {
    if ((known >= 0 && i != known) || (c->only_layout >= 0 && i != c->only_layout)) continue;
    dnnl_primitive_desc_t pd;
    if (transpose_pd(c, io, u, i, bf16 ? dnnl_bf16 : dnnl_f32, any_wei, &pd)) continue;
    const char *impl = NULL;
    int skip = n > 0 && (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success ||
                         impl == NULL || strncmp(impl, "ref", 3) == 0); /* oneDNN's reference kernel */
    for (int k = 0; k < n && !skip; k++) skip = same_pd(cand[k].pd, pd);
    if (skip) {
      dnnl_primitive_desc_destroy(pd);
      continue;
    }
    cand[n].pd = pd;
    dnnl_status_t st = dnnl_primitive_create(&cand[n].prim, pd);
    if (st != dnnl_success) {
      if (n == 0) {
        rc = convd_errf(err, errlen, st == dnnl_out_of_memory ? CONVD_ENOMEM : CONVD_EDEVICE,
                        "oneDNN could not create a deconvolution primitive (status %d)", (int)st);
        goto out;
      }
      prim_clear(&cand[n]);
      continue;
    }
    cand[n].with_bias = io->b != NULL;
    cand[n].key = io->conv->p;
    cand[n].layout = i;
    n++;
  }
  if (n == 0) return 1;
  int best = 0, last = -1;
  if (n > 1) {
    /* A warm-up run of each (its weights reordered, its reorders made), then TUNE_ROUNDS rounds
     * that take the candidates in turn, so that a slow stretch of a shared machine falls on all
     * of them; each one's fastest run counts. */
    double t_min[NLAYOUTS], first0 = 0;
    int alive[NLAYOUTS];
    for (int k = 0; k < n; k++) t_min[k] = DBL_MAX, alive[k] = 1;
    int rounds = TUNE_ROUNDS;
    double warm = 0; /* the warm-up round's time, all candidates */
    for (int r = 0; r <= rounds; r++) {
      for (int k = 0; k < n; k++) {
        if (!alive[k]) continue;
        if (io->cancel && atomic_load(io->cancel)) {
          rc = convd_errf(err, errlen, CONVD_ECANCELED, "the job was cancelled");
          goto out;
        }
        const double t0 = convd_now_seconds();
        const int erc = run_prim(c, io, &cand[k], u, 0, 1, threads, err, errlen);
        const double dt = convd_now_seconds() - t0;
        if (erc) {
          if (k == 0) {
            rc = erc;
            goto out;
          }
          alive[k] = 0, last = -1; /* left out; its partial output is not the answer */
          continue;
        }
        last = k;
        if (r > 0) {
          if (dt < t_min[k]) t_min[k] = dt;
          continue;
        }
        warm += dt;
        if (k == 0) {
          first0 = dt;
          if (dt > TUNE_MAX_SECONDS) goto chosen; /* too long to tune: oneDNN's choice */
        } else if (dt > 3 * first0) {
          alive[k] = 0; /* far behind oneDNN's choice, warm-up against warm-up */
        }
      }
      /* The warm-up (reorders and page faults included) overstates a round: a safe estimate. */
      if (r == 0 && warm * TUNE_ROUNDS > TUNE_BUDGET_SECONDS)
        rounds = warm >= TUNE_BUDGET_SECONDS       ? 1
                 : warm * 2 >= TUNE_BUDGET_SECONDS ? 2
                                                   : (int)(TUNE_BUDGET_SECONDS / warm);
    }
    for (int k = 1; k < n; k++)
      if (alive[k] && t_min[k] < t_min[0] * TUNE_MARGIN && t_min[k] < t_min[best]) best = k;
  chosen:
    for (int k = 0; k < n; k++)
      if (k != best) drop_candidate_weights(c, io, &cand[k], &cand[best]);
    *ran = last == best;
  }
  if (known < 0) remember_layout(c, &io->conv->p, bf16, cand[best].layout);
  *out = cand[best];
  memset(&cand[best], 0, sizeof cand[best]);
out:
  for (int k = 0; k < NLAYOUTS; k++) prim_clear(&cand[k]);
  return rc;
}

/* Copies an op's output (n x c_out x h_out x w_out) from view a into view b, row by row. */
static void copy_output(const convd_conv *cv, convd_view a, convd_view b) {
  const convd_conv_params *p = &cv->p;
  for (int64_t n = 0; n < p->n; n++)
    for (int64_t ch = 0; ch < p->c_out; ch++)
      for (int64_t h = 0; h < cv->h_out; h++)
        memcpy(b.p + (size_t)n * b.ns + (size_t)ch * b.cs + (size_t)h * b.hs,
               a.p + (size_t)n * a.ns + (size_t)ch * a.cs + (size_t)h * a.hs, (size_t)cv->w_out * sizeof(float));
}

static int cpu_run(void *ctx, const convd_op_io *io, char *err, size_t errlen) {
  cpu_ctx *c = ctx;
  const convd_conv_params *p = &io->conv->p;
  int rc = 0;
  const int threads = threads_for(c, io);
  omp_set_num_threads(threads);
  /* A native plan's transpose (convd_plan.native) goes to oneDNN's deconvolution below; the
   * own kernels are forward only. */
  /* A chain (the input-channel blocks of one tile, in order): the sum builds up in acc_buf and
   * reaches y at the last block. */
  const int chained = io->chain_len > 1;
  const int first = !chained || io->chain_pos == 0, last = !chained || io->chain_pos == io->chain_len - 1;
  if (chained) {
    /* The engine chains neither (a transpose's plan never, a depthwise op has one input channel
     * per group): a caller bug, refused with its own message. */
    if (p->transposed || convd_cpuk_is_depthwise(io->conv)) {
      c->chain_next = 0;
      return convd_errf(err, errlen, CONVD_EINTERNAL, "a %s op in a chain", p->transposed ? "transposed" : "depthwise");
    }
    if (io->chain_pos > 0 && (io->chain_pos != c->chain_next || io->chain_len != c->chain_len)) {
      c->chain_next = 0;
      return convd_errf(err, errlen, CONVD_EINTERNAL, "block %d of %d of a chain arrived out of order",
                        io->chain_pos, io->chain_len);
    }
    c->chain_next = last ? 0 : io->chain_pos + 1; /* back to 0 below if this block fails */
    c->chain_len = io->chain_len;
  }
  if (!p->transposed && convd_cpuk_is_depthwise(io->conv)) {
    if (convd_cpuk_depthwise(io->conv, io->x, io->w, io->b, io->y, threads))
      return convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory staging a depthwise op");
    return 0;
  }
  /* A chain keeps its first block's path: a smaller last block (fewer input channels) could
   * otherwise leave the sgemm path, and its sum with it. */
  int pw = !p->transposed && is_pointwise(io, chained), ss = !pw && !p->transposed && is_small_spatial(io, chained);
  if (chained && first) c->chain_path = pw ? 1 : ss ? 2 : 0;
  if (chained && !first) pw = c->chain_path == 1, ss = c->chain_path == 2;
  if (pw || ss) {
    convd_view yv = io->y;
    if (chained) {
      const convd_conv *cv = io->conv;
      const size_t elems = (size_t)p->n * (size_t)p->c_out * (size_t)cv->h_out * (size_t)cv->w_out;
      if ((first && grow(&c->acc_buf, &c->acc_cap, elems * sizeof(float))) || c->acc_cap < elems * sizeof(float)) {
        c->chain_next = 0;
        return convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory for a chain's sum");
      }
      yv = convd_view_dense(c->acc_buf, p->c_out, cv->h_out, cv->w_out);
    }
    rc = pw ? run_pointwise(io, yv, !first, err, errlen) : run_small_spatial(c, io, yv, !first, err, errlen);
    if (rc == 0 && chained && last) copy_output(io->conv, yv, io->y);
    if (rc) c->chain_next = 0;
    return rc;
  }
  dnnl_primitive_desc_t pd = NULL;
  dnnl_primitive_t prim = NULL;
  const int grouped = p->groups > 1;
  dnnl_dims_t src_dims = {p->n, p->c_in, p->h, p->w};
  dnnl_dims_t dst_dims = {p->n, p->c_out, io->conv->h_out, io->conv->w_out};
  dnnl_dims_t wei_dims = {p->c_out, p->c_per_group, p->kh, p->kw};
  dnnl_dims_t gwei_dims = {p->groups, p->c_out / p->groups, p->c_per_group, p->kh, p->kw};
  dnnl_dims_t bias_dims = {p->c_out};
  dnnl_dims_t strides = {p->stride_h, p->stride_w};
  dnnl_dims_t dilates = {p->dil_h - 1, p->dil_w - 1}; /* oneDNN counts the gaps */
  dnnl_dims_t pad_l = {p->pad_top, p->pad_left}, pad_r = {p->pad_bottom, p->pad_right};
  /* A transpose (one group, convd_plan.native): oneDNN's deconvolution weights are (OC, IC, KH,
   * KW), ours (C_in, C_out, kH, kW), so the view's strides swap. */
  if (p->transposed) wei_dims[0] = p->c_out, wei_dims[1] = p->c_in;

  dnnl_dims_t src_strides = {(dnnl_dim_t)io->x.ns, (dnnl_dim_t)io->x.cs, (dnnl_dim_t)io->x.hs, 1};
  dnnl_dims_t dst_strides = {(dnnl_dim_t)io->y.ns, (dnnl_dim_t)io->y.cs, (dnnl_dim_t)io->y.hs, 1};
  dnnl_dims_t wei_strides = {(dnnl_dim_t)io->w.ns, (dnnl_dim_t)io->w.cs, (dnnl_dim_t)io->w.hs, 1};
  if (p->transposed) wei_strides[0] = (dnnl_dim_t)io->w.cs, wei_strides[1] = (dnnl_dim_t)io->w.ns;
  dnnl_dims_t gwei_strides = {(dnnl_dim_t)io->w.ns * (p->c_out / p->groups), (dnnl_dim_t)io->w.ns,
                              (dnnl_dim_t)io->w.cs, (dnnl_dim_t)io->w.hs, 1};
  /* bf16 compute: oneDNN's reorders convert the caller's float32 (holding bfloat16 values)
   * into bf16 staging and weights; the output and the bias stay float32. */
  /* A native transpose too: oneDNN's bf16 deconvolution (AMX) ran 2-3x its float32 one on the
   * DCGAN layers (docs/benchmarks.md). */
  const int bf16 = c->bf16 && p->dtype == CONVD_BF16;
  const dnnl_data_type_t cdt = bf16 ? dnnl_bf16 : dnnl_f32;
  user_mds u;
  dnnl_memory_desc_t any_src, any_wei, any_dst;
  DNNL_TRY(dnnl_memory_desc_init_by_strides(&u.src, 4, src_dims, dnnl_f32, src_strides));
  DNNL_TRY(dnnl_memory_desc_init_by_strides(&u.dst, 4, dst_dims, dnnl_f32, dst_strides));
  if (grouped)
    DNNL_TRY(dnnl_memory_desc_init_by_strides(&u.wei, 5, gwei_dims, dnnl_f32, gwei_strides));
  else
    DNNL_TRY(dnnl_memory_desc_init_by_strides(&u.wei, 4, wei_dims, dnnl_f32, wei_strides));
  DNNL_TRY(dnnl_memory_desc_init_by_tag(&u.bias, 1, bias_dims, dnnl_f32, dnnl_x));
  DNNL_TRY(dnnl_memory_desc_init_by_tag(&any_src, 4, src_dims, cdt, dnnl_format_tag_any));
  DNNL_TRY(dnnl_memory_desc_init_by_tag(&any_dst, 4, dst_dims, dnnl_f32, dnnl_format_tag_any));
  DNNL_TRY(dnnl_memory_desc_init_by_tag(&any_wei, grouped ? 5 : 4, grouped ? gwei_dims : wei_dims,
                                        cdt, dnnl_format_tag_any));

  /* The primitive for this shape: from the cache, or made and cached. */
  const int with_bias = io->b != NULL;
  prim_entry *pe = NULL;
  for (int i = 0; i < PCACHE_ENTRIES && pe == NULL; i++)
    if (c->prims[i].prim && c->prims[i].with_bias == with_bias && c->prims[i].bf16 == bf16 &&
        c->prims[i].sum == !first && same_params(&c->prims[i].key, p))
      pe = &c->prims[i];
  int ran = 0; /* the op is computed already (a transpose's tuning ran it) */
  if (pe == NULL) {
    prim_entry made = {0};
    if (p->transposed) {
      /* A shape oneDNN turns down must not take the device out of service (the planner only
       * sends those it was seen to take): the reference kernel computes it instead. */
      rc = transpose_prim(c, io, &u, bf16, &any_wei, threads, &made, &ran, err, errlen);
      if (rc > 0) {
        __atomic_fetch_add(&c->ref_transposes, 1, __ATOMIC_RELAXED);
        return transpose_by_reference(io, err, errlen);
      }
      if (rc) return rc;
    } else {
      dnnl_convolution_desc_t cd;
      /* bf16 with whole blocks of 16 channels: src and dst in nChw16c. oneDNN's own choice is
       * NHWC (brgconv), whose reorders from and to NCHW cost up to half as much as the
       * convolution itself here; the blocked kernel computes as fast and its reorders are 2-4x
       * cheaper (measured on AVX512-BF16, docs/benchmarks.md). Where no such kernel exists,
       * oneDNN's choice. Not on AMX: there oneDNN's NHWC choice is its AMX brgconv, which ran
       * 13x faster than the blocked AVX512-BF16 kernel (1.5 vs 20 ms on 1x256x56x56 3x3), far
       * more than its reorders cost. */
      if (bf16 && !c->amx && p->groups == 1 && p->c_in % 16 == 0 && p->c_out % 16 == 0) {
        dnnl_memory_desc_t blk_src, blk_dst;
        DNNL_TRY(dnnl_memory_desc_init_by_tag(&blk_src, 4, src_dims, cdt, dnnl_nChw16c));
        DNNL_TRY(dnnl_memory_desc_init_by_tag(&blk_dst, 4, dst_dims, dnnl_f32, dnnl_nChw16c));
        const char *impl = NULL;
        if (dnnl_dilated_convolution_forward_desc_init(&cd, dnnl_forward_inference, dnnl_convolution_direct,
                                                       &blk_src, &any_wei, with_bias ? &u.bias : NULL, &blk_dst,
                                                       strides, dilates, pad_l, pad_r) != dnnl_success ||
            dnnl_primitive_desc_create(&pd, &cd, first ? c->attr : c->attr_sum, c->eng, NULL) != dnnl_success)
          pd = NULL;
        else if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success ||
                 impl == NULL || strncmp(impl, "ref", 3) == 0) {
          dnnl_primitive_desc_destroy(pd); /* only oneDNN's reference kernel takes that layout */
          pd = NULL;
        }
      }
      if (pd == NULL) {
        DNNL_TRY(dnnl_dilated_convolution_forward_desc_init(
            &cd, dnnl_forward_inference, dnnl_convolution_direct, &any_src, &any_wei,
            with_bias ? &u.bias : NULL, &any_dst, strides, dilates, pad_l, pad_r));
        DNNL_TRY(dnnl_primitive_desc_create(&pd, &cd, first ? c->attr : c->attr_sum, c->eng, NULL));
      }
      DNNL_TRY(dnnl_primitive_create(&prim, pd));
      made.key = *p;
      made.with_bias = with_bias;
      made.sum = !first;
      made.pd = pd;
      made.prim = prim;
      pd = NULL; /* made owns them now */
      prim = NULL;
    }
    made.bf16 = bf16;
    pe = &c->prims[0];
    for (int i = 0; i < PCACHE_ENTRIES; i++) {
      if (c->prims[i].prim == NULL) {
        pe = &c->prims[i];
        break;
      }
      if (c->prims[i].last_use < pe->last_use) pe = &c->prims[i];
    }
    prim_clear(pe);
    *pe = made; /* the cache owns them now */
  }
  pe->last_use = ++c->tick;
  if (!ran) rc = run_prim(c, io, pe, &u, chained, last, threads, err, errlen);
out:
  if (rc) c->chain_next = 0;
  if (prim) dnnl_primitive_destroy(prim);
  if (pd) dnnl_primitive_desc_destroy(pd);
  return rc;
}

static void cpu_flush(void *ctx) {
  cpu_ctx *c = ctx;
  free(c->acc_buf); /* a chain's sum: none is open when the engine flushes */
  c->acc_buf = NULL, c->acc_cap = 0, c->chain_next = 0;
  free(c->src_buf), free(c->dst_buf); /* staging, a column form's 64 MiB included: regrown on use */
  c->src_buf = c->dst_buf = NULL, c->src_cap = c->dst_cap = 0;
  for (int i = 0; i < WCACHE_ENTRIES; i++)
    if (c->cache[i].mem) dnnl_memory_destroy(c->cache[i].mem);
  memset(c->cache, 0, sizeof c->cache);
}

static void cpu_stats(void *ctx, convd_device_stats *out) {
  convd_device_stats_load(&((cpu_ctx *)ctx)->st, out);
}

static void cpu_destroy(void *ctx) {
  cpu_ctx *c = ctx;
  if (c == NULL) return;
  cpu_flush(c);
  for (int i = 0; i < PCACHE_ENTRIES; i++) prim_clear(&c->prims[i]);
  for (int i = 0; i < RCACHE_ENTRIES; i++) {
    if (c->reorders[i].prim) dnnl_primitive_destroy(c->reorders[i].prim);
    if (c->reorders[i].pd) dnnl_primitive_desc_destroy(c->reorders[i].pd);
  }
  if (c->attr) dnnl_primitive_attr_destroy(c->attr);
  if (c->attr_sum) dnnl_primitive_attr_destroy(c->attr_sum);
  if (c->stream) dnnl_stream_destroy(c->stream);
  if (c->eng) dnnl_engine_destroy(c->eng);
  free(c->src_buf);
  free(c->dst_buf);
  free(c->scratch_buf);
  free(c->acc_buf);
  free(c);
}

/* Whether this CPU convolves bf16 on its own units, and on which ("AMX", "AVX512-BF16"), or
 * NULL: oneDNN's effective ISA (which honours DNNL_MAX_CPU_ISA) must include bf16 instructions,
 * and a bf16 3x3 convolution must get a JIT implementation rather than oneDNN's reference one. */
static const char *bf16_units(cpu_ctx *c) {
  const dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
  if ((isa & dnnl_cpu_isa_avx512_core_bf16) != dnnl_cpu_isa_avx512_core_bf16) return NULL;
  const char *units = (isa & dnnl_cpu_isa_avx512_core_amx) == dnnl_cpu_isa_avx512_core_amx ? "AMX" : "AVX512-BF16";
  dnnl_dims_t src_dims = {1, 64, 16, 16}, wei_dims = {64, 64, 3, 3}, dst_dims = {1, 64, 16, 16};
  dnnl_dims_t strides = {1, 1}, dilates = {0, 0}, pad = {1, 1};
  dnnl_memory_desc_t src, wei, dst;
  dnnl_convolution_desc_t cd;
  dnnl_primitive_desc_t pd = NULL;
  const char *impl = NULL;
  int ok = dnnl_memory_desc_init_by_tag(&src, 4, src_dims, dnnl_bf16, dnnl_format_tag_any) == dnnl_success &&
           dnnl_memory_desc_init_by_tag(&wei, 4, wei_dims, dnnl_bf16, dnnl_format_tag_any) == dnnl_success &&
           dnnl_memory_desc_init_by_tag(&dst, 4, dst_dims, dnnl_f32, dnnl_format_tag_any) == dnnl_success &&
           dnnl_dilated_convolution_forward_desc_init(&cd, dnnl_forward_inference, dnnl_convolution_direct, &src,
                                                      &wei, NULL, &dst, strides, dilates, pad, pad) == dnnl_success &&
           dnnl_primitive_desc_create(&pd, &cd, c->attr, c->eng, NULL) == dnnl_success &&
           dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl &&
           strncmp(impl, "ref", 3) != 0;
  if (pd) dnnl_primitive_desc_destroy(pd);
  return ok ? units : NULL;
}

static const convd_device_iface cpu_iface = {
    .supports = cpu_supports, .run = cpu_run, .flush_cache = cpu_flush, .stats = cpu_stats,
    .destroy = cpu_destroy};

int convd_device_cpu_is_native(void) { return 1; }

uint64_t convd_device_cpu_reference_transposes(const convd_device *d) {
  if (d == NULL || d->iface != &cpu_iface) return 0;
  return __atomic_load_n(&((const cpu_ctx *)d->ctx)->ref_transposes, __ATOMIC_RELAXED);
}

int convd_device_cpu_create(const char *name, int threads, uint64_t memory_budget,
                            convd_device **out, char *err, size_t errlen) {
  int rc = 0;
  *out = NULL;
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  cpu_ctx *c = calloc(1, sizeof *c);
  convd_device *d = calloc(1, sizeof *d);
  if (c == NULL || d == NULL) {
    rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating a device");
    goto out;
  }
  c->threads = threads > 0 ? threads : (ncpu > 0 ? (int)ncpu : 1);
  DNNL_TRY(dnnl_engine_create(&c->eng, dnnl_cpu, 0));
  DNNL_TRY(dnnl_stream_create(&c->stream, c->eng, dnnl_stream_default_flags));
  DNNL_TRY(dnnl_primitive_attr_create(&c->attr));
  DNNL_TRY(dnnl_primitive_attr_set_scratchpad_mode(c->attr, dnnl_scratchpad_mode_user));
  {
    dnnl_post_ops_t po = NULL;
    DNNL_TRY(dnnl_primitive_attr_clone(&c->attr_sum, c->attr));
    DNNL_TRY(dnnl_post_ops_create(&po));
    dnnl_status_t st = dnnl_post_ops_append_sum(po, 1.0f);
    if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(c->attr_sum, po);
    dnnl_post_ops_destroy(po);
    DNNL_TRY(st);
  }
  d->iface = &cpu_iface;
  d->ctx = c;
  d->kind = CONVD_DEVICE_CPU;
  d->memory_budget = memory_budget;
  d->native_transpose = 1; /* oneDNN's deconvolution */
  /* Chains: a tile's input-channel blocks summed on the device (oneDNN's sum post-op, sgemm's
   * beta), in its staging, instead of each block's partial added into the tile by the engine's
   * worker alone. On the seed's 1024-channel layer that pass was a fifth of the job. */
  d->accumulates = 1;
  const char *only = getenv("CONVD_TEST_TRANSPOSE_LAYOUT");
  char *end = NULL;
  const long ol = only && *only ? strtol(only, &end, 10) : -1;
  c->only_layout = only && *only && *end == 0 && ol >= 0 && ol < NLAYOUTS ? (int)ol : -1;
  snprintf(d->name, sizeof d->name, "%s", name);
  const dnnl_version_t *v = dnnl_version();
  const char *units = bf16_units(c);
  c->bf16 = units != NULL;
  c->amx = units != NULL && strcmp(units, "AMX") == 0;
  snprintf(d->detail, sizeof d->detail, "oneDNN %d.%d.%d direct convolution (bfloat16 in %s%s), %d thread%s",
           v->major, v->minor, v->patch, units ? "bf16 on " : "float32: no bf16 units",
           units ? units : "", c->threads, c->threads == 1 ? "" : "s");
  *out = d;
  return 0;
out:
  cpu_destroy(c);
  free(d);
  return rc;
}

#else /* no oneDNN in this build: the CPU device runs the reference kernel */

int convd_device_cpu_is_native(void) { return 0; }

uint64_t convd_device_cpu_reference_transposes(const convd_device *d) {
  (void)d;
  return 0;
}

int convd_device_cpu_create(const char *name, int threads, uint64_t memory_budget,
                            convd_device **out, char *err, size_t errlen) {
  (void)threads;
  int rc = convd_device_ref_create(name, memory_budget, out, err, errlen);
  if (rc == 0) {
    (*out)->kind = CONVD_DEVICE_CPU;
    snprintf((*out)->detail, sizeof (*out)->detail,
             "reference kernel: this build has no oneDNN (install libdnnl-dev and rebuild)");
  }
  return rc;
}
#endif
