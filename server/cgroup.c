/* See cgroup.h. Threads: the main thread, once at start. */
#include "cgroup.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"

/* text without trailing whitespace, into buf; 0, or -1 when it does not fit. */
static int trimmed(const char *text, char *buf, size_t len) {
  size_t n = strlen(text);
  while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == ' ' || text[n - 1] == '\t')) n--;
  if (n >= len) return -1;
  memcpy(buf, text, n);
  buf[n] = '\0';
  return 0;
}

/* A decimal number that fits in 63 bits, nothing else (no sign, no spaces). */
static int parse_u63(const char *s, uint64_t *v) {
  if (s[0] < '0' || s[0] > '9') return -1;
  char *end;
  errno = 0;
  unsigned long long x = strtoull(s, &end, 10);
  if (errno || *end != '\0' || x > (unsigned long long)INT64_MAX) return -1;
  *v = x;
  return 0;
}

int convd_cgroup_parse_memory(const char *text, uint64_t *bytes) {
  char s[32];
  uint64_t v;
  if (trimmed(text, s, sizeof s)) return CONVD_EINVAL;
  if (strcmp(s, "max") == 0) {
    *bytes = 0;
    return 0;
  }
  if (parse_u63(s, &v)) return CONVD_EINVAL;
  *bytes = v;
  return 0;
}

int convd_cgroup_parse_cpu_max(const char *text, uint64_t *quota, uint64_t *period) {
  char s[64];
  if (trimmed(text, s, sizeof s)) return CONVD_EINVAL;
  char *sp = strchr(s, ' ');
  if (sp == NULL) return CONVD_EINVAL;
  *sp = '\0';
  uint64_t q = 0, p;
  if (parse_u63(sp + 1, &p) || p == 0) return CONVD_EINVAL;
  if (strcmp(s, "max") != 0 && (parse_u63(s, &q) || q == 0)) return CONVD_EINVAL;
  *quota = q;
  *period = p;
  return 0;
}

int convd_cgroup_parse_cfs(const char *quota_text, const char *period_text, uint64_t *quota,
                           uint64_t *period) {
  char qs[32], ps[32];
  uint64_t q = 0, p;
  if (trimmed(quota_text, qs, sizeof qs) || trimmed(period_text, ps, sizeof ps)) return CONVD_EINVAL;
  if (parse_u63(ps, &p) || p == 0) return CONVD_EINVAL;
  if (strcmp(qs, "-1") != 0 && (parse_u63(qs, &q) || q == 0)) return CONVD_EINVAL;
  *quota = q;
  *period = p;
  return 0;
}

int convd_cgroup_quota_cpus(uint64_t quota, uint64_t period) {
  if (quota == 0 || period == 0) return 1;
  const uint64_t n = quota / period + (quota % period != 0);
  return n < 1 ? 1 : n > 1 << 20 ? 1 << 20 : (int)n;
}

/* Up to len - 1 bytes of path into buf; 0, or -1 when it cannot be read. */
static int read_text(const char *path, char *buf, size_t len) {
  FILE *f = fopen(path, "r");
  if (f == NULL) return -1;
  const size_t n = fread(buf, 1, len - 1, f);
  const int bad = ferror(f);
  fclose(f);
  if (bad) return -1;
  buf[n] = '\0';
  return 0;
}

static void warn(convd_host_limits *l, const char *file, const char *text) {
  if (l->warning[0]) return; /* the first is enough to go and look */
  char shown[40];
  if (trimmed(text, shown, sizeof shown)) snprintf(shown, sizeof shown, "%.32s...", text);
  for (char *p = shown; *p; p++)
    if (*p < ' ' || *p > '~' || *p == '"') *p = '?';
  snprintf(l->warning, sizeof l->warning, "%s holds \"%s\", not a limit: ignored", file, shown);
}

/* For DIR/PATH/NAME and the same NAME in each ancestor of PATH up to DIR: calls one(l, file, text)
 * for every file that exists. PATH starts with '/'. */
static void each_level(convd_host_limits *l, const char *dir, const char *path, const char *name,
                       void (*one)(convd_host_limits *, const char *file, const char *text)) {
  char rel[512], file[1200], text[128];
  if (path[0] != '/' || snprintf(rel, sizeof rel, "%s", path) >= (int)sizeof rel) return;
  for (;;) {
    size_t n = strlen(rel);
    while (n > 1 && rel[n - 1] == '/') rel[--n] = '\0';
    if (snprintf(file, sizeof file, "%s%s/%s", dir, n == 1 ? "" : rel, name) < (int)sizeof file &&
        read_text(file, text, sizeof text) == 0)
      one(l, file, text);
    if (n == 1) return;
    char *slash = strrchr(rel, '/');
    slash[slash == rel ? 1 : 0] = '\0';
  }
}

