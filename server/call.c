/* The call object (call.h). Threads: the completion-queue thread runs the tag completions
 * (on_md, on_close, on_send, on_final, on_recv, convd_call_started); any thread holding a ref
 * may send under c->mu (engine workers do, for Conv2d output). The last unref frees the call on
 * whichever thread drops it. */
#include "call.h"

#include <ctype.h>
#include <grpc/support/alloc.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "err.h"
#include "log.h"
#include "rpc_impl.h"
#include "wire.h"

static void on_md(void *obj, int ok);
static void on_close(void *obj, int ok);
static void on_recv(void *obj, int ok);
static void on_send(void *obj, int ok);
static void on_final(void *obj, int ok);
static void on_request(void *obj, int ok) { convd_call_started(obj, ok); }

convd_call *convd_call_new(convd_rpc *r, const convd_method *m) {
  convd_call *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  c->rpc = r;
  c->method = m;
  c->refs = 1;
  pthread_mutex_init(&c->mu, NULL);
  grpc_call_details_init(&c->details);
  grpc_metadata_array_init(&c->md);
  atomic_init(&c->cancel, 0);
  atomic_init(&c->daemon_cancelled, 0);
  convd_tag *tags[] = {&c->t_request, &c->t_md, &c->t_close, &c->t_recv, &c->t_send, &c->t_final};
  void (*fns[])(void *, int) = {on_request, on_md, on_close, on_recv, on_send, on_final};
  for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) *tags[i] = (convd_tag){fns[i], c};
  c->status_slice = grpc_empty_slice();
  pthread_mutex_lock(&r->mu);
  r->live_calls++;
  pthread_mutex_unlock(&r->mu);
  return c;
}

/* gRPC ends a call whose deadline passed the same way as one the client cancelled; the
 * deadline tells them apart. The server's deadline is the client's plus the time the headers
 * took to arrive, so the client's own expiry can reach us a little before ours: 100 ms early
 * still counts as the deadline. */
static int deadline_passed(const convd_call *c) {
  gpr_timespec now = gpr_now(c->deadline.clock_type);
  gpr_timespec slack = gpr_time_from_millis(100, GPR_TIMESPAN);
  return gpr_time_cmp(gpr_time_add(now, slack), c->deadline) >= 0;
}

static void log_end(convd_call *c) {
  const char *cancelled = deadline_passed(c) ? "DEADLINE_EXCEEDED" : "CANCELLED";
  const char *status = c->status_set ? convd_wire_status_name(c->status)
                       : c->client_cancelled ? cancelled
                                             : "UNKNOWN";
  if (c->client_cancelled && !c->status_started) status = cancelled;
  const int failed = c->status_set && c->status != GRPC_STATUS_OK;
  convd_call_report rep = {0};
  if (c->method->h->report) c->method->h->report(c, &rep);
  const convd_job_stats none = {0}, *st = rep.stats ? rep.stats : &none;
  char shapes[160] = "";
  const convd_conv *cv = rep.conv;
  if (cv && cv->output_elems)
    snprintf(shapes, sizeof shapes,
             " input=%" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " weight=%" PRId64 "x%" PRId64
             "x%" PRId64 "x%" PRId64 " output=%" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64,
             cv->p.n, cv->p.c_in, cv->p.h, cv->p.w, cv->p.c_out, cv->p.c_per_group, cv->p.kh,
             cv->p.kw, cv->p.n, cv->p.c_out, cv->h_out, cv->w_out);
  const double seconds = convd_now_seconds() - c->t_begin;
  if (c->rpc->metrics)
    convd_metrics_call_ended(c->rpc->metrics, c->method->name, convd_call_tenant(c), status, seconds,
                             st->ops_run ? st->queue_seconds : -1, rep.bytes_in, rep.bytes_out);
  /* The peer and the error may carry client-chosen text (a weights id, a service name). */
  char peer[sizeof c->peer * 4 + 3], error[1200] = ""; /* a long error is cut, still quoted */
  convd_log_quote(c->peer[0] ? c->peer : "-", peer, sizeof peer);
  if (failed) {
    memcpy(error, " error=", 7);
    convd_log_quote(c->status_msg, error + 7, sizeof error - 7);
  }
  convd_log(c->status_set && c->status == GRPC_STATUS_OK ? CONVD_LOG_INFO : CONVD_LOG_WARN,
            "msg=\"call ended\" rid=%s method=%s peer=%s tenant=%s status=%s duration_ms=%.3f "
            "ops=%" PRIu64 " compute_s=%.3f peak_rows_bytes=%" PRIu64 "%s%s",
            c->rid, c->method->name, peer, c->tenant ? convd_tenant_name(c->tenant) : "-", status,
            seconds * 1e3, st->ops_run, st->compute_seconds, st->peak_bytes_held, shapes, error);
}

