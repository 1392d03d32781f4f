/* A client built outside the tree from the installed files alone (tests/install/check_install.sh
 * compiles it with `pkg-config --cflags --libs convd-client`): asks the daemon at argv[1] for
 * its health and devices and runs one small convolution. Exits 0 when all of it worked. */
#include <convd/client.h>
#include <convd/convd_version.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: hello_client HOST:PORT\n");
    return 2;
  }
  char err[512] = "";
  const char *step = "";
  convd_client *c = NULL;
  convd_client_device *devs = NULL;
  size_t n = 0;
  int serving = 0;
  /* ones (1x1x3x3) through a 2x2 kernel of ones, plus a bias of 0.5: every output is 4.5 */
  convd_client_conv_params p;
  convd_client_conv_params_default(&p);
  p.n = 1, p.c_in = 1, p.h = 3, p.w = 3, p.c_out = 1, p.c_per_group = 1, p.kh = 2, p.kw = 2;
  p.has_bias = 1;
  const float x[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, w[4] = {1, 1, 1, 1}, b[1] = {0.5f};
  float y[4] = {0};
  int64_t shape[4];
  convd_client_opts o = {.timeout_seconds = 30};
#define CHECK(what, failed) \
  do {                      \
    step = (what);          \
    if (failed) goto fail;  \
  } while (0)
  CHECK("create", convd_client_create(argv[1], &o, &c, err, sizeof err));
  CHECK("health", convd_client_health(c, "", &serving, err, sizeof err) || !serving);
  CHECK("devices", convd_client_list_devices(c, &devs, &n, err, sizeof err) || n == 0);
  CHECK("output shape", convd_client_output_shape(&p, shape, err, sizeof err) || shape[2] != 2);
  CHECK("conv2d", convd_client_conv2d(c, &p, x, w, b, y, NULL, err, sizeof err));
  CHECK("conv2d's answer", y[0] != 4.5f || y[1] != 4.5f || y[2] != 4.5f || y[3] != 4.5f);
  /* a shape the server would refuse is refused here, with the public header's code */
  CHECK("an empty shape", convd_client_output_shape(&(convd_client_conv_params){0}, shape, err,
                                                    sizeof err) != CONVD_CLIENT_EINVAL);
  printf("hello_client %s: SERVING, %zu device(s), the first %s; 1x1x3x3 * 2x2 + 0.5 = 4.5\n",
         CONVD_VERSION, n, devs[0].name);
  free(devs);
  convd_client_destroy(c);
  return 0;
fail:
  fprintf(stderr, "hello_client: %s failed%s%s\n", step, err[0] ? ": " : "", err);
  free(devs);
  convd_client_destroy(c);
  return 1;
}
