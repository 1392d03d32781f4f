/* convd error codes: negative ints from one table, with their strings (libuv's UV_ERRNO_MAP
 * pattern). The engine and client return these; only server/ maps them to gRPC statuses.
 * Any thread. */
#ifndef CONVD_ERR_H
#define CONVD_ERR_H

#include <stddef.h>

#define CONVD_ERR_MAP(X)                                                   \
  X(EINVAL, -1, "invalid argument")                                        \
  X(ERANGE, -2, "size out of range")                                       \
  X(ENOMEM, -3, "out of memory")                                           \
  X(ELIMIT, -4, "exceeds a configured limit")                              \
  X(ENOTSUP, -5, "not supported")                                          \
  X(ECANCELED, -6, "cancelled")                                            \
  X(ETIMEDOUT, -7, "deadline exceeded")                                    \
  X(EUNAVAIL, -8, "unavailable")                                           \
  X(ENOTFOUND, -9, "not found")                                            \
  X(EIO, -10, "input/output error")                                        \
  X(EDEVICE, -11, "device error")                                          \
  X(EREMOTE, -12, "remote error")                                          \
  X(EINTERNAL, -13, "internal error")                                     \
  X(EDATALOSS, -14, "data lost")                                           \
  X(EBUSY, -15, "in use")

enum {
  CONVD_OK = 0,
#define CONVD_ERR_ENUM(name, code, text) CONVD_##name = (code),
  CONVD_ERR_MAP(CONVD_ERR_ENUM)
#undef CONVD_ERR_ENUM
};

/* Short description of a code; "unknown error" for anything not in the table. */
const char *convd_strerror(int code);

/* Writes a printf-style message into err (when err is not NULL) and returns code, so that
 * failures read `return convd_errf(err, errlen, CONVD_EINVAL, "...", ...);`. */
int convd_errf(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
