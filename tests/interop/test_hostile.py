#!/usr/bin/python3
"""A careless or hostile client cannot make the daemon hold memory outside its limits, lock
other clients out, keep connections or calls open for ever, forge log lines, or be miscounted.
Each case starts its own daemon with small limits, sends one pattern that used to break it,
checks the status and message the client gets, that health answers meanwhile, and (outside
sanitizer builds, whose quarantine and shadow memory inflate it) that the daemon's peak RSS
(VmHWM) grew by less than the stated bound.

usage: test_hostile.py CONVD_BINARY STUB_DIR GOLDEN_DIR"""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from convd_harness import Daemon, check_close, collect_output, conv_requests, import_stubs, \
    reference_conv2d, spec_from_params

pb = pb_grpc = hpb = hpb_grpc = None
MiB = 1 << 20
# What the daemon may hold beyond --max-inflight-bytes in these cases: gRPC's receive window
# for one stream (16 MiB lookahead), its own buffers and the message being decoded.
FIXED_OVERHEAD = 48 * MiB


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def sanitized(pid):
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return "libasan" in maps or "libtsan" in maps


class Probe:
    """Health checks every 0.1 s from a thread while a case runs; the best and worst latency."""

    def __init__(self, target):
        self.ch = grpc.insecure_channel(target)
        self.stub = hpb_grpc.HealthStub(self.ch)
        self.times, self.stop_ = [], threading.Event()
        self.stub.Check(hpb.HealthCheckRequest(), timeout=10)  # connected before timing
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        self.error = None
        while not self.stop_.is_set():
            t0 = time.monotonic()
            try:
                r = self.stub.Check(hpb.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as e:
                self.error = f"health check failed: {e.code()} {e.details()}"
                return
            if r.status != hpb.HealthCheckResponse.SERVING:
                self.error = f"health said {r.status} while the daemon ran"
                return
            self.times.append(time.monotonic() - t0)
            self.stop_.wait(0.1)

    def finish(self, what, worst_ms=None):
        self.stop_.set()
        self.t.join()
        if hasattr(self, "ch"):
            self.ch.close()
        assert self.error is None, f"{what}: {self.error}"
        assert self.times, f"{what}: no health check completed"
        best, worst = min(self.times) * 1e3, max(self.times) * 1e3
        # The best probe must be quick (the gRPC thread was never blocked for the whole case);
        # single probes on a 2-core machine shared with the pattern's own client vary.
        assert best <= 50, f"{what}: health took {best:.1f} ms at best"
        assert worst_ms is None or worst <= worst_ms, f"{what}: a health check took {worst:.0f} ms"
        return f"health {len(self.times)} probes, {best:.1f}-{worst:.1f} ms"


class ProcessProbe:
    """Probe's checks from a process of their own, for a case whose client would stall a
    thread beside it (a call of hundreds of MiB keeps this process's gRPC core busy)."""

    CODE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import grpc
from grpc_health_v1 import health_pb2 as h, health_pb2_grpc as hg
with grpc.insecure_channel(sys.argv[2]) as ch:
    st = hg.HealthStub(ch)
    st.Check(h.HealthCheckRequest(), timeout=10)
    print("ready", flush=True)
    while sys.stdin.readline().strip() == "go":
        t0 = time.monotonic()
        r = st.Check(h.HealthCheckRequest(), timeout=10)
        print(time.monotonic() - t0 if r.status == h.HealthCheckResponse.SERVING else -1, flush=True)
"""

    def __init__(self, target, stub_dir):
        self.p = subprocess.Popen([sys.executable, "-c", self.CODE, stub_dir, target],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready", "the probe process did not connect"
        self.times, self.stop_, self.error = [], threading.Event(), None
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        while not self.stop_.is_set():
            self.p.stdin.write("go\n")
            self.p.stdin.flush()
            line = self.p.stdout.readline()
            if not line or float(line) < 0:
                self.error = "health check failed or not SERVING"
                return
            self.times.append(float(line))
            self.stop_.wait(0.1)

    finish = Probe.finish

    def __del__(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(10)


def spec(inp, weight, padding=(0, 0, 0, 0), has_bias=False, groups=1):
    return spec_from_params(pb, {"input": list(inp), "weight": list(weight), "stride": [1, 1],
                                 "dilation": [1, 1], "padding": list(padding),
                                 "groups": [groups]}, has_bias)


def expect_status(fn, code, words, what):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"{what}: {e.code()} {e.details()!r}, expected {code}"
        assert words in e.details(), f"{what}: {e.details()!r} lacks {words!r}"
        return e.details()
    raise AssertionError(f"{what}: the call succeeded; expected {code}")


def then_wait(requests, seconds):
    """The requests, then the stream stays open (nothing sent) for seconds."""
    yield from requests
    time.sleep(seconds)


def peak_check(d, base_kib, bound, what):
    peak = status_kib(d.proc.pid, "VmHWM")
    grown = (peak - base_kib) * 1024
    if sanitized(d.proc.pid):
        return f"peak RSS +{grown / MiB:.0f} MiB (not checked under a sanitizer)"
    assert grown < bound, f"{what}: the daemon's peak RSS grew {grown / MiB:.0f} MiB, bound {bound / MiB:.0f}"
    return f"peak RSS +{grown / MiB:.0f} MiB (bound {bound / MiB:.0f})"


def case_row_bookkeeping(convd):
    """A ~40-byte spec whose input has 2^27 rows of one element: its per-row bookkeeping is
    counted before anything is allocated, so it is refused at once."""
    limit = 256 * MiB
    d = Daemon(convd, "--max-inflight-bytes", str(limit))
    try:
        base = status_kib(d.proc.pid, "VmHWM")
        probe = Probe(d.target)
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            s = spec((1, 1, 1 << 27, 1), (1, 1, 1, 1))
            t0 = time.monotonic()
            msg = expect_status(lambda: list(stub.Conv2d(then_wait([pb.ConvRequest(spec=s)], 3), timeout=30)),
                                grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-inflight-bytes", "2^27 rows")
            took = time.monotonic() - t0
        assert took < 2.5, f"the refusal took {took:.1f} s (it must come at the spec, not at the end)"
        health = probe.finish("2^27 rows")
        return f"RESOURCE_EXHAUSTED after {took * 1e3:.0f} ms \"{msg[:90]}...\"; {health}; " + \
            peak_check(d, base, FIXED_OVERHEAD, "2^27 rows")
    finally:
        d.stop()


def case_bookkeeping_off_thread(convd):
    """The same shape admitted (default limits): 2^25 rows of bookkeeping are set up off the
    gRPC thread, so health keeps answering while they are; the call then ends for its missing
    input (it used to stall every other call for as long)."""
    d = Daemon(convd)
    try:
        probe = Probe(d.target)
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            s = spec((1, 1, 1 << 25, 1), (1, 1, 1, 1))
            reqs = [pb.ConvRequest(spec=s), pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=b"\0" * 4))]
            msg = expect_status(lambda: list(stub.Conv2d(then_wait(reqs, 1.5), timeout=60)),
                                grpc.StatusCode.INVALID_ARGUMENT, "incomplete at half-close", "2^25 rows")
        worst = None if sanitized(d.proc.pid) else 250
        return f"INVALID_ARGUMENT \"{msg[:60]}...\"; {probe.finish('2^25 rows', worst_ms=worst)}"
    finally:
        d.stop()


def case_out_of_order(convd):
    """A 256 MiB input sent even rows first: no tile can run until odd rows come, so the call
    ends once its window is full instead of holding the whole input."""
    limit = 256 * MiB
    d = Daemon(convd, "--max-inflight-bytes", str(limit))
    try:
        base = status_kib(d.proc.pid, "VmHWM")
        probe = Probe(d.target)
        n, c, h, w = 1, 8, 4096, 2048
        row = np.random.default_rng(1).standard_normal((c, 1, w), dtype=np.float32).tobytes()
        weights = np.random.default_rng(2).standard_normal((c, c, 3, 3), dtype=np.float32)

        def requests():
            yield pb.ConvRequest(spec=spec((n, c, h, w), (c, c, 3, 3), (1, 1, 1, 1)))
            yield pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=weights.tobytes()))
            for r in range(0, h, 2):
                yield pb.ConvRequest(input=pb.RowBand(n=0, h_begin=r, h_end=r + 1, data=row))
            time.sleep(2)  # the odd rows never come

        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            msg = expect_status(lambda: list(stub.Conv2d(requests(), timeout=60)),
                                grpc.StatusCode.RESOURCE_EXHAUSTED, "out of order", "even rows first")
        health = probe.finish("even rows first")
        return f"RESOURCE_EXHAUSTED \"{msg[:100]}...\"; {health}; " + \
            peak_check(d, base, 64 * MiB + FIXED_OVERHEAD + 16 * MiB, "even rows first")
    finally:
        d.stop()


def case_band_too_large(convd):
    """One band per batch item (64 MiB each): the band is refused at its first piece, with the
    number of rows a band may have."""
    d = Daemon(convd, "--max-inflight-bytes", str(256 * MiB))
    try:
        base = status_kib(d.proc.pid, "VmHWM")
        n, c, h, w = 4, 8, 2048, 1024
        piece = b"\0" * MiB

        def requests():
            yield pb.ConvRequest(spec=spec((n, c, h, w), (c, c, 1, 1)))
            yield pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=b"\0" * (c * c * 4)))
            for item in range(n):
                for off in range(0, c * h * w * 4, MiB):
                    yield pb.ConvRequest(input=pb.RowBand(n=item, h_begin=0, h_end=h, offset=off,
                                                          data=piece))

        probe = Probe(d.target)
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            msg = expect_status(lambda: list(stub.Conv2d(requests(), timeout=60)),
                                grpc.StatusCode.RESOURCE_EXHAUSTED, "rows per band", "64 MiB bands")
        health = probe.finish("64 MiB bands")
        return f"RESOURCE_EXHAUSTED \"{msg}\"; {health}; " + peak_check(d, base, FIXED_OVERHEAD, "64 MiB bands")
    finally:
        d.stop()


def case_small_limit_admits(convd):
    """--max-inflight-bytes 16M: a streamed call of 8 MiB in and 8 MiB out is admitted (its tiles
    are cut to fit) and its output is right."""
    d = Daemon(convd, "--max-inflight-bytes", str(16 * MiB))
    try:
        rng = np.random.default_rng(5)
        x = rng.standard_normal((1, 8, 512, 512), dtype=np.float32)
        w = rng.standard_normal((8, 8, 3, 3), dtype=np.float32)
        b = rng.standard_normal(8, dtype=np.float32)
        probe = Probe(d.target)
        with grpc.insecure_channel(d.target, options=[("grpc.max_receive_message_length", 8 * MiB)]) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            s = spec(x.shape, w.shape, (1, 1, 1, 1), True)
            y, acc, summary = collect_output(stub.Conv2d(conv_requests(pb, s, x, w, b, 256 << 10), timeout=120))
        health = probe.finish("16M limit")
        worst = check_close(y, reference_conv2d(x, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1))
        return f"{acc.elemental_ops} ops, max error {worst:.2e}; {health}"
    finally:
        d.stop()


def case_put_weights(convd):
    """PutWeights counts against --max-inflight-bytes before it allocates, and a transpose's
    groups must divide its C_in (its bias length follows from them)."""
    d = Daemon(convd, "--max-inflight-bytes", str(64 * MiB), "--weights-memory", "1G")
    try:
        base = status_kib(d.proc.pid, "VmHWM")
        probe = Probe(d.target)
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            big = pb.WeightsSpec(dtype=pb.DTYPE_FLOAT32)
            big.weight_shape.d0, big.weight_shape.d1, big.weight_shape.d2, big.weight_shape.d3 = 1024, 1024, 8, 8
            m1 = expect_status(lambda: stub.PutWeights(then_wait([pb.PutWeightsRequest(spec=big)], 3), timeout=30),
                               grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-inflight-bytes", "256 MiB PutWeights")
            tr = pb.WeightsSpec(dtype=pb.DTYPE_FLOAT32, op=pb.OP_CONV_TRANSPOSE2D, groups=2**31 - 1, has_bias=True)
            tr.weight_shape.d0 = tr.weight_shape.d1 = tr.weight_shape.d2 = tr.weight_shape.d3 = 1
            m2 = expect_status(lambda: stub.PutWeights(iter([pb.PutWeightsRequest(spec=tr)]), timeout=30),
                               grpc.StatusCode.INVALID_ARGUMENT, "must divide", "transpose groups 2^31-1")
        health = probe.finish("PutWeights")
        return f"RESOURCE_EXHAUSTED \"{m1[:70]}...\", INVALID_ARGUMENT \"{m2}\"; {health}; " + \
            peak_check(d, base, FIXED_OVERHEAD, "PutWeights")
    finally:
        d.stop()


def case_large_weights(convd):
    """256 MiB of float16 weights (64 Mi values, 128 MiB on the wire), through PutWeights and
    inline in a Conv2d: widening and hashing them happen off the gRPC thread, so health checks
    keep answering (each used to wait 0.9-1.6 s)."""
    d = Daemon(convd, "--weights-memory", "1G")
    try:
        rng = np.random.default_rng(11)
        w = rng.standard_normal((1024, 1024, 8, 8), dtype=np.float32).astype(np.float16)
        x = rng.standard_normal((1, 1024, 8, 8), dtype=np.float32).astype(np.float16)
        data = w.tobytes()
        probe = Probe(d.target)
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            ws = pb.WeightsSpec(dtype=pb.DTYPE_FLOAT16)
            ws.weight_shape.d0, ws.weight_shape.d1, ws.weight_shape.d2, ws.weight_shape.d3 = w.shape

            def put():
                yield pb.PutWeightsRequest(spec=ws)
                for off in range(0, len(data), MiB):
                    yield pb.PutWeightsRequest(weight=pb.TensorChunk(offset=off, data=data[off:off + MiB]))

            wid = stub.PutWeights(put(), timeout=120).weights_id
            s = spec(x.shape, w.shape)
            s.dtype = pb.DTYPE_FLOAT16
            y, _, _ = collect_output(stub.Conv2d(conv_requests(pb, s, x, w, None, MiB, dtype="<f2"), timeout=120),
                                     dtype="<f2")
            s.weights_id = wid
            s.ClearField("weight_shape")
            y2, _, _ = collect_output(stub.Conv2d(conv_requests(pb, s, x, None, None, MiB, dtype="<f2"), timeout=120),
                                      dtype="<f2")
        # Under a sanitizer everything runs 5-20x slower: only the best probe is checked there.
        health = probe.finish("256 MiB weights", worst_ms=None if sanitized(d.proc.pid) else 250)
        want = reference_conv2d(x.astype(np.float32), w.astype(np.float32), None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
        # float16 output: its rounding (2^-11 relative) bounds the error, beside float32 sums
        tol = 2e-3 * max(1.0, float(np.abs(want).max()))
        for name, got in (("inline", y), ("registered", y2)):
            err = float(np.abs(got.astype(np.float64) - want).max())
            assert err <= tol, f"{name} weights: max error {err} > {tol}"
        return f"PutWeights and two Conv2d calls served; {health}"
    finally:
        d.stop()


def case_large_unary(convd, stub_dir):
    """A 256 MiB Conv2dUnary message (--max-message-bytes 512M, float16): decoding it, widening
    its input and making its job run off the gRPC thread, so health keeps answering (each probe
    used to wait for all of it); the answer is checked against numpy."""
    d = Daemon(convd, "--max-message-bytes", "512M")
    try:
        rng = np.random.default_rng(12)
        x = rng.standard_normal((1, 32, 2048, 2048), dtype=np.float32).astype(np.float16)
        w = rng.standard_normal((1, 32, 1, 1), dtype=np.float32).astype(np.float16)
        s = spec(x.shape, w.shape)
        s.dtype = pb.DTYPE_FLOAT16
        # Serialized before the probe starts and sent as bytes: protobuf's encoding of 256 MiB
        # holds Python's lock, which would stall the probe's thread, not the daemon.
        msg = pb.ConvCall(spec=s, input=x.tobytes(), weight=w.tobytes()).SerializeToString()
        opts = [("grpc.max_send_message_length", 512 * MiB), ("grpc.max_receive_message_length", 512 * MiB)]
        probe = ProcessProbe(d.target, stub_dir)
        with grpc.insecure_channel(d.target, options=opts) as ch:
            call = ch.unary_unary("/convd.v1.Convolution/Conv2dUnary", request_serializer=None,
                                  response_deserializer=None)
            r = pb.ConvResult.FromString(call(msg, timeout=120))
        health = probe.finish("256 MiB unary", worst_ms=None if sanitized(d.proc.pid) else 250)
        probe.p.stdin.close()
        probe.p.wait(10)
        got = np.frombuffer(r.output, dtype="<f2").reshape(1, 1, 2048, 2048).astype(np.float64)
        want = np.einsum("chw,c->hw", x[0].astype(np.float64), w[:, :, 0, 0][0].astype(np.float64))
        tol = 2e-3 * max(1.0, float(np.abs(want).max()))
        err = float(np.abs(got[0, 0] - want).max())
        assert err <= tol, f"256 MiB unary: max error {err} > {tol}"
        return f"served, max error {err:.2e}; {health}"
    finally:
        d.stop()


def case_idle_stream(convd):
    """A stream that sends its spec (announcing 192 MiB of weights) and then nothing is ended
    after --stream-idle-timeout, and what it reserved is free for the next call."""
    d = Daemon(convd, "--max-inflight-bytes", str(256 * MiB), "--stream-idle-timeout", "1")
    try:
        probe = Probe(d.target)
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            s = spec((1, 1024, 8, 8), (768, 1024, 8, 8))
            t0 = time.monotonic()
            msg = expect_status(lambda: list(stub.Conv2d(then_wait([pb.ConvRequest(spec=s)], 4), timeout=30)),
                                grpc.StatusCode.DEADLINE_EXCEEDED, "--stream-idle-timeout", "idle stream")
            took = time.monotonic() - t0
            assert 0.9 < took < 3, f"the idle stream ended after {took:.1f} s (timeout 1 s)"
            # The same reservation again is admitted (it would be RESOURCE_EXHAUSTED if the first
            # were still counted): it fails only for ending without its tensors. The first call's
            # memory is given back when the daemon frees it, a moment after its status went out.
            for attempt in range(20):
                try:
                    list(stub.Conv2d(iter([pb.ConvRequest(spec=s)]), timeout=30))
                    raise AssertionError("a spec without its tensors succeeded")
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < 19:
                        time.sleep(0.1)
                        continue
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "incomplete at half-close" in e.details(), \
                        f"second reservation: {e.code()} {e.details()}"
                    break
        health = probe.finish("idle stream")
        return f"DEADLINE_EXCEEDED after {took:.1f} s \"{msg}\"; the same reservation is admitted next; {health}"
    finally:
        d.stop()


def closed_within(sock, seconds, t0):
    """Seconds from t0 until the daemon closed the connection, or None."""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


def h2_preface(host, port):
    """A connection that completes the HTTP/2 preface and then starts no call."""
    s = socket.create_connection((host, port))
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    return s


def case_idle_connections(convd):
    """Connections that never start a call are closed: one that sends nothing after
    --handshake-timeout, one that completes the HTTP/2 preface after --connection-idle-timeout."""
    d = Daemon(convd, "--handshake-timeout", "1", "--connection-idle-timeout", "2")
    try:
        host, port = d.target.rsplit(":", 1)
        t0 = time.monotonic()
        silent = socket.create_connection((host, int(port)))
        # The client preface and an empty SETTINGS frame; then, once the server's SETTINGS are
        # in, their ACK: the connection is a complete HTTP/2 one that never starts a stream.
        preface = h2_preface(host, int(port))
        preface.settimeout(5)
        assert preface.recv(9)[3:4] == b"\x04", "the server's first frame is not SETTINGS"
        preface.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
        t_silent = closed_within(silent, 6, t0)
        t_idle = closed_within(preface, 8, t0)
        silent.close(), preface.close()
        assert t_silent is not None, "a connection that sent nothing was still open after 6 s"
        assert t_idle is not None, "an HTTP/2 connection without calls was still open after 8 s"
        assert t_idle > 1.2, f"the HTTP/2 connection was closed after {t_idle:.1f} s, before its idle timeout"
        with grpc.insecure_channel(d.target) as ch:
            hpb_grpc.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=10)
        return f"silent connection closed after {t_silent:.1f} s, idle HTTP/2 one after {t_idle:.1f} s"
    finally:
        d.stop()


def case_max_connections(convd):
    """--max-connections: one connection over the bound is closed as it arrives, the counted
    ones are left alone, and a slot that frees up lets the next client in."""
    d = Daemon(convd, "--max-connections", "4", "--connection-idle-timeout", "60",
               "--handshake-timeout", "60", "--metrics-listen", "127.0.0.1:0")
    try:
        host, port = d.target.rsplit(":", 1)
        held = []
        for _ in range(4):
            held.append(h2_preface(host, int(port)))
            time.sleep(0.15)  # each one seen by a scan before the next arrives
        t0 = time.monotonic()
        extra = h2_preface(host, int(port))
        t_extra = closed_within(extra, 3, t0)
        extra.close()
        assert t_extra is not None, "a 5th connection was still open after 3 s with --max-connections 4"
        # A gRPC client over the bound: its connection ends within a scan (a call it starts in
        # that window may still be served; gRPC's client notices the end at its next call).
        codes = []
        with grpc.insecure_channel(d.target) as ch:
            for _ in range(5):
                try:
                    hpb_grpc.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=1)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                time.sleep(0.2)
        assert "UNAVAILABLE" in codes, f"a gRPC client beyond --max-connections: {codes}"
        for s in held:  # the counted connections were never touched
            assert closed_within(s, 0.3, time.monotonic()) is None, "a counted connection was closed"
        for s in held[:2]:
            s.close()
        time.sleep(0.5)
        with grpc.insecure_channel(d.target) as ch:
            hpb_grpc.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=10)
        import urllib.request
        text = urllib.request.urlopen(d.metrics_url, timeout=10).read().decode()
        refused = int(re.search(r"^convd_connections_refused_total (\d+)$", text, re.M).group(1))
        limit = int(re.search(r"^convd_connections_limit (\d+)$", text, re.M).group(1))
        assert limit == 4 and refused >= 2, f"metrics: limit {limit}, refused {refused}"
        for s in held[2:]:
            s.close()
        assert "--max-connections reached" in d.read_log(), "the refusal was not logged"
        return (f"5th connection closed after {t_extra * 1e3:.0f} ms; a client beyond: {' '.join(codes)}; "
                f"{refused} refused; a freed slot served health")
    finally:
        d.stop()


def case_log_escaping(convd):
    """Client strings with newlines and quotes in a health service name and a weights id: every
    line of the log is still one well-formed logfmt line of the daemon's."""
    d = Daemon(convd)
    try:
        forged = 'x"\nts=2026-01-01T00:00:00.000Z level=error msg="forged'
        with grpc.insecure_channel(d.target) as ch:
            expect_status(lambda: hpb_grpc.HealthStub(ch).Check(hpb.HealthCheckRequest(service=forged), timeout=10),
                          grpc.StatusCode.NOT_FOUND, "", "forged service name")
            s = spec((1, 1, 8, 8), (1, 1, 3, 3))
            s.weights_id = forged
            expect_status(lambda: list(pb_grpc.ConvolutionStub(ch).Conv2d(iter([pb.ConvRequest(spec=s)]), timeout=10)),
                          grpc.StatusCode.NOT_FOUND, "", "forged weights id")
        time.sleep(0.3)
        lines = d.read_log().splitlines()
        pat = re.compile(r'^ts=\S+ level=(debug|info|warn|error) msg="[^"]*"( [a-z_]+=("([^"\\]|\\.)*"|\S+))*$')
        bad = [ln for ln in lines if not pat.match(ln)]
        assert not bad, f"lines that are not the daemon's logfmt: {bad[:3]}"
        assert not any(ln.startswith("ts=2026-01-01") for ln in lines), "a forged line was written"
        ended = [ln for ln in lines if 'msg="call ended"' in ln and "error=" in ln]
        assert len(ended) >= 2, f"expected two failed calls in the log: {lines}"
        return f"{len(lines)} log lines, all logfmt; e.g. {ended[-1][-120:]}"
    finally:
        d.stop()


def tokens_file(lines):
    import tempfile
    fd, path = tempfile.mkstemp(prefix="convd-tokens-")
    os.write(fd, ("\n".join(lines) + "\n").encode())
    os.close(fd)
    os.chmod(path, 0o600)
    return path


def case_tenants(convd):
    """Registered weights belong to their tenant: bob cannot list, use, read or delete alice's,
    and putting the same content does not tell him she has it; alice's stay hers."""
    ta, tb = "alice-token-0123456789", "bob-token-0123456789ab"
    path = tokens_file([f"alice {ta}", f"bob {tb}"])
    d = Daemon(convd, "--auth-tokens", path, "--metrics-listen", "127.0.0.1:0")
    try:
        rng = np.random.default_rng(21)
        w = rng.standard_normal((6, 4, 3, 3), dtype=np.float32)
        x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
        A, B = [("authorization", f"Bearer {ta}")], [("authorization", f"Bearer {tb}")]
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            ws = pb.WeightsSpec(dtype=pb.DTYPE_FLOAT32)
            ws.weight_shape.d0, ws.weight_shape.d1, ws.weight_shape.d2, ws.weight_shape.d3 = w.shape

            def put():
                return iter([pb.PutWeightsRequest(spec=ws),
                             pb.PutWeightsRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))])

            ra = stub.PutWeights(put(), timeout=10, metadata=A)
            listed = stub.ListWeights(pb.ListWeightsRequest(), timeout=10, metadata=B)
            assert not listed.weights and listed.bytes_used == 0, f"bob lists {listed}"
            s = spec(x.shape, w.shape, (1, 1, 1, 1))
            s.weights_id = ra.weights_id
            s.ClearField("weight_shape")
            expect_status(lambda: list(stub.Conv2d(conv_requests(pb, s, x, None, None, MiB), timeout=10, metadata=B)),
                          grpc.StatusCode.NOT_FOUND, "not in the registry", "bob uses alice's id")
            expect_status(lambda: stub.DeleteWeights(pb.DeleteWeightsRequest(weights_id=ra.weights_id), timeout=10, metadata=B),
                          grpc.StatusCode.NOT_FOUND, "not in the registry", "bob deletes alice's id")
            rb = stub.PutWeights(put(), timeout=10, metadata=B)
            assert not rb.already_present and rb.weights_id != ra.weights_id, \
                f"bob's put of the same weights: already_present={rb.already_present}, same id={rb.weights_id == ra.weights_id}"
            y, _, _ = collect_output(stub.Conv2d(conv_requests(pb, s, x, None, None, MiB), timeout=10, metadata=A))
            check_close(y, reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1))
            mine = stub.ListWeights(pb.ListWeightsRequest(), timeout=10, metadata=A)
            assert [i.weights_id for i in mine.weights] == [ra.weights_id], mine
            # a wrong token: refused before dispatch, counted on its own
            expect_status(lambda: stub.ListWeights(pb.ListWeightsRequest(), timeout=10,
                                                   metadata=[("authorization", "Bearer not-a-token-0123456789")]),
                          grpc.StatusCode.UNAUTHENTICATED, "", "wrong token")
        import urllib.request
        scrape = urllib.request.urlopen(d.metrics_url, timeout=10).read().decode()
        assert re.search(r"^convd_auth_refused_total 1$", scrape, re.M), "convd_auth_refused_total is not 1"
        series = dict(re.findall(r'^(convd_tenant_requests_total\{[^}]*\}) (\d+)$', scrape, re.M))
        want = {'convd_tenant_requests_total{tenant="alice",status="OK"}': "3",
                'convd_tenant_requests_total{tenant="bob",status="OK"}': "2",
                'convd_tenant_requests_total{tenant="bob",status="NOT_FOUND"}': "2"}
        assert all(series.get(k) == v for k, v in want.items()), f"tenant series {series}, want {want}"
        return "bob saw none of alice's weights (list, use, delete, dedupe); alice's call by id is right; " \
            f"metrics by tenant {sorted(series.values())}"
    finally:
        d.stop()
        os.unlink(path)


