/* The weights registry's methods: PutWeights (streamed like Conv2d's weights: a spec, then
 * weight and bias chunks in order; its rules are weights_upload.c's), ListWeights,
 * DeleteWeights. The registry itself (registry.c) knows no gRPC.
 *
 * Threads: the completion-queue thread, with the call's mutex held; a finished upload is
 * widened and registered on the offload thread (offload.h), which then takes the call's mutex
 * to answer. The registry is thread-safe. */
#include <inttypes.h>
#include <stdlib.h>

#include "conv_stream.h"
#include "err.h"
#include "rpc_impl.h"
#include "services.h"
#include "weights_upload.h"
#include "wire.h"

/* The limit on the bytes of weights the call's tenant may register (0: none of its own). */
static uint64_t tenant_weights_limit(const convd_call *c) {
  const convd_tenant_limits *l = convd_call_tenant_limits(c);
  return l ? l->weights_bytes : 0;
}

/* The upload's admission (weights_upload.c asks once its spec is checked, before it allocates):
 * what it will hold must fit beside the other calls' (--max-inflight-bytes, and the tenant's). */
static int put_admit(void *user, uint64_t bytes, char *err, size_t errlen) {
  return convd_rpc_admit_call(user, bytes, err, errlen);
}

/* The offload thread, without the call's mutex: the upload is whole and no message will touch
 * it any more (the call's ref keeps it). Widening and hashing grow with the weights, so they
 * run here rather than on the completion-queue thread. */
static void put_register(void *arg) {
  convd_call *c = arg;
  convd_upload *u = c->state;
  char err[512];
  char id[CONVD_WEIGHTS_ID_LEN + 1];
  uint64_t bytes = 0;
  int already = 0;
  int rc = convd_upload_register(u, c->rpc->registry, convd_call_tenant(c), tenant_weights_limit(c),
                                 id, &bytes, &already, err, sizeof err);
  pthread_mutex_lock(&c->mu);
  if (rc) {
    convd_call_fail(c, rc, err);
  } else if (!c->status_set) {
    Convd__V1__PutWeightsResponse resp = CONVD__V1__PUT_WEIGHTS_RESPONSE__INIT;
    resp.weights_id = id;
    resp.bytes = bytes;
    resp.already_present = already != 0;
    convd_call_reply(c, &resp.base);
  }
  pthread_mutex_unlock(&c->mu);
  convd_call_unref(c);
}

/* The stream ended: once the upload is complete (weights_upload.c), the weights go into the
 * registry (widened to float32) on the offload thread. */
static void put_finish(convd_call *c, convd_upload *u) {
  char err[512];
  int rc = convd_upload_complete(u, err, sizeof err);
  if (rc) {
    convd_call_fail(c, rc, err);
    return;
  }
  convd_rpc_offload_call(c, put_register);
}

static void put_recv(convd_call *c, grpc_byte_buffer *bb) {
  convd_upload *u = c->state;
  char err[512];
  if (bb == NULL) {
    put_finish(c, u);
    return;
  }
  Convd__V1__PutWeightsRequest *m =
      (Convd__V1__PutWeightsRequest *)convd_wire_unpack(bb, &convd__v1__put_weights_request__descriptor);
  int rc;
  if (m == NULL)
    rc = convd_errf(err, sizeof err, CONVD_EINVAL,
                    "message %" PRIu64 " is not a valid convd.v1.PutWeightsRequest", c->messages_in);
  else
    rc = convd_upload_feed(u, m, err, sizeof err);
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) convd_call_fail(c, rc, err);
  else convd_call_recv(c);
}

