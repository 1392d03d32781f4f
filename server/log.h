/* One line per event on stderr, logfmt: `ts=... level=info msg="..." key=value ...`. The macro
 * checks the level before evaluating its arguments. */
#ifndef CONVD_LOG_H
#define CONVD_LOG_H

enum convd_log_level { CONVD_LOG_DEBUG, CONVD_LOG_INFO, CONVD_LOG_WARN, CONVD_LOG_ERROR };

extern int convd_log_level;

void convd_log_write(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int convd_log_parse_level(const char *s); /* -1 when unknown */
const char *convd_log_level_name(int level);

#define convd_log(level, ...)                                         \
  do {                                                                \
    if ((level) >= convd_log_level) convd_log_write((level), __VA_ARGS__); \
  } while (0)

#endif
