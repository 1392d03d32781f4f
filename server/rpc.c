#include "rpc.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <ctype.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "band.h"
#include "digest.h"
#include "dtype.h"
#include "convd/v1/convd.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "wire.h"
#include "err.h"
#include "log.h"
#include "reflect.h"
#include "registry.h"
#include "session.h"
#include "status.h"

/* Requests kept posted per method, so bursts of new calls do not wait for a repost. */
#define REQUESTS_PER_METHOD 8

enum call_kind {
  K_CONV2D,
  K_UNARY,
  K_LIST,
  K_PUT_WEIGHTS,
  K_LIST_WEIGHTS,
  K_DELETE_WEIGHTS,
  K_HEALTH_CHECK,
  K_HEALTH_WATCH,
  K_REFLECT,
  K_REFLECT_ALPHA,
  K_GENERIC,
  K_COUNT
};
static const char *const kind_path[K_COUNT] = {
    "/convd.v1.Convolution/Conv2d",       "/convd.v1.Convolution/Conv2dUnary",
    "/convd.v1.Convolution/ListDevices",  "/convd.v1.Convolution/PutWeights",
    "/convd.v1.Convolution/ListWeights",  "/convd.v1.Convolution/DeleteWeights",
    "/grpc.health.v1.Health/Check",       "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    NULL};
static const char *const kind_name[K_COUNT] = {"Conv2d",      "Conv2dUnary",  "ListDevices",
                                               "PutWeights",  "ListWeights",  "DeleteWeights",
                                               "HealthCheck", "HealthWatch",  "Reflection",
                                               "ReflectionV1alpha", "unknown"};
/* Methods whose client streams (the request is read message by message). */
static int kind_streams_in(enum call_kind k) {
  return k == K_CONV2D || k == K_PUT_WEIGHTS || k == K_REFLECT || k == K_REFLECT_ALPHA;
}

/* Every completion-queue tag is one of these; the CQ thread calls fn(obj, ok). */
typedef struct tag {
  void (*fn)(void *obj, int ok);
  void *obj;
} tag;

typedef struct call call;

struct convd_rpc {
  const convd_config *cfg;
  convd_engine *engine;
  convd_registry *registry; /* NULL when --weights-memory is 0 */
  convd_metrics *metrics;   /* may be NULL */
  /* Admission: bytes the calls in flight may hold (each call's share is in call.held). */
  _Atomic uint64_t inflight_bytes;
  _Atomic uint64_t next_rid;
  /* Health, read by health calls without r->mu: 1 while not draining and a device is healthy. */
  atomic_int serving, health_draining;
  grpc_server *server;
  grpc_completion_queue *cq;
  pthread_t thread;
  int thread_started;
  void *method[K_COUNT];
  pthread_mutex_t mu;
  int live_calls; /* call objects: posted requests and calls in progress */
  call *active;   /* calls in progress (matched to a client), a doubly linked list */
  int n_active;
  int draining, drained_called;
  void (*drained)(void *user);
  void *drained_user;
  int shutting_down, shutdown_notified, stopped_called;
  void (*stopped)(void *user);
  void *stopped_user;
  tag t_shutdown;
};

struct call {
  convd_rpc *rpc;
  call *prev, *next; /* in rpc->active while in progress */
  int in_active;
  enum call_kind kind;
  grpc_call *gc;
  grpc_call_details details;
  grpc_metadata_array md;
  grpc_byte_buffer *payload; /* unary registered methods: the request message */
  gpr_timespec deadline;
  pthread_mutex_t mu;
  int refs; /* +1 per batch in flight, +1 for an engine job, +1 while a handler runs */
  tag t_request, t_md, t_close, t_recv, t_send, t_final;
  int client_cancelled; /* written by gRPC when RECV_CLOSE_ON_SERVER completes */
  int closed_cancelled; /* the same, copied under mu in on_close: what other threads read */
  atomic_int cancel;    /* polled by the engine */
  double t_begin;
  char peer[96];
  char rid[72]; /* request id: the client's x-request-id, or one made here */

  /* sending */
  int md_sent, sending, dead; /* dead: a send failed, the client is gone */
  grpc_byte_buffer *send_buf;
  int status_set, status_started;
  grpc_status_code status;
  char status_msg[1024];
  grpc_slice status_slice;

  /* the engine job (Conv2d and Conv2dUnary); its done() drops the ref it holds */
  convd_job *job;
  int job_done;
  convd_job_stats stats;

  /* Conv2d stream */
  grpc_byte_buffer *recv_buf;
  int recv_done, recv_paused, recv_posted;
  uint64_t mem_limit; /* stop reading input while the job holds more than this */
  uint64_t messages_in;
  convd_session *sess;
  int accepted_pending, summary_sent;
  /* output: ranges of final rows not yet sent, and the band being sent */
  struct out_range {
    int64_t n, h0, h1;
  } *ready;
  size_t ready_len, ready_cap;
  int band_active;
  convd_band_iter it; /* pieces of the current band */
  int64_t band_n, band_h0, band_h1, range_end;
  uint64_t rows_sent, rows_total;
  char *band_buf;
  float *band_f32; /* output pieces as float32 before they are narrowed (float16, bfloat16) */
  uint64_t bytes_sent;

  /* Conv2dUnary */
  convd_conv conv;
  float *ux, *uy; /* input lent to the job, output the job writes into */
  convd_weights *reg_w; /* registered weights the unary job uses (pinned) */

  uint64_t held; /* what this call counts in rpc.inflight_bytes */
  /* Health Watch: the service watched (-1 unknown) and the status last sent (-1 none) */
  int watch_unknown, watch_sent;

  /* PutWeights */
  int put_spec;
  int64_t put_shape[4];
  int put_bias, put_dtype;
  size_t put_elem;
  void *put_w, *put_b;
  size_t put_w_recv, put_b_recv, put_w_total, put_b_total;
  int64_t put_b_elems;
};

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void on_request(void *obj, int ok);
static void on_md(void *obj, int ok);
static void on_close(void *obj, int ok);
static void on_recv(void *obj, int ok);
static void on_send(void *obj, int ok);
static void on_final(void *obj, int ok);
typedef struct call call;
static void watch_pump(call *c);

/* ---- call lifetime --------------------------------------------------------------------------- */

static void rpc_maybe_stopped(convd_rpc *r) {
  int fire = 0;
  pthread_mutex_lock(&r->mu);
  if (r->shutdown_notified && r->live_calls == 0 && !r->stopped_called) {
    r->stopped_called = 1;
    fire = 1;
  }
  pthread_mutex_unlock(&r->mu);
  if (fire && r->stopped) r->stopped(r->stopped_user);
}

static call *call_new(convd_rpc *r, enum call_kind kind) {
  call *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  c->rpc = r;
  c->kind = kind;
  c->refs = 1;
  pthread_mutex_init(&c->mu, NULL);
  grpc_call_details_init(&c->details);
  grpc_metadata_array_init(&c->md);
  atomic_init(&c->cancel, 0);
  tag *tags[] = {&c->t_request, &c->t_md, &c->t_close, &c->t_recv, &c->t_send, &c->t_final};
  void (*fns[])(void *, int) = {on_request, on_md, on_close, on_recv, on_send, on_final};
  for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) *tags[i] = (tag){fns[i], c};
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
static const char *cancel_status(const call *c) {
  gpr_timespec now = gpr_now(c->deadline.clock_type);
  gpr_timespec slack = gpr_time_from_millis(100, GPR_TIMESPAN);
  return gpr_time_cmp(gpr_time_add(now, slack), c->deadline) >= 0 ? "DEADLINE_EXCEEDED" : "CANCELLED";
}

static void call_log_end(call *c) {
  const char *status = c->status_set ? convd_wire_status_name(c->status)
                       : c->client_cancelled ? cancel_status(c)
                                             : "UNKNOWN";
  if (c->client_cancelled && !c->status_started) status = cancel_status(c);
  int level = c->status_set && c->status == GRPC_STATUS_OK ? CONVD_LOG_INFO : CONVD_LOG_WARN;
  char shapes[160] = "";
  const convd_conv *cv = c->sess ? convd_session_conv(c->sess) : &c->conv;
  if (cv->output_elems)
    snprintf(shapes, sizeof shapes,
             " input=%" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " weight=%" PRId64 "x%" PRId64
             "x%" PRId64 "x%" PRId64 " output=%" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64,
             cv->p.n, cv->p.c_in, cv->p.h, cv->p.w, cv->p.c_out, cv->p.c_per_group, cv->p.kh,
             cv->p.kw, cv->p.n, cv->p.c_out, cv->h_out, cv->w_out);
  if (c->rpc->metrics) {
    uint64_t in = 0, out = 0;
    if (c->sess) in = convd_session_bytes_received(c->sess), out = c->bytes_sent;
    else if (c->kind == K_UNARY && c->status_set && c->status == GRPC_STATUS_OK)
      in = c->conv.input_wire_bytes + (c->reg_w ? 0 : c->conv.weight_wire_bytes + c->conv.bias_wire_bytes),
      out = c->conv.output_wire_bytes;
    else if (c->kind == K_PUT_WEIGHTS) in = c->put_w_recv + c->put_b_recv;
    convd_metrics_call_ended(c->rpc->metrics, kind_name[c->kind], status, now_seconds() - c->t_begin,
                             c->job && c->stats.ops_run ? c->stats.queue_seconds : -1, in, out);
  }
  convd_log(level,
            "msg=\"call ended\" rid=%s method=%s peer=%s status=%s duration_ms=%.3f ops=%" PRIu64
            " compute_s=%.3f peak_rows_bytes=%" PRIu64 "%s%s%s%s",
            c->rid, kind_name[c->kind], c->peer[0] ? c->peer : "-", status,
            (now_seconds() - c->t_begin) * 1e3, c->stats.ops_run, c->stats.compute_seconds,
            c->stats.peak_bytes_held, shapes,
            c->status_set && c->status != GRPC_STATUS_OK ? " error=\"" : "",
            c->status_set && c->status != GRPC_STATUS_OK ? c->status_msg : "",
            c->status_set && c->status != GRPC_STATUS_OK ? "\"" : "");
}

/* Runs the drained callback if draining and no call is in progress. */
static void rpc_maybe_drained(convd_rpc *r) {
  int fire = 0;
  pthread_mutex_lock(&r->mu);
  if (r->draining && r->n_active == 0 && !r->drained_called) {
    r->drained_called = 1;
    fire = 1;
  }
  pthread_mutex_unlock(&r->mu);
  if (fire && r->drained) r->drained(r->drained_user);
}

static void call_free(call *c) {
  convd_rpc *r = c->rpc;
  /* Logged and counted before it leaves the active list: once calls_in_flight reads 0, every
   * ended call is in the metrics. */
  if (c->gc) call_log_end(c);
  pthread_mutex_lock(&r->mu);
  if (c->in_active) {
    if (c->prev) c->prev->next = c->next;
    else r->active = c->next;
    if (c->next) c->next->prev = c->prev;
    r->n_active--;
  }
  pthread_mutex_unlock(&r->mu);
  if (c->gc) grpc_call_unref(c->gc);
  if (c->payload) grpc_byte_buffer_destroy(c->payload);
  if (c->recv_buf) grpc_byte_buffer_destroy(c->recv_buf);
  if (c->send_buf) grpc_byte_buffer_destroy(c->send_buf);
  grpc_slice_unref(c->status_slice);
  grpc_call_details_destroy(&c->details);
  grpc_metadata_array_destroy(&c->md);
  convd_job_destroy(c->job);
  convd_session_destroy(c->sess); /* after the job: it may have lent registered weights */
  if (c->reg_w) convd_registry_release(r->registry, c->reg_w);
  if (c->held) atomic_fetch_sub(&r->inflight_bytes, c->held);
  free(c->put_w);
  free(c->put_b);
  free(c->band_buf);
  free(c->band_f32);
  free(c->ready);
  free(c->ux);
  free(c->uy);
  pthread_mutex_destroy(&c->mu);
  free(c);
  pthread_mutex_lock(&r->mu);
  r->live_calls--;
  pthread_mutex_unlock(&r->mu);
  rpc_maybe_drained(r);
  rpc_maybe_stopped(r);
}

static void call_ref_locked(call *c) { c->refs++; }

static void call_unref(call *c) {
  pthread_mutex_lock(&c->mu);
  int left = --c->refs;
  pthread_mutex_unlock(&c->mu);
  if (left == 0) call_free(c);
}

/* Starts a batch; on failure (a programming error, not a client's) logs it and drops the ref
 * taken for the batch. Called with c->mu held. */
static int start_batch(call *c, const grpc_op *ops, size_t n, tag *t) {
  call_ref_locked(c);
  grpc_call_error e = grpc_call_start_batch(c->gc, ops, n, t, NULL);
  if (e != GRPC_CALL_OK) {
    c->refs--; /* the caller still holds its own ref, so this cannot reach zero */
    convd_log(CONVD_LOG_ERROR, "msg=\"grpc_call_start_batch failed\" method=%s error=%d",
              kind_name[c->kind], (int)e);
    c->dead = 1;
    return -1;
  }
  return 0;
}

/* ---- requests ---------------------------------------------------------------------------- */

static int post_request(convd_rpc *r, enum call_kind kind) {
  call *c = call_new(r, kind);
  if (c == NULL) return -1;
  grpc_call_error e;
  if (kind == K_GENERIC)
    e = grpc_server_request_call(r->server, &c->gc, &c->details, &c->md, r->cq, r->cq,
                                 &c->t_request);
  else
    e = grpc_server_request_registered_call(r->server, r->method[kind], &c->gc, &c->deadline,
                                            &c->md, kind_streams_in(kind) ? NULL : &c->payload,
                                            r->cq, r->cq, &c->t_request);
  if (e != GRPC_CALL_OK) {
    convd_log(CONVD_LOG_ERROR, "msg=\"cannot post a call request\" method=%s error=%d",
              kind_name[kind], (int)e);
    c->gc = NULL;
    call_free(c);
    return -1;
  }
  return 0;
}

/* ---- sending ----------------------------------------------------------------------------- */

/* Records the call's final status; the first one wins. An error also stops the engine job. */
static void set_status(call *c, int err_code, const char *msg) {
  if (c->status_set) return;
  c->status_set = 1;
  c->status = convd_status_from_err(err_code);
  snprintf(c->status_msg, sizeof c->status_msg, "%s", msg ? msg : "");
  if (err_code != 0) {
    atomic_store(&c->cancel, 1);
    if (c->job && !c->job_done) convd_job_cancel(c->job);
  }
}

/* Sends the final batch: initial metadata if not sent yet, an optional response, the status.
 * Called with c->mu held. */
static void send_final(call *c, grpc_byte_buffer *response) {
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

/* Sends bb as the call's next message; on_send runs when it went out. */
static void send_buffer(call *c, grpc_byte_buffer *bb) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = bb;
  c->send_buf = bb;
  c->sending = 1;
  if (start_batch(c, &op, 1, &c->t_send)) {
    c->sending = 0;
    grpc_byte_buffer_destroy(bb);
    c->send_buf = NULL;
  }
}

static void start_send(call *c, const ProtobufCMessage *m) {
  grpc_byte_buffer *bb = convd_wire_pack(m);
  if (bb == NULL) {
    set_status(c, CONVD_ENOMEM, "the daemon ran out of memory sending the response");
    send_final(c, NULL);
    return;
  }
  send_buffer(c, bb);
}

static const float *job_out_row(void *ctx, int64_t n, int64_t h, size_t *cstride) {
  call *c = ctx;
  return convd_job_output_row(c->job, n, h, cstride);
}

static void post_recv(call *c);

/* Backpressure: reading more input waits while output is piling up unsent (sending needs no
 * input, so this cannot deadlock), or while the job holds more than its limit and can still
 * progress without more input (an idle job over the limit must read on: its input came out of
 * order). c->mu held. */
static int must_pause(call *c) {
  if (c->job == NULL) return 0;
  if (convd_job_output_bytes_held(c->job) > c->mem_limit / 2) return 1;
  return convd_job_bytes_held(c->job) + convd_session_bytes_buffered(c->sess) > c->mem_limit &&
         !convd_job_idle(c->job);
}

static void maybe_resume(call *c) {
  if (!c->recv_paused || c->status_set || c->dead || must_pause(c)) return;
  c->recv_paused = 0;
  post_recv(c);
}

/* Starts sending the next piece of output, if any row is final. c->mu held. Returns 1 when a
 * send was started. */
static int next_output_piece(call *c) {
  const convd_conv *cv = convd_session_conv(c->sess);
  /* Pieces are whole elements of the wire's dtype; the rows are float32. */
  const size_t chunk = c->rpc->cfg->chunk_bytes & ~(size_t)3;
  convd_band_shape shape = {cv->p.n, cv->p.c_out, cv->h_out, cv->w_out, cv->wire_elem};
  const convd_band_shape rows_f32 = {cv->p.n, cv->p.c_out, cv->h_out, cv->w_out, sizeof(float)};
  if (!c->band_active) {
    if (c->ready_len == 0) return 0;
    struct out_range *r = &c->ready[0];
    /* A band: as many final rows as fit one chunk (at least one). */
    size_t row_bytes = convd_band_bytes(&shape, 0, 1);
    int64_t rows = row_bytes >= chunk ? 1 : (int64_t)(chunk / row_bytes);
    c->band_n = r->n;
    c->band_h0 = r->h0;
    c->band_h1 = r->h0 + rows < r->h1 ? r->h0 + rows : r->h1;
    r->h0 = c->band_h1;
    if (r->h0 == r->h1) memmove(c->ready, c->ready + 1, --c->ready_len * sizeof *c->ready);
    /* The iterator walks the pieces of this one band. */
    convd_band_shape one = {1, cv->p.c_out, c->band_h1 - c->band_h0, cv->w_out, cv->wire_elem};
    convd_band_iter_init(&c->it, &one, chunk);
    c->it.rows_per_band = c->band_h1 - c->band_h0;
    c->band_active = 1;
  }
  if (!convd_band_iter_next(&c->it)) { /* cannot happen: a band has at least one piece */
    c->band_active = 0;
    return 0;
  }
  if (cv->p.dtype == CONVD_F32) {
    convd_band_gather_rows(&shape, c->band_n, c->band_h0, c->band_h1, c->it.off, c->band_buf,
                           c->it.len, job_out_row, c);
  } else {
    const size_t e0 = c->it.off / cv->wire_elem, ne = c->it.len / cv->wire_elem;
    if (c->band_f32 == NULL && (c->band_f32 = malloc(chunk * 2)) == NULL) {
      set_status(c, CONVD_ENOMEM, "the daemon ran out of memory sending the output");
      return 0;
    }
    convd_band_gather_rows(&rows_f32, c->band_n, c->band_h0, c->band_h1, e0 * sizeof(float),
                           c->band_f32, ne * sizeof(float), job_out_row, c);
    convd_dtype_encode(cv->p.dtype, c->band_f32, c->band_buf, ne);
  }
  Convd__V1__RowBand band = CONVD__V1__ROW_BAND__INIT;
  band.n = c->band_n;
  band.h_begin = c->band_h0;
  band.h_end = c->band_h1;
  band.offset = c->it.off;
  band.data.data = (uint8_t *)c->band_buf;
  band.data.len = c->it.len;
  Convd__V1__ConvResponse resp = CONVD__V1__CONV_RESPONSE__INIT;
  resp.msg_case = CONVD__V1__CONV_RESPONSE__MSG_OUTPUT;
  resp.output = &band;
  c->bytes_sent += c->it.len;
  int last = c->it.off + c->it.len == c->it.band_len;
  start_send(c, &resp.base); /* packs: the rows may go once the last piece is packed */
  if (last) {
    convd_job_release_rows(c->job, c->band_n, c->band_h0, c->band_h1);
    c->rows_sent += (uint64_t)(c->band_h1 - c->band_h0);
    c->band_active = 0;
    maybe_resume(c);
  }
  return 1;
}

/* Starts the next Conv2d response, if one is due and none is in flight. c->mu held.
 * Order: accepted, output bands, summary, status. */
static void pump(call *c) {
  if (c->sending || c->status_started || c->dead) return;
  if (c->status_set && c->status != GRPC_STATUS_OK) {
    send_final(c, NULL);
    return;
  }
  if (c->accepted_pending) {
    const convd_conv *cv = convd_session_conv(c->sess);
    Convd__V1__Shape4 shape = CONVD__V1__SHAPE4__INIT;
    shape.d0 = cv->p.n;
    shape.d1 = cv->p.c_out;
    shape.d2 = cv->h_out;
    shape.d3 = cv->w_out;
    Convd__V1__Accepted acc = CONVD__V1__ACCEPTED__INIT;
    acc.output_shape = &shape;
    acc.elemental_ops = convd_job_plan(c->job)->ops;
    acc.chunk_bytes = c->rpc->cfg->chunk_bytes;
    Convd__V1__ConvResponse resp = CONVD__V1__CONV_RESPONSE__INIT;
    resp.msg_case = CONVD__V1__CONV_RESPONSE__MSG_ACCEPTED;
    resp.accepted = &acc;
    c->accepted_pending = 0;
    start_send(c, &resp.base);
    return;
  }
  if (next_output_piece(c)) return;
  if (!c->job_done || c->rows_sent < c->rows_total) return;
  if (!c->summary_sent) {
    Convd__V1__Summary sum = CONVD__V1__SUMMARY__INIT;
    sum.elapsed_seconds = now_seconds() - c->t_begin;
    sum.compute_seconds = c->stats.compute_seconds;
    sum.ops_run = c->stats.ops_run;
    sum.bytes_received = convd_session_bytes_received(c->sess);
    sum.bytes_sent = c->bytes_sent;
    Convd__V1__ConvResponse resp = CONVD__V1__CONV_RESPONSE__INIT;
    resp.msg_case = CONVD__V1__CONV_RESPONSE__MSG_SUMMARY;
    resp.summary = &sum;
    c->summary_sent = 1;
    start_send(c, &resp.base);
    return;
  }
  set_status(c, 0, "");
  send_final(c, NULL);
}

static void fail(call *c, int err_code, const char *msg) {
  set_status(c, err_code, msg);
  pump(c);
}

/* ---- completions ------------------------------------------------------------------------- */

static void on_md(void *obj, int ok) {
  (void)ok;
  call_unref(obj);
}

static void on_close(void *obj, int ok) {
  call *c = obj;
  (void)ok;
  pthread_mutex_lock(&c->mu);
  c->closed_cancelled = c->client_cancelled;
  if (c->closed_cancelled) {
    /* The call is over for the client: its work stops now (queued ops dropped). */
    if (strcmp(cancel_status(c), "DEADLINE_EXCEEDED") == 0)
      set_status(c, CONVD_ETIMEDOUT, "the call's deadline passed");
    else
      set_status(c, CONVD_ECANCELED, "the client cancelled the call");
    atomic_store(&c->cancel, 1);
    if (c->job && !c->job_done) convd_job_cancel(c->job);
  }
  pthread_mutex_unlock(&c->mu);
  call_unref(c);
}

static void on_send(void *obj, int ok) {
  call *c = obj;
  pthread_mutex_lock(&c->mu);
  grpc_byte_buffer_destroy(c->send_buf);
  c->send_buf = NULL;
  c->sending = 0;
  if (!ok) {
    c->dead = 1; /* the call is over (client gone or cancelled): RECV_CLOSE will tell */
    atomic_store(&c->cancel, 1);
  } else if (c->kind == K_HEALTH_WATCH) {
    watch_pump(c);
  } else if (c->kind == K_REFLECT || c->kind == K_REFLECT_ALPHA) {
    /* one answer per request: read the next request once this answer went out */
    if (c->recv_done) {
      set_status(c, 0, "");
      send_final(c, NULL);
    } else if (!c->status_set) {
      post_recv(c);
    }
  } else {
    pump(c);
  }
  pthread_mutex_unlock(&c->mu);
  call_unref(c);
}

static void on_final(void *obj, int ok) {
  call *c = obj;
  (void)ok;
  pthread_mutex_lock(&c->mu);
  if (c->send_buf) {
    grpc_byte_buffer_destroy(c->send_buf);
    c->send_buf = NULL;
  }
  pthread_mutex_unlock(&c->mu);
  call_unref(c);
}

/* Engine thread: output rows are final. */
static void on_rows_ready(void *user, int64_t n, int64_t h0, int64_t h1) {
  call *c = user;
  pthread_mutex_lock(&c->mu);
  if (c->kind == K_UNARY) {
    convd_job_release_rows(c->job, n, h0, h1); /* written in place, into c->uy */
  } else if (!c->status_set) {
    if (c->ready_len == c->ready_cap) {
      size_t cap = c->ready_cap ? c->ready_cap * 2 : 16;
      struct out_range *r = realloc(c->ready, cap * sizeof *r);
      if (r == NULL) {
        set_status(c, CONVD_ENOMEM, "the daemon ran out of memory queueing output");
        pump(c);
        pthread_mutex_unlock(&c->mu);
        return;
      }
      c->ready = r;
      c->ready_cap = cap;
    }
    c->ready[c->ready_len++] = (struct out_range){n, h0, h1};
    pump(c);
  }
  pthread_mutex_unlock(&c->mu);
}

/* Engine thread: input rows were freed. */
static void on_input_freed(void *user) {
  call *c = user;
  pthread_mutex_lock(&c->mu);
  maybe_resume(c);
  pthread_mutex_unlock(&c->mu);
}

/* Engine thread: the job ended (its last callback). */
static void on_job_done(void *user, int status, const char *err, const convd_job_stats *st) {
  call *c = user;
  pthread_mutex_lock(&c->mu);
  c->stats = *st;
  c->job_done = 1;
  if (status != 0) {
    if (c->closed_cancelled || c->dead)
      set_status(c, CONVD_ECANCELED, "the client cancelled the call");
    else
      set_status(c, status, err);
    pump(c);
  } else if (c->kind == K_CONV2D) {
    pump(c);
  } else { /* K_UNARY */
    Convd__V1__Shape4 shape = CONVD__V1__SHAPE4__INIT;
    shape.d0 = c->conv.p.n;
    shape.d1 = c->conv.p.c_out;
    shape.d2 = c->conv.h_out;
    shape.d3 = c->conv.w_out;
    Convd__V1__Summary sum = CONVD__V1__SUMMARY__INIT;
    sum.elapsed_seconds = now_seconds() - c->t_begin;
    sum.compute_seconds = st->compute_seconds;
    sum.ops_run = st->ops_run;
    sum.bytes_received = c->conv.input_wire_bytes +
                         (c->reg_w ? 0 : c->conv.weight_wire_bytes + c->conv.bias_wire_bytes);
    sum.bytes_sent = c->conv.output_wire_bytes;
    /* Narrowed in place: element i's 2 bytes land at or before where its 4 bytes were read. */
    if (c->conv.p.dtype != CONVD_F32)
      for (size_t i = 0; i < c->conv.output_elems; i++) {
        const float v = c->uy[i];
        convd_dtype_encode(c->conv.p.dtype, &v, (char *)c->uy + i * c->conv.wire_elem, 1);
      }
    Convd__V1__ConvResult res = CONVD__V1__CONV_RESULT__INIT;
    res.output_shape = &shape;
    res.output.data = (uint8_t *)c->uy;
    res.output.len = c->conv.output_wire_bytes;
    res.summary = &sum;
    grpc_byte_buffer *bb = c->status_set ? NULL : convd_wire_pack(&res.base);
    if (c->status_set) {
      pump(c);
    } else if (bb == NULL) {
      set_status(c, CONVD_ENOMEM, "the daemon ran out of memory sending the response");
      send_final(c, NULL);
    } else {
      set_status(c, 0, "");
      send_final(c, bb);
    }
  }
  pthread_mutex_unlock(&c->mu);
  call_unref(c);
}

/* Creates the call's engine job; it holds a ref on the call until its done(). Then admission:
 * the bytes this call may hold must fit beside the other calls' (--max-inflight-bytes); when
 * they do not, the call is refused (the caller's fail() cancels the job). A unary call holds
 * its whole tensors; a streamed one at most a few tile rows (what backpressure allows) plus
 * its weights. c->mu held. */
static int create_job(call *c, const convd_conv *conv, int priority, int registered, char *err,
                      size_t errlen) {
  convd_job_cbs cbs = {.user = c, .rows_ready = on_rows_ready, .input_freed = on_input_freed,
                       .done = on_job_done};
  int rc = convd_job_create(c->rpc->engine, conv, &cbs, &c->job, err, errlen);
  if (rc) return rc;
  call_ref_locked(c);
  convd_job_set_priority(c->job, priority);
  uint64_t rows = (uint64_t)conv->input_bytes + (uint64_t)conv->output_bytes;
  if (c->kind == K_CONV2D) {
    uint64_t hint = convd_job_memory_hint(c->job);
    uint64_t lim = (hint > (64u << 20) ? hint : (64u << 20)) + c->rpc->cfg->chunk_bytes;
    if (rows > lim) rows = lim;
  }
  const uint64_t hold = rows + (registered ? 0 : (uint64_t)conv->weight_bytes + conv->bias_bytes);
  const uint64_t limit = c->rpc->cfg->max_inflight_bytes;
  const uint64_t before = atomic_fetch_add(&c->rpc->inflight_bytes, hold);
  if (before + hold > limit) {
    atomic_fetch_sub(&c->rpc->inflight_bytes, hold);
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "the daemon holds %" PRIu64 " bytes for calls in flight; this call needs "
                      "%" PRIu64 " more, over its limit of %" PRIu64
                      " (--max-inflight-bytes): retry later or on another instance",
                      before, hold, limit);
  }
  c->held = hold;
  return 0;
}

