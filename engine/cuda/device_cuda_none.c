/* A build without CUDA (CMake found no nvcc or cuDNN): there are no GPUs to offer. Any thread. */
#include "cuda_device.h"
#include "err.h"

int convd_cuda_device_count(char *err, size_t errlen) {
  convd_errf(err, errlen, 0, "this build has no CUDA devices (CMake found no nvcc or cuDNN)");
  return 0;
}

int convd_device_cuda_create(const char *name, int ordinal, uint64_t memory_budget,
                             convd_device **out, char *err, size_t errlen) {
  (void)name, (void)ordinal, (void)memory_budget;
  *out = NULL;
  return convd_errf(err, errlen, CONVD_EINVAL, "this build has no CUDA devices");
}
