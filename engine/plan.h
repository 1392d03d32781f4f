/* The planner: cuts one convolution into elemental convolutions ("ops") that each fit a device's
 * memory budget, along the batch, output spatial tiles (input windows overlap by the kernel's
 * halo; zero padding only at the true borders), groups, output-channel blocks and input-channel
 * blocks (partial sums, accumulated per output tile).
 *
 * Op order: batch, tile row, tile column, group block, output-channel block, input-channel
 * block (innermost). Consecutive ops therefore share an output tile, and all ops of a tile row
 * come before the next one, so input rows can be freed and output rows sent in order.
 *
 * Threads: a plan is made on the thread that creates a job (convd_engine_plan) and never changes
 * after; the engine's workers then read it concurrently, without a lock. */
#ifndef CONVD_PLAN_H
#define CONVD_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "conv.h"
#include "view.h"

/* A CPU device's default budget: small enough that large streamed requests are cut into tile
 * rows (so the daemon holds a few rows, not the tensor), large enough that common layers are one
 * op. */
#define CONVD_DEFAULT_DEVICE_MEMORY (UINT64_C(64) << 20)

typedef struct convd_plan_opts {
  int devices;            /* devices that will share the ops (>= 1) */
  uint64_t device_memory; /* bytes one op may use on a device: its input window, weight block
                             and output tile, twice (double buffering) */
  int native_transpose;   /* every device runs a transpose op as one (convd_device's
                             native_transpose): a transpose that is worth it and fits is planned
                             as whole-item ops instead of phases (convd_plan.native) */
  uint64_t row_bytes;     /* when not 0: tile rows are cut shorter until one tile row's input
                             window and output rows take at most this (a streamed call holds
                             about two tile rows: convd_plan_memory_hint) */
} convd_plan_opts;

/* A transpose convolution (conv.p.transposed) is planned in phase space (transpose.h): tiles
 * are ranges of phase rows and columns q, each op computes one phase (ry, rx) of one tile as a
 * forward convolution of the input, and its output interleaves into the output rows
 * s*q + ry - pad. Tile row T covers the output rows of q in [qa + T*tile_h, ...) for every phase:
 * s_h * tile_h consecutive rows. */
typedef struct convd_plan {
  convd_conv conv;
  int64_t tile_h, tile_w;     /* output tile (transpose: in phase rows and columns q) */
  int64_t tiles_h, tiles_w;
  int64_t gblk, gblocks;      /* groups per op, group blocks */
  int64_t icb, icblocks;      /* input channels per op within a group block's group */
  int64_t ocb, ocblocks;      /* output channels per op within a group */
  uint64_t ops;
  uint64_t op_bytes;          /* the largest op's footprint, double-buffered */
  int transposed;             /* planned in phase space (a transpose that is not native) */
  int native;                 /* a transpose planned as one op per batch item, each the whole
                                 transposed convolution of that item (op->local.p.transposed):
                                 no phases, no segregated weights, the output written in place */
  int64_t phases;             /* transpose: stride_h * stride_w phases per tile, else 1 */
  int64_t qa_h, qa_w;         /* transpose: the first phase row and column */
} convd_plan;

/* Everything one op needs to know. Channel ranges are absolute. */
typedef struct convd_plan_op {
  uint64_t index;
  uint64_t tile;              /* output tile id: ops with the same id accumulate into it */
  int64_t n;
  int64_t oh0, oh1, ow0, ow1; /* output rows and columns */
  int64_t ih0, ih1, iw0, iw1; /* input window, clipped to the input */
  int64_t ic0, ic1, oc0, oc1; /* input and output channels */
  int64_t wc0, wc1;           /* weight columns (C_in/groups axis) */
  int icblock, icblocks;      /* position among the input-channel blocks of its tile */
  int empty;                  /* the window lies wholly in the padding: the result is the bias */
  convd_conv local;           /* the op as a convolution of its window (valid unless empty) */
  int64_t trow;               /* its tile row */
  int64_t xh0, xh1, xw0, xw1; /* the input window the op reads (the same as ih/iw except for a
                                 transpose, whose ih/iw are its tile row's window) */
  /* transpose: the phase, and its phase rows and columns in this tile (maybe none) */
  int64_t ry, rx, qh0, qh1, qw0, qw1;
} convd_plan_op;

/* Makes a plan; fails (CONVD_ELIMIT) only when even the smallest op (one output element, one
 * channel) does not fit device_memory. */
int convd_plan_make(convd_plan *plan, const convd_conv *conv, const convd_plan_opts *opts,
                    char *err, size_t errlen);

/* The geometry of op i < plan->ops. */
void convd_plan_op_get(const convd_plan *plan, uint64_t i, convd_plan_op *op);

/* Input rows [ih0, ih1) read by the ops of tile row th (all columns and channels). */
void convd_plan_tile_row_window(const convd_plan *plan, int64_t th, int64_t *ih0, int64_t *ih1);
/* Output rows [oh0, oh1) of tile row th, and the tile row of output row oh. */
void convd_plan_tile_rows(const convd_plan *plan, int64_t th, int64_t *oh0, int64_t *oh1);
int64_t convd_plan_row_tile(const convd_plan *plan, int64_t oh);
/* A transpose's weights, segregated once per job (transpose.h) into wseg (weight_elems floats):
 * the plan's weight views point into them. */
int convd_plan_segregate(const convd_plan *plan, const float *w, float *wseg); /* 0 or -1 (memory) */

/* Row access, so that ops can be cut from a whole NCHW tensor or from rows held one by one:
 * returns the start of row h of batch item n, with channel c at offset c * *cstride. */
typedef const float *(*convd_row_fn)(void *ctx, int64_t n, int64_t h, size_t *cstride);

/* Copies op's input window (channels ic0..ic1, rows ih0..ih1, columns iw0..iw1) into dst as a
 * contiguous 1 x C x H x W tensor. */
void convd_plan_gather_window(const convd_plan *plan, const convd_plan_op *op, convd_row_fn row,
                              void *ctx, float *dst);

/* op's weight block (oc, wc, kH, kW) as a view into the whole weight tensor w (a transpose: into
 * the segregated weights; a native plan's: the whole (C_in, C_out/groups, kH, kW) tensor, with n
 * the input channel). */
convd_view convd_plan_weight_view(const convd_plan *plan, const convd_plan_op *op, const float *w);

/* Writes op's output partial (dense oc x th x tw) into out, the view of the op's output tile
 * (its origin at channel oc0, row oh0, column ow0): copied when add is 0, else added. For a
 * transpose the partial holds the op's phase rows and columns, and they land interleaved at
 * their output positions (out's origin still at oc0, oh0, ow0). */
void convd_plan_accumulate(const convd_plan *plan, const convd_plan_op *op, const float *partial,
                           convd_view out, int add);

/* The output of an empty op, written into its tile's view: the bias on the first input-channel
 * block, zero otherwise. */
void convd_plan_fill_empty(const convd_plan *plan, const convd_plan_op *op, const float *bias,
                           convd_view out);

/* Writes a human-readable description (tile grid, block sizes, per-op bytes, op count). */
void convd_plan_describe(const convd_plan *plan, char *buf, size_t len);

#endif
