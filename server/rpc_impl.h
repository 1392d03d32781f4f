/* The server's state shared by the call object and the services (private to server/; main.c
 * sees only rpc.h).
 *
 * Threads: the completion-queue thread, device workers (through their calls) and the daemon's
 * libuv loop (drain, health, gauges) all reach it. `mu` guards the call list and the
 * draining/shutdown flags; the atomics are read without it; cfg, engine, registry and metrics
 * are set before serving starts and never change. */
#ifndef CONVD_RPC_IMPL_H
#define CONVD_RPC_IMPL_H

#include <grpc/grpc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "call.h"
#include "offload.h"
#include "shm.h"
#include "methods.h"
#include "rpc.h"

struct convd_rpc {
  const convd_config *cfg;
  convd_engine *engine;
  convd_registry *registry; /* NULL when --weights-memory is 0 */
  convd_shm *shm;           /* NULL when --max-shm-bytes is 0 */
  convd_metrics *metrics;   /* may be NULL */
  convd_tls *tls;           /* NULL: plaintext */
  convd_auth *auth;         /* NULL: no tokens, every call is the anonymous tenant's */
  /* Admission: bytes the calls in flight may hold (each call counts its own share). */
  _Atomic uint64_t inflight_bytes;
  /* Per tenant (by name, so that a tokens reload keeps the counts): bytes admitted and calls in
   * flight. Guarded by mu. */
  struct tenant_use {
    char name[CONVD_TENANT_MAX + 1];
    uint64_t bytes, calls;
    struct tenant_use *next;
  } *tenants;
  _Atomic uint64_t next_rid;
  /* Health: serving while a device is healthy; health_draining once the drain began. */
  atomic_int serving, health_draining;
  grpc_server *server;
  grpc_completion_queue *cq;
  pthread_t thread;
  convd_offload *offload; /* work that grows with a tensor, off the CQ thread */
  convd_offload *copier;  /* shared-memory output copies, beside the offload thread's input ones */
  int thread_started;
  void **registered; /* grpc_server_register_method handles, by method table index */
  pthread_mutex_t mu;
  int live_calls;     /* call objects: posted requests and calls in progress */
  convd_call *active; /* calls in progress (matched to a client), a doubly linked list */
  int n_active;
  /* drain.armed: draining (new calls refused); stop.armed: shutting down (no reposts). Each
   * callback fires once (convd_rpc_drain, convd_rpc_shutdown). */
  struct convd_rpc_event {
    int armed, fired;
    void (*fn)(void *user);
    void *user;
  } drain, stop;
  int shutdown_notified;
  convd_tag t_shutdown;
};

/* Posts one more request for method m (the CQ thread, after a request was matched). */
int convd_rpc_post_request(convd_rpc *r, const convd_method *m);
/* A call object was freed: counts it out, and fires drained/stopped when due. Any thread. */
void convd_rpc_call_freed(convd_rpc *r);
/* Runs fn(c, user) with c->mu held for every call in progress of method m (every method: NULL),
 * each held by a ref while it runs. Called with no call's mutex held. */
void convd_rpc_each_call(convd_rpc *r, const convd_method *m, void (*fn)(convd_call *c, void *user),
                         void *user);
/* Runs fn(c) on the offload thread, holding a ref on c until fn drops it (convd_call_unref).
 * Called with c->mu held by a running handler. Returns 0, or -1 when it could not be queued:
 * then the call has failed (out of memory) and fn will not run. */
int convd_rpc_offload_call(convd_call *c, void (*fn)(void *call));
/* The same on the copier thread: a call's output copies into its region, so that they overlap
 * its (and other calls') input copies on the offload thread. */
int convd_rpc_copier_call(convd_call *c, void (*fn)(void *call));
/* The table entry whose handlers are h (services find their own methods). */
const convd_method *convd_rpc_method_of(const convd_handlers *h);

/* Admission (--max-inflight-bytes): reserves bytes for a call, or returns CONVD_ELIMIT with a
 * message saying what is held. convd_rpc_release gives them back. */
int convd_rpc_admit(convd_rpc *r, uint64_t bytes, char *err, size_t errlen);
void convd_rpc_release(convd_rpc *r, uint64_t bytes);
/* The same for call c, also within its tenant's own limit (inflight-bytes in the tokens file). */
int convd_rpc_admit_call(convd_call *c, uint64_t bytes, char *err, size_t errlen);
void convd_rpc_release_call(convd_call *c, uint64_t bytes);
/* A tenant's calls in flight (calls=N in the tokens file): counted at dispatch, refused beyond
 * its limit with RESOURCE_EXHAUSTED (0 and the message in err), given back when the call is
 * freed. Calls without a tenant are not counted. */
int convd_rpc_tenant_call_begin(convd_call *c, char *err, size_t errlen);
void convd_rpc_tenant_call_end(convd_call *c);

#endif
