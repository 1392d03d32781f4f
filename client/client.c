/* libconvd_client: synchronous calls over gRPC core. Everything here runs on the caller's
 * thread: each call creates its own completion queue, drives it with grpc_completion_queue_next
 * until the call has ended, and destroys it before returning; the library starts no thread of
 * its own (gRPC core's internal ones aside) and keeps no state outside the convd_client, which
 * one thread at a time may use. The exception is convd_client_cancel, from any thread: `mu`
 * guards the client's call in progress (`active`) between it and the calling thread. Method
 * paths come from protoc-c's service descriptors.
 *
 * Shared-memory regions (convd_client_region_*) are POSIX objects this library creates, maps
 * and unlinks on the caller's thread, or through a unix: target sealed memfds whose descriptor
 * it passes to the daemon's descriptor socket, also on the caller's thread. */
#define _GNU_SOURCE /* memfd_create, the F_SEAL_* constants */
#include "client.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "band.h"
#include "client_params.h"
#include "clock.h"
#include "dtype.h"
#include "err.h"
#include "convd/v1/convd.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "wire.h"

/* client.h spells the engine's numbers out so that it stands alone; they must stay the same. */
#define CHECK_ERR_CODE(name, code, text)                 \
  _Static_assert((int)CONVD_CLIENT_##name == (int)CONVD_##name, \
                 "client.h's CONVD_CLIENT_" #name " is not err.h's");
CONVD_ERR_MAP(CHECK_ERR_CODE)
#undef CHECK_ERR_CODE
_Static_assert((int)CONVD_CLIENT_FLOAT32 == (int)CONVD_F32 &&
                   (int)CONVD_CLIENT_FLOAT16 == (int)CONVD_F16 &&
                   (int)CONVD_CLIENT_BFLOAT16 == (int)CONVD_BF16,
               "client.h's dtypes are not dtype.h's");

const char *convd_client_strerror(int code) { return convd_strerror(code); }

void convd_client_conv_params_default(convd_client_conv_params *p) {
  convd_conv_params e;
  convd_conv_params_default(&e);
  *p = convd_client_params_from_conv(&e);
}

int convd_client_output_shape(const convd_client_conv_params *p, int64_t shape[4], char *err,
                              size_t errlen) {
  convd_conv_params e;
  convd_conv c;
  convd_client_params_to_conv(p, &e);
  int rc = convd_conv_init(&c, &e, err, errlen);
  if (rc) return rc;
  shape[0] = e.n, shape[1] = e.c_out, shape[2] = c.h_out, shape[3] = c.w_out;
  return 0;
}

struct convd_client {
  grpc_channel *ch;
  void *m_conv2d, *m_unary, *m_list, *m_health, *m_reg_region, *m_list_regions, *m_unreg_region;
  void *m_put_weights, *m_list_weights, *m_delete_weights;
  pthread_mutex_t mu; /* guards active */
  grpc_call *active;  /* the call in progress, for convd_client_cancel */
  convd_client_opts o; /* its file and string pointers cleared: they are the caller's */
  int last_status;
  /* Sent with every call's initial metadata: `authorization: Bearer TOKEN` when opts had a
   * token (n_md 1), else nothing. */
  grpc_metadata md[1];
  size_t n_md;
  /* unix:PATH targets: the daemon's descriptor socket, PATH.fd, for regions used in place
   * (convd_client_region_create); "" otherwise. */
  char fd_socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

#define MAX_TOKEN 4096
#define MAX_PEM (1u << 20)

/* A PEM file's text (malloc'd, NUL-terminated) for gRPC's credentials. */
static int read_pem(const char *what, const char *path, char **out, char *err, size_t errlen) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return convd_errf(err, errlen, CONVD_EIO, "%s %s: cannot open it: %s", what, path, strerror(errno));
  char *buf = malloc(MAX_PEM + 1);
  size_t n = buf ? fread(buf, 1, MAX_PEM + 1, f) : 0;
  const int bad = ferror(f);
  fclose(f);
  if (buf == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  if (bad || n == 0 || n > MAX_PEM || strstr((buf[n] = '\0', buf), "-----BEGIN ") == NULL) {
    free(buf);
    return convd_errf(err, errlen, CONVD_EINVAL, "%s %s: %s", what, path,
                      bad ? "cannot read it" : n > MAX_PEM ? "larger than 1 MiB: not a PEM file"
                                                           : "not a PEM file");
  }
  *out = buf;
  return 0;
}

static void pem_free(char *p) {
  if (p == NULL) return;
  memset(p, 0, strlen(p)); /* a private key should not linger in freed memory */
  free(p);
}

/* Channel credentials from opts: TLS when tls_ca_file is set, else plaintext. */
static int make_credentials(const convd_client_opts *o, grpc_channel_credentials **out, char *err,
                            size_t errlen) {
  *out = NULL;
  const int cert = o->tls_cert_file != NULL, key = o->tls_key_file != NULL;
  if (cert != key)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s is set but %s is not: a client certificate needs its private key",
                      cert ? "tls_cert_file" : "tls_key_file", cert ? "tls_key_file" : "tls_cert_file");
  if (o->tls_ca_file == NULL) {
    if (cert || o->tls_server_name)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "%s needs tls_ca_file: TLS is on when the CA that signed the server's "
                        "certificate is given",
                        cert ? "tls_cert_file" : "tls_server_name");
    *out = grpc_insecure_credentials_create();
    return 0;
  }
  char *ca = NULL, *crt = NULL, *k = NULL;
  int rc = read_pem("TLS CA file", o->tls_ca_file, &ca, err, errlen);
  if (rc == 0 && cert) rc = read_pem("TLS certificate file", o->tls_cert_file, &crt, err, errlen);
  if (rc == 0 && cert) rc = read_pem("TLS key file", o->tls_key_file, &k, err, errlen);
  if (rc == 0) {
    grpc_ssl_pem_key_cert_pair pair = {k, crt};
    /* gRPC copies the strings. */
    *out = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
    if (*out == NULL) rc = convd_errf(err, errlen, CONVD_EINTERNAL, "gRPC refused the TLS credentials");
  }
  pem_free(ca), pem_free(crt), pem_free(k);
  return rc;
}

/* The authorization header, or none. The token is not echoed in any message. */
static int make_token_md(convd_client *c, const char *token, char *err, size_t errlen) {
  if (token == NULL) return 0;
  const size_t n = strlen(token);
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)token[i] < 0x21 || (unsigned char)token[i] > 0x7e)
      return convd_errf(err, errlen, CONVD_EINVAL, "the token must be printable ASCII without spaces");
  if (n == 0 || n > MAX_TOKEN)
    return convd_errf(err, errlen, CONVD_EINVAL, "the token must be 1 to %d characters", MAX_TOKEN);
  char value[7 + MAX_TOKEN + 1];
  snprintf(value, sizeof value, "Bearer %s", token);
  c->md[0].key = grpc_slice_from_static_string("authorization");
  c->md[0].value = grpc_slice_from_copied_string(value);
  memset(value, 0, sizeof value);
  c->n_md = 1;
  return 0;
}

/* A method's path, /SERVICE/METHOD, from the generated service descriptor: the .proto and the
 * daemon's method table stay the only spellings. */
static int method_path(const ProtobufCServiceDescriptor *svc, const char *method, char *out,
                       size_t len, char *err, size_t errlen) {
  const ProtobufCMethodDescriptor *m =
      protobuf_c_service_descriptor_get_method_by_name(svc, method);
  if (m == NULL || (size_t)snprintf(out, len, "/%s/%s", svc->name, m->name) >= len)
    return convd_errf(err, errlen, CONVD_EINTERNAL, "service %s has no method %s", svc->name,
                      method);
  return 0;
}

enum { N_METHODS = 10 };

int convd_client_create(const char *target, const convd_client_opts *opts, convd_client **out,
                        char *err, size_t errlen) {
  *out = NULL;
  convd_client *c = calloc(1, sizeof *c);
  if (c == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  if (opts) c->o = *opts;
  c->o.tls_ca_file = c->o.tls_cert_file = c->o.tls_key_file = c->o.tls_server_name = c->o.token = NULL;
  c->o.lb_policy = NULL;
  if (target && strncmp(target, "unix:", 5) == 0) { /* unix:/abs/path or unix:///abs/path */
    const char *path = target + 5;
    if (strncmp(path, "//", 2) == 0) path += 2;
    if (path[0] == '/' && strlen(path) + 3 < sizeof c->fd_socket) snprintf(c->fd_socket, sizeof c->fd_socket, "%s.fd", path);
  }
  const convd_client_opts none = {0}, *o = opts ? opts : &none;
  char service_config[1024];
  if (o->lb_policy &&
      convd_wire_lb_service_config(o->lb_policy, service_config, sizeof service_config)) {
    free(c);
    return convd_errf(err, errlen, CONVD_EINVAL, "lb_policy \"%.64s\": expected %s",
                      o->lb_policy, CONVD_WIRE_LB_POLICIES);
  }
  if (c->o.max_message_bytes == 0) c->o.max_message_bytes = 4u << 20;
  if (c->o.chunk_bytes == 0) c->o.chunk_bytes = 1u << 20;
  if (c->o.max_message_bytes > INT32_MAX ||
      c->o.chunk_bytes + CONVD_WIRE_FRAMING_SLACK > c->o.max_message_bytes) {
    size_t chunk = c->o.chunk_bytes, max = c->o.max_message_bytes;
    free(c);
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "chunk_bytes %zu must be at most max_message_bytes %zu - %d", chunk, max,
                      CONVD_WIRE_FRAMING_SLACK);
  }
  static const struct {
    const ProtobufCServiceDescriptor *svc;
    const char *method;
  } methods[N_METHODS] = {{&convd__v1__convolution__descriptor, "Conv2d"},
                          {&convd__v1__convolution__descriptor, "Conv2dUnary"},
                          {&convd__v1__convolution__descriptor, "ListDevices"},
                          {&grpc__health__v1__health__descriptor, "Check"},
                          {&convd__v1__convolution__descriptor, "RegisterRegion"},
                          {&convd__v1__convolution__descriptor, "ListRegions"},
                          {&convd__v1__convolution__descriptor, "UnregisterRegion"},
                          {&convd__v1__convolution__descriptor, "PutWeights"},
                          {&convd__v1__convolution__descriptor, "ListWeights"},
                          {&convd__v1__convolution__descriptor, "DeleteWeights"}};
  char paths[N_METHODS][128];
  for (int i = 0; i < N_METHODS; i++) {
    int rc = method_path(methods[i].svc, methods[i].method, paths[i], sizeof paths[i], err, errlen);
    if (rc) {
      free(c);
      return rc;
    }
  }
  grpc_init();
  grpc_channel_credentials *creds;
  int rc = make_credentials(o, &creds, err, errlen);
  if (rc == 0) rc = make_token_md(c, o->token, err, errlen);
  if (rc) {
    if (creds) grpc_channel_credentials_release(creds);
    free(c);
    grpc_shutdown();
    return rc;
  }
  grpc_arg args[CONVD_WIRE_CHANNEL_ARGS + 2];
  grpc_channel_args ca = {convd_wire_channel_args(args, c->o.max_message_bytes), args};
  if (o->lb_policy) {
    args[ca.num_args].type = GRPC_ARG_STRING;
    args[ca.num_args].key = GRPC_ARG_SERVICE_CONFIG;
    args[ca.num_args++].value.string = service_config; /* the channel copies it */
  }
  if (o->tls_server_name) {
    args[ca.num_args].type = GRPC_ARG_STRING;
    args[ca.num_args].key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
    args[ca.num_args++].value.string = (char *)o->tls_server_name; /* the channel copies it */
  }
  c->ch = grpc_channel_create(target, creds, &ca);
  grpc_channel_credentials_release(creds);
  /* The channel keeps its own copy of each path. */
  c->m_conv2d = grpc_channel_register_call(c->ch, paths[0], NULL, NULL);
  c->m_unary = grpc_channel_register_call(c->ch, paths[1], NULL, NULL);
  c->m_list = grpc_channel_register_call(c->ch, paths[2], NULL, NULL);
  c->m_health = grpc_channel_register_call(c->ch, paths[3], NULL, NULL);
  c->m_reg_region = grpc_channel_register_call(c->ch, paths[4], NULL, NULL);
  c->m_list_regions = grpc_channel_register_call(c->ch, paths[5], NULL, NULL);
  c->m_unreg_region = grpc_channel_register_call(c->ch, paths[6], NULL, NULL);
  c->m_put_weights = grpc_channel_register_call(c->ch, paths[7], NULL, NULL);
  c->m_list_weights = grpc_channel_register_call(c->ch, paths[8], NULL, NULL);
  c->m_delete_weights = grpc_channel_register_call(c->ch, paths[9], NULL, NULL);
  pthread_mutex_init(&c->mu, NULL);
  *out = c;
  return 0;
}

