/* See connlimit.h. Threads: the libuv loop's thread only (the timer and convd_connlimit_scan);
 * the two counters are atomics. */
#include "connlimit.h"

#include <dirent.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "clock.h"
#include "err.h"
#include "log.h"

/* Refusals are logged at most this often (seconds), with the count since the last line: a
 * client retrying in a loop must not flood the log. */
#define REFUSAL_LOG_EVERY 10.0

typedef struct conn {
  int fd;
  unsigned long ino; /* with fd, names one socket: a closed descriptor's number is reused */
  int state;         /* 0 counted, 1 refused, -1 seen for the first time */
} conn;

typedef struct conn_list {
  conn *v;
  size_t n, cap;
} conn_list;

struct convd_connlimit {
  uv_timer_t timer;
  unsigned max;
  convd_connlimit_endpoint *eps;
  size_t neps;
  conn_list known, cur; /* the last scan's connections, and the one being made */
  _Atomic uint64_t open, refused;
  uint64_t refused_logged;
  double last_log;
};

static int list_push(conn_list *l, conn c) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    conn *v = realloc(l->v, cap * sizeof *v);
    if (v == NULL) return -1;
    l->v = v;
    l->cap = cap;
  }
  l->v[l->n++] = c;
  return 0;
}

/* The socket inode behind descriptor `name` of /proc/self/fd (dfd), or 0 when it is not a
 * socket (or is gone). */
static unsigned long socket_inode(int dfd, const char *name) {
  char link[64];
  ssize_t len = readlinkat(dfd, name, link, sizeof link - 1);
  if (len <= 8) return 0;
  link[len] = '\0';
  if (strncmp(link, "socket:[", 8) != 0) return 0;
  return strtoul(link + 8, NULL, 10);
}

/* The previous scan's entry for this socket; the lists are in descriptor order, so a search
 * from the last hit finds each in turn. */
static const conn *find_known(const conn_list *known, size_t *hint, int fd, unsigned long ino) {
  for (size_t i = *hint; i < known->n; i++) {
    if (known->v[i].fd > fd) break;
    if (known->v[i].fd == fd) {
      *hint = i + 1;
      return known->v[i].ino == ino ? &known->v[i] : NULL;
    }
  }
  for (size_t i = 0; i < *hint && i < known->n; i++) /* readdir order is not promised */
    if (known->v[i].fd == fd) return known->v[i].ino == ino ? &known->v[i] : NULL;
  return NULL;
}

/* 1 when fd is a connection a client made to one of the gRPC endpoints (not a listener, not
 * the metrics endpoint's, not one the daemon made itself). */
static int is_client_connection(const convd_connlimit *l, int fd) {
  int listening = 0;
  socklen_t len = sizeof listening;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening) return 0;
  struct sockaddr_storage ss;
  len = sizeof ss;
  if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) return 0;
  int port = -1;
  const char *path = NULL;
  size_t path_len = 0;
  if (ss.ss_family == AF_INET) {
    port = ntohs(((const struct sockaddr_in *)&ss)->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    port = ntohs(((const struct sockaddr_in6 *)&ss)->sin6_port);
  } else if (ss.ss_family == AF_UNIX && len > offsetof(struct sockaddr_un, sun_path)) {
    /* An accepted socket is named by its listener's path (a client's own end is unnamed: len
     * holds the family alone). The path need not end in a NUL when it fills sun_path. */
    path = ((const struct sockaddr_un *)&ss)->sun_path;
    path_len = strnlen(path, len - offsetof(struct sockaddr_un, sun_path));
  } else {
    return 0;
  }
  int match = 0;
  for (size_t i = 0; i < l->neps && !match; i++)
    match = path ? l->eps[i].path && strlen(l->eps[i].path) == path_len &&
                       memcmp(l->eps[i].path, path, path_len) == 0
                 : l->eps[i].port == port;
  if (!match) return 0;
  struct sockaddr_storage peer;
  len = sizeof peer;
  return getpeername(fd, (struct sockaddr *)&peer, &len) == 0;
}

static void log_refusals(convd_connlimit *l) {
  const uint64_t total = atomic_load(&l->refused);
  const double now = convd_now_seconds();
  if (total == l->refused_logged || now - l->last_log < REFUSAL_LOG_EVERY) return;
  convd_log(CONVD_LOG_WARN,
            "msg=\"--max-connections reached: new connections are closed at once\" "
            "max_connections=%u refused=%llu refused_total=%llu",
            l->max, (unsigned long long)(total - l->refused_logged), (unsigned long long)total);
  l->refused_logged = total;
  l->last_log = now;
}

