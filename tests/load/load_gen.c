/* load_gen: a bounded load generator for convd (a tool, not a test): many clients at once, mixed
 * calls, every result checked against the reference convolution, the daemon's memory sampled
 * over time, everything printed as markdown tables.
 *
 *   load_gen [--server HOST:PORT [--pid PID]] [--clients N] [--connections K]
 *            [--duration SECONDS] [--seed S] [--max-calls N] [--sample-seconds S] [--cases N]
 *            [--large-every N] [--large-slots N] [--call-timeout SECONDS]
 *            [--allow-status NAME]... [--daemon-arg ARG]...
 *
 * Without --server it starts the daemon it was built with on 127.0.0.1 (port 0, its defaults plus
 * any --daemon-arg) and samples that daemon's VmRSS / VmHWM from /proc/PID/status; with --server,
 * --pid names the daemon to sample (none when absent). The run stops at --duration seconds or
 * --max-calls calls, whichever comes first (a call in flight then finishes, bounded by
 * --call-timeout), or at SIGINT.
 *
 * The calls: a pool of --cases random small convolutions (forward and transposed; N 1-2, C 1-32,
 * H/W 4-64, kernels 1-5, stride, padding, dilation 1-2 / 0-2 / 1-2, groups dividing C, bias or
 * not; at most 16M multiply-adds each) is drawn from --seed, and the reference output of each is
 * computed once before the load starts, so on a 2-core machine the clients spend their time on
 * calls rather than on the reference. Each call picks a case and a kind: Conv2dUnary (when the
 * case fits one message) or streaming Conv2d; about one call in --large-every (default 400) is
 * instead a 1x16x512x512 16->16 3x3 call that the daemon's default 64M op budget cuts into two
 * tiles (16 MiB each way, streamed in bands, so the daemon's read pausing and HTTP/2 flow control
 * are exercised), at most --large-slots (default 2) of them in flight; about one in 100 is a
 * health Check or a ListDevices. Clients use chunk sizes of 1 MiB, 64 KiB and 4 KiB in turn.
 * Registered weights (PutWeights / weights_id) are not exercised: libconvd_client has no call for
 * them yet. Every convolution's output is poisoned with NaN before the call and compared element
 * by element with the reference: |got - want| <= 1e-4 * max(1, max|want|) (tests/golden's
 * tolerance for float32); a miss is a "wrong" call and its first bad element is printed.
 *
 * Exit status: 0 when every call was right and none failed with a status outside
 * --allow-status (e.g. RESOURCE_EXHAUSTED against a daemon with tight admission limits), and the
 * daemon started here exited 0 after SIGTERM; 1 otherwise; 2 for bad usage.
 *
 * Threads: the main thread parses options, builds the pool (the reference outputs on up to
 * nproc helper threads, each taking the next case from an atomic index), starts the daemon,
 * starts the clients, samples RSS every --sample-seconds until they have all ended, then prints.
 * Each client thread (--clients, default 8) owns one convd_client, so one gRPC channel, and its
 * RNG, latencies and counters, which the main thread reads only after joining it. The channels
 * ride --connections TCP connections (default: one per client; see main for how). Shared while clients run: the pool
 * (read-only), the large-call slots (large_mu), the call counters and the stop flag (atomics),
 * and stderr (one fprintf per message). */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "client_params.h"
#include "clock.h"
#include "conv.h"
#include "daemon.h"
#include "ref.h"
#include "testutil.h"

#define MAX_CLIENTS 1024
#define MAX_CASE_MACS (16u << 20)
/* Clients' message limits are 4 MiB less 256 bytes times (client index % --connections), see
 * main; a unary case must fit the smallest of them and the daemon's 4 MiB, framing included. */
#define UNARY_LIMIT (7u << 19)
#define LIMIT_STEP 256
#define MAX_CONNECTIONS 1024
#define MAX_WRONG_PRINTED 20

/* ---- call kinds and gRPC status names -------------------------------------------------- */

enum { K_UNARY, K_STREAM, K_UNARY_T, K_STREAM_T, K_LARGE, K_HEALTH, K_LIST, NKINDS };
static const char *const kind_names[NKINDS] = {
    "Conv2dUnary", "Conv2d (streaming)", "Conv2dUnary transpose", "Conv2d transpose (streaming)",
    "Conv2d 1x16x512x512 16->16 3x3 (2 tiles)", "Health Check", "ListDevices"};

/* gRPC's status codes (a stable part of its wire protocol), by number; NSTATUS + 0 stands for a
 * failure before any call (the client could not be created). */
#define NSTATUS 17
#define ST_LOCAL NSTATUS
static const char *const status_names[NSTATUS + 1] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    "(no call: client not created)"};

static int status_by_name(const char *s) {
  for (int i = 0; i < NSTATUS; i++)
    if (strcmp(s, status_names[i]) == 0) return i;
  return -1;
}