void convd_client_destroy(convd_client *c) {
  if (c == NULL) return;
  grpc_channel_destroy(c->ch);
  for (size_t i = 0; i < c->n_md; i++) grpc_slice_unref(c->md[i].value);
  pthread_mutex_destroy(&c->mu);
  free(c);
  grpc_shutdown();
}

int convd_client_last_status(const convd_client *c) { return c->last_status; }

/* The call in progress, as convd_client_cancel sees it: set once it is created, cleared before
 * it is unref'd (so a cancel never meets a freed call). */
static void call_track(convd_client *c, grpc_call *call) {
  pthread_mutex_lock(&c->mu);
  c->active = call;
  pthread_mutex_unlock(&c->mu);
}

void convd_client_cancel(convd_client *c) {
  pthread_mutex_lock(&c->mu);
  if (c->active) /* gRPC core: any thread, any number of times */
    grpc_call_cancel_with_status(c->active, GRPC_STATUS_CANCELLED, "cancelled by the client", NULL);
  pthread_mutex_unlock(&c->mu);
}

static gpr_timespec deadline(const convd_client *c) {
  if (c->o.timeout_seconds <= 0) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                      gpr_time_from_micros((int64_t)(c->o.timeout_seconds * 1e6), GPR_TIMESPAN));
}

/* Drains and destroys a call's completion queue. */
static void cq_destroy(grpc_completion_queue *cq) {
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
}

/* The wire spec for p; the Shape4/Pair/Padding storage lives in the caller's struct. */
typedef struct spec_storage {
  Convd__V1__ConvSpec spec;
  Convd__V1__Shape4 in, wt;
  Convd__V1__Pair stride, dil, outpad;
  Convd__V1__Padding pad;
  Convd__V1__RegionRef regions[4]; /* input, weight, bias, output */
} spec_storage;

/* co: the call's weights id and priority (NULL: none). */
static void make_spec(spec_storage *s, const convd_conv_params *p, const convd_client_call_opts *co) {
  convd__v1__conv_spec__init(&s->spec);
  convd__v1__shape4__init(&s->in);
  convd__v1__shape4__init(&s->wt);
  convd__v1__pair__init(&s->stride);
  convd__v1__pair__init(&s->dil);
  convd__v1__padding__init(&s->pad);
  s->in.d0 = p->n, s->in.d1 = p->c_in, s->in.d2 = p->h, s->in.d3 = p->w;
  if (p->transposed) /* PyTorch's conv_transpose2d layout: (C_in, C_out/groups, kH, kW) */
    s->wt.d0 = p->c_in, s->wt.d1 = p->c_out / p->groups, s->wt.d2 = p->kh, s->wt.d3 = p->kw;
  else
    s->wt.d0 = p->c_out, s->wt.d1 = p->c_per_group, s->wt.d2 = p->kh, s->wt.d3 = p->kw;
  s->stride.h = p->stride_h, s->stride.w = p->stride_w;
  s->dil.h = p->dil_h, s->dil.w = p->dil_w;
  s->pad.top = p->pad_top, s->pad.bottom = p->pad_bottom;
  s->pad.left = p->pad_left, s->pad.right = p->pad_right;
  s->spec.op = p->transposed ? CONVD__V1__OP__OP_CONV_TRANSPOSE2D : CONVD__V1__OP__OP_CONV2D;
  if (p->transposed) {
    convd__v1__pair__init(&s->outpad);
    s->outpad.h = p->out_pad_h, s->outpad.w = p->out_pad_w;
    s->spec.output_padding = &s->outpad;
  }
  s->spec.dtype = p->dtype == CONVD_F16    ? CONVD__V1__DTYPE__DTYPE_FLOAT16
                  : p->dtype == CONVD_BF16 ? CONVD__V1__DTYPE__DTYPE_BFLOAT16
                                           : CONVD__V1__DTYPE__DTYPE_FLOAT32;
  s->spec.allow_tf32 = p->allow_tf32 != 0;
  s->spec.input_shape = &s->in;
  s->spec.weight_shape = &s->wt;
  s->spec.has_bias = p->has_bias != 0;
  s->spec.stride = &s->stride;
  s->spec.padding = &s->pad;
  s->spec.dilation = &s->dil;
  s->spec.groups = p->groups;
  if (co && co->weights_id) s->spec.weights_id = (char *)co->weights_id;
  if (co) s->spec.priority = co->priority;
}

/* Which tensors of a call lie in shared memory (shm_refs below): bits of these. */
enum { IN_REGION_X = 1, IN_REGION_W = 2, IN_REGION_B = 4, IN_REGION_Y = 8 };

/* The spec's RegionRefs for the tensors refs puts in regions, each as long as its tensor. */
static void spec_add_regions(spec_storage *s, const convd_conv *cv, const convd_client_shm_refs *refs) {
  if (refs == NULL) return;
  const convd_client_tensor_ref *r[4] = {&refs->input, &refs->weight, &refs->bias, &refs->output};
  const size_t len[4] = {cv->input_wire_bytes, cv->weight_wire_bytes, cv->bias_wire_bytes,
                         cv->output_wire_bytes};
  Convd__V1__RegionRef **dst[4] = {&s->spec.input_region, &s->spec.weight_region,
                                   &s->spec.bias_region, &s->spec.output_region};
  for (int i = 0; i < 4; i++) {
    if (r[i]->region == NULL) continue;
    convd__v1__region_ref__init(&s->regions[i]);
    s->regions[i].region = (char *)r[i]->region;
    s->regions[i].offset = r[i]->offset;
    s->regions[i].length = len[i];
    *dst[i] = &s->regions[i];
  }
}

/* Turns the call's final status into the function's result. */
static int finish_status(convd_client *c, grpc_status_code st, grpc_slice details, int local_rc,
                         char *err, size_t errlen, const char *local_err) {
  c->last_status = (int)st;
  if (st != GRPC_STATUS_OK) {
    return convd_errf(err, errlen, convd_wire_err_from_status(st), "%s: %.*s",
                      convd_wire_status_name(st),
                      (int)GRPC_SLICE_LENGTH(details), (const char *)GRPC_SLICE_START_PTR(details));
  }
  if (local_rc) {
    c->last_status = GRPC_STATUS_INTERNAL;
    return convd_errf(err, errlen, local_rc, "%s", local_err);
  }
  return 0;
}

/* ---- streaming Conv2d ------------------------------------------------------------------ */

enum { T_SEND = 1, T_RECV, T_MD, T_STATUS };

typedef struct stream {
  convd_client *cl;
  const convd_conv *conv;
  const void *x, *w, *b; /* in the wire's dtype */
  void *y;
  convd_client_stats *st;
  /* what to send next: 0 spec, 1 weights, 2 bias, 3 input bands, 4 close, 5 nothing */
  int phase;
  size_t off; /* weights / bias progress */
  convd_band_iter in_it;
  convd_band_shape out_shape;
  size_t out_bytes_seen;
  const convd_client_io *io; /* NULL: x and y are in memory */
  const convd_client_shm_refs *refs; /* NULL: no tensor in shared memory */
  unsigned in_regions;               /* IN_REGION_* */
  uint64_t rows_done, rows_total;    /* output rows: whole bands received, or final in a region */
  const convd_client_call_opts *co;  /* weights id, priority, progress */
  uint64_t bytes_sent;               /* tensor bytes of the messages sent so far */
  size_t msg_bytes;                  /* ... and of the one being sent */
  int accepted;
  int local_rc;
  char local_err[256];
  double t0;
} stream;

static void local_fail(stream *s, int rc, const char *msg);

/* The caller's progress callback, if any, with where the call stands. */
static void report_progress(const stream *s) {
  if (s->co->progress == NULL) return;
  const convd_client_progress pr = {s->rows_done, s->rows_total, s->bytes_sent,
                                    (uint64_t)s->out_bytes_seen, convd_now_seconds() - s->t0};
  s->co->progress(s->co->progress_ctx, &pr);
}

