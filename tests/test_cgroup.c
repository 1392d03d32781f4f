/* The cgroup limits the daemon's defaults follow (server/cgroup.h): the parsers of memory.max,
 * cpu.max and v1's files (numbers, "max", "max 100000", garbage), and the probe over fixture
 * trees standing for / (cgroup v2 with a limit on an ancestor, a namespaced "/" path, v1 with
 * joint cpu,cpuacct mounts, missing files, a garbage file). */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cgroup.h"
#include "err.h"
#include "testutil.h"

static void test_parse_memory(void) {
  uint64_t v = 7;
  ASSERT_EQ_INT(convd_cgroup_parse_memory("max\n", &v), 0);
  ASSERT_EQ_INT(v, 0);
  ASSERT_EQ_INT(convd_cgroup_parse_memory("2147483648\n", &v), 0);
  ASSERT_EQ_INT(v, 2147483648LL);
  ASSERT_EQ_INT(convd_cgroup_parse_memory("34359738368", &v), 0); /* no newline */
  ASSERT_EQ_INT(v, 34359738368LL);
  ASSERT_EQ_INT(convd_cgroup_parse_memory("9223372036854771712\n", &v), 0); /* v1's unlimited */
  ASSERT_EQ_INT(v, 9223372036854771712LL);
  v = 7;
  static const char *const bad[] = {"", "\n", "2G\n", "-1\n", " 5\n", "max 100000\n", "12abc",
                                    "99999999999999999999\n", "maximum\n", "1.5e9\n"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    if (convd_cgroup_parse_memory(bad[i], &v) != CONVD_EINVAL) FAIL_AT("accepted \"%s\"", bad[i]);
    ASSERT_EQ_INT(v, 7); /* untouched */
  }
}

static void test_parse_cpu(void) {
  uint64_t q = 9, p = 9;
  ASSERT_EQ_INT(convd_cgroup_parse_cpu_max("max 100000\n", &q, &p), 0);
  ASSERT_TRUE(q == 0 && p == 100000);
  ASSERT_EQ_INT(convd_cgroup_parse_cpu_max("150000 100000\n", &q, &p), 0);
  ASSERT_TRUE(q == 150000 && p == 100000);
  ASSERT_EQ_INT(convd_cgroup_parse_cpu_max("50000 100000", &q, &p), 0);
  ASSERT_TRUE(q == 50000 && p == 100000);
  static const char *const bad[] = {"", "max\n", "max", "100000\n", "0 100000\n", "100 0\n",
                                    "max max\n", "1.5 100000\n", "-1 100000\n", "100000  100000\n",
                                    "100000 100000 1\n", "garbage\n"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    if (convd_cgroup_parse_cpu_max(bad[i], &q, &p) != CONVD_EINVAL) FAIL_AT("accepted \"%s\"", bad[i]);
  /* v1 */
  ASSERT_EQ_INT(convd_cgroup_parse_cfs("-1\n", "100000\n", &q, &p), 0);
  ASSERT_TRUE(q == 0 && p == 100000);
  ASSERT_EQ_INT(convd_cgroup_parse_cfs("250000\n", "100000\n", &q, &p), 0);
  ASSERT_TRUE(q == 250000 && p == 100000);
  ASSERT_EQ_INT(convd_cgroup_parse_cfs("max\n", "100000\n", &q, &p), CONVD_EINVAL);
  ASSERT_EQ_INT(convd_cgroup_parse_cfs("100\n", "0\n", &q, &p), CONVD_EINVAL);
  ASSERT_EQ_INT(convd_cgroup_parse_cfs("-2\n", "100000\n", &q, &p), CONVD_EINVAL);
  /* Rounded up, at least 1. */
  ASSERT_EQ_INT(convd_cgroup_quota_cpus(150000, 100000), 2);
  ASSERT_EQ_INT(convd_cgroup_quota_cpus(200000, 100000), 2);
  ASSERT_EQ_INT(convd_cgroup_quota_cpus(200001, 100000), 3);
  ASSERT_EQ_INT(convd_cgroup_quota_cpus(1000, 100000), 1);
  ASSERT_EQ_INT(convd_cgroup_quota_cpus(800000, 100000), 8);
}

/* ---- fixture trees ---------------------------------------------------------------------------- */

static char root[256];

static void put(const char *rel, const char *text) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", root, rel);
  for (char *s = path + strlen(root) + 1; (s = strchr(s, '/')) != NULL; s++) {
    *s = '\0';
    mkdir(path, 0755);
    *s = '/';
  }
  FILE *f = fopen(path, "w");
  if (f == NULL) {
    FAIL_AT("cannot write %s", path);
    return;
  }
  fputs(text, f);
  fclose(f);
}

static void fresh_root(void) {
  snprintf(root, sizeof root, "/tmp/convd-cgroup-XXXXXX");
  if (mkdtemp(root) == NULL) FAIL_AT("mkdtemp");
}

static void remove_root(void) {
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
  if (system(cmd) != 0) FAIL_AT("%s", cmd);
}

/* The suffix of a path under the fixture root. */
static const char *rel(const char *path) {
  return strncmp(path, root, strlen(root)) == 0 ? path + strlen(root) : path;
}

