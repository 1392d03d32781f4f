/* See http.h. Threads: the daemon's libuv loop only (the metrics text is rendered there too). */
#define _GNU_SOURCE /* memmem */
#include "http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"

#define MAX_REQUEST 8192      /* a scrape's request line and headers fit easily */
#define REQUEST_TIMEOUT_MS 10000

struct convd_http {
  uv_tcp_t server;
  convd_http_render render;
  void *user;
  struct conn *conns; /* open connections, closed with the server */
  int closing;
};

typedef struct conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  convd_http *h;
  struct conn *prev, *next;
  char buf[MAX_REQUEST];
  size_t len;
  int responded, closing, handles_open;
  uv_write_t wr;
  char *body;
  char head[256];
} conn;

static void conn_handle_closed(uv_handle_t *hd) {
  conn *c = hd->data;
  if (--c->handles_open > 0) return;
  free(c->body);
  free(c);
}

static void conn_close(conn *c) {
  if (c->closing) return;
  c->closing = 1;
  if (c->prev) c->prev->next = c->next;
  else if (c->h->conns == c) c->h->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  uv_timer_stop(&c->timer);
  uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
  uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
}

static void on_written(uv_write_t *w, int status) {
  (void)status;
  conn_close(w->data);
}

static void respond(conn *c, int code, const char *reason, const char *ctype, char *body, size_t len) {
  c->responded = 1;
  uv_read_stop((uv_stream_t *)&c->tcp);
  c->body = body;
  int n = snprintf(c->head, sizeof c->head,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                   code, reason, ctype, len);
  uv_buf_t bufs[2] = {uv_buf_init(c->head, (unsigned)n), uv_buf_init(body ? body : "", (unsigned)len)};
  c->wr.data = c;
  if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, bufs, body ? 2 : 1, on_written) != 0) conn_close(c);
}

static void respond_text(conn *c, int code, const char *reason, const char *msg) {
  size_t len = strlen(msg);
  char *b = malloc(len + 1);
  if (b == NULL) {
    conn_close(c);
    return;
  }
  memcpy(b, msg, len + 1);
  respond(c, code, reason, "text/plain; charset=utf-8", b, len);
}

static void handle(conn *c) {
  /* The request line: METHOD SP TARGET SP VERSION */
  char *eol = memchr(c->buf, '\r', c->len);
  if (eol == NULL) eol = memchr(c->buf, '\n', c->len);
  size_t line_len = eol ? (size_t)(eol - c->buf) : c->len;
  char line[512];
  if (line_len >= sizeof line) {
    respond_text(c, 400, "Bad Request", "request line too long\n");
    return;
  }
  memcpy(line, c->buf, line_len);
  line[line_len] = '\0';
  char method[16], target[256], version[16];
  if (sscanf(line, "%15s %255s %15s", method, target, version) != 3 || strncmp(version, "HTTP/1.", 7) != 0) {
    respond_text(c, 400, "Bad Request", "malformed request line\n");
    return;
  }
  char *q = strchr(target, '?');
  if (q) *q = '\0';
  if (strcmp(target, "/metrics") != 0) {
    respond_text(c, 404, "Not Found", "convd serves GET /metrics only\n");
    return;
  }
  if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
    respond_text(c, 405, "Method Not Allowed", "use GET /metrics\n");
    return;
  }
  size_t len = 0;
  char *body = c->h->render(c->h->user, &len);
  if (body == NULL) {
    respond_text(c, 500, "Internal Server Error", "out of memory rendering metrics\n");
    return;
  }
  if (strcmp(method, "HEAD") == 0) { /* the length of what GET would send, no body */
    int n = snprintf(c->head, sizeof c->head,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n", len);
    free(body);
    c->responded = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    uv_buf_t b = uv_buf_init(c->head, (unsigned)n);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) conn_close(c);
    return;
  }
  respond(c, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, len);
}

