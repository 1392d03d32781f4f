/* The gRPC server (rpc.h, rpc_impl.h): start-up, the completion-queue thread, posting a request
 * slot per method in the table, admission, draining and shutdown. Calls are call.c's; what each
 * method does is its service file's.
 *
 * Threads: one completion-queue thread (cq_main) runs every completion. convd_rpc_start,
 * drain, cancel_all, shutdown and destroy run on the daemon's libuv loop; health_changed and
 * gauges too. r->mu guards the call list and the drain/shutdown flags. */
#include "rpc_impl.h"

#include <grpc/grpc_security.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "auth.h"
#include "clock.h"
#include "err.h"
#include "log.h"
#include "services.h"
#include "tls.h"
#include "wire.h"

/* Requests kept posted per method, so bursts of new calls do not wait for a repost. */
#define REQUESTS_PER_METHOD 8

static size_t method_index(const convd_method *m) { return (size_t)(m - convd_methods); }

const convd_method *convd_rpc_method_of(const convd_handlers *h) {
  for (size_t i = 0; i < convd_methods_count; i++)
    if (convd_methods[i].h == h) return &convd_methods[i];
  return NULL;
}

/* Fires drained() once draining found no call in progress, and stopped() once gRPC shut down
 * and no call object is left. */
static void fire_when_due(convd_rpc *r) {
  pthread_mutex_lock(&r->mu);
  const int drained = r->drain.armed && r->n_active == 0 && !r->drain.fired;
  const int stopped = r->shutdown_notified && r->live_calls == 0 && !r->stop.fired;
  r->drain.fired |= drained;
  r->stop.fired |= stopped;
  pthread_mutex_unlock(&r->mu);
  if (drained && r->drain.fn) r->drain.fn(r->drain.user);
  if (stopped && r->stop.fn) r->stop.fn(r->stop.user);
}

void convd_rpc_call_freed(convd_rpc *r) {
  pthread_mutex_lock(&r->mu);
  r->live_calls--;
  pthread_mutex_unlock(&r->mu);
  fire_when_due(r);
}

int convd_rpc_post_request(convd_rpc *r, const convd_method *m) {
  convd_call *c = convd_call_new(r, m);
  if (c == NULL) return -1;
  grpc_call_error e;
  if (m->path == NULL)
    e = grpc_server_request_call(r->server, &c->gc, &c->details, &c->md, r->cq, r->cq,
                                 &c->t_request);
  else
    e = grpc_server_request_registered_call(r->server, r->registered[method_index(m)], &c->gc,
                                            &c->deadline, &c->md,
                                            m->client_streams ? NULL : &c->payload, r->cq, r->cq,
                                            &c->t_request);
  if (e != GRPC_CALL_OK) {
    convd_log(CONVD_LOG_ERROR, "msg=\"cannot post a call request\" method=%s error=%d", m->name,
              (int)e);
    convd_call_discard(c);
    return -1;
  }
  return 0;
}

void convd_rpc_each_call(convd_rpc *r, const convd_method *m, void (*fn)(convd_call *c, void *user),
                         void *user) {
  convd_call **w = NULL;
  size_t n = 0, cap = 0;
  /* Under r->mu no listed call can be freed (call_free unlinks it first). But a call whose last
   * ref is gone is still listed while its call_free waits for r->mu: taking a ref on it would
   * free it twice (once here after fn, once there), so it is left alone. */
  pthread_mutex_lock(&r->mu);
  for (convd_call *c = r->active; c; c = c->next) {
    if (m && c->method != m) continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 8;
      convd_call **nw = realloc(w, cap * sizeof *w);
      if (nw == NULL) break;
      w = nw;
    }
    pthread_mutex_lock(&c->mu);
    const int alive = c->refs > 0;
    if (alive) convd_call_ref_locked(c);
    pthread_mutex_unlock(&c->mu);
    if (alive) w[n++] = c;
  }
  pthread_mutex_unlock(&r->mu);
  for (size_t i = 0; i < n; i++) {
    pthread_mutex_lock(&w[i]->mu);
    fn(w[i], user);
    pthread_mutex_unlock(&w[i]->mu);
    convd_call_unref(w[i]);
  }
  free(w);
}

