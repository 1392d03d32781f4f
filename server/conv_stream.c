/* See conv_stream.h. Threads: the completion-queue thread, under the owning call's mutex. */
#include "conv_stream.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "band.h"
#include "digest.h"
#include "dtype.h"
#include "err.h"
#include "wire.h" /* CONVD_WIRE_FRAMING_SLACK */

int convd_stream_dtype_from_wire(int wire) {
  switch (wire) {
    case CONVD__V1__DTYPE__DTYPE_UNSPECIFIED:
    case CONVD__V1__DTYPE__DTYPE_FLOAT32: return CONVD_F32;
    case CONVD__V1__DTYPE__DTYPE_FLOAT16: return CONVD_F16;
    case CONVD__V1__DTYPE__DTYPE_BFLOAT16: return CONVD_BF16;
    default: return -1;
  }
}

int convd_stream_dtype_to_wire(int dtype) {
  return dtype == CONVD_F16    ? CONVD__V1__DTYPE__DTYPE_FLOAT16
         : dtype == CONVD_BF16 ? CONVD__V1__DTYPE__DTYPE_BFLOAT16
                               : CONVD__V1__DTYPE__DTYPE_FLOAT32;
}

struct convd_stream {
  uint64_t max_request_bytes;
  convd_registry *registry;
  const char *tenant;   /* whose registered weights the spec may name (NULL: no tenants) */
  convd_weights *reg_w; /* registered weights this call uses (pinned), or NULL */
  int priority;
  int have_spec;
  convd_conv conv;
  convd_band_shape in_shape;
  convd_job *job;
  void *w, *b;        /* as they arrive (wire dtype), until handed to the job as float32 */
  int weights_given;
  int buffers;        /* w, b and row_seen are allocated */
  int defer;          /* large weights are finalized by the caller, off the feeding thread */
  int weights_pending; /* whole, waiting for convd_stream_finalize_weights + hand_weights */
  int finalized;      /* w and b are float32 now, w_key their digest */
  uint64_t w_key;
  uint64_t band_limit; /* the largest band taken, 0 = any */
  void *band;         /* the band being assembled, in the wire's dtype */
  size_t band_cap;
  size_t w_recv, b_recv; /* bytes of weight / bias received, in order */
  uint8_t *row_seen;     /* N*H flags: row (n, h) announced by some band */
  size_t rows_done;      /* rows whose band is complete */
  size_t rows_total;
  /* the band whose pieces are arriving */
  int band_open;
  int64_t bn, bh0, bh1;
  size_t band_off, band_len;
  uint64_t bytes_received;
  unsigned external;   /* CONVD_STREAM_EXT_*: tensors that come from (go to) shared memory */
};

