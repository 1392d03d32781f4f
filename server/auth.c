/* See auth.h. Threads: convd_auth_load/reload/destroy on the daemon's libuv loop (at start and
 * on SIGHUP); process() on gRPC's threads, before a call is delivered; convd_auth_call_tenant on
 * the completion-queue thread. a->mu guards a->cur only; a table is immutable once published
 * and lives while a reference (the current pointer, a lookup in progress, a tenant handle)
 * holds it. */
#include "auth.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"
#include "conv.h" /* convd_parse_size */
#include "err.h"
#include "log.h"

#define MAX_FILE_BYTES (4u << 20) /* ~15 000 tokens; a larger file is a mistake */
#define MAX_LINE 4096
#define MAX_FIELDS 8
#define REFUSAL_LOG_INTERVAL_S 10.0 /* a client retrying a bad token must not flood the log */

typedef struct token_entry {
  /* Zero-padded to the maximum, so that every comparison reads the same bytes. */
  unsigned char tok[CONVD_AUTH_TOKEN_MAX];
  size_t len;
  size_t tenant; /* index into the table's tenants */
  int line;
} token_entry;

enum { LIM_INFLIGHT, LIM_CALLS, LIM_WEIGHTS, LIM_SHM, LIM_COUNT };
static const char *const limit_names[LIM_COUNT] = {"inflight-bytes", "calls", "weights-bytes", "shm-bytes"};

typedef struct table table;

struct convd_tenant {
  table *table;
  char name[CONVD_AUTH_TENANT_MAX + 1];
  convd_tenant_limits limits;
  int limit_line[LIM_COUNT]; /* the line that set each limit (0: none), for conflict messages */
};

struct table {
  atomic_int refs;
  token_entry *tokens;
  size_t n_tokens, cap_tokens;
  convd_tenant *tenants;
  size_t n_tenants, cap_tenants;
};

struct convd_auth {
  char path[1024];
  pthread_mutex_t mu;
  table *cur;
  atomic_uint_fast64_t refused; /* wrong tokens since the last log line about them */
  atomic_uint_fast64_t refused_total; /* wrong tokens since start (metrics) */
  _Atomic double last_refusal_log;
};

/* ---- tables ------------------------------------------------------------------------------ */

static void table_free(table *t) {
  if (t == NULL) return;
  /* The tokens are secrets: nothing of them stays in freed memory. */
  if (t->tokens) explicit_bzero(t->tokens, t->cap_tokens * sizeof *t->tokens);
  free(t->tokens);
  free(t->tenants);
  free(t);
}

static void table_unref(table *t) {
  if (t && atomic_fetch_sub(&t->refs, 1) == 1) table_free(t);
}

/* The current table, held. */
static table *table_get(convd_auth *a) {
  pthread_mutex_lock(&a->mu);
  table *t = a->cur;
  atomic_fetch_add(&t->refs, 1);
  pthread_mutex_unlock(&a->mu);
  return t;
}

static int grow(void **p, size_t *cap, size_t n, size_t elem) {
  if (n < *cap) return 0;
  size_t nc = *cap ? *cap * 2 : 16;
  void *np = calloc(nc, elem);
  if (np == NULL) return -1;
  if (*p) {
    memcpy(np, *p, *cap * elem);
    explicit_bzero(*p, *cap * elem); /* the old token array held secrets too */
    free(*p);
  }
  *p = np;
  *cap = nc;
  return 0;
}

/* ---- the file ---------------------------------------------------------------------------- */

static int valid_tenant(const char *s) {
  size_t n = strlen(s);
  if (n < 1 || n > CONVD_AUTH_TENANT_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    const unsigned char ch = (unsigned char)s[i];
    if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
          ch == '_' || ch == '.' || ch == '-'))
      return 0;
  }
  return 1;
}

/* Printable ASCII without space: what an HTTP header value carries without quoting. */
static int valid_token_chars(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return 0;
  return 1;
}

