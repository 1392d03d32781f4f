/* A minimal HTTP/1.x endpoint on the daemon's libuv loop for Prometheus scrapes: GET /metrics
 * only, one request per connection, requests bounded in size and time. Anything else gets 404,
 * 405 or 400 and the connection closes. */
#ifndef CONVD_HTTP_H
#define CONVD_HTTP_H

#include <stddef.h>
#include <uv.h>

typedef struct convd_http convd_http;

/* Produces the body of GET /metrics (malloc'd; NULL = 500). Runs on the loop thread. */
typedef char *(*convd_http_render)(void *user, size_t *len);

/* Listens on "HOST:PORT" (port 0 picks one; *port receives it). */
int convd_http_start(uv_loop_t *loop, const char *listen, convd_http_render render, void *user,
                     convd_http **out, int *port, char *err, size_t errlen);
/* Stops listening and closes open connections; the handle frees itself on the loop. */
void convd_http_close(convd_http *h);

#endif
