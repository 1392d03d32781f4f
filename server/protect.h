/* The start-up rules about who may connect ("protected mode", as Redis has it): a daemon that
 * other machines can reach serves only with TLS and tokens, unless the operator says
 * --allow-insecure; the plaintext metrics endpoint stays on loopback once TLS or tokens are
 * configured, unless --metrics-public (or --allow-insecure). Also the flags that go together
 * (--tls-cert with --tls-key, --tls-client-ca with both).
 *
 * Threads: the main thread at start (pure functions). */
#ifndef CONVD_PROTECT_H
#define CONVD_PROTECT_H

#include <stddef.h>

#include "config.h"

/* 1 when an address as --listen or --metrics-listen take it can only be reached from this
 * machine: 127.0.0.0/8, [::1] (or ::ffff:127.x.y.z), localhost, a unix: or unix-abstract:
 * socket. Anything else, host names and 0.0.0.0 / [::] included, counts as reachable. */
int convd_protect_is_local(const char *addr);

/* The first of the --listen addresses that other machines can reach, or NULL. */
const char *convd_protect_first_reachable(const convd_listen_list *l);

/* Checks cfg against the rules (every --listen address); returns 0, or CONVD_EINVAL with a message naming the flags. */
int convd_protect_check(const convd_config *cfg, char *err, size_t errlen);

#endif
