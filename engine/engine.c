/* The scheduler (engine.h): jobs, the ops they make ready, and one worker thread per device
 * that takes them.
 *
 * Threads: callers (in the daemon, the gRPC completion-queue thread) create jobs, hand in
 * weights and input bands, take and release output rows, cancel and destroy jobs. Each device's
 * worker (worker_main) picks an op under e->mu, runs it on its device with no lock held, books it
 * under e->mu, and then, unlocked, delivers the callbacks that follow.
 *
 * Locks:
 *   e->mu   the job list (e->jobs, e->rr) and admission counts (pending_ops, njobs,
 *           next_job_id); busy, skipping, stopping; each slot's health and measurements
 *           (healthy, why, sec_per_mac, measured_macs, measured, last_op_at, completed_ops,
 *           busy_seconds), ops_completed; and in every job
 *           its queues (ready, retry), input rows (row_band, in_refs, in_seen, missing, queued),
 *           output bands (out, tile_left, y_target), counts (running, ops_done), state
 *           (cancelled, failed, fail_msg, priority, w, b, w_key), callback counts, bytes held and
 *           stats. e->cv wakes the workers when work, health or stopping changes.
 *   j->acc_mu  partial sums added into a job's output tiles (tile_written and those tiles).
 *   j->seg_mu  a transpose's segregated weights, made once (wseg, wseg_own, wseg_cached).
 *   e->segs    has its own lock (segcache.c), taken with j->seg_mu held; no other engine lock
 *              is taken while one is held. Callers may hold their own locks into engine calls
 *              (convd_engine_run does); job callbacks run with no engine lock held
 *              (device_failed, under e->mu, must not call the engine).
 * Without a lock: the plan and runs_on (fixed at creation), j->stop (atomic), and what a
 * running op reads (its rows, held by in_refs; its output band, made under e->mu before it ran;
 * its slot's scratch buffers, the worker's own). */
#include "engine.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "cuda_device.h"
#include "err.h"
#include "segcache.h"

/* A device's measured speed holds for a job whose ops are at most this many times larger than
 * the ops it was measured on (worth_taking). */
#define MEASURE_SCALE 16.0
/* A device that sat out this many ops while a job had at least PROBE_READY ops per device
 * ready takes one, whatever its measured speed (worth_taking). */
#define PROBE_OPS 32
#define PROBE_READY 4

/* A plan with more ops than this is refused: its bookkeeping would dwarf the work. */
#define MAX_PLAN_OPS (UINT64_C(1) << 22)

typedef struct range {
  uint64_t begin, end;
} range;

typedef struct dev_slot {
  convd_engine *e;
  unsigned index;
  convd_device *dev;
  pthread_t thread;
  int started;
  int healthy;
  int flushed; /* its weight cache was dropped once it left service */
  char why[256];
  uint64_t completed_ops;
  double busy_seconds;
  double sec_per_mac; /* measured speed (moving average), once measured */
  double measured_macs; /* the size of the ops it was measured on (moving average) */
  uint64_t last_op_at;  /* e->ops_completed when it last finished an op */
  int measured;
  float *win, *wblk, *partial; /* scratch, grown on demand */
  size_t win_cap, wblk_cap, partial_cap;
} dev_slot;

/* Input rows arrive in bands (C x rows x W, the wire's layout) and stay where they arrived: a
 * band is freed once no op reads any of its rows. */
typedef struct in_band {
  float *p;
  int64_t h0, h1;
  uint32_t live; /* rows some op still reads */
  int owned;     /* freed by the job (CONVD_GIVE) or lent by the caller (CONVD_LEND) */
} in_band;

/* The output rows of one tile row, C_out x rows x W_out with channel stride cs: the job's own
 * buffer, or where those rows lie in the caller's output tensor (convd_job_set_output). Ops
 * with a single input-channel block write their tile straight into it. */
typedef struct out_band {
  float *p;
  size_t cs;
  uint32_t unreleased; /* rows not yet released */
  int owned;
} out_band;

struct convd_job {
  convd_engine *e;
  uint64_t id;
  convd_plan plan;
  convd_job_cbs cb;
  convd_job *next, *prev; /* in e->jobs */
  /* input */
  float *w, *b;
  int w_owned;
  /* A transpose's segregated weights: made by the first worker that needs them (never on the
   * caller's thread), or found in the engine's cache when the weights' content key matches. */
  const float *wseg;
  int wseg_own;           /* wseg is the job's to free (else a cache entry's) */
  int wseg_cached;        /* the job holds a reference on wseg in e->segs */
  pthread_mutex_t seg_mu;
  uint64_t w_key;         /* the weights' content key, 0 = unknown */
  int priority;
  uint8_t *runs_on; /* per device: its supports() said yes to this job's conv */
  int counted; /* in e->pending_ops and e->njobs */
  double t_first_ready; /* 0 until an op was first queued */
  int started;          /* a device has started one of its ops */
  in_band **row_band;     /* per input row (N*H): its band, NULL until arrived or once read */
  uint32_t *in_refs;      /* ops still to read each row */
  uint8_t *in_seen;
  int32_t *missing;       /* per (n, tile row): window rows not yet arrived */
  uint8_t *queued;        /* per (n, tile row): its ops were made ready */
  /* output */
  out_band *out;          /* per (n, tile row) */
  float *y_target;        /* the caller's whole output tensor, or NULL */
  uint32_t *tile_left;    /* per (n, tile row): ops not yet done */
  uint8_t *tile_written;  /* per output tile, with several input-channel blocks: the first
                             block's partial was stored (later ones add) */
  pthread_mutex_t acc_mu; /* partial sums into out (tile_written) */
  /* ops */
  range *ready;           /* FIFO of ready op ranges */
  size_t ready_head, ready_len, ready_cap;
  uint64_t ready_ops;     /* ops in ready and retry */
  double macs_per_op;
  uint64_t *retry;        /* ops to run again after a device failed */
  size_t retry_len, retry_cap;
  uint64_t ops_done;
  int running;
  int cancelled, failed;
  atomic_int stop; /* cancelled or failed, for devices to poll without the lock */
  char fail_msg[256];
  /* callbacks */
  int cb_inflight, done_delivered;
  uint64_t bytes_held, out_bytes_held;
  convd_job_stats stats;
};

struct convd_engine {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int stopping;
  int busy;     /* devices running an op */
  int skipping; /* devices waiting although work is ready (worth_taking said no) */
  dev_slot *devs;
  int ndev;
  uint64_t device_memory;
  uint64_t op_memory; /* planning cap, 0 = none */
  uint64_t max_pending_ops, pending_ops; /* admission */
  uint64_t row_bytes;                    /* jobs' tile-row bound by default (opts.row_bytes) */
  uint64_t njobs;
  uint64_t ops_completed; /* by every device, over the engine's life */
  /* Segregated transpose weights of recent jobs, by content key and geometry: repeated calls
   * with the same weights skip the pass. */
  convd_segcache *segs;
  void (*device_failed)(void *user, unsigned index, const char *name, const char *why);
  void *user;
  convd_job *jobs, *rr; /* all jobs; the round-robin cursor */
  uint64_t next_job_id;
};

static int grow(float **buf, size_t *cap, size_t elems) {
  if (elems <= *cap) return 0;
  float *p = realloc(*buf, elems * sizeof(float));
  if (p == NULL) return -1;
  *buf = p;
  *cap = elems;
  return 0;
}

/* ---- job bookkeeping (e->mu held) ------------------------------------------------------ */

static int64_t tiles_h(const convd_job *j) { return j->plan.tiles_h; }

static uint64_t ops_per_tile_row(const convd_job *j) {
  return j->plan.ops / (uint64_t)(j->plan.conv.p.n * j->plan.tiles_h);
}

