/* convctl: the command-line client, on libconvd_client's public interface (client.h); `plan`
 * alone uses the engine's planner in-process, and `conv --shm` the engine's dtype conversions.
 *   convctl conv [--server ADDR] --input X.npy (--weight W.npy [--bias B.npy] | --weights-id ID)
 *                [--stride SH,SW] [--padding T,B,L,R] [--dilation DH,DW] [--groups G]
 *                --output Y.npy [--unary | --shm] [--chunk-bytes N] [--timeout SECONDS]
 *                [--priority N] [--json] [--no-progress]
 *   convctl weights put|list|delete [--server ADDR] ...
 *   convctl devices|health [--server ADDR]
 * ADDR is HOST:PORT or unix:/path/to/convd.sock (a daemon's Unix socket on this host), or
 * several daemons (ipv4:A:P,B:P or dns:///NAME:PORT) with --lb round_robin|pick_first (or
 * $CONVD_LB); without --server, $CONVD_SERVER, else 127.0.0.1:50051.
 *   convctl --version
 * Every command that talks to a server also takes --tls-ca FILE [--tls-cert FILE --tls-key FILE]
 * [--tls-server-name NAME] and --token-file FILE (or CONVD_TLS_CA, CONVD_TLS_CERT, CONVD_TLS_KEY,
 * CONVD_TLS_SERVER_NAME, CONVD_TOKEN in the environment).
 * Exit status: 0 ok, 1 the call failed (the server's message is printed), 2 bad usage;
 * `conv` interrupted by SIGINT or SIGTERM: 128 + the signal, once the call is cancelled and (with
 * --shm) its regions are removed; no partial output is left.
 *
 * Output: results on stdout (with --json one JSON object and nothing else), everything else on
 * stderr: notes, errors, and on a terminal the progress line of `conv`, redrawn in place (at most
 * 10 times a second, from the library's progress callback) and erased before the result.
 *
 * Threads: one, except under `conv --shm`, where a second waits for SIGINT/SIGTERM (blocked in
 * every other thread, gRPC's included) and cancels the call in progress so that the main thread
 * removes the regions; shm_run's mutex guards what they share. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "client_params.h"
#include "convd_version.h"
#include "dtype.h"
#include "npy.h"
#include "plan.h"

#define DEFAULT_SERVER "127.0.0.1:50051"

static void usage(FILE *f) {
  fprintf(f,
          "usage:\n"
          "  convctl conv [--server ADDR] --input X.npy --output Y.npy\n"
          "               (--weight W.npy [--bias B.npy] | --weights-id ID)\n"
          "               [--stride SH,SW] [--padding T,B,L,R] [--dilation DH,DW] [--groups G]\n"
          "               [--unary | --shm] [--chunk-bytes N] [--timeout SECONDS]\n"
          "               [--dtype float32|float16|bfloat16] [--tf32] [--priority N]\n"
          "               [--json] [--no-progress]\n"
          "  convctl conv-transpose (the options of conv) [--output-padding OH,OW]\n"
          "               weights (C_in, C_out/groups, kH, kW), as PyTorch's conv_transpose2d\n"
          "  convctl weights put [--server ADDR] --weight W.npy [--bias B.npy]\n"
          "               [--op conv|conv-transpose] [--groups G (conv-transpose)] [--dtype D]\n"
          "               [--json]   (prints the id; the same weights always get the same id)\n"
          "  convctl weights list [--server ADDR] [--json]\n"
          "  convctl weights delete [--server ADDR] ID\n"
          "  convctl devices [--server ADDR] [--timeout SECONDS]\n"
          "  convctl health [--server ADDR] [--service NAME] [--timeout SECONDS]\n"
          "               (exit 0 when SERVING: for container health checks)\n"
          "  convctl plan --input N,C,H,W --weight C_out,C_in/groups,kH,kW [--stride SH,SW]\n"
          "               [--padding T,B,L,R] [--dilation DH,DW] [--groups G] [--devices K]\n"
          "               [--device-memory BYTES (default 64M)]\n"
          "  convctl --version\n"
          "\n"
          "Tensors are .npy files of float32 (float64 is converted to float32, with a note;\n"
          "float16 input makes a float16 call, as --dtype float16 would, unless --dtype says\n"
          "otherwise): input N,C,H,W; weight C_out,C_in/groups,kH,kW; bias C_out. The output is\n"
          "written as float32. --stride/--dilation take one value for both axes or two (H,W);\n"
          "--padding one value, two (H,W) or four (top,bottom,left,right).\n"
          "--dtype float16/bfloat16 sends the tensors rounded to that type and returns its\n"
          "output; --tf32 lets GPUs use TF32 on float32 tensors. --priority N: higher runs first\n"
          "(default 0; negative yields). --weights-id ID names weights registered with\n"
          "`convctl weights put` instead of sending them (their bias comes with them).\n"
          "Sizes (--chunk-bytes, --device-memory) take K, M and G suffixes (powers of 1024).\n"
          "On a terminal, conv shows a progress line on stderr (rows done, MB/s, ETA; off with\n"
          "--no-progress) and ends with the client's time, GB/s (tensor bytes in and out over\n"
          "that time) and GFLOP/s; --json prints one JSON object on stdout instead.\n"
          "--shm: the daemon must run on this host. The tensors go through a POSIX shared-memory\n"
          "region that convctl creates and registers (RegisterRegion) instead of the socket: the\n"
          "input, weight and bias files are copied into it from their mappings, the daemon\n"
          "reads them there and writes the output there, and convctl copies the output into\n"
          "the output file. The region is removed at the end, also on an error, SIGINT or\n"
          "SIGTERM (which cancel the call; exit 128 + the signal).\n"
          "\n"
          "Connecting (conv, conv-transpose, weights, devices, health): ADDR is HOST:PORT, or\n"
          "unix:/path/to/convd.sock for a daemon's Unix socket on this host; without --server,\n"
          "$CONVD_SERVER, else " DEFAULT_SERVER ". Several daemons: ipv4:A:PORT,B:PORT or\n"
          "dns:///NAME:PORT (every address NAME resolves to, e.g. a headless Kubernetes Service).\n"
          "  --lb POLICY           round_robin: each call to the next daemon (one that fails\n"
          "                        UNAVAILABLE before a daemon answered is retried on another);\n"
          "                        pick_first (the default): the first address that answers.\n"
          "                        Without the flag: CONVD_LB\n"
          "  --tls-ca FILE         TLS: the CA (PEM) that signed the server's certificate\n"
          "  --tls-cert FILE --tls-key FILE   mutual TLS: this client's certificate and key\n"
          "  --tls-server-name NAME           the name the server's certificate carries, when\n"
          "                        it is not the --server host (localhost for unix:)\n"
          "  --token-file FILE     send the token on the file's first line (keep it mode 600)\n"
          "Without the flags: CONVD_TLS_CA, CONVD_TLS_CERT, CONVD_TLS_KEY, CONVD_TLS_SERVER_NAME\n"
          "(the last three only with a CA) and CONVD_TOKEN (the token itself).\n");
}

/* ---- options ----------------------------------------------------------------------------- */

typedef struct args {
  const char *cmd;    /* argv[1] */
  const char *action; /* weights: put, list or delete */
  const char *id;     /* weights delete ID */
  const char *server, *input, *weight, *bias, *output;
  const char *stride, *padding, *dilation, *groups, *chunk, *timeout, *devices, *device_memory;
  const char *dtype, *service, *output_padding, *weights_id, *priority, *op;
  const char *tls_ca, *tls_cert, *tls_key, *tls_server_name, *token_file, *lb;
  const char *server_from; /* where server came from, for messages */
  int unary, tf32, shm, json, no_progress;
} args;

/* Parses "a,b,..." into up to max integers; returns how many, or -1. */
static int parse_list(const char *s, int64_t *v, int max) {
  int n = 0;
  if (*s == '\0') return -1;
  while (*s) {
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (end == s || errno || n == max) return -1;
    v[n++] = x;
    s = end;
    if (*s == ',' && s[1]) s++;
    else if (*s) return -1;
  }
  return n;
}

/* A whole integer in [lo, hi] into *out; else a message naming the option, and -1. */
static int parse_int(const char *opt, const char *s, long long lo, long long hi, long long *out) {
  char *end;
  errno = 0;
  const long long v = strtoll(s, &end, 10);
  if (end == s || *end || errno || v < lo || v > hi) {
    fprintf(stderr, "convctl: %s %s: expected an integer from %lld to %lld\n", opt, s, lo, hi);
    return -1;
  }
  *out = v;
  return 0;
}