static void post_recv(call *c) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &c->recv_buf;
  start_batch(c, &op, 1, &c->t_recv);
}

static void put_weights_recv(call *c, int ok, grpc_byte_buffer *bb);
static void reflect_recv(call *c, int ok, grpc_byte_buffer *bb);

static void on_recv(void *obj, int ok) {
  call *c = obj;
  char err[1024];
  pthread_mutex_lock(&c->mu);
  grpc_byte_buffer *bb = c->recv_buf;
  c->recv_buf = NULL;
  if (c->kind == K_PUT_WEIGHTS) {
    put_weights_recv(c, ok, bb);
  } else if (c->kind == K_REFLECT || c->kind == K_REFLECT_ALPHA) {
    reflect_recv(c, ok, bb);
  } else if (!ok || c->status_set || c->dead) {
    c->recv_done = 1; /* the call failed, or we already answered */
  } else if (bb == NULL) {
    c->recv_done = 1; /* half-close: all input is here (the job runs on), or it is wrong */
    int rc = convd_session_finish(c->sess, err, sizeof err);
    if (rc) fail(c, rc, err);
  } else {
    c->messages_in++;
    Convd__V1__ConvRequest *m =
        (Convd__V1__ConvRequest *)convd_wire_unpack(bb, &convd__v1__conv_request__descriptor);
    if (m == NULL) {
      snprintf(err, sizeof err,
               "message %" PRIu64 " of the stream is not a valid convd.v1.ConvRequest "
               "(protobuf decoding failed)",
               c->messages_in);
      fail(c, CONVD_EINVAL, err);
    } else {
      int accepted = 0;
      int rc = convd_session_feed(c->sess, m, &accepted, err, sizeof err);
      protobuf_c_message_free_unpacked(&m->base, NULL);
      if (rc == 0 && accepted) {
        const convd_conv *cv = convd_session_conv(c->sess);
        rc = create_job(c, cv, convd_session_priority(c->sess),
                        convd_session_registered_weights(c->sess), err, sizeof err);
        if (rc == 0) {
          convd_session_attach(c->sess, c->job);
          c->rows_total = (uint64_t)cv->p.n * (uint64_t)cv->h_out;
          uint64_t hint = convd_job_memory_hint(c->job);
          c->mem_limit = hint > (64u << 20) ? hint : (64u << 20);
          c->accepted_pending = 1;
          pump(c);
        }
      }
      if (rc) {
        fail(c, rc, err);
      } else if (must_pause(c)) {
        c->recv_paused = 1; /* the next read waits until the job frees or sends rows */
      } else {
        post_recv(c);
      }
    }
  }
  if (bb) grpc_byte_buffer_destroy(bb);
  pthread_mutex_unlock(&c->mu);
  call_unref(c);
}

