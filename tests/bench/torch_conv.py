#!/usr/bin/python3
"""PyTorch's CPU conv2d on the shapes given, for bench_conv's comparison column.

usage: torch_conv.py THREADS REPEATS  SHAPE...   where SHAPE = n,c,h,w:o,i,kh,kw:sh,sw:ph,pw:groups
prints one line per shape: the median seconds of one call."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

threads, repeats = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
with torch.no_grad():
    for spec in sys.argv[3:]:
        x_s, w_s, s_s, p_s, g_s = spec.split(":")
        x = torch.randn(*map(int, x_s.split(",")))
        w = torch.randn(*map(int, w_s.split(",")))
        b = torch.randn(w.shape[0])
        stride = tuple(map(int, s_s.split(",")))
        pad = tuple(map(int, p_s.split(",")))
        for _ in range(2):
            F.conv2d(x, w, b, stride, pad, 1, int(g_s))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            F.conv2d(x, w, b, stride, pad, 1, int(g_s))
            times.append(time.perf_counter() - t0)
        print(f"{statistics.median(times):.9f}", flush=True)