def case_tenant_limits(convd):
    """A tenant's own limits from the tokens file: calls in flight, bytes in flight, bytes of
    registered weights; beyond each RESOURCE_EXHAUSTED naming it, while another tenant is served."""
    tl, tf = "limited-token-01234567", "free-token-0123456789ab"
    path = tokens_file([f"lab {tl} calls=1 inflight-bytes=1M weights-bytes=64K", f"other {tf}"])
    d = Daemon(convd, "--auth-tokens", path, "--stream-idle-timeout", "0")
    try:
        L, F = [("authorization", f"Bearer {tl}")], [("authorization", f"Bearer {tf}")]
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            # bytes: a unary call of 1 MiB in and out is over 1M
            big = spec((1, 4, 256, 256), (4, 4, 1, 1))
            m1 = expect_status(lambda: stub.Conv2dUnary(pb.ConvCall(spec=big, input=b"\0" * (4 << 18), weight=b"\0" * 64),
                                                        timeout=10, metadata=L),
                               grpc.StatusCode.RESOURCE_EXHAUSTED, "inflight-bytes", "tenant bytes")
            # weights: 128 KiB over 64K
            ws = pb.WeightsSpec(dtype=pb.DTYPE_FLOAT32)
            ws.weight_shape.d0, ws.weight_shape.d1, ws.weight_shape.d2, ws.weight_shape.d3 = 32, 32, 4, 8
            m2 = expect_status(lambda: stub.PutWeights(iter([pb.PutWeightsRequest(spec=ws),
                                                             pb.PutWeightsRequest(weight=pb.TensorChunk(offset=0, data=b"\0" * (128 << 10)))]),
                                                       timeout=10, metadata=L),
                               grpc.StatusCode.RESOURCE_EXHAUSTED, "weights-bytes", "tenant weights")
            # calls: one stalled stream in flight, a second call refused, another tenant served
            hold = threading.Event()

            def stalled():
                try:
                    list(stub.Conv2d(then_wait([pb.ConvRequest(spec=spec((1, 1, 8, 8), (1, 1, 3, 3)))], 2),
                                     timeout=10, metadata=L))
                except grpc.RpcError:
                    pass
                hold.set()

            t = threading.Thread(target=stalled)
            t.start()
            time.sleep(0.5)
            m3 = expect_status(lambda: stub.ListWeights(pb.ListWeightsRequest(), timeout=10, metadata=L),
                               grpc.StatusCode.RESOURCE_EXHAUSTED, "calls", "tenant calls")
            stub.ListWeights(pb.ListWeightsRequest(), timeout=10, metadata=F)
            t.join()
            stub.ListWeights(pb.ListWeightsRequest(), timeout=10, metadata=L)  # its call ended: served again
        return f"\"{m1[:60]}...\", \"{m2[:60]}...\", \"{m3}\""
    finally:
        d.stop()
        os.unlink(path)