/* A byte size with an optional K/M/G/T suffix (powers of 1024), at least 1. */
static int parse_bytes(const char *opt, const char *s, uint64_t *out) {
  if (convd_parse_size(s, out) || *out == 0) {
    fprintf(stderr, "convctl: %s %s: expected a byte size such as 1048576, 512K, 4M or 1G\n", opt, s);
    return -1;
  }
  return 0;
}

static int is_cmd(const args *a, const char *name) { return strcmp(a->cmd, name) == 0; }

static int parse_args(int argc, char **argv, args *a) {
  struct {
    const char *name;
    const char **dst;
  } opts[] = {{"--server", &a->server},     {"--input", &a->input},     {"--weight", &a->weight},
              {"--bias", &a->bias},         {"--output", &a->output},   {"--stride", &a->stride},
              {"--padding", &a->padding},   {"--dilation", &a->dilation}, {"--groups", &a->groups},
              {"--chunk-bytes", &a->chunk}, {"--timeout", &a->timeout},
              {"--devices", &a->devices},   {"--device-memory", &a->device_memory},
              {"--dtype", &a->dtype},       {"--service", &a->service},
              {"--output-padding", &a->output_padding},
              {"--weights-id", &a->weights_id}, {"--priority", &a->priority}, {"--op", &a->op},
              {"--tls-ca", &a->tls_ca},     {"--tls-cert", &a->tls_cert},
              {"--tls-key", &a->tls_key},   {"--tls-server-name", &a->tls_server_name},
              {"--token-file", &a->token_file}, {"--lb", &a->lb}};
  struct {
    const char *name;
    int *dst;
  } flags[] = {{"--unary", &a->unary}, {"--tf32", &a->tf32},   {"--shm", &a->shm},
               {"--json", &a->json},   {"--no-progress", &a->no_progress}};
  a->cmd = argv[1];
  int i = 2;
  if (is_cmd(a, "weights")) {
    if (argc < 3 || (strcmp(argv[2], "put") && strcmp(argv[2], "list") && strcmp(argv[2], "delete"))) {
      fprintf(stderr, "convctl weights: expected put, list or delete%s%s\n", argc < 3 ? "" : ", not ",
              argc < 3 ? "" : argv[2]);
      return -1;
    }
    a->action = argv[i++];
  }
  for (; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage(stdout);
      exit(0);
    }
    size_t k;
    for (k = 0; k < sizeof flags / sizeof flags[0]; k++)
      if (strcmp(argv[i], flags[k].name) == 0) break;
    if (k < sizeof flags / sizeof flags[0]) {
      *flags[k].dst = 1;
      continue;
    }
    if (a->action && strcmp(a->action, "delete") == 0 && argv[i][0] != '-' && a->id == NULL) {
      a->id = argv[i];
      continue;
    }
    for (k = 0; k < sizeof opts / sizeof opts[0]; k++)
      if (strcmp(argv[i], opts[k].name) == 0) break;
    if (k == sizeof opts / sizeof opts[0]) {
      fprintf(stderr, "convctl: unknown argument '%s' (convctl --help lists them)\n", argv[i]);
      return -1;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "convctl: %s needs a value\n", argv[i]);
      return -1;
    }
    *opts[k].dst = argv[++i];
  }
  if (a->server) {
    a->server_from = "from --server";
  } else if ((a->server = getenv("CONVD_SERVER")) != NULL && a->server[0]) {
    a->server_from = "from $CONVD_SERVER";
  } else {
    a->server = DEFAULT_SERVER;
    a->server_from = "the default address; set --server or $CONVD_SERVER";
  }
  return 0;
}

/* A flag, else the environment variable; "" counts as unset. */
static const char *flag_or_env(const char *flag, const char *var) {
  const char *v = flag ? flag : getenv(var);
  return v && v[0] ? v : NULL;
}

/* The first line of the token file, trimmed, into token (len bytes). A file others can read
 * is used, with a warning: the daemon refuses such a tokens file, a client only warns. */
static int read_token_file(const char *path, char *token, size_t len) {
  FILE *f = fopen(path, "r");
  if (f == NULL) {
    fprintf(stderr, "convctl: --token-file %s: %s\n", path, strerror(errno));
    return -1;
  }
  struct stat st;
  if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077))
    fprintf(stderr,
            "convctl: warning: --token-file %s is readable or writable by group or others (mode "
            "%04o): run `chmod 600 %s`\n",
            path, (unsigned)(st.st_mode & 07777), path);
  if (fgets(token, (int)len, f) == NULL) token[0] = '\0';
  fclose(f);
  size_t n = strlen(token);
  while (n && (token[n - 1] == '\n' || token[n - 1] == '\r' || token[n - 1] == ' ' || token[n - 1] == '\t'))
    token[--n] = '\0';
  size_t skip = 0;
  while (token[skip] == ' ' || token[skip] == '\t') skip++;
  memmove(token, token + skip, n - skip + 1);
  if (token[0] == '\0') {
    fprintf(stderr, "convctl: --token-file %s: its first line holds no token\n", path);
    return -1;
  }
  return 0;
}

static int client_from_args(const args *a, convd_client **c) {
  convd_client_opts o = {0};
  char err[512];
  /* TLS is on with a CA; the other TLS settings are read from the environment only then, so
   * that a daemon's own CONVD_TLS_CERT/CONVD_TLS_KEY in the same environment are not taken
   * for a client certificate. */
  if ((o.tls_ca_file = flag_or_env(a->tls_ca, "CONVD_TLS_CA")) != NULL) {
    o.tls_cert_file = flag_or_env(a->tls_cert, "CONVD_TLS_CERT");
    o.tls_key_file = flag_or_env(a->tls_key, "CONVD_TLS_KEY");
    o.tls_server_name = flag_or_env(a->tls_server_name, "CONVD_TLS_SERVER_NAME");
  } else if (a->tls_cert || a->tls_key || a->tls_server_name) {
    fprintf(stderr, "convctl: --tls-cert, --tls-key and --tls-server-name need --tls-ca (the CA "
                    "that signed the server's certificate)\n");
    return 2;
  }
  static char token[4200];
  if (a->token_file) {
    if (read_token_file(a->token_file, token, sizeof token)) return 2;
    o.token = token;
  } else {
    o.token = flag_or_env(NULL, "CONVD_TOKEN");
  }
  if (a->chunk) {
    uint64_t v;
    if (parse_bytes("--chunk-bytes", a->chunk, &v)) return 2;
    if (v > SIZE_MAX / 2) {
      fprintf(stderr, "convctl: --chunk-bytes %s: too large\n", a->chunk);
      return 2;
    }
    o.chunk_bytes = (size_t)v;
  }
  if (a->timeout) {
    char *end;
    o.timeout_seconds = strtod(a->timeout, &end);
    if (end == a->timeout || *end || !(o.timeout_seconds > 0) || o.timeout_seconds > 1e9) {
      fprintf(stderr, "convctl: --timeout %s: expected positive seconds (such as 30 or 0.5)\n",
              a->timeout);
      return 2;
    }
  }
  o.lb_policy = flag_or_env(a->lb, "CONVD_LB");
  int rc = convd_client_create(a->server, &o, c, err, sizeof err);
  memset(token, 0, sizeof token); /* the client keeps its own copy */
  if (rc) {
    if (o.lb_policy && strncmp(err, "lb_policy", 9) == 0)
      fprintf(stderr, "convctl: %s %s: expected pick_first or round_robin\n",
              a->lb ? "--lb" : "$CONVD_LB", o.lb_policy);
    else if (a->chunk && strstr(err, "chunk_bytes"))
      fprintf(stderr, "convctl: --chunk-bytes %s: too large for one message (%s)\n", a->chunk, err);
    else
      fprintf(stderr, "convctl: %s\n", err);
    return 2;
  }
  return 0;
}

/* A failed call's message, with what to do about the usual causes. */
static void report_call_error(const args *a, int rc, const char *err) {
  fprintf(stderr, "convctl: %s\n", err);
  if (rc == CONVD_CLIENT_EUNAVAIL)
    fprintf(stderr, "convctl: is convd running at %s? (%s)\n", a->server, a->server_from);
  else if (rc == CONVD_CLIENT_ELIMIT && a->unary &&
           (strstr(err, "message limit") || strstr(err, "larger than max")))
    fprintf(stderr, "convctl: --unary sends the whole call in one message each way: drop --unary "
                    "to stream it (a streamed call has no size limit)\n");
}

