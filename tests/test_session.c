/* The Conv2d stream's rules, fed message by message without a network: the happy path with
 * bands cut into uneven pieces, and every malformed stream with its message; and the in-place
 * reading of band messages from a received byte buffer's slices (proto/wire.c), which must
 * agree with protobuf-c on every message it accepts and leave every other one to it. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "band.h"
#include "err.h"
#include "ref.h"
#include "conv_stream.h"
#include "testutil.h"
#include "wire.h"

/* Shapes for the tests: input 2x3x5x4, weight 4x3x3x3, padding 1, bias. */
typedef struct fixture {
  Convd__V1__ConvSpec spec;
  Convd__V1__Shape4 in, wt;
  Convd__V1__Padding pad;
} fixture;

static void fixture_init(fixture *f) {
  convd__v1__conv_spec__init(&f->spec);
  convd__v1__shape4__init(&f->in);
  convd__v1__shape4__init(&f->wt);
  convd__v1__padding__init(&f->pad);
  f->in.d0 = 2, f->in.d1 = 3, f->in.d2 = 5, f->in.d3 = 4;
  f->wt.d0 = 4, f->wt.d1 = 3, f->wt.d2 = 3, f->wt.d3 = 3;
  f->pad.top = f->pad.bottom = f->pad.left = f->pad.right = 1;
  f->spec.input_shape = &f->in;
  f->spec.weight_shape = &f->wt;
  f->spec.padding = &f->pad;
  f->spec.has_bias = 1;
}

static int feed_spec(convd_stream *s, Convd__V1__ConvSpec *spec, char *err, size_t errlen) {
  Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
  m.msg_case = CONVD__V1__CONV_REQUEST__MSG_SPEC;
  m.spec = spec;
  int accepted;
  return convd_stream_feed(s, &m, &accepted, err, errlen);
}

static int feed_chunk(convd_stream *s, int bias, uint64_t off, const void *data, size_t len,
                      char *err, size_t errlen) {
  Convd__V1__TensorChunk ch = CONVD__V1__TENSOR_CHUNK__INIT;
  ch.offset = off;
  ch.data.data = (uint8_t *)data;
  ch.data.len = len;
  Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
  m.msg_case = bias ? CONVD__V1__CONV_REQUEST__MSG_BIAS : CONVD__V1__CONV_REQUEST__MSG_WEIGHT;
  if (bias) m.bias = &ch;
  else m.weight = &ch;
  int accepted;
  return convd_stream_feed(s, &m, &accepted, err, errlen);
}

static int feed_band(convd_stream *s, int64_t n, int64_t h0, int64_t h1, uint64_t off,
                     const void *data, size_t len, char *err, size_t errlen) {
  Convd__V1__RowBand b = CONVD__V1__ROW_BAND__INIT;
  b.n = n, b.h_begin = h0, b.h_end = h1, b.offset = off;
  b.data.data = (uint8_t *)data;
  b.data.len = len;
  Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
  m.msg_case = CONVD__V1__CONV_REQUEST__MSG_INPUT;
  m.input = &b;
  int accepted;
  return convd_stream_feed(s, &m, &accepted, err, errlen);
}

static const size_t WBYTES = 4 * 3 * 3 * 3 * 4, BBYTES = 4 * 4, ROW = 3 * 4 * 4; /* ROW: all channels */
static char zeros[4096];

/* Sends everything but what `skip` names: 'w' weights, 'b' bias, 'r' the last row. */
static int feed_all_but(convd_stream *s, char skip, char *err, size_t errlen) {
  int rc = 0;
  if (skip != 'w' && (rc = feed_chunk(s, 0, 0, zeros, WBYTES, err, errlen))) return rc;
  if (skip != 'b' && (rc = feed_chunk(s, 1, 0, zeros, BBYTES, err, errlen))) return rc;
  for (int n = 0; n < 2; n++)
    for (int h = 0; h < 5; h++) {
      if (skip == 'r' && n == 1 && h == 4) continue;
      if ((rc = feed_band(s, n, h, h + 1, 0, zeros, ROW, err, errlen))) return rc;
    }
  return 0;
}

