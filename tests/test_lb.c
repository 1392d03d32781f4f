/* Several daemons behind one target: libconvd_client's lb_policy and convctl's --lb over an
 * ipv4: list of three daemons on loopback (calls spread over all three; one daemon killed
 * mid-run, every later call succeeds on the other two), the option's validation, and the
 * daemon's --max-connection-age / --max-connection-age-grace as the config parser takes them and
 * as a long-lived channel lives through them. Every result is compared with the reference. */
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "client_params.h"
#include "config.h"
#include "daemon.h"
#include "err.h"
#include "npy.h"
#include "ref.h"
#include "testutil.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* convd_config_parse on "convd" + args (NULL-terminated). */
static int parse_args(convd_config *cfg, char *err, size_t errlen, const char *const *args) {
  char *argv[16] = {"convd"};
  int n = 1;
  for (int i = 0; args[i] && n < 15; i++) argv[n++] = (char *)args[i];
  argv[n] = NULL;
  return convd_config_parse(cfg, n, argv, stdout, err, errlen);
}

static void test_max_connection_age_config(void) {
  static convd_config cfg;
  char err[512];
  const char *none[] = {NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, none), err);
  ASSERT_TRUE(cfg.max_connection_age == 0 && cfg.max_connection_age_grace == 0); /* off */
  const char *both[] = {"--max-connection-age", "300", "--max-connection-age-grace=2.5", NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, both), err);
  ASSERT_TRUE(cfg.max_connection_age == 300 && cfg.max_connection_age_grace == 2.5);
  const char *week[] = {"--max-connection-age", "604800", "--max-connection-age-grace", "604800", NULL};
  ASSERT_OK(parse_args(&cfg, err, sizeof err, week), err);
  setenv("CONVD_MAX_CONNECTION_AGE", "1", 1);
  int rc = parse_args(&cfg, err, sizeof err, none);
  const double from_env = cfg.max_connection_age;
  setenv("CONVD_MAX_CONNECTION_AGE", "-5", 1);
  int rc_bad = parse_args(&cfg, err, sizeof err, none);
  unsetenv("CONVD_MAX_CONNECTION_AGE");
  ASSERT_OK(rc, err);
  ASSERT_TRUE(from_env == 1);
  ASSERT_EQ_INT(rc_bad, CONVD_EINVAL);
  ASSERT_CONTAINS(err, "CONVD_MAX_CONNECTION_AGE=-5: expected seconds from 0 to 604800");
  static const struct {
    const char *args[6], *words;
  } bad[] = {
      {{"--max-connection-age", "-1", NULL}, "--max-connection-age=-1: expected seconds from 0 to 604800"},
      {{"--max-connection-age", "604801", NULL}, "--max-connection-age=604801: expected seconds"},
      {{"--max-connection-age", "1e999", NULL}, "--max-connection-age=1e999: expected seconds"},
      {{"--max-connection-age", "99999999999999999999", NULL}, "expected seconds from 0 to 604800"},
      {{"--max-connection-age", "5m", NULL}, "--max-connection-age=5m: expected seconds"},
      {{"--max-connection-age", "", NULL}, "--max-connection-age=: expected seconds"},
      {{"--max-connection-age", "nan", NULL}, "--max-connection-age=nan: expected seconds"},
      {{"--max-connection-age", "0.5", NULL}, "--max-connection-age=0.5: expected 0 (never) or at least 1 second"},
      {{"--max-connection-age", NULL}, "option --max-connection-age needs a value"},
      {{"--max-connection-age=10", "--max-connection-age-grace", "-0.1", NULL},
       "--max-connection-age-grace=-0.1: expected seconds from 0 to 604800"},
      {{"--max-connection-age=10", "--max-connection-age-grace", "1x", NULL},
       "--max-connection-age-grace=1x: expected seconds"},
      {{"--max-connection-age-grace", "5", NULL},
       "--max-connection-age-grace=5 has no effect without --max-connection-age"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    if (parse_args(&cfg, err, sizeof err, bad[i].args) != CONVD_EINVAL)
      FAIL_AT("case %zu (%s): accepted", i, bad[i].words);
    else if (strstr(err, bad[i].words) == NULL)
      FAIL_AT("case %zu: \"%s\" lacks \"%s\"", i, err, bad[i].words);
  }
}

