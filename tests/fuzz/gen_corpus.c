/* Writes the fuzz harness's seed corpus (fuzz_frame.h's format) from the golden cases: for each
 * case the messages a correct client sends (a Conv2d stream: spec, weight chunks, bias, input
 * bands cut as the client library cuts them; a Conv2dUnary call; weights registered with
 * PutWeights and then named by id, then deleted), in float32 and the half types, and malformed
 * variants of them, each breaking one rule. Seeds named ok-* must be answered OK in every call,
 * bad-* refused in at least one (fuzz_replay checks both), so a seed that stops meaning what
 * it says fails the suite. Messages are packed by protobuf-c and the band writer the daemon and
 * client use (convd_wire_band_message), never written by hand.
 *
 * Usage: gen_corpus GOLDEN_DIR OUT_DIR   (the build runs it; OUT_DIR must exist)
 *
 * Threads: main only. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "band.h"
#include "conv_stream.h"
#include "dtype.h"
#include "err.h"
#include "fuzz_frame.h"
#include "registry.h"
#include "testutil.h"
#include "wire.h"

static const char *out_dir;
static int written;
/* FUZZ_WITH_JOB while the seeds being written give their convolutions a job, else 0. */
static unsigned with_job;

static void die(const char *what) {
  fprintf(stderr, "gen_corpus: %s\n", what);
  exit(1);
}

/* ---- one seed: calls of frames, built in memory ------------------------------------------ */

typedef struct seed {
  uint8_t *p;
  size_t len, cap;
  size_t call_at; /* where the open call's count byte is */
  unsigned count, cuts;
} seed;

static void put(seed *s, const void *p, size_t n) {
  if (s->len + n > s->cap) {
    while (s->len + n > s->cap) s->cap = s->cap ? s->cap * 2 : 4096;
    if ((s->p = realloc(s->p, s->cap)) == NULL) die("out of memory");
  }
  memcpy(s->p + s->len, p, n);
  s->len += n;
}

static void call_begin(seed *s, unsigned kind) {
  if (kind % FUZZ_KINDS == FUZZ_CONV2D || kind % FUZZ_KINDS == FUZZ_CONV2D_UNARY) kind |= with_job;
  const uint8_t h[FUZZ_CALL_HEADER] = {(uint8_t)kind, 0};
  s->call_at = s->len + 1;
  s->count = 0;
  put(s, h, sizeof h);
}

static void call_end(seed *s) {
  if (s->count > 255) die("a call of more than 255 messages: cut the bands larger");
  s->p[s->call_at] = (uint8_t)s->count;
}

/* One message; its slice cuts vary from frame to frame, so seeds start the fuzzer off with
 * messages split at many places. */
static void frame(seed *s, const void *msg, size_t len) {
  uint8_t h[FUZZ_FRAME_HEADER];
  fuzz_put_u32le(h, (uint32_t)len);
  h[4] = (uint8_t)(s->cuts * 73 + 11), h[5] = (uint8_t)(s->cuts * 151 + 200);
  s->cuts++;
  put(s, h, sizeof h);
  put(s, msg, len);
  s->count++;
}

static void frame_msg(seed *s, const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_get_packed_size(m);
  uint8_t *buf = malloc(n ? n : 1);
  if (buf == NULL) die("out of memory");
  protobuf_c_message_pack(m, buf);
  frame(s, buf, n);
  free(buf);
}

static void seed_write(seed *s, const char *name) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", out_dir, name);
  FILE *f = fopen(path, "wb");
  if (f == NULL || fwrite(s->p, 1, s->len, f) != s->len || fclose(f) != 0) die(path);
  free(s->p);
  *s = (seed){0};
  written++;
}

/* ---- a golden case as a client sends it ------------------------------------------------- */

typedef struct tensors {
  convd_conv cv;
  uint8_t *x, *w, *b; /* in the wire's dtype */
} tensors;

