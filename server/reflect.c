/* Server reflection (grpc.reflection.v1 and v1alpha): the service's handlers and the answers,
 * from the descriptors built into the daemon and the services of the method table.
 *
 * Threads: the handlers run on the completion-queue thread with the call's mutex held;
 * convd_reflect_answer is pure and runs on any thread. */
#include "reflect.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "services.h"
#include "wire.h"

/* protoc's FileDescriptorSet of every served file (cmake/embed.cmake). */
extern const unsigned char convd_descriptor_set[];
extern const size_t convd_descriptor_set_len;

#define MAX_SERVICES 8

/* The services of the method table, each once (the table keeps a service's methods together). */
static size_t list_services(char names[MAX_SERVICES][96]) {
  size_t n = 0;
  for (size_t i = 0; convd_methods[i].path; i++) {
    const char *svc = convd_methods[i].path + 1, *slash = strchr(svc, '/');
    char name[96];
    snprintf(name, sizeof name, "%.*s", (int)(slash - svc), svc);
    if ((n == 0 || strcmp(names[n - 1], name) != 0) && n < MAX_SERVICES) memcpy(names[n++], name, sizeof name);
  }
  return n;
}

/* ---- just enough of the protobuf wire format to walk descriptors ---------------------------- */

typedef struct span {
  const uint8_t *p;
  size_t n;
} span;

static int varint(span *s, uint64_t *v) {
  *v = 0;
  for (int shift = 0; shift < 64 && s->n > 0; shift += 7) {
    uint8_t b = *s->p++;
    s->n--;
    *v |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) return 0;
  }
  return -1;
}

/* The next field: its number, and for length-delimited ones the bytes (others are skipped).
 * Returns 1 for a field, 0 at the end, -1 on malformed input. */
static int next_field(span *s, uint32_t *field, span *val) {
  if (s->n == 0) return 0;
  uint64_t key, v;
  if (varint(s, &key)) return -1;
  *field = (uint32_t)(key >> 3);
  val->p = NULL;
  val->n = 0;
  switch (key & 7) {
    case 0: return varint(s, &v) ? -1 : 1;
    case 1: if (s->n < 8) return -1; s->p += 8; s->n -= 8; return 1;
    case 5: if (s->n < 4) return -1; s->p += 4; s->n -= 4; return 1;
    case 2:
      if (varint(s, &v) || v > s->n) return -1;
      val->p = s->p;
      val->n = (size_t)v;
      s->p += v;
      s->n -= (size_t)v;
      return 1;
    default: return -1;
  }
}

/* The string field `want` of message m, or an empty span. */
static span string_field(span m, uint32_t want) {
  uint32_t f;
  span v, none = {NULL, 0};
  while (next_field(&m, &f, &v) == 1)
    if (f == want && v.p) return v;
  return none;
}

static int span_eq(span a, const char *s, size_t n) { return a.n == n && memcmp(a.p, s, n) == 0; }

/* Each file of the set: FileDescriptorSet.file (field 1). */
static int nth_file(size_t i, span *out) {
  span s = {convd_descriptor_set, convd_descriptor_set_len}, v;
  uint32_t f;
  size_t k = 0;
  while (next_field(&s, &f, &v) == 1)
    if (f == 1 && k++ == i) {
      *out = v;
      return 1;
    }
  return 0;
}

/* 1 when file fd defines symbol: a top-level message (4), enum (5) or service (6) of its
 * package, or something inside one (a nested type, a field, a method). */
static int defines(span fd, const char *symbol) {
  span pkg = string_field(fd, 2);
  const size_t sl = strlen(symbol);
  if (pkg.n && (sl <= pkg.n || memcmp(symbol, pkg.p, pkg.n) != 0 || symbol[pkg.n] != '.')) return 0;
  const char *rest = symbol + (pkg.n ? pkg.n + 1 : 0);
  const size_t rl = strlen(rest);
  span s = fd, v;
  uint32_t f;
  while (next_field(&s, &f, &v) == 1) {
    if ((f != 4 && f != 5 && f != 6) || v.p == NULL) continue;
    span name = string_field(v, 1);
    if (name.n && rl >= name.n && memcmp(rest, name.p, name.n) == 0 &&
        (rest[name.n] == '\0' || rest[name.n] == '.'))
      return 1;
  }
  return 0;
}

/* ---- answers ---------------------------------------------------------------------------------- */