/* The policy names the library takes; others fail at create, naming the name. */
static void test_lb_policy_option(void) {
  static const char *const good[] = {"round_robin", "pick_first", NULL};
  char err[512];
  for (int i = 0; i < 3; i++) {
    convd_client_opts o = {.lb_policy = good[i]};
    convd_client *c;
    ASSERT_OK(convd_client_create("ipv4:127.0.0.1:1,127.0.0.1:2", &o, &c, err, sizeof err), err);
    convd_client_destroy(c);
  }
  static const char *const bad[] = {"", "roundrobin", "ROUND_ROBIN", "grpclb", "round_robin ",
                                    "pick_first,round_robin"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    convd_client_opts o = {.lb_policy = bad[i]};
    convd_client *c = (convd_client *)&o; /* must come back NULL */
    int rc = convd_client_create("127.0.0.1:1", &o, &c, err, sizeof err);
    if (rc != CONVD_CLIENT_EINVAL || c != NULL) {
      FAIL_AT("lb_policy \"%s\": rc %d", bad[i], rc);
      continue;
    }
    char want[128];
    snprintf(want, sizeof want, "lb_policy \"%s\": expected pick_first or round_robin", bad[i]);
    ASSERT_CONTAINS(err, want);
  }
}

/* One small convolution and its reference, used for every call. */
typedef struct small_conv {
  convd_client_conv_params p;
  float x[1 * 3 * 12 * 12], w[4 * 3 * 3 * 3], b[4], y[1 * 4 * 12 * 12];
  double want[1 * 4 * 12 * 12];
} small_conv;

static void small_conv_init(small_conv *s) {
  convd_conv_params p;
  convd_conv_params_default(&p);
  p.n = 1, p.c_in = 3, p.c_per_group = 3, p.h = 12, p.w = 12, p.c_out = 4, p.kh = 3, p.kw = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1, p.has_bias = 1;
  rng r = {0x1b5eed};
  rng_fill(&r, s->x, sizeof s->x / sizeof s->x[0]);
  rng_fill(&r, s->w, sizeof s->w / sizeof s->w[0]);
  rng_fill(&r, s->b, sizeof s->b / sizeof s->b[0]);
  convd_conv c;
  char err[256];
  if (convd_conv_init(&c, &p, err, sizeof err)) abort(); /* fixed shapes: cannot fail */
  float ref[sizeof s->y / sizeof s->y[0]];
  convd_ref_conv2d(&c, s->x, s->w, s->b, ref, NULL);
  for (size_t i = 0; i < c.output_elems; i++) s->want[i] = ref[i];
  s->p = convd_client_params_from_conv(&p);
}

/* The golden tolerance (check_close's, without its line per call): 0, or the worst element. */
static int small_compare(const small_conv *s, const float *y, char *err, size_t errlen) {
  double scale = 1;
  for (size_t i = 0; i < sizeof s->want / sizeof s->want[0]; i++)
    if (fabs(s->want[i]) > scale) scale = fabs(s->want[i]);
  for (size_t i = 0; i < sizeof s->want / sizeof s->want[0]; i++)
    if (!(fabs((double)y[i] - s->want[i]) <= 1e-4 * scale)) {
      snprintf(err, errlen, "output[%zu] = %g, expected %g", i, (double)y[i], s->want[i]);
      return CONVD_CLIENT_EREMOTE;
    }
  return 0;
}

/* One Conv2dUnary call, its output compared; 0 or the call's error (message in err). */
static int small_call(convd_client *c, small_conv *s, char *err, size_t errlen) {
  poison(s->y, sizeof s->y / sizeof s->y[0]);
  int rc = convd_client_conv2d_unary(c, &s->p, s->x, s->w, s->b, s->y, NULL, err, errlen);
  if (rc) return rc;
  return small_compare(s, s->y, err, errlen);
}