/* ---- method handlers (CQ thread, c->mu held) -------------------------------------------- */

/* Sends the initial metadata now, so that a streaming client's first read does not wait for
 * its whole upload. Returns 0, or -1 when the batch could not start. */
static int send_initial_metadata(call *c) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_INITIAL_METADATA;
  c->md_sent = 1;
  return start_batch(c, &op, 1, &c->t_md);
}

static void handle_conv2d(call *c) {
  c->sess = convd_session_create(c->rpc->cfg->max_request_bytes, c->rpc->registry);
  c->band_buf = malloc(c->rpc->cfg->chunk_bytes);
  if (c->sess == NULL || c->band_buf == NULL) {
    fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  if (send_initial_metadata(c) == 0) post_recv(c);
}

/* A whole tensor of `elems` elements of the call's dtype, widened to float32 in an own, aligned
 * buffer (protobuf-c's buffers carry no alignment promise for float access). */
static int take_bytes(const char *what, const ProtobufCBinaryData *src, const convd_conv *cv,
                      size_t elems, float **dst, char *err, size_t errlen) {
  if (src->len != elems * cv->wire_elem)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s has %zu bytes, but its shape needs %zu (%s, %zu bytes per element)",
                      what, src->len, elems * cv->wire_elem, convd_dtype_name(cv->p.dtype),
                      cv->wire_elem);
  if (elems == 0) return 0;
  *dst = malloc(elems * sizeof(float));
  if (*dst == NULL)
    return convd_errf(err, errlen, CONVD_ENOMEM, "the daemon cannot allocate %zu bytes now",
                      elems * sizeof(float));
  convd_dtype_decode(cv->p.dtype, src->data, *dst, elems);
  return 0;
}

