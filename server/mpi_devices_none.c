/* mpi_devices.h in a build without MPI (CONVD_MPI=OFF, or AUTO where CMake found none): --mpi says so
 * and nothing else changes. Threads: the main thread. */
#include "mpi_devices.h"

#include "err.h"

int convd_mpi_init(int *argc, char ***argv, convd_mpi **out, int *rank, int *size, char *err,
                   size_t errlen) {
  (void)argc, (void)argv;
  *out = NULL;
  *rank = 0;
  *size = 1;
  return convd_errf(err, errlen, CONVD_ENOTSUP,
                    "--mpi: this convd was built without MPI (install libopenmpi-dev and configure "
                    "with -DCONVD_MPI=ON)");
}

int convd_mpi_worker_main(convd_mpi *m, const convd_config *cfg) {
  (void)m, (void)cfg;
  return 2;
}

int convd_mpi_remote_devices(convd_mpi *m, const convd_config *cfg, convd_device ***devs, int *n,
                             char *err, size_t errlen) {
  (void)m, (void)cfg, (void)err, (void)errlen;
  *devs = NULL;
  *n = 0;
  return 0;
}

int convd_mpi_finish(convd_mpi *m, int status) {
  (void)m;
  return status;
}
