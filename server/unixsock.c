/* See unixsock.h. Threads: the main thread only. */
#include "unixsock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "err.h"
#include "log.h"

int convd_unix_claim(const char *path, char *err, size_t errlen) {
  struct stat st;
  if (lstat(path, &st) != 0) {
    if (errno != ENOENT)
      return convd_errf(err, errlen, CONVD_EINVAL, "--listen unix:%s: %s", path, strerror(errno));
    /* Absent; the directory must be there for bind (gRPC's own error would not say so). */
    char dir[sizeof ((struct sockaddr_un *)0)->sun_path];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *(slash == dir ? slash + 1 : slash) = '\0';
    if (slash && stat(dir, &st) != 0)
      return convd_errf(err, errlen, CONVD_EINVAL, "--listen unix:%s: the directory %s: %s", path,
                        dir, strerror(errno));
    return 0;
  }
  if (!S_ISSOCK(st.st_mode))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--listen unix:%s: the path exists and is not a socket: remove it or "
                      "choose another path",
                      path);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof sa.sun_path)
    return convd_errf(err, errlen, CONVD_EINVAL, "--listen unix:%s: the path is too long", path);
  memcpy(sa.sun_path, path, strlen(path) + 1);
  /* Non-blocking: a listener whose backlog is full answers EAGAIN, and is just as live. */
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return convd_errf(err, errlen, CONVD_EINVAL, "socket(AF_UNIX): %s", strerror(errno));
  const int rc = connect(fd, (const struct sockaddr *)&sa, sizeof sa), e = errno;
  close(fd);
  if (rc == 0 || e == EAGAIN || e == EINPROGRESS)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--listen unix:%s: another convd is serving there (a connection to the "
                      "socket succeeded): stop it, or choose another path",
                      path);
  if (e != ECONNREFUSED)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--listen unix:%s: cannot tell whether something serves there: connect: %s",
                      path, strerror(e));
  if (unlink(path) != 0 && errno != ENOENT)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--listen unix:%s: a stale socket file (nothing listens on it) that cannot "
                      "be removed: %s",
                      path, strerror(errno));
  char q[160];
  convd_log(CONVD_LOG_WARN, "msg=\"removed a stale socket file (nothing listened on it)\" path=%s",
            convd_log_quote(path, q, sizeof q));
  return 0;
}

mode_t convd_unix_umask_for(int mode) { return umask((mode_t)(~mode & 0777)); }

int convd_unix_adopt(convd_unix_socket *s, const char *path, int mode, char *err, size_t errlen) {
  struct stat st;
  if (lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--listen unix:%s: no socket file there after gRPC bound it", path);
  *s = (convd_unix_socket){.path = path, .dev = st.st_dev, .ino = st.st_ino};
  if (chmod(path, (mode_t)mode) != 0)
    return convd_errf(err, errlen, CONVD_EINVAL, "--listen unix:%s: chmod %04o: %s", path,
                      (unsigned)mode, strerror(errno));
  return 0;
}

void convd_unix_remove(convd_unix_socket *s) {
  struct stat st;
  if (s->path && lstat(s->path, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == s->dev &&
      st.st_ino == s->ino && unlink(s->path) != 0) {
    char q[160];
    convd_log(CONVD_LOG_WARN, "msg=\"cannot remove the socket file\" path=%s error=\"%s\"",
              convd_log_quote(s->path, q, sizeof q), strerror(errno));
  }
  s->path = NULL;
}