static int push_ready(convd_job *j, uint64_t begin, uint64_t end) {
  if (j->ready_head + j->ready_len == j->ready_cap) {
    if (j->ready_head > 0) {
      memmove(j->ready, j->ready + j->ready_head, j->ready_len * sizeof *j->ready);
      j->ready_head = 0;
    } else {
      size_t cap = j->ready_cap ? j->ready_cap * 2 : 16;
      range *r = realloc(j->ready, cap * sizeof *r);
      if (r == NULL) return -1;
      j->ready = r;
      j->ready_cap = cap;
    }
  }
  j->ready[j->ready_head + j->ready_len++] = (range){begin, end};
  j->ready_ops += end - begin;
  return 0;
}

/* Makes the ops of (n, th) ready when weights and all window rows are in. */
static void maybe_queue(convd_job *j, int64_t n, int64_t th) {
  size_t k = (size_t)(n * tiles_h(j) + th);
  if (j->queued[k] || j->missing[k] > 0 || j->w == NULL || j->cancelled || j->failed) return;
  j->queued[k] = 1;
  if (j->t_first_ready == 0) j->t_first_ready = convd_now_seconds();
  uint64_t per = ops_per_tile_row(j);
  if (push_ready(j, (uint64_t)k * per, (uint64_t)(k + 1) * per)) {
    j->failed = 1;
    snprintf(j->fail_msg, sizeof j->fail_msg, "out of memory queueing ops");
  }
}

static int job_has_work(const convd_job *j) {
  return !j->cancelled && !j->failed && (j->ready_len > 0 || j->retry_len > 0);
}

/* The job is over when no op runs and either all ops are done or it stopped. */
static int job_finished(const convd_job *j) {
  return j->running == 0 && (j->ops_done == j->plan.ops || j->cancelled || j->failed);
}

/* ---- events (collected under e->mu, delivered after unlocking) ------------------------- */

typedef struct event {
  convd_job *job;
  int kind; /* 0 rows_ready, 1 input_freed, 2 done */
  int64_t n, h0, h1;
} event;

typedef struct events {
  event ev[8];
  int n;
} events;

static void add_event(events *es, convd_job *j, int kind, int64_t n, int64_t h0, int64_t h1) {
  if (kind == 1 && j->cb.input_freed == NULL) return;
  j->cb_inflight++;
  es->ev[es->n++] = (event){j, kind, n, h0, h1};
}

/* done() goes out once the job finished and no other callback of it is in flight. */
static void maybe_done(convd_job *j, events *es) {
  if (j->done_delivered || !job_finished(j) || j->cb_inflight > 0) return;
  j->done_delivered = 1;
  add_event(es, j, 2, 0, 0, 0);
}

static void deliver(convd_engine *e, events *es) {
  for (int i = 0; i < es->n; i++) {
    event *ev = &es->ev[i];
    convd_job *j = ev->job;
    if (ev->kind == 0) {
      j->cb.rows_ready(j->cb.user, ev->n, ev->h0, ev->h1);
    } else if (ev->kind == 1) {
      j->cb.input_freed(j->cb.user);
    } else {
      int status = j->ops_done == j->plan.ops && !j->cancelled && !j->failed ? 0
                   : j->failed                                            ? CONVD_EDEVICE
                                                                          : CONVD_ECANCELED;
      const char *msg = status == 0 ? "" : j->failed ? j->fail_msg : "the job was cancelled";
      convd_job_stats st = j->stats;
      j->cb.done(j->cb.user, status, msg, &st);
      continue; /* the job may be gone now */
    }
    pthread_mutex_lock(&e->mu);
    j->cb_inflight--;
    events more = {.n = 0};
    maybe_done(j, &more);
    pthread_mutex_unlock(&e->mu);
    if (more.n) deliver(e, &more);
  }
  es->n = 0;
}

/* ---- scheduling ------------------------------------------------------------------------ */

/* Whether job j has ops that slot s may take: its device supports the job's conv. */
static int has_work_for(const convd_job *j, const dev_slot *s) {
  return j->runs_on[s->index] && job_has_work(j);
}

/* Whether slot s should take one of job j's ops. A slow device beside fast ones must not make a
 * job finish later: it takes an op only if it would finish it no later than the other devices
 * that can run j, at their measured speeds, would finish all the ready work including that op.
 * Devices not measured yet take ops (that is how they get measured). e->mu held. */
static int worth_taking(const convd_engine *e, const dev_slot *s, const convd_job *j) {
  /* A speed measured on ops far smaller than this job's says little about them: there a fixed
   * cost per op (a remote device's round trip, a GPU's launch) dominates, and a device judged
   * slow on it would never take an op again to be measured anew. It takes one. */
  if (!s->measured || j->macs_per_op > MEASURE_SCALE * s->measured_macs) return 1;
  /* A measurement can also be wrong (an op stretched by a busy host, or latency-bound on a
   * remote device) or go stale, and a device judged slow would never run again to correct it:
   * with plenty of ready work, a device that sat out PROBE_OPS ops takes one and is measured. */
  if (j->ready_ops >= PROBE_READY * (uint64_t)e->ndev && e->ops_completed - s->last_op_at >= PROBE_OPS)
    return 1;
  double others = 0, fastest = 0; /* MACs per second of the other healthy, measured devices */
  for (int i = 0; i < e->ndev; i++) {
    const dev_slot *d = &e->devs[i];
    if (d != s && d->healthy && d->measured && d->sec_per_mac > 0 && j->runs_on[i]) {
      others += 1.0 / d->sec_per_mac;
      if (1.0 / d->sec_per_mac > fastest) fastest = 1.0 / d->sec_per_mac;
    }
  }
  if (others == 0) return 1;
  double ready = 0; /* MACs of every ready op, this one included */
  for (const convd_job *x = e->jobs; x; x = x->next)
    if (!x->cancelled && !x->failed) ready += (double)x->ready_ops * x->macs_per_op;
  /* The others need at least their share of all ready work, and at least one op's time on the
   * fastest of them (an op is not split): the fastest device therefore always takes work. */
  const double others_done = ready / others > j->macs_per_op / fastest ? ready / others
                                                                       : j->macs_per_op / fastest;
  return s->sec_per_mac * j->macs_per_op <= others_done;
}

/* Takes the next op for slot s, round-robin over the jobs its device supports. e->mu held. */
static convd_job *pick(convd_engine *e, const dev_slot *s, uint64_t *op) {
  if (e->jobs == NULL) return NULL;
  /* The highest priority that has work for s; jobs below it wait. */
  int top = 0, any = 0;
  for (convd_job *x = e->jobs; x; x = x->next)
    if (has_work_for(x, s) && (!any || x->priority > top)) top = x->priority, any = 1;
  if (!any) return NULL;
  convd_job *start = e->rr ? e->rr : e->jobs;
  convd_job *j = start;
  do {
    if (j->priority == top && has_work_for(j, s) && worth_taking(e, s, j)) {
      if (j->retry_len > 0) {
        *op = j->retry[--j->retry_len];
      } else {
        range *r = &j->ready[j->ready_head];
        *op = r->begin++;
        if (r->begin == r->end) {
          j->ready_head++;
          j->ready_len--;
        }
      }
      j->ready_ops--;
      j->running++;
      if (!j->started) {
        j->started = 1;
        j->stats.queue_seconds = convd_now_seconds() - j->t_first_ready;
      }
      e->rr = j->next ? j->next : e->jobs;
      return j;
    }
    j = j->next ? j->next : e->jobs;
  } while (j != start);
  return NULL;
}

/* Row h of batch item n where it lies in its band (the op reading it holds a reference). */
static const float *in_row(void *ctx, int64_t n, int64_t h, size_t *cstride) {
  convd_job *j = ctx;
  const in_band *b = j->row_band[(size_t)n * (size_t)j->plan.conv.p.h + (size_t)h];
  *cstride = (size_t)(b->h1 - b->h0) * (size_t)j->plan.conv.p.w;
  return b->p + (size_t)(h - b->h0) * (size_t)j->plan.conv.p.w;
}