/* The case's tensors encoded in dtype. */
static void tensors_make(const golden *g, int dtype, tensors *t) {
  convd_conv_params p = g->p;
  p.dtype = dtype;
  char err[256];
  if (convd_conv_init(&t->cv, &p, err, sizeof err)) die(err);
  t->x = malloc(t->cv.input_wire_bytes);
  t->w = malloc(t->cv.weight_wire_bytes);
  t->b = malloc(t->cv.bias_wire_bytes ? t->cv.bias_wire_bytes : 1);
  if (!t->x || !t->w || !t->b) die("out of memory");
  convd_dtype_encode(dtype, g->x, t->x, t->cv.input_elems);
  convd_dtype_encode(dtype, g->w, t->w, t->cv.weight_elems);
  if (g->b) convd_dtype_encode(dtype, g->b, t->b, t->cv.bias_elems);
}

static void tensors_free(tensors *t) {
  free(t->x), free(t->w), free(t->b);
}

/* The wire spec, as the client library's make_spec writes it (client/client.c). */
typedef struct spec_storage {
  Convd__V1__ConvSpec spec;
  Convd__V1__Shape4 in, wt;
  Convd__V1__Pair stride, dil, outpad;
  Convd__V1__Padding pad;
} spec_storage;

static void make_spec(spec_storage *s, const convd_conv_params *p) {
  convd__v1__conv_spec__init(&s->spec);
  convd__v1__shape4__init(&s->in);
  convd__v1__shape4__init(&s->wt);
  convd__v1__pair__init(&s->stride);
  convd__v1__pair__init(&s->dil);
  convd__v1__pair__init(&s->outpad);
  convd__v1__padding__init(&s->pad);
  s->in.d0 = p->n, s->in.d1 = p->c_in, s->in.d2 = p->h, s->in.d3 = p->w;
  if (p->transposed) /* (C_in, C_out/groups, kH, kW) */
    s->wt.d0 = p->c_in, s->wt.d1 = p->c_out / p->groups, s->wt.d2 = p->kh, s->wt.d3 = p->kw;
  else
    s->wt.d0 = p->c_out, s->wt.d1 = p->c_per_group, s->wt.d2 = p->kh, s->wt.d3 = p->kw;
  s->stride.h = p->stride_h, s->stride.w = p->stride_w;
  s->dil.h = p->dil_h, s->dil.w = p->dil_w;
  s->pad.top = p->pad_top, s->pad.bottom = p->pad_bottom;
  s->pad.left = p->pad_left, s->pad.right = p->pad_right;
  s->spec.op = p->transposed ? CONVD__V1__OP__OP_CONV_TRANSPOSE2D : CONVD__V1__OP__OP_CONV2D;
  if (p->transposed) {
    s->outpad.h = p->out_pad_h, s->outpad.w = p->out_pad_w;
    s->spec.output_padding = &s->outpad;
  }
  s->spec.dtype = convd_stream_dtype_to_wire(p->dtype);
  s->spec.input_shape = &s->in;
  s->spec.weight_shape = &s->wt;
  s->spec.has_bias = p->has_bias != 0;
  s->spec.stride = &s->stride;
  s->spec.padding = &s->pad;
  s->spec.dilation = &s->dil;
  s->spec.groups = p->groups;
}

static void msg_spec(seed *s, Convd__V1__ConvSpec *spec) {
  Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
  m.msg_case = CONVD__V1__CONV_REQUEST__MSG_SPEC, m.spec = spec;
  frame_msg(s, &m.base);
}

/* A chunk of a whole tensor; put_weights: as a PutWeightsRequest, else a ConvRequest. */
static void msg_chunk(seed *s, int put_weights, int bias, uint64_t off, const uint8_t *data,
                      size_t len) {
  Convd__V1__TensorChunk ch = CONVD__V1__TENSOR_CHUNK__INIT;
  ch.offset = off, ch.data.data = (uint8_t *)data, ch.data.len = len;
  if (put_weights) {
    Convd__V1__PutWeightsRequest m = CONVD__V1__PUT_WEIGHTS_REQUEST__INIT;
    m.msg_case = bias ? CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_BIAS : CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_WEIGHT;
    if (bias) m.bias = &ch;
    else m.weight = &ch;
    frame_msg(s, &m.base);
  } else {
    Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
    m.msg_case = bias ? CONVD__V1__CONV_REQUEST__MSG_BIAS : CONVD__V1__CONV_REQUEST__MSG_WEIGHT;
    if (bias) m.bias = &ch;
    else m.weight = &ch;
    frame_msg(s, &m.base);
  }
}

