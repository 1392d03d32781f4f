/* The fuzz harness's input format, shared by the harness (fuzz_conv_stream.c) and the seed
 * generator (gen_corpus.c) so that both read and write it one way. An input is a sequence of
 * calls a client makes against one daemon, each a sequence of messages as gRPC hands them over:
 *
 *   input := { call }
 *   call  := kind:u8 count:u8 { frame }      count frames: the call's messages, in order
 *   frame := len:u32le cut1:u8 cut2:u8 bytes[len]
 *
 * kind's low bits (kind % FUZZ_KINDS) name the method; FUZZ_NO_HALF_CLOSE in kind means the
 * client goes away without half-closing (the stream is destroyed mid-way); FUZZ_WITH_JOB gives a
 * Conv2d or Conv2dUnary call whose convolution is small an engine job (a reference device), so
 * the stream hands its bands and weights over as in the daemon. A Conv2dUnary or
 * DeleteWeights call has one message; count says how many such calls follow. A frame's bytes
 * reach the server as a byte buffer of up to three slices, cut at len * cut / 255, so the
 * in-place band reader (proto/wire.c) meets messages split anywhere. A frame cut short by the
 * end of the input carries what is left; a call cut short ends there.
 *
 * Threads: none of its own (header only). */
#ifndef CONVD_FUZZ_FRAME_H
#define CONVD_FUZZ_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "conv.h"

enum {
  FUZZ_CONV2D = 0,        /* messages of one Conv2d stream (ConvRequest) */
  FUZZ_CONV2D_UNARY = 1,  /* count Conv2dUnary calls (ConvCall each) */
  FUZZ_PUT_WEIGHTS = 2,   /* messages of one PutWeights stream (PutWeightsRequest) */
  FUZZ_DELETE_WEIGHTS = 3, /* count DeleteWeights calls (DeleteWeightsRequest each) */
  FUZZ_KINDS = 4,
  FUZZ_WITH_JOB = 0x40,
  FUZZ_NO_HALF_CLOSE = 0x80,
};

#define FUZZ_CALL_HEADER 2
#define FUZZ_FRAME_HEADER 6

/* The limits the harness's daemon runs with: small enough that no input can make it allocate
 * more than a few hundred MiB (run the fuzzer with -malloc_limit_mb=128 to catch any one
 * allocation a request makes beyond them), large enough for every golden case. */
#define FUZZ_MAX_REQUEST_BYTES ((uint64_t)64 << 20) /* --max-request-bytes */
#define FUZZ_MAX_MESSAGE_BYTES ((uint64_t)4 << 20)  /* --max-message-bytes (the default) */
#define FUZZ_WEIGHTS_MEMORY ((uint64_t)64 << 20)    /* --weights-memory */
/* FUZZ_WITH_JOB: only convolutions this small get a job: few multiply-adds (the reference
 * kernel computes them in microseconds, even under ASan) and small tensors (a dilated
 * transpose's output can be large for few multiply-adds, and the harness's small op budget
 * would cut it into very many ops); larger ones are only checked. */
#define FUZZ_JOB_MACS_MAX ((uint64_t)1 << 14)
#define FUZZ_JOB_BYTES_MAX ((uint64_t)1 << 16)
/* A streamed call's window with a job (svc_conv.c's stream_window at its smallest): it sets the
 * job's op size and the largest band the call takes. */
#define FUZZ_STREAM_WINDOW ((uint64_t)1 << 20)

/* What one input did: calls made, and how many of them the daemon refused (any error). */
typedef struct fuzz_outcome {
  unsigned calls, failed;
} fuzz_outcome;

/* Runs one input through the daemon's decode -> stream checks -> spec validation path
 * (fuzz_conv_stream.c); verbose prints each call's answer on stderr. Aborts when an invariant
 * the daemon relies on fails. */
void fuzz_conv_run(const uint8_t *data, size_t size, int verbose, fuzz_outcome *out);

static inline int fuzz_job_small(const convd_conv *cv) {
  return cv->macs <= FUZZ_JOB_MACS_MAX &&
         (uint64_t)cv->input_bytes + cv->weight_bytes + cv->output_bytes <= FUZZ_JOB_BYTES_MAX;
}

static inline void fuzz_put_u32le(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

static inline uint32_t fuzz_get_u32le(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#endif
