/* Shared memory through libconvd_client and convctl, against real daemons on loopback TCP and
 * (for some of the golden cases) their Unix sockets: regions made, listed and removed (nothing
 * left in /dev/shm, on success or failure); convd_client_conv2d_shm with the input, the
 * weights, the output or any mix in regions, on every golden case and on random shapes, each
 * compared element by element with the golden vectors or the reference, the outputs poisoned
 * with NaN beforehand; half types in regions; the statuses a client sees (unknown region, a
 * range that leaves its region, an output over an input, a region in use, a shrunk object, a
 * cancelled call); and `convctl conv --shm` on every golden case, on a daemon without shared
 * memory, and interrupted by SIGINT. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "client_params.h"
#include "daemon.h"
#include "dtype.h"
#include "npy.h"
#include "ref.h"
#include "testutil.h"

extern char **environ;

static const char *golden_root = GOLDEN_DIR;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* ---- /dev/shm ------------------------------------------------------------------------- */

/* 1 when the object `name` ("/convd-...") exists. */
static int shm_exists(const char *name) {
  char path[300];
  snprintf(path, sizeof path, "/dev/shm%s", name);
  return access(path, F_OK) == 0;
}

/* The objects named as libconvd_client names its regions ("convd-" then 16 hex digits, no
 * tenant): the ones this program's clients and convctl make. */