static void handle_unary(call *c) {
  char err[1024];
  int rc = 0;
  float *x = NULL, *w = NULL, *b = NULL;
  const convd_config *cfg = c->rpc->cfg;
  Convd__V1__ConvCall *m =
      c->payload ? (Convd__V1__ConvCall *)convd_wire_unpack(c->payload, &convd__v1__conv_call__descriptor)
                 : NULL;
  if (m == NULL)
    rc = convd_errf(err, sizeof err, CONVD_EINVAL,
                    "the request is not a valid convd.v1.ConvCall (protobuf decoding failed)");
  else if (m->spec == NULL)
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "ConvCall.spec is missing");
  if (rc == 0 && m->spec->weights_id && m->spec->weights_id[0]) {
    if (c->rpc->registry == NULL)
      rc = convd_errf(err, sizeof err, CONVD_ENOTSUP, "this daemon has no weights registry (--weights-memory 0)");
    else
      rc = convd_registry_acquire(c->rpc->registry, m->spec->weights_id, &c->reg_w, err, sizeof err);
    if (rc == 0 && (m->weight.len || m->bias.len))
      rc = convd_errf(err, sizeof err, CONVD_EINVAL,
                      "ConvCall carries weight or bias bytes and names registered weights "
                      "(weights_id %s): send one or the other",
                      c->reg_w->id);
  }
  if (rc == 0)
    rc = convd_spec_to_conv(m->spec, c->reg_w, cfg->max_request_bytes, &c->conv, err, sizeof err);
  if (rc == 0 && c->conv.output_wire_bytes > cfg->max_message_bytes - 1024)
    rc = convd_errf(err, sizeof err, CONVD_ELIMIT,
                    "the output of %zu bytes does not fit in one response message (limit %" PRIu64
                    " bytes, --max-message-bytes): use the streaming Conv2d method",
                    c->conv.output_wire_bytes, cfg->max_message_bytes);
  if (rc == 0)
    rc = take_bytes("ConvCall.input", &m->input, &c->conv, c->conv.input_elems, &x, err, sizeof err);
  if (rc == 0 && c->reg_w == NULL)
    rc = take_bytes("ConvCall.weight", &m->weight, &c->conv, c->conv.weight_elems, &w, err, sizeof err);
  if (rc == 0 && c->reg_w == NULL)
    rc = take_bytes(c->conv.p.has_bias ? "ConvCall.bias" : "ConvCall.bias (spec.has_bias is false)",
                    &m->bias, &c->conv, c->conv.bias_elems, &b, err, sizeof err);
  const int priority = m && m->spec ? m->spec->priority : 0;
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc == 0 && (c->uy = malloc(c->conv.output_bytes)) == NULL)
    rc = convd_errf(err, sizeof err, CONVD_ENOMEM, "the daemon cannot allocate %zu bytes now",
                    c->conv.output_bytes);
  if (rc == 0) rc = create_job(c, &c->conv, priority, c->reg_w != NULL, err, sizeof err);
  if (rc == 0) {
    /* The job reads x in place (the call frees it once the job is gone) and writes into uy. */
    convd_job_set_output(c->job, c->uy);
    if (c->reg_w) { /* lent by the registry, pinned until the call ends */
      convd_job_set_weights_key(c->job, c->reg_w->digest);
      convd_job_set_weights(c->job, c->reg_w->w, c->reg_w->b, CONVD_LEND);
    } else {
      convd_job_set_weights_key(c->job, convd_digest_weights(&c->conv, w));
      convd_job_set_weights(c->job, w, b, CONVD_GIVE);
    }
    w = b = NULL;
    c->ux = x;
    x = NULL;
    const size_t slab = (size_t)c->conv.p.c_in * (size_t)c->conv.p.h * (size_t)c->conv.p.w;
    for (int64_t n = 0; n < c->conv.p.n && rc == 0; n++)
      rc = convd_job_put_band(c->job, n, 0, c->conv.p.h, c->ux + (size_t)n * slab, CONVD_LEND, err,
                              sizeof err);
  }
  free(x), free(w), free(b);
  if (rc) fail(c, rc, err);
}

