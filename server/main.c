/* convd: the daemon. Parses the configuration, starts the engine and the gRPC server, then runs a
 * libuv loop for signals, health changes and the shutdown sequence:
 *   SIGTERM/SIGINT -> drain: health NOT_SERVING, new calls get UNAVAILABLE, calls in flight
 *   finish (cancelled after --drain-timeout; a second signal cancels at once) -> a short linger
 *   so clients read their last frames -> gRPC shutdown -> exit 0.
 *   SIGHUP -> the log file is reopened (log rotation); the TLS files and the tokens file are
 *   read again (new connections get the new certificate, new calls the new tokens; a file
 *   that does not load leaves the old one in force and is logged).
 * Threads: main() is the libuv loop's thread; gRPC's completion-queue thread and the engine's
 * device workers reach it only through uv_async_send (drained, stopped, health). */
#include <grpc/grpc.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#include "auth.h"
#include "config.h"
#include "connlimit.h"
#include "fdsock.h"
#include "engine.h"
#include "err.h"
#include "log.h"
#include "http.h"
#include "metrics.h"
#include "mpi_devices.h"
#include "protect.h"
#include "rpc.h"
#include "tls.h"
#include "unixsock.h"

/* After the last call ended, gRPC's shutdown closes connections at once; this pause lets
 * clients read the frames of calls that just ended. Loopback needs microseconds; this is for
 * slow links. */
#define LINGER_MS 200

/* How often --max-connections looks for new connections: one over the bound lives at most
 * this long. A scan costs about a microsecond per open descriptor. */
#define CONNLIMIT_SCAN_MS 100

/* Allocations up to this come from the heap (tune_runtime), and freed heap up to MALLOC_KEEP
 * stays for the next call rather than going back to the kernel at once (bytes, as strings for
 * GLIBC_TUNABLES). */
#define MALLOC_MMAP_THRESHOLD "1073741824"
#define MALLOC_KEEP "268435456"

typedef struct daemon_state {
  uv_loop_t *loop;
  uv_signal_t sigint, sigterm, sighup;
  uv_timer_t drain_timer, linger_timer, idle_timer;
  uv_async_t drained, stopped, health;
  convd_rpc *rpc;
  convd_engine *engine;
  convd_metrics *metrics;
  convd_http *http;
  convd_tls *tls;   /* NULL: plaintext */
  convd_auth *auth; /* NULL: no tokens */
  convd_connlimit *connlimit; /* NULL: --max-connections 0 */
  convd_fdsock *fdsock;       /* NULL: no unix: listener, or no shared memory */
  convd_unix_socket socks[CONVD_LISTEN_MAX]; /* the unix: listeners' files, removed at exit */
  const convd_config *cfg;
  int shutting_down;
} daemon_state;

/* Server or engine thread: the last call in flight ended. */
static void on_rpc_drained(void *user) {
  daemon_state *d = user;
  uv_async_send(&d->drained);
}

/* Server thread: gRPC has shut down. */
static void on_rpc_stopped(void *user) {
  daemon_state *d = user;
  uv_async_send(&d->stopped);
}

static void on_linger(uv_timer_t *t) {
  daemon_state *d = t->data;
  convd_rpc_shutdown(d->rpc, on_rpc_stopped, d);
}

static void on_drained(uv_async_t *h) {
  daemon_state *d = h->data;
  convd_log(CONVD_LOG_INFO, "msg=\"all calls ended\"");
  uv_timer_stop(&d->drain_timer);
  uv_timer_start(&d->linger_timer, on_linger, LINGER_MS, 0);
}

