/* See fdsock.h. Threads: the libuv loop's thread, and detached closers (close_refused). */
#define _GNU_SOURCE
#include "fdsock.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "config.h"
#include "err.h"
#include "log.h"
#include "unixsock.h"

#define HELLO "convd-region/1"
#define MAX_FDS 8 /* room for more than one, so that a message with several is seen and refused */
#define EXPIRE_MS 1000

typedef struct fd_conn fd_conn;

typedef struct fd_listener {
  convd_fdsock *owner;
  int fd;
  uv_poll_t poll;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  convd_unix_socket sock;
} fd_listener;

struct fd_conn {
  convd_fdsock *owner;
  int fd;
  unsigned uid;
  uv_poll_t poll;
  uv_timer_t timer;
  int handles; /* open libuv handles; freed at 0 */
  fd_conn *prev, *next;
};

struct convd_fdsock {
  uv_loop_t *loop;
  convd_shm *shm;
  fd_listener ls[CONVD_LISTEN_MAX];
  size_t n;
  fd_conn *conns;
  unsigned nconns;
  uv_timer_t expire;
  int handles; /* open libuv handles of the listeners and the timer; freed at 0 with no conns */
  int closing;
};

static void maybe_free(convd_fdsock *f) {
  if (f->closing && f->handles == 0 && f->conns == NULL) free(f);
}

static void on_owner_handle_closed(uv_handle_t *h) {
  convd_fdsock *f = h->data;
  f->handles--;
  maybe_free(f);
}

static void on_conn_handle_closed(uv_handle_t *h) {
  fd_conn *c = h->data;
  if (--c->handles > 0) return;
  convd_fdsock *f = c->owner;
  if (c->prev) c->prev->next = c->next;
  else f->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  f->nconns--;
  free(c);
  maybe_free(f);
}

static void conn_close(fd_conn *c) {
  if (c->fd < 0) return; /* closing already */
  uv_poll_stop(&c->poll);
  uv_timer_stop(&c->timer);
  close(c->fd);
  c->fd = -1;
  uv_close((uv_handle_t *)&c->poll, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void *closer_main(void *arg) {
  close((int)(intptr_t)arg);
  return NULL;
}

/* Closes a descriptor a client passed and this module refuses. One that is not shmem may be a
 * FUSE or network file, whose close waits on its server: that one is closed on a thread of its
 * own (detached; there are at most MAX_FDS per message and FDSOCK_MAX_CONNS messages at once). */
static void close_refused(int fd) {
  if (fcntl(fd, F_GET_SEALS) < 0) {
    pthread_t t;
    pthread_attr_t a;
    if (pthread_attr_init(&a) == 0) {
      pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
      const int ok = pthread_create(&t, &a, closer_main, (void *)(intptr_t)fd) == 0;
      pthread_attr_destroy(&a);
      if (ok) return;
    }
  }
  close(fd);
}

static void reply(fd_conn *c, const char *text) {
  /* A client that does not read its answer loses it; nothing here waits for one. */
  if (send(c->fd, text, strlen(text), MSG_NOSIGNAL | MSG_DONTWAIT) < 0) return;
}

/* The one message: its descriptors are taken (each closed unless stashed). */
static void on_message(fd_conn *c, const char *data, ssize_t n, int flags, const int *fds, size_t nfds) {
  char err[512], out[600];
  int rc = 0;
  if (flags & (MSG_TRUNC | MSG_CTRUNC))
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "the message was larger than expected: send \"" HELLO
                    "\" with one descriptor");
  else if ((size_t)n != strlen(HELLO) || memcmp(data, HELLO, strlen(HELLO)) != 0)
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "expected the data \"" HELLO "\" (this protocol's version)");
  else if (nfds != 1)
    rc = convd_errf(err, sizeof err, CONVD_EINVAL, "expected exactly one descriptor in SCM_RIGHTS, got %zu", nfds);
  if (rc) {
    for (size_t i = 0; i < nfds; i++) close_refused(fds[i]);
  } else {
    char ticket[CONVD_SHM_TICKET_LEN + 1];
    uint64_t size = 0;
    int writable = 0;
    rc = convd_shm_stash_fd(c->owner->shm, fds[0], c->uid, ticket, &size, &writable, err, sizeof err);
    if (rc == 0) snprintf(out, sizeof out, "ok %s %" PRIu64 " %s\n", ticket, size, writable ? "rw" : "ro");
    else close_refused(fds[0]);
  }
  if (rc) /* the status a call would have had, then the reason */
    snprintf(out, sizeof out, "error %s %s\n",
             rc == CONVD_ELIMIT ? "RESOURCE_EXHAUSTED" : rc == CONVD_EINVAL ? "INVALID_ARGUMENT" : "INTERNAL", err);
  reply(c, out);
}

static void on_conn_readable(uv_poll_t *p, int status, int events) {
  fd_conn *c = p->data;
  (void)events;
  if (status < 0) {
    conn_close(c);
    return;
  }
  char data[64];
  union {
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct cmsghdr align;
  } cm;
  struct iovec iov = {data, sizeof data};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf};
  const ssize_t n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  int fds[MAX_FDS];
  size_t nfds = 0;
  if (n >= 0) {
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&mh); h; h = CMSG_NXTHDR(&mh, h)) {
      if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
      const size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k && nfds < MAX_FDS; i++) memcpy(&fds[nfds++], CMSG_DATA(h) + i * sizeof(int), sizeof(int));
    }
  }
  if (n > 0 || nfds > 0) on_message(c, data, n, mh.msg_flags, fds, nfds);
  conn_close(c); /* one message per connection; an end or an error ends it too */
}

