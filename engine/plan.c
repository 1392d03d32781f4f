/* See plan.h. convd_plan_make runs on the thread creating a job; everything else reads a made
 * plan, which never changes, so the engine's workers call it concurrently without a lock. */
#include "plan.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "err.h"
#include "transpose.h"

/* Spatial tiles and channel blocks are first cut down to this size, then the other way. */
#define PREFERRED_TILE 128
#define PREFERRED_BLOCK 128
/* Tiles cut before channel blocks stop at this size (step 2b). */
#define MIN_SPATIAL_TILE 8
/* The smallest output-channel block a pointwise layer is cut into before tiles (2a). */
#define MIN_POINTWISE_BLOCK 32
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

/* A transpose as the forward convolution its largest phase op is: stride 1, the longest
 * sub-kernel, its dilation, and the phase rows and columns as the output. Ops are sized on it. */
static void phase_space_conv(const convd_conv *c, convd_conv *v, int64_t *qa_h, int64_t *qa_w) {
  const convd_conv_params *p = &c->p;
  *v = *c;
  int64_t qb_h, qb_w;
  convd_phase_q_range(p->stride_h, p->pad_top, c->h_out, qa_h, &qb_h);
  convd_phase_q_range(p->stride_w, p->pad_left, c->w_out, qa_w, &qb_w);
  const int64_t gh = convd_gcd64(p->stride_h, p->dil_h), gw = convd_gcd64(p->stride_w, p->dil_w);
  v->p.transposed = 0;
  v->p.stride_h = v->p.stride_w = 1;
  v->p.kh = ceil_div(p->kh, p->stride_h / gh);
  v->p.kw = ceil_div(p->kw, p->stride_w / gw);
  v->p.dil_h = p->dil_h / gh;
  v->p.dil_w = p->dil_w / gw;
  v->h_out = qb_h - *qa_h;
  v->w_out = qb_w - *qa_w;
}

/* A transpose worth running whole on a device's own transposed-convolution kernel: one group
 * and at least NATIVE_MIN_CHANNELS input channels. Measured (bench_transpose,
 * docs/benchmarks.md): oneDNN's deconvolution beat the phases on every such layer, the RGB
 * output layer (128 -> 3) too (21-25 against 1-14 GFLOP/s); groups and thin inputs keep the
 * phases, which were not measured against it. */
#define NATIVE_MIN_CHANNELS 16
static int native_worth(const convd_conv *c) {
  const convd_conv_params *p = &c->p;
  /* oneDNN's deconvolution takes an output padding below the stride only (one up to the
   * dilation is PyTorch's too): those keep the phases. */
  return p->groups == 1 && p->c_in >= NATIVE_MIN_CHANNELS && p->out_pad_h < p->stride_h &&
         p->out_pad_w < p->stride_w;
}

/* One batch item's input and output rows. */
static uint64_t native_item_bytes(const convd_conv *c) {
  const long double b = ((long double)c->input_elems + (long double)c->output_elems) / (long double)c->p.n * sizeof(float);
  return b > (long double)UINT64_MAX ? UINT64_MAX : (uint64_t)b;
}

/* One batch item's whole transpose: its input and output double-buffered, as every op's, and
 * the weights once: every op of a native plan uses all of them, so a device keeps one copy for
 * the job rather than a block per op in flight. (Counted twice, the first DCGAN layer, 33.5 MB
 * of weights, missed the 64 MiB default by 0.6 %, and its phases ran at 0.7x the native op.) */
static uint64_t native_op_bytes(const convd_conv *c) {
  const long double bytes = 2.0L * (long double)native_item_bytes(c) +
                            ((long double)c->weight_elems + (long double)c->bias_elems) * sizeof(float);
  return bytes > (long double)UINT64_MAX ? UINT64_MAX : (uint64_t)bytes;
}

/* The input rows (all channels, the whole width) and output rows of a tile row th output rows
 * high. */
static uint64_t row_bytes(const convd_conv *c, int64_t th) {
  const convd_conv_params *p = &c->p;
  const long double in_rows = (long double)(th - 1) * (long double)p->stride_h + (long double)p->dil_h * (long double)(p->kh - 1) + 1;
  const long double b = (in_rows * (long double)p->c_in * (long double)p->w +
                         (long double)th * (long double)p->c_out * (long double)c->w_out) * sizeof(float);
  return b > (long double)UINT64_MAX ? UINT64_MAX : (uint64_t)b;
}

