#!/usr/bin/python3
"""MPI ranks as remote devices, for real: `mpirun --oversubscribe -np 3 convd --mpi ...` on
loopback. Rank 0 serves gRPC and has no device of its own (--mpi with remote devices and no
--cpu-devices), so every op runs on rank 1 or rank 2.

Run 1 (3 ranks): ListDevices names the remote devices with their rank and host; every golden
case and 40 random shapes equal the reference (with --device-memory 1M the larger cases are cut
into tiles whose partial sums come from different ranks); both ranks completed ops; a
1x64x1024x1024 3x3 job equals the float64 reference; then SIGTERM to rank 0 while a job runs:
the job finishes, and mpirun (so every rank) exits 0.
Run 2 (3 ranks, mpirun's `A : B` form giving rank 2 --mpi-test-fail-after 3): rank 2 fails
mid-job, ListDevices marks it unhealthy with the reason, the job still equals the reference
(its ops were requeued onto rank 1), a later job runs on rank 1 alone, and SIGTERM still ends
every rank with 0.

usage: test_mpi.py CONVD_BINARY STUB_DIR GOLDEN_DIR MPIEXEC   (MPIEXEC "" = no MPI: skipped)"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from convd_harness import check_close, collect_output, conv_requests, import_stubs, load_golden, \
    reference_conv2d, spec_from_params

SKIP = 77


JOBS = []  # every job started, for kill_all


def kill_all():
    """SIGKILL to each job's process group that is still running (mpirun and its ranks)."""
    for j in JOBS:
        if j.proc.poll() is None:
            try:
                os.killpg(j.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            j.proc.wait()


class MpiJob:
    """mpirun with convd on every rank; self.target (rank 0's gRPC address), self.pid (rank 0)."""

    def __init__(self, mpiexec, convd, common, worker_extra=None, np_=3):
        self.np = np_
        env = dict(os.environ)
        if os.geteuid() == 0:  # Open MPI refuses root unless told twice
            env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
            env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        # Loopback TCP between the ranks, not Open MPI's shared-memory transport (vader), which
        # left a /dev/shm segment per rank behind after every run; speed is not measured here.
        env["OMPI_MCA_btl"] = "self,tcp"
        args = [convd, "--mpi", "--listen", "127.0.0.1:0", "--log-level", "info", *common]
        if worker_extra is None:
            cmd = [mpiexec, "--oversubscribe", "-np", str(np_), *args]
        else:  # ranks 0 and 1 as given, rank 2 with worker_extra too
            cmd = [mpiexec, "--oversubscribe", "-np", str(np_ - 1), *args, ":", "-np", "1", *args,
                   *worker_extra]
        self.log = tempfile.NamedTemporaryFile(prefix="convd-mpi-", suffix=".log", delete=False)
        # A session of its own: a failed test kills mpirun and every rank with it (kill_all).
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     start_new_session=True)
        JOBS.append(self)
        self.target = self.pid = None
        deadline = time.monotonic() + 60
        while (self.target is None or self.pid is None) and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.match(r"convd listening on 127\.0\.0\.1:(\d+)$", line.strip())
            if m:
                self.target = f"127.0.0.1:{m.group(1)}"
            m = re.match(rf"convd mpi: rank 0 pid (\d+), {np_} ranks, (\d+) remote devices$", line.strip())
            if m:
                self.pid = int(m.group(1))
        if self.target is None or self.pid is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"mpirun did not bring convd up:\n{self.read_log()}")

    def read_log(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self, timeout=60):
        """SIGTERM to rank 0 (not to mpirun): rank 0 drains and stops the workers; mpirun's exit
        status is 0 only when every rank exited 0."""
        os.kill(self.pid, signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"mpirun did not exit within {timeout} s of SIGTERM:\n{self.read_log()}")
        log = self.read_log()
        assert rc == 0, f"mpirun exited with {rc}:\n{log}"
        for r in range(1, self.np):
            assert re.search(rf'msg="mpi worker stopping" rank={r} ops=\d+ status=0', log), \
                f"rank {r} did not stop cleanly:\n{log}"
        os.unlink(self.log.name)
        return log


def devices(pb, stub):
    return {d.name: d for d in stub.ListDevices(pb.ListDevicesRequest(), timeout=10).devices}


