/* The CUDA device's host-side logic, on any machine: the algorithm cache (keys, LRU) and how an
 * op is laid out in the device arena (staged asymmetric padding, alignment, the workspace that
 * is left, ops that do not fit). */
#include <stdlib.h>
#include <string.h>

#include "cuda_host.h"
#include "dtype.h"
#include "testutil.h"

static convd_conv_params params(int64_t c, int64_t h, int64_t w, int64_t o, int64_t k) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = c, p.h = h, p.w = w, p.c_out = o, p.c_per_group = c, p.kh = p.kw = k;
  return p;
}

static void test_algo_cache(void) {
  convd_cuda_algo_cache *c = calloc(1, sizeof *c);
  convd_conv_params p = params(64, 56, 56, 64, 3);
  convd_cuda_algo_key a, b;
  int algo;
  uint64_t ws;
  convd_cuda_algo_key_make(&a, &p, 0, 1000000);
  ASSERT_TRUE(!convd_cuda_algo_find(c, &a, &algo, &ws));
  convd_cuda_algo_put(c, &a, 6, 12345);
  /* A workspace limit that rounds to the same power of two shares the entry. */
  convd_cuda_algo_key_make(&b, &p, 0, 1040000);
  ASSERT_TRUE(convd_cuda_algo_find(c, &b, &algo, &ws));
  ASSERT_EQ_INT(algo, 6);
  ASSERT_EQ_INT(ws, 12345);
  /* Another math mode, padding or workspace class is another key. */
  convd_cuda_algo_key_make(&b, &p, 1, 1000000);
  ASSERT_TRUE(!convd_cuda_algo_find(c, &b, &algo, &ws));
  convd_cuda_algo_key_make(&b, &p, 0, 4000000);
  ASSERT_TRUE(!convd_cuda_algo_find(c, &b, &algo, &ws));
  p.pad_top = 1;
  convd_cuda_algo_key_make(&b, &p, 0, 1000000);
  ASSERT_TRUE(!convd_cuda_algo_find(c, &b, &algo, &ws));
  /* Beyond capacity the least recently used entry goes; the one just used stays. */
  for (int i = 0; i < CONVD_CUDA_ALGO_CACHE; i++) {
    convd_conv_params q = params(1 + i, 9, 9, 4, 3);
    convd_cuda_algo_key k;
    convd_cuda_algo_key_make(&k, &q, 0, 1 << 20);
    convd_cuda_algo_put(c, &k, i % 7, (uint64_t)i);
    if (!convd_cuda_algo_find(c, &a, &algo, &ws)) { /* each find keeps it the most recent */
      FAIL_AT("the entry used most recently was evicted after %d more entries", i + 1);
      free(c);
      return;
    }
  }
  ASSERT_TRUE(convd_cuda_algo_find(c, &a, &algo, &ws));
  convd_conv_params first = params(1, 9, 9, 4, 3);
  convd_cuda_algo_key k0;
  convd_cuda_algo_key_make(&k0, &first, 0, 1 << 20);
  ASSERT_TRUE(!convd_cuda_algo_find(c, &k0, &algo, &ws));
  free(c);
}

static void test_layout(void) {
  char err[256];
  convd_conv_params p = params(8, 20, 30, 16, 3);
  p.pad_top = 2, p.pad_bottom = 0, p.pad_left = 1, p.pad_right = 3;
  convd_conv c;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  convd_cuda_layout l;
  ASSERT_OK(convd_cuda_layout_make(&l, &c, 0, 1 << 20), "layout");
  /* cuDNN gets the symmetric part; the rest is staged as explicit zero rows and columns. */
  ASSERT_EQ_INT(l.pad_h, 0);
  ASSERT_EQ_INT(l.pad_w, 1);
  ASSERT_EQ_INT(l.off_top, 2);
  ASSERT_EQ_INT(l.off_left, 0);
  ASSERT_EQ_INT(l.x_h, 22);
  ASSERT_EQ_INT(l.x_w, 32);
  /* The staged input with cuDNN's padding gives convd's output size. */
  ASSERT_EQ_INT((l.x_h + 2 * l.pad_h - 3) / 1 + 1, c.h_out);
  ASSERT_EQ_INT((l.x_w + 2 * l.pad_w - 3) / 1 + 1, c.w_out);
  ASSERT_EQ_INT(l.x_bytes, 8 * 22 * 32 * 4);
  ASSERT_EQ_INT(l.y_bytes, c.output_bytes);
  ASSERT_EQ_INT(l.w_bytes, c.weight_bytes);
  ASSERT_EQ_INT(l.y_off, 0); /* the output first: channel blocks accumulate in place */
  ASSERT_TRUE(l.x_off % 256 == 0 && l.w_off % 256 == 0 && l.b_off % 256 == 0 && l.ws_off % 256 == 0);
  ASSERT_TRUE(l.x_off >= l.y_off + l.y_bytes && l.w_off >= l.x_off + l.x_bytes &&
              l.b_off >= l.w_off + l.w_bytes && l.ws_off >= l.b_off + l.b_bytes);
  ASSERT_EQ_INT(l.ws_off + l.ws_bytes, 1 << 20);
  /* float16: two bytes per element everywhere. */
  convd_conv_params ph = p;
  ph.dtype = CONVD_F16;
  ph.has_bias = 1;
  convd_conv ch;
  ASSERT_OK(convd_conv_init(&ch, &ph, err, sizeof err), err);
  convd_cuda_layout lh;
  ASSERT_OK(convd_cuda_layout_make(&lh, &ch, 0, 1 << 20), "layout");
  ASSERT_EQ_INT(lh.x_bytes, l.x_bytes / 2);
  ASSERT_EQ_INT(lh.y_bytes, ch.output_elems * 2);
  ASSERT_EQ_INT(lh.w_bytes, ch.weight_elems * 2);
  ASSERT_EQ_INT(lh.b_bytes, 16 * 2);
  ASSERT_TRUE(lh.ws_off >= lh.b_off + lh.b_bytes);
  /* Cached weights take no arena space. */
  convd_cuda_layout lc;
  ASSERT_OK(convd_cuda_layout_make(&lc, &c, 1, 1 << 20), "layout");
  ASSERT_EQ_INT(lc.w_bytes, 0);
  ASSERT_TRUE(lc.ws_bytes > l.ws_bytes);
  /* Too small an arena, and padding far larger than memory, are refused. */
  ASSERT_TRUE(convd_cuda_layout_make(&l, &c, 0, 4096) != 0);
  p.pad_top = 1 << 20, p.pad_left = 1 << 20;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  ASSERT_TRUE(convd_cuda_layout_make(&l, &c, 0, UINT64_C(1) << 40) != 0);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"algo_cache", test_algo_cache},
      {"layout", test_layout},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