int convd_stream_spec_to_conv(const Convd__V1__ConvSpec *spec, const convd_weights *reg,
                              uint64_t max_request_bytes, convd_conv *conv, char *err,
                              size_t errlen) {
  if (spec->op != CONVD__V1__OP__OP_UNSPECIFIED && spec->op != CONVD__V1__OP__OP_CONV2D &&
      spec->op != CONVD__V1__OP__OP_CONV_TRANSPOSE2D)
    return convd_errf(err, errlen, CONVD_ENOTSUP,
                      "spec.op = %d is not an operation this daemon serves (OP_CONV2D = 1, "
                      "OP_CONV_TRANSPOSE2D = 2)",
                      (int)spec->op);
  const int transposed = spec->op == CONVD__V1__OP__OP_CONV_TRANSPOSE2D;
  const int dtype = convd_stream_dtype_from_wire(spec->dtype);
  if (dtype < 0)
    return convd_errf(err, errlen, CONVD_ENOTSUP,
                      "spec.dtype = %d is not a dtype this daemon serves (DTYPE_FLOAT32 = 1, "
                      "DTYPE_FLOAT16 = 2, DTYPE_BFLOAT16 = 3)",
                      (int)spec->dtype);
  if (spec->allow_tf32 && dtype != CONVD_F32)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "spec.allow_tf32 applies to float32 tensors; this call's dtype is %s: "
                      "leave allow_tf32 unset",
                      convd_dtype_name(dtype));
  if (spec->input_shape == NULL)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "spec.input_shape is missing: send the input's N, C, H, W");
  if (spec->weight_shape == NULL && reg == NULL)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "spec.weight_shape is missing: send the weights' C_out, C_in/groups, kH, kW");
  if (reg && spec->weight_shape &&
      (spec->weight_shape->d0 != reg->c_out || spec->weight_shape->d1 != reg->c_per_group ||
       spec->weight_shape->d2 != reg->kh || spec->weight_shape->d3 != reg->kw))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "spec.weight_shape %" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
                      " differs from weights %s, which are %" PRId64 ",%" PRId64 ",%" PRId64
                      ",%" PRId64 ": leave weight_shape out or send theirs",
                      spec->weight_shape->d0, spec->weight_shape->d1, spec->weight_shape->d2,
                      spec->weight_shape->d3, reg->id, reg->c_out, reg->c_per_group, reg->kh,
                      reg->kw);
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = spec->input_shape->d0;
  p.c_in = spec->input_shape->d1;
  p.h = spec->input_shape->d2;
  p.w = spec->input_shape->d3;
  /* The weight tensor's four dimensions as sent (or registered); their meaning is the op's. */
  int64_t d0, d1;
  if (reg) {
    d0 = reg->c_out, d1 = reg->c_per_group, p.kh = reg->kh, p.kw = reg->kw;
    p.has_bias = reg->has_bias;
  } else {
    d0 = spec->weight_shape->d0, d1 = spec->weight_shape->d1;
    p.kh = spec->weight_shape->d2;
    p.kw = spec->weight_shape->d3;
    p.has_bias = spec->has_bias ? 1 : 0;
  }
  p.groups = spec->groups == 0 ? 1 : spec->groups;
  if (transposed) { /* (C_in, C_out/groups, kH, kW) */
    if (d0 != p.c_in)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "transpose weight shape %" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
                        ": its first dimension must be the input's %" PRId64
                        " channels (weights are C_in, C_out/groups, kH, kW)",
                        d0, d1, p.kh, p.kw, p.c_in);
    if (d1 < 1 || d1 > CONVD_DIM_MAX || p.groups < 1 || p.groups > CONVD_DIM_MAX || d1 * p.groups > CONVD_DIM_MAX)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "transpose weight C_out/groups = %" PRId64 " with groups %" PRId64
                        ": must be at least 1, and C_out at most %" PRId64,
                        d1, p.groups, (int64_t)CONVD_DIM_MAX);
    p.transposed = 1;
    p.c_out = d1 * p.groups;
    p.c_per_group = p.c_in / p.groups;
    if (p.c_in % p.groups != 0)
      return convd_errf(err, errlen, CONVD_EINVAL, "groups = %" PRId64 " does not divide the %" PRId64 " input channels",
                        p.groups, p.c_in);
    if (spec->output_padding) {
      p.out_pad_h = spec->output_padding->h;
      p.out_pad_w = spec->output_padding->w;
    }
  } else {
    p.c_out = d0, p.c_per_group = d1;
    if (spec->output_padding && (spec->output_padding->h || spec->output_padding->w))
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "spec.output_padding applies to OP_CONV_TRANSPOSE2D only");
  }
  if (spec->stride) {
    p.stride_h = spec->stride->h;
    p.stride_w = spec->stride->w;
  }
  if (spec->padding) {
    p.pad_top = spec->padding->top;
    p.pad_bottom = spec->padding->bottom;
    p.pad_left = spec->padding->left;
    p.pad_right = spec->padding->right;
  }
  if (spec->dilation) {
    p.dil_h = spec->dilation->h;
    p.dil_w = spec->dilation->w;
  }
  p.dtype = dtype;
  p.allow_tf32 = spec->allow_tf32 ? 1 : 0;
  int rc = convd_conv_init(conv, &p, err, errlen);
  if (rc) return rc;
  if (reg && reg->has_bias && reg->b_elems != p.c_out)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "weights %s carry %" PRId64 " bias values, but this call has %" PRId64
                      " output channels (a transpose's C_out is weight_shape.d1 times groups)",
                      reg->id, reg->b_elems, p.c_out);

  /* Registered weights are held already: they do not count against this request. */
  size_t total;
  if (convd_size_add(conv->input_bytes, reg ? 0 : conv->weight_bytes, &total) ||
      convd_size_add(total, reg ? 0 : conv->bias_bytes, &total) ||
      convd_size_add(total, conv->output_bytes, &total) || total > max_request_bytes)
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "request needs %zu bytes of input, %zu of weights and %zu of output, more "
                      "than this daemon's limit of %" PRIu64
                      " bytes per request (--max-request-bytes): split the batch or the image",
                      conv->input_bytes, conv->weight_bytes, conv->output_bytes, max_request_bytes);
  return 0;
}