static void on_stopped(uv_async_t *h) {
  daemon_state *d = h->data;
  convd_log(CONVD_LOG_INFO, "msg=\"stopped, exiting\"");
  /* Closing the signal handles restores the default action; a late SIGTERM must not turn a
   * clean exit into a kill while the engine and gRPC shut down. */
  signal(SIGTERM, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  uv_handle_t *handles[] = {(uv_handle_t *)&d->sigint,      (uv_handle_t *)&d->sigterm,
                            (uv_handle_t *)&d->sighup,      (uv_handle_t *)&d->drain_timer,
                            (uv_handle_t *)&d->linger_timer, (uv_handle_t *)&d->drained,
                            (uv_handle_t *)&d->stopped,     (uv_handle_t *)&d->health,
                            (uv_handle_t *)&d->idle_timer};
  for (size_t i = 0; i < sizeof handles / sizeof handles[0]; i++) uv_close(handles[i], NULL);
  convd_http_close(d->http);
  d->http = NULL;
  convd_connlimit_close(d->connlimit);
  d->connlimit = NULL;
  convd_fdsock_close(d->fdsock);
  d->fdsock = NULL;
}

static void on_drain_timeout(uv_timer_t *t) {
  daemon_state *d = t->data;
  convd_log(CONVD_LOG_WARN, "msg=\"drain timeout reached, cancelling calls in flight\"");
  convd_rpc_cancel_all(d->rpc);
}

static void on_idle_check(uv_timer_t *t) {
  daemon_state *d = t->data;
  convd_rpc_expire_idle(d->rpc);
}

static void on_signal(uv_signal_t *h, int signum) {
  daemon_state *d = h->data;
  if (d->shutting_down) {
    convd_log(CONVD_LOG_WARN, "msg=\"second signal, cancelling calls in flight\" signal=%d", signum);
    convd_rpc_cancel_all(d->rpc);
    return;
  }
  d->shutting_down = 1;
  convd_log(CONVD_LOG_INFO, "msg=\"draining: new calls get UNAVAILABLE\" signal=%s drain_timeout_s=%g",
            signum == SIGTERM ? "SIGTERM" : "SIGINT", d->cfg->drain_timeout);
  uv_timer_start(&d->drain_timer, on_drain_timeout, (uint64_t)(d->cfg->drain_timeout * 1000.0), 0);
  convd_rpc_drain(d->rpc, on_rpc_drained, d);
}

/* A device left service (engine thread, under its lock): its ops run elsewhere; the log and
 * ListDevices say why, and the health service re-checks from the loop. */
static void on_device_failed(void *user, unsigned index, const char *name, const char *why) {
  daemon_state *d = user;
  convd_log(CONVD_LOG_ERROR, "msg=\"device unhealthy, its ops go to the other devices\" device=%u name=%s why=\"%s\"",
            index, name, why);
  uv_async_send(&d->health);
}

static char *render_metrics(void *user, size_t *len) {
  daemon_state *d = user;
  convd_metrics_gauges g;
  convd_rpc_gauges(d->rpc, &g);
  g.connections_limit = d->connlimit ? (uint64_t)d->cfg->max_connections : 0;
  convd_connlimit_counts(d->connlimit, &g.connections_open, &g.connections_refused);
  return convd_metrics_render(d->metrics, d->engine, convd_rpc_registry(d->rpc), &g, len);
}

static void on_health(uv_async_t *h) {
  daemon_state *d = h->data;
  if (d->rpc) convd_rpc_health_changed(d->rpc);
}

static void on_sighup(uv_signal_t *h, int signum) {
  daemon_state *d = h->data;
  (void)signum;
  if (convd_log_reopen() == 0) convd_log(CONVD_LOG_INFO, "msg=\"SIGHUP: log reopened\"");
  else convd_log(CONVD_LOG_ERROR, "msg=\"SIGHUP: cannot reopen the log file, still writing the old one\"");
  char err[512];
  if (d->tls && convd_tls_reload(d->tls, err, sizeof err))
    convd_log(CONVD_LOG_ERROR, "msg=\"SIGHUP: TLS files not reloaded, new connections keep the old certificate\" why=\"%s\"", err);
  else if (d->tls)
    convd_log(CONVD_LOG_INFO, "msg=\"SIGHUP: TLS files re-read, new connections use them\"");
  if (d->auth && convd_auth_reload(d->auth, err, sizeof err)) {
    convd_log(CONVD_LOG_ERROR, "msg=\"SIGHUP: tokens file not reloaded, the old tokens stay in force\" why=\"%s\"", err);
  } else if (d->auth) {
    size_t tokens, tenants;
    convd_auth_counts(d->auth, &tokens, &tenants);
    convd_log(CONVD_LOG_INFO, "msg=\"SIGHUP: tokens file re-read, new calls use it\" tokens=%zu tenants=%zu",
              tokens, tenants);
  }
}

/* The unix: listeners' socket files, at exit (or a start that failed after binding them). */
static void remove_sockets(daemon_state *d) {
  for (int i = 0; i < CONVD_LISTEN_MAX; i++) convd_unix_remove(&d->socks[i]);
}

/* " socket_mode=0660" for a unix: listener's log line. */
static const char *unix_mode_field(int mode) {
  static char buf[32];
  snprintf(buf, sizeof buf, " socket_mode=%04o", (unsigned)mode);
  return buf;
}

/* At start: reads the TLS and tokens files (errors name the flag and file) and logs who may
 * connect. */
static int load_security(daemon_state *d, const convd_config *cfg, char *err, size_t errlen) {
  int rc;
  if (cfg->tls_cert[0] &&
      (rc = convd_tls_create(cfg->tls_cert, cfg->tls_key, cfg->tls_client_ca, &d->tls, err, errlen)))
    return rc;
  if (cfg->auth_tokens[0] && (rc = convd_auth_load(cfg->auth_tokens, &d->auth, err, errlen))) {
    convd_tls_destroy(d->tls);
    d->tls = NULL;
    return rc;
  }
  size_t tokens = 0, tenants = 0;
  if (d->auth) convd_auth_counts(d->auth, &tokens, &tenants);
  convd_log(CONVD_LOG_INFO, "msg=\"security\" tls=%s client_certificates=%s tokens=%zu tenants=%zu reflection=%s",
            d->tls ? "on" : "off", d->tls && convd_tls_mutual(d->tls) ? "required" : "no", tokens,
            tenants, !d->auth || cfg->reflection_public ? "open" : "token");
  for (int i = 0; i < cfg->listen.n; i++)
    if (!convd_protect_is_local(cfg->listen.addr[i]) && !(d->tls && d->auth))
      convd_log(CONVD_LOG_WARN, "msg=\"--allow-insecure: serving on a non-loopback address without %s\" address=%s",
                !d->tls && !d->auth ? "TLS and tokens" : !d->tls ? "TLS (tokens travel in plaintext)" : "tokens",
                cfg->listen.addr[i]);
  if (!d->auth && cfg->reflection_public)
    convd_log(CONVD_LOG_WARN, "msg=\"--reflection-public has no effect without --auth-tokens\"");
  return 0;
}

/* Two settings that the C library and OpenMP read when they are loaded, before main, so the
 * daemon sets them and starts itself again, once (an operator's own values are left alone):
 * - OpenMP (Debian's oneDNN runs on libgomp) spins its threads after each parallel region, and
 *   on a small machine the spins take the cores the gRPC thread needs to receive and send while
 *   ops run: a passive wait.
 * - Rows and bands are megabytes each and come and go with every tile row. glibc maps each one
 *   from the kernel and unmaps it when freed, so every band is fresh pages and its first write
 *   a page fault (20 % of the daemon's time on the wire-bound job, measured). In the heap, kept
 *   up to MALLOC_KEEP, freed rows serve the next ones. mallopt cannot do this: it caps the
 *   threshold at 32 MiB, below a tile row's band. */
static void tune_runtime(char **argv) {
  if (getenv("CONVD_REEXECED")) return;
  int changed = 0;
  if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT"))
    changed |= setenv("OMP_WAIT_POLICY", "passive", 1) == 0;
  if (!getenv("GLIBC_TUNABLES"))
    changed |= setenv("GLIBC_TUNABLES",
                      "glibc.malloc.mmap_threshold=" MALLOC_MMAP_THRESHOLD
                      ":glibc.malloc.trim_threshold=" MALLOC_KEEP, 1) == 0;
  if (!changed) return;
  setenv("CONVD_REEXECED", "1", 1); /* never loops, even if the settings did not take */
  execv("/proc/self/exe", argv);
  unsetenv("CONVD_REEXECED"); /* no /proc: carry on with the defaults */
}

/* What the machine-dependent defaults came from (cgroup.h): the memory and CPUs the daemon may
 * use and the limits derived from them. Past the memory the kernel ends the daemon (OOM) where
 * admission would have answered RESOURCE_EXHAUSTED, so a configuration that admits more is
 * worth a warning. */
static void log_limits(const convd_config *cfg) {
  const convd_host_limits *h = &cfg->host;
  char mem_from[600], cpu_from[700], why[700];
  if (h->warning[0])
    convd_log(CONVD_LOG_WARN, "msg=\"a cgroup limit file could not be read\" why=%s",
              convd_log_quote(h->warning, why, sizeof why));
  if (h->memory_file[0])
    convd_log_quote(h->memory_file, mem_from, sizeof mem_from);
  else
    snprintf(mem_from, sizeof mem_from, "physical");
  if (h->cpus < h->online_cpus) {
    char what[600];
    snprintf(what, sizeof what, "%s (%llu/%llu)", h->cpu_file, (unsigned long long)h->cpu_quota,
             (unsigned long long)h->cpu_period);
    convd_log_quote(what, cpu_from, sizeof cpu_from);
  } else {
    snprintf(cpu_from, sizeof cpu_from, "online");
  }
  convd_log(CONVD_LOG_INFO,
            "msg=\"memory and CPU limits\" memory_bytes=%llu memory_from=%s "
            "physical_memory_bytes=%llu cpus=%d cpus_from=%s online_cpus=%d "
            "max_inflight_bytes=%llu max_request_bytes=%llu cpu_threads=%d",
            (unsigned long long)h->memory_bytes, mem_from, (unsigned long long)h->physical_bytes,
            h->cpus, cpu_from, h->online_cpus, (unsigned long long)cfg->max_inflight_bytes,
            (unsigned long long)cfg->max_request_bytes, cfg->cpu_threads);
  if (h->memory_bytes && cfg->max_inflight_bytes + cfg->weights_memory > h->memory_bytes)
    convd_log(CONVD_LOG_WARN,
              "msg=\"--max-inflight-bytes and --weights-memory together exceed the memory the "
              "daemon may use: past it the kernel ends the daemon instead of calls getting "
              "RESOURCE_EXHAUSTED\" max_inflight_bytes=%llu weights_memory=%llu memory_bytes=%llu",
              (unsigned long long)cfg->max_inflight_bytes, (unsigned long long)cfg->weights_memory,
              (unsigned long long)h->memory_bytes);
}

/* The daemon proper (rank 0 under --mpi, with the remote devices of mpi, else NULL): returns
 * the exit status. */
static int serve(convd_config *cfg_in, convd_mpi *mpi, int mpi_size);

int main(int argc, char **argv) {
  convd_config cfg;
  char err[512];
  tune_runtime(argv);
  int rc = convd_config_parse(&cfg, argc, argv, stdout, err, sizeof err);
  if (rc == CONVD_CONFIG_EXIT) return 0;
  if (rc != 0) {
    fprintf(stderr, "convd: %s\n", err);
    return 2;
  }
  convd_log_level = cfg.log_level;
  if ((rc = convd_protect_check(&cfg, err, sizeof err)) != 0) {
    fprintf(stderr, "convd: %s\n", err);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  /* Rows are allocated on the gRPC thread and freed on device workers (output rows the other
   * way round). With one glibc arena per thread, each arena grows to its own peak and keeps it,
   * so the daemon's memory would follow fragmentation instead of what requests hold; a shared
   * arena reuses every freed row (measured in docs/benchmarks.md: 422 -> 252-279 MiB peak on
   * the 1 GiB streamed test). */
  mallopt(M_ARENA_MAX, 1);

  if (convd_log_open(cfg.log_file)) {
    fprintf(stderr, "convd: --log-file %s: cannot open it for appending\n", cfg.log_file);
    return 2;
  }
  log_limits(&cfg);
  /* Under mpirun: every rank but 0 is a worker offering its devices (mpi_devices.h) and never serves. */
  convd_mpi *mpi = NULL;
  int mpi_rank = 0, mpi_size = 1;
  if (cfg.mpi) {
    if ((rc = convd_mpi_init(&argc, &argv, &mpi, &mpi_rank, &mpi_size, err, sizeof err)) != 0) {
      fprintf(stderr, "convd: %s\n", err);
      return 2;
    }
    convd_log(CONVD_LOG_INFO, "msg=\"mpi\" rank=%d ranks=%d role=%s", mpi_rank, mpi_size,
              mpi_rank == 0 ? "daemon" : "worker");
    if (mpi_rank != 0) return convd_mpi_worker_main(mpi, &cfg);
  }
  return convd_mpi_finish(mpi, serve(&cfg, mpi, mpi_size));
}

static int serve(convd_config *cfg_in, convd_mpi *mpi, int mpi_size) {
  convd_config cfg = *cfg_in;
  char err[512];
  int rc;
  /* Each connection is a descriptor: the soft limit (often 1024) goes up to the hard one, so
   * that many clients (or idle connections not yet timed out) do not lock new ones out. */
  struct rlimit nofile;
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    rlim_t was = nofile.rlim_cur;
    nofile.rlim_cur = nofile.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &nofile) == 0)
      convd_log(CONVD_LOG_INFO, "msg=\"open files limit raised\" from=%llu to=%llu",
                (unsigned long long)was, (unsigned long long)nofile.rlim_cur);
  }
  /* The bound must hold before descriptors run out, or new clients would be locked out by
   * accept() failing rather than let in as old connections close; 64 stay for everything else
   * (engine, log, metrics endpoint, libraries). */
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY &&
      (cfg.max_connections == 0 || (rlim_t)cfg.max_connections + 64 > nofile.rlim_cur)) {
    const int fit = nofile.rlim_cur > 128 ? (int)(nofile.rlim_cur - 64) : 64;
    if (cfg.max_connections == 0 || fit < cfg.max_connections) {
      convd_log(CONVD_LOG_WARN, "msg=\"--max-connections lowered to fit the open-files limit\" "
                "max_connections=%d open_files_limit=%llu", fit, (unsigned long long)nofile.rlim_cur);
      cfg.max_connections = fit;
    }
  }
  /* The loop's handles first: the engine may report a failed device from its first op. */
  daemon_state d = {.loop = uv_default_loop(), .cfg = &cfg};
  if (load_security(&d, &cfg, err, sizeof err)) {
    fprintf(stderr, "convd: %s\n", err);
    return 2;
  }
  uv_async_init(d.loop, &d.health, on_health);
  d.health.data = &d;
  convd_engine *engine;
  char gpu_notice[256] = "";
  convd_device **remote = NULL;
  int n_remote = 0;
  if (mpi && (rc = convd_mpi_remote_devices(mpi, &cfg, &remote, &n_remote, err, sizeof err)) != 0) {
    fprintf(stderr, "convd: %s\n", err);
    convd_auth_destroy(d.auth);
    convd_tls_destroy(d.tls);
    return 1;
  }
  convd_engine_opts eo = {.cpu_devices = cfg.cpu_devices,
                          .cpu_threads = cfg.cpu_threads,
                          .reference = strcmp(cfg.cpu_kernel, "reference") == 0,
                          .device_memory = cfg.device_memory,
                          .gpus = cfg.gpus,
                          .gpu_memory = cfg.gpu_memory,
                          .gpu_instances = cfg.gpu_streams,
                          .notice = gpu_notice,
                          .notice_len = sizeof gpu_notice,
                          .device_failed = on_device_failed,
                          .max_pending_ops = cfg.max_queue_ops,
                          .extra = remote,
                          .n_extra = n_remote,
                          .user = &d};
  if (!eo.reference && !convd_device_cpu_is_native())
    convd_log(CONVD_LOG_WARN, "msg=\"this build has no oneDNN: CPU devices run the reference kernel\"");
  rc = convd_engine_create(&eo, &engine, err, sizeof err);
  free(remote); /* the devices are the engine's now (or destroyed) */
  if (rc != 0) {
    fprintf(stderr, "convd: %s\n", err);
    convd_auth_destroy(d.auth);
    convd_tls_destroy(d.tls);
    return 1;
  }
  if (gpu_notice[0]) convd_log(CONVD_LOG_INFO, "msg=\"no GPU in use\" why=\"%s\"", gpu_notice);
  for (size_t i = 0; i < convd_engine_device_count(engine); i++) {
    convd_device_info info;
    convd_engine_device_info(engine, i, &info);
    convd_log(CONVD_LOG_INFO, "msg=\"device ready\" device=%u name=%s memory_bytes=%llu detail=\"%s\"",
              info.index, info.name, (unsigned long long)info.memory_bytes, info.detail);
  }

  grpc_init();
  int ports[CONVD_LISTEN_MAX] = {0};
  d.engine = engine;
  d.metrics = convd_metrics_create();
  const convd_rpc_security sec = {d.tls, d.auth};
  if (d.metrics == NULL ||
      (rc = convd_rpc_start(&cfg, engine, d.metrics, &sec, &d.rpc, ports, d.socks, err, sizeof err)) != 0) {
    fprintf(stderr, "convd: %s\n", err);
    remove_sockets(&d);
    convd_engine_destroy(engine);
    convd_metrics_destroy(d.metrics);
    grpc_shutdown_blocking();
    convd_auth_destroy(d.auth);
    convd_tls_destroy(d.tls);
    return 1;
  }
  uv_signal_init(d.loop, &d.sigint);
  uv_signal_init(d.loop, &d.sigterm);
  uv_signal_init(d.loop, &d.sighup);
  uv_timer_init(d.loop, &d.drain_timer);
  uv_timer_init(d.loop, &d.linger_timer);
  uv_timer_init(d.loop, &d.idle_timer);
  uv_async_init(d.loop, &d.drained, on_drained);
  uv_async_init(d.loop, &d.stopped, on_stopped);
  d.sigint.data = d.sigterm.data = d.sighup.data = d.drain_timer.data = d.linger_timer.data = &d;
  d.idle_timer.data = &d;
  /* A tenth of the timeout, between 50 ms and 1 s: a call ends at most that late. */
  if (cfg.stream_idle_timeout > 0) {
    double every = cfg.stream_idle_timeout / 10;
    every = every < 0.05 ? 0.05 : every > 1 ? 1 : every;
    uv_timer_start(&d.idle_timer, on_idle_check, (uint64_t)(every * 1000), (uint64_t)(every * 1000));
  }
  d.drained.data = d.stopped.data = &d;
  uv_signal_start(&d.sigint, on_signal, SIGINT);
  uv_signal_start(&d.sigterm, on_signal, SIGTERM);
  uv_signal_start(&d.sighup, on_sighup, SIGHUP);

  /* Each listener as clients name it: HOST:PORT with the port bound, or the unix: address. */
  char names[CONVD_LISTEN_MAX][sizeof cfg.listen.addr[0] + 8];
  for (int i = 0; i < cfg.listen.n; i++) {
    const char *a = cfg.listen.addr[i], *colon = strrchr(a, ':');
    if (convd_listen_unix_path(a))
      snprintf(names[i], sizeof names[i], "%s", a);
    else
      snprintf(names[i], sizeof names[i], "%.*s:%d", (int)(colon - a), a, ports[i]);
  }
  if (cfg.max_connections > 0) {
    convd_connlimit_endpoint eps[CONVD_LISTEN_MAX];
    for (int i = 0; i < cfg.listen.n; i++)
      eps[i] = (convd_connlimit_endpoint){.port = d.socks[i].path ? 0 : ports[i], .path = d.socks[i].path};
    if ((rc = convd_connlimit_start(d.loop, (unsigned)cfg.max_connections, CONNLIMIT_SCAN_MS, eps,
                                    (size_t)cfg.listen.n, &d.connlimit, err, sizeof err))) {
      fprintf(stderr, "convd: %s\n", err);
      remove_sockets(&d);
      return 1;
    }
  }
  /* Descriptor sockets beside the unix: listeners, for regions used in place (fdsock.h). */
  const char *unix_paths[CONVD_LISTEN_MAX];
  size_t n_unix = 0;
  for (int i = 0; i < cfg.listen.n; i++)
    if (d.socks[i].path) unix_paths[n_unix++] = d.socks[i].path;
  if (n_unix && convd_rpc_shm(d.rpc) &&
      (rc = convd_fdsock_start(d.loop, convd_rpc_shm(d.rpc), unix_paths, n_unix, cfg.unix_socket_mode,
                               &d.fdsock, err, sizeof err))) {
    fprintf(stderr, "convd: %s\n", err);
    remove_sockets(&d);
    return 1;
  }
  int metrics_port = 0;
  if (cfg.metrics_listen[0] &&
      convd_http_start(d.loop, cfg.metrics_listen, render_metrics, &d, &d.http, &metrics_port, err, sizeof err)) {
    fprintf(stderr, "convd: %s\n", err);
    remove_sockets(&d);
    return 1;
  }
  /* Scripts and tests wait for these exact lines: the server accepts calls from now on. They
   * read the first (the first --listen); one more follows per listener, then the metrics one. */
  for (int i = 0; i < cfg.listen.n; i++) printf("convd listening on %s\n", names[i]);
  if (d.http) {
    const char *mc = strrchr(cfg.metrics_listen, ':');
    printf("convd metrics on http://%.*s:%d/metrics\n", (int)(mc - cfg.metrics_listen),
           cfg.metrics_listen, metrics_port);
  }
  if (mpi)
    printf("convd mpi: rank 0 pid %d, %d ranks, %d remote devices\n", (int)getpid(), mpi_size,
           n_remote);
  fflush(stdout);
  for (int i = 0; i < cfg.listen.n; i++)
    convd_log(CONVD_LOG_INFO,
              "msg=\"listening\" address=%s chunk_bytes=%llu max_message_bytes=%llu "
              "max_request_bytes=%llu%s",
              names[i], (unsigned long long)cfg.chunk_bytes,
              (unsigned long long)cfg.max_message_bytes, (unsigned long long)cfg.max_request_bytes,
              d.socks[i].path ? unix_mode_field(cfg.unix_socket_mode) : "");

  uv_run(d.loop, UV_RUN_DEFAULT);

  convd_rpc_destroy(d.rpc);
  convd_engine_destroy(engine);
  convd_metrics_destroy(d.metrics);
  uv_loop_close(d.loop);
  grpc_shutdown_blocking();
  /* gRPC held pointers to these (the processor, the certificate fetcher) until now. */
  convd_auth_destroy(d.auth);
  convd_tls_destroy(d.tls);
  remove_sockets(&d);
  return 0;
}
