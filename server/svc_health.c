/* grpc.health.v1.Health: Check and Watch, for grpc-health-probe and Kubernetes gRPC probes.
 * The server ("") and convd.v1.Convolution are known; both are SERVING while a device is
 * healthy and the daemon is not draining. A Watch stream sends each change and ends once
 * NOT_SERVING went out during a drain, so that the drain completes.
 *
 * Threads: the handlers run on the completion-queue thread with the call's mutex held;
 * convd_health_notify runs on the daemon's libuv loop (drain, device health changed). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "grpc/health/v1/health.pb-c.h"
#include "rpc_impl.h"
#include "services.h"
#include "wire.h"

#define SERVING GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
#define NOT_SERVING GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
#define SERVICE_UNKNOWN GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN

/* A Watch stream: the service watched is unknown, and the status last sent (-1 none). */
typedef struct watch {
  int unknown, sent;
} watch;

/* "" (the server) and our service are known. */
static int known(const char *service) {
  return service == NULL || service[0] == '\0' || strcmp(service, "convd.v1.Convolution") == 0;
}

static int status_now(convd_rpc *r) {
  return atomic_load(&r->serving) && !atomic_load(&r->health_draining) ? SERVING : NOT_SERVING;
}

/* The request of either method, or NULL after failing the call. */
static Grpc__Health__V1__HealthCheckRequest *decode(convd_call *c) {
  Grpc__Health__V1__HealthCheckRequest *m =
      c->payload ? (Grpc__Health__V1__HealthCheckRequest *)convd_wire_unpack(
                       c->payload, &grpc__health__v1__health_check_request__descriptor)
                 : NULL;
  if (m == NULL)
    convd_call_fail(c, CONVD_EINVAL, "the request is not a valid grpc.health.v1.HealthCheckRequest");
  return m;
}

static void check_start(convd_call *c) {
  Grpc__Health__V1__HealthCheckRequest *m = decode(c);
  if (m == NULL) return;
  int ok = known(m->service);
  char msg[256];
  snprintf(msg, sizeof msg, "unknown service \"%.100s\": convd serves \"\" and \"convd.v1.Convolution\"",
           m->service);
  protobuf_c_message_free_unpacked(&m->base, NULL);
  if (!ok) {
    convd_call_fail(c, CONVD_ENOTFOUND, msg);
    return;
  }
  Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  resp.status = status_now(c->rpc);
  convd_call_reply(c, &resp.base);
}

/* Sends the watched status when it changed; ends the stream once NOT_SERVING went out during a
 * drain. */
static void watch_pump(convd_call *c);

static void watch_pump_each(convd_call *c, void *user) {
  (void)user;
  watch_pump(c);
}

static void watch_pump(convd_call *c) {
  watch *w = c->state;
  if (w == NULL || c->sending || convd_call_over(c)) return;
  const int st = w->unknown ? SERVICE_UNKNOWN : status_now(c->rpc);
  if (st != w->sent) {
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = st;
    w->sent = st;
    convd_call_send(c, &resp.base);
    return;
  }
  if (atomic_load(&c->rpc->health_draining)) convd_call_finish_ok(c);
}

static void watch_start(convd_call *c) {
  Grpc__Health__V1__HealthCheckRequest *m = decode(c);
  if (m == NULL) return;
  watch *w = malloc(sizeof *w);
  if (w) *w = (watch){.unknown = !known(m->service), .sent = -1};
  protobuf_c_message_free_unpacked(&m->base, NULL);
  if (w == NULL) {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  c->state = w;
  if (convd_call_send_initial_metadata(c) == 0) watch_pump(c);
}

static void watch_free(convd_call *c) { free(c->state); }

void convd_health_notify(convd_rpc *r) {
  convd_rpc_each_call(r, convd_rpc_method_of(&convd_health_watch_handlers), watch_pump_each, NULL);
}

const convd_handlers convd_health_check_handlers = {.start = check_start};
const convd_handlers convd_health_watch_handlers = {
    .start = watch_start, .sent = watch_pump, .free_state = watch_free};
