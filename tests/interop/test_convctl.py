#!/usr/bin/python3
"""convctl for people, against real daemons on loopback: the progress line on a terminal (a pty:
row counts that move, carriage returns, at most ~10 redraws a second, never wider than the
terminal, erased before the result) and none off one; the result line with the client's time,
GB/s and GFLOP/s; --json (one object on stdout, its numbers checked against the files); weights
put/list/delete and conv --weights-id giving the inline weights' output (streamed, unary, --shm,
conv-transpose); float64 and float16 .npy input (with their one-line notes); int32, big-endian
and Fortran-order files refused naming what they hold; UNAVAILABLE asking whether convd runs at
the address; a --unary call too large told to drop --unary; CONVD_SERVER honoured and --server
winning over it; malformed values named with their option; size suffixes; --priority;
--version.

usage: test_convctl.py CONVD_BINARY STUB_DIR GOLDEN_DIR CONVCTL_BINARY"""
import fcntl
import json
import os
import re
import signal
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time

import numpy as np

from convd_harness import Daemon, check_close, load_golden

CONVCTL = None
TMP = None


def env_without_server(**extra):
    env = {k: v for k, v in os.environ.items() if k != "CONVD_SERVER" and not k.startswith("CONVD_TLS")
           and k != "CONVD_TOKEN"}
    env.update(extra)
    return env


