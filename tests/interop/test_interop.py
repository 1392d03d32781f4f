#!/usr/bin/python3
"""Interop: a Python client built by gRPC's standard tooling (protoc + grpc_python_plugin, from
proto/) talks to convd: streaming Conv2d on every golden case (conv2d and conv_transpose2d) with small chunks (so bands
are split into pieces), Conv2dUnary, the same cases in float16 (numpy's own float16 conversion
on the client side), and ListDevices.

usage: test_interop.py CONVD_BINARY STUB_DIR GOLDEN_DIR"""
import sys

import grpc
import numpy as np

from convd_harness import Daemon, check_close, collect_output, conv_requests, import_stubs, \
    load_golden, reference_conv2d, spec_from_params


def main():
    convd, stub_dir, golden = sys.argv[1:4]
    pb, pb_grpc = import_stubs(stub_dir)
    daemon = Daemon(convd, "--chunk-bytes", "3000")
    cases = 0
    try:
        with grpc.insecure_channel(daemon.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            for name, params, a in load_golden(golden):
                b = a.get("bias")
                spec = spec_from_params(pb, params, b is not None)
                # streaming, 2000-byte pieces up, 3000-byte pieces down
                y, accepted, summary = collect_output(
                    stub.Conv2d(conv_requests(pb, spec, a["input"], a["weight"], b, 2000), timeout=60))
                assert accepted is not None and summary is not None, name
                assert [accepted.output_shape.d0, accepted.output_shape.d1, accepted.output_shape.d2,
                        accepted.output_shape.d3] == params["output"], name
                assert summary.ops_run == accepted.elemental_ops >= 1, name
                worst = check_close(y, a["expected"])
                # unary
                req = pb.ConvCall(spec=spec, input=a["input"].astype("<f4").tobytes(),
                                  weight=a["weight"].astype("<f4").tobytes(),
                                  bias=b.astype("<f4").tobytes() if b is not None else b"")
                res = stub.Conv2dUnary(req, timeout=60)
                s = res.output_shape
                yu = np.frombuffer(res.output, "<f4").reshape(s.d0, s.d1, s.d2, s.d3)
                worst_u = check_close(yu, a["expected"])
                if params["op"] == "conv_transpose2d":  # float16 below uses a conv2d reference
                    print(f"ok   {name} (transpose): stream max error {worst:.3g}, unary {worst_u:.3g}")
                    cases += 1
                    continue
                # float16: numpy rounds the inputs; the answer is the float64 reference on those
                # values, rounded once (half an ulp) after float32 accumulation (1e-5 of scale)
                spec.dtype = pb.DTYPE_FLOAT16
                x16, w16 = a["input"].astype("<f2"), a["weight"].astype("<f2")
                b16 = b.astype("<f2") if b is not None else None
                y16, _, s16 = collect_output(
                    stub.Conv2d(conv_requests(pb, spec, x16, w16, b16, 2001, "<f2"), timeout=60), "<f2")
                want = reference_conv2d(x16, w16, b16, params["stride"], params["padding"],
                                        params["dilation"], params["groups"][0])
                err16 = np.abs(y16.astype(np.float64) - want)
                tol = 2.0 ** -11 * np.abs(want) + 1e-5 * max(1.0, float(np.abs(want).max()))
                assert not np.isnan(err16).any() and (err16 <= tol).all(), \
                    f"{name} float16: max error {np.nanmax(err16)}"
                assert s16.bytes_sent == y16.size * 2, (s16.bytes_sent, y16.size)
                print(f"ok   {name}: stream max error {worst:.3g}, unary {worst_u:.3g}, "
                      f"float16 {float(err16.max()):.3g}")
                cases += 1
            devs = stub.ListDevices(pb.ListDevicesRequest(), timeout=10).devices
            assert len(devs) >= 1 and devs[0].name and devs[0].healthy, devs
            assert sum(d.completed_ops for d in devs) >= 2 * cases, devs
            print(f"ok   ListDevices: {[(d.name, d.completed_ops) for d in devs]}")
    finally:
        daemon.stop()
    assert cases >= 19, cases
    print(f"interop: {cases} golden cases passed through a Python gRPC client")


if __name__ == "__main__":
    main()
