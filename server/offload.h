/* A worker thread for the server's work that grows with a tensor (widening and hashing uploaded
 * weights): run there, it cannot hold up the completion-queue thread, which then keeps answering
 * health checks and every other call.
 *
 * Threads: convd_offload_post from any thread; each posted fn runs on the offload thread, one
 * at a time, in order. */
#ifndef CONVD_OFFLOAD_H
#define CONVD_OFFLOAD_H

typedef struct convd_offload convd_offload;

/* NULL when the thread cannot start. */
convd_offload *convd_offload_create(void);
/* Runs what was posted, then stops the thread. Nothing may be posted any more. */
void convd_offload_destroy(convd_offload *o);
/* Queues fn(arg). Returns 0, or -1 (out of memory: nothing queued). */
int convd_offload_post(convd_offload *o, void (*fn)(void *arg), void *arg);

#endif