/* ---- tensors in .npy files ------------------------------------------------------------------ */

/* n elements of a file's type (elem_size 4, 8 or 2) into floats. */
static void to_floats(int elem_size, const void *src, float *dst, size_t n) {
  if (elem_size == 4) memcpy(dst, src, n * sizeof(float));
  else if (elem_size == 2) convd_dtype_decode(CONVD_CLIENT_FLOAT16, src, dst, n);
  else
    for (size_t i = 0; i < n; i++) {
      double d;
      memcpy(&d, (const uint8_t *)src + i * 8, 8);
      dst[i] = (float)d;
    }
}

/* Reads a .npy of ndim dimensions (header_only: its header, for reading in place); float32,
 * float64 or float16 (the callers convert the last two, with their notes). */
static int load_npy(const char *what, const char *path, int ndim, int header_only, convd_npy *a) {
  char err[512];
  if ((header_only ? convd_npy_read_header : convd_npy_read)(path, a, err, sizeof err)) {
    fprintf(stderr, "convctl: %s %s\n", what, err);
    return -1;
  }
  if (a->ndim != ndim) {
    fprintf(stderr, "convctl: %s %s has %d dimensions, expected %d (%s)\n", what, path, a->ndim,
            ndim, strcmp(what, "input") == 0 ? "N,C,H,W" : ndim == 1 ? "C_out" : "a weight's four");
    convd_npy_free(a);
    return -1;
  }
  return 0;
}

/* One line on stderr naming the float64 files among the n given (path NULL: none). */
static void note_float64(const convd_npy *const *f, const char *const *what, const char *const *path,
                         int n) {
  int k = 0;
  for (int i = 0; i < n; i++)
    if (path[i] && f[i]->elem_size == 8)
      fprintf(stderr, "%s%s %s", k++ ? ", " : "convctl: note: ", what[i], path[i]);
  if (k) fprintf(stderr, " %s float64: converted to float32, which convd computes in\n", k > 1 ? "are" : "is");
}

/* The array's data as float32, in place (a no-op for float32). */
static int npy_to_f32(const char *path, convd_npy *a) {
  if (a->elem_size == 4 || a->data == NULL) return 0;
  float *f = malloc((a->count ? a->count : 1) * sizeof *f);
  if (f == NULL) {
    fprintf(stderr, "convctl: %s: out of memory converting it to float32\n", path);
    return -1;
  }
  to_floats(a->elem_size, a->data, f, a->count);
  free(a->data);
  a->data = f;
  a->elem_size = 4;
  return 0;
}

/* The conv command's tensors in files, read and written band by band (convd_client_io), so
 * convctl holds one chunk of each, never the tensors. The output is float32; the input may be
 * float64 or float16 in its file, converted here as it is read. */
typedef struct file_io {
  int fd[2];        /* input, output */
  long base[2];     /* where their data starts */
  int64_t c[2], h[2], w[2];
  int in_elem;      /* bytes per input element in its file */
  uint8_t *buf;     /* conversion buffer (a non-float32 input) */
  size_t buf_len;
} file_io;

static int pread_all(int fd, void *dst, size_t len, off_t at) {
  for (size_t got = 0; got < len;) {
    const ssize_t k = pread(fd, (uint8_t *)dst + got, len - got, at + (off_t)got);
    if (k <= 0) return CONVD_CLIENT_EIO;
    got += (size_t)k;
  }
  return 0;
}

/* Bytes [pos, pos + len) of the input as float32 (pos counted in float32 bytes from the
 * tensor's start: a range may begin or end inside an element). */
static int read_input_f32(file_io *f, size_t pos, uint8_t *dst, size_t len) {
  const int e = f->in_elem;
  if (e == 4) return pread_all(f->fd[0], dst, len, (off_t)f->base[0] + (off_t)pos);
  const size_t first = pos / 4, n = (pos + len + 3) / 4 - first;
  const size_t need = n * (size_t)e + n * sizeof(float);
  if (need > f->buf_len) {
    uint8_t *b = realloc(f->buf, need);
    if (b == NULL) return CONVD_CLIENT_ENOMEM;
    f->buf = b, f->buf_len = need;
  }
  float *conv = (float *)(void *)(f->buf + n * (size_t)e);
  int rc = pread_all(f->fd[0], f->buf, n * (size_t)e, (off_t)f->base[0] + (off_t)(first * (size_t)e));
  if (rc) return rc;
  to_floats(e, f->buf, conv, n);
  memcpy(dst, (uint8_t *)conv + pos % 4, len);
  return 0;
}

/* Bytes [off, off + len) of band (n, rows [h0, h1)) of tensor t, whose band order is (C, rows,
 * W): within one channel the band's rows are one contiguous range of the NCHW file. */
static int band_file(file_io *f, int t, int64_t n, int64_t h0, int64_t h1, size_t off, char *buf,
                     size_t len) {
  const size_t run = (size_t)(h1 - h0) * (size_t)f->w[t] * sizeof(float);
  while (len) {
    const size_t c = off / run, in = off % run, take = run - in < len ? run - in : len;
    const size_t pos = (((size_t)n * (size_t)f->c[t] + c) * (size_t)f->h[t] + (size_t)h0) *
                           (size_t)f->w[t] * sizeof(float) + in;
    if (t == 0) {
      const int rc = read_input_f32(f, pos, (uint8_t *)buf, take);
      if (rc) return rc;
    } else {
      for (size_t put = 0; put < take;) {
        const ssize_t k = pwrite(f->fd[1], buf + put, take - put, (off_t)f->base[1] + (off_t)(pos + put));
        if (k <= 0) return CONVD_CLIENT_EIO;
        put += (size_t)k;
      }
    }
    buf += take, off += take, len -= take;
  }
  return 0;
}

static int file_read(void *ctx, int64_t n, int64_t h0, int64_t h1, size_t off, void *dst, size_t len) {
  return band_file(ctx, 0, n, h0, h1, off, dst, len);
}

static int file_write(void *ctx, int64_t n, int64_t h0, int64_t h1, size_t off, const void *src,
                      size_t len) {
  return band_file(ctx, 1, n, h0, h1, off, (char *)src, len);
}

/* --stride, --padding, --dilation, --groups, --dtype, --tf32 into p (shapes left zero). */
static int parse_conv_options(const args *a, convd_client_conv_params *p) {
  convd_client_conv_params_default(p);
  int64_t v[4];
  int n;
  if (a->stride) {
    if ((n = parse_list(a->stride, v, 2)) < 1) {
      fprintf(stderr, "convctl: --stride %s: expected one integer (both axes) or two (SH,SW)\n", a->stride);
      return -1;
    }
    p->stride_h = v[0], p->stride_w = n == 2 ? v[1] : v[0];
  }
  if (a->dilation) {
    if ((n = parse_list(a->dilation, v, 2)) < 1) {
      fprintf(stderr, "convctl: --dilation %s: expected one integer (both axes) or two (DH,DW)\n", a->dilation);
      return -1;
    }
    p->dil_h = v[0], p->dil_w = n == 2 ? v[1] : v[0];
  }
  if (a->padding) {
    n = parse_list(a->padding, v, 4);
    if (n == 1) p->pad_top = p->pad_bottom = p->pad_left = p->pad_right = v[0];
    else if (n == 2) p->pad_top = p->pad_bottom = v[0], p->pad_left = p->pad_right = v[1];
    else if (n == 4) p->pad_top = v[0], p->pad_bottom = v[1], p->pad_left = v[2], p->pad_right = v[3];
    else {
      fprintf(stderr, "convctl: --padding %s: expected one integer, two (H,W) or four "
                      "(top,bottom,left,right)\n", a->padding);
      return -1;
    }
  }
  if (a->groups) {
    long long g;
    if (parse_int("--groups", a->groups, 1, INT32_MAX, &g)) return -1;
    p->groups = g;
  }
  if (a->dtype) {
    if (strcmp(a->dtype, "float32") == 0) p->dtype = CONVD_CLIENT_FLOAT32;
    else if (strcmp(a->dtype, "float16") == 0) p->dtype = CONVD_CLIENT_FLOAT16;
    else if (strcmp(a->dtype, "bfloat16") == 0) p->dtype = CONVD_CLIENT_BFLOAT16;
    else {
      fprintf(stderr, "convctl: --dtype %s: expected float32, float16 or bfloat16\n", a->dtype);
      return -1;
    }
  }
  p->allow_tf32 = a->tf32;
  return 0;
}