static void handle_list(call *c) {
  convd_engine *e = c->rpc->engine;
  size_t n = convd_engine_device_count(e);
  Convd__V1__Device *devs = calloc(n ? n : 1, sizeof *devs);
  Convd__V1__Device **ptrs = calloc(n ? n : 1, sizeof *ptrs);
  convd_device_info *info = calloc(n ? n : 1, sizeof *info);
  grpc_byte_buffer *bb = NULL;
  if (devs && ptrs && info) {
    for (size_t i = 0; i < n; i++) {
      convd_engine_device_info(e, i, &info[i]);
      convd__v1__device__init(&devs[i]);
      devs[i].index = info[i].index;
      devs[i].kind = info[i].kind == CONVD_DEVICE_CPU    ? CONVD__V1__DEVICE_KIND__DEVICE_KIND_CPU
                     : info[i].kind == CONVD_DEVICE_CUDA ? CONVD__V1__DEVICE_KIND__DEVICE_KIND_CUDA
                                                         : CONVD__V1__DEVICE_KIND__DEVICE_KIND_REFERENCE;
      devs[i].name = info[i].name;
      devs[i].memory_bytes = info[i].memory_bytes;
      devs[i].completed_ops = info[i].completed_ops;
      devs[i].healthy = info[i].healthy != 0;
      devs[i].detail = info[i].detail;
      devs[i].busy_seconds = info[i].busy_seconds;
      devs[i].weight_cache_hits = info[i].stats.weight_cache_hits;
      devs[i].weight_cache_misses = info[i].stats.weight_cache_misses;
      devs[i].weight_bytes_loaded = info[i].stats.weight_bytes_loaded;
      devs[i].bytes_to_device = info[i].stats.bytes_to_device;
      devs[i].bytes_from_device = info[i].stats.bytes_from_device;
      devs[i].kernel_seconds = (double)info[i].stats.kernel_ns * 1e-9;
      ptrs[i] = &devs[i];
    }
    Convd__V1__ListDevicesResponse resp = CONVD__V1__LIST_DEVICES_RESPONSE__INIT;
    resp.n_devices = n;
    resp.devices = ptrs;
    bb = convd_wire_pack(&resp.base);
  }
  free(devs);
  free(ptrs);
  free(info);
  if (bb == NULL) {
    fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  set_status(c, 0, "");
  send_final(c, bb);
}

/* ---- the weights registry -------------------------------------------------------------- */

static void send_message_final(call *c, const ProtobufCMessage *m) {
  grpc_byte_buffer *bb = convd_wire_pack(m);
  if (bb == NULL) {
    fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  set_status(c, 0, "");
  send_final(c, bb);
}

static int put_spec(call *c, const Convd__V1__WeightsSpec *sp, char *err, size_t errlen) {
  const Convd__V1__Shape4 *sh = sp->weight_shape;
  if (sh == NULL)
    return convd_errf(err, errlen, CONVD_EINVAL, "spec.weight_shape is missing: send C_out, C_in/groups, kH, kW");
  const int64_t d[4] = {sh->d0, sh->d1, sh->d2, sh->d3};
  size_t elems = 1;
  for (int i = 0; i < 4; i++) {
    if (d[i] < 1 || d[i] > CONVD_DIM_MAX || convd_size_mul(elems, (size_t)d[i], &elems))
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "weight shape %" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
                        ": every dimension must be between 1 and %" PRId64 " and the product fit memory",
                        d[0], d[1], d[2], d[3], (int64_t)CONVD_DIM_MAX);
    c->put_shape[i] = d[i];
  }
  switch (sp->dtype) {
    case CONVD__V1__DTYPE__DTYPE_UNSPECIFIED:
    case CONVD__V1__DTYPE__DTYPE_FLOAT32: c->put_dtype = CONVD_F32; break;
    case CONVD__V1__DTYPE__DTYPE_FLOAT16: c->put_dtype = CONVD_F16; break;
    case CONVD__V1__DTYPE__DTYPE_BFLOAT16: c->put_dtype = CONVD_BF16; break;
    default:
      return convd_errf(err, errlen, CONVD_ENOTSUP, "spec.dtype = %d is not one this daemon serves",
                        (int)sp->dtype);
  }
  c->put_elem = convd_dtype_size(c->put_dtype);
  c->put_bias = sp->has_bias;
  /* the bias has C_out values: the first dimension, or for a transpose the second times groups */
  const int64_t groups = sp->groups == 0 ? 1 : sp->groups;
  if (sp->op == CONVD__V1__OP__OP_CONV_TRANSPOSE2D && (groups < 1 || groups > CONVD_DIM_MAX))
    return convd_errf(err, errlen, CONVD_EINVAL, "spec.groups = %" PRId64 ": must be at least 1", groups);
  c->put_b_elems = sp->op == CONVD__V1__OP__OP_CONV_TRANSPOSE2D ? d[1] * groups : d[0];
  size_t wbytes, fbytes;
  if (convd_size_mul(elems, c->put_elem, &wbytes) || convd_size_mul(elems, sizeof(float), &fbytes) ||
      fbytes > c->rpc->cfg->weights_memory)
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "weights of %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
                      " do not fit the registry's %" PRIu64 " bytes (--weights-memory)",
                      d[0], d[1], d[2], d[3], c->rpc->cfg->weights_memory);
  c->put_w_total = wbytes;
  c->put_b_total = c->put_bias ? (size_t)c->put_b_elems * c->put_elem : 0;
  c->put_w = malloc(wbytes);
  c->put_b = c->put_b_total ? malloc(c->put_b_total) : NULL;
  if (c->put_w == NULL || (c->put_b_total && c->put_b == NULL))
    return convd_errf(err, errlen, CONVD_ENOMEM, "the daemon cannot allocate %zu bytes now", wbytes);
  c->put_spec = 1;
  return 0;
}

