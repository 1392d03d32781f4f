/* The gRPC side of the daemon: one completion-queue thread owns every call; it decodes, checks
 * and hands work to the engine, and never computes. Engine threads hand results back by
 * starting the next send under the call's mutex. */
#ifndef CONVD_RPC_H
#define CONVD_RPC_H

#include <stddef.h>

#include "config.h"
#include "engine.h"
#include "metrics.h"
#include "registry.h"
#include "shm.h"
#include "unixsock.h"

typedef struct convd_rpc convd_rpc;
typedef struct convd_tls convd_tls;
typedef struct convd_auth convd_auth;

/* Who may connect: TLS (tls.h) and tokens (auth.h); NULL members mean plaintext and no tokens.
 * Both must outlive the server (gRPC calls into them until grpc_shutdown_blocking). */
typedef struct convd_rpc_security {
  convd_tls *tls;
  convd_auth *auth;
} convd_rpc_security;

/* Binds every cfg->listen address, in order, and starts serving; TLS and tokens (sec) apply to
 * each alike. ports[i] receives address i's bound port (useful with port 0; gRPC says 1 for a
 * unix: one). A unix: path is claimed before it is bound and gets --unix-socket-mode after
 * (unixsock.h); socks[i] records the file made, which the caller removes with
 * convd_unix_remove after gRPC's shutdown, or at once when this fails (socks then holds the
 * files made before the failure). The engine must outlive the server. sec may be NULL
 * (plaintext, no tokens). */
int convd_rpc_start(const convd_config *cfg, convd_engine *engine, convd_metrics *metrics,
                    const convd_rpc_security *sec, convd_rpc **out, int ports[CONVD_LISTEN_MAX],
                    convd_unix_socket socks[CONVD_LISTEN_MAX], char *err, size_t errlen);

/* For a metrics scrape: the server's gauges, and its weights registry (NULL when off). */
void convd_rpc_gauges(convd_rpc *r, convd_metrics_gauges *g);
convd_registry *convd_rpc_registry(convd_rpc *r);
/* The shared-memory regions (NULL: --max-shm-bytes 0). */
convd_shm *convd_rpc_shm(convd_rpc *r);

/* Starts draining: calls that arrive from now on are answered UNAVAILABLE at once, calls in
 * flight go on. drained(user) runs once, on whichever thread ends the last call (or at once
 * when none is in flight). Call once. */
void convd_rpc_drain(convd_rpc *r, void (*drained)(void *user), void *user);

/* Health may have changed (a device failed): Check answers and Watch streams follow. Call it
 * from a thread that holds no engine lock (the daemon's event loop). */
void convd_rpc_health_changed(convd_rpc *r);

/* Cancels every call in flight (drain timeout, second signal): each ends UNAVAILABLE. */
void convd_rpc_cancel_all(convd_rpc *r);
/* Ends calls that waited on their client longer than --stream-idle-timeout (the loop, once a
 * second). */
void convd_rpc_expire_idle(convd_rpc *r);

/* After draining: shuts gRPC down. gRPC core closes a connection as soon as its last stream
 * ends once shutdown began, which can cut off a stream's final frames; that is why calls are
 * drained first. stopped(user) runs once, on the server's thread, when gRPC is done. */
void convd_rpc_shutdown(convd_rpc *r, void (*stopped)(void *user), void *user);

/* After stopped() ran: joins the thread and frees everything. */
void convd_rpc_destroy(convd_rpc *r);

#endif
