/* The engine's cache of segregated transpose weights (transpose.h, convd_plan_segregate): a
 * transpose's weights reordered into its phases' forward blocks, kept by a key naming their
 * content and geometry, so that repeated calls with the same weights skip the pass. At most
 * CONVD_SEGCACHE_ENTRIES entries and CONVD_SEGCACHE_BYTES bytes; the least recently used entry
 * no job holds makes room.
 *
 * Threads: any; one mutex inside guards every entry. The engine's workers acquire and insert
 * (the first worker to need a job's segregated weights), and a job's destroyer releases. */
#ifndef CONVD_SEGCACHE_H
#define CONVD_SEGCACHE_H

#include <stddef.h>
#include <stdint.h>

#define CONVD_SEGCACHE_ENTRIES 8
#define CONVD_SEGCACHE_BYTES (UINT64_C(256) << 20)

typedef struct convd_segcache convd_segcache;

/* An empty cache, or NULL when out of memory. */
convd_segcache *convd_segcache_create(void);
/* Frees every entry: nothing may be held any more. */
void convd_segcache_destroy(convd_segcache *c);

/* The weights cached under key (not 0), with a reference taken for the caller; NULL when none
 * are. */
const float *convd_segcache_acquire(convd_segcache *c, uint64_t key);
/* Offers w (bytes long, from malloc) under key (not 0). Returns 1 when the cache took it: it
 * now owns w and the caller holds a reference on it, as after acquire. Returns 0 when it did
 * not (too large, or every entry held, or no room without evicting more than one): w stays the
 * caller's. */
int convd_segcache_insert(convd_segcache *c, uint64_t key, float *w, size_t bytes);
/* Drops the reference the caller took on w with acquire or insert. */
void convd_segcache_release(convd_segcache *c, const float *w);

#endif
