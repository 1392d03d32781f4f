/* convctl: the command-line client, on libconvd_client's public interface (client.h); `plan`
 * alone uses the engine's planner in-process, and `conv --shm` the engine's dtype conversions.
 *   convctl conv --server ADDR --input X.npy --weight W.npy [--bias B.npy]
 *                [--stride SH,SW] [--padding T,B,L,R] [--dilation DH,DW] [--groups G]
 *                --output Y.npy [--unary | --shm] [--chunk-bytes N] [--timeout SECONDS]
 *   convctl devices --server ADDR
 * ADDR is HOST:PORT or unix:/path/to/convd.sock (a daemon's Unix socket on this host).
 *   convctl --version
 * Every command that talks to a server also takes --tls-ca FILE [--tls-cert FILE --tls-key FILE]
 * [--tls-server-name NAME] and --token-file FILE (or CONVD_TLS_CA, CONVD_TLS_CERT, CONVD_TLS_KEY,
 * CONVD_TLS_SERVER_NAME, CONVD_TOKEN in the environment).
 * Exit status: 0 ok, 1 the call failed (the server's message is printed), 2 bad usage; `conv
 * --shm` interrupted by SIGINT or SIGTERM: 128 + the signal, once its regions are removed.
 *
 * Threads: one, except under `conv --shm`, where a second waits for SIGINT/SIGTERM (blocked in
 * every other thread, gRPC's included) and cancels the call in progress so that the main thread
 * removes the regions; shm_run's mutex guards what they share. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static void usage(FILE *f) {
  fprintf(f,
          "usage:\n"
          "  convctl conv --server ADDR --input X.npy --weight W.npy [--bias B.npy]\n"
          "               [--stride SH,SW] [--padding T,B,L,R] [--dilation DH,DW] [--groups G]\n"
          "               --output Y.npy [--unary | --shm] [--chunk-bytes N] [--timeout SECONDS]\n"
          "               [--dtype float32|float16|bfloat16] [--tf32]\n"
          "  convctl conv-transpose (the options of conv) [--output-padding OH,OW]\n"
          "               weights (C_in, C_out/groups, kH, kW), as PyTorch's conv_transpose2d\n"
          "  convctl devices --server ADDR [--timeout SECONDS]\n"
          "  convctl health --server ADDR [--service NAME] [--timeout SECONDS]\n"
          "               (exit 0 when SERVING: for container health checks)\n"
          "  convctl plan --input N,C,H,W --weight C_out,C_in/groups,kH,kW [--stride SH,SW]\n"
          "               [--padding T,B,L,R] [--dilation DH,DW] [--groups G] [--devices K]\n"
          "               [--device-memory BYTES (K/M/G suffixes; default 64M)]\n"
          "  convctl --version\n"
          "\n"
          "Tensors are float32 .npy files: input N,C,H,W; weight C_out,C_in/groups,kH,kW;\n"
          "bias C_out. --stride/--dilation take one value for both axes or two (H,W);\n"
          "--dtype float16/bfloat16 sends them rounded to that type and returns its output\n"
          "(written as float32); --tf32 lets GPUs use TF32 on float32 tensors.\n"
          "--padding takes one value, two (H,W) or four (top,bottom,left,right).\n"
          "--shm: the daemon must run on this host. The tensors go through a POSIX shared-memory\n"
          "region that convctl creates and registers (RegisterRegion) instead of the socket: the\n"
          "input, weight and bias files are copied into it from their mappings, the daemon\n"
          "reads them there and writes the output there, and convctl copies the output into\n"
          "the output file. The region is removed at the end, also on an error, SIGINT or\n"
          "SIGTERM (which cancel the call; exit 128 + the signal).\n"
          "\n"
          "Connecting (conv, conv-transpose, devices, health): ADDR is HOST:PORT, or\n"
          "unix:/path/to/convd.sock for a daemon's Unix socket on this host.\n"
          "  --tls-ca FILE         TLS: the CA (PEM) that signed the server's certificate\n"
          "  --tls-cert FILE --tls-key FILE   mutual TLS: this client's certificate and key\n"
          "  --tls-server-name NAME           the name the server's certificate carries, when\n"
          "                        it is not the --server host (localhost for unix:)\n"
          "  --token-file FILE     send the token on the file's first line (keep it mode 600)\n"
          "Without the flags: CONVD_TLS_CA, CONVD_TLS_CERT, CONVD_TLS_KEY, CONVD_TLS_SERVER_NAME\n"
          "(the last three only with a CA) and CONVD_TOKEN (the token itself).\n");
}

/* Parses "a,b,..." into up to max values; returns how many, or -1. */
static int parse_list(const char *s, int64_t *v, int max) {
  int n = 0;
  while (*s) {
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (end == s || errno || n == max) return -1;
    v[n++] = x;
    s = end;
    if (*s == ',') s++;
    else if (*s) return -1;
  }
  return n;
}

