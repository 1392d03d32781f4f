/* See config.h. Threads: the main thread, once, before anything else starts; the table is
 * constant and the parsed config is read-only afterwards. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cgroup.h"
#include "convd_version.h" /* generated from CMake's project() version */
#include "err.h"
#include "log.h"
#include "wire.h"

/* OPT_BOOL: `--name` alone sets it; `--name=false` and CONVD_NAME=0/1 also work.
 * OPT_LIST: addresses to listen on (a convd_listen_list, each checked by check_listen); the flag
 * may be repeated, each time one address; the default and the environment variable hold them
 * separated by commas. The first flag replaces those, the next ones append.
 * OPT_MODE: an octal file mode (0660). */
typedef enum {
  OPT_STRING, OPT_INT, OPT_SIZE, OPT_SECONDS, OPT_LOGLEVEL, OPT_BOOL, OPT_LIST, OPT_MODE
} opt_type;

typedef struct opt {
  const char *name; /* --name; environment CONVD_NAME with '-' as '_' */
  opt_type type;
  size_t offset, size;
  const char *def; /* parsed by the same code as user input, so defaults obey the bounds */
  double lo, hi;
  const char *help;
} opt;

static int check_listen(const char *val, const char *label, char *err, size_t errlen);

#define F(field) offsetof(convd_config, field), sizeof(((convd_config *)0)->field)
static const opt opts[] = {
    {"listen", OPT_LIST, F(listen), "127.0.0.1:50051", 0, 0,
     "address to serve gRPC on, HOST:PORT (port 0 picks a free port) or unix:/absolute/path; "
     "repeat the flag (up to 8) to serve on several; the variable takes them comma-separated"},
    {"unix-socket-mode", OPT_MODE, F(unix_socket_mode), "0660", 0, 0777,
     "the mode (octal) of each unix: socket file: who may connect is decided by the file's mode "
     "and owner, and the default lets the daemon's user and group in"},
    {"cpu-devices", OPT_INT, F(cpu_devices), "0", 0, 256,
     "CPU devices the host's threads are split into (each pulls elemental ops); 0 = one when "
     "no GPU is used, none beside GPUs"},
    {"gpus", OPT_INT, F(gpus), "-1", -1, 1024,
     "CUDA devices to use: -1 = every visible GPU (CUDA_VISIBLE_DEVICES applies), 0 = none, N = "
     "the first N"},
    {"gpu-memory", OPT_SIZE, F(gpu_memory), "0", 0, 1024.0 * 1024 * 1024 * 1024 * 1024,
     "GPU memory per device for one op's tensors and workspace (cached weights take up to a "
     "quarter more); 0 = half the free memory, at most 2G"},
    {"gpu-streams", OPT_INT, F(gpu_streams), "2", 1, 16,
     "devices per GPU, each with its own CUDA stream, memory budget and worker: with 2, one "
     "op's copies overlap another's compute"},
    {"cpu-threads", OPT_INT, F(cpu_threads), "0", 0, 4096,
     "threads for all CPU devices together; 0 = one per online CPU, or fewer when the cgroup's "
     "CPU quota (cpu.max) allows fewer: the quota rounded up"},
    {"cpu-kernel", OPT_STRING, F(cpu_kernel), "onednn", 0, 0,
     "onednn (fast) or reference (float64 accumulation, for validation)"},
    {"device-memory", OPT_SIZE, F(device_memory), "64M", 4096, 1024.0 * 1024 * 1024 * 1024 * 1024,
     "bytes one elemental op may use on a device; larger requests are cut into tiles"},
    {"chunk-bytes", OPT_SIZE, F(chunk_bytes), "1M", 1024, 256.0 * 1024 * 1024,
     "largest tensor payload the daemon puts in one output message"},
    {"max-message-bytes", OPT_SIZE, F(max_message_bytes), "4M", 64.0 * 1024,
     1024.0 * 1024 * 1024, "gRPC message size limit, both directions"},
    {"max-request-bytes", OPT_SIZE, F(max_request_bytes), "0", 0, 1024.0 * 1024 * 1024 * 1024 * 1024,
     "largest input+weights+output one request may hold; 0 = half of the memory the daemon may "
     "use (its cgroup's memory limit where lower than physical memory)"},
    {"max-inflight-bytes", OPT_SIZE, F(max_inflight_bytes), "0", 0, 1024.0 * 1024 * 1024 * 1024 * 1024,
     "admission: bytes all calls in flight may hold together (a streamed call counts what it "
     "holds at most); beyond it a call gets RESOURCE_EXHAUSTED at once; 0 = 3/4 of the memory "
     "the daemon may use (its cgroup's memory limit where lower than physical memory)"},
    {"max-queue-ops", OPT_SIZE, F(max_queue_ops), "1M", 1, 1e15,
     "admission: elemental ops queued or running for all calls together; a call whose plan "
     "would go beyond gets RESOURCE_EXHAUSTED at once"},
    {"weights-memory", OPT_SIZE, F(weights_memory), "1G", 0, 1024.0 * 1024 * 1024 * 1024 * 1024,
     "bytes the weights registry (PutWeights) may hold; the least recently used weights no call "
     "is using are evicted beyond it; 0 turns the registry off"},
    {"max-shm-bytes", OPT_SIZE, F(max_shm_bytes), "16G", 0, 1024.0 * 1024 * 1024 * 1024 * 1024,
     "bytes of same-host clients' shared-memory regions (RegisterRegion) the daemon maps at "
     "once, over all tenants; 0 turns shared memory off"},
    {"drain-timeout", OPT_SECONDS, F(drain_timeout), "30", 0, 86400,
     "seconds in-flight calls get to finish after SIGTERM/SIGINT before they are cancelled"},
    {"stream-idle-timeout", OPT_SECONDS, F(stream_idle_timeout), "30", 0, 86400,
     "a call whose client sends nothing while the daemon waits for its next message, or reads "
     "nothing while an answer waits to go out, is ended (DEADLINE_EXCEEDED) after this many "
     "seconds; 0 = never"},
    {"connection-idle-timeout", OPT_SECONDS, F(connection_idle_timeout), "120", 1, 86400,
     "a connection with no call in progress is closed (gracefully: clients reconnect) after "
     "this many seconds"},
    {"max-connection-age", OPT_SECONDS, F(max_connection_age), "0", 0, CONVD_MAX_CONNECTION_AGE_MAX,
     "a connection is asked to close (GOAWAY) after this many seconds (gRPC adds up to 10% "
     "either way); its client reconnects, and one balancing over several daemons (round_robin "
     "over a DNS name) re-resolves the name and finds daemons started since; 0 = never, else "
     "at least 1"},
    {"max-connection-age-grace", OPT_SECONDS, F(max_connection_age_grace), "0", 0,
     CONVD_MAX_CONNECTION_AGE_MAX,
     "calls still running on a connection past --max-connection-age get this many seconds more, "
     "then the connection is closed and they fail with UNAVAILABLE; 0 = they finish however long "
     "they take"},
    {"handshake-timeout", OPT_SECONDS, F(handshake_timeout), "10", 0.1, 3600,
     "a new connection that has not completed its TLS/HTTP/2 handshake within this many "
     "seconds is closed"},
    {"max-connections", OPT_INT, F(max_connections), "1000", 0, 1000000,
     "gRPC connections the daemon holds open at once; one more is closed as it arrives (the "
     "client sees UNAVAILABLE and may retry); at most the open-files limit less 64, which 0 "
     "means"},
    {"metrics-listen", OPT_STRING, F(metrics_listen), "", -1, 0,
     "serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 0.0.0.0:9464); empty = off"},
    /* MPI ranks as remote devices: docs/operations.md "Many nodes with MPI". */
    {"mpi", OPT_BOOL, F(mpi), "false", 0, 0,
     "run as one rank of `mpirun -np K convd --mpi ...`: rank 0 serves gRPC and metrics, every "
     "other rank opens its own devices (as its flags say) and runs rank 0's ops on them; needs a "
     "build with CONVD_MPI"},
    {"mpi-op-timeout", OPT_SECONDS, F(mpi_op_timeout), "120", 1, 86400,
     "with --mpi: seconds rank 0 waits for a worker rank to answer an op (or, at start, to say "
     "hello); a rank that does not is lost: its ops run elsewhere and the job is aborted at exit"},
    {"mpi-weights-cache", OPT_SIZE, F(mpi_weights_cache), "256M", 0, 1024.0 * 1024 * 1024 * 1024,
     "with --mpi: bytes of weight blocks a worker rank keeps (least recently used evicted), so a "
     "block crosses to a rank once; 0 = sent with every op"},
    {"mpi-test-fail-after", OPT_INT, F(mpi_test_fail_after), "0", 0, 1000000000,
     "tests only, with --mpi on a worker rank (mpirun's `A : B` form gives one rank its own "
     "flags): after this many ops the rank answers every op with an error; 0 = never"},
    {"log-level", OPT_LOGLEVEL, F(log_level), "info", 0, 0, "debug, info, warn or error"},
    {"log-file", OPT_STRING, F(log_file), "", -1, 0,
     "append the log to this file instead of stderr; SIGHUP reopens it (log rotation)"},
    /* Who may connect: docs/operations.md "Security". */
    {"tls-cert", OPT_STRING, F(tls_cert), "", -1, 0,
     "serve gRPC over TLS with this certificate chain (PEM; with --tls-key); SIGHUP re-reads "
     "it for new connections"},
    {"tls-key", OPT_STRING, F(tls_key), "", -1, 0, "the private key of --tls-cert (PEM)"},
    {"tls-client-ca", OPT_STRING, F(tls_client_ca), "", -1, 0,
     "mutual TLS: every client must present a certificate this CA (PEM) signed"},
    {"auth-tokens", OPT_STRING, F(auth_tokens), "", -1, 0,
     "require `authorization: Bearer TOKEN` on every call but health checks; the file (mode "
     "600) has lines TENANT TOKEN [inflight-bytes=SIZE] [calls=N] [weights-bytes=SIZE] "
     "[shm-bytes=SIZE]; SIGHUP "
     "re-reads it"},
    {"reflection-public", OPT_BOOL, F(reflection_public), "false", 0, 0,
     "with --auth-tokens, serve server reflection without a token"},
    {"metrics-public", OPT_BOOL, F(metrics_public), "false", 0, 0,
     "with TLS or tokens, allow --metrics-listen on a non-loopback address (the endpoint is "
     "plaintext HTTP without authentication)"},
    {"allow-insecure", OPT_BOOL, F(allow_insecure), "false", 0, 0,
     "protected mode off: serve on a non-loopback --listen without TLS and tokens, and metrics "
     "on a non-loopback address"},
};
#undef F
#define NOPTS (sizeof opts / sizeof opts[0])

