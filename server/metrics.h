/* Prometheus metrics: counters the gRPC side feeds as calls end, plus the engine's and the
 * registry's state read when scraped, rendered as the text exposition format (version 0.0.4).
 * Thread-safe. */
#ifndef CONVD_METRICS_H
#define CONVD_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "registry.h"

typedef struct convd_metrics convd_metrics;

convd_metrics *convd_metrics_create(void);
void convd_metrics_destroy(convd_metrics *m);

/* A call ended: its method, its tenant (NULL: none), its gRPC status name, wall seconds,
 * seconds its first op waited for a device (< 0: it ran none), and tensor bytes received and
 * sent. */
void convd_metrics_call_ended(convd_metrics *m, const char *method, const char *tenant,
                              const char *status, double seconds, double queue_seconds,
                              uint64_t bytes_in, uint64_t bytes_out);

/* What the server adds to a scrape beside its counters. */
typedef struct convd_metrics_gauges {
  uint64_t calls_in_flight;
  uint64_t inflight_bytes, inflight_limit;
  int serving;
  int auth;                   /* --auth-tokens is on */
  uint64_t auth_refused;      /* calls refused for a wrong token */
  uint64_t connections_open, connections_refused, connections_limit; /* limit 0: unbounded */
  int shm;                    /* shared memory is on */
  uint64_t shm_regions, shm_bytes, shm_in_place, shm_pending_fds;
} convd_metrics_gauges;

/* The exposition text (malloc'd, NUL-terminated; NULL when out of memory). reg may be NULL. */
char *convd_metrics_render(convd_metrics *m, convd_engine *e, convd_registry *reg,
                           const convd_metrics_gauges *g, size_t *len);

#endif
