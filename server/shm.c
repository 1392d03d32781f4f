/* See shm.h. Threads: any; `mu` guards the table and every region's in_use; the SIGBUS guard
 * is per thread. */
#define _GNU_SOURCE
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "clock.h"
#include "dtype.h"
#include "err.h"

struct convd_shm_region {
  char tenant[72]; /* "" without tenants */
  char name[CONVD_SHM_NAME_MAX + 1];
  uint8_t *base;
  uint64_t size;
  int writable;
  int sealed;      /* a memfd that cannot shrink: the engine may use it in place */
  unsigned in_use; /* calls holding a range of it */
  unsigned holds;  /* ranges held (a call may hold several) */
  convd_shm_region *next;
};

/* A descriptor the descriptor socket took, until its RegisterRegion. */
typedef struct pending_fd {
  char ticket[CONVD_SHM_TICKET_LEN + 1];
  int fd; /* -1: a free slot */
  unsigned uid;
  uint64_t size;
  int writable;
  int in_place; /* not under strict overcommit (see stash) */
  double expires;
} pending_fd;

struct convd_shm {
  pthread_mutex_t mu;
  convd_shm_region *head;
  uint64_t max_bytes, bytes, count;
  pending_fd pending[CONVD_SHM_PENDING_MAX];
};

/* ---- the SIGBUS guard --------------------------------------------------------------------- */

/* The guarded copy in progress on this thread: where the handler returns to, and the bytes a
 * fault must lie in to be the copy's (anything else is a real crash and stays one). */
static _Thread_local sigjmp_buf *guard_jb;
static _Thread_local const uint8_t *guard_lo, *guard_hi;
static struct sigaction prev_bus;
static pthread_once_t handler_once = PTHREAD_ONCE_INIT;
static int handler_rc;

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  const uint8_t *a = si->si_addr;
  if (guard_jb != NULL && a >= guard_lo && a < guard_hi) siglongjmp(*guard_jb, 1);
  /* Not a guarded copy's: whoever handled SIGBUS before, or the default action, which the
   * faulting instruction meets again as this handler returns. */
  if ((prev_bus.sa_flags & SA_SIGINFO) && prev_bus.sa_sigaction) {
    prev_bus.sa_sigaction(sig, si, uc);
  } else if (!(prev_bus.sa_flags & SA_SIGINFO) && prev_bus.sa_handler != SIG_DFL &&
             prev_bus.sa_handler != SIG_IGN) {
    prev_bus.sa_handler(sig);
  } else {
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &dfl, NULL);
  }
}

static void install_handler(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  handler_rc = sigaction(SIGBUS, &sa, &prev_bus);
}

typedef struct copy_job {
  int dtype, to_region;
  uint8_t *region_bytes;
  float *floats;
  size_t count;
} copy_job;

/* Runs the copy with the guard set over [lo, hi); 1 when a fault ended it. Nothing it runs
 * takes a lock or allocates, so leaving it half-way by the jump leaves nothing held. */
static int guarded_copy(const uint8_t *lo, const uint8_t *hi, const copy_job *j) {
  sigjmp_buf jb;
  /* No signal mask saved (a system call each time, and copies go row by row). The handler is
   * installed with SA_NODEFER, but whoever wraps it (ThreadSanitizer does) may run it with
   * SIGBUS blocked, and a thread that faults again with it blocked is killed: so it is
   * unblocked here, on the fault's path only. */
  if (sigsetjmp(jb, 0) != 0) {
    guard_jb = NULL;
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
    return 1;
  }
  guard_lo = lo, guard_hi = hi;
  guard_jb = &jb;
  if (j->dtype < 0) /* raw bytes */
    j->to_region ? memcpy(j->region_bytes, j->floats, j->count) : memcpy(j->floats, j->region_bytes, j->count);
  else if (j->to_region)
    convd_dtype_encode(j->dtype, j->floats, j->region_bytes, j->count);
  else
    convd_dtype_decode(j->dtype, j->region_bytes, j->floats, j->count);
  guard_jb = NULL;
  return 0;
}

