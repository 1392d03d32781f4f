#!/usr/bin/python3
"""PyTorch's CPU conv_transpose2d on the shapes given, bench_transpose's peer column.

usage: torch_transpose.py THREADS REPEATS SHAPE...   SHAPE = n,c,h,w:ci,co,kh,kw:s:p:op
prints one line per shape: the median seconds of one call (the better of two passes)."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

threads, repeats = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)


def median_seconds(x, w, b, s, p, op):
    for _ in range(3):
        F.conv_transpose2d(x, w, b, s, p, op)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.conv_transpose2d(x, w, b, s, p, op)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


with torch.no_grad():
    problems = []
    for spec in sys.argv[3:]:
        x_s, w_s, s, p, op = spec.split(":")
        problems.append((torch.randn(*map(int, x_s.split(","))), torch.randn(*map(int, w_s.split(","))),
                         torch.randn(int(w_s.split(",")[1])), int(s), int(p), int(op)))
    best = [float("inf")] * len(problems)
    for _ in range(2):  # the better median of two passes, as bench_conv does
        for i, pr in enumerate(problems):
            best[i] = min(best[i], median_seconds(*pr))
    for t in best:
        print(f"{t:.9f}", flush=True)
