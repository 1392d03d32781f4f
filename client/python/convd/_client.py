"""convd.Client: numpy arrays in, numpy arrays out, through a convd daemon (gRPC). Everything the
wire needs (row bands, chunks, dtypes, shared memory) is done here; the contract itself is
proto/convd/v1/convd.proto, whose stubs are generated at install time (setup.py)."""
import fcntl
import json
import mmap
import os
import secrets
import socket
import time

import grpc
import numpy as np

from . import errors
from ._health import health_pb2, health_pb2_grpc
from .v1 import convd_pb2 as pb
from .v1 import convd_pb2_grpc as pb_grpc

_MiB = 1 << 20
# What a message holds beside a chunk of tensor bytes (the daemon's CONVD_WIRE_FRAMING_SLACK).
_FRAMING = 1024
# The daemon's own channel settings (proto/wire.c): a 16 MiB window per stream, and no BDP
# probe, which shrank windows far below it on loopback.
_CHANNEL_OPTIONS = [("grpc.http2.lookahead_bytes", 16 * _MiB), ("grpc.http2.bdp_probe", 0)]

# Balancing over the addresses a target names or resolves to: the service configs libconvd_client
# uses (proto/wire.c, convd_wire_lb_service_config). round_robin retries a call that failed
# UNAVAILABLE before any daemon answered it, on another daemon (3 attempts in all).
_RETRY = {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
          "retryableStatusCodes": ["UNAVAILABLE"]}
_LB_CONFIGS = {
    "pick_first": {"loadBalancingConfig": [{"pick_first": {}}]},
    "round_robin": {"loadBalancingConfig": [{"round_robin": {}}],
                    "methodConfig": [{"name": [{"service": pb.DESCRIPTOR.services_by_name["Convolution"].full_name},
                                               {"service": health_pb2.DESCRIPTOR.services_by_name["Health"].full_name}],
                                      "retryPolicy": _RETRY}]},
}

