/* A Conv2d request being reassembled: the spec, then weight/bias chunks and input row bands in
 * any interleaving. Every rule of the stream is checked here and a violation returns an error
 * whose message says what the client sent and what was expected. Complete bands go to the
 * engine job at once (so tiles start before the input is all in) and the weights as soon as
 * they are whole; the session holds only the band being received. Knows protobuf-c messages,
 * not gRPC calls. */
#ifndef CONVD_SESSION_H
#define CONVD_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include "convd/v1/convd.pb-c.h"
#include "engine.h"
#include "registry.h"

typedef struct convd_session convd_session;

/* Converts a wire spec into engine parameters and checks them (shapes, op, dtype, limit).
 * max_request_bytes bounds input + weights + bias + output. With registered weights (the
 * spec's weights_id, already acquired as reg) their shape and bias are the weights'. */
int convd_spec_to_conv(const Convd__V1__ConvSpec *spec, const convd_weights *reg,
                       uint64_t max_request_bytes, convd_conv *conv, char *err, size_t errlen);

/* reg: the weights registry that spec.weights_id names entries of (NULL: none). */
convd_session *convd_session_create(uint64_t max_request_bytes, convd_registry *reg);
void convd_session_destroy(convd_session *s);

/* Applies one client message. Returns 0, or a negative error with err set; after an error the
 * session must not be fed again. *accepted is set to 1 when this message was the spec and it
 * was accepted (buffers are allocated and convd_session_conv is valid). */
int convd_session_feed(convd_session *s, const Convd__V1__ConvRequest *m, int *accepted,
                       char *err, size_t errlen);

/* The client half-closed: checks that every byte the spec announced has arrived. */
int convd_session_finish(convd_session *s, char *err, size_t errlen);

/* After a successful spec: the checked descriptor. */
const convd_conv *convd_session_conv(const convd_session *s);
/* The job that receives complete bands and the weights (taken over by it). Without a job the
 * session only checks the stream (unit tests). */
void convd_session_attach(convd_session *s, convd_job *job);
/* Bytes of the band being assembled. */
uint64_t convd_session_bytes_buffered(const convd_session *s);
uint64_t convd_session_bytes_received(const convd_session *s);
/* The spec's priority, and whether its weights come from the registry. */
int convd_session_priority(const convd_session *s);
int convd_session_registered_weights(const convd_session *s);

#endif