static void call_free(convd_call *c) {
  convd_rpc *r = c->rpc;
  /* Logged and counted before it leaves the active list: once calls_in_flight reads 0, every
   * ended call is in the metrics. */
  if (c->gc) log_end(c);
  pthread_mutex_lock(&r->mu);
  if (c->in_active) {
    if (c->prev) c->prev->next = c->next;
    else r->active = c->next;
    if (c->next) c->next->prev = c->prev;
    r->n_active--;
  }
  pthread_mutex_unlock(&r->mu);
  if (c->method->h->free_state) c->method->h->free_state(c); /* gives back what it was admitted for */
  convd_rpc_tenant_call_end(c);
  convd_auth_tenant_put(c->tenant);
  if (c->gc) grpc_call_unref(c->gc);
  if (c->payload) grpc_byte_buffer_destroy(c->payload);
  if (c->recv_buf) grpc_byte_buffer_destroy(c->recv_buf);
  if (c->send_buf) grpc_byte_buffer_destroy(c->send_buf);
  grpc_slice_unref(c->status_slice);
  grpc_call_details_destroy(&c->details);
  grpc_metadata_array_destroy(&c->md);
  pthread_mutex_destroy(&c->mu);
  free(c);
  convd_rpc_call_freed(r);
}

void convd_call_discard(convd_call *c) {
  c->gc = NULL;
  call_free(c);
}

void convd_call_ref_locked(convd_call *c) { c->refs++; }

void convd_call_unref(convd_call *c) {
  pthread_mutex_lock(&c->mu);
  int left = --c->refs;
  pthread_mutex_unlock(&c->mu);
  if (left == 0) call_free(c);
}

/* Starts a batch; on failure (a programming error, not a client's) logs it and drops the ref
 * taken for the batch. */
static int start_batch(convd_call *c, const grpc_op *ops, size_t n, convd_tag *t) {
  convd_call_ref_locked(c);
  grpc_call_error e = grpc_call_start_batch(c->gc, ops, n, t, NULL);
  if (e != GRPC_CALL_OK) {
    c->refs--; /* the caller still holds its own ref, so this cannot reach zero */
    convd_log(CONVD_LOG_ERROR, "msg=\"grpc_call_start_batch failed\" method=%s error=%d",
              c->method->name, (int)e);
    c->dead = 1;
    return -1;
  }
  return 0;
}

void convd_call_set_status(convd_call *c, int err_code, const char *msg) {
  if (c->status_set) return;
  c->status_set = 1;
  c->status = convd_wire_status_from_err(err_code);
  snprintf(c->status_msg, sizeof c->status_msg, "%s", msg ? msg : "");
  if (err_code != 0) {
    atomic_store(&c->cancel, 1);
    if (c->method->h->stop) c->method->h->stop(c);
  }
}

int convd_call_over(const convd_call *c) { return c->status_started || c->dead; }

void convd_call_send_final(convd_call *c, grpc_byte_buffer *response) {
  grpc_op ops[3];
  size_t n = 0;
  memset(ops, 0, sizeof ops);
  if (!c->md_sent) {
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    c->md_sent = 1;
  }
  if (response) {
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = response;
    c->send_buf = response;
  }
  grpc_slice_unref(c->status_slice);
  c->status_slice = grpc_slice_from_copied_string(c->status_msg);
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = c->status;
  ops[n++].data.send_status_from_server.status_details =
      c->status == GRPC_STATUS_OK ? NULL : &c->status_slice;
  c->status_started = 1;
  start_batch(c, ops, n, &c->t_final);
}

void convd_call_fail(convd_call *c, int err_code, const char *msg) {
  convd_call_set_status(c, err_code, msg);
  if (c->method->h->pump) c->method->h->pump(c);
  else if (!c->sending && !convd_call_over(c)) convd_call_send_final(c, NULL);
}

