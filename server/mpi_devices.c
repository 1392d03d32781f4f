/* The MPI transport (mpi_devices.h): rank 0's remote devices and the worker ranks' op loop,
 * the only file that includes MPI's own mpi.h. It lives in server/, not engine/, because the engine
 * has no networking: to the engine a remote device is one more table of functions
 * (device_impl.h), and which process is rank 0 and which a worker is the daemon's business.
 * Compiled only with CONVD_MPI (CMakeLists.txt); mpi_devices_none.c stands in for it otherwise.
 *
 * Wire: every message is one MPI_BYTE message on a duplicate of MPI_COMM_WORLD. A worker says
 * hello (its host and devices) on TAG_HELLO; rank 0 says stop on TAG_CONTROL; device d of a
 * worker takes ops on tag TAG_OP_BASE + d and answers on the same tag. An op is a header (the
 * op's local convolution as plain int64 fields, its weight block's content key io->w_key,
 * element counts), its input window, its weight block when sent, and its bias. Weight blocks are
 * kept on the worker in a bounded LRU cache by that key (shared by the rank's devices); rank 0
 * remembers which keys it sent each rank and leaves those blocks out, and a worker that no longer
 * holds one answers NEED_WEIGHTS, so a block crosses once per rank while it stays cached. The
 * answer is the op's output tile (the engine adds partial sums as for any device). Every size
 * read from the wire is checked against the header and a bound before anything is allocated,
 * and every parameter goes through convd_conv_init, so a malformed message fails its op
 * (rank 0: the device is marked unhealthy) and never crashes a rank.
 *
 * Threads: MPI_THREAD_MULTIPLE (Debian's Open MPI 4.1 provides it; init refuses less). On rank
 * 0 each remote device's run() runs on its engine worker thread and does its own non-blocking
 * MPI calls on its own tag; waits are polled (MPI_Test/MPI_Improbe with a short sleep, so an
 * idle rank does not spin a core that computes) and bounded by --mpi-op-timeout. A rank's
 * shared state (remote_rank: the keys sent, lost) has its mutex. On a worker the main thread
 * waits for stop and one thread per local device serves that device's tag; the weight cache
 * has its mutex. init, remote_devices, worker_main and finish run on the main thread. */
#include "mpi_devices.h"

#include <inttypes.h>
#include <limits.h>
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "convd_version.h"
#include "device_impl.h"
#include "engine.h"
#include "err.h"
#include "log.h"

enum { TAG_HELLO = 1, TAG_CONTROL = 2, TAG_OP_BASE = 100 };
enum { MSG_HELLO = 1, MSG_STOP = 2, MSG_OP = 3, MSG_RESULT = 4, MSG_NEED_WEIGHTS = 5, MSG_ERROR = 6 };
#define WIRE_MAGIC 0x4d445643u /* "CVDM" */
#define WIRE_VERSION 1
#define MAX_RANK_DEVICES 64
/* A remote device's op budget is capped so that an op's message stays far below MPI's int
 * count of bytes. */
#define REMOTE_BUDGET_MAX (UINT64_C(512) << 20)
/* Keys rank 0 remembers having sent one rank (the worker's cache may hold fewer: NEED_WEIGHTS). */
#define KEYS_REMEMBERED 1024
#define WCACHE_MAX_ENTRIES 1024
/* Polling: sleeps grow from 20 us to this while nothing arrives. */
#define POLL_MAX_NS 500000L
#define IDLE_MAX_NS 2000000L

/* The op's convolution on the wire: every field of convd_conv_params as an int64. */
#define COUNT_FIELD(type, name, dims) +1
enum { NPARAMS = 0 CONVD_CONV_PARAMS_FIELDS(COUNT_FIELD) };
#undef COUNT_FIELD

typedef struct wire_hdr {
  uint32_t magic, kind;
  uint64_t seq;
} wire_hdr;

typedef struct wire_dev {
  int32_t kind, pad;
  uint64_t memory_budget;
  char name[64];
  char detail[128];
} wire_dev;

typedef struct wire_hello {
  wire_hdr h;
  int32_t version, ndev;
  uint64_t weights_cache; /* its --mpi-weights-cache: 0 = send every op its weights */
  char host[64];
  char convd_version[32];
  wire_dev dev[MAX_RANK_DEVICES];
} wire_hello;

enum { OP_HAS_WEIGHTS = 1, OP_HAS_BIAS = 2 };
typedef struct wire_op {
  wire_hdr h;
  uint32_t flags, pad;
  int64_t params[NPARAMS];
  uint64_t w_key;
  uint64_t x_elems, w_elems, b_elems;
} wire_op; /* followed by x, w (when sent), b, as float32 */

typedef struct wire_reply {
  wire_hdr h;
  int32_t status, pad;
  uint64_t y_elems;
  char err[256];
} wire_reply; /* followed by y for MSG_RESULT */

struct convd_mpi {
  MPI_Comm comm;
  int rank, size;
  double op_timeout;
  struct remote_rank *ranks; /* rank 0: one per worker (index rank - 1) */
};

#define MPI_TRY(call)                                                                         \
  do {                                                                                        \
    int st_ = (call);                                                                         \
    if (st_ != MPI_SUCCESS) {                                                                 \
      char s_[MPI_MAX_ERROR_STRING];                                                          \
      int l_ = 0;                                                                             \
      if (MPI_Error_string(st_, s_, &l_) != MPI_SUCCESS) snprintf(s_, sizeof s_, "code %d", st_); \
      rc = convd_errf(err, errlen, CONVD_EREMOTE, "%s failed: %s (%s:%d)", #call, s_, __FILE__, \
                      __LINE__);                                                              \
      goto out;                                                                               \
    }                                                                                         \
  } while (0)