convd_stream *convd_stream_create(uint64_t max_request_bytes, convd_registry *reg,
                                  const char *tenant) {
  convd_stream *s = calloc(1, sizeof *s);
  if (s) {
    s->max_request_bytes = max_request_bytes;
    s->registry = reg;
    s->tenant = tenant;
  }
  return s;
}

void convd_stream_destroy(convd_stream *s) {
  if (s == NULL) return;
  if (s->reg_w) { /* lent to the job, which has ended before its session */
    convd_registry_release(s->registry, s->reg_w);
  } else if (!s->weights_given) {
    free(s->w);
    free(s->b);
  }
  free(s->band);
  free(s->row_seen);
  free(s);
}

static int accept_spec(convd_stream *s, const Convd__V1__ConvSpec *spec, char *err,
                       size_t errlen) {
  int rc;
  if (spec->weights_id && spec->weights_id[0]) {
    if (s->registry == NULL)
      return convd_errf(err, errlen, CONVD_ENOTSUP, "this daemon has no weights registry");
    if ((rc = convd_registry_acquire(s->registry, s->tenant, spec->weights_id, &s->reg_w, err, errlen)))
      return rc;
  }
  rc = convd_stream_spec_to_conv(spec, s->reg_w, s->max_request_bytes, &s->conv, err, errlen);
  if (rc) return rc;
  s->priority = spec->priority;
  const convd_conv *c = &s->conv;
  s->rows_total = (size_t)c->p.n * (size_t)c->p.h; /* <= input elements, so no overflow */
  if (s->reg_w) { /* the weights are whole already */
    s->w_recv = c->weight_wire_bytes;
    s->b_recv = c->bias_wire_bytes;
  }
  s->in_shape = (convd_band_shape){c->p.n, c->p.c_in, c->p.h, c->p.w, c->wire_elem};
  s->have_spec = 1;
  return 0;
}

uint64_t convd_stream_buffers_bytes(const convd_stream *s) {
  const convd_conv *c = &s->conv;
  uint64_t b = s->rows_total; /* row_seen */
  if (!s->reg_w) {
    b += c->weight_wire_bytes + c->bias_wire_bytes;
    /* widening to float32 holds both copies for a moment */
    if (c->p.dtype != CONVD_F32) b += c->weight_bytes + c->bias_bytes;
  }
  return b;
}

/* The spec's buffers (weights and bias as they arrive, the rows seen), allocated only once the
 * call was admitted for them (convd_stream_attach), or at the first tensor message of a
 * stream without a job. */
static int ensure_buffers(convd_stream *s, char *err, size_t errlen) {
  if (s->buffers) return 0;
  const convd_conv *c = &s->conv;
  if (!s->reg_w) {
    s->w = malloc(c->weight_wire_bytes ? c->weight_wire_bytes : 1);
    s->b = c->bias_bytes ? malloc(c->bias_wire_bytes) : NULL;
  }
  s->row_seen = calloc(s->rows_total, 1);
  if ((!s->reg_w && (!s->w || (c->bias_bytes && !s->b))) || !s->row_seen)
    return convd_errf(err, errlen, CONVD_ENOMEM,
                      "the daemon cannot allocate %" PRIu64 " bytes for this request now; retry "
                      "later or send a smaller one",
                      convd_stream_buffers_bytes(s));
  s->buffers = 1;
  return 0;
}

