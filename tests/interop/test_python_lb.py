#!/usr/bin/python3
"""Several daemons behind one target, from Python, and --max-connection-age as a client sees it.

- The Python package (pip-installed into a fresh venv, as test_python_package does) with
  lb_policy="round_robin" over an ipv4: list of three daemons on loopback: 60 calls reach all
  three (each daemon's completed ops > 0, 60 in all); one daemon killed (SIGKILL, by its PID)
  mid-run; the 30 calls after it all succeed, on the other two. Then another drains (SIGTERM)
  with a call held in flight: it answers new calls UNAVAILABLE, and the 20 calls made meanwhile
  all succeed on the third (round_robin's retry). pick_first sends every call to the first; a
  bad lb_policy is a ValueError.
- --max-connection-age 1: a raw HTTP/2 connection gets the daemon's GOAWAY about a second after
  it opened and is closed after the grace (a daemon without the flag sends none); a long-lived
  gRPC channel reconnects about once a second (its connectivity goes back to READY each time)
  and every call on it succeeds; a streamed call that outlives the age finishes when the grace
  is unbounded (the default), and fails UNAVAILABLE once a 1 s grace is over.

usage: test_python_lb.py CONVD_BINARY STUB_DIR GOLDEN_DIR [CONVCTL]"""
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from convd_harness import Daemon, check_close, collect_output, conv_requests, import_stubs, \
    reference_conv2d

HERE = os.path.dirname(os.path.abspath(__file__))

PACKAGE_CASES = r'''
import sys
import threading
import time
import numpy as np
import convd
sys.path.insert(0, sys.argv[2])
from convd.v1 import convd_pb2, convd_pb2_grpc
from test_python_lb import held_call

targets = sys.argv[1].split(",")
target = "ipv4:" + ",".join(targets)
rng = np.random.default_rng(18)
x = rng.standard_normal((1, 3, 12, 12), dtype=np.float32)
w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
b = rng.standard_normal(4, dtype=np.float32)
want = convd.Client(targets[0]).conv2d(x, w, b, padding=1)  # one op on the first daemon


def ops(t):
    return sum(d["completed_ops"] for d in convd.Client(t, timeout=10).devices())


for bad in ("roundrobin", "", "ROUND_ROBIN", 1):
    try:
        convd.Client(target, lb_policy=bad)
        raise AssertionError(f"lb_policy={bad!r} was accepted")
    except ValueError as e:
        assert "lb_policy must be one of ['pick_first', 'round_robin']" in str(e), e
print("ok   a bad lb_policy is a ValueError naming the choices", flush=True)

before = [ops(t) for t in targets]
with convd.Client(target, lb_policy="pick_first", timeout=30) as c:
    for _ in range(9):
        assert np.array_equal(c.conv2d(x, w, b, padding=1), want)
pf = [ops(t) - o for t, o in zip(targets, before)]
assert pf == [9, 0, 0], f"pick_first spread its calls: {pf}"
print(f"ok   pick_first over the list: every call on the first daemon {pf}", flush=True)

before = [ops(t) for t in targets]
c = convd.Client(target, lb_policy="round_robin", timeout=30)
for i in range(60):
    y = c.conv2d(x, w, b, padding=1)
    assert np.array_equal(y, want), f"call {i}"
spread = [ops(t) - o for t, o in zip(targets, before)]
assert all(n > 0 for n in spread) and sum(spread) == 60, f"60 calls over three daemons: {spread}"
print(f"ok   round_robin: 60 calls over {target}: {spread} ops", flush=True)
print("kill 1", flush=True)
assert sys.stdin.readline().strip() == "killed"
mid = [ops(targets[0]), ops(targets[2])]
for i in range(30):
    y = c.conv2d(x, w, b, padding=1)  # raises on any failure
    assert np.array_equal(y, want), f"call {i} after the kill"
after = [ops(targets[0]) - mid[0], ops(targets[2]) - mid[1]]
assert all(n > 0 for n in after) and sum(after) == 30, f"30 calls after the kill: {after}"
print(f"ok   daemon 1 killed mid-run: the 30 later calls all succeeded, {after} ops on the other two", flush=True)

# Daemon 0 drains (SIGTERM) while a call of its own is held in flight: it answers new calls
# UNAVAILABLE until that call ends, and round_robin retries each on daemon 2.
held, holding = [], threading.Event()
holder = threading.Thread(target=lambda: held.append(held_call(convd_pb2, convd_pb2_grpc, targets[0], 3, holding.set)))
holder.start()
assert holding.wait(10), "the held call did not start"
time.sleep(0.3)  # its spec and weights on the daemon
print("drain 0", flush=True)
assert sys.stdin.readline().strip() == "draining"
before2 = ops(targets[2])
for i in range(20):
    y = c.conv2d(x, w, b, padding=1)
    assert np.array_equal(y, want), f"call {i} during the drain"
n2 = ops(targets[2]) - before2
holder.join(30)
assert held and held[0][0] is None, f"the call held across the drain: {held}"
assert n2 == 20, f"20 calls during daemon 0's drain: {n2} ops on daemon 2"
c.close()
print(f"ok   daemon 0 draining (SIGTERM) with a call in flight: 20 calls all succeeded on daemon 2, "
      f"the held call finished correct", flush=True)
'''