KILLED_CLIENT = r'''
import os, sys, time
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[3])
import grpc, numpy as np
from convd_harness import conv_requests, import_stubs, spec_from_params
pb, pb_grpc = import_stubs(sys.argv[2])
s = spec_from_params(pb, {"input": [1, 8, 256, 256], "weight": [8, 8, 3, 3], "stride": [1, 1],
                          "dilation": [1, 1], "padding": [1, 1, 1, 1], "groups": [1]}, False)
x = np.zeros((1, 8, 256, 256), np.float32); w = np.zeros((8, 8, 3, 3), np.float32)
def reqs():
    for i, r in enumerate(conv_requests(pb, s, x, w, None, 64 << 10)):
        if i == 10:
            time.sleep(0.3)
            os._exit(0)  # the client dies mid-upload
        yield r
with grpc.insecure_channel(sys.argv[1]) as ch:
    list(pb_grpc.ConvolutionStub(ch).Conv2d(reqs(), timeout=30))
'''


def case_statuses_in_log(convd, stub_dir):
    """A client killed mid-upload is logged CANCELLED, a call cancelled by the drain timeout
    UNAVAILABLE (both used to read INVALID_ARGUMENT, "incomplete at half-close")."""
    d = Daemon(convd, "--drain-timeout", "1", "--stream-idle-timeout", "0")
    interop = os.path.dirname(os.path.abspath(__file__))
    rc = subprocess.run([sys.executable, "-c", KILLED_CLIENT, d.target, stub_dir, interop], timeout=60).returncode
    assert rc == 0, f"the killed client's process exited with {rc}"
    time.sleep(0.5)
    got = {}
    with grpc.insecure_channel(d.target) as ch:
        stub = pb_grpc.ConvolutionStub(ch)
        s = spec((1, 1, 8, 8), (1, 1, 3, 3))

        def stalled():
            try:
                list(stub.Conv2d(then_wait([pb.ConvRequest(spec=s)], 6), timeout=30))
            except grpc.RpcError as e:
                got["code"] = e.code()

        t = threading.Thread(target=stalled)
        t.start()
        time.sleep(0.5)
        d.proc.send_signal(signal.SIGTERM)  # the stalled call is cancelled after the drain timeout
        t.join()
    d.proc.wait(30)
    log = d.read_log()
    d.stop()  # checks the exit status and the log
    ended = [ln for ln in log.splitlines() if 'msg="call ended"' in ln and "method=Conv2d " in ln]
    statuses = [re.search(r" status=(\S+)", ln).group(1) for ln in ended]
    assert statuses == ["CANCELLED", "UNAVAILABLE"], f"Conv2d calls logged {statuses}: {ended}"
    assert got.get("code") == grpc.StatusCode.UNAVAILABLE, f"the drained client got {got}"
    return f"logged {statuses}"