/* The weights in three chunks of uneven byte sizes, then the bias in one (skip: leave the last
 * weight chunk out). */
static void msg_weights(seed *s, int put_weights, const tensors *t, int skip_last) {
  const size_t n = t->cv.weight_wire_bytes, a = n / 3 + 1 < n ? n / 3 + 1 : n, b = (2 * n) / 3 > a ? (2 * n) / 3 : a;
  msg_chunk(s, put_weights, 0, 0, t->w, a);
  if (b > a) msg_chunk(s, put_weights, 0, a, t->w + a, b - a);
  if (!skip_last && n > b) msg_chunk(s, put_weights, 0, b, t->w + b, n - b);
  if (t->cv.bias_wire_bytes) msg_chunk(s, put_weights, 1, 0, t->b, t->cv.bias_wire_bytes);
}

/* An input band piece, written in place as the client library writes it. */
static void msg_band(seed *s, const tensors *t, int64_t n, int64_t h0, int64_t h1, uint64_t off,
                     size_t len) {
  const convd_conv *cv = &t->cv;
  const convd_band_shape sh = {cv->p.n, cv->p.c_in, cv->p.h, cv->p.w, cv->wire_elem};
  uint8_t *data, *msg;
  size_t total;
  if ((msg = convd_wire_band_message(CONVD_WIRE_REQUEST_INPUT, n, h0, h1, off, len, &data, &total)) == NULL)
    die("out of memory");
  convd_band_gather(t->x, &sh, n, h0, h1, off, data, len);
  frame(s, msg, total);
  free(msg);
}

/* What to do to a correct stream's input bands. */
enum band_fault { BANDS_OK, BANDS_HALF, BANDS_REPEAT, BANDS_BAD_OFFSET, BANDS_PAST_END };

/* The input as bands of whole rows in pieces of at most ~1/40 of the tensor (the client's
 * chunk size, scaled down), with between(s, t, k) after the k-th piece; returns how many
 * pieces went. A fault breaks one rule on the way. */
static int msg_bands(seed *s, const tensors *t, enum band_fault fault,
                     void (*between)(seed *, const tensors *, int)) {
  const convd_conv *cv = &t->cv;
  const convd_band_shape sh = {cv->p.n, cv->p.c_in, cv->p.h, cv->p.w, cv->wire_elem};
  size_t piece = cv->input_wire_bytes / 40;
  if (piece < 64) piece = 64;
  convd_band_iter it;
  convd_band_iter_init(&it, &sh, piece);
  int k = 0;
  while (convd_band_iter_next(&it)) {
    const size_t row = (size_t)(it.n * cv->p.h + it.h0), rows = (size_t)(cv->p.n * cv->p.h);
    if (fault == BANDS_HALF && it.off == 0 && 2 * row >= rows) {
      /* half a piece of a band, then no more input */
      msg_band(s, t, it.n, it.h0, it.h1, 0, it.len / 2 + 1 < it.len ? it.len / 2 + 1 : it.len);
      return k + 1;
    }
    if (fault == BANDS_BAD_OFFSET && it.off > 0) { /* a piece 4 bytes after where it belongs */
      msg_band(s, t, it.n, it.h0, it.h1, it.off + 4, it.len - 4);
      return k + 1;
    }
    if (fault == BANDS_PAST_END && it.off + it.len == convd_band_bytes(&sh, it.h0, it.h1)) {
      /* the band's last piece, 4 bytes longer than the band */
      uint8_t *data, *msg;
      size_t total;
      if ((msg = convd_wire_band_message(CONVD_WIRE_REQUEST_INPUT, it.n, it.h0, it.h1, it.off,
                                         it.len + 4, &data, &total)) == NULL)
        die("out of memory");
      memset(data, 0, it.len + 4);
      frame(s, msg, total);
      free(msg);
      return k + 1;
    }
    msg_band(s, t, it.n, it.h0, it.h1, it.off, it.len);
    if (between) between(s, t, k);
    k++;
  }
  if (fault == BANDS_REPEAT) { /* the first piece again: its rows overlap */
    convd_band_iter_init(&it, &sh, piece);
    if (convd_band_iter_next(&it)) msg_band(s, t, it.n, it.h0, it.h1, it.off, it.len);
  }
  return k;
}

