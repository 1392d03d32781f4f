#include "wire.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convd/v1/convd.pb-c.h"
#include "err.h"
#include "grpc/health/v1/health.pb-c.h"

grpc_byte_buffer *convd_wire_pack(const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_get_packed_size(m);
  void *buf = malloc(n ? n : 1);
  if (buf == NULL) return NULL;
  protobuf_c_message_pack(m, buf);
  return convd_wire_take(buf, n);
}

ProtobufCMessage *convd_wire_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc) {
  grpc_byte_buffer_reader rd;
  if (!grpc_byte_buffer_reader_init(&rd, bb)) return NULL;
  /* A large message arrives as many slices: readall makes it one contiguous copy, which
   * protobuf-c needs. */
  grpc_slice s = grpc_byte_buffer_reader_readall(&rd);
  grpc_byte_buffer_reader_destroy(&rd);
  ProtobufCMessage *m =
      protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
  grpc_slice_unref(s);
  return m;
}

const char *convd_wire_status_name(grpc_status_code code) {
  static const char *const names[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
      "UNAUTHENTICATED"};
  return (unsigned)code < sizeof names / sizeof names[0] ? names[code] : "UNKNOWN";
}

/* One row per pairing. to: used for err -> status; from: used for status -> err. */
static const struct {
  int err;
  grpc_status_code status;
  unsigned char to, from;
} status_map[] = {
    {CONVD_OK, GRPC_STATUS_OK, 1, 1},
    {CONVD_EINVAL, GRPC_STATUS_INVALID_ARGUMENT, 1, 1},
    {CONVD_ERANGE, GRPC_STATUS_INVALID_ARGUMENT, 1, 0},
    {CONVD_EINVAL, GRPC_STATUS_OUT_OF_RANGE, 0, 1},
    {CONVD_ENOMEM, GRPC_STATUS_RESOURCE_EXHAUSTED, 1, 0},
    {CONVD_ELIMIT, GRPC_STATUS_RESOURCE_EXHAUSTED, 1, 1},
    {CONVD_ENOTSUP, GRPC_STATUS_UNIMPLEMENTED, 1, 1},
    {CONVD_ECANCELED, GRPC_STATUS_CANCELLED, 1, 1},
    {CONVD_ETIMEDOUT, GRPC_STATUS_DEADLINE_EXCEEDED, 1, 1},
    {CONVD_EUNAVAIL, GRPC_STATUS_UNAVAILABLE, 1, 1},
    {CONVD_ENOTFOUND, GRPC_STATUS_NOT_FOUND, 1, 1},
    {CONVD_EDATALOSS, GRPC_STATUS_DATA_LOSS, 1, 1},
    {CONVD_EBUSY, GRPC_STATUS_FAILED_PRECONDITION, 1, 1},
};

size_t convd_wire_channel_args(grpc_arg *args, size_t max_message_bytes) {
  static const struct {
    const char *key;
    int is_limit; /* value is the message limit, else the fixed value */
    int value;
  } table[CONVD_WIRE_CHANNEL_ARGS] = {
      {GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 1, 0},
      {GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, 1, 0},
      {GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 0, CONVD_WIRE_LOOKAHEAD_BYTES},
      {GRPC_ARG_HTTP2_BDP_PROBE, 0, 0},
  };
  int limit = max_message_bytes > INT32_MAX ? INT32_MAX : (int)max_message_bytes;
  memset(args, 0, CONVD_WIRE_CHANNEL_ARGS * sizeof *args);
  for (size_t k = 0; k < CONVD_WIRE_CHANNEL_ARGS; k++) {
    args[k].type = GRPC_ARG_INTEGER;
    args[k].key = (char *)table[k].key;
    args[k].value.integer = table[k].is_limit ? limit : table[k].value;
  }
  return CONVD_WIRE_CHANNEL_ARGS;
}

int convd_wire_lb_service_config(const char *policy, char *out, size_t len) {
  int n;
  if (policy != NULL && strcmp(policy, "pick_first") == 0) {
    n = snprintf(out, len, "{\"loadBalancingConfig\":[{\"pick_first\":{}}]}");
  } else if (policy != NULL && strcmp(policy, "round_robin") == 0) {
    /* The services by their descriptors' names: the .proto stays the only spelling. */
    n = snprintf(out, len,
                 "{\"loadBalancingConfig\":[{\"round_robin\":{}}],"
                 "\"methodConfig\":[{\"name\":[{\"service\":\"%s\"},{\"service\":\"%s\"}],"
                 "\"retryPolicy\":{\"maxAttempts\":3,\"initialBackoff\":\"0.1s\","
                 "\"maxBackoff\":\"1s\",\"backoffMultiplier\":2,"
                 "\"retryableStatusCodes\":[\"UNAVAILABLE\"]}}]}",
                 convd__v1__convolution__descriptor.name, grpc__health__v1__health__descriptor.name);
  } else {
    return -1;
  }
  return n < 0 || (size_t)n >= len ? -1 : 0;
}

grpc_status_code convd_wire_status_from_err(int code) {
  for (size_t i = 0; i < sizeof status_map / sizeof status_map[0]; i++)
    if (status_map[i].to && status_map[i].err == code) return status_map[i].status;
  return GRPC_STATUS_INTERNAL;
}

int convd_wire_err_from_status(grpc_status_code status) {
  for (size_t i = 0; i < sizeof status_map / sizeof status_map[0]; i++)
    if (status_map[i].from && status_map[i].status == status) return status_map[i].err;
  return CONVD_EREMOTE;
}

/* ---- reading a band in place ------------------------------------------------------------- */

/* A position in a slice list, and the bytes from there to the end. */
typedef struct cursor {
  const grpc_slice *sl;
  size_t n, i, off; /* slice i, byte off in it */
  uint64_t left;
} cursor;

