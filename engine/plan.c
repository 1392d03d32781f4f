#include "plan.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "err.h"

/* Spatial tiles and channel blocks are first cut down to this size, then the other way. */
#define PREFERRED_TILE 128
#define PREFERRED_BLOCK 128
/* Tiles cut before channel blocks stop at this size (step 2b). */
#define MIN_SPATIAL_TILE 8
/* Ops cut only for balance across devices keep at least this many multiply-adds. */
#define MIN_BALANCE_MACS (UINT64_C(1) << 27)

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Input rows (or columns) read by outputs [o0, o1) along one axis, unclipped. */
static void axis_window(int64_t o0, int64_t o1, int64_t stride, int64_t pad, int64_t k,
                        int64_t dil, int64_t *i0, int64_t *i1) {
  *i0 = o0 * stride - pad;
  *i1 = (o1 - 1) * stride - pad + (k - 1) * dil + 1;
}

/* Bytes of the largest op of a candidate plan, double-buffered; saturates. */
static uint64_t op_bytes(const convd_conv *c, int64_t th, int64_t tw, int64_t gblk, int64_t icb,
                         int64_t ocb) {
  const convd_conv_params *p = &c->p;
  int64_t i0, i1, j0, j1;
  axis_window(0, th, p->stride_h, 0, p->kh, p->dil_h, &i0, &i1);
  axis_window(0, tw, p->stride_w, 0, p->kw, p->dil_w, &j0, &j1);
  int64_t win_h = i1 - i0 < p->h ? i1 - i0 : p->h, win_w = j1 - j0 < p->w ? j1 - j0 : p->w;
  int64_t cin = gblk * icb, cout = gblk * ocb;
  long double bytes = 4.0L * ((long double)cin * win_h * win_w + (long double)cout * icb * p->kh * p->kw +
                              (long double)cout * th * tw);
  bytes *= 2;
  return bytes > (long double)UINT64_MAX ? UINT64_MAX : (uint64_t)bytes;
}