static void free_in_band(convd_job *j, in_band *b) {
  if (b->owned) {
    free(b->p);
    j->bytes_held -= (uint64_t)(b->h1 - b->h0) * (uint64_t)j->plan.conv.p.c_in *
                     (uint64_t)j->plan.conv.p.w * sizeof(float);
  }
  free(b);
}

/* Drops the op's hold on its input rows; frees bands nobody needs. e->mu held. */
static int release_window(convd_job *j, const convd_plan_op *op) {
  int freed = 0;
  for (int64_t h = op->ih0; h < op->ih1; h++) {
    size_t k = (size_t)op->n * (size_t)j->plan.conv.p.h + (size_t)h;
    if (--j->in_refs[k] == 0 && j->row_band[k]) {
      in_band *b = j->row_band[k];
      j->row_band[k] = NULL;
      if (--b->live == 0) {
        freed |= b->owned;
        free_in_band(j, b);
      }
    }
  }
  return freed;
}

static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* The job's segregated transpose weights, made once (by the first worker to need them) or taken
 * from the engine's cache. Outside e->mu. Returns 0 or CONVD_ENOMEM. */
static int ensure_segregated(convd_engine *e, convd_job *j, char *err, size_t errlen) {
  pthread_mutex_lock(&j->seg_mu);
  if (j->wseg) {
    pthread_mutex_unlock(&j->seg_mu);
    return 0;
  }
  const convd_conv_params *p = &j->plan.conv.p;
  /* the content key, and the geometry the phase blocks depend on */
  uint64_t key = 0;
  if (j->w_key) {
    key = mix64(j->w_key ^ 0x5e9a7e);
    const int64_t g[] = {p->c_out, p->c_per_group, p->kh, p->kw, p->stride_h, p->stride_w,
                         p->dil_h, p->dil_w, p->groups};
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) key = mix64(key ^ (uint64_t)g[i]);
    key |= 1;
    if ((j->wseg = convd_segcache_acquire(e->segs, key)) != NULL) j->wseg_cached = 1;
  }
  int rc = 0;
  if (j->wseg == NULL) {
    const size_t bytes = j->plan.conv.weight_bytes;
    float *w = malloc(bytes);
    if (w == NULL || convd_plan_segregate(&j->plan, j->w, w)) {
      free(w);
      rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory segregating a transpose's weights");
    } else {
      j->wseg = w;
      /* kept for later jobs with the same weights when the cache takes it */
      if (key && convd_segcache_insert(e->segs, key, w, bytes)) j->wseg_cached = 1;
      else j->wseg_own = 1;
    }
  }
  pthread_mutex_unlock(&j->seg_mu);
  return rc;
}

/* Runs op on the slot's device, outside e->mu. Returns 0 or an error (device failure). In a
 * chain (chain_len > 1, devices that accumulate) the device sums the tile's input-channel
 * blocks itself and writes the tile at the last one. */
static int run_op(dev_slot *s, convd_job *j, const convd_plan_op *op, int chain_pos, int chain_len,
                  char *err, size_t errlen) {
  convd_engine *e = s->e;
  const convd_plan *pl = &j->plan;
  const convd_conv_params *p = &pl->conv.p;
  const int64_t oc = op->oc1 - op->oc0;
  /* What the op computes: its output tile, or for a transpose its phase rows and columns. */
  const int64_t th = pl->transposed ? op->qh1 - op->qh0 : op->oh1 - op->oh0;
  const int64_t tw = pl->transposed ? op->qw1 - op->qw0 : op->ow1 - op->ow0;
  /* Where the op's tile lies in its tile row's output band. */
  const out_band *ob = &j->out[(size_t)(op->n * pl->tiles_h + op->trow)];
  int64_t band0, band1;
  convd_plan_tile_rows(pl, op->trow, &band0, &band1);
  const size_t W_out = (size_t)pl->conv.w_out;
  convd_view tile = {ob->p + (size_t)op->oc0 * ob->cs + (size_t)(op->oh0 - band0) * W_out +
                         (size_t)op->ow0,
                     (size_t)oc * ob->cs, ob->cs, W_out};
  /* With one input-channel block, or in a chain, the op writes the tile itself; otherwise each
   * block's partial sum is added in under acc_mu. A transpose's phase always goes through the
   * partial: it lands interleaved with the other phases. */
  const int direct = !pl->transposed && (pl->icblocks == 1 || chain_len > 1);
  convd_view y = tile;
  if (!direct) {
    if (grow(&s->partial, &s->partial_cap, (size_t)(oc * th * tw)))
      return convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory for an op's output");
    y = convd_view_dense(s->partial, oc, th, tw);
  }
  int rc = 0;
  if (!op->empty && pl->transposed && (rc = ensure_segregated(e, j, err, errlen))) return rc;
  if (op->empty) {
    convd_plan_fill_empty(pl, op, j->b, y);
  } else {
    const convd_conv_params *lp = &op->local.p;
    /* The input window: in place when one band holds all its rows, else gathered. */
    const size_t W = (size_t)p->w, row0 = (size_t)op->n * (size_t)p->h;
    const in_band *b0 = j->row_band[row0 + (size_t)op->xh0];
    convd_view x;
    if (b0 == j->row_band[row0 + (size_t)(op->xh1 - 1)]) {
      const size_t bcs = (size_t)(b0->h1 - b0->h0) * W;
      x = (convd_view){b0->p + (size_t)op->ic0 * bcs + (size_t)(op->xh0 - b0->h0) * W + (size_t)op->xw0,
                       (size_t)lp->c_in * bcs, bcs, W};
    } else {
      if (grow(&s->win, &s->win_cap, op->local.input_elems))
        return convd_errf(err, errlen, CONVD_ENOMEM, "out of host memory for an op's input");
      convd_plan_gather_window(pl, op, in_row, j, s->win);
      x = convd_view_dense(s->win, lp->c_in, lp->h, lp->w);
    }
    /* The weight block's identity for the device's cache: the weights' content (when the caller
     * named it, so that later jobs with the same weights find it) or this job, and the block's
     * place and extent. */
    uint64_t key = mix64(j->w_key ? j->w_key : j->id);
    key = mix64(key ^ (uint64_t)op->oc0);
    key = mix64(key ^ (uint64_t)op->oc1 << 1);
    key = mix64(key ^ (uint64_t)op->wc0);
    key = mix64(key ^ (uint64_t)lp->c_per_group);
    key = mix64(key ^ (uint64_t)(op->ry << 20 | op->rx) ^ (uint64_t)pl->transposed << 63 ^
                (uint64_t)pl->native << 62) | 1;
    convd_op_io io = {.conv = &op->local, .x = x,
                      .w = convd_plan_weight_view(pl, op, pl->transposed ? j->wseg : j->w),
                      .w_key = key, .b = lp->has_bias ? j->b + op->oc0 : NULL, .y = y,
                      .cancel = &j->stop, .chain_pos = chain_pos, .chain_len = chain_len};
    double t0 = convd_now_seconds();
    rc = convd_device_run(s->dev, &io, err, errlen);
    double dt = convd_now_seconds() - t0;
    pthread_mutex_lock(&e->mu);
    s->busy_seconds += dt;
    j->stats.compute_seconds += dt;
    pthread_mutex_unlock(&e->mu);
  }
  if (rc || direct) return rc;
  pthread_mutex_lock(&j->acc_mu);
  const int add = pl->icblocks > 1 && j->tile_written[op->tile];
  convd_plan_accumulate(pl, op, s->partial, tile, add);
  if (pl->icblocks > 1) j->tile_written[op->tile] = 1;
  pthread_mutex_unlock(&j->acc_mu);
  return 0;
}

