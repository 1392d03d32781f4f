#!/usr/bin/env python3
"""The GPU run's daemon stage (tests/gpu/run.sh runs it when bundle/ was carried): the real
daemon from the bundle on the GPU machine, a client on its loopback.

usage: daemon_stage.py BUNDLE_DIR GOLDEN_DIR OUT_DIR

- starts bundle/bin/convd on 127.0.0.1:0 and a Unix socket, and a second one with --gpus 0 (the
  CPU peer the large cases are compared with);
- every golden case through convctl three ways (streamed, --unary, --shm over the Unix socket:
  a sealed memfd the daemon uses in place), against expected.npy at the golden tolerance;
- a 64 MiB case (1x64x512x512 / 64x64x3x3) and a long tiled job (1x64x1024x1024: hundreds of
  ops at the daemon's default budgets), each compared with the CPU daemon's answer (max |diff| <= 1e-4 *
  max(1, max|y|)), while `convctl devices` is sampled: the GPU's completed ops must grow
  during the tiled job;
- bench_e2e's tables against this daemon (no PyTorch or Python peers: they need packages the
  GPU machine's Python may lack), into OUT_DIR/bench_e2e.md.
Needs numpy only (convd_harness is imported from tests/interop). Exits 1 on any failure."""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "interop"))
from convd_harness import check_close, load_golden  # noqa: E402

bundle, golden, out = sys.argv[1:4]
DRY_RUN = os.environ.get("CONVD_GPU_DRY_RUN") == "1"  # a host without a GPU: the plumbing alone
convd, convctl = os.path.join(bundle, "bin", "convd"), os.path.join(bundle, "bin", "convctl")
tmp = tempfile.mkdtemp(prefix="convd-gpu-")
failures = []