static void test_probe_v2(void) {
  convd_host_limits l;
  fresh_root();
  /* No /proc/self/cgroup at all: the machine's. */
  convd_host_limits_probe(root, &l);
  ASSERT_TRUE(l.physical_bytes > 0 && l.memory_bytes == l.physical_bytes && l.memory_file[0] == '\0');
  ASSERT_TRUE(l.online_cpus >= 1 && l.cpus == l.online_cpus && l.cpu_file[0] == '\0');
  ASSERT_TRUE(l.warning[0] == '\0');
  /* A pod: the container's cgroup has "max", the pod's 2G (the lower binds), cpu.max 0.5 CPU. */
  put("proc/self/cgroup", "0::/kubepods.slice/pod1/ctr\n");
  put("sys/fs/cgroup/kubepods.slice/pod1/ctr/memory.max", "max\n");
  put("sys/fs/cgroup/kubepods.slice/pod1/memory.max", "2147483648\n");
  put("sys/fs/cgroup/kubepods.slice/memory.max", "4294967296\n");
  put("sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max", "50000 100000\n");
  put("sys/fs/cgroup/kubepods.slice/pod1/cpu.max", "max 100000\n");
  convd_host_limits_probe(root, &l);
  ASSERT_EQ_INT(l.memory_bytes, 2147483648LL);
  ASSERT_TRUE(strcmp(rel(l.memory_file), "/sys/fs/cgroup/kubepods.slice/pod1/memory.max") == 0);
  ASSERT_EQ_INT(l.cpu_quota, 50000);
  ASSERT_EQ_INT(l.cpu_period, 100000);
  ASSERT_EQ_INT(l.cpus, 1);
  ASSERT_TRUE(strcmp(rel(l.cpu_file), "/sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max") == 0);
  ASSERT_TRUE(l.warning[0] == '\0');
  /* A quota above the online CPUs binds nothing. */
  char big[64];
  snprintf(big, sizeof big, "%d 100000\n", (l.online_cpus + 3) * 100000);
  put("sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max", big);
  convd_host_limits_probe(root, &l);
  ASSERT_EQ_INT(l.cpus, l.online_cpus);
  /* A limit above physical memory binds nothing either. */
  snprintf(big, sizeof big, "%llu\n", (unsigned long long)l.physical_bytes * 2);
  put("sys/fs/cgroup/kubepods.slice/pod1/memory.max", big);
  put("sys/fs/cgroup/kubepods.slice/memory.max", "max\n");
  convd_host_limits_probe(root, &l);
  ASSERT_TRUE(l.memory_bytes == l.physical_bytes && l.memory_file[0] == '\0');
  /* Garbage: ignored, and named. */
  put("sys/fs/cgroup/kubepods.slice/pod1/ctr/memory.max", "lots\n");
  put("sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max", "garbage\n");
  convd_host_limits_probe(root, &l);
  ASSERT_TRUE(l.memory_bytes == l.physical_bytes && l.cpus == l.online_cpus);
  ASSERT_CONTAINS(l.warning, "kubepods.slice/pod1/ctr/memory.max holds \"lots\", not a limit");
  remove_root();
}

static void test_probe_namespaced(void) {
  /* With a cgroup namespace the path is "/" and the mount's root is the container's cgroup. */
  convd_host_limits l;
  fresh_root();
  put("proc/self/cgroup", "0::/\n");
  put("sys/fs/cgroup/memory.max", "1073741824\n");
  put("sys/fs/cgroup/cpu.max", "max 100000\n");
  convd_host_limits_probe(root, &l);
  ASSERT_EQ_INT(l.memory_bytes, 1073741824LL);
  ASSERT_TRUE(strcmp(rel(l.memory_file), "/sys/fs/cgroup/memory.max") == 0);
  ASSERT_TRUE(l.cpus == l.online_cpus && l.cpu_quota == 0);
  /* A path the mount does not have (no namespace, but the container's own cgroup mounted): the
   * walk ends at the mount's root, which holds the limit. */
  put("proc/self/cgroup", "0::/system.slice/docker-abc.scope\n");
  convd_host_limits_probe(root, &l);
  ASSERT_EQ_INT(l.memory_bytes, 1073741824LL);
  remove_root();
}

static void test_probe_v1(void) {
  convd_host_limits l;
  fresh_root();
  put("proc/self/cgroup",
      "12:pids:/docker/abc\n"
      "5:cpu,cpuacct:/docker/abc\n"
      "4:memory:/docker/abc\n"
      "3:cpuset:/docker/abc\n"
      "1:name=systemd:/docker/abc\n"
      "0::/docker/abc\n");
  put("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
  put("sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "3221225472\n");
  /* cpu,cpuacct mounted jointly, no "cpu" link */
  put("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
  put("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  put("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "100000\n");
  put("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  /* cpuset's and cpuacct's files are not cpu's */
  put("sys/fs/cgroup/cpuset/docker/abc/cpu.cfs_quota_us", "1\n");
  convd_host_limits_probe(root, &l);
  ASSERT_EQ_INT(l.memory_bytes, 3221225472LL);
  ASSERT_TRUE(strcmp(rel(l.memory_file), "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes") == 0);
  ASSERT_EQ_INT(l.cpu_quota, 100000);
  ASSERT_EQ_INT(l.cpus, 1);
  ASSERT_TRUE(strcmp(rel(l.cpu_file), "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us") == 0);
  ASSERT_TRUE(l.warning[0] == '\0');
  /* v1's unlimited alone: the machine's memory. */
  put("sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n");
  convd_host_limits_probe(root, &l);
  ASSERT_TRUE(l.memory_bytes == l.physical_bytes && l.memory_file[0] == '\0');
  remove_root();
}

static const test_case tests[] = {
    {"parse_memory", test_parse_memory},
    {"parse_cpu", test_parse_cpu},
    {"probe_v2", test_probe_v2},
    {"probe_namespaced", test_probe_namespaced},
    {"probe_v1", test_probe_v1},
};

int main(int argc, char **argv) { return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]); }