int convd_plan_make(convd_plan *pl, const convd_conv *c, const convd_plan_opts *o, char *err,
                    size_t errlen) {
  memset(pl, 0, sizeof *pl);
  pl->conv = *c;
  const convd_conv_params *p = &c->p;
  const int64_t cpg = p->c_per_group, opg = p->c_out / p->groups;
  const uint64_t budget = o->device_memory;
  int devices = o->devices > 0 ? o->devices : 1;

  int64_t th = c->h_out, tw = c->w_out, gblk = p->groups, icb = cpg, ocb = opg;
#define FITS() (op_bytes(c, th, tw, gblk, icb, ocb) <= budget)
  /* 1. Spatial down to the preferred tile, height first (down to a sixteenth of the width): a
   * short tile row needs few input rows, so a streamed request holds little memory. */
  while (!FITS() && (th > PREFERRED_TILE || tw > PREFERRED_TILE)) {
    if (th > PREFERRED_TILE && th * 16 >= tw) th = ceil_div(th, 2);
    else tw = ceil_div(tw, 2);
  }
  /* 2. Whole groups per op down to one group, then channel blocks down to the preferred one. */
  while (!FITS() && gblk > 1) gblk = ceil_div(gblk, 2);
  /* 2b. Smaller tiles are cheaper than channel blocks (a tile costs its halo, a channel block a
   * partial sum to add): when whole channels fit with tiles of at least MIN_SPATIAL_TILE, cut
   * tiles; otherwise leave the tile as it was and cut channels. */
  {
    const int64_t th0 = th, tw0 = tw;
    while (!FITS() && (th > MIN_SPATIAL_TILE || tw > MIN_SPATIAL_TILE)) {
      if (th > MIN_SPATIAL_TILE && (th * 2 >= tw || tw <= MIN_SPATIAL_TILE)) th = ceil_div(th, 2);
      else tw = ceil_div(tw, 2);
    }
    if (!FITS()) th = th0, tw = tw0;
  }
  while (!FITS() && (icb > PREFERRED_BLOCK || ocb > PREFERRED_BLOCK)) {
    if (icb >= ocb && icb > PREFERRED_BLOCK) icb = ceil_div(icb, 2);
    else ocb = ceil_div(ocb, 2);
  }
  /* 3. Spatial further, down to single outputs. */
  while (!FITS() && (th > 1 || tw > 1)) {
    if (th > 1 && th * 2 >= tw) th = ceil_div(th, 2);
    else tw = ceil_div(tw, 2);
  }
  /* 4. Channels further, down to one. */
  while (!FITS() && (icb > 1 || ocb > 1)) {
    if (icb >= ocb && icb > 1) icb = ceil_div(icb, 2);
    else ocb = ceil_div(ocb, 2);
  }
  if (!FITS())
    return convd_errf(err, errlen, CONVD_ELIMIT,
                      "even the smallest elemental convolution needs %" PRIu64
                      " bytes, more than the device budget of %" PRIu64
                      " bytes: raise the device memory budget",
                      op_bytes(c, th, tw, gblk, icb, ocb), budget);
  /* 5. Balance: with several devices, cut tile rows until each device has a few ops, as long
   * as an op keeps enough work to be worth its overhead. */
  for (;;) {
    uint64_t ops = (uint64_t)p->n * (uint64_t)ceil_div(c->h_out, th) *
                   (uint64_t)ceil_div(c->w_out, tw) * (uint64_t)ceil_div(p->groups, gblk) *
                   (uint64_t)ceil_div(opg, ocb) * (uint64_t)ceil_div(cpg, icb);
    uint64_t macs = (uint64_t)th * (uint64_t)tw * (uint64_t)(gblk * ocb) * (uint64_t)icb *
                    (uint64_t)(p->kh * p->kw);
    if (devices == 1 || ops >= (uint64_t)devices * 4 || macs / 2 < MIN_BALANCE_MACS || th == 1) break;
    th = ceil_div(th, 2);
  }
#undef FITS
  pl->tile_h = th, pl->tile_w = tw, pl->gblk = gblk, pl->icb = icb, pl->ocb = ocb;
  pl->tiles_h = ceil_div(c->h_out, th);
  pl->tiles_w = ceil_div(c->w_out, tw);
  pl->gblocks = ceil_div(p->groups, gblk);
  pl->icblocks = ceil_div(cpg, icb);
  pl->ocblocks = ceil_div(opg, ocb);
  pl->ops = (uint64_t)p->n * (uint64_t)pl->tiles_h * (uint64_t)pl->tiles_w * (uint64_t)pl->gblocks *
            (uint64_t)pl->ocblocks * (uint64_t)pl->icblocks;
  pl->op_bytes = op_bytes(c, th, tw, gblk, icb, ocb);
  return 0;
}