int convd_rpc_admit(convd_rpc *r, uint64_t bytes, char *err, size_t errlen) {
  const uint64_t limit = r->cfg->max_inflight_bytes;
  if (bytes > limit) /* alone over it (and no sum below can wrap) */
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "this call needs %" PRIu64 " bytes while in flight, more than the daemon's "
                      "limit of %" PRIu64 " (--max-inflight-bytes) for all calls together: split "
                      "it into smaller calls",
                      bytes, limit);
  const uint64_t before = atomic_fetch_add(&r->inflight_bytes, bytes);
  if (before + bytes > limit) {
    atomic_fetch_sub(&r->inflight_bytes, bytes);
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "the daemon holds %" PRIu64 " bytes for calls in flight; this call needs "
                      "%" PRIu64 " more, over its limit of %" PRIu64
                      " (--max-inflight-bytes): retry later or on another instance",
                      before, bytes, limit);
  }
  return 0;
}

void convd_rpc_release(convd_rpc *r, uint64_t bytes) {
  if (bytes) atomic_fetch_sub(&r->inflight_bytes, bytes);
}

/* The tenant's entry (made on first use; r->mu held), or NULL when out of memory. */
static struct tenant_use *tenant_use(convd_rpc *r, const char *name) {
  for (struct tenant_use *t = r->tenants; t; t = t->next)
    if (strcmp(t->name, name) == 0) return t;
  struct tenant_use *t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  snprintf(t->name, sizeof t->name, "%s", name);
  t->next = r->tenants;
  r->tenants = t;
  return t;
}

int convd_rpc_admit_call(convd_call *c, uint64_t bytes, char *err, size_t errlen) {
  convd_rpc *r = c->rpc;
  const char *name = convd_call_tenant(c);
  const convd_tenant_limits *lim = convd_call_tenant_limits(c);
  if (name && lim && lim->inflight_bytes) {
    pthread_mutex_lock(&r->mu);
    struct tenant_use *t = tenant_use(r, name);
    int rc = 0;
    if (t == NULL)
      rc = convd_errf(err, errlen, CONVD_ENOMEM, "the daemon is out of memory");
    else if (bytes > lim->inflight_bytes || t->bytes > lim->inflight_bytes - bytes)
      rc = convd_errf(err, errlen, CONVD_ELIMIT,
                      "tenant %s's calls hold %" PRIu64 " bytes; this call needs %" PRIu64
                      " more, over the tenant's limit of %" PRIu64
                      " (inflight-bytes in the tokens file): retry when they end",
                      name, t->bytes, bytes, lim->inflight_bytes);
    if (rc == 0) t->bytes += bytes;
    pthread_mutex_unlock(&r->mu);
    if (rc) return rc;
  }
  int rc = convd_rpc_admit(r, bytes, err, errlen);
  if (rc && name && lim && lim->inflight_bytes) {
    pthread_mutex_lock(&r->mu);
    tenant_use(r, name)->bytes -= bytes; /* found: it was made above */
    pthread_mutex_unlock(&r->mu);
  }
  return rc;
}

void convd_rpc_release_call(convd_call *c, uint64_t bytes) {
  convd_rpc *r = c->rpc;
  if (bytes == 0) return;
  convd_rpc_release(r, bytes);
  const char *name = convd_call_tenant(c);
  const convd_tenant_limits *lim = convd_call_tenant_limits(c);
  if (name && lim && lim->inflight_bytes) {
    pthread_mutex_lock(&r->mu);
    struct tenant_use *t = tenant_use(r, name);
    if (t) t->bytes -= bytes < t->bytes ? bytes : t->bytes;
    pthread_mutex_unlock(&r->mu);
  }
}

int convd_rpc_tenant_call_begin(convd_call *c, char *err, size_t errlen) {
  convd_rpc *r = c->rpc;
  const char *name = convd_call_tenant(c);
  if (name == NULL) return 0;
  const convd_tenant_limits *lim = convd_call_tenant_limits(c);
  pthread_mutex_lock(&r->mu);
  struct tenant_use *t = tenant_use(r, name);
  int rc = 0;
  if (t == NULL)
    rc = convd_errf(err, errlen, CONVD_ENOMEM, "the daemon is out of memory");
  else if (lim && lim->calls && t->calls >= lim->calls)
    rc = convd_errf(err, errlen, CONVD_ELIMIT,
                    "tenant %s has %" PRIu64 " calls in flight, its limit (calls in the tokens "
                    "file): retry when one ends",
                    name, t->calls);
  else
    t->calls++, c->tenant_counted = 1;
  pthread_mutex_unlock(&r->mu);
  return rc;
}

