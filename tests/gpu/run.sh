#!/usr/bin/env bash
# The GPU checks, in one command, on a machine with an NVIDIA GPU, the CUDA toolkit, cuDNN and
# cmake (the device machine: cuDNN comes from PyTorch's nvidia-cudnn package there, and it has
# none of the Debian gRPC/protobuf-c/libuv/oneDNN packages, so this builds the engine alone).
#
#   tests/gpu/run.sh            (writes logs under $OUT, default /tmp/convd-gpu)
#
# Runs: the CUDA device against every golden case, random shapes and strided views, float16 /
# bfloat16 / TF32 within their stated bounds, and chains of channel blocks summed on the GPU
# (test_device --cuda, ctest's device_cuda); random tiled plans (forward and transpose) on the
# GPU alone, on the GPU beside a CPU device, and on two device instances sharing the GPU
# (test_sched --cuda, ctest's sched_cuda); the host cases of both programs (test_device,
# test_sched) and the CUDA device's host-side logic (test_cuda_host). Then the benchmark tables
# (bench_gpu, with PyTorch's conv2d as the peer) into $OUT/bench_gpu.md, unless NO_BENCH=1. With
# bundle.tar.xz carried (tests/gpu/bundle.sh, on the host), the daemon stage last
# (tests/gpu/daemon_stage.py: golden cases through the real daemon streamed, unary and in
# shared memory, a 64 MiB case and a long tiled job against a CPU daemon with ListDevices
# sampled, bench_e2e's tables into $OUT/bench_e2e.md).
# Exits non-zero when a test run fails, and a --cuda run that skips (exit 77: no GPU visible)
# counts as failed here, since this machine is meant to have one.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/convd-gpu}
mkdir -p "$OUT"
nvidia-smi -L || echo "nvidia-smi: no GPU listed"

args=()
if [ ! -f /usr/local/cuda/include/cudnn.h ]; then
  root=$(python3 -c 'import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__file__))' 2>/dev/null || true)
  if [ -n "$root" ] && [ -f "$root/include/cudnn.h" ]; then
    lib=$(ls "$root"/lib/libcudnn.so* | sort | head -1)
    args+=("-DCUDNN_INCLUDE_DIR=$root/include" "-DCUDNN_LIBRARY=$lib")
    export LD_LIBRARY_PATH="$root/lib:${LD_LIBRARY_PATH:-}"
    echo "cuDNN from $root"
  fi
fi
cmake -S . -B build-gpu -DCONVD_SERVER=OFF -DCONVD_CUDA=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo "${args[@]}" \
  2>&1 | tee "$OUT/cmake.log" | grep -E "convd:|Error" || true
cmake --build build-gpu -j"$(nproc)" 2>&1 | tee "$OUT/build.log" | grep -E "error|warning" || true
[ -x build-gpu/tests/test_device ] || { echo "build failed (see $OUT/build.log)"; exit 1; }

fails=0
runs=("test_cuda_host" "test_device" "test_device --cuda" "test_sched" "test_sched --cuda")
for run in "${runs[@]}"; do
  read -r prog flag <<< "$run"
  log="$OUT/$prog${flag:+_cuda}.log"
  echo "== $run"
  rc=0
  ./build-gpu/tests/$prog $flag > "$log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    grep -E "^ok|cuda|gpu|device " "$log" | grep -v "max abs" || true
  else
    fails=$((fails + 1))
    [ "$rc" = 77 ] && echo "$run skipped its CUDA cases: no GPU visible, where one is expected"
    grep -v "max abs error" "$log" | tail -40
  fi
done
echo "GPU checks: $fails of ${#runs[@]} test runs failed"
if [ "${NO_BENCH:-0}" != 1 ]; then
  echo "== bench_gpu"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    > "$OUT/bench_gpu.md" 2>&1 || true
  ./build-gpu/tests/bench_gpu ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench_gpu.md"
fi
# The daemon stage: the real daemon (built on the host with the server, carried as
# bundle.tar.xz, see tests/gpu/bundle.sh) with a client on this machine's loopback.
if [ -f bundle.tar.xz ] || [ -x bundle/bin/convd ]; then
  [ -x bundle/bin/convd ] || tar -xJf bundle.tar.xz
  echo "== daemon stage (bundle/)"
  cudnn_lib=$(python3 -c 'import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__file__) + "/lib")' 2>/dev/null || true)
  if LD_LIBRARY_PATH="$PWD/bundle/lib:$cudnn_lib:${LD_LIBRARY_PATH:-}" CONVD_BIN="$PWD/bundle/bin/convd" \
     python3 tests/gpu/daemon_stage.py bundle tests/golden "$OUT" 2>&1 | tee "$OUT/daemon_stage.log"; then
    :
  else
    fails=$((fails + 1))
  fi
  tail -1 "$OUT/daemon_stage.log" | grep -q "0 failed" || fails=$((fails + 1))
else
  echo "== daemon stage skipped: no bundle.tar.xz (make it on the host with tests/gpu/bundle.sh)"
fi
exit $((fails > 0))