/* ---- the case pool --------------------------------------------------------------------- */

typedef struct lcase {
  convd_client_conv_params p;
  convd_conv conv;
  float *x, *w, *b, *want; /* want: the reference output */
  float tol;               /* 1e-4 * max(1, max|want|) */
  int unary_ok;            /* request and response each fit one message */
  char desc[192];
} lcase;

static lcase *pool;
static int npool;
static lcase large; /* the tiled call */

static void describe(lcase *c) {
  const convd_client_conv_params *p = &c->p;
  snprintf(c->desc, sizeof c->desc,
           "%s %lldx%lldx%lldx%lld -> %lld, k %lldx%lld, stride %lld,%lld, pad %lld,%lld,%lld,%lld, "
           "dil %lld,%lld, groups %lld%s",
           p->transposed ? "transpose" : "conv", (long long)p->n, (long long)p->c_in,
           (long long)p->h, (long long)p->w, (long long)p->c_out, (long long)p->kh,
           (long long)p->kw, (long long)p->stride_h, (long long)p->stride_w,
           (long long)p->pad_top, (long long)p->pad_bottom, (long long)p->pad_left,
           (long long)p->pad_right, (long long)p->dil_h, (long long)p->dil_w, (long long)p->groups,
           p->has_bias ? ", bias" : "");
  if (p->transposed) {
    size_t at = strlen(c->desc);
    snprintf(c->desc + at, sizeof c->desc - at, ", output padding %lld,%lld",
             (long long)p->out_pad_h, (long long)p->out_pad_w);
  }
}

/* Draws a convolution the daemon must accept: random parameters, redrawn until the descriptor
 * check passes and the work is small. Returns 0, or -1 when 10000 draws all failed. */
static int draw_case(rng *r, lcase *c) {
  for (int tries = 0; tries < 10000; tries++) {
    convd_client_conv_params p;
    convd_client_conv_params_default(&p);
    p.transposed = rng_range(r, 0, 3) == 0;
    p.n = rng_range(r, 1, 2);
    p.c_in = rng_range(r, 1, 32);
    int64_t g = 1;
    switch (rng_range(r, 0, 3)) {
      case 2: g = p.c_in; break; /* depthwise */
      case 3: /* any divisor */
        do g = rng_range(r, 1, p.c_in);
        while (p.c_in % g != 0);
        break;
      default: break;
    }
    p.groups = g;
    p.c_per_group = p.c_in / g;
    p.c_out = g * rng_range(r, 1, 32 / g > 1 ? 32 / g : 1);
    p.h = rng_range(r, 4, 64);
    p.w = rng_range(r, 4, 64);
    p.kh = rng_range(r, 1, 5);
    p.kw = rng_range(r, 0, 2) == 0 ? rng_range(r, 1, 5) : p.kh;
    p.stride_h = rng_range(r, 1, 2);
    p.stride_w = rng_range(r, 1, 2);
    p.dil_h = rng_range(r, 1, 2);
    p.dil_w = rng_range(r, 1, 2);
    if (p.transposed) { /* PyTorch's symmetric padding, output padding below stride or dilation */
      p.pad_top = p.pad_bottom = rng_range(r, 0, 2);
      p.pad_left = p.pad_right = rng_range(r, 0, 2);
      int64_t mh = p.stride_h > p.dil_h ? p.stride_h : p.dil_h;
      int64_t mw = p.stride_w > p.dil_w ? p.stride_w : p.dil_w;
      p.out_pad_h = rng_range(r, 0, mh - 1);
      p.out_pad_w = rng_range(r, 0, mw - 1);
    } else {
      p.pad_top = rng_range(r, 0, 2), p.pad_bottom = rng_range(r, 0, 2);
      p.pad_left = rng_range(r, 0, 2), p.pad_right = rng_range(r, 0, 2);
    }
    p.has_bias = rng_range(r, 0, 3) != 0;
    convd_conv_params e;
    convd_client_params_to_conv(&p, &e);
    char err[256];
    if (convd_conv_init(&c->conv, &e, err, sizeof err) != 0) continue;
    if (c->conv.macs > MAX_CASE_MACS) continue;
    c->p = p;
    return 0;
  }
  return -1;
}

/* Allocates and fills the tensors of c from r. Returns 0 or -1 (out of memory). */
static int fill_case(rng *r, lcase *c) {
  c->x = malloc(c->conv.input_bytes);
  c->w = malloc(c->conv.weight_bytes);
  c->b = c->p.has_bias ? malloc(c->conv.bias_bytes) : NULL;
  c->want = malloc(c->conv.output_bytes);
  if (!c->x || !c->w || (c->p.has_bias && !c->b) || !c->want) return -1;
  rng_fill(r, c->x, c->conv.input_elems);
  rng_fill(r, c->w, c->conv.weight_elems);
  if (c->b) rng_fill(r, c->b, c->conv.bias_elems);
  const size_t in = c->conv.input_wire_bytes + c->conv.weight_wire_bytes + c->conv.bias_wire_bytes;
  c->unary_ok = in < UNARY_LIMIT && c->conv.output_wire_bytes < UNARY_LIMIT;
  describe(c);
  return 0;
}

