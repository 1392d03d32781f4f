/* See offload.h. Threads: the offload thread runs the queue; o->mu guards it. */
#include "offload.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct work {
  void (*fn)(void *arg);
  void *arg;
  struct work *next;
} work;

struct convd_offload {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  work *head, *tail;
  int stopping;
  pthread_t thread;
};

static void *offload_main(void *p) {
  convd_offload *o = p;
  pthread_mutex_lock(&o->mu);
  for (;;) {
    while (o->head == NULL && !o->stopping) pthread_cond_wait(&o->cv, &o->mu);
    work *w = o->head;
    if (w == NULL) break; /* stopping, and the queue is empty */
    o->head = w->next;
    if (o->head == NULL) o->tail = NULL;
    pthread_mutex_unlock(&o->mu);
    w->fn(w->arg);
    free(w);
    pthread_mutex_lock(&o->mu);
  }
  pthread_mutex_unlock(&o->mu);
  return NULL;
}

convd_offload *convd_offload_create(void) {
  convd_offload *o = calloc(1, sizeof *o);
  if (o == NULL) return NULL;
  pthread_mutex_init(&o->mu, NULL);
  pthread_cond_init(&o->cv, NULL);
  if (pthread_create(&o->thread, NULL, offload_main, o) != 0) {
    pthread_cond_destroy(&o->cv);
    pthread_mutex_destroy(&o->mu);
    free(o);
    return NULL;
  }
  return o;
}

void convd_offload_destroy(convd_offload *o) {
  if (o == NULL) return;
  pthread_mutex_lock(&o->mu);
  o->stopping = 1;
  pthread_cond_signal(&o->cv);
  pthread_mutex_unlock(&o->mu);
  pthread_join(o->thread, NULL);
  pthread_cond_destroy(&o->cv);
  pthread_mutex_destroy(&o->mu);
  free(o);
}

int convd_offload_post(convd_offload *o, void (*fn)(void *arg), void *arg) {
  work *w = malloc(sizeof *w);
  if (w == NULL) return -1;
  w->fn = fn, w->arg = arg, w->next = NULL;
  pthread_mutex_lock(&o->mu);
  if (o->tail) o->tail->next = w;
  else o->head = w;
  o->tail = w;
  pthread_cond_signal(&o->cv);
  pthread_mutex_unlock(&o->mu);
  return 0;
}
