/* Daemon configuration: one table (config.c) drives command-line flags, CONVD_* environment
 * variables, defaults, bounds and --help. Flags win over the environment, which wins over
 * defaults. */
#ifndef CONVD_CONFIG_H
#define CONVD_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cgroup.h"
#include "conv.h" /* convd_parse_size */

/* --listen may be given this many times. */
#define CONVD_LISTEN_MAX 8
/* The longest path a unix: address may have: sockaddr_un's sun_path (108) less its NUL. */
#define CONVD_UNIX_PATH_MAX 107

/* The largest --max-connection-age and --max-connection-age-grace, seconds (a week): gRPC takes
 * milliseconds as an int. */
#define CONVD_MAX_CONNECTION_AGE_MAX 604800

/* The addresses gRPC serves on, in the order given: each HOST:PORT or unix:/absolute/path
 * (checked at parse). */
typedef struct convd_listen_list {
  int n; /* 1 to CONVD_LISTEN_MAX */
  char addr[CONVD_LISTEN_MAX][256];
} convd_listen_list;

typedef struct convd_config {
  convd_listen_list listen;
  int unix_socket_mode;       /* the mode unix: socket files get (0660) */
  int cpu_devices;            /* 0: one without GPUs, none beside them */
  int cpu_threads;            /* 0 in the table = host.cpus, resolved at parse */
  int gpus;                   /* -1 all visible, 0 none, N the first N */
  uint64_t gpu_memory;        /* 0 = automatic */
  int gpu_streams;            /* devices (streams) per GPU */
  uint64_t device_memory;
  char cpu_kernel[16];        /* "onednn" or "reference" */
  uint64_t chunk_bytes;
  uint64_t max_message_bytes;
  uint64_t max_request_bytes; /* 0 in the table = half of host.memory_bytes, resolved at parse */
  uint64_t weights_memory;    /* the weights registry's limit */
  uint64_t max_inflight_bytes; /* admission: bytes of all calls in flight */
  uint64_t max_queue_ops;      /* admission: elemental ops not yet done */
  uint64_t max_shm_bytes;      /* shared-memory regions mapped (0 = off) */
  double drain_timeout;       /* seconds */
  double stream_idle_timeout; /* seconds a call may wait on its client (0 = for ever) */
  double connection_idle_timeout; /* seconds a connection without calls stays open */
  double handshake_timeout;   /* seconds a new connection gets to become an HTTP/2 one */
  double max_connection_age;  /* seconds before a connection is sent GOAWAY (0 = never) */
  double max_connection_age_grace; /* seconds its calls get after that (0 = unbounded) */
  int max_connections;        /* gRPC connections open at once (0 = unbounded) */
  int log_level;              /* enum convd_log_level */
  char log_file[1024];        /* "" = stderr */
  char metrics_listen[256];   /* "" = no metrics endpoint */
  /* Who may connect (auth.h, tls.h, protect.h): "" = not configured. */
  char tls_cert[1024], tls_key[1024], tls_client_ca[1024];
  char auth_tokens[1024];
  int reflection_public;      /* reflection without a token */
  int metrics_public;         /* a non-loopback --metrics-listen beside TLS or tokens */
  int allow_insecure;         /* protected mode off */
  /* MPI (mpi_devices.h): run as one rank of `mpirun ... convd --mpi` */
  int mpi;
  double mpi_op_timeout;      /* seconds rank 0 waits for a worker's answer (or hello) */
  uint64_t mpi_weights_cache; /* bytes of weight blocks a worker rank keeps */
  int mpi_test_fail_after;    /* tests: a worker fails every op after this many (0 = never) */
  convd_host_limits host;     /* the memory and CPUs the defaults came from (logged at start) */
} convd_config;

enum { CONVD_CONFIG_OK = 0, CONVD_CONFIG_EXIT = 1 };

/* Parses argv and the environment into cfg. Returns CONVD_CONFIG_OK to run, CONVD_CONFIG_EXIT
 * after --help or --version (printed to out), or a negative error with the reason in err. */
int convd_config_parse(convd_config *cfg, int argc, char **argv, FILE *out, char *err,
                       size_t errlen);

/* The socket path of a unix: address (as --listen takes it), or NULL for HOST:PORT. */
const char *convd_listen_unix_path(const char *addr);

#endif