static void free_case(lcase *c) { free(c->x), free(c->w), free(c->b), free(c->want); }

/* The reference output and the tolerance of one case. Returns 0 or a negative code. */
static int reference(lcase *c) {
  int rc = c->p.transposed ? convd_ref_conv_transpose2d(&c->conv, c->x, c->w, c->b, c->want, NULL)
                           : convd_ref_conv2d(&c->conv, c->x, c->w, c->b, c->want, NULL);
  if (rc) return rc;
  float m = 1;
  for (size_t i = 0; i < c->conv.output_elems; i++)
    if (fabsf(c->want[i]) > m) m = fabsf(c->want[i]);
  c->tol = 1e-4f * m;
  return 0;
}

/* The reference runs on helper threads: each takes the next case (index npool is the large one). */
static atomic_int ref_next;
static atomic_int ref_failed;

static void *ref_main(void *arg) {
  (void)arg;
  for (;;) {
    int i = atomic_fetch_add(&ref_next, 1);
    if (i > npool) return NULL;
    if (reference(i == npool ? &large : &pool[i]) != 0) atomic_store(&ref_failed, 1);
  }
}

static int build_pool(uint64_t seed, int ncases) {
  rng r = {seed * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL}; /* never zero for xorshift */
  pool = calloc((size_t)ncases, sizeof *pool);
  if (pool == NULL) return -1;
  npool = ncases;
  for (int i = 0; i < ncases; i++)
    if (draw_case(&r, &pool[i]) || fill_case(&r, &pool[i])) return -1;
  convd_client_conv_params p;
  convd_client_conv_params_default(&p);
  p.n = 1, p.c_in = 16, p.h = 512, p.w = 512, p.c_out = 16, p.c_per_group = 16, p.kh = p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1, p.groups = 1, p.has_bias = 1;
  convd_conv_params e;
  convd_client_params_to_conv(&p, &e);
  char err[256];
  if (convd_conv_init(&large.conv, &e, err, sizeof err)) return -1;
  large.p = p;
  if (fill_case(&r, &large)) return -1;

  long nproc = sysconf(_SC_NPROCESSORS_ONLN);
  int nth = nproc < 1 ? 1 : nproc > 16 ? 16 : (int)nproc;
  pthread_t th[16];
  int started = 0;
  for (int i = 0; i < nth; i++) {
    if (pthread_create(&th[i], NULL, ref_main, NULL) != 0) break;
    started++;
  }
  if (started == 0) ref_main(NULL); /* no helper thread: do it here */
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
  return atomic_load(&ref_failed) ? -1 : 0;
}

/* ---- shared run state ------------------------------------------------------------------ */

static const char *target;
static double t_start, t_end;
static long max_calls;
static double call_timeout = 120;
static int large_every = 400, large_slots = 2;
static int allowed[NSTATUS];

static atomic_long calls_started, calls_done;
static atomic_int in_flight, in_flight_max, clients_running;
static volatile sig_atomic_t interrupted;
static atomic_int wrong_printed;

static pthread_mutex_t large_mu = PTHREAD_MUTEX_INITIALIZER;
static float **large_y;   /* large_slots output buffers */
static int *large_in_use; /* guarded by large_mu */

static void on_sigint(int sig) {
  (void)sig;
  interrupted = 1;
}

/* Takes a free large-call output buffer; -1 when all are in use (the client then makes a small
 * call instead, so the large calls stay bounded without anyone waiting). */
static int large_take(void) {
  int slot = -1;
  if (pthread_mutex_lock(&large_mu) != 0) return -1;
  for (int i = 0; i < large_slots && slot < 0; i++)
    if (!large_in_use[i]) large_in_use[i] = 1, slot = i;
  pthread_mutex_unlock(&large_mu);
  return slot;
}

static void large_give(int slot) {
  if (pthread_mutex_lock(&large_mu) != 0) abort(); /* cannot fail on a default mutex */
  large_in_use[slot] = 0;
  pthread_mutex_unlock(&large_mu);
}

/* ---- one client ------------------------------------------------------------------------ */

typedef struct samples {
  double *v;
  size_t n, cap;
} samples;

static int samples_add(samples *s, double x) {
  if (s->n == s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 1024;
    double *v = realloc(s->v, cap * sizeof *v);
    if (v == NULL) return -1;
    s->v = v, s->cap = cap;
  }
  s->v[s->n++] = x;
  return 0;
}

