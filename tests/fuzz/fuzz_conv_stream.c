/* The libFuzzer harness: a client's bytes through everything the daemon does with them before
 * a kernel runs, along the daemon's own path and without its gRPC server. Each input is a
 * sequence of calls (fuzz_frame.h): Conv2d messages go through the in-place band reader
 * (convd_wire_parse_band) or else protobuf-c (convd_wire_unpack) into a conv stream
 * (conv_stream.c: the stream's rules, spec -> checked descriptor, registry look-ups) as
 * svc_conv.c's conv2d_recv feeds them; a ConvCall as unary_start and unary_run do; PutWeights
 * into an upload (weights_upload.c) and the registry as svc_weights.c does; DeleteWeights into
 * the registry. What the daemon runs on its offload thread runs here in line, in its place in
 * the sequence. Every call is the one tenant's of a daemon without tokens. A call without FUZZ_WITH_JOB has no job attached, so its stream is only
 * checked; with it, a small convolution gets an engine job on reference devices (created as
 * begin_job does, without admission), and bands and weights are handed over, widened and
 * digested as in the daemon. Besides the sanitizers, it aborts when an invariant the daemon
 * relies on fails: the in-place reader and protobuf-c agree on every band the former accepts,
 * an accepted spec fits the request limit, a stream that finished cleanly received exactly the
 * bytes its spec announced (and its job then finishes: a hang is libFuzzer's timeout), weights
 * just put can be acquired, the registry stays under its limit.
 *
 * Built twice from this one file: with clang and -fsanitize=fuzzer (CONVD_FUZZ=ON, libFuzzer's
 * main), and in every build with fuzz_replay.c's main, which runs the seed corpus once.
 *
 * Threads: the caller's (libFuzzer's, or the replay's), one input at a time; the engine's
 * device workers run jobs' ops and callbacks, which touch only their job_sink. */
#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conv_stream.h"
#include "engine.h"
#include "err.h"
#include "fuzz_frame.h"
#include "registry.h"
#include "weights_upload.h"
#include "wire.h"

/* Conv2d calls still open when the input ends hold their registered weights, as calls whose
 * jobs still run do; past this many the oldest ends. */
#define LIVE_STREAMS 4

