/* The CUDA device: one GPU, cuDNN's forward convolution. An op's input window is staged into
 * pinned host memory (dense, with the asymmetric part of its padding made explicit: cuDNN pads
 * symmetrically), copied into a device arena allocated once with cudaMalloc, convolved with the
 * algorithm cuDNN measured fastest for that shape (cached for the device's life), and its tile
 * copied back into the caller's view. The input-channel blocks of one tile arrive as a chain and
 * add up on the GPU (beta = 1) before one download. Weight blocks stay on the GPU across ops and
 * jobs in a small LRU cache, keyed by content. float32 is strict unless the request allows TF32;
 * float16 and bfloat16 travel and compute in their own type on tensor cores.
 *
 * Threads: run() and flush_cache() on the device's worker thread only (each sets the device's
 * GPU first), so the arena, weight cache, staging buffers and algorithm cache take no lock;
 * stats() reads the counters, kept with relaxed atomics, from any thread. Several devices may
 * share one GPU, each with its own stream, cuDNN handle and arena. */
#include <cuda_runtime.h>
#include <cudnn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_device.h"
#include "cuda_host.h"
#include "device_impl.h"
#include "dtype.h"
#include "err.h"

#define WCACHE_ENTRIES 64

typedef struct wblock {
  uint64_t key;
  void *dev;
  uint64_t bytes;
  uint64_t last_use;
} wblock;

typedef struct cuda_ctx {
  int ordinal;
  cudaStream_t stream;
  cudnnHandle_t dnn;
  cudnnTensorDescriptor_t xd, yd, bd;
  cudnnFilterDescriptor_t wd;
  cudnnConvolutionDescriptor_t cd;
  char *arena;
  uint64_t arena_bytes;
  wblock cache[WCACHE_ENTRIES];
  uint64_t cache_bytes, cache_budget, tick;
  /* Pinned staging, two of each: the host fills one while the GPU still copies out of the
   * other (the blocks of a chain are staged while the previous block computes). done[i] is
   * recorded after the last copy out of buffer i. */
  void *hx[2], *hw[2];
  size_t hx_cap[2], hw_cap[2];
  cudaEvent_t x_done[2], w_done[2];
  int slot;
  void *hy; /* the output, downloaded */
  size_t hy_cap;
  int chain_open; /* a chain's sum is building up at the arena's output place */
  /* The convolution's time on the GPU, per staging slot: read back (into st.kernel_ns) before
   * the slot's events are recorded again, and at every synchronisation. */
  cudaEvent_t k_start[2], k_end[2];
  int k_pending[2];
  convd_device_stats st; /* relaxed atomics: read from other threads */
  convd_cuda_algo_cache algos;
} cuda_ctx;

/* A failed CUDA or cuDNN call becomes the op's error, naming the statement and where it is. */
#define GPU_TRY(ok, lib, stmt, why)                                                           \
  do {                                                                                        \
    if (!(ok)) {                                                                              \
      rc = convd_errf(err, errlen, CONVD_EDEVICE, "%s %s failed: %s (%s:%d)", lib, stmt, why, \
                      __FILE__, __LINE__);                                                    \
      goto out;                                                                               \
    }                                                                                         \
  } while (0)
#define CU_TRY(call)                                                           \
  do {                                                                         \
    cudaError_t e_ = (call);                                                   \
    GPU_TRY(e_ == cudaSuccess, "CUDA", #call, cudaGetErrorString(e_));         \
  } while (0)
#define DNN_TRY(call)                                                          \
  do {                                                                         \
    cudnnStatus_t s_ = (call);                                                 \
    GPU_TRY(s_ == CUDNN_STATUS_SUCCESS, "cuDNN", #call, cudnnGetErrorString(s_)); \
  } while (0)

int convd_cuda_device_count(char *err, size_t errlen) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    convd_errf(err, errlen, 0, "no CUDA device: %s", cudaGetErrorString(e));
    return 0;
  }
  if (n == 0) convd_errf(err, errlen, 0, "no CUDA device visible");
  return n;
}

/* Grows a pinned host buffer (cudaMallocHost: page-locked, so copies run at full speed). The
 * caller has waited for every copy out of it. */