typedef struct client {
  int index;
  size_t chunk_bytes, max_message_bytes;
  rng r;
  float *y; /* room for the largest output of the pool */
  long calls, wrong;
  long kind_calls[NKINDS], kind_wrong[NKINDS], kind_errors[NKINDS];
  samples lat[NKINDS];
  long status_count[NSTATUS + 1];
  double status_first_t[NSTATUS + 1]; /* when its first message came, seconds from the start */
  char status_first[NSTATUS + 1][480]; /* the message (cut at 400 bytes) and its kind */
  int oom;
} client;

/* kind -1: no call was made (the client could not be created). */
static void note_error(client *cl, int kind, int status, const char *msg) {
  if (status < 0 || status > NSTATUS) status = ST_LOCAL;
  if (kind >= 0) cl->kind_errors[kind]++;
  if (cl->status_count[status]++ == 0) {
    cl->status_first_t[status] = convd_now_seconds() - t_start;
    char *m = cl->status_first[status];
    snprintf(m, sizeof cl->status_first[status], "%.400s (%s)", msg,
             kind >= 0 ? kind_names[kind] : "convd_client_create");
    for (; *m; m++) /* it goes into a markdown table cell */
      if (*m == '|' || *m == '\n') *m = '/';
  }
}

static void note_wrong(client *cl, int kind, long call, const char *what) {
  cl->wrong++;
  cl->kind_wrong[kind]++;
  if (atomic_fetch_add(&wrong_printed, 1) < MAX_WRONG_PRINTED)
    fprintf(stderr, "load_gen: WRONG client %d call %ld %s: %s\n", cl->index, call,
            kind_names[kind], what);
}

/* Compares y with the case's reference; on a miss describes the first bad element in what. */
static int check_output(const lcase *c, const float *y, char *what, size_t len) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < c->conv.output_elems; i++)
    if (!(fabsf(y[i] - c->want[i]) <= c->tol)) { /* NaN (never written) fails too */
      if (bad++ == 0) first = i;
    }
  if (bad == 0) return 0;
  const int64_t hw = c->conv.h_out * c->conv.w_out, chw = c->p.c_out * hw;
  const int64_t i = (int64_t)first;
  snprintf(what, len,
           "%s: first bad y[%lld,%lld,%lld,%lld] = %.9g, reference %.9g (tolerance %.3g); %zu of "
           "%zu elements off",
           c->desc, (long long)(i / chw), (long long)(i % chw / hw),
           (long long)(i % hw / c->conv.w_out), (long long)(i % c->conv.w_out), (double)y[first],
           (double)c->want[first], (double)c->tol, bad, c->conv.output_elems);
  return 1;
}

static int keep_going(void) {
  if (interrupted || convd_now_seconds() >= t_end) return 0;
  if (max_calls > 0 && atomic_fetch_add(&calls_started, 1) >= max_calls) return 0;
  return 1;
}

static void *client_main(void *arg) {
  client *cl = arg;
  char err[512], what[640];
  convd_client *c = NULL;
  convd_client_opts co = {.chunk_bytes = cl->chunk_bytes,
                          .max_message_bytes = cl->max_message_bytes,
                          .timeout_seconds = call_timeout};
  if (convd_client_create(target, &co, &c, err, sizeof err) != 0) {
    note_error(cl, -1, ST_LOCAL, err);
    atomic_fetch_sub(&clients_running, 1);
    return NULL;
  }
  while (keep_going()) {
    const long call = cl->calls++;
    int kind, slot = -1;
    const lcase *lc = NULL;
    float *y = cl->y;
    const int64_t u = rng_range(&cl->r, 0, 999);
    if (u < 5) kind = K_HEALTH;
    else if (u < 10) kind = K_LIST;
    else if (large_every > 0 && rng_range(&cl->r, 1, large_every) == 1 && (slot = large_take()) >= 0)
      kind = K_LARGE, lc = &large, y = large_y[slot];
    else {
      lc = &pool[rng_range(&cl->r, 0, npool - 1)];
      const int unary = lc->unary_ok && rng_range(&cl->r, 0, 1);
      kind = lc->p.transposed ? (unary ? K_UNARY_T : K_STREAM_T) : (unary ? K_UNARY : K_STREAM);
    }
    if (lc) poison(y, lc->conv.output_elems);
    int serving = 0;
    convd_client_device *devs = NULL;
    size_t ndev = 0;
    const int now_in = atomic_fetch_add(&in_flight, 1) + 1;
    for (int m = atomic_load(&in_flight_max); now_in > m;)
      if (atomic_compare_exchange_weak(&in_flight_max, &m, now_in)) break;
    const double t0 = convd_now_seconds();
    int rc;
    switch (kind) {
      case K_HEALTH: rc = convd_client_health(c, "", &serving, err, sizeof err); break;
      case K_LIST: rc = convd_client_list_devices(c, &devs, &ndev, err, sizeof err); break;
      case K_UNARY:
      case K_UNARY_T:
        rc = convd_client_conv2d_unary(c, &lc->p, lc->x, lc->w, lc->b, y, NULL, err, sizeof err);
        break;
      default: rc = convd_client_conv2d(c, &lc->p, lc->x, lc->w, lc->b, y, NULL, err, sizeof err);
    }
    const double dt = convd_now_seconds() - t0;
    atomic_fetch_sub(&in_flight, 1);
    atomic_fetch_add(&calls_done, 1);
    cl->kind_calls[kind]++;
    if (samples_add(&cl->lat[kind], dt) != 0) cl->oom = 1;
    if (rc != 0) {
      note_error(cl, kind, convd_client_last_status(c), err);
    } else if (kind == K_HEALTH) {
      if (!serving) note_wrong(cl, kind, call, "health Check answered NOT_SERVING");
    } else if (kind == K_LIST) {
      int healthy = 0;
      for (size_t i = 0; i < ndev; i++) healthy += devs[i].healthy != 0;
      if (healthy == 0) {
        snprintf(what, sizeof what, "ListDevices: %zu devices, none healthy", ndev);
        note_wrong(cl, kind, call, what);
      }
    } else if (check_output(lc, y, what, sizeof what)) {
      note_wrong(cl, kind, call, what);
    }
    free(devs);
    if (slot >= 0) large_give(slot);
  }
  convd_client_destroy(c);
  atomic_fetch_sub(&clients_running, 1);
  return NULL;
}

