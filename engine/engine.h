/* The engine: owns the devices and the scheduler. A request becomes a job: the engine plans it
 * (plan.h), takes its input rows as they arrive, runs each elemental op on whichever device is
 * free once the rows it reads are in, accumulates partial sums, and hands back output rows as
 * soon as every op covering them is done. All of it on the engine's threads; callers never
 * compute.
 *
 * Threads: one worker per device pulls ops from one queue shared by all jobs, round-robin over
 * jobs (a device takes ops only of jobs it supports). Callbacks run on worker threads, never
 * under the engine's lock, and a job's done() comes after every other callback of that job.
 * The functions below may be called from any thread (the daemon calls them from its gRPC
 * completion-queue thread) and from callbacks, except convd_engine_destroy and
 * convd_engine_run, which wait for the workers; each takes the engine's lock as it needs
 * (engine.c says what that lock guards). */
#ifndef CONVD_ENGINE_H
#define CONVD_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "conv.h"
#include "device.h"
#include "plan.h"

typedef struct convd_engine convd_engine;
typedef struct convd_job convd_job;

typedef struct convd_engine_opts {
  int cpu_devices;        /* CPU devices splitting the host's threads; 0 = 1 (with extra: 0) */
  int cpu_threads;        /* threads for all CPU devices together; 0 = online CPUs */
  int reference;          /* 1: CPU devices run the reference kernel (validation) */
  uint64_t device_memory; /* per-device op budget; 0 = CONVD_DEFAULT_DEVICE_MEMORY */
  convd_device **extra;   /* more devices (tests: throttled or failing wrappers); taken over */
  int n_extra;
  int gpus;               /* CUDA devices: -1 every visible GPU, 0 none, N the first N */
  uint64_t gpu_memory;    /* per-GPU budget; 0 = half of each GPU's free memory, at most 2 GiB */
  int gpu_instances;      /* devices per GPU (0 = 2), each with its own stream: one's copies
                             overlap another's compute, and they share the GPU as several
                             GPUs would be shared */
  uint64_t op_memory;     /* the largest op the planner makes; 0 = the smallest device budget
                             (a GPU's budget beyond it is left to cuDNN's workspace) */
  char *notice;           /* when not NULL: why no GPU is used, for the log ("" when GPUs run) */
  size_t notice_len;
  /* Optional: told once when a device fails and is taken out of service (for the log); runs on
   * the device's worker thread under the engine's lock, so it must not call the engine. */
  void (*device_failed)(void *user, unsigned index, const char *name, const char *why);
  void *user;
  uint64_t max_pending_ops; /* admission: a job whose plan would take the ops not yet done
                               over this is refused (CONVD_ELIMIT); 0 = no limit */
  uint64_t row_bytes;       /* every job's tile-row bound when its callbacks name none
                               (convd_job_cbs.row_bytes); 0 = none */
} convd_engine_opts;

/* What the engine is doing now (metrics, and tests that check it returns to idle). */
typedef struct convd_engine_load {
  uint64_t jobs;          /* jobs created and not yet destroyed */
  uint64_t pending_ops;   /* ops of those jobs not yet done (waiting for input, queued or running) */
  uint64_t ready_ops;     /* ops queued for a device now */
  uint64_t running_ops;   /* ops on a device now */
  uint64_t bytes_held;    /* input and output rows the jobs hold */
} convd_engine_load;

typedef struct convd_device_info {
  CONVD_DEVICE_INFO_FIELDS(CONVD_FIELD_DECLARE) /* convd_fields.h; kind: enum convd_device_kind */
  convd_device_stats stats; /* the device's own counters */
} convd_device_info;

typedef struct convd_job_stats {
  uint64_t ops;            /* elemental ops in the plan */
  uint64_t ops_run;        /* ops run, retries included */
  double compute_seconds;  /* device time spent on this job */
  uint64_t ops_per_device[16]; /* the first 16 devices */
  uint64_t peak_bytes_held;    /* input and output rows held at most at once */
  double queue_seconds;        /* from its first op being ready to a device starting it */
} convd_job_stats;

typedef struct convd_job_cbs {
  void *user;
  /* Output rows [h0, h1) of batch item n are final: read them with convd_job_output_row (or
   * in the output target), then convd_job_release_rows. */
  void (*rows_ready)(void *user, int64_t n, int64_t h0, int64_t h1);
  /* Input rows were freed (the caller may take in more). Optional. */
  void (*input_freed)(void *user);
  /* Exactly once, last: status 0, or a negative error with err for the client. */
  void (*done)(void *user, int status, const char *err, const convd_job_stats *stats);
  /* Optional, called by convd_job_create once the plan is made and before the job allocates
   * anything: the bytes its bookkeeping will take (per input row, per tile row, per op) and the
   * plan, so a caller can count them against its memory limits first. Nonzero (a negative
   * error with err set) refuses the job. */
  int (*admit)(void *user, const convd_plan *plan, uint64_t bookkeeping_bytes, char *err,
               size_t errlen);
  /* Optional: at most this many bytes per elemental op for this job (0: the engine's own
   * budget), so a caller with a small memory limit gets smaller tiles. */
  uint64_t op_bytes;
  /* Optional: at most this many bytes in one tile row's input rows and output rows (0: no
   * bound), so that a caller streaming rows holds little (convd_plan_opts.row_bytes). */
  uint64_t row_bytes;
} convd_job_cbs;