static void on_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf) {
  conn *c = hd->data;
  (void)suggested;
  *buf = uv_buf_init(c->buf + c->len, (unsigned)(MAX_REQUEST - c->len));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  conn *c = s->data;
  (void)buf;
  if (c->responded || c->closing) return;
  if (n < 0) {
    conn_close(c);
    return;
  }
  c->len += (size_t)n;
  /* The headers end with an empty line; the body of a GET is empty. */
  if ((c->len >= 4 && memmem(c->buf, c->len, "\r\n\r\n", 4)) || (c->len >= 2 && memmem(c->buf, c->len, "\n\n", 2))) {
    handle(c);
  } else if (c->len == MAX_REQUEST) {
    respond_text(c, 431, "Request Header Fields Too Large", "request larger than 8 KiB\n");
  }
}

static void on_timeout(uv_timer_t *t) {
  conn *c = t->data;
  if (!c->responded) conn_close(c);
}

static void on_connection(uv_stream_t *server, int status) {
  convd_http *h = server->data;
  if (status < 0 || h->closing) return;
  conn *c = calloc(1, sizeof *c);
  if (c == NULL) return;
  c->h = h;
  uv_tcp_init(server->loop, &c->tcp);
  uv_timer_init(server->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->handles_open = 2;
  c->next = h->conns;
  if (h->conns) h->conns->prev = c;
  h->conns = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
    conn_close(c);
    return;
  }
  uv_timer_start(&c->timer, on_timeout, REQUEST_TIMEOUT_MS, 0);
}

int convd_http_start(uv_loop_t *loop, const char *listen, convd_http_render render, void *user,
                     convd_http **out, int *port, char *err, size_t errlen) {
  *out = NULL;
  const char *colon = strrchr(listen, ':');
  char host[256];
  if (colon == NULL || colon == listen || (size_t)(colon - listen) >= sizeof host)
    return convd_errf(err, errlen, CONVD_EINVAL, "--metrics-listen %s: expected HOST:PORT", listen);
  memcpy(host, listen, (size_t)(colon - listen));
  host[colon - listen] = '\0';
  /* [::1] style hosts */
  char *h0 = host;
  size_t hl = strlen(host);
  if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
    host[hl - 1] = '\0';
    h0 = host + 1;
  }
  char *end;
  long p = strtol(colon + 1, &end, 10);
  if (*end || p < 0 || p > 65535)
    return convd_errf(err, errlen, CONVD_EINVAL, "--metrics-listen %s: bad port", listen);
  struct sockaddr_storage addr;
  if (uv_ip4_addr(h0, (int)p, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(h0, (int)p, (struct sockaddr_in6 *)&addr) != 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--metrics-listen %s: the host must be an IP address (127.0.0.1, 0.0.0.0, [::1])",
                      listen);
  convd_http *h = calloc(1, sizeof *h);
  if (h == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  h->render = render;
  h->user = user;
  uv_tcp_init(loop, &h->server);
  h->server.data = h;
  int rc = uv_tcp_bind(&h->server, (const struct sockaddr *)&addr, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&h->server, 64, on_connection);
  if (rc != 0) {
    int code = rc;
    uv_close((uv_handle_t *)&h->server, (uv_close_cb)free);
    return convd_errf(err, errlen, CONVD_EINVAL, "--metrics-listen %s: %s", listen, uv_strerror(code));
  }
  struct sockaddr_storage bound;
  int blen = sizeof bound;
  uv_tcp_getsockname(&h->server, (struct sockaddr *)&bound, &blen);
  *port = bound.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                                      : ntohs(((struct sockaddr_in *)&bound)->sin_port);
  *out = h;
  return 0;
}

void convd_http_close(convd_http *h) {
  if (h == NULL) return;
  h->closing = 1;
  while (h->conns) conn_close(h->conns);
  uv_close((uv_handle_t *)&h->server, (uv_close_cb)free);
}