static int cmd_plan(const args *a) {
  convd_client_conv_params cp;
  if (parse_conv_options(a, &cp)) return 2;
  convd_conv_params p;
  convd_client_params_to_conv(&cp, &p);
  int64_t in[4], wt[4];
  if (!a->input || !a->weight) {
    fprintf(stderr, "convctl plan: --input N,C,H,W and --weight C_out,C_in/groups,kH,kW are required\n");
    return 2;
  }
  if (parse_list(a->input, in, 4) != 4) {
    fprintf(stderr, "convctl plan: --input %s: expected four integers N,C,H,W\n", a->input);
    return 2;
  }
  if (parse_list(a->weight, wt, 4) != 4) {
    fprintf(stderr, "convctl plan: --weight %s: expected four integers C_out,C_in/groups,kH,kW\n", a->weight);
    return 2;
  }
  p.n = in[0], p.c_in = in[1], p.h = in[2], p.w = in[3];
  p.c_out = wt[0], p.c_per_group = wt[1], p.kh = wt[2], p.kw = wt[3];
  convd_plan_opts o = {.devices = 1, .device_memory = CONVD_DEFAULT_DEVICE_MEMORY};
  if (a->devices) {
    long long d;
    if (parse_int("--devices", a->devices, 1, 1024, &d)) return 2;
    o.devices = (int)d;
  }
  if (a->device_memory && parse_bytes("--device-memory", a->device_memory, &o.device_memory)) return 2;
  convd_conv c;
  convd_plan pl;
  char err[512], desc[4096];
  if (convd_conv_init(&c, &p, err, sizeof err) || convd_plan_make(&pl, &c, &o, err, sizeof err)) {
    fprintf(stderr, "convctl: %s\n", err);
    return 1;
  }
  convd_plan_describe(&pl, desc, sizeof desc);
  printf("devices: %d, device memory: %" PRIu64 " bytes\n%s", o.devices, o.device_memory, desc);
  return 0;
}

/* ---- progress and results -------------------------------------------------------------- */

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The progress line: drawn on stderr when it is a terminal, from the library's callback (the
 * calling thread), redrawn in place at most every 0.1 s and erased before anything else is
 * printed. */
typedef struct progress {
  int on, drawn;
  double t0, last;
  uint64_t total_bytes;    /* tensor bytes the call moves (in and out) */
  uint64_t region_row_bytes; /* output bytes per row when the output is in a region, else 0 */
} progress;

static void progress_erase(progress *g) {
  if (g->drawn) fputs("\r\033[K", stderr);
  g->drawn = 0;
  fflush(stderr);
}

static void format_eta(char *buf, size_t len, double s) {
  if (!(s >= 0) || s > 1e7) snprintf(buf, len, "--");
  else if (s < 60) snprintf(buf, len, "%.0f s", s);
  else if (s < 3600) snprintf(buf, len, "%d:%02d", (int)s / 60, (int)s % 60);
  else snprintf(buf, len, "%d:%02d:%02d", (int)s / 3600, (int)s / 60 % 60, (int)s % 60);
}

static void on_progress(void *ctx, const convd_client_progress *pr) {
  progress *g = ctx;
  const double now = now_seconds();
  if (!g->on || now - g->last < 0.1) return;
  g->last = now;
  const double el = now - g->t0;
  const uint64_t moved = pr->bytes_sent + pr->bytes_received + pr->rows_done * g->region_row_bytes;
  /* ETA from the rows so far: the output's rows are what is left to wait for */
  char eta[32];
  format_eta(eta, sizeof eta,
             pr->rows_done ? el * (double)(pr->rows_total - pr->rows_done) / (double)pr->rows_done : -1);
  char line[160];
  int n = snprintf(line, sizeof line, "convctl: rows %" PRIu64 "/%" PRIu64 " (%.0f%%), ETA %s, %.1f MB/s, %.1f s",
                   pr->rows_done, pr->rows_total,
                   pr->rows_total ? 100.0 * (double)pr->rows_done / (double)pr->rows_total : 0.0, eta,
                   el > 0 ? (double)moved / el / 1e6 : 0.0, el);
  /* never wider than the terminal (a wrapped line cannot be redrawn in place): what matters
   * most comes first */
  struct winsize ws;
  const int cols = ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 ? ws.ws_col : 80;
  if (n >= cols) n = cols - 1;
  fprintf(stderr, "\r%.*s\033[K", n, line);
  fflush(stderr);
  g->drawn = 1;
}

/* A JSON string. */
static void json_str(FILE *f, const char *s) {
  fputc('"', f);
  for (; s && *s; s++) {
    const unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
    else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
    else fputc(ch, f);
  }
  fputc('"', f);
}

static void json_shape(FILE *f, const int64_t *v) {
  fprintf(f, "[%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 "]", v[0], v[1], v[2], v[3]);
}

static const char *dtype_name(int dtype) {
  return dtype == CONVD_CLIENT_FLOAT16 ? "float16" : dtype == CONVD_CLIENT_BFLOAT16 ? "bfloat16" : "float32";
}

/* What a finished conv prints: one line, or with --json one object. */
typedef struct conv_result {
  const convd_client_conv_params *p;
  const convd_client_stats *st;
  const char *transport;
  int64_t weight_shape[4];
  double seconds; /* the client's: from the call's start to the output in its file */
  uint64_t in_bytes, w_bytes, b_bytes, out_bytes; /* wire bytes (weights: 0 when registered) */
  uint64_t macs;
  long long priority;
} conv_result;

static void print_result(const args *a, const conv_result *r) {
  const convd_client_stats *st = r->st;
  const uint64_t bytes = r->in_bytes + r->w_bytes + r->b_bytes + r->out_bytes;
  const double secs = r->seconds > 0 ? r->seconds : 1e-9;
  const double gbs = (double)bytes / secs / 1e9, flops = 2.0 * (double)r->macs;
  const double gflops = flops / secs / 1e9;
  if (!a->json) {
    printf("output %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
           " written to %s in %.3f s: %.3f GB/s, %.1f GFLOP/s (server: %.3f s elapsed, %.3f s "
           "compute, %" PRIu64 " op%s)\n",
           st->output_shape[0], st->output_shape[1], st->output_shape[2], st->output_shape[3],
           a->output, r->seconds, gbs, gflops, st->elapsed_seconds, st->compute_seconds,
           st->ops_run, st->ops_run == 1 ? "" : "s");
    return;
  }
  const convd_client_conv_params *p = r->p;
  const int64_t in_shape[4] = {p->n, p->c_in, p->h, p->w};
  FILE *f = stdout;
  fprintf(f, "{\"op\": \"%s\", \"input\": ", p->transposed ? "conv_transpose2d" : "conv2d");
  json_str(f, a->input);
  fputs(", \"weight\": ", f);
  if (a->weight) json_str(f, a->weight);
  else fputs("null", f);
  fputs(", \"weights_id\": ", f);
  if (a->weights_id) json_str(f, a->weights_id);
  else fputs("null", f);
  fputs(", \"output\": ", f);
  json_str(f, a->output);
  fputs(", \"input_shape\": ", f);
  json_shape(f, in_shape);
  fputs(", \"weight_shape\": ", f);
  json_shape(f, r->weight_shape);
  fputs(", \"output_shape\": ", f);
  json_shape(f, st->output_shape);
  fprintf(f,
          ", \"has_bias\": %s, \"dtype\": \"%s\", \"transport\": \"%s\", \"priority\": %lld"
          ", \"seconds\": %.9g, \"input_bytes\": %" PRIu64 ", \"weight_bytes\": %" PRIu64
          ", \"bias_bytes\": %" PRIu64 ", \"output_bytes\": %" PRIu64 ", \"bytes\": %" PRIu64
          ", \"gb_per_s\": %.9g, \"flops\": %.17g, \"gflop_per_s\": %.9g, \"ops\": %" PRIu64,
          p->has_bias ? "true" : "false", dtype_name(p->dtype), r->transport,
          r->priority, r->seconds, r->in_bytes, r->w_bytes, r->b_bytes,
          r->out_bytes, bytes, gbs, flops, gflops, st->ops_run);
  if (strcmp(r->transport, "unary") != 0) /* what only a stream tells */
    fprintf(f, ", \"elemental_ops\": %" PRIu64 ", \"upload_seconds\": %.9g, \"first_output_seconds\": %.9g",
            st->elemental_ops, st->upload_seconds, st->first_output_seconds);
  fprintf(f,
          ", \"server\": {\"elapsed_seconds\": %.9g, \"compute_seconds\": %.9g, \"ops_run\": %" PRIu64
          ", \"bytes_received\": %" PRIu64 ", \"bytes_sent\": %" PRIu64 "}}\n",
          st->elapsed_seconds, st->compute_seconds, st->ops_run, st->bytes_received, st->bytes_sent);
}

