/* The handlers each service file exports for the method table (methods.c). One file per
 * service: svc_conv.c (Conv2d, Conv2dUnary), svc_weights.c (the weights registry),
 * svc_devices.c, svc_health.c, reflect.c (server reflection). */
#ifndef CONVD_SERVICES_H
#define CONVD_SERVICES_H

#include "methods.h"

typedef struct convd_rpc convd_rpc;

/* Health may have changed (drain, a device failed): every Watch stream re-checks. Called with
 * no call's mutex held (svc_health.c). */
void convd_health_notify(convd_rpc *r);

extern const convd_handlers convd_conv2d_handlers, convd_conv2d_unary_handlers;
extern const convd_handlers convd_put_weights_handlers, convd_list_weights_handlers,
    convd_delete_weights_handlers;
extern const convd_handlers convd_list_devices_handlers;
extern const convd_handlers convd_register_region_handlers, convd_list_regions_handlers,
    convd_unregister_region_handlers;
extern const convd_handlers convd_health_check_handlers, convd_health_watch_handlers;
extern const convd_handlers convd_reflection_handlers;

#endif