int convd_plan_make(convd_plan *pl, const convd_conv *real, const convd_plan_opts *o, char *err,
                    size_t errlen) {
  memset(pl, 0, sizeof *pl);
  pl->conv = *real;
  pl->phases = 1;
  if (real->p.transposed && o->native_transpose && native_worth(real) &&
      native_op_bytes(real) <= o->device_memory && (o->row_bytes == 0 || native_item_bytes(real) <= o->row_bytes)) {
    const convd_conv_params *p = &real->p;
    pl->native = 1;
    pl->tile_h = real->h_out, pl->tile_w = real->w_out, pl->tiles_h = pl->tiles_w = 1;
    pl->gblk = p->groups, pl->gblocks = 1;
    pl->icb = p->c_per_group, pl->icblocks = 1;
    pl->ocb = p->c_out / p->groups, pl->ocblocks = 1;
    pl->ops = (uint64_t)p->n;
    pl->op_bytes = native_op_bytes(real);
    return 0;
  }
  convd_conv virt;
  const convd_conv *c = real;
  if (real->p.transposed) { /* tiles in phase space, one op per phase */
    phase_space_conv(real, &virt, &pl->qa_h, &pl->qa_w);
    c = &virt;
    pl->transposed = 1;
    pl->phases = real->p.stride_h * real->p.stride_w;
  }
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
  /* 1b. Tile rows within the row budget: a streamed call holds about two of them, all channels
   * of their input rows and output rows, whatever the ops' size. */
  while (o->row_bytes && th > 1 && row_bytes(c, th) > o->row_bytes) th = ceil_div(th, 2);
  /* 2. Whole groups per op down to one group, then channel blocks down to the preferred one. */
  while (!FITS() && gblk > 1) gblk = ceil_div(gblk, 2);
  /* 2b. Smaller tiles are cheaper than channel blocks (a tile costs its halo, a channel block a
   * partial sum to add): when whole channels fit with tiles of at least MIN_SPATIAL_TILE, cut
   * tiles; otherwise leave the tile as it was and cut channels. */
  /* 2a. A pointwise convolution (1x1, stride 1, no padding) keeps whole rows: output-channel
   * blocks first, down to MIN_POINTWISE_BLOCK. Its ops then stay matrix products on the rows
   * where they lie (the CPU device's sgemm path, no reorder), and a block costs no partial sum
   * and no halo, only the input read again from cache. Tiles of a 512 -> 512 layer on 28x28
   * ran at 0.74x one op, output-channel blocks at 0.90x (bench_conv, docs/benchmarks.md). */
  if (p->kh == 1 && p->kw == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0 && p->pad_bottom == 0 &&
      p->pad_left == 0 && p->pad_right == 0) {
    const int64_t ocb0 = ocb;
    while (!FITS() && ocb > MIN_POINTWISE_BLOCK) ocb = ceil_div(ocb, 2);
    if (!FITS()) ocb = ocb0; /* the input is what does not fit: tiles below */
  }
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
                   (uint64_t)ceil_div(opg, ocb) * (uint64_t)ceil_div(cpg, icb) * (uint64_t)pl->phases;
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
            (uint64_t)pl->ocblocks * (uint64_t)pl->icblocks * (uint64_t)pl->phases;
  pl->op_bytes = op_bytes(c, th, tw, gblk, icb, ocb);
  return 0;
}