/* ---- conv --shm -------------------------------------------------------------------------- */

/* What the main thread and the signal thread share (mu guards c, region and cleaning). */
typedef struct shm_run {
  pthread_mutex_t mu;
  sigset_t signals;       /* SIGINT, SIGTERM: blocked everywhere, taken by the signal thread */
  convd_client *c;        /* NULL until made, and again once the main thread is done with it */
  char region[CONVD_CLIENT_REGION_NAME_MAX + 1]; /* its region's name, "" until it has one */
  const char *partial;    /* the output being written */
  int cleaning;           /* the main thread is removing what it made: cancel nothing more */
  atomic_int interrupted; /* the first signal, 0 for none */
} shm_run;

/* The signal thread. The first signal unlinks the region's object at once (the mappings, the
 * daemon's and convctl's, stay valid) and cancels every call the main thread makes until it
 * starts cleaning up, so that it returns and unregisters the region; a second signal ends
 * convctl there and then. */
static void *signal_main(void *arg) {
  shm_run *r = arg;
  for (;;) {
    const int first = atomic_load(&r->interrupted);
    const struct timespec tick = {0, 20 * 1000 * 1000};
    const int sig = first ? sigtimedwait(&r->signals, NULL, &tick) : sigwaitinfo(&r->signals, NULL);
    pthread_mutex_lock(&r->mu);
    if (sig > 0) {
      if (r->region[0]) shm_unlink(r->region);
      if (first) { /* the second one */
        unlink(r->partial);
        _exit(128 + first);
      }
      atomic_store(&r->interrupted, sig);
    }
    if (atomic_load(&r->interrupted) && !r->cleaning && r->c) convd_client_cancel(r->c);
    pthread_mutex_unlock(&r->mu);
  }
  return NULL;
}

/* Maps a whole file read-only; NULL when it does not map (the caller reads it instead). */
static const uint8_t *map_file(int fd, size_t need, size_t *mapped) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < need || need == 0)
    return NULL;
  void *m = mmap(NULL, need, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0); /* no fault per page */
  if (m == MAP_FAILED) return NULL;
  *mapped = need;
  return m;
}

/* A .npy's data (count elements of elem bytes from data_offset) into dst in the wire's dtype:
 * straight from a mapping of the file (npy.h's reader takes only little-endian C order, the
 * layout of the wire, so a copy, a narrowing or a conversion is all it takes), else read. */
static int npy_into_region(const char *path, long data_offset, size_t count, int elem, int dtype,
                           uint8_t *dst) {
  const size_t bytes = count * (size_t)elem, wire = dtype == CONVD_CLIENT_FLOAT32 ? 4 : 2;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fprintf(stderr, "convctl: %s: %s\n", path, strerror(errno));
    return -1;
  }
  size_t mapped = 0;
  const uint8_t *m = map_file(fd, (size_t)data_offset + bytes, &mapped);
  /* the same layout on both sides: one copy */
  const int same = (elem == 4 && dtype == CONVD_CLIENT_FLOAT32) || (elem == 2 && dtype == CONVD_CLIENT_FLOAT16);
  int rc = 0;
  if (m && same) {
    memcpy(dst, m + data_offset, bytes);
  } else { /* through float32, a step at a time (from the mapping, else read) */
    enum { STEP = 1 << 16 }; /* elements */
    float *f = malloc(STEP * sizeof(float));
    uint8_t *raw = m ? NULL : malloc((size_t)STEP * (size_t)elem);
    if (f == NULL || (!m && raw == NULL)) rc = -1, errno = ENOMEM;
    for (size_t done = 0; done < count && rc == 0;) {
      const size_t n = count - done < STEP ? count - done : STEP;
      const uint8_t *src = m ? m + data_offset + done * (size_t)elem : raw;
      if (!m && pread_all(fd, raw, n * (size_t)elem, (off_t)data_offset + (off_t)(done * (size_t)elem))) {
        rc = -1;
        break;
      }
      if (same) {
        memcpy(dst + done * wire, src, n * wire);
      } else {
        to_floats(elem, src, f, n);
        if (dtype == CONVD_CLIENT_FLOAT32) memcpy(dst + done * wire, f, n * sizeof(float));
        else convd_dtype_encode(dtype, f, dst + done * wire, n);
      }
      done += n;
    }
    free(f);
    free(raw);
    if (rc) fprintf(stderr, "convctl: %s: cannot read it: %s\n", path, errno ? strerror(errno) : "short file");
  }
  if (m) munmap((void *)m, mapped);
  close(fd);
  return rc;
}

/* The output from the region into the output file (fd open for writing, data at base), written
 * straight from the region (float32; the half types widened through a small buffer). Not
 * through a mapping of the file: for 64 MiB that took 0.5-0.6 s against 0.2 s for pwrite (a
 * write fault per page), and a mapped write past a full disk is a SIGBUS, not an error. */