#define CHECK(cond, ...)                                                        \
  do {                                                                          \
    if (!(cond)) {                                                              \
      fprintf(stderr, "fuzz_conv_stream: invariant failed at %s:%d: %s: ",     \
              __FILE__, __LINE__, #cond);                                       \
      fprintf(stderr, __VA_ARGS__);                                             \
      fputc('\n', stderr);                                                      \
      abort();                                                                  \
    }                                                                           \
  } while (0)

/* What the calls of one input share: the daemon's registry and the calls still open. */
typedef struct daemon_state {
  convd_registry *reg;
  convd_stream *live[LIVE_STREAMS];
  size_t nlive;
  fuzz_outcome *out;
  int verbose;
} daemon_state;

typedef struct reader {
  const uint8_t *p;
  size_t left;
} reader;

/* The next frame's bytes (*len of them at *bytes, cuts as sent); 0 when the input has ended. */
static int next_frame(reader *r, const uint8_t **bytes, size_t *len, unsigned cut[2]) {
  if (r->left < FUZZ_FRAME_HEADER) {
    r->left = 0;
    return 0;
  }
  size_t n = fuzz_get_u32le(r->p);
  cut[0] = r->p[4], cut[1] = r->p[5];
  r->p += FUZZ_FRAME_HEADER, r->left -= FUZZ_FRAME_HEADER;
  if (n > r->left) n = r->left;
  *bytes = r->p, *len = n;
  r->p += n, r->left -= n;
  return 1;
}

/* A received message as gRPC hands it over: a byte buffer of its own copies of up to three
 * slices (empty ones left out, as gRPC's reader never yields them), so a read past a slice's
 * end is one ASan sees. */
static grpc_byte_buffer *byte_buffer(const uint8_t *p, size_t len, const unsigned cut[2]) {
  size_t a = (size_t)((uint64_t)len * cut[0] / 255), b = (size_t)((uint64_t)len * cut[1] / 255);
  if (a > b) {
    const size_t t = a;
    a = b, b = t;
  }
  const size_t at[4] = {0, a, b, len};
  grpc_slice sl[3];
  size_t k = 0;
  for (int i = 0; i < 3; i++)
    if (at[i + 1] > at[i] || (i == 2 && k == 0))
      sl[k++] = grpc_slice_from_copied_buffer((const char *)p + at[i], at[i + 1] - at[i]);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(sl, k);
  for (size_t i = 0; i < k; i++) grpc_slice_unref(sl[i]);
  return bb;
}

static void answer(daemon_state *d, const char *method, int rc, const char *err) {
  d->out->calls++;
  if (rc) d->out->failed++;
  if (d->verbose)
    fprintf(stderr, "  call %u %s: %s%s%s\n", d->out->calls, method, rc ? convd_strerror(rc) : "OK",
            rc ? ": " : "", rc ? err : "");
  convd_registry_stats st;
  convd_registry_stats_get(d->reg, &st);
  CHECK(st.bytes <= st.limit, "the registry holds %" PRIu64 " bytes over its limit %" PRIu64,
        st.bytes, st.limit);
}

/* ---- the job a small convolution gets (FUZZ_WITH_JOB) ------------------------------------- */

/* One job and its callbacks' state; mu guards done (set on a device worker). */
typedef struct job_sink {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done;
  convd_job *job;
} job_sink;

#define JOB_SINK_INIT {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, NULL}

/* Final output rows are dropped at once (a call would send them first). */
static void sink_rows(void *user, int64_t n, int64_t h0, int64_t h1) {
  job_sink *k = user;
  convd_job_release_rows(k->job, n, h0, h1);
}

static void sink_done(void *user, int status, const char *err, const convd_job_stats *st) {
  job_sink *k = user;
  (void)status, (void)err, (void)st;
  pthread_mutex_lock(&k->mu);
  k->done = 1;
  pthread_cond_signal(&k->cv);
  pthread_mutex_unlock(&k->mu);
}

/* Admission, asked as admit_job is (svc_conv.c): everything is admitted here. */
static int job_admit(void *user, const convd_plan *plan, uint64_t bookkeeping, char *err,
                     size_t errlen) {
  (void)user, (void)plan, (void)bookkeeping, (void)err, (void)errlen;
  return 0;
}

/* Made on first use and kept for the process: one reference device with a small budget, so
 * that even these small convolutions are often cut into several ops. */
static convd_engine *engine(void) {
  static convd_engine *e;
  if (e == NULL) {
    convd_engine_opts o = {.cpu_devices = 1, .cpu_threads = 1, .reference = 1,
                           .device_memory = 8192, .gpus = 0};
    char err[256];
    CHECK(convd_engine_create(&o, &e, err, sizeof err) == 0, "%s", err);
  }
  return e;
}

/* The spec was accepted: the job, as begin_job creates it (y: Conv2dUnary's output, written in
 * place). A convolution too large to compute here stays only checked. */
static int job_begin(const daemon_state *d, job_sink *k, convd_stream *s, float *y, char *err,
                     size_t errlen) {
  const convd_conv *cv = convd_stream_conv(s);
  if (!fuzz_job_small(cv)) return 0;
  const convd_job_cbs cbs = {.user = k, .rows_ready = sink_rows, .done = sink_done,
                             .admit = job_admit, .op_bytes = y ? 0 : FUZZ_STREAM_WINDOW / 2};
  int rc = convd_job_create(engine(), cv, &cbs, &k->job, err, errlen);
  if (rc) return rc;
  if (d->verbose)
    fprintf(stderr, "  (a job of %" PRIu64 " ops)\n", (uint64_t)convd_job_plan(k->job)->ops);
  convd_job_set_priority(k->job, convd_stream_priority(s));
  if (y) convd_job_set_output(k->job, y);
  if ((rc = convd_stream_attach(s, k->job, err, errlen))) return rc;
  if (y == NULL) { /* a streamed call's largest band: a quarter of its window, or one row */
    const uint64_t hint = convd_job_memory_hint(k->job);
    const uint64_t window = hint > FUZZ_STREAM_WINDOW ? hint : FUZZ_STREAM_WINDOW;
    const uint64_t row = (uint64_t)cv->p.c_in * (uint64_t)cv->p.w * cv->wire_elem;
    convd_stream_set_band_limit(s, row > window / 4 ? row : window / 4);
  }
  return 0;
}

/* The call is over: a job that has everything runs to its end, any other is cancelled (as
 * conv_stop does); then it is destroyed, before its stream (conv_free's order). */
static void job_end(job_sink *k, int cancel) {
  if (k->job == NULL) return;
  pthread_mutex_lock(&k->mu);
  if (cancel && !k->done) convd_job_cancel(k->job); /* under the lock, as conv_stop runs */
  while (!k->done) pthread_cond_wait(&k->cv, &k->mu);
  pthread_mutex_unlock(&k->mu);
  convd_job_destroy(k->job);
  k->job = NULL;
}

/* ---- Conv2d ------------------------------------------------------------------------------ */

static void wire_copy(const void *ctx, size_t off, void *dst, size_t n) {
  convd_wire_band_copy(ctx, off, dst, n);
}

/* A band the in-place reader accepted must be the band protobuf-c reads from the same bytes:
 * otherwise one message would mean two things depending on how it was cut. */
static void check_band_agrees(grpc_byte_buffer *bb, const convd_wire_band *wb) {
  Convd__V1__ConvRequest *m =
      (Convd__V1__ConvRequest *)convd_wire_unpack(bb, &convd__v1__conv_request__descriptor);
  CHECK(m != NULL, "protobuf-c refuses a band the in-place reader accepted");
  CHECK(m->msg_case == CONVD__V1__CONV_REQUEST__MSG_INPUT, "protobuf-c reads oneof case %d",
        (int)m->msg_case);
  const Convd__V1__RowBand *in = m->input;
  CHECK(in->n == wb->n && in->h_begin == wb->h_begin && in->h_end == wb->h_end &&
            in->offset == wb->offset && in->data.len == wb->data_len,
        "in place: n %" PRId64 " rows [%" PRId64 ", %" PRId64 ") offset %" PRIu64 " %zu bytes; "
        "protobuf-c: n %" PRId64 " rows [%" PRId64 ", %" PRId64 ") offset %" PRIu64 " %zu bytes",
        wb->n, wb->h_begin, wb->h_end, wb->offset, wb->data_len, in->n, in->h_begin, in->h_end,
        in->offset, in->data.len);
  if (wb->data_len) {
    uint8_t *got = malloc(wb->data_len);
    CHECK(got != NULL, "out of memory");
    convd_wire_band_copy(wb, 0, got, wb->data_len);
    CHECK(memcmp(got, in->data.data, wb->data_len) == 0, "the band's data differs");
    free(got);
  }
  protobuf_c_message_free_unpacked(&m->base, NULL);
}

/* One Conv2d message, as conv2d_recv applies it (svc_conv.c); k: the call's job, when it may
 * have one. */
static int conv2d_message(const daemon_state *d, convd_stream *s, job_sink *k,
                          grpc_byte_buffer *bb, unsigned index, char *err, size_t errlen) {
  convd_wire_band wb;
  if (convd_wire_parse_band(bb, CONVD_WIRE_REQUEST_INPUT, &wb)) {
    check_band_agrees(bb, &wb);
    const convd_stream_band band = {wb.n, wb.h_begin, wb.h_end, wb.offset,
                                    {NULL, wb.data_len, wire_copy, &wb}};
    return convd_stream_feed_band(s, &band, err, errlen);
  }
  Convd__V1__ConvRequest *m =
      (Convd__V1__ConvRequest *)convd_wire_unpack(bb, &convd__v1__conv_request__descriptor);
  if (m == NULL)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "message %u of the stream is not a valid convd.v1.ConvRequest "
                      "(protobuf decoding failed)",
                      index + 1);
  int accepted = 0;
  int rc = convd_stream_feed(s, m, &accepted, err, errlen);
  protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc == 0 && accepted) { /* here the daemon creates the job and admits it */
    const convd_conv *cv = convd_stream_conv(s);
    const uint64_t held = (uint64_t)cv->input_bytes + cv->output_bytes +
                          (convd_stream_registered_weights(s) ? 0 : cv->weight_bytes + cv->bias_bytes);
    CHECK(held <= FUZZ_MAX_REQUEST_BYTES, "an accepted spec needs %" PRIu64 " bytes", held);
    if (k) rc = job_begin(d, k, s, NULL, err, errlen);
  }
  return rc;
}