static void env_name(const opt *o, char *buf, size_t len);

/* Appends one element of an OPT_LIST; the error names label. */
static int list_append(convd_listen_list *l, const char *val, size_t len, const char *label,
                       char *err, size_t errlen) {
  char one[sizeof l->addr[0]];
  if (len >= sizeof one)
    return convd_errf(err, errlen, CONVD_EINVAL, "%s=%.*s...: an address is at most %zu characters",
                      label, 40, val, sizeof one - 1);
  memcpy(one, val, len);
  one[len] = '\0';
  int rc = check_listen(one, label, err, errlen);
  if (rc) return rc;
  if (l->n == CONVD_LISTEN_MAX)
    return convd_errf(err, errlen, CONVD_EINVAL, "%s: at most %d addresses (%s is one too many)",
                      label, CONVD_LISTEN_MAX, one);
  memcpy(l->addr[l->n++], one, len + 1);
  return 0;
}

/* source: 0 default, 1 environment, 2 flag; it decides how the setting is named in errors.
 * append: an OPT_LIST flag given before (the value is added, not put in place of the list). */
static int set_opt(convd_config *cfg, const opt *o, const char *val, int source, int append,
                   char *err, size_t errlen) {
  char label[80];
  if (source == 1)
    env_name(o, label, sizeof label);
  else
    snprintf(label, sizeof label, "%s--%s", source == 0 ? "default " : "", o->name);
  char *dst = (char *)cfg + o->offset;
  switch (o->type) {
    case OPT_LIST: {
      convd_listen_list *l = (convd_listen_list *)(void *)dst;
      if (!append) l->n = 0;
      if (source == 2) return list_append(l, val, strlen(val), label, err, errlen);
      /* Comma-separated; spaces around an element are not part of it. */
      for (const char *p = val;; p++) {
        const char *comma = strchr(p, ',');
        const size_t n = comma ? (size_t)(comma - p) : strlen(p);
        size_t b = 0, e = n;
        while (b < e && p[b] == ' ') b++;
        while (e > b && p[e - 1] == ' ') e--;
        int rc = list_append(l, p + b, e - b, label, err, errlen);
        if (rc) return rc;
        if (comma == NULL) return 0;
        p = comma;
      }
    }
    case OPT_MODE: {
      char *end;
      errno = 0;
      long v = strtol(val, &end, 8);
      if (errno || end == val || *end != '\0' || strspn(val, "01234567") != strlen(val) ||
          v < o->lo || v > o->hi)
        return convd_errf(err, errlen, CONVD_EINVAL,
                          "%s=%s: expected an octal file mode from %04o to %04o (e.g. 0660)",
                          label, val, (unsigned)o->lo, (unsigned)o->hi);
      *(int *)dst = (int)v;
      return 0;
    }
    case OPT_STRING:
      /* lo < 0 marks a string that may be empty */
      if (strlen(val) >= o->size || (val[0] == '\0' && o->lo >= 0))
        return convd_errf(err, errlen, CONVD_EINVAL, "%s: must be %d to %zu characters", label,
                          o->lo < 0 ? 0 : 1, o->size - 1);
      strcpy(dst, val);
      return 0;
    case OPT_INT: {
      char *end;
      errno = 0;
      long v = strtol(val, &end, 10);
      if (errno || end == val || *end != '\0' || v < o->lo || v > o->hi)
        return convd_errf(err, errlen, CONVD_EINVAL, "%s=%s: expected an integer from %.0f to %.0f", label, val, o->lo, o->hi);
      *(int *)dst = (int)v;
      return 0;
    }
    case OPT_SIZE: {
      uint64_t v;
      if (convd_parse_size(val, &v) || (double)v < o->lo || (double)v > o->hi)
        return convd_errf(err, errlen, CONVD_EINVAL,
                          "%s=%s: expected a byte size (e.g. 65536, 64K, 4M, 2G) from %.0f to %.0f", label, val, o->lo, o->hi);
      *(uint64_t *)dst = v;
      return 0;
    }
    case OPT_SECONDS: {
      char *end;
      errno = 0;
      double v = strtod(val, &end);
      if (errno || end == val || *end != '\0' || !(v >= o->lo && v <= o->hi))
        return convd_errf(err, errlen, CONVD_EINVAL, "%s=%s: expected seconds from %g to %g", label, val, o->lo, o->hi);
      *(double *)dst = v;
      return 0;
    }
    case OPT_LOGLEVEL: {
      int lv = convd_log_parse_level(val);
      if (lv < 0)
        return convd_errf(err, errlen, CONVD_EINVAL,
                          "%s=%s: expected debug, info, warn or error", label, val);
      *(int *)dst = lv;
      return 0;
    }
    case OPT_BOOL: {
      static const char *const yes[] = {"1", "true", "yes", "on"}, *const no[] = {"0", "false", "no", "off"};
      for (size_t i = 0; i < 4; i++) {
        if (strcmp(val, yes[i]) == 0 || strcmp(val, no[i]) == 0) {
          *(int *)dst = strcmp(val, yes[i]) == 0;
          return 0;
        }
      }
      return convd_errf(err, errlen, CONVD_EINVAL, "%s=%s: expected true or false (1 or 0)", label, val);
    }
  }
  return convd_errf(err, errlen, CONVD_EINTERNAL, "option %s has no type", o->name);
}