static int region_into_npy(const char *path, int fd, long base, const uint8_t *src, size_t count,
                           int dtype) {
  enum { STEP = 1 << 16 }; /* elements */
  float *buf = dtype == CONVD_CLIENT_FLOAT32 ? NULL : malloc(STEP * sizeof(float));
  if (dtype != CONVD_CLIENT_FLOAT32 && buf == NULL) {
    fprintf(stderr, "convctl: out of memory writing %s\n", path);
    return -1;
  }
  const size_t wire = dtype == CONVD_CLIENT_FLOAT32 ? 4 : 2;
  const size_t step = buf ? STEP : count; /* float32: one write (the kernel loops) */
  int rc = 0;
  for (size_t done = 0; done < count && rc == 0;) {
    const size_t n = count - done < step ? count - done : step;
    const uint8_t *from = src + done * wire;
    if (buf) {
      convd_dtype_decode(dtype, from, buf, n);
      from = (const uint8_t *)buf;
    }
    for (size_t put = 0; put < n * sizeof(float);) {
      const ssize_t k = pwrite(fd, from + put, n * sizeof(float) - put,
                               (off_t)base + (off_t)(done * sizeof(float) + put));
      if (k <= 0) {
        fprintf(stderr, "convctl: %s: %s\n", path, k < 0 ? strerror(errno) : "short write");
        rc = -1;
        break;
      }
      put += (size_t)k;
    }
    done += n;
  }
  free(buf);
  return rc;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* `conv --shm`: one region holds the input, weight, bias and output (64-byte aligned, the output
 * after the rest; no weight or bias with registered weights); x, w and b are the files' headers.
 * Returns the exit status. */
static int conv_shm(const args *a, convd_client_call_opts *co, const convd_client_conv_params *p,
                    const convd_npy *x, const convd_npy *w, const convd_npy *b,
                    const int64_t out_shape[4], const char *partial, conv_result *res,
                    progress *g) {
  static shm_run run = {.mu = PTHREAD_MUTEX_INITIALIZER};
  run.partial = partial;
  sigemptyset(&run.signals);
  sigaddset(&run.signals, SIGINT);
  sigaddset(&run.signals, SIGTERM);
  /* Before gRPC starts its threads, which inherit the mask: only the signal thread takes them. */
  pthread_sigmask(SIG_BLOCK, &run.signals, NULL);
  pthread_t th;
  if (pthread_create(&th, NULL, signal_main, &run) != 0) {
    fprintf(stderr, "convctl: cannot start a thread\n");
    return 1;
  }
  pthread_detach(th);

  const int reg_w = co->weights_id != NULL;
  const size_t wire = p->dtype == CONVD_CLIENT_FLOAT32 ? 4 : 2;
  const size_t out_count = (size_t)(out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3]);
  const size_t off_w = align64(x->count * wire);
  const size_t off_b = align64(off_w + (reg_w ? 0 : w->count * wire));
  const size_t off_y = align64(off_b + (p->has_bias && !reg_w ? b->count * wire : 0));
  const size_t total = off_y + out_count * wire;
  char err[1024];
  int rc = 1, out_fd = -1, committed = 0;
  long out_base = 0;
  convd_client *c = NULL;
  convd_client_region *reg = NULL;
  const double t0 = now_seconds();
  if ((rc = client_from_args(a, &c))) goto done;
  rc = 1;
  pthread_mutex_lock(&run.mu);
  run.c = c;
  pthread_mutex_unlock(&run.mu);
  if ((rc = convd_client_region_create(c, total, &reg, err, sizeof err))) {
    char msg[1100];
    snprintf(msg, sizeof msg, "--shm: %s", err);
    report_call_error(a, rc, msg);
    rc = 1;
    goto done;
  }
  pthread_mutex_lock(&run.mu);
  snprintf(run.region, sizeof run.region, "%s", convd_client_region_name(reg));
  if (atomic_load(&run.interrupted)) shm_unlink(run.region); /* the signal came before the name */
  pthread_mutex_unlock(&run.mu);
  uint8_t *base = convd_client_region_data(reg);
  if (npy_into_region(a->input, x->data_offset, x->count, x->elem_size, p->dtype, base) ||
      (!reg_w && npy_into_region(a->weight, w->data_offset, w->count, w->elem_size, p->dtype, base + off_w)) ||
      (!reg_w && p->has_bias &&
       npy_into_region(a->bias, b->data_offset, b->count, b->elem_size, p->dtype, base + off_b)))
    goto done;
  /* The output file is ready, with its room, before the call. */
  if ((out_fd = convd_npy_create_f32(partial, out_shape, 4, &out_base, err, sizeof err)) < 0) {
    fprintf(stderr, "convctl: %s\n", err);
    goto done;
  }
  if (atomic_load(&run.interrupted)) goto done;
  const char *name = convd_client_region_name(reg);
  const convd_client_shm_refs refs = {.input = {name, 0},
                                      .weight = {reg_w ? NULL : name, off_w},
                                      .bias = {p->has_bias && !reg_w ? name : NULL, off_b},
                                      .output = {name, off_y}};
  co->shm = &refs;
  g->region_row_bytes = (uint64_t)(out_shape[1] * out_shape[3]) * wire;
  convd_client_stats st;
  const int crc = convd_client_conv2d_ex(c, p, co, NULL, NULL, NULL, NULL, &st, err, sizeof err);
  co->shm = NULL;
  progress_erase(g);
  if (crc) {
    if (!atomic_load(&run.interrupted)) report_call_error(a, crc, err);
    goto done;
  }
  if (region_into_npy(partial, out_fd, out_base, base + off_y, out_count, p->dtype)) goto done;
  const int closed = close(out_fd);
  out_fd = -1;
  if (atomic_load(&run.interrupted)) goto done;
  if (closed != 0 || rename(partial, a->output) != 0) {
    fprintf(stderr, "convctl: %s: %s\n", a->output, strerror(errno));
    goto done;
  }
  committed = 1;
  res->seconds = now_seconds() - t0;
  res->st = &st;
  print_result(a, res);
  res->st = NULL;
  rc = 0;
done:
  progress_erase(g);
  pthread_mutex_lock(&run.mu);
  run.cleaning = 1; /* from here no call is cancelled: the region's unregistration must go */
  pthread_mutex_unlock(&run.mu);
  /* A call this side ended (SIGINT's cancel, a deadline) may hold the region on the daemon a
   * moment longer, until its copies there stop: unregistering waits for that, a few seconds at
   * most. */
  int urc = CONVD_CLIENT_EBUSY;
  for (double waited = 0; reg && urc == CONVD_CLIENT_EBUSY && waited < 5; waited += 0.02) {
    if (waited > 0) nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
    urc = convd_client_unregister_region(c, convd_client_region_name(reg), err, sizeof err);
  }
  if (reg && urc && urc != CONVD_CLIENT_ENOTFOUND)
    fprintf(stderr, "convctl: warning: the daemon keeps region %s registered: %s\n", run.region, err);
  if (reg && convd_client_region_destroy(NULL, reg, err, sizeof err)) /* unmapped and unlinked */
    fprintf(stderr, "convctl: warning: removing region %s: %s\n", run.region, err);
  if (out_fd >= 0) close(out_fd);
  if (!committed) unlink(partial);
  pthread_mutex_lock(&run.mu);
  run.c = NULL;
  pthread_mutex_unlock(&run.mu);
  convd_client_destroy(c);
  const int sig = atomic_load(&run.interrupted);
  if (sig && !committed) {
    fprintf(stderr, "convctl: interrupted (%s): the call was cancelled and its region removed\n",
            sig == SIGINT ? "SIGINT" : "SIGTERM");
    return 128 + sig;
  }
  return rc;
}

/* ---- conv ---------------------------------------------------------------------------------- */

/* Registered weights' description (ListWeights), for --weights-id: their shape gives the call's.
 * Returns 0, or the exit status. */
static int find_weights(convd_client *c, const args *a, convd_client_weights_info *out) {
  convd_client_weights_info *v;
  size_t n;
  char err[1024];
  int rc = convd_client_list_weights(c, &v, &n, NULL, err, sizeof err);
  if (rc) {
    report_call_error(a, rc, err);
    return 1;
  }
  rc = 1;
  for (size_t i = 0; i < n && rc; i++)
    if (strcmp(v[i].id, a->weights_id) == 0) *out = v[i], rc = 0;
  free(v);
  if (rc)
    fprintf(stderr,
            "convctl: --weights-id %s: the daemon at %s has no such weights (never put, deleted, "
            "or evicted): `convctl weights list` shows the ones it has\n",
            a->weights_id, a->server);
  return rc;
}

/* p's weight fields from a weight tensor's shape (conv2d's layout, or conv_transpose2d's). */
static void weights_into_params(convd_client_conv_params *p, const int64_t s[4]) {
  if (p->transposed) /* (C_in, C_out/groups, kH, kW) */
    p->c_out = s[1] * p->groups, p->c_per_group = s[0] / (p->groups > 0 ? p->groups : 1);
  else
    p->c_out = s[0], p->c_per_group = s[1];
  p->kh = s[2], p->kw = s[3];
}