/* A stream that ended cleanly received what its spec announced, no more, no less. */
static void check_complete(const convd_stream *s) {
  const convd_conv *cv = convd_stream_conv(s);
  const uint64_t want = (uint64_t)cv->input_wire_bytes +
                        (convd_stream_registered_weights(s) ? 0 : cv->weight_wire_bytes + cv->bias_wire_bytes);
  CHECK(convd_stream_bytes_received(s) == want, "received %" PRIu64 " tensor bytes, the spec announced %" PRIu64,
        convd_stream_bytes_received(s), want);
  CHECK(convd_stream_bytes_buffered(s) == 0, "%" PRIu64 " bytes still buffered",
        convd_stream_bytes_buffered(s));
}

static void keep_open(daemon_state *d, convd_stream *s) {
  if (d->nlive == LIVE_STREAMS) {
    convd_stream_destroy(d->live[0]);
    memmove(d->live, d->live + 1, (LIVE_STREAMS - 1) * sizeof d->live[0]);
    d->nlive--;
  }
  d->live[d->nlive++] = s;
}

static void conv2d_call(daemon_state *d, reader *r, unsigned count, int half_close, int with_job) {
  convd_stream *s = convd_stream_create(FUZZ_MAX_REQUEST_BYTES, d->reg, NULL);
  CHECK(s != NULL, "out of memory");
  convd_stream_defer_weights(s, 1); /* as conv2d_start */
  job_sink k = JOB_SINK_INIT;
  char err[1024] = "";
  int rc = 0, whole = 1;
  for (unsigned i = 0; i < count; i++) {
    const uint8_t *p;
    size_t len;
    unsigned cut[2];
    if (!next_frame(r, &p, &len, cut)) {
      whole = 0; /* the input ended: the client is gone */
      break;
    }
    if (rc) continue; /* after an error the daemon reads no more of this call */
    grpc_byte_buffer *bb = byte_buffer(p, len, cut);
    CHECK(bb != NULL, "out of memory");
    rc = conv2d_message(d, s, with_job ? &k : NULL, bb, i, err, sizeof err);
    grpc_byte_buffer_destroy(bb);
    /* after_message: weights left to the offload thread are finalized there (here in line,
     * nothing feeds the stream meanwhile), then handed to the job */
    if (rc == 0 && convd_stream_weights_pending(s) &&
        (rc = convd_stream_finalize_weights(s, err, sizeof err)) == 0)
      convd_stream_hand_weights(s);
  }
  if (rc == 0 && whole && half_close) {
    rc = convd_stream_finish(s, err, sizeof err);
    if (rc == 0) check_complete(s);
  }
  job_end(&k, !(rc == 0 && whole && half_close));
  answer(d, "Conv2d", rc, err);
  keep_open(d, s);
}

