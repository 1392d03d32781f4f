/* See registry.h. Threads: any; one mutex (registry.mu) guards the entries, their pins and the counters. */
#include "registry.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "clock.h"
#include "err.h"

typedef struct entry {
  convd_weights w;    /* first: users get &entry->w */
  char tenant[CONVD_TENANT_MAX + 1]; /* whose it is: only they find, list or delete it */
  struct entry *prev, *next; /* in the registry's recency list while registered */
  int registered;
  unsigned refs;
  uint64_t uses;
  double last_use;
} entry;

struct convd_registry {
  pthread_mutex_t mu;
  entry *head; /* most recently used */
  convd_registry_stats st;
};

convd_registry *convd_registry_create(uint64_t limit_bytes) {
  convd_registry *r = calloc(1, sizeof *r);
  if (r == NULL) return NULL;
  pthread_mutex_init(&r->mu, NULL);
  r->st.limit = limit_bytes;
  return r;
}

static void entry_free(entry *e) {
  free(e->w.w);
  free(e->w.b);
  free(e);
}

void convd_registry_destroy(convd_registry *r) {
  if (r == NULL) return;
  for (entry *e = r->head, *next; e; e = next) {
    next = e->next;
    entry_free(e);
  }
  pthread_mutex_destroy(&r->mu);
  free(r);
}

static void unlink_entry(convd_registry *r, entry *e) {
  if (e->prev) e->prev->next = e->next;
  else r->head = e->next;
  if (e->next) e->next->prev = e->prev;
  e->prev = e->next = NULL;
  e->registered = 0;
  r->st.entries--;
  r->st.bytes -= e->w.bytes;
}

static void push_front(convd_registry *r, entry *e) {
  e->prev = NULL;
  e->next = r->head;
  if (r->head) r->head->prev = e;
  r->head = e;
}

static const char *tenant_or_none(const char *t) { return t ? t : ""; }

/* An entry is found only by its own tenant: another tenant that knows (or guesses) its id
 * learns nothing, not even that it exists. */
static entry *find(convd_registry *r, const char *id, const char *tenant) {
  for (entry *e = r->head; e; e = e->next)
    if (strcmp(e->w.id, id) == 0 && strcmp(e->tenant, tenant) == 0) return e;
  return NULL;
}

static uint64_t tenant_bytes(const convd_registry *r, const char *tenant) {
  uint64_t b = 0;
  for (const entry *e = r->head; e; e = e->next)
    if (strcmp(e->tenant, tenant) == 0) b += e->w.bytes;
  return b;
}

int convd_registry_put(convd_registry *r, const char *tenant, uint64_t tenant_limit,
                       int64_t c_out, int64_t c_per_group, int64_t kh,
                       int64_t kw, int dtype, float *w, float *b, int64_t b_elems,
                       char id[CONVD_WEIGHTS_ID_LEN + 1],
                       uint64_t *bytes, int *already, char *err, size_t errlen) {
  *already = 0;
  tenant = tenant_or_none(tenant);
  if (strlen(tenant) > CONVD_TENANT_MAX) {
    free(w), free(b);
    return convd_errf(err, errlen, CONVD_EINVAL, "tenant name longer than %d characters", CONVD_TENANT_MAX);
  }
  if (b == NULL) b_elems = 0;
  if (c_out < 1 || c_per_group < 1 || kh < 1 || kw < 1 || w == NULL || (b && b_elems < 1)) {
    free(w), free(b);
    return convd_errf(err, errlen, CONVD_EINVAL, "weights need a shape of at least 1 in every dimension");
  }
  const size_t elems = (size_t)c_out * (size_t)c_per_group * (size_t)kh * (size_t)kw;
  /* The id: a 128-bit hash of the tenant, the shape, the values and the bias (values, not the
   * wire type: float16 weights and the same values sent as float32 are the same weights). The
   * tenant is in it so that two tenants' ids of the same content differ: neither can tell the
   * other has it. */
  XXH3_state_t *hs = XXH3_createState();
  if (hs == NULL) {
    free(w), free(b);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory hashing weights");
  }
  const int64_t shape[5] = {c_out, c_per_group, kh, kw, b_elems};
  XXH3_128bits_reset(hs);
  XXH3_128bits_update(hs, tenant, strlen(tenant) + 1);
  XXH3_128bits_update(hs, shape, sizeof shape);
  XXH3_128bits_update(hs, w, elems * sizeof(float));
  if (b) XXH3_128bits_update(hs, b, (size_t)b_elems * sizeof(float));
  XXH128_hash_t h = XXH3_128bits_digest(hs);
  XXH3_freeState(hs);
  char hex[CONVD_WEIGHTS_ID_LEN + 1];
  snprintf(hex, sizeof hex, "%016" PRIx64 "%016" PRIx64, (uint64_t)h.high64, (uint64_t)h.low64);
  const uint64_t need = (uint64_t)(elems + (size_t)b_elems) * sizeof(float);

  pthread_mutex_lock(&r->mu);
  r->st.puts++;
  entry *e = find(r, hex, tenant);
  if (e) { /* the same content: a use, nothing added */
    if (e->prev) {
      e->prev->next = e->next;
      if (e->next) e->next->prev = e->prev;
      push_front(r, e);
    }
    e->last_use = convd_now_seconds();
    r->st.dedupes++;
    *already = 1;
    *bytes = e->w.bytes;
    memcpy(id, hex, sizeof hex);
    pthread_mutex_unlock(&r->mu);
    free(w), free(b);
    return 0;
  }
  if (need > r->st.limit) {
    pthread_mutex_unlock(&r->mu);
    free(w), free(b);
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "weights of %" PRIu64 " bytes exceed the registry's limit of %" PRIu64
                      " bytes (--weights-memory): send them inline with each call instead",
                      need, r->st.limit);
  }
  if (tenant_limit) {
    const uint64_t own = tenant_bytes(r, tenant);
    if (need > tenant_limit || own > tenant_limit - need) {
      pthread_mutex_unlock(&r->mu);
      free(w), free(b);
      return convd_errf(err, errlen, CONVD_ELIMIT,
                        "tenant %s has %" PRIu64 " bytes of registered weights; %" PRIu64 " more "
                        "go over its limit of %" PRIu64 " (weights-bytes in the tokens file): "
                        "DeleteWeights some first",
                        tenant, own, need, tenant_limit);
    }
  }
  /* Evict least recently used entries no call is using until the new one fits. */
  while (r->st.bytes + need > r->st.limit) {
    entry *victim = NULL;
    for (entry *x = r->head; x; x = x->next)
      if (x->refs == 0) victim = x; /* the last unused one is the least recently used */
    if (victim == NULL) break;
    unlink_entry(r, victim);
    r->st.evictions++;
    entry_free(victim);
  }
  if (r->st.bytes + need > r->st.limit) {
    const uint64_t used = r->st.bytes, limit = r->st.limit;
    pthread_mutex_unlock(&r->mu);
    free(w), free(b);
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "the weights registry holds %" PRIu64 " of %" PRIu64 " bytes in weights "
                      "that calls are using now; %" PRIu64 " more do not fit: retry when they end",
                      used, limit, need);
  }
  e = calloc(1, sizeof *e);
  if (e == NULL) {
    pthread_mutex_unlock(&r->mu);
    free(w), free(b);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory registering weights");
  }
  memcpy(e->w.id, hex, sizeof hex);
  snprintf(e->tenant, sizeof e->tenant, "%s", tenant);
  e->w.c_out = c_out, e->w.c_per_group = c_per_group, e->w.kh = kh, e->w.kw = kw;
  e->w.has_bias = b != NULL;
  e->w.b_elems = b_elems;
  e->w.dtype = dtype;
  e->w.w = w, e->w.b = b;
  e->w.weight_elems = elems;
  e->w.digest = (uint64_t)h.low64 ? (uint64_t)h.low64 : 1;
  e->w.bytes = need;
  e->registered = 1;
  e->last_use = convd_now_seconds();
  push_front(r, e);
  r->st.entries++;
  r->st.bytes += need;
  *bytes = need;
  memcpy(id, hex, sizeof hex);
  pthread_mutex_unlock(&r->mu);
  return 0;
}