static int grow_pinned(void **buf, size_t *cap, size_t bytes, char *err, size_t errlen) {
  int rc = 0;
  if (bytes <= *cap) return 0;
  if (*buf) cudaFreeHost(*buf);
  *buf = NULL;
  *cap = 0;
  CU_TRY(cudaMallocHost(buf, bytes));
  *cap = bytes;
out:
  return rc;
}

static cudnnDataType_t dnn_type(int dtype) {
  return dtype == CONVD_F16 ? CUDNN_DATA_HALF : dtype == CONVD_BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
}

/* Strict float32 forbids tensor cores; TF32 is cuDNN's default on float32 when allowed; float16
 * and bfloat16 run on tensor cores (float32 accumulation: the convolution's compute type). */
static cudnnMathType_t dnn_math(const convd_conv_params *p) {
  if (p->dtype != CONVD_F32) return CUDNN_TENSOR_OP_MATH;
  return p->allow_tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
}

static wblock *cache_find(cuda_ctx *c, uint64_t key) {
  if (key == 0) return NULL;
  for (int i = 0; i < WCACHE_ENTRIES; i++)
    if (c->cache[i].dev && c->cache[i].key == key) {
      c->cache[i].last_use = ++c->tick;
      return &c->cache[i];
    }
  return NULL;
}

/* A cache slot for a block of `bytes`, evicting least recently used blocks; NULL when the block
 * is larger than the cache (it then goes into the arena for this op only). */
static wblock *cache_make(cuda_ctx *c, uint64_t key, uint64_t bytes) {
  if (key == 0 || bytes > c->cache_budget) return NULL;
  for (;;) {
    wblock *free_slot = NULL, *lru = NULL;
    for (int i = 0; i < WCACHE_ENTRIES; i++) {
      wblock *b = &c->cache[i];
      if (b->dev == NULL) {
        if (free_slot == NULL) free_slot = b;
      } else if (lru == NULL || b->last_use < lru->last_use) {
        lru = b;
      }
    }
    if (free_slot && c->cache_bytes + bytes <= c->cache_budget) {
      if (cudaMalloc(&free_slot->dev, bytes) != cudaSuccess) {
        free_slot->dev = NULL;
        return NULL;
      }
      free_slot->key = key;
      free_slot->bytes = bytes;
      free_slot->last_use = ++c->tick;
      c->cache_bytes += bytes;
      return free_slot;
    }
    if (lru == NULL) return NULL;
    cudaFree(lru->dev);
    c->cache_bytes -= lru->bytes;
    memset(lru, 0, sizeof *lru);
  }
}

/* Copies view v (n x ch x h x w) into dense dst of n x ch x dh x dw elements of dtype, at row
 * r0, column c0, narrowing float16/bfloat16 on the way. */
static void view_to_dense(int dtype, const convd_view *v, int64_t n, int64_t ch, int64_t h,
                          int64_t w, void *dst, int64_t dh, int64_t dw, int64_t r0, int64_t c0) {
  const size_t es = convd_dtype_size(dtype);
  for (int64_t i = 0; i < n; i++)
    for (int64_t c = 0; c < ch; c++)
      for (int64_t y = 0; y < h; y++)
        convd_dtype_encode(dtype, v->p + (size_t)i * v->ns + (size_t)c * v->cs + (size_t)y * v->hs,
                           (char *)dst + ((((size_t)(i * ch + c) * (size_t)dh) + (size_t)(y + r0)) * (size_t)dw + (size_t)c0) * es,
                           (size_t)w);
}

static void dense_to_view(int dtype, const void *src, int64_t n, int64_t ch, int64_t h, int64_t w,
                          const convd_view *v) {
  const size_t es = convd_dtype_size(dtype);
  for (int64_t i = 0; i < n; i++)
    for (int64_t c = 0; c < ch; c++)
      for (int64_t y = 0; y < h; y++)
        convd_dtype_decode(dtype, (const char *)src + (((size_t)(i * ch + c) * (size_t)h + (size_t)y) * (size_t)w) * es,
                           v->p + (size_t)i * v->ns + (size_t)c * v->cs + (size_t)y * v->hs, (size_t)w);
}

/* The algorithm for this op: from the cache, or measured by cuDNN on the op's own buffers. */
/* Measuring runs the convolution into y, so it is not done where y holds a chain's partial
 * sum (may_measure 0): cuDNN's heuristics choose then, and the choice is not cached, so the
 * shape is measured when it next starts a chain or runs alone. */
