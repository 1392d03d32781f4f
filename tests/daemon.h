/* Starts a convd process for a test, on 127.0.0.1 with port 0, and stops it with SIGTERM. */
#ifndef CONVD_TEST_DAEMON_H
#define CONVD_TEST_DAEMON_H

#include <sys/types.h>

typedef struct test_daemon {
  pid_t pid;
  int port;
  char target[64]; /* "127.0.0.1:PORT" */
  char log[256];   /* its stderr */
} test_daemon;

/* Starts bin ($CONVD_BIN instead when set) with extra arguments (NULL-terminated list, may be
 * NULL) and waits for its "convd listening on" line. Returns 0 or -1 (reason on stderr). */
int test_daemon_start(test_daemon *d, const char *bin, const char *const *extra);

/* SIGTERM, then waits up to timeout_s for the exit. Returns the exit status (0 expected), or
 * -1 when it had to be killed or died of a signal; prints the log's sanitizer reports. */
int test_daemon_stop(test_daemon *d, double timeout_s);

/* Waits for a daemon that was already told to stop; as test_daemon_stop otherwise. */
int test_daemon_wait(test_daemon *d, double timeout_s);

/* Runs argv[0] with argv, stdout and stderr to files; returns the exit status or -1. */
int test_run(char *const argv[], const char *out_path, const char *err_path, double timeout_s);

/* Reads a small file into buf (NUL-terminated); returns bytes read or -1. */
long test_read_file(const char *path, char *buf, size_t len);

#endif
