/* Devices: one interface for every kind of compute (reference, CPU, CUDA). This header is the
 * public side: an opaque handle, the op a device runs, its counters, the constructors and the
 * wrappers every caller goes through. The function table and the struct behind the handle are
 * in device_impl.h, for device implementations only.
 *
 * Threads: the scheduler (engine.c) owns one worker thread per device and calls
 * convd_device_run() on it, one elemental op at a time, so a device needs no lock of its own
 * for its caches; a device never sees a whole request. convd_device_flush_cache() runs on that
 * worker too. convd_device_supports() (on the thread creating a job), convd_device_stats_get()
 * and the accessors may run on any thread: what they read never changes after creation or is
 * counted with atomics. convd_device_destroy() runs once the worker has stopped. Outside an
 * engine (tests, benchmarks) the one thread that owns the device calls everything. */
#ifndef CONVD_DEVICE_H
#define CONVD_DEVICE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "conv.h"
#include "convd_fields.h"
#include "view.h"

enum convd_device_kind {
  CONVD_DEVICE_CPU = 1,
  CONVD_DEVICE_CUDA = 2,
  CONVD_DEVICE_REFERENCE = 3,
};

/* One elemental convolution in host memory. Tensors are strided views (view.h) so that the
 * engine can pass an input window where it lies in a row band and let the device write its
 * output tile straight into the output rows; a device copies or reorders as it needs. */
typedef struct convd_op_io {
  const convd_conv *conv; /* checked by convd_conv_init; n may be > 1 */
  convd_view x;           /* N x C x H x W, read only */
  convd_view w;           /* C_out x C_in/groups x kH x kW (n = output channel), read only */
  uint64_t w_key;         /* names w's contents for the device's weight cache; 0 = do not cache */
  const float *b;         /* C_out, or NULL */
  convd_view y;           /* N x C_out x H_out x W_out, overwritten */
  const atomic_int *cancel; /* non-zero: the job was cancelled; a device may stop early and
                               return CONVD_ECANCELED (the reference polls it per output plane) */
  /* A chain (only for devices that set `accumulates`): this op is input-channel block
   * chain_pos of the chain_len blocks of one output tile, all handed to this device in order
   * with nothing in between. The device keeps their sum where it likes (a GPU: in its memory,
   * cuDNN's beta = 1) and writes y once, complete, at the last block; before that y is not
   * touched. A chain that fails part-way is run again from its first block. chain_len <= 1: a
   * lone op, y written at once. */
  int chain_pos, chain_len;
} convd_op_io;

/* The io of an op on dense NCHW tensors. */
convd_op_io convd_op_io_dense(const convd_conv *conv, const float *x, const float *w,
                              uint64_t w_key, const float *b, float *y, const atomic_int *cancel);

/* What a device counts over its life (for metrics and tests; all optional, zero when not
 * counted). Read while ops run: values are monotonic and read without a lock. */
typedef struct convd_device_stats {
  CONVD_DEVICE_STATS_FIELDS(CONVD_FIELD_DECLARE) /* convd_fields.h */
} convd_device_stats;

/* A device: opaque here (device_impl.h). */
typedef struct convd_device convd_device;

/* The reference kernel as a device: for validation, and where nothing faster exists. */
int convd_device_ref_create(const char *name, uint64_t memory_budget, convd_device **out,
                            char *err, size_t errlen);

/* A CPU device running oneDNN's convolution on `threads` threads (0 = all online CPUs);
 * bfloat16 ops in bf16 where the CPU has bf16 units (found here, named in its detail), all else
 * in float32. Built without oneDNN, it runs the reference kernel and says so in its detail. */
int convd_device_cpu_create(const char *name, int threads, uint64_t memory_budget,
                            convd_device **out, char *err, size_t errlen);

/* 1 when CPU devices run oneDNN in this build. */
int convd_device_cpu_is_native(void);

/* Native transposes a CPU device computed on the reference kernel because oneDNN had no
 * deconvolution for them (in the layouts it may use); 0 for any other device. */
uint64_t convd_device_cpu_reference_transposes(const convd_device *d);

void convd_device_destroy(convd_device *d);

/* ---- what callers use (never the function table) ------------------------------------------ */

/* Runs one op to completion on the calling thread (the device's worker). Returns 0 or a
 * negative convd error with err filled in. */
int convd_device_run(convd_device *d, const convd_op_io *io, char *err, size_t errlen);
/* 1 when the device can run conv: a job's whole convolution (a transpose's too; each of its
 * ops is no larger in any dimension), asked once when the job is created. */
int convd_device_supports(const convd_device *d, const convd_conv *conv);
/* Drops the device's cached weight blocks (nothing when it keeps none). */
void convd_device_flush_cache(convd_device *d);
/* The device's counters, all zero when it keeps none. */
void convd_device_stats_get(const convd_device *d, convd_device_stats *out);

int convd_device_kind(const convd_device *d);                /* enum convd_device_kind */
const char *convd_device_name(const convd_device *d);
const char *convd_device_detail(const convd_device *d);      /* what runs on it, for people */
uint64_t convd_device_memory_budget(const convd_device *d);  /* bytes one op may use on it */
int convd_device_accumulates(const convd_device *d);         /* 1: takes chains (chain_len) */
int convd_device_native_transpose(const convd_device *d);    /* 1: runs a whole transpose op */

#endif
