/* Process helpers for the end-to-end tests (not a test itself): every failure is returned as -1
 * with its reason on stderr, and the calling test fails on it. */
#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

long test_read_file(const char *path, char *buf, size_t len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return -1;
  size_t n = fread(buf, 1, len - 1, f);
  buf[n] = '\0';
  fclose(f);
  return (long)n;
}

/* Waits for pid up to timeout_s; returns the exit status, or -1 (killed / signalled). */
static int wait_exit(pid_t pid, double timeout_s) {
  double end = now() + timeout_s;
  int st;
  for (;;) {
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) return -1;
    if (now() > end) {
      fprintf(stderr, "  process %d did not exit within %.0f s; killing it\n", (int)pid, timeout_s);
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      return -1;
    }
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  fprintf(stderr, "  process %d died of signal %d\n", (int)pid, WTERMSIG(st));
  return -1;
}

int test_daemon_start(test_daemon *d, const char *bin, const char *const *extra) {
  memset(d, 0, sizeof *d);
  snprintf(d->log, sizeof d->log, "/tmp/convd-test-%d-%ld.log", (int)getpid(), (long)random());
  /* $CONVD_BIN overrides the built-in path: a binary run where it was not built (a bundle
   * carried to the GPU machine). */
  if (getenv("CONVD_BIN") && getenv("CONVD_BIN")[0]) bin = getenv("CONVD_BIN");
  const char *argv[32] = {bin, "--listen", "127.0.0.1:0", "--log-level", getenv("CONVD_TEST_LOG_LEVEL") ? getenv("CONVD_TEST_LOG_LEVEL") : "warn"};
  int argc = 5;
  for (int i = 0; extra && extra[i] && argc < 30; i++) argv[argc++] = extra[i];
  argv[argc] = NULL;
  int out[2];
  if (pipe(out)) return -1;
  pid_t parent = getpid();
  d->pid = fork();
  if (d->pid < 0) {
    close(out[0]);
    close(out[1]);
    return -1;
  }
  if (d->pid == 0) {
    /* The daemon must not outlive a test that crashed or aborted. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    dup2(out[1], 1);
    close(out[0]);
    close(out[1]);
    int fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) dup2(fd, 2);
    execv(bin, (char *const *)argv);
    _exit(127);
  }
  close(out[1]);
  /* Read until the "listening" line, or give up after 30 s (sanitizer builds start slowly). */
  char line[256];
  size_t n = 0;
  double end = now() + 30;
  while (now() < end && n + 1 < sizeof line) {
    struct pollfd p = {out[0], POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    ssize_t r = read(out[0], line + n, 1);
    if (r <= 0) break;
    if (line[n++] == '\n') break;
  }
  line[n] = '\0';
  close(out[0]);
  const char *colon = strrchr(line, ':');
  if (strncmp(line, "convd listening on ", 19) != 0 || colon == NULL ||
      (d->port = atoi(colon + 1)) <= 0) {
    char log[4096];
    fprintf(stderr, "  daemon did not report its port (stdout: \"%s\")\n", line);
    if (test_read_file(d->log, log, sizeof log) > 0) fprintf(stderr, "  its log:\n%s\n", log);
    kill(d->pid, SIGKILL);
    waitpid(d->pid, NULL, 0);
    return -1;
  }
  snprintf(d->target, sizeof d->target, "127.0.0.1:%d", d->port);
  return 0;
}

int test_daemon_stop(test_daemon *d, double timeout_s) {
  if (d->pid <= 0) return -1;
  kill(d->pid, SIGTERM);
  return test_daemon_wait(d, timeout_s);
}

int test_daemon_wait(test_daemon *d, double timeout_s) {
  if (d->pid <= 0) return -1;
  int rc = wait_exit(d->pid, timeout_s);
  d->pid = 0;
  static char log[1 << 16];
  long n = test_read_file(d->log, log, sizeof log);
  if (n > 0 && (strstr(log, "Sanitizer") || strstr(log, "runtime error"))) {
    fprintf(stderr, "  daemon log has sanitizer reports:\n%s\n", log);
    rc = -1;
  } else if (rc != 0 && n > 0) {
    fprintf(stderr, "  daemon exited with %d; its log:\n%s\n", rc, log);
  }
  if (rc == 0) unlink(d->log);
  return rc;
}

int test_run(char *const argv[], const char *out_path, const char *err_path, double timeout_s) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid;
  int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc) {
    fprintf(stderr, "  cannot run %s: %s\n", argv[0], strerror(rc));
    return -1;
  }
  return wait_exit(pid, timeout_s);
}
