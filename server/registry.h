/* The weights registry: weights uploaded once and named by an id derived from their content, so
 * that later calls send the id instead of the tensor. Bounded by a byte limit; when a new entry
 * does not fit, the least recently used entries that no call is using are evicted. Entries a
 * call uses are pinned until it releases them; a deleted or evicted entry stays alive for the
 * calls still using it and is freed after the last. Every entry belongs to a tenant (NULL or ""
 * is the one tenant of a daemon without tokens): only that tenant's calls find, list or delete
 * it, and the same content put by two tenants is two entries with different ids. Thread-safe.
 * Knows no gRPC. */
#ifndef CONVD_REGISTRY_H
#define CONVD_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

#define CONVD_WEIGHTS_ID_LEN 32 /* hex digits */
#define CONVD_TENANT_MAX 64     /* characters of a tenant's name */

typedef struct convd_registry convd_registry;

/* One entry, read-only for its users while they hold it. */
typedef struct convd_weights {
  char id[CONVD_WEIGHTS_ID_LEN + 1];
  int64_t c_out, c_per_group, kh, kw;
  int has_bias;
  int dtype;        /* as uploaded */
  float *w, *b;     /* float32 values; b NULL without bias */
  int64_t b_elems;  /* bias values (C_out of the calls that may use them) */
  size_t weight_elems;
  uint64_t digest;  /* names the content for device weight caches */
  uint64_t bytes;   /* what the entry counts against the limit */
} convd_weights;

typedef struct convd_weights_info {
  convd_weights meta; /* w and b are NULL in a listing */
  uint64_t uses;
  double idle_seconds;
  unsigned in_use;
} convd_weights_info;

typedef struct convd_registry_stats {
  uint64_t entries, bytes, limit;
  uint64_t puts, dedupes, hits, misses, evictions;
} convd_registry_stats;

convd_registry *convd_registry_create(uint64_t limit_bytes);
/* Every entry must have been released. */
void convd_registry_destroy(convd_registry *r);

/* Registers weights (d0 x d1 x kH x kW float32 values in w: conv2d's or conv_transpose2d's
 * layout, as the calls will name it; b_elems bias values in b, or NULL), taking w and b over in
 * every case. On success *id holds the content's id and *already says
 * whether the same content was registered before by this tenant (then nothing was added).
 * tenant_limit (0 = none) bounds the tenant's entries' bytes together. Returns 0, CONVD_ELIMIT
 * when the entry cannot fit even after evicting everything unused (or over the tenant's limit),
 * or CONVD_EINVAL for a bad shape. */
int convd_registry_put(convd_registry *r, const char *tenant, uint64_t tenant_limit,
                       int64_t c_out, int64_t c_per_group, int64_t kh,
                       int64_t kw, int dtype, float *w, float *b, int64_t b_elems,
                       char id[CONVD_WEIGHTS_ID_LEN + 1],
                       uint64_t *bytes, int *already, char *err, size_t errlen);

/* The entry for id, pinned until convd_registry_release; CONVD_ENOTFOUND with a message when the
 * id is unknown (never registered, deleted or evicted). */
int convd_registry_acquire(convd_registry *r, const char *tenant, const char *id,
                           convd_weights **out, char *err, size_t errlen);
void convd_registry_release(convd_registry *r, convd_weights *w);

/* Removes id from the registry (calls using it keep it until they end). CONVD_ENOTFOUND when
 * it is not there. */
int convd_registry_delete(convd_registry *r, const char *tenant, const char *id, char *err,
                          size_t errlen);

/* A malloc'd snapshot of the tenant's entries, most recently used first (free() it), and the
 * bytes they count (bytes may be NULL). */
int convd_registry_list(convd_registry *r, const char *tenant, convd_weights_info **out,
                        size_t *n, uint64_t *bytes);
void convd_registry_stats_get(convd_registry *r, convd_registry_stats *st);

#endif
