/* CUDA devices, toward the rest of the engine: plain C, no CUDA header. Built only when CMake
 * finds nvcc and cuDNN (CONVD_HAVE_CUDA); elsewhere these report that no GPU is available.
 *
 * Threads: both functions run on the thread that creates the engine (or a test's); a device
 * made here is then run by its worker (device.h). */
#ifndef CONVD_CUDA_DEVICE_H
#define CONVD_CUDA_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "device.h"

/* Visible GPUs (CUDA_VISIBLE_DEVICES applies), or 0 with why in err (no driver, no device, a
 * build without CUDA). Never fails otherwise. */
int convd_cuda_device_count(char *err, size_t errlen);

/* A device on GPU `ordinal`: cuDNN forward convolution in strict fp32, memory_budget bytes of
 * GPU memory for an op's input, output, weights and workspace (0 = half the GPU's free memory, at most 2 GiB),
 * plus up to a quarter of that again for weight blocks cached across ops. */
int convd_device_cuda_create(const char *name, int ordinal, uint64_t memory_budget,
                             convd_device **out, char *err, size_t errlen);

#endif