static int copy(const convd_shm_range *r, uint64_t off, int dtype, float *floats, size_t count,
                int to_region, char *err, size_t errlen) {
  const uint64_t esz = dtype < 0 ? 1 : convd_dtype_size(dtype);
  if (r->region == NULL || count > UINT64_MAX / esz || off > r->length ||
      count * esz > r->length - off)
    return convd_errf(err, errlen, CONVD_ERANGE,
                      "internal: a copy of %zu elements at byte %" PRIu64 " leaves the %" PRIu64 "-byte range",
                      count, off, r->length);
  if (to_region && !r->writable)
    return convd_errf(err, errlen, CONVD_EINVAL, "shared-memory region %s is read-only for the daemon",
                      r->region->name);
  copy_job j = {dtype, to_region, r->region->base + r->offset + off, floats, count};
  if (guarded_copy(r->region->base, r->region->base + r->region->size, &j))
    return convd_errf(err, errlen, CONVD_EDATALOSS,
                      "shared-memory region %s lost its pages during the call (the object was shrunk "
                      "below the %" PRIu64 " bytes registered): the call's data are gone; keep the "
                      "object's size while a call uses it",
                      r->region->name, r->region->size);
  return 0;
}

int convd_shm_read(const convd_shm_range *r, uint64_t off, int dtype, float *dst, size_t count,
                   char *err, size_t errlen) {
  return copy(r, off, dtype, dst, count, 0, err, errlen);
}

int convd_shm_write(const convd_shm_range *r, uint64_t off, int dtype, const float *src,
                    size_t count, char *err, size_t errlen) {
  return copy(r, off, dtype, (float *)src, count, 1, err, errlen);
}

/* ---- the table ---------------------------------------------------------------------------- */

int convd_shm_create(uint64_t max_bytes, convd_shm **out, char *err, size_t errlen) {
  *out = NULL;
  pthread_once(&handler_once, install_handler);
  if (handler_rc != 0)
    return convd_errf(err, errlen, CONVD_EINTERNAL, "cannot install the SIGBUS handler: %s", strerror(errno));
  convd_shm *s = calloc(1, sizeof *s);
  if (s == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  pthread_mutex_init(&s->mu, NULL);
  s->max_bytes = max_bytes;
  for (int i = 0; i < CONVD_SHM_PENDING_MAX; i++) s->pending[i].fd = -1;
  *out = s;
  return 0;
}

void convd_shm_destroy(convd_shm *s) {
  if (s == NULL) return;
  for (convd_shm_region *g = s->head, *next; g; g = next) {
    next = g->next;
    munmap(g->base, g->size);
    free(g);
  }
  for (int i = 0; i < CONVD_SHM_PENDING_MAX; i++)
    if (s->pending[i].fd >= 0) close(s->pending[i].fd);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

static const char *tkey(const char *tenant) { return tenant ? tenant : ""; }

void convd_shm_prefix(const char *tenant, char *buf, size_t len) {
  snprintf(buf, len, "/convd-%s%s", tkey(tenant), tenant ? "-" : "");
}

int convd_shm_check_name(const char *name, char *err, size_t errlen) {
  const size_t n = strlen(name);
  if (n < 2 || name[0] != '/' || n > CONVD_SHM_NAME_MAX)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "region name \"%.40s%s\": expected \"/\" then 1 to %d characters, as shm_open takes it",
                      name, n > 40 ? "..." : "", CONVD_SHM_NAME_MAX - 1);
  for (size_t i = 1; i < n; i++) {
    const char ch = name[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
          ch == '.' || ch == '_' || ch == '-'))
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "region name: character %zu (byte 0x%02x) is not one of A-Z a-z 0-9 . _ - "
                        "(no path separators)", i, (unsigned char)ch);
  }
  if (strcmp(name, "/.") == 0 || strcmp(name, "/..") == 0)
    return convd_errf(err, errlen, CONVD_EINVAL, "region name \"%s\" is not an object's name", name);
  return 0;
}


static convd_shm_region *find(convd_shm *s, const char *tenant, const char *name) {
  for (convd_shm_region *g = s->head; g; g = g->next)
    if (strcmp(g->tenant, tkey(tenant)) == 0 && strcmp(g->name, name) == 0) return g;
  return NULL;
}

static uint64_t tenant_bytes(convd_shm *s, const char *tenant) {
  uint64_t b = 0;
  for (convd_shm_region *g = s->head; g; g = g->next)
    if (strcmp(g->tenant, tkey(tenant)) == 0) b += g->size;
  return b;
}

/* Maps size bytes (0 = all) of the open object fd, st its status (s->mu held: the limits were
 * checked against the table as it is). */
