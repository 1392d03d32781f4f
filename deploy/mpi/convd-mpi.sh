#!/usr/bin/env bash
# One convolution service over several nodes: convd as an MPI job (docs/operations.md, "Many
# nodes with MPI"). Rank 0 (the hostfile's first host) serves gRPC; the other ranks are its
# remote devices. Run it under a supervisor that restarts it (systemd, a Kubernetes Job, the
# MPI Operator): Open MPI 4.1 ends the whole job when a rank dies, and convd then exits non-zero
# with the reason rather than hang.
#
#   deploy/mpi/convd-mpi.sh [HOSTFILE] [convd flags...]
#
# Environment: CONVD_MPI_RANKS (default: the hostfile's slots), CONVD_BIN (default
# /usr/bin/convd, the same path on every node), and any CONVD_* variable, which mpirun hands to
# every rank (-x). Flags after the hostfile go to every rank alike.
set -euo pipefail
hostfile=${1:-/etc/convd/hostfile}
[ $# -gt 0 ] && shift
[ -r "$hostfile" ] || { echo "convd-mpi.sh: no hostfile at $hostfile (see deploy/mpi/hostfile.example)" >&2; exit 2; }
bin=${CONVD_BIN:-/usr/bin/convd}
ranks=${CONVD_MPI_RANKS:-$(awk '!/^#/ && NF { n += ($2 ~ /^slots=/ ? substr($2, 7) : 1) } END { print n + 0 }' "$hostfile")}
[ "$ranks" -ge 2 ] || { echo "convd-mpi.sh: $ranks rank(s) in $hostfile: rank 0 and at least one worker are needed" >&2; exit 2; }
env_args=()
while IFS='=' read -r name _; do env_args+=(-x "$name"); done < <(env | grep '^CONVD_' || true)
exec mpirun --hostfile "$hostfile" -np "$ranks" "${env_args[@]}" \
  "$bin" --mpi --listen "${CONVD_LISTEN:-0.0.0.0:50051}" "$@"
