/* Who may connect, end to end: real daemons with TLS, mutual TLS, bearer tokens and protected
 * mode, driven by libconvd_client, convctl and raw gRPC calls (reflection, an unknown method);
 * SIGHUP reloads of certificates and tokens; start-up refusals and their messages; and, in
 * process, the tokens file's parser and the loopback rules. A throwaway CA hierarchy is made with
 * the openssl command line in a fresh directory at start. Results are checked, not just
 * statuses: convolutions against the reference kernel element by element, log lines for the
 * tenant (and for the token's absence). */
#include <errno.h>
#include <fcntl.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "client.h"
#include "client_params.h"
#include "daemon.h"
#include "err.h"
#include "protect.h"
#include "ref.h"
#include "testutil.h"

#define TOKEN_A "alice-0123456789abcdef-token"
#define TOKEN_B "bob-fedcba9876543210-token"
#define TOKEN_C "alice-rotated-5555555555-token"

static char dir[64]; /* the test's scratch directory, with the PKI in it */

/* dir/name, in one of a few rotating buffers so that a call can take several (a path kept
 * across many calls is copied first). */
static const char *at(const char *name) {
  static char buf[32][160];
  static int next;
  char *p = buf[next++ % 32];
  snprintf(p, sizeof buf[0], "%s/%s", dir, name);
  return p;
}

static int write_file(const char *path, const char *text, mode_t mode) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) return -1;
  size_t n = strlen(text);
  int ok = write(fd, text, n) == (ssize_t)n && fchmod(fd, mode) == 0;
  return close(fd) == 0 && ok ? 0 : -1;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Two CAs; server certificates for 127.0.0.1 and localhost from each; a client certificate
 * from each. EC P-256 keys: a fraction of a second for all of them. */
static const char pki_script[] =
    "set -e\n"
    "OPENSSL=\"$2\"\n"
    "cd \"$1\"\n"
    "openssl() { \"$OPENSSL\" \"$@\"; }\n"
    "ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'\n"
    "ca() { openssl req -x509 $ec -keyout $1.key -out $1.crt -days 2 -subj /CN=convd-test-$1 "
    "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign; }\n"
    "leaf() {\n"
    "  openssl req $ec -keyout $1.key -out $1.csr -subj /CN=$1\n"
    "  printf 'basicConstraints=CA:FALSE\\nextendedKeyUsage=%s\\n%s\\n' $3 \"$4\" > $1.ext\n"
    "  openssl x509 -req -in $1.csr -CA $2.crt -CAkey $2.key -CAcreateserial -out $1.crt -days 2 "
    "-extfile $1.ext\n"
    "}\n"
    "ca ca1\n"
    "ca ca2\n"
    "leaf server1 ca1 serverAuth subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    "leaf server2 ca2 serverAuth subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    "leaf client1 ca1 clientAuth ''\n"
    "leaf client2 ca2 clientAuth ''\n"
    "cp server1.crt tls.crt && cp server1.key tls.key\n"
    "echo 'not a certificate' > notpem.txt\n";

static int make_pki(void) {
  snprintf(dir, sizeof dir, "/tmp/convd-auth-XXXXXX");
  if (mkdtemp(dir) == NULL) return -1;
  char *argv[] = {"/bin/sh", "-c", (char *)pki_script, "pki", dir, OPENSSL_BIN, NULL};
  int rc = test_run(argv, at("pki.out"), at("pki.err"), 60);
  if (rc != 0) {
    char msg[4096] = "";
    test_read_file(at("pki.err"), msg, sizeof msg);
    fprintf(stderr, "openssl failed (%d): %s\n", rc, msg);
  }
  return rc;
}

static void remove_pki(void) {
  char *argv[] = {"/bin/rm", "-rf", dir, NULL};
  test_run(argv, "/dev/null", "/dev/null", 30);
}

/* ---- clients ------------------------------------------------------------------------------ */

static convd_client *client(const char *target, const char *ca, const char *cert, const char *key,
                            const char *server_name, const char *token) {
  convd_client_opts o = {.timeout_seconds = 20, .tls_ca_file = ca, .tls_cert_file = cert,
                         .tls_key_file = key, .tls_server_name = server_name, .token = token};
  convd_client *c = NULL;
  char err[512];
  if (convd_client_create(target, &o, &c, err, sizeof err)) FAIL_AT("convd_client_create: %s", err);
  return c;
}

/* ListDevices through a fresh client (a fresh connection): its result code; err its message. */
static int try_list(const char *target, const char *ca, const char *cert, const char *key,
                    const char *server_name, const char *token, int *status, char *err,
                    size_t errlen) {
  convd_client *c = client(target, ca, cert, key, server_name, token);
  if (c == NULL) return -100;
  convd_client_device *d = NULL;
  size_t n = 0;
  int rc = convd_client_list_devices(c, &d, &n, err, errlen);
  if (rc == 0 && (n < 1 || strcmp(d[0].name, "cpu0") != 0)) rc = -101;
  if (status) *status = convd_client_last_status(c);
  free(d);
  convd_client_destroy(c);
  return rc;
}

/* A real convolution (streaming or unary) checked element by element against the reference
 * kernel, the output poisoned first. Returns 0, the client's code, or -1 for a wrong answer. */
static int conv_checked(convd_client *c, int unary, char *err, size_t errlen) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 2, p.c_in = p.c_per_group = 3, p.h = 17, p.w = 13, p.c_out = 5, p.kh = p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  p.has_bias = 1;
  convd_conv cv;
  if (convd_conv_init(&cv, &p, err, errlen)) return -1;
  rng r = {0x5eedaa01};
  float *x = malloc(cv.input_bytes), *w = malloc(cv.weight_bytes), *b = malloc(cv.bias_bytes);
  float *y = malloc(cv.output_bytes), *ref = malloc(cv.output_bytes);
  double *want = malloc(cv.output_elems * sizeof *want);
  rng_fill(&r, x, cv.input_elems);
  rng_fill(&r, w, cv.weight_elems);
  rng_fill(&r, b, cv.bias_elems);
  poison(y, cv.output_elems);
  convd_ref_conv2d(&cv, x, w, b, ref, NULL);
  for (size_t i = 0; i < cv.output_elems; i++) want[i] = ref[i];
  const convd_client_conv_params cp = convd_client_params_from_conv(&p);
  int rc = unary ? convd_client_conv2d_unary(c, &cp, x, w, b, y, NULL, err, errlen)
                 : convd_client_conv2d(c, &cp, x, w, b, y, NULL, err, errlen);
  if (rc == 0 && check_close("conv2d over an authenticated connection", y, want, cv.output_elems)) rc = -1;
  free(x), free(w), free(b), free(y), free(ref), free(want);
  return rc;
}