static int map_fd(int fd, const struct stat *st, const char *name, uint64_t want, uint8_t **base,
                  uint64_t *size, int writable, char *err, size_t errlen) {
  if (want > (uint64_t)st->st_size)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "shared-memory object %s has %lld bytes, fewer than the %" PRIu64 " to register",
                      name, (long long)st->st_size, want);
  *size = want ? want : (uint64_t)st->st_size;
  if (*size > SIZE_MAX)
    return convd_errf(err, errlen, CONVD_ERANGE, "shared-memory object %s is too large to map", name);
  /* Not MAP_POPULATE, though a fresh region's first call pays each page's first touch
   * (1.4-1.7x slower, measured): populating a sparse object (ftruncate alone) would make the
   * daemon allocate all of it, charged to its own memory, at one RegisterRegion. Pages are
   * touched only as calls use the ranges they name. */
  void *p = mmap(NULL, (size_t)*size, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    return convd_errf(err, errlen, errno == ENOMEM ? CONVD_ENOMEM : CONVD_EIO,
                      "cannot map shared-memory object %s (%" PRIu64 " bytes): %s", name, *size, strerror(errno));
  *base = p;
  return 0;
}

/* Opens, checks and maps the named object (s->mu held). */
static int map_object(const char *name, uint64_t want, uint8_t **base, uint64_t *size,
                      int *writable, char *err, size_t errlen) {
  *writable = 1;
  int fd = shm_open(name, O_RDWR, 0); /* glibc adds O_NOFOLLOW and O_CLOEXEC */
  if (fd < 0 && errno == EACCES) {
    *writable = 0;
    fd = shm_open(name, O_RDONLY, 0);
  }
  if (fd < 0) {
    const int e = errno;
    if (e == ENOENT)
      return convd_errf(err, errlen, CONVD_ENOTFOUND,
                        "no shared-memory object %s on the daemon's host: create it (shm_open) before "
                        "registering it; clients on other machines cannot use shared memory", name);
    return convd_errf(err, errlen, e == EACCES ? CONVD_EINVAL : CONVD_EIO,
                      "cannot open shared-memory object %s: %s%s", name, strerror(e),
                      e == EACCES ? " (give the daemon's user or group read and write permission)" : "");
  }
  struct stat st;
  int rc = 0;
  if (fstat(fd, &st) != 0)
    rc = convd_errf(err, errlen, CONVD_EIO, "cannot stat shared-memory object %s: %s", name, strerror(errno));
  else if (!S_ISREG(st.st_mode))
    rc = convd_errf(err, errlen, CONVD_EINVAL, "%s is not a shared-memory object", name);
  else if (st.st_size <= 0)
    rc = convd_errf(err, errlen, CONVD_EINVAL, "shared-memory object %s is empty: size it (ftruncate) first", name);
  else
    rc = map_fd(fd, &st, name, want, base, size, *writable, err, errlen);
  close(fd); /* the mapping keeps the object */
  return rc;
}

/* ---- descriptors passed by clients -------------------------------------------------------- */

static int hex_ticket(char *out) {
  uint8_t rnd[CONVD_SHM_TICKET_LEN / 2];
  for (size_t got = 0; got < sizeof rnd;) {
    const ssize_t k = getrandom(rnd + got, sizeof rnd - got, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    got += (size_t)k;
  }
  for (size_t i = 0; i < sizeof rnd; i++) snprintf(out + 2 * i, 3, "%02x", rnd[i]);
  return 0;
}

/* Why fd cannot be a region used in place, or 0 (and its size and writability). */
static int check_memfd(int fd, uint64_t *size, int *writable, char *err, size_t errlen) {
  struct stat st;
  struct statfs sf;
  /* First what touches no file system: anything but shmem and hugetlbfs fails it, so a
   * descriptor of a FUSE or network file (whose fstat could block this thread on its server)
   * is refused before it is looked at. */
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "the descriptor is not a memfd (memfd_create, without MFD_HUGETLB: hugetlb pages "
                      "can run out under a mapping)");
  if (fstat(fd, &st) != 0 || fstatfs(fd, &sf) != 0)
    return convd_errf(err, errlen, CONVD_EINVAL, "the descriptor cannot be inspected: %s", strerror(errno));
  if (!S_ISREG(st.st_mode) || sf.f_type != TMPFS_MAGIC)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "the descriptor is not a memfd (memfd_create, without MFD_HUGETLB: hugetlb pages "
                      "can run out under a mapping)");
  if (!(seals & F_SEAL_SHRINK))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "the memfd is not sealed against shrinking: create it with MFD_ALLOW_SEALING, size "
                      "it, then fcntl(F_ADD_SEALS, F_SEAL_SHRINK)");
  if (st.st_size <= 0)
    return convd_errf(err, errlen, CONVD_EINVAL, "the memfd is empty: size it before sealing it");
  /* Its pages allocated, by the client and charged to it: a hole the daemon's touch had to fill
   * would be charged to the daemon, and could fail (SIGBUS) under strict overcommit. */
  if ((uint64_t)st.st_blocks * 512 < (uint64_t)st.st_size)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "the memfd has unallocated pages (%lld of %lld bytes allocated): allocate them before "
                      "passing it (posix_fallocate over its whole size)",
                      (long long)st.st_blocks * 512, (long long)st.st_size);
  const int mode = fcntl(fd, F_GETFL) & O_ACCMODE;
  if (mode == O_WRONLY) return convd_errf(err, errlen, CONVD_EINVAL, "the descriptor is open write-only");
  *size = (uint64_t)st.st_size;
  *writable = mode == O_RDWR && !(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE));
  return 0;
}