int convd_stream_append_chunk(const char *what, const Convd__V1__TensorChunk *ch, void *dst,
                              size_t *recv, size_t total, char *err, size_t errlen) {
  if (ch->offset != *recv)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s chunk at byte offset %" PRIu64 ", but %zu bytes have arrived: send %s "
                      "chunks in order, each starting where the previous one ended",
                      what, ch->offset, *recv, what);
  if (ch->data.len > total - *recv)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s chunk at byte offset %" PRIu64 " with %zu bytes ends past the %s's %zu "
                      "bytes (its shape's elements x the dtype's size)",
                      what, ch->offset, ch->data.len, what, total);
  if (ch->data.len) memcpy((char *)dst + *recv, ch->data.data, ch->data.len);
  *recv += ch->data.len;
  return 0;
}

/* Copies n bytes of a piece, from byte off of it, into dst. */
static void bytes_copy(const convd_stream_bytes *d, size_t off, void *dst, size_t n) {
  if (n == 0) return;
  if (d->data) memcpy(dst, (const char *)d->data + off, n);
  else d->copy(d->ctx, off, dst, n);
}

/* The band (b's n and rows) is whole, in s->band (assembled: 1) or in b's own bytes: the job
 * takes it over as float32 and reads it in place. A float32 band assembled in s->band is handed
 * over as it is; one in b is copied once into a buffer of its own (protobuf-c's and gRPC's
 * buffers promise no alignment, and are gone after this message); half types are widened from a
 * contiguous copy. */
static int give_band(convd_stream *s, const convd_stream_band *b, int assembled, char *err,
                     size_t errlen) {
  const convd_conv_params *p = &s->conv.p;
  s->band_open = 0;
  s->rows_done += (size_t)(b->h_end - b->h_begin);
  float *band;
  if (p->dtype == CONVD_F32 && assembled) {
    band = s->band;
    s->band = NULL;
    s->band_cap = 0;
  } else {
    const size_t elems = s->band_len / s->conv.wire_elem;
    if ((band = malloc(elems * sizeof(float))) == NULL)
      return convd_errf(err, errlen, CONVD_ENOMEM,
                        "the daemon cannot widen a band of %zu elements now: send smaller bands",
                        elems);
    if (p->dtype == CONVD_F32) {
      bytes_copy(&b->bytes, 0, band, s->band_len);
    } else {
      /* contiguous: the caller assembles half-type bands that arrive in slices */
      convd_dtype_decode(p->dtype, assembled ? s->band : b->bytes.data, band, elems);
    }
  }
  return convd_job_put_band(s->job, b->n, b->h_begin, b->h_end, band, CONVD_GIVE, err, errlen);
}

