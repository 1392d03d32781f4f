/* TLS for the gRPC listeners (--tls-cert, --tls-key, --tls-client-ca): the PEM files, read at
 * start and again on SIGHUP, and the server credentials built on gRPC's certificate-config
 * fetcher, so that a reload takes effect for new connections without restarting the server
 * (connections already open keep the certificate they were made with).
 *
 * With a client CA, every connection must present a client certificate that CA signed (mutual
 * TLS, GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY); without one, clients are
 * not asked for a certificate.
 *
 * Threads: create, reload and destroy run on the daemon's libuv loop; gRPC calls the fetcher on
 * its own threads (once when the port is added, then at each new connection's handshake). `mu`
 * guards the PEM strings and their generation. */
#ifndef CONVD_TLS_H
#define CONVD_TLS_H

#include <grpc/grpc_security.h>
#include <stddef.h>

typedef struct convd_tls convd_tls;

/* Reads the files (client_ca may be NULL or ""). Errors name the flag and the file: missing,
 * unreadable, empty, or without the PEM block expected (a certificate, a private key). */
int convd_tls_create(const char *cert, const char *key, const char *client_ca, convd_tls **out,
                     char *err, size_t errlen);
/* New server credentials on the fetcher, one for each listener (a reload reaches each on its
 * next connection); the caller releases them. NULL when out of memory. */
grpc_server_credentials *convd_tls_server_credentials(convd_tls *t);
/* Reads the files again; on success new connections get the new certificate (gRPC itself
 * refuses a pair that does not load and keeps the old one, logging why). On error the old
 * files' contents stay and err says why. */
int convd_tls_reload(convd_tls *t, char *err, size_t errlen);
/* 1 when clients must present a certificate. */
int convd_tls_mutual(const convd_tls *t);
/* After the gRPC server is gone (the fetcher holds a pointer to t). NULL is a no-op. */
void convd_tls_destroy(convd_tls *t);

#endif
