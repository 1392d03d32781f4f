#include "engine.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "ref.h"

typedef struct job {
  convd_job_desc d;
  struct job *next;
  double queued_at;
} job;

struct convd_engine {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  job *head, *tail;
  size_t pending; /* queued + running */
  int stopping;
  int nworkers;
  pthread_t *workers;
  atomic_uint_fast64_t completed_ops;
  uint64_t memory_bytes;
};

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void run_job(convd_engine *e, job *j) {
  char err[256] = "";
  convd_job_stats st = {0};
  double t0 = now_seconds();
  st.queue_seconds = t0 - j->queued_at;
  int rc = convd_ref_conv2d(j->d.conv, j->d.x, j->d.w, j->d.b, j->d.y, j->d.cancel);
  st.compute_seconds = now_seconds() - t0;
  if (rc == 0) {
    st.ops_run = 1;
    atomic_fetch_add(&e->completed_ops, 1);
  } else {
    convd_errf(err, sizeof err, rc, "convolution stopped: %s", convd_strerror(rc));
  }
  j->d.done(j->d.user, rc, err, &st);
}

static void *worker_main(void *arg) {
  convd_engine *e = arg;
  pthread_mutex_lock(&e->mu);
  for (;;) {
    while (e->head == NULL && !e->stopping) pthread_cond_wait(&e->cv, &e->mu);
    if (e->head == NULL) break; /* stopping and nothing left */
    job *j = e->head;
    e->head = j->next;
    if (e->head == NULL) e->tail = NULL;
    int stopping = e->stopping;
    pthread_mutex_unlock(&e->mu);
    if (stopping) {
      convd_job_stats st = {0};
      j->d.done(j->d.user, CONVD_ECANCELED, "the engine is shutting down", &st);
    } else {
      run_job(e, j);
    }
    free(j);
    pthread_mutex_lock(&e->mu);
    e->pending--;
  }
  pthread_mutex_unlock(&e->mu);
  return NULL;
}

int convd_engine_create(const convd_engine_opts *opts, convd_engine **out, char *err,
                        size_t errlen) {
  *out = NULL;
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  int nworkers = opts && opts->workers > 0 ? opts->workers : (ncpu > 0 ? (int)ncpu : 1);
  if (nworkers > 1024)
    return convd_errf(err, errlen, CONVD_EINVAL, "workers = %d: at most 1024", nworkers);

  convd_engine *e = calloc(1, sizeof *e);
  if (e == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating the engine");
  e->workers = calloc((size_t)nworkers, sizeof *e->workers);
  if (e->workers == NULL) {
    free(e);
    return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating the engine");
  }
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cv, NULL);
  atomic_init(&e->completed_ops, 0);
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  e->memory_bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;

  for (int i = 0; i < nworkers; i++) {
    int rc = pthread_create(&e->workers[i], NULL, worker_main, e);
    if (rc != 0) {
      e->nworkers = i;
      convd_engine_destroy(e);
      return convd_errf(err, errlen, CONVD_ENOMEM, "cannot start engine worker %d: %s", i,
                        strerror(rc));
    }
    e->nworkers = i + 1;
  }
  *out = e;
  return 0;
}

void convd_engine_destroy(convd_engine *e) {
  if (e == NULL) return;
  pthread_mutex_lock(&e->mu);
  e->stopping = 1;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  for (int i = 0; i < e->nworkers; i++) pthread_join(e->workers[i], NULL);
  pthread_cond_destroy(&e->cv);
  pthread_mutex_destroy(&e->mu);
  free(e->workers);
  free(e);
}

int convd_engine_submit(convd_engine *e, const convd_job_desc *desc, char *err, size_t errlen) {
  if (desc->conv == NULL || desc->x == NULL || desc->w == NULL || desc->y == NULL ||
      desc->done == NULL || (desc->conv->p.has_bias && desc->b == NULL))
    return convd_errf(err, errlen, CONVD_EINVAL, "job is missing a tensor or its callback");
  job *j = calloc(1, sizeof *j);
  if (j == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory queueing a job");
  j->d = *desc;
  j->queued_at = now_seconds();
  pthread_mutex_lock(&e->mu);
  if (e->stopping) {
    pthread_mutex_unlock(&e->mu);
    free(j);
    return convd_errf(err, errlen, CONVD_EUNAVAIL, "the engine is shutting down");
  }
  if (e->tail)
    e->tail->next = j;
  else
    e->head = j;
  e->tail = j;
  e->pending++;
  pthread_cond_signal(&e->cv);
  pthread_mutex_unlock(&e->mu);
  return 0;
}

size_t convd_engine_device_count(const convd_engine *e) {
  (void)e;
  return 1;
}

int convd_engine_device_info(convd_engine *e, size_t i, convd_device_info *out) {
  if (i >= convd_engine_device_count(e)) return CONVD_EINVAL;
  memset(out, 0, sizeof *out);
  out->index = (unsigned)i;
  out->kind = CONVD_DEVICE_REFERENCE;
  snprintf(out->name, sizeof out->name, "ref0");
  out->memory_bytes = e->memory_bytes;
  out->completed_ops = (uint64_t)atomic_load(&e->completed_ops);
  out->healthy = 1;
  snprintf(out->detail, sizeof out->detail,
           "reference kernel (float64 accumulation) on %d host worker thread%s", e->nworkers,
           e->nworkers == 1 ? "" : "s");
  return 0;
}

size_t convd_engine_jobs_pending(convd_engine *e) {
  pthread_mutex_lock(&e->mu);
  size_t n = e->pending;
  pthread_mutex_unlock(&e->mu);
  return n;
}