static int pick_algo(cuda_ctx *c, const convd_conv *conv, const void *x, const void *w, void *y,
                     void *ws, uint64_t ws_bytes, int may_measure, cudnnConvolutionFwdAlgo_t *algo,
                     uint64_t *need, char *err, size_t errlen) {
  int rc = 0;
  convd_cuda_algo_key key;
  convd_cuda_algo_key_make(&key, &conv->p, (int)dnn_math(&conv->p), ws_bytes);
  int a;
  if (convd_cuda_algo_find(&c->algos, &key, &a, need)) {
    *algo = (cudnnConvolutionFwdAlgo_t)a;
    return 0;
  }
  cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
  int returned = 0;
  if (may_measure)
    DNN_TRY(cudnnFindConvolutionForwardAlgorithmEx(c->dnn, c->xd, x, c->wd, w, c->cd, c->yd, y,
                                                   CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &returned,
                                                   perf, ws, (size_t)key.ws_limit));
  else
    DNN_TRY(cudnnGetConvolutionForwardAlgorithm_v7(c->dnn, c->xd, c->wd, c->cd, c->yd,
                                                   CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &returned,
                                                   perf));
  for (int i = 0; i < returned; i++)
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= key.ws_limit) {
      *algo = perf[i].algo;
      *need = perf[i].memory;
      if (may_measure) convd_cuda_algo_put(&c->algos, &key, (int)perf[i].algo, perf[i].memory);
      return 0;
    }
  rc = convd_errf(err, errlen, CONVD_EDEVICE,
                  "cuDNN has no forward algorithm for this op within %llu bytes of workspace",
                  (unsigned long long)key.ws_limit);
out:
  return rc;
}

static int cuda_supports(void *ctx, const convd_conv *conv) {
  (void)ctx;
  /* cuDNN takes int dimensions. */
  const convd_conv_params *p = &conv->p;
  return p->n < (1 << 30) && p->c_in < (1 << 30) && p->h < (1 << 30) && p->w < (1 << 30);
}

static void count(uint64_t *field, uint64_t v) { __atomic_fetch_add(field, v, __ATOMIC_RELAXED); }

/* Adds slot i's measured convolution time, waiting for it to finish. */
static void harvest(cuda_ctx *c, int i) {
  float ms = 0;
  if (!c->k_pending[i]) return;
  c->k_pending[i] = 0;
  if (cudaEventSynchronize(c->k_end[i]) == cudaSuccess &&
      cudaEventElapsedTime(&ms, c->k_start[i], c->k_end[i]) == cudaSuccess && ms > 0)
    count(&c->st.kernel_ns, (uint64_t)((double)ms * 1e6));
}

/* Waits until the GPU has copied out of staging buffer *buf, then makes it hold `bytes`. */
static int stage_buffer(void **buf, size_t *cap, cudaEvent_t done, size_t bytes, char *err,
                        size_t errlen) {
  int rc = 0;
  CU_TRY(cudaEventSynchronize(done));
  rc = grow_pinned(buf, cap, bytes, err, errlen);
out:
  return rc;
}