static grpc_byte_buffer *next_request(stream *s) {
  Convd__V1__ConvRequest req = CONVD__V1__CONV_REQUEST__INIT;
  Convd__V1__TensorChunk ch = CONVD__V1__TENSOR_CHUNK__INIT;
  spec_storage sp;
  const size_t chunk = s->cl->o.chunk_bytes;
  for (;;) {
    switch (s->phase) {
      case 0:
        make_spec(&sp, &s->conv->p, s->co);
        spec_add_regions(&sp, s->conv, s->refs);
        req.msg_case = CONVD__V1__CONV_REQUEST__MSG_SPEC;
        req.spec = &sp.spec;
        s->phase = 1;
        return convd_wire_pack(&req.base);
      case 1:
      case 2: {
        const int is_w = s->phase == 1;
        size_t total = is_w ? s->conv->weight_wire_bytes : s->conv->bias_wire_bytes;
        if (s->in_regions & (is_w ? IN_REGION_W : IN_REGION_B)) total = 0; /* the daemon reads it */
        if (s->co->weights_id) total = 0; /* ... or has it registered */
        if (s->off >= total) {
          s->phase++;
          s->off = 0;
          continue;
        }
        size_t n = total - s->off < chunk ? total - s->off : chunk;
        ch.offset = s->off;
        ch.data.data = (uint8_t *)(is_w ? (const void *)s->w : (const void *)s->b) + s->off;
        ch.data.len = n;
        req.msg_case = is_w ? CONVD__V1__CONV_REQUEST__MSG_WEIGHT : CONVD__V1__CONV_REQUEST__MSG_BIAS;
        if (is_w)
          req.weight = &ch;
        else
          req.bias = &ch;
        s->off += n;
        s->msg_bytes = n;
        return convd_wire_pack(&req.base);
      }
      case 3: {
        /* An input in a region is not sent; the stream still ends with a half-close. */
        if ((s->in_regions & IN_REGION_X) || !convd_band_iter_next(&s->in_it)) {
          s->phase = 4;
          return NULL;
        }
        /* The message is built around its data: the band is gathered (or read) straight in. */
        uint8_t *data, *msg;
        size_t total;
        if ((msg = convd_wire_band_message(CONVD_WIRE_REQUEST_INPUT, s->in_it.n, s->in_it.h0,
                                           s->in_it.h1, s->in_it.off, s->in_it.len, &data,
                                           &total)) == NULL)
          return NULL;
        if (s->io == NULL) {
          convd_band_gather(s->x, &s->in_it.s, s->in_it.n, s->in_it.h0, s->in_it.h1,
                            s->in_it.off, data, s->in_it.len);
        } else {
          int rc = s->io->read_input(s->io->ctx, s->in_it.n, s->in_it.h0, s->in_it.h1,
                                     s->in_it.off, data, s->in_it.len);
          if (rc) {
            char err[160];
            snprintf(err, sizeof err, "reading input rows [%" PRId64 ", %" PRId64 ") of batch item %" PRId64
                     " failed (%s)", s->in_it.h0, s->in_it.h1, s->in_it.n, convd_strerror(rc));
            local_fail(s, rc, err);
            free(msg);
            return NULL;
          }
        }
        s->msg_bytes = s->in_it.len;
        return convd_wire_take(msg, total);
      }
      default:
        return NULL;
    }
  }
}

static void local_fail(stream *s, int rc, const char *msg) {
  if (s->local_rc) return;
  s->local_rc = rc;
  snprintf(s->local_err, sizeof s->local_err, "%s", msg);
}

typedef struct scatter_ctx {
  stream *s;
  int64_t n, h0, h1;
  uint64_t offset;
} scatter_ctx;

/* One contiguous run of an output piece, at byte off of the piece: into y, or to the caller. */
static void scatter_run(void *ctx, size_t off, const void *p, size_t len) {
  const scatter_ctx *x = ctx;
  stream *s = x->s;
  if (s->io == NULL) {
    convd_band_scatter(s->y, &s->out_shape, x->n, x->h0, x->h1, x->offset + off, p, len);
    return;
  }
  int rc = s->local_rc ? 0 : s->io->write_output(s->io->ctx, x->n, x->h0, x->h1, x->offset + off, p, len);
  if (rc) {
    char msg[160];
    snprintf(msg, sizeof msg, "writing output rows [%" PRId64 ", %" PRId64 ") of batch item %" PRId64
             " failed (%s)", x->h0, x->h1, x->n, convd_strerror(rc));
    local_fail(s, rc, msg);
  }
}

/* An output band piece: checked against the output's shape, then written into y from where it
 * lies (data, or the received message's slices in wb). */
static void on_output(stream *s, int64_t n, int64_t h0, int64_t h1, uint64_t offset, size_t len,
                      const void *data, const convd_wire_band *wb) {
  char msg[256];
  const convd_band_shape *sh = &s->out_shape;
  if (s->in_regions & IN_REGION_Y) {
    local_fail(s, CONVD_EREMOTE, "the server sent output bands for an output it was to write to its region");
    return;
  }
  if (!s->accepted) {
    local_fail(s, CONVD_EREMOTE, "the server sent output before accepting the call");
    return;
  }
  if (n < 0 || n >= sh->n || h0 < 0 || h1 <= h0 || h1 > sh->h ||
      offset > convd_band_bytes(sh, h0, h1) || len > convd_band_bytes(sh, h0, h1) - offset) {
    snprintf(msg, sizeof msg,
             "the server sent an output band outside the output (n=%" PRId64 " rows [%" PRId64
             ", %" PRId64 ") offset %" PRIu64 ", %zu bytes)",
             n, h0, h1, offset, len);
    local_fail(s, CONVD_EREMOTE, msg);
    return;
  }
  scatter_ctx x = {s, n, h0, h1, offset};
  if (data || wb == NULL) scatter_run(&x, 0, data, len);
  else convd_wire_band_each(wb, scatter_run, &x);
  if (s->out_bytes_seen == 0 && s->st) s->st->first_output_seconds = convd_now_seconds() - s->t0;
  s->out_bytes_seen += len;
  /* a band's pieces come back to back and in order: its last one completes its rows */
  if (offset + len == convd_band_bytes(sh, h0, h1)) { /* (one sent twice is caught at the end) */
    const uint64_t rows = (uint64_t)(h1 - h0);
    s->rows_done = s->rows_total - s->rows_done < rows ? s->rows_total : s->rows_done + rows;
  }
  report_progress(s);
}

static void on_response(stream *s, const Convd__V1__ConvResponse *r) {
  const convd_conv *cv = s->conv;
  switch (r->msg_case) {
    case CONVD__V1__CONV_RESPONSE__MSG_ACCEPTED: {
      const Convd__V1__Shape4 *o = r->accepted->output_shape;
      if (o == NULL || o->d0 != cv->p.n || o->d1 != cv->p.c_out || o->d2 != cv->h_out ||
          o->d3 != cv->w_out) {
        local_fail(s, CONVD_EREMOTE, "the server accepted the call with a different output shape");
        return;
      }
      s->accepted = 1;
      if (s->st) s->st->elemental_ops = r->accepted->elemental_ops;
      return;
    }
    case CONVD__V1__CONV_RESPONSE__MSG_OUTPUT: {
      const Convd__V1__RowBand *b = r->output;
      on_output(s, b->n, b->h_begin, b->h_end, b->offset, b->data.len, b->data.data, NULL);
      return;
    }
    case CONVD__V1__CONV_RESPONSE__MSG_PROGRESS: {
      if (!(s->in_regions & IN_REGION_Y)) return; /* nothing to learn from it */
      const Convd__V1__Progress *g = r->progress;
      if (!s->accepted || g->rows_total != s->rows_total || g->rows_done > g->rows_total ||
          g->rows_done < s->rows_done) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "the server reported %" PRIu64 " of %" PRIu64 " output rows written, after %" PRIu64
                 " of %" PRIu64 "%s",
                 g->rows_done, g->rows_total, s->rows_done, s->rows_total,
                 s->accepted ? "" : " (before accepting the call)");
        local_fail(s, CONVD_EREMOTE, msg);
        return;
      }
      if (s->rows_done == 0 && g->rows_done > 0 && s->st)
        s->st->first_output_seconds = convd_now_seconds() - s->t0;
      s->rows_done = g->rows_done;
      report_progress(s);
      return;
    }
    case CONVD__V1__CONV_RESPONSE__MSG_SUMMARY:
      if (s->st) {
        s->st->elapsed_seconds = r->summary->elapsed_seconds;
        s->st->compute_seconds = r->summary->compute_seconds;
        s->st->ops_run = r->summary->ops_run;
        s->st->bytes_received = r->summary->bytes_received;
        s->st->bytes_sent = r->summary->bytes_sent;
      }
      return;
    default:
      return; /* a newer server's message kind: ignore */
  }
}

/* Tensors in the wire's dtype: the caller's floats as they are for float32, else narrowed
 * copies (and an output buffer widened into the caller's y at the end). */
typedef struct wire_tensors {
  const void *x, *w, *b;
  void *y;
  void *own[4];
} wire_tensors;

static void wire_free(wire_tensors *t) {
  for (int i = 0; i < 4; i++) free(t->own[i]);
}

/* in_regions (IN_REGION_*): tensors in shared memory, which get no wire copy. */
static int wire_make(wire_tensors *t, const convd_conv *cv, const float *x, const float *w,
                     const float *b, float *y, unsigned in_regions, char *err, size_t errlen) {
  memset(t, 0, sizeof *t);
  const int dt = cv->p.dtype;
  if (dt == CONVD_F32) {
    t->x = x, t->w = w, t->b = b, t->y = y;
    return 0;
  }
  const float *src[3] = {x, w, b};
  const size_t elems[3] = {in_regions & IN_REGION_X ? 0 : cv->input_elems,
                           in_regions & IN_REGION_W ? 0 : cv->weight_elems,
                           b && !(in_regions & IN_REGION_B) ? cv->bias_elems : 0};
  int short_of = 0;
  for (int i = 0; i < 3; i++) {
    if (elems[i] == 0) continue;
    if ((t->own[i] = malloc(elems[i] * cv->wire_elem)) == NULL) {
      short_of = 1;
      break;
    }
    convd_dtype_encode(dt, src[i], t->own[i], elems[i]);
  }
  if (!(in_regions & IN_REGION_Y) && (t->own[3] = malloc(cv->output_wire_bytes)) == NULL) short_of = 1;
  if (short_of) {
    wire_free(t);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory narrowing the tensors to %s",
                      convd_dtype_name(dt));
  }
  t->x = t->own[0], t->w = t->own[1], t->b = t->own[2], t->y = t->own[3];
  return 0;
}

