#!/usr/bin/python3
"""PyTorch's conv2d on the GPU, bench_gpu's peer column, with torch.backends.cudnn.benchmark = True.

usage: torch_gpu.py REPEATS SPEC...   SPEC = n,c,h,w:o,i,kh,kw:sh,sw:ph,pw:groups:MODE
                                     or T:n,c,h,w:ci,co,k:s:p:op:MODE (conv_transpose2d)
MODE: f32 (strict: TF32 off), tf32, f16, bf16.
prints one line per spec: "DEVICE_S COPIES_S", the median seconds of one conv2d on tensors already
on the GPU (CUDA events), and of one with its copies (input from pinned host memory to the GPU,
conv2d, output back to pinned host memory), each the better median of two passes; "0 0" when the
shape does not fit."""
import statistics
import sys

import torch
import torch.nn.functional as F

repeats = int(sys.argv[1])
torch.backends.cudnn.benchmark = True
torch.manual_seed(0)
dev = torch.device("cuda")
DTYPES = {"f32": torch.float32, "tf32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def median_device(fn):
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def measure_transpose(spec):
    _, x_s, w_s, s, p, op, mode = spec.split(":")
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    dt = DTYPES[mode]
    x_host = torch.randn(*map(int, x_s.split(",")), dtype=dt).pin_memory()
    x = x_host.to(dev)
    ci, co, k = map(int, w_s.split(","))
    w = torch.randn(ci, co, k, k, dtype=dt, device=dev)
    b = torch.randn(co, dtype=dt, device=dev)
    s, p, op = int(s), int(p), int(op)
    y_host = torch.empty(F.conv_transpose2d(x, w, b, s, p, op).shape, dtype=dt).pin_memory()

    def device_only():
        F.conv_transpose2d(x, w, b, s, p, op)

    def with_copies():
        y_host.copy_(F.conv_transpose2d(x_host.to(dev, non_blocking=True), w, b, s, p, op), non_blocking=True)

    for _ in range(3):
        device_only()
        with_copies()
    torch.cuda.synchronize()
    best = [float("inf"), float("inf")]
    for _ in range(2):
        best[0] = min(best[0], median_device(device_only))
        best[1] = min(best[1], median_device(with_copies))
    return best


def measure(spec):
    if spec.startswith("T:"):
        return measure_transpose(spec)
    x_s, w_s, s_s, p_s, g_s, mode = spec.split(":")
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    dt = DTYPES[mode]
    xs = tuple(map(int, x_s.split(",")))
    x_host = torch.randn(*xs, dtype=dt).pin_memory()
    x = x_host.to(dev)
    w = torch.randn(*map(int, w_s.split(",")), dtype=dt, device=dev)
    b = torch.randn(w.shape[0], dtype=dt, device=dev)
    stride = tuple(map(int, s_s.split(",")))
    pad = tuple(map(int, p_s.split(",")))
    groups = int(g_s)
    y = F.conv2d(x, w, b, stride, pad, 1, groups)
    y_host = torch.empty(y.shape, dtype=dt).pin_memory()
    del y

    def device_only():
        F.conv2d(x, w, b, stride, pad, 1, groups)

    def with_copies():
        xd = x_host.to(dev, non_blocking=True)
        y_host.copy_(F.conv2d(xd, w, b, stride, pad, 1, groups), non_blocking=True)

    for _ in range(3):
        device_only()
        with_copies()
    torch.cuda.synchronize()
    best = [float("inf"), float("inf")]
    for _ in range(2):
        best[0] = min(best[0], median_device(device_only))
        best[1] = min(best[1], median_device(with_copies))
    return best


with torch.no_grad():
    for spec in sys.argv[2:]:
        try:
            d, c = measure(spec)
        except torch.cuda.OutOfMemoryError:
            d = c = 0.0
        torch.cuda.empty_cache()
        print(f"{d:.9f} {c:.9f}", flush=True)