static void put_start(convd_call *c) {
  if (c->rpc->registry == NULL) {
    convd_call_fail(c, CONVD_ENOTSUP, "this daemon runs without a weights registry (--weights-memory 0)");
    return;
  }
  if ((c->state = convd_upload_create(c->rpc->cfg->weights_memory, put_admit, c)) == NULL) {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  if (convd_call_send_initial_metadata(c) == 0) convd_call_recv(c);
}

static void put_report(const convd_call *c, convd_call_report *r) {
  const convd_upload *u = c->state;
  if (u) r->bytes_in = convd_upload_bytes_received(u);
}

static void put_free(convd_call *c) {
  convd_upload *u = c->state;
  if (u == NULL) return;
  convd_rpc_release_call(c, convd_upload_admitted(u));
  convd_upload_destroy(u);
}

static void list_start(convd_call *c) {
  convd_weights_info *v = NULL;
  size_t n = 0;
  convd_registry_stats st = {0};
  uint64_t own = 0;
  if (c->rpc->registry) {
    if (convd_registry_list(c->rpc->registry, convd_call_tenant(c), &v, &n, &own)) {
      convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
      return;
    }
    convd_registry_stats_get(c->rpc->registry, &st);
  }
  Convd__V1__WeightsInfo *infos = calloc(n ? n : 1, sizeof *infos);
  Convd__V1__WeightsInfo **ptrs = calloc(n ? n : 1, sizeof *ptrs);
  Convd__V1__Shape4 *shapes = calloc(n ? n : 1, sizeof *shapes);
  if (infos && ptrs && shapes) {
    for (size_t i = 0; i < n; i++) {
      convd__v1__weights_info__init(&infos[i]);
      convd__v1__shape4__init(&shapes[i]);
      shapes[i].d0 = v[i].meta.c_out, shapes[i].d1 = v[i].meta.c_per_group;
      shapes[i].d2 = v[i].meta.kh, shapes[i].d3 = v[i].meta.kw;
      infos[i].weights_id = v[i].meta.id;
      infos[i].weight_shape = &shapes[i];
      infos[i].has_bias = v[i].meta.has_bias != 0;
      infos[i].dtype = convd_stream_dtype_to_wire(v[i].meta.dtype);
      infos[i].bytes = v[i].meta.bytes;
      infos[i].uses = v[i].uses;
      infos[i].idle_seconds = v[i].idle_seconds;
      infos[i].in_use = v[i].in_use;
      ptrs[i] = &infos[i];
    }
    Convd__V1__ListWeightsResponse resp = CONVD__V1__LIST_WEIGHTS_RESPONSE__INIT;
    resp.n_weights = n;
    resp.weights = ptrs;
    /* With tenants, a listing says nothing about the others: their bytes, their evictions. */
    const uint64_t tl = tenant_weights_limit(c), limit = c->rpc->cfg->weights_memory;
    resp.bytes_used = convd_call_tenant(c) ? own : st.bytes;
    resp.bytes_limit = tl && tl < limit ? tl : limit;
    resp.evictions = convd_call_tenant(c) ? 0 : st.evictions;
    convd_call_reply(c, &resp.base);
  } else {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
  }
  free(infos), free(ptrs), free(shapes), free(v);
}

static void delete_start(convd_call *c) {
  char err[256];
  Convd__V1__DeleteWeightsRequest *m =
      c->payload ? (Convd__V1__DeleteWeightsRequest *)convd_wire_unpack(
                       c->payload, &convd__v1__delete_weights_request__descriptor)
                 : NULL;
  int rc;
  if (m == NULL)
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "the request is not a valid convd.v1.DeleteWeightsRequest");
  else if (c->rpc->registry == NULL)
    rc = convd_errf(err, sizeof err, CONVD_ENOTFOUND, "this daemon runs without a weights registry");
  else
    rc = convd_registry_delete(c->rpc->registry, convd_call_tenant(c), m->weights_id ? m->weights_id : "", err, sizeof err);
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) {
    convd_call_fail(c, rc, err);
    return;
  }
  Convd__V1__DeleteWeightsResponse resp = CONVD__V1__DELETE_WEIGHTS_RESPONSE__INIT;
  convd_call_reply(c, &resp.base);
}

const convd_handlers convd_put_weights_handlers = {
    .start = put_start, .recv = put_recv, .report = put_report, .free_state = put_free};
const convd_handlers convd_list_weights_handlers = {.start = list_start};
const convd_handlers convd_delete_weights_handlers = {.start = delete_start};
