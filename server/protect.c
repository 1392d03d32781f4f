/* See protect.h. Threads: the main thread, before anything starts. */
#include "protect.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "err.h"

int convd_protect_is_local(const char *addr) {
  if (strncmp(addr, "unix:", 5) == 0 || strncmp(addr, "unix-abstract:", 14) == 0) return 1;
  char host[256];
  if (addr[0] == '[') {
    const char *close = strchr(addr, ']');
    if (close == NULL || (size_t)(close - addr - 1) >= sizeof host) return 0;
    snprintf(host, sizeof host, "%.*s", (int)(close - addr - 1), addr + 1);
    unsigned char a6[16];
    if (inet_pton(AF_INET6, host, a6) != 1) return 0;
    static const unsigned char loop6[16] = {[15] = 1}, mapped[12] = {[10] = 0xff, [11] = 0xff};
    return memcmp(a6, loop6, 16) == 0 || (memcmp(a6, mapped, 12) == 0 && a6[12] == 127);
  }
  const char *colon = strrchr(addr, ':');
  const size_t n = colon ? (size_t)(colon - addr) : strlen(addr);
  if (n == 0 || n >= sizeof host) return 0; /* ":PORT" is every interface */
  snprintf(host, sizeof host, "%.*s", (int)n, addr);
  if (strcasecmp(host, "localhost") == 0) return 1;
  unsigned char a4[4];
  return inet_pton(AF_INET, host, a4) == 1 && a4[0] == 127;
}

const char *convd_protect_first_reachable(const convd_listen_list *l) {
  for (int i = 0; i < l->n; i++)
    if (!convd_protect_is_local(l->addr[i])) return l->addr[i];
  return NULL;
}

int convd_protect_check(const convd_config *cfg, char *err, size_t errlen) {
  const int cert = cfg->tls_cert[0] != '\0', key = cfg->tls_key[0] != '\0';
  if (cert != key)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s is set but %s is not: TLS needs both the certificate chain "
                      "(--tls-cert) and its private key (--tls-key)",
                      cert ? "--tls-cert" : "--tls-key", cert ? "--tls-key" : "--tls-cert");
  if (cfg->tls_client_ca[0] && !cert)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--tls-client-ca needs --tls-cert and --tls-key: client certificates are "
                      "checked only over TLS");
  const int tls = cert, tokens = cfg->auth_tokens[0] != '\0';
  /* TLS and tokens apply to every listener alike, so one reachable listener needs both. */
  const char *reachable = convd_protect_first_reachable(&cfg->listen);
  if (reachable && !(tls && tokens) && !cfg->allow_insecure)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--listen %s can be reached from other machines, and convd serves there "
                      "only with both TLS (--tls-cert/--tls-key) and tokens (--auth-tokens), and "
                      "%s missing. Give them, listen on a loopback address (127.0.0.1, [::1], "
                      "localhost) or a unix: socket, or pass --allow-insecure to serve anyway",
                      reachable,
                      !tls && !tokens ? "both are" : !tls ? "TLS is" : "tokens are");
  if (cfg->metrics_listen[0] && (tls || tokens) && !convd_protect_is_local(cfg->metrics_listen) &&
      !cfg->metrics_public && !cfg->allow_insecure)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "--metrics-listen %s can be reached from other machines, but the metrics "
                      "endpoint is plaintext HTTP without authentication while gRPC is protected "
                      "by %s: listen on 127.0.0.1, or pass --metrics-public to serve metrics "
                      "there anyway",
                      cfg->metrics_listen, tls && tokens ? "TLS and tokens" : tls ? "TLS" : "tokens");
  return 0;
}
