/* A Conv2d request being reassembled: the spec, then weight/bias chunks and input row bands in
 * any interleaving. Every rule of the stream is checked here and a violation returns an error
 * whose message says what the client sent and what was expected. Complete bands go to the
 * engine job at once (so tiles start before the input is all in) and the weights as soon as
 * they are whole; the stream holds only the band being received. Conv2dUnary's one message is
 * fed through the same rules (svc_conv.c), so both calls check, look up registered weights,
 * widen and digest in one place. Knows protobuf-c messages, not gRPC calls.
 *
 * Threads: one stream is fed by one thread at a time (the completion-queue thread, under its
 * call's mutex); convd_stream_finalize_weights runs on the offload thread while nothing feeds
 * it. The registry it acquires from is thread-safe. */
#ifndef CONVD_CONV_STREAM_H
#define CONVD_CONV_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "convd/v1/convd.pb-c.h"
#include "engine.h"
#include "registry.h"

/* The wire's dtype enum to engine dtypes (CONVD_F32, ...), and back. -1 for a value this daemon
 * does not serve (unspecified means float32). */
int convd_stream_dtype_from_wire(int wire);
int convd_stream_dtype_to_wire(int dtype);

/* Appends a chunk of a whole tensor that arrives in order (weights, bias: total bytes in dst)
 * at *recv, checking its offset and length. */
int convd_stream_append_chunk(const char *what, const Convd__V1__TensorChunk *ch, void *dst,
                              size_t *recv, size_t total, char *err, size_t errlen);

typedef struct convd_stream convd_stream;

/* Converts a wire spec into engine parameters and checks them (shapes, op, dtype, limit).
 * max_request_bytes bounds input + weights + bias + output. With registered weights (the
 * spec's weights_id, already acquired as reg) their shape and bias are the weights'. */
int convd_stream_spec_to_conv(const Convd__V1__ConvSpec *spec, const convd_weights *reg,
                              uint64_t max_request_bytes, convd_conv *conv, char *err,
                              size_t errlen);

/* reg: the weights registry that spec.weights_id names entries of (NULL: none), of tenant's
 * (NULL without tenants; the string outlives the stream). */
convd_stream *convd_stream_create(uint64_t max_request_bytes, convd_registry *reg,
                                  const char *tenant);
void convd_stream_destroy(convd_stream *s);

/* Applies one client message. Returns 0, or a negative error with err set; after an error the
 * stream must not be fed again. *accepted is set to 1 when this message was the spec and it
 * was accepted (buffers are allocated and convd_stream_conv is valid). */
int convd_stream_feed(convd_stream *s, const Convd__V1__ConvRequest *m, int *accepted,
                       char *err, size_t errlen);

/* The bytes of one band piece: contiguous at data, or (data NULL) behind copy(ctx, off, dst, n),
 * e.g. where they lie in a received message's slices. */
typedef struct convd_stream_bytes {
  const void *data;
  size_t len;
  void (*copy)(const void *ctx, size_t off, void *dst, size_t n);
  const void *ctx;
} convd_stream_bytes;

/* An input band piece (a RowBand's fields). */
typedef struct convd_stream_band {
  int64_t n, h_begin, h_end;
  uint64_t offset;
  convd_stream_bytes bytes;
} convd_stream_band;

/* Applies an input band piece, as convd_stream_feed does for a RowBand message, copying its
 * bytes once, straight to where the band is assembled or handed to the job. */
int convd_stream_feed_band(convd_stream *s, const convd_stream_band *b, char *err, size_t errlen);

/* The client half-closed: checks that every byte the spec announced has arrived. */
int convd_stream_finish(convd_stream *s, char *err, size_t errlen);

/* Conv2dUnary, after its spec was fed and accepted: what only a one-message call must satisfy
 * (the output fits one response under max_message_bytes; the input, and weights and bias unless
 * they are registered, have exactly their shapes' bytes). */
int convd_stream_check_call(const convd_stream *s, const Convd__V1__ConvCall *m,
                            uint64_t max_message_bytes, char *err, size_t errlen);
/* Then its tensors as this stream's messages (weights and bias as one chunk each, the input as
 * one band per batch item), then the half-close. */
int convd_stream_feed_call(convd_stream *s, const Convd__V1__ConvCall *m, char *err,
                           size_t errlen);

/* After a successful spec: the checked descriptor. */
const convd_conv *convd_stream_conv(const convd_stream *s);
/* After a successful spec: the bytes the stream will allocate for it (weights and bias as they
 * arrive, per-row flags), nothing of which is allocated before attach (or, without a job, the
 * first tensor message), so the caller counts them against admission first. */
uint64_t convd_stream_buffers_bytes(const convd_stream *s);
/* Allocates those buffers and sets the job that receives complete bands and the weights (taken
 * over by it). Without a job the stream is only checked (unit tests). */
int convd_stream_attach(convd_stream *s, convd_job *job, char *err, size_t errlen);
/* Bands larger than bytes (rows x C x W x the dtype's size) are refused (0 = any size). */
void convd_stream_set_band_limit(convd_stream *s, uint64_t bytes);
/* Streamed weights larger than 1 MiB are not widened and hashed by the feeding thread: once
 * they are whole, convd_stream_weights_pending says so, and the caller runs
 * convd_stream_finalize_weights (on any thread, while nothing feeds the stream) and then
 * convd_stream_hand_weights (under the feeding thread's lock) before feeding more. */
void convd_stream_defer_weights(convd_stream *s, int on);
int convd_stream_weights_pending(const convd_stream *s);
int convd_stream_finalize_weights(convd_stream *s, char *err, size_t errlen);
void convd_stream_hand_weights(convd_stream *s);
/* Tensors that come from (or go to) elsewhere: shared-memory regions, which the caller copies.
 * EXT_INPUT: input bands are refused, the half-close checks no rows, and the caller hands the
 * rows to the job; EXT_WEIGHT / EXT_BIAS: the caller feeds them as chunks (a client's chunks
 * are refused by the caller); for Conv2dUnary, convd_stream_check_call wants those fields
 * empty (and the output, EXT_OUTPUT, need not fit a message) and convd_stream_feed_call feeds
 * only the others. Count bytes fed from elsewhere with convd_stream_count_received. */
enum {
  CONVD_STREAM_EXT_INPUT = 1,
  CONVD_STREAM_EXT_WEIGHT = 2,
  CONVD_STREAM_EXT_BIAS = 4,
  CONVD_STREAM_EXT_OUTPUT = 8
};
void convd_stream_set_external(convd_stream *s, unsigned mask);
void convd_stream_count_received(convd_stream *s, uint64_t bytes);
/* Bytes of the band being assembled. */
uint64_t convd_stream_bytes_buffered(const convd_stream *s);
uint64_t convd_stream_bytes_received(const convd_stream *s);
/* The spec's priority, and whether its weights come from the registry. */
int convd_stream_priority(const convd_stream *s);
int convd_stream_registered_weights(const convd_stream *s);

#endif