/* Collects a job's output rows into an NCHW tensor. */
typedef struct sink {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  convd_job *job;
  float *y;
  int done, status;
} sink;

static void sink_rows(void *user, int64_t n, int64_t h0, int64_t h1) {
  sink *k = user;
  convd_job_take_rows_nchw(k->job, n, h0, h1, k->y);
}

static void sink_done(void *user, int status, const char *err, const convd_job_stats *st) {
  sink *k = user;
  (void)err, (void)st;
  pthread_mutex_lock(&k->mu);
  k->done = 1, k->status = status;
  pthread_cond_signal(&k->cv);
  pthread_mutex_unlock(&k->mu);
}

static void test_happy_path_uneven_pieces(void) {
  fixture f;
  fixture_init(&f);
  convd_stream *s = convd_stream_create(1 << 20, NULL, NULL);
  char err[1024];
  ASSERT_OK(feed_spec(s, &f.spec, err, sizeof err), err);
  const convd_conv *c = convd_stream_conv(s);
  ASSERT_EQ_INT(c->h_out, 5);
  /* A real job on two devices with a budget that cuts the output into tiles. */
  convd_engine *e;
  convd_engine_opts eo = {.cpu_devices = 2, .reference = 1, .device_memory = 1500};
  ASSERT_OK(convd_engine_create(&eo, &e, err, sizeof err), err);
  float y[2 * 4 * 5 * 4];
  poison(y, 160);
  sink k = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, y, 0, 0};
  convd_job_cbs cbs = {.user = &k, .rows_ready = sink_rows, .done = sink_done};
  pthread_mutex_lock(&k.mu);
  ASSERT_OK(convd_job_create(e, c, &cbs, &k.job, err, sizeof err), err);
  pthread_mutex_unlock(&k.mu);
  ASSERT_TRUE(convd_job_plan(k.job)->ops > 1);
  ASSERT_OK(convd_stream_attach(s, k.job, err, sizeof err), err);
  rng r = {0x5eed0010};
  float x[2 * 3 * 5 * 4], w[108], b[4];
  rng_fill(&r, x, 120);
  rng_fill(&r, w, 108);
  rng_fill(&r, b, 4);
  /* weights in three chunks of odd byte sizes, bias in one */
  ASSERT_OK(feed_chunk(s, 0, 0, w, 7, err, sizeof err), err);
  ASSERT_OK(feed_chunk(s, 0, 7, (char *)w + 7, 200, err, sizeof err), err);
  ASSERT_OK(feed_chunk(s, 0, 207, (char *)w + 207, WBYTES - 207, err, sizeof err), err);
  ASSERT_OK(feed_chunk(s, 1, 0, b, BBYTES, err, sizeof err), err);
  /* batch item 1 first, in bands of 2,2,1 rows, each cut into pieces of 13 bytes */
  convd_band_shape sh = {2, 3, 5, 4, 4};
  char piece[256];
  const int64_t bands[][3] = {{1, 0, 2}, {1, 2, 4}, {1, 4, 5}, {0, 3, 5}, {0, 0, 3}};
  for (int i = 0; i < 5; i++) {
    size_t len = convd_band_bytes(&sh, bands[i][1], bands[i][2]);
    for (size_t off = 0; off < len; off += 13) {
      size_t take = len - off < 13 ? len - off : 13;
      convd_band_gather(x, &sh, bands[i][0], bands[i][1], bands[i][2], off, piece, take);
      ASSERT_OK(feed_band(s, bands[i][0], bands[i][1], bands[i][2], off, piece, take, err, sizeof err), err);
    }
  }
  ASSERT_OK(convd_stream_finish(s, err, sizeof err), err);
  ASSERT_EQ_INT(convd_stream_bytes_received(s), sizeof x + sizeof w + sizeof b);
  pthread_mutex_lock(&k.mu);
  while (!k.done) pthread_cond_wait(&k.cv, &k.mu);
  pthread_mutex_unlock(&k.mu);
  ASSERT_EQ_INT(k.status, 0);
  /* What the job computed from the reassembled stream equals the reference on the originals. */
  float ref[160];
  double want[160];
  convd_ref_conv2d(c, x, w, b, ref, NULL);
  for (int i = 0; i < 160; i++) want[i] = ref[i];
  ASSERT_TRUE(check_close("reassembled and computed", y, want, 160) == 0);
  convd_job_destroy(k.job);
  convd_stream_destroy(s);
  convd_engine_destroy(e);
}