static int put_chunk(const char *what, const Convd__V1__TensorChunk *ch, void *dst, size_t *recv,
                     size_t total, char *err, size_t errlen) {
  if (ch->offset != *recv)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s chunk at byte offset %" PRIu64 ", but %zu bytes have arrived: send chunks in order",
                      what, ch->offset, *recv);
  if (ch->data.len > total - *recv)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s chunk at byte offset %" PRIu64 " with %zu bytes ends past the %s's %zu bytes",
                      what, ch->offset, ch->data.len, what, total);
  if (ch->data.len) memcpy((char *)dst + *recv, ch->data.data, ch->data.len);
  *recv += ch->data.len;
  return 0;
}

/* The stream ended: the weights go into the registry (widened to float32). */
static void put_weights_finish(call *c) {
  char err[512];
  if (!c->put_spec) {
    fail(c, CONVD_EINVAL, "the stream ended before the spec arrived");
    return;
  }
  if (c->put_w_recv != c->put_w_total || c->put_b_recv != c->put_b_total) {
    snprintf(err, sizeof err, "incomplete at half-close: %zu of %zu weight bytes and %zu of %zu bias bytes arrived",
             c->put_w_recv, c->put_w_total, c->put_b_recv, c->put_b_total);
    fail(c, CONVD_EINVAL, err);
    return;
  }
  const size_t we = c->put_w_total / c->put_elem, be = c->put_b_total / c->put_elem;
  float *w = malloc(we * sizeof(float)), *b = be ? malloc(be * sizeof(float)) : NULL;
  if (w == NULL || (be && b == NULL)) {
    free(w), free(b);
    fail(c, CONVD_ENOMEM, "the daemon cannot widen the weights now; retry later");
    return;
  }
  convd_dtype_decode(c->put_dtype, c->put_w, w, we);
  if (be) convd_dtype_decode(c->put_dtype, c->put_b, b, be);
  char id[CONVD_WEIGHTS_ID_LEN + 1];
  uint64_t bytes = 0;
  int already = 0;
  int rc = convd_registry_put(c->rpc->registry, c->put_shape[0], c->put_shape[1], c->put_shape[2],
                              c->put_shape[3], c->put_dtype, w, b, (int64_t)be, id, &bytes, &already,
                              err, sizeof err);
  if (rc) {
    fail(c, rc, err);
    return;
  }
  Convd__V1__PutWeightsResponse resp = CONVD__V1__PUT_WEIGHTS_RESPONSE__INIT;
  resp.weights_id = id;
  resp.bytes = bytes;
  resp.already_present = already != 0;
  send_message_final(c, &resp.base);
}

/* A PutWeights message (or the end of the stream). c->mu held. */
static void put_weights_recv(call *c, int ok, grpc_byte_buffer *bb) {
  char err[512];
  if (!ok || c->status_set || c->dead) {
    c->recv_done = 1;
    return;
  }
  if (bb == NULL) {
    c->recv_done = 1;
    put_weights_finish(c);
    return;
  }
  c->messages_in++;
  Convd__V1__PutWeightsRequest *m =
      (Convd__V1__PutWeightsRequest *)convd_wire_unpack(bb, &convd__v1__put_weights_request__descriptor);
  int rc = 0;
  if (m == NULL) {
    rc = convd_errf(err, sizeof err, CONVD_EINVAL,
                    "message %" PRIu64 " is not a valid convd.v1.PutWeightsRequest", c->messages_in);
  } else if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_SPEC) {
    rc = c->put_spec ? convd_errf(err, sizeof err, CONVD_EINVAL, "a second spec arrived")
                     : put_spec(c, m->spec, err, sizeof err);
  } else if (!c->put_spec) {
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "the first message must be the spec (the weights' shape)");
  } else if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_WEIGHT) {
    rc = put_chunk("weight", m->weight, c->put_w, &c->put_w_recv, c->put_w_total, err, sizeof err);
  } else if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_BIAS) {
    rc = !c->put_bias ? convd_errf(err, sizeof err, CONVD_EINVAL, "a bias chunk arrived but the spec says has_bias = false")
                      : put_chunk("bias", m->bias, c->put_b, &c->put_b_recv, c->put_b_total, err, sizeof err);
  } else {
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "a message with no content arrived");
  }
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) fail(c, rc, err);
  else post_recv(c);
}

static void handle_put_weights(call *c) {
  if (c->rpc->registry == NULL) {
    fail(c, CONVD_ENOTSUP, "this daemon runs without a weights registry (--weights-memory 0)");
    return;
  }
  if (send_initial_metadata(c) == 0) post_recv(c);
}

static int dtype_to_wire(int dtype) {
  return dtype == CONVD_F16 ? CONVD__V1__DTYPE__DTYPE_FLOAT16
         : dtype == CONVD_BF16 ? CONVD__V1__DTYPE__DTYPE_BFLOAT16
                               : CONVD__V1__DTYPE__DTYPE_FLOAT32;
}

static void handle_list_weights(call *c) {
  convd_weights_info *v = NULL;
  size_t n = 0;
  convd_registry_stats st = {0};
  if (c->rpc->registry) {
    if (convd_registry_list(c->rpc->registry, &v, &n)) {
      fail(c, CONVD_ENOMEM, "the daemon is out of memory");
      return;
    }
    convd_registry_stats_get(c->rpc->registry, &st);
  }
  Convd__V1__WeightsInfo *infos = calloc(n ? n : 1, sizeof *infos);
  Convd__V1__WeightsInfo **ptrs = calloc(n ? n : 1, sizeof *ptrs);
  Convd__V1__Shape4 *shapes = calloc(n ? n : 1, sizeof *shapes);
  if (infos && ptrs && shapes) {
    for (size_t i = 0; i < n; i++) {
      convd__v1__weights_info__init(&infos[i]);
      convd__v1__shape4__init(&shapes[i]);
      shapes[i].d0 = v[i].meta.c_out, shapes[i].d1 = v[i].meta.c_per_group;
      shapes[i].d2 = v[i].meta.kh, shapes[i].d3 = v[i].meta.kw;
      infos[i].weights_id = v[i].meta.id;
      infos[i].weight_shape = &shapes[i];
      infos[i].has_bias = v[i].meta.has_bias != 0;
      infos[i].dtype = dtype_to_wire(v[i].meta.dtype);
      infos[i].bytes = v[i].meta.bytes;
      infos[i].uses = v[i].uses;
      infos[i].idle_seconds = v[i].idle_seconds;
      infos[i].in_use = v[i].in_use;
      ptrs[i] = &infos[i];
    }
    Convd__V1__ListWeightsResponse resp = CONVD__V1__LIST_WEIGHTS_RESPONSE__INIT;
    resp.n_weights = n;
    resp.weights = ptrs;
    resp.bytes_used = st.bytes;
    resp.bytes_limit = c->rpc->cfg->weights_memory;
    resp.evictions = st.evictions;
    send_message_final(c, &resp.base);
  } else {
    fail(c, CONVD_ENOMEM, "the daemon is out of memory");
  }
  free(infos), free(ptrs), free(shapes), free(v);
}

