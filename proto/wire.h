/* Glue between protobuf-c messages and gRPC core byte buffers, shared by the daemon and the
 * client so that both sides frame messages the same way. */
#ifndef CONVD_WIRE_H
#define CONVD_WIRE_H

#include <grpc/byte_buffer.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>

/* Packs m into a new byte buffer that owns the bytes (no further copy); NULL when out of
 * memory. The caller destroys it after the send completes. */
grpc_byte_buffer *convd_wire_pack(const ProtobufCMessage *m);

/* Unpacks a received buffer; NULL when the bytes are not a valid desc message. Free the result
 * with protobuf_c_message_free_unpacked. */
ProtobufCMessage *convd_wire_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc);

/* "INVALID_ARGUMENT" etc.; "UNKNOWN" for codes outside the table. */
const char *convd_wire_status_name(grpc_status_code code);

#endif
