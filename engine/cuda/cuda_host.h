/* Host-side logic of the CUDA device, kept free of CUDA headers so that it is unit-tested on
 * machines without a GPU (tests/test_cuda_host.c): the algorithm cache and the arithmetic that
 * fits an op into the device's memory budget.
 *
 * Threads: the CUDA device calls these on its worker thread; each device owns its algorithm
 * cache, so none takes a lock. */
#ifndef CONVD_CUDA_HOST_H
#define CONVD_CUDA_HOST_H

#include <stddef.h>
#include <stdint.h>

#include "conv.h"

/* What decides cuDNN's best algorithm for an op: its shape and parameters, the math mode and
 * the workspace it may use (a larger limit can admit a faster algorithm). */
typedef struct convd_cuda_algo_key {
  convd_conv_params p;
  int math;            /* 0 strict fp32, 1 TF32 allowed */
  uint64_t ws_limit;   /* workspace bytes the op could be given */
} convd_cuda_algo_key;

#define CONVD_CUDA_ALGO_CACHE 256

/* Chosen algorithms for the daemon's life, by key (LRU beyond CONVD_CUDA_ALGO_CACHE). */
typedef struct convd_cuda_algo_cache {
  struct {
    convd_cuda_algo_key key;
    int algo;
    uint64_t ws_bytes;
    uint64_t last_use;
    int used;
  } e[CONVD_CUDA_ALGO_CACHE];
  uint64_t tick;
  uint64_t hits, misses;
} convd_cuda_algo_cache;

/* The key for an op; the workspace limit is rounded down to a power of two so that ops whose
 * free memory differs a little share an entry. */
void convd_cuda_algo_key_make(convd_cuda_algo_key *k, const convd_conv_params *p, int math,
                              uint64_t ws_limit);
/* 1 and the cached choice when the key is known. */
int convd_cuda_algo_find(convd_cuda_algo_cache *c, const convd_cuda_algo_key *k, int *algo,
                         uint64_t *ws_bytes);
void convd_cuda_algo_put(convd_cuda_algo_cache *c, const convd_cuda_algo_key *k, int algo,
                         uint64_t ws_bytes);

/* Where an op lies in the device arena (byte offsets, 256-byte aligned; elements of the op's
 * dtype). The output comes first, so the input-channel blocks of one tile accumulate in one
 * place. The input is staged with the asymmetric part of its padding made explicit (cuDNN pads
 * symmetrically). */
typedef struct convd_cuda_layout {
  int64_t x_h, x_w;        /* the staged input's rows and columns */
  int64_t pad_h, pad_w;    /* the symmetric padding left to cuDNN */
  int64_t off_top, off_left; /* where the window starts inside the staged input */
  uint64_t x_off, x_bytes;
  uint64_t y_off, y_bytes;
  uint64_t w_off, w_bytes; /* w_bytes 0 when the weight block comes from the cache */
  uint64_t b_off, b_bytes; /* the bias, 0 bytes without one */
  uint64_t ws_off, ws_bytes; /* what is left for cuDNN's workspace */
} convd_cuda_layout;

/* Lays out op c in an arena of arena_bytes; weights_cached says whether the weight block lives
 * elsewhere. Returns 0, or -1 when the op does not fit (the planner's budget was too large for
 * this device). */
int convd_cuda_layout_make(convd_cuda_layout *l, const convd_conv *c, int weights_cached,
                           uint64_t arena_bytes);

#endif