static void expire_locked(convd_shm *s, double now) {
  for (int i = 0; i < CONVD_SHM_PENDING_MAX; i++) {
    pending_fd *p = &s->pending[i];
    if (p->fd >= 0 && p->expires <= now) close(p->fd), p->fd = -1;
  }
}

unsigned convd_shm_expire(convd_shm *s) {
  pthread_mutex_lock(&s->mu);
  expire_locked(s, convd_now_seconds());
  unsigned n = 0;
  for (int i = 0; i < CONVD_SHM_PENDING_MAX; i++) n += s->pending[i].fd >= 0;
  pthread_mutex_unlock(&s->mu);
  return n;
}

/* vm.overcommit_memory = 2: a page a client punched out of its memfd, refilled by the daemon's
 * touch, is charged against the commit limit, and past it the fault is a SIGBUS no guard
 * catches inside the engine. Regions are then copied through the guarded path, not used in
 * place. */
static int strict_overcommit(void) {
  FILE *f = fopen("/proc/sys/vm/overcommit_memory", "r");
  int mode = 0;
  if (f) {
    if (fscanf(f, "%d", &mode) != 1) mode = 0;
    fclose(f);
  }
  return mode == 2;
}

int convd_shm_stash_fd(convd_shm *s, int fd, unsigned uid, char *ticket, uint64_t *size,
                       int *writable, char *err, size_t errlen) {
  int rc = check_memfd(fd, size, writable, err, errlen);
  if (rc) return rc; /* the caller closes it */
  const int in_place = !strict_overcommit();
  pthread_mutex_lock(&s->mu);
  const double now = convd_now_seconds();
  expire_locked(s, now);
  int slot = -1;
  unsigned mine = 0;
  for (int i = 0; i < CONVD_SHM_PENDING_MAX; i++) {
    if (s->pending[i].fd < 0 && slot < 0) slot = i;
    mine += s->pending[i].fd >= 0 && s->pending[i].uid == uid;
  }
  if (slot < 0 || mine >= CONVD_SHM_PENDING_PER_UID)
    rc = convd_errf(err, errlen, CONVD_ELIMIT,
                    "%s descriptors wait for their RegisterRegion already: register or let them expire "
                    "(%d s) first", slot < 0 ? "too many" : "this user's", CONVD_SHM_TICKET_SECONDS);
  else if (hex_ticket(s->pending[slot].ticket) != 0)
    rc = convd_errf(err, errlen, CONVD_EINTERNAL, "getrandom: %s", strerror(errno));
  if (rc == 0) {
    pending_fd *p = &s->pending[slot];
    p->fd = fd, p->uid = uid, p->size = *size, p->writable = *writable;
    p->in_place = in_place;
    p->expires = now + CONVD_SHM_TICKET_SECONDS;
    snprintf(ticket, CONVD_SHM_TICKET_LEN + 1, "%s", p->ticket);
  }
  pthread_mutex_unlock(&s->mu);
  return rc;
}