static void skip_empty(cursor *c) {
  while (c->i < c->n && c->off >= GRPC_SLICE_LENGTH(c->sl[c->i])) c->i++, c->off = 0;
}

static int next_byte(cursor *c, uint8_t *out) {
  if (c->left == 0) return -1;
  skip_empty(c);
  *out = GRPC_SLICE_START_PTR(c->sl[c->i])[c->off++];
  c->left--;
  return 0;
}

static int read_varint(cursor *c, uint64_t *v) {
  *v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    uint8_t b;
    if (next_byte(c, &b)) return -1;
    *v |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) return 0;
  }
  return -1;
}

/* Advances n bytes (n <= c->left). */
static void skip_bytes(cursor *c, uint64_t n) {
  c->left -= n;
  while (n) {
    skip_empty(c);
    const size_t here = GRPC_SLICE_LENGTH(c->sl[c->i]) - c->off;
    const size_t step = n < here ? (size_t)n : here;
    c->off += step;
    n -= step;
  }
}

int convd_wire_parse_band(const grpc_byte_buffer *bb, unsigned field, convd_wire_band *b) {
  if (bb == NULL || bb->type != GRPC_BB_RAW || bb->data.raw.compression != GRPC_COMPRESS_NONE)
    return 0;
  const grpc_slice_buffer *sb = &bb->data.raw.slice_buffer;
  cursor c = {sb->slices, sb->count, 0, 0, sb->length};
  uint64_t key = 0, len = 0;
  /* exactly one field, the band (length-delimited), filling the message */
  if (read_varint(&c, &key) || key != (((uint64_t)field << 3) | 2) || read_varint(&c, &len) ||
      len != c.left)
    return 0;
  memset(b, 0, sizeof *b);
  unsigned seen = 0;
  while (c.left > 0) {
    if (read_varint(&c, &key)) return 0;
    const unsigned f = (unsigned)(key >> 3), wt = (unsigned)(key & 7);
    if (f < 1 || f > 5 || (seen & (1u << f))) return 0; /* unknown or repeated */
    seen |= 1u << f;
    uint64_t v;
    if (f == 5) {
      if (wt != 2 || read_varint(&c, &v) || v > c.left || v > SIZE_MAX) return 0;
      skip_empty(&c);
      b->data_len = (size_t)v;
      b->at_slice = c.i, b->at_off = c.off;
      skip_bytes(&c, v);
    } else {
      if (wt != 0 || read_varint(&c, &v)) return 0;
      if (f == 1) b->n = (int64_t)v;
      else if (f == 2) b->h_begin = (int64_t)v;
      else if (f == 3) b->h_end = (int64_t)v;
      else b->offset = v;
    }
  }
  b->slices = c.sl;
  b->nslices = c.n;
  return 1;
}

void convd_wire_band_each(const convd_wire_band *b,
                          void (*fn)(void *ctx, size_t off, const void *p, size_t n), void *ctx) {
  cursor c = {b->slices, b->nslices, b->at_slice, b->at_off, b->data_len};
  while (c.left > 0) {
    skip_empty(&c);
    const size_t here = GRPC_SLICE_LENGTH(c.sl[c.i]) - c.off;
    const size_t step = c.left < here ? (size_t)c.left : here;
    fn(ctx, b->data_len - (size_t)c.left, GRPC_SLICE_START_PTR(c.sl[c.i]) + c.off, step);
    c.off += step, c.left -= step;
  }
}

/* The part of each run that falls in [off, off + n) of the data goes to dst. */
typedef struct window {
  char *dst;
  size_t off, n;
} window;

static void copy_run(void *ctx, size_t at, const void *p, size_t len) {
  const window *w = ctx;
  const size_t lo = at > w->off ? at : w->off, hi = at + len < w->off + w->n ? at + len : w->off + w->n;
  if (lo < hi) memcpy(w->dst + (lo - w->off), (const char *)p + (lo - at), hi - lo);
}

void convd_wire_band_copy(const convd_wire_band *b, size_t off, void *dst, size_t n) {
  window w = {dst, off, n};
  convd_wire_band_each(b, copy_run, &w);
}

/* ---- writing a band in place ------------------------------------------------------------- */

static size_t varint_len(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) v >>= 7, n++;
  return n;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v) {
  while (v >= 0x80) *p++ = (uint8_t)(v | 0x80), v >>= 7;
  *p++ = (uint8_t)v;
  return p;
}

uint8_t *convd_wire_band_message(unsigned field, int64_t n, int64_t h_begin, int64_t h_end,
                                 uint64_t offset, size_t data_len, uint8_t **data, size_t *total) {
  /* every field written, zeros too: a reader takes each once either way */
  const uint64_t v[4] = {(uint64_t)n, (uint64_t)h_begin, (uint64_t)h_end, offset};
  size_t inner = 1 + varint_len(data_len) + data_len;
  for (int i = 0; i < 4; i++) inner += 1 + varint_len(v[i]);
  const size_t head = 1 + varint_len(inner);
  uint8_t *buf = malloc(head + inner);
  if (buf == NULL) return NULL;
  uint8_t *p = buf;
  *p++ = (uint8_t)((field << 3) | 2);
  p = put_varint(p, inner);
  for (unsigned i = 0; i < 4; i++) {
    *p++ = (uint8_t)(((i + 1) << 3) | 0);
    p = put_varint(p, v[i]);
  }
  *p++ = (uint8_t)((5u << 3) | 2);
  p = put_varint(p, data_len);
  *data = p;
  *total = head + inner;
  return buf;
}

grpc_byte_buffer *convd_wire_take(uint8_t *buf, size_t len) {
  grpc_slice s = grpc_slice_new(buf, len, free); /* the byte buffer frees it */
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
}
