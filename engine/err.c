/* See err.h. Any thread: the strings are constants and convd_errf writes only its buffer. */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>

const char *convd_strerror(int code) {
  switch (code) {
    case CONVD_OK:
      return "ok";
#define CONVD_ERR_CASE(name, c, text) \
  case CONVD_##name:                  \
    return text;
      CONVD_ERR_MAP(CONVD_ERR_CASE)
#undef CONVD_ERR_CASE
  }
  return "unknown error";
}

int convd_errf(char *err, size_t errlen, int code, const char *fmt, ...) {
  if (err != NULL && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return code;
}
