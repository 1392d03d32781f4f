/* Engine unit tests: the reference against every conv2d golden case, shape validation and its
 * messages, row-band cutting and placing, cancellation, float16/bfloat16 conversion. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "band.h"
#include "dtype.h"
#include "err.h"
#include "ref.h"
#include "transpose.h"
#include "testutil.h"

static const char *golden_root = GOLDEN_DIR;

static void test_reference_golden(void) {
  char names[64][128], err[512];
  int n = golden_list(golden_root, names, 64);
  ASSERT_TRUE(n > 0);
  int conv_cases = 0;
  for (int i = 0; i < n; i++) {
    golden g;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    if (strcmp(g.op, "conv2d") != 0) { /* transposes are tested on their own */
      golden_free(&g);
      continue;
    }
    conv_cases++;
    convd_conv c;
    ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
    ASSERT_EQ_INT(c.h_out, g.output[2]);
    ASSERT_EQ_INT(c.w_out, g.output[3]);
    ASSERT_EQ_INT(c.p.c_out, g.output[1]);
    float *y = malloc(c.output_bytes);
    poison(y, c.output_elems);
    ASSERT_OK(convd_ref_conv2d(&c, g.x, g.w, g.b, y, NULL), "reference failed");
    int rc = check_close(names[i], y, g.expected, c.output_elems);
    free(y);
    golden_free(&g);
    if (rc) {
      FAIL_AT("golden case %s", names[i]);
      return;
    }
  }
  ASSERT_TRUE(conv_cases >= 15);
}

typedef struct bad_case {
  const char *why;
  convd_conv_params p;
  int code;
  const char *message;
} bad_case;

static convd_conv_params base_params(void) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 4, p.h = 8, p.w = 8;
  p.c_out = 6, p.c_per_group = 4, p.kh = 3, p.kw = 3;
  return p;
}

