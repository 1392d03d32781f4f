/* The convolution service: Conv2d (streamed both ways) and Conv2dUnary (one message each way).
 * Both go through one path: the request is fed to a conv stream (conv_stream.c: spec checks,
 * registry lookup, spec -> descriptor, widening, digest), the spec creates an engine job and
 * passes admission, and the tensors go to the job as they complete. Conv2d then streams
 * `accepted`, output row bands as their rows become final, and a summary; Conv2dUnary sends its
 * whole output, which the job wrote in place, in one message.
 *
 * Threads: the handlers run on the completion-queue thread with the call's mutex held; work
 * that grows with a tensor (a streamed call's job, its large weights, a Conv2dUnary message over
 * UNARY_INLINE_BYTES, copies from shared-memory regions) runs on the offload thread (offload.h),
 * copies into output regions on the copier thread, under the mutex where they touch shared
 * fields. The job's callbacks (on_rows_ready, on_input_freed, on_job_done) run on device worker threads;
 * they take the call's mutex, so every field of conv_call is guarded by it. The job holds a ref
 * on the call until on_job_done. */
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "band.h"
#include "clock.h"
#include "conv_stream.h"
#include "dtype.h"
#include "err.h"
#include "rpc_impl.h"
#include "services.h"
#include "shm.h"
#include "wire.h"

/* Bounds of a streamed call's window (stream_window). */
#define STREAM_WINDOW_BYTES ((uint64_t)64 << 20)
#define STREAM_WINDOW_MIN_BYTES ((uint64_t)1 << 20)
/* A windowed call's tile rows hold at most this many windows (job_cbs' row_bytes). */
#define ROW_WINDOWS 4
/* A Conv2dUnary message up to this is decoded and its job made on the completion-queue thread
 * (tens of microseconds); a larger one on the offload thread. */
#define UNARY_INLINE_BYTES ((size_t)256 << 10)

typedef struct conv_call {
  int unary;
  convd_stream *stream;
  convd_job *job;
  int job_done;
  convd_job_stats stats;
  uint64_t held; /* what this call counts in the admission total */

  /* Conv2d: reading */
  int recv_paused;
  int finalizing; /* its weights are being widened and hashed on the offload thread */
  int creating;   /* its job is being made on the offload thread */
  uint64_t mem_limit;  /* stop reading input while the job holds more than this */
  uint64_t band_limit; /* the largest input band the call takes */
  /* Conv2d: sending. Ranges of final rows not yet sent, and the band being sent. */
  int accepted_pending, summary_sent;
  struct out_range {
    int64_t n, h0, h1;
  } *ready;
  size_t ready_len, ready_cap;
  int band_active;
  convd_band_iter it; /* pieces of the current band */
  int64_t band_n, band_h0, band_h1;
  uint64_t rows_sent, rows_total;
  float *band_f32; /* output pieces as float32 before they are narrowed (float16, bfloat16) */
  uint64_t bytes_sent;

  /* Conv2dUnary: the output the job writes in place */
  float *uy;

  /* Shared memory (shm.h): the ranges the spec named, held until the call is freed, and the
   * copies between them and the job, which run on the offload thread without the mutex. */
  convd_shm_range in_r, out_r, w_r, b_r;
  /* float32 tensors in sealed regions (shm.h, "In place"): the job reads x and writes y where
   * they lie, so no copy runs, and the call ends only once the job no longer touches them. */
  const float *x_in_place;
  float *y_in_place;
  int64_t feed_n, feed_h; /* the next input row to copy (the feed task's alone) */
  int feeding;            /* a feed task is queued or running */
  int feed_paused;        /* backpressure: maybe_resume queues the next one */
  int writing;            /* a write task is queued or running */
  int progress_pending;   /* rows were written since the last Progress */
  Convd__V1__ConvCall *pend_m; /* Conv2dUnary with regions: message and job for the offload */
  convd_job *pend_job;
  _Atomic uint64_t shm_in_bytes, shm_out_bytes;
} conv_call;

static const convd_conv *conv_of(const conv_call *k) { return convd_stream_conv(k->stream); }

/* Calls whose rows go through a window (backpressure, tiles cut to fit): streamed ones, and
 * Conv2dUnary ones whose input or output lies in a region (its tensors need not fit a message
 * then). The others hold their whole tensors. */
static int windowed(const conv_call *k) { return !k->unary || k->in_r.region || k->out_r.region; }

static int in_place(const conv_call *k) { return k->x_in_place || k->y_in_place; }

static Convd__V1__Shape4 output_shape(const convd_conv *cv) {
  Convd__V1__Shape4 shape = CONVD__V1__SHAPE4__INIT;
  shape.d0 = cv->p.n;
  shape.d1 = cv->p.c_out;
  shape.d2 = cv->h_out;
  shape.d3 = cv->w_out;
  return shape;
}

static Convd__V1__Summary summary_of(const convd_call *c, const conv_call *k, uint64_t bytes_sent) {
  Convd__V1__Summary sum = CONVD__V1__SUMMARY__INIT;
  sum.elapsed_seconds = convd_now_seconds() - c->t_begin;
  sum.compute_seconds = k->stats.compute_seconds;
  sum.ops_run = k->stats.ops_run;
  /* Tensor bytes either way, whether over the wire or through a region. */
  sum.bytes_received = convd_stream_bytes_received(k->stream) + atomic_load(&k->shm_in_bytes);
  sum.bytes_sent = bytes_sent + atomic_load(&k->shm_out_bytes);
  return sum;
}

/* ---- engine callbacks (device worker threads) -------------------------------------------- */

static void pump(convd_call *c);
static void maybe_resume(convd_call *c);
static void start_write(convd_call *c, struct conv_call *k);
static void unary_maybe_reply(convd_call *c, conv_call *k);
/* Backpressure's verdict (flow, below). */
enum { FLOW_READ, FLOW_PAUSE, FLOW_STUCK };
static int flow(const struct conv_call *k);
static void fail_stuck(convd_call *c, struct conv_call *k);