def conv(pb, stub, x, w, b, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
         chunk=1 << 20, timeout=120):
    params = {"op": "conv2d", "input": list(x.shape), "weight": list(w.shape), "stride": list(stride),
              "padding": list(padding), "dilation": list(dilation), "groups": [groups]}
    spec = spec_from_params(pb, params, b is not None)
    y, accepted, summary = collect_output(stub.Conv2d(conv_requests(pb, spec, x, w, b, chunk), timeout=timeout))
    assert accepted is not None and summary is not None
    assert summary.ops_run >= accepted.elemental_ops >= 1
    return y, accepted


def reference_blocked(x, w, b, rows=64):
    """3x3, stride 1, padding 1 in float64, by bands of output rows (memory stays small)."""
    n, c, h, wd = x.shape
    co = w.shape[0]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.empty((n, co, h, wd), np.float64)
    w64 = w.astype(np.float64)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        acc = np.zeros((co, r1 - r0, wd))
        for i in range(3):
            for j in range(3):
                win = xp[0, :, r0 + i:r1 + i, j:j + wd].astype(np.float64)
                acc += np.tensordot(w64[:, :, i, j], win, axes=(1, 0))
        y[0, :, r0:r1] = acc + b.astype(np.float64)[:, None, None]
    return y


def random_case(rng):
    groups = int(rng.choice([1, 1, 2]))
    cg, og = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    stride = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    pad = tuple(int(rng.integers(0, 3)) for _ in range(4))
    h = int(rng.integers((kh - 1) * dil[0] + 1, 48))
    wd = int(rng.integers((kw - 1) * dil[1] + 1, 48))
    x = rng.standard_normal((int(rng.integers(1, 3)), cg * groups, h, wd)).astype(np.float32)
    w = rng.standard_normal((og * groups, cg, kh, kw)).astype(np.float32)
    b = rng.standard_normal(og * groups).astype(np.float32) if rng.random() < 0.5 else None
    return x, w, b, stride, pad, dil, groups