uint8_t *convd_reflect_answer(Grpc__Reflection__V1__ServerReflectionRequest *rq, size_t *len) {
  Grpc__Reflection__V1__ServerReflectionResponse resp = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT;
  Grpc__Reflection__V1__FileDescriptorResponse fdr = GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT;
  Grpc__Reflection__V1__ListServiceResponse lsr = GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT;
  Grpc__Reflection__V1__ErrorResponse er = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT;
  Grpc__Reflection__V1__ExtensionNumberResponse enr = GRPC__REFLECTION__V1__EXTENSION_NUMBER_RESPONSE__INIT;
  Grpc__Reflection__V1__ServiceResponse svc[MAX_SERVICES];
  Grpc__Reflection__V1__ServiceResponse *svcp[MAX_SERVICES];
  char names[MAX_SERVICES][96];
  ProtobufCBinaryData files[8];
  char msg[300];
  resp.valid_host = rq->host ? rq->host : (char *)"";
  resp.original_request = rq;
  span fd;
  size_t nfiles = 0;
  char v1buf[256];
  switch (rq->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES: {
      const size_t n = list_services(names);
      for (size_t i = 0; i < n; i++) {
        grpc__reflection__v1__service_response__init(&svc[i]);
        svc[i].name = names[i];
        svcp[i] = &svc[i];
      }
      lsr.n_service = n;
      lsr.service = svcp;
      resp.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
      resp.list_services_response = &lsr;
      break;
    }
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL: {
      const int by_name = rq->message_request_case == GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME;
      const char *want = by_name ? rq->file_by_filename : rq->file_containing_symbol;
      /* The v1alpha reflection service is the v1 file under another package name. */
      if (!by_name && strncmp(want, "grpc.reflection.v1alpha.", 24) == 0) {
        char *v1 = v1buf;
        snprintf(v1, sizeof v1buf, "grpc.reflection.v1.%s", want + 24);
        want = v1;
      }
      for (size_t i = 0; nth_file(i, &fd); i++) {
        int hit = by_name ? span_eq(string_field(fd, 1), want, strlen(want)) : defines(fd, want);
        if (hit && nfiles < 8) {
          files[nfiles].data = (uint8_t *)fd.p;
          files[nfiles].len = fd.n;
          nfiles++;
        }
      }
      if (nfiles) {
        /* Our files import nothing, so the file itself is all a client needs. */
        fdr.n_file_descriptor_proto = nfiles;
        fdr.file_descriptor_proto = files;
        resp.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
        resp.file_descriptor_response = &fdr;
      } else {
        snprintf(msg, sizeof msg, "%s %.200s is not served here", by_name ? "file" : "symbol", want);
        er.error_code = 5; /* NOT_FOUND */
        er.error_message = msg;
        resp.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
        resp.error_response = &er;
      }
      break;
    }
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
      /* proto3 files without extensions: every type has none. */
      enr.base_type_name = rq->all_extension_numbers_of_type;
      resp.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
      resp.all_extension_numbers_response = &enr;
      break;
    default:
      er.error_code = 5;
      er.error_message = (char *)"no such extension, or an empty request";
      resp.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
      resp.error_response = &er;
      break;
  }
  *len = grpc__reflection__v1__server_reflection_response__get_packed_size(&resp);
  uint8_t *out = malloc(*len ? *len : 1);
  if (out) grpc__reflection__v1__server_reflection_response__pack(&resp, out);
  return out;
}

/* ---- the service ------------------------------------------------------------------------- */

static void reflect_start(convd_call *c) {
  if (convd_call_send_initial_metadata(c) == 0) convd_call_recv(c);
}

/* A request is answered, then the next one is read; at half-close the stream ends once the
 * last answer went out. */
static void reflect_recv(convd_call *c, grpc_byte_buffer *bb) {
  if (bb == NULL) {
    convd_call_finish_ok(c);
    return;
  }
  Grpc__Reflection__V1__ServerReflectionRequest *rq =
      (Grpc__Reflection__V1__ServerReflectionRequest *)convd_wire_unpack(
          bb, &grpc__reflection__v1__server_reflection_request__descriptor);
  if (rq == NULL) {
    convd_call_fail(c, CONVD_EINVAL, "the message is not a valid grpc.reflection.v1.ServerReflectionRequest");
    return;
  }
  size_t len = 0;
  uint8_t *out = convd_reflect_answer(rq, &len);
  protobuf_c_message_free_unpacked(&rq->base, NULL);
  if (out == NULL) {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
    return;
  }
  grpc_slice sl = grpc_slice_new(out, len, free);
  grpc_byte_buffer *resp = grpc_raw_byte_buffer_create(&sl, 1);
  grpc_slice_unref(sl);
  convd_call_send_buffer(c, resp);
}

/* One answer per request: the next request is read once this answer went out. */
static void reflect_sent(convd_call *c) {
  if (c->recv_done) convd_call_finish_ok(c);
  else if (!c->status_set) convd_call_recv(c);
}

const convd_handlers convd_reflection_handlers = {
    .start = reflect_start, .recv = reflect_recv, .sent = reflect_sent};