/* Ends every rank of the job with code (mpirun then exits non-zero); should MPI_Abort come back,
 * this process exits anyway. */
static void abort_job(MPI_Comm comm, int code) {
  const int rc = MPI_Abort(comm, code);
  fprintf(stderr, "convd: MPI_Abort returned %d; exiting\n", rc);
  _exit(code);
}

static void pause_ns(long *ns, long max) {
  struct timespec ts = {0, *ns};
  nanosleep(&ts, NULL);
  *ns = *ns * 2 > max ? max : *ns * 2;
}

/* Waits for req, polling, until deadline (seconds on convd_now_seconds; 0 = none) or *stop.
 * On timeout or stop the request is cancelled. Returns 0, CONVD_ETIMEDOUT or an MPI error. */
static int wait_req(MPI_Request *req, double deadline, const atomic_int *stop, char *err,
                    size_t errlen) {
  int rc = 0, done = 0;
  long ns = 20000;
  for (;;) {
    MPI_TRY(MPI_Test(req, &done, MPI_STATUS_IGNORE));
    if (done) return 0;
    if ((deadline > 0 && convd_now_seconds() > deadline) || (stop && atomic_load(stop))) {
      const int c = MPI_Cancel(req), f = MPI_Request_free(req);
      return convd_errf(err, errlen, CONVD_ETIMEDOUT, "no answer in time%s",
                        c != MPI_SUCCESS || f != MPI_SUCCESS ? " (and the request could not be cancelled)" : "");
    }
    pause_ns(&ns, POLL_MAX_NS);
  }
out:
  return rc;
}

/* Waits for a message from src on tag, polling until deadline (0 = none) or *stop; checks its
 * size is within [lo, hi] bytes before receiving it into *buf (grown as needed). Returns its size
 * in *len and 0; CONVD_ETIMEDOUT; CONVD_EREMOTE for a message of a bad size (consumed). */