/* Interleaving: the weight chunks and bias go after the first three input pieces (k 0, 1, 2;
 * those the input had no room for follow it). */
static void weights_between(seed *s, const tensors *t, int k) {
  const size_t n = t->cv.weight_wire_bytes, half = n / 2;
  if (k == 0) msg_chunk(s, 0, 0, 0, t->w, half);
  if (k == 1) msg_chunk(s, 0, 0, half, t->w + half, n - half);
  if (k == 2 && t->cv.bias_wire_bytes) msg_chunk(s, 0, 1, 0, t->b, t->cv.bias_wire_bytes);
}

static const char *dtype_tag(int dtype) {
  return dtype == CONVD_F16 ? "f16-" : dtype == CONVD_BF16 ? "bf16-" : "";
}

/* A whole Conv2d stream: spec, weights, bias, bands. */
static void conv2d_stream(seed *s, const tensors *t, const char *weights_id) {
  spec_storage sp;
  make_spec(&sp, &t->cv.p);
  if (weights_id) sp.spec.weights_id = (char *)weights_id, sp.spec.weight_shape = NULL;
  call_begin(s, FUZZ_CONV2D);
  msg_spec(s, &sp.spec);
  if (!weights_id) msg_weights(s, 0, t, 0);
  msg_bands(s, t, BANDS_OK, NULL);
  call_end(s);
}

/* A Conv2dUnary call (weights_id: by registered weights, sending none). */
static void unary_call(seed *s, const tensors *t, const char *weights_id, size_t input_cut) {
  spec_storage sp;
  make_spec(&sp, &t->cv.p);
  Convd__V1__ConvCall m = CONVD__V1__CONV_CALL__INIT;
  m.spec = &sp.spec;
  m.input.data = t->x, m.input.len = t->cv.input_wire_bytes - input_cut;
  if (weights_id) {
    sp.spec.weights_id = (char *)weights_id;
  } else {
    m.weight.data = t->w, m.weight.len = t->cv.weight_wire_bytes;
    m.bias.data = t->b, m.bias.len = t->cv.bias_wire_bytes;
  }
  call_begin(s, FUZZ_CONV2D_UNARY);
  frame_msg(s, &m.base);
  call_end(s);
}

/* PutWeights for the case's weights in dtype; *id gets the id the registry will give them (a
 * scratch registry computes it from the same widened values). */
static void put_weights(seed *s, const tensors *t, char id[CONVD_WEIGHTS_ID_LEN + 1], int skip_last) {
  const convd_conv_params *p = &t->cv.p;
  spec_storage sp;
  make_spec(&sp, p);
  Convd__V1__WeightsSpec ws = CONVD__V1__WEIGHTS_SPEC__INIT;
  ws.weight_shape = &sp.wt;
  ws.has_bias = p->has_bias != 0;
  ws.dtype = convd_stream_dtype_to_wire(p->dtype);
  ws.op = sp.spec.op;
  ws.groups = p->transposed ? p->groups : 0;
  Convd__V1__PutWeightsRequest m = CONVD__V1__PUT_WEIGHTS_REQUEST__INIT;
  m.msg_case = CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_SPEC, m.spec = &ws;
  call_begin(s, FUZZ_PUT_WEIGHTS);
  frame_msg(s, &m.base);
  msg_weights(s, 1, t, skip_last);
  call_end(s);

  convd_registry *reg = convd_registry_create(FUZZ_WEIGHTS_MEMORY);
  float *w = malloc(t->cv.weight_elems * sizeof(float));
  float *b = p->has_bias ? malloc(t->cv.bias_elems * sizeof(float)) : NULL;
  if (!reg || !w || (p->has_bias && !b)) die("out of memory");
  convd_dtype_decode(p->dtype, t->w, w, t->cv.weight_elems);
  if (b) convd_dtype_decode(p->dtype, t->b, b, t->cv.bias_elems);
  uint64_t bytes;
  int already;
  char err[256];
  if (convd_registry_put(reg, NULL, 0, sp.wt.d0, sp.wt.d1, sp.wt.d2, sp.wt.d3, p->dtype, w, b,
                         (int64_t)t->cv.bias_elems, id, &bytes, &already, err, sizeof err))
    die(err);
  convd_registry_destroy(reg);
}