void convd_rpc_tenant_call_end(convd_call *c) {
  if (!c->tenant_counted) return;
  convd_rpc *r = c->rpc;
  pthread_mutex_lock(&r->mu);
  struct tenant_use *t = tenant_use(r, convd_call_tenant(c));
  if (t && t->calls) t->calls--;
  pthread_mutex_unlock(&r->mu);
  c->tenant_counted = 0;
}

/* ---- server ------------------------------------------------------------------------------ */

static void on_shutdown(void *obj, int ok) {
  convd_rpc *r = obj;
  (void)ok;
  pthread_mutex_lock(&r->mu);
  r->shutdown_notified = 1;
  pthread_mutex_unlock(&r->mu);
  fire_when_due(r);
}

static void *cq_main(void *arg) {
  convd_rpc *r = arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type != GRPC_OP_COMPLETE) continue;
    convd_tag *t = ev.tag;
    t->fn(t->obj, ev.success);
  }
  return NULL;
}

static void rpc_free(convd_rpc *r) {
  for (struct tenant_use *t = r->tenants, *next; t; t = next) {
    next = t->next;
    free(t);
  }
  convd_offload_destroy(r->offload);
  convd_offload_destroy(r->copier);
  convd_registry_destroy(r->registry);
  convd_shm_destroy(r->shm);
  pthread_mutex_destroy(&r->mu);
  free(r->registered);
  free(r);
}

/* Binds one --listen address (a unix: one claimed first, its mode set after). Returns 0 or an
 * error naming the address. */
static int add_port(convd_rpc *r, const char *addr, int *port, convd_unix_socket *sock, char *err,
                    size_t errlen) {
  const char *path = convd_listen_unix_path(addr);
  int rc;
  if (path && (rc = convd_unix_claim(path, err, errlen))) return rc;
  /* Credentials of its own for each listener: gRPC asks TLS's certificate fetcher per listener
   * (tls.h). Tokens are checked by the credentials' metadata processor, TLS or not (auth.h). */
  grpc_server_credentials *creds = r->tls ? convd_tls_server_credentials(r->tls)
                                          : grpc_insecure_server_credentials_create();
  if (creds == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  if (r->auth) convd_auth_attach(r->auth, creds);
  const mode_t old = path ? convd_unix_umask_for(r->cfg->unix_socket_mode) : 0;
  *port = grpc_server_add_http2_port(r->server, addr, creds);
  if (path) umask(old);
  grpc_server_credentials_release(creds);
  if (*port == 0 && path)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "cannot listen on %s: gRPC could not bind the socket (may the daemon's user "
                      "write to its directory? gRPC's own log line above says why)%s",
                      addr, r->tls ? ", or could not load --tls-cert with --tls-key" : "");
  if (*port == 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "cannot listen on %s: the address is malformed or in use (use HOST:PORT, "
                      "e.g. 127.0.0.1:50051; port 0 picks a free one)%s",
                      addr,
                      r->tls ? ", or gRPC could not load --tls-cert with --tls-key (not a "
                               "certificate and its key? gRPC's own log line above says why)"
                             : "");
  return path ? convd_unix_adopt(sock, path, r->cfg->unix_socket_mode, err, errlen) : 0;
}

/* Every --listen address, in order, on the server not yet started. On failure (the error of
 * the address that failed) the server is shut down, ready to be destroyed: gRPC asserts that a
 * server with listeners is, started or not. */
static int add_ports(convd_rpc *r, int ports[CONVD_LISTEN_MAX],
                     convd_unix_socket socks[CONVD_LISTEN_MAX], char *err, size_t errlen) {
  int rc = 0, added = 0;
  for (int i = 0; rc == 0 && i < r->cfg->listen.n; i++)
    if ((rc = add_port(r, r->cfg->listen.addr[i], &ports[i], &socks[i], err, errlen)) == 0 ||
        ports[i] != 0)
      added++;
  if (rc && added) {
    /* No call was requested yet: the shutdown's tag is all the queue can hold. */
    grpc_server_shutdown_and_notify(r->server, r->cq, &r->t_shutdown);
    for (;;) {
      grpc_event ev = grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
      if (ev.type != GRPC_OP_COMPLETE || ev.tag == &r->t_shutdown) break;
    }
  }
  return rc;
}