/* One call on a plaintext channel with raw gRPC: sends req (a whole request stream of one
 * message) and the token, if any; returns the status, with the first response message in resp
 * (NUL-terminated, binary) and the status message in details. */
static grpc_status_code raw_call(const char *target, const char *path, const char *token,
                                 const void *req, size_t req_len, char *resp, size_t resp_len,
                                 size_t *got, char *details, size_t dlen) {
  grpc_init();
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *ch = grpc_channel_create(target, creds, NULL);
  grpc_channel_credentials_release(creds);
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  grpc_slice method = grpc_slice_from_copied_string(path);
  gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(20, GPR_TIMESPAN));
  grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL, deadline, NULL);
  grpc_slice_unref(method);
  char bearer[512];
  snprintf(bearer, sizeof bearer, "Bearer %s", token ? token : "");
  grpc_metadata md = {.key = grpc_slice_from_static_string("authorization"),
                      .value = grpc_slice_from_copied_string(bearer)};
  grpc_slice body = grpc_slice_from_copied_buffer(req, req_len);
  grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&body, 1), *recv = NULL;
  grpc_slice_unref(body);
  grpc_metadata_array initial, trailing;
  grpc_metadata_array_init(&initial);
  grpc_metadata_array_init(&trailing);
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice status_details = grpc_empty_slice();
  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = token ? 1 : 0;
  ops[0].data.send_initial_metadata.metadata = &md;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &recv;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &trailing;
  ops[5].data.recv_status_on_client.status = &status;
  ops[5].data.recv_status_on_client.status_details = &status_details;
  if (grpc_call_start_batch(call, ops, 6, (void *)1, NULL) == GRPC_CALL_OK) {
    grpc_event ev;
    do ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    while (ev.type != GRPC_OP_COMPLETE);
  }
  *got = 0;
  resp[0] = '\0';
  if (recv) {
    grpc_byte_buffer_reader rd;
    if (grpc_byte_buffer_reader_init(&rd, recv)) {
      grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
      size_t n = GRPC_SLICE_LENGTH(all) < resp_len - 1 ? GRPC_SLICE_LENGTH(all) : resp_len - 1;
      memcpy(resp, GRPC_SLICE_START_PTR(all), n);
      resp[n] = '\0';
      *got = n;
      grpc_slice_unref(all);
      grpc_byte_buffer_reader_destroy(&rd);
    }
    grpc_byte_buffer_destroy(recv);
  }
  snprintf(details, dlen, "%.*s", (int)GRPC_SLICE_LENGTH(status_details),
           (const char *)GRPC_SLICE_START_PTR(status_details));
  grpc_slice_unref(status_details);
  grpc_slice_unref(md.value);
  grpc_byte_buffer_destroy(send);
  grpc_metadata_array_destroy(&initial);
  grpc_metadata_array_destroy(&trailing);
  grpc_call_unref(call);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
  grpc_channel_destroy(ch);
  grpc_shutdown();
  return status;
}

/* memmem over a binary buffer. */
static int contains(const char *buf, size_t n, const char *needle) {
  const size_t k = strlen(needle);
  for (size_t i = 0; i + k <= n; i++)
    if (memcmp(buf + i, needle, k) == 0) return 1;
  return 0;
}

/* grpc.reflection.v1 ServerReflectionRequest{list_services: ""} (field 7, length 0). */
static const unsigned char list_services[] = {0x3a, 0x00};
#define REFLECTION_V1 "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

/* Runs convd with argv (NULL-terminated after the binary) expecting it to refuse to start:
 * returns the exit status, its stderr in msg. */
static int convd_refuses(char *msg, size_t len, const char *const *args) {
  char *argv[24] = {CONVD_BIN};
  int n = 1;
  for (int i = 0; args[i] && n < 23; i++) argv[n++] = (char *)args[i];
  argv[n] = NULL;
  int rc = test_run(argv, at("refused.out"), at("refused.err"), 60);
  msg[0] = '\0';
  test_read_file(at("refused.err"), msg, len);
  return rc;
}

/* convctl with args; exit status, stdout and stderr. */
static int convctl(char *out, size_t out_len, char *errout, size_t err_len, const char *const *args) {
  char *argv[24] = {CONVCTL_BIN};
  int n = 1;
  for (int i = 0; args[i] && n < 23; i++) argv[n++] = (char *)args[i];
  argv[n] = NULL;
  int rc = test_run(argv, at("convctl.out"), at("convctl.err"), 60);
  out[0] = errout[0] = '\0';
  test_read_file(at("convctl.out"), out, out_len);
  test_read_file(at("convctl.err"), errout, err_len);
  return rc;
}

static int tokens_file(const char *path, const char *text) { return write_file(path, text, 0600); }

/* ---- TLS -------------------------------------------------------------------------------- */

