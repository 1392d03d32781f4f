/* See log.h. Threads: any; log_mu serialises the writes and guards the file across a
 * reopen (SIGHUP, on the libuv loop). */
#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int convd_log_level = CONVD_LOG_INFO;

/* The log file, or NULL for stderr; swapped under the lock so a line never goes to a closed
 * stream. */
static FILE *log_file;
static char log_path[1024];
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

int convd_log_open(const char *path) {
  if (path == NULL || path[0] == '\0') return 0;
  snprintf(log_path, sizeof log_path, "%s", path);
  return convd_log_reopen();
}

int convd_log_reopen(void) {
  if (log_path[0] == '\0') return 0;
  FILE *f = fopen(log_path, "a");
  if (f == NULL) return -1;
  setvbuf(f, NULL, _IOLBF, 0);
  pthread_mutex_lock(&log_mu);
  FILE *old = log_file;
  log_file = f;
  pthread_mutex_unlock(&log_mu);
  if (old) fclose(old);
  return 0;
}

static const char *const names[] = {"debug", "info", "warn", "error"};

const char *convd_log_level_name(int level) {
  return level >= 0 && level <= CONVD_LOG_ERROR ? names[level] : "?";
}

int convd_log_parse_level(const char *s) {
  for (int i = 0; i <= CONVD_LOG_ERROR; i++)
    if (strcmp(s, names[i]) == 0) return i;
  return -1;
}

void convd_log_write(int level, const char *fmt, ...) {
  char line[4096];
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(line, sizeof line, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s ",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                   ts.tv_nsec / 1000000, convd_log_level_name(level));
  va_list ap;
  va_start(ap, fmt);
  if (n > 0 && (size_t)n < sizeof line) vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
  va_end(ap);
  /* One fputs per line so lines from different threads do not interleave. */
  size_t len = strlen(line);
  if (len + 1 >= sizeof line) len = sizeof line - 2; /* truncated: still one line */
  line[len] = '\n';
  line[len + 1] = '\0';
  pthread_mutex_lock(&log_mu);
  fputs(line, log_file ? log_file : stderr);
  pthread_mutex_unlock(&log_mu);
}

const char *convd_log_quote(const char *s, char *buf, size_t len) {
  static const char hex[] = "0123456789abcdef";
  size_t j = 0;
  if (len < 3) {
    if (len) buf[0] = '\0';
    return buf;
  }
  buf[j++] = '"';
  for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
    char e[4];
    size_t n = 0;
    if (*p == '"' || *p == '\\') e[n++] = '\\', e[n++] = (char)*p;
    else if (*p == '\n') e[n++] = '\\', e[n++] = 'n';
    else if (*p == '\r') e[n++] = '\\', e[n++] = 'r';
    else if (*p == '\t') e[n++] = '\\', e[n++] = 't';
    else if (*p < 0x20 || *p >= 0x7f) e[n++] = '\\', e[n++] = 'x', e[n++] = hex[*p >> 4], e[n++] = hex[*p & 15];
    else e[n++] = (char)*p;
    if (j + n + 2 > len) break; /* room for the closing quote and the terminator */
    for (size_t k = 0; k < n; k++) buf[j++] = e[k];
  }
  buf[j++] = '"';
  buf[j] = '\0';
  return buf;
}