static int shm_client_objects(char names[][64], int max) {
  DIR *d = opendir("/dev/shm");
  int n = 0;
  if (d == NULL) return 0;
  for (struct dirent *e; (e = readdir(d)) != NULL;) {
    const char *s = e->d_name;
    if (strncmp(s, "convd-", 6) != 0 || strlen(s) != 6 + 16) continue;
    int hex = 1;
    for (int i = 6; i < 22; i++) hex &= (s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f');
    if (hex && n < max) snprintf(names[n++], 64, "%s", s);
  }
  closedir(d);
  return n;
}

/* Objects of that form that were not there in before[0..nb). */
static int shm_new_objects(char before[][64], int nb, char *first, size_t len) {
  char now[256][64];
  int n = shm_client_objects(now, 256), fresh = 0;
  for (int i = 0; i < n; i++) {
    int old = 0;
    for (int j = 0; j < nb && !old; j++) old = strcmp(now[i], before[j]) == 0;
    if (!old && fresh++ == 0) snprintf(first, len, "%.63s", now[i]);
  }
  return fresh;
}

/* The number of regions the daemon lists for this client, and how many calls use the first
 * one with that name (-1: none of that name). */
static int region_in_use(convd_client *cl, const char *name, size_t *count) {
  convd_client_region_info *v;
  size_t n;
  char err[512];
  if (convd_client_list_regions(cl, &v, &n, NULL, 0, err, sizeof err)) return -2;
  int in_use = -1;
  for (size_t i = 0; i < n; i++)
    if (name && strcmp(v[i].name, name) == 0) in_use = (int)v[i].in_use;
  free(v);
  if (count) *count = n;
  return in_use;
}

/* ---- calls with tensors in a region ----------------------------------------------------- */

enum { M_IN = 1, M_W = 2, M_OUT = 4 }; /* which tensors a case puts in its region */

static const char *mode_name(int m) {
  static const char *const names[8] = {"none", "i", "w", "iw", "o", "io", "ow", "iow"};
  return names[m & 7];
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* The bytes of a call's tensors, for one region laid out input, weight, bias, (gap), output. */
typedef struct layout {
  size_t x, w, b, y, total;
} layout;

static layout layout_of(const convd_conv *c) {
  layout l;
  l.x = 0;
  l.w = align64(c->input_wire_bytes);
  l.b = align64(l.w + c->weight_wire_bytes);
  l.y = align64(l.b + c->bias_wire_bytes) + 64; /* a gap: the ranges are exact, not padded */
  l.total = l.y + c->output_wire_bytes + 64;
  return l;
}

/* Floats into the region in the wire's dtype. */
static void put(uint8_t *dst, int dtype, const float *src, size_t n) {
  if (dtype == CONVD_F32) memcpy(dst, src, n * sizeof(float));
  else convd_dtype_encode(dtype, src, dst, n);
}

/* One call of p with the tensors `mode` names in region reg (x, w, b, y float32 in memory; the
 * output read back from the region into y when it is there). The output is poisoned first,
 * wherever it is. */
/* shm_conv through Conv2dUnary (the tensors in the region left out of its messages). */
static int shm_unary;

static int shm_conv(convd_client *cl, convd_client_region *reg, int mode, const convd_conv *c,
                    const float *x, const float *w, const float *b, float *y,
                    convd_client_stats *st, char *err, size_t errlen) {
  const layout l = layout_of(c);
  uint8_t *base = convd_client_region_data(reg);
  const char *name = convd_client_region_name(reg);
  const int dt = c->p.dtype;
  convd_client_shm_refs refs;
  memset(&refs, 0, sizeof refs);
  if (mode & M_IN) {
    put(base + l.x, dt, x, c->input_elems);
    refs.input = (convd_client_tensor_ref){name, l.x};
  }
  if (mode & M_W) {
    put(base + l.w, dt, w, c->weight_elems);
    refs.weight = (convd_client_tensor_ref){name, l.w};
    if (b) {
      put(base + l.b, dt, b, c->bias_elems);
      refs.bias = (convd_client_tensor_ref){name, l.b};
    }
  }
  poison(y, c->output_elems);
  if (mode & M_OUT) {
    refs.output = (convd_client_tensor_ref){name, l.y};
    /* NaN in every dtype: float32 NaN bits, or 0x7fff / 0xffff pairs for the half types */
    memset(base + l.y, 0xff, c->output_wire_bytes);
  }
  const convd_client_conv_params cp = convd_client_params_from_conv(&c->p);
  /* Tensors in the region go as NULL: the library must not need them. */
  const convd_client_call_opts co = {.shm = &refs, .unary = shm_unary};
  int rc = convd_client_conv2d_ex(cl, &cp, &co, mode & M_IN ? NULL : x, mode & M_W ? NULL : w,
                                  mode & M_W ? NULL : b, mode & M_OUT ? NULL : y, st, err, errlen);
  if (rc == 0 && (mode & M_OUT)) {
    if (dt == CONVD_F32) memcpy(y, base + l.y, c->output_bytes);
    else convd_dtype_decode(dt, base + l.y, y, c->output_elems);
  }
  return rc;
}

/* The stats of a successful shm call: its plan ran whole, and the daemon's summary counted
 * every tensor byte it took in and gave out, whether through the socket or a region (each
 * once: weights from a region are not counted twice). */
static int stats_ok(const char *what, int mode, const convd_conv *c, const convd_client_stats *st) {
  int ok = 1;
  if (st->ops_run < 1 || st->ops_run != st->elemental_ops || st->output_shape[0] != c->p.n ||
      st->output_shape[1] != c->p.c_out || st->output_shape[2] != c->h_out || st->output_shape[3] != c->w_out) {
    fprintf(stderr, "  %s: summary says %" PRIu64 " of %" PRIu64 " ops, output %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 "\n",
            what, st->ops_run, st->elemental_ops, st->output_shape[0], st->output_shape[1],
            st->output_shape[2], st->output_shape[3]);
    ok = 0;
  }
  if (st->bytes_sent != c->output_wire_bytes) {
    fprintf(stderr, "  %s (%s): the server gave out %" PRIu64 " tensor bytes, expected %zu\n", what,
            mode_name(mode), st->bytes_sent, c->output_wire_bytes);
    ok = 0;
  }
  const uint64_t recv = c->input_wire_bytes + c->weight_wire_bytes + c->bias_wire_bytes;
  if (st->bytes_received != recv) {
    fprintf(stderr, "  %s (%s): the server took in %" PRIu64 " tensor bytes, expected %" PRIu64 "\n",
            what, mode_name(mode), st->bytes_received, recv);
    ok = 0;
  }
  if ((mode & M_OUT) && !(st->first_output_seconds > 0 && st->first_output_seconds <= st->total_seconds)) {
    fprintf(stderr, "  %s: first rows at %.6f s of %.6f s\n", what, st->first_output_seconds, st->total_seconds);
    ok = 0;
  }
  return ok;
}

/* ---- regions ----------------------------------------------------------------------------- */

static void test_region_lifecycle(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  convd_client *cl;
  char err[1024], prefix[64];
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  convd_client_region_info *v;
  size_t n = 99;
  ASSERT_OK(convd_client_list_regions(cl, &v, &n, prefix, sizeof prefix, err, sizeof err), err);
  free(v);
  ASSERT_EQ_INT(n, 0);
  ASSERT_TRUE(strcmp(prefix, "/convd-") == 0);
  char tiny[4];
  ASSERT_EQ_INT(convd_client_list_regions(cl, NULL, NULL, tiny, sizeof tiny, err, sizeof err), CONVD_CLIENT_ERANGE);

  convd_client_region *r1, *r2;
  ASSERT_EQ_INT(convd_client_region_create(cl, 0, &r1, err, sizeof err), CONVD_CLIENT_EINVAL);
  ASSERT_TRUE(r1 == NULL);
  ASSERT_OK(convd_client_region_create(cl, 3 << 20, &r1, err, sizeof err), err);
  ASSERT_OK(convd_client_region_create(cl, 4097, &r2, err, sizeof err), err);
  const char *n1 = convd_client_region_name(r1), *n2 = convd_client_region_name(r2);
  printf("  regions %s (%zu bytes), %s (%zu bytes)\n", n1, convd_client_region_size(r1), n2,
         convd_client_region_size(r2));
  ASSERT_TRUE(strncmp(n1, "/convd-", 7) == 0 && strlen(n1) == 7 + 16 && strcmp(n1, n2) != 0);
  ASSERT_EQ_INT(convd_client_region_size(r1), 3 << 20);
  ASSERT_TRUE(shm_exists(n1) && shm_exists(n2));
  struct stat sb;
  char path[300];
  snprintf(path, sizeof path, "/dev/shm%s", n1);
  ASSERT_TRUE(stat(path, &sb) == 0);
  ASSERT_EQ_INT(sb.st_size, 3 << 20);
  const mode_t mask = umask(0);
  umask(mask);
  ASSERT_EQ_INT(sb.st_mode & 0777, 0660 & ~mask); /* never anything for others */
  ASSERT_TRUE(sb.st_blocks * 512 >= (3 << 20)); /* its pages allocated up front */
  const uint8_t *data = convd_client_region_data(r1);
  size_t nonzero = 0;
  for (size_t i = 0; i < convd_client_region_size(r1); i++) nonzero += data[i] != 0;
  ASSERT_EQ_INT(nonzero, 0);

  ASSERT_OK(convd_client_list_regions(cl, &v, &n, NULL, 0, err, sizeof err), err);
  int seen = 0;
  for (size_t i = 0; i < n; i++) {
    if (strcmp(v[i].name, n1) == 0 && v[i].size == 3u << 20 && v[i].in_use == 0) seen |= 1;
    if (strcmp(v[i].name, n2) == 0 && v[i].size == 4097 && v[i].in_use == 0) seen |= 2;
  }
  free(v);
  ASSERT_EQ_INT(n, 2);
  ASSERT_EQ_INT(seen, 3);

  char name1[64];
  snprintf(name1, sizeof name1, "%s", n1);
  ASSERT_OK(convd_client_region_destroy(cl, r1, err, sizeof err), err);
  ASSERT_TRUE(!shm_exists(name1));
  ASSERT_EQ_INT(region_in_use(cl, name1, &n), -1);
  ASSERT_EQ_INT(n, 1);
  /* The daemon lost it (here: unregistered by name behind the handle's back): destroy still
   * cleans up, and says nothing is wrong. */
  char name2[64];
  snprintf(name2, sizeof name2, "%s", n2);
  ASSERT_OK(convd_client_unregister_region(cl, name2, err, sizeof err), err);
  ASSERT_OK(convd_client_region_destroy(cl, r2, err, sizeof err), err);
  ASSERT_TRUE(!shm_exists(name2));
  ASSERT_OK(convd_client_region_destroy(cl, NULL, err, sizeof err), err);

  /* The calls themselves, on an object made here. */
  char own[64];
  snprintf(own, sizeof own, "/convd-test-client-%d", (int)getpid());
  int fd = shm_open(own, O_RDWR | O_CREAT | O_EXCL, 0600);
  ASSERT_TRUE(fd >= 0);
  ASSERT_TRUE(ftruncate(fd, 65536) == 0);
  close(fd);
  uint64_t mapped = 0;
  ASSERT_EQ_INT(convd_client_register_region(cl, own, 1 << 20, &mapped, err, sizeof err), CONVD_CLIENT_EINVAL);
  ASSERT_CONTAINS(err, "fewer than the 1048576");
  ASSERT_OK(convd_client_register_region(cl, own, 0, &mapped, err, sizeof err), err);
  ASSERT_EQ_INT(mapped, 65536);
  ASSERT_EQ_INT(region_in_use(cl, own, NULL), 0);
  ASSERT_OK(convd_client_unregister_region(cl, own, err, sizeof err), err);
  ASSERT_EQ_INT(convd_client_unregister_region(cl, own, err, sizeof err), CONVD_CLIENT_ENOTFOUND);
  ASSERT_EQ_INT(convd_client_last_status(cl), 5); /* NOT_FOUND */
  ASSERT_CONTAINS(err, "no region");
  shm_unlink(own);
  ASSERT_EQ_INT(convd_client_register_region(cl, own, 0, &mapped, err, sizeof err), CONVD_CLIENT_ENOTFOUND);
  ASSERT_CONTAINS(err, "no shared-memory object");
  ASSERT_EQ_INT(convd_client_register_region(cl, "/elsewhere-1", 0, &mapped, err, sizeof err), CONVD_CLIENT_EINVAL);
  ASSERT_CONTAINS(err, "must start with \"/convd-\"");
  ASSERT_EQ_INT(region_in_use(cl, NULL, &n), -1);
  ASSERT_EQ_INT(n, 0);
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* A region the daemon refuses is not left behind: over --max-shm-bytes, and a daemon without
 * shared memory. */
static void test_region_refused_leaves_nothing(void) {
  char before[256][64], fresh[64] = "";
  const int nb = shm_client_objects(before, 256);
  char err[1024];
  test_daemon d;
  const char *small[] = {"--max-shm-bytes", "1M", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, small) == 0);
  convd_client *cl;
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  convd_client_region *r = NULL, *ok = NULL;
  ASSERT_OK(convd_client_region_create(cl, 768 << 10, &ok, err, sizeof err), err);
  ASSERT_EQ_INT(convd_client_region_create(cl, 512 << 10, &r, err, sizeof err), CONVD_CLIENT_ELIMIT);
  ASSERT_CONTAINS(err, "--max-shm-bytes");
  ASSERT_TRUE(r == NULL);
  ASSERT_OK(convd_client_region_destroy(cl, ok, err, sizeof err), err);
  ASSERT_OK(convd_client_region_create(cl, 512 << 10, &r, err, sizeof err), err); /* room again */
  ASSERT_OK(convd_client_region_destroy(cl, r, err, sizeof err), err);
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  const char *off[] = {"--max-shm-bytes", "0", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, off) == 0);
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  ASSERT_EQ_INT(convd_client_region_create(cl, 4096, &r, err, sizeof err), CONVD_CLIENT_ENOTSUP);
  ASSERT_CONTAINS(err, "no shared memory");
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  ASSERT_EQ_INT(shm_new_objects(before, nb, fresh, sizeof fresh), 0);
}

/* ---- conv2d_shm ------------------------------------------------------------------------ */

static const int MODES[] = {M_IN | M_OUT, M_IN, M_OUT, M_W, M_IN | M_W | M_OUT, M_W | M_OUT};
enum { N_MODES = sizeof MODES / sizeof MODES[0] };

/* The daemon's Unix socket for a test: "unix:/tmp/convd-shm-PID.sock". */
static const char *unix_target(void) {
  static char t[96];
  snprintf(t, sizeof t, "unix:/tmp/convd-shm-%d.sock", (int)getpid());
  return t;
}

/* Every golden case, each in every mode; every other case through the daemon's Unix socket. */
static void test_golden_modes(void) {
  test_daemon d;
  const char *extra[] = {"--listen", unix_target(), NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  convd_client *tcp, *unx, *cl;
  char err[1024], names[64][128];
  convd_client_opts o = {.timeout_seconds = 120};
  ASSERT_OK(convd_client_create(d.target, &o, &tcp, err, sizeof err), err);
  ASSERT_OK(convd_client_create(unix_target(), &o, &unx, err, sizeof err), err);
  cl = tcp;
  const int n = golden_list(golden_root, names, 64);
  int ran = 0;
  for (int i = 0; i < n && !test_failed; i++) {
    golden g;
    cl = i % 2 ? unx : tcp;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    convd_conv c;
    ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
    convd_client_region *reg;
    ASSERT_OK(convd_client_region_create(cl, layout_of(&c).total, &reg, err, sizeof err), err);
    /* Through the Unix socket a sealed memfd the daemon uses in place, over TCP a named object. */
    ASSERT_EQ_INT(convd_client_region_in_place(reg), cl == unx);
    float *y = malloc(c.output_bytes);
    for (int m = 0; m < 2 * N_MODES && !test_failed; m++) {
      char what[200];
      shm_unary = m >= N_MODES; /* every mix streamed, then through Conv2dUnary */
      snprintf(what, sizeof what, "%.120s (%s%s)", names[i], mode_name(MODES[m % N_MODES]),
               shm_unary ? ", unary" : "");
      convd_client_stats st;
      int rc = shm_conv(cl, reg, MODES[m % N_MODES], &c, g.x, g.w, g.b, y, &st, err, sizeof err);
      if (rc) FAIL_AT("%s: %s", what, err);
      else if (check_close(what, y, g.expected, g.expected_count)) FAIL_AT("%s differs", what);
      else if (!shm_unary && !stats_ok(what, MODES[m], &c, &st)) FAIL_AT("%s: stats", what);
      ran++;
    }
    shm_unary = 0;
    free(y);
    ASSERT_OK(convd_client_region_destroy(cl, reg, err, sizeof err), err);
    golden_free(&g);
  }
  size_t left;
  ASSERT_EQ_INT(region_in_use(tcp, NULL, &left), -1);
  ASSERT_EQ_INT(left, 0);
  convd_client_destroy(tcp);
  convd_client_destroy(unx);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  ASSERT_TRUE(ran >= 19 * 2 * N_MODES);
}

/* A random convolution: groups, depthwise, stride, dilation, asymmetric padding, N > 1, bias. */
static convd_conv_params random_params(rng *r) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  const int64_t kind = rng_range(r, 0, 2);
  p.groups = kind == 1 ? rng_range(r, 2, 3) : 1;
  p.n = rng_range(r, 1, 3);
  p.c_per_group = rng_range(r, 1, 5);
  p.c_in = p.groups * p.c_per_group;
  p.c_out = p.groups * rng_range(r, 1, 4);
  if (kind == 2) { /* depthwise */
    p.c_in = p.groups = rng_range(r, 2, 6);
    p.c_per_group = 1;
    p.c_out = p.c_in * rng_range(r, 1, 2);
  }
  p.kh = rng_range(r, 1, 4), p.kw = rng_range(r, 1, 4);
  p.stride_h = rng_range(r, 1, 3), p.stride_w = rng_range(r, 1, 3);
  p.dil_h = rng_range(r, 1, 2), p.dil_w = rng_range(r, 1, 2);
  p.pad_top = rng_range(r, 0, 2), p.pad_bottom = rng_range(r, 0, 2);
  p.pad_left = rng_range(r, 0, 2), p.pad_right = rng_range(r, 0, 2);
  p.h = rng_range(r, p.dil_h * (p.kh - 1) + 1, 40);
  p.w = rng_range(r, p.dil_w * (p.kw - 1) + 1, 40);
  p.has_bias = (int)rng_range(r, 0, 1);
  return p;
}

/* A random problem: inputs, and the reference's answer as doubles. */
typedef struct problem {
  convd_conv c;
  float *x, *w, *b, *y;
  double *want;
} problem;

static int problem_make(problem *pr, const convd_conv_params *p, rng *r, int reference) {
  char err[256];
  memset(pr, 0, sizeof *pr);
  if (convd_conv_init(&pr->c, p, err, sizeof err)) {
    fprintf(stderr, "  bad problem: %s\n", err);
    return -1;
  }
  pr->x = malloc(pr->c.input_bytes);
  pr->w = malloc(pr->c.weight_bytes);
  pr->b = p->has_bias ? malloc(pr->c.bias_bytes) : NULL;
  pr->y = malloc(pr->c.output_bytes);
  pr->want = malloc(pr->c.output_elems * sizeof(double));
  rng_fill(r, pr->x, pr->c.input_elems);
  rng_fill(r, pr->w, pr->c.weight_elems);
  if (pr->b) rng_fill(r, pr->b, pr->c.bias_elems);
  if (p->dtype != CONVD_F32) { /* values the type can hold, so that only the output rounds */
    convd_dtype_round(p->dtype, pr->x, pr->c.input_elems);
    convd_dtype_round(p->dtype, pr->w, pr->c.weight_elems);
    if (pr->b) convd_dtype_round(p->dtype, pr->b, pr->c.bias_elems);
  }
  if (reference) {
    convd_ref_conv2d(&pr->c, pr->x, pr->w, pr->b, pr->y, NULL);
    for (size_t i = 0; i < pr->c.output_elems; i++) pr->want[i] = pr->y[i];
  }
  return 0;
}

static void problem_free(problem *pr) {
  free(pr->x), free(pr->w), free(pr->b), free(pr->y), free(pr->want);
  memset(pr, 0, sizeof *pr);
}

/* 40 random shapes (fixed seed), each in one mode, alternately over TCP (a named object) and
 * the Unix socket (a sealed memfd used in place), each client's region reused while it is large
 * enough; small chunks, so streamed tensors go as many messages beside the region's. */
static void test_random_modes(void) {
  test_daemon d;
  const char *extra[] = {"--listen", unix_target(), NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  convd_client *cls[2];
  char err[1024];
  convd_client_opts o = {.chunk_bytes = 3000, .timeout_seconds = 120};
  ASSERT_OK(convd_client_create(d.target, &o, &cls[0], err, sizeof err), err);
  ASSERT_OK(convd_client_create(unix_target(), &o, &cls[1], err, sizeof err), err);
  rng r = {0x5eed05a1};
  convd_client_region *regs[2] = {NULL, NULL};
  int regions = 0;
  for (int i = 0; i < 40 && !test_failed; i++) {
    const convd_conv_params p = random_params(&r);
    problem pr;
    ASSERT_TRUE(problem_make(&pr, &p, &r, 1) == 0);
    const size_t need = layout_of(&pr.c).total;
    convd_client *cl = cls[i % 2];
    convd_client_region **rp = &regs[i % 2], *reg;
    if (*rp == NULL || convd_client_region_size(*rp) < need) {
      ASSERT_OK(convd_client_region_destroy(cl, *rp, err, sizeof err), err);
      ASSERT_OK(convd_client_region_create(cl, need * 2, rp, err, sizeof err), err);
      ASSERT_EQ_INT(convd_client_region_in_place(*rp), i % 2);
      regions++;
    }
    reg = *rp;
    const int mode = MODES[(i / 2) % N_MODES]; /* each mode both ways */
    char what[256];
    snprintf(what, sizeof what,
             "case %d (%s): in %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 " w %" PRId64 "x%" PRId64
             "x%" PRId64 "x%" PRId64 " g%" PRId64 " s%" PRId64 ",%" PRId64 " d%" PRId64 ",%" PRId64 "%s",
             i, mode_name(mode), p.n, p.c_in, p.h, p.w, p.c_out, p.c_per_group, p.kh, p.kw, p.groups,
             p.stride_h, p.stride_w, p.dil_h, p.dil_w, p.has_bias ? " bias" : "");
    convd_client_stats st;
    const int rc = shm_conv(cl, reg, mode, &pr.c, pr.x, pr.w, pr.b, pr.y, &st, err, sizeof err);
    if (rc) FAIL_AT("%s: %s", what, err);
    else if (check_close(what, pr.y, pr.want, pr.c.output_elems)) FAIL_AT("%s differs", what);
    else if (!stats_ok(what, mode, &pr.c, &st)) FAIL_AT("%s: stats", what);
    problem_free(&pr);
  }
  printf("  %d regions for 40 calls\n", regions);
  for (int k = 0; k < 2; k++) {
    ASSERT_OK(convd_client_region_destroy(cls[k], regs[k], err, sizeof err), err);
    convd_client_destroy(cls[k]);
  }
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* float16 and bfloat16 tensors in regions hold the type's 2-byte elements: the daemon reads
 * and writes them so, and the output rounds once (half an ulp of the type at the reference's
 * magnitude, plus float32 accumulation's 1e-5). Streamed tensors beside them are narrowed by
 * the library as in convd_client_conv2d. */
static void test_half_dtypes_in_regions(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  convd_client *cl;
  char err[1024];
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  rng r = {0x5eed05f1};
  for (int i = 0; i < 12 && !test_failed; i++) {
    convd_conv_params p = random_params(&r);
    p.dtype = i % 2 ? CONVD_BF16 : CONVD_F16;
    const double half_ulp = p.dtype == CONVD_F16 ? 0x1p-11 : 0x1p-8;
    problem pr;
    ASSERT_TRUE(problem_make(&pr, &p, &r, 1) == 0);
    convd_client_region *reg;
    ASSERT_OK(convd_client_region_create(cl, layout_of(&pr.c).total, &reg, err, sizeof err), err);
    const int mode = MODES[i % N_MODES];
    convd_client_stats st;
    const int rc = shm_conv(cl, reg, mode, &pr.c, pr.x, pr.w, pr.b, pr.y, &st, err, sizeof err);
    ASSERT_OK(convd_client_region_destroy(cl, reg, err, sizeof err), err);
    if (rc) {
      FAIL_AT("case %d (%s, %s): %s", i, convd_dtype_name(p.dtype), mode_name(mode), err);
      problem_free(&pr);
      break;
    }
    double scale = 1;
    for (size_t k = 0; k < pr.c.output_elems; k++)
      if (fabs(pr.want[k]) > scale) scale = fabs(pr.want[k]);
    size_t bad = 0;
    for (size_t k = 0; k < pr.c.output_elems; k++) {
      const double e = fabs((double)pr.y[k] - pr.want[k]);
      if (!(e <= half_ulp * fabs(pr.want[k]) + 1e-5 * scale)) bad++;
    }
    if (bad)
      FAIL_AT("case %d (%s, %s): %zu of %zu elements beyond the bound", i, convd_dtype_name(p.dtype),
              mode_name(mode), bad, pr.c.output_elems);
    else if (!stats_ok("half", mode, &pr.c, &st))
      FAIL_AT("case %d: stats", i);
    else
      printf("  case %d (%s, %s): %zu elements within the bound\n", i, convd_dtype_name(p.dtype),
             mode_name(mode), pr.c.output_elems);
    problem_free(&pr);
  }
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* What a client sees when a reference is wrong: the daemon's statuses, or the library's own
 * checks before anything is sent; the region is free again after each. */
static void test_bad_refs(void) {
  test_daemon d;
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, NULL) == 0);
  convd_client *cl;
  char err[1024];
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = p.c_per_group = 2, p.h = p.w = 8, p.c_out = 3, p.kh = p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  rng r = {0x5eed05b1};
  problem pr;
  ASSERT_TRUE(problem_make(&pr, &p, &r, 0) == 0);
  const convd_client_conv_params cp = convd_client_params_from_conv(&p);
  convd_client_region *reg;
  ASSERT_OK(convd_client_region_create(cl, 4096, &reg, err, sizeof err), err);
  const char *name = convd_client_region_name(reg);
  const size_t xb = pr.c.input_bytes; /* 512 */
  struct {
    const char *what;
    convd_client_shm_refs refs;
    int rc, status;
    const char *words;
  } cases[] = {
      {"unknown region", {.input = {"/convd-no-such-region", 0}}, CONVD_CLIENT_ENOTFOUND, 5, "no region /convd-no-such-region"},
      {"input past the end", {.input = {name, 4096 - xb + 4}}, CONVD_CLIENT_EINVAL, 3, "leave region"},
      {"offset past the end", {.input = {name, 1u << 20}}, CONVD_CLIENT_EINVAL, 3, "leave region"},
      {"output past the end", {.output = {name, 4096 - 64}}, CONVD_CLIENT_EINVAL, 3, "leave region"},
      {"output over the input", {.input = {name, 0}, .output = {name, xb - 4}}, CONVD_CLIENT_EINVAL, 3,
       "overlaps spec.input_region"},
      {"output over the weights", {.weight = {name, 1024}, .output = {name, 1000}}, CONVD_CLIENT_EINVAL, 3,
       "overlaps spec.weight_region"},
      {"bias without has_bias", {.bias = {name, 0}}, CONVD_CLIENT_EINVAL, -1, "p->has_bias is 0"},
      {"a name without its slash", {.input = {"convd-x", 0}}, CONVD_CLIENT_EINVAL, -1, "expected \"/\""},
      {"offset overflowing", {.output = {name, UINT64_MAX - 8}}, CONVD_CLIENT_ERANGE, -1, "overflows"},
  };
  float y[3 * 64];
  for (size_t i = 0; i < sizeof cases / sizeof cases[0] && !test_failed; i++) {
    const convd_client_shm_refs *f = &cases[i].refs;
    err[0] = '\0';
    const int rc = convd_client_conv2d_shm(cl, &cp, f, pr.x, pr.w, NULL, y, NULL, err, sizeof err);
    if (rc != cases[i].rc || strstr(err, cases[i].words) == NULL ||
        (cases[i].status >= 0 && convd_client_last_status(cl) != cases[i].status))
      FAIL_AT("%s: got %d (status %d) \"%s\", expected %d (status %d) naming \"%s\"", cases[i].what, rc,
              convd_client_last_status(cl), err, cases[i].rc, cases[i].status, cases[i].words);
    else
      printf("  %s: %s\n", cases[i].what, err);
  }
  /* Pointers the call needs: the input is nowhere. */
  convd_client_shm_refs out_only = {.output = {name, 1024}};
  ASSERT_EQ_INT(convd_client_conv2d_shm(cl, &cp, &out_only, NULL, pr.w, NULL, NULL, NULL, err, sizeof err),
                CONVD_CLIENT_EINVAL);
  ASSERT_CONTAINS(err, "x is NULL and refs->input names no region");
  /* None of the refused calls holds the region: it is unregistered at once. */
  ASSERT_EQ_INT(region_in_use(cl, name, NULL), 0);
  ASSERT_OK(convd_client_region_destroy(cl, reg, err, sizeof err), err);
  problem_free(&pr);
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* ---- calls in progress ------------------------------------------------------------------- */

/* A call on its own thread and client, with the tensors `mode` names in reg. */
typedef struct bg_call {
  const char *target;
  convd_client *cl;
  convd_client_region *reg;
  int mode;
  problem *pr;
  convd_client_stats st;
  atomic_int started; /* the client exists */
  int rc, status;
  char err[1024];
} bg_call;

static void *bg_main(void *arg) {
  bg_call *b = arg;
  convd_client_opts o = {.timeout_seconds = 300};
  b->rc = convd_client_create(b->target, &o, &b->cl, b->err, sizeof b->err);
  atomic_store(&b->started, 1);
  if (b->rc) return NULL;
  b->rc = shm_conv(b->cl, b->reg, b->mode, &b->pr->c, b->pr->x, b->pr->w, b->pr->b, b->pr->y, &b->st,
                   b->err, sizeof b->err);
  b->status = convd_client_last_status(b->cl);
  return NULL;
}

/* Waits until the daemon lists `name` as used (want 1: by some call, then the in_use count is
 * returned; want 0: by none, then 0); -1 after timeout_s. */
static int wait_in_use(convd_client *cl, const char *name, int want, double timeout_s) {
  const double t0 = now_s();
  while (now_s() - t0 < timeout_s) {
    const int u = region_in_use(cl, name, NULL);
    if (want ? u >= 1 : u == 0) return u;
    usleep(2000);
  }
  return -1;
}

/* ~0.6 G multiply-adds: a second or so on the daemon's reference kernel. */
static convd_conv_params slow_params(void) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = p.c_per_group = 64, p.h = p.w = 128, p.c_out = 64, p.kh = p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  return p;
}

/* A region in use cannot be unregistered (FAILED_PRECONDITION -> CONVD_CLIENT_EBUSY); unlinking
 * its object meanwhile (what convd_client_region_destroy does) does not disturb the call, and
 * the region is unregistered once the call ends. */
static void test_in_use(void) {
  test_daemon d;
  const char *slow[] = {"--cpu-kernel", "reference", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, slow) == 0);
  char err[1024];
  convd_client *cl;
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  const convd_conv_params p = slow_params();
  rng r = {0x5eed05c1};
  problem pr;
  ASSERT_TRUE(problem_make(&pr, &p, &r, 0) == 0);
  convd_client_region *reg;
  ASSERT_OK(convd_client_region_create(cl, layout_of(&pr.c).total, &reg, err, sizeof err), err);
  char name[64];
  snprintf(name, sizeof name, "%s", convd_client_region_name(reg));
  bg_call b = {.target = d.target, .reg = reg, .mode = M_IN | M_OUT, .pr = &pr};
  pthread_t t;
  pthread_create(&t, NULL, bg_main, &b);
  while (!atomic_load(&b.started)) usleep(1000);
  const int in_use = wait_in_use(cl, name, 1, 30);
  if (in_use < 1) FAIL_AT("the call never held its region");
  const int urc = convd_client_unregister_region(cl, name, err, sizeof err);
  const int ust = convd_client_last_status(cl);
  printf("  in_use %d; unregister while in use: %d (status %d) %s\n", in_use, urc, ust, urc ? err : "");
  const int unlinked = shm_unlink(name);
  /* the reference runs beside the call (two cores) */
  float *ref = malloc(pr.c.output_bytes);
  convd_ref_conv2d(&pr.c, pr.x, pr.w, pr.b, ref, NULL);
  for (size_t i = 0; i < pr.c.output_elems; i++) pr.want[i] = ref[i];
  free(ref);
  pthread_join(t, NULL);
  convd_client_destroy(b.cl);
  printf("  the call: %d %s (%.2f s on the server)\n", b.rc, b.rc ? b.err : "ok", b.st.elapsed_seconds);
  ASSERT_EQ_INT(urc, CONVD_CLIENT_EBUSY);
  ASSERT_EQ_INT(ust, 9); /* FAILED_PRECONDITION */
  /* One call, two ranges of the region (input and output): the daemon counts ranges, so it
   * says in_use 2 and "used by 2 calls" where the contract (RegionInfo.in_use: "calls using it
   * now") says 1. Only the refusal is asserted here. */
  ASSERT_TRUE(in_use >= 1);
  ASSERT_CONTAINS(err, "in progress: unregister it once they end");
  ASSERT_TRUE(unlinked == 0 && !shm_exists(name));
  ASSERT_OK(b.rc, b.err);
  ASSERT_TRUE(check_close("call across an unlink", pr.y, pr.want, pr.c.output_elems) == 0);
  ASSERT_EQ_INT(region_in_use(cl, name, NULL), 0); /* released with the call's status */
  ASSERT_OK(convd_client_region_destroy(cl, reg, err, sizeof err), err);
  ASSERT_EQ_INT(region_in_use(cl, name, NULL), -1);
  problem_free(&pr);
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* The object shrunk under a call that writes its output there: DATA_LOSS for that call
 * (CONVD_CLIENT_EDATALOSS), the daemon serving on; and a call cancelled from another thread
 * (convd_client_cancel): CONVD_CLIENT_ECANCELED, its region free again at once. */
static void test_shrunk_and_cancelled(void) {
  test_daemon d;
  const char *slow[] = {"--cpu-kernel", "reference", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, slow) == 0);
  char err[1024];
  convd_client *cl;
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  const convd_conv_params p = slow_params();
  rng r = {0x5eed05d1};
  problem pr;
  ASSERT_TRUE(problem_make(&pr, &p, &r, 0) == 0);
  for (int kind = 0; kind < 2 && !test_failed; kind++) {
    convd_client_region *reg;
    ASSERT_OK(convd_client_region_create(cl, layout_of(&pr.c).total, &reg, err, sizeof err), err);
    char name[64];
    snprintf(name, sizeof name, "%s", convd_client_region_name(reg));
    bg_call b = {.target = d.target, .reg = reg, .mode = M_OUT, .pr = &pr};
    pthread_t t;
    pthread_create(&t, NULL, bg_main, &b);
    while (!atomic_load(&b.started)) usleep(1000);
    const int held = wait_in_use(cl, name, 1, 30) == 1 ? 0 : -1;
    const double t_act = now_s();
    if (held == 0 && kind == 0) { /* shrink it: every output row lies past the first page */
      int fd = shm_open(name, O_RDWR, 0);
      if (fd < 0 || ftruncate(fd, 4096) != 0) FAIL_AT("cannot shrink %s", name);
      if (fd >= 0) close(fd);
    } else if (held == 0) {
      convd_client_cancel(b.cl); /* b.cl exists: the call is in progress */
    }
    pthread_join(t, NULL);
    const double took = now_s() - t_act;
    convd_client_destroy(b.cl);
    printf("  %s: %d (status %d) %.3f s after: %s\n", kind ? "cancelled" : "shrunk", b.rc, b.status,
           took, b.err);
    ASSERT_TRUE(held == 0);
    if (kind == 0) {
      ASSERT_EQ_INT(b.rc, CONVD_CLIENT_EDATALOSS);
      ASSERT_EQ_INT(b.status, 15);
      ASSERT_CONTAINS(b.err, "lost its pages");
    } else {
      ASSERT_EQ_INT(b.rc, CONVD_CLIENT_ECANCELED);
      ASSERT_EQ_INT(b.status, 1);
      ASSERT_CONTAINS(b.err, "cancelled by the client");
      ASSERT_TRUE(took < 5); /* not the call's whole run */
    }
    /* Free again once the status came (the daemon's copies end first), then removed. */
    if (wait_in_use(cl, name, 0, 5) != 0) FAIL_AT("%s still in use after the call ended", name);
    ASSERT_OK(convd_client_region_destroy(cl, reg, err, sizeof err), err);
    ASSERT_TRUE(!shm_exists(name));
  }
  /* and the daemon still serves a region call */
  convd_conv_params q;
  convd_conv_params_default(&q);
  q.n = 1, q.c_in = q.c_per_group = 2, q.h = q.w = 8, q.c_out = 3, q.kh = q.kw = 3;
  problem small;
  ASSERT_TRUE(problem_make(&small, &q, &r, 1) == 0);
  convd_client_region *reg;
  ASSERT_OK(convd_client_region_create(cl, layout_of(&small.c).total, &reg, err, sizeof err), err);
  convd_client_stats st;
  ASSERT_OK(shm_conv(cl, reg, M_IN | M_OUT, &small.c, small.x, small.w, small.b, small.y, &st, err, sizeof err), err);
  ASSERT_TRUE(check_close("after", small.y, small.want, small.c.output_elems) == 0);
  ASSERT_OK(convd_client_region_destroy(cl, reg, err, sizeof err), err);
  problem_free(&small);
  problem_free(&pr);
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* ---- convctl conv --shm ------------------------------------------------------------------ */

/* convctl's conv or conv-transpose arguments for golden case g, output to out; returns argc. */
static int golden_argv(const golden *g, const char *target, char *out, char bufs[8][640], char **argv) {
  const int transposed = strcmp(g->op, "conv_transpose2d") == 0;
  snprintf(bufs[0], 640, "%s/input.npy", g->dir);
  snprintf(bufs[1], 640, "%s/weight.npy", g->dir);
  snprintf(bufs[2], 640, "%s/bias.npy", g->dir);
  snprintf(bufs[3], 640, "%lld,%lld", (long long)g->p.stride_h, (long long)g->p.stride_w);
  snprintf(bufs[4], 640, "%lld,%lld,%lld,%lld", (long long)g->p.pad_top, (long long)g->p.pad_bottom,
           (long long)g->p.pad_left, (long long)g->p.pad_right);
  snprintf(bufs[5], 640, "%lld,%lld", (long long)g->p.dil_h, (long long)g->p.dil_w);
  snprintf(bufs[6], 640, "%lld", (long long)g->p.groups);
  snprintf(bufs[7], 640, "%lld,%lld", (long long)g->p.out_pad_h, (long long)g->p.out_pad_w);
  int argc = 0;
  char *fixed[] = {CONVCTL_BIN, transposed ? "conv-transpose" : "conv", "--server", (char *)target,
                   "--input", bufs[0], "--weight", bufs[1], "--stride", bufs[3], "--padding", bufs[4],
                   "--dilation", bufs[5], "--groups", bufs[6], "--output", out, "--shm"};
  for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) argv[argc++] = fixed[i];
  if (g->p.has_bias) argv[argc++] = "--bias", argv[argc++] = bufs[2];
  if (transposed) argv[argc++] = "--output-padding", argv[argc++] = bufs[7];
  argv[argc] = NULL;
  return argc;
}

/* Every golden case through `convctl conv --shm` (float32; a few as float16 too; every third over
 * the daemon's Unix socket), equal to the expected output, the daemon's regions and /dev/shm
 * empty afterwards. */
static void test_convctl_golden(void) {
  char before[256][64], fresh[64] = "";
  const int nb = shm_client_objects(before, 256);
  test_daemon d;
  const char *extra[] = {"--listen", unix_target(), NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char names[64][128], err[1024], out[300], log_out[300], log_err[300];
  snprintf(log_out, sizeof log_out, "/tmp/convd-shm-%d-convctl.out", (int)getpid());
  snprintf(log_err, sizeof log_err, "/tmp/convd-shm-%d-convctl.err", (int)getpid());
  const int n = golden_list(golden_root, names, 64);
  int ran = 0;
  for (int i = 0; i < n && !test_failed; i++) {
    golden g;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    for (int half = 0; half < 1 + (i % 5 == 0) && !test_failed; half++) {
      snprintf(out, sizeof out, "/tmp/convd-shm-%d-%.120s.npy", (int)getpid(), names[i]);
      char bufs[8][640], *argv[40];
      int argc = golden_argv(&g, i % 3 == 1 ? unix_target() : d.target, out, bufs, argv);
      if (half) argv[argc++] = "--dtype", argv[argc++] = "float16", argv[argc] = NULL;
      const int rc = test_run(argv, log_out, log_err, 120);
      char msg[2048] = "";
      if (rc != 0) {
        test_read_file(log_err, msg, sizeof msg);
        FAIL_AT("convctl --shm on %s exited %d: %s", names[i], rc, msg);
        break;
      }
      test_read_file(log_out, msg, sizeof msg);
      if (strstr(msg, "written to") == NULL || strstr(msg, "op") == NULL) FAIL_AT("convctl printed \"%s\"", msg);
      convd_npy y;
      if (convd_npy_read(out, &y, err, sizeof err)) {
        FAIL_AT("%s", err);
      } else {
        if (y.ndim != 4 || y.shape[0] != g.output[0] || y.shape[1] != g.output[1] ||
            y.shape[2] != g.output[2] || y.shape[3] != g.output[3] || y.elem_size != 4) {
          FAIL_AT("%s: output has the wrong shape or dtype", names[i]);
        } else if (!half && check_close(names[i], y.data, g.expected, g.expected_count)) {
          FAIL_AT("golden case %s through convctl --shm", names[i]);
        } else if (half) { /* float16 inputs: a coarse bound, the point is the 2-byte path */
          double worst = 0, scale = 1;
          for (size_t k = 0; k < g.expected_count; k++) {
            const double e = fabs((double)((float *)y.data)[k] - g.expected[k]);
            if (!(e <= worst)) worst = e;
            if (fabs(g.expected[k]) > scale) scale = fabs(g.expected[k]);
          }
          printf("  %s as float16: max error %.3g of scale %.3g\n", names[i], worst, scale);
          if (!(worst <= 1e-2 * scale)) FAIL_AT("%s as float16: max error %.3g", names[i], worst);
        }
        convd_npy_free(&y);
      }
      unlink(out);
      ran++;
    }
    golden_free(&g);
  }
  convd_client *cl;
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  size_t left = 99;
  region_in_use(cl, NULL, &left);
  convd_client_destroy(cl);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  ASSERT_EQ_INT(left, 0); /* every region convctl registered is unregistered */
  if (shm_new_objects(before, nb, fresh, sizeof fresh)) FAIL_AT("convctl left /dev/shm/%s", fresh);
  ASSERT_TRUE(ran >= 19);
  unlink(log_out), unlink(log_err);
}

/* Starts argv with stdout and stderr to files; the pid, or -1. */
static pid_t spawn(char *const argv[], const char *out_path, const char *err_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid;
  const int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc ? -1 : pid;
}

/* Its exit status, -1 for a signal, -2 after timeout_s (then it is killed). */
static int wait_pid(pid_t pid, double timeout_s) {
  const double t0 = now_s();
  int st;
  for (;;) {
    const pid_t w = waitpid(pid, &st, WNOHANG);
    if (w == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (now_s() - t0 > timeout_s) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      return -2;
    }
    usleep(5000);
  }
}

/* convctl --shm against a daemon without shared memory: a clear message, exit 1, nothing left;
 * interrupted by SIGINT mid-call: the call cancelled, its region unregistered and unlinked, no
 * output (partial or not), exit 130. */
static void test_convctl_refused_and_interrupted(void) {
  char before[256][64], fresh[64] = "";
  const int nb = shm_client_objects(before, 256);
  char x[256], w[256], y[256], log_out[300], log_err[300], err[1024], msg[4096];
  const int pid = (int)getpid();
  snprintf(x, sizeof x, "/tmp/convd-shm-%d-x.npy", pid);
  snprintf(w, sizeof w, "/tmp/convd-shm-%d-w.npy", pid);
  snprintf(y, sizeof y, "/tmp/convd-shm-%d-y.npy", pid);
  snprintf(log_out, sizeof log_out, "/tmp/convd-shm-%d-convctl.out", pid);
  snprintf(log_err, sizeof log_err, "/tmp/convd-shm-%d-convctl.err", pid);
  /* 1x128x256x256 and 128x128x3x3: ~10 G multiply-adds, a long while on the reference kernel */
  const int64_t xs[4] = {1, 128, 256, 256}, ws[4] = {128, 128, 3, 3};
  const size_t xn = 128u * 256 * 256, wn = 128u * 128 * 9;
  float *buf = malloc(xn * sizeof(float));
  ASSERT_TRUE(buf != NULL);
  rng r = {0x5eed05e1};
  rng_fill(&r, buf, xn);
  ASSERT_OK(convd_npy_write_f32(x, xs, 4, buf, err, sizeof err), err);
  ASSERT_OK(convd_npy_write_f32(w, ws, 4, buf, err, sizeof err), err);
  (void)wn;
  free(buf);

  test_daemon d;
  const char *off[] = {"--max-shm-bytes", "0", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, off) == 0);
  char *argv[] = {CONVCTL_BIN, "conv", "--server", d.target, "--input", x, "--weight", w,
                  "--padding", "1", "--output", y, "--shm", NULL};
  int rc = test_run(argv, log_out, log_err, 60);
  test_read_file(log_err, msg, sizeof msg);
  printf("  without shared memory: exit %d: %s", rc, msg);
  ASSERT_EQ_INT(rc, 1);
  ASSERT_CONTAINS(msg, "no shared memory");
  ASSERT_TRUE(access(y, F_OK) != 0);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  char *unary[] = {CONVCTL_BIN, "conv", "--server", "127.0.0.1:1", "--input", x, "--weight", w,
                   "--output", y, "--shm", "--unary", NULL};
  ASSERT_EQ_INT(test_run(unary, log_out, log_err, 60), 2);
  test_read_file(log_err, msg, sizeof msg);
  ASSERT_CONTAINS(msg, "--shm and --unary");

  const char *slow[] = {"--cpu-kernel", "reference", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, slow) == 0);
  argv[3] = d.target;
  const pid_t child = spawn(argv, log_out, log_err);
  ASSERT_TRUE(child > 0);
  convd_client *cl;
  ASSERT_OK(convd_client_create(d.target, NULL, &cl, err, sizeof err), err);
  /* Its region, once a call holds it. */
  char name[CONVD_CLIENT_REGION_NAME_MAX + 1] = "";
  const double t0 = now_s();
  while (name[0] == '\0' && now_s() - t0 < 60) {
    convd_client_region_info *v;
    size_t n;
    if (convd_client_list_regions(cl, &v, &n, NULL, 0, err, sizeof err) == 0) {
      if (n == 1 && v[0].in_use >= 1) snprintf(name, sizeof name, "%s", v[0].name);
      free(v);
    }
    usleep(5000);
  }
  const int had_object = name[0] && shm_exists(name);
  kill(child, SIGINT);
  const double t_sig = now_s();
  rc = wait_pid(child, 60);
  const double took = now_s() - t_sig;
  test_read_file(log_err, msg, sizeof msg);
  printf("  SIGINT %.2f s into the call (region %s): exit %d after %.2f s: %s", t_sig - t0, name, rc, took, msg);
  size_t left = 99;
  region_in_use(cl, NULL, &left);
  convd_client_destroy(cl);
  char partial[300];
  snprintf(partial, sizeof partial, "%s.partial-%d", y, (int)child);
  ASSERT_TRUE(name[0] != '\0' && had_object);
  ASSERT_EQ_INT(rc, 130);
  ASSERT_CONTAINS(msg, "interrupted (SIGINT)");
  ASSERT_TRUE(took < 10);
  ASSERT_EQ_INT(left, 0); /* unregistered */
  ASSERT_TRUE(!shm_exists(name));
  ASSERT_TRUE(access(y, F_OK) != 0 && access(partial, F_OK) != 0);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  if (shm_new_objects(before, nb, fresh, sizeof fresh)) FAIL_AT("convctl left /dev/shm/%s", fresh);
  unlink(x), unlink(w), unlink(log_out), unlink(log_err);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"region_lifecycle", test_region_lifecycle},
      {"region_refused_leaves_nothing", test_region_refused_leaves_nothing},
      {"golden_modes", test_golden_modes},
      {"random_modes", test_random_modes},
      {"half_dtypes_in_regions", test_half_dtypes_in_regions},
      {"bad_refs", test_bad_refs},
      {"in_use", test_in_use},
      {"shrunk_and_cancelled", test_shrunk_and_cancelled},
      {"convctl_golden", test_convctl_golden},
      {"convctl_refused_and_interrupted", test_convctl_refused_and_interrupted},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