void convd_call_reply(convd_call *c, const ProtobufCMessage *m) {
  grpc_byte_buffer *bb = convd_wire_pack(m);
  if (bb == NULL) {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  convd_call_set_status(c, 0, "");
  convd_call_send_final(c, bb);
}

void convd_call_finish_ok(convd_call *c) {
  if (c->sending || convd_call_over(c)) return;
  convd_call_set_status(c, 0, "");
  convd_call_send_final(c, NULL);
}

int convd_call_send_initial_metadata(convd_call *c) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_INITIAL_METADATA;
  c->md_sent = 1;
  return start_batch(c, &op, 1, &c->t_md);
}

void convd_call_send_buffer(convd_call *c, grpc_byte_buffer *bb) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = bb;
  c->send_buf = bb;
  c->sending = 1;
  c->send_since = convd_now_seconds();
  if (start_batch(c, &op, 1, &c->t_send)) {
    c->sending = 0;
    c->send_since = 0;
    grpc_byte_buffer_destroy(bb);
    c->send_buf = NULL;
  }
}

void convd_call_send(convd_call *c, const ProtobufCMessage *m) {
  grpc_byte_buffer *bb = convd_wire_pack(m);
  if (bb == NULL) { /* through the method's pump, which may have to wait before the status */
    convd_call_fail(c, CONVD_ENOMEM, "the daemon ran out of memory sending the response");
    return;
  }
  convd_call_send_buffer(c, bb);
}

void convd_call_recv(convd_call *c) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &c->recv_buf;
  c->recv_since = convd_now_seconds();
  if (start_batch(c, &op, 1, &c->t_recv)) c->recv_since = 0;
}

void convd_call_expire_idle(convd_call *c, double now, double timeout) {
  if (c->status_set || c->dead) return;
  const int reading = c->recv_since > 0 && now - c->recv_since > timeout;
  const int sending = c->send_since > 0 && now - c->send_since > timeout;
  if (!reading && !sending) return;
  char msg[256];
  snprintf(msg, sizeof msg,
           "the client %s for %.0f s (--stream-idle-timeout): the daemon ended the call",
           reading ? "sent nothing" : "read nothing", timeout);
  convd_call_fail(c, CONVD_ETIMEDOUT, msg);
}

/* ---- completions (CQ thread) ------------------------------------------------------------- */

static void on_md(void *obj, int ok) {
  (void)ok;
  convd_call_unref(obj);
}