/* The daemon's completed ops (all devices), through a client of its own; -1 on failure. */
static long long daemon_ops(const char *target) {
  convd_client *c;
  char err[512];
  convd_client_opts o = {.timeout_seconds = 10};
  if (convd_client_create(target, &o, &c, err, sizeof err)) return -1;
  convd_client_device *devs;
  size_t n;
  long long ops = -1;
  if (convd_client_list_devices(c, &devs, &n, err, sizeof err) == 0) {
    ops = 0;
    for (size_t i = 0; i < n; i++) ops += (long long)devs[i].completed_ops;
    free(devs);
  } else {
    fprintf(stderr, "  ListDevices on %s: %s\n", target, err);
  }
  convd_client_destroy(c);
  return ops;
}

enum { NDAEMONS = 3 };

static int start_three(test_daemon d[NDAEMONS], char *target, size_t len) {
  size_t at = (size_t)snprintf(target, len, "ipv4:");
  for (int i = 0; i < NDAEMONS; i++) {
    if (test_daemon_start(&d[i], CONVD_BIN, NULL)) {
      for (int j = 0; j < i; j++) test_daemon_stop(&d[j], 30);
      return -1;
    }
    at += (size_t)snprintf(target + at, len - at, "%s%s", i ? "," : "", d[i].target);
  }
  return 0;
}

/* SIGKILL: the daemon gets no drain and sends no GOAWAY; its connections just close. */
static int kill_daemon(test_daemon *d) {
  if (kill(d->pid, SIGKILL) || waitpid(d->pid, NULL, 0) != d->pid) return -1;
  d->pid = 0;
  unlink(d->log);
  return 0;
}

/* The acceptance case: 60 calls over one round_robin channel reach all three daemons; one
 * daemon killed mid-run, the 30 calls after it all succeed, on the other two. */
static void test_round_robin_three_daemons(void) {
  test_daemon d[NDAEMONS];
  char target[256], err[512];
  ASSERT_TRUE(start_three(d, target, sizeof target) == 0);
  static small_conv s;
  small_conv_init(&s);
  convd_client_opts o = {.lb_policy = "round_robin", .timeout_seconds = 30};
  convd_client *c;
  ASSERT_OK(convd_client_create(target, &o, &c, err, sizeof err), err);
  int failed = 0;
  for (int i = 0; i < 60; i++)
    if (small_call(c, &s, err, sizeof err)) {
      failed++;
      FAIL_AT("call %d of 60: %s", i, err);
    }
  long long ops[NDAEMONS], total = 0;
  for (int i = 0; i < NDAEMONS; i++) total += ops[i] = daemon_ops(d[i].target);
  printf("  60 calls over %s: %lld, %lld and %lld ops\n", target, ops[0], ops[1], ops[2]);
  for (int i = 0; i < NDAEMONS; i++)
    if (ops[i] <= 0) FAIL_AT("daemon %d (%s) ran %lld ops of 60 calls", i, d[i].target, ops[i]);
  if (total != 60) FAIL_AT("%lld ops for 60 one-op calls", total);
  /* Mid-run: the second daemon is killed between two calls; the channel has not seen its
   * connection close yet when the next call is picked. */
  ASSERT_TRUE(kill_daemon(&d[1]) == 0);
  for (int i = 0; i < 30; i++)
    if (small_call(c, &s, err, sizeof err)) {
      failed++;
      FAIL_AT("call %d after the kill: %s", i, err);
    }
  const long long after0 = daemon_ops(d[0].target), after2 = daemon_ops(d[2].target);
  printf("  daemon 1 killed; 30 more calls: %lld and %lld ops on the other two\n", after0 - ops[0],
         after2 - ops[2]);
  if (after0 <= ops[0] || after2 <= ops[2] || (after0 - ops[0]) + (after2 - ops[2]) != 30)
    FAIL_AT("after the kill: %lld -> %lld and %lld -> %lld ops", ops[0], after0, ops[2], after2);
  convd_client_destroy(c);
  ASSERT_EQ_INT(failed, 0);
  ASSERT_TRUE(test_daemon_stop(&d[0], 60) == 0);
  ASSERT_TRUE(test_daemon_stop(&d[2], 60) == 0);
}

/* pick_first over the same list sends everything to the first address that answers: the
 * option reaches gRPC (else round_robin's spread above could be gRPC's default). */
