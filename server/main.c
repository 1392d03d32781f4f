/* convd: the daemon. Parses the configuration, starts the engine and the gRPC server, then runs a
 * libuv loop whose only jobs are signals and the shutdown sequence:
 *   SIGTERM/SIGINT -> stop accepting calls -> calls in flight finish, or are cancelled after
 *   --drain-timeout -> exit 0. A second signal cancels at once. */
#include <grpc/grpc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "config.h"
#include "engine.h"
#include "err.h"
#include "log.h"
#include "rpc.h"

typedef struct daemon_state {
  uv_loop_t *loop;
  uv_signal_t sigint, sigterm;
  uv_timer_t drain_timer;
  uv_async_t stopped;
  convd_rpc *rpc;
  const convd_config *cfg;
  int shutting_down;
} daemon_state;

/* Server thread: every call has ended. */
static void on_rpc_stopped(void *user) {
  daemon_state *d = user;
  uv_async_send(&d->stopped);
}

static void on_stopped(uv_async_t *h) {
  daemon_state *d = h->data;
  convd_log(CONVD_LOG_INFO, "msg=\"all calls ended, exiting\"");
  uv_close((uv_handle_t *)&d->sigint, NULL);
  uv_close((uv_handle_t *)&d->sigterm, NULL);
  uv_close((uv_handle_t *)&d->drain_timer, NULL);
  uv_close((uv_handle_t *)&d->stopped, NULL);
}

static void on_drain_timeout(uv_timer_t *t) {
  daemon_state *d = t->data;
  convd_log(CONVD_LOG_WARN, "msg=\"drain timeout reached, cancelling calls in flight\"");
  convd_rpc_cancel_all(d->rpc);
}

static void on_signal(uv_signal_t *h, int signum) {
  daemon_state *d = h->data;
  if (d->shutting_down) {
    convd_log(CONVD_LOG_WARN, "msg=\"second signal, cancelling calls in flight\" signal=%d", signum);
    convd_rpc_cancel_all(d->rpc);
    return;
  }
  d->shutting_down = 1;
  convd_log(CONVD_LOG_INFO, "msg=\"shutting down: no new calls\" signal=%s drain_timeout_s=%g",
            signum == SIGTERM ? "SIGTERM" : "SIGINT", d->cfg->drain_timeout);
  convd_rpc_shutdown(d->rpc, on_rpc_stopped, d);
  uv_timer_start(&d->drain_timer, on_drain_timeout, (uint64_t)(d->cfg->drain_timeout * 1000.0), 0);
}

int main(int argc, char **argv) {
  convd_config cfg;
  char err[512];
  int rc = convd_config_parse(&cfg, argc, argv, stdout, err, sizeof err);
  if (rc == CONVD_CONFIG_EXIT) return 0;
  if (rc != 0) {
    fprintf(stderr, "convd: %s\n", err);
    return 2;
  }
  convd_log_level = cfg.log_level;
  const char *colon = strrchr(cfg.listen, ':');
  if (colon == NULL || colon == cfg.listen || colon[1] == '\0') {
    fprintf(stderr, "convd: --listen %s: expected HOST:PORT, e.g. 127.0.0.1:50051\n", cfg.listen);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);

  convd_engine *engine;
  convd_engine_opts eo = {.workers = cfg.workers};
  if ((rc = convd_engine_create(&eo, &engine, err, sizeof err)) != 0) {
    fprintf(stderr, "convd: %s\n", err);
    return 1;
  }
  for (size_t i = 0; i < convd_engine_device_count(engine); i++) {
    convd_device_info info;
    convd_engine_device_info(engine, i, &info);
    convd_log(CONVD_LOG_INFO, "msg=\"device ready\" device=%u name=%s memory_bytes=%llu detail=\"%s\"",
              info.index, info.name, (unsigned long long)info.memory_bytes, info.detail);
  }

  grpc_init();
  daemon_state d = {.loop = uv_default_loop(), .cfg = &cfg};
  int port = 0;
  if ((rc = convd_rpc_start(&cfg, engine, &d.rpc, &port, err, sizeof err)) != 0) {
    fprintf(stderr, "convd: %s\n", err);
    convd_engine_destroy(engine);
    grpc_shutdown_blocking();
    return 1;
  }
  uv_signal_init(d.loop, &d.sigint);
  uv_signal_init(d.loop, &d.sigterm);
  uv_timer_init(d.loop, &d.drain_timer);
  uv_async_init(d.loop, &d.stopped, on_stopped);
  d.sigint.data = d.sigterm.data = d.drain_timer.data = d.stopped.data = &d;
  uv_signal_start(&d.sigint, on_signal, SIGINT);
  uv_signal_start(&d.sigterm, on_signal, SIGTERM);

  /* Scripts and tests wait for this exact line: the server accepts calls from now on. */
  printf("convd listening on %.*s:%d\n", (int)(colon - cfg.listen), cfg.listen, port);
  fflush(stdout);
  convd_log(CONVD_LOG_INFO,
            "msg=\"listening\" address=%.*s:%d chunk_bytes=%llu max_message_bytes=%llu "
            "max_request_bytes=%llu",
            (int)(colon - cfg.listen), cfg.listen, port, (unsigned long long)cfg.chunk_bytes,
            (unsigned long long)cfg.max_message_bytes, (unsigned long long)cfg.max_request_bytes);

  uv_run(d.loop, UV_RUN_DEFAULT);

  convd_rpc_destroy(d.rpc);
  convd_engine_destroy(engine);
  uv_loop_close(d.loop);
  grpc_shutdown_blocking();
  return 0;
}