static void env_name(const opt *o, char *buf, size_t len) {
  size_t i = (size_t)snprintf(buf, len, "CONVD_");
  for (const char *p = o->name; *p && i + 1 < len; p++)
    buf[i++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
  buf[i] = '\0';
}

const char *convd_listen_unix_path(const char *addr) {
  return strncmp(addr, "unix:", 5) == 0 ? addr + 5 : NULL;
}

/* One --listen address: HOST:PORT or unix:/absolute/path. Whether a path is free (or a stale
 * socket) is found at start (unixsock.h), not here. */
static int check_listen(const char *val, const char *label, char *err, size_t errlen) {
  static const char expected[] =
      "expected HOST:PORT (e.g. 127.0.0.1:50051; port 0 picks a free one) or unix:/absolute/path";
  if (val[0] == '\0')
    return convd_errf(err, errlen, CONVD_EINVAL, "%s: an empty address (%s)", label, expected);
  if (strncmp(val, "unix-abstract:", 14) == 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s=%s: abstract Unix sockets are not served: they have no file whose mode "
                      "and owner decide who may connect, so any process on the host could; use "
                      "unix:/absolute/path",
                      label, val);
  const char *path = convd_listen_unix_path(val);
  if (path) {
    if (path[0] != '/')
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "%s=%s: the socket path must be absolute (e.g. unix:/run/convd/convd.sock); "
                        "a relative one would depend on the daemon's working directory",
                        label, val);
    if (strlen(path) > CONVD_UNIX_PATH_MAX)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "%s=%s: the socket path is %zu bytes, longer than the %d a Unix socket "
                        "address holds: choose a shorter one",
                        label, val, strlen(path), CONVD_UNIX_PATH_MAX);
    return 0;
  }
  if (strchr(val, ','))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s=%s: one address per --listen: repeat the flag (CONVD_LISTEN takes "
                      "several separated by commas)",
                      label, val);
  const char *colon = strrchr(val, ':');
  const char *port = colon ? colon + 1 : "";
  const size_t digits = strspn(port, "0123456789");
  if (colon == NULL || colon == val || digits == 0 || digits > 5 || port[digits] != '\0' ||
      atoi(port) > 65535)
    return convd_errf(err, errlen, CONVD_EINVAL, "%s=%s: %s", label, val, expected);
  return 0;
}

