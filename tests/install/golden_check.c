/* The golden cases for a shell script that runs convctl (tests/install/check_deb.sh, on the
 * convctl of the Debian package):
 *   golden_check list ROOT                 the case names, one a line
 *   golden_check args ROOT CASE            convctl's subcommand and options for the case (not
 *                                          --server and --output), one argument a line
 *   golden_check compare ROOT CASE Y.npy   Y against the case's expected output: shape, dtype,
 *                                          then every element with the golden tolerance
 * Exits 0 when it worked (compare: when every element is within tolerance), 1 otherwise. */
#include <stdio.h>
#include <string.h>

#include "npy.h"
#include "testutil.h"

static int list(const char *root) {
  static char names[64][128];
  int n = golden_list(root, names, 64);
  for (int i = 0; i < n; i++) printf("%s\n", names[i]);
  return n > 0 && !test_failed ? 0 : 1;
}

static int args(const golden *g) {
  const convd_conv_params *p = &g->p;
  printf("%s\n", p->transposed ? "conv-transpose" : "conv");
  printf("--input\n%s/input.npy\n--weight\n%s/weight.npy\n", g->dir, g->dir);
  if (p->has_bias) printf("--bias\n%s/bias.npy\n", g->dir);
  printf("--stride\n%lld,%lld\n", (long long)p->stride_h, (long long)p->stride_w);
  printf("--padding\n%lld,%lld,%lld,%lld\n", (long long)p->pad_top, (long long)p->pad_bottom,
         (long long)p->pad_left, (long long)p->pad_right);
  printf("--dilation\n%lld,%lld\n", (long long)p->dil_h, (long long)p->dil_w);
  printf("--groups\n%lld\n", (long long)p->groups);
  if (p->transposed)
    printf("--output-padding\n%lld,%lld\n", (long long)p->out_pad_h, (long long)p->out_pad_w);
  return 0;
}

static int compare(const golden *g, const char *name, const char *path) {
  char err[512];
  convd_npy y;
  if (convd_npy_read(path, &y, err, sizeof err)) {
    fprintf(stderr, "%s: %s\n", name, err);
    return 1;
  }
  int rc = 1;
  if (y.ndim != 4 || y.elem_size != 4)
    fprintf(stderr, "%s: %s is not a 4-dimensional float32 array\n", name, path);
  else if (y.shape[0] != g->output[0] || y.shape[1] != g->output[1] ||
           y.shape[2] != g->output[2] || y.shape[3] != g->output[3])
    fprintf(stderr, "%s: shape %lld,%lld,%lld,%lld, expected %lld,%lld,%lld,%lld\n", name,
            (long long)y.shape[0], (long long)y.shape[1], (long long)y.shape[2],
            (long long)y.shape[3], (long long)g->output[0], (long long)g->output[1],
            (long long)g->output[2], (long long)g->output[3]);
  else if (y.count != g->expected_count)
    fprintf(stderr, "%s: %zu elements, expected %zu\n", name, y.count, g->expected_count);
  else
    rc = check_close(name, y.data, g->expected, y.count) == 0 ? 0 : 1;
  convd_npy_free(&y);
  return rc;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "list") == 0) return list(argv[2]);
  const int is_args = argc == 4 && strcmp(argv[1], "args") == 0;
  const int is_compare = argc == 5 && strcmp(argv[1], "compare") == 0;
  if (!is_args && !is_compare) {
    fprintf(stderr, "usage: golden_check list ROOT | args ROOT CASE | compare ROOT CASE Y.npy\n");
    return 2;
  }
  char err[512];
  golden g;
  if (golden_load(argv[2], argv[3], &g, err, sizeof err)) {
    fprintf(stderr, "%s: %s\n", argv[3], err);
    return 1;
  }
  int rc = is_args ? args(&g) : compare(&g, argv[3], argv[4]);
  golden_free(&g);
  return rc;
}
