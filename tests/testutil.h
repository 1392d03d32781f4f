/* Test support: typed assertions that print both sides, a runner over a list of named tests (and
 * over a program's CUDA cases, which report skipped, exit 77, where no GPU is visible), the
 * golden-case loader and element-wise comparison with the golden tolerance. */
#ifndef CONVD_TESTUTIL_H
#define CONVD_TESTUTIL_H

#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "conv.h"

extern int test_failed;

#define FAIL_AT(...)                                        \
  do {                                                      \
    fprintf(stderr, "  FAILED %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__);                           \
    fputc('\n', stderr);                                    \
    test_failed = 1;                                        \
  } while (0)

#define ASSERT_TRUE(cond)                          \
  do {                                             \
    if (!(cond)) {                                 \
      FAIL_AT("expected true: %s", #cond);         \
      return;                                      \
    }                                              \
  } while (0)

#define ASSERT_EQ_INT(a, b)                                                               \
  do {                                                                                    \
    long long a_ = (long long)(a), b_ = (long long)(b);                                   \
    if (a_ != b_) {                                                                       \
      FAIL_AT("%s == %s: %lld != %lld", #a, #b, a_, b_);                                  \
      return;                                                                             \
    }                                                                                     \
  } while (0)

#define ASSERT_OK(rc, err)                                     \
  do {                                                         \
    int rc_ = (rc);                                            \
    if (rc_ != 0) {                                            \
      FAIL_AT("%s returned %d: %s", #rc, rc_, (err));          \
      return;                                                  \
    }                                                          \
  } while (0)

/* haystack must contain needle. */
#define ASSERT_CONTAINS(haystack, needle)                                   \
  do {                                                                      \
    if (strstr((haystack), (needle)) == NULL) {                             \
      FAIL_AT("expected \"%s\" to contain \"%s\"", (haystack), (needle));   \
      return;                                                               \
    }                                                                       \
  } while (0)

typedef struct test_case {
  const char *name;
  void (*fn)(void);
} test_case;

/* Runs every test whose name contains argv[1] (all when absent); returns the exit status. */
int test_main(int argc, char **argv, const test_case *tests, size_t n);

/* ctest's SKIP_RETURN_CODE: the program could not run its cases here (it says why). */
#define TEST_SKIPPED 77

/* 1 while a program runs its CUDA cases (test_main_cuda with --cuda), else 0. */
extern int test_cuda;

/* For programs with CUDA cases: `PROG [FILTER]` runs tests (never a GPU case), `PROG --cuda
 * [FILTER]` runs cuda_tests with test_cuda set, and returns TEST_SKIPPED, saying why, when no
 * GPU is visible. ctest lists the two as separate entries (device / device_cuda). */
int test_main_cuda(int argc, char **argv, const test_case *tests, size_t n,
                   const test_case *cuda_tests, size_t n_cuda);

/* The golden tolerance (tests/golden/README.md): max|got - want| <= 1e-4 * max(1, max|want|).
 * Fails on NaN (outputs are poisoned with NaN before a run). Prints the worst errors. */
int check_close(const char *what, const float *got, const double *want, size_t n);

/* Fills with NaN, so that an element nobody wrote fails check_close. */
void poison(float *p, size_t n);

/* Deterministic pseudo-random numbers (xorshift64*), so failures reproduce. */
typedef struct rng {
  uint64_t s;
} rng;
uint64_t rng_next(rng *r);
int64_t rng_range(rng *r, int64_t lo, int64_t hi); /* uniform in [lo, hi] */
void rng_fill(rng *r, float *p, size_t n);          /* uniform in [-1, 1) */

/* One case of tests/golden. */
typedef struct golden {
  char dir[512];
  char op[32]; /* "conv2d" or "conv_transpose2d" (then p.transposed is set) */
  convd_conv_params p;
  int64_t output[4];
  float *x, *w, *b; /* b NULL without bias */
  double *expected;
  size_t expected_count;
} golden;

/* Lists the case directories under root (sorted); returns how many, up to max. Finding none
 * (or root missing), or more than max, fails the calling test with the directory named, so a
 * golden-driven test never passes having compared nothing. */
int golden_list(const char *root, char names[][128], int max);
int golden_load(const char *root, const char *name, golden *g, char *err, size_t errlen);
void golden_free(golden *g);

#endif