int convd_rpc_start(const convd_config *cfg, convd_engine *engine, convd_metrics *metrics,
                    const convd_rpc_security *sec, convd_rpc **out, int ports[CONVD_LISTEN_MAX],
                    convd_unix_socket socks[CONVD_LISTEN_MAX], char *err, size_t errlen) {
  *out = NULL;
  for (int i = 0; i < CONVD_LISTEN_MAX; i++) ports[i] = 0, socks[i].path = NULL;
  convd_rpc *r = calloc(1, sizeof *r);
  if (r == NULL || (r->registered = calloc(convd_methods_count, sizeof *r->registered)) == NULL) {
    free(r);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  }
  r->cfg = cfg;
  r->engine = engine;
  r->metrics = metrics;
  r->tls = sec ? sec->tls : NULL;
  r->auth = sec ? sec->auth : NULL;
  atomic_init(&r->serving, convd_engine_healthy_devices(engine) > 0);
  atomic_init(&r->health_draining, 0);
  atomic_init(&r->inflight_bytes, 0);
  pthread_mutex_init(&r->mu, NULL);
  if ((r->offload = convd_offload_create()) == NULL || (r->copier = convd_offload_create()) == NULL) {
    rpc_free(r);
    return convd_errf(err, errlen, CONVD_ENOMEM, "cannot start the offload thread");
  }
  if (cfg->weights_memory && (r->registry = convd_registry_create(cfg->weights_memory)) == NULL) {
    rpc_free(r);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  }
  int rc;
  if (cfg->max_shm_bytes && (rc = convd_shm_create(cfg->max_shm_bytes, &r->shm, err, errlen))) {
    rpc_free(r);
    return rc;
  }
  r->t_shutdown = (convd_tag){on_shutdown, r};

  grpc_arg args[CONVD_WIRE_CHANNEL_ARGS + 5];
  size_t nargs = convd_wire_channel_args(args, cfg->max_message_bytes);
  /* Connections that never start a call (or stop making them) hold a descriptor each: closed
   * after the handshake or idle timeout, so they cannot pile up until new clients are refused. */
  args[nargs].type = GRPC_ARG_INTEGER;
  args[nargs].key = GRPC_ARG_MAX_CONNECTION_IDLE_MS;
  args[nargs++].value.integer = (int)(cfg->connection_idle_timeout * 1000);
  args[nargs].type = GRPC_ARG_INTEGER;
  args[nargs].key = GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS;
  args[nargs++].value.integer = (int)(cfg->handshake_timeout * 1000);
  /* --max-connection-age: a GOAWAY after the age, so that a client balancing over several
   * daemons reconnects and re-resolves; its calls in progress get the grace (INT_MAX: gRPC's
   * "unlimited"). Left out when 0, gRPC's default being never. */
  if (cfg->max_connection_age > 0) {
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = GRPC_ARG_MAX_CONNECTION_AGE_MS;
    args[nargs++].value.integer = (int)(cfg->max_connection_age * 1000);
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS;
    args[nargs++].value.integer =
        cfg->max_connection_age_grace > 0 ? (int)(cfg->max_connection_age_grace * 1000) : INT_MAX;
  }
  /* gRPC turns SO_REUSEPORT on by default: a second daemon on the same port would then share
   * its connections silently. Off, the second one fails to start and says why. */
  args[nargs].type = GRPC_ARG_INTEGER;
  args[nargs].key = GRPC_ARG_ALLOW_REUSEPORT;
  args[nargs++].value.integer = 0;
  grpc_channel_args ch = {nargs, args};
  r->server = grpc_server_create(&ch, NULL);
  r->cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(r->server, r->cq, NULL);
  for (size_t k = 0; k < convd_methods_count; k++)
    if (convd_methods[k].path)
      r->registered[k] = grpc_server_register_method(
          r->server, convd_methods[k].path, NULL,
          convd_methods[k].client_streams ? GRPC_SRM_PAYLOAD_NONE
                                          : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
          0);

  const int bind_err = add_ports(r, ports, socks, err, errlen);
  if (bind_err) {
    grpc_server_destroy(r->server);
    grpc_completion_queue_shutdown(r->cq);
    grpc_completion_queue_destroy(r->cq);
    rpc_free(r);
    return bind_err;
  }
  grpc_server_start(r->server);
  for (size_t k = 0; k < convd_methods_count; k++)
    for (int i = 0; i < REQUESTS_PER_METHOD; i++) convd_rpc_post_request(r, &convd_methods[k]);
  if (pthread_create(&r->thread, NULL, cq_main, r) != 0) {
    /* Without its thread the server cannot run; shut it down synchronously. */
    grpc_server_shutdown_and_notify(r->server, r->cq, &r->t_shutdown);
    grpc_server_cancel_all_calls(r->server);
    r->stop.armed = 1;
    grpc_completion_queue_shutdown(r->cq);
    cq_main(r);
    grpc_server_destroy(r->server);
    grpc_completion_queue_destroy(r->cq);
    rpc_free(r);
    return convd_errf(err, errlen, CONVD_ENOMEM, "cannot start the server thread");
  }
  r->thread_started = 1;
  *out = r;
  return 0;
}