/* The output band of op's tile row, made when its first op starts. e->mu held. */
static int make_out_band(convd_job *j, const convd_plan_op *op) {
  const convd_plan *pl = &j->plan;
  const int64_t th = op->trow;
  out_band *ob = &j->out[(size_t)(op->n * pl->tiles_h + th)];
  if (ob->p) return 0;
  int64_t h0, h1;
  convd_plan_tile_rows(pl, th, &h0, &h1);
  const size_t C = (size_t)pl->conv.p.c_out, H = (size_t)pl->conv.h_out, W = (size_t)pl->conv.w_out;
  ob->unreleased = (uint32_t)(h1 - h0);
  if (j->y_target) {
    ob->p = j->y_target + ((size_t)op->n * C * H + (size_t)h0) * W;
    ob->cs = H * W;
    return 0;
  }
  const size_t bytes = C * (size_t)(h1 - h0) * W * sizeof(float);
  ob->p = malloc(bytes);
  if (ob->p == NULL) return -1;
  ob->cs = (size_t)(h1 - h0) * W;
  ob->owned = 1;
  j->bytes_held += bytes;
  j->out_bytes_held += bytes;
  if (j->bytes_held > j->stats.peak_bytes_held) j->stats.peak_bytes_held = j->bytes_held;
  return 0;
}

/* A device that accumulates takes the input-channel blocks of one tile together when the
 * first block is what it picked and the others are still queued right behind it (ops of a tile
 * are consecutive, and a tile row's ops are queued as one range). Returns the chain's length.
 * e->mu held. */
#define CHAIN_MAX 4096
/* Whether slot s should take a whole chain of n ops of job j rather than one op: only once
 * measured and not on a probe (it takes one op then), and only if the other devices would not
 * finish their share of the ready work sooner than it finishes the chain (worth_taking's rule,
 * for n ops). e->mu held. */
static int chain_worth(const convd_engine *e, const dev_slot *s, const convd_job *j, uint64_t n) {
  if (!s->measured || j->macs_per_op > MEASURE_SCALE * s->measured_macs) return 0;
  double others = 0, fastest = 0;
  for (int i = 0; i < e->ndev; i++) {
    const dev_slot *d = &e->devs[i];
    if (d != s && d->healthy && j->runs_on[i]) {
      if (!d->measured || d->sec_per_mac <= 0) return 0; /* unknown speed: one op at a time */
      others += 1.0 / d->sec_per_mac;
      if (1.0 / d->sec_per_mac > fastest) fastest = 1.0 / d->sec_per_mac;
    }
  }
  if (others == 0) return 1; /* alone */
  double ready = 0;
  for (const convd_job *x = e->jobs; x; x = x->next)
    if (!x->cancelled && !x->failed) ready += (double)x->ready_ops * x->macs_per_op;
  const double chain_macs = (double)n * j->macs_per_op;
  const double others_done = ready / others > chain_macs / fastest ? ready / others : chain_macs / fastest;
  return s->sec_per_mac * chain_macs <= others_done;
}

static int claim_chain(const dev_slot *s, convd_job *j, uint64_t opi, const convd_plan_op *op) {
  const uint64_t icb = (uint64_t)j->plan.icblocks;
  if (!convd_device_accumulates(s->dev) || icb < 2 || icb > CHAIN_MAX || opi % icb != 0 ||
      op->empty || j->ready_len == 0 || j->plan.transposed || !chain_worth(s->e, s, j, icb))
    return 1;
  range *r = &j->ready[j->ready_head];
  if (r->begin != opi + 1 || r->end < opi + icb) return 1;
  r->begin += icb - 1;
  if (r->begin == r->end) {
    j->ready_head++;
    j->ready_len--;
  }
  j->ready_ops -= icb - 1;
  j->running += (int)(icb - 1);
  return (int)icb;
}

static void requeue(convd_job *j, uint64_t opi) {
  if (j->retry_len == j->retry_cap) {
    size_t cap = j->retry_cap ? j->retry_cap * 2 : 8;
    uint64_t *r = realloc(j->retry, cap * sizeof *r);
    if (r == NULL) {
      j->failed = 1;
      atomic_store(&j->stop, 1);
      snprintf(j->fail_msg, sizeof j->fail_msg, "out of memory requeueing an op");
      return;
    }
    j->retry = r;
    j->retry_cap = cap;
  }
  j->retry[j->retry_len++] = opi;
  j->ready_ops++;
}

/* Healthy devices that support job j. e->mu held. */
static int healthy_runners(const convd_engine *e, const convd_job *j) {
  int n = 0;
  for (int i = 0; i < e->ndev; i++) n += e->devs[i].healthy && j->runs_on[i];
  return n;
}

/* Books the end of op opi on slot s: rc 0 done, else cancelled, out of memory (the job fails)
 * or a device failure (the device is marked unhealthy and the op goes back to the queue).
 * e->mu held. */
static void op_finished(dev_slot *s, convd_job *j, uint64_t opi, const convd_plan_op *op, int rc,
                        int oom, double took, const char *err, events *es) {
  convd_engine *e = s->e;
  j->running--;
  if (rc == 0 && !op->empty && op->local.macs > 0) {
    const double spm = took / (double)op->local.macs;
    s->sec_per_mac = s->measured ? 0.7 * s->sec_per_mac + 0.3 * spm : spm;
    s->measured_macs = s->measured ? 0.7 * s->measured_macs + 0.3 * (double)op->local.macs
                                   : (double)op->local.macs;
    s->measured = 1;
  }
  if (rc == 0) e->ops_completed++;
  s->last_op_at = e->ops_completed;
  if (rc == 0) {
    s->completed_ops++;
    e->pending_ops--;
    j->stats.ops_run++;
    if (s->index < 16) j->stats.ops_per_device[s->index]++;
    j->ops_done++;
    if (!op->empty && release_window(j, op)) add_event(es, j, 1, 0, 0, 0);
    /* The op's tile row is done when its last op is: its output rows are final. */
    const int64_t th = op->trow;
    if (--j->tile_left[(size_t)(op->n * tiles_h(j) + th)] == 0 && !j->cancelled && !j->failed) {
      int64_t h0, h1;
      convd_plan_tile_rows(&j->plan, th, &h0, &h1);
      if (h1 > h0) add_event(es, j, 0, op->n, h0, h1);
    }
  } else if (rc == CONVD_ECANCELED && (j->cancelled || j->failed)) {
    /* stopped on purpose: nothing to retry, the device is fine */
  } else if (rc == CONVD_ENOMEM || oom) {
    j->failed = 1;
    atomic_store(&j->stop, 1);
    snprintf(j->fail_msg, sizeof j->fail_msg, "%s", err);
  } else {
    /* The device failed: it takes no more work, the op goes back for another device. Jobs
     * that no healthy device can run any more fail instead of waiting. */
    if (s->healthy) {
      snprintf(s->why, sizeof s->why, "unhealthy: %s", err);
      if (e->device_failed) e->device_failed(e->user, s->index, convd_device_name(s->dev), err);
    }
    s->healthy = 0;
    int healthy = 0;
    for (int i = 0; i < e->ndev; i++) healthy += e->devs[i].healthy;
    for (convd_job *x = e->jobs; x; x = x->next)
      if (!x->failed && healthy_runners(e, x) == 0) {
        x->failed = 1;
        atomic_store(&x->stop, 1);
        if (healthy == 0)
          snprintf(x->fail_msg, sizeof x->fail_msg, "no healthy device left; the last one failed: %s", err);
        else
          snprintf(x->fail_msg, sizeof x->fail_msg,
                   "no healthy device left that supports this convolution; the last one failed: %s",
                   err);
      }
    if (healthy_runners(e, j) > 0) requeue(j, opi);
    pthread_cond_broadcast(&e->cv);
  }
}

