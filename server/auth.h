/* Bearer tokens that name tenants (--auth-tokens FILE). The file has one line per token:
 *
 *   TENANT TOKEN [inflight-bytes=SIZE] [calls=N] [weights-bytes=SIZE] [shm-bytes=SIZE]
 *
 * blank lines and lines starting with '#' are skipped. TENANT is [A-Za-z0-9_.-]{1,64}; TOKEN is
 * 16 to 256 printable characters without spaces; a tenant may have several lines (several
 * tokens, e.g. while one is being rotated out), and a limit given on more than one of them must
 * have the same value. The file must be neither readable nor writable by group or others.
 * Nothing here ever writes a token into a message or the log: errors name line numbers.
 *
 * A client sends `authorization: Bearer TOKEN`. convd_auth_attach installs a gRPC auth metadata
 * processor that checks the token (in constant time) before a call is delivered, answers a
 * wrong one UNAUTHENTICATED and lets the others through; dispatch (call.c, which has the method
 * table's row) then reads the call's own header again for its tenant (the processor's auth
 * context is the connection's in gRPC 1.51, shared by all its calls, so it cannot carry a
 * call's tenant), and refuses a call without one unless the method is open (methods.h). No
 * handler reads the header. Why there: the
 * processor's signature (grpc_security.h) gives it metadata only, not the method. gRPC 1.51
 * happens to put the `:path` pseudo-header among that metadata, but nothing promises it, and
 * the method table, not a second list of paths here, is what says which methods are open.
 *
 * The table is immutable once loaded; a reload (SIGHUP) builds a new one and swaps it in under
 * a mutex, so a reload never blocks on a call and never changes one in flight. A tenant handle
 * (convd_auth_tenant_get) keeps the table it came from alive until it is put back.
 *
 * Threads: load, reload and destroy run on the daemon's libuv loop; the processor runs on gRPC's
 * own threads; lookups run on the completion-queue thread. `mu` guards the current table
 * pointer; everything a table holds is read-only, its reference count atomic. */
#ifndef CONVD_AUTH_H
#define CONVD_AUTH_H

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <stddef.h>
#include <stdint.h>

#define CONVD_AUTH_TENANT_MAX 64  /* characters of a tenant name */
#define CONVD_AUTH_TOKEN_MIN 16   /* characters of a token */
#define CONVD_AUTH_TOKEN_MAX 256
/* The one answer a client gets for a missing or wrong token: nothing about which. */
#define CONVD_AUTH_REFUSED "missing or invalid token"

typedef struct convd_auth convd_auth;
typedef struct convd_tenant convd_tenant;

/* A tenant's own limits from its lines in the file; 0 = none set (only the daemon's apply).
 * Parsed and stored here; enforcing them is the services' business. */
typedef struct convd_tenant_limits {
  uint64_t inflight_bytes; /* inflight-bytes=SIZE: bytes its calls in flight may hold */
  uint64_t calls;          /* calls=N: its calls in flight */
  uint64_t weights_bytes;  /* weights-bytes=SIZE: bytes of registered weights */
  uint64_t shm_bytes;      /* shm-bytes=SIZE: bytes of registered shared-memory regions */
} convd_tenant_limits;

/* Reads and checks the tokens file. Errors (negative, message in err) name the file and, for
 * a malformed line, its number; a file group or others may read or write is refused with the
 * chmod to run. */
int convd_auth_load(const char *path, convd_auth **out, char *err, size_t errlen);
/* Reads the file again. On success the new table serves every call that starts from now on;
 * on any error the old table stays and err says why. */
int convd_auth_reload(convd_auth *a, char *err, size_t errlen);
/* After the gRPC server is gone (its processor holds a pointer to a). NULL is a no-op. */
void convd_auth_destroy(convd_auth *a);

/* Tokens and tenants of the current table (for the log). */
void convd_auth_counts(convd_auth *a, size_t *tokens, size_t *tenants);

/* Checks a presented token against every token of the current table in constant time (for
 * tokens up to CONVD_AUTH_TOKEN_MAX; the time depends on the number of tokens, not on their
 * contents). On a match copies the tenant's name into tenant (CONVD_AUTH_TENANT_MAX + 1 bytes)
 * and returns 0; else CONVD_ENOTFOUND. */
int convd_auth_check(convd_auth *a, const char *token, size_t len, char *tenant);

/* The tenant of that name in the current table, held until convd_auth_tenant_put (NULL when
 * there is none, e.g. a reload removed it). */
const convd_tenant *convd_auth_tenant_get(convd_auth *a, const char *name);
void convd_auth_tenant_put(const convd_tenant *t); /* NULL is a no-op */
const char *convd_tenant_name(const convd_tenant *t);
const convd_tenant_limits *convd_tenant_limits_of(const convd_tenant *t);

/* Installs the token check on server credentials (before they are used to add a port). */
void convd_auth_attach(convd_auth *a, grpc_server_credentials *creds);
/* The tenant of a server call's token (its request metadata), held (put it back), or NULL when
 * the call carried no valid token. Completion-queue thread, once the call was matched. */
const convd_tenant *convd_auth_call_tenant(convd_auth *a, const grpc_metadata_array *md);

/* Calls refused for a wrong token since start (they never reach dispatch, so they have no
 * end-of-call line or request metric of their own). Any thread. */
uint64_t convd_auth_refused_total(convd_auth *a);

#endif