typedef struct args {
  const char *server, *input, *weight, *bias, *output;
  const char *stride, *padding, *dilation, *groups, *chunk, *timeout, *devices, *device_memory;
  const char *dtype, *service, *output_padding;
  const char *tls_ca, *tls_cert, *tls_key, *tls_server_name, *token_file;
  int unary, tf32, shm;
} args;

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
              {"--tls-ca", &a->tls_ca},     {"--tls-cert", &a->tls_cert},
              {"--tls-key", &a->tls_key},   {"--tls-server-name", &a->tls_server_name},
              {"--token-file", &a->token_file}};
  for (int i = 2; i < argc; i++) {
    if (strcmp(argv[i], "--unary") == 0) {
      a->unary = 1;
      continue;
    }
    if (strcmp(argv[i], "--tf32") == 0) {
      a->tf32 = 1;
      continue;
    }
    if (strcmp(argv[i], "--shm") == 0) {
      a->shm = 1;
      continue;
    }
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage(stdout);
      exit(0);
    }
    size_t k;
    for (k = 0; k < sizeof opts / sizeof opts[0]; k++)
      if (strcmp(argv[i], opts[k].name) == 0) break;
    if (k == sizeof opts / sizeof opts[0]) {
      fprintf(stderr, "convctl: unknown argument '%s'\n", argv[i]);
      return -1;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "convctl: %s needs a value\n", argv[i]);
      return -1;
    }
    *opts[k].dst = argv[++i];
  }
  if (a->server == NULL && strcmp(argv[1], "plan") != 0) {
    fprintf(stderr, "convctl: --server HOST:PORT (or unix:/path) is required\n");
    return -1;
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
    char *end;
    o.chunk_bytes = strtoull(a->chunk, &end, 10);
    if (*end || o.chunk_bytes == 0) {
      fprintf(stderr, "convctl: --chunk-bytes %s: expected a positive integer\n", a->chunk);
      return 2;
    }
  }
  if (a->timeout) {
    char *end;
    o.timeout_seconds = strtod(a->timeout, &end);
    if (*end || !(o.timeout_seconds > 0)) {
      fprintf(stderr, "convctl: --timeout %s: expected positive seconds\n", a->timeout);
      return 2;
    }
  }
  int rc = convd_client_create(a->server, &o, c, err, sizeof err);
  memset(token, 0, sizeof token); /* the client keeps its own copy */
  if (rc) {
    fprintf(stderr, "convctl: %s\n", err);
    return 2;
  }
  return 0;
}

/* Reads a float32 .npy of ndim dimensions (header_only: its header, for reading in place). */
static int load_npy_f32(const char *what, const char *path, int ndim, int header_only, convd_npy *a) {
  char err[512];
  if ((header_only ? convd_npy_read_header : convd_npy_read)(path, a, err, sizeof err)) {
    fprintf(stderr, "convctl: %s\n", err);
    return -1;
  }
  if (a->elem_size != 4) {
    fprintf(stderr, "convctl: %s %s is float64; convd takes float32 (a.astype(numpy.float32))\n",
            what, path);
    return -1;
  }
  if (a->ndim != ndim) {
    fprintf(stderr, "convctl: %s %s has %d dimensions, expected %d\n", what, path, a->ndim, ndim);
    return -1;
  }
  return 0;
}

