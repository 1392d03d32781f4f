#!/usr/bin/env bash
# Packs the daemon and its client programs, built here, for tests/gpu/run.sh's daemon stage on
# the GPU machine (which has CUDA and cuDNN but none of Debian's gRPC, protobuf-c, libuv or
# oneDNN libraries, so the server cannot be built there).
#
#   tests/gpu/bundle.sh [BUILD_DIR]     (default build; writes bundle.tar.xz, git-ignored)
#
# BUILD_DIR must be a build with the CUDA device compiled in (CONVD_CUDA AUTO finds nvcc and
# cuDNN here). Uses ../shared/tools/device-bundle.sh (or $DEVICE_BUNDLE) to copy the binaries and
# every library they load except the C runtime and CUDA's, and compresses them (oneDNN alone is
# 40 MB; the working tree that travels must stay under 64 MiB). Then carry `bundle.tar.xz` in
# the device call and run tests/gpu/run.sh there: it unpacks it and runs the daemon stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
tool=${DEVICE_BUNDLE:-../shared/tools/device-bundle.sh}
[ -x "$tool" ] || { echo "bundle.sh: $tool not found (set DEVICE_BUNDLE)"; exit 1; }
ldd "$build/convd" | grep libcudnn > /dev/null || { echo "bundle.sh: $build/convd has no CUDA device compiled in"; exit 1; }
rm -rf bundle
"$tool" bundle "$build/convd" "$build/convctl" "$build/tests/bench_e2e" "$build/tests/bench_seed"
tar -cJf bundle.tar.xz bundle
rm -rf bundle
ls -l bundle.tar.xz | awk '{printf "bundle.tar.xz: %.1f MiB (with the tree it must stay under 64 MiB)\n", $5 / 1048576}'
