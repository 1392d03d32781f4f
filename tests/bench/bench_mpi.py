#!/usr/bin/python3
"""The same large tiled job through the daemon on 1 MPI rank (rank 0 computes on its own CPU
device) and on K ranks (rank 0 serves, ranks 1..K-1 compute): time, ops per rank, and what each
op moved over the link, so that the scaling on real nodes can be predicted (docs/benchmarks.md,
"MPI ranks"). A program that prints a table, not a test.

usage: bench_mpi.py CONVD_BINARY STUB_DIR [--mpiexec mpirun] [--ranks 3] [--shape N,C,H,W]
                    [--c-out 64] [--reps 2] [--threads CPUS]"""
import argparse
import os
import shutil
import sys
import time

import grpc
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "interop"))
from convd_harness import collect_output, conv_requests, import_stubs, spec_from_params  # noqa: E402
from test_mpi import MpiJob, devices  # noqa: E402


def run(args, pb, pb_grpc, ranks):
    # The machine's CPUs go to the ranks that compute: rank 0 alone, or split over the workers.
    workers = max(1, ranks - 1)
    threads = max(1, args.threads // workers)
    job = MpiJob(args.mpiexec, args.convd, ["--cpu-threads", str(threads)], np_=ranks)
    n, c, h, w = args.shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((args.c_out, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    params = {"op": "conv2d", "input": [n, c, h, w], "weight": list(wt.shape), "stride": [1, 1],
              "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": [1]}
    spec = spec_from_params(pb, params, False)
    best = None
    with grpc.insecure_channel(job.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.ConvolutionStub(ch)
        for _ in range(args.reps):
            before = devices(pb, stub)
            t0 = time.monotonic()
            y, accepted, summary = collect_output(stub.Conv2d(conv_requests(pb, spec, x, wt, None, 1 << 20),
                                                              timeout=600))
            took = time.monotonic() - t0
            after = devices(pb, stub)
            assert summary is not None and not np.isnan(y).any()
            if best is None or took < best[0]:
                best = (took, accepted.elemental_ops, before, after)
    job.stop(120)
    took, ops, before, after = best
    flops = 2.0 * n * args.c_out * h * w * c * 9
    rows = []
    for name in sorted(after):
        d0, d1 = before[name], after[name]
        k = d1.completed_ops - d0.completed_ops
        to = d1.bytes_to_device - d0.bytes_to_device
        fr = d1.bytes_from_device - d0.bytes_from_device
        rows.append((name, k, to / k if k else 0, fr / k if k else 0))
    return took, ops, flops, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("convd")
    ap.add_argument("stub_dir")
    ap.add_argument("--mpiexec", default=shutil.which("mpirun") or "mpirun")
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--shape", default="1,64,1024,1024")
    ap.add_argument("--c-out", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    args.shape = [int(v) for v in args.shape.split(",")]
    pb, pb_grpc = import_stubs(args.stub_dir)
    n, c, h, w = args.shape
    print(f"job: {n}x{c}x{h}x{w}, {c}->{args.c_out} 3x3 pad 1, float32, through the daemon "
          f"(Python gRPC client on this host), best of {args.reps}; {args.threads} CPUs")
    print(f"{'ranks':>5} {'seconds':>8} {'GFLOP/s':>8} {'ops':>6}  per device: ops, bytes sent/op, "
          f"bytes back/op, MFLOP/op")
    for ranks in (1, args.ranks):
        took, ops, flops, rows = run(args, pb, pb_grpc, ranks)
        per = ", ".join(f"{name}: {k} ops, {to / 1e6:.2f} MB / {fr / 1e6:.2f} MB" for name, k, to, fr in rows)
        print(f"{ranks:>5} {took:>8.2f} {flops / took / 1e9:>8.1f} {ops:>6}  {per}; "
              f"{flops / ops / 1e6:.0f} MFLOP/op")


if __name__ == "__main__":
    main()