int convd_stream_feed_band(convd_stream *s, const convd_stream_band *b, char *err, size_t errlen) {
  const convd_conv_params *p = &s->conv.p;
  if (!s->have_spec)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "the first message must be the spec (shapes and parameters); tensor "
                      "data came first");
  if (s->external & CONVD_STREAM_EXT_INPUT)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "an input band arrived, but spec.input_region is set: the input comes from "
                      "shared memory, so send no input bands");
  int rc = ensure_buffers(s, err, errlen);
  if (rc) return rc;
  s->bytes_received += b->bytes.len;
  if (b->n < 0 || b->n >= p->n)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "input band has n = %" PRId64 ", outside the batch [0, %" PRId64 ")", b->n,
                      p->n);
  if (b->h_begin < 0 || b->h_end <= b->h_begin || b->h_end > p->h)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "input band n = %" PRId64 " has rows [%" PRId64 ", %" PRId64
                      "): need 0 <= h_begin < h_end <= H = %" PRId64,
                      b->n, b->h_begin, b->h_end, p->h);
  if (s->band_open) {
    if (b->n != s->bn || b->h_begin != s->bh0 || b->h_end != s->bh1 || b->offset != s->band_off)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "input band n = %" PRId64 " rows [%" PRId64 ", %" PRId64 ") is incomplete "
                        "(%zu of %zu bytes) when a piece of band n = %" PRId64 " rows [%" PRId64
                        ", %" PRId64 ") at offset %" PRIu64 " arrived: send the pieces of a band "
                        "back to back, in order",
                        s->bn, s->bh0, s->bh1, s->band_off, s->band_len, b->n, b->h_begin,
                        b->h_end, b->offset);
  } else {
    if (b->offset != 0)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "input band n = %" PRId64 " rows [%" PRId64 ", %" PRId64
                        ") starts at offset %" PRIu64 ": the first piece of a band has offset 0",
                        b->n, b->h_begin, b->h_end, b->offset);
    uint8_t *seen = s->row_seen + (size_t)b->n * (size_t)p->h;
    for (int64_t h = b->h_begin; h < b->h_end; h++)
      if (seen[h])
        return convd_errf(err, errlen, CONVD_EINVAL,
                          "input band n = %" PRId64 " rows [%" PRId64 ", %" PRId64
                          ") overlaps rows already received (row %" PRId64 " of batch item %" PRId64
                          "): send each row once",
                          b->n, b->h_begin, b->h_end, h, b->n);
    for (int64_t h = b->h_begin; h < b->h_end; h++) seen[h] = 1;
    s->band_open = 1;
    s->bn = b->n;
    s->bh0 = b->h_begin;
    s->bh1 = b->h_end;
    s->band_off = 0;
    s->band_len = convd_band_bytes(&s->in_shape, b->h_begin, b->h_end);
    if (s->band_limit && s->band_len > s->band_limit) {
      const size_t row = convd_band_bytes(&s->in_shape, 0, 1);
      return convd_errf(err, errlen, CONVD_ELIMIT,
                        "input band n = %" PRId64 " rows [%" PRId64 ", %" PRId64 ") is %zu bytes, "
                        "more than this call takes in one band (%" PRIu64 " bytes): send at most "
                        "%" PRIu64 " rows per band",
                        b->n, b->h_begin, b->h_end, s->band_len, s->band_limit,
                        s->band_limit / (row ? row : 1));
    }
    const int whole = b->bytes.len == s->band_len; /* a whole band in one piece */
    if (s->job && whole && (p->dtype == CONVD_F32 || b->bytes.data))
      return give_band(s, b, 0, err, errlen); /* widened or copied from where it lies */
    if (s->band_len > s->band_cap) {
      void *nb = realloc(s->band, s->band_len);
      if (nb == NULL)
        return convd_errf(err, errlen, CONVD_ENOMEM,
                          "the daemon cannot hold a band of %zu bytes now: send smaller bands",
                          s->band_len);
      s->band = nb;
      s->band_cap = s->band_len;
    }
  }
  if (b->bytes.len > s->band_len - s->band_off)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "input band n = %" PRId64 " rows [%" PRId64 ", %" PRId64 "): %zu bytes at "
                      "offset %zu end past the band's %zu bytes (C x rows x W x %zu = %" PRId64
                      " x %" PRId64 " x %" PRId64 " x %zu, %s)",
                      b->n, b->h_begin, b->h_end, b->bytes.len, s->band_off, s->band_len,
                      s->conv.wire_elem, p->c_in, b->h_end - b->h_begin, p->w, s->conv.wire_elem,
                      convd_dtype_name(p->dtype));
  bytes_copy(&b->bytes, 0, (char *)s->band + s->band_off, b->bytes.len);
  s->band_off += b->bytes.len;
  if (s->band_off == s->band_len) {
    if (s->job) return give_band(s, b, 1, err, errlen);
    s->band_open = 0;
    s->rows_done += (size_t)(b->h_end - b->h_begin);
  }
  return 0;
}

/* Widens a whole wire tensor of n elements to float32 in a new buffer, freeing the old one;
 * float32 tensors are taken as they are. */
static int widen(int dtype, void **t, size_t n) {
  if (dtype == CONVD_F32 || *t == NULL) return 0;
  float *f = malloc(n * sizeof(float));
  if (f == NULL) return -1;
  convd_dtype_decode(dtype, *t, f, n);
  free(*t);
  *t = f;
  return 0;
}