static void test_validation_messages(void) {
  bad_case cases[16];
  int n = 0;
  convd_conv_params p;
  p = base_params(), p.c_in = 0;
  cases[n++] = (bad_case){"zero channel", p, CONVD_EINVAL, "every dimension must be at least 1"};
  p = base_params(), p.h = -3;
  cases[n++] = (bad_case){"negative H", p, CONVD_EINVAL, "N,C,H,W = 1,4,-3,8"};
  p = base_params(), p.kw = 0;
  cases[n++] = (bad_case){"zero kernel", p, CONVD_EINVAL, "weight shape C_out,C_in/groups,kH,kW = 6,4,3,0"};
  p = base_params(), p.kh = 7, p.kw = 7, p.dil_h = 2, p.dil_w = 2;
  cases[n++] = (bad_case){"dilated kernel too large", p, CONVD_EINVAL,
                          "kernel 7x7 (dilated 13x13) is larger than padded input 8x8"};
  p = base_params(), p.kh = 9;
  cases[n++] = (bad_case){"kernel too large", p, CONVD_EINVAL, "kernel 9x3 is larger than padded input 8x8"};
  p = base_params(), p.groups = 3;
  cases[n++] = (bad_case){"groups", p, CONVD_EINVAL, "groups = 3 does not divide the 4 input channels"};
  p = base_params(), p.groups = 4, p.c_per_group = 1;
  cases[n++] = (bad_case){"groups out", p, CONVD_EINVAL, "groups = 4 does not divide the 6 output channels"};
  p = base_params(), p.c_per_group = 2;
  cases[n++] = (bad_case){"per group", p, CONVD_EINVAL, "weight shape has C_in/groups = 2"};
  p = base_params(), p.stride_h = 0;
  cases[n++] = (bad_case){"stride", p, CONVD_EINVAL, "stride height = 0"};
  p = base_params(), p.pad_left = -1;
  cases[n++] = (bad_case){"padding", p, CONVD_EINVAL, "padding left = -1"};
  p = base_params(), p.dil_w = 0;
  cases[n++] = (bad_case){"dilation", p, CONVD_EINVAL, "dilation width = 0"};
  p = base_params(), p.w = CONVD_DIM_MAX + 1;
  cases[n++] = (bad_case){"too wide", p, CONVD_EINVAL, "input W = 2147483648"};
  p = base_params(), p.n = p.c_in = p.h = p.w = CONVD_DIM_MAX, p.c_per_group = CONVD_DIM_MAX;
  cases[n++] = (bad_case){"overflow", p, CONVD_ERANGE, "is too large"};
  /* a 1x1 input padded to 2^32 x 2^32 with 2^31 output channels: only the output overflows */
  p = base_params(), p.c_in = 1, p.c_per_group = 1, p.h = p.w = 1, p.kh = p.kw = 1;
  p.c_out = CONVD_DIM_MAX;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = CONVD_DIM_MAX;
  cases[n++] = (bad_case){"output overflow", p, CONVD_ERANGE, "output of"};
  for (int i = 0; i < n; i++) {
    char err[512] = "";
    convd_conv c;
    int rc = convd_conv_init(&c, &cases[i].p, err, sizeof err);
    if (rc != cases[i].code || strstr(err, cases[i].message) == NULL) {
      FAIL_AT("%s: got %d \"%s\", want %d containing \"%s\"", cases[i].why, rc, err, cases[i].code,
              cases[i].message);
      return;
    }
  }
  /* A valid one, with the output size arithmetic checked by hand. */
  char err[256];
  convd_conv c;
  p = base_params(), p.stride_h = 2, p.pad_top = 1, p.pad_bottom = 0, p.pad_left = 2, p.dil_w = 2;
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  ASSERT_EQ_INT(c.h_out, (8 + 1 - 3) / 2 + 1);
  ASSERT_EQ_INT(c.w_out, 8 + 2 - 5 + 1);
  ASSERT_EQ_INT(c.output_bytes, 1 * 6 * c.h_out * c.w_out * 4);
  ASSERT_EQ_INT(c.macs, (uint64_t)c.output_elems * 4 * 9);
}

/* Cuts random tensors into bands of random piece sizes and reassembles them elsewhere. */
static void test_band_roundtrip(void) {
  rng r = {0x5eed0001};
  for (int iter = 0; iter < 200; iter++) {
    convd_band_shape s = {rng_range(&r, 1, 3), rng_range(&r, 1, 9), rng_range(&r, 1, 17),
                          rng_range(&r, 1, 13), sizeof(float)};
    size_t count = (size_t)(s.n * s.c * s.h * s.w);
    float *a = malloc(count * 4), *b = malloc(count * 4);
    char *piece = malloc(count * 4);
    rng_fill(&r, a, count);
    poison(b, count);
    size_t max_bytes = (size_t)rng_range(&r, 1, (int64_t)count * 4 + 8);
    convd_band_iter it;
    convd_band_iter_init(&it, &s, max_bytes);
    size_t total = 0;
    int64_t last_n = 0, last_h1 = 0;
    while (convd_band_iter_next(&it)) {
      if (it.len > max_bytes || it.len == 0) {
        FAIL_AT("piece of %zu bytes with max %zu", it.len, max_bytes);
        return;
      }
      if (it.off == 0) { /* a new band starts where the previous one ended */
        if (!((it.n == last_n && it.h0 == last_h1) || (it.n == last_n + 1 && it.h0 == 0))) {
          FAIL_AT("band n=%" PRId64 " h0=%" PRId64 " does not follow n=%" PRId64 " h1=%" PRId64,
                  it.n, it.h0, last_n, last_h1);
          return;
        }
        last_n = it.n, last_h1 = it.h1;
      }
      convd_band_gather(a, &s, it.n, it.h0, it.h1, it.off, piece, it.len);
      convd_band_scatter(b, &s, it.n, it.h0, it.h1, it.off, piece, it.len);
      total += it.len;
    }
    ASSERT_EQ_INT(total, count * 4);
    ASSERT_TRUE(memcmp(a, b, count * 4) == 0);
    free(a);
    free(b);
    free(piece);
  }
}