typedef int (*stream_fn)(convd_stream *s, fixture *f, char *err, size_t errlen);

static int s_data_first(convd_stream *s, fixture *f, char *err, size_t n) {
  (void)f;
  return feed_chunk(s, 0, 0, zeros, 4, err, n);
}
static int s_two_specs(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_spec(s, &f->spec, err, n);
}
static int s_zero_dim(convd_stream *s, fixture *f, char *err, size_t n) {
  f->in.d2 = 0;
  return feed_spec(s, &f->spec, err, n);
}
static int s_negative_dim(convd_stream *s, fixture *f, char *err, size_t n) {
  f->wt.d0 = -4;
  return feed_spec(s, &f->spec, err, n);
}
static int s_no_weight_shape(convd_stream *s, fixture *f, char *err, size_t n) {
  f->spec.weight_shape = NULL;
  return feed_spec(s, &f->spec, err, n);
}
static int s_kernel_too_large(convd_stream *s, fixture *f, char *err, size_t n) {
  f->wt.d2 = 9;
  return feed_spec(s, &f->spec, err, n);
}
static int s_groups(convd_stream *s, fixture *f, char *err, size_t n) {
  f->spec.groups = 2;
  return feed_spec(s, &f->spec, err, n);
}
static int s_bad_op(convd_stream *s, fixture *f, char *err, size_t n) {
  f->spec.op = 7; /* not an Op this daemon knows */
  return feed_spec(s, &f->spec, err, n);
}
static int s_bad_dtype(convd_stream *s, fixture *f, char *err, size_t n) {
  f->spec.dtype = 7;
  return feed_spec(s, &f->spec, err, n);
}
static int s_too_large(convd_stream *s, fixture *f, char *err, size_t n) {
  f->in.d2 = f->in.d3 = 4096; /* 2*3*4096*4096*4 bytes > the 1 MiB limit used here */
  return feed_spec(s, &f->spec, err, n);
}
static int s_weight_out_of_order(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_chunk(s, 0, 8, zeros, 8, err, n);
}
static int s_weight_too_long(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_chunk(s, 0, 0, zeros, WBYTES + 4, err, n);
}
static int s_unwanted_bias(convd_stream *s, fixture *f, char *err, size_t n) {
  f->spec.has_bias = 0;
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_chunk(s, 1, 0, zeros, 16, err, n);
}
static int s_band_n_range(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_band(s, 2, 0, 1, 0, zeros, ROW, err, n);
}
static int s_band_beyond_h(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_band(s, 0, 4, 6, 0, zeros, 2 * ROW, err, n);
}
static int s_band_empty_range(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_band(s, 0, 3, 3, 0, zeros, 0, err, n);
}
static int s_band_overlap(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  if (!rc) rc = feed_band(s, 0, 0, 3, 0, zeros, 3 * ROW, err, n);
  return rc ? rc : feed_band(s, 0, 2, 4, 0, zeros, 2 * ROW, err, n);
}
static int s_band_too_long(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_band(s, 0, 0, 1, 0, zeros, ROW + 4, err, n);
}
static int s_band_interleaved(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  if (!rc) rc = feed_band(s, 0, 0, 1, 0, zeros, 8, err, n);
  return rc ? rc : feed_band(s, 0, 1, 2, 0, zeros, 8, err, n);
}
static int s_band_first_offset(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  return rc ? rc : feed_band(s, 0, 0, 1, 8, zeros, 8, err, n);
}
static int s_missing_weights(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  if (!rc) rc = feed_all_but(s, 'w', err, n);
  return rc ? rc : convd_stream_finish(s, err, n);
}
static int s_missing_bias(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  if (!rc) rc = feed_all_but(s, 'b', err, n);
  return rc ? rc : convd_stream_finish(s, err, n);
}
static int s_missing_row(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  if (!rc) rc = feed_all_but(s, 'r', err, n);
  return rc ? rc : convd_stream_finish(s, err, n);
}
static int s_open_band_at_close(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  if (!rc) rc = feed_chunk(s, 0, 0, zeros, WBYTES, err, n);
  if (!rc) rc = feed_chunk(s, 1, 0, zeros, BBYTES, err, n);
  if (!rc) rc = feed_band(s, 0, 0, 1, 0, zeros, 8, err, n);
  return rc ? rc : convd_stream_finish(s, err, n);
}
static int s_no_spec_at_close(convd_stream *s, fixture *f, char *err, size_t n) {
  (void)f;
  return convd_stream_finish(s, err, n);
}
static int s_empty_message(convd_stream *s, fixture *f, char *err, size_t n) {
  int rc = feed_spec(s, &f->spec, err, n);
  if (rc) return rc;
  Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
  int accepted;
  return convd_stream_feed(s, &m, &accepted, err, n);
}