static void transpose_op(const convd_plan *pl, int64_t th, int64_t tw, int64_t phase,
                         convd_plan_op *op);

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
  int64_t phase = (int64_t)(t % (uint64_t)pl->phases);
  t /= (uint64_t)pl->phases;
  int64_t tw = (int64_t)(t % (uint64_t)pl->tiles_w);
  t /= (uint64_t)pl->tiles_w;
  int64_t th = (int64_t)(t % (uint64_t)pl->tiles_h);
  op->n = (int64_t)(t / (uint64_t)pl->tiles_h);

  op->trow = th;
  if (pl->native) { /* the item's whole transpose */
    op->oh1 = c->h_out, op->ow1 = c->w_out;
    op->ih1 = op->xh1 = p->h, op->iw1 = op->xw1 = p->w;
    op->ic1 = p->c_in, op->oc1 = p->c_out, op->wc1 = p->c_per_group;
    op->icblocks = 1;
    convd_conv_params lp = *p;
    lp.n = 1;
    convd_conv_init(&op->local, &lp, NULL, 0);
    return;
  }
  int64_t a0 = 0, a1 = 0, b0 = 0, b1 = 0;
  if (pl->transposed) {
    transpose_op(pl, th, tw, phase, op);
  } else {
    op->oh0 = th * pl->tile_h;
    op->oh1 = op->oh0 + pl->tile_h < c->h_out ? op->oh0 + pl->tile_h : c->h_out;
    op->ow0 = tw * pl->tile_w;
    op->ow1 = op->ow0 + pl->tile_w < c->w_out ? op->ow0 + pl->tile_w : c->w_out;
    axis_window(op->oh0, op->oh1, p->stride_h, p->pad_top, p->kh, p->dil_h, &a0, &a1);
    axis_window(op->ow0, op->ow1, p->stride_w, p->pad_left, p->kw, p->dil_w, &b0, &b1);
    op->ih0 = op->xh0 = a0 < 0 ? 0 : a0;
    op->ih1 = op->xh1 = a1 > p->h ? p->h : a1;
    op->iw0 = op->xw0 = b0 < 0 ? 0 : b0;
    op->iw1 = op->xw1 = b1 > p->w ? p->w : b1;
  }

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
  convd_conv_params lp;
  convd_conv_params_default(&lp);
  if (pl->transposed) {
    /* the phase as a forward convolution of its window: stride 1, the reversed sub-kernel */
    convd_phase_axis ay, ax;
    convd_phase_axis_make(p->stride_h, p->dil_h, p->kh, p->pad_top, c->h_out, op->ry, &ay);
    convd_phase_axis_make(p->stride_w, p->dil_w, p->kw, p->pad_left, c->w_out, op->rx, &ax);
    int64_t pt, pb, pl_, pr;
    int win = convd_phase_window(&ay, p->h, op->qh0, op->qh1, &op->xh0, &op->xh1, &pt, &pb) &
              convd_phase_window(&ax, p->w, op->qw0, op->qw1, &op->xw0, &op->xw1, &pl_, &pr);
    op->empty = !win;
    lp.kh = ay.taps, lp.kw = ax.taps;
    lp.dil_h = ay.dil, lp.dil_w = ax.dil;
    lp.pad_top = pt, lp.pad_bottom = pb, lp.pad_left = pl_, lp.pad_right = pr;
  } else {
    op->empty = op->ih1 <= op->ih0 || op->iw1 <= op->iw0;
    lp.kh = p->kh, lp.kw = p->kw;
    lp.stride_h = p->stride_h, lp.stride_w = p->stride_w;
    lp.dil_h = p->dil_h, lp.dil_w = p->dil_w;
    lp.pad_top = op->ih0 - a0, lp.pad_bottom = a1 - op->ih1;
    lp.pad_left = op->iw0 - b0, lp.pad_right = b1 - op->iw1;
  }
  if (op->empty) return;
  lp.n = 1;
  lp.c_in = op->ic1 - op->ic0;
  lp.h = op->xh1 - op->xh0;
  lp.w = op->xw1 - op->xw0;
  lp.c_out = op->oc1 - op->oc0;
  lp.groups = whole ? g1 - g0 : 1;
  lp.c_per_group = op->wc1 - op->wc0;
  lp.has_bias = p->has_bias && op->icblock == 0;
  lp.dtype = p->dtype;
  lp.allow_tf32 = p->allow_tf32;
  /* A window that is all padding along one axis but the kernel still "fits" cannot happen:
   * the window is clipped to real rows and the op's padding restores the exact output size. */
  convd_conv_init(&op->local, &lp, NULL, 0);
}

/* A transpose's tile (th, tw) of phase rows/columns, for one phase: which q it has, which output
 * rows and columns the tile covers, and the input the tile row reads over all phases. */
static void phase_tile(const convd_plan *pl, int64_t t, int horizontal, int64_t r, int64_t *q0,
                       int64_t *q1) {
  const convd_conv *c = &pl->conv;
  const convd_conv_params *p = &c->p;
  convd_phase_axis a;
  const int64_t tile = horizontal ? pl->tile_w : pl->tile_h, qa = horizontal ? pl->qa_w : pl->qa_h;
  convd_phase_axis_make(horizontal ? p->stride_w : p->stride_h, horizontal ? p->dil_w : p->dil_h,
                        horizontal ? p->kw : p->kh, horizontal ? p->pad_left : p->pad_top,
                        horizontal ? c->w_out : c->h_out, r, &a);
  *q0 = qa + t * tile > a.q0 ? qa + t * tile : a.q0;
  *q1 = qa + (t + 1) * tile < a.q1 ? qa + (t + 1) * tile : a.q1;
  if (*q1 < *q0) *q1 = *q0;
}

