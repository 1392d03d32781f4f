/* libconvd_client: a convd client in C. Synchronous calls: each returns when its gRPC call has
 * ended. A client handle may be used by one thread at a time; use one per thread. Tensors are
 * float32, NCHW, in the caller's memory; nothing needs to fit in one gRPC message. With
 * p->dtype float16 or bfloat16 they travel narrowed (rounded to nearest even) and the output
 * comes back widened; p->allow_tf32 lets GPUs use TF32 on float32 tensors.
 *
 * This header is the library's whole public interface and needs nothing but the C library:
 * installed as <convd/client.h>, built against with `pkg-config --cflags --libs convd-client`. */
#ifndef CONVD_CLIENT_H
#define CONVD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "convd_fields.h" /* the field lists this header shares with the engine */

/* Results: 0, or one of these negative codes (the numbers of the daemon's own error table). */
enum {
  CONVD_CLIENT_OK = 0,
  CONVD_CLIENT_EINVAL = -1,    /* invalid argument: INVALID_ARGUMENT, OUT_OF_RANGE */
  CONVD_CLIENT_ERANGE = -2,    /* a size out of range */
  CONVD_CLIENT_ENOMEM = -3,    /* out of memory */
  CONVD_CLIENT_ELIMIT = -4,    /* RESOURCE_EXHAUSTED, or a unary call too large for one message */
  CONVD_CLIENT_ENOTSUP = -5,   /* UNIMPLEMENTED */
  CONVD_CLIENT_ECANCELED = -6, /* CANCELLED */
  CONVD_CLIENT_ETIMEDOUT = -7, /* DEADLINE_EXCEEDED */
  CONVD_CLIENT_EUNAVAIL = -8,  /* UNAVAILABLE: no server there, or it is shutting down */
  CONVD_CLIENT_ENOTFOUND = -9, /* NOT_FOUND */
  CONVD_CLIENT_EIO = -10,      /* input/output error */
  CONVD_CLIENT_EDEVICE = -11,  /* device error */
  CONVD_CLIENT_EREMOTE = -12,  /* any other status, or a malformed answer */
  CONVD_CLIENT_EINTERNAL = -13, /* internal error */
  CONVD_CLIENT_EDATALOSS = -14, /* DATA_LOSS: a shared-memory region lost pages during the call */
  CONVD_CLIENT_EBUSY = -15      /* FAILED_PRECONDITION: e.g. a region in use by a call */
};

/* Short description of a code; "unknown error" for anything else. */
const char *convd_client_strerror(int code);

/* Element types on the wire (convd_client_conv_params.dtype). */
enum { CONVD_CLIENT_FLOAT32 = 0, CONVD_CLIENT_FLOAT16 = 1, CONVD_CLIENT_BFLOAT16 = 2 };

/* One convolution: shapes and hyperparameters, as PyTorch's conv2d / conv_transpose2d take
 * them. Start from convd_client_conv_params_default and set the shapes. */
typedef struct convd_client_conv_params {
  CONVD_CONV_PARAMS_FIELDS(CONVD_FIELD_DECLARE) /* convd_fields.h; dtype: CONVD_CLIENT_FLOAT32 ... */
} convd_client_conv_params;

/* Stride and dilation 1, no padding, groups 1, no bias, float32; shapes zero (set them). */
void convd_client_conv_params_default(convd_client_conv_params *p);

/* Checks p as the server will and gives the output's shape (N, C_out, H_out, W_out): y must
 * hold their product of floats. Returns 0, or CONVD_CLIENT_EINVAL / _ERANGE with err naming
 * the offending values. */
int convd_client_output_shape(const convd_client_conv_params *p, int64_t shape[4], char *err,
                              size_t errlen);

typedef struct convd_client convd_client;

