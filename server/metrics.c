/* See metrics.h. Threads: convd_metrics_call_ended runs wherever a call ends (completion-queue
 * thread or a device worker); render runs on the libuv loop. m->mu guards the counters. */
#include "metrics.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Histogram buckets (seconds): from a small unary call to a long tiled job. */
static const double buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                 0.5,   1,      2.5,   5,    10,    30,   60,  300};
#define NBUCKETS (sizeof buckets / sizeof buckets[0])
#define MAX_METHODS 16
#define MAX_STATUSES 17 /* gRPC's codes */
/* Tenants with series of their own; later ones share OTHER_TENANT's (labels stay bounded). */
#define MAX_TENANTS 64
#define OTHER_TENANT "_other"

typedef struct histogram {
  uint64_t counts[NBUCKETS]; /* per bucket, not cumulative */
  uint64_t n;
  double sum;
} histogram;

typedef struct status_count {
  char status[24];
  uint64_t n;
} status_count;

typedef struct method_stats {
  char name[32];
  status_count by_status[MAX_STATUSES];
  histogram duration, queue;
} method_stats;

typedef struct tenant_stats {
  char name[72]; /* tokens-file names: letters, digits, - _ . (safe in a label) */
  status_count by_status[MAX_STATUSES];
  uint64_t bytes_in, bytes_out;
} tenant_stats;

struct convd_metrics {
  pthread_mutex_t mu;
  method_stats methods[MAX_METHODS];
  int nmethods;
  tenant_stats tenants[MAX_TENANTS + 1];
  int ntenants;
  uint64_t bytes_in, bytes_out;
};

static void count_status(status_count *by, const char *status) {
  int k = 0;
  while (k < MAX_STATUSES && by[k].status[0] && strcmp(by[k].status, status) != 0) k++;
  if (k < MAX_STATUSES) {
    snprintf(by[k].status, sizeof by[k].status, "%s", status);
    by[k].n++;
  }
}

static tenant_stats *tenant_of(convd_metrics *m, const char *tenant) {
  for (int i = 0; i < m->ntenants; i++)
    if (strcmp(m->tenants[i].name, tenant) == 0) return &m->tenants[i];
  if (m->ntenants == MAX_TENANTS) tenant = OTHER_TENANT;
  for (int i = 0; i < m->ntenants; i++)
    if (strcmp(m->tenants[i].name, tenant) == 0) return &m->tenants[i];
  tenant_stats *t = &m->tenants[m->ntenants++];
  snprintf(t->name, sizeof t->name, "%s", tenant);
  return t;
}

convd_metrics *convd_metrics_create(void) {
  convd_metrics *m = calloc(1, sizeof *m);
  if (m) pthread_mutex_init(&m->mu, NULL);
  return m;
}

void convd_metrics_destroy(convd_metrics *m) {
  if (m == NULL) return;
  pthread_mutex_destroy(&m->mu);
  free(m);
}

static void observe(histogram *h, double v) {
  size_t i = 0;
  while (i < NBUCKETS && v > buckets[i]) i++;
  if (i < NBUCKETS) h->counts[i]++;
  h->n++;
  h->sum += v;
}

void convd_metrics_call_ended(convd_metrics *m, const char *method, const char *tenant,
                              const char *status, double seconds, double queue_seconds,
                              uint64_t bytes_in, uint64_t bytes_out) {
  pthread_mutex_lock(&m->mu);
  method_stats *ms = NULL;
  for (int i = 0; i < m->nmethods && !ms; i++)
    if (strcmp(m->methods[i].name, method) == 0) ms = &m->methods[i];
  if (ms == NULL && m->nmethods < MAX_METHODS) {
    ms = &m->methods[m->nmethods++];
    snprintf(ms->name, sizeof ms->name, "%s", method);
  }
  if (tenant) {
    tenant_stats *t = tenant_of(m, tenant);
    count_status(t->by_status, status);
    t->bytes_in += bytes_in;
    t->bytes_out += bytes_out;
  }
  if (ms) {
    count_status(ms->by_status, status);
    observe(&ms->duration, seconds);
    if (queue_seconds >= 0) observe(&ms->queue, queue_seconds);
  }
  m->bytes_in += bytes_in;
  m->bytes_out += bytes_out;
  pthread_mutex_unlock(&m->mu);
}