/* ---- the daemon's memory --------------------------------------------------------------- */

typedef struct rss_row {
  double t;
  long calls;
  int in_flight;
  long rss_kb, hwm_kb; /* -1: not readable */
} rss_row;

static rss_row *rows;
static int nrows, rows_cap;

/* Reads VmRSS and VmHWM of pid (kB); -1 each when the process or the line is not there (a
 * zombie has no Vm lines). */
static void read_rss(pid_t pid, long *rss, long *hwm) {
  *rss = *hwm = -1;
  if (pid <= 0) return;
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  FILE *f = fopen(path, "r");
  if (f == NULL) return;
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "VmRSS:", 6) == 0) *rss = strtol(line + 6, NULL, 10);
    else if (strncmp(line, "VmHWM:", 6) == 0) *hwm = strtol(line + 6, NULL, 10);
  }
  fclose(f);
}

static void sample(pid_t pid, int quiet) {
  if (nrows == rows_cap) {
    int cap = rows_cap ? rows_cap * 2 : 64;
    rss_row *r = realloc(rows, (size_t)cap * sizeof *r);
    if (r == NULL) return; /* a missing row, not a wrong figure */
    rows = r, rows_cap = cap;
  }
  rss_row *r = &rows[nrows++];
  r->t = convd_now_seconds() - t_start;
  r->calls = atomic_load(&calls_done);
  r->in_flight = atomic_load(&in_flight);
  read_rss(pid, &r->rss_kb, &r->hwm_kb);
  if (quiet) return;
  if (r->rss_kb < 0)
    fprintf(stderr, "load_gen: t %.0f s, %ld calls, %d in flight\n", r->t, r->calls, r->in_flight);
  else
    fprintf(stderr, "load_gen: t %.0f s, %ld calls, %d in flight, VmRSS %.1f MiB, VmHWM %.1f MiB\n",
            r->t, r->calls, r->in_flight, r->rss_kb / 1024.0, r->hwm_kb / 1024.0);
}

/* ---- tables ---------------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The q-quantile of sorted v. */
static double quantile(const double *v, size_t n, double q) {
  size_t i = (size_t)(q * (double)(n - 1) + 0.5);
  return v[i >= n ? n - 1 : i];
}

static void usage(void) {
  fprintf(stderr,
          "usage: load_gen [--server HOST:PORT [--pid PID]] [--clients N] [--connections K]\n"
          "                [--duration SECONDS] [--seed S] [--max-calls N] [--sample-seconds S]\n"
          "                [--cases N] [--large-every N] [--large-slots N] [--call-timeout SECONDS]\n"
          "                [--allow-status NAME]... [--daemon-arg ARG]...\n");
}

static int parse_long(const char *s, long lo, long hi, long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) return -1;
  *out = v;
  return 0;
}

static int parse_double(const char *s, double lo, double hi, double *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !(v >= lo && v <= hi)) return -1;
  *out = v;
  return 0;
}

