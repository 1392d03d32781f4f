/* See tls.h. Threads: convd_tls_create/reload/destroy and convd_tls_server_credentials on the
 * daemon's libuv loop; fetch() on gRPC's threads. t->mu guards the PEM strings and the
 * increments of `generation`; the paths are set at creation and read-only afterwards. Files are
 * read on the loop, never in fetch(), which runs for every new connection and must stay cheap. */
#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"

#define MAX_PEM_BYTES (1u << 20) /* a chain of a few certificates is kilobytes */

/* One per server credentials object, i.e. per listener: gRPC gives each listener its own
 * security connector and handshaker factory, which fetch() feeds, so each must be told of a
 * reload on its own (one flag for all would let the first listener to take the new certificate
 * keep it from the others, and a second listener's first fetch find nothing new and fail). */
struct fetcher {
  convd_tls *t;
  atomic_uint seen; /* the generation this listener's gRPC connector has (0: none yet) */
  struct fetcher *next;
};

struct convd_tls {
  char cert_path[1024], key_path[1024], ca_path[1024]; /* ca_path "" without a client CA */
  pthread_mutex_t mu;
  char *cert, *key, *ca; /* PEM text; ca NULL without a client CA */
  atomic_uint generation; /* of the strings: 1 at start, one more at each reload (under mu) */
  struct fetcher *fetchers; /* the loop's thread adds them; freed with t */
};

static void pem_free(char *p) {
  if (p == NULL) return;
  explicit_bzero(p, strlen(p)); /* a private key must not linger in freed memory */
  free(p);
}

/* Reads one PEM file and checks it holds a block of the kind expected ("CERTIFICATE", or
 * "PRIVATE KEY" for any key type: "EC PRIVATE KEY", "RSA PRIVATE KEY", "PRIVATE KEY"). */
static int read_pem(const char *flag, const char *path, const char *kind, char **out, char *err,
                    size_t errlen) {
  *out = NULL;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return convd_errf(err, errlen, CONVD_EIO, "%s %s: cannot open it: %s", flag, path, strerror(errno));
  struct stat st;
  int rc = 0;
  char *buf = NULL;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    rc = convd_errf(err, errlen, CONVD_EIO, "%s %s: not a readable regular file", flag, path);
  } else if ((uint64_t)st.st_size > MAX_PEM_BYTES) {
    rc = convd_errf(err, errlen, CONVD_ELIMIT, "%s %s: larger than %u bytes: not a PEM file", flag,
                    path, MAX_PEM_BYTES);
  } else if ((buf = malloc((size_t)st.st_size + 1)) == NULL) {
    rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory reading %s", path);
  } else {
    size_t got = 0;
    while (got < (size_t)st.st_size) {
      ssize_t k = read(fd, buf + got, (size_t)st.st_size - got);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) break;
      got += (size_t)k;
    }
    buf[got] = '\0';
    char begin[64];
    snprintf(begin, sizeof begin, "%s-----", kind);
    if (got != (size_t)st.st_size)
      rc = convd_errf(err, errlen, CONVD_EIO, "%s %s: short read", flag, path);
    else if (strstr(buf, "-----BEGIN ") == NULL || strstr(buf, begin) == NULL)
      rc = convd_errf(err, errlen, CONVD_EINVAL, "%s %s: no PEM \"%s\" block in it", flag, path, kind);
  }
  close(fd);
  if (rc) {
    pem_free(buf);
    return rc;
  }
  *out = buf;
  return 0;
}

/* All three files, or none: a reload never mixes a new certificate with an old key. */
static int read_all(convd_tls *t, char **cert, char **key, char **ca, char *err, size_t errlen) {
  *cert = *key = *ca = NULL;
  int rc = read_pem("--tls-cert", t->cert_path, "CERTIFICATE", cert, err, errlen);
  if (rc == 0) rc = read_pem("--tls-key", t->key_path, "PRIVATE KEY", key, err, errlen);
  if (rc == 0 && t->ca_path[0]) rc = read_pem("--tls-client-ca", t->ca_path, "CERTIFICATE", ca, err, errlen);
  if (rc) {
    pem_free(*cert), pem_free(*key), pem_free(*ca);
    *cert = *key = *ca = NULL;
  }
  return rc;
}

