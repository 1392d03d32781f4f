#!/usr/bin/python3
"""PyTorch's CPU conv2d on the seed case, monolithic, for bench_seed's comparison row.

usage: torch_seed.py CHANNELS SIZE THREADS
prints "seconds S" (one timed call after a small warm-up), or "failed: REASON". The process's
address space is limited to 80 % of the machine's memory, so a shape PyTorch cannot hold fails
with an error here instead of pushing the machine into swap."""
import os
import resource
import sys
import time

chans, size, threads = (int(a) for a in sys.argv[1:4])
limit = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    with torch.no_grad():
        F.conv2d(torch.randn(1, chans, 64, 64), torch.randn(chans, chans, 3, 3), None, 1, 1)  # warm-up
        x = torch.rand(1, chans, size, size) - 0.5
        w = (torch.rand(chans, chans, 3, 3) - 0.5) * 0.1
        t0 = time.perf_counter()
        y = F.conv2d(x, w, None, 1, 1)
        t = time.perf_counter() - t0
    print(f"seconds {t:.6f}", flush=True)
except (RuntimeError, MemoryError, ImportError) as e:
    print(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
