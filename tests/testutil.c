#include "testutil.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_device.h"
#include "err.h"
#include "npy.h"

int test_failed;
int test_cuda;

int test_main(int argc, char **argv, const test_case *tests, size_t n) {
  const char *filter = argc > 1 ? argv[1] : NULL;
  int failures = 0, ran = 0;
  for (size_t i = 0; i < n; i++) {
    if (filter && strstr(tests[i].name, filter) == NULL) continue;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    test_failed = 0;
    tests[i].fn();
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
    printf("%s %s (%.2f s)\n", test_failed ? "FAIL" : "ok  ", tests[i].name, s);
    fflush(stdout);
    failures += test_failed;
    ran++;
  }
  if (ran == 0) {
    fprintf(stderr, "no test matches '%s'\n", filter ? filter : "");
    return 1;
  }
  printf("%d of %d tests passed\n", ran - failures, ran);
  return failures ? 1 : 0;
}

int test_main_cuda(int argc, char **argv, const test_case *tests, size_t n,
                   const test_case *cuda_tests, size_t n_cuda) {
  if (argc < 2 || strcmp(argv[1], "--cuda") != 0) return test_main(argc, argv, tests, n);
  char why[256] = "";
  if (convd_cuda_device_count(why, sizeof why) == 0) {
    printf("skipped: %zu CUDA cases need a visible GPU: %s\n", n_cuda, why);
    return TEST_SKIPPED;
  }
  test_cuda = 1;
  argv[1] = argv[0]; /* test_main reads the filter, if any, after the flag */
  return test_main(argc - 1, argv + 1, cuda_tests, n_cuda);
}

int check_close(const char *what, const float *got, const double *want, size_t n) {
  double max_want = 0, worst = 0;
  size_t worst_i = 0;
  for (size_t i = 0; i < n; i++)
    if (fabs(want[i]) > max_want) max_want = fabs(want[i]);
  const double tol = 1e-4 * (max_want > 1 ? max_want : 1);
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)got[i] - want[i]);
    if (!(d <= tol)) { /* NaN fails too */
      if (bad++ == 0) first_bad = i;
    }
    if (d > worst || isnan(d)) {
      worst = isnan(d) ? INFINITY : d;
      worst_i = i;
    }
  }
  if (bad) {
    fprintf(stderr,
            "  %s: %zu of %zu elements outside tolerance %.3g; first at %zu: got %.9g want %.9g\n",
            what, bad, n, tol, first_bad, (double)got[first_bad], want[first_bad]);
    return -1;
  }
  printf("  %s: %zu elements, max abs error %.3g, relative to max|expected| %.3g\n", what, n,
         worst, worst / (max_want > 0 ? max_want : 1));
  (void)worst_i;
  return 0;
}

void poison(float *p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = NAN;
}

uint64_t rng_next(rng *r) {
  r->s ^= r->s >> 12;
  r->s ^= r->s << 25;
  r->s ^= r->s >> 27;
  return r->s * 0x2545F4914F6CDD1DULL;
}

int64_t rng_range(rng *r, int64_t lo, int64_t hi) {
  return lo + (int64_t)(rng_next(r) % (uint64_t)(hi - lo + 1));
}

void rng_fill(rng *r, float *p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = (float)((double)(rng_next(r) >> 11) / 9007199254740992.0 * 2 - 1);
}

static int cmp_names(const void *a, const void *b) { return strcmp(a, b); }

int golden_list(const char *root, char names[][128], int max) {
  DIR *d = opendir(root);
  if (d == NULL) {
    FAIL_AT("golden cases: cannot open the directory %s: %s", root, strerror(errno));
    return 0;
  }
  int n = 0, more = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s/params.txt", root, e->d_name);
    FILE *f = fopen(path, "r");
    if (f == NULL) continue;
    fclose(f);
    if (strlen(e->d_name) >= 128) continue;
    if (n == max) {
      more++;
      continue;
    }
    memcpy(names[n++], e->d_name, strlen(e->d_name) + 1);
  }
  closedir(d);
  qsort(names, (size_t)n, 128, cmp_names);
  if (n == 0) FAIL_AT("golden cases: none under %s (no subdirectory with a params.txt)", root);
  if (more) FAIL_AT("golden cases: %d more under %s than the %d the caller has room for", more, root, max);
  return n;
}

