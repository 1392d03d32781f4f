#!/usr/bin/python3
"""Shared-memory tensors (RegisterRegion, spec.*_region): every golden case and 40 random shapes
through regions (input only, output only, both, weights too), equal to the reference; the
region rules answered with clear statuses (names, unknown regions, bounds, lengths, overlap,
chunks beside a region, unregister while in use, --max-shm-bytes, tenants and their limit); and
a client that shrinks its object mid-call gets DATA_LOSS while the daemon keeps serving.

usage: test_shm.py CONVD_BINARY STUB_DIR GOLDEN_DIR"""
import ctypes
import fcntl
import mmap
import os
import secrets
import socket
import sys
import threading
import time
from multiprocessing import shared_memory

import grpc
import numpy as np

from convd_harness import Daemon, check_close, collect_output, conv_requests, import_stubs, \
    load_golden, reference_conv2d, spec_from_params

pb = pb_grpc = None
MiB = 1 << 20


def memfd(size, seals=None, allocate=True):
    """A memfd of size bytes (its pages allocated unless allocate is False), sealed against
    shrinking unless seals says otherwise."""
    fd = os.memfd_create("convd-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if allocate and size:
        os.posix_fallocate(fd, 0, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK if seals is None else seals)
    return fd


def pass_fds(sock_path, fds, data=b"convd-region/1"):
    """One message to the daemon's descriptor socket; its answer, as text. A connection closed
    unanswered (the daemon at its connection bound) is tried again, for up to 5 s."""
    for attempt in range(50):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(sock_path)
            try:
                socket.send_fds(s, [data], fds)
                ans = s.recv(1024).decode()
            except (ConnectionResetError, BrokenPipeError):
                ans = ""
        if ans:
            return ans
        time.sleep(0.1)
    raise AssertionError("the descriptor socket closed every connection unanswered for 5 s")


def ticket_of(sock_path, fd):
    ans = pass_fds(sock_path, [fd])
    assert ans.startswith("ok ") and ans.endswith("\n"), ans
    return ans.split()[1]


class Buf:
    """The region's bytes, as SharedMemory exposes them (buf, size)."""

    def __init__(self, fd, size):
        self.buf, self.size, self._fd = mmap.mmap(fd, size), size, fd


class Region:
    """A POSIX shared-memory object of this client's, registered with the daemon; or, with
    fd_socket (the daemon's descriptor socket), a sealed memfd passed over it, which the daemon
    uses in place."""

    def __init__(self, stub, size, prefix="/convd-", register=True, md=None, fd_socket=None):
        self.name = f"{prefix}test-{secrets.token_hex(6)}"
        self.stub, self.md, self.memfd = stub, md, fd_socket is not None
        if self.memfd:
            fd = memfd(size)
            self.shm = Buf(fd, size)
            t = ticket_of(fd_socket, fd)
            resp = stub.RegisterRegion(pb.RegisterRegionRequest(name=self.name, fd_ticket=t), timeout=10, metadata=md)
            assert resp.in_place and resp.size == size, resp
            return
        self.shm = shared_memory.SharedMemory(name=self.name[1:], create=True, size=size)
        if register:
            stub.RegisterRegion(pb.RegisterRegionRequest(name=self.name), timeout=10, metadata=md)

    def array(self, offset, shape, dtype="<f4"):
        count = int(np.prod(shape))
        return np.ndarray(shape, dtype=dtype, buffer=self.shm.buf, offset=offset)[...] if count else None

    def put(self, offset, a, dtype="<f4"):
        b = np.ascontiguousarray(a, dtype=dtype)
        self.shm.buf[offset:offset + b.nbytes] = b.tobytes()
        return pb.RegionRef(region=self.name, offset=offset, length=b.nbytes)

    def close(self, unregister=True):
        if unregister:
            self.stub.UnregisterRegion(pb.UnregisterRegionRequest(name=self.name), timeout=10, metadata=self.md)
        if self.memfd:
            self.shm.buf.close()
            os.close(self.shm._fd)
            return
        self.shm.close()
        self.shm.unlink()


def shm_call(stub, spec, x, w, b, mode, region, md=None, unary=False):
    """One Conv2d (Conv2dUnary when unary) with the tensors `mode` names in the region (i:
    input, o: output, w: weights and bias); the rest streamed (in the message). Returns the
    output."""
    out_shape = None
    off = 0
    reqs_x, reqs_w, reqs_b = x, w, b
    if "i" in mode:
        spec.input_region.CopyFrom(region.put(off, x))
        off += x.nbytes
        reqs_x = None
    if "w" in mode:
        spec.weight_region.CopyFrom(region.put(off, w))
        off += w.nbytes
        reqs_w = None
        if b is not None:
            spec.bias_region.CopyFrom(region.put(off, b))
            off += b.nbytes
            reqs_b = None
    out_off = (off + 63) // 64 * 64
    if "o" in mode:
        out_bytes = region.shm.size - out_off
        spec.output_region.CopyFrom(pb.RegionRef(region=region.name, offset=out_off, length=0))

    def requests():
        yield pb.ConvRequest(spec=spec)
        for name, t in (("weight", reqs_w), ("bias", reqs_b)):
            if t is not None:
                data = np.ascontiguousarray(t, dtype="<f4").tobytes()
                for o in range(0, len(data), MiB):
                    yield pb.ConvRequest(**{name: pb.TensorChunk(offset=o, data=data[o:o + MiB])})
        if reqs_x is not None:
            for r in conv_requests(pb, spec, reqs_x, None, None, MiB):
                if r.WhichOneof("msg") == "input":
                    yield r

    if "o" in mode:
        # The output's length is the output tensor's: from a dry spec check would be neater;
        # the accepted message gives it, but the spec goes first, so compute it here.
        out_shape = expected_shape(spec)
        n_out = int(np.prod(out_shape)) * 4
        assert n_out <= out_bytes, "region too small for the output"
        spec.output_region.length = n_out
        region.shm.buf[out_off:out_off + n_out] = np.full(n_out // 4, np.nan, np.float32).tobytes()  # poison
    if unary:
        f32 = lambda t: b"" if t is None else np.ascontiguousarray(t, dtype="<f4").tobytes()
        res = stub.Conv2dUnary(pb.ConvCall(spec=spec, input=f32(reqs_x), weight=f32(reqs_w), bias=f32(reqs_b)),
                               timeout=120, metadata=md)
        if "o" in mode:
            assert len(res.output) == 0, "output bytes came back for an output region"
            return region.array(out_off, out_shape).copy()
        s_ = res.output_shape
        return np.frombuffer(res.output, "<f4").reshape(s_.d0, s_.d1, s_.d2, s_.d3)
    responses = list(stub.Conv2d(requests(), timeout=120, metadata=md))
    kinds = [r.WhichOneof("msg") for r in responses]
    if "o" in mode:
        assert "output" not in kinds, "output bands came back for an output region"
        prog = [r.progress for r in responses if r.WhichOneof("msg") == "progress"]
        assert prog and prog[-1].rows_done == prog[-1].rows_total == out_shape[0] * out_shape[2], prog[-1:]
        assert all(a.rows_done <= b.rows_done for a, b in zip(prog, prog[1:])), "progress went back"
        assert kinds[-1] == "summary", kinds[-3:]
        return region.array(out_off, out_shape).copy()
    y, _, _ = collect_output(iter(responses))
    return y


def expected_shape(spec):
    n, c, h, w = (spec.input_shape.d0, spec.input_shape.d1, spec.input_shape.d2, spec.input_shape.d3)
    co, _, kh, kw = (spec.weight_shape.d0, spec.weight_shape.d1, spec.weight_shape.d2, spec.weight_shape.d3)
    sh, sw = spec.stride.h or 1, spec.stride.w or 1
    dh, dw = spec.dilation.h or 1, spec.dilation.w or 1
    p = spec.padding
    if spec.op == pb.OP_CONV_TRANSPOSE2D:
        co = spec.weight_shape.d1 * (spec.groups or 1)
        oh = (h - 1) * sh + dh * (kh - 1) + 1 + spec.output_padding.h - p.top - p.bottom
        ow = (w - 1) * sw + dw * (kw - 1) + 1 + spec.output_padding.w - p.left - p.right
    else:
        oh = (h + p.top + p.bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (w + p.left + p.right - dw * (kw - 1) - 1) // sw + 1
    return (n, co, oh, ow)


MODES = ("io", "i", "o", "iow", "ow")


def case_golden(stub, golden, unary=False, fd_socket=None):
    count, worst = 0, 0.0
    for i, (name, params, a) in enumerate(load_golden(golden)):
        mode = MODES[(i + unary) % len(MODES)]
        b = a.get("bias")
        spec = spec_from_params(pb, params, b is not None)
        size = 2 * (a["input"].nbytes + a["weight"].nbytes + (b.nbytes if b is not None else 0)) + \
            int(np.prod(a["expected"].shape)) * 4 + 4096
        r = Region(stub, size, fd_socket=fd_socket)
        try:
            y = shm_call(stub, spec, a["input"], a["weight"], b, mode, r, unary=unary)
            worst = max(worst, check_close(y, a["expected"]))
        except AssertionError as e:
            raise AssertionError(f"golden case {name} ({mode}{', unary' if unary else ''}): {e}")
        finally:
            r.close()
        count += 1
    return f"{count} golden cases{' through Conv2dUnary' if unary else ''}, modes {'/'.join(MODES)}, max error {worst:.2e}"


def case_unary_large(stub, fd_socket=None):
    """Conv2dUnary with input and output in a region: 16 MiB each way, four times the message
    limit, served through the window."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 16, 512, 512), dtype=np.float32)
    w = rng.standard_normal((16, 16, 1, 1), dtype=np.float32)
    spec = spec_from_params(pb, {"input": list(x.shape), "weight": list(w.shape), "stride": [1, 1],
                                 "dilation": [1, 1], "padding": [0, 0, 0, 0], "groups": [1]}, False)
    r = Region(stub, 2 * x.nbytes + 4096, fd_socket=fd_socket)
    try:
        y = shm_call(stub, spec, x, w, None, "io", r, unary=True)
        want = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x.astype(np.float64))
        return f"16 MiB in, 16 MiB out, max error {check_close(y, want):.2e}"
    finally:
        r.close()


def case_random(stub, fd_socket=None):
    rng = np.random.default_rng(0x5A11)
    worst = 0.0
    for i in range(40):
        groups = int(rng.choice([1, 1, 2, 3]))
        cg, og = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        sh, sw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        pad = [int(v) for v in rng.integers(0, 3, 4)]
        n = int(rng.integers(1, 3))
        h = int(rng.integers(dh * (kh - 1) + 1, 40))
        w_ = int(rng.integers(dw * (kw - 1) + 1, 40))
        x = rng.standard_normal((n, cg * groups, h, w_), dtype=np.float32)
        wt = rng.standard_normal((og * groups, cg, kh, kw), dtype=np.float32)
        b = rng.standard_normal(og * groups, dtype=np.float32) if rng.integers(0, 2) else None
        params = {"input": list(x.shape), "weight": list(wt.shape), "stride": [sh, sw],
                  "dilation": [dh, dw], "padding": pad, "groups": [groups]}
        spec = spec_from_params(pb, params, b is not None)
        want = reference_conv2d(x, wt, b, (sh, sw), pad, (dh, dw), groups)
        mode = MODES[i % len(MODES)]
        r = Region(stub, 2 * (x.nbytes + wt.nbytes + 4096) + want.size * 4, fd_socket=fd_socket)
        try:
            y = shm_call(stub, spec, x, wt, b, mode, r)
            worst = max(worst, check_close(y, want))
        except AssertionError as e:
            raise AssertionError(f"random shape {i} {params} ({mode}): {e}")
        finally:
            r.close()
    return f"40 random shapes, max error {worst:.2e}"


def expect(fn, code, words, what):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"{what}: {e.code()} {e.details()!r}, expected {code}"
        assert words in e.details(), f"{what}: {e.details()!r} lacks {words!r}"
        return e.details()
    raise AssertionError(f"{what}: succeeded; expected {code}")


def small_spec(x_shape=(1, 2, 8, 8), w_shape=(3, 2, 3, 3)):
    return spec_from_params(pb, {"input": list(x_shape), "weight": list(w_shape), "stride": [1, 1],
                                 "dilation": [1, 1], "padding": [1, 1, 1, 1], "groups": [1]}, False)


def case_bad_input(stub):
    reg = lambda name, size=0: stub.RegisterRegion(pb.RegisterRegionRequest(name=name, size=size), timeout=10)
    IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    lst = stub.ListRegions(pb.ListRegionsRequest(), timeout=10)
    assert lst.name_prefix == "/convd-", lst.name_prefix
    checked = 0
    for name, words in (("convd-x", "expected \"/\""), ("/convd-a/b", "no path separators"),
                        ("/../etc/passwd", "no path separators"), ("/..", "not an object's name"),
                        ("/other-program", "must start with"), ("/convd-", "must start with"),
                        ("/convd-" + "x" * 300, "expected \"/\""), ("/convd-a\nb", "not one of"),
                        ("/convd-never-created-" + secrets.token_hex(4), "no shared-memory object")):
        expect(lambda: reg(name), NF if "never" in name else IA, words, f"register {name[:30]!r}")
        checked += 1
    r = Region(stub, 64 * 1024)
    try:
        expect(lambda: reg(r.name), IA, "registered already", "registering twice")
        r2 = Region(stub, 4096, register=False)
        expect(lambda: reg(r2.name, 8192), IA, "fewer than the 8192", "size beyond the object")
        r2.close(unregister=False)
        x = np.ones((1, 2, 8, 8), np.float32)
        w = np.ones((3, 2, 3, 3), np.float32)

        def call(spec, with_x=False, with_w=True):
            def reqs():
                yield pb.ConvRequest(spec=spec)
                if with_w:
                    yield pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))
                if with_x:
                    yield pb.ConvRequest(input=pb.RowBand(n=0, h_begin=0, h_end=8, data=x.tobytes()))
            return list(stub.Conv2d(reqs(), timeout=30))

        ref = lambda off, length, name=None: pb.RegionRef(region=name or r.name, offset=off, length=length)
        cases = [
            ("unknown region", dict(input_region=ref(0, x.nbytes, "/convd-nope")), NF, "no region /convd-nope"),
            ("offset beyond", dict(input_region=ref(64 * 1024 - 8, x.nbytes)), IA, "leave region"),
            ("huge offset", dict(input_region=ref(2 ** 64 - 8, x.nbytes)), IA, "leave region"),
            ("length not the tensor's", dict(input_region=ref(0, 100)), IA, "length = 100"),
            ("output over the input", dict(input_region=ref(0, x.nbytes), output_region=ref(256, 3 * 64 * 4)),
             IA, "overlaps spec.input_region"),
            ("bias region without bias", dict(bias_region=ref(0, 12)), IA, "has no bias"),
        ]
        for what, fields, code, words in cases:
            spec = small_spec()
            for k, v in fields.items():
                getattr(spec, k).CopyFrom(v)
            expect(lambda: call(spec), code, words, what)
            checked += 1
        spec = small_spec()
        spec.input_region.CopyFrom(r.put(0, x))
        expect(lambda: call(spec, with_x=True), IA, "send no input bands", "input bands beside input_region")
        spec = small_spec()
        spec.weight_region.CopyFrom(r.put(1024, w))
        expect(lambda: call(spec, with_w=True), IA, "send no chunks", "weight chunks beside weight_region")
        spec = small_spec()
        spec.input_region.CopyFrom(r.put(0, x))
        expect(lambda: stub.Conv2dUnary(pb.ConvCall(spec=spec, input=x.tobytes(), weight=w.tobytes()), timeout=10),
               IA, "ConvCall.input must be empty", "Conv2dUnary input bytes beside input_region")
        checked += 3
        # In use: a call that holds the region (its client sends nothing more for a while), by
        # two ranges (input and output): one call in in_use.
        spec = small_spec()
        spec.input_region.CopyFrom(r.put(0, x))
        spec.output_region.CopyFrom(pb.RegionRef(region=r.name, offset=8192, length=3 * 8 * 8 * 4))
        gate = threading.Event()

        def held():
            yield pb.ConvRequest(spec=spec)
            yield pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))
            gate.wait(20)

        out = {}
        t = threading.Thread(target=lambda: out.setdefault("y", collect_output(stub.Conv2d(held(), timeout=60))))
        t.start()
        deadline = time.monotonic() + 10
        while stub.ListRegions(pb.ListRegionsRequest(), timeout=10).regions[0].in_use == 0:
            assert time.monotonic() < deadline, "the call never held its region"
            time.sleep(0.02)
        in_use = stub.ListRegions(pb.ListRegionsRequest(), timeout=10).regions[0].in_use
        assert in_use == 1, f"one call with two ranges of a region: in_use {in_use}"
        expect(lambda: stub.UnregisterRegion(pb.UnregisterRegionRequest(name=r.name), timeout=10),
               grpc.StatusCode.FAILED_PRECONDITION, "used by 1 call", "unregister while in use")
        gate.set()
        t.join(30)
        want = reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        check_close(r.array(8192, want.shape), want)
        checked += 1
    finally:
        r.close()
    expect(lambda: stub.UnregisterRegion(pb.UnregisterRegionRequest(name=r.name), timeout=10), NF,
           "no region", "unregister twice")
    return f"{checked + 1} bad inputs answered"


def case_limits(convd, stub_dir):
    d = Daemon(convd, "--max-shm-bytes", "1M")
    try:
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            r = Region(stub, 768 * 1024)
            r2 = Region(stub, 512 * 1024, register=False)
            expect(lambda: stub.RegisterRegion(pb.RegisterRegionRequest(name=r2.name), timeout=10),
                   grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-shm-bytes", "beyond --max-shm-bytes")
            r.close()
            stub.RegisterRegion(pb.RegisterRegionRequest(name=r2.name), timeout=10)  # room again
            r2.close()
    finally:
        d.stop()
    d = Daemon(convd, "--max-shm-bytes", "0")
    try:
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            expect(lambda: stub.ListRegions(pb.ListRegionsRequest(), timeout=10),
                   grpc.StatusCode.UNIMPLEMENTED, "--max-shm-bytes 0", "shared memory off")
    finally:
        d.stop()
    return "--max-shm-bytes bound and off"


def case_tenants(convd, tmp):
    tokens = os.path.join(tmp, "tokens")
    ta, tb = "A" * 24, "B" * 24
    with open(tokens, "w") as f:
        f.write(f"lab {ta} shm-bytes=1M\nother {tb}\n")
    os.chmod(tokens, 0o600)
    d = Daemon(convd, "--auth-tokens", tokens)
    try:
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            A, B = [("authorization", f"Bearer {ta}")], [("authorization", f"Bearer {tb}")]
            pa = stub.ListRegions(pb.ListRegionsRequest(), timeout=10, metadata=A).name_prefix
            assert pa == "/convd-lab-", pa
            r = Region(stub, 64 * 1024, prefix=pa, md=A)
            try:
                assert [g.name for g in stub.ListRegions(pb.ListRegionsRequest(), timeout=10, metadata=A).regions] == [r.name]
                assert not stub.ListRegions(pb.ListRegionsRequest(), timeout=10, metadata=B).regions
                expect(lambda: stub.RegisterRegion(pb.RegisterRegionRequest(name=r.name), timeout=10, metadata=B),
                       grpc.StatusCode.INVALID_ARGUMENT, "must start with \"/convd-other-\"", "B registers A's object")
                expect(lambda: stub.UnregisterRegion(pb.UnregisterRegionRequest(name=r.name), timeout=10, metadata=B),
                       grpc.StatusCode.NOT_FOUND, "no region", "B unregisters A's region")
                spec = small_spec()
                spec.input_region.CopyFrom(pb.RegionRef(region=r.name, offset=0, length=2 * 64 * 4))
                w = np.ones((3, 2, 3, 3), np.float32)
                reqs = [pb.ConvRequest(spec=spec), pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))]
                expect(lambda: list(stub.Conv2d(iter(reqs), timeout=10, metadata=B)), grpc.StatusCode.NOT_FOUND,
                       "no region", "B uses A's region")
                big = Region(stub, 1024 * 1024, prefix=pa, register=False, md=A)
                expect(lambda: stub.RegisterRegion(pb.RegisterRegionRequest(name=big.name), timeout=10, metadata=A),
                       grpc.StatusCode.RESOURCE_EXHAUSTED, "shm-bytes in the tokens file", "A beyond shm-bytes")
                big.close(unregister=False)
            finally:
                r.close()
    finally:
        d.stop()
    return "tenants: own prefix, not listed, used, registered or unregistered by another; shm-bytes"


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(url, name):
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in {url}")


def case_fd_bad_input(stub, fds, pid, metrics_url):
    """The descriptor socket and fd_ticket: every malformed message and unusable descriptor gets
    an error naming the fault, no descriptor is kept, and the bounds hold."""
    IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    reg = lambda name, ticket, size=0: stub.RegisterRegion(
        pb.RegisterRegionRequest(name=name, fd_ticket=ticket, size=size), timeout=10)
    name = lambda: f"/convd-fd-{secrets.token_hex(6)}"
    before = open_fds(pid)
    checked = []

    def refused(fds_, words, data=b"convd-region/1", status="INVALID_ARGUMENT"):
        ans = pass_fds(fds, fds_, data)
        assert ans.startswith(f"error {status} ") and words in ans, f"{words!r}: answered {ans!r}"
        checked.append(words)

    good = memfd(4096)
    refused([], "exactly one descriptor in SCM_RIGHTS, got 0")
    refused([good, good], "exactly one descriptor in SCM_RIGHTS, got 2")
    refused([good], "expected the data", data=b"convd-region/2")
    refused([good], "larger than expected", data=b"x" * 200)
    refused([memfd(4096, seals=0)], "not sealed against shrinking")
    plain = os.memfd_create("convd-test", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING: sealed shut, but not shrink
    os.ftruncate(plain, 4096)
    refused([plain], "not sealed against shrinking")
    named = shared_memory.SharedMemory(create=True, size=4096)
    refused([named._fd], "not sealed against shrinking")  # a /dev/shm object: tmpfs, never sealed
    named.close(), named.unlink()
    r_, w_ = os.pipe()
    refused([r_], "not a memfd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as so:
        refused([so.fileno()], "not a memfd")
    with open("/proc/self/exe", "rb") as f:  # a file on a disk file system
        refused([f.fileno()], "not a memfd")
    refused([memfd(0)], "empty")
    refused([memfd(1 << 20, allocate=False)], "unallocated pages")  # a sparse one: holes the daemon would fill
    wronly = os.open(f"/proc/self/fd/{good}", os.O_WRONLY)
    refused([wronly], "write-only")
    for fd in (plain, r_, w_, wronly):
        os.close(fd)
    # Sealed: the client itself cannot shrink it any more.
    try:
        os.ftruncate(good, 1024)
        raise AssertionError("a memfd sealed with F_SEAL_SHRINK shrank")
    except PermissionError:
        checked.append("cannot shrink")

    # Tickets: unknown, malformed, used twice, a bad name (the ticket survives it), a size beyond.
    expect(lambda: reg(name(), "0" * 32), NF, "no descriptor waits", "an unknown ticket")
    expect(lambda: reg(name(), "not-a-ticket"), NF, "no descriptor waits", "a malformed ticket")
    t = ticket_of(fds, good)
    expect(lambda: reg("/convd-a/b", t), IA, "no path separators", "a ticket with a bad name")
    expect(lambda: reg("/elsewhere-x", t), IA, "must start with", "a ticket with a foreign name")
    expect(lambda: reg(name(), t, size=8192), IA, "fewer than the 8192", "a size beyond the memfd")
    expect(lambda: reg(name(), t), NF, "no descriptor waits", "a ticket used (by a failed register)")
    t = ticket_of(fds, good)
    n1 = name()
    assert reg(n1, t).in_place
    expect(lambda: reg(name(), t), NF, "no descriptor waits", "a ticket used twice")
    stub.UnregisterRegion(pb.UnregisterRegionRequest(name=n1), timeout=10)
    checked.append("tickets")

    # Write-sealed: read-only for the daemon, so input only.
    ro = memfd(64 * 1024, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
    ans = pass_fds(fds, [ro])
    assert ans.startswith("ok ") and ans.split()[3] == "ro", ans
    n2 = name()
    assert reg(n2, ans.split()[1]).in_place
    spec = small_spec()
    spec.output_region.CopyFrom(pb.RegionRef(region=n2, offset=0, length=3 * 8 * 8 * 4))
    w = np.ones((3, 2, 3, 3), np.float32)
    expect(lambda: list(stub.Conv2d(iter([pb.ConvRequest(spec=spec)]), timeout=10)), IA, "read-only",
           "output into a write-sealed memfd")
    spec = small_spec()
    spec.input_region.CopyFrom(pb.RegionRef(region=n2, offset=0, length=2 * 8 * 8 * 4))
    y, _, _ = collect_output(stub.Conv2d(iter([pb.ConvRequest(spec=spec),
                                               pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))]),
                                         timeout=30))
    check_close(y, reference_conv2d(np.zeros((1, 2, 8, 8), np.float32), w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    stub.UnregisterRegion(pb.UnregisterRegionRequest(name=n2), timeout=10)
    os.close(ro)
    checked.append("write-sealed input")

    # Bounds: one user's waiting descriptors; idle and surplus connections.
    tickets = [ticket_of(fds, good) for _ in range(16)]
    refused([good], "this user's descriptors wait", status="RESOURCE_EXHAUSTED")
    assert metric(metrics_url, "convd_shm_pending_descriptors") == 16
    names = [name() for _ in tickets]
    for n_, t_ in zip(names, tickets):
        reg(n_, t_)
    assert metric(metrics_url, "convd_shm_pending_descriptors") == 0
    assert metric(metrics_url, "convd_shm_regions_in_place") == 16
    for n_ in names:
        stub.UnregisterRegion(pb.UnregisterRegionRequest(name=n_), timeout=10)
    idle = []
    t0 = time.monotonic()
    for _ in range(20):
        so = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        so.connect(fds)  # blocking: a full backlog waits for the daemon's accept
        so.settimeout(10)
        idle.append(so)
    ends = [so.recv(16) for so in idle]  # each closed by the daemon: over the bound at once, else at its timeout
    took = time.monotonic() - t0
    for so in idle:
        so.close()
    assert ends == [b""] * 20 and took < 8, (ends, took)
    checked.append(f"20 idle connections closed in {took:.1f} s")
    t = ticket_of(fds, good)  # and it serves again
    n3 = name()
    reg(n3, t)
    stub.UnregisterRegion(pb.UnregisterRegionRequest(name=n3), timeout=10)
    os.close(good)
    time.sleep(0.2)
    after = open_fds(pid)
    assert after <= before, f"the daemon holds {after - before} more descriptors than before"
    return f"{len(checked)} checks ({', '.join(checked[-4:])}); daemon descriptors {before} -> {after}"


def case_fd_punch(stub, fds):
    """A client that rewrites its memfd and punches holes in it (the one way to take pages from
    a sealed memfd) while the daemon computes from and into it: no crash, the call ends, the
    daemon serves on."""
    libc = ctypes.CDLL(None, use_errno=True)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
    # CONVD_TEST_SMALL=1: a daemon built with the reference kernel (the ThreadSanitizer build)
    x_shape, w_shape = ((1, 8, 256, 256), (8, 8, 3, 3)) if os.environ.get("CONVD_TEST_SMALL") else \
        ((1, 32, 1024, 512), (32, 32, 3, 3))
    spec = small_spec(x_shape, w_shape)
    nbytes = int(np.prod(x_shape)) * 4
    r = Region(stub, 2 * nbytes, fd_socket=fds)
    try:
        rng = np.random.default_rng(7)
        w = rng.standard_normal(w_shape, dtype=np.float32)
        spec.input_region.CopyFrom(r.put(0, rng.standard_normal(x_shape, dtype=np.float32)))
        spec.output_region.CopyFrom(pb.RegionRef(region=r.name, offset=nbytes, length=nbytes))
        punched = []

        def punch(responses):
            for resp in responses:
                if resp.WhichOneof("msg") == "progress" and len(punched) < 4:
                    for off in (0, nbytes):  # input and output alike
                        rc = libc.fallocate(r.shm._fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                            ctypes.c_long(off), ctypes.c_long(nbytes))
                        assert rc == 0, os.strerror(ctypes.get_errno())
                    r.shm.buf[0:4096] = b"\xff" * 4096
                    punched.append(resp.progress.rows_done)
                yield resp

        reqs = [pb.ConvRequest(spec=spec), pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))]
        kinds = [m.WhichOneof("msg") for m in punch(stub.Conv2d(iter(reqs), timeout=120))]
        assert kinds[-1] == "summary" and punched, (kinds[-3:], punched)
    finally:
        r.close()
    x = np.ones((1, 2, 8, 8), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    y, _, _ = collect_output(stub.Conv2d(conv_requests(pb, small_spec(), x, w, None, MiB), timeout=30))
    check_close(y, reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    return f"holes punched at rows {punched} of {x_shape[2]}; the call ended OK and the daemon serves"



def case_truncate(convd):
    """The client shrinks its object while the daemon copies from it (input) or into it
    (output): that call ends with DATA_LOSS, the daemon keeps serving everyone."""
    d = Daemon(convd, "--max-inflight-bytes", "64M")
    try:
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            results = []
            for mode in ("i", "o"):
                x_shape, w_shape = (1, 32, 2048, 1024), (32, 32, 3, 3)
                spec = small_spec(x_shape, w_shape)
                x_bytes = int(np.prod(x_shape)) * 4
                r = Region(stub, x_bytes)
                rng = np.random.default_rng(5)
                w = rng.standard_normal(w_shape, dtype=np.float32)
                if mode == "i":
                    spec.input_region.CopyFrom(pb.RegionRef(region=r.name, offset=0, length=x_bytes))
                else:
                    spec.output_region.CopyFrom(pb.RegionRef(region=r.name, offset=0, length=x_bytes))
                accepted = threading.Event()

                def reqs():
                    yield pb.ConvRequest(spec=spec)
                    yield pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))
                    if mode == "o":
                        x = np.zeros((1, 32, 16, 1024), np.float32).tobytes()  # 2 MiB bands
                        for h0 in range(0, 2048, 16):
                            yield pb.ConvRequest(input=pb.RowBand(n=0, h_begin=h0, h_end=h0 + 16, data=x))

                def shrink(responses):
                    for resp in responses:
                        kind = resp.WhichOneof("msg")
                        if kind == "accepted" and mode == "i" or kind == "progress" and mode == "o":
                            os.ftruncate(r.shm._fd, 4096)
                            accepted.set()
                        yield resp

                t0 = time.monotonic()
                msg = expect(lambda: list(shrink(stub.Conv2d(reqs(), timeout=120))), grpc.StatusCode.DATA_LOSS,
                             "lost its pages", f"object shrunk mid-call ({mode})")
                assert accepted.is_set(), "the call ended before the object was shrunk"
                results.append(f"{'input' if mode == 'i' else 'output'}: DATA_LOSS after {time.monotonic() - t0:.1f} s")
                expect(lambda: stub.UnregisterRegion(pb.UnregisterRegionRequest(name="/convd-x"), timeout=10),
                       grpc.StatusCode.NOT_FOUND, "no region", "the daemon still answers")
                r.close()
            # and serves a normal call afterwards
            x = np.ones((1, 2, 8, 8), np.float32)
            w = np.ones((3, 2, 3, 3), np.float32)
            y, _, _ = collect_output(stub.Conv2d(conv_requests(pb, small_spec(), x, w, None, MiB), timeout=30))
            check_close(y, reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1))
        assert d.alive()
        return "; ".join(results) + "; then served"
    finally:
        d.stop()


def main():
    global pb, pb_grpc
    convd, stub_dir, golden = sys.argv[1:4]
    pb, pb_grpc = import_stubs(stub_dir)
    import tempfile
    sock_dir = tempfile.mkdtemp(prefix="convd-shm-")
    d = Daemon(convd, "--listen", f"unix:{sock_dir}/convd.sock", "--metrics-listen", "127.0.0.1:0")
    try:
        # The same-host paths: the Unix socket (what shared memory is for) with named objects
        # and with sealed memfds used in place, and loopback TCP.
        fds = f"{sock_dir}/convd.sock.fd"
        for target, fd_socket in ((d.addresses[1], fds), (d.addresses[1], None), (d.target, None)):
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.ConvolutionStub(ch)
                cases = (("golden cases", lambda: case_golden(stub, golden, fd_socket=fd_socket)),
                         ("golden cases, Conv2dUnary", lambda: case_golden(stub, golden, unary=True, fd_socket=fd_socket)),
                         ("Conv2dUnary beyond the message limit", lambda: case_unary_large(stub, fd_socket)),
                         ("random shapes", lambda: case_random(stub, fd_socket)))
                if fd_socket:
                    cases += (("descriptor socket: bad input", lambda: case_fd_bad_input(stub, fds, d.proc.pid, d.metrics_url)),
                              ("memfd rewritten and punched mid-call", lambda: case_fd_punch(stub, fds)))
                else:
                    cases += (("bad input", lambda: case_bad_input(stub)),)
                for name, fn in cases:
                    t0 = time.monotonic()
                    what = fn()
                    kind = "memfd regions" if fd_socket else "named regions"
                    print(f"ok   {name} over {target.split(':')[0]}, {kind} ({time.monotonic() - t0:.1f} s): {what}",
                          flush=True)
    finally:
        d.stop()
        os.rmdir(sock_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("limits", lambda: case_limits(convd, stub_dir)),
                         ("tenants", lambda: case_tenants(convd, tmp)),
                         ("truncated mid-call", lambda: case_truncate(convd))):
            t0 = time.monotonic()
            what = fn()
            print(f"ok   {name} ({time.monotonic() - t0:.1f} s): {what}", flush=True)


if __name__ == "__main__":
    main()