static void delete_weights(seed *s, const char *id) {
  Convd__V1__DeleteWeightsRequest m = CONVD__V1__DELETE_WEIGHTS_REQUEST__INIT;
  m.weights_id = (char *)id;
  call_begin(s, FUZZ_DELETE_WEIGHTS);
  frame_msg(s, &m.base);
  call_end(s);
}

static void name_of(char *out, size_t n, const char *prefix, int dtype, const char *golden_name) {
  snprintf(out, n, "%s-%s%s%s", prefix, with_job ? "job-" : "", dtype_tag(dtype), golden_name);
}

/* Every correct seed for one case in one dtype. */
static void correct_seeds(const golden *g, const char *gname, int dtype) {
  tensors t;
  tensors_make(g, dtype, &t);
  char name[256];
  seed s = {0};

  conv2d_stream(&s, &t, NULL);
  name_of(name, sizeof name, "ok-conv2d", dtype, gname);
  seed_write(&s, name);

  unary_call(&s, &t, NULL, 0);
  name_of(name, sizeof name, "ok-unary", dtype, gname);
  seed_write(&s, name);

  /* weights registered, used by a stream and a unary call, deleted, and put again */
  char id[CONVD_WEIGHTS_ID_LEN + 1];
  put_weights(&s, &t, id, 0);
  conv2d_stream(&s, &t, id);
  unary_call(&s, &t, id, 0);
  delete_weights(&s, id);
  put_weights(&s, &t, id, 0);
  name_of(name, sizeof name, "ok-registered", dtype, gname);
  seed_write(&s, name);

  /* weight chunks between the input's pieces; then a call that goes away mid-band */
  spec_storage sp;
  make_spec(&sp, &t.cv.p);
  call_begin(&s, FUZZ_CONV2D);
  msg_spec(&s, &sp.spec);
  for (int k = msg_bands(&s, &t, BANDS_OK, weights_between); k < 3; k++) weights_between(&s, &t, k);
  call_end(&s);
  call_begin(&s, FUZZ_CONV2D | FUZZ_NO_HALF_CLOSE);
  msg_spec(&s, &sp.spec);
  msg_weights(&s, 0, &t, 1);
  msg_bands(&s, &t, BANDS_HALF, NULL);
  call_end(&s);
  name_of(name, sizeof name, "ok-interleaved-then-gone", dtype, gname);
  seed_write(&s, name);
  tensors_free(&t);
}

/* One seed of one Conv2d stream that breaks one rule. */
static void bad_stream(const tensors *t, const char *name, int second_spec, int data_first,
                       int skip_weight, enum band_fault bands) {
  seed s = {0};
  spec_storage sp;
  make_spec(&sp, &t->cv.p);
  call_begin(&s, FUZZ_CONV2D);
  if (data_first) msg_chunk(&s, 0, 0, 0, t->w, 4);
  msg_spec(&s, &sp.spec);
  if (second_spec) msg_spec(&s, &sp.spec);
  msg_weights(&s, 0, t, skip_weight);
  msg_bands(&s, t, bands, NULL);
  call_end(&s);
  seed_write(&s, name);
}

