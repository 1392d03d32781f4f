/* Server reflection (grpc.reflection.v1 and v1alpha): answers one ServerReflectionRequest with
 * its ServerReflectionResponse from the descriptors built into the daemon (convd.v1, the health
 * service, reflection itself). The service's handlers are in services.h. */
#ifndef CONVD_REFLECT_H
#define CONVD_REFLECT_H

#include <stddef.h>
#include <stdint.h>

#include "grpc/reflection/v1/reflection.pb-c.h"

/* The packed response to rq (NULL when out of memory; *len gets the size). Unknown files and
 * symbols get an error_response (NOT_FOUND), as the protocol says. free() the result. */
uint8_t *convd_reflect_answer(Grpc__Reflection__V1__ServerReflectionRequest *rq, size_t *len);

#endif
