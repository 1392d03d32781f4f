/* ListDevices: each device's kind, name, memory, health and counters, read from the engine.
 * Threads: the completion-queue thread, with the call's mutex held. */
#include <stdlib.h>

#include "convd/v1/convd.pb-c.h"
#include "err.h"
#include "rpc_impl.h"
#include "services.h"
#include "wire.h"

static int kind_to_wire(int kind) {
  return kind == CONVD_DEVICE_CPU    ? CONVD__V1__DEVICE_KIND__DEVICE_KIND_CPU
         : kind == CONVD_DEVICE_CUDA ? CONVD__V1__DEVICE_KIND__DEVICE_KIND_CUDA
                                     : CONVD__V1__DEVICE_KIND__DEVICE_KIND_REFERENCE;
}

static void list_start(convd_call *c) {
  convd_engine *e = c->rpc->engine;
  size_t n = convd_engine_device_count(e);
  Convd__V1__Device *devs = calloc(n ? n : 1, sizeof *devs);
  Convd__V1__Device **ptrs = calloc(n ? n : 1, sizeof *ptrs);
  convd_device_info *info = calloc(n ? n : 1, sizeof *info);
  if (devs && ptrs && info) {
    for (size_t i = 0; i < n; i++) {
      convd_engine_device_info(e, i, &info[i]);
      convd__v1__device__init(&devs[i]);
      devs[i].index = info[i].index;
      devs[i].kind = kind_to_wire(info[i].kind);
      devs[i].name = info[i].name;
      devs[i].memory_bytes = info[i].memory_bytes;
      devs[i].completed_ops = info[i].completed_ops;
      devs[i].healthy = info[i].healthy != 0;
      devs[i].detail = info[i].detail;
      devs[i].busy_seconds = info[i].busy_seconds;
      devs[i].weight_cache_hits = info[i].stats.weight_cache_hits;
      devs[i].weight_cache_misses = info[i].stats.weight_cache_misses;
      devs[i].weight_bytes_loaded = info[i].stats.weight_bytes_loaded;
      devs[i].bytes_to_device = info[i].stats.bytes_to_device;
      devs[i].bytes_from_device = info[i].stats.bytes_from_device;
      devs[i].kernel_seconds = (double)info[i].stats.kernel_ns * 1e-9;
      ptrs[i] = &devs[i];
    }
    Convd__V1__ListDevicesResponse resp = CONVD__V1__LIST_DEVICES_RESPONSE__INIT;
    resp.n_devices = n;
    resp.devices = ptrs;
    convd_call_reply(c, &resp.base);
  } else {
    convd_call_fail(c, CONVD_ENOMEM, "the daemon is out of memory");
  }
  free(devs);
  free(ptrs);
  free(info);
}

const convd_handlers convd_list_devices_handlers = {.start = list_start};
