/* Shared-memory regions (RegisterRegion): POSIX shared-memory objects that same-host clients
 * create and name, mapped once by the daemon and used by calls as tensors' storage.
 *
 * The safety choice. A client owns its object and can shrink it (ftruncate), unlink it or
 * rewrite it at any moment, and a page the object no longer has raises SIGBUS in whoever
 * touches it. So nothing but this module touches a region's memory, and only through
 * convd_shm_read / convd_shm_write: copies on the calling thread under a SIGBUS guard (a
 * thread-local jump buffer the handler returns to when the fault lies in a mapped region), which
 * turn a vanished page into CONVD_EDATALOSS for that call alone. Engine kernels never see a
 * region (a fault inside oneDNN or a CUDA copy could not be recovered), so input rows are copied
 * once into the call's bands and output rows once out of the job's: one copy each way instead of
 * the socket's several, and the region's contents are read exactly once, so a client rewriting
 * them mid-call changes only its own answer. Unlinking is harmless (the mapping stays).
 *
 * In place: a memfd sealed with F_SEAL_SHRINK cannot lose a page while it lives, so a fault on
 * it can only allocate (tmpfs fills a hole on touch). Such a region, passed as a descriptor
 * (fdsock.h; gRPC cannot carry one) and registered with its ticket, may be handed to the engine
 * as the call's float32 input and output buffers (convd_shm_in_place). Only memfds on tmpfs with
 * every page allocated are taken: a hugetlb memfd can SIGBUS when the pool runs out, other files
 * do not seal, and holes would be filled by the daemon's touch, charged to it. A client can
 * still punch holes later (fallocate PUNCH_HOLE): the daemon's next touch refills them, charged
 * to the daemon (bounded per region by its size, not over many regions: a known limit), and
 * under vm.overcommit_memory = 2 such a refill can fail as a SIGBUS, so there regions are never
 * used in place (copied through the guarded path instead).
 * Every range is checked (offset + length within the mapped size, overflow-checked) when a call
 * acquires it; the mapped size is fixed at registration, checked against the object's size
 * then, and writes never go past the range, whatever the object's size becomes.
 *
 * Names are "/" then 1-200 of [A-Za-z0-9._-], not "/." or "/..": shm_open's own namespace
 * (/dev/shm), no path separators; and they start with "/convd-" ("/convd-TENANT-" with
 * tenants, convd_shm_prefix), so no client can make the daemon open another program's object
 * or another tenant's, even one whose name it sees in /dev/shm. The object is opened with the daemon's own permissions
 * (O_NOFOLLOW): a client can only register what the daemon's user may open, and regions belong
 * to the registering tenant. Bounded by --max-shm-bytes over all tenants and a tenant's own
 * shm-bytes limit. A region in use by a call cannot be unregistered (CONVD_EBUSY).
 *
 * Threads: any; one mutex guards the table; copies take no lock (a call's acquire holds the
 * region alive). */
#ifndef CONVD_SHM_H
#define CONVD_SHM_H

#include <stddef.h>
#include <stdint.h>

#define CONVD_SHM_NAME_MAX 201 /* characters, the leading '/' included */

typedef struct convd_shm convd_shm;
typedef struct convd_shm_region convd_shm_region;

/* A call's hold on bytes [offset, offset + length) of a region. */
typedef struct convd_shm_range {
  convd_shm_region *region; /* NULL: none */
  uint64_t offset, length;
  int writable;
  int counted; /* this range counts its call in the region's in_use */
} convd_shm_range;

typedef struct convd_shm_info {
  char name[CONVD_SHM_NAME_MAX + 1];
  uint64_t size;
  unsigned in_use;
  int in_place;
} convd_shm_info;

/* Descriptors waiting for their RegisterRegion: at most this many over all clients, this many
 * of one user id, each for this long. */
#define CONVD_SHM_PENDING_MAX 64
#define CONVD_SHM_PENDING_PER_UID 16
#define CONVD_SHM_TICKET_SECONDS 60
#define CONVD_SHM_TICKET_LEN 32 /* hex digits */

/* The table, bounded by max_bytes of mappings over all tenants. Installs the SIGBUS handler
 * (once per process; a fault outside a guarded copy still ends the process as it would have). */
int convd_shm_create(uint64_t max_bytes, convd_shm **out, char *err, size_t errlen);
/* Unmaps everything; no call may hold a range. NULL is a no-op. */
void convd_shm_destroy(convd_shm *s);