/* A band's layout is C x rows x W: check one element by hand. */
static void test_band_layout(void) {
  convd_band_shape s = {2, 3, 5, 4, sizeof(float)};
  float t[2 * 3 * 5 * 4];
  for (int i = 0; i < 120; i++) t[i] = (float)i;
  float band[3 * 2 * 4];
  convd_band_gather(t, &s, 1, 2, 4, 0, band, sizeof band);
  /* band element (c=2, row 1, w=3) is tensor (n=1, c=2, h=3, w=3) */
  ASSERT_EQ_INT((int)band[(2 * 2 + 1) * 4 + 3], ((1 * 3 + 2) * 5 + 3) * 4 + 3);
  ASSERT_EQ_INT(convd_band_bytes(&s, 2, 4), sizeof band);
}

static void test_reference_cancel(void) {
  convd_conv_params p = base_params();
  convd_conv c;
  char err[256];
  ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
  float x[4 * 64] = {0}, w[6 * 4 * 9] = {0}, y[6 * 36];
  atomic_int cancel;
  atomic_init(&cancel, 1);
  ASSERT_EQ_INT(convd_ref_conv2d(&c, x, w, NULL, y, &cancel), CONVD_ECANCELED);
  atomic_store(&cancel, 0);
  ASSERT_EQ_INT(convd_ref_conv2d(&c, x, w, NULL, y, &cancel), 0);
}

/* A grouped convolution equals separate convolutions of each group's channel slice. */
static void test_reference_groups_split(void) {
  rng r = {0x5eed0002};
  for (int iter = 0; iter < 20; iter++) {
    convd_conv_params p;
    convd_conv_params_default(&p);
    p.groups = rng_range(&r, 1, 4);
    p.n = rng_range(&r, 1, 2), p.h = rng_range(&r, 3, 9), p.w = rng_range(&r, 3, 9);
    p.c_per_group = rng_range(&r, 1, 3);
    p.c_in = p.groups * p.c_per_group;
    p.c_out = p.groups * rng_range(&r, 1, 3);
    p.kh = rng_range(&r, 1, 3), p.kw = rng_range(&r, 1, 3);
    p.stride_h = rng_range(&r, 1, 2), p.stride_w = rng_range(&r, 1, 2);
    p.pad_top = rng_range(&r, 0, 2), p.pad_left = rng_range(&r, 0, 2);
    p.has_bias = 1;
    convd_conv c, cg;
    char err[256];
    ASSERT_OK(convd_conv_init(&c, &p, err, sizeof err), err);
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes);
    float *y = malloc(c.output_bytes);
    rng_fill(&r, x, c.input_elems);
    rng_fill(&r, w, c.weight_elems);
    rng_fill(&r, b, c.bias_elems);
    ASSERT_OK(convd_ref_conv2d(&c, x, w, b, y, NULL), "ref");
    convd_conv_params q = p;
    q.groups = 1, q.c_in = p.c_per_group, q.c_out = p.c_out / p.groups;
    ASSERT_OK(convd_conv_init(&cg, &q, err, sizeof err), err);
    size_t plane_in = (size_t)(p.h * p.w), plane_out = (size_t)(c.h_out * c.w_out);
    float *xg = malloc(cg.input_bytes), *yg = malloc(cg.output_bytes);
    for (int64_t g = 0; g < p.groups; g++) {
      for (int64_t n = 0; n < p.n; n++)
        memcpy(xg + (size_t)(n * q.c_in) * plane_in,
               x + (size_t)(n * p.c_in + g * q.c_in) * plane_in, (size_t)q.c_in * plane_in * 4);
      ASSERT_OK(convd_ref_conv2d(&cg, xg, w + (size_t)(g * q.c_out) * (size_t)(q.c_in * q.kh * q.kw),
                                 b + g * q.c_out, yg, NULL), "ref group");
      for (int64_t n = 0; n < p.n; n++)
        if (memcmp(yg + (size_t)(n * q.c_out) * plane_out,
                   y + (size_t)(n * p.c_out + g * q.c_out) * plane_out,
                   (size_t)q.c_out * plane_out * 4) != 0) {
          FAIL_AT("iteration %d group %" PRId64 " differs", iter, g);
          return;
        }
    }
    free(x), free(w), free(b), free(y), free(xg), free(yg);
  }
}