void convd_connlimit_scan(convd_connlimit *l) {
  DIR *dir = opendir("/proc/self/fd");
  if (dir == NULL) return;
  const int dfd = dirfd(dir);
  l->cur.n = 0;
  size_t hint = 0, counted = 0;
  int short_of_memory = 0;
  struct dirent *de;
  while ((de = readdir(dir)) != NULL) {
    char *end;
    long fd = strtol(de->d_name, &end, 10);
    if (end == de->d_name || *end != '\0' || fd == dfd) continue;
    unsigned long ino = socket_inode(dfd, de->d_name);
    if (ino == 0) continue;
    const conn *prev = find_known(&l->known, &hint, (int)fd, ino);
    conn c = {(int)fd, ino, prev ? prev->state : -1};
    if (prev == NULL && !is_client_connection(l, (int)fd)) continue;
    if (c.state == 0) counted++;
    if (list_push(&l->cur, c)) short_of_memory = 1;
  }
  /* Newcomers, while there is room; the others end now. Their descriptors are gRPC's: the
   * inode is checked again just before, so a number closed and reused since is left alone. */
  for (size_t i = 0; i < l->cur.n; i++) {
    conn *c = &l->cur.v[i];
    if (c->state != -1) continue;
    if (counted < l->max) {
      c->state = 0;
      counted++;
      continue;
    }
    char name[24];
    snprintf(name, sizeof name, "%d", c->fd);
    if (socket_inode(dfd, name) == c->ino) shutdown(c->fd, SHUT_RDWR);
    c->state = 1;
    atomic_fetch_add(&l->refused, 1);
  }
  closedir(dir);
  if (!short_of_memory) { /* else the old list stands: better stale than forgetting */
    conn_list t = l->known;
    l->known = l->cur;
    l->cur = t;
  }
  atomic_store(&l->open, counted);
  log_refusals(l);
}

static void on_timer(uv_timer_t *t) { convd_connlimit_scan(t->data); }

int convd_connlimit_start(uv_loop_t *loop, unsigned max, unsigned interval_ms,
                          const convd_connlimit_endpoint *eps, size_t n, convd_connlimit **out,
                          char *err, size_t errlen) {
  *out = NULL;
  if (max == 0 || interval_ms == 0 || n == 0)
    return convd_errf(err, errlen, CONVD_EINVAL, "connection limit: a bound, an interval and endpoints are needed");
  if (access("/proc/self/fd", R_OK) != 0)
    return convd_errf(err, errlen, CONVD_ENOTSUP,
                      "--max-connections needs /proc/self/fd (Linux with /proc mounted); "
                      "start with --max-connections 0 to serve without the bound");
  convd_connlimit *l = calloc(1, sizeof *l);
  if (l == NULL || (l->eps = calloc(n, sizeof *l->eps)) == NULL) {
    free(l);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  }
  l->max = max;
  l->neps = n;
  for (size_t i = 0; i < n; i++) {
    l->eps[i].port = eps[i].port;
    if (eps[i].path && (l->eps[i].path = strdup(eps[i].path)) == NULL) {
      l->timer.data = l;
      convd_connlimit_close(l); /* not started: frees at once */
      return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
    }
  }
  uv_timer_init(loop, &l->timer);
  l->timer.data = l;
  uv_timer_start(&l->timer, on_timer, interval_ms, interval_ms);
  *out = l;
  return 0;
}

void convd_connlimit_counts(const convd_connlimit *l, uint64_t *open, uint64_t *refused) {
  *open = l ? atomic_load(&l->open) : 0;
  *refused = l ? atomic_load(&l->refused) : 0;
}

static void free_limit(convd_connlimit *l) {
  for (size_t i = 0; i < l->neps; i++) free((void *)l->eps[i].path);
  free(l->eps);
  free(l->known.v);
  free(l->cur.v);
  free(l);
}

static void on_closed(uv_handle_t *h) { free_limit(h->data); }

void convd_connlimit_close(convd_connlimit *l) {
  if (l == NULL) return;
  if (l->timer.loop == NULL) { /* never started */
    free_limit(l);
    return;
  }
  uv_timer_stop(&l->timer);
  uv_close((uv_handle_t *)&l->timer, on_closed);
}