static void test_tls(void) {
  test_daemon d;
  const char *extra[] = {"--tls-cert", at("server1.crt"), "--tls-key", at("server1.key"), NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char err[1024];
  /* Plaintext to a TLS port: the connection fails, UNAVAILABLE. */
  ASSERT_EQ_INT(try_list(d.target, NULL, NULL, NULL, NULL, NULL, NULL, err, sizeof err), CONVD_CLIENT_EUNAVAIL);
  /* A client that trusts another CA refuses the server's certificate. */
  ASSERT_EQ_INT(try_list(d.target, at("ca2.crt"), NULL, NULL, NULL, NULL, NULL, err, sizeof err), CONVD_CLIENT_EUNAVAIL);
  /* The right CA: a real convolution, both calls, checked element by element. */
  convd_client *c = client(d.target, at("ca1.crt"), NULL, NULL, NULL, NULL);
  ASSERT_TRUE(c != NULL);
  int rc = conv_checked(c, 0, err, sizeof err);
  if (rc == 0) rc = conv_checked(c, 1, err, sizeof err);
  int serving = 0;
  if (rc == 0) rc = convd_client_health(c, "", &serving, err, sizeof err);
  convd_client_destroy(c);
  ASSERT_OK(rc, err);
  ASSERT_TRUE(serving);
  /* The certificate's name, not the target's host, when told: localhost is in its SANs, another
   * name is not. */
  ASSERT_OK(try_list(d.target, at("ca1.crt"), NULL, NULL, "localhost", NULL, NULL, err, sizeof err), err);
  ASSERT_EQ_INT(try_list(d.target, at("ca1.crt"), NULL, NULL, "convd.example", NULL, NULL, err, sizeof err),
                CONVD_CLIENT_EUNAVAIL);
  /* convctl: --tls-ca, and CONVD_TLS_CA from the environment. */
  char out[4096], eout[4096];
  const char *h[] = {"health", "--server", d.target, "--tls-ca", at("ca1.crt"), "--timeout", "20", NULL};
  ASSERT_EQ_INT(convctl(out, sizeof out, eout, sizeof eout, h), 0);
  ASSERT_CONTAINS(out, "SERVING");
  const char *plain[] = {"health", "--server", d.target, "--timeout", "20", NULL};
  ASSERT_EQ_INT(convctl(out, sizeof out, eout, sizeof eout, plain), 1);
  ASSERT_CONTAINS(eout, "UNAVAILABLE");
  setenv("CONVD_TLS_CA", at("ca1.crt"), 1);
  const char *dev[] = {"devices", "--server", d.target, NULL};
  rc = convctl(out, sizeof out, eout, sizeof eout, dev);
  unsetenv("CONVD_TLS_CA");
  ASSERT_EQ_INT(rc, 0);
  ASSERT_CONTAINS(out, "cpu0");
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

static void test_mutual_tls(void) {
  test_daemon d;
  const char *extra[] = {"--tls-cert", at("server1.crt"), "--tls-key", at("server1.key"),
                         "--tls-client-ca", at("ca1.crt"), NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char err[1024];
  /* No client certificate, or one another CA signed: refused during the handshake. */
  ASSERT_EQ_INT(try_list(d.target, at("ca1.crt"), NULL, NULL, NULL, NULL, NULL, err, sizeof err), CONVD_CLIENT_EUNAVAIL);
  ASSERT_EQ_INT(try_list(d.target, at("ca1.crt"), at("client2.crt"), at("client2.key"), NULL, NULL, NULL, err, sizeof err),
                CONVD_CLIENT_EUNAVAIL);
  /* Health is no exception: without a certificate there is no connection at all. */
  convd_client *c = client(d.target, at("ca1.crt"), NULL, NULL, NULL, NULL);
  ASSERT_TRUE(c != NULL);
  int serving = 0;
  int rc = convd_client_health(c, "", &serving, err, sizeof err);
  convd_client_destroy(c);
  ASSERT_EQ_INT(rc, CONVD_CLIENT_EUNAVAIL);
  /* The client certificate CA 1 signed: served. */
  c = client(d.target, at("ca1.crt"), at("client1.crt"), at("client1.key"), NULL, NULL);
  ASSERT_TRUE(c != NULL);
  rc = conv_checked(c, 0, err, sizeof err);
  convd_client_destroy(c);
  ASSERT_OK(rc, err);
  /* convctl with its certificate from the environment (only read because a CA is given). */
  char out[4096], eout[4096];
  setenv("CONVD_TLS_CERT", at("client1.crt"), 1);
  setenv("CONVD_TLS_KEY", at("client1.key"), 1);
  const char *dev[] = {"devices", "--server", d.target, "--tls-ca", at("ca1.crt"), NULL};
  rc = convctl(out, sizeof out, eout, sizeof eout, dev);
  unsetenv("CONVD_TLS_CERT");
  unsetenv("CONVD_TLS_KEY");
  ASSERT_EQ_INT(rc, 0);
  ASSERT_CONTAINS(out, "cpu0");
  /* A certificate without its key is the client's own error, before any connection. */
  const char *half[] = {"devices", "--server", d.target, "--tls-ca", at("ca1.crt"), "--tls-cert",
                        at("client1.crt"), NULL};
  ASSERT_EQ_INT(convctl(out, sizeof out, eout, sizeof eout, half), 2);
  ASSERT_CONTAINS(eout, "tls_key_file");
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* ---- tokens ------------------------------------------------------------------------------ */

static void test_tokens(void) {
  char tok[160];
  snprintf(tok, sizeof tok, "%s", at("tokens"));
  ASSERT_TRUE(tokens_file(tok, "# tenants of this node\n\n"
                               "alice " TOKEN_A " inflight-bytes=64M calls=4\n"
                               "  bob\t" TOKEN_B "\n") == 0);
  test_daemon d;
  const char *extra[] = {"--auth-tokens", tok, "--log-level", "info", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char err[1024];
  int status = 0;
  /* No token, a wrong one, a prefix of a right one, a right one with a character more. */
  const char *bad[] = {NULL, "not-a-token-of-this-node", "alice-0123456789abcdef", TOKEN_A "x"};
  for (int i = 0; i < 4; i++) {
    ASSERT_EQ_INT(try_list(d.target, NULL, NULL, NULL, NULL, bad[i], &status, err, sizeof err), CONVD_CLIENT_EREMOTE);
    ASSERT_EQ_INT(status, GRPC_STATUS_UNAUTHENTICATED);
    ASSERT_CONTAINS(err, "UNAUTHENTICATED: missing or invalid token");
  }
  /* Conv2d without a token: refused before anything is computed. */
  convd_client *c = client(d.target, NULL, NULL, NULL, NULL, NULL);
  ASSERT_TRUE(c != NULL);
  int rc = conv_checked(c, 0, err, sizeof err);
  status = convd_client_last_status(c);
  /* Health needs no token (probes carry none). */
  int serving = 0;
  int hrc = convd_client_health(c, "", &serving, err, sizeof err);
  convd_client_destroy(c);
  ASSERT_EQ_INT(rc, CONVD_CLIENT_EREMOTE);
  ASSERT_EQ_INT(status, GRPC_STATUS_UNAUTHENTICATED);
  ASSERT_OK(hrc, err);
  ASSERT_TRUE(serving);
  /* The right tokens: served, and the log line names each one's tenant. */
  c = client(d.target, NULL, NULL, NULL, NULL, TOKEN_A);
  ASSERT_TRUE(c != NULL);
  rc = conv_checked(c, 0, err, sizeof err);
  if (rc == 0) rc = conv_checked(c, 1, err, sizeof err);
  convd_client_destroy(c);
  ASSERT_OK(rc, err);
  ASSERT_OK(try_list(d.target, NULL, NULL, NULL, NULL, TOKEN_B, NULL, err, sizeof err), err);
  /* Reflection needs a token too; an unknown method answers UNAUTHENTICATED without one (the
   * list of what is served is not for strangers) and UNIMPLEMENTED with one. */
  char resp[8192], details[512];
  size_t got;
  ASSERT_EQ_INT(raw_call(d.target, REFLECTION_V1, NULL, list_services, sizeof list_services, resp,
                         sizeof resp, &got, details, sizeof details), GRPC_STATUS_UNAUTHENTICATED);
  ASSERT_CONTAINS(details, "missing or invalid token");
  ASSERT_EQ_INT(raw_call(d.target, REFLECTION_V1, TOKEN_B, list_services, sizeof list_services,
                         resp, sizeof resp, &got, details, sizeof details), GRPC_STATUS_OK);
  ASSERT_TRUE(contains(resp, got, "convd.v1.Convolution"));
  ASSERT_EQ_INT(raw_call(d.target, "/x.Y/Z", NULL, "", 0, resp, sizeof resp, &got, details,
                         sizeof details), GRPC_STATUS_UNAUTHENTICATED);
  ASSERT_EQ_INT(raw_call(d.target, "/x.Y/Z", TOKEN_A, "", 0, resp, sizeof resp, &got, details,
                         sizeof details), GRPC_STATUS_UNIMPLEMENTED);
  /* convctl: --token-file (a file others may read is used with a warning), CONVD_TOKEN. */
  char out[4096], eout[4096];
  ASSERT_TRUE(write_file(at("alice.token"), "  " TOKEN_A " \n# ignored\n", 0600) == 0);
  const char *dev[] = {"devices", "--server", d.target, "--token-file", at("alice.token"), NULL};
  ASSERT_EQ_INT(convctl(out, sizeof out, eout, sizeof eout, dev), 0);
  ASSERT_CONTAINS(out, "cpu0");
  ASSERT_TRUE(strstr(eout, "warning") == NULL);
  ASSERT_TRUE(chmod(at("alice.token"), 0644) == 0);
  ASSERT_EQ_INT(convctl(out, sizeof out, eout, sizeof eout, dev), 0);
  ASSERT_CONTAINS(eout, "warning");
  ASSERT_CONTAINS(eout, "chmod 600");
  const char *dev_env[] = {"devices", "--server", d.target, NULL};
  ASSERT_EQ_INT(convctl(out, sizeof out, eout, sizeof eout, dev_env), 1);
  ASSERT_CONTAINS(eout, "UNAUTHENTICATED");
  setenv("CONVD_TOKEN", TOKEN_B, 1);
  rc = convctl(out, sizeof out, eout, sizeof eout, dev_env);
  unsetenv("CONVD_TOKEN");
  ASSERT_EQ_INT(rc, 0);
  /* The log: tenants by name on their calls, "-" on refused ones, never a token. */
  static char log[1 << 16];
  ASSERT_TRUE(test_read_file(d.log, log, sizeof log) > 0);
  ASSERT_CONTAINS(log, "method=Conv2d peer=");
  ASSERT_CONTAINS(log, "tenant=alice status=OK");
  ASSERT_CONTAINS(log, "method=Conv2dUnary");
  ASSERT_CONTAINS(log, "method=ListDevices");
  ASSERT_CONTAINS(log, "tenant=bob status=OK");
  ASSERT_CONTAINS(log, "tenant=- status=UNAUTHENTICATED");
  ASSERT_CONTAINS(log, "method=HealthCheck");
  ASSERT_TRUE(strstr(log, TOKEN_A) == NULL && strstr(log, TOKEN_B) == NULL);
  ASSERT_TRUE(strstr(log, "alice-0123456789abcdef") == NULL);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

static void test_reflection_public(void) {
  char tok[160];
  snprintf(tok, sizeof tok, "%s", at("tokens"));
  ASSERT_TRUE(tokens_file(tok, "alice " TOKEN_A "\n") == 0);
  test_daemon d;
  const char *extra[] = {"--auth-tokens", tok, "--reflection-public", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char resp[8192], details[512], err[512];
  size_t got;
  ASSERT_EQ_INT(raw_call(d.target, REFLECTION_V1, NULL, list_services, sizeof list_services, resp,
                         sizeof resp, &got, details, sizeof details), GRPC_STATUS_OK);
  ASSERT_TRUE(contains(resp, got, "convd.v1.Convolution"));
  /* ... and nothing else opens with it. */
  int status = 0;
  ASSERT_EQ_INT(try_list(d.target, NULL, NULL, NULL, NULL, NULL, &status, err, sizeof err), CONVD_CLIENT_EREMOTE);
  ASSERT_EQ_INT(status, GRPC_STATUS_UNAUTHENTICATED);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

static void test_tokens_file_refused(void) {
  char msg[4096];
  char tok[160];
  snprintf(tok, sizeof tok, "%s", at("tokens"));
  /* Readable by others: refused, with the chmod to run. */
  ASSERT_TRUE(write_file(tok, "alice " TOKEN_A "\n", 0644) == 0);
  const char *args[] = {"--auth-tokens", tok, NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, args), 2);
  ASSERT_CONTAINS(msg, "readable or writable by group or others");
  ASSERT_CONTAINS(msg, "chmod 600");
  ASSERT_CONTAINS(msg, tok);
  ASSERT_TRUE(write_file(tok, "alice " TOKEN_A "\n", 0620) == 0); /* group-writable */
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, args), 2);
  ASSERT_CONTAINS(msg, "mode 0620");
  /* Malformed lines: the line number, never the token. */
  static const struct {
    const char *text, *want;
  } bad[] = {
      {"# c\nalice " TOKEN_A "\nbob shorttoken99\n", "line 3: the token"},
      {"\n\nbad/name " TOKEN_A "\n", "line 3: the tenant name"},
      {"alice " TOKEN_A " calls=many\n", "line 1: calls=N"},
      {"alice " TOKEN_A " inflight-bytes=lots\n", "line 1: inflight-bytes=SIZE"},
      {"alice " TOKEN_A " color=blue\n", "line 1: field 3 is not a limit"},
      {"alice " TOKEN_A "\nbob " TOKEN_B "\ncarol " TOKEN_A "\n", "line 3: the same token is on line 1"},
      {"alice " TOKEN_A " calls=2\nalice " TOKEN_C " calls=3\n", "line 2: calls=3 differs from the 2 that line 1"},
      {TOKEN_A "\n", "line 1: expected TENANT TOKEN"},
      {"# only comments\n\n", "no token in the file"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ASSERT_TRUE(tokens_file(tok, bad[i].text) == 0);
    ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, args), 2);
    ASSERT_CONTAINS(msg, bad[i].want);
    ASSERT_TRUE(strstr(msg, TOKEN_A) == NULL && strstr(msg, "shorttoken99") == NULL);
  }
  const char *missing[] = {"--auth-tokens", at("no-such-file"), NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, missing), 2);
  ASSERT_CONTAINS(msg, at("no-such-file"));
}

/* SIGHUP, then wait (a few seconds at most) until pred holds. */
static int eventually(int (*pred)(void *), void *arg) {
  for (int i = 0; i < 200; i++) {
    if (pred(arg)) return 1;
    sleep_ms(50);
  }
  return 0;
}

/* What to wait for: a ListDevices call's result (target, ca, token, want_rc), or a line in the
 * daemon's log (log, needle). */
typedef struct probe {
  const char *target, *ca, *token;
  int want_rc;
  const char *log, *needle;
} probe;

static int probe_list(void *arg) {
  probe *p = arg;
  char err[512];
  return try_list(p->target, p->ca, NULL, NULL, NULL, p->token, NULL, err, sizeof err) == p->want_rc;
}

static int probe_log(void *arg) {
  probe *p = arg;
  static char log[1 << 16];
  return test_read_file(p->log, log, sizeof log) > 0 && strstr(log, p->needle) != NULL;
}

static void test_tokens_reload(void) {
  char tok[160];
  snprintf(tok, sizeof tok, "%s", at("tokens"));
  ASSERT_TRUE(tokens_file(tok, "alice " TOKEN_A "\n") == 0);
  test_daemon d;
  const char *extra[] = {"--auth-tokens", tok, "--log-level", "info", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char err[512];
  int status;
  ASSERT_OK(try_list(d.target, NULL, NULL, NULL, NULL, TOKEN_A, NULL, err, sizeof err), err);
  ASSERT_EQ_INT(try_list(d.target, NULL, NULL, NULL, NULL, TOKEN_C, &status, err, sizeof err), CONVD_CLIENT_EREMOTE);
  /* Alice's token rotated: after SIGHUP the new one is served and the old one refused. */
  ASSERT_TRUE(tokens_file(tok, "alice " TOKEN_C "\n") == 0);
  kill(d.pid, SIGHUP);
  probe p = {.target = d.target, .token = TOKEN_C, .want_rc = 0};
  ASSERT_TRUE(eventually(probe_list, &p));
  ASSERT_EQ_INT(try_list(d.target, NULL, NULL, NULL, NULL, TOKEN_A, &status, err, sizeof err), CONVD_CLIENT_EREMOTE);
  ASSERT_EQ_INT(status, GRPC_STATUS_UNAUTHENTICATED);
  /* A broken file on SIGHUP: logged, and the tokens in force stay. */
  ASSERT_TRUE(tokens_file(tok, "alice " TOKEN_C "\nbob short\n") == 0);
  kill(d.pid, SIGHUP);
  probe l = {.log = d.log, .needle = "tokens file not reloaded, the old tokens stay in force"};
  ASSERT_TRUE(eventually(probe_log, &l));
  static char log[1 << 16];
  ASSERT_TRUE(test_read_file(d.log, log, sizeof log) > 0);
  ASSERT_CONTAINS(log, "line 2: the token");
  ASSERT_OK(try_list(d.target, NULL, NULL, NULL, NULL, TOKEN_C, NULL, err, sizeof err), err);
  /* The same checks for a file others can read. */
  ASSERT_TRUE(write_file(tok, "alice " TOKEN_A "\n", 0644) == 0);
  kill(d.pid, SIGHUP);
  l.needle = "chmod 600";
  ASSERT_TRUE(eventually(probe_log, &l));
  ASSERT_OK(try_list(d.target, NULL, NULL, NULL, NULL, TOKEN_C, NULL, err, sizeof err), err);
  ASSERT_EQ_INT(try_list(d.target, NULL, NULL, NULL, NULL, TOKEN_A, NULL, err, sizeof err), CONVD_CLIENT_EREMOTE);
  ASSERT_TRUE(test_read_file(d.log, log, sizeof log) > 0);
  ASSERT_TRUE(strstr(log, TOKEN_A) == NULL && strstr(log, TOKEN_C) == NULL);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* Copies src over dst (the daemon reads dst's path again on SIGHUP). */
static int copy_file(const char *src, const char *dst) {
  char text[16384];
  if (test_read_file(src, text, sizeof text) <= 0) return -1;
  return write_file(dst, text, 0600);
}

static void test_tls_reload(void) {
  ASSERT_TRUE(copy_file(at("server1.crt"), at("tls.crt")) == 0 && copy_file(at("server1.key"), at("tls.key")) == 0);
  test_daemon d;
  const char *extra[] = {"--tls-cert", at("tls.crt"), "--tls-key", at("tls.key"), "--log-level", "info", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char err[512];
  ASSERT_OK(try_list(d.target, at("ca1.crt"), NULL, NULL, NULL, NULL, NULL, err, sizeof err), err);
  ASSERT_EQ_INT(try_list(d.target, at("ca2.crt"), NULL, NULL, NULL, NULL, NULL, err, sizeof err), CONVD_CLIENT_EUNAVAIL);
  /* A half-written rotation (a certificate file that is no PEM): logged, the old one stays. */
  ASSERT_TRUE(copy_file(at("notpem.txt"), at("tls.crt")) == 0);
  kill(d.pid, SIGHUP);
  probe l = {.log = d.log, .needle = "TLS files not reloaded"};
  ASSERT_TRUE(eventually(probe_log, &l));
  ASSERT_OK(try_list(d.target, at("ca1.crt"), NULL, NULL, NULL, NULL, NULL, err, sizeof err), err);
  /* The server's certificate rotated to one CA 2 signed: new connections get it. */
  ASSERT_TRUE(copy_file(at("server2.crt"), at("tls.crt")) == 0 && copy_file(at("server2.key"), at("tls.key")) == 0);
  kill(d.pid, SIGHUP);
  probe p = {.target = d.target, .ca = at("ca2.crt"), .want_rc = 0};
  ASSERT_TRUE(eventually(probe_list, &p));
  ASSERT_EQ_INT(try_list(d.target, at("ca1.crt"), NULL, NULL, NULL, NULL, NULL, err, sizeof err), CONVD_CLIENT_EUNAVAIL);
  convd_client *c = client(d.target, at("ca2.crt"), NULL, NULL, NULL, NULL);
  ASSERT_TRUE(c != NULL);
  int rc = conv_checked(c, 0, err, sizeof err);
  convd_client_destroy(c);
  ASSERT_OK(rc, err);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

/* ---- protected mode and start-up errors -------------------------------------------------- */

static void test_protected_mode(void) {
  char msg[4096], err[512];
  const char *open_all[] = {"--listen", "0.0.0.0:0", NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, open_all), 2);
  ASSERT_CONTAINS(msg, "--listen 0.0.0.0:0 can be reached from other machines");
  ASSERT_CONTAINS(msg, "--tls-cert/--tls-key");
  ASSERT_CONTAINS(msg, "--auth-tokens");
  ASSERT_CONTAINS(msg, "--allow-insecure");
  ASSERT_CONTAINS(msg, "both are missing");
  char tok[160];
  snprintf(tok, sizeof tok, "%s", at("tokens"));
  ASSERT_TRUE(tokens_file(tok, "alice " TOKEN_A "\n") == 0);
  const char *tokens_only[] = {"--listen", "[::]:0", "--auth-tokens", tok, NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, tokens_only), 2);
  ASSERT_CONTAINS(msg, "TLS is missing");
  const char *tls_only[] = {"--listen", "0.0.0.0:0", "--tls-cert", at("server1.crt"), "--tls-key",
                            at("server1.key"), NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, tls_only), 2);
  ASSERT_CONTAINS(msg, "tokens are missing");
  /* --allow-insecure: served on every interface (reached here over loopback). */
  test_daemon d;
  const char *insecure[] = {"--listen", "0.0.0.0:0", "--allow-insecure", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, insecure) == 0);
  ASSERT_OK(try_list(d.target, NULL, NULL, NULL, NULL, NULL, NULL, err, sizeof err), err);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  /* TLS and tokens together need no --allow-insecure. */
  const char *secure[] = {"--listen", "0.0.0.0:0", "--tls-cert", at("server1.crt"), "--tls-key",
                          at("server1.key"), "--auth-tokens", tok, NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, secure) == 0);
  ASSERT_OK(try_list(d.target, at("ca1.crt"), NULL, NULL, NULL, TOKEN_A, NULL, err, sizeof err), err);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  /* The plaintext metrics endpoint stays on loopback beside tokens, unless --metrics-public. */
  const char *metrics[] = {"--auth-tokens", tok, "--metrics-listen", "0.0.0.0:0", NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, metrics), 2);
  ASSERT_CONTAINS(msg, "--metrics-listen 0.0.0.0:0");
  ASSERT_CONTAINS(msg, "--metrics-public");
  const char *metrics_public[] = {"--auth-tokens", tok, "--metrics-listen", "0.0.0.0:0", "--metrics-public", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, metrics_public) == 0);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

static void test_startup_errors(void) {
  char msg[4096];
  const char *cert_only[] = {"--tls-cert", at("server1.crt"), NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, cert_only), 2);
  ASSERT_CONTAINS(msg, "--tls-cert is set but --tls-key is not");
  const char *key_only[] = {"--tls-key", at("server1.key"), NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, key_only), 2);
  ASSERT_CONTAINS(msg, "--tls-key is set but --tls-cert is not");
  const char *ca_only[] = {"--tls-client-ca", at("ca1.crt"), NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, ca_only), 2);
  ASSERT_CONTAINS(msg, "--tls-client-ca needs --tls-cert and --tls-key");
  const char *missing[] = {"--tls-cert", at("no-such.crt"), "--tls-key", at("server1.key"), NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, missing), 2);
  ASSERT_CONTAINS(msg, "--tls-cert");
  ASSERT_CONTAINS(msg, at("no-such.crt"));
  ASSERT_CONTAINS(msg, "No such file");
  const char *notpem[] = {"--tls-cert", at("server1.crt"), "--tls-key", at("notpem.txt"), NULL};
  ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, notpem), 2);
  ASSERT_CONTAINS(msg, "--tls-key");
  ASSERT_CONTAINS(msg, at("notpem.txt"));
  ASSERT_CONTAINS(msg, "no PEM");
  /* An unreadable file (mode 000; root reads anything, so only where the test is not root). */
  if (geteuid() != 0) {
    ASSERT_TRUE(copy_file(at("ca1.crt"), at("unreadable.crt")) == 0 && chmod(at("unreadable.crt"), 0) == 0);
    const char *unreadable[] = {"--tls-cert", at("server1.crt"), "--tls-key", at("server1.key"),
                                "--tls-client-ca", at("unreadable.crt"), NULL};
    ASSERT_EQ_INT(convd_refuses(msg, sizeof msg, unreadable), 2);
    ASSERT_CONTAINS(msg, "--tls-client-ca");
    ASSERT_CONTAINS(msg, "Permission denied");
  }
  /* Boolean flags take true/false from the environment and refuse anything else. */
  setenv("CONVD_ALLOW_INSECURE", "maybe", 1);
  const char *none[] = {NULL};
  int rc = convd_refuses(msg, sizeof msg, none);
  unsetenv("CONVD_ALLOW_INSECURE");
  ASSERT_EQ_INT(rc, 2);
  ASSERT_CONTAINS(msg, "CONVD_ALLOW_INSECURE=maybe: expected true or false");
}

