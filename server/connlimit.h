/* --max-connections: a bound on the gRPC connections the daemon holds open at once.
 *
 * gRPC 1.51's C core (Debian 12) has no connection limit and no way to hand it a connection the
 * daemon accepted itself over TLS, so the bound is kept from beside it: a timer scans the
 * process's descriptors for sockets accepted on the gRPC listeners, and a connection that
 * arrives while the bound is reached is shut down (shutdown(2), never close: gRPC still owns
 * the descriptor and closes it when it sees the end). Connections already counted are never
 * touched, so a call in progress is never cut by the bound; a refused client sees the
 * connection end (UNAVAILABLE) within one scan interval and retries. Linux only (/proc/self/fd).
 *
 * Threads: the libuv loop's thread (main.c) runs the timer; the counts are atomics that the
 * metrics scrape reads from the same loop. */
#ifndef CONVD_CONNLIMIT_H
#define CONVD_CONNLIMIT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct convd_connlimit convd_connlimit;

/* Where gRPC listens: a TCP port (any address family) or a Unix socket path. */
typedef struct convd_connlimit_endpoint {
  int port;         /* > 0: TCP */
  const char *path; /* non-NULL: AF_UNIX (copied) */
} convd_connlimit_endpoint;

/* Starts scanning every interval_ms for connections to the n endpoints; max is the bound
 * (> 0). Returns 0, or a negative error with the reason in err. */
int convd_connlimit_start(uv_loop_t *loop, unsigned max, unsigned interval_ms,
                          const convd_connlimit_endpoint *eps, size_t n, convd_connlimit **out,
                          char *err, size_t errlen);

/* One scan now (the timer calls it; tests and the metrics scrape may too). */
void convd_connlimit_scan(convd_connlimit *l);

/* Connections open at the last scan, and connections refused since start. */
void convd_connlimit_counts(const convd_connlimit *l, uint64_t *open, uint64_t *refused);

/* Stops the timer; the handle is freed once libuv has closed it. NULL is ignored. */
void convd_connlimit_close(convd_connlimit *l);

#endif
