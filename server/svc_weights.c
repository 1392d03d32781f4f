/* The weights registry's methods: PutWeights (streamed like Conv2d's weights: a spec, then
 * weight and bias chunks in order), ListWeights, DeleteWeights. The registry itself
 * (registry.c) knows no gRPC.
 *
 * Threads: the completion-queue thread, with the call's mutex held; a finished upload is
 * widened and registered on the offload thread (offload.h), which then takes the call's mutex
 * to answer. The registry is thread-safe. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "conv_stream.h"
#include "dtype.h"
#include "err.h"
#include "offload.h"
#include "rpc_impl.h"
#include "services.h"
#include "wire.h"

/* The limit on the bytes of weights the call's tenant may register (0: none of its own). */
static uint64_t tenant_weights_limit(const convd_call *c) {
  const convd_tenant_limits *l = convd_call_tenant_limits(c);
  return l ? l->weights_bytes : 0;
}

/* A PutWeights upload: the spec's shape and dtype, and the tensors as they arrive. */
typedef struct upload {
  int have_spec;
  int64_t shape[4];
  int has_bias, dtype;
  size_t elem;
  void *w, *b;
  size_t w_recv, b_recv, w_total, b_total;
  int64_t b_elems;
  uint64_t held; /* counted against --max-inflight-bytes until the call ends */
} upload;

static int put_spec(convd_call *c, upload *u, const Convd__V1__WeightsSpec *sp, char *err,
                    size_t errlen) {
  const Convd__V1__Shape4 *sh = sp->weight_shape;
  if (sh == NULL)
    return convd_errf(err, errlen, CONVD_EINVAL, "spec.weight_shape is missing: send C_out, C_in/groups, kH, kW");
  const int64_t d[4] = {sh->d0, sh->d1, sh->d2, sh->d3};
  size_t elems = 1;
  for (int i = 0; i < 4; i++) {
    if (d[i] < 1 || d[i] > CONVD_DIM_MAX || convd_size_mul(elems, (size_t)d[i], &elems))
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "weight shape %" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
                        ": every dimension must be between 1 and %" PRId64 " and the product fit memory",
                        d[0], d[1], d[2], d[3], (int64_t)CONVD_DIM_MAX);
    u->shape[i] = d[i];
  }
  if ((u->dtype = convd_stream_dtype_from_wire(sp->dtype)) < 0)
    return convd_errf(err, errlen, CONVD_ENOTSUP, "spec.dtype = %d is not one this daemon serves",
                      (int)sp->dtype);
  u->elem = convd_dtype_size(u->dtype);
  u->has_bias = sp->has_bias;
  /* the bias has C_out values: the first dimension, or for a transpose the second times groups */
  const int64_t groups = sp->groups == 0 ? 1 : sp->groups;
  const int transposed = sp->op == CONVD__V1__OP__OP_CONV_TRANSPOSE2D;
  /* A transpose's weights are (C_in, C_out/groups, kH, kW) and groups divides C_in, so its
   * C_out (the bias's length) is at most the weights' element count. */
  if (transposed && (groups < 1 || groups > d[0] || d[0] % groups != 0))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "spec.groups = %" PRId64 " must divide the transpose weights' first dimension "
                      "(C_in = %" PRId64 ")",
                      groups, d[0]);
  u->b_elems = transposed ? d[1] * groups : d[0];
  const uint64_t limit = c->rpc->cfg->weights_memory;
  size_t wbytes, fbytes;
  if (convd_size_mul(elems, u->elem, &wbytes) || convd_size_mul(elems, sizeof(float), &fbytes) ||
      fbytes > limit)
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "weights of %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
                      " do not fit the registry's %" PRIu64 " bytes (--weights-memory)",
                      d[0], d[1], d[2], d[3], limit);
  u->w_total = wbytes;
  u->b_total = u->has_bias ? (size_t)u->b_elems * u->elem : 0;
  /* Held until the registry has them: the wire copies as they arrive, then the float32 ones. */
  const uint64_t hold = (uint64_t)wbytes + u->b_total + fbytes + (uint64_t)u->b_elems * sizeof(float);
  int rc = convd_rpc_admit_call(c, hold, err, errlen);
  if (rc) return rc;
  u->held = hold;
  u->w = malloc(wbytes);
  u->b = u->b_total ? malloc(u->b_total) : NULL;
  if (u->w == NULL || (u->b_total && u->b == NULL))
    return convd_errf(err, errlen, CONVD_ENOMEM, "the daemon cannot allocate %zu bytes now", wbytes);
  u->have_spec = 1;
  return 0;
}