static void usage(FILE *out) {
  fprintf(out,
          "usage: convd [options]\n"
          "Serves 2D convolution over gRPC (service convd.v1.Convolution).\n\n"
          "Each option can also be set by the environment variable shown; a flag wins.\n\n");
  for (size_t i = 0; i < NOPTS; i++) {
    char env[64];
    env_name(&opts[i], env, sizeof env);
    fprintf(out, "  --%-20s %s\n  %-22s env %s, default %s\n", opts[i].name, opts[i].help, "",
            env, opts[i].def);
  }
  fprintf(out, "  --%-20s %s\n  --%-20s %s\n", "help", "print this and exit", "version",
          "print the version and exit");
}

int convd_config_parse(convd_config *cfg, int argc, char **argv, FILE *out, char *err,
                       size_t errlen) {
  memset(cfg, 0, sizeof *cfg);
  int rc;
  unsigned char given[NOPTS] = {0}; /* flags seen: an OPT_LIST's next ones append */
  for (size_t i = 0; i < NOPTS; i++)
    if ((rc = set_opt(cfg, &opts[i], opts[i].def, 0, 0, err, errlen))) return rc;
  for (size_t i = 0; i < NOPTS; i++) {
    char env[64];
    env_name(&opts[i], env, sizeof env);
    const char *v = getenv(env);
    if (v != NULL && (rc = set_opt(cfg, &opts[i], v, 1, 0, err, errlen))) return rc;
  }
  for (int a = 1; a < argc; a++) {
    const char *arg = argv[a];
    if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
      usage(out);
      return CONVD_CONFIG_EXIT;
    }
    if (strcmp(arg, "--version") == 0) {
      fprintf(out, "convd %s\n", CONVD_VERSION);
      return CONVD_CONFIG_EXIT;
    }
    if (strncmp(arg, "--", 2) != 0)
      return convd_errf(err, errlen, CONVD_EINVAL, "unexpected argument '%s' (see --help)", arg);
    const char *name = arg + 2, *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    const opt *o = NULL;
    for (size_t i = 0; i < NOPTS; i++)
      if (strlen(opts[i].name) == nlen && strncmp(opts[i].name, name, nlen) == 0) o = &opts[i];
    if (o == NULL)
      return convd_errf(err, errlen, CONVD_EINVAL, "unknown option '%.*s' (see --help)",
                        (int)(nlen + 2), arg);
    const char *val = eq ? eq + 1 : o->type == OPT_BOOL ? "true" : NULL;
    if (val == NULL) {
      if (a + 1 >= argc)
        return convd_errf(err, errlen, CONVD_EINVAL, "option --%s needs a value", o->name);
      val = argv[++a];
    }
    if ((rc = set_opt(cfg, o, val, 2, given[o - opts], err, errlen))) return rc;
    given[o - opts] = 1;
  }

  /* The same socket path twice would fail as "another convd is serving there"; the same port
   * twice as "in use". Port 0 twice is two free ports. */
  for (int i = 0; i < cfg->listen.n; i++)
    for (int j = 0; j < i; j++) {
      const char *a = cfg->listen.addr[i];
      const size_t len = strlen(a);
      if (strcmp(a, cfg->listen.addr[j]) == 0 &&
          (convd_listen_unix_path(a) || len < 2 || strcmp(a + len - 2, ":0") != 0))
        return convd_errf(err, errlen, CONVD_EINVAL, "--listen %s is given twice", a);
    }

  /* A data payload plus the message's own framing must fit in one gRPC message. */
  if (cfg->chunk_bytes + CONVD_WIRE_FRAMING_SLACK > cfg->max_message_bytes)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "chunk-bytes=%llu leaves no room for message framing within "
                      "max-message-bytes=%llu: keep chunk-bytes at most max-message-bytes - %d",
                      (unsigned long long)cfg->chunk_bytes,
                      (unsigned long long)cfg->max_message_bytes, CONVD_WIRE_FRAMING_SLACK);
  /* Below a second a connection would be torn down faster than a TLS handshake pays off. */
  if (cfg->max_connection_age > 0 && cfg->max_connection_age < 1)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--max-connection-age=%g: expected 0 (never) or at least 1 second",
                      cfg->max_connection_age);
  if (cfg->max_connection_age_grace > 0 && cfg->max_connection_age == 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--max-connection-age-grace=%g has no effect without --max-connection-age: "
                      "set both, or neither",
                      cfg->max_connection_age_grace);
  if (strcmp(cfg->cpu_kernel, "onednn") != 0 && strcmp(cfg->cpu_kernel, "reference") != 0)
    return convd_errf(err, errlen, CONVD_EINVAL, "--cpu-kernel=%s: expected onednn or reference",
                      cfg->cpu_kernel);
  /* The defaults that depend on the machine follow what this process may use: its cgroup's
   * memory and CPU limits where lower than the machine's (cgroup.h). CONVD_CGROUP_ROOT, for
   * tests, points the limit files at a fixture directory. */
  convd_host_limits_probe(getenv("CONVD_CGROUP_ROOT"), &cfg->host);
  const uint64_t mem = cfg->host.memory_bytes;
  if (cfg->max_inflight_bytes == 0) cfg->max_inflight_bytes = mem ? mem / 4 * 3 : UINT64_C(8) << 30;
  if (cfg->max_request_bytes == 0) cfg->max_request_bytes = mem ? mem / 2 : UINT64_C(4) << 30;
  if (cfg->cpu_threads == 0) cfg->cpu_threads = cfg->host.cpus;
  return CONVD_CONFIG_OK;
}