static void on_close(void *obj, int ok) {
  convd_call *c = obj;
  (void)ok;
  pthread_mutex_lock(&c->mu);
  c->closed_cancelled = c->client_cancelled;
  if (c->closed_cancelled) {
    /* The call is over for the client: its work stops now (queued ops dropped). gRPC says
     * "cancelled" only when no status of ours completed the call, so whatever status was set
     * before (a killed client's stream looks half-closed and incomplete first) never reached
     * the client: the log and metrics say why the call really ended. */
    int code;
    const char *why;
    if (deadline_passed(c)) code = CONVD_ETIMEDOUT, why = "the call's deadline passed";
    else if (atomic_load(&c->daemon_cancelled))
      code = CONVD_EUNAVAIL, why = "convd is shutting down: the call was cancelled after the drain timeout";
    else code = CONVD_ECANCELED, why = "the client cancelled the call or went away";
    c->status_set = 0;
    convd_call_set_status(c, code, why);
    atomic_store(&c->cancel, 1);
    if (c->method->h->stop) c->method->h->stop(c);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

static void on_send(void *obj, int ok) {
  convd_call *c = obj;
  pthread_mutex_lock(&c->mu);
  grpc_byte_buffer_destroy(c->send_buf);
  c->send_buf = NULL;
  c->sending = 0;
  c->send_since = 0;
  if (!ok) {
    c->dead = 1; /* the call is over (client gone or cancelled): RECV_CLOSE will tell */
    atomic_store(&c->cancel, 1);
  } else if (c->method->h->sent) {
    c->method->h->sent(c);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

static void on_final(void *obj, int ok) {
  convd_call *c = obj;
  (void)ok;
  pthread_mutex_lock(&c->mu);
  if (c->send_buf) {
    grpc_byte_buffer_destroy(c->send_buf);
    c->send_buf = NULL;
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

static void on_recv(void *obj, int ok) {
  convd_call *c = obj;
  pthread_mutex_lock(&c->mu);
  grpc_byte_buffer *bb = c->recv_buf;
  c->recv_buf = NULL;
  c->recv_since = 0;
  if (!ok || c->status_set || c->dead) {
    c->recv_done = 1; /* the call failed, or it was answered already */
  } else {
    if (bb == NULL) c->recv_done = 1;
    else c->messages_in++;
    c->method->h->recv(c, bb);
  }
  if (bb) grpc_byte_buffer_destroy(bb);
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

/* The client's x-request-id (letters, digits, - _ . : only, at most 64), so that its logs and
 * ours join up; else a number of our own. */
static void set_request_id(convd_call *c) {
  for (size_t i = 0; i < c->md.count; i++) {
    const grpc_slice k = c->md.metadata[i].key, v = c->md.metadata[i].value;
    if (GRPC_SLICE_LENGTH(k) != 12 || memcmp(GRPC_SLICE_START_PTR(k), "x-request-id", 12) != 0) continue;
    size_t n = GRPC_SLICE_LENGTH(v), j = 0;
    const unsigned char *p = GRPC_SLICE_START_PTR(v);
    for (size_t t = 0; t < n && j < 64; t++)
      if (isalnum(p[t]) || p[t] == '-' || p[t] == '_' || p[t] == '.' || p[t] == ':') c->rid[j++] = (char)p[t];
    c->rid[j] = '\0';
    if (j) return;
  }
  snprintf(c->rid, sizeof c->rid, "r%" PRIu64, atomic_fetch_add(&c->rpc->next_rid, 1) + 1);
}

const char *convd_call_tenant(const convd_call *c) {
  return c->tenant ? convd_tenant_name(c->tenant) : NULL;
}

const convd_tenant_limits *convd_call_tenant_limits(const convd_call *c) {
  return c->tenant ? convd_tenant_limits_of(c->tenant) : NULL;
}

/* A call without the token its method needs. The status is gRPC's own (no convd error code
 * maps to UNAUTHENTICATED) and says nothing beyond that. */
static void refuse_unauthenticated(convd_call *c) {
  c->status_set = 1;
  c->status = GRPC_STATUS_UNAUTHENTICATED;
  snprintf(c->status_msg, sizeof c->status_msg, "%s", CONVD_AUTH_REFUSED);
  atomic_store(&c->cancel, 1);
  convd_call_send_final(c, NULL);
}

void convd_call_started(convd_call *c, int ok) {
  convd_rpc *r = c->rpc;
  if (!ok) { /* the server is shutting down: this request will never match a call */
    convd_call_unref(c);
    return;
  }
  pthread_mutex_lock(&r->mu);
  int repost = !r->stop.armed, draining = r->drain.armed;
  c->in_active = 1;
  c->next = r->active;
  if (r->active) r->active->prev = c;
  r->active = c;
  r->n_active++;
  pthread_mutex_unlock(&r->mu);
  if (repost) convd_rpc_post_request(r, c->method);

  c->t_begin = convd_now_seconds();
  set_request_id(c);
  char *peer = grpc_call_get_peer(c->gc);
  if (peer) {
    snprintf(c->peer, sizeof c->peer, "%s", peer);
    gpr_free(peer);
  }
  /* The processor let a call without a token through (it cannot see the method, auth.h); the
   * method table decides here whether the method needs one. */
  if (r->auth) c->tenant = convd_auth_call_tenant(r->auth, &c->md);
  const int unauthenticated =
      r->auth && c->tenant == NULL && !convd_method_open(c->method, r->cfg->reflection_public);
  pthread_mutex_lock(&c->mu);
  /* RECV_CLOSE_ON_SERVER completes when the call ends; it tells us about cancellation. */
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &c->client_cancelled;
  const int closing = start_batch(c, &op, 1, &c->t_close) == 0;
  char lim_err[256];
  const int over = closing && !unauthenticated ? convd_rpc_tenant_call_begin(c, lim_err, sizeof lim_err) : 0;
  if (closing && unauthenticated) {
    refuse_unauthenticated(c);
  } else if (over) {
    convd_call_set_status(c, over, lim_err);
    convd_call_send_final(c, NULL);
  } else if (closing && draining && !c->method->while_draining) {
    convd_call_set_status(c, CONVD_EUNAVAIL,
                          "convd is shutting down and takes no new calls; retry on another "
                          "instance or after it restarts");
    convd_call_send_final(c, NULL);
  } else if (!c->dead) {
    c->method->h->start(c);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c); /* the handler's ref */
}