/* The transpose reference against every conv_transpose2d golden case. */
static void test_reference_transpose_golden(void) {
  char names[64][128], err[512];
  int n = golden_list(golden_root, names, 64), cases = 0;
  for (int i = 0; i < n; i++) {
    golden g;
    ASSERT_OK(golden_load(golden_root, names[i], &g, err, sizeof err), err);
    if (strcmp(g.op, "conv_transpose2d") != 0) {
      golden_free(&g);
      continue;
    }
    convd_conv c;
    ASSERT_OK(convd_conv_init(&c, &g.p, err, sizeof err), err);
    ASSERT_TRUE(c.h_out == g.output[2] && c.w_out == g.output[3] && c.p.c_out == g.output[1]);
    float *y = malloc(c.output_bytes);
    poison(y, c.output_elems);
    ASSERT_OK(convd_ref_conv_transpose2d(&c, g.x, g.w, g.b, y, NULL), "reference");
    int rc = check_close(names[i], y, g.expected, c.output_elems);
    free(y);
    golden_free(&g);
    if (rc) {
      FAIL_AT("%s", names[i]);
      return;
    }
    cases++;
  }
  ASSERT_TRUE(cases >= 4);
}

/* A random transpose: strides 1-4, kernels 1-7, dilation 1-3, asymmetric padding, output
 * padding, groups, bias, up to `ch` channels per group. */
static convd_conv_params random_transpose(rng *r, int64_t ch) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.transposed = 1;
  p.groups = rng_range(r, 1, 3);
  p.n = rng_range(r, 1, 2);
  p.c_per_group = rng_range(r, 1, ch);
  p.c_in = p.groups * p.c_per_group;
  p.c_out = p.groups * rng_range(r, 1, ch);
  p.kh = rng_range(r, 1, 7), p.kw = rng_range(r, 1, 7);
  p.stride_h = rng_range(r, 1, 4), p.stride_w = rng_range(r, 1, 4);
  p.dil_h = rng_range(r, 1, 3), p.dil_w = rng_range(r, 1, 3);
  p.h = rng_range(r, 1, 9), p.w = rng_range(r, 1, 9);
  p.out_pad_h = rng_range(r, 0, (p.stride_h > p.dil_h ? p.stride_h : p.dil_h) - 1);
  p.out_pad_w = rng_range(r, 0, (p.stride_w > p.dil_w ? p.stride_w : p.dil_w) - 1);
  p.pad_top = rng_range(r, 0, 4), p.pad_bottom = rng_range(r, 0, 4);
  p.pad_left = rng_range(r, 0, 4), p.pad_right = rng_range(r, 0, 4);
  p.has_bias = (int)rng_range(r, 0, 1);
  return p;
}

/* The scatter-form reference against the gather form written here from the definition
 * (y[oy] sums x[iy] w[ky] over oy + pad = iy * stride + ky * dilation), on random shapes:
 * strides 1-4, kernels 1-7, dilation, asymmetric padding, output padding, groups, bias. */