/* ---- Conv2dUnary: unary_start, then unary_run without its job ------------------------------ */

static int unary_call(daemon_state *d, grpc_byte_buffer *bb, int with_job, char *err,
                      size_t errlen) {
  convd_stream *s = convd_stream_create(FUZZ_MAX_REQUEST_BYTES, d->reg, NULL);
  CHECK(s != NULL, "out of memory");
  job_sink k = JOB_SINK_INIT;
  float *y = NULL;
  Convd__V1__ConvCall *m =
      (Convd__V1__ConvCall *)convd_wire_unpack(bb, &convd__v1__conv_call__descriptor);
  int rc = 0;
  if (m == NULL)
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "the request is not a valid convd.v1.ConvCall (protobuf decoding failed)");
  else if (m->spec == NULL)
    rc = convd_errf(err, errlen, CONVD_EINVAL, "ConvCall.spec is missing");
  if (rc == 0) {
    Convd__V1__ConvRequest rq = CONVD__V1__CONV_REQUEST__INIT;
    rq.msg_case = CONVD__V1__CONV_REQUEST__MSG_SPEC;
    rq.spec = m->spec;
    int accepted;
    rc = convd_stream_feed(s, &rq, &accepted, err, errlen);
  }
  if (rc == 0) rc = convd_stream_check_call(s, m, FUZZ_MAX_MESSAGE_BYTES, err, errlen);
  if (rc == 0 && with_job && fuzz_job_small(convd_stream_conv(s))) {
    CHECK((y = malloc(convd_stream_conv(s)->output_bytes)) != NULL, "out of memory");
    rc = job_begin(d, &k, s, y, err, errlen);
  }
  if (rc == 0) rc = convd_stream_feed_call(s, m, err, errlen);
  if (rc == 0) check_complete(s);
  job_end(&k, rc != 0);
  free(y);
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  convd_stream_destroy(s);
  return rc;
}