/* The call succeeded: the output reaches the caller as float32 (one in a region stays there, in
 * the wire's dtype). */
static void wire_done(wire_tensors *t, const convd_conv *cv, float *y) {
  if (cv->p.dtype != CONVD_F32 && t->y) convd_dtype_decode(cv->p.dtype, t->y, y, cv->output_elems);
  wire_free(t);
}

/* The calls proper, on tensors already in the wire's dtype; conv is p checked. */
static int conv2d_stream_io(convd_client *c, const convd_conv *cv, const convd_client_call_opts *co,
                            const void *x, const void *w, const void *b, void *y,
                            convd_client_stats *st, char *err, size_t errlen);
static int conv2d_unary(convd_client *c, const convd_conv *conv, const convd_client_call_opts *co,
                        const void *x, const void *w, const void *b, void *y,
                        convd_client_stats *st, char *err, size_t errlen);

int convd_client_conv2d(convd_client *c, const convd_client_conv_params *p, const float *x,
                        const float *w, const float *b, float *y, convd_client_stats *st,
                        char *err, size_t errlen) {
  return convd_client_conv2d_ex(c, p, NULL, x, w, b, y, st, err, errlen);
}

int convd_client_conv2d_unary(convd_client *c, const convd_client_conv_params *p, const float *x,
                              const float *w, const float *b, float *y, convd_client_stats *st,
                              char *err, size_t errlen) {
  const convd_client_call_opts co = {.unary = 1};
  return convd_client_conv2d_ex(c, p, &co, x, w, b, y, st, err, errlen);
}

int convd_client_conv2d_io(convd_client *c, const convd_client_conv_params *p,
                           const convd_client_io *io, const float *w, const float *b,
                           convd_client_stats *st, char *err, size_t errlen) {
  if (io == NULL) return convd_errf(err, errlen, CONVD_EINVAL, "io needs read_input and write_output");
  const convd_client_call_opts co = {.io = io};
  return convd_client_conv2d_ex(c, p, &co, NULL, w, b, NULL, st, err, errlen);
}

int convd_client_conv2d_shm(convd_client *c, const convd_client_conv_params *p,
                            const convd_client_shm_refs *refs, const float *x, const float *w,
                            const float *b, float *y, convd_client_stats *st, char *err,
                            size_t errlen) {
  const convd_client_call_opts co = {.shm = refs};
  return convd_client_conv2d_ex(c, p, &co, x, w, b, y, st, err, errlen);
}

/* The IN_REGION_* bits of refs, once each named region and range is checked as far as a client
 * can (the daemon checks the rest: that the region is the caller's, the range inside it, no
 * overlap with the output); the pointers of the tensors not in regions must be there (the
 * weights' and bias' only without registered weights, reg_w 0). */
static int shm_refs_check(const convd_conv *cv, const convd_client_shm_refs *refs, const float *x,
                          const float *w, const float *b, const float *y, int reg_w,
                          unsigned *in_regions, char *err, size_t errlen) {
  static const char *const names[4] = {"input", "weight", "bias", "output"};
  static const char *const args[4] = {"x", "w", "b", "y"};
  const convd_client_tensor_ref *r[4] = {&refs->input, &refs->weight, &refs->bias, &refs->output};
  const void *ptr[4] = {x, w, b, y};
  const size_t len[4] = {cv->input_wire_bytes, cv->weight_wire_bytes, cv->bias_wire_bytes,
                         cv->output_wire_bytes};
  *in_regions = 0;
  for (int i = 0; i < 4; i++) {
    if (reg_w && (i == 1 || i == 2)) {
      if (r[i]->region)
        return convd_errf(err, errlen, CONVD_EINVAL,
                          "refs->%s names region %s, but the call names registered weights: one or "
                          "the other", names[i], r[i]->region);
      continue;
    }
    if (i == 2 && !cv->p.has_bias) {
      if (r[i]->region)
        return convd_errf(err, errlen, CONVD_EINVAL, "refs->bias names region %s, but p->has_bias is 0",
                          r[i]->region);
      continue;
    }
    if (r[i]->region == NULL) {
      if (ptr[i] == NULL)
        return convd_errf(err, errlen, CONVD_EINVAL, "%s is NULL and refs->%s names no region",
                          args[i], names[i]);
      continue;
    }
    const size_t n = strlen(r[i]->region);
    if (n < 2 || n > CONVD_CLIENT_REGION_NAME_MAX || r[i]->region[0] != '/')
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "refs->%s.region \"%.40s%s\": expected \"/\" then 1 to %d characters", names[i],
                        r[i]->region, n > 40 ? "..." : "", CONVD_CLIENT_REGION_NAME_MAX - 1);
    if (r[i]->offset > UINT64_MAX - len[i])
      return convd_errf(err, errlen, CONVD_ERANGE, "refs->%s.offset %" PRIu64 " + the tensor's %zu bytes overflows",
                        names[i], r[i]->offset, len[i]);
    *in_regions |= 1u << i;
  }
  return 0;
}

/* Checks p and co, narrows the tensors to the wire's dtype (all but those in regions or the
 * registry), makes the call and widens the output. */
int convd_client_conv2d_ex(convd_client *c, const convd_client_conv_params *cp,
                           const convd_client_call_opts *co, const float *x, const float *w,
                           const float *b, float *y, convd_client_stats *st, char *err,
                           size_t errlen) {
  static const convd_client_call_opts none = {0};
  if (co == NULL) co = &none;
  if (co->io != NULL && (co->shm != NULL || co->unary))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "co->io is a variant of a streamed call: it goes with neither co->shm nor co->unary");
  const int reg_w = co->weights_id != NULL;
  if (reg_w && (co->weights_id[0] == '\0' || strlen(co->weights_id) > CONVD_CLIENT_WEIGHTS_ID_MAX))
    return convd_errf(err, errlen, CONVD_EINVAL, "co->weights_id must be 1 to %d characters",
                      CONVD_CLIENT_WEIGHTS_ID_MAX);
  convd_conv_params ep;
  convd_client_params_to_conv(cp, &ep);
  convd_conv conv;
  int rc = convd_conv_init(&conv, &ep, err, errlen);
  if (rc) return rc;
  unsigned skip = reg_w ? IN_REGION_W | IN_REGION_B : 0; /* tensors that get no wire copy */
  if (co->shm) {
    unsigned in_regions;
    if ((rc = shm_refs_check(&conv, co->shm, x, w, b, y, reg_w, &in_regions, err, errlen))) return rc;
    skip |= in_regions;
  } else if (ep.has_bias && b == NULL && !reg_w) {
    return convd_errf(err, errlen, CONVD_EINVAL, "has_bias is set but no bias was given");
  }
  if (co->io) {
    if (ep.dtype != CONVD_F32)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "band-by-band input and output are float32 only; for %s use "
                        "convd_client_conv2d, which narrows whole tensors",
                        convd_dtype_name(ep.dtype));
    if (co->io->read_input == NULL || co->io->write_output == NULL)
      return convd_errf(err, errlen, CONVD_EINVAL, "io needs read_input and write_output");
    return conv2d_stream_io(c, &conv, co, NULL, w, b, NULL, st, err, errlen);
  }
  wire_tensors t;
  if ((rc = wire_make(&t, &conv, x, w, b, y, skip, err, errlen))) return rc;
  rc = co->unary ? conv2d_unary(c, &conv, co, t.x, t.w, t.b, t.y, st, err, errlen)
                 : conv2d_stream_io(c, &conv, co, t.x, t.w, t.b, t.y, st, err, errlen);
  if (rc == 0)
    wire_done(&t, &conv, y);
  else
    wire_free(&t);
  return rc;
}

