#include "wire.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <stdlib.h>

#include "err.h"

grpc_byte_buffer *convd_wire_pack(const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_get_packed_size(m);
  void *buf = malloc(n ? n : 1);
  if (buf == NULL) return NULL;
  protobuf_c_message_pack(m, buf);
  grpc_slice s = grpc_slice_new(buf, n, free); /* the byte buffer frees it */
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
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
};

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