static void *worker_main(void *arg) {
  dev_slot *s = arg;
  convd_engine *e = s->e;
  events es = {.n = 0};
  pthread_mutex_lock(&e->mu);
  for (;;) {
    /* Jobs that finished with nobody else to tell them (cancelled while idle, say). */
    for (convd_job *j = e->jobs; j && es.n < 6; j = j->next) maybe_done(j, &es);
    if (es.n) {
      pthread_mutex_unlock(&e->mu);
      deliver(e, &es);
      pthread_mutex_lock(&e->mu);
      continue;
    }
    uint64_t opi = 0;
    convd_job *j = s->healthy && !e->stopping ? pick(e, s, &opi) : NULL;
    if (j == NULL) {
      if (e->stopping) break;
      int skipped = 0;
      for (convd_job *x = e->jobs; x && !skipped && s->healthy; x = x->next)
        skipped = has_work_for(x, s);
      if (skipped) {
        /* Left to faster devices: they re-decide when any op completes, and one must be awake
         * now if none is running. */
        e->skipping++;
        if (e->busy == 0) pthread_cond_broadcast(&e->cv);
        pthread_cond_wait(&e->cv, &e->mu);
        e->skipping--;
      } else {
        pthread_cond_wait(&e->cv, &e->mu);
      }
      continue;
    }
    e->busy++;
    convd_plan_op op;
    convd_plan_op_get(&j->plan, opi, &op);
    const int chain = claim_chain(s, j, opi, &op);
    /* The output band of this op's tile row exists before any op writes into it. */
    int oom = make_out_band(j, &op);
    pthread_mutex_unlock(&e->mu);

    /* A chain runs block after block; if one fails, every block of it runs again. */
    char err[256] = "";
    double took[CHAIN_MAX];
    int rc = 0;
    for (int k = 0; k < chain && rc == 0; k++) {
      convd_plan_op opk;
      if (k == 0) opk = op;
      else convd_plan_op_get(&j->plan, opi + (uint64_t)k, &opk);
      const double t0 = convd_now_seconds();
      rc = oom ? convd_errf(err, sizeof err, CONVD_ENOMEM, "out of host memory for output rows")
               : run_op(s, j, &opk, k, chain, err, sizeof err);
      took[k] = convd_now_seconds() - t0;
    }

    pthread_mutex_lock(&e->mu);
    e->busy--;
    if (e->skipping > 0) pthread_cond_broadcast(&e->cv); /* speeds and ready work changed */
    for (int k = 0; k < chain; k++) {
      convd_plan_op opk;
      if (k == 0) opk = op;
      else convd_plan_op_get(&j->plan, opi + (uint64_t)k, &opk);
      op_finished(s, j, opi + (uint64_t)k, &opk, rc, oom, took[k], err, &es);
    }
    maybe_done(j, &es);
    if (es.n) {
      pthread_mutex_unlock(&e->mu);
      deliver(e, &es);
      pthread_mutex_lock(&e->mu);
    }
    if (!s->healthy && !s->flushed) {
      /* Out of service for good: the weights it caches would never be used again. Only this
       * worker runs its device, so it flushes it, outside e->mu. */
      s->flushed = 1;
      pthread_mutex_unlock(&e->mu);
      convd_device_flush_cache(s->dev);
      pthread_mutex_lock(&e->mu);
    }
  }
  pthread_mutex_unlock(&e->mu);
  return NULL;
}

/* ---- engine ---------------------------------------------------------------------------- */

static int add_slot(convd_engine *e, convd_device *d) {
  dev_slot *s = &e->devs[e->ndev];
  memset(s, 0, sizeof *s);
  s->e = e;
  s->index = (unsigned)e->ndev;
  s->dev = d;
  s->healthy = 1;
  e->ndev++;
  return 0;
}

int convd_engine_open_devices(const convd_engine_opts *opts, convd_device ***out, int *n,
                              char *err, size_t errlen) {
  *out = NULL;
  *n = 0;
  convd_engine_opts o = opts ? *opts : (convd_engine_opts){0};
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  int threads = o.cpu_threads > 0 ? o.cpu_threads : (ncpu > 0 ? (int)ncpu : 1);
  /* GPUs first: with one, the host's CPU devices are what the caller asked for explicitly. */
  char why[256] = "";
  int ngpu = 0;
  if (o.gpus != 0) {
    ngpu = convd_cuda_device_count(why, sizeof why);
    if (o.gpus > 0 && o.gpus < ngpu) ngpu = o.gpus;
    if (o.gpus > ngpu && ngpu > 0)
      snprintf(why, sizeof why, "%d GPUs asked for, %d visible", o.gpus, ngpu);
  } else {
    snprintf(why, sizeof why, "GPUs not asked for");
  }
  if (o.notice && o.notice_len) snprintf(o.notice, o.notice_len, "%s", ngpu > 0 && !why[0] ? "" : why);
  int ncpu_dev = o.cpu_devices > 0 ? o.cpu_devices : (o.n_extra > 0 || ngpu > 0 ? 0 : 1);
  if (ncpu_dev > 256)
    return convd_errf(err, errlen, CONVD_EINVAL, "cpu devices = %d: at most 256", ncpu_dev);
  const int per_gpu = o.gpu_instances > 0 && o.gpu_instances <= 16 ? o.gpu_instances : 2;
  ngpu *= per_gpu;
  convd_device **devs = calloc((size_t)(ngpu + ncpu_dev + 1), sizeof *devs);
  if (devs == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory opening devices");
  const uint64_t device_memory = o.device_memory ? o.device_memory : CONVD_DEFAULT_DEVICE_MEMORY;
  int rc = 0, nd = 0;
  for (int i = 0; rc == 0 && i < ngpu; i++) {
    char name[32];
    if (per_gpu > 1) snprintf(name, sizeof name, "cuda%d.%d", i / per_gpu, i % per_gpu);
    else snprintf(name, sizeof name, "cuda%d", i);
    rc = convd_device_cuda_create(name, i / per_gpu, o.gpu_memory, &devs[nd], err, errlen);
    nd += rc == 0;
  }
  for (int i = 0; rc == 0 && i < ncpu_dev; i++) {
    char name[32];
    int t = threads / ncpu_dev + (i < threads % ncpu_dev ? 1 : 0);
    snprintf(name, sizeof name, "%s%d", o.reference ? "ref" : "cpu", i);
    rc = o.reference ? convd_device_ref_create(name, device_memory, &devs[nd], err, errlen)
                     : convd_device_cpu_create(name, t > 0 ? t : 1, device_memory, &devs[nd], err, errlen);
    nd += rc == 0;
  }
  if (rc) {
    for (int i = 0; i < nd; i++) convd_device_destroy(devs[i]);
    free(devs);
    return rc;
  }
  *out = devs;
  *n = nd;
  return 0;
}

int convd_engine_create(const convd_engine_opts *opts, convd_engine **out, char *err,
                        size_t errlen) {
  *out = NULL;
  convd_engine_opts o = opts ? *opts : (convd_engine_opts){0};
  convd_device **own = NULL;
  int nown = 0;
  int rc = convd_engine_open_devices(&o, &own, &nown, err, errlen);
  if (rc) {
    for (int i = 0; i < o.n_extra; i++) convd_device_destroy(o.extra[i]);
    return rc;
  }
  convd_engine *e = calloc(1, sizeof *e);
  if (e == NULL) {
    for (int i = 0; i < nown; i++) convd_device_destroy(own[i]);
    for (int i = 0; i < o.n_extra; i++) convd_device_destroy(o.extra[i]);
    free(own);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating the engine");
  }
  e->devs = calloc((size_t)(nown + o.n_extra + 1), sizeof *e->devs);
  e->segs = convd_segcache_create();
  e->device_memory = o.device_memory ? o.device_memory : CONVD_DEFAULT_DEVICE_MEMORY;
  e->op_memory = o.op_memory;
  e->max_pending_ops = o.max_pending_ops;
  e->row_bytes = o.row_bytes;
  e->device_failed = o.device_failed;
  e->user = o.user;
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cv, NULL);
  if (e->devs == NULL || e->segs == NULL)
    rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating the engine");
  for (int i = 0; i < nown; i++) {
    if (rc == 0) add_slot(e, own[i]);
    else convd_device_destroy(own[i]);
  }
  free(own);
  for (int i = 0; i < o.n_extra; i++) {
    if (rc == 0) add_slot(e, o.extra[i]);
    else convd_device_destroy(o.extra[i]);
  }
  for (int i = 0; rc == 0 && i < e->ndev; i++) {
    if (pthread_create(&e->devs[i].thread, NULL, worker_main, &e->devs[i]) != 0)
      rc = convd_errf(err, errlen, CONVD_ENOMEM, "cannot start the worker of device %d", i);
    else
      e->devs[i].started = 1;
  }
  if (rc == 0 && e->ndev == 0) rc = convd_errf(err, errlen, CONVD_EINVAL, "the engine has no device");
  if (rc) {
    convd_engine_destroy(e);
    return rc;
  }
  *out = e;
  return 0;
}

