/* convd error codes -> gRPC status codes. The only place the two vocabularies meet. */
#ifndef CONVD_STATUS_H
#define CONVD_STATUS_H

#include <grpc/status.h>

grpc_status_code convd_status_from_err(int code);

#endif
