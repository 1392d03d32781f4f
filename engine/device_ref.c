/* The reference device (the reference kernel, ref.c, behind the device interface), and the
 * wrappers of device.h that every caller goes through for any device.
 *
 * Threads: see device.h; the reference device keeps no state, so any thread may run it. */
#include "device_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "ref.h"

static int ref_supports(void *ctx, const convd_conv *conv) {
  (void)ctx, (void)conv;
  return 1;
}

static int ref_run(void *ctx, const convd_op_io *io, char *err, size_t errlen) {
  (void)ctx, (void)err, (void)errlen;
  return convd_ref_conv2d_view(io->conv, io->x, io->w, io->b, io->y, io->cancel);
}

convd_op_io convd_op_io_dense(const convd_conv *conv, const float *x, const float *w,
                              uint64_t w_key, const float *b, float *y, const atomic_int *cancel) {
  const convd_conv_params *p = &conv->p;
  convd_op_io io = {.conv = conv,
                    .x = convd_view_dense(x, p->c_in, p->h, p->w),
                    /* per output channel (C_out, C_in/g, kH, kW), or a transpose's per input
                     * channel (C_in, C_out/g, kH, kW) */
                    .w = convd_view_dense(w, p->transposed ? p->c_out / p->groups : p->c_per_group, p->kh, p->kw),
                    .w_key = w_key,
                    .b = b,
                    .y = convd_view_dense(y, p->c_out, conv->h_out, conv->w_out),
                    .cancel = cancel};
  return io;
}

static void ref_destroy(void *ctx) { (void)ctx; }

static const convd_device_iface ref_iface = {
    .supports = ref_supports, .run = ref_run, .flush_cache = NULL, .destroy = ref_destroy};

int convd_device_ref_create(const char *name, uint64_t memory_budget, convd_device **out,
                            char *err, size_t errlen) {
  convd_device *d = calloc(1, sizeof *d);
  if (d == NULL) return convd_errf(err, errlen, CONVD_ENOMEM, "out of memory creating a device");
  d->iface = &ref_iface;
  d->kind = CONVD_DEVICE_REFERENCE;
  d->memory_budget = memory_budget;
  snprintf(d->name, sizeof d->name, "%s", name);
  snprintf(d->detail, sizeof d->detail, "reference kernel (float64 accumulation), one thread");
  *out = d;
  return 0;
}

void convd_device_destroy(convd_device *d) {
  if (d == NULL) return;
  if (d->iface && d->iface->destroy) d->iface->destroy(d->ctx);
  free(d);
}

/* ---- the wrappers (device.h) ------------------------------------------------------------ */

int convd_device_run(convd_device *d, const convd_op_io *io, char *err, size_t errlen) {
  return d->iface->run(d->ctx, io, err, errlen);
}

int convd_device_supports(const convd_device *d, const convd_conv *conv) {
  return d->iface->supports(d->ctx, conv);
}

void convd_device_flush_cache(convd_device *d) {
  if (d->iface->flush_cache) d->iface->flush_cache(d->ctx);
}

void convd_device_stats_get(const convd_device *d, convd_device_stats *out) {
  memset(out, 0, sizeof *out);
  if (d->iface->stats) d->iface->stats(d->ctx, out);
}

int convd_device_kind(const convd_device *d) { return d->kind; }
const char *convd_device_name(const convd_device *d) { return d->name; }
const char *convd_device_detail(const convd_device *d) { return d->detail; }
uint64_t convd_device_memory_budget(const convd_device *d) { return d->memory_budget; }
int convd_device_accumulates(const convd_device *d) { return d->accumulates; }
int convd_device_native_transpose(const convd_device *d) { return d->native_transpose; }