/* One line's limit field (KEY=VALUE) into the tenant; messages never quote the line. */
static int parse_limit(const char *path, int line, int field, const char *kv, convd_tenant *tn,
                       char *err, size_t errlen) {
  const char *eq = strchr(kv, '=');
  int which = -1;
  for (int k = 0; eq && k < LIM_COUNT; k++)
    if ((size_t)(eq - kv) == strlen(limit_names[k]) && strncmp(kv, limit_names[k], (size_t)(eq - kv)) == 0)
      which = k;
  if (which < 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s line %d: field %d is not a limit: expected inflight-bytes=SIZE, calls=N, "
                      "weights-bytes=SIZE or shm-bytes=SIZE",
                      path, line, field);
  uint64_t v = 0;
  const char *val = eq + 1;
  if (which == LIM_CALLS) {
    char *end;
    errno = 0;
    unsigned long long n = strtoull(val, &end, 10);
    if (errno || end == val || *end || val[0] == '-' || n < 1)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "%s line %d: calls=N: expected a whole number of at least 1 (leave it out "
                        "for no limit of the tenant's own)",
                        path, line);
    v = n;
  } else if (convd_parse_size(val, &v) || v < 1) {
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s line %d: %s=SIZE: expected a byte size of at least 1 such as 65536, "
                      "512K, 64M or 2G",
                      path, line, limit_names[which]);
  }
  uint64_t *dst = which == LIM_INFLIGHT  ? &tn->limits.inflight_bytes
                  : which == LIM_CALLS   ? &tn->limits.calls
                  : which == LIM_WEIGHTS ? &tn->limits.weights_bytes
                                         : &tn->limits.shm_bytes;
  if (tn->limit_line[which] == line)
    return convd_errf(err, errlen, CONVD_EINVAL, "%s line %d: %s is given twice", path, line,
                      limit_names[which]);
  if (tn->limit_line[which] && *dst != v)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s line %d: %s=%" PRIu64 " differs from the %" PRIu64 " that line %d gives "
                      "the same tenant: a tenant's limit must have one value",
                      path, line, limit_names[which], v, *dst, tn->limit_line[which]);
  *dst = v;
  if (!tn->limit_line[which]) tn->limit_line[which] = line;
  return 0;
}

/* Adds one non-blank, non-comment line (modified in place) to t. */
static int parse_line(table *t, const char *path, int line, char *s, char *err, size_t errlen) {
  char *f[MAX_FIELDS];
  int nf = 0;
  for (char *p = s; *p;) {
    while (*p == ' ' || *p == '\t') *p++ = '\0';
    if (*p == '\0') break;
    if (nf == MAX_FIELDS)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "%s line %d: too many fields: expected TENANT TOKEN [key=value ...]", path, line);
    f[nf++] = p;
    while (*p && *p != ' ' && *p != '\t') p++;
  }
  if (nf < 2)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s line %d: expected TENANT TOKEN [key=value ...] (found %d field)", path, line, nf);
  if (!valid_tenant(f[0]))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s line %d: the tenant name (field 1) must be 1 to %d of A-Z a-z 0-9 _ . -",
                      path, line, CONVD_AUTH_TENANT_MAX);
  const size_t tlen = strlen(f[1]);
  if (tlen < CONVD_AUTH_TOKEN_MIN || tlen > CONVD_AUTH_TOKEN_MAX || !valid_token_chars(f[1], tlen))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "%s line %d: the token (field 2) must be %d to %d printable ASCII characters "
                      "without spaces",
                      path, line, CONVD_AUTH_TOKEN_MIN, CONVD_AUTH_TOKEN_MAX);
  for (size_t i = 0; i < t->n_tokens; i++)
    if (t->tokens[i].len == tlen && memcmp(t->tokens[i].tok, f[1], tlen) == 0)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "%s line %d: the same token is on line %d: every token must be unique",
                        path, line, t->tokens[i].line);
  size_t ti = 0;
  while (ti < t->n_tenants && strcmp(t->tenants[ti].name, f[0]) != 0) ti++;
  if (ti == t->n_tenants) {
    if (grow((void **)&t->tenants, &t->cap_tenants, t->n_tenants, sizeof *t->tenants))
      return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory reading %s", path);
    convd_tenant *tn = &t->tenants[t->n_tenants++];
    memset(tn, 0, sizeof *tn);
    tn->table = t;
    memcpy(tn->name, f[0], strlen(f[0]) + 1);
  }
  for (int k = 2; k < nf; k++) {
    int rc = parse_limit(path, line, k + 1, f[k], &t->tenants[ti], err, errlen);
    if (rc) return rc;
  }
  if (grow((void **)&t->tokens, &t->cap_tokens, t->n_tokens, sizeof *t->tokens))
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory reading %s", path);
  token_entry *e = &t->tokens[t->n_tokens++];
  memset(e, 0, sizeof *e);
  memcpy(e->tok, f[1], tlen);
  e->len = tlen;
  e->tenant = ti;
  e->line = line;
  return 0;
}

