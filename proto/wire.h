/* Glue between protobuf-c messages and gRPC core byte buffers, shared by the daemon and the
 * client so that both sides frame messages the same way. Stateless: any thread may call it. */
#ifndef CONVD_WIRE_H
#define CONVD_WIRE_H

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

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

/* The channel arguments both ends share: message limits, the lookahead above, and gRPC's BDP
 * probe off. The probe re-sizes the window from its bandwidth-delay estimate, and on loopback
 * (a tiny delay) it shrinks the window far below the lookahead: measured here, a 537 MB
 * streamed call took 540-840 ms with it and 240-260 ms without (docs/benchmarks.md). Fills
 * args[0..CONVD_WIRE_CHANNEL_ARGS) and returns that count. */
#define CONVD_WIRE_CHANNEL_ARGS 4
size_t convd_wire_channel_args(grpc_arg *args, size_t max_message_bytes);

/* Client-side load balancing over the addresses a target names or resolves to
 * (ipv4:A:P,B:P; dns:///NAME:PORT, a headless Kubernetes Service): the policies a client may
 * ask for, and the gRPC service config (JSON) that asks for one. pick_first is gRPC's default:
 * one connection, to the first address that answers. round_robin: a connection to every
 * address, each call to the next ready one; and since a daemon that stops (or is killed)
 * between two calls can still be picked before its connection is seen to close, a call that
 * fails UNAVAILABLE before any daemon answered it is retried, on another daemon, up to 3
 * attempts in all. Only the Convolution and Health services' calls are covered. */
#define CONVD_WIRE_LB_POLICIES "pick_first or round_robin"
/* Writes the service config for policy into out (len bytes) and returns 0; -1 when policy is
 * not one of CONVD_WIRE_LB_POLICIES (or out is too short). */
int convd_wire_lb_service_config(const char *policy, char *out, size_t len);

/* convd error codes (err.h) and gRPC status codes, both ways, from one table: the only place
 * the two vocabularies meet. Codes without an entry map to INTERNAL (to a status) and
 * CONVD_EREMOTE (from one). */
grpc_status_code convd_wire_status_from_err(int code);
int convd_wire_err_from_status(grpc_status_code status);

/* A message that carries one RowBand (a ConvRequest's input, a ConvResponse's output), read
 * where its bytes lie in the received message's slices: no readall, no protobuf-c copy of the
 * data. Field numbers are convd.proto's (RowBand n = 1, h_begin = 2, h_end = 3, offset = 4,
 * data = 5). */
#define CONVD_WIRE_REQUEST_INPUT 4   /* ConvRequest.input */
#define CONVD_WIRE_RESPONSE_OUTPUT 2 /* ConvResponse.output */
typedef struct convd_wire_band {
  int64_t n, h_begin, h_end;
  uint64_t offset;
  size_t data_len;
  /* where the data starts: slice index and offset in it */
  const grpc_slice *slices;
  size_t nslices, at_slice, at_off;
} convd_wire_band;

/* 1 when bb is an uncompressed message whose only field is `field` (one of the above), a
 * RowBand with each of its fields at most once with its proto type, and the lengths consistent:
 * then *b describes it. 0 for anything else (valid or not), which the caller decodes with
 * protobuf-c as before, so every message keeps its one meaning and its one error. */
int convd_wire_parse_band(const grpc_byte_buffer *bb, unsigned field, convd_wire_band *b);

/* Copies n bytes of the band's data, from byte off of it, into dst (off + n <= data_len). */
void convd_wire_band_copy(const convd_wire_band *b, size_t off, void *dst, size_t n);

/* Calls fn for each contiguous run of the band's data, in order: its byte offset in the data,
 * where it lies and its length. */
void convd_wire_band_each(const convd_wire_band *b,
                          void (*fn)(void *ctx, size_t off, const void *p, size_t n), void *ctx);

/* A message of one RowBand (as `field` above) whose data the caller writes in place: returns a
 * malloc'd buffer with the protobuf header written and *data pointing where the data_len bytes
 * go, *total the message's length; NULL when out of memory. Hand it to convd_wire_take. */
uint8_t *convd_wire_band_message(unsigned field, int64_t n, int64_t h_begin, int64_t h_end,
                                 uint64_t offset, size_t data_len, uint8_t **data, size_t *total);

/* A byte buffer that owns buf (freed with free() once gRPC is done with it); NULL on failure,
 * buf then freed. */
grpc_byte_buffer *convd_wire_take(uint8_t *buf, size_t len);

/* "INVALID_ARGUMENT" etc.; "UNKNOWN" for codes outside the table. */
const char *convd_wire_status_name(grpc_status_code code);

#endif