/* ---- in process: the loopback rules and the tokens table -------------------------------- */

static void test_loopback_rules(void) {
  static const struct {
    const char *addr;
    int local;
  } cases[] = {
      {"127.0.0.1:50051", 1},   {"127.9.8.7:1", 1},        {"localhost:50051", 1},
      {"LOCALHOST:1", 1},       {"[::1]:50051", 1},        {"[::ffff:127.0.0.1]:1", 1},
      {"unix:/run/convd.sock", 1}, {"unix-abstract:convd", 1}, {"0.0.0.0:50051", 0},
      {"[::]:50051", 0},        {"10.1.2.3:50051", 0},     {"128.0.0.1:1", 0},
      {"convd.example:50051", 0}, {":50051", 0},           {"[::2]:1", 0},
      {"[::1:50051", 0},        {"localhost.evil.example:1", 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    if (convd_protect_is_local(cases[i].addr) != cases[i].local)
      FAIL_AT("%s: expected %s", cases[i].addr, cases[i].local ? "local" : "reachable");
}

/* --listen and --unix-socket-mode as convd_config_parse takes them (flags after argv[0]). */
static int parse_args(convd_config *cfg, char *err, size_t errlen, const char *const *args) {
  char *argv[24] = {"convd"};
  int n = 1;
  for (int i = 0; args[i] && n < 23; i++) argv[n++] = (char *)args[i];
  argv[n] = NULL;
  return convd_config_parse(cfg, n, argv, stdout, err, errlen);
}

static void test_listen_config(void) {
  static convd_config cfg;
  char err[512];
  const char *none[] = {NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, none), err);
  ASSERT_EQ_INT(cfg.listen.n, 1);
  ASSERT_TRUE(strcmp(cfg.listen.addr[0], "127.0.0.1:50051") == 0);
  ASSERT_EQ_INT(cfg.unix_socket_mode, 0660);
  /* Repeated flags, in order; the mode in octal. */
  const char *two[] = {"--listen", "127.0.0.1:0", "--listen=unix:/run/convd/convd.sock",
                       "--unix-socket-mode", "600", NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, two), err);
  ASSERT_EQ_INT(cfg.listen.n, 2);
  ASSERT_TRUE(strcmp(cfg.listen.addr[0], "127.0.0.1:0") == 0);
  ASSERT_TRUE(strcmp(cfg.listen.addr[1], "unix:/run/convd/convd.sock") == 0);
  ASSERT_TRUE(strcmp(convd_listen_unix_path(cfg.listen.addr[1]), "/run/convd/convd.sock") == 0);
  ASSERT_TRUE(convd_listen_unix_path(cfg.listen.addr[0]) == NULL);
  ASSERT_EQ_INT(cfg.unix_socket_mode, 0600);
  /* The variable: comma-separated, spaces around an element dropped; a flag replaces it. */
  setenv("CONVD_LISTEN", "[::1]:7000, unix:/tmp/a.sock ,localhost:0", 1);
  int rc = parse_args(&cfg, err, sizeof err, none);
  const int n_env = cfg.listen.n;
  const int third_ok = n_env == 3 && strcmp(cfg.listen.addr[1], "unix:/tmp/a.sock") == 0 &&
                       strcmp(cfg.listen.addr[2], "localhost:0") == 0;
  const char *flag[] = {"--listen", "127.0.0.1:1", NULL};
  int rc2 = parse_args(&cfg, err, sizeof err, flag);
  unsetenv("CONVD_LISTEN");
  ASSERT_OK(rc, err);
  ASSERT_EQ_INT(n_env, 3);
  ASSERT_TRUE(third_ok);
  ASSERT_OK(rc2, err);
  ASSERT_EQ_INT(cfg.listen.n, 1);
  ASSERT_TRUE(strcmp(cfg.listen.addr[0], "127.0.0.1:1") == 0);
  /* sun_path holds 107 bytes and a NUL. */
  char at107[5 + 108], at108[5 + 109];
  snprintf(at107, sizeof at107, "unix:/%0106d", 0);
  snprintf(at108, sizeof at108, "unix:/%0107d", 0);
  const char *fits[] = {"--listen", at107, NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, fits), err);
  static const struct {
    const char *args[20], *words;
  } bad[] = {
      {{"--listen", "", NULL}, "--listen: an empty address"},
      {{"--listen", "unix:convd.sock", NULL}, "must be absolute"},
      {{"--listen", "unix:", NULL}, "must be absolute"},
      {{"--listen", "unix-abstract:convd", NULL}, "abstract Unix sockets are not served"},
      {{"--listen", "127.0.0.1", NULL}, "expected HOST:PORT"},
      {{"--listen", ":50051", NULL}, "expected HOST:PORT"},
      {{"--listen", "127.0.0.1:65536", NULL}, "expected HOST:PORT"},
      {{"--listen", "127.0.0.1:http", NULL}, "expected HOST:PORT"},
      {{"--listen", "127.0.0.1:1,127.0.0.1:2", NULL}, "one address per --listen"},
      {{"--listen", "unix:/tmp/x", "--listen", "unix:/tmp/x", NULL}, "--listen unix:/tmp/x is given twice"},
      {{"--listen", "127.0.0.1:5", "--listen", "127.0.0.1:5", NULL}, "given twice"},
      {{"--unix-socket-mode", "0668", NULL}, "--unix-socket-mode=0668: expected an octal file mode"},
      {{"--unix-socket-mode", "01777", NULL}, "from 0000 to 0777"},
      {{"--unix-socket-mode", "rw", NULL}, "octal"},
      {{"--listen", "a:1", "--listen", "a:2", "--listen", "a:3", "--listen", "a:4", "--listen",
        "a:5", "--listen", "a:6", "--listen", "a:7", "--listen", "a:8", "--listen", "a:9", NULL},
       "--listen: at most 8 addresses (a:9 is one too many)"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    if (parse_args(&cfg, err, sizeof err, bad[i].args) != CONVD_EINVAL)
      FAIL_AT("case %zu (%s): accepted", i, bad[i].words);
    else if (strstr(err, bad[i].words) == NULL)
      FAIL_AT("case %zu: \"%s\" lacks \"%s\"", i, err, bad[i].words);
  }
  const char *long_path[] = {"--listen", at108, NULL};
  ASSERT_EQ_INT(parse_args(&cfg, err, sizeof err, long_path), CONVD_EINVAL);
  ASSERT_CONTAINS(err, "is 108 bytes, longer than the 107");
  /* Port 0 twice is two free ports. */
  const char *zero[] = {"--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, zero), err);
  setenv("CONVD_LISTEN", "127.0.0.1:0,", 1);
  rc = parse_args(&cfg, err, sizeof err, none);
  unsetenv("CONVD_LISTEN");
  ASSERT_EQ_INT(rc, CONVD_EINVAL);
  ASSERT_CONTAINS(err, "CONVD_LISTEN: an empty address");
  /* Protected mode looks at every address: a reachable one anywhere in the list. */
  const char *mixed[] = {"--listen", "unix:/tmp/p.sock", "--listen", "0.0.0.0:0", "--listen",
                         "127.0.0.1:0", NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, mixed), err);
  ASSERT_EQ_INT(convd_protect_check(&cfg, err, sizeof err), CONVD_EINVAL);
  ASSERT_CONTAINS(err, "--listen 0.0.0.0:0 can be reached from other machines");
  const char *local[] = {"--listen", "unix:/tmp/p.sock", "--listen", "[::1]:0", NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, local), err);
  ASSERT_OK(convd_protect_check(&cfg, err, sizeof err), err);
}