int main(int argc, char **argv) {
  const char *server = NULL;
  long nclients = 8, seed = 1, pid_arg = 0, ncases = 128, nconn = 0, lv;
  double duration = 20, sample_s = 5;
  const char *daemon_args[24];
  int ndaemon_args = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    int bad = v == NULL;
    if (strcmp(a, "--server") == 0 && v) server = v;
    else if (strcmp(a, "--clients") == 0 && v) bad = parse_long(v, 1, MAX_CLIENTS, &nclients);
    else if (strcmp(a, "--duration") == 0 && v) bad = parse_double(v, 0.1, 86400, &duration);
    else if (strcmp(a, "--seed") == 0 && v) bad = parse_long(v, 0, 0x7fffffffL, &seed);
    else if (strcmp(a, "--max-calls") == 0 && v) bad = parse_long(v, 0, 1L << 40, &max_calls);
    else if (strcmp(a, "--pid") == 0 && v) bad = parse_long(v, 1, 0x7fffffffL, &pid_arg);
    else if (strcmp(a, "--sample-seconds") == 0 && v) bad = parse_double(v, 0.1, 3600, &sample_s);
    else if (strcmp(a, "--cases") == 0 && v) bad = parse_long(v, 1, 4096, &ncases);
    else if (strcmp(a, "--connections") == 0 && v) bad = parse_long(v, 1, MAX_CONNECTIONS, &nconn);
    else if (strcmp(a, "--large-every") == 0 && v) {
      bad = parse_long(v, 0, 1L << 30, &lv);
      large_every = (int)lv;
    } else if (strcmp(a, "--large-slots") == 0 && v) {
      bad = parse_long(v, 1, 16, &lv);
      large_slots = (int)lv;
    } else if (strcmp(a, "--call-timeout") == 0 && v) bad = parse_double(v, 1, 3600, &call_timeout);
    else if (strcmp(a, "--allow-status") == 0 && v) {
      int s = status_by_name(v);
      bad = s <= 0;
      if (!bad) allowed[s] = 1;
    } else if (strcmp(a, "--daemon-arg") == 0 && v) {
      bad = ndaemon_args >= 20;
      if (!bad) daemon_args[ndaemon_args++] = v;
    } else bad = 1;
    if (bad) {
      if (v) fprintf(stderr, "load_gen: unknown option or bad value: %s %s\n", a, v);
      else fprintf(stderr, "load_gen: unknown option or missing value: %s\n", a);
      usage();
      return 2;
    }
    i++;
  }
  daemon_args[ndaemon_args] = NULL;
  if (nconn == 0 || nconn > nclients) nconn = nclients;
  if (server && ndaemon_args) {
    fprintf(stderr, "load_gen: --daemon-arg is for the daemon load_gen starts, not with --server\n");
    return 2;
  }

  double t0 = convd_now_seconds();
  if (build_pool((uint64_t)seed, (int)ncases) != 0) {
    fprintf(stderr, "load_gen: cannot build the case pool (out of memory, or no case drawn)\n");
    return 1;
  }
  size_t max_out = 0;
  int n_unary_ok = 0, n_transposed = 0;
  uint64_t pool_macs = 0;
  for (int i = 0; i < npool; i++) {
    if (pool[i].conv.output_elems > max_out) max_out = pool[i].conv.output_elems;
    n_unary_ok += pool[i].unary_ok;
    n_transposed += pool[i].p.transposed != 0;
    pool_macs += pool[i].conv.macs;
  }
  fprintf(stderr, "load_gen: %d cases and the large one, references computed in %.1f s\n", npool,
          convd_now_seconds() - t0);

  test_daemon d = {0};
  pid_t pid = (pid_t)pid_arg;
  if (server == NULL) {
    if (test_daemon_start(&d, CONVD_BIN, daemon_args) != 0) {
      fprintf(stderr, "load_gen: the daemon did not start\n");
      return 1;
    }
    server = d.target;
    pid = d.pid;
  }
  target = server;

  large_y = calloc((size_t)large_slots, sizeof *large_y);
  large_in_use = calloc((size_t)large_slots, sizeof *large_in_use);
  client *cls = calloc((size_t)nclients, sizeof *cls);
  pthread_t *th = calloc((size_t)nclients, sizeof *th);
  int setup_ok = large_y && large_in_use && cls && th;
  for (int i = 0; setup_ok && i < large_slots; i++)
    setup_ok = (large_y[i] = malloc(large.conv.output_bytes)) != NULL;
  static const size_t chunks[3] = {1u << 20, 64u << 10, 4u << 10};
  for (long i = 0; setup_ok && i < nclients; i++) {
    cls[i].index = (int)i;
    cls[i].chunk_bytes = chunks[i % 3];
    /* gRPC core pools subchannels process-wide by target and channel arguments, so channels
     * created with equal options share one TCP connection. A message limit 256 bytes lower is
     * another argument set, hence a connection of its own: client i uses connection i % nconn. */
    cls[i].max_message_bytes = (4u << 20) - LIMIT_STEP * (size_t)(i % nconn);
    cls[i].r.s = ((uint64_t)seed << 20 ^ (uint64_t)i) * 0xD1B54A32D192ED03ULL + 1;
    setup_ok = (cls[i].y = malloc(max_out * sizeof(float))) != NULL;
  }
  if (!setup_ok) {
    fprintf(stderr, "load_gen: out of memory\n");
    if (d.pid > 0) test_daemon_stop(&d, 60);
    return 1;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  if (sigaction(SIGINT, &sa, NULL) != 0) perror("load_gen: sigaction (SIGINT stops nothing)");

  t_start = convd_now_seconds();
  sample(pid, 1); /* before the load */
  t_end = t_start + duration;
  long started = 0;
  for (long i = 0; i < nclients; i++) {
    atomic_fetch_add(&clients_running, 1);
    int e = pthread_create(&th[i], NULL, client_main, &cls[i]);
    if (e != 0) {
      atomic_fetch_sub(&clients_running, 1);
      fprintf(stderr, "load_gen: cannot start client %ld: %s\n", i, strerror(e));
      break;
    }
    started++;
  }
  /* Sample until every client has ended: the clients stop by themselves at t_end. */
  double next = t_start + sample_s;
  while (atomic_load(&clients_running) > 0) {
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if (convd_now_seconds() >= next && atomic_load(&clients_running) > 0) {
      sample(pid, 0);
      next += sample_s;
    }
  }
  for (long i = 0; i < started; i++) pthread_join(th[i], NULL);
  const double wall = convd_now_seconds() - t_start;
  sample(pid, 0); /* right after the load */
  if (pid > 0) {
    sleep(2);
    sample(pid, 0); /* and once the daemon has had two seconds idle */
  }

  /* ---- merge and print ---- */
  long total = 0, wrong = 0, failed = 0, refused = 0, kcalls[NKINDS] = {0}, kwrong[NKINDS] = {0};
  long kerr[NKINDS] = {0}, scount[NSTATUS + 1] = {0};
  const char *sfirst[NSTATUS + 1] = {0};
  double sfirst_t[NSTATUS + 1];
  int oom = 0;
  for (long i = 0; i < nclients; i++) {
    client *cl = &cls[i];
    oom |= cl->oom;
    for (int k = 0; k < NKINDS; k++) {
      total += cl->kind_calls[k], kcalls[k] += cl->kind_calls[k];
      wrong += cl->kind_wrong[k], kwrong[k] += cl->kind_wrong[k], kerr[k] += cl->kind_errors[k];
    }
    for (int s = 0; s <= NSTATUS; s++) {
      if (cl->status_count[s] == 0) continue;
      if (sfirst[s] == NULL || cl->status_first_t[s] < sfirst_t[s])
        sfirst[s] = cl->status_first[s], sfirst_t[s] = cl->status_first_t[s];
      scount[s] += cl->status_count[s];
      if (s < NSTATUS && allowed[s]) refused += cl->status_count[s];
      else failed += cl->status_count[s];
    }
  }

  printf("# load_gen\n\n");
  printf("server %s%s, %ld clients (one convd_client each; chunk 1 MiB / 64 KiB / 4 KiB in turn) "
         "over %ld TCP connections, duration %.0f s",
         server, d.pid > 0 ? " (started by load_gen)" : "", nclients, nconn, duration);
  if (max_calls > 0) printf(" or %ld calls", max_calls);
  printf(", seed %ld, %ld online CPUs\n\n", seed, sysconf(_SC_NPROCESSORS_ONLN));
  if (d.pid > 0) {
    printf("daemon flags:%s", ndaemon_args ? "" : " the defaults");
    for (int i = 0; i < ndaemon_args; i++) printf(" %s", daemon_args[i]);
    printf("\n\n");
  }
  printf("pool: %d cases (%d transposed, %d fit Conv2dUnary), %.1f M multiply-adds on average; "
         "large call: 1 in %d, at most %d at once; tolerance 1e-4 * max(1, max|reference|)\n\n",
         npool, n_transposed, n_unary_ok, (double)pool_macs / npool / 1e6, large_every,
         large_slots);

  printf("## Summary\n\n| calls | seconds | calls/s | wrong | failed | refused (allowed statuses) "
         "| peak calls in flight |\n|---:|---:|---:|---:|---:|---:|---:|\n");
  printf("| %ld | %.1f | %.1f | %ld | %ld | %ld | %d |\n\n", total, wall, total / wall, wrong,
         failed, refused, atomic_load(&in_flight_max));

  printf("## Latency per call kind (ms, client clock)\n\n| kind | calls | wrong | errors | p50 | "
         "p95 | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (int k = 0; k < NKINDS; k++) {
    size_t n = 0;
    for (long i = 0; i < nclients; i++) n += cls[i].lat[k].n;
    if (n == 0) {
      printf("| %s | 0 | | | | | | |\n", kind_names[k]);
      continue;
    }
    double *v = malloc(n * sizeof *v);
    if (v == NULL) {
      oom = 1;
      continue;
    }
    size_t at = 0;
    for (long i = 0; i < nclients; i++) {
      if (cls[i].lat[k].n == 0) continue; /* its v may be NULL, which memcpy must not get */
      memcpy(v + at, cls[i].lat[k].v, cls[i].lat[k].n * sizeof *v);
      at += cls[i].lat[k].n;
    }
    qsort(v, n, sizeof *v, cmp_double);
    printf("| %s | %ld | %ld | %ld | %.2f | %.2f | %.2f | %.2f |\n", kind_names[k], kcalls[k],
           kwrong[k], kerr[k], quantile(v, n, 0.5) * 1e3, quantile(v, n, 0.95) * 1e3,
           quantile(v, n, 0.99) * 1e3, v[n - 1] * 1e3);
    free(v);
  }
  printf("\n## Errors by status\n\n");
  if (failed + refused == 0) {
    printf("none\n\n");
  } else {
    printf("| status | count | allowed | first message |\n|---|---:|---|---|\n");
    for (int s = 0; s <= NSTATUS; s++)
      if (scount[s])
        printf("| %s | %ld | %s | %s |\n", status_names[s], scount[s],
               s < NSTATUS && allowed[s] ? "yes" : "no", sfirst[s]);
    printf("\n");
  }

  if (pid <= 0 || nrows < 3) {
    printf("## Daemon memory\n\nnot sampled: %s\n\n",
           pid <= 0 ? "give --pid with --server" : "out of memory for the samples");
  } else {
    printf("## Daemon memory (/proc/%d/status; a sample every %.0f s)\n\n", (int)pid, sample_s);
    printf("| t s | calls so far | calls/s since last | in flight | VmRSS MiB | VmHWM MiB |\n"
           "|---:|---:|---:|---:|---:|---:|\n");
    long rss_min_late = -1, rss_max_late = -1, rss_peak = -1;
    for (int i = 0; i < nrows; i++) {
      const rss_row *r = &rows[i];
      double rate = 0;
      if (i > 0 && r->t > rows[i - 1].t) rate = (r->calls - rows[i - 1].calls) / (r->t - rows[i - 1].t);
      if (r->rss_kb < 0) printf("| %.0f | %ld | %.1f | %d | (gone) | (gone) |\n", r->t, r->calls,
                                rate, r->in_flight);
      else
        printf("| %.0f%s | %ld | %.1f | %d | %.1f | %.1f |\n", r->t,
               i == 0 ? " (before)" : i >= nrows - 2 ? (i == nrows - 1 ? " (idle 2 s)" : " (end)") : "",
               r->calls, rate, r->in_flight, r->rss_kb / 1024.0, r->hwm_kb / 1024.0);
      if (r->rss_kb > rss_peak) rss_peak = r->rss_kb;
      /* the second half of the load: once peak concurrency has long been reached */
      if (i > 0 && i < nrows - 2 && r->t >= wall / 2 && r->rss_kb >= 0) {
        if (rss_min_late < 0 || r->rss_kb < rss_min_late) rss_min_late = r->rss_kb;
        if (r->rss_kb > rss_max_late) rss_max_late = r->rss_kb;
      }
    }
    printf("\nVmRSS: before %.1f MiB, peak sample %.1f MiB, end %.1f MiB, VmHWM at the end %.1f "
           "MiB",
           rows[0].rss_kb / 1024.0, rss_peak / 1024.0, rows[nrows - 1].rss_kb / 1024.0,
           rows[nrows - 1].hwm_kb / 1024.0);
    if (rss_min_late >= 0)
      printf("; over the second half of the load %.1f - %.1f MiB", rss_min_late / 1024.0,
             rss_max_late / 1024.0);
    printf("\n\n");
  }

  int rc = wrong || failed || oom || started < nclients;
  if (oom) printf("load_gen: ran out of memory recording latencies (figures incomplete)\n");
  if (d.pid > 0) {
    int st = test_daemon_stop(&d, 60);
    printf("daemon: exit status %d after SIGTERM%s\n", st, st == 0 ? "" : " (expected 0)");
    rc |= st != 0;
  }
  printf("load_gen: %s\n", rc ? "FAILED" : "ok");
  for (long i = 0; i < nclients; i++) {
    free(cls[i].y);
    for (int k = 0; k < NKINDS; k++) free(cls[i].lat[k].v);
  }
  for (int i = 0; i < large_slots; i++) free(large_y[i]);
  for (int i = 0; i < npool; i++) free_case(&pool[i]);
  free_case(&large);
  free(pool), free(large_y), free(large_in_use), free(cls), free(th), free(rows);
  return rc;
}
