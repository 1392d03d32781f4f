#!/usr/bin/python3
"""PyTorch's CPU conv2d on the shapes given, for bench_conv's comparison column.

usage: torch_conv.py THREADS REPEATS  SHAPE...   where SHAPE = n,c,h,w:o,i,kh,kw:sh,sw:ph,pw:groups
prints one line per shape: the median seconds of one call (the better of two passes)."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

threads, repeats = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)


def median_seconds(x, w, b, stride, pad, groups):
    for _ in range(3):
        F.conv2d(x, w, b, stride, pad, 1, groups)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.conv2d(x, w, b, stride, pad, 1, groups)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Two passes over all shapes, keeping each shape's better median: a shape measured first in a
# fresh process can run several times slower than in steady state (measured: depthwise 1.9 ms
# alone, 0.12 ms after the other shapes), and the peer deserves its steady state.
with torch.no_grad():
    problems = []
    for spec in sys.argv[3:]:
        x_s, w_s, s_s, p_s, g_s = spec.split(":")
        x = torch.randn(*map(int, x_s.split(",")))
        w = torch.randn(*map(int, w_s.split(",")))
        b = torch.randn(w.shape[0])
        stride = tuple(map(int, s_s.split(",")))
        pad = tuple(map(int, p_s.split(",")))
        problems.append((x, w, b, stride, pad, int(g_s)))
    best = [float("inf")] * len(problems)
    for _ in range(2):
        for i, pr in enumerate(problems):
            best[i] = min(best[i], median_seconds(*pr))
    for t in best:
        print(f"{t:.9f}", flush=True)