def run(*args, env=None, timeout=120):
    """convctl with pipes (so neither stdout nor stderr is a terminal)."""
    return subprocess.run([CONVCTL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else env_without_server())


def run_pty(args, cols=200, timeout=300):
    """convctl with stdout and stderr on one pseudo-terminal of cols columns, as a person runs
    it. Returns (exit status, everything the terminal received, seconds)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    t0 = time.monotonic()
    p = subprocess.Popen([CONVCTL, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                         env=env_without_server())
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child's side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    rc = p.wait(timeout)
    return rc, out.decode(errors="replace"), time.monotonic() - t0


def conv_ref(x, w, b=None, pad=0):
    """conv2d, stride and dilation 1, groups 1, in float64 (a tap at a time: fast enough for
    the large case)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    ho, wo = h - kh + 1, wd - kw + 1
    y = np.zeros((n, co, ho, wo))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("oc,nchw->nohw", w[:, :, i, j].astype(np.float64),
                           x[:, :, i:i + ho, j:j + wo], optimize=True)
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def path(name):
    return os.path.join(TMP, name)


def save(name, a):
    np.save(path(name), a)
    return path(name)


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- cases ---------------------------------------------------------------------------------

def case_progress(slow):
    """A job of a few seconds (the reference kernel, tiled by --device-memory 2M) under a pty."""
    rng = np.random.default_rng(1)
    x = save("big_x.npy", rng.standard_normal((1, 32, 640, 640), dtype=np.float32))
    w = save("big_w.npy", (rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32))
    y = path("big_y.npy")
    rc, out, secs = run_pty(["conv", "--server", slow.target, "--input", x, "--weight", w,
                             "--padding", "1", "--output", y])
    assert rc == 0, f"convctl exited {rc}: {out[-2000:]}"
    # Redraws: "\r" + the line + erase-to-end-of-line; the pty turns "\n" into "\r\n".
    draws = [s for s in out.split("\r") if "rows " in s]
    rows = [int(m) for s in draws for m in re.findall(r"rows (\d+)/640\b", s)]
    assert len(set(rows)) >= 2, f"the progress line did not move: rows seen {sorted(set(rows))}\n{out[-1500:]}"
    assert rows == sorted(rows), f"row counts went backwards: {rows}"
    assert out.count("\r") >= 3, "no carriage returns: the line is not redrawn in place"
    assert len(draws) <= 10 * secs + 3, f"{len(draws)} redraws in {secs:.1f} s: more than ~10 a second"
    assert all(re.search(r"ETA (--|\d+ s|\d+:\d\d), [0-9.]+ MB/s, [0-9.]+ s\x1b\[K$", s) for s in draws), \
        f"a progress line without its ETA, MB/s and time:\n{draws[:3]}"
    # erased before the result, which is the last line: time, GB/s, GFLOP/s
    m = re.search(r"\r\x1b\[K(output 1x32x640x640 written to \S+ in ([0-9.]+) s: ([0-9.]+) GB/s, "
                  r"([0-9.]+) GFLOP/s \(server: .* ops?\))\r\n$", out)
    assert m, f"no erased progress line followed by the result line:\n{out[-600:]!r}"
    t = float(m.group(2))
    assert 0 < t <= secs and float(m.group(3)) > 0 and float(m.group(4)) > 0, m.group(1)
    gb = (2 * 32 * 640 * 640 * 4 + 32 * 32 * 9 * 4) / t / 1e9
    assert abs(float(m.group(3)) - gb) <= 0.002 + 0.01 * gb, f"GB/s {m.group(3)}, expected {gb:.4f}"
    got, xa, wa = np.load(y), np.load(x), np.load(w)
    xp = np.pad(xa, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for r0 in (0, 301, 624):  # three bands of 16 rows, the first and the last among them
        check_close(got[:, :, r0:r0 + 16], conv_ref(xp[:, :, r0:r0 + 18], wa))
    # Not on a terminal: no progress line at all, the result on stdout (a job of ~0.5 s, long
    # enough for a line to be drawn if one were).
    xs = save("mid_x.npy", rng.standard_normal((1, 32, 256, 256), dtype=np.float32))
    r = run("conv", "--server", slow.target, "--input", xs, "--weight", w, "--padding", "1", "--output", y)
    assert r.returncode == 0 and "\r" not in r.stderr and "rows" not in r.stderr, r.stderr[-500:]
    assert "written to" in r.stdout and "GB/s" in r.stdout, r.stdout
    rc, out2, _ = run_pty(["conv", "--server", slow.target, "--input", xs, "--weight", w, "--padding", "1",
                           "--output", y, "--no-progress"])
    assert rc == 0 and "rows " not in out2 and "written to" in out2, out2[-500:]
    # On a narrow terminal the line is cut to fit (a wrapped one could not be redrawn in place).
    cols = 40
    rc, out3, _ = run_pty(["conv", "--server", slow.target, "--input", xs, "--weight", w, "--padding", "1",
                           "--output", y], cols=cols)
    narrow = [s.replace("\x1b[K", "") for s in out3.split("\r") if "rows " in s]
    assert rc == 0 and narrow and re.search(r"rows \d+/256", narrow[-1]), out3[-500:]
    widest = max(len(s) for s in narrow)
    assert widest < cols, f"a progress line of {widest} characters on a {cols}-column terminal"
    return (f"{len(draws)} redraws in {secs:.1f} s, rows {rows[0]}..{rows[-1]} of 640, result: "
            f"{m.group(1)[:90]}...")


def case_json(fast):
    rng = np.random.default_rng(2)
    xa = rng.standard_normal((2, 3, 37, 29)).astype(np.float32)
    wa = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    ba = rng.standard_normal(5).astype(np.float32)
    x, w, b = save("j_x.npy", xa), save("j_w.npy", wa), save("j_b.npy", ba)
    want = conv_ref(xa, wa, ba, pad=1)
    seen = []
    for extra, transport in (([], "stream"), (["--unary"], "unary"), (["--shm"], "shm")):
        y = path(f"j_y_{transport}.npy")
        r = run("conv", "--server", fast.target, "--input", x, "--weight", w, "--bias", b, "--padding", "1",
                "--output", y, "--json", "--priority", "7", *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("\n") == 1 and r.stdout.endswith("}\n"), f"stdout is not one object: {r.stdout!r}"
        j = json.loads(r.stdout)
        out = np.load(y)
        check_close(out, want)
        assert j["transport"] == transport and j["op"] == "conv2d" and j["dtype"] == "float32", j
        assert j["priority"] == 7 and j["has_bias"] is True and j["weights_id"] is None, j
        assert j["input_shape"] == list(xa.shape) and j["weight_shape"] == list(wa.shape), j
        assert j["output_shape"] == list(out.shape), (j["output_shape"], out.shape)
        assert j["input_bytes"] == xa.nbytes and j["weight_bytes"] == wa.nbytes and j["bias_bytes"] == ba.nbytes
        assert j["output_bytes"] == out.nbytes, (j["output_bytes"], out.nbytes)
        assert j["bytes"] == xa.nbytes + wa.nbytes + ba.nbytes + out.nbytes, j
        assert j["seconds"] > 0 and abs(j["gb_per_s"] - j["bytes"] / j["seconds"] / 1e9) <= 1e-6 * j["gb_per_s"], j
        flops = 2 * out.size * 3 * 3 * 3  # 2 * N*C_out*H_out*W_out * C_in/groups*kH*kW
        assert j["flops"] == flops, (j["flops"], flops)
        assert abs(j["gflop_per_s"] - flops / j["seconds"] / 1e9) <= 1e-6 * j["gflop_per_s"], j
        s = j["server"]
        assert j["ops"] == s["ops_run"] >= 1, j
        if transport != "unary":  # a unary answer does not say how many ops the plan had
            assert j["elemental_ops"] == j["ops"] and j["upload_seconds"] <= j["seconds"], j
        assert s["bytes_received"] == xa.nbytes + wa.nbytes + ba.nbytes and s["bytes_sent"] == out.nbytes, s
        assert s["elapsed_seconds"] >= 0 and s["compute_seconds"] >= 0, s
        seen.append(f"{transport} {j['seconds'] * 1e3:.1f} ms")
    return "; ".join(seen) + " (all fields checked against the files)"


def case_weights(fast, golden):
    rng = np.random.default_rng(3)
    xa = rng.standard_normal((1, 4, 19, 23)).astype(np.float32)
    wa = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    ba = rng.standard_normal(6).astype(np.float32)
    x, w, b = save("w_x.npy", xa), save("w_w.npy", wa), save("w_b.npy", ba)
    t = fast.target
    r = run("weights", "put", "--server", t, "--weight", w, "--bias", b)
    assert r.returncode == 0, r.stderr
    wid = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", wid), f"weights put printed {r.stdout!r}"
    r = run("weights", "put", "--server", t, "--weight", w, "--bias", b, "--json")
    j = json.loads(r.stdout)
    assert r.returncode == 0 and j["weights_id"] == wid and j["already_present"] is True, r.stdout
    assert j["shape"] == [6, 4, 3, 3] and j["has_bias"] is True, j
    r = run("weights", "list", "--server", t, "--json")
    listed = {e["weights_id"]: e for e in json.loads(r.stdout)["weights"]}
    assert wid in listed and listed[wid]["shape"] == [6, 4, 3, 3] and listed[wid]["has_bias"], r.stdout
    r = run("weights", "list", "--server", t)
    assert r.returncode == 0 and wid in r.stdout and "6x4x3x3" in r.stdout, r.stdout
    inline = path("w_inline.npy")
    r = run("conv", "--server", t, "--input", x, "--weight", w, "--bias", b, "--padding", "1", "--output", inline)
    assert r.returncode == 0, r.stderr
    ref = np.load(inline)
    check_close(ref, conv_ref(xa, wa, ba, pad=1))
    for extra in ([], ["--unary"], ["--shm"]):
        y = path("w_byid.npy")
        r = run("conv", "--server", t, "--input", x, "--weights-id", wid, "--padding", "1", "--output", y, *extra)
        assert r.returncode == 0, f"{extra}: {r.stderr}"
        assert np.array_equal(np.load(y), ref), f"--weights-id {extra} differs from the inline weights"
    r = run("conv", "--server", t, "--input", x, "--weights-id", wid, "--padding", "1", "--output", path("j.npy"),
            "--json")
    j = json.loads(r.stdout)
    assert j["weights_id"] == wid and j["weight_bytes"] == 0 and j["bias_bytes"] == 0 and j["has_bias"], j
    assert j["bytes"] == xa.nbytes + ref.nbytes and j["server"]["bytes_received"] == xa.nbytes, j
    # conv-transpose weights, in their own layout
    tcase = next((c for c in load_golden(golden) if c[1]["op"] == "conv_transpose2d" and "bias" in c[2]), None)
    assert tcase, "no conv_transpose2d golden case with a bias"
    name, p, arrays = tcase
    d = os.path.join(golden, name)
    common = ["--server", t, "--input", os.path.join(d, "input.npy"), "--stride", "%d,%d" % tuple(p["stride"]),
              "--padding", ",".join(map(str, p["padding"])), "--dilation", "%d,%d" % tuple(p["dilation"]),
              "--groups", str(p["groups"][0]), "--output-padding", "%d,%d" % tuple(p["output_padding"])]
    r = run("weights", "put", "--server", t, "--weight", os.path.join(d, "weight.npy"), "--bias",
            os.path.join(d, "bias.npy"), "--op", "conv-transpose", "--groups", str(p["groups"][0]))
    assert r.returncode == 0, r.stderr
    tid = r.stdout.strip()
    r = run("conv-transpose", *common, "--weights-id", tid, "--output", path("t_byid.npy"))
    assert r.returncode == 0, r.stderr
    check_close(np.load(path("t_byid.npy")), arrays["expected"])
    # delete, and what a deleted id gets
    for i in (wid, tid):
        r = run("weights", "delete", "--server", t, i)
        assert r.returncode == 0 and i in r.stdout, r.stderr
    r = run("weights", "list", "--server", t, "--json")
    assert wid not in r.stdout and tid not in r.stdout, r.stdout
    r = run("weights", "delete", "--server", t, wid)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr
    r = run("conv", "--server", t, "--input", x, "--weights-id", wid, "--padding", "1", "--output", path("gone.npy"))
    assert r.returncode == 1 and "no such weights" in r.stderr and "weights list" in r.stderr, r.stderr
    assert not os.path.exists(path("gone.npy"))
    r = run("conv", "--server", t, "--input", x, "--weights-id", wid, "--weight", w, "--output", path("gone.npy"))
    assert r.returncode == 2 and "--weights-id" in r.stderr, r.stderr
    return f"put {wid[:8]}... twice (same id), listed, conv by id == inline (stream, unary, shm), transpose, deleted"


def case_dtypes(fast):
    rng = np.random.default_rng(4)
    x64 = rng.standard_normal((2, 3, 21, 18))
    w64 = rng.standard_normal((4, 3, 3, 3))
    b64 = rng.standard_normal(4)
    x32, w32, b32 = (save(f"d_{k}32.npy", a.astype(np.float32)) for k, a in (("x", x64), ("w", w64), ("b", b64)))
    x6, w6, b6 = (save(f"d_{k}64.npy", a) for k, a in (("x", x64), ("w", w64), ("b", b64)))
    t = fast.target
    base = path("d_y32.npy")
    r = run("conv", "--server", t, "--input", x32, "--weight", w32, "--bias", b32, "--output", base)
    assert r.returncode == 0, r.stderr
    want = np.load(base)
    for extra in ([], ["--unary"], ["--shm"], ["--chunk-bytes", "1001"]):
        y = path("d_y64.npy")
        r = run("conv", "--server", t, "--input", x6, "--weight", w6, "--bias", b6, "--output", y, *extra)
        assert r.returncode == 0, f"float64 {extra}: {r.stderr}"
        notes = [ln for ln in r.stderr.splitlines() if "note:" in ln]
        assert len(notes) == 1 and "float64" in notes[0] and "converted to float32" in notes[0] \
            and all(os.path.basename(f) in notes[0] for f in (x6, w6, b6)), r.stderr
        assert np.array_equal(np.load(y), want), f"float64 input {extra}: not the float32 result"
    # float16 input: a float16 call, as --dtype float16 makes of the same values in float32
    x16 = save("d_x16.npy", x64.astype(np.float16))
    xr = save("d_x16as32.npy", x64.astype(np.float16).astype(np.float32))
    r = run("conv", "--server", t, "--input", xr, "--weight", w32, "--output", base, "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    want16 = np.load(base)
    for extra in ([], ["--shm"]):
        y = path("d_y16.npy")
        r = run("conv", "--server", t, "--input", x16, "--weight", w32, "--output", y, *extra)
        assert r.returncode == 0, r.stderr
        assert "note:" in r.stderr and "float16" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        got = np.load(y)
        assert got.dtype == np.float32 and np.array_equal(got, want16), f"float16 input {extra}"
    # --dtype float32 on float16 input: widened exactly, read band by band
    r = run("conv", "--server", t, "--input", x16, "--weight", w32, "--output", path("d_y16f.npy"),
            "--dtype", "float32", "--chunk-bytes", "999")
    assert r.returncode == 0, r.stderr
    r = run("conv", "--server", t, "--input", xr, "--weight", w32, "--output", base)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(path("d_y16f.npy")), np.load(base))
    # refused, each naming what the file holds
    refused = {"int32": (x64.astype(np.int32), ["int32", "'<i4'", "astype(numpy.float32)"]),
               "big-endian": (x64.astype(">f4"), ["big-endian", "'>f4'", "astype('<f4')"]),
               "fortran": (np.asfortranarray(x64.astype(np.float32)), ["Fortran order", "ascontiguousarray"])}
    for what, (a, words) in refused.items():
        f = save(f"d_bad_{what}.npy", a)
        r = run("conv", "--server", t, "--input", f, "--weight", w32, "--output", path("d_bad.npy"))
        assert r.returncode == 2, f"{what}: exit {r.returncode}: {r.stderr}"
        assert all(wd in r.stderr for wd in words) and f in r.stderr, f"{what}: {r.stderr}"
        # the old message printed the header's next 8 bytes as the dtype: "dtype '<i4', ' is ..."
        assert not re.search(r"dtype '[<>|]..', '", r.stderr), f"{what}: garbled: {r.stderr}"
        assert not os.path.exists(path("d_bad.npy"))
    return "float64 (4 paths) == float32 with one note; float16 == --dtype float16; int32, big-endian, Fortran refused"


def case_errors(fast):
    rng = np.random.default_rng(5)
    x = save("e_x.npy", rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    w = save("e_w.npy", rng.standard_normal((2, 3, 3, 3)).astype(np.float32))
    # UNAVAILABLE: the address, and where it came from
    port = closed_port()
    r = run("devices", "--server", f"127.0.0.1:{port}", "--timeout", "10")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr, r.stderr
    assert f"is convd running at 127.0.0.1:{port}? (from --server)" in r.stderr, r.stderr
    r = run("conv", "--input", x, "--weight", w, "--output", path("e_y.npy"), "--timeout", "10",
            env=env_without_server(CONVD_SERVER=f"127.0.0.1:{port}"))
    assert r.returncode == 1 and f"is convd running at 127.0.0.1:{port}? (from $CONVD_SERVER)" in r.stderr, r.stderr
    assert not os.path.exists(path("e_y.npy"))
    with socket.socket() as s:
        default_free = s.connect_ex(("127.0.0.1", 50051)) != 0
    if default_free:  # nothing of anyone's listens on the default port here
        r = run("health", "--timeout", "10")
        assert r.returncode == 1 and "is convd running at 127.0.0.1:50051? (the default address" in r.stderr, r.stderr
    # CONVD_SERVER honoured; --server wins over it
    r = run("health", env=env_without_server(CONVD_SERVER=fast.target))
    assert r.returncode == 0 and "SERVING" in r.stdout, r.stderr
    r = run("conv", "--input", x, "--weight", w, "--output", path("e_y.npy"),
            env=env_without_server(CONVD_SERVER=fast.target))
    assert r.returncode == 0 and "written to" in r.stdout, r.stderr
    r = run("devices", "--server", fast.target, env=env_without_server(CONVD_SERVER=f"127.0.0.1:{port}"))
    assert r.returncode == 0 and "cpu0" in r.stdout, r.stderr
    # a --unary call too large for one message
    big = save("e_big.npy", np.zeros((1, 16, 256, 260), np.float32))  # > 4 MiB
    r = run("conv", "--server", fast.target, "--input", big, "--weight", save("e_w16.npy", np.zeros((1, 16, 1, 1), np.float32)),
            "--output", path("e_big_y.npy"), "--unary")
    assert r.returncode == 1 and "drop --unary" in r.stderr, r.stderr
    assert not os.path.exists(path("e_big_y.npy"))
    # malformed values, each named with its option
    bad = [(["--stride", "1,x"], "--stride 1,x:"), (["--padding", "1,2,3"], "--padding 1,2,3:"),
           (["--dilation", "0.5"], "--dilation 0.5:"), (["--groups", "0"], "--groups 0:"),
           (["--chunk-bytes", "4Q"], "--chunk-bytes 4Q:"), (["--timeout", "soon"], "--timeout soon:"),
           (["--priority", "high"], "--priority high:"), (["--dtype", "f8"], "--dtype f8:"),
           (["--chunk-bytes", "8M"], "--chunk-bytes 8M:")]
    for extra, words in bad:
        r = run("conv", "--server", fast.target, "--input", x, "--weight", w, "--output", path("e_y2.npy"), *extra)
        assert r.returncode == 2 and words in r.stderr, f"{extra}: exit {r.returncode}: {r.stderr}"
    r = run("plan", "--input", "1,64,64,64", "--weight", "64,64,3,3", "--device-memory", "40Q")
    assert r.returncode == 2 and "--device-memory 40Q:" in r.stderr, r.stderr
    r = run("plan", "--input", "1,64,64", "--weight", "64,64,3,3")
    assert r.returncode == 2 and "--input 1,64,64:" in r.stderr, r.stderr
    # size suffixes where sizes are taken
    r = run("plan", "--input", "1,64,64,64", "--weight", "64,64,3,3", "--device-memory", "40K")
    assert r.returncode == 0 and "device memory: 40960 bytes" in r.stdout, r.stdout + r.stderr
    r = run("conv", "--server", fast.target, "--input", x, "--weight", w, "--output", path("e_y3.npy"),
            "--chunk-bytes", "1K")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(path("e_y3.npy")), np.load(path("e_y.npy")))
    # --version
    r = run("--version")
    assert r.returncode == 0 and re.fullmatch(r"convctl \d+\.\d+\.\d+\n", r.stdout), r.stdout
    return "UNAVAILABLE (--server, $CONVD_SERVER" + (", default" if default_free else "") + \
        "), CONVD_SERVER, --unary too large, 11 malformed values named, K suffixes, --version"


def case_interrupt(slow):
    """SIGINT during a streamed conv: the call is cancelled on the daemon (its log says CANCELLED),
    convctl exits 130 and leaves no output and no partial file."""
    rng = np.random.default_rng(2)
    x = save("int_x.npy", rng.standard_normal((1, 32, 640, 640), dtype=np.float32))
    w = save("int_w.npy", (rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32))
    y = path("int_y.npy")
    p = subprocess.Popen([CONVCTL, "conv", "--server", slow.target, "--input", x, "--weight", w,
                          "--padding", "1", "--output", y], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert p.poll() is None, f"the job ended within 1 s: {p.communicate()}"
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == 130, f"exit {p.returncode}: {err}"
    assert "interrupted" in err, err
    left = [n for n in os.listdir(TMP) if n.startswith("int_y")]
    assert not left, f"left behind: {left}"
    deadline = time.monotonic() + 10
    while "status=CANCELLED" not in slow.read_log():
        assert time.monotonic() < deadline, "the daemon did not log the call as CANCELLED"
        time.sleep(0.05)
    return f"exit 130 {took:.2f} s after SIGINT, nothing left, the daemon's call CANCELLED"


def main():
    global CONVCTL, TMP
    convd, _stub_dir, golden, CONVCTL = sys.argv[1:5]
    TMP = tempfile.mkdtemp(prefix="convd-convctl-")
    fast = Daemon(convd)
    slow = Daemon(convd, "--cpu-kernel", "reference", "--device-memory", "2M")
    try:
        cases = [("progress on a terminal", lambda: case_progress(slow)),
                 ("--json", lambda: case_json(fast)),
                 ("weights put/list/delete, --weights-id", lambda: case_weights(fast, golden)),
                 ("float64, float16 and refused .npy", lambda: case_dtypes(fast)),
                 ("errors, CONVD_SERVER, sizes, --version", lambda: case_errors(fast)),
                 ("SIGINT mid-call", lambda: case_interrupt(slow))]
        for name, fn in cases:
            t0 = time.monotonic()
            what = fn()
            print(f"ok   {name} ({time.monotonic() - t0:.1f} s): {what}", flush=True)
    finally:
        for d in (fast, slow):
            if d.alive():
                d.stop()
        shutil.rmtree(TMP, ignore_errors=True)
    print(f"convctl: {len(cases)} cases passed")


if __name__ == "__main__":
    main()