static void one_memory(convd_host_limits *l, const char *file, const char *text) {
  uint64_t v;
  if (convd_cgroup_parse_memory(text, &v)) {
    warn(l, file, text);
    return;
  }
  if (v == 0 || (l->memory_file[0] && v >= l->memory_bytes)) return;
  l->memory_bytes = v;
  snprintf(l->memory_file, sizeof l->memory_file, "%s", file);
}

static void take_quota(convd_host_limits *l, const char *file, uint64_t q, uint64_t p) {
  /* q/p < l->q/l->p without overflow: quotas and periods are below 2^63, so in long double. */
  if (q == 0 || (l->cpu_quota && (long double)q * l->cpu_period >= (long double)l->cpu_quota * p)) return;
  l->cpu_quota = q;
  l->cpu_period = p;
  snprintf(l->cpu_file, sizeof l->cpu_file, "%s", file);
}

static void one_cpu_max(convd_host_limits *l, const char *file, const char *text) {
  uint64_t q, p;
  if (convd_cgroup_parse_cpu_max(text, &q, &p)) {
    warn(l, file, text);
    return;
  }
  take_quota(l, file, q, p);
}

/* v1: file is .../cpu.cfs_quota_us; its period beside it. */
static void one_cfs_quota(convd_host_limits *l, const char *file, const char *text) {
  char pfile[1200], ptext[64];
  uint64_t q, p;
  snprintf(pfile, sizeof pfile, "%.*scpu.cfs_period_us", (int)(strrchr(file, '/') + 1 - file), file);
  if (read_text(pfile, ptext, sizeof ptext) != 0) return;
  if (convd_cgroup_parse_cfs(text, ptext, &q, &p)) {
    warn(l, file, text);
    return;
  }
  take_quota(l, file, q, p);
}

/* 1 when the comma-separated list has the element name. */
static int has_controller(const char *list, size_t len, const char *name) {
  const size_t n = strlen(name);
  for (const char *p = list, *end = list + len; p < end;) {
    const char *comma = memchr(p, ',', (size_t)(end - p));
    const size_t el = comma ? (size_t)(comma - p) : (size_t)(end - p);
    if (el == n && memcmp(p, name, n) == 0) return 1;
    if (comma == NULL) break;
    p = comma + 1;
  }
  return 0;
}

void convd_host_limits_probe(const char *root, convd_host_limits *out) {
  memset(out, 0, sizeof *out);
  if (root == NULL) root = "";
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  out->physical_bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
  out->online_cpus = ncpu > 0 ? (int)ncpu : 1;

  char file[1024], self[8192], dir[1024];
  snprintf(file, sizeof file, "%s/proc/self/cgroup", root);
  if (read_text(file, self, sizeof self) == 0) {
    /* Lines ID:CONTROLLERS:PATH; cgroup v2's is 0::PATH. */
    for (char *line = self, *next; line && *line; line = next) {
      next = strchr(line, '\n');
      if (next) *next++ = '\0';
      char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
      if (c2 == NULL) continue;
      const char *ctl = c1 + 1, *path = c2 + 1;
      const size_t ctl_len = (size_t)(c2 - ctl);
      if (ctl_len == 0 && strncmp(line, "0:", 2) == 0) {
        snprintf(dir, sizeof dir, "%s/sys/fs/cgroup", root);
        each_level(out, dir, path, "memory.max", one_memory);
        each_level(out, dir, path, "cpu.max", one_cpu_max);
      }
      /* v1: mounted at /sys/fs/cgroup/memory and .../cpu (on systemd's machines links to the
       * joint mounts, cpu,cpuacct), else at the controllers' joint name. */
      for (int k = 0; k < 2; k++) {
        const char *name = k == 0 ? "memory" : "cpu";
        if (!has_controller(ctl, ctl_len, name)) continue;
        struct stat st;
        snprintf(dir, sizeof dir, "%s/sys/fs/cgroup/%s", root, name);
        if (stat(dir, &st) != 0) snprintf(dir, sizeof dir, "%s/sys/fs/cgroup/%.*s", root, (int)ctl_len, ctl);
        each_level(out, dir, path, k == 0 ? "memory.limit_in_bytes" : "cpu.cfs_quota_us",
                   k == 0 ? one_memory : one_cfs_quota);
      }
    }
  }
  /* A limit at or above the machine's memory (v1's "unlimited" is 2^63 less a page) binds
   * nothing. */
  if (out->memory_file[0] && ((out->physical_bytes && out->memory_bytes >= out->physical_bytes) ||
                              out->memory_bytes >= UINT64_C(1) << 62))
    out->memory_file[0] = '\0';
  if (!out->memory_file[0]) out->memory_bytes = out->physical_bytes;
  out->cpus = out->online_cpus;
  if (out->cpu_quota) {
    const int q = convd_cgroup_quota_cpus(out->cpu_quota, out->cpu_period);
    if (q < out->online_cpus) out->cpus = q;
  }
}