_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16}
_WIRE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def _pair(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, not {v}")
    return v


def _padding(v):
    """PyTorch's forms: int, (h, w), or convd's (top, bottom, left, right)."""
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 4
    v = tuple(int(a) for a in v)
    if len(v) == 2:
        return v[0], v[0], v[1], v[1]
    if len(v) == 4:
        return v
    raise ValueError(f"padding must be an int, (h, w) or (top, bottom, left, right), not {v}")


def _to_bf16(a):
    """float32 -> bfloat16 bits, rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        r[nan] = 0x7FC0
    return r


def _encode(a, dtype):
    """The array in the wire's layout and dtype: the same array when it already is."""
    if dtype == "bfloat16":
        return _to_bf16(a)
    return np.ascontiguousarray(a, dtype=_WIRE[dtype])


def _decode(raw, dtype):
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


class Client:
    """A connection to a convd daemon.

    target: as gRPC takes it ("127.0.0.1:50051", "unix:/run/convd/convd.sock", or several
    daemons: "ipv4:10.0.0.1:50051,10.0.0.2:50051", "dns:///convd-headless.NS.svc:50051").
    lb_policy: "round_robin" (each call to the next connected daemon; one that fails UNAVAILABLE
    before a daemon answered is retried on another) or "pick_first"; None: gRPC's default,
    pick_first. Registered weights live on the daemon that took PutWeights. timeout: seconds per call (None: no deadline). chunk_bytes: the largest tensor piece per
    message. TLS: tls_ca (the CA's PEM file; then TLS is on), tls_cert/tls_key (mutual TLS),
    tls_server_name (when the certificate's name is not the target's host). token: the bearer
    token, else $CONVD_TOKEN."""

    def __init__(self, target="127.0.0.1:50051", *, timeout=None, chunk_bytes=1 << 20, tls_ca=None,
                 tls_cert=None, tls_key=None, tls_server_name=None, token=None, lb_policy=None):
        if chunk_bytes < 1024:
            raise ValueError("chunk_bytes must be at least 1024")
        if lb_policy is not None and lb_policy not in _LB_CONFIGS:
            raise ValueError(f"lb_policy must be one of {sorted(_LB_CONFIGS)} or None, not {lb_policy!r}")
        self.target, self.timeout, self.chunk_bytes = target, timeout, int(chunk_bytes)
        limit = max(4 * _MiB, self.chunk_bytes + _FRAMING)
        options = _CHANNEL_OPTIONS + [("grpc.max_send_message_length", limit),
                                      ("grpc.max_receive_message_length", max(limit, 64 * _MiB))]
        if lb_policy is not None:
            options.append(("grpc.service_config", json.dumps(_LB_CONFIGS[lb_policy])))
        if tls_ca:
            read = lambda p: open(p, "rb").read() if p else None
            creds = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        token = token or os.environ.get("CONVD_TOKEN")
        self._md = [("authorization", f"Bearer {token}")] if token else None
        self._stub = pb_grpc.ConvolutionStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, self.target) from None

    # ---- convolution ------------------------------------------------------------------------

    def conv2d(self, x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, dtype=None,
               allow_tf32=False, priority=0, progress=None, shm=False):
        """PyTorch's conv2d on an (N, C, H, W) array with (C_out, C/groups, kH, kW) weights (or a
        registered weights id). Returns the (N, C_out, H_out, W_out) output: float32, or float16
        for float16 input (dtype: "float32", "float16", "bfloat16"; None: from x)."""
        return self._conv(pb.OP_CONV2D, x, w, bias, stride, padding, dilation, groups, (0, 0), dtype,
                          allow_tf32, priority, progress, shm)

    def conv_transpose2d(self, x, w, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                         groups=1, dtype=None, allow_tf32=False, priority=0, progress=None, shm=False):
        """PyTorch's conv_transpose2d: weights (C_in, C_out/groups, kH, kW)."""
        return self._conv(pb.OP_CONV_TRANSPOSE2D, x, w, bias, stride, padding, dilation, groups,
                          _pair(output_padding, "output_padding"), dtype, allow_tf32, priority, progress, shm)

    def _conv(self, op, x, w, bias, stride, padding, dilation, groups, output_padding, dtype,
              allow_tf32, priority, progress, shm):
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), not of shape {x.shape}")
        if dtype is None:
            dtype = "float16" if x.dtype == np.float16 else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
        spec = pb.ConvSpec(op=op, dtype=_DTYPES[dtype], groups=int(groups), allow_tf32=bool(allow_tf32),
                           priority=int(priority), has_bias=bias is not None)
        spec.input_shape.d0, spec.input_shape.d1, spec.input_shape.d2, spec.input_shape.d3 = x.shape
        spec.stride.h, spec.stride.w = _pair(stride, "stride")
        spec.dilation.h, spec.dilation.w = _pair(dilation, "dilation")
        p = spec.padding
        p.top, p.bottom, p.left, p.right = _padding(padding)
        if op == pb.OP_CONV_TRANSPOSE2D:
            spec.output_padding.h, spec.output_padding.w = output_padding
        tensors = []
        if isinstance(w, str):
            spec.weights_id = w
            if bias is not None:
                raise ValueError("a registered weights id carries its own bias: leave bias out")
            spec.has_bias = False
        else:
            w = np.asarray(w)
            if w.ndim != 4:
                raise ValueError(f"w must be 4-D, not of shape {w.shape}")
            spec.weight_shape.d0, spec.weight_shape.d1, spec.weight_shape.d2, spec.weight_shape.d3 = w.shape
            tensors.append(("weight", _encode(w, dtype)))
            if bias is not None:
                tensors.append(("bias", _encode(np.asarray(bias).reshape(-1), dtype)))
        xw = _encode(x, dtype)
        if shm:
            return self._conv_shm(spec, xw, tensors, dtype, progress)
        return self._conv_stream(spec, xw, tensors, dtype, progress)

    def _requests(self, spec, xw, tensors):
        """The client stream: spec, weight and bias chunks, then input row bands. Bytes go out
        a chunk at a time, from the array itself (no whole copy of it)."""
        yield pb.ConvRequest(spec=spec)
        chunk = self.chunk_bytes
        for name, t in tensors:
            mv = memoryview(t).cast("B")
            for off in range(0, len(mv), chunk):
                yield pb.ConvRequest(**{name: pb.TensorChunk(offset=off, data=bytes(mv[off:off + chunk]))})
        if xw is None:
            return
        n_, c_, h_, w_ = xw.shape
        row = c_ * w_ * xw.itemsize
        rows = max(1, chunk // row)
        for n in range(n_):
            for h0 in range(0, h_, rows):
                h1 = min(h_, h0 + rows)
                band = xw[n, :, h0:h1, :]
                mv = memoryview(band if band.flags.c_contiguous else np.ascontiguousarray(band)).cast("B")
                for off in range(0, len(mv), chunk):
                    yield pb.ConvRequest(input=pb.RowBand(n=n, h_begin=h0, h_end=h1, offset=off,
                                                          data=bytes(mv[off:off + chunk])))

    def _run(self, requests, on_response):
        """Runs a Conv2d call; Ctrl-C cancels it."""
        call = self._stub.Conv2d(requests, timeout=self.timeout, metadata=self._md)
        try:
            for r in call:
                on_response(r)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, self.target) from None
        except KeyboardInterrupt:
            call.cancel()
            raise

    def _conv_stream(self, spec, xw, tensors, dtype, progress):
        state = {"y": None, "pending": {}, "done": 0, "total": 0}
        wire = _WIRE[dtype]

        def on_response(r):
            kind = r.WhichOneof("msg")
            if kind == "accepted":
                s = r.accepted.output_shape
                state["y"] = np.empty((s.d0, s.d1, s.d2, s.d3), dtype=wire)
                state["total"] = s.d0 * s.d2
            elif kind == "output":
                o, y = r.output, state["y"]
                key = (o.n, o.h_begin, o.h_end)
                rows, c, width = o.h_end - o.h_begin, y.shape[1], y.shape[3]
                size = c * rows * width * wire.itemsize
                if o.offset == 0 and len(o.data) == size:  # a whole band in one message
                    y[o.n, :, o.h_begin:o.h_end, :] = np.frombuffer(o.data, wire).reshape(c, rows, width)
                else:
                    buf = state["pending"].setdefault(key, bytearray())
                    if o.offset != len(buf):
                        raise errors.Error(grpc.StatusCode.INTERNAL, f"output band {key}: piece at {o.offset}, expected {len(buf)}")
                    buf += o.data
                    if len(buf) < size:
                        return
                    y[o.n, :, o.h_begin:o.h_end, :] = np.frombuffer(bytes(buf), wire).reshape(c, rows, width)
                    del state["pending"][key]
                state["done"] += rows
                if progress:
                    progress(state["done"], state["total"])

        self._run(self._requests(spec, xw, tensors), on_response)
        if state["y"] is None or state["pending"] or state["done"] != state["total"]:
            raise errors.Error(grpc.StatusCode.INTERNAL, "the daemon's answer ended before the whole output")
        return _decode(state["y"], dtype)

    def _conv_shm(self, spec, xw, tensors, dtype, progress):
        """Input and output in a shared-memory region of this client's (the daemon on this host
        maps it: unix: targets only)."""
        if not self.target.startswith("unix:"):
            raise ValueError("shm=True needs the daemon on this host: a unix:/path target")
        prefix = self._unary(self._stub.ListRegions, pb.ListRegionsRequest()).name_prefix
        out_shape = self._output_shape(spec)
        wire = _WIRE[dtype]
        in_bytes = xw.nbytes
        out_off = (in_bytes + 4095) // 4096 * 4096
        out_bytes = int(np.prod(out_shape)) * wire.itemsize
        name = f"{prefix}py-{secrets.token_hex(8)}"
        region = _Region.create(self.target, name, out_off + out_bytes)
        registered = False
        try:
            np.ndarray(xw.shape, xw.dtype, buffer=region.buf)[...] = xw
            self._unary(self._stub.RegisterRegion, pb.RegisterRegionRequest(name=name, fd_ticket=region.ticket))
            registered = True
            spec.input_region.CopyFrom(pb.RegionRef(region=name, offset=0, length=in_bytes))
            spec.output_region.CopyFrom(pb.RegionRef(region=name, offset=out_off, length=out_bytes))

            def on_response(r):
                if r.WhichOneof("msg") == "progress" and progress:
                    progress(r.progress.rows_done, r.progress.rows_total)

            self._run(self._requests(spec, None, tensors), on_response)
            y = np.ndarray(out_shape, wire, buffer=region.buf, offset=out_off).copy()
            return _decode(y, dtype)
        finally:
            if registered:
                try:
                    self._unary(self._stub.UnregisterRegion, pb.UnregisterRegionRequest(name=name))
                except errors.Error:
                    pass  # the daemon keeps the mapping until it is unregistered or restarts
            region.close()

    @staticmethod
    def _output_shape(spec):
        i, wt, s, d, p = spec.input_shape, spec.weight_shape, spec.stride, spec.dilation, spec.padding
        if spec.weights_id:
            raise ValueError("shm=True with a registered weights id is not supported here; pass the weights")
        if spec.op == pb.OP_CONV_TRANSPOSE2D:
            c_out = wt.d1 * (spec.groups or 1)
            h = (i.d2 - 1) * s.h + d.h * (wt.d2 - 1) + 1 + spec.output_padding.h - p.top - p.bottom
            w = (i.d3 - 1) * s.w + d.w * (wt.d3 - 1) + 1 + spec.output_padding.w - p.left - p.right
        else:
            c_out = wt.d0
            h = (i.d2 + p.top + p.bottom - d.h * (wt.d2 - 1) - 1) // s.h + 1
            w = (i.d3 + p.left + p.right - d.w * (wt.d3 - 1) - 1) // s.w + 1
        if h < 1 or w < 1:
            raise ValueError(f"the output would be {h}x{w}: the kernel does not fit the padded input")
        return (i.d0, c_out, h, w)

    # ---- weights registry ---------------------------------------------------------------------

    def put_weights(self, w, bias=None, *, op="conv2d", groups=1, dtype=None):
        """Registers weights (and bias) with the daemon; returns their id, for conv2d's w."""
        w = np.asarray(w)
        if dtype is None:
            dtype = "float16" if w.dtype == np.float16 else "float32"
        ops = {"conv2d": pb.OP_CONV2D, "conv_transpose2d": pb.OP_CONV_TRANSPOSE2D}
        if op not in ops:
            raise ValueError(f"op must be one of {sorted(ops)}")
        ws = pb.WeightsSpec(dtype=_DTYPES[dtype], op=ops[op], groups=int(groups), has_bias=bias is not None)
        ws.weight_shape.d0, ws.weight_shape.d1, ws.weight_shape.d2, ws.weight_shape.d3 = w.shape
        tensors = [("weight", _encode(w, dtype))]
        if bias is not None:
            tensors.append(("bias", _encode(np.asarray(bias).reshape(-1), dtype)))

        def requests():
            yield pb.PutWeightsRequest(spec=ws)
            for name, t in tensors:
                mv = memoryview(t).cast("B")
                for off in range(0, len(mv), self.chunk_bytes):
                    yield pb.PutWeightsRequest(**{name: pb.TensorChunk(offset=off, data=bytes(mv[off:off + self.chunk_bytes]))})

        try:
            return self._stub.PutWeights(requests(), timeout=self.timeout, metadata=self._md).weights_id
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, self.target) from None

    def list_weights(self):
        """The registered weights (this tenant's): dicts with id, shape, has_bias, bytes, in_use."""
        r = self._unary(self._stub.ListWeights, pb.ListWeightsRequest())
        return [{"id": i.weights_id, "shape": (i.weight_shape.d0, i.weight_shape.d1, i.weight_shape.d2, i.weight_shape.d3),
                 "has_bias": i.has_bias, "bytes": i.bytes, "in_use": i.in_use} for i in r.weights]

    def delete_weights(self, weights_id):
        self._unary(self._stub.DeleteWeights, pb.DeleteWeightsRequest(weights_id=weights_id))

    # ---- the daemon ---------------------------------------------------------------------------

    def devices(self):
        """The daemon's devices: dicts with index, kind, name, healthy, completed_ops, detail."""
        r = self._unary(self._stub.ListDevices, pb.ListDevicesRequest())
        return [{"index": d.index, "kind": pb.DeviceKind.Name(d.kind).replace("DEVICE_KIND_", "").lower(),
                 "name": d.name, "healthy": d.healthy, "memory_bytes": d.memory_bytes,
                 "completed_ops": d.completed_ops, "detail": d.detail} for d in r.devices]

    def health(self, service=""):
        """True when the daemon (or service) says SERVING."""
        r = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return r.status == health_pb2.HealthCheckResponse.SERVING