/* The prefix the tenant's region names must have ("/convd-" or "/convd-TENANT-"). */
void convd_shm_prefix(const char *tenant, char *buf, size_t len);

/* 0 when name is a valid region name, else CONVD_EINVAL with the reason. */
int convd_shm_check_name(const char *name, char *err, size_t errlen);

/* Takes fd, a descriptor a client passed (user id uid): checks that it is a memfd sealed
 * against shrinking and keeps it under a fresh ticket (CONVD_SHM_TICKET_LEN hex digits and a
 * NUL into ticket) until a RegisterRegion names it or CONVD_SHM_TICKET_SECONDS pass. *size gets
 * its size, *writable whether the daemon can write it. On success fd is the module's; on error
 * the caller's, to close (fdsock.c closes a refused one off its thread: closing a FUSE file can
 * block). CONVD_EINVAL with the reason for a descriptor it refuses, CONVD_ELIMIT when too many
 * wait. */
int convd_shm_stash_fd(convd_shm *s, int fd, unsigned uid, char *ticket, uint64_t *size,
                       int *writable, char *err, size_t errlen);
/* Closes descriptors whose ticket expired; returns how many still wait. */
unsigned convd_shm_expire(convd_shm *s);

/* Opens and maps the tenant's object `name`: size bytes from its start (0 = all of it); no page
 * is touched (run off the completion-queue thread all the same: it is file-system work).
 * ticket non-NULL: maps the descriptor stashed under it instead, and name only names the
 * region. tenant NULL = no tenants; tenant_limit 0 = none of its own. Registering a name the
 * tenant already has is an error (unregister first). *mapped gets the size mapped, *in_place
 * (may be NULL) whether calls may use the region where it lies. */
int convd_shm_register(convd_shm *s, const char *tenant, uint64_t tenant_limit, const char *name,
                       const char *ticket, uint64_t size, uint64_t *mapped, int *in_place,
                       char *err, size_t errlen);
/* CONVD_ENOTFOUND when the tenant has no such region, CONVD_EBUSY while a call uses it. */
int convd_shm_unregister(convd_shm *s, const char *tenant, const char *name, char *err,
                         size_t errlen);
/* The tenant's regions into a malloc'd array (*out, count returned; -1 out of memory) and its
 * mapped bytes. */
long convd_shm_list(convd_shm *s, const char *tenant, convd_shm_info **out, uint64_t *used);
/* Over all tenants (metrics): regions, bytes mapped, regions used in place, and descriptors
 * waiting for their RegisterRegion. */
void convd_shm_totals(convd_shm *s, uint64_t *regions, uint64_t *bytes, uint64_t *in_place, uint64_t *pending);

/* A call's range: the region must be the tenant's, and [offset, offset + length) inside its
 * mapped size; writable asks for a region the daemon could open for writing. The region stays
 * mapped and registered until convd_shm_release. what names the range in errors
 * ("spec.input_region"). same_call: the call holds another range of this region already, so
 * in_use (calls) stays as it is. */
int convd_shm_acquire(convd_shm *s, const char *tenant, const char *name, uint64_t offset,
                      uint64_t length, int writable, int same_call, const char *what,
                      convd_shm_range *out, char *err, size_t errlen);
void convd_shm_release(convd_shm *s, convd_shm_range *r); /* a range without region: no-op */
/* A held region's name. */
const char *convd_shm_region_name(const convd_shm_region *g);
/* The range's first byte when the engine may use it where it lies (a sealed memfd, mapped for
 * writing when the range is writable), else NULL. Valid until convd_shm_release. */
void *convd_shm_in_place(const convd_shm_range *r);

/* Fault-safe copies between the range's bytes from off and daemon floats: count elements of
 * the engine dtype `dtype` (dtype.h: widened on read, rounded on write), or with dtype -1
 * count raw bytes (dst/src then any memory). 0, or CONVD_EDATALOSS
 * when the client's object lost pages under them (it was shrunk), or CONVD_ERANGE when the
 * bytes leave the range. */
int convd_shm_read(const convd_shm_range *r, uint64_t off, int dtype, float *dst, size_t count,
                   char *err, size_t errlen);
int convd_shm_write(const convd_shm_range *r, uint64_t off, int dtype, const float *src,
                    size_t count, char *err, size_t errlen);

/* 1 when two ranges share a byte of the same region. */
int convd_shm_overlap(const convd_shm_range *a, const convd_shm_range *b);

#endif