/* The offload thread, without the call's mutex: the upload is whole and no message will touch
 * it any more (the call's ref keeps it). Widening and hashing grow with the weights, so they
 * run here rather than on the completion-queue thread. */
static void put_register(void *arg) {
  convd_call *c = arg;
  upload *u = c->state;
  char err[512];
  const size_t we = u->w_total / u->elem, be = u->b_total / u->elem;
  float *w = malloc(we * sizeof(float)), *b = be ? malloc(be * sizeof(float)) : NULL;
  int rc = 0;
  char id[CONVD_WEIGHTS_ID_LEN + 1];
  uint64_t bytes = 0;
  int already = 0;
  if (w == NULL || (be && b == NULL)) {
    free(w), free(b);
    rc = convd_errf(err, sizeof err, CONVD_ENOMEM, "the daemon cannot widen the weights now; retry later");
  } else {
    convd_dtype_decode(u->dtype, u->w, w, we);
    if (be) convd_dtype_decode(u->dtype, u->b, b, be);
    free(u->w), free(u->b); /* the wire copies are done with */
    u->w = u->b = NULL;
    rc = convd_registry_put(c->rpc->registry, convd_call_tenant(c), tenant_weights_limit(c), u->shape[0],
                            u->shape[1], u->shape[2], u->shape[3], u->dtype, w, b, (int64_t)be, id,
                            &bytes, &already, err, sizeof err);
  }
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

/* The stream ended: the weights go into the registry (widened to float32), on the offload
 * thread. */
static void put_finish(convd_call *c, upload *u) {
  char err[512];
  if (!u->have_spec) {
    convd_call_fail(c, CONVD_EINVAL, "the stream ended before the spec arrived");
    return;
  }
  if (u->w_recv != u->w_total || u->b_recv != u->b_total) {
    snprintf(err, sizeof err, "incomplete at half-close: %zu of %zu weight bytes and %zu of %zu bias bytes arrived",
             u->w_recv, u->w_total, u->b_recv, u->b_total);
    convd_call_fail(c, CONVD_EINVAL, err);
    return;
  }
  convd_call_ref_locked(c);
  if (convd_offload_post(c->rpc->offload, put_register, c)) {
    c->refs--; /* the running handler still holds its own ref */
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
  }
}

static void put_recv(convd_call *c, grpc_byte_buffer *bb) {
  upload *u = c->state;
  char err[512];
  if (bb == NULL) {
    put_finish(c, u);
    return;
  }
  Convd__V1__PutWeightsRequest *m =
      (Convd__V1__PutWeightsRequest *)convd_wire_unpack(bb, &convd__v1__put_weights_request__descriptor);
  int rc = 0;
  if (m == NULL) {
    rc = convd_errf(err, sizeof err, CONVD_EINVAL,
                    "message %" PRIu64 " is not a valid convd.v1.PutWeightsRequest", c->messages_in);
  } else if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_SPEC) {
    rc = u->have_spec ? convd_errf(err, sizeof err, CONVD_EINVAL, "a second spec arrived")
                      : put_spec(c, u, m->spec, err, sizeof err);
  } else if (!u->have_spec) {
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "the first message must be the spec (the weights' shape)");
  } else if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_WEIGHT) {
    rc = convd_stream_append_chunk("weight", m->weight, u->w, &u->w_recv, u->w_total, err, sizeof err);
  } else if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_BIAS) {
    rc = !u->has_bias ? convd_errf(err, sizeof err, CONVD_EINVAL, "a bias chunk arrived but the spec says has_bias = false")
                      : convd_stream_append_chunk("bias", m->bias, u->b, &u->b_recv, u->b_total, err, sizeof err);
  } else {
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "a message with no content arrived");
  }
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) convd_call_fail(c, rc, err);
  else convd_call_recv(c);
}

static void put_start(convd_call *c) {
  if (c->rpc->registry == NULL) {
    convd_call_fail(c, CONVD_ENOTSUP, "this daemon runs without a weights registry (--weights-memory 0)");
    return;
  }
  if ((c->state = calloc(1, sizeof(upload))) == NULL) {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  if (convd_call_send_initial_metadata(c) == 0) convd_call_recv(c);
}

static void put_report(const convd_call *c, convd_call_report *r) {
  const upload *u = c->state;
  if (u) r->bytes_in = u->w_recv + u->b_recv;
}

static void put_free(convd_call *c) {
  upload *u = c->state;
  if (u == NULL) return;
  free(u->w);
  free(u->b);
  convd_rpc_release_call(c, u->held);
  free(u);
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