/* Output rows are final. */
static void on_rows_ready(void *user, int64_t n, int64_t h0, int64_t h1) {
  convd_call *c = user;
  pthread_mutex_lock(&c->mu);
  conv_call *k = c->state;
  if (k->unary && !k->out_r.region) {
    convd_job_release_rows(k->job, n, h0, h1); /* written in place, into k->uy */
  } else if (k->y_in_place) { /* written in place, into the output region */
    convd_job_release_rows(k->job, n, h0, h1);
    const convd_conv *cv = conv_of(k);
    atomic_fetch_add(&k->shm_out_bytes, (uint64_t)(h1 - h0) * (uint64_t)cv->p.c_out * (uint64_t)cv->w_out * cv->wire_elem);
    k->rows_sent += (uint64_t)(h1 - h0);
    k->progress_pending = 1;
    if (k->unary) unary_maybe_reply(c, k);
    else pump(c);
  } else if (!c->status_set) {
    if (k->ready_len == k->ready_cap) {
      size_t cap = k->ready_cap ? k->ready_cap * 2 : 16;
      struct out_range *r = realloc(k->ready, cap * sizeof *r);
      if (r == NULL) {
        convd_call_fail(c, CONVD_ENOMEM, "the daemon ran out of memory queueing output");
        pthread_mutex_unlock(&c->mu);
        return;
      }
      k->ready = r;
      k->ready_cap = cap;
    }
    k->ready[k->ready_len++] = (struct out_range){n, h0, h1};
    if (k->out_r.region) start_write(c, k); /* not only when no message is in flight */
    pump(c);
  }
  pthread_mutex_unlock(&c->mu);
}

/* Input rows were freed: reading may resume. */
static void on_input_freed(void *user) {
  convd_call *c = user;
  pthread_mutex_lock(&c->mu);
  maybe_resume(c);
  pthread_mutex_unlock(&c->mu);
}

/* Conv2dUnary's answer: the whole output, narrowed in place to the wire's dtype. */
static void send_unary_result(convd_call *c, conv_call *k) {
  const convd_conv *cv = conv_of(k);
  Convd__V1__Shape4 shape = output_shape(cv);
  const int in_region = k->uy == NULL; /* the output went to a region (released by now) */
  Convd__V1__Summary sum = summary_of(c, k, in_region ? 0 : cv->output_wire_bytes); /* + region's */
  /* Element i's 2 bytes land at or before where its 4 bytes were read. */
  if (!in_region && cv->p.dtype != CONVD_F32)
    for (size_t i = 0; i < cv->output_elems; i++) {
      const float v = k->uy[i];
      convd_dtype_encode(cv->p.dtype, &v, (char *)k->uy + i * cv->wire_elem, 1);
    }
  Convd__V1__ConvResult res = CONVD__V1__CONV_RESULT__INIT;
  res.output_shape = &shape;
  res.output.data = (uint8_t *)k->uy;
  res.output.len = in_region ? 0 : cv->output_wire_bytes; /* in the region: nothing here */
  res.summary = &sum;
  convd_call_reply(c, &res.base);
}

static void release_regions(convd_call *c, conv_call *k);

/* Conv2dUnary's answer, once the job is done and (output in a region) every row is written
 * there and no copy runs: the regions go back first, so the client may unregister at once. */
static void unary_maybe_reply(convd_call *c, conv_call *k) {
  if (!k->unary || c->status_set || !k->job_done || k->feeding || k->writing) return;
  if (k->out_r.region && k->rows_sent < k->rows_total) return;
  release_regions(c, k);
  send_unary_result(c, k);
}