void convd_rpc_gauges(convd_rpc *r, convd_metrics_gauges *g) {
  pthread_mutex_lock(&r->mu);
  g->calls_in_flight = (uint64_t)r->n_active;
  pthread_mutex_unlock(&r->mu);
  g->inflight_bytes = atomic_load(&r->inflight_bytes);
  g->inflight_limit = r->cfg->max_inflight_bytes;
  g->serving = atomic_load(&r->serving) && !atomic_load(&r->health_draining);
  g->auth = r->auth != NULL;
  g->auth_refused = convd_auth_refused_total(r->auth);
  g->shm = r->shm != NULL;
  if (r->shm) convd_shm_totals(r->shm, &g->shm_regions, &g->shm_bytes, &g->shm_in_place, &g->shm_pending_fds);
}

convd_shm *convd_rpc_shm(convd_rpc *r) { return r->shm; }

convd_registry *convd_rpc_registry(convd_rpc *r) { return r->registry; }

void convd_rpc_health_changed(convd_rpc *r) {
  atomic_store(&r->serving, convd_engine_healthy_devices(r->engine) > 0);
  convd_health_notify(r);
}

static void arm(convd_rpc *r, struct convd_rpc_event *e, void (*fn)(void *user), void *user) {
  pthread_mutex_lock(&r->mu);
  *e = (struct convd_rpc_event){.armed = 1, .fn = fn, .user = user};
  pthread_mutex_unlock(&r->mu);
}

void convd_rpc_drain(convd_rpc *r, void (*drained)(void *user), void *user) {
  arm(r, &r->drain, drained, user);
  atomic_store(&r->health_draining, 1);
  convd_health_notify(r); /* watchers get NOT_SERVING, and their streams end */
  fire_when_due(r);
}

static int post_call(convd_offload *o, convd_call *c, void (*fn)(void *call)) {
  convd_call_ref_locked(c);
  if (convd_offload_post(o, fn, c) == 0) return 0;
  c->refs--; /* the running handler still holds its own ref */
  convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
  return -1;
}

int convd_rpc_offload_call(convd_call *c, void (*fn)(void *call)) { return post_call(c->rpc->offload, c, fn); }

int convd_rpc_copier_call(convd_call *c, void (*fn)(void *call)) { return post_call(c->rpc->copier, c, fn); }

static void expire_idle(convd_call *c, void *user) {
  const double *a = user;
  convd_call_expire_idle(c, a[0], a[1]);
}

void convd_rpc_expire_idle(convd_rpc *r) {
  const double a[2] = {convd_now_seconds(), r->cfg->stream_idle_timeout};
  if (a[1] > 0) convd_rpc_each_call(r, NULL, expire_idle, (void *)a);
}

void convd_rpc_cancel_all(convd_rpc *r) {
  /* Under r->mu no listed call can be freed: call_free unlinks before it unrefs. */
  pthread_mutex_lock(&r->mu);
  for (convd_call *c = r->active; c; c = c->next) {
    atomic_store(&c->daemon_cancelled, 1);
    grpc_call_cancel_with_status(c->gc, GRPC_STATUS_UNAVAILABLE,
                                 "convd is shutting down: the call was cancelled after the drain "
                                 "timeout",
                                 NULL);
  }
  pthread_mutex_unlock(&r->mu);
}

void convd_rpc_shutdown(convd_rpc *r, void (*stopped)(void *user), void *user) {
  arm(r, &r->stop, stopped, user);
  grpc_server_shutdown_and_notify(r->server, r->cq, &r->t_shutdown);
}

void convd_rpc_destroy(convd_rpc *r) {
  if (r == NULL) return;
  grpc_completion_queue_shutdown(r->cq);
  if (r->thread_started) pthread_join(r->thread, NULL);
  convd_offload_destroy(r->offload); /* runs what is left: those calls' answers fail, they end */
  r->offload = NULL;
  convd_offload_destroy(r->copier);
  r->copier = NULL;
  grpc_server_destroy(r->server);
  grpc_completion_queue_destroy(r->cq);
  rpc_free(r);
}