/* A spec changed by fn, alone in a Conv2d stream and in a unary call. */
static void bad_spec(const tensors *t, const char *what, void (*fn)(spec_storage *)) {
  char name[256];
  seed s = {0};
  spec_storage sp;
  make_spec(&sp, &t->cv.p);
  fn(&sp);
  call_begin(&s, FUZZ_CONV2D);
  msg_spec(&s, &sp.spec);
  call_end(&s);
  snprintf(name, sizeof name, "bad-spec-%s", what);
  seed_write(&s, name);
  Convd__V1__ConvCall m = CONVD__V1__CONV_CALL__INIT;
  m.spec = &sp.spec;
  call_begin(&s, FUZZ_CONV2D_UNARY);
  frame_msg(&s, &m.base);
  call_end(&s);
  snprintf(name, sizeof name, "bad-unary-spec-%s", what);
  seed_write(&s, name);
}

static void zero_dim(spec_storage *sp) { sp->in.d2 = 0; }
static void negative_weight(spec_storage *sp) { sp->wt.d0 = -4; }
static void groups_mismatch(spec_storage *sp) { sp->spec.groups = 2; }
static void over_limit(spec_storage *sp) { sp->in.d1 = 1024, sp->in.d2 = 1024, sp->in.d3 = 1024, sp->wt.d1 = 1024; }
static void over_dim_max(spec_storage *sp) { sp->in.d3 = INT64_C(1) << 40; }
static void unknown_op(spec_storage *sp) { sp->spec.op = 7; }
static void unknown_dtype(spec_storage *sp) { sp->spec.dtype = 9; }
static void tf32_half(spec_storage *sp) { sp->spec.dtype = CONVD__V1__DTYPE__DTYPE_FLOAT16, sp->spec.allow_tf32 = 1; }
static void unknown_weights(spec_storage *sp) { sp->spec.weights_id = "0123456789abcdef0123456789abcdef"; }
static void kernel_too_large(spec_storage *sp) { sp->wt.d2 = 99; }
static void no_input_shape(spec_storage *sp) { sp->spec.input_shape = NULL; }