void convd_engine_destroy(convd_engine *e) {
  if (e == NULL) return;
  pthread_mutex_lock(&e->mu);
  e->stopping = 1;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  for (int i = 0; i < e->ndev; i++) {
    dev_slot *s = &e->devs[i];
    if (s->started) pthread_join(s->thread, NULL);
    convd_device_destroy(s->dev);
    free(s->win);
    free(s->wblk);
    free(s->partial);
  }
  convd_segcache_destroy(e->segs);
  pthread_cond_destroy(&e->cv);
  pthread_mutex_destroy(&e->mu);
  free(e->devs);
  free(e);
}

size_t convd_engine_device_count(const convd_engine *e) { return (size_t)e->ndev; }

uint64_t convd_engine_device_memory(const convd_engine *e) { return e->device_memory; }

int convd_engine_healthy_devices(convd_engine *e) {
  pthread_mutex_lock(&e->mu);
  int n = 0;
  for (int i = 0; i < e->ndev; i++) n += e->devs[i].healthy;
  pthread_mutex_unlock(&e->mu);
  return n;
}

int convd_engine_device_info(convd_engine *e, size_t i, convd_device_info *out) {
  if (i >= (size_t)e->ndev) return CONVD_EINVAL;
  dev_slot *s = &e->devs[i];
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&e->mu);
  out->index = (unsigned)i;
  out->kind = convd_device_kind(s->dev);
  snprintf(out->name, sizeof out->name, "%s", convd_device_name(s->dev));
  out->memory_bytes = convd_device_memory_budget(s->dev);
  out->completed_ops = s->completed_ops;
  out->busy_seconds = s->busy_seconds;
  out->healthy = s->healthy;
  snprintf(out->detail, sizeof out->detail, "%s",
           s->healthy ? convd_device_detail(s->dev) : s->why);
  pthread_mutex_unlock(&e->mu);
  convd_device_stats_get(s->dev, &out->stats);
  return 0;
}

int convd_engine_plan(convd_engine *e, const convd_conv *conv, convd_plan *plan, char *err,
                      size_t errlen) {
  return convd_engine_plan_within(e, conv, 0, plan, err, errlen);
}

int convd_engine_plan_within(convd_engine *e, const convd_conv *conv, uint64_t op_bytes,
                             convd_plan *plan, char *err, size_t errlen) {
  return convd_engine_plan_rows(e, conv, op_bytes, 0, plan, err, errlen);
}

int convd_engine_plan_rows(convd_engine *e, const convd_conv *conv, uint64_t op_bytes, uint64_t row_bytes,
                           convd_plan *plan, char *err, size_t errlen) {
  uint64_t budget = op_bytes ? op_bytes : UINT64_MAX;
  for (int i = 0; i < e->ndev; i++) {
    const uint64_t b = convd_device_memory_budget(e->devs[i].dev);
    if (b < budget) budget = b;
  }
  if (e->op_memory && e->op_memory < budget) budget = e->op_memory;
  /* Native transposes only when every device can take their ops. */
  int native = e->ndev > 0;
  for (int i = 0; i < e->ndev; i++) native &= convd_device_native_transpose(e->devs[i].dev);
  convd_plan_opts o = {.devices = convd_engine_healthy_devices(e), .device_memory = budget,
                       .native_transpose = native, .row_bytes = row_bytes};
  int rc = convd_plan_make(plan, conv, &o, err, errlen);
  if (rc == 0 && plan->ops > MAX_PLAN_OPS)
    rc = convd_errf(err, errlen, CONVD_ELIMIT,
                    "the plan needs %llu elemental ops, more than %llu: the daemon's device memory "
                    "budget (--device-memory) is too small for this request",
                    (unsigned long long)plan->ops, (unsigned long long)MAX_PLAN_OPS);
  return rc;
}

/* ---- jobs ------------------------------------------------------------------------------ */

/* What convd_job_create and the job's life allocate beside tensor rows, at most: per input row
 * its band pointer, reader count, arrival flag and (one band per row at worst) band record;
 * per (n, tile row) its output band, counters and a ready range; per op a retry slot; and a
 * transpose's segregated copy of its weights (when the segregated-weights cache, bounded by
 * CONVD_SEGCACHE_BYTES, does not take it). */
static uint64_t bookkeeping_bytes(const convd_plan *pl, int ndev) {
  const convd_conv_params *p = &pl->conv.p;
  const double rows = (double)p->n * (double)p->h, groups = (double)p->n * (double)pl->tiles_h;
  const double per_row = sizeof(in_band *) + sizeof(uint32_t) + 1 + sizeof(in_band);
  const double per_group = sizeof(out_band) + sizeof(int32_t) + 1 + sizeof(uint32_t) + sizeof(range);
  double b = sizeof(convd_job) + rows * per_row + groups * per_group +
             (double)pl->ops * (sizeof(uint64_t) + (pl->icblocks > 1 ? 1 : 0)) + (double)ndev +
             (p->transposed ? (double)pl->conv.weight_bytes : 0);
  return b >= (double)UINT64_MAX ? UINT64_MAX : (uint64_t)b;
}

