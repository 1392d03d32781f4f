/* See cuda_host.h. Called on a CUDA device's worker thread: each device owns its algorithm
 * cache, so it takes no lock. */
#include "cuda_host.h"

#include <string.h>

#include "dtype.h"

static uint64_t round_pow2_down(uint64_t v) {
  if (v == 0) return 0;
  uint64_t r = 1;
  while (r <= v / 2) r *= 2;
  return r;
}

/* Field by field: a struct's padding bytes are not part of its value. */
static int same_key(const convd_cuda_algo_key *a, const convd_cuda_algo_key *b) {
  return a->math == b->math && a->ws_limit == b->ws_limit && convd_conv_params_same(&a->p, &b->p);
}

void convd_cuda_algo_key_make(convd_cuda_algo_key *k, const convd_conv_params *p, int math,
                              uint64_t ws_limit) {
  memset(k, 0, sizeof *k);
  k->p = *p;
  k->math = math;
  k->ws_limit = round_pow2_down(ws_limit);
}

int convd_cuda_algo_find(convd_cuda_algo_cache *c, const convd_cuda_algo_key *k, int *algo,
                         uint64_t *ws_bytes) {
  for (int i = 0; i < CONVD_CUDA_ALGO_CACHE; i++)
    if (c->e[i].used && same_key(&c->e[i].key, k)) {
      c->e[i].last_use = ++c->tick;
      *algo = c->e[i].algo;
      *ws_bytes = c->e[i].ws_bytes;
      c->hits++;
      return 1;
    }
  c->misses++;
  return 0;
}

void convd_cuda_algo_put(convd_cuda_algo_cache *c, const convd_cuda_algo_key *k, int algo,
                         uint64_t ws_bytes) {
  int victim = 0;
  for (int i = 0; i < CONVD_CUDA_ALGO_CACHE; i++) {
    if (!c->e[i].used) {
      victim = i;
      break;
    }
    if (c->e[i].last_use < c->e[victim].last_use) victim = i;
  }
  c->e[victim].key = *k;
  c->e[victim].algo = algo;
  c->e[victim].ws_bytes = ws_bytes;
  c->e[victim].last_use = ++c->tick;
  c->e[victim].used = 1;
}

static uint64_t align256(uint64_t v) { return (v + 255) & ~(uint64_t)255; }

int convd_cuda_layout_make(convd_cuda_layout *l, const convd_conv *c, int weights_cached,
                           uint64_t arena_bytes) {
  const convd_conv_params *p = &c->p;
  memset(l, 0, sizeof *l);
  const uint64_t elem = convd_dtype_size(p->dtype); /* tensors live on the GPU in the wire type */
  l->pad_h = p->pad_top < p->pad_bottom ? p->pad_top : p->pad_bottom;
  l->pad_w = p->pad_left < p->pad_right ? p->pad_left : p->pad_right;
  l->off_top = p->pad_top - l->pad_h;
  l->off_left = p->pad_left - l->pad_w;
  l->x_h = p->h + (p->pad_top - l->pad_h) + (p->pad_bottom - l->pad_h);
  l->x_w = p->w + (p->pad_left - l->pad_w) + (p->pad_right - l->pad_w);
  /* Padding (hence the staged input) may be huge even when the window is small: checked in
   * long double before it is computed in 64 bits. */
  long double xb = (long double)elem * (long double)p->n * (long double)p->c_in * (long double)l->x_h * (long double)l->x_w;
  if (elem == 0 || xb > (long double)arena_bytes) return -1;
  l->x_bytes = (uint64_t)p->n * (uint64_t)p->c_in * (uint64_t)l->x_h * (uint64_t)l->x_w * elem;
  l->y_bytes = (uint64_t)c->output_elems * elem;
  l->w_bytes = weights_cached ? 0 : (uint64_t)c->weight_elems * elem;
  l->b_bytes = (uint64_t)c->bias_elems * elem;
  /* The output first: the blocks of one tile share its place while their sum builds up. */
  l->y_off = 0;
  l->x_off = align256(l->y_off + l->y_bytes);
  l->w_off = align256(l->x_off + l->x_bytes);
  l->b_off = align256(l->w_off + l->w_bytes);
  l->ws_off = align256(l->b_off + l->b_bytes);
  if (l->x_bytes > arena_bytes || l->y_bytes > arena_bytes || l->w_bytes > arena_bytes ||
      l->ws_off > arena_bytes)
    return -1;
  l->ws_bytes = arena_bytes - l->ws_off;
  return 0;
}