/* Streamed weights above this are widened and hashed off the feeding thread when the caller
 * asked for it (convd_stream_defer_weights). */
#define DEFER_WEIGHTS_BYTES ((size_t)1 << 20)

int convd_stream_finalize_weights(convd_stream *s, char *err, size_t errlen) {
  if (widen(s->conv.p.dtype, &s->w, s->conv.weight_elems) ||
      widen(s->conv.p.dtype, &s->b, s->conv.bias_elems))
    return convd_errf(err, errlen, CONVD_ENOMEM,
                      "the daemon cannot widen %zu weights to float32 now; retry later",
                      s->conv.weight_elems);
  s->w_key = convd_digest_weights(&s->conv, s->w);
  s->finalized = 1;
  return 0;
}

void convd_stream_hand_weights(convd_stream *s) {
  s->weights_pending = 0;
  s->weights_given = 1;
  convd_job_set_weights_key(s->job, s->w_key);
  convd_job_set_weights(s->job, s->w, s->b, CONVD_GIVE);
}

int convd_stream_weights_pending(const convd_stream *s) { return s->weights_pending; }

void convd_stream_defer_weights(convd_stream *s, int on) { s->defer = on; }

/* Once weights and bias are whole, the job takes them over (or, when deferred, the caller has
 * them finalized elsewhere first). */
static int give_weights(convd_stream *s, char *err, size_t errlen) {
  if (s->job == NULL || s->weights_given || s->weights_pending ||
      s->w_recv != s->conv.weight_wire_bytes || s->b_recv != s->conv.bias_wire_bytes)
    return 0;
  if (s->reg_w) { /* lent by the registry, pinned until the session ends */
    s->weights_given = 1;
    convd_job_set_weights_key(s->job, s->reg_w->digest);
    convd_job_set_weights(s->job, s->reg_w->w, s->reg_w->b, CONVD_LEND);
    return 0;
  }
  if (s->defer && s->conv.weight_wire_bytes + s->conv.bias_wire_bytes > DEFER_WEIGHTS_BYTES) {
    s->weights_pending = 1;
    return 0;
  }
  int rc = convd_stream_finalize_weights(s, err, errlen);
  if (rc == 0) convd_stream_hand_weights(s);
  return rc;
}

/* A weight (bias: 1) chunk; the job gets the weights once both are whole. */
static int feed_weights(convd_stream *s, int bias, const Convd__V1__TensorChunk *ch, char *err,
                        size_t errlen) {
  const char *what = bias ? "bias" : "weight";
  if (s->reg_w)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "a %s chunk arrived but the spec names registered weights (weights_id %s)%s",
                      what, s->reg_w->id, bias ? ", whose bias is theirs" : ": send one or the other");
  if (bias && !s->conv.p.has_bias)
    return convd_errf(err, errlen, CONVD_EINVAL, "a bias chunk arrived but the spec says has_bias = false");
  int rc = ensure_buffers(s, err, errlen);
  if (rc) return rc;
  s->bytes_received += ch->data.len;
  rc = bias ? convd_stream_append_chunk(what, ch, s->b, &s->b_recv, s->conv.bias_wire_bytes, err, errlen)
                : convd_stream_append_chunk(what, ch, s->w, &s->w_recv, s->conv.weight_wire_bytes, err, errlen);
  return rc ? rc : give_weights(s, err, errlen);
}

int convd_stream_feed(convd_stream *s, const Convd__V1__ConvRequest *m, int *accepted,
                       char *err, size_t errlen) {
  *accepted = 0;
  if (m->msg_case == CONVD__V1__CONV_REQUEST__MSG_SPEC) {
    if (s->have_spec)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "a second spec arrived: one Conv2d call carries one convolution");
    int rc = accept_spec(s, m->spec, err, errlen);
    if (rc == 0) *accepted = 1;
    return rc;
  }
  if (!s->have_spec)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      m->msg_case == CONVD__V1__CONV_REQUEST__MSG__NOT_SET
                          ? "the first message has no content: it must be the spec"
                          : "the first message must be the spec (shapes and parameters); tensor "
                            "data came first");
  switch (m->msg_case) {
    case CONVD__V1__CONV_REQUEST__MSG_WEIGHT: return feed_weights(s, 0, m->weight, err, errlen);
    case CONVD__V1__CONV_REQUEST__MSG_BIAS: return feed_weights(s, 1, m->bias, err, errlen);
    case CONVD__V1__CONV_REQUEST__MSG_INPUT: {
      const Convd__V1__RowBand *in = m->input;
      const convd_stream_band b = {in->n, in->h_begin, in->h_end, in->offset,
                                   {in->data.data, in->data.len, NULL, NULL}};
      return convd_stream_feed_band(s, &b, err, errlen);
    }
    default:
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "a message with no content arrived: each ConvRequest sets one of spec, "
                        "weight, bias, input");
  }
}