static void test_stream_errors(void) {
  static const struct {
    const char *name;
    stream_fn fn;
    int code;
    const char *msg;
  } cases[] = {
      {"data before spec", s_data_first, CONVD_EINVAL, "the first message must be the spec"},
      {"two specs", s_two_specs, CONVD_EINVAL, "a second spec arrived"},
      {"zero dim", s_zero_dim, CONVD_EINVAL, "N,C,H,W = 2,3,0,4: every dimension must be at least 1"},
      {"negative dim", s_negative_dim, CONVD_EINVAL, "C_out,C_in/groups,kH,kW = -4,3,3,3"},
      {"no weight shape", s_no_weight_shape, CONVD_EINVAL, "spec.weight_shape is missing"},
      {"kernel too large", s_kernel_too_large, CONVD_EINVAL, "kernel 9x3 is larger than padded input 7x6"},
      {"groups", s_groups, CONVD_EINVAL, "groups = 2 does not divide the 3 input channels"},
      {"op", s_bad_op, CONVD_ENOTSUP, "spec.op = 7 is not an operation"},
      {"dtype", s_bad_dtype, CONVD_ENOTSUP, "spec.dtype = 7"},
      {"too large", s_too_large, CONVD_ELIMIT, "--max-request-bytes"},
      {"weight order", s_weight_out_of_order, CONVD_EINVAL, "weight chunk at byte offset 8, but 0 bytes have arrived"},
      {"weight length", s_weight_too_long, CONVD_EINVAL, "ends past the weight's 432 bytes"},
      {"unwanted bias", s_unwanted_bias, CONVD_EINVAL, "has_bias = false"},
      {"band n", s_band_n_range, CONVD_EINVAL, "n = 2, outside the batch [0, 2)"},
      {"band beyond H", s_band_beyond_h, CONVD_EINVAL, "rows [4, 6): need 0 <= h_begin < h_end <= H = 5"},
      {"band empty", s_band_empty_range, CONVD_EINVAL, "rows [3, 3)"},
      {"band overlap", s_band_overlap, CONVD_EINVAL, "overlaps rows already received (row 2 of batch item 0)"},
      {"band too long", s_band_too_long, CONVD_EINVAL, "end past the band's 48 bytes"},
      {"band interleaved", s_band_interleaved, CONVD_EINVAL, "is incomplete (8 of 48 bytes)"},
      {"band offset", s_band_first_offset, CONVD_EINVAL, "the first piece of a band has offset 0"},
      {"missing weights", s_missing_weights, CONVD_EINVAL, "weights incomplete at half-close: 0 of 432"},
      {"missing bias", s_missing_bias, CONVD_EINVAL, "bias incomplete at half-close: 0 of 16"},
      {"missing row", s_missing_row, CONVD_EINVAL, "9 of 10 rows arrived; row 4 of batch item 1 is missing"},
      {"open band", s_open_band_at_close, CONVD_EINVAL, "has 8 of 48 bytes"},
      {"no spec", s_no_spec_at_close, CONVD_EINVAL, "the stream ended before the spec arrived"},
      {"empty message", s_empty_message, CONVD_EINVAL, "a message with no content"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    fixture f;
    fixture_init(&f);
    convd_stream *s = convd_stream_create(1 << 20, NULL, NULL);
    char err[1024] = "";
    int rc = cases[i].fn(s, &f, err, sizeof err);
    convd_stream_destroy(s);
    if (rc != cases[i].code || strstr(err, cases[i].msg) == NULL) {
      FAIL_AT("%s: got %d \"%s\", want %d containing \"%s\"", cases[i].name, rc, err,
              cases[i].code, cases[i].msg);
      return;
    }
  }
}

/* bytes cut into a byte buffer of random slices. */
static grpc_byte_buffer *sliced(rng *r, const uint8_t *p, size_t n) {
  grpc_slice sl[64];
  size_t k = 0, at = 0;
  while (at < n || k == 0) {
    size_t len = k == 63 ? n - at : (size_t)rng_range(r, 0, (int64_t)(n - at));
    sl[k++] = grpc_slice_from_copied_buffer((const char *)p + at, len);
    at += len;
  }
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(sl, k);
  for (size_t i = 0; i < k; i++) grpc_slice_unref(sl[i]);
  return bb;
}

/* If the in-place reader accepts bb, protobuf-c must read the same band from it. */
static int agrees(grpc_byte_buffer *bb, const uint8_t *p, size_t n, int *accepted) {
  convd_wire_band wb;
  *accepted = convd_wire_parse_band(bb, CONVD_WIRE_REQUEST_INPUT, &wb);
  if (!*accepted) return 1;
  Convd__V1__ConvRequest *m = convd__v1__conv_request__unpack(NULL, n, p);
  int ok = m && m->msg_case == CONVD__V1__CONV_REQUEST__MSG_INPUT && m->input->n == wb.n &&
           m->input->h_begin == wb.h_begin && m->input->h_end == wb.h_end &&
           m->input->offset == wb.offset && m->input->data.len == wb.data_len;
  if (ok && wb.data_len) {
    uint8_t *d = malloc(wb.data_len);
    size_t off = wb.data_len / 3; /* from an offset too, as pieces are copied */
    convd_wire_band_copy(&wb, 0, d, off);
    convd_wire_band_copy(&wb, off, d + off, wb.data_len - off);
    ok = memcmp(d, m->input->data.data, wb.data_len) == 0;
    memset(d, 0, wb.data_len);
    convd_wire_band_copy(&wb, 0, d, wb.data_len); /* whole: run by run */
    ok = ok && memcmp(d, m->input->data.data, wb.data_len) == 0;
    free(d);
  }
  if (m) convd__v1__conv_request__free_unpacked(m, NULL);
  return ok;
}

static void test_band_read_in_place(void) {
  rng r = {42};
  convd_wire_band wb;
  int fast = 0, fallback = 0;
  for (int t = 0; t < 3000; t++) {
    Convd__V1__RowBand band = CONVD__V1__ROW_BAND__INIT;
    Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
    uint8_t data[700];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)rng_next(&r);
    band.n = rng_range(&r, -3, 5), band.h_begin = rng_range(&r, 0, 1 << 20);
    band.h_end = rng_range(&r, -1, 1 << 30), band.offset = (uint64_t)rng_range(&r, 0, 1 << 20);
    band.data.data = data, band.data.len = (size_t)rng_range(&r, 0, sizeof data);
    m.msg_case = CONVD__V1__CONV_REQUEST__MSG_INPUT, m.input = &band;
    uint8_t buf[1024];
    size_t n = convd__v1__conv_request__pack(&m, buf);
    /* damage some: a flipped byte, a cut, bytes appended, a field repeated */
    const int how = (int)rng_range(&r, 0, 4);
    if (how == 1 && n) buf[rng_range(&r, 0, (int64_t)n - 1)] ^= (uint8_t)rng_range(&r, 1, 255);
    if (how == 2 && n) n = (size_t)rng_range(&r, 0, (int64_t)n - 1);
    if (how == 3) buf[n++] = 0x08, buf[n++] = 0x01; /* ConvRequest field 1 (spec) as a varint */
    grpc_byte_buffer *bb = sliced(&r, buf, n);
    int accepted;
    const int ok = agrees(bb, buf, n, &accepted);
    grpc_byte_buffer_destroy(bb);
    if (!ok) FAIL_AT("case %d (damage %d): read in place differs from protobuf-c", t, how);
    if (!ok) return;
    if (how == 0) ASSERT_TRUE(accepted); /* an undamaged band is always read in place */
    if (how == 3) ASSERT_TRUE(!accepted);
    fast += accepted, fallback += !accepted;
  }
  /* bands written in place (both directions' field numbers) read back by protobuf-c */
  for (int t = 0; t < 200; t++) {
    const unsigned field = t % 2 ? CONVD_WIRE_REQUEST_INPUT : CONVD_WIRE_RESPONSE_OUTPUT;
    const int64_t bn = rng_range(&r, 0, 1 << 20), h0 = rng_range(&r, 0, 1 << 30), h1 = rng_range(&r, 0, 1 << 30);
    const uint64_t off = (uint64_t)rng_range(&r, 0, INT64_C(1) << 40);
    const size_t len = (size_t)rng_range(&r, 0, 5000);
    uint8_t *data, *msg;
    size_t total;
    ASSERT_TRUE((msg = convd_wire_band_message(field, bn, h0, h1, off, len, &data, &total)) != NULL);
    for (size_t i = 0; i < len; i++) data[i] = (uint8_t)(i * 7 + (size_t)t);
    const Convd__V1__RowBand *got = NULL;
    Convd__V1__ConvRequest *rq = NULL;
    Convd__V1__ConvResponse *rs = NULL;
    if (field == CONVD_WIRE_REQUEST_INPUT) {
      rq = convd__v1__conv_request__unpack(NULL, total, msg);
      got = rq && rq->msg_case == CONVD__V1__CONV_REQUEST__MSG_INPUT ? rq->input : NULL;
    } else {
      rs = convd__v1__conv_response__unpack(NULL, total, msg);
      got = rs && rs->msg_case == CONVD__V1__CONV_RESPONSE__MSG_OUTPUT ? rs->output : NULL;
    }
    int ok = got && got->n == bn && got->h_begin == h0 && got->h_end == h1 && got->offset == off &&
             got->data.len == len && (len == 0 || memcmp(got->data.data, data, len) == 0);
    grpc_byte_buffer *bb = sliced(&r, msg, total);
    ok = ok && convd_wire_parse_band(bb, field, &wb) && wb.n == bn && wb.data_len == len;
    grpc_byte_buffer_destroy(bb);
    if (rq) convd__v1__conv_request__free_unpacked(rq, NULL);
    if (rs) convd__v1__conv_response__free_unpacked(rs, NULL);
    free(msg);
    if (!ok) FAIL_AT("band message %d written in place does not read back", t);
    if (!ok) return;
  }
  /* not a band at all: left to protobuf-c */
  Convd__V1__ConvSpec spec = CONVD__V1__CONV_SPEC__INIT;
  Convd__V1__ConvRequest m = CONVD__V1__CONV_REQUEST__INIT;
  m.msg_case = CONVD__V1__CONV_REQUEST__MSG_SPEC, m.spec = &spec;
  uint8_t buf[64];
  size_t n = convd__v1__conv_request__pack(&m, buf);
  grpc_byte_buffer *bb = sliced(&r, buf, n);
  ASSERT_TRUE(!convd_wire_parse_band(bb, CONVD_WIRE_REQUEST_INPUT, &wb));
  ASSERT_TRUE(!convd_wire_parse_band(bb, CONVD_WIRE_RESPONSE_OUTPUT, &wb));
  grpc_byte_buffer_destroy(bb);
  printf("  %d messages read in place, %d left to protobuf-c, all agreeing\n", fast, fallback);
  ASSERT_TRUE(fast > 1000 && fallback > 500);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"happy_path_uneven_pieces", test_happy_path_uneven_pieces},
      {"stream_errors", test_stream_errors},
      {"band_read_in_place", test_band_read_in_place},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