/* A growing text buffer; on allocation failure it stops growing and reports it at the end. */
typedef struct text {
  char *p;
  size_t len, cap;
  int failed;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
  if (t->failed) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t->p ? t->p + t->len : NULL, t->p ? t->cap - t->len : 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
      t->failed = 1;
      return;
    }
    if (t->p && t->len + (size_t)n < t->cap) {
      t->len += (size_t)n;
      return;
    }
    size_t cap = t->cap ? t->cap * 2 : 16384;
    while (cap < t->len + (size_t)n + 1) cap *= 2;
    char *np = realloc(t->p, cap);
    if (np == NULL) {
      t->failed = 1;
      return;
    }
    t->p = np;
    t->cap = cap;
  }
}

static void header(text *t, const char *name, const char *type, const char *help) {
  put(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One unlabelled series with its HELP and TYPE lines. */
static void scalar(text *t, const char *name, const char *type, const char *help, uint64_t v) {
  header(t, name, type, help);
  put(t, "%s %" PRIu64 "\n", name, v);
}

static void put_histogram(text *t, const char *name, const char *method, const histogram *h) {
  uint64_t cum = 0;
  for (size_t i = 0; i < NBUCKETS; i++) {
    cum += h->counts[i];
    put(t, "%s_bucket{method=\"%s\",le=\"%g\"} %" PRIu64 "\n", name, method, buckets[i], cum);
  }
  put(t, "%s_bucket{method=\"%s\",le=\"+Inf\"} %" PRIu64 "\n", name, method, h->n);
  put(t, "%s_sum{method=\"%s\"} %.9g\n%s_count{method=\"%s\"} %" PRIu64 "\n", name, method, h->sum,
      name, method, h->n);
}

static const char *kind_name(int kind) {
  return kind == CONVD_DEVICE_CUDA ? "cuda" : kind == CONVD_DEVICE_CPU ? "cpu" : "reference";
}

char *convd_metrics_render(convd_metrics *m, convd_engine *e, convd_registry *reg,
                           const convd_metrics_gauges *g, size_t *len) {
  text t = {0};
  pthread_mutex_lock(&m->mu);
  header(&t, "convd_requests_total", "counter", "Calls ended, by method and gRPC status.");
  for (int i = 0; i < m->nmethods; i++)
    for (int k = 0; k < MAX_STATUSES && m->methods[i].by_status[k].status[0]; k++)
      put(&t, "convd_requests_total{method=\"%s\",status=\"%s\"} %" PRIu64 "\n", m->methods[i].name,
          m->methods[i].by_status[k].status, m->methods[i].by_status[k].n);
  header(&t, "convd_request_duration_seconds", "histogram", "Wall time of calls, by method.");
  for (int i = 0; i < m->nmethods; i++)
    put_histogram(&t, "convd_request_duration_seconds", m->methods[i].name, &m->methods[i].duration);
  header(&t, "convd_queue_wait_seconds", "histogram",
         "Time a call's first elemental op waited for a device, by method.");
  for (int i = 0; i < m->nmethods; i++)
    if (m->methods[i].queue.n) put_histogram(&t, "convd_queue_wait_seconds", m->methods[i].name, &m->methods[i].queue);
  if (m->ntenants) {
    header(&t, "convd_tenant_requests_total", "counter",
           "Calls ended, by tenant (--auth-tokens) and gRPC status.");
    for (int i = 0; i < m->ntenants; i++)
      for (int k = 0; k < MAX_STATUSES && m->tenants[i].by_status[k].status[0]; k++)
        put(&t, "convd_tenant_requests_total{tenant=\"%s\",status=\"%s\"} %" PRIu64 "\n",
            m->tenants[i].name, m->tenants[i].by_status[k].status, m->tenants[i].by_status[k].n);
    header(&t, "convd_tenant_received_bytes_total", "counter", "Tensor bytes received, by tenant.");
    for (int i = 0; i < m->ntenants; i++)
      put(&t, "convd_tenant_received_bytes_total{tenant=\"%s\"} %" PRIu64 "\n", m->tenants[i].name,
          m->tenants[i].bytes_in);
    header(&t, "convd_tenant_sent_bytes_total", "counter", "Tensor bytes sent, by tenant.");
    for (int i = 0; i < m->ntenants; i++)
      put(&t, "convd_tenant_sent_bytes_total{tenant=\"%s\"} %" PRIu64 "\n", m->tenants[i].name,
          m->tenants[i].bytes_out);
  }
  scalar(&t, "convd_received_bytes_total", "counter", "Tensor bytes received (weights, bias, input).", (uint64_t)(m->bytes_in));
  scalar(&t, "convd_sent_bytes_total", "counter", "Tensor bytes sent (output).", (uint64_t)(m->bytes_out));
  pthread_mutex_unlock(&m->mu);

  convd_engine_load ld;
  convd_engine_load_get(e, &ld);
  scalar(&t, "convd_serving", "gauge", "1 while the health service says SERVING.", (uint64_t)(g->serving));
  if (g->auth)
    scalar(&t, "convd_auth_refused_total", "counter",
           "Calls refused UNAUTHENTICATED for a wrong bearer token (before dispatch).", g->auth_refused);
  if (g->shm) {
    scalar(&t, "convd_shm_regions", "gauge", "Shared-memory regions registered (all tenants).", g->shm_regions);
    scalar(&t, "convd_shm_bytes", "gauge", "Bytes of shared-memory regions mapped.", g->shm_bytes);
    scalar(&t, "convd_shm_regions_in_place", "gauge", "Of those regions, sealed memfds used in place.", g->shm_in_place);
    scalar(&t, "convd_shm_pending_descriptors", "gauge",
           "Descriptors passed over the descriptor socket and waiting for their RegisterRegion.", g->shm_pending_fds);
  }
  if (g->connections_limit) {
    scalar(&t, "convd_connections", "gauge", "gRPC connections open (at the last scan).", g->connections_open);
    scalar(&t, "convd_connections_limit", "gauge", "--max-connections.", g->connections_limit);
    scalar(&t, "convd_connections_refused_total", "counter",
           "Connections closed on arrival because --max-connections were open.", g->connections_refused);
  }
  scalar(&t, "convd_calls_in_flight", "gauge", "Calls in progress (all methods).", (uint64_t)(g->calls_in_flight));
  scalar(&t, "convd_inflight_jobs", "gauge", "Convolution jobs in the engine.", (uint64_t)(ld.jobs));
  scalar(&t, "convd_pending_ops", "gauge", "Elemental ops of those jobs not yet done.", (uint64_t)(ld.pending_ops));
  scalar(&t, "convd_queued_ops", "gauge", "Elemental ops ready and waiting for a device.", (uint64_t)(ld.ready_ops));
  scalar(&t, "convd_running_ops", "gauge", "Elemental ops on a device now.", (uint64_t)(ld.running_ops));
  scalar(&t, "convd_job_bytes_held", "gauge", "Input and output rows the jobs hold.", (uint64_t)(ld.bytes_held));
  scalar(&t, "convd_inflight_bytes", "gauge", "Bytes admitted for calls in flight (--max-inflight-bytes).", (uint64_t)(g->inflight_bytes));
  scalar(&t, "convd_inflight_bytes_limit", "gauge", "The admission limit on bytes in flight.", (uint64_t)(g->inflight_limit));

  const size_t nd = convd_engine_device_count(e);
  convd_device_info *info = calloc(nd ? nd : 1, sizeof *info);
  if (info) {
    for (size_t i = 0; i < nd; i++) convd_engine_device_info(e, i, &info[i]);
    static const struct {
      const char *name, *type, *help;
    } dm[] = {
        {"convd_device_ops_total", "counter", "Elemental ops a device finished."},
        {"convd_device_busy_seconds_total", "counter", "Seconds a device spent running ops."},
        {"convd_device_healthy", "gauge", "1 while a device takes work."},
        {"convd_device_memory_bytes", "gauge", "Memory a device may use for one op."},
        {"convd_device_weight_cache_hits_total", "counter", "Ops whose weight block was cached on the device."},
        {"convd_device_weight_cache_misses_total", "counter", "Ops whose weight block was not cached."},
        {"convd_device_weight_bytes_loaded_total", "counter", "Weight bytes copied into device memory."},
        {"convd_device_bus_bytes_total", "counter", "Bytes copied over the bus (GPUs) or sent over the link (MPI ranks), by direction."},
        {"convd_device_kernel_seconds_total", "counter", "GPU time in convolution kernels (CUDA events)."},
    };
    for (size_t k = 0; k < sizeof dm / sizeof dm[0]; k++) {
      header(&t, dm[k].name, dm[k].type, dm[k].help);
      for (size_t i = 0; i < nd; i++) {
        const convd_device_info *d = &info[i];
        char lbl[128];
        snprintf(lbl, sizeof lbl, "device=\"%s\",kind=\"%s\"", d->name, kind_name(d->kind));
        switch (k) {
          case 0: put(&t, "%s{%s} %" PRIu64 "\n", dm[k].name, lbl, d->completed_ops); break;
          case 1: put(&t, "%s{%s} %.6f\n", dm[k].name, lbl, d->busy_seconds); break;
          case 2: put(&t, "%s{%s} %d\n", dm[k].name, lbl, d->healthy ? 1 : 0); break;
          case 3: put(&t, "%s{%s} %" PRIu64 "\n", dm[k].name, lbl, d->memory_bytes); break;
          case 4: put(&t, "%s{%s} %" PRIu64 "\n", dm[k].name, lbl, d->stats.weight_cache_hits); break;
          case 5: put(&t, "%s{%s} %" PRIu64 "\n", dm[k].name, lbl, d->stats.weight_cache_misses); break;
          case 6: put(&t, "%s{%s} %" PRIu64 "\n", dm[k].name, lbl, d->stats.weight_bytes_loaded); break;
          case 7:
            put(&t, "%s{%s,direction=\"to_device\"} %" PRIu64 "\n", dm[k].name, lbl, d->stats.bytes_to_device);
            put(&t, "%s{%s,direction=\"from_device\"} %" PRIu64 "\n", dm[k].name, lbl, d->stats.bytes_from_device);
            break;
          default: put(&t, "%s{%s} %.6f\n", dm[k].name, lbl, (double)d->stats.kernel_ns * 1e-9); break;
        }
      }
    }
    free(info);
  } else {
    t.failed = 1;
  }

  convd_registry_stats rs = {0};
  if (reg) convd_registry_stats_get(reg, &rs);
  scalar(&t, "convd_weights_registry_bytes", "gauge", "Bytes of weights in the registry.", (uint64_t)(rs.bytes));
  scalar(&t, "convd_weights_registry_limit_bytes", "gauge", "The registry's limit (--weights-memory).", (uint64_t)(rs.limit));
  scalar(&t, "convd_weights_registry_entries", "gauge", "Weights in the registry.", (uint64_t)(rs.entries));
  scalar(&t, "convd_weights_registry_puts_total", "counter", "PutWeights calls that completed.", (uint64_t)(rs.puts));
  scalar(&t, "convd_weights_registry_dedupes_total", "counter", "Puts of weights already registered.", (uint64_t)(rs.dedupes));
  scalar(&t, "convd_weights_registry_hits_total", "counter", "Calls whose weights_id was found.", (uint64_t)(rs.hits));
  scalar(&t, "convd_weights_registry_misses_total", "counter", "Calls whose weights_id was not found.", (uint64_t)(rs.misses));
  scalar(&t, "convd_weights_registry_evictions_total", "counter", "Weights evicted to make room.", (uint64_t)(rs.evictions));
  if (t.failed) {
    free(t.p);
    return NULL;
  }
  *len = t.len;
  return t.p;
}