def run_healthy(mpiexec, convd, pb, pb_grpc, golden):
    job = MpiJob(mpiexec, convd, ["--cpu-threads", "1", "--device-memory", "1M"])
    with grpc.insecure_channel(job.target) as ch:
        stub = pb_grpc.ConvolutionStub(ch)
        devs = devices(pb, stub)
        assert sorted(n.split(":")[0] for n in devs) == ["rank1", "rank2"], list(devs)
        for name, d in devs.items():
            r = name.split(":")[0][4:]
            assert d.healthy and d.detail.startswith(f"rank {r} on "), (name, d.detail)
        print(f"ok   ListDevices: {[(n, d.detail) for n, d in devs.items()]}")

        cases = 0
        for name, params, a in load_golden(golden):
            b = a.get("bias")
            spec = spec_from_params(pb, params, b is not None)
            y, accepted, summary = collect_output(
                stub.Conv2d(conv_requests(pb, spec, a["input"], a["weight"], b, 2000), timeout=60))
            worst = check_close(y, a["expected"])
            print(f"ok   golden {name}: {accepted.elemental_ops} ops, max error {worst:.3g}")
            cases += 1
        assert cases >= 19, cases

        rng = np.random.default_rng(18)
        for i in range(40):
            x, w, b, stride, pad, dil, groups = random_case(rng)
            y, accepted = conv(pb, stub, x, w, b, stride, pad, dil, groups)
            worst = check_close(y, reference_conv2d(x, w, b, stride, pad, dil, groups))
        print(f"ok   40 random shapes (last max error {worst:.3g})")

        # The large tiled job.
        x = rng.standard_normal((1, 64, 1024, 1024)).astype(np.float32)
        w = (rng.standard_normal((16, 64, 3, 3)) / 24).astype(np.float32)
        b = rng.standard_normal(16).astype(np.float32)
        t0 = time.monotonic()
        y, accepted = conv(pb, stub, x, w, b, padding=(1, 1, 1, 1), timeout=300)
        took = time.monotonic() - t0
        worst = check_close(y, reference_blocked(x, w, b))
        print(f"ok   1x64x1024x1024 3x3 -> 16: {accepted.elemental_ops} ops in {took:.1f} s, "
              f"max error {worst:.3g}")
        del x, y

        devs = devices(pb, stub)
        for name, d in devs.items():
            assert d.healthy and d.completed_ops > 0, (name, d.completed_ops)
            assert d.bytes_to_device > 0 and d.bytes_from_device > 0, (name, d)
            assert d.weight_cache_hits > 0, (name, d)  # blocks crossed once, then reused
        print(f"ok   ops per rank: {[(n, d.completed_ops, d.weight_cache_hits, d.bytes_to_device, d.bytes_from_device) for n, d in devs.items()]}")

        # SIGTERM to rank 0 with a job in flight: it finishes, then every rank exits 0.
        x = rng.standard_normal((1, 16, 512, 512)).astype(np.float32)
        w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
        result = {}

        def call():
            try:
                result["y"] = conv(pb, stub, x, w, None, padding=(1, 1, 1, 1), timeout=120)[0]
            except Exception as e:  # reported below
                result["error"] = e

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(
                d.completed_ops for d in devices(pb, stub).values()) == sum(d.completed_ops for d in devs.values()):
            time.sleep(0.005)
        job_pid_signalled = time.monotonic()
        os.kill(job.pid, signal.SIGTERM)
        t.join(120)
        assert "error" not in result, f"the call in flight failed during the drain: {result.get('error')}"
        check_close(result["y"], reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    job.wait(60)
    print(f"ok   SIGTERM to rank 0: the call in flight finished, every rank exited 0 "
          f"({time.monotonic() - job_pid_signalled:.1f} s)")


def run_failing(mpiexec, convd, pb, pb_grpc):
    job = MpiJob(mpiexec, convd, ["--cpu-threads", "1", "--device-memory", "256K"],
                 worker_extra=["--mpi-test-fail-after", "3"])
    with grpc.insecure_channel(job.target) as ch:
        stub = pb_grpc.ConvolutionStub(ch)
        rng = np.random.default_rng(3)
        x = rng.standard_normal((1, 16, 256, 256)).astype(np.float32)
        w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
        b = rng.standard_normal(16).astype(np.float32)
        y, accepted = conv(pb, stub, x, w, b, padding=(1, 1, 1, 1))
        check_close(y, reference_conv2d(x, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1))
        assert accepted.elemental_ops > 10, accepted.elemental_ops
        devs = devices(pb, stub)
        r1 = [d for n, d in devs.items() if n.startswith("rank1:")][0]
        r2 = [d for n, d in devs.items() if n.startswith("rank2:")][0]
        assert not r2.healthy and "--mpi-test-fail-after" in r2.detail and "rank 2" in r2.detail, r2
        assert r2.completed_ops <= 3 and r1.healthy and r1.completed_ops > 0, (r1, r2)
        assert r1.completed_ops + r2.completed_ops == accepted.elemental_ops, (r1, r2, accepted.elemental_ops)
        print(f"ok   rank 2 failed mid-job ({r2.completed_ops} ops done, then: {r2.detail!r}); "
              f"all {accepted.elemental_ops} ops done, {r1.completed_ops} on rank 1; output equals the reference")
        y, accepted = conv(pb, stub, x[:, :, :100], w, None, padding=(1, 1, 1, 1))
        check_close(y, reference_conv2d(x[:, :, :100], w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1))
        print("ok   a later job ran on rank 1 alone")
    log = job.stop(60)
    assert "device unhealthy, its ops go to the other devices" in log, log
    print("ok   SIGTERM after the failure: every rank exited 0")


def main():
    convd, stub_dir, golden, mpiexec = sys.argv[1:5]
    if not mpiexec:
        print("skipped: this convd was built without MPI (CONVD_MPI; Debian: libopenmpi-dev, openmpi-bin)")
        sys.exit(SKIP)
    pb, pb_grpc = import_stubs(stub_dir)
    t0 = time.monotonic()
    try:
        run_healthy(mpiexec, convd, pb, pb_grpc, golden)
        run_failing(mpiexec, convd, pb, pb_grpc)
    finally:
        kill_all()  # a failed case leaves no rank running (they spun for an hour once)
    print(f"mpi: passed in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