static int conv2d_stream_io(convd_client *c, const convd_conv *cv, const convd_client_call_opts *co,
                            const void *x, const void *w, const void *b, void *y,
                            convd_client_stats *st, char *err, size_t errlen) {
  const convd_client_io *io = co->io;
  const convd_client_shm_refs *refs = co->shm;
  const convd_conv_params *p = &cv->p;
  const convd_conv conv = *cv;
  int rc;
  if (st) {
    memset(st, 0, sizeof *st);
    st->output_shape[0] = p->n, st->output_shape[1] = p->c_out;
    st->output_shape[2] = conv.h_out, st->output_shape[3] = conv.w_out;
  }
  stream s = {.cl = c, .conv = &conv, .x = x, .w = w, .b = b, .y = y, .io = io, .refs = refs,
              .rows_total = (uint64_t)p->n * (uint64_t)conv.h_out, .st = st, .co = co,
              .t0 = convd_now_seconds()};
  if (refs) {
    const convd_client_tensor_ref *r[4] = {&refs->input, &refs->weight, &refs->bias, &refs->output};
    for (int i = 0; i < 4; i++)
      if (r[i]->region) s.in_regions |= 1u << i;
  }
  convd_band_shape in_shape = {p->n, p->c_in, p->h, p->w, conv.wire_elem};
  convd_band_iter_init(&s.in_it, &in_shape, c->o.chunk_bytes);
  s.out_shape = (convd_band_shape){p->n, p->c_out, conv.h_out, conv.w_out, conv.wire_elem};

  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  grpc_call *call = grpc_channel_create_registered_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                                        c->m_conv2d, deadline(c), NULL);
  call_track(c, call);
  grpc_metadata_array md_initial, md_trailing;
  grpc_metadata_array_init(&md_initial);
  grpc_metadata_array_init(&md_trailing);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  grpc_byte_buffer *send_buf = NULL, *recv_buf = NULL;
  int sending = 0, recving = 0, md_pending = 0, status_pending = 0;

  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[0].data.recv_status_on_client.trailing_metadata = &md_trailing;
  ops[0].data.recv_status_on_client.status = &status;
  ops[0].data.recv_status_on_client.status_details = &details;
  if (grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)T_STATUS, NULL) == GRPC_CALL_OK)
    status_pending = 1;
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[0].data.recv_initial_metadata.recv_initial_metadata = &md_initial;
  if (grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)T_MD, NULL) == GRPC_CALL_OK)
    md_pending = 1;
  memset(ops, 0, sizeof ops);
  send_buf = next_request(&s);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = c->n_md;
  ops[0].data.send_initial_metadata.metadata = c->md;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send_buf;
  if (send_buf && grpc_call_start_batch(call, ops, 2, (void *)(intptr_t)T_SEND, NULL) == GRPC_CALL_OK)
    sending = 1;
  else
    local_fail(&s, CONVD_ENOMEM, "out of memory starting the call");

  /* Receive starts after initial metadata: RECV_MESSAGE may be posted at once. */
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_MESSAGE;
  ops[0].data.recv_message.recv_message = &recv_buf;
  if (grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)T_RECV, NULL) == GRPC_CALL_OK)
    recving = 1;

  while (sending || recving || md_pending || status_pending) {
    grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type != GRPC_OP_COMPLETE) continue;
    switch ((intptr_t)ev.tag) {
      case T_SEND:
        sending = 0;
        if (send_buf) grpc_byte_buffer_destroy(send_buf);
        send_buf = NULL;
        if (ev.success && s.msg_bytes) {
          s.bytes_sent += s.msg_bytes;
          s.msg_bytes = 0;
          report_progress(&s);
        }
        if (!ev.success || s.local_rc || s.phase >= 5) break;
        memset(ops, 0, sizeof ops);
        send_buf = next_request(&s);
        if (send_buf) {
          ops[0].op = GRPC_OP_SEND_MESSAGE;
          ops[0].data.send_message.send_message = send_buf;
        } else if (s.phase == 4) {
          ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
          s.phase = 5;
          if (st) st->upload_seconds = convd_now_seconds() - s.t0;
        } else {
          local_fail(&s, CONVD_ENOMEM, "out of memory packing a request");
          grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED, "client out of memory", NULL);
          break;
        }
        if (grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)T_SEND, NULL) == GRPC_CALL_OK)
          sending = 1;
        break;
      case T_RECV:
        recving = 0;
        if (!ev.success || recv_buf == NULL) break; /* end of the response stream */
        {
          convd_wire_band wb;
          /* output bands, the bulk of the stream, are read where they lie */
          if (convd_wire_parse_band(recv_buf, CONVD_WIRE_RESPONSE_OUTPUT, &wb)) {
            on_output(&s, wb.n, wb.h_begin, wb.h_end, wb.offset, wb.data_len, NULL, &wb);
          } else {
            Convd__V1__ConvResponse *r = (Convd__V1__ConvResponse *)convd_wire_unpack(
                recv_buf, &convd__v1__conv_response__descriptor);
            if (r == NULL) {
              local_fail(&s, CONVD_EREMOTE, "the server sent a message that is not a ConvResponse");
            } else {
              on_response(&s, r);
              protobuf_c_message_free_unpacked(&r->base, NULL);
            }
          }
          grpc_byte_buffer_destroy(recv_buf);
          recv_buf = NULL;
          if (s.local_rc) {
            grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED, s.local_err, NULL);
            break;
          }
        }
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_MESSAGE;
        ops[0].data.recv_message.recv_message = &recv_buf;
        if (grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)T_RECV, NULL) == GRPC_CALL_OK)
          recving = 1;
        break;
      case T_MD:
        md_pending = 0;
        break;
      case T_STATUS:
        status_pending = 0;
        break;
    }
  }
  if (send_buf) grpc_byte_buffer_destroy(send_buf);
  if (recv_buf) grpc_byte_buffer_destroy(recv_buf);
  if (status == GRPC_STATUS_OK && !s.local_rc && (s.in_regions & IN_REGION_Y) &&
      s.rows_done != s.rows_total) {
    char msg[160];
    snprintf(msg, sizeof msg, "the call ended with %" PRIu64 " of the output's %" PRIu64
             " rows reported written to its region", s.rows_done, s.rows_total);
    local_fail(&s, CONVD_EREMOTE, msg);
  } else if (status == GRPC_STATUS_OK && !s.local_rc && !(s.in_regions & IN_REGION_Y) &&
             s.out_bytes_seen != conv.output_wire_bytes) {
    char msg[160];
    snprintf(msg, sizeof msg, "the call ended with %zu of the output's %zu bytes received",
             s.out_bytes_seen, conv.output_wire_bytes);
    local_fail(&s, CONVD_EREMOTE, msg);
  }
  if (st) st->total_seconds = convd_now_seconds() - s.t0;
  rc = finish_status(c, status, details, s.local_rc, err, errlen, s.local_err);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md_initial);
  grpc_metadata_array_destroy(&md_trailing);
  call_track(c, NULL);
  grpc_call_unref(call);
  cq_destroy(cq);
  return rc;
}

/* ---- unary calls ------------------------------------------------------------------------ */

/* Sends one request message and receives one response. *resp is the raw response buffer. */
static int unary_call(convd_client *c, void *method, grpc_byte_buffer *req,
                      grpc_byte_buffer **resp, char *err, size_t errlen) {
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  grpc_call *call = grpc_channel_create_registered_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                                        method, deadline(c), NULL);
  call_track(c, call);
  grpc_metadata_array md_initial, md_trailing;
  grpc_metadata_array_init(&md_initial);
  grpc_metadata_array_init(&md_trailing);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  *resp = NULL;
  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = c->n_md;
  ops[0].data.send_initial_metadata.metadata = c->md;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = req;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_initial;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = resp;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &md_trailing;
  ops[5].data.recv_status_on_client.status = &status;
  ops[5].data.recv_status_on_client.status_details = &details;
  int local_rc = 0;
  if (grpc_call_start_batch(call, ops, 6, (void *)1, NULL) == GRPC_CALL_OK) {
    grpc_event ev;
    do ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    while (ev.type != GRPC_OP_COMPLETE);
  } else {
    local_rc = CONVD_EINTERNAL;
  }
  int rc = finish_status(c, status, details, local_rc, err, errlen, "cannot start the call");
  if (rc == 0 && *resp == NULL) {
    c->last_status = GRPC_STATUS_INTERNAL;
    rc = convd_errf(err, errlen, CONVD_EREMOTE, "the server answered OK with no message");
  }
  if (rc && *resp) {
    grpc_byte_buffer_destroy(*resp);
    *resp = NULL;
  }
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md_initial);
  grpc_metadata_array_destroy(&md_trailing);
  call_track(c, NULL);
  grpc_call_unref(call);
  cq_destroy(cq);
  return rc;
}

/* A unary call of protobuf messages: packs req, and unpacks the answer as resp_desc into *resp
 * (free with protobuf_c_message_free_unpacked). */