/* The job ended (its last callback). */
static void on_job_done(void *user, int status, const char *err, const convd_job_stats *st) {
  convd_call *c = user;
  pthread_mutex_lock(&c->mu);
  conv_call *k = c->state;
  k->stats = *st;
  k->job_done = 1;
  if (status != 0) {
    if (c->closed_cancelled || c->dead)
      convd_call_fail(c, CONVD_ECANCELED, "the client cancelled the call");
    else
      convd_call_fail(c, status, err);
  } else if (k->unary) {
    unary_maybe_reply(c, k);
  } else {
    pump(c);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

/* ---- the job --------------------------------------------------------------------------- */

/* The call's window: what a streamed call may hold of input and output rows at least (more
 * when the plan's tile rows need it); reading input pauses above it (backpressure), and it is
 * what admission counts for the call's rows. A quarter of --max-inflight-bytes at most, so a
 * small limit still admits streamed calls (their tiles are then cut to fit, see op_bytes). */
static uint64_t stream_window(const convd_rpc *r) {
  uint64_t w = r->cfg->max_inflight_bytes / 4;
  if (w > STREAM_WINDOW_BYTES) w = STREAM_WINDOW_BYTES;
  if (w < STREAM_WINDOW_MIN_BYTES) w = STREAM_WINDOW_MIN_BYTES;
  return w;
}

static uint64_t sat_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

/* The largest input band a streamed call takes: a quarter of its window, or one row when a row
 * is larger. A band is held whole until it is complete, so this bounds what arrives out of
 * step with the window's accounting. */
static uint64_t band_limit(const conv_call *k) {
  const convd_conv *cv = conv_of(k);
  const uint64_t row = (uint64_t)cv->p.c_in * (uint64_t)cv->p.w * cv->wire_elem;
  const uint64_t quarter = k->mem_limit / 4;
  return row > quarter ? row : quarter;
}

/* convd_job_create's admit callback, once the plan is made and before the job allocates: the
 * bytes this call may hold must fit beside the other calls' (--max-inflight-bytes), or the call
 * is refused. A unary call holds its whole tensors; a streamed one at most its window of rows
 * (what backpressure allows, plus one band being assembled and one output piece), the
 * stream's buffers (its weights and bias, per-row flags) and the job's bookkeeping. */
static int admit_job(void *user, const convd_plan *plan, uint64_t bookkeeping, char *err,
                     size_t errlen) {
  convd_call *c = user;
  conv_call *k = c->state;
  const convd_conv *cv = conv_of(k);
  const uint64_t window = stream_window(c->rpc);
  const uint64_t hint = convd_plan_memory_hint(plan);
  k->mem_limit = hint > window ? hint : window;
  k->band_limit = band_limit(k);
  uint64_t rows = (uint64_t)cv->input_bytes + (uint64_t)cv->output_bytes;
  const uint64_t stream_peak = k->mem_limit + k->band_limit + c->rpc->cfg->chunk_bytes;
  const uint64_t in_b = k->x_in_place ? 0 : (uint64_t)cv->input_bytes, out_b = k->y_in_place ? 0 : (uint64_t)cv->output_bytes;
  if (in_place(k)) /* what lies in a region is the client's memory, not the daemon's */
    rows = (in_b < stream_peak ? in_b : stream_peak) +
           (k->unary && !k->out_r.region ? out_b : out_b < stream_peak ? out_b : stream_peak);
  else if (k->unary && windowed(k) && !k->out_r.region) /* input through the window, output whole */
    rows = ((uint64_t)cv->input_bytes < stream_peak ? (uint64_t)cv->input_bytes : stream_peak) +
           (uint64_t)cv->output_bytes;
  else if (windowed(k) && rows > stream_peak)
    rows = stream_peak;
  /* The stream's buffers include the weights and bias (as they arrive, and widened). */
  const uint64_t hold = sat_add(sat_add(rows, convd_stream_buffers_bytes(k->stream)), bookkeeping);
  int rc = convd_rpc_admit_call(c, hold, err, errlen);
  if (rc == 0) k->held = hold; /* released by conv_free, whatever happens next */
  return rc;
}

static convd_job_cbs job_cbs(convd_call *c, const conv_call *k) {
  return (convd_job_cbs){.user = c, .rows_ready = on_rows_ready, .input_freed = on_input_freed,
                         .done = on_job_done, .admit = admit_job,
                         /* Tensors used in place hold no daemon memory per op: the engine's own plan. */
                         .op_bytes = windowed(k) && !(k->x_in_place && k->y_in_place) ? stream_window(c->rpc) / 2 : 0,
                         /* A windowed call holds about two tile rows whatever its window (the
                          * plan's memory hint): tile rows of at most ROW_WINDOWS windows keep
                          * that bounded for the widest rows (the seed case: 4 MiB a row). */
                         .row_bytes = windowed(k) && !(k->x_in_place && k->y_in_place) ? ROW_WINDOWS * stream_window(c->rpc) : 0};
}

/* The call's new job (it holds a ref on the call until its done()), then the stream's buffers.
 * Called with the call's mutex held. */
static int job_setup(convd_call *c, conv_call *k, convd_job *job, char *err, size_t errlen) {
  const convd_conv *cv = conv_of(k);
  k->job = job;
  convd_call_ref_locked(c);
  convd_job_set_priority(k->job, convd_stream_priority(k->stream));
  if (k->unary && !k->out_r.region) { /* written in place; set before any input can make an op ready */
    if ((k->uy = malloc(cv->output_bytes)) == NULL)
      return convd_errf(err, errlen, CONVD_ENOMEM, "the daemon cannot allocate %zu bytes now",
                        cv->output_bytes);
    convd_job_set_output(k->job, k->uy);
  } else if (k->y_in_place) {
    convd_job_set_output(k->job, k->y_in_place);
  }
  int rc = convd_stream_attach(k->stream, k->job, err, errlen);
  if (rc) return rc;
  if (!k->unary) convd_stream_set_band_limit(k->stream, k->band_limit);
  k->rows_total = (uint64_t)cv->p.n * (uint64_t)cv->h_out;
  return 0;
}

static void read_on(convd_call *c, conv_call *k);

/* ---- shared memory ----------------------------------------------------------------------- */

/* Weights and bias from their regions, fed to the stream as the chunks a client would send
 * (the stream widens, digests and hands them to the job). The offload thread, while
 * k->creating keeps every other feeder away. */
static int feed_region_weights(conv_call *k, char *err, size_t errlen) {
  enum { PIECE = 1 << 20 };
  uint8_t *buf = malloc(PIECE);
  if (buf == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "the daemon is out of memory");
  convd_stream_defer_weights(k->stream, 0); /* widened right here, off the gRPC thread */
  int rc = 0;
  const convd_shm_range *rs[2] = {&k->w_r, &k->b_r};
  for (int t = 0; t < 2 && rc == 0; t++) {
    if (rs[t]->region == NULL) continue;
    for (uint64_t off = 0; off < rs[t]->length && rc == 0; off += PIECE) {
      const size_t n = rs[t]->length - off < PIECE ? (size_t)(rs[t]->length - off) : PIECE;
      if ((rc = convd_shm_read(rs[t], off, -1, (float *)buf, n, err, errlen))) break;
      Convd__V1__TensorChunk ch = CONVD__V1__TENSOR_CHUNK__INIT;
      ch.offset = off;
      ch.data.data = buf, ch.data.len = n;
      Convd__V1__ConvRequest rq = CONVD__V1__CONV_REQUEST__INIT;
      rq.msg_case = t == 0 ? CONVD__V1__CONV_REQUEST__MSG_WEIGHT : CONVD__V1__CONV_REQUEST__MSG_BIAS;
      if (t == 0) rq.weight = &ch;
      else rq.bias = &ch;
      int accepted;
      rc = convd_stream_feed(k->stream, &rq, &accepted, err, errlen); /* counts them received */
    }
  }
  free(buf);
  return rc;
}

/* Bands each feed task copies before it queues the next, so that other calls' work on the
 * offload thread interleaves with a large input's. */
#define FEED_BANDS_PER_TASK 4

static void feed_task(void *arg);

/* Queues the feed task (the call's mutex held). */
static void start_feed(convd_call *c, conv_call *k) {
  if (k->feeding) return;
  k->feeding = 1;
  k->feed_paused = 0;
  /* A post that fails has failed the call while the flag held its status back: cleared, the
   * status goes now. The same below. */
  if (convd_rpc_offload_call(c, feed_task)) k->feeding = 0, pump(c);
}

/* The offload thread: input rows from the region into bands the job takes over, in order, a
 * band (at most the call's band limit) at a time while backpressure allows. */
static void feed_task(void *arg) {
  convd_call *c = arg;
  conv_call *k = c->state;
  const convd_conv *cv = conv_of(k);
  const convd_conv_params *p = &cv->p;
  const uint64_t row_wire = (uint64_t)p->c_in * (uint64_t)p->w * cv->wire_elem;
  char err[512];
  int rc = 0, again = 0;
  if (k->x_in_place) { /* each item lent whole, where it lies: nothing to copy or to pace */
    const size_t slab = (size_t)p->c_in * (size_t)p->h * (size_t)p->w;
    pthread_mutex_lock(&c->mu);
    const int go = !c->status_set && !c->dead;
    pthread_mutex_unlock(&c->mu);
    for (int64_t n = 0; go && n < p->n && rc == 0; n++) {
      /* Counted first: the job may end, and the summary go, before put_band returns. */
      atomic_fetch_add(&k->shm_in_bytes, (uint64_t)p->h * row_wire);
      rc = convd_job_put_band(k->job, n, 0, p->h, (float *)k->x_in_place + (size_t)n * slab, CONVD_LEND, err,
                              sizeof err);
    }
    k->feed_n = p->n;
  }
  for (int bands = 0; rc == 0; bands++) {
    pthread_mutex_lock(&c->mu);
    const int f = c->status_set || c->dead ? -1 : flow(k);
    if (f == FLOW_PAUSE) k->feed_paused = 1; /* maybe_resume queues the next task */
    if (f == FLOW_STUCK) fail_stuck(c, k);
    const int go = f == FLOW_READ && k->feed_n < p->n;
    again = go && bands == FEED_BANDS_PER_TASK;
    if (!go || again) {
      if (!again) k->feeding = 0;
      pthread_mutex_unlock(&c->mu);
      break;
    }
    pthread_mutex_unlock(&c->mu);
    int64_t rows = (int64_t)(k->band_limit / row_wire);
    if (rows < 1) rows = 1;
    const int64_t n = k->feed_n, h0 = k->feed_h, h1 = h0 + rows < p->h ? h0 + rows : p->h;
    const size_t plane = (size_t)(h1 - h0) * (size_t)p->w;
    float *band = malloc((size_t)p->c_in * plane * sizeof(float));
    if (band == NULL) {
      rc = convd_errf(err, sizeof err, CONVD_ENOMEM, "the daemon ran out of memory reading the input region");
      break;
    }
    for (int64_t ch = 0; ch < p->c_in && rc == 0; ch++) {
      const uint64_t off = (((uint64_t)n * (uint64_t)p->c_in + (uint64_t)ch) * (uint64_t)p->h + (uint64_t)h0) *
                           (uint64_t)p->w * cv->wire_elem;
      rc = convd_shm_read(&k->in_r, off, p->dtype, band + (size_t)ch * plane, plane, err, sizeof err);
    }
    if (rc) {
      free(band);
      break;
    }
    atomic_fetch_add(&k->shm_in_bytes, (uint64_t)(h1 - h0) * row_wire);
    rc = convd_job_put_band(k->job, n, h0, h1, band, CONVD_GIVE, err, sizeof err);
    k->feed_h = h1;
    if (k->feed_h == p->h) k->feed_n++, k->feed_h = 0;
  }
  pthread_mutex_lock(&c->mu);
  if (rc) {
    k->feeding = 0;
    convd_call_fail(c, rc, err);
  } else if (!again) {
    pump(c); /* a status that waited for this task */
    unary_maybe_reply(c, k);
  } else if (again && convd_offload_post(c->rpc->offload, feed_task, c) == 0) {
    pthread_mutex_unlock(&c->mu);
    return; /* the next task has this one's ref */
  } else if (again) {
    k->feeding = 0;
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

/* Output ranges a write task takes at most, for the same fairness. */
#define WRITE_RANGES_PER_TASK 8

static void write_task(void *arg);

/* Queues the write task when final rows wait and none is queued (the call's mutex held). */
static void start_write(convd_call *c, conv_call *k) {
  if (k->writing || k->ready_len == 0 || c->status_set) return;
  k->writing = 1;
  if (convd_rpc_copier_call(c, write_task)) k->writing = 0, pump(c);
}

/* Final output rows [h0, h1) of item n into the output region: each channel's rows are one
 * contiguous piece of it. Without the call's mutex: the rows stay until released. */
static int write_range(conv_call *k, const struct out_range *r, char *err, size_t errlen) {
  const convd_conv *cv = conv_of(k);
  const convd_conv_params *p = &cv->p;
  for (int64_t h = r->h0; h < r->h1; h++) {
    size_t cs;
    const float *row = convd_job_output_row(k->job, r->n, h, &cs);
    for (int64_t ch = 0; ch < p->c_out; ch++) {
      const uint64_t off = (((uint64_t)r->n * (uint64_t)p->c_out + (uint64_t)ch) * (uint64_t)cv->h_out +
                            (uint64_t)h) * (uint64_t)cv->w_out * cv->wire_elem;
      int rc = convd_shm_write(&k->out_r, off, p->dtype, row + (size_t)ch * cs, (size_t)cv->w_out, err, errlen);
      if (rc) return rc;
    }
  }
  atomic_fetch_add(&k->shm_out_bytes, (uint64_t)(r->h1 - r->h0) * (uint64_t)p->c_out * (uint64_t)cv->w_out * cv->wire_elem);
  return 0;
}

static void write_task(void *arg) {
  convd_call *c = arg;
  conv_call *k = c->state;
  struct out_range batch[WRITE_RANGES_PER_TASK];
  size_t nb = 0;
  pthread_mutex_lock(&c->mu);
  while (nb < WRITE_RANGES_PER_TASK && k->ready_len > 0 && !c->status_set) {
    batch[nb++] = k->ready[0];
    memmove(k->ready, k->ready + 1, --k->ready_len * sizeof *k->ready);
  }
  pthread_mutex_unlock(&c->mu);
  char err[512];
  int rc = 0;
  size_t done = 0;
  for (; done < nb && rc == 0; done++) rc = write_range(k, &batch[done], err, sizeof err);
  pthread_mutex_lock(&c->mu);
  for (size_t i = 0; i < nb; i++) {
    convd_job_release_rows(k->job, batch[i].n, batch[i].h0, batch[i].h1);
    if (i < done && rc == 0) k->rows_sent += (uint64_t)(batch[i].h1 - batch[i].h0);
  }
  k->writing = 0;
  if (rc) {
    convd_call_fail(c, rc, err);
  } else {
    k->progress_pending |= nb > 0;
    if (k->unary) {
      start_write(c, k);
      unary_maybe_reply(c, k);
    } else {
      pump(c); /* the progress message, the next task, or the summary */
    }
    maybe_resume(c);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

/* The offload thread: a streamed call's job. Its bookkeeping (per input row, per tile row) can
 * take as long to set up as admission allows, so not on the completion-queue thread; the call
 * reads nothing meanwhile (its ref keeps it), and nothing else touches the job or the fields
 * admit_job writes until the job is set under the mutex. */
static void create_job(void *arg) {
  convd_call *c = arg;
  conv_call *k = c->state;
  char err[1024];
  convd_job_cbs cbs = job_cbs(c, k);
  convd_job *job = NULL;
  int rc = convd_job_create(c->rpc->engine, conv_of(k), &cbs, &job, err, sizeof err);
  pthread_mutex_lock(&c->mu);
  if (rc == 0) rc = job_setup(c, k, job, err, sizeof err);
  pthread_mutex_unlock(&c->mu);
  /* Still k->creating: the completion-queue thread feeds nothing meanwhile. */
  if (rc == 0 && !c->status_set && (k->w_r.region || k->b_r.region))
    rc = feed_region_weights(k, err, sizeof err);
  pthread_mutex_lock(&c->mu);
  k->creating = 0;
  if (rc) {
    convd_call_fail(c, rc, err);
    /* A status set before the job was (a cancel, an idle timeout) stopped nothing: its done()
     * must still come, or the call and what it holds would never be freed. */
    if (k->job && !k->job_done) convd_job_cancel(k->job);
  } else if (c->status_set) {
    convd_job_cancel(k->job); /* the call ended meanwhile: its done() comes from a worker */
  } else {
    k->accepted_pending = 1;
    pump(c);
    if (k->in_r.region) start_feed(c, k);
    read_on(c, k);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

/* One message through the stream's rules; a streamed call's spec has its job made next. */
/* The call's regions go back (at its status: no copy runs or will). */
static void release_regions(convd_call *c, conv_call *k) {
  convd_shm_range *ranges[] = {&k->in_r, &k->out_r, &k->w_r, &k->b_r};
  for (int i = 0; i < 4; i++) convd_shm_release(c->rpc->shm, ranges[i]);
}

/* One range the spec names: its length must be the tensor's, and it must be the tenant's. */
static int take_range(convd_call *c, conv_call *k, const Convd__V1__RegionRef *ref, uint64_t want,
                      int writable, const char *what, convd_shm_range *out, char *err,
                      size_t errlen) {
  if (ref == NULL) return 0;
  if (c->rpc->shm == NULL)
    return convd_errf(err, errlen, CONVD_ENOTSUP,
                      "%s is set, but this daemon serves no shared memory (--max-shm-bytes 0)", what);
  if (ref->length != want)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s.length = %" PRIu64 ", but the tensor has %" PRIu64 " bytes (its shape times "
                      "the dtype's size)", what, ref->length, want);
  const char *name = ref->region ? ref->region : "";
  int same = 0; /* a range of this region held already: the call counts once in its in_use */
  const convd_shm_range *held[] = {&k->in_r, &k->out_r, &k->w_r, &k->b_r};
  for (int i = 0; i < 4; i++)
    same |= held[i]->region && held[i] != out && strcmp(convd_shm_region_name(held[i]->region), name) == 0;
  return convd_shm_acquire(c->rpc->shm, convd_call_tenant(c), name, ref->offset, ref->length, writable,
                           same, what, out, err, errlen);
}

/* After the spec was accepted: the shared-memory ranges it names, checked and held. */
static int take_regions(convd_call *c, conv_call *k, const Convd__V1__ConvSpec *sp, char *err,
                        size_t errlen) {
  const convd_conv *cv = conv_of(k);
  if (!sp->input_region && !sp->output_region && !sp->weight_region && !sp->bias_region) return 0;
  if (sp->weight_region && convd_stream_registered_weights(k->stream))
    return convd_errf(err, errlen, CONVD_EINVAL, "give spec.weights_id or spec.weight_region, not both");
  if (sp->bias_region && !cv->p.has_bias)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "spec.bias_region is set, but the call has no bias (spec.has_bias is false)");
  int rc;
  if ((rc = take_range(c, k, sp->input_region, cv->input_wire_bytes, 0, "spec.input_region", &k->in_r, err, errlen)) ||
      (rc = take_range(c, k, sp->output_region, cv->output_wire_bytes, 1, "spec.output_region", &k->out_r, err, errlen)) ||
      (rc = take_range(c, k, sp->weight_region, cv->weight_wire_bytes, 0, "spec.weight_region", &k->w_r, err, errlen)) ||
      (rc = take_range(c, k, sp->bias_region, cv->bias_wire_bytes, 0, "spec.bias_region", &k->b_r, err, errlen)))
    return rc;
  static const char *const names[] = {"spec.input_region", "spec.weight_region", "spec.bias_region"};
  const convd_shm_range *ins[] = {&k->in_r, &k->w_r, &k->b_r};
  for (int i = 0; i < 3; i++)
    if (convd_shm_overlap(&k->out_r, ins[i]))
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "spec.output_region (bytes %" PRIu64 "+%" PRIu64 ") overlaps %s (bytes %" PRIu64
                        "+%" PRIu64 ") of the same region: the output may not overwrite an input",
                        k->out_r.offset, k->out_r.length, names[i], ins[i]->offset, ins[i]->length);
  if (cv->p.dtype == CONVD_F32) {
    const float *x = convd_shm_in_place(&k->in_r);
    float *y = convd_shm_in_place(&k->out_r);
    k->x_in_place = x && (uintptr_t)x % _Alignof(float) == 0 ? x : NULL;
    k->y_in_place = y && (uintptr_t)y % _Alignof(float) == 0 ? y : NULL;
  }
  convd_stream_set_external(k->stream, (k->in_r.region ? CONVD_STREAM_EXT_INPUT : 0u) |
                                            (k->w_r.region ? CONVD_STREAM_EXT_WEIGHT : 0u) |
                                            (k->b_r.region ? CONVD_STREAM_EXT_BIAS : 0u) |
                                            (k->out_r.region ? CONVD_STREAM_EXT_OUTPUT : 0u));
  return 0;
}

/* One message through the stream's rules; a streamed call's spec has its job made next. */
static int feed(convd_call *c, conv_call *k, const Convd__V1__ConvRequest *m, char *err,
                size_t errlen) {
  int accepted = 0;
  if ((m->msg_case == CONVD__V1__CONV_REQUEST__MSG_WEIGHT && k->w_r.region) ||
      (m->msg_case == CONVD__V1__CONV_REQUEST__MSG_BIAS && k->b_r.region))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "a %s chunk arrived, but spec.%s_region is set: that tensor comes from shared "
                      "memory, so send no chunks of it",
                      m->msg_case == CONVD__V1__CONV_REQUEST__MSG_WEIGHT ? "weight" : "bias",
                      m->msg_case == CONVD__V1__CONV_REQUEST__MSG_WEIGHT ? "weight" : "bias");
  int rc = convd_stream_feed(k->stream, m, &accepted, err, errlen);
  if (rc == 0 && accepted) rc = take_regions(c, k, m->spec, err, errlen);
  if (rc == 0 && accepted && !k->unary) k->creating = 1; /* after_message posts create_job */
  return rc;
}

static conv_call *state_new(convd_call *c, int unary) {
  conv_call *k = calloc(1, sizeof *k);
  if (k == NULL) return NULL;
  c->state = k;
  k->unary = unary;
  k->stream = convd_stream_create(c->rpc->cfg->max_request_bytes, c->rpc->registry, convd_call_tenant(c));
  if (k->stream == NULL) return NULL;
  return k;
}

static void conv_stop(convd_call *c) {
  conv_call *k = c->state;
  if (k && k->job && !k->job_done) convd_job_cancel(k->job);
}

static void conv_report(const convd_call *c, convd_call_report *r) {
  const conv_call *k = c->state;
  if (k == NULL || k->stream == NULL || (k->unary && k->creating)) return;
  r->conv = conv_of(k);
  r->stats = k->job ? &k->stats : NULL;
  if (!k->unary) {
    r->bytes_in = convd_stream_bytes_received(k->stream) + atomic_load(&k->shm_in_bytes);
    r->bytes_out = k->bytes_sent + atomic_load(&k->shm_out_bytes);
  } else if (c->status_set && c->status == GRPC_STATUS_OK) {
    r->bytes_in = convd_stream_bytes_received(k->stream) + atomic_load(&k->shm_in_bytes);
    r->bytes_out = k->uy ? conv_of(k)->output_wire_bytes : atomic_load(&k->shm_out_bytes);
  }
}

static void conv_free(convd_call *c) {
  conv_call *k = c->state;
  if (k == NULL) return;
  convd_job_destroy(k->job);
  convd_stream_destroy(k->stream); /* after the job: it may have lent registered weights */
  release_regions(c, k); /* those a status did not release */
  convd_rpc_release_call(c, k->held);
  free(k->band_f32);
  free(k->ready);
  free(k->uy);
  free(k);
}

/* ---- Conv2d: output -------------------------------------------------------------------- */

static const float *job_out_row(void *ctx, int64_t n, int64_t h, size_t *cstride) {
  const conv_call *k = ctx;
  return convd_job_output_row(k->job, n, h, cstride);
}

/* Backpressure: reading more input waits while output is piling up unsent (sending needs no
 * input, so this cannot deadlock), or while the job holds more than its limit and can still
 * progress without more input. A job over its limit that cannot progress (no op ready or
 * running) waits for rows the client has not sent: in-order input never gets there (the limit
 * holds two tile rows), so the rows came out of order, and reading on would hold more than the
 * call was admitted for. */
static int flow(const conv_call *k) {
  if (k->job == NULL) return FLOW_READ;
  const uint64_t out = convd_job_output_bytes_held(k->job);
  if (out > k->mem_limit / 2) return FLOW_PAUSE;
  const uint64_t held = convd_job_bytes_held(k->job) + convd_stream_bytes_buffered(k->stream);
  if (held <= k->mem_limit) return FLOW_READ;
  /* Output on its way out frees itself; only input rows that nothing can read are stuck. */
  return held - out > k->mem_limit && convd_job_idle(k->job) ? FLOW_STUCK : FLOW_PAUSE;
}

static void fail_stuck(convd_call *c, conv_call *k) {
  char err[512];
  convd_errf(err, sizeof err, CONVD_ELIMIT,
             "input rows arrived out of order: the daemon holds %" PRIu64 " bytes of this call's "
             "rows, its limit (%" PRIu64 " bytes), and no tile can run until rows not yet sent "
             "arrive; send each batch item's rows in ascending order",
             convd_job_bytes_held(k->job), k->mem_limit);
  convd_call_fail(c, CONVD_ELIMIT, err);
}

static void maybe_resume(convd_call *c) {
  conv_call *k = c->state;
  if (k->feed_paused && !k->feeding && !k->creating && !c->status_set && !c->dead && flow(k) == FLOW_READ)
    start_feed(c, k);
  if (!k->recv_paused || k->finalizing || k->creating || c->status_set || c->dead) return;
  const int f = flow(k);
  if (f == FLOW_PAUSE) return;
  if (f == FLOW_STUCK) {
    fail_stuck(c, k);
    return;
  }
  k->recv_paused = 0;
  convd_call_recv(c);
}

/* Starts sending the next piece of output, if any row is final. Returns 1 when a send was
 * started. */
static int next_output_piece(convd_call *c, conv_call *k) {
  const convd_conv *cv = conv_of(k);
  /* Pieces are whole elements of the wire's dtype; the rows are float32. */
  const size_t chunk = c->rpc->cfg->chunk_bytes & ~(size_t)3;
  convd_band_shape shape = {cv->p.n, cv->p.c_out, cv->h_out, cv->w_out, cv->wire_elem};
  const convd_band_shape rows_f32 = {cv->p.n, cv->p.c_out, cv->h_out, cv->w_out, sizeof(float)};
  if (!k->band_active) {
    if (k->ready_len == 0) return 0;
    struct out_range *r = &k->ready[0];
    /* A band: as many final rows as fit one chunk (at least one). */
    size_t row_bytes = convd_band_bytes(&shape, 0, 1);
    int64_t rows = row_bytes >= chunk ? 1 : (int64_t)(chunk / row_bytes);
    k->band_n = r->n;
    k->band_h0 = r->h0;
    k->band_h1 = r->h0 + rows < r->h1 ? r->h0 + rows : r->h1;
    r->h0 = k->band_h1;
    if (r->h0 == r->h1) memmove(k->ready, k->ready + 1, --k->ready_len * sizeof *k->ready);
    /* The iterator walks the pieces of this one band. */
    convd_band_shape one = {1, cv->p.c_out, k->band_h1 - k->band_h0, cv->w_out, cv->wire_elem};
    convd_band_iter_init(&k->it, &one, chunk);
    k->it.rows_per_band = k->band_h1 - k->band_h0;
    k->band_active = 1;
  }
  if (!convd_band_iter_next(&k->it)) { /* cannot happen: a band has at least one piece */
    k->band_active = 0;
    return 0;
  }
  /* The message is built around its data: the rows are gathered straight into it. */
  uint8_t *data, *msg;
  size_t total;
  msg = convd_wire_band_message(CONVD_WIRE_RESPONSE_OUTPUT, k->band_n, k->band_h0, k->band_h1,
                                k->it.off, k->it.len, &data, &total);
  if (msg == NULL || (cv->p.dtype != CONVD_F32 && k->band_f32 == NULL &&
                      (k->band_f32 = malloc(chunk * 2)) == NULL)) {
    free(msg);
    convd_call_set_status(c, CONVD_ENOMEM, "the daemon ran out of memory sending the output");
    return 0;
  }
  if (cv->p.dtype == CONVD_F32) {
    convd_band_gather_rows(&shape, k->band_n, k->band_h0, k->band_h1, k->it.off, data, k->it.len,
                           job_out_row, k);
  } else {
    const size_t e0 = k->it.off / cv->wire_elem, ne = k->it.len / cv->wire_elem;
    convd_band_gather_rows(&rows_f32, k->band_n, k->band_h0, k->band_h1, e0 * sizeof(float),
                           k->band_f32, ne * sizeof(float), job_out_row, k);
    convd_dtype_encode(cv->p.dtype, k->band_f32, data, ne);
  }
  k->bytes_sent += k->it.len;
  int last = k->it.off + k->it.len == k->it.band_len;
  grpc_byte_buffer *bb = convd_wire_take(msg, total);
  if (bb == NULL) {
    convd_call_set_status(c, CONVD_ENOMEM, "the daemon ran out of memory sending the output");
    return 0;
  }
  convd_call_send_buffer(c, bb); /* the rows may go: the message holds its own copy */
  if (last) {
    convd_job_release_rows(k->job, k->band_n, k->band_h0, k->band_h1);
    k->rows_sent += (uint64_t)(k->band_h1 - k->band_h0);
    k->band_active = 0;
    maybe_resume(c);
  }
  return 1;
}

/* Starts the next response, if one is due and none is in flight. Conv2d's order: accepted,
 * output bands, summary, status; an error status goes at once. Conv2dUnary's answer is sent by
 * on_job_done. */
static void pump(convd_call *c) {
  conv_call *k = c->state;
  if (c->sending || convd_call_over(c)) return;
  if (c->status_set && c->status != GRPC_STATUS_OK) {
    /* A region's copies end first (their task's end comes back here), so that once the client
     * has the status, its regions are free again. */
    if (k && (k->feeding || k->writing || k->creating)) return;
    /* Tensors in place: the job's running ops may still touch them (on_job_done comes back). */
    if (k && in_place(k) && k->job && !k->job_done) return;
    if (k) release_regions(c, k);
    convd_call_send_final(c, NULL);
    return;
  }
  if (k == NULL || k->unary) return;
  Convd__V1__ConvResponse resp = CONVD__V1__CONV_RESPONSE__INIT;
  Convd__V1__Accepted acc = CONVD__V1__ACCEPTED__INIT;
  Convd__V1__Shape4 shape;
  Convd__V1__Summary sum;
  Convd__V1__Progress prog = CONVD__V1__PROGRESS__INIT;
  if (k->accepted_pending) {
    shape = output_shape(conv_of(k));
    acc.output_shape = &shape;
    acc.elemental_ops = convd_job_plan(k->job)->ops;
    acc.chunk_bytes = c->rpc->cfg->chunk_bytes;
    resp.msg_case = CONVD__V1__CONV_RESPONSE__MSG_ACCEPTED;
    resp.accepted = &acc;
    k->accepted_pending = 0;
  } else if (k->out_r.region && k->progress_pending) {
    prog.rows_done = k->rows_sent;
    prog.rows_total = k->rows_total;
    resp.msg_case = CONVD__V1__CONV_RESPONSE__MSG_PROGRESS;
    resp.progress = &prog;
    k->progress_pending = 0;
    start_write(c, k);
  } else if (k->out_r.region ? (start_write(c, k), 0) : next_output_piece(c, k)) {
    return; /* a piece went out */
  } else if (!k->job_done || k->rows_sent < k->rows_total) {
    return; /* more rows are to come */
  } else if (k->in_r.region && !c->recv_done) {
    return; /* the input came from a region: the stream must still end cleanly (conv2d_recv) */
  } else if (!k->summary_sent) {
    sum = summary_of(c, k, k->bytes_sent);
    resp.msg_case = CONVD__V1__CONV_RESPONSE__MSG_SUMMARY;
    resp.summary = &sum;
    k->summary_sent = 1;
  } else {
    release_regions(c, k);
    convd_call_finish_ok(c);
    return;
  }
  convd_call_send(c, &resp.base);
}

/* ---- Conv2d: input --------------------------------------------------------------------- */

static void conv2d_start(convd_call *c) {
  conv_call *k = state_new(c, 0);
  if (k == NULL) {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  convd_stream_defer_weights(k->stream, 1);
  if (convd_call_send_initial_metadata(c) == 0) convd_call_recv(c);
}

static void wire_copy(const void *ctx, size_t off, void *dst, size_t n) {
  convd_wire_band_copy(ctx, off, dst, n);
}

/* The offload thread: the call's weights are whole; widening and hashing them grow with them,
 * so they run here, while the call reads nothing (its ref keeps it). */
static void finalize_weights(void *arg) {
  convd_call *c = arg;
  conv_call *k = c->state;
  char err[512];
  int rc = convd_stream_finalize_weights(k->stream, err, sizeof err);
  pthread_mutex_lock(&c->mu);
  k->finalizing = 0;
  if (rc) convd_call_fail(c, rc, err);
  else if (!c->status_set) {
    convd_stream_hand_weights(k->stream);
    read_on(c, k);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

/* After a message was applied (rc): fail, send `accepted`, or read the next one unless
 * backpressure says wait (or the weights are being finalized). */
static void after_message(convd_call *c, conv_call *k, int rc, const char *err) {
  if (rc) convd_call_fail(c, rc, err);
  else if (k->accepted_pending) pump(c);
  if (rc || c->status_set) return;
  if (k->creating) {
    if (convd_rpc_offload_call(c, create_job)) k->creating = 0, pump(c);
  } else if (convd_stream_weights_pending(k->stream)) {
    k->finalizing = convd_rpc_offload_call(c, finalize_weights) == 0;
  } else {
    read_on(c, k);
  }
}

static void read_on(convd_call *c, conv_call *k) {
  const int f = flow(k);
  if (f == FLOW_STUCK) fail_stuck(c, k);
  else if (f == FLOW_PAUSE) k->recv_paused = 1; /* the next read waits until the job frees or sends rows */
  else convd_call_recv(c);
}

static void conv2d_recv(convd_call *c, grpc_byte_buffer *bb) {
  conv_call *k = c->state;
  char err[1024];
  int rc;
  if (bb == NULL) { /* half-close: all input is here (the job runs on), or it is wrong */
    if ((rc = convd_stream_finish(k->stream, err, sizeof err))) convd_call_fail(c, rc, err);
    else if (k->in_r.region) pump(c); /* the summary may have waited for this */
    return;
  }
  convd_wire_band wb;
  if (convd_wire_parse_band(bb, CONVD_WIRE_REQUEST_INPUT, &wb)) { /* the common message, read where it lies */
    const convd_stream_band band = {wb.n, wb.h_begin, wb.h_end, wb.offset,
                                    {NULL, wb.data_len, wire_copy, &wb}};
    rc = convd_stream_feed_band(k->stream, &band, err, sizeof err);
    after_message(c, k, rc, err);
    return;
  }
  Convd__V1__ConvRequest *m =
      (Convd__V1__ConvRequest *)convd_wire_unpack(bb, &convd__v1__conv_request__descriptor);
  if (m == NULL) {
    snprintf(err, sizeof err,
             "message %" PRIu64 " of the stream is not a valid convd.v1.ConvRequest "
             "(protobuf decoding failed)",
             c->messages_in);
    convd_call_fail(c, CONVD_EINVAL, err);
    return;
  }
  rc = feed(c, k, m, err, sizeof err);
  protobuf_c_message_free_unpacked(&m->base, NULL);
  after_message(c, k, rc, err);
}

/* ---- Conv2dUnary ----------------------------------------------------------------------- */

/* A Conv2dUnary message decoded, its spec fed, what only a one-message call must satisfy
 * checked (conv_stream.c: convd_stream_check_call) and its job made. Touches only k and the
 * admission counters, so it runs without the call's mutex where k->creating keeps others off. */
static int unary_prepare(convd_call *c, conv_call *k, Convd__V1__ConvCall **mp, convd_job **job,
                         char *err, size_t errlen) {
  Convd__V1__ConvCall *m =
      c->payload ? (Convd__V1__ConvCall *)convd_wire_unpack(c->payload, &convd__v1__conv_call__descriptor)
                 : NULL;
  *mp = m;
  if (m == NULL)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "the request is not a valid convd.v1.ConvCall (protobuf decoding failed)");
  if (m->spec == NULL) return convd_errf(err, errlen, CONVD_EINVAL, "ConvCall.spec is missing");
  Convd__V1__ConvRequest rq = CONVD__V1__CONV_REQUEST__INIT;
  rq.msg_case = CONVD__V1__CONV_REQUEST__MSG_SPEC;
  rq.spec = m->spec;
  int rc = feed(c, k, &rq, err, errlen);
  if (rc == 0) rc = convd_stream_check_call(k->stream, m, c->rpc->cfg->max_message_bytes, err, errlen);
  if (rc) return rc;
  convd_job_cbs cbs = job_cbs(c, k);
  return convd_job_create(c->rpc->engine, conv_of(k), &cbs, job, err, errlen);
}

/* Small messages are served at once, on the completion-queue thread: their work is bounded by
 * UNARY_INLINE_BYTES, and a hop to the offload thread would cost the latency that small calls
 * are sent as one message for. */
static void unary_run_job(convd_call *c, conv_call *k, Convd__V1__ConvCall *m, convd_job *job,
                          int rc, char *err, size_t errlen);

/* The offload thread: a small Conv2dUnary message whose tensors lie (partly) in regions. */
static void unary_regions_task(void *arg) {
  convd_call *c = arg;
  conv_call *k = c->state;
  char err[1024];
  unary_run_job(c, k, k->pend_m, k->pend_job, 0, err, sizeof err);
  k->pend_m = NULL, k->pend_job = NULL;
  convd_call_unref(c);
}

static void unary_inline(convd_call *c, conv_call *k) {
  char err[1024];
  Convd__V1__ConvCall *m = NULL;
  convd_job *job = NULL;
  int rc = unary_prepare(c, k, &m, &job, err, sizeof err);
  if (rc == 0 && (k->in_r.region || k->out_r.region || k->w_r.region || k->b_r.region)) {
    /* Its tensors in regions need not fit a message: copied on the offload thread. */
    k->pend_m = m, k->pend_job = job;
    if (convd_rpc_offload_call(c, unary_regions_task) == 0) return;
    k->pend_m = NULL, k->pend_job = NULL;
    convd_job_destroy(job); /* never started: no callback comes */
    protobuf_c_message_free_unpacked(&m->base, NULL);
    k->creating = 0;
    pump(c);
    return;
  }
  k->creating = 0;
  if (rc == 0) rc = job_setup(c, k, job, err, sizeof err);
  if (rc == 0) rc = convd_stream_feed_call(k->stream, m, err, sizeof err);
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) convd_call_fail(c, rc, err);
}

/* The offload thread, without the call's mutex: the job set up, then weights and bias from
 * their regions, the message's tensors and the input region's feed (backpressured, feed_task).
 * Until the job is set, k->creating keeps conv_report off k; afterwards only the engine's own
 * locked calls meet this thread (a cancellation's convd_job_cancel, the workers' callbacks). */
static void unary_run_job(convd_call *c, conv_call *k, Convd__V1__ConvCall *m, convd_job *job,
                          int rc, char *err, size_t errlen) {
  pthread_mutex_lock(&c->mu);
  k->creating = 0;
  if (rc == 0) rc = job_setup(c, k, job, err, errlen);
  const int go = rc == 0 && !c->status_set && !c->dead;
  if (rc == 0 && !go) convd_job_cancel(k->job); /* ended meanwhile: done() comes from a worker */
  pthread_mutex_unlock(&c->mu);
  if (go && (k->w_r.region || k->b_r.region)) rc = feed_region_weights(k, err, errlen);
  if (go && rc == 0) rc = convd_stream_feed_call(k->stream, m, err, errlen);
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  pthread_mutex_lock(&c->mu);
  if (rc) {
    convd_call_fail(c, rc, err);
    if (k->job && !k->job_done) convd_job_cancel(k->job); /* as in create_job */
  } else if (go && k->in_r.region && !c->status_set) {
    start_feed(c, k);
  }
  pthread_mutex_unlock(&c->mu);
}

/* The offload thread: a large message. Decoding, the job and feeding its tensors (copies and
 * widening of up to --max-message-bytes) run without the call's mutex, which the completion-
 * queue thread and the idle check take (one call holding it would stall every call). */
static void unary_offloaded(void *arg) {
  convd_call *c = arg;
  conv_call *k = c->state;
  char err[1024];
  Convd__V1__ConvCall *m = NULL;
  convd_job *job = NULL;
  int rc = unary_prepare(c, k, &m, &job, err, sizeof err);
  unary_run_job(c, k, m, job, rc, err, sizeof err);
  convd_call_unref(c);
}

static void unary_start(convd_call *c) {
  conv_call *k = state_new(c, 1);
  if (k == NULL) {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  k->creating = 1;
  if (c->payload && grpc_byte_buffer_length(c->payload) > UNARY_INLINE_BYTES) {
    if (convd_rpc_offload_call(c, unary_offloaded)) k->creating = 0, pump(c);
  } else
    unary_inline(c, k);
}

const convd_handlers convd_conv2d_handlers = {.start = conv2d_start,
                                              .recv = conv2d_recv,
                                              .sent = pump,
                                              .pump = pump,
                                              .stop = conv_stop,
                                              .report = conv_report,
                                              .free_state = conv_free};
const convd_handlers convd_conv2d_unary_handlers = {.start = unary_start,
                                                    .pump = pump,
                                                    .stop = conv_stop,
                                                    .report = conv_report,
                                                    .free_state = conv_free};
