/* The weights registry: ids from content, dedupe, pinning while in use, deletion while in use,
 * least-recently-used eviction under the byte limit, and its error messages. */
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "registry.h"
#include "testutil.h"

/* C_out x 1 x 1 x 1 weights (4 * c_out bytes) filled with v. */
static float *weights(int64_t c_out, float v) {
  float *w = malloc((size_t)c_out * sizeof(float));
  for (int64_t i = 0; i < c_out; i++) w[i] = v + (float)i;
  return w;
}

static void test_ids_and_dedupe(void) {
  char err[256], id1[33], id2[33], id3[33];
  uint64_t bytes;
  int already;
  convd_registry *r = convd_registry_create(1 << 20);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 8, 1, 1, 1, 0, weights(8, 1), NULL, 0, id1, &bytes, &already, err, sizeof err), err);
  ASSERT_EQ_INT(bytes, 32);
  ASSERT_EQ_INT(already, 0);
  ASSERT_EQ_INT(strlen(id1), 32);
  /* The same values again: the same id, nothing added. */
  ASSERT_OK(convd_registry_put(r, NULL, 0, 8, 1, 1, 1, 1, weights(8, 1), NULL, 0, id2, &bytes, &already, err, sizeof err), err);
  ASSERT_EQ_INT(already, 1);
  ASSERT_TRUE(strcmp(id1, id2) == 0);
  /* Other values, the same values with a bias, the same values as another shape: new ids. */
  ASSERT_OK(convd_registry_put(r, NULL, 0, 8, 1, 1, 1, 0, weights(8, 2), NULL, 0, id3, &bytes, &already, err, sizeof err), err);
  ASSERT_TRUE(strcmp(id1, id3) != 0 && !already);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 8, 1, 1, 1, 0, weights(8, 1), weights(8, 0), 8, id3, &bytes, &already, err, sizeof err), err);
  ASSERT_TRUE(strcmp(id1, id3) != 0 && !already && bytes == 64);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 4, 2, 1, 1, 0, weights(8, 1), NULL, 0, id3, &bytes, &already, err, sizeof err), err);
  ASSERT_TRUE(strcmp(id1, id3) != 0 && !already);
  convd_registry_stats st;
  convd_registry_stats_get(r, &st);
  ASSERT_EQ_INT(st.entries, 4);
  ASSERT_EQ_INT(st.bytes, 32 + 32 + 64 + 32);
  ASSERT_EQ_INT(st.dedupes, 1);
  /* The entry holds the values. */
  convd_weights *w;
  ASSERT_OK(convd_registry_acquire(r, NULL, id1, &w, err, sizeof err), err);
  ASSERT_TRUE(w->c_out == 8 && w->w[3] == 4.0f && w->b == NULL && w->digest != 0);
  convd_registry_release(r, w);
  /* Unknown ids: NOT_FOUND with a message that says what to do. */
  ASSERT_EQ_INT(convd_registry_acquire(r, NULL, "00000000000000000000000000000000", &w, err, sizeof err), CONVD_ENOTFOUND);
  ASSERT_CONTAINS(err, "PutWeights them again");
  ASSERT_EQ_INT(convd_registry_delete(r, NULL, "nope", err, sizeof err), CONVD_ENOTFOUND);
  convd_registry_destroy(r);
}