/* ---- PutWeights and DeleteWeights: put_recv / put_finish, delete_start -------------------- */

/* PutWeights' admission (put_admit, svc_weights.c): everything is admitted, but no upload may
 * ask for more than its wire and float32 copies within the registry's limit. */
static int upload_admit(void *user, uint64_t bytes, char *err, size_t errlen) {
  (void)user, (void)err, (void)errlen;
  CHECK(bytes <= 2 * FUZZ_WEIGHTS_MEMORY, "an upload asks to hold %" PRIu64 " bytes", bytes);
  return 0;
}

static void put_weights_call(daemon_state *d, reader *r, unsigned count, int half_close) {
  convd_upload *u = convd_upload_create(FUZZ_WEIGHTS_MEMORY, upload_admit, NULL);
  CHECK(u != NULL, "out of memory");
  char err[512] = "";
  int rc = 0, whole = 1;
  for (unsigned i = 0; i < count; i++) {
    const uint8_t *p;
    size_t len;
    unsigned cut[2];
    if (!next_frame(r, &p, &len, cut)) {
      whole = 0;
      break;
    }
    if (rc) continue;
    grpc_byte_buffer *bb = byte_buffer(p, len, cut);
    CHECK(bb != NULL, "out of memory");
    Convd__V1__PutWeightsRequest *m = (Convd__V1__PutWeightsRequest *)convd_wire_unpack(
        bb, &convd__v1__put_weights_request__descriptor);
    grpc_byte_buffer_destroy(bb);
    if (m == NULL)
      rc = convd_errf(err, sizeof err, CONVD_EINVAL,
                      "message %u is not a valid convd.v1.PutWeightsRequest", i + 1);
    else
      rc = convd_upload_feed(u, m, err, sizeof err);
    if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  }
  if (rc == 0 && whole && half_close) {
    char id[CONVD_WEIGHTS_ID_LEN + 1];
    uint64_t bytes = 0;
    int already = 0;
    rc = convd_upload_complete(u, err, sizeof err);
    /* the offload thread's part (put_register), here in line: nothing else touches u */
    if (rc == 0) rc = convd_upload_register(u, d->reg, NULL, 0, id, &bytes, &already, err, sizeof err);
    if (rc == 0) { /* what was just put is there to be named */
      convd_weights *w = NULL;
      char aerr[256];
      CHECK(convd_registry_acquire(d->reg, NULL, id, &w, aerr, sizeof aerr) == 0, "%s", aerr);
      CHECK(w->bytes == bytes, "the entry counts %" PRIu64 " bytes, PutWeights said %" PRIu64,
            w->bytes, bytes);
      convd_registry_release(d->reg, w);
    }
  }
  convd_upload_destroy(u);
  answer(d, "PutWeights", rc, err);
}