int convd_registry_acquire(convd_registry *r, const char *tenant, const char *id,
                           convd_weights **out, char *err, size_t errlen) {
  *out = NULL;
  pthread_mutex_lock(&r->mu);
  entry *e = find(r, id, tenant_or_none(tenant));
  if (e == NULL) {
    r->st.misses++;
    pthread_mutex_unlock(&r->mu);
    return convd_errf(err, errlen, CONVD_ENOTFOUND,
                      "weights_id %.40s is not in the registry (never put, deleted, or evicted to "
                      "make room): PutWeights them again, or send the weights inline",
                      id);
  }
  r->st.hits++;
  e->refs++;
  e->uses++;
  e->last_use = convd_now_seconds();
  if (e->prev) { /* most recently used first */
    e->prev->next = e->next;
    if (e->next) e->next->prev = e->prev;
    push_front(r, e);
  }
  *out = &e->w;
  pthread_mutex_unlock(&r->mu);
  return 0;
}

void convd_registry_release(convd_registry *r, convd_weights *w) {
  if (w == NULL) return;
  entry *e = (entry *)w;
  pthread_mutex_lock(&r->mu);
  int gone = --e->refs == 0 && !e->registered;
  e->last_use = convd_now_seconds();
  pthread_mutex_unlock(&r->mu);
  if (gone) entry_free(e);
}

int convd_registry_delete(convd_registry *r, const char *tenant, const char *id, char *err,
                          size_t errlen) {
  pthread_mutex_lock(&r->mu);
  entry *e = find(r, id, tenant_or_none(tenant));
  if (e == NULL) {
    pthread_mutex_unlock(&r->mu);
    return convd_errf(err, errlen, CONVD_ENOTFOUND, "weights_id %.40s is not in the registry", id);
  }
  unlink_entry(r, e);
  int gone = e->refs == 0;
  pthread_mutex_unlock(&r->mu);
  if (gone) entry_free(e);
  return 0;
}

int convd_registry_list(convd_registry *r, const char *tenant, convd_weights_info **out,
                        size_t *n, uint64_t *bytes) {
  tenant = tenant_or_none(tenant);
  pthread_mutex_lock(&r->mu);
  size_t count = (size_t)r->st.entries;
  convd_weights_info *v = calloc(count ? count : 1, sizeof *v);
  if (v == NULL) {
    pthread_mutex_unlock(&r->mu);
    return CONVD_ENOMEM;
  }
  const double t = convd_now_seconds();
  size_t i = 0;
  uint64_t own = 0;
  for (entry *e = r->head; e && i < count; e = e->next) {
    if (strcmp(e->tenant, tenant) != 0) continue;
    own += e->w.bytes;
    v[i].meta = e->w;
    v[i].meta.w = v[i].meta.b = NULL;
    v[i].uses = e->uses;
    v[i].idle_seconds = t - e->last_use;
    v[i].in_use = e->refs;
    i++;
  }
  pthread_mutex_unlock(&r->mu);
  *out = v;
  *n = i;
  if (bytes) *bytes = own;
  return 0;
}

void convd_registry_stats_get(convd_registry *r, convd_registry_stats *st) {
  pthread_mutex_lock(&r->mu);
  *st = r->st;
  pthread_mutex_unlock(&r->mu);
}
