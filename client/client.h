/* libconvd_client: a convd client in C. Synchronous calls: each returns when its gRPC call has
 * ended. A client handle may be used by one thread at a time; use one per thread. Tensors are
 * float32, NCHW, in the caller's memory; nothing needs to fit in one gRPC message. With
 * p->dtype float16 or bfloat16 they travel narrowed (rounded to nearest even) and the output
 * comes back widened; p->allow_tf32 lets GPUs use TF32 on float32 tensors. */
#ifndef CONVD_CLIENT_H
#define CONVD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "conv.h"   /* convd_conv_params, convd_conv_init: output shape and sizes */
#include "engine.h" /* convd_device_info */
#include "err.h"

typedef struct convd_client convd_client;

typedef struct convd_client_opts {
  size_t chunk_bytes;       /* largest tensor payload per message sent; 0 = 1 MiB */
  size_t max_message_bytes; /* gRPC message limit both ways; 0 = 4 MiB (gRPC's default) */
  double timeout_seconds;   /* deadline for each call; 0 = none */
} convd_client_opts;

typedef struct convd_client_stats {
  int64_t output_shape[4];
  uint64_t elemental_ops; /* the server's plan */
  double elapsed_seconds; /* server-side, spec to last band */
  double compute_seconds;
  uint64_t ops_run, bytes_received, bytes_sent; /* as the server counted them */
  /* client clock, seconds from the start of the call (streaming calls only) */
  double first_output_seconds; /* the first output band arrived */
  double upload_seconds;       /* the last input message was sent */
  double total_seconds;        /* the call ended */
} convd_client_stats;

/* target: "HOST:PORT". Does not connect yet; the first call does. */
int convd_client_create(const char *target, const convd_client_opts *opts, convd_client **out,
                        char *err, size_t errlen);
void convd_client_destroy(convd_client *c);

/* y = conv2d(x, w) + b through the streaming Conv2d call (p->transposed: conv_transpose2d, w in
 * its (C_in, C_out/groups, kH, kW) layout). y must hold the output (see
 * convd_conv_init for its shape); b may be NULL when p->has_bias is 0. On failure returns a
 * negative code (CONVD_EINVAL for INVALID_ARGUMENT, ...) and err holds "STATUS: server message".
 * stats may be NULL. */
int convd_client_conv2d(convd_client *c, const convd_conv_params *p, const float *x,
                        const float *w, const float *b, float *y, convd_client_stats *stats,
                        char *err, size_t errlen);

/* The same through Conv2dUnary: request and response must each fit one message. */
int convd_client_conv2d_unary(convd_client *c, const convd_conv_params *p, const float *x,
                              const float *w, const float *b, float *y, convd_client_stats *stats,
                              char *err, size_t errlen);

/* Lists the server's devices into a malloc'd array (free() it). */
int convd_client_list_devices(convd_client *c, convd_device_info **devs, size_t *n, char *err,
                              size_t errlen);

/* grpc.health.v1 Check of service ("" = the server): *serving 1 for SERVING, else 0. */
int convd_client_health(convd_client *c, const char *service, int *serving, char *err, size_t errlen);

/* The gRPC status code of this client's last failed call (0 when it succeeded), for callers
 * that want to tell e.g. UNIMPLEMENTED from INVALID_ARGUMENT exactly. */
int convd_client_last_status(const convd_client *c);

#endif