static int load_f32(const char *dir, const char *file, float **out, size_t want, char *err,
                    size_t errlen) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, file);
  convd_npy a;
  int rc = convd_npy_read(path, &a, err, errlen);
  if (rc) return rc;
  if (a.elem_size != 4 || a.count != want) {
    convd_npy_free(&a);
    return convd_errf(err, errlen, CONVD_EINVAL, "%s: expected %zu float32 values", path, want);
  }
  *out = a.data;
  return 0;
}

int golden_load(const char *root, const char *name, golden *g, char *err, size_t errlen) {
  memset(g, 0, sizeof *g);
  snprintf(g->dir, sizeof g->dir, "%s/%s", root, name);
  char path[1024], key[64];
  snprintf(path, sizeof path, "%s/params.txt", g->dir);
  FILE *f = fopen(path, "r");
  if (f == NULL) return convd_errf(err, errlen, CONVD_EIO, "%s: cannot open", path);
  convd_conv_params *p = &g->p;
  convd_conv_params_default(p);
  long long v[4], wshape[4] = {0};
  char line[256];
  while (fgets(line, sizeof line, f)) {
    int n = sscanf(line, "%63s %lld %lld %lld %lld", key, &v[0], &v[1], &v[2], &v[3]);
    if (n < 1) continue;
    if (strcmp(key, "op") == 0) sscanf(line, "%*s %31s", g->op);
    else if (strcmp(key, "input") == 0 && n == 5) p->n = v[0], p->c_in = v[1], p->h = v[2], p->w = v[3];
    else if (strcmp(key, "weight") == 0 && n == 5)
      for (int i = 0; i < 4; i++) wshape[i] = v[i];
    else if (strcmp(key, "bias") == 0 && n == 2) p->has_bias = (int)v[0];
    else if (strcmp(key, "stride") == 0 && n == 3) p->stride_h = v[0], p->stride_w = v[1];
    else if (strcmp(key, "padding") == 0 && n == 5)
      p->pad_top = v[0], p->pad_bottom = v[1], p->pad_left = v[2], p->pad_right = v[3];
    else if (strcmp(key, "dilation") == 0 && n == 3) p->dil_h = v[0], p->dil_w = v[1];
    else if (strcmp(key, "groups") == 0 && n == 2) p->groups = v[0];
    else if (strcmp(key, "output_padding") == 0 && n == 3) p->out_pad_h = v[0], p->out_pad_w = v[1];
    else if (strcmp(key, "output") == 0 && n == 5)
      for (int i = 0; i < 4; i++) g->output[i] = v[i];
  }
  fclose(f);
  p->kh = wshape[2], p->kw = wshape[3];
  if (strcmp(g->op, "conv_transpose2d") == 0) { /* weights (C_in, C_out/groups, kH, kW) */
    p->transposed = 1;
    p->c_out = wshape[1] * p->groups;
    p->c_per_group = p->groups ? wshape[0] / p->groups : 0;
  } else {
    p->c_out = wshape[0], p->c_per_group = wshape[1];
  }
  if (strcmp(g->op, "conv2d") != 0 && strcmp(g->op, "conv_transpose2d") != 0) return 0;
  convd_conv c;
  int rc = convd_conv_init(&c, p, err, errlen);
  if (rc) return rc;
  if ((rc = load_f32(g->dir, "input.npy", &g->x, c.input_elems, err, errlen)) ||
      (rc = load_f32(g->dir, "weight.npy", &g->w, c.weight_elems, err, errlen)) ||
      (p->has_bias && (rc = load_f32(g->dir, "bias.npy", &g->b, c.bias_elems, err, errlen)))) {
    golden_free(g);
    return rc;
  }
  snprintf(path, sizeof path, "%s/expected.npy", g->dir);
  convd_npy e;
  if ((rc = convd_npy_read(path, &e, err, errlen))) {
    golden_free(g);
    return rc;
  }
  g->expected = convd_npy_to_f64(&e);
  g->expected_count = e.count;
  convd_npy_free(&e);
  if (g->expected == NULL || g->expected_count != c.output_elems) {
    golden_free(g);
    return convd_errf(err, errlen, CONVD_EINVAL, "%s: expected.npy has the wrong size", g->dir);
  }
  return 0;
}

void golden_free(golden *g) {
  free(g->x);
  free(g->w);
  free(g->b);
  free(g->expected);
  g->x = g->w = g->b = NULL;
  g->expected = NULL;
}