/* The conv command's tensors in files, read and written band by band (convd_client_io), so
 * convctl holds one chunk of each, never the tensors. */
typedef struct file_io {
  int fd[2];        /* input, output */
  long base[2];     /* where their data starts */
  int64_t c[2], h[2], w[2];
} file_io;

/* Bytes [off, off + len) of band (n, rows [h0, h1)) of tensor t, whose band order is (C, rows,
 * W): within one channel the band's rows are one contiguous range of the NCHW file. */
static int band_file(file_io *f, int t, int64_t n, int64_t h0, int64_t h1, size_t off, char *buf,
                     size_t len) {
  const size_t run = (size_t)(h1 - h0) * (size_t)f->w[t] * sizeof(float);
  while (len) {
    const size_t c = off / run, in = off % run, take = run - in < len ? run - in : len;
    const off_t at = (off_t)f->base[t] +
                     (off_t)((((size_t)n * (size_t)f->c[t] + c) * (size_t)f->h[t] + (size_t)h0) *
                             (size_t)f->w[t] * sizeof(float) + in);
    const ssize_t k = t == 0 ? pread(f->fd[0], buf, take, at) : pwrite(f->fd[1], buf, take, at);
    if (k <= 0) return CONVD_CLIENT_EIO;
    buf += k, off += (size_t)k, len -= (size_t)k;
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

/* --stride, --padding, --dilation, --groups into p (shapes left zero). */
static int parse_conv_options(const args *a, convd_client_conv_params *p) {
  convd_client_conv_params_default(p);
  int64_t v[4];
  int n;
  if (a->stride) {
    if ((n = parse_list(a->stride, v, 2)) < 1) goto bad_list;
    p->stride_h = v[0], p->stride_w = n == 2 ? v[1] : v[0];
  }
  if (a->dilation) {
    if ((n = parse_list(a->dilation, v, 2)) < 1) goto bad_list;
    p->dil_h = v[0], p->dil_w = n == 2 ? v[1] : v[0];
  }
  if (a->padding) {
    n = parse_list(a->padding, v, 4);
    if (n == 1) p->pad_top = p->pad_bottom = p->pad_left = p->pad_right = v[0];
    else if (n == 2) p->pad_top = p->pad_bottom = v[0], p->pad_left = p->pad_right = v[1];
    else if (n == 4) p->pad_top = v[0], p->pad_bottom = v[1], p->pad_left = v[2], p->pad_right = v[3];
    else goto bad_list;
  }
  if (a->groups) {
    if (parse_list(a->groups, v, 1) != 1) goto bad_list;
    p->groups = v[0];
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
bad_list:
  fprintf(stderr, "convctl: malformed --stride/--padding/--dilation/--groups value (see --help)\n");
  return -1;
}

static int cmd_plan(const args *a) {
  convd_client_conv_params cp;
  if (parse_conv_options(a, &cp)) return 2;
  convd_conv_params p;
  convd_client_params_to_conv(&cp, &p);
  int64_t in[4], wt[4];
  if (!a->input || !a->weight || parse_list(a->input, in, 4) != 4 || parse_list(a->weight, wt, 4) != 4) {
    fprintf(stderr, "convctl plan: --input N,C,H,W and --weight C_out,C_in/groups,kH,kW are required\n");
    return 2;
  }
  p.n = in[0], p.c_in = in[1], p.h = in[2], p.w = in[3];
  p.c_out = wt[0], p.c_per_group = wt[1], p.kh = wt[2], p.kw = wt[3];
  convd_plan_opts o = {.devices = 1, .device_memory = CONVD_DEFAULT_DEVICE_MEMORY};
  if (a->devices && ((o.devices = atoi(a->devices)) < 1 || o.devices > 1024)) {
    fprintf(stderr, "convctl plan: --devices %s: expected 1 to 1024\n", a->devices);
    return 2;
  }
  if (a->device_memory && convd_parse_size(a->device_memory, &o.device_memory)) {
    fprintf(stderr, "convctl plan: --device-memory %s: expected a byte size such as 40M\n",
            a->device_memory);
    return 2;
  }
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

/* A float32 .npy's data (count elements from data_offset) into dst in the wire's dtype: straight
 * from a mapping of the file (npy.h's reader takes only little-endian float32 C order here, the
 * layout of the wire's float32, so a copy or a narrowing is all it takes), else read. */
static int npy_into_region(const char *path, long data_offset, size_t count, int dtype, uint8_t *dst) {
  const size_t bytes = count * sizeof(float), wire = dtype == CONVD_CLIENT_FLOAT32 ? 4 : 2;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fprintf(stderr, "convctl: %s: %s\n", path, strerror(errno));
    return -1;
  }
  size_t mapped = 0;
  const uint8_t *m = map_file(fd, (size_t)data_offset + bytes, &mapped);
  int rc = 0;
  if (m) {
    if (dtype == CONVD_CLIENT_FLOAT32) memcpy(dst, m + data_offset, bytes);
    else convd_dtype_encode(dtype, (const float *)(const void *)(m + data_offset), dst, count);
    munmap((void *)m, mapped);
  } else { /* read: float32 straight into the region, half types through a small buffer */
    enum { STEP = 1 << 16 }; /* elements */
    float *buf = dtype == CONVD_CLIENT_FLOAT32 ? NULL : malloc(STEP * sizeof(float));
    for (size_t done = 0; done < count && rc == 0;) {
      const size_t n = count - done < STEP ? count - done : STEP;
      uint8_t *to = buf ? (uint8_t *)buf : dst + done * wire;
      if (dtype != CONVD_CLIENT_FLOAT32 && buf == NULL) rc = -1;
      for (size_t got = 0; rc == 0 && got < n * sizeof(float);) {
        const ssize_t k = pread(fd, to + got, n * sizeof(float) - got,
                                (off_t)data_offset + (off_t)((done * sizeof(float)) + got));
        if (k <= 0) rc = -1;
        else got += (size_t)k;
      }
      if (rc == 0 && buf) convd_dtype_encode(dtype, buf, dst + done * wire, n);
      done += n;
    }
    free(buf);
    if (rc) fprintf(stderr, "convctl: %s: cannot read it: %s\n", path, errno ? strerror(errno) : "short file");
  }
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
 * after the rest); x, w and b are the files' headers. Returns the exit status. */
static int conv_shm(const args *a, const convd_client_conv_params *p, const convd_npy *x,
                    const convd_npy *w, const convd_npy *b, const int64_t out_shape[4],
                    const char *partial) {
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

  const size_t wire = p->dtype == CONVD_CLIENT_FLOAT32 ? 4 : 2;
  const size_t out_count = (size_t)(out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3]);
  const size_t off_w = align64(x->count * wire), off_b = align64(off_w + w->count * wire);
  const size_t off_y = align64(off_b + (p->has_bias ? b->count * wire : 0));
  const size_t total = off_y + out_count * wire;
  char err[1024];
  int rc = 1, out_fd = -1, committed = 0;
  long out_base = 0;
  convd_client *c = NULL;
  convd_client_region *reg = NULL;
  if ((rc = client_from_args(a, &c))) goto done;
  rc = 1;
  pthread_mutex_lock(&run.mu);
  run.c = c;
  pthread_mutex_unlock(&run.mu);
  if (convd_client_region_create(c, total, &reg, err, sizeof err)) {
    fprintf(stderr, "convctl: --shm: %s\n", err);
    goto done;
  }
  pthread_mutex_lock(&run.mu);
  snprintf(run.region, sizeof run.region, "%s", convd_client_region_name(reg));
  if (atomic_load(&run.interrupted)) shm_unlink(run.region); /* the signal came before the name */
  pthread_mutex_unlock(&run.mu);
  uint8_t *base = convd_client_region_data(reg);
  if (npy_into_region(a->input, x->data_offset, x->count, p->dtype, base) ||
      npy_into_region(a->weight, w->data_offset, w->count, p->dtype, base + off_w) ||
      (p->has_bias && npy_into_region(a->bias, b->data_offset, b->count, p->dtype, base + off_b)))
    goto done;
  /* The output file is ready, with its room, before the call. */
  if ((out_fd = convd_npy_create_f32(partial, out_shape, 4, &out_base, err, sizeof err)) < 0) {
    fprintf(stderr, "convctl: %s\n", err);
    goto done;
  }
  if (atomic_load(&run.interrupted)) goto done;
  const char *name = convd_client_region_name(reg);
  const convd_client_shm_refs refs = {.input = {name, 0},
                                      .weight = {name, off_w},
                                      .bias = {p->has_bias ? name : NULL, off_b},
                                      .output = {name, off_y}};
  convd_client_stats st;
  if (convd_client_conv2d_shm(c, p, &refs, NULL, NULL, NULL, NULL, &st, err, sizeof err)) {
    if (!atomic_load(&run.interrupted)) fprintf(stderr, "convctl: %s\n", err);
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
  printf("output %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
         " written to %s (server: %.3f s elapsed, %.3f s compute, %" PRIu64 " op%s)\n",
         st.output_shape[0], st.output_shape[1], st.output_shape[2], st.output_shape[3], a->output,
         st.elapsed_seconds, st.compute_seconds, st.ops_run, st.ops_run == 1 ? "" : "s");
  rc = 0;
done:
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

static int cmd_conv(const args *a, int transposed) {
  if (!a->input || !a->weight || !a->output) {
    fprintf(stderr, "convctl conv: --input, --weight and --output are required\n");
    return 2;
  }
  convd_client_conv_params p;
  if (parse_conv_options(a, &p)) return 2;
  p.transposed = transposed;
  if (a->output_padding) {
    int64_t v[2];
    int n = parse_list(a->output_padding, v, 2);
    if (!transposed || n < 1) {
      fprintf(stderr, "convctl: --output-padding OH,OW belongs to conv-transpose\n");
      return 2;
    }
    p.out_pad_h = v[0], p.out_pad_w = n == 2 ? v[1] : v[0];
  }

  convd_npy x = {0}, w = {0}, b = {0};
  int rc = 2;
  float *y = NULL;
  convd_client *c = NULL;
  file_io fio = {.fd = {-1, -1}};
  char partial[4096]; /* the output is written here and renamed into place once complete */
  snprintf(partial, sizeof partial, "%s.partial-%ld", a->output, (long)getpid());
  /* Float32 streaming calls read the input from its file and write the output to its file as
   * the bands go; unary and half-type calls hold the tensors. */
  const int in_place = !a->unary && !a->shm && p.dtype == CONVD_CLIENT_FLOAT32;
  if (a->shm && a->unary) {
    fprintf(stderr, "convctl: --shm and --unary do not go together: --shm makes a streamed call\n");
    goto out;
  }
  /* --shm: the files are copied into the region from their mappings, so only headers here */
  if (load_npy_f32("input", a->input, 4, in_place || a->shm, &x) ||
      load_npy_f32("weight", a->weight, 4, a->shm, &w) ||
      (a->bias && load_npy_f32("bias", a->bias, 1, a->shm, &b)))
    goto out;
  p.n = x.shape[0], p.c_in = x.shape[1], p.h = x.shape[2], p.w = x.shape[3];
  if (transposed) /* weights (C_in, C_out/groups, kH, kW) */
    p.c_out = w.shape[1] * p.groups, p.c_per_group = w.shape[0] / (p.groups > 0 ? p.groups : 1);
  else
    p.c_out = w.shape[0], p.c_per_group = w.shape[1];
  p.kh = w.shape[2], p.kw = w.shape[3];
  if (a->bias) {
    if (b.shape[0] != p.c_out) {
      fprintf(stderr, "convctl: bias %s has %" PRId64 " values, the weight has %" PRId64
              " output channels\n", a->bias, b.shape[0], p.c_out);
      goto out;
    }
    p.has_bias = 1;
  }
  int64_t out_shape[4];
  char err[1024];
  /* Shapes are checked here too so that a mistake is reported before anything is sent; the
   * server checks again and is the authority. */
  if (convd_client_output_shape(&p, out_shape, err, sizeof err)) {
    fprintf(stderr, "convctl: %s\n", err);
    goto out;
  }
  /* the check above has made sure the output's byte count fits a size_t */
  const size_t out_bytes =
      (size_t)(out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3]) * sizeof(float);
  if (a->shm) {
    rc = conv_shm(a, &p, &x, &w, &b, out_shape, partial);
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
    fio.c[0] = p.c_in, fio.h[0] = p.h, fio.w[0] = p.w;
    fio.c[1] = out_shape[1], fio.h[1] = out_shape[2], fio.w[1] = out_shape[3];
  } else if ((y = malloc(out_bytes)) == NULL) {
    fprintf(stderr, "convctl: cannot allocate %zu bytes for the output\n", out_bytes);
    rc = 1;
    goto out;
  }
  if ((rc = client_from_args(a, &c))) goto out;
  convd_client_stats st;
  const convd_client_io io = {file_read, file_write, &fio};
  int crc = in_place ? convd_client_conv2d_io(c, &p, &io, w.data, b.data, &st, err, sizeof err)
            : a->unary ? convd_client_conv2d_unary(c, &p, x.data, w.data, b.data, y, &st, err, sizeof err)
                       : convd_client_conv2d(c, &p, x.data, w.data, b.data, y, &st, err, sizeof err);
  if (crc == 0 && in_place && (close(fio.fd[1]) != 0 || rename(partial, a->output) != 0)) {
    crc = CONVD_CLIENT_EIO;
    snprintf(err, sizeof err, "%s: %s", a->output, strerror(errno));
  }
  if (in_place) fio.fd[1] = -1;
  if (crc) {
    if (in_place) unlink(partial); /* no half-written output left behind */
    fprintf(stderr, "convctl: %s\n", err);
    rc = 1;
    goto out;
  }
  if (!in_place && convd_npy_write_f32(a->output, st.output_shape, 4, y, err, sizeof err)) {
    fprintf(stderr, "convctl: %s\n", err);
    rc = 1;
    goto out;
  }
  printf("output %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
         " written to %s (server: %.3f s elapsed, %.3f s compute, %" PRIu64 " op%s)\n",
         st.output_shape[0], st.output_shape[1], st.output_shape[2], st.output_shape[3], a->output,
         st.elapsed_seconds, st.compute_seconds, st.ops_run, st.ops_run == 1 ? "" : "s");
  rc = 0;
out:
  if (fio.fd[0] >= 0) close(fio.fd[0]);
  if (fio.fd[1] >= 0) {
    close(fio.fd[1]);
    unlink(partial);
  }
  convd_client_destroy(c);
  free(y);
  convd_npy_free(&x);
  convd_npy_free(&w);
  convd_npy_free(&b);
  return rc;
}

static int cmd_devices(const args *a) {
  convd_client *c;
  int rc = client_from_args(a, &c);
  if (rc) return rc;
  convd_client_device *d;
  size_t n;
  char err[512];
  if (convd_client_list_devices(c, &d, &n, err, sizeof err)) {
    fprintf(stderr, "convctl: %s\n", err);
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
    fprintf(stderr, "convctl: %s\n", err);
    return 1;
  }
  printf("%s\n", serving ? "SERVING" : "NOT_SERVING");
  return serving ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (strcmp(argv[1], "--version") == 0) {
    printf("convctl %s\n", CONVD_VERSION);
    return 0;
  }
  args a = {0};
  if (strcmp(argv[1], "conv") != 0 && strcmp(argv[1], "devices") != 0 &&
      strcmp(argv[1], "plan") != 0 && strcmp(argv[1], "health") != 0 &&
      strcmp(argv[1], "conv-transpose") != 0) {
    fprintf(stderr, "convctl: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
  }
  if (parse_args(argc, argv, &a)) return 2;
  if (strcmp(argv[1], "plan") == 0) return cmd_plan(&a);
  if (strcmp(argv[1], "health") == 0) return cmd_health(&a);
  if (strcmp(argv[1], "conv-transpose") == 0) return cmd_conv(&a, 1);
  return strcmp(argv[1], "conv") == 0 ? cmd_conv(&a, 0) : cmd_devices(&a);
}