static int recv_msg(MPI_Comm comm, int src, int tag, size_t lo, size_t hi, char **buf, size_t *cap,
                    size_t *len, double deadline, const atomic_int *stop, char *err, size_t errlen) {
  int rc = 0, flag = 0, count = 0;
  long ns = 20000;
  MPI_Message msg = MPI_MESSAGE_NULL;
  MPI_Status status;
  for (;;) {
    MPI_TRY(MPI_Improbe(src, tag, comm, &flag, &msg, &status));
    if (flag) break;
    if ((deadline > 0 && convd_now_seconds() > deadline) || (stop && atomic_load(stop)))
      return convd_errf(err, errlen, CONVD_ETIMEDOUT, "no message in time");
    pause_ns(&ns, stop && deadline == 0 ? IDLE_MAX_NS : POLL_MAX_NS);
  }
  MPI_TRY(MPI_Get_count(&status, MPI_BYTE, &count));
  if (count < 0 || (size_t)count < lo || (size_t)count > hi) {
    char dummy[1];
    /* Consumes the message: MPI_ERR_TRUNCATE is the expected status, and there is nothing more
     * to do whatever it is. */
    (void)MPI_Mrecv(dummy, 0, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    return convd_errf(err, errlen, CONVD_EREMOTE,
                      "a message of %d bytes from rank %d on tag %d, expected %zu to %zu",
                      count, status.MPI_SOURCE, tag, lo, hi);
  }
  if ((size_t)count > *cap) {
    char *p = realloc(*buf, (size_t)count);
    if (p == NULL) {
      char dummy[1];
      (void)MPI_Mrecv(dummy, 0, MPI_BYTE, &msg, MPI_STATUS_IGNORE); /* consumed, as above */
      return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory for a %d-byte message", count);
    }
    *buf = p;
    *cap = (size_t)count;
  }
  MPI_Request req;
  MPI_TRY(MPI_Imrecv(*buf, count, MPI_BYTE, &msg, &req));
  if ((rc = wait_req(&req, deadline, stop, err, errlen))) return rc;
  *len = (size_t)count;
out:
  return rc;
}

static int send_msg(MPI_Comm comm, int dst, int tag, const void *buf, size_t len, double deadline,
                    const atomic_int *stop, char *err, size_t errlen) {
  int rc = 0;
  MPI_Request req;
  if (len > INT_MAX) return convd_errf(err, errlen, CONVD_EINVAL, "a %zu-byte message: larger than MPI's count", len);
  MPI_TRY(MPI_Isend(buf, (int)len, MPI_BYTE, dst, tag, comm, &req));
  rc = wait_req(&req, deadline, stop, err, errlen);
out:
  return rc;
}

static void params_to_wire(const convd_conv_params *p, int64_t *a) {
  int i = 0;
#define PUT(type, name, dims) a[i++] = (int64_t)p->name;
  CONVD_CONV_PARAMS_FIELDS(PUT)
#undef PUT
}

/* The int fields must hold their value: a larger one from the wire is refused. */
static int params_from_wire(const int64_t *a, convd_conv_params *p) {
  int i = 0, bad = 0;
#define GET(type, name, dims)                                  \
  p->name = (type)a[i];                                        \
  bad |= (int64_t)p->name != a[i];                             \
  i++;
  CONVD_CONV_PARAMS_FIELDS(GET)
#undef GET
  return bad;
}

/* Copies a strided view of n x c x h x w into dst (dense). */
static float *gather(float *dst, convd_view v, int64_t n, int64_t c, int64_t h, int64_t w) {
  for (int64_t a = 0; a < n; a++)
    for (int64_t b = 0; b < c; b++)
      for (int64_t r = 0; r < h; r++) {
        memcpy(dst, v.p + (size_t)a * v.ns + (size_t)b * v.cs + (size_t)r * v.hs, (size_t)w * sizeof(float));
        dst += w;
      }
  return dst;
}

/* ---- rank 0: remote devices -------------------------------------------------------------- */

typedef struct remote_rank {
  convd_mpi *m;
  int rank;
  char host[64];
  int caches; /* it keeps weight blocks (--mpi-weights-cache > 0 there) */
  pthread_mutex_t mu; /* keys, nkeys, lost_why */
  uint64_t keys[KEYS_REMEMBERED]; /* weight blocks sent to it (a ring) */
  size_t nkeys;
  atomic_int lost; /* it stopped answering: nothing more goes to it, and the job must abort */
  char lost_why[256];
} remote_rank;

typedef struct remote_dev {
  remote_rank *r;
  int tag;
  uint64_t seq;
  char *buf, *rbuf; /* the op's message; the answer */
  size_t cap, rcap;
  convd_device_stats st; /* relaxed atomics: read from any thread */
} remote_dev;

static int key_sent(remote_rank *r, uint64_t key) {
  int found = 0;
  pthread_mutex_lock(&r->mu);
  const size_t n = r->nkeys < KEYS_REMEMBERED ? r->nkeys : KEYS_REMEMBERED;
  for (size_t i = 0; i < n && !found; i++) found = r->keys[i] == key;
  pthread_mutex_unlock(&r->mu);
  return found;
}

static void key_add(remote_rank *r, uint64_t key) {
  pthread_mutex_lock(&r->mu);
  r->keys[r->nkeys++ % KEYS_REMEMBERED] = key;
  pthread_mutex_unlock(&r->mu);
}

static void rank_lost(remote_rank *r, const char *why) {
  pthread_mutex_lock(&r->mu);
  if (!atomic_load(&r->lost)) snprintf(r->lost_why, sizeof r->lost_why, "%.200s", why);
  atomic_store(&r->lost, 1);
  pthread_mutex_unlock(&r->mu);
}

static int remote_supports(void *ctx, const convd_conv *conv) {
  (void)ctx, (void)conv;
  return 1;
}

#define ADD(field, v) __atomic_fetch_add(&d->st.field, (uint64_t)(v), __ATOMIC_RELAXED)

static int remote_run(void *ctx, const convd_op_io *io, char *err, size_t errlen) {
  remote_dev *d = ctx;
  remote_rank *r = d->r;
  const convd_conv *cv = io->conv;
  const convd_conv_params *p = &cv->p;
  if (atomic_load(&r->lost))
    return convd_errf(err, errlen, CONVD_EREMOTE, "rank %d (%s) was lost: %s", r->rank, r->host,
                      r->lost_why);
  if (io->cancel && atomic_load(io->cancel))
    return convd_errf(err, errlen, CONVD_ECANCELED, "cancelled");
  const size_t x_elems = cv->input_elems, w_elems = cv->weight_elems;
  const size_t b_elems = io->b ? (size_t)p->c_out : 0, y_elems = cv->output_elems;
  int send_w = io->w_key == 0 || !r->caches || !key_sent(r, io->w_key);
  char why[300];
  int rc = 0;
  for (int attempt = 0; attempt < 2; attempt++) {
    const size_t bytes = sizeof(wire_op) + (x_elems + (send_w ? w_elems : 0) + b_elems) * sizeof(float);
    if (bytes > (size_t)INT32_MAX)
      return convd_errf(err, errlen, CONVD_ENOTSUP, "an op of %zu bytes is too large to send", bytes);
    if (bytes > d->cap) {
      char *nb = realloc(d->buf, bytes);
      if (nb == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory for an op's message");
      d->buf = nb;
      d->cap = bytes;
    }
    wire_op *op = (wire_op *)(void *)d->buf;
    memset(op, 0, sizeof *op);
    op->h = (wire_hdr){WIRE_MAGIC, MSG_OP, ++d->seq};
    op->flags = (send_w ? OP_HAS_WEIGHTS : 0) | (io->b ? OP_HAS_BIAS : 0);
    params_to_wire(p, op->params);
    op->w_key = io->w_key;
    op->x_elems = x_elems;
    op->w_elems = send_w ? w_elems : 0;
    op->b_elems = b_elems;
    float *f = (float *)(void *)(op + 1);
    f = gather(f, io->x, p->n, p->c_in, p->h, p->w);
    if (send_w) f = gather(f, io->w, p->c_out, p->c_per_group, p->kh, p->kw);
    if (io->b) memcpy(f, io->b, b_elems * sizeof(float));
    const double deadline = convd_now_seconds() + r->m->op_timeout;
    rc = send_msg(r->m->comm, r->rank, d->tag, d->buf, bytes, deadline, NULL, why, sizeof why);
    size_t len = 0;
    if (rc == 0)
      rc = recv_msg(r->m->comm, r->rank, d->tag, sizeof(wire_reply),
                    sizeof(wire_reply) + y_elems * sizeof(float), &d->rbuf, &d->rcap, &len, deadline,
                    NULL, why, sizeof why);
    if (rc == CONVD_ETIMEDOUT) {
      char lost[300];
      snprintf(lost, sizeof lost, "no answer within --mpi-op-timeout=%g s", r->m->op_timeout);
      rank_lost(r, lost);
      return convd_errf(err, errlen, CONVD_EREMOTE, "rank %d (%s): %s", r->rank, r->host, lost);
    }
    if (rc) return convd_errf(err, errlen, CONVD_EREMOTE, "rank %d (%s): %s", r->rank, r->host, why);
    ADD(bytes_to_device, bytes);
    ADD(bytes_from_device, len);
    const wire_reply *rep = (const wire_reply *)(const void *)d->rbuf;
    if (rep->h.magic != WIRE_MAGIC || rep->h.seq != d->seq)
      return convd_errf(err, errlen, CONVD_EREMOTE, "rank %d (%s): a malformed answer (magic %#x, seq %" PRIu64
                        " for %" PRIu64 ")", r->rank, r->host, rep->h.magic, rep->h.seq, d->seq);
    if (rep->h.kind == MSG_NEED_WEIGHTS && !send_w) {
      send_w = 1; /* it evicted the block: once more, with it */
      continue;
    }
    if (rep->h.kind == MSG_ERROR && len == sizeof *rep) {
      char msg[sizeof rep->err];
      memcpy(msg, rep->err, sizeof msg);
      msg[sizeof msg - 1] = '\0';
      return convd_errf(err, errlen, CONVD_EREMOTE, "rank %d (%s): %s", r->rank, r->host, msg);
    }
    if (rep->h.kind != MSG_RESULT || rep->y_elems != y_elems || len != sizeof *rep + y_elems * sizeof(float))
      return convd_errf(err, errlen, CONVD_EREMOTE, "rank %d (%s): a malformed answer (kind %u, %zu bytes)",
                        r->rank, r->host, rep->h.kind, len);
    /* The tile, dense on the wire, into the op's output view. */
    const float *y = (const float *)(const void *)(rep + 1);
    for (int64_t a = 0; a < p->n; a++)
      for (int64_t c = 0; c < p->c_out; c++)
        for (int64_t h = 0; h < cv->h_out; h++) {
          memcpy(io->y.p + (size_t)a * io->y.ns + (size_t)c * io->y.cs + (size_t)h * io->y.hs, y,
                 (size_t)cv->w_out * sizeof(float));
          y += cv->w_out;
        }
    if (io->w_key) {
      ADD(weight_cache_misses, send_w);
      ADD(weight_cache_hits, !send_w);
      if (send_w) key_add(r, io->w_key);
    }
    if (send_w) ADD(weight_bytes_loaded, w_elems * sizeof(float));
    return 0;
  }
  return convd_errf(err, errlen, CONVD_EREMOTE, "rank %d (%s): asked for weights it was sent", r->rank, r->host);
}
#undef ADD

static void remote_stats(void *ctx, convd_device_stats *out) {
  convd_device_stats_load(&((remote_dev *)ctx)->st, out);
}

static void remote_destroy(void *ctx) {
  remote_dev *d = ctx;
  if (d == NULL) return;
  free(d->buf);
  free(d->rbuf);
  free(d);
}

static const convd_device_iface remote_iface = {
    .supports = remote_supports, .run = remote_run, .flush_cache = NULL, .stats = remote_stats,
    .destroy = remote_destroy};

int convd_mpi_init(int *argc, char ***argv, convd_mpi **out, int *rank, int *size, char *err,
                   size_t errlen) {
  int rc = 0, provided = 0, inited = 0;
  *out = NULL;
  convd_mpi *m = calloc(1, sizeof *m);
  if (m == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  MPI_TRY(MPI_Initialized(&inited));
  if (!inited) MPI_TRY(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
  else MPI_TRY(MPI_Query_thread(&provided));
  /* Errors come back as codes that every call checks, instead of ending the job where they
   * happen. */
  MPI_TRY(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  if (provided < MPI_THREAD_MULTIPLE) {
    rc = convd_errf(err, errlen, CONVD_ENOTSUP,
                    "--mpi: this MPI library gives thread level %d, and the engine's device "
                    "threads need MPI_THREAD_MULTIPLE (%d): use an MPI built with it (Debian's "
                    "Open MPI is)", provided, MPI_THREAD_MULTIPLE);
    abort_job(MPI_COMM_WORLD, 2);
    goto out;
  }
  MPI_TRY(MPI_Comm_dup(MPI_COMM_WORLD, &m->comm));
  MPI_TRY(MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN));
  MPI_TRY(MPI_Comm_rank(m->comm, &m->rank));
  MPI_TRY(MPI_Comm_size(m->comm, &m->size));
  *rank = m->rank;
  *size = m->size;
  *out = m;
  return 0;
out:
  free(m);
  return rc;
}

int convd_mpi_remote_devices(convd_mpi *m, const convd_config *cfg, convd_device ***devs, int *n,
                             char *err, size_t errlen) {
  *devs = NULL;
  *n = 0;
  m->op_timeout = cfg->mpi_op_timeout;
  if (m->size < 2) return 0;
  int rc = 0;
  const int workers = m->size - 1;
  m->ranks = calloc((size_t)workers, sizeof *m->ranks);
  convd_device **out = calloc((size_t)workers * MAX_RANK_DEVICES, sizeof *out);
  char *buf = NULL;
  size_t cap = 0, len = 0;
  int nd = 0;
  if (m->ranks == NULL || out == NULL) {
    rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
    goto out;
  }
  for (int i = 0; i < workers; i++) {
    m->ranks[i].m = m;
    m->ranks[i].rank = i + 1;
    pthread_mutex_init(&m->ranks[i].mu, NULL);
    atomic_init(&m->ranks[i].lost, 0);
  }
  const double deadline = convd_now_seconds() + cfg->mpi_op_timeout;
  for (int got = 0; got < workers; got++) {
    char why[300];
    rc = recv_msg(m->comm, MPI_ANY_SOURCE, TAG_HELLO, offsetof(wire_hello, dev), sizeof(wire_hello),
                  &buf, &cap, &len, deadline, NULL, why, sizeof why);
    if (rc == CONVD_ETIMEDOUT)
      rc = convd_errf(err, errlen, CONVD_EUNAVAIL,
                      "--mpi: %d of %d worker ranks said hello within --mpi-op-timeout=%g s", got,
                      workers, cfg->mpi_op_timeout);
    else if (rc)
      rc = convd_errf(err, errlen, rc, "--mpi: waiting for the worker ranks: %s", why);
    if (rc) goto out;
    wire_hello *h = (wire_hello *)(void *)buf;
    h->host[sizeof h->host - 1] = '\0';
    h->convd_version[sizeof h->convd_version - 1] = '\0';
    if (h->h.magic != WIRE_MAGIC || h->h.kind != MSG_HELLO || h->version != WIRE_VERSION ||
        h->ndev < 1 || h->ndev > MAX_RANK_DEVICES ||
        len != offsetof(wire_hello, dev) + (size_t)h->ndev * sizeof(wire_dev) ||
        h->h.seq < 1 || h->h.seq >= (uint64_t)m->size) {
      rc = convd_errf(err, errlen, CONVD_EREMOTE, "--mpi: a malformed hello (%zu bytes)", len);
      goto out;
    }
    if (strcmp(h->convd_version, CONVD_VERSION) != 0) {
      rc = convd_errf(err, errlen, CONVD_EINVAL, "--mpi: rank %d runs convd %s, rank 0 %s",
                      (int)h->h.seq, h->convd_version, CONVD_VERSION);
      goto out;
    }
    remote_rank *r = &m->ranks[h->h.seq - 1];
    if (r->host[0]) {
      rc = convd_errf(err, errlen, CONVD_EREMOTE, "--mpi: rank %d said hello twice", r->rank);
      goto out;
    }
    snprintf(r->host, sizeof r->host, "%s", h->host[0] ? h->host : "?");
    r->caches = h->weights_cache > 0;
    for (int k = 0; k < h->ndev; k++) {
      wire_dev *wd = &h->dev[k];
      wd->name[sizeof wd->name - 1] = wd->detail[sizeof wd->detail - 1] = '\0';
      convd_device *dv = calloc(1, sizeof *dv);
      remote_dev *ctx = calloc(1, sizeof *ctx);
      if (dv == NULL || ctx == NULL) {
        free(dv), free(ctx);
        rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
        goto out;
      }
      ctx->r = r;
      ctx->tag = TAG_OP_BASE + k;
      dv->iface = &remote_iface;
      dv->ctx = ctx;
      dv->kind = wd->kind == CONVD_DEVICE_CUDA || wd->kind == CONVD_DEVICE_REFERENCE ? wd->kind : CONVD_DEVICE_CPU;
      dv->memory_budget = wd->memory_budget < REMOTE_BUDGET_MAX ? wd->memory_budget : REMOTE_BUDGET_MAX;
      if (dv->memory_budget < 4096) dv->memory_budget = 4096;
      snprintf(dv->name, sizeof dv->name, "rank%d:%.40s", r->rank, wd->name);
      snprintf(dv->detail, sizeof dv->detail, "rank %d on %.40s: %s", r->rank, r->host, wd->detail);
      out[nd++] = dv;
      convd_log(CONVD_LOG_INFO, "msg=\"mpi remote device\" rank=%d host=%s name=%s memory_bytes=%llu",
                r->rank, r->host, dv->name, (unsigned long long)dv->memory_budget);
    }
  }
out:
  free(buf);
  if (rc) {
    for (int i = 0; i < nd; i++) convd_device_destroy(out[i]);
    free(out);
    return rc;
  }
  *devs = out;
  *n = nd;
  return 0;
}

int convd_mpi_finish(convd_mpi *m, int status) {
  if (m == NULL) return status;
  int lost = 0;
  for (int i = 0; m->ranks && i < m->size - 1; i++)
    if (atomic_load(&m->ranks[i].lost)) {
      lost = 1;
      fprintf(stderr, "convd: --mpi: rank %d (%s) was lost (%s); Open MPI cannot finish a job with a "
              "lost rank, so every rank is aborted\n", m->ranks[i].rank, m->ranks[i].host,
              m->ranks[i].lost_why);
      convd_log(CONVD_LOG_ERROR, "msg=\"mpi rank lost: aborting the job\" rank=%d host=%s why=\"%s\"",
                m->ranks[i].rank, m->ranks[i].host, m->ranks[i].lost_why);
    }
  if (lost) abort_job(m->comm, 3);
  char err[300];
  int failed = 0;
  for (int r = 1; r < m->size; r++) {
    wire_hdr stop = {WIRE_MAGIC, MSG_STOP, 0};
    if (send_msg(m->comm, r, TAG_CONTROL, &stop, sizeof stop, convd_now_seconds() + 30, NULL, err,
                 sizeof err)) {
      fprintf(stderr, "convd: --mpi: cannot tell rank %d to stop (%s): aborting every rank\n", r, err);
      failed = 1;
    }
  }
  if (failed) abort_job(m->comm, 3);
  for (int i = 0; m->ranks && i < m->size - 1; i++) pthread_mutex_destroy(&m->ranks[i].mu);
  free(m->ranks);
  if (MPI_Comm_free(&m->comm) != MPI_SUCCESS) fprintf(stderr, "convd: --mpi: MPI_Comm_free failed\n");
  if (MPI_Finalize() != MPI_SUCCESS) {
    fprintf(stderr, "convd: --mpi: MPI_Finalize failed\n");
    if (status == 0) status = 1;
  }
  convd_log(CONVD_LOG_INFO, "msg=\"mpi: every rank told to stop\" status=%d", status);
  free(m);
  return status;
}

/* ---- worker ranks ------------------------------------------------------------------------ */

typedef struct wc_entry {
  uint64_t key;
  size_t elems;
  float *w; /* NULL: free */
  unsigned refs;
  uint64_t last_use;
} wc_entry;

typedef struct worker {
  convd_mpi *m;
  const convd_config *cfg;
  convd_device **devs;
  int ndev, nopened; /* offered to rank 0; opened (destroyed at the end) */
  atomic_int stop;
  atomic_llong ops_run; /* on this rank, for --mpi-test-fail-after */
  pthread_mutex_t wmu;  /* the weight cache: wc, wc_bytes, tick */
  wc_entry wc[WCACHE_MAX_ENTRIES];
  uint64_t wc_bytes, tick;
} worker;

typedef struct worker_dev {
  worker *w;
  int index;
  pthread_t thread;
  char *buf, *out; /* the op received; the answer */
  size_t cap, out_cap;
  size_t max_out; /* the largest answer: as large as the largest op message */
  int status; /* 0, or the MPI error that ended the thread */
  char why[300];
} worker_dev;

static const float *wc_acquire(worker *w, uint64_t key, size_t elems) {
  const float *p = NULL;
  pthread_mutex_lock(&w->wmu);
  for (int i = 0; i < WCACHE_MAX_ENTRIES && !p; i++)
    if (w->wc[i].w && w->wc[i].key == key && w->wc[i].elems == elems) {
      w->wc[i].refs++;
      w->wc[i].last_use = ++w->tick;
      p = w->wc[i].w;
    }
  pthread_mutex_unlock(&w->wmu);
  return p;
}

static void wc_release(worker *w, const float *p) {
  pthread_mutex_lock(&w->wmu);
  for (int i = 0; i < WCACHE_MAX_ENTRIES; i++)
    if (w->wc[i].w == p && w->wc[i].refs > 0) {
      w->wc[i].refs--;
      break;
    }
  pthread_mutex_unlock(&w->wmu);
}

/* Keeps a copy of the block under key, evicting the least recently used unheld ones to make room
 * within --mpi-weights-cache. Nothing when it does not fit. */
static void wc_insert(worker *w, uint64_t key, const float *src, size_t elems) {
  const uint64_t bytes = (uint64_t)elems * sizeof(float), limit = w->cfg->mpi_weights_cache;
  if (key == 0 || bytes > limit) return;
  pthread_mutex_lock(&w->wmu);
  for (int i = 0; i < WCACHE_MAX_ENTRIES; i++)
    if (w->wc[i].w && w->wc[i].key == key && w->wc[i].elems == elems) goto out; /* raced: kept */
  for (int round = 0; round < WCACHE_MAX_ENTRIES; round++) {
    int free_slot = -1, victim = -1;
    for (int i = 0; i < WCACHE_MAX_ENTRIES; i++) {
      if (w->wc[i].w == NULL) {
        if (free_slot < 0) free_slot = i;
      } else if (w->wc[i].refs == 0 && (victim < 0 || w->wc[i].last_use < w->wc[victim].last_use)) {
        victim = i;
      }
    }
    if (free_slot >= 0 && w->wc_bytes + bytes <= limit) {
      float *copy = malloc(bytes);
      if (copy == NULL) goto out;
      memcpy(copy, src, bytes);
      w->wc[free_slot] = (wc_entry){key, elems, copy, 0, ++w->tick};
      w->wc_bytes += bytes;
      goto out;
    }
    if (victim < 0) goto out; /* everything held: not cached */
    w->wc_bytes -= (uint64_t)w->wc[victim].elems * sizeof(float);
    free(w->wc[victim].w);
    memset(&w->wc[victim], 0, sizeof w->wc[victim]);
  }
out:
  pthread_mutex_unlock(&w->wmu);
}

/* Checks and runs one op message (len bytes in wd->buf); fills the answer in wd->out. Returns
 * the answer's length. */
static size_t serve_op(worker_dev *wd, size_t len) {
  worker *w = wd->w;
  convd_device *dev = w->devs[wd->index];
  const wire_op *op = (const wire_op *)(const void *)wd->buf;
  wire_reply *rep = (wire_reply *)(void *)wd->out;
  memset(rep, 0, sizeof *rep);
  rep->h = (wire_hdr){WIRE_MAGIC, MSG_ERROR, op->h.seq};
  char *err = rep->err;
  const size_t errlen = sizeof rep->err;
  convd_conv_params p;
  convd_conv conv;
  const int has_w = (op->flags & OP_HAS_WEIGHTS) != 0, has_b = (op->flags & OP_HAS_BIAS) != 0;
  if (op->h.magic != WIRE_MAGIC || op->h.kind != MSG_OP || (op->flags & ~3u) != 0) {
    rep->status = convd_errf(err, errlen, CONVD_EINVAL, "a malformed op message");
    return sizeof *rep;
  }
  if (params_from_wire(op->params, &p) || convd_conv_init(&conv, &p, err, errlen) != 0 ||
      p.transposed || p.has_bias != has_b) {
    if (!err[0]) snprintf(err, errlen, "an op message with bad parameters");
    rep->status = CONVD_EINVAL;
    return sizeof *rep;
  }
  const size_t b_elems = has_b ? (size_t)p.c_out : 0;
  /* Each tensor is bounded by the message before the sum is formed: convd_conv_init only bounds
   * each alone, and a sum of three may wrap. */
  const size_t room = (len - sizeof *op) / sizeof(float);
  if (conv.input_elems > room || (has_w ? conv.weight_elems : 0) > room || b_elems > room ||
      op->x_elems != conv.input_elems || op->w_elems != (has_w ? conv.weight_elems : 0) ||
      op->b_elems != b_elems ||
      len != sizeof *op + (conv.input_elems + (has_w ? conv.weight_elems : 0) + b_elems) * sizeof(float)) {
    rep->status = convd_errf(err, errlen, CONVD_EINVAL, "an op message of %zu bytes does not match its header", len);
    return sizeof *rep;
  }
  const long long fail_after = w->cfg->mpi_test_fail_after;
  if (atomic_fetch_add(&w->ops_run, 1) >= fail_after && fail_after > 0) {
    rep->status = convd_errf(err, errlen, CONVD_EDEVICE,
                             "--mpi-test-fail-after=%lld: rank %d fails every op after its first %lld (a test)",
                             fail_after, w->m->rank, fail_after);
    return sizeof *rep;
  }
  const float *x = (const float *)(const void *)(op + 1);
  const float *wt = has_w ? x + conv.input_elems : NULL;
  const float *b = has_b ? x + conv.input_elems + (has_w ? conv.weight_elems : 0) : NULL;
  const float *held = NULL;
  if (wt == NULL) {
    if (op->w_key == 0 || (held = wc_acquire(w, op->w_key, conv.weight_elems)) == NULL) {
      rep->h.kind = MSG_NEED_WEIGHTS;
      return sizeof *rep;
    }
    wt = held;
  } else {
    wc_insert(w, op->w_key, wt, conv.weight_elems);
  }
  /* The output, bounded as the message was (padding can make it far larger than the input) and
   * within MPI's int count. */
  if (conv.output_elems > (wd->max_out - sizeof *rep) / sizeof(float)) {
    if (held) wc_release(w, held);
    rep->status = convd_errf(err, errlen, CONVD_EINVAL, "an op whose output (%zu elements) exceeds rank %d's "
                             "bound of %zu bytes", conv.output_elems, w->m->rank, wd->max_out);
    return sizeof *rep;
  }
  const size_t out_len = sizeof *rep + conv.output_elems * sizeof(float);
  if (out_len > wd->out_cap) {
    char *nb = realloc(wd->out, out_len);
    if (nb == NULL) {
      if (held) wc_release(w, held);
      rep->status = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory for an op's output on rank %d", w->m->rank);
      return sizeof *rep;
    }
    wd->out = nb;
    wd->out_cap = out_len;
    rep = (wire_reply *)(void *)wd->out;
    err = rep->err;
  }
  float *y = (float *)(void *)(rep + 1);
  convd_op_io io = convd_op_io_dense(&conv, x, wt, op->w_key, b, y, NULL);
  char derr[256] = "";
  int rc = convd_device_run(dev, &io, derr, sizeof derr);
  if (held) wc_release(w, held);
  if (rc) {
    rep->status = rc;
    snprintf(err, errlen, "%s: %s", convd_device_name(dev), derr);
    return sizeof *rep;
  }
  rep->h.kind = MSG_RESULT;
  rep->y_elems = conv.output_elems;
  return out_len;
}

static void *worker_dev_main(void *arg) {
  worker_dev *wd = arg;
  worker *w = wd->w;
  const int tag = TAG_OP_BASE + wd->index;
  const size_t budget = (size_t)convd_device_memory_budget(w->devs[wd->index]);
  /* An op is planned within the smallest budget, this device's included (capped as rank 0 caps
   * it), so its message is within that; the bound leaves room for an op the planner could not
   * cut that small, and stays below MPI's int count. */
  const size_t b = budget < REMOTE_BUDGET_MAX ? budget : REMOTE_BUDGET_MAX;
  const size_t hi = sizeof(wire_op) + (4 * b > (64u << 20) ? 4 * b : (64u << 20)) + (1u << 20);
  wd->max_out = hi;
  wd->out = calloc(1, sizeof(wire_reply));
  wd->out_cap = wd->out ? sizeof(wire_reply) : 0;
  while (wd->out && !atomic_load(&w->stop)) {
    size_t len = 0;
    int rc = recv_msg(w->m->comm, 0, tag, sizeof(wire_op), hi, &wd->buf, &wd->cap, &len, 0, &w->stop,
                      wd->why, sizeof wd->why);
    if (rc == CONVD_ETIMEDOUT) break; /* stop */
    size_t out_len;
    if (rc == CONVD_EREMOTE || rc == CONVD_ENOMEM) { /* a bad size, consumed: answer it */
      wire_reply *rep = (wire_reply *)(void *)wd->out;
      memset(rep, 0, sizeof *rep);
      rep->h = (wire_hdr){WIRE_MAGIC, MSG_ERROR, 0};
      rep->status = rc;
      snprintf(rep->err, sizeof rep->err, "%.200s", wd->why);
      out_len = sizeof *rep;
    } else if (rc) {
      wd->status = rc;
      break;
    } else {
      out_len = serve_op(wd, len);
    }
    rc = send_msg(w->m->comm, 0, tag, wd->out, out_len, 0, &w->stop, wd->why, sizeof wd->why);
    if (rc && rc != CONVD_ETIMEDOUT) {
      wd->status = rc;
      break;
    }
  }
  if (wd->out == NULL) {
    wd->status = CONVD_ENOMEM;
    snprintf(wd->why, sizeof wd->why, "out of memory");
  }
  return NULL;
}

int convd_mpi_worker_main(convd_mpi *m, const convd_config *cfg) {
  /* A worker outlives SIGTERM from mpirun (which forwards it to every rank): rank 0 drains and
   * then tells it to stop. */
  signal(SIGTERM, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  char err[512] = "";
  int rc = 0, status = 0;
  m->op_timeout = cfg->mpi_op_timeout;
  worker *w = calloc(1, sizeof *w);
  worker_dev *wds = NULL;
  wire_hello *h = calloc(1, sizeof *h);
  int started = 0;
  if (w == NULL || h == NULL) {
    fprintf(stderr, "convd: rank %d: out of memory\n", m->rank);
    abort_job(m->comm, 1);
  }
  w->m = m;
  w->cfg = cfg;
  atomic_init(&w->stop, 0);
  atomic_init(&w->ops_run, 0);
  pthread_mutex_init(&w->wmu, NULL);
  convd_engine_opts eo = {.cpu_devices = cfg->cpu_devices,
                          .cpu_threads = cfg->cpu_threads,
                          .reference = strcmp(cfg->cpu_kernel, "reference") == 0,
                          .device_memory = cfg->device_memory,
                          .gpus = cfg->gpus,
                          .gpu_memory = cfg->gpu_memory,
                          .gpu_instances = cfg->gpu_streams};
  if ((rc = convd_engine_open_devices(&eo, &w->devs, &w->ndev, err, sizeof err))) {
    fprintf(stderr, "convd: rank %d: %s\n", m->rank, err);
    abort_job(m->comm, 1); /* rank 0 would wait for its hello */
  }
  w->nopened = w->ndev;
  if (w->ndev > MAX_RANK_DEVICES) w->ndev = MAX_RANK_DEVICES; /* the rest are not offered */
  h->h = (wire_hdr){WIRE_MAGIC, MSG_HELLO, (uint64_t)m->rank};
  h->version = WIRE_VERSION;
  h->ndev = w->ndev;
  h->weights_cache = cfg->mpi_weights_cache;
  if (gethostname(h->host, sizeof h->host - 1) != 0) snprintf(h->host, sizeof h->host, "?");
  snprintf(h->convd_version, sizeof h->convd_version, "%s", CONVD_VERSION);
  for (int i = 0; i < w->ndev; i++) {
    h->dev[i].kind = convd_device_kind(w->devs[i]);
    h->dev[i].memory_budget = convd_device_memory_budget(w->devs[i]);
    snprintf(h->dev[i].name, sizeof h->dev[i].name, "%s", convd_device_name(w->devs[i]));
    snprintf(h->dev[i].detail, sizeof h->dev[i].detail, "%s", convd_device_detail(w->devs[i]));
    convd_log(CONVD_LOG_INFO, "msg=\"mpi worker device\" rank=%d host=%s name=%s detail=\"%s\"",
              m->rank, h->host, h->dev[i].name, h->dev[i].detail);
  }
  wds = calloc((size_t)w->ndev, sizeof *wds);
  if (wds == NULL) {
    fprintf(stderr, "convd: rank %d: out of memory\n", m->rank);
    abort_job(m->comm, 1);
  }
  for (int i = 0; i < w->ndev; i++) {
    wds[i] = (worker_dev){.w = w, .index = i};
    if (pthread_create(&wds[i].thread, NULL, worker_dev_main, &wds[i]) != 0) {
      fprintf(stderr, "convd: rank %d: cannot start a device thread\n", m->rank);
      abort_job(m->comm, 1);
    }
    started++;
  }
  if ((rc = send_msg(m->comm, 0, TAG_HELLO, h, offsetof(wire_hello, dev) + (size_t)w->ndev * sizeof(wire_dev),
                     0, NULL, err, sizeof err))) {
    fprintf(stderr, "convd: rank %d: cannot reach rank 0: %s\n", m->rank, err);
    abort_job(m->comm, 1);
  }
  /* Until rank 0 says stop. */
  char *cbuf = NULL;
  size_t ccap = 0, clen = 0;
  for (;;) {
    rc = recv_msg(m->comm, 0, TAG_CONTROL, sizeof(wire_hdr), sizeof(wire_hdr), &cbuf, &ccap, &clen, 0,
                  NULL, err, sizeof err);
    if (rc == 0 && ((wire_hdr *)(void *)cbuf)->kind == MSG_STOP) break;
    if (rc) {
      fprintf(stderr, "convd: rank %d: waiting for rank 0: %s\n", m->rank, err);
      status = 1;
      break;
    }
  }
  free(cbuf);
  atomic_store(&w->stop, 1);
  for (int i = 0; i < started; i++) {
    pthread_join(wds[i].thread, NULL);
    if (wds[i].status) {
      fprintf(stderr, "convd: rank %d: device %d: %s\n", m->rank, i, wds[i].why);
      status = 1;
    }
    free(wds[i].buf);
    free(wds[i].out);
  }
  convd_log(CONVD_LOG_INFO, "msg=\"mpi worker stopping\" rank=%d ops=%lld status=%d", m->rank,
            (long long)atomic_load(&w->ops_run), status);
  for (int i = 0; i < w->nopened; i++) convd_device_destroy(w->devs[i]);
  free(w->devs);
  for (int i = 0; i < WCACHE_MAX_ENTRIES; i++) free(w->wc[i].w);
  pthread_mutex_destroy(&w->wmu);
  free(w);
  free(wds);
  free(h);
  if (MPI_Comm_free(&m->comm) != MPI_SUCCESS) {
    fprintf(stderr, "convd: rank %d: MPI_Comm_free failed\n", m->rank);
    status = 1;
  }
  if (MPI_Finalize() != MPI_SUCCESS) {
    fprintf(stderr, "convd: rank %d: MPI_Finalize failed\n", m->rank);
    status = 1;
  }
  free(m);
  return status;
}