int convd_job_create(convd_engine *e, const convd_conv *conv, const convd_job_cbs *cbs,
                     convd_job **out, char *err, size_t errlen) {
  *out = NULL;
  convd_job *j = calloc(1, sizeof *j);
  if (j == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating a job");
  j->e = e;
  j->cb = *cbs;
  pthread_mutex_init(&j->seg_mu, NULL);
  atomic_init(&j->stop, 0);
  pthread_mutex_init(&j->acc_mu, NULL);
  int rc = convd_engine_plan_rows(e, conv, cbs->op_bytes, cbs->row_bytes ? cbs->row_bytes : e->row_bytes, &j->plan,
                                  err, errlen);
  if (rc == 0 && cbs->admit)
    rc = cbs->admit(cbs->user, &j->plan, bookkeeping_bytes(&j->plan, e->ndev), err, errlen);
  if (rc) {
    convd_job_destroy(j);
    return rc;
  }
  const convd_conv_params *p = &conv->p;
  size_t in_rows = (size_t)p->n * (size_t)p->h;
  size_t groups = (size_t)p->n * (size_t)j->plan.tiles_h;
  j->row_band = calloc(in_rows, sizeof *j->row_band);
  j->in_refs = calloc(in_rows, sizeof *j->in_refs);
  j->in_seen = calloc(in_rows, 1);
  j->out = calloc(groups, sizeof *j->out);
  j->missing = calloc(groups, sizeof *j->missing);
  j->queued = calloc(groups, 1);
  j->tile_left = calloc(groups, sizeof *j->tile_left);
  if (j->plan.icblocks > 1) j->tile_written = calloc((size_t)(j->plan.ops / (uint64_t)j->plan.icblocks), 1);
  j->runs_on = calloc((size_t)e->ndev, 1);
  if (!j->row_band || !j->in_refs || !j->in_seen || !j->out || !j->missing || !j->queued ||
      !j->tile_left || (j->plan.icblocks > 1 && !j->tile_written) || !j->runs_on) {
    convd_job_destroy(j);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating a job");
  }
  /* Which devices may take its ops: asked once, on the whole convolution. */
  for (int i = 0; i < e->ndev; i++)
    j->runs_on[i] = convd_device_supports(e->devs[i].dev, conv) != 0;
  /* Who reads which row: refs per row, and rows each tile row waits for. */
  const uint64_t per = ops_per_tile_row(j);
  for (int64_t n = 0; n < p->n; n++)
    for (int64_t th = 0; th < j->plan.tiles_h; th++) {
      size_t k = (size_t)(n * j->plan.tiles_h + th);
      int64_t ih0, ih1;
      convd_plan_tile_row_window(&j->plan, th, &ih0, &ih1);
      j->missing[k] = (int32_t)(ih1 - ih0);
      j->tile_left[k] = (uint32_t)per;
      /* Every op of a tile row reads the same rows (the row window depends only on the tile
       * row), so each row of the window is read once per non-empty op of the tile row. */
      uint32_t readers = 0;
      for (uint64_t i = (uint64_t)k * per; i < (uint64_t)(k + 1) * per; i++) {
        convd_plan_op op;
        convd_plan_op_get(&j->plan, i, &op);
        readers += !op.empty;
      }
      for (int64_t h = ih0; h < ih1; h++) j->in_refs[(size_t)n * (size_t)p->h + (size_t)h] += readers;
    }
  j->stats.ops = j->plan.ops;
  j->macs_per_op = (double)conv->macs / (double)(j->plan.ops ? j->plan.ops : 1);
  pthread_mutex_lock(&e->mu);
  if (healthy_runners(e, j) == 0) {
    /* Nothing would ever take its ops: fail now rather than wait forever. */
    char names[128] = "";
    size_t len = 0;
    for (int i = 0; i < e->ndev; i++)
      if (e->devs[i].healthy && len < sizeof names)
        len += (size_t)snprintf(names + len, sizeof names - len, "%s%s", len ? ", " : "",
                                convd_device_name(e->devs[i].dev));
    int rc2 = len == 0
                  ? convd_errf(err, errlen, CONVD_EUNAVAIL,
                               "no healthy device left to run the job: every device of this "
                               "daemon failed; retry on another instance")
                  : convd_errf(err, errlen, CONVD_ENOTSUP,
                               "no healthy device supports this convolution (input %" PRId64
                               "x%" PRId64 "x%" PRId64 "x%" PRId64 "%s): %s cannot run it",
                               p->n, p->c_in, p->h, p->w, p->transposed ? ", transposed" : "",
                               names);
    pthread_mutex_unlock(&e->mu);
    convd_job_destroy(j);
    return rc2;
  }
  if (e->max_pending_ops && e->pending_ops + j->plan.ops > e->max_pending_ops) {
    const uint64_t pending = e->pending_ops;
    pthread_mutex_unlock(&e->mu);
    int rc2 = convd_errf(err, errlen, CONVD_ELIMIT,
                         "the daemon has %" PRIu64 " elemental ops queued or running; this request "
                         "adds %" PRIu64 ", over its limit of %" PRIu64 " (--max-queue-ops): retry "
                         "later or on another instance",
                         pending, j->plan.ops, e->max_pending_ops);
    convd_job_destroy(j);
    return rc2;
  }
  e->pending_ops += j->plan.ops;
  e->njobs++;
  j->counted = 1;
  j->id = ++e->next_job_id;
  j->next = e->jobs;
  if (e->jobs) e->jobs->prev = j;
  e->jobs = j;
  /* Tile rows whose windows are empty (all padding) need no input. */
  for (int64_t n = 0; n < p->n; n++)
    for (int64_t th = 0; th < j->plan.tiles_h; th++) maybe_queue(j, n, th);
  pthread_mutex_unlock(&e->mu);
  *out = j;
  return 0;
}

void convd_job_set_output(convd_job *j, float *y) {
  pthread_mutex_lock(&j->e->mu);
  j->y_target = y;
  pthread_mutex_unlock(&j->e->mu);
}

void convd_job_set_priority(convd_job *j, int priority) {
  pthread_mutex_lock(&j->e->mu);
  j->priority = priority;
  pthread_mutex_unlock(&j->e->mu);
}

void convd_engine_load_get(convd_engine *e, convd_engine_load *out) {
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&e->mu);
  out->jobs = e->njobs;
  out->pending_ops = e->pending_ops;
  out->running_ops = (uint64_t)e->busy;
  for (convd_job *j = e->jobs; j; j = j->next) {
    if (!j->cancelled && !j->failed) out->ready_ops += j->ready_ops;
    out->bytes_held += j->bytes_held;
  }
  pthread_mutex_unlock(&e->mu);
}

void convd_job_set_weights_key(convd_job *j, uint64_t key) {
  pthread_mutex_lock(&j->e->mu);
  j->w_key = key;
  pthread_mutex_unlock(&j->e->mu);
}