int convd_engine_create(const convd_engine_opts *opts, convd_engine **out, char *err,
                        size_t errlen);
/* The devices convd_engine_create opens for opts (its GPUs, then its CPU devices; not
 * opts->extra, though n_extra > 0 still means no CPU device unless cpu_devices asks), for a
 * process that runs ops on them without an engine: an MPI worker rank (server/mpi.c). *out is
 * an array of *n devices, the caller's to destroy and free. */
int convd_engine_open_devices(const convd_engine_opts *opts, convd_device ***out, int *n,
                              char *err, size_t errlen);
/* Jobs must have ended (done delivered and destroyed) before this. */
void convd_engine_destroy(convd_engine *e);

size_t convd_engine_device_count(const convd_engine *e);
int convd_engine_device_info(convd_engine *e, size_t i, convd_device_info *out);
uint64_t convd_engine_device_memory(const convd_engine *e);
/* Healthy devices now. */
int convd_engine_healthy_devices(convd_engine *e);
void convd_engine_load_get(convd_engine *e, convd_engine_load *out);

/* Plans conv for this engine's devices and budget (at most op_bytes per op, when not 0). */
int convd_engine_plan(convd_engine *e, const convd_conv *conv, convd_plan *plan, char *err,
                      size_t errlen);
/* The same with tile rows of at most row_bytes (0: no bound; convd_plan_opts.row_bytes). */
int convd_engine_plan_rows(convd_engine *e, const convd_conv *conv, uint64_t op_bytes, uint64_t row_bytes,
                           convd_plan *plan, char *err, size_t errlen);
int convd_engine_plan_within(convd_engine *e, const convd_conv *conv, uint64_t op_bytes,
                             convd_plan *plan, char *err, size_t errlen);

/* A job for conv. Nothing runs until weights and input rows arrive. */
int convd_job_create(convd_engine *e, const convd_conv *conv, const convd_job_cbs *cbs,
                     convd_job **out, char *err, size_t errlen);
/* Who frees a buffer handed to a job: CONVD_GIVE, the job (with free(), as soon as it can);
 * CONVD_LEND, the caller, who keeps it valid and unchanged until done() has been delivered. */
enum { CONVD_LEND = 0, CONVD_GIVE = 1 };

/* Before any input: the job writes its output straight into y, the whole N x C_out x H_out x
 * W_out tensor, which the caller keeps valid until done(). rows_ready still announces final
 * rows; convd_job_output_row points into y, and releasing rows frees nothing. */
void convd_job_set_output(convd_job *j, float *y);
/* Jobs with a higher priority have their ready ops taken first; equal priorities share the
 * devices round-robin. Default 0. */
void convd_job_set_priority(convd_job *j, int priority);
/* Names the weights' content (e.g. a digest of them; 0 = unknown), before they are set: device
 * weight caches then find blocks that an earlier job with the same weights left there. */
void convd_job_set_weights_key(convd_job *j, uint64_t key);
/* The weights (and bias, or NULL). */
void convd_job_set_weights(convd_job *j, float *w, float *b, int ownership);
/* Input rows [h0, h1) of batch item n as one band (C x rows x W, the wire's band layout). The
 * job reads them where they are: ops whose window lies in one band read it in place. Rows must
 * arrive once each; on error a given band has been freed. */
int convd_job_put_band(convd_job *j, int64_t n, int64_t h0, int64_t h1, float *band,
                       int ownership, char *err, size_t errlen);
/* Output row h of batch item n, with channel c at offset c * *cstride, valid from rows_ready
 * until released. */
const float *convd_job_output_row(convd_job *j, int64_t n, int64_t h, size_t *cstride);
void convd_job_release_rows(convd_job *j, int64_t n, int64_t h0, int64_t h1);
/* Copies final output rows [h0, h1) of batch item n into y (the whole NCHW output; nothing to
 * copy when y is the job's output target) and releases them. */
void convd_job_take_rows_nchw(convd_job *j, int64_t n, int64_t h0, int64_t h1, float *y);
/* Bytes of input and output rows the job holds now; and of those, output rows. */
uint64_t convd_job_bytes_held(convd_job *j);
uint64_t convd_job_output_bytes_held(convd_job *j);
/* What the job needs to hold at most to keep going when its input comes in order: two tile
 * rows' input windows and output rows. Callers stop reading input beyond it. */
uint64_t convd_job_memory_hint(convd_job *j);
uint64_t convd_plan_memory_hint(const convd_plan *plan);
/* 1 when no op is ready or running: waiting on input (or on nothing). */
int convd_job_idle(convd_job *j);
const convd_plan *convd_job_plan(const convd_job *j);
/* Stops the job: queued ops are dropped; done(CONVD_ECANCELED) follows once running ops end. */
void convd_job_cancel(convd_job *j);
/* After done. */
void convd_job_destroy(convd_job *j);

/* Runs a whole convolution on in-memory tensors and waits (tests, benchmarks, tools). */
int convd_engine_run(convd_engine *e, const convd_conv *conv, const float *x, const float *w,
                     const float *b, float *y, convd_job_stats *stats, char *err, size_t errlen);
/* The same with the weights' content key (convd_job_set_weights_key), as the daemon gives it:
 * devices then keep the weights' blocks, reordered, across calls with the same key. */
int convd_engine_run_keyed(convd_engine *e, const convd_conv *conv, const float *x, const float *w,
                           const float *b, float *y, uint64_t w_key, convd_job_stats *stats, char *err,
                           size_t errlen);

#endif