/* Reads the whole file, refusing one that others could read or change. *buf is malloc'd. */
static int read_file(const char *path, char **buf, size_t *len, char *err, size_t errlen) {
  *buf = NULL;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return convd_errf(err, errlen, CONVD_EIO, "--auth-tokens %s: cannot open it: %s", path, strerror(errno));
  struct stat st; /* of the open file, so what is checked is what is read */
  int rc = 0;
  if (fstat(fd, &st) != 0) {
    rc = convd_errf(err, errlen, CONVD_EIO, "--auth-tokens %s: %s", path, strerror(errno));
  } else if (!S_ISREG(st.st_mode)) {
    rc = convd_errf(err, errlen, CONVD_EINVAL, "--auth-tokens %s: not a regular file", path);
  } else if (st.st_mode & 077) {
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "--auth-tokens %s: the file is readable or writable by group or others (mode "
                    "%04o) and it holds secrets: run `chmod 600 %s` (convd refuses it otherwise)",
                    path, (unsigned)(st.st_mode & 07777), path);
  } else if ((uint64_t)st.st_size > MAX_FILE_BYTES) {
    rc = convd_errf(err, errlen, CONVD_ELIMIT, "--auth-tokens %s: larger than %u bytes", path,
                    MAX_FILE_BYTES);
  } else if ((*buf = malloc((size_t)st.st_size + 1)) == NULL) {
    rc = convd_errf(err, errlen, CONVD_ENOMEM, "out of memory reading %s", path);
  } else {
    size_t got = 0;
    while (got < (size_t)st.st_size) {
      ssize_t k = read(fd, *buf + got, (size_t)st.st_size - got);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) break;
      got += (size_t)k;
    }
    if (got != (size_t)st.st_size) {
      rc = convd_errf(err, errlen, CONVD_EIO, "--auth-tokens %s: short read", path);
      free(*buf);
      *buf = NULL;
    } else {
      (*buf)[got] = '\0';
      *len = got;
    }
  }
  close(fd);
  return rc;
}