static int cuda_run(void *ctx, const convd_op_io *io, char *err, size_t errlen) {
  cuda_ctx *c = ctx;
  const convd_conv *conv = io->conv;
  const convd_conv_params *p = &conv->p;
  const int dt = p->dtype;
  const int chained = io->chain_len > 1, first = !chained || io->chain_pos == 0;
  const int last = !chained || io->chain_pos == io->chain_len - 1;
  int rc = 0;
  wblock *wb = NULL;
  int cached = 0; /* 1: the weight block is on the GPU; 2: a cache slot that this op fills */
  if (io->cancel && atomic_load(io->cancel)) return CONVD_ECANCELED;
  if (!first && !c->chain_open)
    return convd_errf(err, errlen, CONVD_EINTERNAL,
                      "block %d of a chain arrived without its first block", io->chain_pos);
  c->chain_open = 0; /* set again below once this block is queued */
  CU_TRY(cudaSetDevice(c->ordinal));
  /* Cached blocks are keyed by content and block and hold the op's dtype. */
  const uint64_t wkey = io->w_key ? io->w_key ^ ((uint64_t)dt << 56) ^ (uint64_t)conv->weight_elems : 0;
  wb = cache_find(c, wkey);
  cached = wb != NULL;
  const uint64_t w_dev_bytes = (uint64_t)conv->weight_elems * convd_dtype_size(dt);
  if (!cached && (wb = cache_make(c, wkey, w_dev_bytes)) != NULL) cached = 2; /* to fill */
  convd_cuda_layout l;
  if (convd_cuda_layout_make(&l, conv, cached != 0, c->arena_bytes))
    return convd_errf(err, errlen, CONVD_ENOMEM,
                      "an op of %zu + %zu + %zu bytes does not fit GPU %d's budget of %llu bytes",
                      conv->input_bytes, conv->weight_bytes, conv->output_bytes, c->ordinal,
                      (unsigned long long)c->arena_bytes);
  char *x_dev = c->arena + l.x_off, *y_dev = c->arena + l.y_off, *ws = c->arena + l.ws_off;
  char *w_dev = cached ? (char *)wb->dev : c->arena + l.w_off, *b_dev = c->arena + l.b_off;
  const int s = c->slot;
  c->slot ^= 1;
  harvest(c, s);
  count(cached == 1 ? &c->st.weight_cache_hits : &c->st.weight_cache_misses, wkey != 0);

  /* Input, staged with its explicit padding; the weights when not cached, and the bias. */
  if ((rc = stage_buffer(&c->hx[s], &c->hx_cap[s], c->x_done[s], l.x_bytes, err, errlen))) goto out;
  if (l.x_h != p->h || l.x_w != p->w) memset(c->hx[s], 0, l.x_bytes);
  view_to_dense(dt, &io->x, p->n, p->c_in, p->h, p->w, c->hx[s], l.x_h, l.x_w, l.off_top, l.off_left);
  CU_TRY(cudaMemcpyAsync(x_dev, c->hx[s], l.x_bytes, cudaMemcpyHostToDevice, c->stream));
  CU_TRY(cudaEventRecord(c->x_done[s], c->stream));
  count(&c->st.bytes_to_device, l.x_bytes);
  if (cached != 1 || io->b) {
    const uint64_t b_at = (w_dev_bytes + 255) & ~(uint64_t)255;
    if ((rc = stage_buffer(&c->hw[s], &c->hw_cap[s], c->w_done[s], b_at + l.b_bytes, err, errlen)))
      goto out;
    char *hw = c->hw[s];
    if (cached != 1) {
      view_to_dense(dt, &io->w, p->c_out, p->c_per_group, p->kh, p->kw, hw, p->kh, p->kw, 0, 0);
      CU_TRY(cudaMemcpyAsync(w_dev, hw, w_dev_bytes, cudaMemcpyHostToDevice, c->stream));
      count(&c->st.weight_bytes_loaded, w_dev_bytes);
      count(&c->st.bytes_to_device, w_dev_bytes);
    }
    if (io->b) {
      convd_dtype_encode(dt, io->b, hw + b_at, (size_t)p->c_out);
      CU_TRY(cudaMemcpyAsync(b_dev, hw + b_at, l.b_bytes, cudaMemcpyHostToDevice, c->stream));
      count(&c->st.bytes_to_device, l.b_bytes);
    }
    CU_TRY(cudaEventRecord(c->w_done[s], c->stream));
  }

  const cudnnDataType_t ty = dnn_type(dt);
  DNN_TRY(cudnnSetTensor4dDescriptor(c->xd, CUDNN_TENSOR_NCHW, ty, (int)p->n, (int)p->c_in,
                                     (int)l.x_h, (int)l.x_w));
  DNN_TRY(cudnnSetTensor4dDescriptor(c->yd, CUDNN_TENSOR_NCHW, ty, (int)p->n, (int)p->c_out,
                                     (int)conv->h_out, (int)conv->w_out));
  DNN_TRY(cudnnSetFilter4dDescriptor(c->wd, ty, CUDNN_TENSOR_NCHW, (int)p->c_out,
                                     (int)p->c_per_group, (int)p->kh, (int)p->kw));
  /* float32 accumulation whatever the tensors' type */
  DNN_TRY(cudnnSetConvolution2dDescriptor(c->cd, (int)l.pad_h, (int)l.pad_w, (int)p->stride_h,
                                          (int)p->stride_w, (int)p->dil_h, (int)p->dil_w,
                                          CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
  DNN_TRY(cudnnSetConvolutionGroupCount(c->cd, (int)p->groups));
  DNN_TRY(cudnnSetConvolutionMathType(c->cd, dnn_math(p)));
  int on, oc, oh, ow;
  DNN_TRY(cudnnGetConvolution2dForwardOutputDim(c->cd, c->xd, c->wd, &on, &oc, &oh, &ow));
  if (on != p->n || oc != p->c_out || oh != conv->h_out || ow != conv->w_out) {
    rc = convd_errf(err, errlen, CONVD_EDEVICE, "cuDNN computes a %dx%dx%dx%d output, convd %lldx%lldx%lldx%lld",
                    on, oc, oh, ow, (long long)p->n, (long long)p->c_out, (long long)conv->h_out,
                    (long long)conv->w_out);
    goto out;
  }
  cudnnConvolutionFwdAlgo_t algo = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
  uint64_t need = 0;
  if ((rc = pick_algo(c, conv, x_dev, w_dev, y_dev, ws, l.ws_bytes, first, &algo, &need, err, errlen)))
    goto out;
  /* The blocks of a chain after the first add onto the sum in place (beta = 1). */
  const float one = 1.0f, zero = 0.0f;
  CU_TRY(cudaEventRecord(c->k_start[s], c->stream));
  DNN_TRY(cudnnConvolutionForward(c->dnn, &one, c->xd, x_dev, c->wd, w_dev, c->cd, algo, ws,
                                  (size_t)need, first ? &zero : &one, c->yd, y_dev));
  if (io->b) {
    DNN_TRY(cudnnSetTensor4dDescriptor(c->bd, CUDNN_TENSOR_NCHW, ty, 1, (int)p->c_out, 1, 1));
    DNN_TRY(cudnnAddTensor(c->dnn, &one, c->bd, b_dev, &one, c->yd, y_dev));
  }
  CU_TRY(cudaEventRecord(c->k_end[s], c->stream));
  c->k_pending[s] = 1;
  if (!last) { /* the sum stays on the GPU; the next block's staging overlaps this compute */
    c->chain_open = 1;
    goto out;
  }
  if ((rc = grow_pinned(&c->hy, &c->hy_cap, l.y_bytes, err, errlen))) goto out;
  CU_TRY(cudaMemcpyAsync(c->hy, y_dev, l.y_bytes, cudaMemcpyDeviceToHost, c->stream));
  CU_TRY(cudaStreamSynchronize(c->stream));
  count(&c->st.bytes_from_device, l.y_bytes);
  harvest(c, 0);
  harvest(c, 1);
  dense_to_view(dt, c->hy, p->n, p->c_out, conv->h_out, conv->w_out, &io->y);
out:
  if (rc && cached == 2) { /* a block that never got its contents must not be found later */
    cudaStreamSynchronize(c->stream);
    cudaFree(wb->dev);
    c->cache_bytes -= wb->bytes;
    memset(wb, 0, sizeof *wb);
  }
  return rc;
}

static void cuda_flush(void *ctx) {
  cuda_ctx *c = ctx;
  cudaSetDevice(c->ordinal);
  for (int i = 0; i < WCACHE_ENTRIES; i++)
    if (c->cache[i].dev) cudaFree(c->cache[i].dev);
  memset(c->cache, 0, sizeof c->cache);
  c->cache_bytes = 0;
}

static void cuda_destroy(void *ctx) {
  cuda_ctx *c = ctx;
  if (c == NULL) return;
  cudaSetDevice(c->ordinal);
  cuda_flush(c);
  if (c->xd) cudnnDestroyTensorDescriptor(c->xd);
  if (c->yd) cudnnDestroyTensorDescriptor(c->yd);
  if (c->bd) cudnnDestroyTensorDescriptor(c->bd);
  if (c->wd) cudnnDestroyFilterDescriptor(c->wd);
  if (c->cd) cudnnDestroyConvolutionDescriptor(c->cd);
  if (c->dnn) cudnnDestroy(c->dnn);
  if (c->stream) cudaStreamDestroy(c->stream);
  if (c->arena) cudaFree(c->arena);
  if (c->stream) cudaStreamSynchronize(c->stream);
  for (int i = 0; i < 2; i++) {
    if (c->hx[i]) cudaFreeHost(c->hx[i]);
    if (c->hw[i]) cudaFreeHost(c->hw[i]);
    if (c->x_done[i]) cudaEventDestroy(c->x_done[i]);
    if (c->w_done[i]) cudaEventDestroy(c->w_done[i]);
    if (c->k_start[i]) cudaEventDestroy(c->k_start[i]);
    if (c->k_end[i]) cudaEventDestroy(c->k_end[i]);
  }
  if (c->hy) cudaFreeHost(c->hy);
  free(c);
}

static void cuda_stats(void *ctx, convd_device_stats *out) {
  convd_device_stats_load(&((cuda_ctx *)ctx)->st, out);
}

static const convd_device_iface cuda_iface = {.supports = cuda_supports,
                                              .run = cuda_run,
                                              .flush_cache = cuda_flush,
                                              .stats = cuda_stats,
                                              .destroy = cuda_destroy};

int convd_device_cuda_create(const char *name, int ordinal, uint64_t memory_budget,
                             convd_device **out, char *err, size_t errlen) {
  int rc = 0;
  *out = NULL;
  cuda_ctx *c = calloc(1, sizeof *c);
  convd_device *d = calloc(1, sizeof *d);
  if (c == NULL || d == NULL) {
    free(c);
    free(d);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating a device");
  }
  c->ordinal = ordinal;
  struct cudaDeviceProp prop;
  size_t free_b = 0, total_b = 0;
  CU_TRY(cudaSetDevice(ordinal));
  CU_TRY(cudaGetDeviceProperties(&prop, ordinal));
  CU_TRY(cudaMemGetInfo(&free_b, &total_b));
  /* Default: half the free memory, at most 2 GiB (an op then holds up to 1 GiB of tensors on
   * the host too, while they stream). */
  if (memory_budget == 0) memory_budget = (uint64_t)free_b / 2 < (UINT64_C(2) << 30) ? (uint64_t)free_b / 2 : (UINT64_C(2) << 30);
  if (memory_budget + memory_budget / 4 > (uint64_t)free_b) {
    rc = convd_errf(err, errlen, CONVD_ELIMIT,
                    "GPU %d (%s) has %zu bytes free, less than its budget of %llu bytes plus a quarter "
                    "for cached weights: lower --gpu-memory",
                    ordinal, prop.name, free_b, (unsigned long long)memory_budget);
    goto out;
  }
  c->arena_bytes = memory_budget;
  c->cache_budget = memory_budget / 4;
  CU_TRY(cudaMalloc((void **)&c->arena, c->arena_bytes));
  CU_TRY(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  for (int i = 0; i < 2; i++) {
    CU_TRY(cudaEventCreateWithFlags(&c->x_done[i], cudaEventDisableTiming));
    CU_TRY(cudaEventCreateWithFlags(&c->w_done[i], cudaEventDisableTiming));
    CU_TRY(cudaEventCreate(&c->k_start[i]));
    CU_TRY(cudaEventCreate(&c->k_end[i]));
  }
  DNN_TRY(cudnnCreate(&c->dnn));
  DNN_TRY(cudnnSetStream(c->dnn, c->stream));
  DNN_TRY(cudnnCreateTensorDescriptor(&c->xd));
  DNN_TRY(cudnnCreateTensorDescriptor(&c->yd));
  DNN_TRY(cudnnCreateTensorDescriptor(&c->bd));
  DNN_TRY(cudnnCreateFilterDescriptor(&c->wd));
  DNN_TRY(cudnnCreateConvolutionDescriptor(&c->cd));
  d->iface = &cuda_iface;
  d->ctx = c;
  d->kind = CONVD_DEVICE_CUDA;
  d->memory_budget = memory_budget;
  d->accumulates = 1;
  snprintf(d->name, sizeof d->name, "%s", name);
  snprintf(d->detail, sizeof d->detail, "%.48s (GPU %d, %.1f GiB), cuDNN %zu, 2 staging buffers", prop.name,
           ordinal, (double)total_b / (1u << 30), cudnnGetVersion());
  *out = d;
  return 0;
out:
  cuda_destroy(c);
  free(d);
  return rc;
}