/* The descriptor stashed under ticket, taken out of the table (s->mu held), or -1. */
static int take_ticket(convd_shm *s, const char *ticket, int *writable, int *in_place) {
  expire_locked(s, convd_now_seconds());
  if (strlen(ticket) != CONVD_SHM_TICKET_LEN) return -1;
  for (int i = 0; i < CONVD_SHM_PENDING_MAX; i++) {
    pending_fd *p = &s->pending[i];
    if (p->fd < 0) continue;
    unsigned char diff = 0; /* all digits compared: the time says nothing about a near miss */
    for (int k = 0; k < CONVD_SHM_TICKET_LEN; k++) diff |= (unsigned char)(p->ticket[k] ^ ticket[k]);
    if (diff == 0) {
      const int fd = p->fd;
      *writable = p->writable;
      *in_place = p->in_place;
      p->fd = -1;
      return fd;
    }
  }
  return -1;
}

/* Maps the stashed descriptor (s->mu held). */
static int map_ticket(convd_shm *s, const char *ticket, const char *name, uint64_t want,
                      uint8_t **base, uint64_t *size, int *writable, int *in_place, char *err, size_t errlen) {
  const int fd = take_ticket(s, ticket, writable, in_place);
  if (fd < 0)
    return convd_errf(err, errlen, CONVD_ENOTFOUND,
                      "fd_ticket: no descriptor waits under this ticket (each is good once, for %d s, "
                      "from the descriptor socket's answer)", CONVD_SHM_TICKET_SECONDS);
  struct stat st;
  int rc = fstat(fd, &st) != 0 ? convd_errf(err, errlen, CONVD_EIO, "fstat: %s", strerror(errno))
                               : map_fd(fd, &st, name, want, base, size, *writable, err, errlen);
  close(fd);
  return rc;
}

int convd_shm_register(convd_shm *s, const char *tenant, uint64_t tenant_limit, const char *name,
                       const char *ticket, uint64_t size, uint64_t *mapped, int *in_place,
                       char *err, size_t errlen) {
  int rc = convd_shm_check_name(name, err, errlen);
  if (rc) return rc;
  char prefix[96];
  convd_shm_prefix(tenant, prefix, sizeof prefix);
  if (strncmp(name, prefix, strlen(prefix)) != 0 || strlen(name) == strlen(prefix))
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "region name %s: this caller's names must start with \"%s\" and go on (e.g. "
                      "%sjob-3f9a1c); ListRegions' name_prefix says so", name, prefix, prefix);
  convd_shm_region *g = calloc(1, sizeof *g);
  if (g == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory");
  snprintf(g->tenant, sizeof g->tenant, "%s", tkey(tenant));
  snprintf(g->name, sizeof g->name, "%s", name);
  pthread_mutex_lock(&s->mu);
  if (find(s, tenant, name)) {
    rc = convd_errf(err, errlen, CONVD_EINVAL, "region %s is registered already: unregister it first", name);
  } else if ((rc = ticket ? map_ticket(s, ticket, name, size, &g->base, &g->size, &g->writable, &g->sealed, err,
                                       errlen)
                          : map_object(name, size, &g->base, &g->size, &g->writable, err, errlen)) == 0) {
    const uint64_t own = tenant_bytes(s, tenant);
    if (g->size > s->max_bytes - s->bytes)
      rc = convd_errf(err, errlen, CONVD_ELIMIT,
                      "registering %" PRIu64 " bytes of shared memory would go over the daemon's "
                      "limit of %" PRIu64 " (--max-shm-bytes; %" PRIu64 " mapped now)",
                      g->size, s->max_bytes, s->bytes);
    else if (tenant_limit && g->size > (tenant_limit > own ? tenant_limit - own : 0))
      rc = convd_errf(err, errlen, CONVD_ELIMIT,
                      "registering %" PRIu64 " bytes of shared memory would go over this tenant's "
                      "limit of %" PRIu64 " (shm-bytes in the tokens file; %" PRIu64 " registered)",
                      g->size, tenant_limit, own);
    if (rc) munmap(g->base, g->size);
  }
  if (rc == 0) {
    g->next = s->head;
    s->head = g;
    s->bytes += g->size;
    s->count++;
    *mapped = g->size;
    if (in_place) *in_place = g->sealed;
  }
  pthread_mutex_unlock(&s->mu);
  if (rc) free(g);
  return rc;
}

