"""Shared pieces of the Python tests: start/stop a convd on loopback, the golden cases, and a
ConvRequest stream cut from NumPy arrays the way the contract describes (row bands, pieces)."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


class Daemon:
    """A convd on 127.0.0.1 with port 0 (and whatever more --listen addresses extra gives: their
    `convd listening on` lines, one per address after the first, are in self.addresses);
    stop() asserts a clean exit and a clean log. env: the daemon's environment (default this
    process's)."""

    def __init__(self, binary, *extra, env=None):
        self.log = tempfile.NamedTemporaryFile(prefix="convd-py-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--log-level", "info", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.match(r"convd listening on (\S+):(\d+)$", line.strip())
        if not m:
            self.proc.kill()
            raise RuntimeError(f"convd did not report its port: {line!r}\n{self.read_log()}")
        self.target = f"127.0.0.1:{m.group(2)}"
        self.addresses = [self.target]
        for _ in range(sum(a == "--listen" or a.startswith("--listen=") for a in extra)):
            line = self.proc.stdout.readline()
            m = re.match(r"convd listening on (\S+)$", line.strip())
            if not m:
                self.proc.kill()
                raise RuntimeError(f"convd did not report its next address: {line!r}\n{self.read_log()}")
            self.addresses.append(m.group(1))
        self.metrics_url = None
        if "--metrics-listen" in extra:
            line = self.proc.stdout.readline()
            m = re.match(r"convd metrics on (http://\S+)$", line.strip())
            if not m:
                self.proc.kill()
                raise RuntimeError(f"convd did not report its metrics address: {line!r}")
            self.metrics_url = m.group(1)

    def read_log(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"convd did not exit within {timeout} s of SIGTERM")
        log = self.read_log()
        if "Sanitizer" in log or "runtime error" in log:
            raise AssertionError(f"sanitizer report in the daemon's log:\n{log}")
        if rc != 0:
            raise AssertionError(f"convd exited with {rc}:\n{log}")
        os.unlink(self.log.name)


def load_golden(root):
    """Yields (name, params dict, arrays dict) for each case. Raises when root holds no case, so
    that a golden-driven test never passes having compared nothing."""
    names = [n for n in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, n, "params.txt"))]
    if not names:
        raise AssertionError(f"no golden case under {root} (no subdirectory with a params.txt)")
    for name in names:
        d = os.path.join(root, name)
        params = {}
        with open(os.path.join(d, "params.txt")) as f:
            for line in f:
                k, *v = line.split()
                params[k] = v[0] if k == "op" else [int(x) for x in v]
        arrays = {k: np.load(os.path.join(d, k + ".npy"))
                  for k in ("input", "weight", "bias", "expected")
                  if os.path.exists(os.path.join(d, k + ".npy"))}
        yield name, params, arrays


def check_close(got, want):
    """The golden tolerance: max|got - want| <= 1e-4 * max(1, max|want|). Returns the worst error."""
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    err = np.abs(got.astype(np.float64) - want)
    worst = float(np.nanmax(err)) if err.size else 0.0
    assert not np.isnan(err).any() and worst <= tol, f"max error {worst} > tolerance {tol}"
    return worst


def reference_conv2d(x, w, b, stride, padding, dilation, groups):
    """conv2d in float64 with numpy, written for clarity (tests only)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    top, bottom, left, right = padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, co, ho, wo))
    og = co // groups
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            win = x[:, :, r0:r0 + stride[0] * (ho - 1) + 1:stride[0], c0:c0 + stride[1] * (wo - 1) + 1:stride[1]]
            for g in range(groups):
                y[:, g * og:(g + 1) * og] += np.einsum(
                    "nchw,oc->nohw", win[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def spec_from_params(pb, params, has_bias):
    transposed = params.get("op") == "conv_transpose2d"
    s = pb.ConvSpec(op=pb.OP_CONV_TRANSPOSE2D if transposed else pb.OP_CONV2D, dtype=pb.DTYPE_FLOAT32,
                    has_bias=has_bias, groups=params["groups"][0])
    if transposed:
        s.output_padding.h, s.output_padding.w = params.get("output_padding", [0, 0])
    s.input_shape.d0, s.input_shape.d1, s.input_shape.d2, s.input_shape.d3 = params["input"]
    s.weight_shape.d0, s.weight_shape.d1, s.weight_shape.d2, s.weight_shape.d3 = params["weight"]
    s.stride.h, s.stride.w = params["stride"]
    s.dilation.h, s.dilation.w = params["dilation"]
    s.padding.top, s.padding.bottom, s.padding.left, s.padding.right = params["padding"]
    return s


def conv_requests(pb, spec, x, w, b, chunk, dtype="<f4"):
    """The client stream: spec, weight and bias chunks, input row bands in pieces <= chunk."""
    yield pb.ConvRequest(spec=spec)
    for name, t in (("weight", w), ("bias", b)):
        if t is None:
            continue
        data = np.ascontiguousarray(t, dtype=dtype).tobytes()
        for off in range(0, len(data), chunk):
            yield pb.ConvRequest(**{name: pb.TensorChunk(offset=off, data=data[off:off + chunk])})
    n_, c_, h_, w_ = x.shape
    rows = max(1, chunk // (c_ * w_ * np.dtype(dtype).itemsize))
    for n in range(n_):
        for h0 in range(0, h_, rows):
            h1 = min(h_, h0 + rows)
            band = np.ascontiguousarray(x[n, :, h0:h1, :], dtype=dtype).tobytes()
            for off in range(0, len(band), chunk):
                yield pb.ConvRequest(input=pb.RowBand(n=n, h_begin=h0, h_end=h1, offset=off,
                                                      data=band[off:off + chunk]))


def collect_output(responses, dtype="<f4"):
    """Assembles the server stream into (output array, accepted, summary)."""
    y = accepted = summary = None
    pending = {}
    for r in responses:
        kind = r.WhichOneof("msg")
        if kind == "accepted":
            accepted = r.accepted
            s = r.accepted.output_shape
            y = np.full((s.d0, s.d1, s.d2, s.d3), np.nan, dtype=np.float32)
        elif kind == "output":
            o = r.output
            key = (o.n, o.h_begin, o.h_end)
            buf = pending.setdefault(key, bytearray())
            assert o.offset == len(buf), f"band {key} piece at {o.offset}, expected {len(buf)}"
            buf += o.data
            c, width = y.shape[1], y.shape[3]
            if len(buf) == c * (o.h_end - o.h_begin) * width * np.dtype(dtype).itemsize:
                y[o.n, :, o.h_begin:o.h_end, :] = np.frombuffer(bytes(buf), dtype).reshape(
                    c, o.h_end - o.h_begin, width)
                del pending[key]
        elif kind == "summary":
            summary = r.summary
    assert not pending, f"incomplete output bands: {list(pending)}"
    return y, accepted, summary


def method_path(pb, method):
    """The path of a convd.v1 Convolution method, from the generated descriptor (the daemon's method table and
    the .proto are the only places that spell paths out)."""
    return f"/{pb.DESCRIPTOR.services_by_name['Convolution'].full_name}/{method}"


def import_stubs(stub_dir):
    sys.path.insert(0, stub_dir)
    from convd.v1 import convd_pb2, convd_pb2_grpc  # noqa: E402
    return convd_pb2, convd_pb2_grpc