static int unary_message(convd_client *c, void *method, const ProtobufCMessage *req,
                         const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp,
                         char *err, size_t errlen) {
  grpc_byte_buffer *bb = convd_wire_pack(req), *rb = NULL;
  if (bb == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  int rc = unary_call(c, method, bb, &rb, err, errlen);
  grpc_byte_buffer_destroy(bb);
  if (rc) return rc;
  *resp = convd_wire_unpack(rb, resp_desc);
  grpc_byte_buffer_destroy(rb);
  if (*resp == NULL)
    return convd_errf(err, errlen, CONVD_EREMOTE, "the response is not a valid %s", resp_desc->name);
  return 0;
}

static int conv2d_unary(convd_client *c, const convd_conv *cv, const convd_client_call_opts *co,
                        const void *x, const void *w, const void *b, void *y,
                        convd_client_stats *st, char *err, size_t errlen) {
  const convd_conv_params *p = &cv->p;
  const convd_conv conv = *cv;
  const double t0 = convd_now_seconds();
  int rc;
  spec_storage sp;
  make_spec(&sp, p, co);
  /* Tensors in regions are named in the spec and left out of the messages. */
  const convd_client_shm_refs *refs = co->shm;
  spec_add_regions(&sp, cv, refs);
  const int x_in = refs && refs->input.region, w_in = refs && refs->weight.region,
            b_in = refs && refs->bias.region, y_in = refs && refs->output.region;
  Convd__V1__ConvCall req = CONVD__V1__CONV_CALL__INIT;
  req.spec = &sp.spec;
  if (!x_in) {
    req.input.data = (uint8_t *)x;
    req.input.len = conv.input_wire_bytes;
  }
  if (co->weights_id == NULL) { /* registered weights travel as their id alone */
    if (!w_in) {
      req.weight.data = (uint8_t *)w;
      req.weight.len = conv.weight_wire_bytes;
    }
    if (!b_in) {
      req.bias.data = (uint8_t *)b;
      req.bias.len = conv.bias_wire_bytes;
    }
  }
  const size_t out_msg = y_in ? 0 : conv.output_wire_bytes;
  size_t req_bytes = protobuf_c_message_get_packed_size(&req.base);
  if (req_bytes > c->o.max_message_bytes || out_msg + CONVD_WIRE_FRAMING_SLACK > c->o.max_message_bytes)
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "a unary call of %zu request bytes and %zu output bytes does not fit the "
                      "message limit of %zu bytes: use the streaming Conv2d call "
                      "(convd_client_conv2d)",
                      req_bytes, conv.output_wire_bytes, c->o.max_message_bytes);
  grpc_byte_buffer *bb = convd_wire_pack(&req.base), *resp = NULL;
  if (bb == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  rc = unary_call(c, c->m_unary, bb, &resp, err, errlen);
  grpc_byte_buffer_destroy(bb);
  if (rc) return rc;
  Convd__V1__ConvResult *r = (Convd__V1__ConvResult *)convd_wire_unpack(resp, &convd__v1__conv_result__descriptor);
  grpc_byte_buffer_destroy(resp);
  if (r == NULL) return convd_errf(err, errlen, CONVD_EREMOTE, "the response is not a ConvResult");
  if (r->output.len != out_msg) {
    rc = convd_errf(err, errlen, CONVD_EREMOTE, "the response has %zu output bytes, expected %zu",
                    r->output.len, out_msg);
  } else {
    if (!y_in) memcpy(y, r->output.data, conv.output_wire_bytes);
    if (co->progress) {
      const uint64_t rows = (uint64_t)p->n * (uint64_t)conv.h_out;
      const convd_client_progress pr = {rows, rows, req.input.len + req.weight.len + req.bias.len,
                                        conv.output_wire_bytes, convd_now_seconds() - t0};
      co->progress(co->progress_ctx, &pr);
    }
    if (st) {
      memset(st, 0, sizeof *st);
      st->output_shape[0] = p->n, st->output_shape[1] = p->c_out;
      st->output_shape[2] = conv.h_out, st->output_shape[3] = conv.w_out;
      st->total_seconds = convd_now_seconds() - t0;
      if (r->summary) {
        st->elapsed_seconds = r->summary->elapsed_seconds;
        st->compute_seconds = r->summary->compute_seconds;
        st->ops_run = r->summary->ops_run;
        st->bytes_received = r->summary->bytes_received;
        st->bytes_sent = r->summary->bytes_sent;
      }
    }
  }
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return rc;
}

int convd_client_list_devices(convd_client *c, convd_client_device **devs, size_t *n, char *err,
                              size_t errlen) {
  *devs = NULL;
  *n = 0;
  Convd__V1__ListDevicesRequest req = CONVD__V1__LIST_DEVICES_REQUEST__INIT;
  Convd__V1__ListDevicesResponse *r = NULL;
  int rc = unary_message(c, c->m_list, &req.base, &convd__v1__list_devices_response__descriptor,
                         (ProtobufCMessage **)&r, err, errlen);
  if (rc) return rc;
  convd_client_device *out = calloc(r->n_devices ? r->n_devices : 1, sizeof *out);
  if (out == NULL) {
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  }
  for (size_t i = 0; i < r->n_devices; i++) {
    const Convd__V1__Device *d = r->devices[i];
    out[i].index = d->index;
    out[i].kind = d->kind == CONVD__V1__DEVICE_KIND__DEVICE_KIND_CPU    ? CONVD_CLIENT_DEVICE_CPU
                  : d->kind == CONVD__V1__DEVICE_KIND__DEVICE_KIND_CUDA ? CONVD_CLIENT_DEVICE_CUDA
                                                                        : CONVD_CLIENT_DEVICE_REFERENCE;
    snprintf(out[i].name, sizeof out[i].name, "%s", d->name ? d->name : "");
    out[i].memory_bytes = d->memory_bytes;
    out[i].completed_ops = d->completed_ops;
    out[i].healthy = d->healthy;
    snprintf(out[i].detail, sizeof out[i].detail, "%s", d->detail ? d->detail : "");
    out[i].busy_seconds = d->busy_seconds;
    out[i].stats.weight_cache_hits = d->weight_cache_hits;
    out[i].stats.weight_cache_misses = d->weight_cache_misses;
    out[i].stats.weight_bytes_loaded = d->weight_bytes_loaded;
    out[i].stats.bytes_to_device = d->bytes_to_device;
    out[i].stats.bytes_from_device = d->bytes_from_device;
    out[i].stats.kernel_ns = (uint64_t)(d->kernel_seconds * 1e9);
  }
  *devs = out;
  *n = r->n_devices;
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return 0;
}

int convd_client_health(convd_client *c, const char *service, int *serving, char *err, size_t errlen) {
  *serving = 0;
  Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  req.service = (char *)(service ? service : "");
  Grpc__Health__V1__HealthCheckResponse *r = NULL;
  int rc = unary_message(c, c->m_health, &req.base, &grpc__health__v1__health_check_response__descriptor,
                         (ProtobufCMessage **)&r, err, errlen);
  if (rc) return rc;
  *serving = r->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return 0;
}

/* ---- the weights registry ---------------------------------------------------------------- */

/* A call's queue whose batches (one at a time per tag) are waited for in turn: completions of
 * other tags met meanwhile are kept for their own wait. */
typedef struct tag_queue {
  grpc_completion_queue *cq;
  unsigned done;    /* bit 1 << tag: completed, not yet waited for */
  int success[8];
} tag_queue;

/* Waits for tag's batch to complete; its success. */
static int wait_for(tag_queue *q, int tag) {
  while (!(q->done & (1u << tag))) {
    grpc_event ev = grpc_completion_queue_next(q->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type != GRPC_OP_COMPLETE) continue;
    const int t = (int)(intptr_t)ev.tag;
    q->done |= 1u << t;
    q->success[t] = ev.success;
  }
  q->done &= ~(1u << tag);
  return q->success[tag];
}

/* One PutWeightsRequest sent as a batch, waited for; 0 when gRPC took it (the call may still
 * fail: its status says). */
static int put_send(grpc_call *call, tag_queue *q, const convd_client *c,
                    const Convd__V1__PutWeightsRequest *m, int first) {
  grpc_byte_buffer *bb = convd_wire_pack(&m->base);
  if (bb == NULL) return CONVD_ENOMEM;
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = 0;
  if (first) {
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = c->n_md;
    ops[n++].data.send_initial_metadata.metadata = (grpc_metadata *)c->md;
  }
  ops[n].op = GRPC_OP_SEND_MESSAGE;
  ops[n++].data.send_message.send_message = bb;
  int ok = grpc_call_start_batch(call, ops, n, (void *)(intptr_t)T_SEND, NULL) == GRPC_CALL_OK &&
           wait_for(q, T_SEND);
  grpc_byte_buffer_destroy(bb);
  return ok ? 0 : CONVD_EIO;
}

int convd_client_put_weights(convd_client *c, const convd_client_weights_spec *ws, const float *w,
                             const float *b, char id[CONVD_CLIENT_WEIGHTS_ID_MAX + 1],
                             int *already_present, char *err, size_t errlen) {
  id[0] = '\0';
  if (already_present) *already_present = 0;
  const int64_t groups = ws->groups == 0 ? 1 : ws->groups;
  size_t w_elems = 1;
  for (int i = 0; i < 4; i++)
    if (ws->shape[i] < 1 || ws->shape[i] > CONVD_DIM_MAX || convd_size_mul(w_elems, (size_t)ws->shape[i], &w_elems))
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "weight shape %" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 ": each dimension "
                        "must be 1 to %" PRId64 " and their product fit memory",
                        ws->shape[0], ws->shape[1], ws->shape[2], ws->shape[3], (int64_t)CONVD_DIM_MAX);
  if (groups < 1 || groups > CONVD_DIM_MAX || (!ws->transposed && ws->groups > 1))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "groups %" PRId64 ": registered weights take groups for a transpose only (a "
                      "conv2d's weights imply it: C_in/groups is their second dimension)", ws->groups);
  if (ws->dtype != CONVD_F32 && ws->dtype != CONVD_F16 && ws->dtype != CONVD_BF16)
    return convd_errf(err, errlen, CONVD_EINVAL, "dtype %d is not a CONVD_CLIENT_* element type", ws->dtype);
  if (w == NULL) return convd_errf(err, errlen, CONVD_EINVAL, "w is NULL");
  const size_t b_elems = b == NULL ? 0 : (size_t)(ws->transposed ? ws->shape[1] * groups : ws->shape[0]);
  const size_t elem = ws->dtype == CONVD_F32 ? 4 : 2;
  size_t w_bytes;
  if (convd_size_mul(w_elems, elem, &w_bytes))
    return convd_errf(err, errlen, CONVD_ERANGE, "the weights do not fit memory");
  /* narrowed copies for the half types */
  void *wn = NULL, *bn = NULL;
  const void *wsend = w, *bsend = b;
  if (ws->dtype != CONVD_F32) {
    wn = malloc(w_bytes ? w_bytes : 1);
    bn = b_elems ? malloc(b_elems * elem) : NULL;
    if (wn == NULL || (b_elems && bn == NULL)) {
      free(wn), free(bn);
      return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory narrowing the weights to %s",
                        convd_dtype_name(ws->dtype));
    }
    convd_dtype_encode(ws->dtype, w, wn, w_elems);
    if (b_elems) convd_dtype_encode(ws->dtype, b, bn, b_elems);
    wsend = wn, bsend = bn;
  }

  Convd__V1__Shape4 shape = CONVD__V1__SHAPE4__INIT;
  shape.d0 = ws->shape[0], shape.d1 = ws->shape[1], shape.d2 = ws->shape[2], shape.d3 = ws->shape[3];
  Convd__V1__WeightsSpec spec = CONVD__V1__WEIGHTS_SPEC__INIT;
  spec.weight_shape = &shape;
  spec.has_bias = b != NULL;
  spec.dtype = ws->dtype == CONVD_F16    ? CONVD__V1__DTYPE__DTYPE_FLOAT16
               : ws->dtype == CONVD_BF16 ? CONVD__V1__DTYPE__DTYPE_BFLOAT16
                                         : CONVD__V1__DTYPE__DTYPE_FLOAT32;
  spec.op = ws->transposed ? CONVD__V1__OP__OP_CONV_TRANSPOSE2D : CONVD__V1__OP__OP_CONV2D;
  spec.groups = ws->transposed ? groups : 0;

  tag_queue q = {.cq = grpc_completion_queue_create_for_next(NULL)};
  grpc_call *call = grpc_channel_create_registered_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, q.cq,
                                                        c->m_put_weights, deadline(c), NULL);
  call_track(c, call);
  grpc_metadata_array md_initial, md_trailing;
  grpc_metadata_array_init(&md_initial);
  grpc_metadata_array_init(&md_trailing);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  grpc_byte_buffer *resp = NULL;
  int status_posted = 0, local_rc = 0, md_posted = 0, recv_posted = 0;
  grpc_op ops[3];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[0].data.recv_status_on_client.trailing_metadata = &md_trailing;
  ops[0].data.recv_status_on_client.status = &status;
  ops[0].data.recv_status_on_client.status_details = &details;
  if (grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)T_STATUS, NULL) == GRPC_CALL_OK)
    status_posted = 1;
  else
    local_rc = CONVD_EINTERNAL;
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[0].data.recv_initial_metadata.recv_initial_metadata = &md_initial;
  if (!local_rc) md_posted = grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)T_MD, NULL) == GRPC_CALL_OK;

  Convd__V1__PutWeightsRequest m = CONVD__V1__PUT_WEIGHTS_REQUEST__INIT;
  m.msg_case = CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_SPEC;
  m.spec = &spec;
  if (!local_rc) local_rc = put_send(call, &q, c, &m, 1);
  /* the weight chunks, then the bias's, each tensor's in order */
  const size_t chunk = c->o.chunk_bytes;
  for (int t = 0; t < 2 && !local_rc; t++) {
    const size_t total = t == 0 ? w_bytes : b_elems * elem;
    const uint8_t *src = t == 0 ? wsend : bsend;
    for (size_t off = 0; off < total && !local_rc; off += chunk) {
      Convd__V1__TensorChunk ch = CONVD__V1__TENSOR_CHUNK__INIT;
      ch.offset = off;
      ch.data.data = (uint8_t *)src + off;
      ch.data.len = total - off < chunk ? total - off : chunk;
      Convd__V1__PutWeightsRequest rq = CONVD__V1__PUT_WEIGHTS_REQUEST__INIT;
      rq.msg_case = t == 0 ? CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_WEIGHT : CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_BIAS;
      if (t == 0) rq.weight = &ch;
      else rq.bias = &ch;
      local_rc = put_send(call, &q, c, &rq, 0);
    }
  }
  if (!local_rc) {
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &resp;
    recv_posted = grpc_call_start_batch(call, ops, 2, (void *)(intptr_t)T_RECV, NULL) == GRPC_CALL_OK;
    if (recv_posted) wait_for(&q, T_RECV);
    else local_rc = CONVD_EINTERNAL;
  }
  /* a send that failed means the server ended the call: its status says why */
  if (local_rc == CONVD_EIO) local_rc = 0;
  else if (local_rc && status_posted) /* this side's failure ends the call, which says so */
    grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED,
                                 local_rc == CONVD_ENOMEM ? "client out of memory" : "client failed", NULL);
  if (md_posted) wait_for(&q, T_MD);
  if (status_posted) wait_for(&q, T_STATUS);
  int rc = finish_status(c, status, details, local_rc, err, errlen, "cannot make the PutWeights call");
  if (rc == 0) {
    Convd__V1__PutWeightsResponse *r =
        resp ? (Convd__V1__PutWeightsResponse *)convd_wire_unpack(resp, &convd__v1__put_weights_response__descriptor)
             : NULL;
    if (r == NULL || r->weights_id == NULL || r->weights_id[0] == '\0' ||
        strlen(r->weights_id) > CONVD_CLIENT_WEIGHTS_ID_MAX) {
      c->last_status = GRPC_STATUS_INTERNAL;
      rc = convd_errf(err, errlen, CONVD_EREMOTE, "the server answered PutWeights without a valid weights id");
    } else {
      snprintf(id, CONVD_CLIENT_WEIGHTS_ID_MAX + 1, "%s", r->weights_id);
      if (already_present) *already_present = r->already_present;
    }
    if (r) protobuf_c_message_free_unpacked(&r->base, NULL);
  }
  if (resp) grpc_byte_buffer_destroy(resp);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md_initial);
  grpc_metadata_array_destroy(&md_trailing);
  call_track(c, NULL);
  grpc_call_unref(call);
  cq_destroy(q.cq);
  free(wn), free(bn);
  return rc;
}

