/* One line per event on stderr (or a file, reopened on SIGHUP for log rotation), logfmt: `ts=... level=info msg="..." key=value ...`. The macro
 * checks the level before evaluating its arguments. */
#ifndef CONVD_LOG_H
#define CONVD_LOG_H

#include <stddef.h>

enum convd_log_level { CONVD_LOG_DEBUG, CONVD_LOG_INFO, CONVD_LOG_WARN, CONVD_LOG_ERROR };

extern int convd_log_level;

void convd_log_write(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int convd_log_parse_level(const char *s); /* -1 when unknown */
/* Log to path (appending) instead of stderr; NULL or "" = stderr. Returns 0 or -1 (errno). */
int convd_log_open(const char *path);
/* Reopens the log file (after a rotation renamed it); 0, or -1 keeping the old one. */
int convd_log_reopen(void);
const char *convd_log_level_name(int level);
/* s as a logfmt value: in double quotes, with quotes, backslashes and every control or
 * non-ASCII byte escaped (\n, \", \\, \xNN), so that no client-chosen string can end the
 * value or start a line. Truncated to fit buf (always terminated); returns buf. */
const char *convd_log_quote(const char *s, char *buf, size_t len);

#define convd_log(level, ...)                                         \
  do {                                                                \
    if ((level) >= convd_log_level) convd_log_write((level), __VA_ARGS__); \
  } while (0)

#endif
