#include "status.h"

#include "err.h"

grpc_status_code convd_status_from_err(int code) {
  switch (code) {
    case CONVD_OK: return GRPC_STATUS_OK;
    case CONVD_EINVAL: return GRPC_STATUS_INVALID_ARGUMENT;
    case CONVD_ERANGE: return GRPC_STATUS_INVALID_ARGUMENT;
    case CONVD_ENOMEM: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case CONVD_ELIMIT: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case CONVD_ENOTSUP: return GRPC_STATUS_UNIMPLEMENTED;
    case CONVD_ECANCELED: return GRPC_STATUS_CANCELLED;
    case CONVD_ETIMEDOUT: return GRPC_STATUS_DEADLINE_EXCEEDED;
    case CONVD_EUNAVAIL: return GRPC_STATUS_UNAVAILABLE;
    case CONVD_ENOTFOUND: return GRPC_STATUS_NOT_FOUND;
    default: return GRPC_STATUS_INTERNAL;
  }
}