static int cmd_conv(const args *a, int transposed) {
  if (!a->input || !a->output || (!a->weight && !a->weights_id)) {
    fprintf(stderr, "convctl %s: --input, --output and --weight (or --weights-id) are required\n", a->cmd);
    return 2;
  }
  if (a->weight && a->weights_id) {
    fprintf(stderr, "convctl: --weight and --weights-id: give one (registered weights are not sent again)\n");
    return 2;
  }
  if (a->bias && a->weights_id) {
    fprintf(stderr, "convctl: --bias and --weights-id: registered weights carry their own bias "
                    "(convctl weights put --bias)\n");
    return 2;
  }
  if (a->shm && a->unary) {
    fprintf(stderr, "convctl: --shm and --unary do not go together: --shm makes a streamed call\n");
    return 2;
  }
  convd_client_conv_params p;
  if (parse_conv_options(a, &p)) return 2;
  p.transposed = transposed;
  if (a->output_padding) {
    int64_t v[2];
    const int n = parse_list(a->output_padding, v, 2);
    if (!transposed) {
      fprintf(stderr, "convctl: --output-padding OH,OW belongs to conv-transpose\n");
      return 2;
    }
    if (n < 1) {
      fprintf(stderr, "convctl: --output-padding %s: expected one integer (both axes) or two (OH,OW)\n",
              a->output_padding);
      return 2;
    }
    p.out_pad_h = v[0], p.out_pad_w = n == 2 ? v[1] : v[0];
  }
  long long priority = 0;
  if (a->priority && parse_int("--priority", a->priority, INT32_MIN, INT32_MAX, &priority)) return 2;

  convd_npy x = {0}, w = {0}, b = {0};
  int rc = 2;
  float *y = NULL;
  convd_client *c = NULL;
  file_io fio = {.fd = {-1, -1}};
  char partial[4096]; /* the output is written here and renamed into place once complete */
  snprintf(partial, sizeof partial, "%s.partial-%ld", a->output, (long)getpid());
  /* the input's header first: its dtype decides the call's unless --dtype does */
  if (load_npy("input", a->input, 4, 1, &x)) goto out;
  if (!a->dtype && x.elem_size == 2) {
    p.dtype = CONVD_CLIENT_FLOAT16;
    fprintf(stderr, "convctl: note: input %s is float16: sent as float16 (as --dtype float16 does); "
                    "the output is written as float32\n", a->input);
  }
  /* Float32 streaming calls read the input from its file and write the output to its file as
   * the bands go; unary and half-type calls hold the tensors; --shm copies the files into its
   * region from their mappings, so only headers here. */
  const int in_place = !a->unary && !a->shm && p.dtype == CONVD_CLIENT_FLOAT32;
  if (!in_place && !a->shm && (convd_npy_free(&x), load_npy("input", a->input, 4, 0, &x))) goto out;
  if (a->weight && (load_npy("weight", a->weight, 4, a->shm, &w) ||
                    (a->bias && load_npy("bias", a->bias, 1, a->shm, &b))))
    goto out;
  p.n = x.shape[0], p.c_in = x.shape[1], p.h = x.shape[2], p.w = x.shape[3];
  int64_t wshape[4];
  if (a->weights_id) {
    if ((rc = client_from_args(a, &c))) goto out;
    convd_client_weights_info info;
    if ((rc = find_weights(c, a, &info))) goto out;
    memcpy(wshape, info.shape, sizeof wshape);
    p.has_bias = info.has_bias;
    rc = 2;
  } else {
    memcpy(wshape, w.shape, sizeof wshape);
  }
  weights_into_params(&p, wshape);
  if (a->bias) {
    if (b.shape[0] != p.c_out) {
      fprintf(stderr, "convctl: bias %s has %" PRId64 " values, the weight has %" PRId64
              " output channels\n", a->bias, b.shape[0], p.c_out);
      goto out;
    }
    p.has_bias = 1;
  }
  const convd_npy *files[3] = {&x, &w, &b};
  note_float64(files, (const char *[]){"input", "weight", "bias"},
               (const char *[]){a->input, a->weight, a->bias}, 3);
  int64_t out_shape[4];
  char err[1024];
  /* Shapes are checked here too so that a mistake is reported before anything is sent; the
   * server checks again and is the authority. */
  if (convd_client_output_shape(&p, out_shape, err, sizeof err)) {
    fprintf(stderr, "convctl: %s\n", err);
    goto out;
  }
  convd_conv_params ep;
  convd_client_params_to_conv(&p, &ep);
  convd_conv cv;
  if (convd_conv_init(&cv, &ep, err, sizeof err)) { /* accepted just above */
    fprintf(stderr, "convctl: %s\n", err);
    goto out;
  }
  conv_result res = {.p = &p, .transport = a->shm ? "shm" : a->unary ? "unary" : "stream",
                     .in_bytes = cv.input_wire_bytes, .w_bytes = a->weights_id ? 0 : cv.weight_wire_bytes,
                     .b_bytes = a->weights_id ? 0 : cv.bias_wire_bytes, .out_bytes = cv.output_wire_bytes,
                     .macs = cv.macs, .priority = priority};
  memcpy(res.weight_shape, wshape, sizeof wshape);
  /* first drawn 0.1 s in: a call that ends sooner shows no line at all */
  progress g = {.on = isatty(STDERR_FILENO) && !a->no_progress, .t0 = now_seconds()};
  g.last = g.t0;
  convd_client_call_opts co = {.weights_id = a->weights_id, .priority = (int32_t)priority,
                               .progress = g.on ? on_progress : NULL, .progress_ctx = &g};
  if (a->shm) {
    convd_client_destroy(c); /* conv_shm makes its own, after its signal mask */
    c = NULL;
    rc = conv_shm(a, &co, &p, &x, &w, &b, out_shape, partial, &res, &g);
    goto out;
  }
  if (npy_to_f32(a->weight, &w) || npy_to_f32(a->bias, &b) || npy_to_f32(a->input, &x)) {
    rc = 1;
    goto out;
  }
  if (in_place) {
    /* Both files are ready, and the output has its room, before anything is sent. */
    if ((fio.fd[0] = open(a->input, O_RDONLY)) < 0) {
      fprintf(stderr, "convctl: %s: %s\n", a->input, strerror(errno));
      rc = 1;
      goto out;
    }
    if ((fio.fd[1] = convd_npy_create_f32(partial, out_shape, 4, &fio.base[1], err, sizeof err)) < 0) {
      fprintf(stderr, "convctl: %s\n", err);
      rc = 1;
      goto out;
    }
    fio.base[0] = x.data_offset;
    fio.in_elem = x.elem_size;
    fio.c[0] = p.c_in, fio.h[0] = p.h, fio.w[0] = p.w;
    fio.c[1] = out_shape[1], fio.h[1] = out_shape[2], fio.w[1] = out_shape[3];
  } else if ((y = malloc(cv.output_bytes)) == NULL) {
    fprintf(stderr, "convctl: cannot allocate %zu bytes for the output\n", cv.output_bytes);
    rc = 1;
    goto out;
  }
  /* SIGINT/SIGTERM cancel the call (the daemon stops its work) and leave no partial output: the
   * same signal thread as --shm's, with no region. The client is made again after the mask, so
   * that gRPC's threads inherit it and only the signal thread takes the signals. */
  shm_run run = {.mu = PTHREAD_MUTEX_INITIALIZER, .partial = partial};
  sigemptyset(&run.signals);
  sigaddset(&run.signals, SIGINT);
  sigaddset(&run.signals, SIGTERM);
  convd_client_destroy(c);
  c = NULL;
  pthread_sigmask(SIG_BLOCK, &run.signals, NULL);
  pthread_t th;
  if (pthread_create(&th, NULL, signal_main, &run) == 0) pthread_detach(th);
  if ((rc = client_from_args(a, &c))) goto out;
  pthread_mutex_lock(&run.mu);
  run.c = c;
  pthread_mutex_unlock(&run.mu);
  convd_client_stats st;
  const convd_client_io io = {file_read, file_write, &fio};
  if (in_place) co.io = &io;
  co.unary = a->unary;
  const double t0 = now_seconds();
  g.t0 = g.last = t0;
  int crc = convd_client_conv2d_ex(c, &p, &co, x.data, w.data, b.data, y, &st, err, sizeof err);
  pthread_mutex_lock(&run.mu);
  run.cleaning = 1;
  run.c = NULL;
  pthread_mutex_unlock(&run.mu);
  progress_erase(&g);
  if (atomic_load(&run.interrupted)) {
    if (in_place) {
      close(fio.fd[1]);
      fio.fd[1] = -1;
      unlink(partial);
    }
    fprintf(stderr, "convctl: interrupted: the call was cancelled and no output was written\n");
    rc = 128 + atomic_load(&run.interrupted);
    goto out;
  }
  if (crc == 0 && in_place && (close(fio.fd[1]) != 0 || rename(partial, a->output) != 0)) {
    crc = CONVD_CLIENT_EIO;
    snprintf(err, sizeof err, "%s: %s", a->output, strerror(errno));
  }
  if (in_place) fio.fd[1] = -1;
  if (crc) {
    if (in_place) unlink(partial); /* no half-written output left behind */
    report_call_error(a, crc, err);
    rc = 1;
    goto out;
  }
  if (!in_place && convd_npy_write_f32(a->output, st.output_shape, 4, y, err, sizeof err)) {
    fprintf(stderr, "convctl: %s\n", err);
    rc = 1;
    goto out;
  }
  res.seconds = now_seconds() - t0;
  res.st = &st;
  print_result(a, &res);
  rc = 0;
out:
  if (fio.fd[0] >= 0) close(fio.fd[0]);
  if (fio.fd[1] >= 0) {
    close(fio.fd[1]);
    unlink(partial);
  }
  free(fio.buf);
  convd_client_destroy(c);
  free(y);
  convd_npy_free(&x);
  convd_npy_free(&w);
  convd_npy_free(&b);
  return rc;
}

/* ---- weights put | list | delete ------------------------------------------------------------ */