static void test_reference_transpose_random(void) {
  rng r = {0x5eed7777};
  char err[256];
  int cases = 0;
  for (int iter = 0; iter < 300; iter++) {
    convd_conv_params p = random_transpose(&r, 4);
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) continue; /* cropped away entirely */
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
    float *y = malloc(c.output_bytes);
    double *want = malloc(c.output_elems * sizeof(double));
    rng_fill(&r, x, c.input_elems), rng_fill(&r, w, c.weight_elems), rng_fill(&r, b, c.bias_elems);
    const int64_t opg = p.c_out / p.groups;
    for (int64_t n = 0; n < p.n; n++)
      for (int64_t oc = 0; oc < p.c_out; oc++)
        for (int64_t oy = 0; oy < c.h_out; oy++)
          for (int64_t ox = 0; ox < c.w_out; ox++) {
            double acc = p.has_bias ? b[oc] : 0;
            const int64_t g = oc / opg;
            for (int64_t icg = 0; icg < p.c_per_group; icg++)
              for (int64_t ky = 0; ky < p.kh; ky++)
                for (int64_t kx = 0; kx < p.kw; kx++) {
                  const int64_t ty = oy + p.pad_top - ky * p.dil_h, tx = ox + p.pad_left - kx * p.dil_w;
                  if (ty < 0 || tx < 0 || ty % p.stride_h || tx % p.stride_w) continue;
                  const int64_t iy = ty / p.stride_h, ix = tx / p.stride_w;
                  if (iy >= p.h || ix >= p.w) continue;
                  const int64_t ic = g * p.c_per_group + icg;
                  acc += (double)x[((n * p.c_in + ic) * p.h + iy) * p.w + ix] *
                         (double)w[((ic * opg + oc % opg) * p.kh + ky) * p.kw + kx];
                }
            want[((n * p.c_out + oc) * c.h_out + oy) * c.w_out + ox] = acc;
          }
    poison(y, c.output_elems);
    ASSERT_OK(convd_ref_conv_transpose2d(&c, x, w, p.has_bias ? b : NULL, y, NULL), "reference");
    char what[96];
    snprintf(what, sizeof what, "transpose case %d", iter);
    int rc = check_close(what, y, want, c.output_elems);
    free(x), free(w), free(b), free(y), free(want);
    if (rc) {
      FAIL_AT("%s", what);
      return;
    }
    cases++;
  }
  ASSERT_TRUE(cases >= 250);
}

/* Kernel segregation on its own: every phase computed as a forward convolution of the input
 * (the forward reference on the phase's window and segregated weights), interleaved, equals the
 * transpose reference; the phases' q ranges partition the output. */