static void handle_delete_weights(call *c) {
  char err[256];
  Convd__V1__DeleteWeightsRequest *m =
      c->payload ? (Convd__V1__DeleteWeightsRequest *)convd_wire_unpack(
                       c->payload, &convd__v1__delete_weights_request__descriptor)
                 : NULL;
  int rc;
  if (m == NULL)
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "the request is not a valid convd.v1.DeleteWeightsRequest");
  else if (c->rpc->registry == NULL)
    rc = convd_errf(err, sizeof err, CONVD_ENOTFOUND, "this daemon runs without a weights registry");
  else
    rc = convd_registry_delete(c->rpc->registry, m->weights_id ? m->weights_id : "", err, sizeof err);
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) {
    fail(c, rc, err);
    return;
  }
  Convd__V1__DeleteWeightsResponse resp = CONVD__V1__DELETE_WEIGHTS_RESPONSE__INIT;
  send_message_final(c, &resp.base);
}

/* ---- grpc.health.v1.Health --------------------------------------------------------------- */

/* "" (the server) and our service are known; 1 known, 0 not. */
static int health_known(const char *service) {
  return service == NULL || service[0] == '\0' || strcmp(service, "convd.v1.Convolution") == 0;
}

static int health_status(convd_rpc *r) {
  return atomic_load(&r->serving) && !atomic_load(&r->health_draining)
             ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
             : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static void handle_health_check(call *c) {
  Grpc__Health__V1__HealthCheckRequest *m =
      c->payload ? (Grpc__Health__V1__HealthCheckRequest *)convd_wire_unpack(
                       c->payload, &grpc__health__v1__health_check_request__descriptor)
                 : NULL;
  if (m == NULL) {
    fail(c, CONVD_EINVAL, "the request is not a valid grpc.health.v1.HealthCheckRequest");
    return;
  }
  int known = health_known(m->service);
  char msg[256];
  snprintf(msg, sizeof msg, "unknown service \"%.100s\": convd serves \"\" and \"convd.v1.Convolution\"",
           m->service);
  protobuf_c_message_free_unpacked(&m->base, NULL);
  if (!known) {
    fail(c, CONVD_ENOTFOUND, msg);
    return;
  }
  Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  resp.status = health_status(c->rpc);
  send_message_final(c, &resp.base);
}

/* Sends the watched status when it changed; ends the stream once NOT_SERVING went out during a
 * drain (so that the drain completes). c->mu held. */
static void watch_pump(call *c) {
  if (c->sending || c->status_started || c->dead) return;
  const int st = c->watch_unknown ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN
                                  : health_status(c->rpc);
  if (st != c->watch_sent) {
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = st;
    c->watch_sent = st;
    start_send(c, &resp.base);
    return;
  }
  if (atomic_load(&c->rpc->health_draining)) {
    set_status(c, 0, "");
    send_final(c, NULL);
  }
}

static void handle_health_watch(call *c) {
  Grpc__Health__V1__HealthCheckRequest *m =
      c->payload ? (Grpc__Health__V1__HealthCheckRequest *)convd_wire_unpack(
                       c->payload, &grpc__health__v1__health_check_request__descriptor)
                 : NULL;
  if (m == NULL) {
    fail(c, CONVD_EINVAL, "the request is not a valid grpc.health.v1.HealthCheckRequest");
    return;
  }
  c->watch_unknown = !health_known(m->service);
  c->watch_sent = -1;
  protobuf_c_message_free_unpacked(&m->base, NULL);
  if (send_initial_metadata(c) == 0) watch_pump(c);
}

/* Health may have changed (drain, a device failed): every watcher re-checks. Not called with
 * any call's mutex held. */
static void health_notify(convd_rpc *r) {
  call **w = NULL;
  size_t n = 0, cap = 0;
  pthread_mutex_lock(&r->mu);
  for (call *c = r->active; c; c = c->next) {
    if (c->kind != K_HEALTH_WATCH) continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 8;
      call **nw = realloc(w, cap * sizeof *w);
      if (nw == NULL) break;
      w = nw;
    }
    pthread_mutex_lock(&c->mu);
    call_ref_locked(c);
    pthread_mutex_unlock(&c->mu);
    w[n++] = c;
  }
  pthread_mutex_unlock(&r->mu);
  for (size_t i = 0; i < n; i++) {
    pthread_mutex_lock(&w[i]->mu);
    watch_pump(w[i]);
    pthread_mutex_unlock(&w[i]->mu);
    call_unref(w[i]);
  }
  free(w);
}

void convd_rpc_gauges(convd_rpc *r, convd_metrics_gauges *g) {
  pthread_mutex_lock(&r->mu);
  g->calls_in_flight = (uint64_t)r->n_active;
  pthread_mutex_unlock(&r->mu);
  g->inflight_bytes = atomic_load(&r->inflight_bytes);
  g->inflight_limit = r->cfg->max_inflight_bytes;
  g->serving = health_status(r) == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
}

convd_registry *convd_rpc_registry(convd_rpc *r) { return r->registry; }

void convd_rpc_health_changed(convd_rpc *r) {
  atomic_store(&r->serving, convd_engine_healthy_devices(r->engine) > 0);
  health_notify(r);
}

/* ---- server reflection --------------------------------------------------------------------- */

static void handle_reflect(call *c) {
  if (send_initial_metadata(c) == 0) post_recv(c);
}

/* A reflection request (or the end of the stream): answered, then the next one is read.
 * c->mu held. */