void convd_plan_op_get(const convd_plan *pl, uint64_t i, convd_plan_op *op) {
  const convd_conv *c = &pl->conv;
  const convd_conv_params *p = &c->p;
  memset(op, 0, sizeof *op);
  op->index = i;
  int64_t ib = (int64_t)(i % (uint64_t)pl->icblocks);
  uint64_t t = i / (uint64_t)pl->icblocks;
  op->tile = t;
  int64_t ob = (int64_t)(t % (uint64_t)pl->ocblocks);
  t /= (uint64_t)pl->ocblocks;
  int64_t gb = (int64_t)(t % (uint64_t)pl->gblocks);
  t /= (uint64_t)pl->gblocks;
  int64_t tw = (int64_t)(t % (uint64_t)pl->tiles_w);
  t /= (uint64_t)pl->tiles_w;
  int64_t th = (int64_t)(t % (uint64_t)pl->tiles_h);
  op->n = (int64_t)(t / (uint64_t)pl->tiles_h);

  op->oh0 = th * pl->tile_h;
  op->oh1 = op->oh0 + pl->tile_h < c->h_out ? op->oh0 + pl->tile_h : c->h_out;
  op->ow0 = tw * pl->tile_w;
  op->ow1 = op->ow0 + pl->tile_w < c->w_out ? op->ow0 + pl->tile_w : c->w_out;
  int64_t a0, a1, b0, b1;
  axis_window(op->oh0, op->oh1, p->stride_h, p->pad_top, p->kh, p->dil_h, &a0, &a1);
  axis_window(op->ow0, op->ow1, p->stride_w, p->pad_left, p->kw, p->dil_w, &b0, &b1);
  op->ih0 = a0 < 0 ? 0 : a0;
  op->ih1 = a1 > p->h ? p->h : a1;
  op->iw0 = b0 < 0 ? 0 : b0;
  op->iw1 = b1 > p->w ? p->w : b1;

  const int64_t cpg = p->c_per_group, opg = p->c_out / p->groups;
  int64_t g0 = gb * pl->gblk, g1 = g0 + pl->gblk < p->groups ? g0 + pl->gblk : p->groups;
  op->wc0 = ib * pl->icb;
  op->wc1 = op->wc0 + pl->icb < cpg ? op->wc0 + pl->icb : cpg;
  int64_t o0 = ob * pl->ocb, o1 = o0 + pl->ocb < opg ? o0 + pl->ocb : opg;
  int whole = op->wc0 == 0 && op->wc1 == cpg && o0 == 0 && o1 == opg;
  /* Several groups per op only when they are whole; otherwise the op is within one group. */
  op->ic0 = g0 * cpg + (whole ? 0 : op->wc0);
  op->ic1 = whole ? g1 * cpg : g0 * cpg + op->wc1;
  op->oc0 = g0 * opg + o0;
  op->oc1 = whole ? g1 * opg : g0 * opg + o1;
  op->icblock = (int)ib;
  op->icblocks = (int)pl->icblocks;
  op->empty = op->ih1 <= op->ih0 || op->iw1 <= op->iw0;
  if (op->empty) return;

  convd_conv_params lp;
  convd_conv_params_default(&lp);
  lp.n = 1;
  lp.c_in = op->ic1 - op->ic0;
  lp.h = op->ih1 - op->ih0;
  lp.w = op->iw1 - op->iw0;
  lp.c_out = op->oc1 - op->oc0;
  lp.groups = whole ? g1 - g0 : 1;
  lp.c_per_group = op->wc1 - op->wc0;
  lp.kh = p->kh, lp.kw = p->kw;
  lp.stride_h = p->stride_h, lp.stride_w = p->stride_w;
  lp.dil_h = p->dil_h, lp.dil_w = p->dil_w;
  lp.pad_top = op->ih0 - a0, lp.pad_bottom = a1 - op->ih1;
  lp.pad_left = op->iw0 - b0, lp.pad_right = b1 - op->iw1;
  lp.has_bias = p->has_bias && op->icblock == 0;
  /* A window that is all padding along one axis but the kernel still "fits" cannot happen:
   * the window is clipped to real rows and the op's padding restores the exact output size. */
  convd_conv_init(&op->local, &lp, NULL, 0);
}

void convd_plan_tile_row_window(const convd_plan *pl, int64_t th, int64_t *ih0, int64_t *ih1) {
  const convd_conv_params *p = &pl->conv.p;
  int64_t o0 = th * pl->tile_h, o1 = o0 + pl->tile_h < pl->conv.h_out ? o0 + pl->tile_h : pl->conv.h_out;
  int64_t a0, a1;
  axis_window(o0, o1, p->stride_h, p->pad_top, p->kh, p->dil_h, &a0, &a1);
  *ih0 = a0 < 0 ? 0 : a0;
  *ih1 = a1 > p->h ? p->h : a1;
  if (*ih1 < *ih0) *ih1 = *ih0;
}

