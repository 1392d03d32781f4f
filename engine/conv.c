/* See conv.h. Any thread: pure functions of their arguments, no shared state. */
#include "conv.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>

#include "dtype.h"
#include "err.h"

void convd_conv_params_default(convd_conv_params *p) {
  *p = (convd_conv_params){0};
  p->stride_h = p->stride_w = 1;
  p->dil_h = p->dil_w = 1;
  p->groups = 1;
}

int convd_conv_params_same(const convd_conv_params *a, const convd_conv_params *b) {
  return a->n == b->n && a->c_in == b->c_in && a->h == b->h && a->w == b->w &&
         a->c_out == b->c_out && a->c_per_group == b->c_per_group && a->kh == b->kh &&
         a->kw == b->kw && a->has_bias == b->has_bias && a->stride_h == b->stride_h &&
         a->stride_w == b->stride_w && a->pad_top == b->pad_top &&
         a->pad_bottom == b->pad_bottom && a->pad_left == b->pad_left &&
         a->pad_right == b->pad_right && a->dil_h == b->dil_h && a->dil_w == b->dil_w &&
         a->groups == b->groups && a->dtype == b->dtype && a->allow_tf32 == b->allow_tf32 &&
         a->transposed == b->transposed && a->out_pad_h == b->out_pad_h &&
         a->out_pad_w == b->out_pad_w;
}

int convd_size_mul(size_t a, size_t b, size_t *out) {
  return __builtin_mul_overflow(a, b, out) ? -1 : 0;
}

int convd_size_add(size_t a, size_t b, size_t *out) {
  return __builtin_add_overflow(a, b, out) ? -1 : 0;
}

/* Product of n non-negative dims times elem_size, or -1 on overflow. */
static int prod_bytes(const int64_t *dims, int n, size_t elem_size, size_t *elems, size_t *bytes) {
  size_t e = 1;
  for (int i = 0; i < n; i++)
    if (convd_size_mul(e, (size_t)dims[i], &e)) return -1;
  if (convd_size_mul(e, elem_size, bytes)) return -1;
  *elems = e;
  return 0;
}

static int check_range(const char *what, int64_t v, int64_t lo, char *err, size_t errlen) {
  if (v < lo || v > CONVD_DIM_MAX)
    return convd_errf(err, errlen, CONVD_EINVAL, "%s = %lld: must be between %lld and %lld", what,
                      (long long)v, (long long)lo, (long long)CONVD_DIM_MAX);
  return 0;
}