static int delete_weights_call(daemon_state *d, grpc_byte_buffer *bb, char *err, size_t errlen) {
  Convd__V1__DeleteWeightsRequest *m = (Convd__V1__DeleteWeightsRequest *)convd_wire_unpack(
      bb, &convd__v1__delete_weights_request__descriptor);
  if (m == NULL)
    return convd_errf(err, errlen, CONVD_EINVAL, "the request is not a valid convd.v1.DeleteWeightsRequest");
  int rc = convd_registry_delete(d->reg, NULL, m->weights_id ? m->weights_id : "", err, errlen);
  protobuf_c_message_free_unpacked(&m->base, NULL);
  return rc;
}

/* Calls of one message each (count of them). */
static void single_calls(daemon_state *d, reader *r, unsigned kind, unsigned count, int with_job) {
  for (unsigned i = 0; i < count; i++) {
    const uint8_t *p;
    size_t len;
    unsigned cut[2];
    if (!next_frame(r, &p, &len, cut)) return;
    grpc_byte_buffer *bb = byte_buffer(p, len, cut);
    CHECK(bb != NULL, "out of memory");
    char err[1024] = "";
    int rc = kind == FUZZ_CONV2D_UNARY ? unary_call(d, bb, with_job, err, sizeof err)
                                       : delete_weights_call(d, bb, err, sizeof err);
    grpc_byte_buffer_destroy(bb);
    answer(d, kind == FUZZ_CONV2D_UNARY ? "Conv2dUnary" : "DeleteWeights", rc, err);
  }
}

void fuzz_conv_run(const uint8_t *data, size_t size, int verbose, fuzz_outcome *out) {
  *out = (fuzz_outcome){0, 0};
  daemon_state d = {.reg = convd_registry_create(FUZZ_WEIGHTS_MEMORY), .out = out, .verbose = verbose};
  CHECK(d.reg != NULL, "out of memory");
  reader r = {data, size};
  while (r.left >= FUZZ_CALL_HEADER) {
    const unsigned kind = r.p[0] % FUZZ_KINDS, count = r.p[1];
    const int half_close = !(r.p[0] & FUZZ_NO_HALF_CLOSE), with_job = (r.p[0] & FUZZ_WITH_JOB) != 0;
    r.p += FUZZ_CALL_HEADER, r.left -= FUZZ_CALL_HEADER;
    if (kind == FUZZ_CONV2D) conv2d_call(&d, &r, count, half_close, with_job);
    else if (kind == FUZZ_PUT_WEIGHTS) put_weights_call(&d, &r, count, half_close);
    else single_calls(&d, &r, kind, count, with_job);
  }
  for (size_t i = 0; i < d.nlive; i++) convd_stream_destroy(d.live[i]);
  convd_registry_destroy(d.reg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int verbose = -1;
  if (verbose < 0) verbose = getenv("CONVD_FUZZ_VERBOSE") != NULL;
  fuzz_outcome out;
  fuzz_conv_run(data, size, verbose, &out);
  return 0;
}