static void test_pick_first_one_daemon(void) {
  test_daemon d[NDAEMONS];
  char target[256], err[512];
  ASSERT_TRUE(start_three(d, target, sizeof target) == 0);
  static small_conv s;
  small_conv_init(&s);
  convd_client_opts o = {.lb_policy = "pick_first", .timeout_seconds = 30};
  convd_client *c;
  ASSERT_OK(convd_client_create(target, &o, &c, err, sizeof err), err);
  for (int i = 0; i < 12; i++) ASSERT_OK(small_call(c, &s, err, sizeof err), err);
  convd_client_destroy(c);
  long long ops[NDAEMONS];
  for (int i = 0; i < NDAEMONS; i++) ops[i] = daemon_ops(d[i].target);
  printf("  pick_first: %lld, %lld and %lld ops\n", ops[0], ops[1], ops[2]);
  ASSERT_TRUE(ops[0] == 12 && ops[1] == 0 && ops[2] == 0);
  for (int i = 0; i < NDAEMONS; i++) ASSERT_TRUE(test_daemon_stop(&d[i], 60) == 0);
}

/* convctl: --lb and $CONVD_LB over an ipv4: list whose first address is dead; bad names exit 2. */
static void test_convctl_lb(void) {
  test_daemon d[NDAEMONS];
  char target[256], err[512], msg[4096];
  ASSERT_TRUE(start_three(d, target, sizeof target) == 0);
  /* A target whose first address has no daemon: port 1 on loopback refuses. */
  char with_dead[300];
  snprintf(with_dead, sizeof with_dead, "ipv4:127.0.0.1:1,%s", target + 5);
  static small_conv s;
  small_conv_init(&s);
  char x[128], w[128], b[128], y[128], out[128], errf[128];
  const int pid = (int)getpid();
  snprintf(x, sizeof x, "/tmp/convd-lb-%d-x.npy", pid);
  snprintf(w, sizeof w, "/tmp/convd-lb-%d-w.npy", pid);
  snprintf(b, sizeof b, "/tmp/convd-lb-%d-b.npy", pid);
  snprintf(y, sizeof y, "/tmp/convd-lb-%d-y.npy", pid);
  snprintf(out, sizeof out, "/tmp/convd-lb-%d.out", pid);
  snprintf(errf, sizeof errf, "/tmp/convd-lb-%d.err", pid);
  const int64_t xs[4] = {1, 3, 12, 12}, ws[4] = {4, 3, 3, 3}, bs[1] = {4};
  ASSERT_OK(convd_npy_write_f32(x, xs, 4, s.x, err, sizeof err), err);
  ASSERT_OK(convd_npy_write_f32(w, ws, 4, s.w, err, sizeof err), err);
  ASSERT_OK(convd_npy_write_f32(b, bs, 1, s.b, err, sizeof err), err);
  /* Six conv calls, three by flag and three by the variable; each output compared. */
  for (int i = 0; i < 6; i++) {
    char *flag[] = {CONVCTL_BIN, "conv", "--server", with_dead, "--lb", "round_robin", "--input", x,
                    "--weight", w, "--bias", b, "--padding", "1", "--output", y, "--no-progress",
                    NULL};
    char *env[] = {CONVCTL_BIN, "conv", "--server", with_dead, "--input", x, "--weight", w, "--bias",
                   b, "--padding", "1", "--output", y, "--no-progress", NULL};
    if (i >= 3) setenv("CONVD_LB", "round_robin", 1);
    int rc = test_run(i < 3 ? flag : env, out, errf, 60);
    unsetenv("CONVD_LB");
    test_read_file(errf, msg, sizeof msg);
    if (rc != 0) FAIL_AT("convctl conv %d: exit %d: %s", i, rc, msg);
    ASSERT_EQ_INT(rc, 0);
    convd_npy got;
    ASSERT_OK(convd_npy_read(y, &got, err, sizeof err), err);
    const int bad = got.count != sizeof s.y / sizeof s.y[0] ||
                    small_compare(&s, got.data, err, sizeof err);
    convd_npy_free(&got);
    if (bad) FAIL_AT("convctl conv %d: %s", i, got.count != sizeof s.y / sizeof s.y[0] ? "shape" : err);
    ASSERT_TRUE(!bad);
    unlink(y);
  }
  long long total = 0;
  for (int i = 0; i < NDAEMONS; i++) total += daemon_ops(d[i].target);
  ASSERT_EQ_INT(total, 6);
  /* devices and health through the list */
  char *dev[] = {CONVCTL_BIN, "devices", "--server", with_dead, "--lb", "round_robin", NULL};
  ASSERT_EQ_INT(test_run(dev, out, errf, 60), 0);
  test_read_file(out, msg, sizeof msg);
  ASSERT_CONTAINS(msg, "cpu0");
  char *health[] = {CONVCTL_BIN, "health", "--server", target, "--lb", "pick_first", NULL};
  ASSERT_EQ_INT(test_run(health, out, errf, 60), 0);
  /* Bad names: exit 2 before connecting, naming where the name came from. */
  char *bad_flag[] = {CONVCTL_BIN, "devices", "--server", target, "--lb", "least_request", NULL};
  ASSERT_EQ_INT(test_run(bad_flag, out, errf, 60), 2);
  test_read_file(errf, msg, sizeof msg);
  ASSERT_CONTAINS(msg, "--lb least_request: expected pick_first or round_robin");
  char *no_value[] = {CONVCTL_BIN, "devices", "--server", target, "--lb", NULL};
  ASSERT_EQ_INT(test_run(no_value, out, errf, 60), 2);
  test_read_file(errf, msg, sizeof msg);
  ASSERT_CONTAINS(msg, "--lb needs a value");
  setenv("CONVD_LB", "Round-Robin", 1);
  char *bad_env[] = {CONVCTL_BIN, "health", "--server", target, NULL};
  int rc = test_run(bad_env, out, errf, 60);
  unsetenv("CONVD_LB");
  ASSERT_EQ_INT(rc, 2);
  test_read_file(errf, msg, sizeof msg);
  ASSERT_CONTAINS(msg, "$CONVD_LB Round-Robin: expected pick_first or round_robin");
  /* The flag wins over the variable. */
  setenv("CONVD_LB", "bogus", 1);
  char *flag_wins[] = {CONVCTL_BIN, "health", "--server", target, "--lb", "round_robin", NULL};
  rc = test_run(flag_wins, out, errf, 60);
  unsetenv("CONVD_LB");
  ASSERT_EQ_INT(rc, 0);
  unlink(x), unlink(w), unlink(b), unlink(out), unlink(errf);
  for (int i = 0; i < NDAEMONS; i++) ASSERT_TRUE(test_daemon_stop(&d[i], 60) == 0);
}