static void test_eviction_lru_and_pinning(void) {
  char err[256], a[33], b[33], c[33], d[33];
  uint64_t bytes;
  int already;
  /* Room for three entries of 400 bytes. */
  convd_registry *r = convd_registry_create(1200);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 100, 1, 1, 1, 0, weights(100, 1), NULL, 0, a, &bytes, &already, err, sizeof err), err);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 100, 1, 1, 1, 0, weights(100, 2), NULL, 0, b, &bytes, &already, err, sizeof err), err);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 100, 1, 1, 1, 0, weights(100, 3), NULL, 0, c, &bytes, &already, err, sizeof err), err);
  /* a is used (so b is now the least recently used) and pinned. */
  convd_weights *wa;
  ASSERT_OK(convd_registry_acquire(r, NULL, a, &wa, err, sizeof err), err);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 100, 1, 1, 1, 0, weights(100, 4), NULL, 0, d, &bytes, &already, err, sizeof err), err);
  convd_weights *w;
  ASSERT_EQ_INT(convd_registry_acquire(r, NULL, b, &w, err, sizeof err), CONVD_ENOTFOUND); /* evicted */
  ASSERT_OK(convd_registry_acquire(r, NULL, c, &w, err, sizeof err), err);
  convd_registry_release(r, w);
  /* Listing: most recently used first. */
  convd_weights_info *list;
  size_t n;
  ASSERT_OK(convd_registry_list(r, NULL, &list, &n, NULL), "list");
  ASSERT_EQ_INT(n, 3);
  ASSERT_TRUE(strcmp(list[0].meta.id, c) == 0 && strcmp(list[1].meta.id, d) == 0 &&
              strcmp(list[2].meta.id, a) == 0);
  ASSERT_EQ_INT(list[2].in_use, 1);
  free(list);
  /* Two more: c and d go (LRU among the unused); a is pinned and stays. */
  char e[33], f[33];
  ASSERT_OK(convd_registry_put(r, NULL, 0, 100, 1, 1, 1, 0, weights(100, 5), NULL, 0, e, &bytes, &already, err, sizeof err), err);
  ASSERT_OK(convd_registry_put(r, NULL, 0, 100, 1, 1, 1, 0, weights(100, 6), NULL, 0, f, &bytes, &already, err, sizeof err), err);
  ASSERT_EQ_INT(convd_registry_acquire(r, NULL, d, &w, err, sizeof err), CONVD_ENOTFOUND);
  ASSERT_EQ_INT(convd_registry_acquire(r, NULL, c, &w, err, sizeof err), CONVD_ENOTFOUND);
  ASSERT_OK(convd_registry_acquire(r, NULL, a, &w, err, sizeof err), err);
  convd_registry_release(r, w);
  /* Pin everything: a put that cannot evict anything says so. */
  convd_weights *we, *wf;
  ASSERT_OK(convd_registry_acquire(r, NULL, e, &we, err, sizeof err), err);
  ASSERT_OK(convd_registry_acquire(r, NULL, f, &wf, err, sizeof err), err);
  char g[33];
  ASSERT_EQ_INT(convd_registry_put(r, NULL, 0, 100, 1, 1, 1, 0, weights(100, 7), NULL, 0, g, &bytes, &already, err, sizeof err), CONVD_ELIMIT);
  ASSERT_CONTAINS(err, "that calls are using now");
  /* Larger than the limit itself. */
  ASSERT_EQ_INT(convd_registry_put(r, NULL, 0, 400, 1, 1, 1, 0, weights(400, 7), NULL, 0, g, &bytes, &already, err, sizeof err), CONVD_ELIMIT);
  ASSERT_CONTAINS(err, "--weights-memory");
  /* Deleting an entry in use: gone for new calls, alive for its user (ASan checks the read). */
  ASSERT_OK(convd_registry_delete(r, NULL, a, err, sizeof err), err);
  ASSERT_EQ_INT(convd_registry_acquire(r, NULL, a, &w, err, sizeof err), CONVD_ENOTFOUND);
  ASSERT_TRUE(wa->w[99] == 100.0f);
  convd_registry_release(r, wa);
  convd_registry_release(r, we);
  convd_registry_release(r, wf);
  convd_registry_stats st;
  convd_registry_stats_get(r, &st);
  ASSERT_EQ_INT(st.entries, 2);
  ASSERT_EQ_INT(st.evictions, 3);
  convd_registry_destroy(r);
}

/* Two tenants: the same content gets two ids and two entries; neither finds, lists or deletes
 * the other's (by its id or by a guess); a tenant's own limit holds while the registry has room. */
static void test_tenants(void) {
  char err[256], ida[33], idb[33], idc[33];
  uint64_t bytes;
  int already;
  convd_weights *w;
  convd_registry *r = convd_registry_create(1 << 20);
  ASSERT_OK(convd_registry_put(r, "alice", 0, 8, 1, 1, 1, 0, weights(8, 1), NULL, 0, ida, &bytes, &already, err, sizeof err), err);
  ASSERT_EQ_INT(already, 0);
  ASSERT_OK(convd_registry_put(r, "bob", 0, 8, 1, 1, 1, 0, weights(8, 1), NULL, 0, idb, &bytes, &already, err, sizeof err), err);
  ASSERT_EQ_INT(already, 0); /* bob is not told that alice has the same weights */
  ASSERT_TRUE(strcmp(ida, idb) != 0);
  ASSERT_EQ_INT(convd_registry_acquire(r, "bob", ida, &w, err, sizeof err), CONVD_ENOTFOUND);
  ASSERT_EQ_INT(convd_registry_acquire(r, NULL, ida, &w, err, sizeof err), CONVD_ENOTFOUND);
  ASSERT_EQ_INT(convd_registry_delete(r, "bob", ida, err, sizeof err), CONVD_ENOTFOUND);
  ASSERT_OK(convd_registry_acquire(r, "alice", ida, &w, err, sizeof err), err);
  ASSERT_TRUE(w->w[7] == 8.0f);
  convd_registry_release(r, w);
  convd_weights_info *list;
  size_t n;
  uint64_t own;
  ASSERT_OK(convd_registry_list(r, "bob", &list, &n, &own), "list");
  ASSERT_EQ_INT(n, 1);
  ASSERT_TRUE(strcmp(list[0].meta.id, idb) == 0);
  ASSERT_EQ_INT(own, 32);
  free(list);
  ASSERT_OK(convd_registry_list(r, "carol", &list, &n, &own), "list");
  ASSERT_EQ_INT(n, 0);
  ASSERT_EQ_INT(own, 0);
  free(list);
  /* alice's limit of 64 bytes: 32 held, 40 more refused with the limit named */
  ASSERT_EQ_INT(convd_registry_put(r, "alice", 64, 10, 1, 1, 1, 0, weights(10, 3), NULL, 0, idc, &bytes, &already, err, sizeof err), CONVD_ELIMIT);
  ASSERT_CONTAINS(err, "weights-bytes");
  ASSERT_OK(convd_registry_put(r, "alice", 64, 8, 1, 1, 1, 0, weights(8, 3), NULL, 0, idc, &bytes, &already, err, sizeof err), err);
  ASSERT_OK(convd_registry_delete(r, "alice", ida, err, sizeof err), err);
  ASSERT_OK(convd_registry_acquire(r, "bob", idb, &w, err, sizeof err), err); /* bob's stays */
  convd_registry_release(r, w);
  convd_registry_destroy(r);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"ids_and_dedupe", test_ids_and_dedupe},
      {"eviction_lru_and_pinning", test_eviction_lru_and_pinning},
      {"tenants", test_tenants},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