static void test_transpose_phases(void) {
  rng r = {0x5eed7778};
  char err[256];
  int cases = 0;
  for (int iter = 0; iter < 300; iter++) {
    convd_conv_params p = random_transpose(&r, 3);
    convd_conv c;
    if (convd_conv_init(&c, &p, err, sizeof err)) continue;
    float *x = malloc(c.input_bytes), *w = malloc(c.weight_bytes), *b = malloc(c.bias_bytes + 4);
    float *y = malloc(c.output_bytes), *ref = malloc(c.output_bytes), *seg = malloc(c.weight_bytes);
    rng_fill(&r, x, c.input_elems), rng_fill(&r, w, c.weight_elems), rng_fill(&r, b, c.bias_elems);
    ASSERT_OK(convd_ref_conv_transpose2d(&c, x, w, p.has_bias ? b : NULL, ref, NULL), "reference");
    size_t off[16];
    ASSERT_OK(convd_transpose_segregate(&c, w, seg, off), "segregate");
    poison(y, c.output_elems);
    size_t covered = 0;
    for (int64_t ry = 0; ry < p.stride_h; ry++)
      for (int64_t rx = 0; rx < p.stride_w; rx++) {
        convd_phase_axis ay, ax;
        convd_phase_axis_make(p.stride_h, p.dil_h, p.kh, p.pad_top, c.h_out, ry, &ay);
        convd_phase_axis_make(p.stride_w, p.dil_w, p.kw, p.pad_left, c.w_out, rx, &ax);
        const int64_t qh = ay.q1 - ay.q0, qw = ax.q1 - ax.q0;
        covered += (size_t)(qh * qw);
        if (qh == 0 || qw == 0) continue;
        int64_t i0, i1, j0, j1, pt, pb, pl, pr;
        int any = convd_phase_window(&ay, p.h, ay.q0, ay.q1, &i0, &i1, &pt, &pb) &
                  convd_phase_window(&ax, p.w, ax.q0, ax.q1, &j0, &j1, &pl, &pr);
        float *py = malloc((size_t)(p.n * p.c_out * qh * qw) * sizeof(float));
        if (any) {
          convd_conv_params f;
          convd_conv_params_default(&f);
          f.n = p.n, f.c_in = p.c_in, f.h = i1 - i0, f.w = j1 - j0, f.c_out = p.c_out;
          f.c_per_group = p.c_per_group, f.kh = ay.taps, f.kw = ax.taps, f.groups = p.groups;
          f.dil_h = ay.dil, f.dil_w = ax.dil;
          f.pad_top = pt, f.pad_bottom = pb, f.pad_left = pl, f.pad_right = pr;
          f.has_bias = p.has_bias;
          convd_conv fc;
          ASSERT_OK(convd_conv_init(&fc, &f, err, sizeof err), err);
          ASSERT_EQ_INT(fc.h_out, qh);
          ASSERT_EQ_INT(fc.w_out, qw);
          convd_view xv = {x + (size_t)(i0 * p.w + j0), (size_t)(p.c_in * p.h * p.w), (size_t)(p.h * p.w), (size_t)p.w};
          ASSERT_OK(convd_ref_conv2d_view(&fc, xv, convd_view_dense(seg + off[ry * p.stride_w + rx], p.c_per_group, ay.taps, ax.taps),
                                          p.has_bias ? b : NULL, convd_view_dense(py, p.c_out, qh, qw), NULL), "phase");
        } else { /* no tap or no input row reaches it: the bias */
          for (int64_t n = 0; n < p.n; n++)
            for (int64_t co = 0; co < p.c_out; co++)
              for (int64_t t = 0; t < qh * qw; t++) py[(n * p.c_out + co) * qh * qw + t] = p.has_bias ? b[co] : 0;
        }
        for (int64_t n = 0; n < p.n; n++)
          for (int64_t co = 0; co < p.c_out; co++)
            for (int64_t t = 0; t < qh; t++)
              for (int64_t u = 0; u < qw; u++) {
                const int64_t oy = p.stride_h * (ay.q0 + t) + ry - p.pad_top;
                const int64_t ox = p.stride_w * (ax.q0 + u) + rx - p.pad_left;
                y[((n * p.c_out + co) * c.h_out + oy) * c.w_out + ox] = py[((n * p.c_out + co) * qh + t) * qw + u];
              }
        free(py);
      }
    ASSERT_EQ_INT(covered, (size_t)(c.h_out * c.w_out));
    double *want = malloc(c.output_elems * sizeof(double));
    for (size_t i = 0; i < c.output_elems; i++) want[i] = ref[i];
    char what[64];
    snprintf(what, sizeof what, "segregated transpose case %d", iter);
    int rc = check_close(what, y, want, c.output_elems);
    free(x), free(w), free(b), free(y), free(ref), free(seg), free(want);
    if (rc) {
      FAIL_AT("%s", what);
      return;
    }
    cases++;
  }
  ASSERT_TRUE(cases >= 250);
}

/* The value of v rounded to a binary format with `mant` fraction bits, smallest normal exponent
 * emin and largest finite value max, computed in double by scaling (exact) and rint (to nearest
 * even): an implementation independent of dtype.c's bit manipulation. */