/* Malformed streams and calls, from one conv2d case. */
static void bad_seeds(const golden *g) {
  tensors t;
  tensors_make(g, CONVD_F32, &t);
  bad_stream(&t, "bad-second-spec", 1, 0, 0, BANDS_OK);
  bad_stream(&t, "bad-data-first", 0, 1, 0, BANDS_OK);
  bad_stream(&t, "bad-weights-incomplete", 0, 0, 1, BANDS_OK);
  bad_stream(&t, "bad-band-repeated", 0, 0, 0, BANDS_REPEAT);
  bad_stream(&t, "bad-band-offset", 0, 0, 0, BANDS_BAD_OFFSET);
  bad_stream(&t, "bad-band-past-end", 0, 0, 0, BANDS_PAST_END);
  bad_stream(&t, "bad-band-incomplete", 0, 0, 0, BANDS_HALF);
  bad_spec(&t, "zero-dim", zero_dim);
  bad_spec(&t, "negative-weight", negative_weight);
  bad_spec(&t, "groups-mismatch", groups_mismatch);
  bad_spec(&t, "over-request-limit", over_limit);
  bad_spec(&t, "over-dim-max", over_dim_max);
  bad_spec(&t, "unknown-op", unknown_op);
  bad_spec(&t, "unknown-dtype", unknown_dtype);
  bad_spec(&t, "tf32-half", tf32_half);
  bad_spec(&t, "unknown-weights-id", unknown_weights);
  bad_spec(&t, "kernel-too-large", kernel_too_large);
  bad_spec(&t, "no-input-shape", no_input_shape);

  seed s = {0};
  spec_storage sp;
  make_spec(&sp, &t.cv.p);
  /* a bias chunk the spec did not announce */
  sp.spec.has_bias = 0;
  call_begin(&s, FUZZ_CONV2D);
  msg_spec(&s, &sp.spec);
  msg_chunk(&s, 0, 1, 0, t.b, t.cv.bias_wire_bytes ? t.cv.bias_wire_bytes : 4);
  call_end(&s);
  seed_write(&s, "bad-bias-not-announced");
  sp.spec.has_bias = t.cv.p.has_bias;

  /* a spec message cut in half: protobuf decoding fails */
  Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
  m.msg_case = CONVD__V1__CONV_REQUEST__MSG_SPEC, m.spec = &sp.spec;
  size_t n = convd__v1__conv_request__get_packed_size(&m);
  uint8_t *buf = malloc(n);
  if (buf == NULL) die("out of memory");
  convd__v1__conv_request__pack(&m, buf);
  call_begin(&s, FUZZ_CONV2D);
  frame(&s, buf, n / 2);
  call_end(&s);
  seed_write(&s, "bad-truncated-message");
  free(buf);

  /* an empty message: no oneof case set */
  call_begin(&s, FUZZ_CONV2D);
  frame(&s, "", 0);
  call_end(&s);
  seed_write(&s, "bad-empty-message");

  /* unary: the input a few bytes short; weights registered and sent as well */
  unary_call(&s, &t, NULL, 4);
  seed_write(&s, "bad-unary-input-short");
  char id[CONVD_WEIGHTS_ID_LEN + 1];
  put_weights(&s, &t, id, 0);
  call_begin(&s, FUZZ_CONV2D);
  make_spec(&sp, &t.cv.p);
  sp.spec.weights_id = id;
  msg_spec(&s, &sp.spec);
  msg_chunk(&s, 0, 0, 0, t.w, t.cv.weight_wire_bytes);
  call_end(&s);
  seed_write(&s, "bad-registered-and-weight-chunk");

  /* unary: an output too large for one response message, though within the request limit */
  make_spec(&sp, &t.cv.p);
  sp.in.d0 = 1, sp.in.d1 = 1, sp.in.d2 = 1100, sp.in.d3 = 1000;
  sp.wt.d0 = 1, sp.wt.d1 = 1, sp.wt.d2 = 1, sp.wt.d3 = 1;
  sp.pad.top = sp.pad.bottom = sp.pad.left = sp.pad.right = 0;
  sp.spec.groups = 1;
  Convd__V1__ConvCall uc = CONVD__V1__CONV_CALL__INIT;
  uc.spec = &sp.spec;
  call_begin(&s, FUZZ_CONV2D_UNARY);
  frame_msg(&s, &uc.base);
  call_end(&s);
  seed_write(&s, "bad-unary-output-over-message-limit");

  /* PutWeights: incomplete, a second spec, weights over the registry's limit; deleting an id
   * nobody registered */
  put_weights(&s, &t, id, 1);
  seed_write(&s, "bad-put-weights-incomplete");
  Convd__V1__WeightsSpec ws = CONVD__V1__WEIGHTS_SPEC__INIT;
  Convd__V1__Shape4 wsh = CONVD__V1__SHAPE4__INIT;
  wsh.d0 = 4, wsh.d1 = 3, wsh.d2 = 3, wsh.d3 = 3;
  ws.weight_shape = &wsh;
  Convd__V1__PutWeightsRequest pm = CONVD__V1__PUT_WEIGHTS_REQUEST__INIT;
  pm.msg_case = CONVD__V1__PUT_WEIGHTS_REQUEST__MSG_SPEC, pm.spec = &ws;
  call_begin(&s, FUZZ_PUT_WEIGHTS);
  frame_msg(&s, &pm.base);
  frame_msg(&s, &pm.base);
  call_end(&s);
  seed_write(&s, "bad-put-weights-second-spec");
  wsh.d0 = 1024, wsh.d1 = 1024, wsh.d2 = 5, wsh.d3 = 5; /* 100 MiB as float32 */
  call_begin(&s, FUZZ_PUT_WEIGHTS | FUZZ_NO_HALF_CLOSE);
  frame_msg(&s, &pm.base);
  call_end(&s);
  seed_write(&s, "bad-put-weights-over-limit");
  /* A transpose's bias has weight_shape.d1 x groups values: 2^30 here (4 GiB as float32) beside
   * 4 KiB of weights. The spec alone must be refused (groups must divide C_in, and the bias
   * counts against --weights-memory): the call goes away after it, so only a refusal there
   * makes this seed "bad". It was accepted once, and the bias buffer allocated. */
  wsh.d0 = 1, wsh.d1 = 1024, wsh.d2 = 1, wsh.d3 = 1;
  ws.op = CONVD__V1__OP__OP_CONV_TRANSPOSE2D, ws.groups = 1 << 20, ws.has_bias = 1;
  call_begin(&s, FUZZ_PUT_WEIGHTS | FUZZ_NO_HALF_CLOSE);
  frame_msg(&s, &pm.base);
  call_end(&s);
  seed_write(&s, "bad-put-weights-transpose-bias-over-limit");
  /* weights that fit the registry (48 MiB) with a bias that does not (as many values): refused
   * at the spec, not after the client has sent all of it */
  wsh.d0 = 12 << 20, wsh.d1 = 1, wsh.d2 = 1, wsh.d3 = 1;
  ws.op = CONVD__V1__OP__OP_CONV2D, ws.groups = 0, ws.has_bias = 1;
  call_begin(&s, FUZZ_PUT_WEIGHTS | FUZZ_NO_HALF_CLOSE);
  frame_msg(&s, &pm.base);
  call_end(&s);
  seed_write(&s, "bad-put-weights-and-bias-over-limit");
  /* the same weights without a bias fit: admitted for their wire and float32 copies, 96 MiB
   * (a bias that is not there was counted too, 144 MiB, over what any upload may hold) */
  ws.has_bias = 0;
  call_begin(&s, FUZZ_PUT_WEIGHTS | FUZZ_NO_HALF_CLOSE);
  frame_msg(&s, &pm.base);
  call_end(&s);
  seed_write(&s, "ok-put-weights-no-bias-admitted");
  /* an op nobody serves (it was read as conv2d); again refused at the spec */
  wsh.d0 = 4, wsh.d1 = 3, wsh.d2 = 3, wsh.d3 = 3;
  ws.op = 7, ws.groups = 0;
  call_begin(&s, FUZZ_PUT_WEIGHTS | FUZZ_NO_HALF_CLOSE);
  frame_msg(&s, &pm.base);
  call_end(&s);
  seed_write(&s, "bad-put-weights-unknown-op");
  delete_weights(&s, "0123456789abcdef0123456789abcdef");
  seed_write(&s, "bad-delete-unknown");
  tensors_free(&t);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: gen_corpus GOLDEN_DIR OUT_DIR\n");
    return 2;
  }
  out_dir = argv[2];
  /* Small cases, between them every op, groups, depthwise, stride, dilation, asymmetric
   * padding, N > 1, bias and none: seeds stay a few KiB, so the fuzzer mutates them fast. */
  static const struct {
    const char *name;
    int half_types;
  } cases[] = {
      {"basic_3x3_pad1", 1},        {"groups2", 0},        {"depthwise", 0},
      {"rect_kernel_3x5_s21", 1},   {"width_one", 0},      {"kernel_covers_input", 0},
      {"no_bias_valid", 0},         {"asym_padding", 0},   {"dilation2", 0},
      {"transpose_s2_k3_outpad1", 1}, {"transpose_groups2", 0}, {"transpose_s3_k5", 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    golden g;
    char err[512];
    if (golden_load(argv[1], cases[i].name, &g, err, sizeof err)) die(err);
    /* each only checked, and with a job when the convolution is small enough for one */
    convd_conv cv;
    if (convd_conv_init(&cv, &g.p, err, sizeof err)) die(err);
    for (int job = 0; job < (fuzz_job_small(&cv) ? 2 : 1); job++) {
      with_job = job ? FUZZ_WITH_JOB : 0;
      correct_seeds(&g, cases[i].name, CONVD_F32);
      if (cases[i].half_types) {
        correct_seeds(&g, cases[i].name, CONVD_F16);
        correct_seeds(&g, cases[i].name, CONVD_BF16);
      }
    }
    with_job = 0;
    if (strcmp(cases[i].name, "basic_3x3_pad1") == 0) bad_seeds(&g);
    golden_free(&g);
  }
  printf("gen_corpus: %d seeds in %s\n", written, out_dir);
  return 0;
}
