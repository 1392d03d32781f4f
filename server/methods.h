/* The method table: the one list of the daemon's methods (as Redis's command table). Dispatch,
 * request slots, metrics labels and log lines read it; no other code lists or switches over
 * methods. Each service file exports the handlers of its methods (services.h).
 *
 * Threads: handlers run on the completion-queue thread with the call's mutex held, except where
 * a service says its engine callbacks reach the call from device workers. */
#ifndef CONVD_METHODS_H
#define CONVD_METHODS_H

#include <grpc/byte_buffer.h>
#include <stddef.h>

#include "call.h"

/* What a method does at each point of a call (c->mu held for all). Entries may be NULL. */
typedef struct convd_handlers {
  /* The call was matched to a client: decode c->payload (one-message methods) or start
   * reading (convd_call_recv), set c->state as needed. */
  void (*start)(convd_call *c);
  /* A message arrived (bb, freed by the caller after this returns) or the stream half-closed
   * (bb NULL, c->recv_done set). Not called once the call failed or its read did.
   * Client-streaming methods only. */
  void (*recv)(convd_call *c, grpc_byte_buffer *bb);
  /* A message went out (and the call is not dead): send the next one or the status. NULL:
   * nothing follows a message. */
  void (*sent)(convd_call *c);
  /* After convd_call_fail: send what is due, ending with the status. NULL: the status at once. */
  void (*pump)(convd_call *c);
  /* The call failed or the client cancelled it: stop its work now. */
  void (*stop)(convd_call *c);
  /* The end-of-call figures (called once, just before the log line). */
  void (*report)(const convd_call *c, convd_call_report *r);
  /* Frees c->state (the call is being freed; no other thread holds it). */
  void (*free_state)(convd_call *c);
} convd_handlers;

/* Which methods a call without a token may use when --auth-tokens is on (the `open` column). */
enum {
  CONVD_TOKEN = 0,         /* a token is needed: every method but these, unknown ones too */
  CONVD_OPEN = 1,          /* health: probes carry no token */
  CONVD_OPEN_IF_PUBLIC = 2 /* reflection, open with --reflection-public */
};

struct convd_method {
  const char *path;           /* "/package.Service/Method"; NULL: the unknown-method slot */
  const char *name;           /* the label in logs and metrics */
  int client_streams;         /* the request is read message by message (else one payload) */
  int while_draining;         /* still answered while the daemon drains (health) */
  const convd_handlers *h;
  int open;                   /* served without a token: CONVD_TOKEN, CONVD_OPEN, ... */
};

/* 1 when m is served to a call without a token. */
int convd_method_open(const convd_method *m, int reflection_public);

/* The table, ending with the unknown-method slot (path NULL). */
extern const convd_method convd_methods[];
extern const size_t convd_methods_count; /* including the unknown-method slot */

/* The unknown-method slot's answer: UNIMPLEMENTED, naming what is served (from the table). */
extern const convd_handlers convd_unknown_handlers;

#endif
