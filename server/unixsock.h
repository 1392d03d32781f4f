/* The socket files of unix: listeners (--listen unix:/path, --unix-socket-mode).
 *
 * Who may connect to a Unix socket is decided by the file's mode and owner (connect(2) needs
 * write permission on it), so the daemon owns the file's life around gRPC's use of it:
 * - before gRPC binds, the path is claimed: a socket file nothing listens on (connect(2) is
 *   refused: a crashed daemon's) is removed; one something listens on, or a file that is not a
 *   socket, stops the start naming the path. gRPC 1.51 would otherwise unlink any socket file
 *   there before binding, a live daemon's too, which would then lose its clients unawares;
 * - while gRPC binds, the umask keeps the new file at most --unix-socket-mode (the mode a bound
 *   socket gets is 0777 & ~umask), and after, chmod sets it exactly; the file's device and inode
 *   are kept,
 * - so that at exit only the file this daemon made is removed.
 *
 * Threads: the main thread at start (rpc.c's convd_rpc_start, before the server starts) and at
 * exit (main.c, after gRPC's shutdown). */
#ifndef CONVD_UNIXSOCK_H
#define CONVD_UNIXSOCK_H

#include <stddef.h>
#include <sys/types.h>

typedef struct convd_unix_socket {
  const char *path; /* NULL: nothing made (a HOST:PORT listener, or not bound yet) */
  dev_t dev;
  ino_t ino;
} convd_unix_socket;

/* Makes path free for bind: absent already, or a stale socket file (removed, and logged).
 * Returns 0, or CONVD_EINVAL with the reason (naming the path) in err. */
int convd_unix_claim(const char *path, char *err, size_t errlen);

/* Before bind: sets the umask the bind runs under for mode; returns the previous one, to be put
 * back right after. */
mode_t convd_unix_umask_for(int mode);

/* After bind: sets the file's mode and records it in s (path must outlive s). Returns 0, or
 * CONVD_EINVAL with the reason in err (s records the file either way, when it is there). */
int convd_unix_adopt(convd_unix_socket *s, const char *path, int mode, char *err, size_t errlen);

/* Removes the file s records if it is still the one made (gRPC may have removed it already, or
 * an operator replaced it). Clears s. */
void convd_unix_remove(convd_unix_socket *s);

#endif