void convd_plan_describe(const convd_plan *pl, char *buf, size_t len) {
  const convd_conv *c = &pl->conv;
  const convd_conv_params *p = &c->p;
  snprintf(buf, len,
           "convolution: input %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64 ", weight %" PRId64
           "x%" PRId64 "x%" PRId64 "x%" PRId64 ", groups %" PRId64 ", output %" PRId64 "x%" PRId64
           "x%" PRId64 "x%" PRId64 "\n"
           "output tiles: %" PRId64 " x %" PRId64 " of %" PRId64 "x%" PRId64 " (%" PRId64
           " spatial tiles per batch item, batch %" PRId64 ")\n"
           "group blocks: %" PRId64 " of %" PRId64 " group%s\n"
           "output-channel blocks: %" PRId64 " of %" PRId64 " (per group)\n"
           "input-channel blocks: %" PRId64 " of %" PRId64 " (per group; partial sums accumulated)\n"
           "channel blocks per spatial tile: %" PRId64 "\n"
           "bytes per op (input window + weight block + output tile, double-buffered): %" PRIu64 "\n"
           "elemental ops: %" PRIu64 "\n",
           p->n, p->c_in, p->h, p->w, p->c_out, p->c_per_group, p->kh, p->kw, p->groups, p->n,
           p->c_out, c->h_out, c->w_out, pl->tiles_h, pl->tiles_w, pl->tile_h, pl->tile_w,
           pl->tiles_h * pl->tiles_w, p->n, pl->gblocks, pl->gblk, pl->gblk == 1 ? "" : "s",
           pl->ocblocks, pl->ocb, pl->icblocks, pl->icb, pl->gblocks * pl->ocblocks * pl->icblocks,
           pl->op_bytes, pl->ops);
}

void convd_plan_gather_window(const convd_plan *pl, const convd_plan_op *op, convd_row_fn row,
                              void *ctx, float *dst) {
  const int64_t w = op->iw1 - op->iw0;
  for (int64_t c = op->ic0; c < op->ic1; c++)
    for (int64_t h = op->ih0; h < op->ih1; h++) {
      size_t cstride;
      const float *r = row(ctx, op->n, h, &cstride);
      memcpy(dst, r + (size_t)c * cstride + (size_t)op->iw0, (size_t)w * sizeof(float));
      dst += w;
    }
  (void)pl;
}

convd_view convd_plan_weight_view(const convd_plan *pl, const convd_plan_op *op, const float *w) {
  const convd_conv_params *p = &pl->conv.p;
  const size_t k = (size_t)(p->kh * p->kw);
  convd_view v = {(float *)w + ((size_t)op->oc0 * (size_t)p->c_per_group + (size_t)op->wc0) * k,
                  (size_t)p->c_per_group * k, k, (size_t)p->kw};
  return v;
}

void convd_plan_accumulate(const convd_plan *pl, const convd_plan_op *op, const float *partial,
                           convd_view out, int add) {
  const int64_t w = op->ow1 - op->ow0, h = op->oh1 - op->oh0;
  (void)pl;
  for (int64_t c = 0; c < op->oc1 - op->oc0; c++)
    for (int64_t y = 0; y < h; y++) {
      float *r = out.p + (size_t)c * out.cs + (size_t)y * out.hs;
      const float *src = partial + ((size_t)c * (size_t)h + (size_t)y) * (size_t)w;
      if (add)
        for (int64_t x = 0; x < w; x++) r[x] += src[x];
      else
        memcpy(r, src, (size_t)w * sizeof(float));
    }
}

void convd_plan_fill_empty(const convd_plan *pl, const convd_plan_op *op, const float *bias,
                           convd_view out) {
  const int64_t w = op->ow1 - op->ow0, h = op->oh1 - op->oh0;
  for (int64_t c = op->oc0; c < op->oc1; c++) {
    float v = pl->conv.p.has_bias && op->icblock == 0 && bias ? bias[c] : 0.0f;
    for (int64_t y = 0; y < h; y++) {
      float *r = out.p + (size_t)(c - op->oc0) * out.cs + (size_t)y * out.hs;
      for (int64_t x = 0; x < w; x++) r[x] = v;
    }
  }
}