static void on_conn_timeout(uv_timer_t *t) { conn_close(t->data); }

static void on_accept(uv_poll_t *p, int status, int events) {
  fd_listener *l = p->data;
  convd_fdsock *f = l->owner;
  (void)events;
  if (status < 0) return;
  for (int i = 0; i < 16; i++) {
    const int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return; /* EAGAIN, or an error that the next readiness retries */
    fd_conn *c = f->nconns < FDSOCK_MAX_CONNS ? calloc(1, sizeof *c) : NULL;
    if (c == NULL) {
      close(fd); /* over the bound: the client sees the connection end */
      continue;
    }
    struct ucred cr;
    socklen_t len = sizeof cr;
    c->uid = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0 ? (unsigned)cr.uid : (unsigned)-1;
    c->owner = f;
    c->fd = fd;
    if (uv_poll_init(f->loop, &c->poll, fd) != 0) {
      close(fd);
      free(c);
      continue;
    }
    uv_timer_init(f->loop, &c->timer);
    c->poll.data = c->timer.data = c;
    c->handles = 2;
    c->next = f->conns;
    if (f->conns) f->conns->prev = c;
    f->conns = c;
    f->nconns++;
    uv_poll_start(&c->poll, UV_READABLE | UV_DISCONNECT, on_conn_readable);
    uv_timer_start(&c->timer, on_conn_timeout, FDSOCK_TIMEOUT_MS, 0);
  }
}

static void on_expire(uv_timer_t *t) {
  convd_fdsock *f = t->data;
  convd_shm_expire(f->shm);
}

/* Binds and listens on path with mode (the file made at most mode, then set to it). */
static int listen_on(fd_listener *l, const char *listener, int mode, char *err, size_t errlen) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(listener) + strlen(FDSOCK_SUFFIX) >= sizeof sa.sun_path) {
    /* The gRPC socket works; only in-place regions are lost through it, so say so and go on. */
    char q[160];
    convd_log(CONVD_LOG_WARN,
              "msg=\"no descriptor socket: the path plus " FDSOCK_SUFFIX " is too long for a Unix socket; "
              "regions through this listener are copied, not used in place\" path=%s",
              convd_log_quote(listener, q, sizeof q));
    return 1;
  }
  snprintf(l->path, sizeof l->path, "%s%s", listener, FDSOCK_SUFFIX);
  int rc = convd_unix_claim(l->path, err, errlen);
  if (rc) return rc;
  memcpy(sa.sun_path, l->path, strlen(l->path) + 1);
  l->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (l->fd < 0) return convd_errf(err, errlen, CONVD_EIO, "socket(AF_UNIX, SOCK_SEQPACKET): %s", strerror(errno));
  const mode_t old = convd_unix_umask_for(mode);
  const int b = bind(l->fd, (const struct sockaddr *)&sa, sizeof sa), e = errno;
  umask(old);
  if (b != 0) return convd_errf(err, errlen, CONVD_EIO, "cannot bind the descriptor socket %s: %s", l->path, strerror(e));
  if ((rc = convd_unix_adopt(&l->sock, l->path, mode, err, errlen))) return rc;
  if (listen(l->fd, 64) != 0)
    return convd_errf(err, errlen, CONVD_EIO, "listen on %s: %s", l->path, strerror(errno));
  return 0;
}

int convd_fdsock_start(uv_loop_t *loop, convd_shm *shm, const char *const *paths, size_t n,
                       int mode, convd_fdsock **out, char *err, size_t errlen) {
  *out = NULL;
  if (n > CONVD_LISTEN_MAX) return convd_errf(err, errlen, CONVD_EINVAL, "too many unix listeners");
  convd_fdsock *f = calloc(1, sizeof *f);
  if (f == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  f->loop = loop;
  f->shm = shm;
  int rc = 0;
  for (size_t i = 0; i < n && rc == 0; i++) {
    fd_listener *l = &f->ls[f->n++];
    l->owner = f;
    l->fd = -1;
    if ((rc = listen_on(l, paths[i], mode, err, errlen)) == 1) rc = 0, f->n--; /* skipped */
  }
  if (rc) {
    for (size_t i = 0; i < f->n; i++) {
      if (f->ls[i].fd >= 0) close(f->ls[i].fd);
      convd_unix_remove(&f->ls[i].sock);
    }
    free(f);
    return rc;
  }
  for (size_t i = 0; i < f->n; i++) {
    fd_listener *l = &f->ls[i];
    uv_poll_init(loop, &l->poll, l->fd);
    l->poll.data = l;
    uv_poll_start(&l->poll, UV_READABLE, on_accept);
    f->handles++;
  }
  uv_timer_init(loop, &f->expire);
  f->expire.data = f;
  uv_timer_start(&f->expire, on_expire, EXPIRE_MS, EXPIRE_MS);
  f->handles++;
  *out = f;
  return 0;
}

void convd_fdsock_close(convd_fdsock *f) {
  if (f == NULL || f->closing) return;
  f->closing = 1;
  for (size_t i = 0; i < f->n; i++) {
    fd_listener *l = &f->ls[i];
    uv_poll_stop(&l->poll);
    l->poll.data = f;
    uv_close((uv_handle_t *)&l->poll, on_owner_handle_closed);
    close(l->fd);
    l->fd = -1;
    convd_unix_remove(&l->sock);
  }
  uv_timer_stop(&f->expire);
  uv_close((uv_handle_t *)&f->expire, on_owner_handle_closed);
  for (fd_conn *c = f->conns, *next; c; c = next) {
    next = c->next;
    conn_close(c);
  }
}