def case_package(py, convd_bin, tmp):
    ds = [Daemon(convd_bin) for _ in range(3)]
    try:
        script = os.path.join(tmp, "lb_cases.py")
        with open(script, "w") as f:
            f.write(PACKAGE_CASES)
        p = subprocess.Popen([py, script, ",".join(d.target for d in ds), HERE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=tmp)
        killed = drained = False
        try:
            # Bounded: the script has 9 + 60 + 30 small calls; its lines come within seconds.
            timer = threading.Timer(120, p.kill)
            timer.start()
            for line in p.stdout:
                print(line, end="")
                if line.strip() == "kill 1":
                    ds[1].proc.kill()  # SIGKILL to this daemon's PID: no drain, no GOAWAY
                    ds[1].proc.wait(30)
                    killed = True
                    p.stdin.write("killed\n")
                    p.stdin.flush()
                elif line.strip() == "drain 0":
                    ds[0].proc.send_signal(signal.SIGTERM)
                    time.sleep(0.3)  # the signal handled: the daemon is draining
                    drained = True
                    p.stdin.write("draining\n")
                    p.stdin.flush()
            rc = p.wait(30)
            timer.cancel()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert killed and drained, "the script never reached the kill or the drain"
        assert rc == 0, f"the package's round_robin cases failed (exit {rc}, above)"
        rc0 = ds[0].proc.wait(60)  # drained: its last call ended
        assert rc0 == 0, f"the drained daemon exited {rc0}:\n{ds[0].read_log()}"
        assert "shutting down and takes no new calls" in ds[0].read_log(), "no call reached the draining daemon"
    finally:
        for i, d in enumerate(ds):
            if d.alive():
                d.stop()
            else:
                os.unlink(d.log.name)


# ---- --max-connection-age ------------------------------------------------------------------

GOAWAY, SETTINGS, PING = 7, 4, 6


def h2_frames(sock, seconds):
    """Reads the server's frames for up to `seconds` (ACKing its SETTINGS); yields (time, type)
    for each, then (time, None) once the server closed the connection."""
    t0 = time.monotonic()
    buf = b""
    sock.settimeout(0.1)
    while time.monotonic() - t0 < seconds:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            data = b""
        if not data:
            yield time.monotonic() - t0, None
            return
        buf += data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, flags = buf[3], buf[4]
            buf = buf[9 + length:]
            if ftype == SETTINGS and not flags & 1:
                sock.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
            yield time.monotonic() - t0, ftype


def open_h2(target):
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    return s


def case_goaway(convd_bin):
    aged = Daemon(convd_bin, "--max-connection-age", "1", "--max-connection-age-grace", "1")
    plain = Daemon(convd_bin)
    try:
        sa, sp = open_h2(aged.target), open_h2(plain.target)
        t_goaway = t_closed = None
        for t, ftype in h2_frames(sa, 8):
            if ftype == GOAWAY and t_goaway is None:
                t_goaway = t
            if ftype is None:
                t_closed = t
        sa.close()
        # By now (~2 s after opening, 0.5 s more to read) the connection to the daemon without
        # the flag would have had its GOAWAY too.
        seen = [ftype for _, ftype in h2_frames(sp, 0.5)]
        sp.close()
        assert t_goaway is not None, "no GOAWAY within 8 s of --max-connection-age 1"
        # gRPC's jitter is +-10 %; the lower bound leaves room for the timer's granularity.
        assert 0.85 <= t_goaway <= 3, f"GOAWAY after {t_goaway:.2f} s with --max-connection-age 1"
        assert t_closed is not None, "the connection was still open 8 s after opening (age 1 s + grace 1 s)"
        assert t_closed <= 1.1 + 1 + 3, f"closed {t_closed:.2f} s after opening (age 1 s + grace 1 s)"
        assert GOAWAY not in seen and None not in seen, f"a daemon without the flag sent {seen}"
        return f"GOAWAY {t_goaway:.2f} s after the connection opened, closed at {t_closed:.2f} s; none without the flag"
    finally:
        aged.stop()
        plain.stop()


def readies(pb_grpc, pb, target, seconds):
    """Calls ListDevices on one long-lived channel for `seconds`; returns (calls, times the
    channel became READY)."""
    ready = []
    ch = grpc.insecure_channel(target)
    ch.subscribe(lambda st: ready.append(st) if st == grpc.ChannelConnectivity.READY else None)
    stub = pb_grpc.ConvolutionStub(ch)
    calls, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            stub.ListDevices(pb.ListDevicesRequest(), timeout=10)  # raises on any failure
            calls += 1
            time.sleep(0.02)
    finally:
        ch.close()
    return calls, len(ready)


def case_reconnects(convd_bin, pb, pb_grpc):
    aged = Daemon(convd_bin, "--max-connection-age", "1")
    plain = Daemon(convd_bin)
    try:
        calls, n = readies(pb_grpc, pb, aged.target, 3.5)
        calls_p, n_p = readies(pb_grpc, pb, plain.target, 1.5)
        assert n >= 2, f"a channel to a --max-connection-age 1 daemon became READY {n} times in 3.5 s"
        assert n_p == 1, f"a channel to a daemon without the flag became READY {n_p} times"
        return f"{calls} calls in 3.5 s, all ok, the channel READY {n} times (once without the flag)"
    finally:
        aged.stop()
        plain.stop()


def held_call(pb, pb_grpc, target, hold, on_hold=None):
    """A streamed conv whose client holds its input back for `hold` seconds after the spec and
    weights (calling on_hold then); returns (status or None, seconds)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, 16, 16), dtype=np.float32)
    w = rng.standard_normal((3, 2, 3, 3), dtype=np.float32)
    spec = pb.ConvSpec(op=pb.OP_CONV2D, dtype=pb.DTYPE_FLOAT32, groups=1)
    spec.input_shape.d0, spec.input_shape.d1, spec.input_shape.d2, spec.input_shape.d3 = x.shape
    spec.weight_shape.d0, spec.weight_shape.d1, spec.weight_shape.d2, spec.weight_shape.d3 = w.shape
    spec.stride.h = spec.stride.w = spec.dilation.h = spec.dilation.w = 1

    def requests():
        held = False
        for r in conv_requests(pb, spec, x, w, None, 1 << 20):
            if r.WhichOneof("msg") == "input" and not held:
                held = True
                if on_hold:
                    on_hold()
                time.sleep(hold)
            yield r
    t0 = time.monotonic()
    with grpc.insecure_channel(target) as ch:
        try:
            y, _, _ = collect_output(pb_grpc.ConvolutionStub(ch).Conv2d(requests(), timeout=30))
        except grpc.RpcError as e:
            return e.code(), time.monotonic() - t0
    check_close(y, reference_conv2d(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1))
    return None, time.monotonic() - t0


def case_grace(convd_bin, pb, pb_grpc):
    unbounded = Daemon(convd_bin, "--max-connection-age", "1")
    try:
        code, t = held_call(pb, pb_grpc, unbounded.target, 2.5)
        assert code is None, f"a call held 2.5 s past an age of 1 s failed {code} with the grace unbounded"
    finally:
        unbounded.stop()
    graced = Daemon(convd_bin, "--max-connection-age", "1", "--max-connection-age-grace", "1")
    try:
        code2, t2 = held_call(pb, pb_grpc, graced.target, 5)
        assert code2 == grpc.StatusCode.UNAVAILABLE, f"a call held past age 1 s + grace 1 s ended {code2}"
        assert 1.7 <= t2 <= 4.5, f"it ended after {t2:.2f} s (age 1 s + grace 1 s)"
    finally:
        graced.stop()
    return (f"held 2.5 s, unbounded grace: finished correct after {t:.1f} s; "
            f"grace 1 s: UNAVAILABLE after {t2:.1f} s")


def main():
    convd_bin, stub_dir = (os.path.abspath(a) for a in sys.argv[1:3])
    pb, pb_grpc = import_stubs(stub_dir)
    for name, fn in (("--max-connection-age GOAWAY", lambda: case_goaway(convd_bin)),
                     ("--max-connection-age reconnects", lambda: case_reconnects(convd_bin, pb, pb_grpc)),
                     ("--max-connection-age-grace", lambda: case_grace(convd_bin, pb, pb_grpc))):
        t0 = time.monotonic()
        print(f"ok   {name}: {fn()} ({time.monotonic() - t0:.1f} s)", flush=True)
    sys.path.insert(0, HERE)
    from test_python_package import install_package
    with tempfile.TemporaryDirectory(prefix="convd-lb-") as tmp:
        py = install_package(tmp)
        case_package(py, convd_bin, tmp)


if __name__ == "__main__":
    main()