int convd_stream_finish(convd_stream *s, char *err, size_t errlen) {
  if (!s->have_spec)
    return convd_errf(err, errlen, CONVD_EINVAL, "the stream ended before the spec arrived");
  if (s->w_recv != s->conv.weight_wire_bytes)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "weights incomplete at half-close: %zu of %zu bytes arrived", s->w_recv,
                      s->conv.weight_wire_bytes);
  if (s->b_recv != s->conv.bias_wire_bytes)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "bias incomplete at half-close: %zu of %zu bytes arrived", s->b_recv,
                      s->conv.bias_wire_bytes);
  if (s->external & CONVD_STREAM_EXT_INPUT) return 0;
  if (s->band_open)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "input incomplete at half-close: band n = %" PRId64 " rows [%" PRId64
                      ", %" PRId64 ") has %zu of %zu bytes",
                      s->bn, s->bh0, s->bh1, s->band_off, s->band_len);
  if (s->rows_done != s->rows_total) {
    size_t i = 0;
    while (s->row_seen && i < s->rows_total && s->row_seen[i]) i++;
    size_t h = (size_t)s->conv.p.h;
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "input incomplete at half-close: %zu of %zu rows arrived; row %zu of batch "
                      "item %zu is missing",
                      s->rows_done, s->rows_total, i % h, i / h);
  }
  return 0;
}

const convd_conv *convd_stream_conv(const convd_stream *s) { return &s->conv; }

void convd_stream_set_external(convd_stream *s, unsigned mask) { s->external = mask; }

void convd_stream_count_received(convd_stream *s, uint64_t bytes) { s->bytes_received += bytes; }

int convd_stream_attach(convd_stream *s, convd_job *job, char *err, size_t errlen) {
  int rc = ensure_buffers(s, err, errlen);
  if (rc) return rc;
  s->job = job;
  /* Registered weights go to the job now; streamed ones are never whole before data arrives. */
  return give_weights(s, err, errlen);
}

void convd_stream_set_band_limit(convd_stream *s, uint64_t bytes) { s->band_limit = bytes; }

uint64_t convd_stream_bytes_buffered(const convd_stream *s) {
  return s->band_open ? s->band_len : 0;
}

uint64_t convd_stream_bytes_received(const convd_stream *s) { return s->bytes_received; }

int convd_stream_priority(const convd_stream *s) { return s->priority; }

int convd_stream_registered_weights(const convd_stream *s) { return s->reg_w != NULL; }

/* ---- Conv2dUnary: the ConvCall through the same rules ------------------------------------ */

/* A whole tensor in the ConvCall must have exactly the bytes its shape needs. */
static int check_bytes(const char *what, const ProtobufCBinaryData *d, const convd_conv *cv,
                       size_t elems, char *err, size_t errlen) {
  if (d->len == elems * cv->wire_elem) return 0;
  return convd_errf(err, errlen, CONVD_EINVAL,
                    "%s has %zu bytes, but its shape needs %zu (%s, %zu bytes per element)", what,
                    d->len, elems * cv->wire_elem, convd_dtype_name(cv->p.dtype), cv->wire_elem);
}