static void test_tokens_table(void) {
  char tok[160];
  snprintf(tok, sizeof tok, "%s", at("tokens-unit"));
  ASSERT_TRUE(tokens_file(tok, "# rotation: alice has two tokens for a while\r\n"
                               "alice " TOKEN_A " inflight-bytes=64M calls=3\r\n"
                               "\t\r\n"
                               "alice " TOKEN_C " weights-bytes=1G calls=3\n"
                               "b.o_b-2 " TOKEN_B) == 0);
  convd_auth *a;
  char err[512], tenant[CONVD_AUTH_TENANT_MAX + 1];
  ASSERT_OK(convd_auth_load(tok, &a, err, sizeof err), err);
  size_t tokens, tenants;
  convd_auth_counts(a, &tokens, &tenants);
  ASSERT_EQ_INT(tokens, 3);
  ASSERT_EQ_INT(tenants, 2);
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_A, strlen(TOKEN_A), tenant), 0);
  ASSERT_TRUE(strcmp(tenant, "alice") == 0);
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_C, strlen(TOKEN_C), tenant), 0);
  ASSERT_TRUE(strcmp(tenant, "alice") == 0);
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_B, strlen(TOKEN_B), tenant), 0);
  ASSERT_TRUE(strcmp(tenant, "b.o_b-2") == 0);
  /* Near misses: a prefix, one character more, one changed, empty. */
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_A, strlen(TOKEN_A) - 1, tenant), CONVD_ENOTFOUND);
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_A "x", strlen(TOKEN_A) + 1, tenant), CONVD_ENOTFOUND);
  char changed[] = TOKEN_A;
  changed[10] ^= 1;
  ASSERT_EQ_INT(convd_auth_check(a, changed, strlen(changed), tenant), CONVD_ENOTFOUND);
  ASSERT_EQ_INT(convd_auth_check(a, "", 0, tenant), CONVD_ENOTFOUND);
  /* The limits, merged over a tenant's lines, sizes as the flags take them. */
  const convd_tenant *t = convd_auth_tenant_get(a, "alice");
  ASSERT_TRUE(t != NULL);
  const convd_tenant_limits *lim = convd_tenant_limits_of(t);
  ASSERT_EQ_INT(lim->inflight_bytes, 64u << 20);
  ASSERT_EQ_INT(lim->calls, 3);
  ASSERT_EQ_INT(lim->weights_bytes, 1u << 30);
  const convd_tenant *b = convd_auth_tenant_get(a, "b.o_b-2");
  ASSERT_TRUE(b != NULL && convd_tenant_limits_of(b)->calls == 0 && convd_tenant_limits_of(b)->inflight_bytes == 0);
  ASSERT_TRUE(convd_auth_tenant_get(a, "carol") == NULL);
  /* A reload that fails keeps the table; one that works replaces it, while the tenants held
   * from the old one stay valid until put back (AddressSanitizer would see otherwise). */
  ASSERT_TRUE(tokens_file(tok, "alice short\n") == 0);
  ASSERT_EQ_INT(convd_auth_reload(a, err, sizeof err), CONVD_EINVAL);
  ASSERT_CONTAINS(err, "line 1");
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_A, strlen(TOKEN_A), tenant), 0);
  ASSERT_TRUE(tokens_file(tok, "carol " TOKEN_B "\n") == 0);
  ASSERT_OK(convd_auth_reload(a, err, sizeof err), err);
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_A, strlen(TOKEN_A), tenant), CONVD_ENOTFOUND);
  ASSERT_EQ_INT(convd_auth_check(a, TOKEN_B, strlen(TOKEN_B), tenant), 0);
  ASSERT_TRUE(strcmp(tenant, "carol") == 0);
  ASSERT_TRUE(convd_auth_tenant_get(a, "alice") == NULL);
  ASSERT_TRUE(strcmp(convd_tenant_name(t), "alice") == 0 && convd_tenant_limits_of(t)->calls == 3);
  convd_auth_tenant_put(t);
  convd_auth_tenant_put(b);
  convd_auth_destroy(a);
}

