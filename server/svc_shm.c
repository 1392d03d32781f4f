/* The shared-memory region methods: RegisterRegion, ListRegions, UnregisterRegion (shm.h holds
 * the regions and the rules; Conv2d uses them, svc_conv.c).
 *
 * Threads: the completion-queue thread, with the call's mutex held; registering on the offload
 * thread, which takes the mutex to answer. */
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "convd/v1/convd.pb-c.h"
#include "err.h"
#include "rpc_impl.h"
#include "services.h"
#include "shm.h"
#include "wire.h"

static uint64_t tenant_shm_limit(const convd_call *c) {
  const convd_tenant_limits *l = convd_call_tenant_limits(c);
  return l ? l->shm_bytes : 0;
}

/* The request, decoded, or NULL after failing the call. */
static void *request_of(convd_call *c, const ProtobufCMessageDescriptor *d) {
  if (c->rpc->shm == NULL) {
    convd_call_fail(c, CONVD_ENOTSUP, "this daemon serves no shared memory (started with --max-shm-bytes 0)");
    return NULL;
  }
  void *m = c->payload ? convd_wire_unpack(c->payload, d) : NULL;
  if (m == NULL) {
    char err[160];
    snprintf(err, sizeof err, "the request is not a valid %s (protobuf decoding failed)", d->name);
    convd_call_fail(c, CONVD_EINVAL, err);
  }
  return m;
}

/* RegisterRegion's request, kept for the offload thread. */
typedef struct reg_req {
  char *name;
  char *ticket; /* NULL: a named object */
  uint64_t size;
} reg_req;

/* The offload thread: opening, checking and mapping the object are a few system calls, but
 * file-system ones, kept off the completion-queue thread. */
static void register_task(void *arg) {
  convd_call *c = arg;
  reg_req *q = c->state;
  char err[512];
  uint64_t mapped = 0;
  int in_place = 0;
  int rc = convd_shm_register(c->rpc->shm, convd_call_tenant(c), tenant_shm_limit(c), q->name, q->ticket,
                              q->size, &mapped, &in_place, err, sizeof err);
  pthread_mutex_lock(&c->mu);
  if (rc) {
    convd_call_fail(c, rc, err);
  } else if (c->status_set || c->dead) {
    /* The client went away meanwhile: nobody will unregister what it never heard of. */
    convd_shm_unregister(c->rpc->shm, convd_call_tenant(c), q->name, err, sizeof err);
  } else {
    Convd__V1__RegisterRegionResponse resp = CONVD__V1__REGISTER_REGION_RESPONSE__INIT;
    resp.size = mapped;
    resp.in_place = in_place;
    convd_call_reply(c, &resp.base);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

static void register_free(convd_call *c) {
  reg_req *q = c->state;
  if (q) free(q->name), free(q->ticket);
  free(q);
}

static void register_start(convd_call *c) {
  Convd__V1__RegisterRegionRequest *m = request_of(c, &convd__v1__register_region_request__descriptor);
  if (m == NULL) return;
  char err[512];
  const char *name = m->name ? m->name : "";
  int rc = convd_shm_check_name(name, err, sizeof err);
  reg_req *q = rc ? NULL : calloc(1, sizeof *q);
  const char *ticket = m->fd_ticket && m->fd_ticket[0] ? m->fd_ticket : NULL;
  if (rc == 0 && (q == NULL || (q->name = strdup(name)) == NULL || (ticket && (q->ticket = strdup(ticket)) == NULL)))
    rc = convd_errf(err, sizeof err, CONVD_ENOMEM, "the daemon is out of memory");
  if (q) q->size = m->size;
  protobuf_c_message_free_unpacked(&m->base, NULL);
  c->state = q;
  if (rc) {
    convd_call_fail(c, rc, err);
    return;
  }
  convd_rpc_offload_call(c, register_task);
}

static void list_start(convd_call *c) {
  Convd__V1__ListRegionsRequest *m = request_of(c, &convd__v1__list_regions_request__descriptor);
  if (m == NULL) return;
  protobuf_c_message_free_unpacked(&m->base, NULL);
  convd_shm_info *v = NULL;
  uint64_t used = 0;
  const long n = convd_shm_list(c->rpc->shm, convd_call_tenant(c), &v, &used);
  Convd__V1__RegionInfo *infos = n >= 0 ? calloc(n ? (size_t)n : 1, sizeof *infos) : NULL;
  Convd__V1__RegionInfo **ptrs = n >= 0 ? calloc(n ? (size_t)n : 1, sizeof *ptrs) : NULL;
  if (infos && ptrs) {
    for (long i = 0; i < n; i++) {
      convd__v1__region_info__init(&infos[i]);
      infos[i].name = v[i].name;
      infos[i].size = v[i].size;
      infos[i].in_use = v[i].in_use;
      infos[i].in_place = v[i].in_place;
      ptrs[i] = &infos[i];
    }
    char prefix[96];
    convd_shm_prefix(convd_call_tenant(c), prefix, sizeof prefix);
    Convd__V1__ListRegionsResponse resp = CONVD__V1__LIST_REGIONS_RESPONSE__INIT;
    resp.n_regions = (size_t)n;
    resp.regions = ptrs;
    resp.bytes_used = used;
    const uint64_t tl = tenant_shm_limit(c), limit = c->rpc->cfg->max_shm_bytes;
    resp.bytes_limit = tl && tl < limit ? tl : limit;
    resp.name_prefix = prefix;
    convd_call_reply(c, &resp.base);
  } else {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
  }
  free(infos), free(ptrs), free(v);
}

static void unregister_start(convd_call *c) {
  Convd__V1__UnregisterRegionRequest *m = request_of(c, &convd__v1__unregister_region_request__descriptor);
  if (m == NULL) return;
  char err[512];
  int rc = convd_shm_unregister(c->rpc->shm, convd_call_tenant(c), m->name ? m->name : "", err, sizeof err);
  protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) {
    convd_call_fail(c, rc, err);
    return;
  }
  Convd__V1__UnregisterRegionResponse resp = CONVD__V1__UNREGISTER_REGION_RESPONSE__INIT;
  convd_call_reply(c, &resp.base);
}

const convd_handlers convd_register_region_handlers = {.start = register_start, .free_state = register_free};
const convd_handlers convd_list_regions_handlers = {.start = list_start};
const convd_handlers convd_unregister_region_handlers = {.start = unregister_start};