static double nearest_in_format(double v, int mant, int emin, double max) {
  if (v == 0 || isnan(v) || isinf(v)) return v;
  int e;
  frexp(v, &e);            /* |v| = m * 2^e, m in [0.5, 1): the leading bit has exponent e - 1 */
  int lead = e - 1 < emin ? emin : e - 1;
  double r = ldexp(rint(ldexp(v, mant - lead)), lead - mant);
  if (fabs(r) > max) return v > 0 ? INFINITY : -INFINITY;
  return r;
}

static void check_format(int dtype, int mant, int emin, double max) {
  /* Every bit pattern: widening is exact and narrowing gives the pattern back. */
  for (uint32_t h = 0; h < 65536; h++) {
    uint16_t b = (uint16_t)h, back;
    float f;
    convd_dtype_decode(dtype, &b, &f, 1);
    convd_dtype_encode(dtype, &f, &back, 1);
    if (isnan(f)) {
      float g;
      convd_dtype_decode(dtype, &back, &g, 1);
      if (!isnan(g)) {
        FAIL_AT("%s pattern 0x%04x: NaN came back as 0x%04x", convd_dtype_name(dtype), h, back);
        return;
      }
      continue;
    }
    if (back != b) {
      FAIL_AT("%s pattern 0x%04x -> %a -> 0x%04x", convd_dtype_name(dtype), h, f, back);
      return;
    }
    if (!isinf(f) && nearest_in_format(f, mant, emin, max) != f) {
      FAIL_AT("%s pattern 0x%04x widens to %a, not a value of the format", convd_dtype_name(dtype),
              h, f);
      return;
    }
    /* The midpoint to the next pattern up ties to the even one of the two. */
    if ((h & 0x7fff) < 0x7f00 && !isinf(f)) {
      uint16_t up = (uint16_t)(h + 1);
      float g;
      convd_dtype_decode(dtype, &up, &g, 1);
      if (isinf(g) || isnan(g)) continue;
      float mid = (float)(((double)f + (double)g) / 2);
      uint16_t got;
      convd_dtype_encode(dtype, &mid, &got, 1);
      uint16_t want = (b & 1) ? up : b;
      if (got != want) {
        FAIL_AT("%s midpoint %a of 0x%04x and 0x%04x narrowed to 0x%04x, want 0x%04x",
                convd_dtype_name(dtype), mid, b, up, got, want);
        return;
      }
    }
  }
  /* Random floats over the whole exponent range, subnormals and overflow included. */
  rng r = {0x5eed1234abcdULL};
  for (int i = 0; i < 2000000; i++) {
    uint32_t u = (uint32_t)rng_next(&r);
    float f;
    memcpy(&f, &u, 4);
    if (isnan(f)) continue;
    uint16_t h;
    float got;
    convd_dtype_encode(dtype, &f, &h, 1);
    convd_dtype_decode(dtype, &h, &got, 1);
    double want = nearest_in_format(f, mant, emin, max);
    if ((double)got != want) {
      FAIL_AT("%s: %a narrowed to %a, nearest is %a", convd_dtype_name(dtype), f, got, want);
      return;
    }
  }
}

static void test_dtype_float16(void) { check_format(CONVD_F16, 10, -14, 65504.0); }

static void test_dtype_bfloat16(void) { check_format(CONVD_BF16, 7, -126, 0x1.fep127); }

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"reference_golden", test_reference_golden},
      {"validation_messages", test_validation_messages},
      {"band_roundtrip", test_band_roundtrip},
      {"band_layout", test_band_layout},
      {"reference_cancel", test_reference_cancel},
      {"reference_groups_split", test_reference_groups_split},
      {"reference_transpose_golden", test_reference_transpose_golden},
      {"reference_transpose_random", test_reference_transpose_random},
      {"transpose_phases", test_transpose_phases},
      {"dtype_float16", test_dtype_float16},
      {"dtype_bfloat16", test_dtype_bfloat16},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
