/* What is behind a convd_device handle (device.h): a table of functions plus a context, filled
 * by each device implementation as a static const table (device_ref.c, device_cpu.c,
 * cuda/device_cuda.c, and test-only wrappers in tests/). Included only by those: the rest of the
 * engine, the daemon and the tests go through the wrappers in device.h.
 *
 * Threads: as in device.h. run() and flush_cache() are called on the device's worker thread
 * only, one call at a time, so a context needs no lock for what they touch; supports() and
 * stats() may be called from any thread while run() runs; destroy() after the last of them. */
#ifndef CONVD_DEVICE_IMPL_H
#define CONVD_DEVICE_IMPL_H

#include "device.h"

typedef struct convd_device_iface {
  /* 1 when this device can run conv (a job's whole convolution, asked once per job): a device
   * saying 0 is given none of that job's ops. Reads only conv and what never changes. */
  int (*supports)(void *ctx, const convd_conv *conv);
  /* Runs one op to completion on the calling thread. Returns 0 or a negative convd error. */
  int (*run)(void *ctx, const convd_op_io *io, char *err, size_t errlen);
  /* Optional (NULL): drops cached weight blocks. The engine calls it when it takes the device
   * out of service (a device that failed gets no more work, so what it caches is never used
   * again); not when a job ends, since the caches exist to keep weights across jobs (keyed by
   * content). destroy() frees the cache itself. */
  void (*flush_cache)(void *ctx);
  /* Optional (NULL): the device's counters; callable from any thread. */
  void (*stats)(void *ctx, convd_device_stats *out);
  void (*destroy)(void *ctx);
} convd_device_iface;

struct convd_device {
  const convd_device_iface *iface;
  void *ctx;
  int kind;               /* enum convd_device_kind */
  char name[64];
  char detail[128];
  uint64_t memory_budget; /* bytes one op may use on it (the planner's device_memory) */
  int accumulates;        /* 1: takes chains (convd_op_io.chain_len), summing on the device */
  int native_transpose;   /* 1: runs an op whose conv is transposed (a native plan's whole
                             transpose, convd_plan.native) itself */
};

/* Copies counters that their owner updates with relaxed atomics. */
static inline void convd_device_stats_load(const convd_device_stats *src, convd_device_stats *dst) {
#define CONVD_STAT_LOAD(type, name, dims) dst->name = __atomic_load_n(&src->name, __ATOMIC_RELAXED);
  CONVD_DEVICE_STATS_FIELDS(CONVD_STAT_LOAD)
#undef CONVD_STAT_LOAD
}

#endif