/* ---- a unix: listener beside TCP: TLS and tokens apply to it too ------------------------ */

static void test_unix_listener(void) {
  char tok[160], target[200];
  snprintf(tok, sizeof tok, "%s", at("tokens-unix"));
  ASSERT_TRUE(tokens_file(tok, "alice " TOKEN_A "\n") == 0);
  ASSERT_TRUE(copy_file(at("server1.crt"), at("tls.crt")) == 0 && copy_file(at("server1.key"), at("tls.key")) == 0);
  snprintf(target, sizeof target, "unix:%s", at("convd.sock"));
  test_daemon d;
  const char *extra[] = {"--listen", target, "--tls-cert", at("tls.crt"), "--tls-key", at("tls.key"),
                         "--auth-tokens", tok, "--log-level", "info", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  char err[1024];
  /* gRPC checks a unix: target's certificate for "localhost", which the server's carries. */
  convd_client *c = client(target, at("ca1.crt"), NULL, NULL, NULL, TOKEN_A);
  ASSERT_TRUE(c != NULL);
  int rc = conv_checked(c, 0, err, sizeof err);
  if (rc == 0) rc = conv_checked(c, 1, err, sizeof err);
  convd_client_destroy(c);
  ASSERT_OK(rc, err);
  ASSERT_EQ_INT(try_list(target, NULL, NULL, NULL, NULL, TOKEN_A, NULL, err, sizeof err), CONVD_CLIENT_EUNAVAIL);
  int status = 0;
  ASSERT_EQ_INT(try_list(target, at("ca1.crt"), NULL, NULL, NULL, NULL, &status, err, sizeof err), CONVD_CLIENT_EREMOTE);
  ASSERT_EQ_INT(status, GRPC_STATUS_UNAUTHENTICATED);
  ASSERT_OK(try_list(d.target, at("ca1.crt"), NULL, NULL, NULL, TOKEN_A, NULL, err, sizeof err), err);
  char out[4096], eout[4096];
  const char *h[] = {"health", "--server", target, "--tls-ca", at("ca1.crt"), "--timeout", "20", NULL};
  ASSERT_EQ_INT(convctl(out, sizeof out, eout, sizeof eout, h), 0);
  ASSERT_CONTAINS(out, "SERVING");
  /* A rotation reaches every listener: each has its own certificate fetcher. */
  ASSERT_TRUE(copy_file(at("server2.crt"), at("tls.crt")) == 0 && copy_file(at("server2.key"), at("tls.key")) == 0);
  kill(d.pid, SIGHUP);
  probe tcp = {.target = d.target, .ca = at("ca2.crt"), .token = TOKEN_A, .want_rc = 0};
  ASSERT_TRUE(eventually(probe_list, &tcp));
  probe unix_ = {.target = target, .ca = at("ca2.crt"), .token = TOKEN_A, .want_rc = 0};
  ASSERT_TRUE(eventually(probe_list, &unix_));
  ASSERT_EQ_INT(try_list(target, at("ca1.crt"), NULL, NULL, NULL, TOKEN_A, NULL, err, sizeof err), CONVD_CLIENT_EUNAVAIL);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
  struct stat st;
  ASSERT_TRUE(lstat(at("convd.sock"), &st) != 0 && errno == ENOENT);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"loopback_rules", test_loopback_rules},
      {"listen_config", test_listen_config},
      {"tokens_table", test_tokens_table},
      {"startup_errors", test_startup_errors},
      {"tokens_file_refused", test_tokens_file_refused},
      {"protected_mode", test_protected_mode},
      {"tls", test_tls},
      {"mutual_tls", test_mutual_tls},
      {"tokens", test_tokens},
      {"reflection_public", test_reflection_public},
      {"tokens_reload", test_tokens_reload},
      {"tls_reload", test_tls_reload},
      {"unix_listener", test_unix_listener},
  };
  if (make_pki()) return 1;
  int rc = test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
  remove_pki();
  return rc;
}