def main():
    global pb, pb_grpc, hpb, hpb_grpc
    convd, stub_dir = sys.argv[1:3]
    pb, pb_grpc = import_stubs(stub_dir)
    from grpc_health_v1 import health_pb2, health_pb2_grpc  # noqa: E402  (from STUB_DIR)
    hpb, hpb_grpc = health_pb2, health_pb2_grpc
    cases = [("row bookkeeping of a 2^27-row input", case_row_bookkeeping),
             ("2^25 rows admitted: bookkeeping off the gRPC thread", case_bookkeeping_off_thread),
             ("even rows first, 256 MiB", case_out_of_order),
             ("one 64 MiB band per batch item", case_band_too_large),
             ("--max-inflight-bytes 16M admits a 16 MiB streamed call", case_small_limit_admits),
             ("PutWeights admission and transpose groups", case_put_weights),
             ("256 MiB of float16 weights, health meanwhile", case_large_weights),
             ("a 256 MiB Conv2dUnary message, health meanwhile", lambda c: case_large_unary(c, stub_dir)),
             ("spec and then nothing", case_idle_stream),
             ("connections without calls", case_idle_connections),
             ("--max-connections", case_max_connections),
             ("log escaping", case_log_escaping),
             ("tenants' weights", case_tenants),
             ("tenant limits", case_tenant_limits),
             ("killed and drained clients' statuses", lambda c: case_statuses_in_log(c, stub_dir))]
    for name, fn in cases:
        t0 = time.monotonic()
        what = fn(convd)
        print(f"ok   {name} ({time.monotonic() - t0:.1f} s): {what}", flush=True)
    print(f"{len(cases)} hostile patterns held")


if __name__ == "__main__":
    main()
