/* See weights_upload.h. Threads: the completion-queue thread, under the owning call's mutex. */
#include "weights_upload.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "conv.h"
#include "conv_stream.h"
#include "dtype.h"
#include "err.h"

/* The spec's shape and dtype, and the tensors as they arrive (wire dtype). */
struct convd_upload {
  uint64_t weights_memory;
  convd_upload_admit_fn admit;
  void *user;
  uint64_t held; /* what admit accepted */
  int have_spec;
  int64_t shape[4];
  int has_bias, dtype;
  size_t elem;
  void *w, *b;
  size_t w_recv, b_recv, w_total, b_total;
  int64_t b_elems;
};

convd_upload *convd_upload_create(uint64_t weights_memory, convd_upload_admit_fn admit,
                                  void *user) {
  convd_upload *u = calloc(1, sizeof *u);
  if (u) u->weights_memory = weights_memory, u->admit = admit, u->user = user;
  return u;
}

uint64_t convd_upload_admitted(const convd_upload *u) { return u->held; }

void convd_upload_destroy(convd_upload *u) {
  if (u == NULL) return;
  free(u->w);
  free(u->b);
  free(u);
}

uint64_t convd_upload_bytes_received(const convd_upload *u) { return u->w_recv + u->b_recv; }

static int put_spec(convd_upload *u, const Convd__V1__WeightsSpec *sp, char *err, size_t errlen) {
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
  /* as Conv2d's spec: an op this daemon does not serve is refused, not read as conv2d */
  if (sp->op != CONVD__V1__OP__OP_UNSPECIFIED && sp->op != CONVD__V1__OP__OP_CONV2D &&
      sp->op != CONVD__V1__OP__OP_CONV_TRANSPOSE2D)
    return convd_errf(err, errlen, CONVD_ENOTSUP,
                      "spec.op = %d is not an operation this daemon serves (OP_CONV2D = 1, "
                      "OP_CONV_TRANSPOSE2D = 2)",
                      (int)sp->op);
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
  /* What the entry will hold as float32, the bias included, against the limit before anything
   * is allocated. */
  const uint64_t limit = u->weights_memory;
  size_t wbytes, fbytes, bbytes = 0, entry;
  if (convd_size_mul(elems, u->elem, &wbytes) || convd_size_mul(elems, sizeof(float), &fbytes) ||
      (u->has_bias && convd_size_mul((size_t)u->b_elems, sizeof(float), &bbytes)) ||
      convd_size_add(fbytes, bbytes, &entry) || entry > limit) {
    char bias[64] = "";
    if (u->has_bias) snprintf(bias, sizeof bias, " with %" PRId64 " bias values", u->b_elems);
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "weights of %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
                      "%s do not fit the registry's %" PRIu64 " bytes (--weights-memory)",
                      d[0], d[1], d[2], d[3], bias, limit);
  }
  u->w_total = wbytes;
  u->b_total = u->has_bias ? (size_t)u->b_elems * u->elem : 0;
  /* Held until the registry has them: the wire copies as they arrive, then the float32 ones
   * (a bias only when there is one). */
  const uint64_t hold = (uint64_t)wbytes + u->b_total + fbytes + bbytes;
  if (u->admit) {
    int rc = u->admit(u->user, hold, err, errlen);
    if (rc) return rc;
    u->held = hold;
  }
  u->w = malloc(wbytes);
  u->b = u->b_total ? malloc(u->b_total) : NULL;
  if (u->w == NULL || (u->b_total && u->b == NULL))
    return convd_errf(err, errlen, CONVD_ENOMEM, "the daemon cannot allocate %zu bytes now", wbytes);
  u->have_spec = 1;
  return 0;
}

int convd_upload_feed(convd_upload *u, const Convd__V1__PutWeightsRequest *m, char *err,
                      size_t errlen) {
  if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_SPEC)
    return u->have_spec ? convd_errf(err, errlen, CONVD_EINVAL, "a second spec arrived")
                        : put_spec(u, m->spec, err, errlen);
  if (!u->have_spec)
    return convd_errf(err, errlen, CONVD_EINVAL, "the first message must be the spec (the weights' shape)");
  if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_WEIGHT)
    return convd_stream_append_chunk("weight", m->weight, u->w, &u->w_recv, u->w_total, err, errlen);
  if (m->msg_case == CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_BIAS)
    return !u->has_bias ? convd_errf(err, errlen, CONVD_EINVAL, "a bias chunk arrived but the spec says has_bias = false")
                        : convd_stream_append_chunk("bias", m->bias, u->b, &u->b_recv, u->b_total, err, errlen);
  return convd_errf(err, errlen, CONVD_EINVAL, "a message with no content arrived");
}

int convd_upload_complete(const convd_upload *u, char *err, size_t errlen) {
  if (!u->have_spec)
    return convd_errf(err, errlen, CONVD_EINVAL, "the stream ended before the spec arrived");
  if (u->w_recv != u->w_total || u->b_recv != u->b_total)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "incomplete at half-close: %zu of %zu weight bytes and %zu of %zu bias bytes arrived",
                      u->w_recv, u->w_total, u->b_recv, u->b_total);
  return 0;
}

int convd_upload_register(convd_upload *u, convd_registry *reg, const char *tenant,
                          uint64_t tenant_limit, char id[CONVD_WEIGHTS_ID_LEN + 1],
                          uint64_t *bytes, int *already, char *err, size_t errlen) {
  const size_t we = u->w_total / u->elem, be = u->b_total / u->elem;
  float *w = malloc(we * sizeof(float)), *b = be ? malloc(be * sizeof(float)) : NULL;
  if (w == NULL || (be && b == NULL)) {
    free(w), free(b);
    return convd_errf(err, errlen, CONVD_ENOMEM, "the daemon cannot widen the weights now; retry later");
  }
  convd_dtype_decode(u->dtype, u->w, w, we);
  if (be) convd_dtype_decode(u->dtype, u->b, b, be);
  free(u->w), free(u->b); /* the wire copies are done with */
  u->w = u->b = NULL;
  /* the registry takes w and b over, whatever it answers */
  return convd_registry_put(reg, tenant, tenant_limit, u->shape[0], u->shape[1], u->shape[2],
                            u->shape[3], u->dtype, w, b, (int64_t)be, id, bytes, already, err,
                            errlen);
}
