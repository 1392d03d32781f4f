/* See segcache.h. Threads: any; c->mu guards entries and tick. */
#include "segcache.h"

#include <pthread.h>
#include <stdlib.h>

struct convd_segcache {
  pthread_mutex_t mu;
  struct seg_entry {
    uint64_t key;
    float *w; /* NULL: a free entry */
    size_t bytes;
    unsigned refs; /* jobs holding it: it is not evicted while any does */
    uint64_t last_use;
  } e[CONVD_SEGCACHE_ENTRIES];
  uint64_t tick;
};

convd_segcache *convd_segcache_create(void) {
  convd_segcache *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  pthread_mutex_init(&c->mu, NULL);
  return c;
}

void convd_segcache_destroy(convd_segcache *c) {
  if (c == NULL) return;
  for (int i = 0; i < CONVD_SEGCACHE_ENTRIES; i++) free(c->e[i].w);
  pthread_mutex_destroy(&c->mu);
  free(c);
}

const float *convd_segcache_acquire(convd_segcache *c, uint64_t key) {
  const float *w = NULL;
  pthread_mutex_lock(&c->mu);
  for (int i = 0; i < CONVD_SEGCACHE_ENTRIES; i++)
    if (c->e[i].w && c->e[i].key == key) {
      c->e[i].refs++;
      c->e[i].last_use = ++c->tick;
      w = c->e[i].w;
      break;
    }
  pthread_mutex_unlock(&c->mu);
  return w;
}

int convd_segcache_insert(convd_segcache *c, uint64_t key, float *w, size_t bytes) {
  if (bytes > CONVD_SEGCACHE_BYTES) return 0;
  int taken = 0;
  pthread_mutex_lock(&c->mu);
  /* The least recently used entry nobody holds (a free one first) makes room, if evicting it
   * alone brings the total within the cap. */
  uint64_t total = bytes;
  int victim = -1;
  for (int i = 0; i < CONVD_SEGCACHE_ENTRIES; i++) {
    total += c->e[i].bytes;
    if (c->e[i].refs == 0 && (victim < 0 || c->e[i].last_use < c->e[victim].last_use)) victim = i;
  }
  if (victim >= 0 && total - c->e[victim].bytes <= CONVD_SEGCACHE_BYTES) {
    free(c->e[victim].w);
    c->e[victim] = (struct seg_entry){key, w, bytes, 1, ++c->tick};
    taken = 1;
  }
  pthread_mutex_unlock(&c->mu);
  return taken;
}

void convd_segcache_release(convd_segcache *c, const float *w) {
  pthread_mutex_lock(&c->mu);
  for (int i = 0; i < CONVD_SEGCACHE_ENTRIES; i++)
    if (c->e[i].w == w && c->e[i].refs > 0) {
      c->e[i].refs--;
      break;
    }
  pthread_mutex_unlock(&c->mu);
}