static int cmd_weights_put(const args *a) {
  if (!a->weight) {
    fprintf(stderr, "convctl weights put: --weight W.npy is required\n");
    return 2;
  }
  convd_client_weights_spec ws = {.dtype = CONVD_CLIENT_FLOAT32};
  if (a->op && strcmp(a->op, "conv-transpose") == 0) ws.transposed = 1;
  else if (a->op && strcmp(a->op, "conv") != 0) {
    fprintf(stderr, "convctl: --op %s: expected conv or conv-transpose (the calls the weights are for)\n", a->op);
    return 2;
  }
  if (a->groups) {
    long long g;
    if (!ws.transposed) {
      fprintf(stderr, "convctl: --groups is for --op conv-transpose: a conv's groups follow from its "
                      "weights (their second dimension is C_in/groups)\n");
      return 2;
    }
    if (parse_int("--groups", a->groups, 1, INT32_MAX, &g)) return 2;
    ws.groups = g;
  }
  if (a->dtype) {
    convd_client_conv_params p;
    if (parse_conv_options(a, &p)) return 2;
    ws.dtype = p.dtype;
  }
  convd_npy w = {0}, b = {0};
  convd_client *c = NULL;
  int rc = 2;
  if (load_npy("weight", a->weight, 4, 0, &w) || (a->bias && load_npy("bias", a->bias, 1, 0, &b))) goto out;
  const convd_npy *files[2] = {&w, &b};
  note_float64(files, (const char *[]){"weight", "bias"}, (const char *[]){a->weight, a->bias}, 2);
  if (!a->dtype && w.elem_size == 2) {
    ws.dtype = CONVD_CLIENT_FLOAT16;
    fprintf(stderr, "convctl: note: weight %s is float16: sent as float16 (as --dtype float16 does)\n",
            a->weight);
  }
  memcpy(ws.shape, w.shape, sizeof ws.shape);
  const int64_t c_out = ws.transposed ? w.shape[1] * (ws.groups ? ws.groups : 1) : w.shape[0];
  if (a->bias && b.shape[0] != c_out) {
    fprintf(stderr, "convctl: bias %s has %" PRId64 " values, the weight has %" PRId64 " output channels\n",
            a->bias, b.shape[0], c_out);
    goto out;
  }
  rc = 1;
  if (npy_to_f32(a->weight, &w) || npy_to_f32(a->bias, &b)) goto out;
  if ((rc = client_from_args(a, &c))) goto out;
  char id[CONVD_CLIENT_WEIGHTS_ID_MAX + 1], err[1024];
  int already = 0;
  const int prc = convd_client_put_weights(c, &ws, w.data, a->bias ? b.data : NULL, id, &already, err, sizeof err);
  if (prc) {
    report_call_error(a, prc, err);
    rc = 1;
    goto out;
  }
  if (a->json) {
    printf("{\"weights_id\": ");
    json_str(stdout, id);
    printf(", \"already_present\": %s, \"shape\": ", already ? "true" : "false");
    json_shape(stdout, ws.shape);
    printf(", \"has_bias\": %s, \"dtype\": \"%s\", \"op\": \"%s\"}\n", a->bias ? "true" : "false",
           dtype_name(ws.dtype), ws.transposed ? "conv_transpose2d" : "conv2d");
  } else {
    printf("%s\n", id);
    if (already) fprintf(stderr, "convctl: note: the daemon had these weights already\n");
  }
  rc = 0;
out:
  convd_client_destroy(c);
  convd_npy_free(&w);
  convd_npy_free(&b);
  return rc;
}

static int cmd_weights_list(const args *a) {
  convd_client *c;
  int rc = client_from_args(a, &c);
  if (rc) return rc;
  convd_client_weights_info *v;
  convd_client_weights_totals t;
  size_t n;
  char err[1024];
  if ((rc = convd_client_list_weights(c, &v, &n, &t, err, sizeof err))) {
    report_call_error(a, rc, err);
    convd_client_destroy(c);
    return 1;
  }
  if (a->json) {
    printf("{\"weights\": [");
    for (size_t i = 0; i < n; i++) {
      printf("%s{\"weights_id\": ", i ? ", " : "");
      json_str(stdout, v[i].id);
      printf(", \"shape\": ");
      json_shape(stdout, v[i].shape);
      printf(", \"has_bias\": %s, \"dtype\": \"%s\", \"bytes\": %" PRIu64 ", \"uses\": %" PRIu64
             ", \"idle_seconds\": %.6g, \"in_use\": %" PRIu32 "}",
             v[i].has_bias ? "true" : "false", dtype_name(v[i].dtype), v[i].bytes, v[i].uses,
             v[i].idle_seconds, v[i].in_use);
    }
    printf("], \"bytes_used\": %" PRIu64 ", \"bytes_limit\": %" PRIu64 ", \"evictions\": %" PRIu64 "}\n",
           t.bytes_used, t.bytes_limit, t.evictions);
  } else {
    printf("%-32s %-20s %-4s %-8s %12s %8s %9s %6s\n", "id", "shape", "bias", "dtype", "bytes", "uses",
           "idle_s", "in_use");
    for (size_t i = 0; i < n; i++) {
      char shape[96];
      snprintf(shape, sizeof shape, "%" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64, v[i].shape[0],
               v[i].shape[1], v[i].shape[2], v[i].shape[3]);
      printf("%-32s %-20s %-4s %-8s %12" PRIu64 " %8" PRIu64 " %9.1f %6" PRIu32 "\n", v[i].id, shape,
             v[i].has_bias ? "yes" : "no", dtype_name(v[i].dtype), v[i].bytes, v[i].uses,
             v[i].idle_seconds, v[i].in_use);
    }
    printf("%zu registered, %" PRIu64 " of %" PRIu64 " bytes used, %" PRIu64 " evicted\n", n,
           t.bytes_used, t.bytes_limit, t.evictions);
  }
  free(v);
  convd_client_destroy(c);
  return 0;
}

static int cmd_weights_delete(const args *a) {
  const char *id = a->id ? a->id : a->weights_id;
  if (id == NULL) {
    fprintf(stderr, "convctl weights delete: which weights? give their ID (convctl weights list)\n");
    return 2;
  }
  convd_client *c;
  int rc = client_from_args(a, &c);
  if (rc) return rc;
  char err[1024];
  if ((rc = convd_client_delete_weights(c, id, err, sizeof err))) {
    report_call_error(a, rc, err);
    convd_client_destroy(c);
    return 1;
  }
  printf("deleted %s\n", id);
  convd_client_destroy(c);
  return 0;
}

/* ---- devices, health ---------------------------------------------------------------------- */

static int cmd_devices(const args *a) {
  convd_client *c;
  int rc = client_from_args(a, &c);
  if (rc) return rc;
  convd_client_device *d;
  size_t n;
  char err[512];
  if ((rc = convd_client_list_devices(c, &d, &n, err, sizeof err))) {
    report_call_error(a, rc, err);
    convd_client_destroy(c);
    return 1;
  }
  static const char *const kinds[] = {"?", "cpu", "cuda", "reference"};
  printf("%-5s %-10s %-10s %16s %14s %-9s %s\n", "index", "kind", "name", "memory_bytes",
         "completed_ops", "health", "detail");
  for (size_t i = 0; i < n; i++)
    printf("%-5u %-10s %-10s %16" PRIu64 " %14" PRIu64 " %-9s %s\n", d[i].index,
           d[i].kind >= 1 && d[i].kind <= 3 ? kinds[d[i].kind] : "?", d[i].name,
           d[i].memory_bytes, d[i].completed_ops, d[i].healthy ? "healthy" : "unhealthy",
           d[i].detail);
  free(d);
  convd_client_destroy(c);
  return 0;
}

static int cmd_health(const args *a) {
  convd_client *c;
  int rc = client_from_args(a, &c);
  if (rc) return rc;
  char err[512];
  int serving = 0;
  rc = convd_client_health(c, a->service ? a->service : "", &serving, err, sizeof err);
  convd_client_destroy(c);
  if (rc) {
    report_call_error(a, rc, err);
    return 1;
  }
  printf("%s\n", serving ? "SERVING" : "NOT_SERVING");
  return serving ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
    printf("convctl %s\n", CONVD_VERSION);
    return 0;
  }
  static const char *const commands[] = {"conv", "conv-transpose", "weights", "devices", "health", "plan"};
  size_t k;
  for (k = 0; k < sizeof commands / sizeof commands[0]; k++)
    if (strcmp(argv[1], commands[k]) == 0) break;
  if (k == sizeof commands / sizeof commands[0]) {
    fprintf(stderr, "convctl: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
  }
  args a = {0};
  if (parse_args(argc, argv, &a)) return 2;
  if (is_cmd(&a, "plan")) return cmd_plan(&a);
  if (is_cmd(&a, "health")) return cmd_health(&a);
  if (is_cmd(&a, "devices")) return cmd_devices(&a);
  if (is_cmd(&a, "weights"))
    return strcmp(a.action, "put") == 0    ? cmd_weights_put(&a)
           : strcmp(a.action, "list") == 0 ? cmd_weights_list(&a)
                                           : cmd_weights_delete(&a);
  return cmd_conv(&a, is_cmd(&a, "conv-transpose"));
}