int convd_shm_unregister(convd_shm *s, const char *tenant, const char *name, char *err,
                         size_t errlen) {
  pthread_mutex_lock(&s->mu);
  convd_shm_region **pp = &s->head;
  while (*pp && !(strcmp((*pp)->tenant, tkey(tenant)) == 0 && strcmp((*pp)->name, name) == 0))
    pp = &(*pp)->next;
  convd_shm_region *g = *pp;
  int rc = 0;
  if (g == NULL)
    rc = convd_errf(err, errlen, CONVD_ENOTFOUND, "no region %.*s is registered", CONVD_SHM_NAME_MAX, name);
  else if (g->holds)
    rc = convd_errf(err, errlen, CONVD_EBUSY,
                    "region %s is used by %u call%s in progress: unregister it once they end",
                    g->name, g->in_use, g->in_use == 1 ? "" : "s");
  if (rc == 0) {
    *pp = g->next;
    s->bytes -= g->size;
    s->count--;
  }
  pthread_mutex_unlock(&s->mu);
  if (rc == 0) {
    munmap(g->base, g->size);
    free(g);
  }
  return rc;
}

long convd_shm_list(convd_shm *s, const char *tenant, convd_shm_info **out, uint64_t *used) {
  pthread_mutex_lock(&s->mu);
  size_t n = 0;
  for (convd_shm_region *g = s->head; g; g = g->next) n += strcmp(g->tenant, tkey(tenant)) == 0;
  convd_shm_info *v = calloc(n ? n : 1, sizeof *v);
  long count = v ? (long)n : -1;
  *used = 0;
  size_t i = 0;
  for (convd_shm_region *g = s->head; g && v; g = g->next) {
    if (strcmp(g->tenant, tkey(tenant)) != 0) continue;
    snprintf(v[i].name, sizeof v[i].name, "%s", g->name);
    v[i].size = g->size;
    v[i].in_use = g->in_use;
    v[i].in_place = g->sealed;
    *used += g->size;
    i++;
  }
  pthread_mutex_unlock(&s->mu);
  *out = v;
  return count;
}

void convd_shm_totals(convd_shm *s, uint64_t *regions, uint64_t *bytes, uint64_t *in_place, uint64_t *pending) {
  pthread_mutex_lock(&s->mu);
  *regions = s->count;
  *bytes = s->bytes;
  *in_place = *pending = 0;
  for (const convd_shm_region *g = s->head; g; g = g->next) *in_place += g->sealed != 0;
  for (int i = 0; i < CONVD_SHM_PENDING_MAX; i++) *pending += s->pending[i].fd >= 0;
  pthread_mutex_unlock(&s->mu);
}

int convd_shm_acquire(convd_shm *s, const char *tenant, const char *name, uint64_t offset,
                      uint64_t length, int writable, int same_call, const char *what,
                      convd_shm_range *out, char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  int rc = convd_shm_check_name(name, err, errlen);
  if (rc) return rc;
  pthread_mutex_lock(&s->mu);
  convd_shm_region *g = find(s, tenant, name);
  if (g == NULL)
    rc = convd_errf(err, errlen, CONVD_ENOTFOUND, "%s: no region %s is registered (RegisterRegion first)",
                    what, name);
  else if (offset > g->size || length > g->size - offset)
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "%s: bytes [%" PRIu64 ", %" PRIu64 "+%" PRIu64 ") leave region %s, which has %" PRIu64 " bytes",
                    what, offset, offset, length, name, g->size);
  else if (writable && !g->writable)
    rc = convd_errf(err, errlen, CONVD_EINVAL,
                    "%s: region %s is read-only for the daemon (its user cannot open the object for "
                    "writing), so it cannot hold output", what, name);
  if (rc == 0) {
    g->holds++;
    g->in_use += !same_call;
    *out = (convd_shm_range){g, offset, length, g->writable, !same_call};
  }
  pthread_mutex_unlock(&s->mu);
  return rc;
}

void convd_shm_release(convd_shm *s, convd_shm_range *r) {
  if (r->region == NULL) return;
  pthread_mutex_lock(&s->mu);
  r->region->holds--;
  r->region->in_use -= r->counted;
  pthread_mutex_unlock(&s->mu);
  r->region = NULL;
}

const char *convd_shm_region_name(const convd_shm_region *g) { return g->name; }

void *convd_shm_in_place(const convd_shm_range *r) {
  const convd_shm_region *g = r->region;
  if (g == NULL || !g->sealed || (r->writable && !g->writable)) return NULL;
  return g->base + r->offset;
}

int convd_shm_overlap(const convd_shm_range *a, const convd_shm_range *b) {
  if (a->region == NULL || a->region != b->region || a->length == 0 || b->length == 0) return 0;
  return a->offset < b->offset + b->length && b->offset < a->offset + a->length;
}