int convd_stream_check_call(const convd_stream *s, const Convd__V1__ConvCall *m,
                            uint64_t max_message_bytes, char *err, size_t errlen) {
  const convd_conv *cv = &s->conv;
  const uint64_t limit = max_message_bytes;
  const int registered = s->reg_w != NULL;
  int rc = 0;
  const unsigned ext = s->external;
  if (!(ext & CONVD_STREAM_EXT_OUTPUT) && cv->output_wire_bytes > limit - CONVD_WIRE_FRAMING_SLACK)
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "the output of %zu bytes does not fit in one response message (limit %" PRIu64
                      " bytes, --max-message-bytes): use the streaming Conv2d method",
                      cv->output_wire_bytes, limit);
  static const struct {
    unsigned bit;
    const char *what;
  } ext_rules[] = {{CONVD_STREAM_EXT_INPUT, "ConvCall.input must be empty: spec.input_region is set"},
                   {CONVD_STREAM_EXT_WEIGHT, "ConvCall.weight must be empty: spec.weight_region is set"},
                   {CONVD_STREAM_EXT_BIAS, "ConvCall.bias must be empty: spec.bias_region is set"}};
  const ProtobufCBinaryData *fields[] = {&m->input, &m->weight, &m->bias};
  for (int i = 0; i < 3; i++)
    if ((ext & ext_rules[i].bit) && fields[i]->len)
      return convd_errf(err, errlen, CONVD_EINVAL, "%s", ext_rules[i].what);
  if (!(ext & CONVD_STREAM_EXT_INPUT) &&
      (rc = check_bytes("ConvCall.input", &m->input, cv, cv->input_elems, err, errlen)))
    return rc;
  if (!registered && !(ext & CONVD_STREAM_EXT_WEIGHT) &&
      (rc = check_bytes("ConvCall.weight", &m->weight, cv, cv->weight_elems, err, errlen)))
    return rc;
  if (!registered && !(ext & CONVD_STREAM_EXT_BIAS) &&
      (rc = check_bytes(cv->p.has_bias ? "ConvCall.bias" : "ConvCall.bias (spec.has_bias is false)",
                        &m->bias, cv, cv->bias_elems, err, errlen)))
    return rc;
  return 0;
}

int convd_stream_feed_call(convd_stream *s, const Convd__V1__ConvCall *m, char *err,
                           size_t errlen) {
  const convd_conv *cv = &s->conv;
  const int registered = s->reg_w != NULL;
  int rc = 0, accepted;
  Convd__V1__TensorChunk wch = CONVD__V1__TENSOR_CHUNK__INIT, bch = CONVD__V1__TENSOR_CHUNK__INIT;
  wch.data = m->weight, bch.data = m->bias;
  Convd__V1__ConvRequest rq = CONVD__V1__CONV_REQUEST__INIT;
  const unsigned ext = s->external;
  /* Registered weights with bytes beside them: the stream says why that is wrong. */
  if (!(ext & CONVD_STREAM_EXT_WEIGHT) && (!registered || m->weight.len)) {
    rq.msg_case = CONVD__V1__CONV_REQUEST__MSG_WEIGHT, rq.weight = &wch;
    if ((rc = convd_stream_feed(s, &rq, &accepted, err, errlen))) return rc;
  }
  if (!(ext & CONVD_STREAM_EXT_BIAS) && m->bias.len) {
    rq.msg_case = CONVD__V1__CONV_REQUEST__MSG_BIAS, rq.bias = &bch;
    if ((rc = convd_stream_feed(s, &rq, &accepted, err, errlen))) return rc;
  }
  const size_t slab = cv->input_wire_bytes / (size_t)cv->p.n;
  Convd__V1__RowBand band = CONVD__V1__ROW_BAND__INIT;
  rq.msg_case = CONVD__V1__CONV_REQUEST__MSG_INPUT, rq.input = &band;
  band.h_begin = 0, band.h_end = cv->p.h, band.data.len = slab;
  for (int64_t n = 0; n < cv->p.n && rc == 0 && !(ext & CONVD_STREAM_EXT_INPUT); n++) {
    band.n = n;
    band.data.data = m->input.data + (size_t)n * slab;
    rc = convd_stream_feed(s, &rq, &accepted, err, errlen);
  }
  return rc ? rc : convd_stream_finish(s, err, errlen);
}
