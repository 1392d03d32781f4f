/* The method table (methods.h) and the answer for methods convd does not serve. Threads: the
 * table is constant; the unknown-method handler runs on the completion-queue thread. */
#include "methods.h"

#include <stdio.h>
#include <string.h>

#include "err.h"
#include "services.h"

/* Paths as the .proto files define them: proto/convd/v1/convd.proto, proto/grpc/health/v1/
 * health.proto, proto/grpc/reflection/v1/reflection.proto (v1alpha is the same message set
 * under its older package name). */
const convd_method convd_methods[] = {
    /* path                                         name          streams draining handlers  open */
    {"/convd.v1.Convolution/Conv2d",                "Conv2d",        1, 0, &convd_conv2d_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/Conv2dUnary",           "Conv2dUnary",   0, 0, &convd_conv2d_unary_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/ListDevices",           "ListDevices",   0, 0, &convd_list_devices_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/PutWeights",            "PutWeights",    1, 0, &convd_put_weights_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/ListWeights",           "ListWeights",   0, 0, &convd_list_weights_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/DeleteWeights",         "DeleteWeights", 0, 0, &convd_delete_weights_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/RegisterRegion",        "RegisterRegion", 0, 0, &convd_register_region_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/ListRegions",           "ListRegions",   0, 0, &convd_list_regions_handlers, CONVD_TOKEN},
    {"/convd.v1.Convolution/UnregisterRegion",      "UnregisterRegion", 0, 0, &convd_unregister_region_handlers, CONVD_TOKEN},
    {"/grpc.health.v1.Health/Check",                "HealthCheck",   0, 1, &convd_health_check_handlers, CONVD_OPEN},
    {"/grpc.health.v1.Health/Watch",                "HealthWatch",   0, 1, &convd_health_watch_handlers, CONVD_OPEN},
    {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "Reflection", 1, 0,
     &convd_reflection_handlers, CONVD_OPEN_IF_PUBLIC},
    {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "ReflectionV1alpha", 1, 0,
     &convd_reflection_handlers, CONVD_OPEN_IF_PUBLIC},
    {NULL,                                          "unknown",       0, 0, &convd_unknown_handlers, CONVD_TOKEN},
};
const size_t convd_methods_count = sizeof convd_methods / sizeof convd_methods[0];

int convd_method_open(const convd_method *m, int reflection_public) {
  return m->open == CONVD_OPEN || (m->open == CONVD_OPEN_IF_PUBLIC && reflection_public);
}

/* "service a has M1, M2; service b has ..." from the table, so the message never goes stale. */
static void describe_served(char *out, size_t len) {
  size_t used = 0;
  out[0] = '\0';
  for (size_t i = 0; convd_methods[i].path && used < len; i++) {
    const char *svc = convd_methods[i].path + 1, *slash = strchr(svc, '/');
    const int svc_len = (int)(slash - svc);
    const int same = i > 0 && strncmp(convd_methods[i - 1].path + 1, svc, (size_t)svc_len + 1) == 0;
    used += (size_t)snprintf(out + used, len - used, "%s%.*s%s%s", same ? ", " : i ? "; " : "",
                             same ? 0 : svc_len, svc, same ? "" : " has ", slash + 1);
  }
}

static void unknown_start(convd_call *c) {
  char served[480], msg[768];
  describe_served(served, sizeof served);
  const size_t n = GRPC_SLICE_LENGTH(c->details.method);
  snprintf(msg, sizeof msg, "method %.*s is not served by convd; %s", (int)(n > 200 ? 200 : n),
           (const char *)GRPC_SLICE_START_PTR(c->details.method), served);
  convd_call_fail(c, CONVD_ENOTSUP, msg);
}

const convd_handlers convd_unknown_handlers = {.start = unknown_start};
