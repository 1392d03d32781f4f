/* libconvd_client: a convd client in C. Synchronous calls: each returns when its gRPC call has
 * ended. A client handle may be used by one thread at a time (convd_client_cancel aside); use one
 * per thread. Tensors are float32, NCHW, in the caller's memory (or, on the daemon's host, in
 * shared memory: convd_client_conv2d_shm); nothing needs to fit in one gRPC message. With
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
  const char *lb_policy;     /* how calls spread over the addresses target names or resolves
                                to (ipv4:A:P,B:P, dns:///NAME:PORT): "round_robin" (each call
                                to the next connected daemon; a call that fails UNAVAILABLE
                                before a daemon answered is retried on another, 3 attempts in
                                all) or "pick_first"; NULL = gRPC's default, pick_first. Any
                                other name fails convd_client_create with CONVD_CLIENT_EINVAL */
} convd_client_opts;

typedef struct convd_client_stats {
  int64_t output_shape[4];
  uint64_t elemental_ops; /* the server's plan */
  double elapsed_seconds; /* server-side, spec to last band */
  double compute_seconds;
  uint64_t ops_run, bytes_received, bytes_sent; /* as the server counted them */
  /* client clock, seconds from the start of the call (the first two: streaming calls only) */
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

/* target: "HOST:PORT", or "unix:/path/to/convd.sock" for a daemon's Unix socket on this host,
 * or several daemons: "ipv4:10.0.0.1:50051,10.0.0.2:50051", "dns:///convd.NS.svc:50051" (every
 * address the name resolves to; with opts->lb_policy "round_robin" calls spread over them).
 * gRPC resolves each. Weights registered by PutWeights and shared-memory regions live on the
 * one daemon that took the call: over several, send weights by value. Does not connect yet; the first call does. opts may be NULL (all
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

/* ---- same-host shared memory ----------------------------------------------------------------
 * A client on the daemon's machine can keep tensors in POSIX shared memory instead of sending
 * them (the daemon's RegisterRegion, ListRegions, UnregisterRegion; proto/convd/v1/convd.proto):
 * it creates an object, registers it, and names byte ranges of it in a call. Clients on other
 * machines cannot: the daemon opens the object by name on its own host. */

#define CONVD_CLIENT_REGION_NAME_MAX 201 /* characters of a region's name, its leading '/' included */

/* A region this library created (convd_client_region_create): a shared-memory object, mapped
 * here read/write and registered with the daemon under its name. */
typedef struct convd_client_region convd_client_region;

/* Creates a region of size bytes (zero-filled) and registers it: asks the daemon for this
 * caller's name prefix (ListRegions; "/convd-", or "/convd-TENANT-" under tokens), creates the
 * object as the prefix plus 16 random hex digits (shm_open O_CREAT|O_EXCL, mode 0660 less the
 * umask: a daemon running as another user needs to share the object's group), sizes and maps it,
 * and registers it. Through a unix:PATH target whose daemon has a descriptor socket (PATH.fd) it
 * is a sealed memfd instead, passed over that socket and registered by its ticket: nothing in
 * /dev/shm, and the daemon uses float32 tensors in it in place. On any failure nothing is left
 * behind: no object in /dev/shm, no mapping, no registration. CONVD_CLIENT_ENOTSUP: the daemon serves no shared memory (--max-shm-bytes 0);
 * CONVD_CLIENT_ELIMIT: over its --max-shm-bytes or the tenant's shm-bytes; CONVD_CLIENT_ENOTFOUND
 * / _EINVAL from RegisterRegion: the daemon cannot open the object (another host, or a user
 * that may not). */
int convd_client_region_create(convd_client *c, size_t size, convd_client_region **out, char *err,
                               size_t errlen);
void *convd_client_region_data(const convd_client_region *r); /* size bytes, read/write */
size_t convd_client_region_size(const convd_client_region *r);
const char *convd_client_region_name(const convd_client_region *r); /* for convd_client_tensor_ref */
/* 1 when the daemon uses float32 tensors in this region where they lie, with no copy: the
 * client reached it through a unix: socket, and the region is a sealed memfd passed over the
 * daemon's descriptor socket (PATH.fd); 0: a named object (/dev/shm) the daemon copies from. */
int convd_client_region_in_place(const convd_client_region *r);
/* Unregisters the region, unmaps it and unlinks its object, and frees r, whatever happens: the
 * object is gone from /dev/shm when this returns. Returns the unregistration's error, if any
 * (CONVD_CLIENT_EBUSY while a call uses it: another client's, or for a moment one that this side
 * ended, by convd_client_cancel, a deadline or a malformed answer, until the daemon's copies for
 * it stop; the daemon then keeps its mapping registered until the name is unregistered); a region
 * the daemon no longer has (it was restarted) counts as unregistered. c NULL: no unregistration, only the local clean-up. r NULL:
 * a no-op. */
int convd_client_region_destroy(convd_client *c, convd_client_region *r, char *err, size_t errlen);

/* The daemon's calls themselves, for objects the caller manages. RegisterRegion: name as
 * shm_open takes it, with the prefix ListRegions gives; size 0 = the whole object; *mapped (may
 * be NULL) gets the bytes the daemon mapped. */
int convd_client_register_region(convd_client *c, const char *name, uint64_t size, uint64_t *mapped,
                                 char *err, size_t errlen);
/* CONVD_CLIENT_ENOTFOUND: no such region of this caller's; CONVD_CLIENT_EBUSY: a call uses it. */
int convd_client_unregister_region(convd_client *c, const char *name, char *err, size_t errlen);

typedef struct convd_client_region_info {
  char name[CONVD_CLIENT_REGION_NAME_MAX + 1];
  uint64_t size;   /* bytes the daemon mapped */
  uint32_t in_use; /* calls using it now */
} convd_client_region_info;

/* This caller's regions into a malloc'd array (free() it; regions NULL: not wanted) and the name
 * prefix its regions must have into prefix (prefix_len bytes, NULL: not wanted; a prefix that
 * does not fit is CONVD_CLIENT_ERANGE). */
int convd_client_list_regions(convd_client *c, convd_client_region_info **regions, size_t *n,
                              char *prefix, size_t prefix_len, char *err, size_t errlen);

/* Where one tensor of convd_client_conv2d_shm lies. region NULL: not in shared memory (the
 * call's pointer argument holds it, as float32, and it travels in messages as
 * convd_client_conv2d sends it); else bytes from offset of the registered region of that name,
 * as many as the tensor has (computed here from p), in the wire layout: NCHW (weights in their
 * conv2d or conv_transpose2d layout), elements of p->dtype (float32, or the 2-byte float16 /
 * bfloat16, little-endian). */
typedef struct convd_client_tensor_ref {
  const char *region;
  uint64_t offset;
} convd_client_tensor_ref;

typedef struct convd_client_shm_refs {
  convd_client_tensor_ref input, weight, bias, output; /* bias: only with p->has_bias */
} convd_client_shm_refs;

/* convd_client_conv2d with any of its tensors in shared memory (refs; NULL = none, which is
 * convd_client_conv2d): a tensor in a region is not sent, and an output in a region does not
 * come back in messages: the daemon writes it there and reports progress, and the call returns
 * once every row is written. The pointer arguments of tensors in regions are ignored (may be
 * NULL). The output range may not overlap an input range of the same region (the daemon
 * refuses it, CONVD_CLIENT_EINVAL, as it does a range that leaves its region); an unknown
 * region is CONVD_CLIENT_ENOTFOUND, a region whose object lost pages during the call (it was
 * shrunk) CONVD_CLIENT_EDATALOSS. stats: as convd_client_conv2d's, the byte counts being the
 * server's summary's; first_output_seconds is when the first rows were final in an output
 * region. */
int convd_client_conv2d_shm(convd_client *c, const convd_client_conv_params *p,
                            const convd_client_shm_refs *refs, const float *x, const float *w,
                            const float *b, float *y, convd_client_stats *stats, char *err,
                            size_t errlen);

/* ---- per-call options: registered weights, priority, progress ------------------------------ */

/* How far a call has come, for convd_client_call_opts.progress. */
typedef struct convd_client_progress {
  uint64_t rows_done;      /* output rows (of rows_total = N * H_out) complete here: received
                              whole, or reported final in an output region */
  uint64_t rows_total;
  uint64_t bytes_sent;     /* tensor bytes sent so far in messages (weights, bias, input) */
  uint64_t bytes_received; /* output bytes received so far in messages */
  double seconds;          /* since the call started (client clock) */
} convd_client_progress;

typedef void (*convd_client_progress_fn)(void *ctx, const convd_client_progress *pr);

/* What convd_client_conv2d_ex adds to a call. Zero-initialise it and set what you need: every
 * field's zero is the default (and the plain calls above are convd_client_conv2d_ex with these
 * zero, but for their own variant's field). */
typedef struct convd_client_call_opts {
  /* Weights registered with convd_client_put_weights, named instead of sent: w and b are then
   * ignored (may be NULL); p still gives the weights' shape, for the output's (the daemon
   * checks it against theirs, which convd_client_list_weights reports in the layout of the op
   * they were put for), and the bias is the registered weights' own, whatever p->has_bias says.
   * NULL = the weights travel with the call. */
  const char *weights_id;
  int32_t priority; /* higher runs first; 0 = default, negative yields to everyone else */
  /* Called on the calling thread as the call goes: after each message sent with tensor data,
   * each piece of output received, each progress report of an output region, and once at the
   * end of a unary call (pr: valid during the callback only). NULL = none. It may call
   * convd_client_cancel(c), and nothing else of this library on c. */
  convd_client_progress_fn progress;
  void *progress_ctx;
  /* The variants (none: the streamed call on x and y in memory); shm and unary go together (a
   * Conv2dUnary whose tensors in regions are left out of its messages, and so need not fit
   * one), io with neither: */
  const convd_client_io *io;         /* convd_client_conv2d_io: input and output behind io
                                        (float32 only; x and y ignored) */
  const convd_client_shm_refs *shm;  /* convd_client_conv2d_shm: tensors in regions */
  int unary;                         /* convd_client_conv2d_unary: one message each way */
} convd_client_call_opts;

/* convd_client_conv2d, _io, _unary or _shm as co says, with its weights id, priority and
 * progress callback. co NULL: convd_client_conv2d. io beside shm or unary is
 * CONVD_CLIENT_EINVAL. */
int convd_client_conv2d_ex(convd_client *c, const convd_client_conv_params *p,
                           const convd_client_call_opts *co, const float *x, const float *w,
                           const float *b, float *y, convd_client_stats *stats, char *err,
                           size_t errlen);

/* ---- the weights registry (PutWeights, ListWeights, DeleteWeights) --------------------------
 * Weights uploaded once and named by id in later calls (convd_client_call_opts.weights_id). The
 * id is derived from their content: putting the same weights again gives the same id. The
 * daemon bounds the registry (its --weights-memory) and evicts the least recently used weights
 * that no call is using; a call naming an evicted or deleted id fails with CONVD_CLIENT_ENOTFOUND. */

#define CONVD_CLIENT_WEIGHTS_ID_MAX 64 /* characters of an id (the daemon's are 32 hex digits) */

/* The weights put_weights registers: the tensor's shape and what it is for. */
typedef struct convd_client_weights_spec {
  int64_t shape[4]; /* (C_out, C_in/groups, kH, kW); transposed: (C_in, C_out/groups, kH, kW) */
  int transposed;   /* for conv_transpose2d calls */
  int64_t groups;   /* transposed only: C_out = shape[1] * groups (0 = 1) */
  int dtype;        /* the values travel narrowed to it (CONVD_CLIENT_FLOAT32 ...), as a call's
                       tensors do; a call of any dtype may use them */
} convd_client_weights_spec;

/* Registers w (and its bias b, C_out floats; NULL = none) and writes their id into id.
 * *already_present (may be NULL): 1 when the daemon had these weights already. Errors:
 * CONVD_CLIENT_ENOTSUP (a daemon without a registry, --weights-memory 0), CONVD_CLIENT_ELIMIT
 * (larger than the registry, or the tenant's weights-bytes). */
int convd_client_put_weights(convd_client *c, const convd_client_weights_spec *ws, const float *w,
                             const float *b, char id[CONVD_CLIENT_WEIGHTS_ID_MAX + 1],
                             int *already_present, char *err, size_t errlen);

/* One registered set of weights, as ListWeights reports it. */
typedef struct convd_client_weights_info {
  char id[CONVD_CLIENT_WEIGHTS_ID_MAX + 1];
  int64_t shape[4];    /* as registered: (C_out, C_in/groups, kH, kW), or a transpose's layout */
  int has_bias;
  int dtype;           /* CONVD_CLIENT_FLOAT32 ...: how they were sent */
  uint64_t bytes;      /* registry memory they take */
  uint64_t uses;       /* calls that named them */
  double idle_seconds; /* since they were last put or used */
  uint32_t in_use;     /* calls using them now (never evicted while > 0) */
} convd_client_weights_info;

typedef struct convd_client_weights_totals {
  uint64_t bytes_used, bytes_limit, evictions; /* for this caller's tenant under tokens */
} convd_client_weights_totals;

/* This caller's registered weights, most recently used first, into a malloc'd array (free()
 * it); totals may be NULL. */
int convd_client_list_weights(convd_client *c, convd_client_weights_info **weights, size_t *n,
                              convd_client_weights_totals *totals, char *err, size_t errlen);

/* CONVD_CLIENT_ENOTFOUND: no such id (never put, deleted, or evicted). */
int convd_client_delete_weights(convd_client *c, const char *id, char *err, size_t errlen);

/* Ends the call in progress on c, if any, with CONVD_CLIENT_ECANCELED; when none is in progress
 * it does nothing. The one function that may be called from another thread while c is in use
 * (a thread that waits for signals, say); never from a signal handler. */
void convd_client_cancel(convd_client *c);

/* The gRPC status code of this client's last failed call (0 when it succeeded), for callers
 * that want to tell e.g. UNIMPLEMENTED from INVALID_ARGUMENT exactly. */
int convd_client_last_status(const convd_client *c);

#endif
