/* The one monotonic clock the engine, the daemon and the client time things with. Any thread. */
#ifndef CONVD_CLOCK_H
#define CONVD_CLOCK_H

/* Seconds on CLOCK_MONOTONIC: only differences mean anything. */
double convd_now_seconds(void);

#endif
