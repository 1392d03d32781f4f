/* The engine: owns the compute devices and runs convolution jobs on its own threads. The server
 * submits a job and is called back when it is done; it never computes.
 *
 * In this version every job is one elemental op on the reference device and jobs run
 * concurrently on a pool of worker threads. The planner and multi-device scheduler replace the
 * inside of convd_engine_submit without changing this interface. */
#ifndef CONVD_ENGINE_H
#define CONVD_ENGINE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "conv.h"

typedef struct convd_engine convd_engine;

typedef struct convd_engine_opts {
  int workers; /* threads running jobs; 0 = one per online CPU */
} convd_engine_opts;

enum convd_device_kind {
  CONVD_DEVICE_CPU = 1,
  CONVD_DEVICE_CUDA = 2,
  CONVD_DEVICE_REFERENCE = 3,
};

typedef struct convd_device_info {
  unsigned index;
  int kind; /* enum convd_device_kind */
  char name[64];
  uint64_t memory_bytes;
  uint64_t completed_ops;
  int healthy;
  char detail[128];
} convd_device_info;

typedef struct convd_job_stats {
  uint64_t ops_run;
  double compute_seconds;
  double queue_seconds;
} convd_job_stats;

/* Called exactly once per accepted job, on an engine thread: status 0 or a negative convd
 * error, with err a message for the client. The callback must not block for long. */
typedef void (*convd_job_done_fn)(void *user, int status, const char *err,
                                  const convd_job_stats *stats);

/* What to compute. All buffers belong to the caller and must stay valid until done runs. */
typedef struct convd_job_desc {
  const convd_conv *conv;
  const float *x, *w, *b; /* b may be NULL when the conv has no bias */
  float *y;
  const atomic_int *cancel; /* optional: non-zero asks the job to stop early */
  convd_job_done_fn done;
  void *user;
} convd_job_desc;

int convd_engine_create(const convd_engine_opts *opts, convd_engine **out, char *err, size_t errlen);

/* Stops the workers. Jobs still queued complete with CONVD_ECANCELED; a running job finishes
 * (or notices its cancel flag) first. */
void convd_engine_destroy(convd_engine *e);

/* Queues a job. Returns 0 and later calls desc->done, or a negative error without calling it. */
int convd_engine_submit(convd_engine *e, const convd_job_desc *desc, char *err, size_t errlen);

size_t convd_engine_device_count(const convd_engine *e);
int convd_engine_device_info(convd_engine *e, size_t i, convd_device_info *out);

/* Jobs queued or running now. */
size_t convd_engine_jobs_pending(convd_engine *e);

#endif