static void reflect_recv(call *c, int ok, grpc_byte_buffer *bb) {
  if (!ok || c->status_set || c->dead) {
    c->recv_done = 1;
    return;
  }
  if (bb == NULL) { /* half-close: done once the last answer went out */
    c->recv_done = 1;
    if (!c->sending) {
      set_status(c, 0, "");
      send_final(c, NULL);
    }
    return;
  }
  Grpc__Reflection__V1__ServerReflectionRequest *rq =
      (Grpc__Reflection__V1__ServerReflectionRequest *)convd_wire_unpack(
          bb, &grpc__reflection__v1__server_reflection_request__descriptor);
  if (rq == NULL) {
    fail(c, CONVD_EINVAL, "the message is not a valid grpc.reflection.v1.ServerReflectionRequest");
    return;
  }
  size_t len = 0;
  uint8_t *out = convd_reflect_answer(rq, &len);
  protobuf_c_message_free_unpacked(&rq->base, NULL);
  if (out == NULL) {
    fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  grpc_slice sl = grpc_slice_new(out, len, free);
  grpc_byte_buffer *resp = grpc_raw_byte_buffer_create(&sl, 1);
  grpc_slice_unref(sl);
  send_buffer(c, resp);
}

static void handle_generic(call *c) {
  char msg[512];
  snprintf(msg, sizeof msg,
           "method %.*s is not served by convd; service convd.v1.Convolution has Conv2d, "
           "Conv2dUnary, ListDevices, PutWeights, ListWeights and DeleteWeights; "
           "grpc.health.v1.Health has Check and Watch; server reflection is served (v1, v1alpha)",
           (int)(GRPC_SLICE_LENGTH(c->details.method) > 200 ? 200
                                                            : GRPC_SLICE_LENGTH(c->details.method)),
           (const char *)GRPC_SLICE_START_PTR(c->details.method));
  set_status(c, CONVD_ENOTSUP, msg);
  send_final(c, NULL);
}

/* The client's x-request-id (letters, digits, - _ . : only, at most 64), so that its logs and
 * ours join up; else a number of our own. */
static void set_request_id(call *c, convd_rpc *r) {
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
  snprintf(c->rid, sizeof c->rid, "r%" PRIu64, atomic_fetch_add(&r->next_rid, 1) + 1);
}

static void on_request(void *obj, int ok) {
  call *c = obj;
  convd_rpc *r = c->rpc;
  if (!ok) { /* the server is shutting down: this request will never match a call */
    call_unref(c);
    return;
  }
  pthread_mutex_lock(&r->mu);
  int repost = !r->shutting_down, draining = r->draining;
  c->in_active = 1;
  c->next = r->active;
  if (r->active) r->active->prev = c;
  r->active = c;
  r->n_active++;
  pthread_mutex_unlock(&r->mu);
  if (repost) post_request(r, c->kind);

  c->t_begin = now_seconds();
  set_request_id(c, r);
  char *peer = grpc_call_get_peer(c->gc);
  if (peer) {
    snprintf(c->peer, sizeof c->peer, "%s", peer);
    gpr_free(peer);
  }
  pthread_mutex_lock(&c->mu);
  /* RECV_CLOSE_ON_SERVER completes when the call ends; it tells us about cancellation. */
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &c->client_cancelled;
  /* While draining, new calls are refused, but health calls answer (NOT_SERVING). */
  if (start_batch(c, &op, 1, &c->t_close) == 0 && draining && c->kind != K_HEALTH_CHECK &&
      c->kind != K_HEALTH_WATCH) {
    set_status(c, CONVD_EUNAVAIL, "convd is shutting down and takes no new calls; retry on another instance or after it restarts");
    send_final(c, NULL);
  } else if (!c->dead) {
    switch (c->kind) {
      case K_CONV2D: handle_conv2d(c); break;
      case K_UNARY: handle_unary(c); break;
      case K_LIST: handle_list(c); break;
      case K_PUT_WEIGHTS: handle_put_weights(c); break;
      case K_LIST_WEIGHTS: handle_list_weights(c); break;
      case K_DELETE_WEIGHTS: handle_delete_weights(c); break;
      case K_HEALTH_CHECK: handle_health_check(c); break;
      case K_HEALTH_WATCH: handle_health_watch(c); break;
      case K_REFLECT:
      case K_REFLECT_ALPHA: handle_reflect(c); break;
      default: handle_generic(c); break;
    }
  }
  pthread_mutex_unlock(&c->mu);
  call_unref(c); /* the handler's ref */
}

/* ---- server ------------------------------------------------------------------------------ */

static void on_shutdown(void *obj, int ok) {
  convd_rpc *r = obj;
  (void)ok;
  pthread_mutex_lock(&r->mu);
  r->shutdown_notified = 1;
  pthread_mutex_unlock(&r->mu);
  rpc_maybe_stopped(r);
}

static void *cq_main(void *arg) {
  convd_rpc *r = arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type != GRPC_OP_COMPLETE) continue;
    tag *t = ev.tag;
    t->fn(t->obj, ev.success);
  }
  return NULL;
}

int convd_rpc_start(const convd_config *cfg, convd_engine *engine, convd_metrics *metrics,
                    convd_rpc **out, int *port, char *err, size_t errlen) {
  *out = NULL;
  convd_rpc *r = calloc(1, sizeof *r);
  if (r == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  r->cfg = cfg;
  r->engine = engine;
  r->metrics = metrics;
  atomic_init(&r->serving, convd_engine_healthy_devices(engine) > 0);
  atomic_init(&r->health_draining, 0);
  atomic_init(&r->inflight_bytes, 0);
  if (cfg->weights_memory && (r->registry = convd_registry_create(cfg->weights_memory)) == NULL) {
    free(r);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  }
  pthread_mutex_init(&r->mu, NULL);
  r->t_shutdown = (tag){on_shutdown, r};

  grpc_arg args[4];
  memset(args, 0, sizeof args);
  args[0].type = GRPC_ARG_INTEGER;
  args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
  args[0].value.integer = (int)cfg->max_message_bytes;
  args[1].type = GRPC_ARG_INTEGER;
  args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
  args[1].value.integer = (int)cfg->max_message_bytes;
  /* A wider HTTP/2 flow-control window: one stream's throughput is bounded by it. */
  args[2].type = GRPC_ARG_INTEGER;
  args[2].key = "grpc.http2.lookahead_bytes";
  args[2].value.integer = 16 * 1024 * 1024;
  /* gRPC turns SO_REUSEPORT on by default: a second daemon on the same port would then share
   * its connections silently. Off, the second one fails to start and says why. */
  args[3].type = GRPC_ARG_INTEGER;
  args[3].key = GRPC_ARG_ALLOW_REUSEPORT;
  args[3].value.integer = 0;
  grpc_channel_args ch = {4, args};
  r->server = grpc_server_create(&ch, NULL);
  r->cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(r->server, r->cq, NULL);
  for (int k = 0; k < K_GENERIC; k++)
    r->method[k] = grpc_server_register_method(
        r->server, kind_path[k], NULL,
        kind_streams_in((enum call_kind)k) ? GRPC_SRM_PAYLOAD_NONE
                                           : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
        0);

  grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
  *port = grpc_server_add_http2_port(r->server, cfg->listen, creds);
  grpc_server_credentials_release(creds);
  if (*port == 0) {
    grpc_server_destroy(r->server);
    grpc_completion_queue_shutdown(r->cq);
    grpc_completion_queue_destroy(r->cq);
    pthread_mutex_destroy(&r->mu);
    convd_registry_destroy(r->registry);
    free(r);
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "cannot listen on %s: the address is malformed or in use (use HOST:PORT, "
                      "e.g. 127.0.0.1:50051; port 0 picks a free one)",
                      cfg->listen);
  }
  grpc_server_start(r->server);
  for (int k = 0; k < K_COUNT; k++)
    for (int i = 0; i < REQUESTS_PER_METHOD; i++) post_request(r, (enum call_kind)k);
  if (pthread_create(&r->thread, NULL, cq_main, r) != 0) {
    /* Without its thread the server cannot run; shut it down synchronously. */
    grpc_server_shutdown_and_notify(r->server, r->cq, &r->t_shutdown);
    grpc_server_cancel_all_calls(r->server);
    r->shutting_down = 1;
    grpc_completion_queue_shutdown(r->cq);
    cq_main(r);
    grpc_server_destroy(r->server);
    grpc_completion_queue_destroy(r->cq);
    convd_registry_destroy(r->registry);
    free(r);
    return convd_errf(err, errlen, CONVD_ENOMEM, "cannot start the server thread");
  }
  r->thread_started = 1;
  *out = r;
  return 0;
}

void convd_rpc_drain(convd_rpc *r, void (*drained)(void *user), void *user) {
  pthread_mutex_lock(&r->mu);
  r->draining = 1;
  r->drained = drained;
  r->drained_user = user;
  pthread_mutex_unlock(&r->mu);
  atomic_store(&r->health_draining, 1);
  health_notify(r); /* watchers get NOT_SERVING, and their streams end */
  rpc_maybe_drained(r);
}

void convd_rpc_cancel_all(convd_rpc *r) {
  /* Under r->mu no listed call can be freed: call_free unlinks before it unrefs. */
  pthread_mutex_lock(&r->mu);
  for (call *c = r->active; c; c = c->next)
    grpc_call_cancel_with_status(c->gc, GRPC_STATUS_UNAVAILABLE,
                                 "convd is shutting down: the call was cancelled after the drain "
                                 "timeout",
                                 NULL);
  pthread_mutex_unlock(&r->mu);
}

void convd_rpc_shutdown(convd_rpc *r, void (*stopped)(void *user), void *user) {
  pthread_mutex_lock(&r->mu);
  r->shutting_down = 1;
  r->stopped = stopped;
  r->stopped_user = user;
  pthread_mutex_unlock(&r->mu);
  grpc_server_shutdown_and_notify(r->server, r->cq, &r->t_shutdown);
}

void convd_rpc_destroy(convd_rpc *r) {
  if (r == NULL) return;
  grpc_completion_queue_shutdown(r->cq);
  if (r->thread_started) pthread_join(r->thread, NULL);
  grpc_server_destroy(r->server);
  grpc_completion_queue_destroy(r->cq);
  convd_registry_destroy(r->registry);
  pthread_mutex_destroy(&r->mu);
  free(r);
}
