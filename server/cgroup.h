/* The memory and CPUs this process may use: the machine's, lowered by the limits of its cgroup
 * (cgroup v2 memory.max and cpu.max; cgroup v1 memory.limit_in_bytes and cpu.cfs_quota_us /
 * cpu.cfs_period_us), so that in a container or a pod the defaults of --max-inflight-bytes,
 * --max-request-bytes and --cpu-threads follow the container's limits, not the host's.
 *
 * The process's cgroup comes from /proc/self/cgroup; its files are looked for under
 * /sys/fs/cgroup (v2) and /sys/fs/cgroup/memory, /sys/fs/cgroup/cpu (v1), in the cgroup's
 * directory and every ancestor up to the mount's root (a limit on a parent, a pod's or a
 * systemd slice's, binds too; with a cgroup namespace the path is "/" and the mount's root is
 * the container's own cgroup). The lowest limit found wins.
 *
 * Threads: the main thread, once at start (config.c); the parsers are pure functions. */
#ifndef CONVD_CGROUP_H
#define CONVD_CGROUP_H

#include <stddef.h>
#include <stdint.h>

typedef struct convd_host_limits {
  uint64_t physical_bytes; /* the machine's memory (sysconf); 0 when unknown */
  uint64_t memory_bytes;   /* what the process may use: the lower of the two; 0 when neither known */
  char memory_file[512];   /* the cgroup file memory_bytes came from; "" = physical memory */
  int online_cpus;         /* at least 1 */
  int cpus;                /* online_cpus, or the cgroup's quota rounded up when that is lower */
  uint64_t cpu_quota, cpu_period; /* the lowest quota found (µs per period); 0, 0 = none */
  char cpu_file[512];      /* the cgroup file the quota came from; "" = none */
  char warning[640];       /* a limit file that could not be read as one, "" = none */
} convd_host_limits;

/* memory.max (v2) or memory.limit_in_bytes (v1), as read (a trailing newline allowed): "max" is
 * no limit (*bytes = 0), a decimal number is the limit in bytes. Anything else: CONVD_EINVAL,
 * *bytes untouched. */
int convd_cgroup_parse_memory(const char *text, uint64_t *bytes);

/* cpu.max (v2): "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit (*quota = 0).
 * Both positive; anything else: CONVD_EINVAL. */
int convd_cgroup_parse_cpu_max(const char *text, uint64_t *quota, uint64_t *period);

/* cgroup v1's pair: cpu.cfs_quota_us ("-1" = no limit, *quota = 0) and cpu.cfs_period_us. */
int convd_cgroup_parse_cfs(const char *quota_text, const char *period_text, uint64_t *quota,
                           uint64_t *period);

/* CPUs a quota allows: quota / period rounded up, at least 1. */
int convd_cgroup_quota_cpus(uint64_t quota, uint64_t period);

/* Fills out. root: "" or NULL for the real files; otherwise a directory standing for / (its
 * proc/self/cgroup and sys/fs/cgroup/...), which the daemon takes from CONVD_CGROUP_ROOT for
 * tests. Missing files are no limit; a file that cannot be parsed is no limit too, and is named
 * in out->warning. */
void convd_host_limits_probe(const char *root, convd_host_limits *out);

#endif