/* A long-lived channel to a daemon with --max-connection-age 1: its connection is replaced
 * about every second, and calls made over 3.5 s (each between two replacements or across one)
 * all succeed; the daemon counts every one. */
static void test_long_lived_channel_across_ages(void) {
  test_daemon d;
  const char *extra[] = {"--max-connection-age", "1", "--max-connection-age-grace", "5", NULL};
  ASSERT_TRUE(test_daemon_start(&d, CONVD_BIN, extra) == 0);
  static small_conv s;
  small_conv_init(&s);
  char err[512];
  convd_client_opts o = {.timeout_seconds = 30};
  convd_client *c;
  ASSERT_OK(convd_client_create(d.target, &o, &c, err, sizeof err), err);
  int calls = 0;
  const double end = now_s() + 3.5;
  while (now_s() < end && calls < 10000) {
    if (small_call(c, &s, err, sizeof err)) {
      FAIL_AT("call %d, %.1f s into the run: %s", calls, 3.5 - (end - now_s()), err);
      break;
    }
    calls++;
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  convd_client_destroy(c);
  printf("  %d calls over 3.5 s on one channel, through about three connection ages\n", calls);
  ASSERT_TRUE(calls > 20);
  ASSERT_EQ_INT(daemon_ops(d.target), calls);
  ASSERT_TRUE(test_daemon_stop(&d, 60) == 0);
}

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"max_connection_age_config", test_max_connection_age_config},
      {"lb_policy_option", test_lb_policy_option},
      {"round_robin_three_daemons", test_round_robin_three_daemons},
      {"pick_first_one_daemon", test_pick_first_one_daemon},
      {"convctl_lb", test_convctl_lb},
      {"long_lived_channel_across_ages", test_long_lived_channel_across_ages},
  };
  return test_main(argc, argv, tests, sizeof tests / sizeof tests[0]);
}