def start(*extra):
    log = open(os.path.join(out, f"daemon{'-cpu' if '--gpus' in extra else ''}.log"), "w")
    p = subprocess.Popen([convd, "--listen", "127.0.0.1:0", "--log-level", "info", *extra],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    addrs = []
    t0 = time.monotonic()
    while len(addrs) < 1 + extra.count("--listen") and time.monotonic() - t0 < 120:
        line = p.stdout.readline()
        if not line:
            raise SystemExit(f"convd exited: see {log.name}")
        if line.startswith("convd listening on "):
            addrs.append(line.split()[-1])
    return p, addrs


def ctl(*args, timeout=900):
    r = subprocess.run([convctl, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"convctl {' '.join(args[:3])}...: exit {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


def golden_args(d, p):
    a = ["--input", os.path.join(d, "input.npy"), "--weight", os.path.join(d, "weight.npy"),
         "--stride", "%d,%d" % tuple(p["stride"]), "--padding", ",".join(map(str, p["padding"])),
         "--dilation", "%d,%d" % tuple(p["dilation"]), "--groups", str(p["groups"][0])]
    if os.path.exists(os.path.join(d, "bias.npy")):
        a += ["--bias", os.path.join(d, "bias.npy")]
    if p["op"] == "conv_transpose2d":
        a += ["--output-padding", "%d,%d" % tuple(p["output_padding"])]
    return ["conv-transpose" if p["op"] == "conv_transpose2d" else "conv"] + a


def case(name, fn):
    t0 = time.monotonic()
    try:
        what = fn()
        print(f"ok   {name} ({time.monotonic() - t0:.1f} s): {what}", flush=True)
    except Exception as e:  # a failed case is reported and the others still run
        failures.append(name)
        print(f"FAIL {name}: {e}", flush=True)


def golden_cases(tcp, unix):
    n, worst = 0, 0.0
    for name, p, arrays in load_golden(golden):
        for how, extra in (("streamed", ["--server", tcp]), ("unary", ["--server", tcp, "--unary"]),
                           ("shm", ["--server", unix, "--shm"])):
            y = os.path.join(tmp, f"{name}-{how}.npy")
            ctl(*golden_args(os.path.join(golden, name), p), *extra, "--output", y)
            try:
                worst = max(worst, check_close(np.load(y), arrays["expected"]))
            except AssertionError as e:
                raise AssertionError(f"{name} ({how}): {e}")
            n += 1
    return f"{n} golden calls (streamed, unary, shm in place), max error {worst:.2e}"


def devices(tcp):
    """`convctl devices`' table as dicts (index kind name memory_bytes completed_ops health detail)."""
    lines = ctl("devices", "--server", tcp, timeout=30).splitlines()
    keys = lines[0].split()
    return [dict(zip(keys, ln.split(None, len(keys) - 1))) for ln in lines[1:] if ln.strip()]


def gpu_ops(tcp):
    gpus = [d for d in devices(tcp) if d.get("kind") == "cuda"]
    if not gpus and not DRY_RUN:
        raise AssertionError("ListDevices shows no CUDA device")
    return sum(int(d["completed_ops"]) for d in gpus)


def versus_cpu(tcp, cpu, shape, wshape, label, sample=False):
    rng = np.random.default_rng(7)
    x = os.path.join(tmp, f"{label}-x.npy")
    w = os.path.join(tmp, f"{label}-w.npy")
    np.save(x, rng.standard_normal(shape, dtype=np.float32))
    np.save(w, (rng.standard_normal(wshape, dtype=np.float32) * 0.05).astype(np.float32))
    samples, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            try:
                samples.append((time.monotonic(), gpu_ops(tcp)))
            except Exception:
                pass
            stop.wait(0.5)

    th = threading.Thread(target=sampler, daemon=True)
    if sample:
        th.start()
    yg, yc = os.path.join(tmp, f"{label}-gpu.npy"), os.path.join(tmp, f"{label}-cpu.npy")
    t0 = time.monotonic()
    ctl("conv", "--server", tcp, "--input", x, "--weight", w, "--padding", "1", "--output", yg)
    tg = time.monotonic() - t0
    stop.set()
    ctl("conv", "--server", cpu, "--input", x, "--weight", w, "--padding", "1", "--output", yc)
    a, b = np.load(yg), np.load(yc)
    tol = 1e-4 * max(1.0, float(np.abs(b).max()))
    err = float(np.abs(a.astype(np.float64) - b).max())
    assert err <= tol, f"GPU and CPU daemons differ by {err} > {tol}"
    for f in (x, w, yg, yc):
        os.unlink(f)
    what = f"{tg:.2f} s on the GPU daemon, max |GPU - CPU| {err:.2e}"
    if sample:
        grew = [o for _, o in samples]
        assert DRY_RUN or (len(grew) >= 2 and grew[-1] > grew[0]), \
            f"the GPU's completed ops did not grow during the job: {grew}"
        what += f"; GPU completed ops sampled {grew[0]} -> {grew[-1]} over {len(grew)} samples"
    return what


sock = os.path.join(tmp, "convd.sock")
gpu, (tcp, unix) = start("--listen", f"unix:{sock}")
cpu, (cpu_tcp,) = start("--gpus", "0")
try:
    with open(os.path.join(out, "devices.json"), "w") as f:
        json.dump(devices(tcp), f, indent=1)  # noqa
    case("devices", lambda: f"{gpu_ops(tcp)} GPU ops so far; ListDevices in devices.json")
    case("golden cases through the daemon", lambda: golden_cases(tcp, unix))
    case("the 64 MiB case", lambda: versus_cpu(tcp, cpu_tcp, (1, 64, 512, 512), (64, 64, 3, 3), "m64"))
    case("a long tiled job, ListDevices sampled",
         lambda: versus_cpu(tcp, cpu_tcp, (1, 64, 1024, 1024), (64, 64, 3, 3), "tiled", sample=True))
    bench = os.path.join(bundle, "bin", "bench_e2e")
    with open(os.path.join(out, "bench_e2e.md"), "w") as f:
        r = subprocess.run([bench, "--server", tcp, "--unix", sock, "--no-torch", "--no-python", "--repeats", "3"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=900)
    (failures.append("bench_e2e") if r.returncode else None)
    print(f"{'ok  ' if r.returncode == 0 else 'FAIL'} bench_e2e: {os.path.join(out, 'bench_e2e.md')}", flush=True)
finally:
    for p in (gpu, cpu):
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
print(f"daemon stage: {len(failures)} failed{': ' + ', '.join(failures) if failures else ''}")
sys.exit(1 if failures else 0)
