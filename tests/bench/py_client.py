#!/usr/bin/python3
"""The Python client's time for bench_e2e: streaming Conv2d through grpcio with tests/interop's
harness (1 MiB chunks), on a daemon that is already running.

usage: py_client.py TARGET STUB_DIR INTEROP_DIR REPEATS SHAPE...
       SHAPE = n,c,h,w:o,i,kh,kw:sh,sw:ph,pw:groups
prints one line per shape: the median seconds of one call (after a warm-up), input to output
assembled as a numpy array."""
import statistics
import sys
import time

target, stub_dir, interop_dir, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, interop_dir)
import grpc  # noqa: E402
import numpy as np  # noqa: E402
from convd_harness import collect_output, conv_requests, import_stubs, spec_from_params  # noqa: E402

pb, pb_grpc = import_stubs(stub_dir)
# The same window settings as libconvd_client (proto/wire.h): a 16 MiB lookahead, BDP probe off.
opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20),
        ("grpc.http2.lookahead_bytes", 16 << 20), ("grpc.http2.bdp_probe", 0)]
with grpc.insecure_channel(target, options=opts) as ch:
    stub = pb_grpc.ConvolutionStub(ch)
    rng = np.random.default_rng(0)
    for spec_s in sys.argv[5:]:
        x_s, w_s, s_s, p_s, g_s = spec_s.split(":")
        xs, ws = list(map(int, x_s.split(","))), list(map(int, w_s.split(",")))
        ph, pw = map(int, p_s.split(","))
        params = {"input": xs, "weight": ws, "stride": list(map(int, s_s.split(","))),
                  "dilation": [1, 1], "padding": [ph, ph, pw, pw], "groups": [int(g_s)]}
        spec = spec_from_params(pb, params, True)
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32)
        b = rng.standard_normal(ws[0], dtype=np.float32)
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            collect_output(stub.Conv2d(conv_requests(pb, spec, x, w, b, 1 << 20), timeout=600))
            if i:
                times.append(time.perf_counter() - t0)
        print(f"{statistics.median(times):.9f}", flush=True)
