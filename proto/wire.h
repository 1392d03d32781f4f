/* Glue between protobuf-c messages and gRPC core byte buffers, shared by the daemon and the
 * client so that both sides frame messages the same way. Stateless: any thread may call it. */
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

/* Bytes a message needs beside its tensor payload (field tags, lengths, a band's n and rows):
 * a chunk of tensor bytes fits a message when chunk + CONVD_WIRE_FRAMING_SLACK <= the limit. */
#define CONVD_WIRE_FRAMING_SLACK 1024
/* HTTP/2 lookahead (flow-control window) both ends ask for: one stream's throughput is bounded
 * by it, and gRPC's default (64 KiB) holds a loopback stream to a few hundred MB/s. */
#define CONVD_WIRE_LOOKAHEAD_BYTES (16 * 1024 * 1024)

/* convd error codes (err.h) and gRPC status codes, both ways, from one table: the only place
 * the two vocabularies meet. Codes without an entry map to INTERNAL (to a status) and
 * CONVD_EREMOTE (from one). */
grpc_status_code convd_wire_status_from_err(int code);
int convd_wire_err_from_status(grpc_status_code status);

/* "INVALID_ARGUMENT" etc.; "UNKNOWN" for codes outside the table. */
const char *convd_wire_status_name(grpc_status_code code);

#endif