/* Output rows (or columns) of transpose tile t: [base + t*s*tile, ...) clipped. */
static void phase_tile_out(const convd_plan *pl, int64_t t, int horizontal, int64_t *o0, int64_t *o1) {
  const convd_conv *c = &pl->conv;
  const convd_conv_params *p = &c->p;
  const int64_t s = horizontal ? p->stride_w : p->stride_h, tile = horizontal ? pl->tile_w : pl->tile_h;
  const int64_t base = s * (horizontal ? pl->qa_w : pl->qa_h) - (horizontal ? p->pad_left : p->pad_top);
  const int64_t out = horizontal ? c->w_out : c->h_out;
  *o0 = base + t * s * tile < 0 ? 0 : base + t * s * tile;
  *o1 = base + (t + 1) * s * tile < out ? base + (t + 1) * s * tile : out;
}

/* The input a transpose tile reads, over all its phases (rows or columns). */
static void phase_tile_window(const convd_plan *pl, int64_t t, int horizontal, int64_t *i0, int64_t *i1) {
  const convd_conv *c = &pl->conv;
  const convd_conv_params *p = &c->p;
  const int64_t s = horizontal ? p->stride_w : p->stride_h;
  int any = 0;
  *i0 = *i1 = 0;
  for (int64_t r = 0; r < s; r++) {
    convd_phase_axis a;
    convd_phase_axis_make(s, horizontal ? p->dil_w : p->dil_h, horizontal ? p->kw : p->kh,
                          horizontal ? p->pad_left : p->pad_top, horizontal ? c->w_out : c->h_out, r, &a);
    int64_t q0, q1, w0, w1, pa, pb;
    phase_tile(pl, t, horizontal, r, &q0, &q1);
    if (!convd_phase_window(&a, horizontal ? p->w : p->h, q0, q1, &w0, &w1, &pa, &pb)) continue;
    if (!any || w0 < *i0) *i0 = w0;
    if (!any || w1 > *i1) *i1 = w1;
    any = 1;
  }
}

static void transpose_op(const convd_plan *pl, int64_t th, int64_t tw, int64_t phase,
                         convd_plan_op *op) {
  const convd_conv_params *p = &pl->conv.p;
  op->ry = phase / p->stride_w;
  op->rx = phase % p->stride_w;
  phase_tile(pl, th, 0, op->ry, &op->qh0, &op->qh1);
  phase_tile(pl, tw, 1, op->rx, &op->qw0, &op->qw1);
  phase_tile_out(pl, th, 0, &op->oh0, &op->oh1);
  phase_tile_out(pl, tw, 1, &op->ow0, &op->ow1);
  phase_tile_window(pl, th, 0, &op->ih0, &op->ih1);
  phase_tile_window(pl, tw, 1, &op->iw0, &op->iw1);
}

void convd_plan_tile_rows(const convd_plan *pl, int64_t th, int64_t *oh0, int64_t *oh1) {
  if (pl->transposed) {
    phase_tile_out(pl, th, 0, oh0, oh1);
    return;
  }
  *oh0 = th * pl->tile_h;
  *oh1 = *oh0 + pl->tile_h < pl->conv.h_out ? *oh0 + pl->tile_h : pl->conv.h_out;
}

int64_t convd_plan_row_tile(const convd_plan *pl, int64_t oh) {
  if (!pl->transposed) return oh / pl->tile_h;
  const convd_conv_params *p = &pl->conv.p;
  const int64_t base = p->stride_h * pl->qa_h - p->pad_top;
  return (oh - base) / (p->stride_h * pl->tile_h);
}

int convd_plan_segregate(const convd_plan *pl, const float *w, float *wseg) {
  return convd_transpose_segregate(&pl->conv, w, wseg, NULL);
}

void convd_plan_tile_row_window(const convd_plan *pl, int64_t th, int64_t *ih0, int64_t *ih1) {
  if (pl->native) { /* one tile row: every input row */
    *ih0 = 0, *ih1 = pl->conv.p.h;
    return;
  }
  if (pl->transposed) {
    phase_tile_window(pl, th, 0, ih0, ih1);
    return;
  }
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
  const size_t used = strlen(buf);
  if (used < len)
    snprintf(buf + used, len - used, "%s",
             pl->native ? "transpose: one op per batch item, on the device's own transposed convolution\n"
             : pl->transposed ? "transpose: by kernel segregation, one op per phase\n" : "");
}

void convd_plan_gather_window(const convd_plan *pl, const convd_plan_op *op, convd_row_fn row,
                              void *ctx, float *dst) {
  const int64_t w = op->xw1 - op->xw0;
  for (int64_t c = op->ic0; c < op->ic1; c++)
    for (int64_t h = op->xh0; h < op->xh1; h++) {
      size_t cstride;
      const float *r = row(ctx, op->n, h, &cstride);
      memcpy(dst, r + (size_t)c * cstride + (size_t)op->xw0, (size_t)w * sizeof(float));
      dst += w;
    }
  (void)pl;
}