int convd_client_list_weights(convd_client *c, convd_client_weights_info **weights, size_t *n,
                              convd_client_weights_totals *totals, char *err, size_t errlen) {
  *weights = NULL;
  *n = 0;
  if (totals) memset(totals, 0, sizeof *totals);
  Convd__V1__ListWeightsRequest req = CONVD__V1__LIST_WEIGHTS_REQUEST__INIT;
  Convd__V1__ListWeightsResponse *r = NULL;
  int rc = unary_message(c, c->m_list_weights, &req.base, &convd__v1__list_weights_response__descriptor,
                         (ProtobufCMessage **)&r, err, errlen);
  if (rc) return rc;
  convd_client_weights_info *out = calloc(r->n_weights ? r->n_weights : 1, sizeof *out);
  if (out == NULL) {
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  }
  for (size_t i = 0; i < r->n_weights; i++) {
    const Convd__V1__WeightsInfo *wi = r->weights[i];
    snprintf(out[i].id, sizeof out[i].id, "%s", wi->weights_id ? wi->weights_id : "");
    if (wi->weight_shape) {
      out[i].shape[0] = wi->weight_shape->d0, out[i].shape[1] = wi->weight_shape->d1;
      out[i].shape[2] = wi->weight_shape->d2, out[i].shape[3] = wi->weight_shape->d3;
    }
    out[i].has_bias = wi->has_bias;
    out[i].dtype = wi->dtype == CONVD__V1__DTYPE__DTYPE_FLOAT16    ? CONVD_CLIENT_FLOAT16
                   : wi->dtype == CONVD__V1__DTYPE__DTYPE_BFLOAT16 ? CONVD_CLIENT_BFLOAT16
                                                                   : CONVD_CLIENT_FLOAT32;
    out[i].bytes = wi->bytes;
    out[i].uses = wi->uses;
    out[i].idle_seconds = wi->idle_seconds;
    out[i].in_use = wi->in_use;
  }
  if (totals) {
    totals->bytes_used = r->bytes_used;
    totals->bytes_limit = r->bytes_limit;
    totals->evictions = r->evictions;
  }
  *weights = out;
  *n = r->n_weights;
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return 0;
}

int convd_client_delete_weights(convd_client *c, const char *id, char *err, size_t errlen) {
  Convd__V1__DeleteWeightsRequest req = CONVD__V1__DELETE_WEIGHTS_REQUEST__INIT;
  req.weights_id = (char *)(id ? id : "");
  Convd__V1__DeleteWeightsResponse *r = NULL;
  int rc = unary_message(c, c->m_delete_weights, &req.base,
                         &convd__v1__delete_weights_response__descriptor, (ProtobufCMessage **)&r,
                         err, errlen);
  if (rc) return rc;
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return 0;
}

/* ---- shared-memory regions --------------------------------------------------------------- */

/* RegisterRegion of a named object, or (ticket non-NULL) of the descriptor passed for it. */
static int register_region(convd_client *c, const char *name, const char *ticket, uint64_t size,
                           uint64_t *mapped, int *in_place, char *err, size_t errlen) {
  if (mapped) *mapped = 0;
  Convd__V1__RegisterRegionRequest req = CONVD__V1__REGISTER_REGION_REQUEST__INIT;
  req.name = (char *)(name ? name : "");
  req.size = size;
  req.fd_ticket = (char *)(ticket ? ticket : "");
  Convd__V1__RegisterRegionResponse *r = NULL;
  int rc = unary_message(c, c->m_reg_region, &req.base, &convd__v1__register_region_response__descriptor,
                         (ProtobufCMessage **)&r, err, errlen);
  if (rc) return rc;
  if (mapped) *mapped = r->size;
  if (in_place) *in_place = r->in_place;
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return 0;
}

int convd_client_register_region(convd_client *c, const char *name, uint64_t size, uint64_t *mapped,
                                 char *err, size_t errlen) {
  return register_region(c, name, NULL, size, mapped, NULL, err, errlen);
}

int convd_client_unregister_region(convd_client *c, const char *name, char *err, size_t errlen) {
  Convd__V1__UnregisterRegionRequest req = CONVD__V1__UNREGISTER_REGION_REQUEST__INIT;
  req.name = (char *)(name ? name : "");
  Convd__V1__UnregisterRegionResponse *r = NULL;
  int rc = unary_message(c, c->m_unreg_region, &req.base,
                         &convd__v1__unregister_region_response__descriptor, (ProtobufCMessage **)&r,
                         err, errlen);
  if (rc) return rc;
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return 0;
}

int convd_client_list_regions(convd_client *c, convd_client_region_info **regions, size_t *n,
                              char *prefix, size_t prefix_len, char *err, size_t errlen) {
  if (regions) *regions = NULL;
  if (n) *n = 0;
  if (prefix && prefix_len) prefix[0] = '\0';
  Convd__V1__ListRegionsRequest req = CONVD__V1__LIST_REGIONS_REQUEST__INIT;
  Convd__V1__ListRegionsResponse *r = NULL;
  int rc = unary_message(c, c->m_list_regions, &req.base, &convd__v1__list_regions_response__descriptor,
                         (ProtobufCMessage **)&r, err, errlen);
  if (rc) return rc;
  const char *pfx = r->name_prefix ? r->name_prefix : "";
  if (prefix && strlen(pfx) >= prefix_len) {
    rc = convd_errf(err, errlen, CONVD_ERANGE, "the name prefix (%zu characters) does not fit %zu bytes",
                    strlen(pfx), prefix_len);
  } else if (regions) {
    convd_client_region_info *out = calloc(r->n_regions ? r->n_regions : 1, sizeof *out);
    if (out == NULL) {
      rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
    } else {
      for (size_t i = 0; i < r->n_regions; i++) {
        snprintf(out[i].name, sizeof out[i].name, "%s", r->regions[i]->name ? r->regions[i]->name : "");
        out[i].size = r->regions[i]->size;
        out[i].in_use = r->regions[i]->in_use;
      }
      *regions = out;
      if (n) *n = r->n_regions;
    }
  }
  if (rc == 0 && prefix) snprintf(prefix, prefix_len, "%s", pfx);
  protobuf_c_message_free_unpacked(&r->base, NULL);
  return rc;
}

struct convd_client_region {
  char name[CONVD_CLIENT_REGION_NAME_MAX + 1];
  void *data;
  size_t size;
  int memfd; /* a sealed memfd passed to the daemon (no object in /dev/shm to unlink) */
  int in_place;
};

void *convd_client_region_data(const convd_client_region *r) { return r->data; }
size_t convd_client_region_size(const convd_client_region *r) { return r->size; }
const char *convd_client_region_name(const convd_client_region *r) { return r->name; }
int convd_client_region_in_place(const convd_client_region *r) { return r->in_place; }