class _Region:
    """shm=True's region: a sealed memfd passed over the daemon's descriptor socket (unix:PATH's
    PATH.fd), which the daemon uses in place; or, with a daemon that has none, a named POSIX
    object it copies from. `buf` is its memory, `ticket` what RegisterRegion takes ("" for a
    named one)."""

    def __init__(self, buf, ticket, closer):
        self.buf, self.ticket, self._closer = buf, ticket, closer

    @staticmethod
    def create(target, name, size):
        path = target[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        fds = path + ".fd"
        if os.path.exists(fds) and hasattr(os, "memfd_create"):
            fd = os.memfd_create("convd-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.posix_fallocate(fd, 0, size)  # allocated now: a full memory limit fails here
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
                buf = mmap.mmap(fd, size)
                try:
                    ans = _pass_fd(fds, fd)
                except OSError as e:
                    buf.close()
                    raise errors.from_code(grpc.StatusCode.UNAVAILABLE, f"the daemon's descriptor socket {fds}: {e}")
                if not ans.startswith("ok "):
                    buf.close()
                    parts = ans.split(" ", 2)
                    code = getattr(grpc.StatusCode, parts[1], grpc.StatusCode.INTERNAL) if len(parts) > 2 else \
                        grpc.StatusCode.INTERNAL
                    raise errors.from_code(code, f"the daemon refused the region's descriptor: {parts[-1]}")
            finally:
                os.close(fd)  # the mappings keep it
            return _Region(buf, ans.split()[1], buf.close)
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(name=name[1:], create=True, size=size)
        return _Region(shm.buf, "", lambda: (shm.close(), shm.unlink()))

    def close(self):
        self._closer()


def _pass_fd(path, fd):
    """The descriptor socket's answer for fd, as text; a connection closed unanswered (the
    daemon at its bound of such connections) is tried again, 6 times over about 1.3 s."""
    for attempt in range(6):
        if attempt:
            time.sleep(0.02 * 2 ** attempt)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as so:
            so.settimeout(10)
            so.connect(path)
            try:
                socket.send_fds(so, [b"convd-region/1"], [fd])
                ans = so.recv(1024).decode(errors="replace").strip()
            except (ConnectionResetError, BrokenPipeError):
                ans = ""
        if ans:
            return ans
    raise ConnectionResetError("every connection was closed unanswered (too many clients at once?)")