int convd_conv_init(convd_conv *c, const convd_conv_params *p, char *err, size_t errlen) {
  *c = (convd_conv){0};
  c->p = *p;

  if (p->n < 1 || p->c_in < 1 || p->h < 1 || p->w < 1)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "input shape N,C,H,W = %lld,%lld,%lld,%lld: every dimension must be at least 1",
                      (long long)p->n, (long long)p->c_in, (long long)p->h, (long long)p->w);
  if (p->c_out < 1 || p->c_per_group < 1 || p->kh < 1 || p->kw < 1)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "weight shape C_out,C_in/groups,kH,kW = %lld,%lld,%lld,%lld: every dimension "
                      "must be at least 1",
                      (long long)p->c_out, (long long)p->c_per_group, (long long)p->kh,
                      (long long)p->kw);
  const struct {
    const char *what;
    int64_t v, lo;
  } fields[] = {
      {"input N", p->n, 1},          {"input C", p->c_in, 1},
      {"input H", p->h, 1},          {"input W", p->w, 1},
      {"weight C_out", p->c_out, 1}, {"weight C_in/groups", p->c_per_group, 1},
      {"kernel height", p->kh, 1},   {"kernel width", p->kw, 1},
      {"stride height", p->stride_h, 1}, {"stride width", p->stride_w, 1},
      {"padding top", p->pad_top, 0}, {"padding bottom", p->pad_bottom, 0},
      {"padding left", p->pad_left, 0}, {"padding right", p->pad_right, 0},
      {"dilation height", p->dil_h, 1}, {"dilation width", p->dil_w, 1},
      {"groups", p->groups, 1},
  };
  if (convd_dtype_size(p->dtype) == 0)
    return convd_errf(err, errlen, CONVD_ENOTSUP,
                      "dtype %d is not one this daemon serves (float32, float16, bfloat16)",
                      p->dtype);
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    int rc = check_range(fields[i].what, fields[i].v, fields[i].lo, err, errlen);
    if (rc) return rc;
  }

  if (p->c_in % p->groups != 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "groups = %lld does not divide the %lld input channels", (long long)p->groups,
                      (long long)p->c_in);
  if (p->c_out % p->groups != 0)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "groups = %lld does not divide the %lld output channels (weight C_out)",
                      (long long)p->groups, (long long)p->c_out);
  if (p->c_per_group != p->c_in / p->groups)
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "weight shape has C_in/groups = %lld, but input channels %lld / groups %lld "
                      "= %lld",
                      (long long)p->c_per_group, (long long)p->c_in, (long long)p->groups,
                      (long long)(p->c_in / p->groups));

  /* All operands are below 2^31, so these int64 sums and products cannot overflow. */
  int64_t kh_eff = p->dil_h * (p->kh - 1) + 1;
  int64_t kw_eff = p->dil_w * (p->kw - 1) + 1;
  if (p->transposed) {
    /* one op dimension per phase: bounded so that a plan's bookkeeping stays small */
    if (p->stride_h * p->stride_w > 4096)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "transpose stride %lldx%lld: at most 4096 phases (stride_h * stride_w) "
                        "are served",
                        (long long)p->stride_h, (long long)p->stride_w);
    if (p->out_pad_h < 0 || p->out_pad_w < 0 ||
        (p->out_pad_h >= p->stride_h && p->out_pad_h >= p->dil_h) ||
        (p->out_pad_w >= p->stride_w && p->out_pad_w >= p->dil_w))
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "output_padding %lld,%lld: each must be smaller than its axis's stride or "
                        "dilation (stride %lld,%lld, dilation %lld,%lld)",
                        (long long)p->out_pad_h, (long long)p->out_pad_w, (long long)p->stride_h,
                        (long long)p->stride_w, (long long)p->dil_h, (long long)p->dil_w);
    /* The full output, before the padding crops it. */
    const int64_t fh = (p->h - 1) * p->stride_h + kh_eff + p->out_pad_h;
    const int64_t fw = (p->w - 1) * p->stride_w + kw_eff + p->out_pad_w;
    c->h_out = fh - p->pad_top - p->pad_bottom;
    c->w_out = fw - p->pad_left - p->pad_right;
    if (c->h_out > CONVD_DIM_MAX || c->w_out > CONVD_DIM_MAX)
      return convd_errf(err, errlen, CONVD_EINVAL, "transpose output %lldx%lld: each side must be at most %lld",
                        (long long)c->h_out, (long long)c->w_out, (long long)CONVD_DIM_MAX);
    if (c->h_out < 1 || c->w_out < 1)
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "transpose output %lldx%lld: the padding (%lld+%lld, %lld+%lld) crops away "
                        "the whole %lldx%lld result",
                        (long long)c->h_out, (long long)c->w_out, (long long)p->pad_top,
                        (long long)p->pad_bottom, (long long)p->pad_left, (long long)p->pad_right,
                        (long long)fh, (long long)fw);
  } else if (p->out_pad_h || p->out_pad_w) {
    return convd_errf(err, errlen, CONVD_EINVAL,
                      "output_padding applies to transpose convolution only");
  }
  if (!p->transposed) {
    int64_t hp = p->h + p->pad_top + p->pad_bottom;
    int64_t wp = p->w + p->pad_left + p->pad_right;
    if (kh_eff > hp || kw_eff > wp) {
      if (p->dil_h == 1 && p->dil_w == 1)
        return convd_errf(err, errlen, CONVD_EINVAL,
                          "kernel %lldx%lld is larger than padded input %lldx%lld", (long long)p->kh,
                          (long long)p->kw, (long long)hp, (long long)wp);
      return convd_errf(err, errlen, CONVD_EINVAL,
                        "kernel %lldx%lld (dilated %lldx%lld) is larger than padded input %lldx%lld",
                        (long long)p->kh, (long long)p->kw, (long long)kh_eff, (long long)kw_eff,
                        (long long)hp, (long long)wp);
    }
    c->h_out = (hp - kh_eff) / p->stride_h + 1;
    c->w_out = (wp - kw_eff) / p->stride_w + 1;
  }

  const int64_t in[4] = {p->n, p->c_in, p->h, p->w};
  const int64_t wt[4] = {p->c_out, p->c_per_group, p->kh, p->kw};
  const int64_t out[4] = {p->n, p->c_out, c->h_out, c->w_out};
  const int64_t bias[1] = {p->has_bias ? p->c_out : 0};
  if (prod_bytes(in, 4, sizeof(float), &c->input_elems, &c->input_bytes))
    return convd_errf(err, errlen, CONVD_ERANGE, "input of %lldx%lldx%lldx%lld elements is too large",
                      (long long)in[0], (long long)in[1], (long long)in[2], (long long)in[3]);
  if (prod_bytes(wt, 4, sizeof(float), &c->weight_elems, &c->weight_bytes))
    return convd_errf(err, errlen, CONVD_ERANGE,
                      "weight of %lldx%lldx%lldx%lld elements is too large", (long long)wt[0],
                      (long long)wt[1], (long long)wt[2], (long long)wt[3]);
  if (prod_bytes(out, 4, sizeof(float), &c->output_elems, &c->output_bytes))
    return convd_errf(err, errlen, CONVD_ERANGE,
                      "output of %lldx%lldx%lldx%lld elements is too large", (long long)out[0],
                      (long long)out[1], (long long)out[2], (long long)out[3]);
  prod_bytes(bias, 1, sizeof(float), &c->bias_elems, &c->bias_bytes);
  /* The wire's elements are at most 4 bytes, so these cannot overflow either. */
  c->wire_elem = convd_dtype_size(p->dtype);
  c->input_wire_bytes = c->input_elems * c->wire_elem;
  c->weight_wire_bytes = c->weight_elems * c->wire_elem;
  c->bias_wire_bytes = c->bias_elems * c->wire_elem;
  c->output_wire_bytes = c->output_elems * c->wire_elem;

  /* macs = output elements * (C_in/groups * kH * kW), for a transpose input elements *
   * (C_out/groups * kH * kW); saturate, it only feeds statistics. */
  uint64_t m = p->transposed ? (uint64_t)c->input_elems : (uint64_t)c->output_elems;
  if (__builtin_mul_overflow(m, (uint64_t)(p->transposed ? p->c_out / p->groups : p->c_per_group), &m) ||
      __builtin_mul_overflow(m, (uint64_t)p->kh, &m) || __builtin_mul_overflow(m, (uint64_t)p->kw, &m))
    m = UINT64_MAX;
  c->macs = m;
  return 0;
}

int convd_parse_size(const char *s, uint64_t *out) {
  if (s == NULL || !isdigit((unsigned char)*s)) return -1;
  errno = 0;
  char *end;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno) return -1;
  uint64_t mul = 1;
  switch (*end) {
    case '\0': break;
    case 'k': case 'K': mul = 1ull << 10; end++; break;
    case 'm': case 'M': mul = 1ull << 20; end++; break;
    case 'g': case 'G': mul = 1ull << 30; end++; break;
    case 't': case 'T': mul = 1ull << 40; end++; break;
    default: return -1;
  }
  if (*end == 'i' || *end == 'I') end++; /* accept "4MiB"-style suffixes too */
  if (*end == 'b' || *end == 'B') end++;
  if (*end != '\0') return -1;
  if (__builtin_mul_overflow((uint64_t)v, mul, out)) return -1;
  return 0;
}