/* Where phase (ry, rx)'s block starts in the segregated weights: the blocks before it hold, per
 * (output channel, input channel of its group), the taps of the phases before it; the phases
 * partition each axis's taps, so the rows' taps before ry times all kW columns, plus ry's taps
 * times the columns' taps before rx. */
static size_t phase_offset(const convd_plan *pl, int64_t ry, int64_t rx, int64_t *ty, int64_t *tx) {
  const convd_conv *c = &pl->conv;
  const convd_conv_params *p = &c->p;
  int64_t before_y = 0, before_x = 0;
  convd_phase_axis a;
  for (int64_t r = 0; r < ry; r++) {
    convd_phase_axis_make(p->stride_h, p->dil_h, p->kh, p->pad_top, c->h_out, r, &a);
    before_y += a.taps;
  }
  for (int64_t r = 0; r < rx; r++) {
    convd_phase_axis_make(p->stride_w, p->dil_w, p->kw, p->pad_left, c->w_out, r, &a);
    before_x += a.taps;
  }
  convd_phase_axis_make(p->stride_h, p->dil_h, p->kh, p->pad_top, c->h_out, ry, &a);
  *ty = a.taps;
  convd_phase_axis_make(p->stride_w, p->dil_w, p->kw, p->pad_left, c->w_out, rx, &a);
  *tx = a.taps;
  return (size_t)p->c_out * (size_t)p->c_per_group * (size_t)(before_y * p->kw + *ty * before_x);
}

convd_view convd_plan_weight_view(const convd_plan *pl, const convd_plan_op *op, const float *w) {
  const convd_conv_params *p = &pl->conv.p;
  if (pl->native) {
    const size_t k = (size_t)(p->kh * p->kw);
    return (convd_view){(float *)w, (size_t)(p->c_out / p->groups) * k, k, (size_t)p->kw};
  }
  if (pl->transposed) {
    int64_t ty, tx;
    const size_t base = phase_offset(pl, op->ry, op->rx, &ty, &tx), k = (size_t)(ty * tx);
    convd_view v = {(float *)w + base + ((size_t)op->oc0 * (size_t)p->c_per_group + (size_t)op->wc0) * k,
                    (size_t)p->c_per_group * k, k, (size_t)tx};
    return v;
  }
  const size_t k = (size_t)(p->kh * p->kw);
  convd_view v = {(float *)w + ((size_t)op->oc0 * (size_t)p->c_per_group + (size_t)op->wc0) * k,
                  (size_t)p->c_per_group * k, k, (size_t)p->kw};
  return v;
}

void convd_plan_accumulate(const convd_plan *pl, const convd_plan_op *op, const float *partial,
                           convd_view out, int add) {
  if (pl->transposed) { /* interleave: phase row q lands on output row s*q + ry - pad */
    const convd_conv_params *p = &pl->conv.p;
    const int64_t qh = op->qh1 - op->qh0, qw = op->qw1 - op->qw0, sw = p->stride_w;
    const int64_t y0 = p->stride_h * op->qh0 + op->ry - p->pad_top - op->oh0;
    const int64_t x0 = sw * op->qw0 + op->rx - p->pad_left - op->ow0;
    for (int64_t c = 0; c < op->oc1 - op->oc0; c++)
      for (int64_t t = 0; t < qh; t++) {
        float *r = out.p + (size_t)c * out.cs + (size_t)(y0 + t * p->stride_h) * out.hs + (size_t)x0;
        const float *src = partial + ((size_t)c * (size_t)qh + (size_t)t) * (size_t)qw;
        if (add)
          for (int64_t u = 0; u < qw; u++) r[u * sw] += src[u];
        else
          for (int64_t u = 0; u < qw; u++) r[u * sw] = src[u];
      }
    return;
  }
  const int64_t w = op->ow1 - op->ow0, h = op->oh1 - op->oh0;
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
  /* a transpose's op writes its phase rows and columns (dense, then interleaved) */
  const int64_t w = pl->transposed ? op->qw1 - op->qw0 : op->ow1 - op->ow0;
  const int64_t h = pl->transposed ? op->qh1 - op->qh0 : op->oh1 - op->oh0;
  for (int64_t c = op->oc0; c < op->oc1; c++) {
    float v = pl->conv.p.has_bias && op->icblock == 0 && bias ? bias[c] : 0.0f;
    for (int64_t y = 0; y < h; y++) {
      float *r = out.p + (size_t)(c - op->oc0) * out.cs + (size_t)y * out.hs;
      for (int64_t x = 0; x < w; x++) r[x] = v;
    }
  }
}