/* Random bytes for a name; the kernel's pool, which getrandom waits for only at early boot. */
static int random_bytes(uint8_t *buf, size_t n) {
  while (n) {
    const ssize_t k = getrandom(buf, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    buf += k, n -= (size_t)k;
  }
  return 0;
}

#define REGION_RANDOM_BYTES 8 /* 16 hex digits after the prefix */

/* A fresh name: the daemon's prefix for this caller plus random hex digits. */
static int region_name(const char *prefix, char *name, size_t len, char *err, size_t errlen) {
  uint8_t rnd[REGION_RANDOM_BYTES];
  if (random_bytes(rnd, sizeof rnd)) return convd_errf(err, errlen, CONVD_EIO, "getrandom: %s", strerror(errno));
  size_t k = (size_t)snprintf(name, len, "%s", prefix);
  for (size_t i = 0; i < sizeof rnd; i++) k += (size_t)snprintf(name + k, len - k, "%02x", rnd[i]);
  return 0;
}

/* One try of pass_fd; 2: the connection ended unanswered (the daemon at its bound of
 * descriptor-socket connections closes new ones at once). */
static int pass_fd_once(const char *path, int fd, char *ticket, char *err, size_t errlen);

/* Passes fd over the descriptor socket (fdsock.h in the daemon) and reads the ticket into
 * ticket (33 bytes). 1: no descriptor socket answers there (an older daemon, or none). A
 * connection closed unanswered is tried again, 6 times over about 1.3 s. */
static int pass_fd(const char *path, int fd, char *ticket, char *err, size_t errlen) {
  int rc = 2;
  for (int attempt = 0; attempt < 6 && rc == 2; attempt++) {
    if (attempt) {
      const struct timespec ts = {0, (20L << attempt) * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
    rc = pass_fd_once(path, fd, ticket, err, errlen);
  }
  if (rc == 2)
    rc = convd_errf(err, errlen, CONVD_EIO, "the daemon's descriptor socket %s closed every connection "
                    "unanswered (too many clients at once?)", path);
  return rc;
}

static int pass_fd_once(const char *path, int fd, char *ticket, char *err, size_t errlen) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  const int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0) return 1;
  if (connect(s, (const struct sockaddr *)&sa, sizeof sa) != 0) {
    close(s);
    return 1;
  }
  const struct timeval tv = {5, 0}; /* the daemon answers at once; never hang on a stuck one */
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  static const char hello[] = "convd-region/1";
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } cm;
  memset(&cm, 0, sizeof cm);
  struct iovec iov = {(void *)hello, sizeof hello - 1};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf};
  struct cmsghdr *h = CMSG_FIRSTHDR(&mh);
  h->cmsg_level = SOL_SOCKET, h->cmsg_type = SCM_RIGHTS, h->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(h), &fd, sizeof fd);
  char ans[600];
  ssize_t n = sendmsg(s, &mh, MSG_NOSIGNAL);
  const int se = n < 0 ? errno : 0;
  if (n >= 0) n = recv(s, ans, sizeof ans - 1, 0);
  const int re = n < 0 && !se ? errno : 0;
  close(s);
  if (n == 0 || (n < 0 && (se == ECONNRESET || se == EPIPE || re == ECONNRESET))) return 2;
  if (n < 0)
    return convd_errf(err, errlen, CONVD_EIO, "the daemon's descriptor socket %s: %s", path,
                      strerror(se ? se : re));
  ans[n] = '\0';
  ans[strcspn(ans, "\n")] = '\0';
  if (strncmp(ans, "ok ", 3) == 0 && strlen(ans) > 3 + 32 && ans[3 + 32] == ' ') {
    memcpy(ticket, ans + 3, 32);
    ticket[32] = '\0';
    return 0;
  }
  if (strncmp(ans, "error ", 6) != 0)
    return convd_errf(err, errlen, CONVD_EREMOTE, "the daemon's descriptor socket answered \"%.80s\"", ans);
  const char *why = ans + 6, *sp = strchr(why, ' ');
  const int code = strncmp(why, "RESOURCE_EXHAUSTED ", 19) == 0 ? CONVD_ELIMIT
                   : strncmp(why, "INVALID_ARGUMENT ", 17) == 0  ? CONVD_EINVAL
                                                                 : CONVD_EREMOTE;
  return convd_errf(err, errlen, code, "the daemon refused the region's descriptor: %s", sp ? sp + 1 : why);
}

/* A sealed memfd of size bytes, mapped at r->data and passed to the daemon: *ticket gets its
 * ticket. 1: the daemon has no descriptor socket (nothing made). */
static int create_memfd(const char *sock, convd_client_region *r, size_t size, char *ticket, char *err,
                        size_t errlen) {
  struct stat st;
  if (stat(sock, &st) != 0 || !S_ISSOCK(st.st_mode)) return 1;
  const int fd = memfd_create("convd-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return 1; /* a kernel without memfds: named objects still work */
  /* Allocated now (a full memory cgroup fails here, not in a call) and sealed against shrinking,
   * which is what lets the daemon use it in place; mapped at once for the same first-touch cost
   * as a named region's. */
  int rc = 0, e = posix_fallocate(fd, 0, (off_t)size);
  if (e)
    rc = convd_errf(err, errlen, e == ENOSPC || e == ENOMEM ? CONVD_ENOMEM : CONVD_EIO,
                    "cannot make a memfd %zu bytes large: %s", size, strerror(e));
  else if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0)
    rc = convd_errf(err, errlen, CONVD_EIO, "cannot seal the memfd: %s", strerror(errno));
  else if ((r->data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)) == MAP_FAILED) {
    r->data = NULL;
    rc = convd_errf(err, errlen, errno == ENOMEM ? CONVD_ENOMEM : CONVD_EIO, "cannot map a memfd of %zu bytes: %s",
                    size, strerror(errno));
  }
  if (rc == 0) rc = pass_fd(sock, fd, ticket, err, errlen);
  close(fd); /* the mappings (ours, and the daemon's once registered) keep it */
  if (rc && r->data) munmap(r->data, size), r->data = NULL;
  return rc;
}

/* A named POSIX shared-memory object of size bytes under r->name, mapped at r->data. */
static int create_named(const char *prefix, convd_client_region *r, size_t size, char *err, size_t errlen) {
  int fd = -1, rc = 0;
  /* A name taken already (EEXIST) is somebody else's object: another one is drawn. */
  for (int attempt = 0; attempt < 8 && fd < 0 && rc == 0; attempt++) {
    if ((rc = region_name(prefix, r->name, sizeof r->name, err, errlen))) break;
    fd = shm_open(r->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0660);
    if (fd < 0 && errno != EEXIST)
      rc = convd_errf(err, errlen, errno == ENOMEM || errno == ENOSPC ? CONVD_ENOMEM : CONVD_EIO,
                      "cannot create shared-memory object %s: %s", r->name, strerror(errno));
  }
  if (fd < 0) return rc ? rc : convd_errf(err, errlen, CONVD_EIO, "no free shared-memory object name after 8 tries");
  /* The pages are allocated now, so that a full /dev/shm fails here and not as a SIGBUS when
   * the region is written (tmpfs does allocate; elsewhere the object is only sized), and mapped
   * at once (MAP_POPULATE): a first touch page by page costs a fault each, which made filling a
   * fresh 64 MiB region take twice as long. */
  int e = posix_fallocate(fd, 0, (off_t)size);
  if (e == EOPNOTSUPP || e == EINVAL) e = ftruncate(fd, (off_t)size) ? errno : 0;
  if (e) {
    rc = convd_errf(err, errlen, e == ENOSPC || e == ENOMEM ? CONVD_ENOMEM : CONVD_EIO,
                    "cannot make shared-memory object %s %zu bytes large: %s", r->name, size, strerror(e));
  } else if ((r->data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)) == MAP_FAILED) {
    r->data = NULL;
    rc = convd_errf(err, errlen, errno == ENOMEM ? CONVD_ENOMEM : CONVD_EIO,
                    "cannot map shared-memory object %s (%zu bytes): %s", r->name, size, strerror(errno));
  }
  close(fd); /* the mapping keeps the object */
  if (rc) shm_unlink(r->name);
  return rc;
}

int convd_client_region_create(convd_client *c, size_t size, convd_client_region **out, char *err,
                               size_t errlen) {
  *out = NULL;
  if (size == 0) return convd_errf(err, errlen, CONVD_EINVAL, "a region needs at least one byte");
  if ((uint64_t)size > (uint64_t)INT64_MAX)
    return convd_errf(err, errlen, CONVD_ERANGE, "a region of %zu bytes is too large", size);
  char prefix[CONVD_CLIENT_REGION_NAME_MAX + 1];
  int rc = convd_client_list_regions(c, NULL, NULL, prefix, sizeof prefix, err, errlen);
  if (rc) return rc;
  if (prefix[0] != '/' || strlen(prefix) + 2 * REGION_RANDOM_BYTES > CONVD_CLIENT_REGION_NAME_MAX)
    return convd_errf(err, errlen, CONVD_EREMOTE, "the server's region name prefix \"%.40s\" leaves no room "
                      "for a name", prefix);
  convd_client_region *r = calloc(1, sizeof *r);
  if (r == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  char ticket[33] = "";
  /* Through a unix: socket, a sealed memfd the daemon uses in place; else (or with a daemon
   * that has no descriptor socket) a named object it copies from. */
  rc = c->fd_socket[0] ? create_memfd(c->fd_socket, r, size, ticket, err, errlen) : 1;
  if (rc == 0) {
    r->memfd = 1;
    rc = region_name(prefix, r->name, sizeof r->name, err, errlen);
  } else if (rc == 1) {
    rc = create_named(prefix, r, size, err, errlen);
  }
  r->size = size;
  uint64_t mapped = 0;
  if (rc == 0 &&
      (rc = register_region(c, r->name, r->memfd ? ticket : NULL, size, &mapped, &r->in_place, err, errlen)) == 0 &&
      mapped != size) {
    rc = convd_errf(err, errlen, CONVD_EREMOTE, "the server mapped %" PRIu64 " bytes of region %s, not %zu",
                    mapped, r->name, size);
    char e2[8];
    convd_client_unregister_region(c, r->name, e2, sizeof e2);
  }
  if (rc) {
    if (r->data) munmap(r->data, size);
    if (r->data && !r->memfd) shm_unlink(r->name);
    free(r);
    return rc;
  }
  *out = r;
  return 0;
}

int convd_client_region_destroy(convd_client *c, convd_client_region *r, char *err, size_t errlen) {
  if (r == NULL) return 0;
  int rc = c ? convd_client_unregister_region(c, r->name, err, errlen) : 0;
  if (rc == CONVD_ENOTFOUND) rc = 0; /* the daemon no longer has it (it restarted, say) */
  munmap(r->data, r->size);
  if (!r->memfd && shm_unlink(r->name) != 0 && errno != ENOENT && rc == 0)
    rc = convd_errf(err, errlen, CONVD_EIO, "cannot unlink shared-memory object %s: %s", r->name, strerror(errno));
  free(r);
  return rc;
}