int convd_tls_create(const char *cert, const char *key, const char *client_ca, convd_tls **out,
                     char *err, size_t errlen) {
  *out = NULL;
  convd_tls *t = calloc(1, sizeof *t);
  if (t == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  if (strlen(cert) >= sizeof t->cert_path || strlen(key) >= sizeof t->key_path ||
      (client_ca && strlen(client_ca) >= sizeof t->ca_path)) {
    free(t);
    return convd_errf(err, errlen, CONVD_EINVAL, "--tls-cert/--tls-key/--tls-client-ca: path too long");
  }
  snprintf(t->cert_path, sizeof t->cert_path, "%s", cert);
  snprintf(t->key_path, sizeof t->key_path, "%s", key);
  snprintf(t->ca_path, sizeof t->ca_path, "%s", client_ca ? client_ca : "");
  int rc = read_all(t, &t->cert, &t->key, &t->ca, err, errlen);
  if (rc) {
    free(t);
    return rc;
  }
  pthread_mutex_init(&t->mu, NULL);
  atomic_init(&t->generation, 1);
  *out = t;
  return 0;
}

int convd_tls_reload(convd_tls *t, char *err, size_t errlen) {
  char *cert, *key, *ca;
  int rc = read_all(t, &cert, &key, &ca, err, errlen);
  if (rc) return rc;
  pthread_mutex_lock(&t->mu);
  char *old[3] = {t->cert, t->key, t->ca};
  t->cert = cert, t->key = key, t->ca = ca;
  atomic_fetch_add(&t->generation, 1);
  pthread_mutex_unlock(&t->mu);
  for (int i = 0; i < 3; i++) pem_free(old[i]);
  return 0;
}

/* gRPC thread: at the port's creation and at every new connection on it (gRPC serializes the
 * calls for one connector). gRPC owns *config after NEW (it copies the strings). */
static grpc_ssl_certificate_config_reload_status fetch(void *user,
                                                       grpc_ssl_server_certificate_config **config) {
  struct fetcher *f = user;
  convd_tls *t = f->t;
  if (atomic_load(&f->seen) == atomic_load(&t->generation))
    return GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED;
  pthread_mutex_lock(&t->mu);
  grpc_ssl_pem_key_cert_pair pair = {t->key, t->cert};
  /* gRPC 1.51 asserts that a fetched config has root certificates, even when clients are not
   * asked for a certificate. Without a client CA the server's own chain stands in: it is
   * loaded but never used, as no client certificate is requested or verified. */
  *config = grpc_ssl_server_certificate_config_create(t->ca ? t->ca : t->cert, &pair, 1);
  atomic_store(&f->seen, atomic_load(&t->generation));
  pthread_mutex_unlock(&t->mu);
  return *config ? GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_NEW : GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_FAIL;
}

grpc_server_credentials *convd_tls_server_credentials(convd_tls *t) {
  /* The first fetch (when the port is added) hands gRPC the certificate: seen starts at 0. */
  struct fetcher *f = calloc(1, sizeof *f);
  if (f == NULL) return NULL;
  f->t = t;
  atomic_init(&f->seen, 0);
  f->next = t->fetchers;
  t->fetchers = f;
  grpc_ssl_server_credentials_options *o = grpc_ssl_server_credentials_create_options_using_config_fetcher(
      t->ca_path[0] ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                    : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
      fetch, f);
  if (o == NULL) return NULL;
  return grpc_ssl_server_credentials_create_with_options(o);
}

int convd_tls_mutual(const convd_tls *t) { return t->ca_path[0] != '\0'; }

void convd_tls_destroy(convd_tls *t) {
  if (t == NULL) return;
  pem_free(t->cert), pem_free(t->key), pem_free(t->ca);
  for (struct fetcher *f = t->fetchers, *next; f; f = next) {
    next = f->next;
    free(f);
  }
  pthread_mutex_destroy(&t->mu);
  free(t);
}
