/* The fuzz harness without libFuzzer: runs every file of the given corpus directories (or the
 * files named) once through fuzz_conv_run, so the default build's suite (gcc, and the
 * sanitizer build) exercises the seeds and the regression inputs through the real code. A seed
 * whose name starts with "ok-" must have every call answered OK, one starting with "bad-" at
 * least one call refused; any other name (a crash or regression input) only has to run.
 *
 * Usage: fuzz_replay [-v] DIR_OR_FILE...   (-v prints every call's answer)
 *
 * Threads: main only. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz_frame.h"

static int verbose, failures, files;

static void replay_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    fprintf(stderr, "fuzz_replay: %s: %s\n", path, strerror(errno));
    failures++;
    return;
  }
  uint8_t *buf = NULL;
  size_t len = 0, cap = 0, got;
  do {
    if (len == cap) {
      cap = cap ? cap * 2 : 65536;
      uint8_t *nb = realloc(buf, cap);
      if (nb == NULL) {
        fprintf(stderr, "fuzz_replay: %s: out of memory\n", path);
        exit(1);
      }
      buf = nb;
    }
    got = fread(buf + len, 1, cap - len, f);
    len += got;
  } while (got > 0);
  fclose(f);
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  if (verbose) fprintf(stderr, "%s (%zu bytes)\n", base, len);
  fuzz_outcome out;
  fuzz_conv_run(buf, len, verbose, &out);
  free(buf);
  files++;
  if (strncmp(base, "ok-", 3) == 0 && (out.calls == 0 || out.failed != 0)) {
    fprintf(stderr, "fuzz_replay: %s: %u of %u calls refused, want all answered OK (-v says why)\n",
            path, out.failed, out.calls);
    failures++;
  } else if (strncmp(base, "bad-", 4) == 0 && out.failed == 0) {
    fprintf(stderr, "fuzz_replay: %s: all %u calls answered OK, want one refused\n", path,
            out.calls);
    failures++;
  }
}

static int by_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static void replay_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (d == NULL) {
    fprintf(stderr, "fuzz_replay: %s: %s\n", dir, strerror(errno));
    failures++;
    return;
  }
  char **names = NULL;
  size_t n = 0, cap = 0;
  for (struct dirent *e; (e = readdir(d)) != NULL;) {
    if (e->d_name[0] == '.') continue;
    if (n == cap && (names = realloc(names, (cap = cap ? cap * 2 : 64) * sizeof *names)) == NULL) exit(1);
    names[n++] = strdup(e->d_name);
  }
  closedir(d);
  qsort(names, n, sizeof *names, by_name); /* the same order every run */
  for (size_t i = 0; i < n; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    struct stat st;
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) replay_file(path);
    free(names[i]);
  }
  free(names);
}

int main(int argc, char **argv) {
  int named = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "-v") == 0) {
      verbose = 1;
      continue;
    }
    named++;
    struct stat st;
    if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) replay_dir(argv[i]);
    else replay_file(argv[i]);
  }
  if (named == 0) {
    fprintf(stderr, "usage: fuzz_replay [-v] DIR_OR_FILE...\n");
    return 2;
  }
  if (files == 0) {
    fprintf(stderr, "fuzz_replay: no input found\n");
    return 1;
  }
  printf("fuzz_replay: %d inputs run, %d failed their expectation\n", files, failures);
  return failures ? 1 : 0;
}
