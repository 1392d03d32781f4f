/* One gRPC call on the server, whatever its method: lifetime and reference counting, its
 * completion-queue tags, batches, sending and receiving, the final status and the end-of-call
 * log line and metrics. What a method keeps for itself hangs off `state` (its handlers in the
 * method table create and free it); nothing here knows any method.
 *
 * Threads: the completion-queue thread runs every tag's completion and every handler; engine
 * device workers also reach calls (the Conv2d service's job callbacks). Every field below the
 * lifetime block is guarded by `mu`; handlers run with it held. `cancel` is also read by the
 * engine without the lock. */
#ifndef CONVD_CALL_H
#define CONVD_CALL_H

#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "auth.h"
#include "engine.h"

typedef struct convd_rpc convd_rpc;
typedef struct convd_method convd_method;
typedef struct convd_call convd_call;

/* Every completion-queue tag is one of these; the CQ thread calls fn(obj, ok). */
typedef struct convd_tag {
  void (*fn)(void *obj, int ok);
  void *obj;
} convd_tag;

/* What the end-of-call log line and metrics say beyond the status (a method's report() fills
 * it). */
typedef struct convd_call_report {
  uint64_t bytes_in, bytes_out; /* tensor bytes received and sent */
  const convd_conv *conv;       /* shapes, or NULL */
  const convd_job_stats *stats; /* the engine job's, or NULL when the call ran none */
} convd_call_report;

struct convd_call {
  /* lifetime: set at creation, then read-only */
  convd_rpc *rpc;
  const convd_method *method;
  /* rpc->active list links, guarded by rpc->mu */
  convd_call *prev, *next;
  int in_active;

  grpc_call *gc;
  grpc_call_details details;  /* the unknown-method slot: which method was asked for */
  grpc_metadata_array md;
  grpc_byte_buffer *payload;  /* methods whose client sends one message: that message */
  gpr_timespec deadline;
  double t_begin;
  char peer[96];
  char rid[72]; /* request id: the client's x-request-id, or one made here */
  const convd_tenant *tenant; /* set once at dispatch, held until the call is freed; or NULL */
  int tenant_counted;         /* in its tenant's calls in flight (rpc.c) */

  pthread_mutex_t mu;
  int refs; /* +1 per batch in flight, +1 for an engine job, +1 while a handler runs */
  convd_tag t_request, t_md, t_close, t_recv, t_send, t_final;
  int client_cancelled; /* written by gRPC when RECV_CLOSE_ON_SERVER completes */
  int closed_cancelled; /* the same, copied under mu in on_close: what other threads read */
  atomic_int cancel;    /* set once the call failed or the client went; polled by the engine */
  atomic_int daemon_cancelled; /* the daemon cancelled it (drain timeout), under rpc->mu */

  int md_sent, sending, dead; /* dead: a send failed, the client is gone */
  grpc_byte_buffer *send_buf, *recv_buf;
  int recv_done;        /* no more messages will be read */
  double recv_since, send_since; /* when the read / send in flight began, 0 = none */
  uint64_t messages_in; /* messages received so far (for error messages) */
  int status_set, status_started;
  grpc_status_code status;
  char status_msg[1024];
  grpc_slice status_slice;

  void *state; /* the method's */
};

/* A call object for one posted request of method m (NULL when out of memory). It holds one
 * ref, which the request's completion takes over. */
convd_call *convd_call_new(convd_rpc *r, const convd_method *m);
void convd_call_ref_locked(convd_call *c);
/* Drops a ref (without mu held); the last one logs the call and frees it. */
void convd_call_unref(convd_call *c);
/* The request of a call that never started (posting it failed): frees it without a log line. */
void convd_call_discard(convd_call *c);

/* Called with mu held, on any thread, unless they say otherwise: */

/* Records the final status; the first one wins. An error also stops the method's work. */
void convd_call_set_status(convd_call *c, int err_code, const char *msg);
/* Sets an error status and lets the method send what is due (then the status). */
void convd_call_fail(convd_call *c, int err_code, const char *msg);
/* Sends the final batch: initial metadata if not sent yet, response (may be NULL; taken over),
 * the recorded status. */
void convd_call_send_final(convd_call *c, grpc_byte_buffer *response);
/* Packs m and sends it with an OK status, ending the call (ENOMEM fails it instead). */
void convd_call_reply(convd_call *c, const ProtobufCMessage *m);
/* OK, and the status alone once nothing is being sent. */
void convd_call_finish_ok(convd_call *c);
/* Sends the initial metadata now, so that a streaming client's first read does not wait for
 * its whole upload. Returns 0, or -1 when the batch could not start. */
int convd_call_send_initial_metadata(convd_call *c);
/* Sends bb (taken over) or m as the next message; the method's sent() runs when it went out. */
void convd_call_send_buffer(convd_call *c, grpc_byte_buffer *bb);
void convd_call_send(convd_call *c, const ProtobufCMessage *m);
/* Reads the next client message; the method's recv() gets it (NULL at half-close). */
void convd_call_recv(convd_call *c);
/* Ends the call (DEADLINE_EXCEEDED) when a read or a send of it has waited on the client for
 * longer than timeout seconds at now (convd_now_seconds). */
void convd_call_expire_idle(convd_call *c, double now, double timeout);
/* 1 once nothing more can be sent: the status went out or the client is gone. */
int convd_call_over(const convd_call *c);

/* The call's tenant (auth.h): its name, or NULL when the daemon runs without --auth-tokens
 * (everyone is the anonymous tenant) or the call came without a token to an open method
 * (health). Read once at dispatch from the call's authorization header; any thread, no lock
 * needed. */
const char *convd_call_tenant(const convd_call *c);
/* That tenant's limits from the tokens file (0 fields: none of its own), or NULL as above. */
const convd_tenant_limits *convd_call_tenant_limits(const convd_call *c);

/* The request's completion (CQ thread): the call is matched to a client. Adds it to the active
 * list and runs the method's start() (or refuses it: UNAUTHENTICATED without the token its
 * method needs, UNAVAILABLE while draining). */
void convd_call_started(convd_call *c, int ok);

#endif
