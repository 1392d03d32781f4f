/* A PutWeights upload being reassembled: the spec (the weights' shape, dtype and op), then
 * weight and bias chunks in order (checked as Conv2d's are, convd_stream_append_chunk), and at
 * half-close the tensors widened to float32 and put into the registry. Every rule of a
 * PutWeights stream is checked here; svc_weights.c moves messages, admits and answers. Knows
 * protobuf-c messages, not gRPC calls, so tests/fuzz drives it exactly as the daemon does.
 *
 * Threads: one upload is fed by one thread at a time (the completion-queue thread, under its
 * call's mutex), and registered by one (the offload thread) once complete; the registry it puts
 * into is thread-safe. */
#ifndef CONVD_WEIGHTS_UPLOAD_H
#define CONVD_WEIGHTS_UPLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "convd/v1/convd.pb-c.h"
#include "registry.h"

typedef struct convd_upload convd_upload;

/* Asked once, when the spec has been checked and before anything is allocated, with what the
 * upload will hold until the registry has the weights (the wire copies as they arrive, then the
 * float32 ones). 0 goes on; a negative error (err set) refuses the spec. */
typedef int (*convd_upload_admit_fn)(void *user, uint64_t bytes, char *err, size_t errlen);

/* weights_memory: the registry's limit (--weights-memory); a spec whose tensors would not fit
 * it as float32 is refused before admit is asked. admit may be NULL (all admitted). NULL when
 * out of memory. */
convd_upload *convd_upload_create(uint64_t weights_memory, convd_upload_admit_fn admit,
                                  void *user);
void convd_upload_destroy(convd_upload *u);
/* What admit accepted (0 before the spec): the caller releases it when the call ends. */
uint64_t convd_upload_admitted(const convd_upload *u);

/* Applies one client message. Returns 0, or a negative error with err set; after an error the
 * upload must not be fed again. */
int convd_upload_feed(convd_upload *u, const Convd__V1__PutWeightsRequest *m, char *err,
                      size_t errlen);

/* The client half-closed: 0 when the spec and every byte it announced have arrived, else an
 * error with err set. */
int convd_upload_complete(const convd_upload *u, char *err, size_t errlen);
/* After convd_upload_complete: widens the tensors to float32 (freeing the wire copies) and puts
 * them into reg for tenant (convd_registry_put: tenant_limit, and *id, *bytes, *already as it
 * sets them). Any thread, while nothing else touches the upload. */
int convd_upload_register(convd_upload *u, convd_registry *reg, const char *tenant,
                          uint64_t tenant_limit, char id[CONVD_WEIGHTS_ID_LEN + 1],
                          uint64_t *bytes, int *already, char *err, size_t errlen);

/* Tensor bytes received so far (the end-of-call log line). */
uint64_t convd_upload_bytes_received(const convd_upload *u);

#endif
