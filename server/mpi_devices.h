/* MPI ranks as remote devices (`mpirun -np K convd --mpi ...`). Rank 0 is the daemon as
 * always (gRPC, metrics, its own engine); every other rank is a worker: it opens its own
 * devices as its flags say and runs the ops rank 0 sends it. On rank 0 each device of each
 * worker is a convd_device (device_impl.h) handed to the engine as convd_engine_opts.extra, so
 * the scheduler pulls ops onto it like onto any device and its measured speed includes the
 * transfer. mpi_devices.c is the transport (built with CONVD_MPI); mpi_devices_none.c stands in for it in
 * builds without MPI and says so.
 *
 * Threads: convd_mpi_init, convd_mpi_worker_main, convd_mpi_remote_devices and
 * convd_mpi_finish run on the main thread; the remote devices' run() on the engine's device
 * workers (mpi_devices.c says more). */
#ifndef CONVD_MPI_DEVICES_H
#define CONVD_MPI_DEVICES_H

#include <stddef.h>

#include "config.h"
#include "device.h"

typedef struct convd_mpi convd_mpi;

/* MPI_Init_thread (MPI_THREAD_MULTIPLE); *rank and *size of MPI_COMM_WORLD. Returns 0, or a
 * negative error (no MPI in this build; a thread level below MULTIPLE) with err set. */
int convd_mpi_init(int *argc, char ***argv, convd_mpi **out, int *rank, int *size, char *err,
                   size_t errlen);

/* A worker rank's whole life after init: opens its devices as cfg says, tells rank 0 about them,
 * runs the ops rank 0 sends until rank 0 says stop, then finalizes MPI. Returns the process's
 * exit status (0 when rank 0 stopped it). */
int convd_mpi_worker_main(convd_mpi *m, const convd_config *cfg);

/* Rank 0: waits (at most cfg->mpi_op_timeout) for every worker's list of devices and makes one
 * remote device for each (name "rankN:DEV", detail "rank N on HOST: ..."). *devs is an array of
 * *n devices, the caller's (the engine takes them over as extra); the array is the caller's to
 * free. */
int convd_mpi_remote_devices(convd_mpi *m, const convd_config *cfg, convd_device ***devs, int *n,
                             char *err, size_t errlen);

/* Rank 0 at exit, after the engine (and with it every remote device) is destroyed: tells every
 * worker to stop and finalizes MPI. status is the daemon's exit status so far. When a worker was
 * lost (stopped answering) Open MPI cannot finish the job cleanly: this logs why and calls
 * MPI_Abort, which ends every rank with a non-zero status. Returns the exit status to use. */
int convd_mpi_finish(convd_mpi *m, int status);

#endif
