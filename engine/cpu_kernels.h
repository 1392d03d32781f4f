/* Kernels the CPU device runs itself, where measurement showed that oneDNN's way loses
 * (docs/benchmarks.md): oneDNN computes in blocked layouts (nChw16c), so every op pays a reorder
 * of its input window in and of its tile out. For a depthwise convolution those two passes cost
 * several times the arithmetic; a direct kernel on the NCHW views reads each input once and
 * writes each output once.
 *
 * Threads: called on a CPU device's worker thread, which fans out to `threads` OpenMP threads. */
#ifndef CONVD_CPU_KERNELS_H
#define CONVD_CPU_KERNELS_H

#include "conv.h"
#include "view.h"

/* 1 when conv is depthwise (one input channel per group, any channel multiplier) and its
 * zero-padded input plane is of a size the kernel stages (64 MiB at most). */
int convd_cpuk_is_depthwise(const convd_conv *conv);

/* y = depthwise conv2d(x, w) + b on strided views, planes split over `threads` OpenMP threads.
 * Any stride, dilation and padding; float32 accumulation in kernel order (bias first). Returns
 * 0, or -1 when a thread could not allocate its padded plane (y is then incomplete). */
int convd_cpuk_depthwise(const convd_conv *conv, convd_view x, convd_view w, const float *b,
                          convd_view y, int threads);

#endif
