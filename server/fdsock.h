/* The descriptor sockets: beside each unix:PATH listener, PATH.fd (AF_UNIX, SOCK_SEQPACKET, the
 * listener's mode), where a same-host client passes a sealed memfd that it then registers as a
 * region used in place (shm.h, "In place"). gRPC cannot carry a descriptor, so this is the one
 * thing that does: a connection sends one message, data "convd-region/1" with exactly one
 * descriptor in SCM_RIGHTS, and gets one message back, "ok TICKET SIZE rw|ro\n" or
 * "error STATUS REASON\n" (STATUS: INVALID_ARGUMENT, RESOURCE_EXHAUSTED or INTERNAL, as a call
 * would have had it), and is closed. Nothing here is a call: the ticket is only good for a
 * RegisterRegion, which is authorized (tokens, tenants) like any call, so the socket grants no
 * more than its file mode already lets one connect to the gRPC socket beside it.
 *
 * Bounds: at most FDSOCK_MAX_CONNS connections at once (more are closed at accept), each closed
 * after FDSOCK_TIMEOUT_MS without its message; the descriptors waiting for their RegisterRegion
 * are bounded and expire (shm.h). Any other message (no descriptor, several, other data, a
 * truncated one) is answered "error ..." with every descriptor it carried closed.
 *
 * Threads: the libuv loop's thread (main.c); a refused descriptor that is not shmem is closed on
 * a detached thread of its own (its close may wait on a FUSE or network server). */
#ifndef CONVD_FDSOCK_H
#define CONVD_FDSOCK_H

#include <stddef.h>
#include <uv.h>

#include "shm.h"

#define FDSOCK_MAX_CONNS 16
#define FDSOCK_TIMEOUT_MS 2000
#define FDSOCK_SUFFIX ".fd"

typedef struct convd_fdsock convd_fdsock;

/* Listens on PATH.fd for each of the n unix listener paths, with the sockets' mode (a PATH too
 * long for the suffix gets none, with a warning logged). Returns 0, or a negative error with
 * the reason in err (nothing left listening, no file left). */
int convd_fdsock_start(uv_loop_t *loop, convd_shm *shm, const char *const *paths, size_t n,
                       int mode, convd_fdsock **out, char *err, size_t errlen);

/* Stops listening, closes open connections and removes the socket files; freed once libuv has
 * closed its handles. NULL is ignored. */
void convd_fdsock_close(convd_fdsock *f);

#endif