/* Zero-initialise it and set what you need: every field's zero is the default. */
typedef struct convd_client_opts {
  size_t chunk_bytes;       /* largest tensor payload per message sent; 0 = 1 MiB */
  size_t max_message_bytes; /* gRPC message limit both ways; 0 = 4 MiB (gRPC's default) */
  double timeout_seconds;   /* deadline for each call; 0 = none */
  /* Who this client is, for a daemon that asks (its --tls-cert, --tls-client-ca, --auth-tokens).
   * Files are read, and strings copied, by convd_client_create; the pointers need not outlive
   * it. */
  const char *tls_ca_file;   /* TLS: the CA (PEM) that signed the server's certificate; NULL =
                                plaintext. A public CA's server: the system bundle, e.g.
                                /etc/ssl/certs/ca-certificates.crt */
  const char *tls_cert_file; /* mutual TLS: this client's certificate chain (PEM) ... */
  const char *tls_key_file;  /* ... and its private key; both or neither, with tls_ca_file */
  const char *tls_server_name; /* the name the server's certificate must carry, when it is not
                                  target's host (target an IP, the certificate a DNS name);
                                  NULL = target's host ("localhost" for a unix: target) */
  const char *token;         /* sent with every call as `authorization: Bearer TOKEN`; NULL =
                                none. Over plaintext it travels in the clear: use TLS beyond
                                loopback */
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

/* convd_client_device.kind */
enum { CONVD_CLIENT_DEVICE_CPU = 1, CONVD_CLIENT_DEVICE_CUDA = 2, CONVD_CLIENT_DEVICE_REFERENCE = 3 };

/* One of the server's devices, as ListDevices reports it. */
typedef struct convd_client_device {
  CONVD_DEVICE_INFO_FIELDS(CONVD_FIELD_DECLARE) /* convd_fields.h; kind: CONVD_CLIENT_DEVICE_* */
  struct convd_client_device_stats {
    CONVD_DEVICE_STATS_FIELDS(CONVD_FIELD_DECLARE)
  } stats;
} convd_client_device;

/* target: "HOST:PORT", or "unix:/path/to/convd.sock" for a daemon's Unix socket on this host
 * (gRPC resolves either). Does not connect yet; the first call does. opts may be NULL (all
 * defaults). Unreadable TLS files, or a certificate without its key, fail here with
 * CONVD_CLIENT_EINVAL / _EIO naming the file. A server that refuses the connection (TLS where
 * the client speaks plaintext, a certificate it does not trust) makes calls fail with
 * CONVD_CLIENT_EUNAVAIL; a missing or wrong token, with CONVD_CLIENT_EREMOTE and
 * convd_client_last_status() 16 (UNAUTHENTICATED). */
int convd_client_create(const char *target, const convd_client_opts *opts, convd_client **out,
                        char *err, size_t errlen);
void convd_client_destroy(convd_client *c);

/* y = conv2d(x, w) + b through the streaming Conv2d call (p->transposed: conv_transpose2d, w in
 * its (C_in, C_out/groups, kH, kW) layout). y must hold the output (see
 * convd_client_output_shape); b may be NULL when p->has_bias is 0. On failure returns a
 * negative code (CONVD_CLIENT_EINVAL for INVALID_ARGUMENT, ...) and err holds "STATUS: server
 * message". stats may be NULL. */
int convd_client_conv2d(convd_client *c, const convd_client_conv_params *p, const float *x,
                        const float *w, const float *b, float *y, convd_client_stats *stats,
                        char *err, size_t errlen);

/* Input and output that the caller reads and writes band by band (files, memory it maps), so
 * that neither tensor has to be whole in memory. Byte ranges are of one band: batch item n,
 * rows [h0, h1), all channels, float32 in (C, rows, W) order; read_input fills dst with len
 * bytes from byte off of an input band, write_output takes len bytes at byte off of an output
 * band (an output band's pieces may come in any order relative to other bands, each piece once).
 * Both run on the calling thread; a negative CONVD_CLIENT_* return ends the call with it. */
typedef struct convd_client_io {
  int (*read_input)(void *ctx, int64_t n, int64_t h0, int64_t h1, size_t off, void *dst,
                    size_t len);
  int (*write_output)(void *ctx, int64_t n, int64_t h0, int64_t h1, size_t off, const void *src,
                      size_t len);
  void *ctx;
} convd_client_io;

/* convd_client_conv2d with the input and output behind io (float32 calls only). */
int convd_client_conv2d_io(convd_client *c, const convd_client_conv_params *p,
                           const convd_client_io *io, const float *w, const float *b,
                           convd_client_stats *st, char *err, size_t errlen);

/* convd_client_conv2d through Conv2dUnary: request and response must each fit one message. */
int convd_client_conv2d_unary(convd_client *c, const convd_client_conv_params *p, const float *x,
                              const float *w, const float *b, float *y, convd_client_stats *stats,
                              char *err, size_t errlen);

/* Lists the server's devices into a malloc'd array (free() it). */
int convd_client_list_devices(convd_client *c, convd_client_device **devs, size_t *n, char *err,
                              size_t errlen);

/* grpc.health.v1 Check of service ("" = the server): *serving 1 for SERVING, else 0. */
int convd_client_health(convd_client *c, const char *service, int *serving, char *err, size_t errlen);

/* The gRPC status code of this client's last failed call (0 when it succeeded), for callers
 * that want to tell e.g. UNIMPLEMENTED from INVALID_ARGUMENT exactly. */
int convd_client_last_status(const convd_client *c);

#endif