void convd_job_set_weights(convd_job *j, float *w, float *b, int ownership) {
  convd_engine *e = j->e;
  pthread_mutex_lock(&e->mu);
  j->w = w;
  j->b = b;
  j->w_owned = ownership == CONVD_GIVE;

  for (int64_t n = 0; n < j->plan.conv.p.n; n++)
    for (int64_t th = 0; th < j->plan.tiles_h; th++) maybe_queue(j, n, th);
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

int convd_job_put_band(convd_job *j, int64_t n, int64_t h0, int64_t h1, float *band,
                       int ownership, char *err, size_t errlen) {
  convd_engine *e = j->e;
  const convd_conv_params *p = &j->plan.conv.p;
  const int owned = ownership == CONVD_GIVE;
  int rc = 0;
  in_band *b = malloc(sizeof *b);
  pthread_mutex_lock(&e->mu);
  for (int64_t h = h0; h < h1 && rc == 0; h++)
    if (j->in_seen[(size_t)n * (size_t)p->h + (size_t)h])
      rc = convd_errf(err, errlen, CONVD_EINVAL, "input row %lld of batch item %lld arrived twice",
                      (long long)h, (long long)n);
  if (rc == 0 && b == NULL) rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory holding input rows");
  if (rc) {
    pthread_mutex_unlock(&e->mu);
    free(b);
    if (owned) free(band);
    return rc;
  }
  *b = (in_band){band, h0, h1, 0, owned};
  for (int64_t h = h0; h < h1; h++) {
    size_t k = (size_t)n * (size_t)p->h + (size_t)h;
    j->in_seen[k] = 1;
    if (j->in_refs[k] > 0) { /* rows no op reads (skipped by the stride) are not held */
      j->row_band[k] = b;
      b->live++;
    }
    for (int64_t th = 0; th < j->plan.tiles_h; th++) {
      int64_t a, z;
      convd_plan_tile_row_window(&j->plan, th, &a, &z);
      if (h >= a && h < z && --j->missing[n * j->plan.tiles_h + th] == 0) maybe_queue(j, n, th);
    }
  }
  if (b->live == 0) {
    if (owned) free(band);
    free(b);
  } else if (owned) {
    j->bytes_held += (uint64_t)(h1 - h0) * (uint64_t)p->c_in * (uint64_t)p->w * sizeof(float);
    if (j->bytes_held > j->stats.peak_bytes_held) j->stats.peak_bytes_held = j->bytes_held;
  }
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

static out_band *band_of_row(convd_job *j, int64_t n, int64_t h) {
  return &j->out[(size_t)(n * j->plan.tiles_h + convd_plan_row_tile(&j->plan, h))];
}

const float *convd_job_output_row(convd_job *j, int64_t n, int64_t h, size_t *cstride) {
  const out_band *ob = band_of_row(j, n, h);
  int64_t h0, h1;
  convd_plan_tile_rows(&j->plan, convd_plan_row_tile(&j->plan, h), &h0, &h1);
  *cstride = ob->cs;
  return ob->p + (size_t)(h - h0) * (size_t)j->plan.conv.w_out;
}

void convd_job_release_rows(convd_job *j, int64_t n, int64_t h0, int64_t h1) {
  pthread_mutex_lock(&j->e->mu);
  for (int64_t h = h0; h < h1; h++) {
    out_band *ob = band_of_row(j, n, h);
    if (ob->p && --ob->unreleased == 0 && ob->owned) {
      const uint64_t bytes = (uint64_t)ob->cs * (uint64_t)j->plan.conv.p.c_out * sizeof(float);
      free(ob->p);
      ob->p = NULL;
      j->bytes_held -= bytes;
      j->out_bytes_held -= bytes;
    }
  }
  pthread_mutex_unlock(&j->e->mu);
}

uint64_t convd_job_output_bytes_held(convd_job *j) {
  pthread_mutex_lock(&j->e->mu);
  uint64_t b = j->out_bytes_held;
  pthread_mutex_unlock(&j->e->mu);
  return b;
}

uint64_t convd_job_bytes_held(convd_job *j) {
  pthread_mutex_lock(&j->e->mu);
  uint64_t b = j->bytes_held;
  pthread_mutex_unlock(&j->e->mu);
  return b;
}

uint64_t convd_plan_memory_hint(const convd_plan *pl) {
  const convd_conv_params *p = &pl->conv.p;
  int64_t a, b;
  convd_plan_tile_row_window(pl, 0, &a, &b);
  uint64_t in = (uint64_t)(b - a) * (uint64_t)p->c_in * (uint64_t)p->w * 4;
  int64_t o0, o1;
  convd_plan_tile_rows(pl, pl->tiles_h > 1 ? 1 : 0, &o0, &o1); /* a whole tile row's rows */
  uint64_t outb = (uint64_t)(o1 - o0) * (uint64_t)p->c_out * (uint64_t)pl->conv.w_out * 4;
  return 2 * (in + outb);
}

uint64_t convd_job_memory_hint(convd_job *j) { return convd_plan_memory_hint(&j->plan); }

int convd_job_idle(convd_job *j) {
  pthread_mutex_lock(&j->e->mu);
  int idle = j->running == 0 && !job_has_work(j);
  pthread_mutex_unlock(&j->e->mu);
  return idle;
}

const convd_plan *convd_job_plan(const convd_job *j) { return &j->plan; }

void convd_job_cancel(convd_job *j) {
  pthread_mutex_lock(&j->e->mu);
  j->cancelled = 1;
  atomic_store(&j->stop, 1);
  j->ready_len = 0;
  j->retry_len = 0;
  j->ready_ops = 0;
  pthread_cond_broadcast(&j->e->cv); /* a worker delivers done() */
  pthread_mutex_unlock(&j->e->mu);
}

void convd_job_destroy(convd_job *j) {
  if (j == NULL) return;
  convd_engine *e = j->e;
  pthread_mutex_lock(&e->mu);
  if (j->counted) {
    e->pending_ops -= j->plan.ops - j->ops_done;
    e->njobs--;
  }
  if (j->prev || j->next || e->jobs == j) {
    if (j->prev) j->prev->next = j->next;
    else if (e->jobs == j) e->jobs = j->next;
    if (j->next) j->next->prev = j->prev;
    if (e->rr == j) e->rr = j->next;
  }
  pthread_mutex_unlock(&e->mu);
  const convd_conv_params *p = &j->plan.conv.p;
  if (j->row_band)
    for (size_t k = 0; k < (size_t)p->n * (size_t)p->h; k++) {
      in_band *b = j->row_band[k];
      j->row_band[k] = NULL;
      if (b && --b->live == 0) free_in_band(j, b);
    }
  if (j->out)
    for (size_t i = 0; i < (size_t)p->n * (size_t)j->plan.tiles_h; i++)
      if (j->out[i].owned) free(j->out[i].p);
  free(j->row_band), free(j->in_refs), free(j->in_seen), free(j->out), free(j->tile_written);
  free(j->missing), free(j->queued), free(j->tile_left), free(j->ready), free(j->retry);
  if (j->w_owned) free(j->w), free(j->b);
  if (j->wseg_own) free((float *)j->wseg);
  if (j->wseg_cached) convd_segcache_release(e->segs, j->wseg);
  free(j->runs_on);
  pthread_mutex_destroy(&j->seg_mu);
  pthread_mutex_destroy(&j->acc_mu);
  free(j);
}

/* ---- synchronous convenience ----------------------------------------------------------- */

typedef struct sync_run {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  convd_job *job;
  float *y;
  int done, status;
  char err[256];
  convd_job_stats stats;
} sync_run;

void convd_job_take_rows_nchw(convd_job *j, int64_t n, int64_t h0, int64_t h1, float *y) {
  const convd_conv *c = &j->plan.conv;
  const size_t W = (size_t)c->w_out, H = (size_t)c->h_out, C = (size_t)c->p.c_out;
  if (y != j->y_target) /* else the rows were written there */
    for (int64_t h = h0; h < h1; h++) {
      size_t cs;
      const float *row = convd_job_output_row(j, n, h, &cs);
      for (size_t ch = 0; ch < C; ch++)
        memcpy(y + (((size_t)n * C + ch) * H + (size_t)h) * W, row + ch * cs, W * sizeof(float));
    }
  convd_job_release_rows(j, n, h0, h1);
}

static void sync_rows(void *user, int64_t n, int64_t h0, int64_t h1) {
  sync_run *s = user;
  convd_job_take_rows_nchw(s->job, n, h0, h1, s->y);
}

static void sync_done(void *user, int status, const char *err, const convd_job_stats *st) {
  sync_run *s = user;
  pthread_mutex_lock(&s->mu);
  s->done = 1;
  s->status = status;
  snprintf(s->err, sizeof s->err, "%s", err);
  s->stats = *st;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

int convd_engine_run(convd_engine *e, const convd_conv *conv, const float *x, const float *w,
                     const float *b, float *y, convd_job_stats *stats, char *err, size_t errlen) {
  return convd_engine_run_keyed(e, conv, x, w, b, y, 0, stats, err, errlen);
}

int convd_engine_run_keyed(convd_engine *e, const convd_conv *conv, const float *x, const float *w,
                           const float *b, float *y, uint64_t w_key, convd_job_stats *stats, char *err,
                           size_t errlen) {
  sync_run s = {.y = y};
  pthread_mutex_init(&s.mu, NULL);
  pthread_cond_init(&s.cv, NULL);
  convd_job_cbs cbs = {.user = &s, .rows_ready = sync_rows, .done = sync_done};
  /* Create under s.mu so that no callback reads s.job before it is set. */
  pthread_mutex_lock(&s.mu);
  int rc = convd_job_create(e, conv, &cbs, &s.job, err, errlen);
  pthread_mutex_unlock(&s.mu);
  if (rc == 0) {
    /* Everything is lent: the job reads x and w where they are and writes into y. */
    convd_job_set_output(s.job, y);
    convd_job_set_weights_key(s.job, w_key);
    convd_job_set_weights(s.job, (float *)w, (float *)b, CONVD_LEND);
    const size_t slab = (size_t)conv->p.c_in * (size_t)conv->p.h * (size_t)conv->p.w;
    for (int64_t n = 0; n < conv->p.n && rc == 0; n++)
      rc = convd_job_put_band(s.job, n, 0, conv->p.h, (float *)x + (size_t)n * slab, CONVD_LEND,
                              err, errlen);
    if (rc) convd_job_cancel(s.job);
    pthread_mutex_lock(&s.mu);
    while (!s.done) pthread_cond_wait(&s.cv, &s.mu);
    pthread_mutex_unlock(&s.mu);
    if (rc == 0 && s.status) rc = convd_errf(err, errlen, s.status, "%s", s.err);
    if (stats) *stats = s.stats;
    convd_job_destroy(s.job);
  }
  pthread_cond_destroy(&s.cv);
  pthread_mutex_destroy(&s.mu);
  return rc;
}