static int parse_file(const char *path, table **out, char *err, size_t errlen) {
  *out = NULL;
  char *text;
  size_t len = 0;
  int rc = read_file(path, &text, &len, err, errlen);
  if (rc) return rc;
  table *t = calloc(1, sizeof *t);
  if (t == NULL) {
    explicit_bzero(text, len);
    free(text);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory reading %s", path);
  }
  atomic_init(&t->refs, 1);
  int line = 0;
  for (char *p = text; rc == 0 && p < text + len;) {
    char *nl = memchr(p, '\n', (size_t)(text + len - p));
    char *end = nl ? nl : text + len;
    line++;
    if (end - p > MAX_LINE) {
      rc = convd_errf(err, errlen, CONVD_EINVAL, "%s line %d: longer than %d characters", path, line, MAX_LINE);
      break;
    }
    if (memchr(p, '\0', (size_t)(end - p)) != NULL) {
      rc = convd_errf(err, errlen, CONVD_EINVAL, "%s line %d: contains a NUL byte", path, line);
      break;
    }
    *end = '\0';
    if (end > p && end[-1] == '\r') end[-1] = '\0';
    char *s = p;
    while (*s == ' ' || *s == '\t') s++;
    if (*s != '\0' && *s != '#') rc = parse_line(t, path, line, s, err, errlen);
    p = end + 1;
  }
  explicit_bzero(text, len);
  free(text);
  if (rc == 0 && t->n_tokens == 0)
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "--auth-tokens %s: no token in the file (expected lines of TENANT TOKEN "
                    "[key=value ...]): every call but health checks would be refused",
                    path);
  if (rc) {
    table_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

int convd_auth_load(const char *path, convd_auth **out, char *err, size_t errlen) {
  *out = NULL;
  if (strlen(path) >= sizeof ((convd_auth *)0)->path)
    return convd_errf(err, errlen, CONVD_EINVAL, "--auth-tokens: the path is too long");
  table *t;
  int rc = parse_file(path, &t, err, errlen);
  if (rc) return rc;
  convd_auth *a = calloc(1, sizeof *a);
  if (a == NULL) {
    table_free(t);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  }
  snprintf(a->path, sizeof a->path, "%s", path);
  pthread_mutex_init(&a->mu, NULL);
  a->cur = t;
  atomic_init(&a->refused, 0);
  atomic_init(&a->last_refusal_log, -1e9);
  *out = a;
  return 0;
}

int convd_auth_reload(convd_auth *a, char *err, size_t errlen) {
  table *t;
  int rc = parse_file(a->path, &t, err, errlen);
  if (rc) return rc;
  pthread_mutex_lock(&a->mu);
  table *old = a->cur;
  a->cur = t;
  pthread_mutex_unlock(&a->mu);
  table_unref(old); /* freed once the last call holding one of its tenants ends */
  return 0;
}

void convd_auth_destroy(convd_auth *a) {
  if (a == NULL) return;
  table_unref(a->cur);
  pthread_mutex_destroy(&a->mu);
  free(a);
}

void convd_auth_counts(convd_auth *a, size_t *tokens, size_t *tenants) {
  table *t = table_get(a);
  *tokens = t->n_tokens;
  *tenants = t->n_tenants;
  table_unref(t);
}

/* ---- checks ------------------------------------------------------------------------------ */

int convd_auth_check(convd_auth *a, const char *token, size_t len, char *tenant) {
  /* Lengths outside the bounds are refused at once: the bounds are public, not the tokens. */
  if (len < CONVD_AUTH_TOKEN_MIN || len > CONVD_AUTH_TOKEN_MAX) return CONVD_ENOTFOUND;
  unsigned char buf[CONVD_AUTH_TOKEN_MAX];
  memset(buf, 0, sizeof buf);
  memcpy(buf, token, len);
  table *t = table_get(a);
  /* Every byte of every token is compared and no branch depends on them; the match (if any)
   * is selected with masks. */
  uint64_t any = 0, idx = 0;
  for (size_t i = 0; i < t->n_tokens; i++) {
    const token_entry *e = &t->tokens[i];
    uint64_t diff = (uint64_t)(e->len ^ len);
    unsigned char acc = 0;
    for (size_t k = 0; k < CONVD_AUTH_TOKEN_MAX; k++) acc |= (unsigned char)(buf[k] ^ e->tok[k]);
    diff |= acc;
    const uint64_t match = ((diff | (0 - diff)) >> 63) - 1; /* all ones when diff == 0 */
    idx = (idx & ~match) | ((uint64_t)e->tenant & match);
    any |= match;
  }
  explicit_bzero(buf, sizeof buf);
  int rc = CONVD_ENOTFOUND;
  if (any) {
    memcpy(tenant, t->tenants[idx].name, sizeof t->tenants[idx].name);
    rc = 0;
  }
  table_unref(t);
  return rc;
}

const convd_tenant *convd_auth_tenant_get(convd_auth *a, const char *name) {
  const convd_tenant *found = NULL;
  pthread_mutex_lock(&a->mu);
  table *t = a->cur;
  for (size_t i = 0; i < t->n_tenants && found == NULL; i++)
    if (strcmp(t->tenants[i].name, name) == 0) found = &t->tenants[i];
  if (found) atomic_fetch_add(&t->refs, 1);
  pthread_mutex_unlock(&a->mu);
  return found;
}

void convd_auth_tenant_put(const convd_tenant *t) {
  if (t) table_unref(t->table);
}

const char *convd_tenant_name(const convd_tenant *t) { return t->name; }
const convd_tenant_limits *convd_tenant_limits_of(const convd_tenant *t) { return &t->limits; }

/* ---- gRPC glue --------------------------------------------------------------------------- */

static int slice_is(grpc_slice s, const char *lit) {
  const size_t n = strlen(lit);
  return GRPC_SLICE_LENGTH(s) == n && memcmp(GRPC_SLICE_START_PTR(s), lit, n) == 0;
}

static void note_refusal(convd_auth *a) {
  atomic_fetch_add(&a->refused_total, 1);
  const uint64_t n = atomic_fetch_add(&a->refused, 1) + 1;
  const double now = convd_now_seconds();
  double last = atomic_load(&a->last_refusal_log);
  if (now - last < REFUSAL_LOG_INTERVAL_S ||
      !atomic_compare_exchange_strong(&a->last_refusal_log, &last, now))
    return;
  atomic_fetch_sub(&a->refused, n);
  convd_log(CONVD_LOG_WARN,
            "msg=\"refused calls with an invalid bearer token (UNAUTHENTICATED)\" count=%" PRIu64
            " interval_s=%g",
            n, REFUSAL_LOG_INTERVAL_S);
}

/* The tenant of the call's `authorization: Bearer TOKEN` header among md[0..n): 1 with its name
 * in tenant, 0 when the call has no such header, -1 when it has a wrong one (or several). */
static int bearer_tenant(convd_auth *a, const grpc_metadata *md, size_t n, char *tenant) {
  const grpc_metadata *authz = NULL;
  int count = 0;
  for (size_t i = 0; i < n; i++)
    if (slice_is(md[i].key, "authorization")) authz = &md[i], count++;
  if (count == 0) return 0;
  const unsigned char *v = GRPC_SLICE_START_PTR(authz->value);
  size_t vn = GRPC_SLICE_LENGTH(authz->value);
  /* RFC 6750: the scheme is case-insensitive; one or more spaces before the token. */
  if (count == 1 && vn > 7 && strncasecmp((const char *)v, "bearer ", 7) == 0) {
    size_t i = 7;
    while (i < vn && v[i] == ' ') i++;
    size_t end = vn;
    while (end > i && v[end - 1] == ' ') end--;
    if (convd_auth_check(a, (const char *)v + i, end - i, tenant) == 0) return 1;
  }
  return -1;
}

/* gRPC thread, before the call is delivered: cb runs exactly once, before this returns.
 * Refuses a wrong token before the call is delivered. It marks nothing on the auth context: in
 * gRPC 1.51 that context is the connection's, shared by every call on it, so a property added
 * for one call's token is seen by the next call's (another tenant's) lookup. Dispatch reads
 * the call's own header again instead (convd_auth_call_tenant). */
static void process(void *state, grpc_auth_context *ctx, const grpc_metadata *md, size_t n,
                    grpc_process_auth_metadata_done_cb cb, void *user) {
  (void)ctx;
  char tenant[CONVD_AUTH_TENANT_MAX + 1];
  if (bearer_tenant(state, md, n, tenant) < 0) {
    note_refusal(state);
    cb(user, NULL, 0, NULL, 0, GRPC_STATUS_UNAUTHENTICATED, CONVD_AUTH_REFUSED);
    return;
  }
  /* No token: whether the method needs one is dispatch's decision (see auth.h). */
  cb(user, NULL, 0, NULL, 0, GRPC_STATUS_OK, NULL);
}

static void processor_destroy(void *state) { (void)state; /* convd_auth_destroy owns it */ }

void convd_auth_attach(convd_auth *a, grpc_server_credentials *creds) {
  grpc_auth_metadata_processor p = {process, processor_destroy, a};
  grpc_server_credentials_set_auth_metadata_processor(creds, p);
}

const convd_tenant *convd_auth_call_tenant(convd_auth *a, const grpc_metadata_array *md) {
  char tenant[CONVD_AUTH_TENANT_MAX + 1];
  /* A reload between the processor and here may have removed the token or its tenant: NULL. */
  return bearer_tenant(a, md->metadata, md->count, tenant) == 1 ? convd_auth_tenant_get(a, tenant) : NULL;
}

uint64_t convd_auth_refused_total(convd_auth *a) { return a ? atomic_load(&a->refused_total) : 0; }
