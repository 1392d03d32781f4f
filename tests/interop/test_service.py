#!/usr/bin/python3
"""convd as a shared service, through a Python gRPC client: the weights registry (round trip,
dedupe, NOT_FOUND, eviction, deletion, no weight bytes to the devices on repeated calls); the
health service's Check and Watch through a drain (SIGTERM during load: NOT_SERVING, new calls
UNAVAILABLE, every accepted call completes, exit 0); the Prometheus endpoint (the scrape parses,
counters move with the calls); a deadline and a cancel mid-job returning the daemon to idle
within a second; admission limits answering RESOURCE_EXHAUSTED at once under a bounded burst;
server reflection (v1 and v1alpha): listing the services, and calling ListDevices with message
classes built from the descriptors the daemon served, with no proto file.

usage: test_service.py CONVD_BINARY STUB_DIR GOLDEN_DIR"""
import os
import re
import signal
import sys
import urllib.error
import urllib.request
import threading
import time

import grpc
import numpy as np

from convd_harness import Daemon, check_close, collect_output, conv_requests, import_stubs, \
    load_golden, reference_conv2d, spec_from_params

pb = pb_grpc = hpb = hpb_grpc = None
golden_dir = None


def put_requests(w, b, chunk=4096, dtype="<f4", op=0, groups=0):
    spec = pb.WeightsSpec(has_bias=b is not None, dtype={"<f4": pb.DTYPE_FLOAT32, "<f2": pb.DTYPE_FLOAT16}[dtype],
                          op=op, groups=groups)
    spec.weight_shape.d0, spec.weight_shape.d1, spec.weight_shape.d2, spec.weight_shape.d3 = w.shape
    yield pb.PutWeightsRequest(spec=spec)
    for name, t in (("weight", w), ("bias", b)):
        if t is None:
            continue
        data = np.ascontiguousarray(t, dtype=dtype).tobytes()
        for off in range(0, len(data), chunk):
            yield pb.PutWeightsRequest(**{name: pb.TensorChunk(offset=off, data=data[off:off + chunk])})


def conv_spec(x_shape, weights_id, pad=1):
    s = pb.ConvSpec(op=pb.OP_CONV2D, weights_id=weights_id)
    s.input_shape.d0, s.input_shape.d1, s.input_shape.d2, s.input_shape.d3 = x_shape
    s.padding.top = s.padding.bottom = s.padding.left = s.padding.right = pad
    return s


def device_counters(stub):
    devs = stub.ListDevices(pb.ListDevicesRequest(), timeout=10).devices
    return sum(d.weight_bytes_loaded for d in devs), sum(d.weight_cache_hits for d in devs)


def expect_code(fn, code, words):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"{e.code()} {e.details()}"
        assert words in e.details(), f"{e.details()!r} lacks {words!r}"
        return e.details()
    raise AssertionError("the call succeeded")


def test_registry(convd):
    rng = np.random.default_rng(11)
    # Room for two of the 32x32x3x3 (+bias) weights (36992 bytes each), not three.
    daemon = Daemon(convd, "--weights-memory", "80000")
    try:
        with grpc.insecure_channel(daemon.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            w1 = rng.standard_normal((32, 32, 3, 3), dtype=np.float32)
            b1 = rng.standard_normal(32, dtype=np.float32)
            r1 = stub.PutWeights(put_requests(w1, b1, 5000), timeout=30)
            assert len(r1.weights_id) == 32 and r1.bytes == (w1.size + b1.size) * 4 and not r1.already_present
            # the same content again (other chunking): the same id, nothing added
            r1b = stub.PutWeights(put_requests(w1, b1, 777), timeout=30)
            assert r1b.weights_id == r1.weights_id and r1b.already_present
            print(f"ok   PutWeights: id {r1.weights_id}, {r1.bytes} bytes; again: already_present")

            # Conv2d and Conv2dUnary by id, against the reference, four times: the devices load
            # the weights once
            x = rng.standard_normal((1, 32, 20, 20), dtype=np.float32)
            want = reference_conv2d(x, w1, b1, [1, 1], [1, 1, 1, 1], [1, 1], 1)
            loaded = []
            for k in range(4):
                if k % 2 == 0:
                    y, acc, summary = collect_output(stub.Conv2d(
                        conv_requests(pb, conv_spec(x.shape, r1.weights_id), x, None, None, 3000), timeout=30))
                    assert summary.bytes_received == x.size * 4, summary.bytes_received
                else:
                    res = stub.Conv2dUnary(pb.ConvCall(spec=conv_spec(x.shape, r1.weights_id),
                                                       input=x.tobytes()), timeout=30)
                    y = np.frombuffer(res.output, "<f4").reshape(1, 32, 20, 20)
                check_close(y, want)
                loaded.append(device_counters(stub))
            assert loaded[0][0] > 0 and all(l[0] == loaded[0][0] for l in loaded), loaded
            assert loaded[3][1] > loaded[0][1], loaded
            print(f"ok   4 calls by id match the reference; weight bytes loaded on the devices "
                  f"{[l[0] for l in loaded]} (once), cache hits {[l[1] for l in loaded]}")

            # transpose weights (C_in, C_out/groups, kH, kW) by id: a golden conv_transpose2d case
            found = False
            for name, params, a in load_golden(golden_dir):
                if name != "transpose_s2_k4_p1":
                    continue
                found = True
                rt = stub.PutWeights(put_requests(a["weight"], a.get("bias"), op=pb.OP_CONV_TRANSPOSE2D,
                                                  groups=params["groups"][0]), timeout=30)
                ts = spec_from_params(pb, params, a.get("bias") is not None)
                ts.weights_id = rt.weights_id
                ts.ClearField("weight_shape")
                yt, _, _ = collect_output(stub.Conv2d(conv_requests(pb, ts, a["input"], None, None, 3000), timeout=30))
                worst = check_close(yt, a["expected"])
                stub.DeleteWeights(pb.DeleteWeightsRequest(weights_id=rt.weights_id), timeout=10)
                print(f"ok   a conv_transpose2d golden case by weights_id: max error {worst:.3g}")
            assert found, f"golden case transpose_s2_k4_p1 not found under {golden_dir}"

            # a wrong shape, weight chunks beside an id, an unknown id
            bad = conv_spec(x.shape, r1.weights_id)
            bad.weight_shape.d0, bad.weight_shape.d1, bad.weight_shape.d2, bad.weight_shape.d3 = 16, 32, 3, 3
            msg = expect_code(lambda: stub.Conv2dUnary(pb.ConvCall(spec=bad, input=x.tobytes()), timeout=10),
                              grpc.StatusCode.INVALID_ARGUMENT, "differs from weights")
            print(f"ok   wrong weight_shape: INVALID_ARGUMENT \"{msg}\"")
            msg = expect_code(lambda: collect_output(stub.Conv2d(
                conv_requests(pb, conv_spec(x.shape, r1.weights_id), x, w1, None, 3000), timeout=10)),
                grpc.StatusCode.INVALID_ARGUMENT, "send one or the other")
            print(f"ok   chunks beside an id: INVALID_ARGUMENT \"{msg}\"")
            msg = expect_code(lambda: stub.Conv2dUnary(pb.ConvCall(spec=conv_spec(x.shape, "0" * 32),
                                                                   input=x.tobytes()), timeout=10),
                              grpc.StatusCode.NOT_FOUND, "is not in the registry")
            print(f"ok   unknown id: NOT_FOUND \"{msg}\"")

            # float16 weights: widened, listed with their dtype
            w2 = rng.standard_normal((32, 32, 3, 3)).astype(np.float16)
            r2 = stub.PutWeights(put_requests(w2, None, 4096, "<f2"), timeout=30)
            lst = stub.ListWeights(pb.ListWeightsRequest(), timeout=10)
            assert [i.weights_id for i in lst.weights] == [r2.weights_id, r1.weights_id], lst
            assert lst.weights[0].dtype == pb.DTYPE_FLOAT16 and lst.weights[1].uses == 6  # 4 calls + 2 refused
            assert lst.bytes_used == r1.bytes + r2.bytes and lst.bytes_limit == 80000
            # a third set evicts the least recently used (w1: r2 was put after its last use)
            w3 = rng.standard_normal((32, 32, 3, 3), dtype=np.float32)
            r3 = stub.PutWeights(put_requests(w3, None), timeout=30)
            lst = stub.ListWeights(pb.ListWeightsRequest(), timeout=10)
            assert [i.weights_id for i in lst.weights] == [r3.weights_id, r2.weights_id] and lst.evictions == 1, lst
            msg = expect_code(lambda: stub.Conv2dUnary(pb.ConvCall(spec=conv_spec(x.shape, r1.weights_id),
                                                                   input=x.tobytes()), timeout=10),
                              grpc.StatusCode.NOT_FOUND, "evicted")
            print(f"ok   eviction of the least recently used: NOT_FOUND \"{msg}\"")
            # too large for the registry
            big = np.zeros((64, 64, 3, 3), dtype=np.float32)
            msg = expect_code(lambda: stub.PutWeights(put_requests(big, None), timeout=10),
                              grpc.StatusCode.RESOURCE_EXHAUSTED, "--weights-memory")
            print(f"ok   weights larger than the registry: RESOURCE_EXHAUSTED \"{msg}\"")
            # float16 weights used by a float32 call give the float16 values' answer
            y16 = np.frombuffer(stub.Conv2dUnary(pb.ConvCall(spec=conv_spec(x.shape, r2.weights_id),
                                                             input=x.tobytes()), timeout=10).output,
                                "<f4").reshape(1, 32, 20, 20)
            check_close(y16, reference_conv2d(x, w2.astype(np.float32), None, [1, 1], [1, 1, 1, 1], [1, 1], 1))
            # deletion
            stub.DeleteWeights(pb.DeleteWeightsRequest(weights_id=r3.weights_id), timeout=10)
            msg = expect_code(lambda: stub.DeleteWeights(pb.DeleteWeightsRequest(weights_id=r3.weights_id), timeout=10),
                              grpc.StatusCode.NOT_FOUND, "is not in the registry")
            assert [i.weights_id for i in stub.ListWeights(pb.ListWeightsRequest(), timeout=10).weights] == [r2.weights_id]
            print("ok   ListWeights (most recent first, dtype, uses, bytes), DeleteWeights, NOT_FOUND after")
            # a malformed PutWeights stream
            msg = expect_code(lambda: stub.PutWeights(iter([pb.PutWeightsRequest(
                weight=pb.TensorChunk(offset=0, data=b"\0" * 8))]), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the spec")
            msg = expect_code(lambda: stub.PutWeights(iter(list(put_requests(w3, None))[:-1]), timeout=10),
                              grpc.StatusCode.INVALID_ARGUMENT, "incomplete at half-close")
            print(f"ok   malformed PutWeights streams: INVALID_ARGUMENT \"{msg}\"")
    finally:
        daemon.stop()


def test_health_through_drain(convd):
    # the reference kernel makes calls slow enough to be in flight when SIGTERM comes
    daemon = Daemon(convd, "--cpu-kernel", "reference", "--drain-timeout", "60")
    rng = np.random.default_rng(12)
    SERVING, NOT_SERVING = hpb.HealthCheckResponse.SERVING, hpb.HealthCheckResponse.NOT_SERVING
    try:
        with grpc.insecure_channel(daemon.target) as ch:
            health = hpb_grpc.HealthStub(ch)
            stub = pb_grpc.ConvolutionStub(ch)
            for svc in ("", "convd.v1.Convolution"):
                assert health.Check(hpb.HealthCheckRequest(service=svc), timeout=10).status == SERVING
            msg = expect_code(lambda: health.Check(hpb.HealthCheckRequest(service="nope.Svc"), timeout=10),
                              grpc.StatusCode.NOT_FOUND, "unknown service")
            print(f"ok   Check: SERVING for \"\" and convd.v1.Convolution; unknown: NOT_FOUND \"{msg}\"")
            unknown = list(health.Watch(hpb.HealthCheckRequest(service="nope.Svc"), timeout=2)
                           .__iter__().__next__() for _ in range(1))
            assert unknown[0].status == hpb.HealthCheckResponse.SERVICE_UNKNOWN, unknown
            watch = health.Watch(hpb.HealthCheckRequest(service=""), timeout=120)
            seen = []
            first = threading.Event()

            def read_watch():
                for r in watch:
                    seen.append(r.status)
                    first.set()
            reader = threading.Thread(target=read_watch)
            reader.start()
            assert first.wait(10) and seen[0] == SERVING, seen

            # load: calls in flight when SIGTERM comes, each must complete with the right answer
            x = rng.standard_normal((1, 32, 96, 96), dtype=np.float32)
            w = rng.standard_normal((32, 32, 3, 3), dtype=np.float32)
            want = reference_conv2d(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
            spec = conv_spec(x.shape, "")
            spec.weight_shape.d0, spec.weight_shape.d1, spec.weight_shape.d2, spec.weight_shape.d3 = w.shape
            results = []

            def one_call():
                try:
                    y, _, _ = collect_output(stub.Conv2d(conv_requests(pb, spec, x, w, None, 4000), timeout=120))
                    check_close(y, want)
                    results.append("ok")
                except grpc.RpcError as e:
                    results.append(f"{e.code()} {e.details()}")
                except AssertionError as e:
                    results.append(f"wrong answer: {e}")
            calls = [threading.Thread(target=one_call) for _ in range(6)]
            for t in calls:
                t.start()
            # wait until they are in flight (the daemon has accepted them)
            deadline = time.time() + 30
            while time.time() < deadline:
                devs = stub.ListDevices(pb.ListDevicesRequest(), timeout=10).devices
                if sum(d.completed_ops for d in devs) > 0:
                    break
                time.sleep(0.01)
            daemon.proc.send_signal(signal.SIGTERM)
            in_flight = 6 - len(results)
            assert in_flight > 0, "every call ended before SIGTERM: the test proves nothing"
            t0 = time.time()
            while time.time() - t0 < 10 and NOT_SERVING not in seen:
                time.sleep(0.01)
            assert NOT_SERVING in seen, seen
            during = health.Check(hpb.HealthCheckRequest(service=""), timeout=10).status
            refused = expect_code(lambda: stub.Conv2dUnary(pb.ConvCall(spec=spec, input=x.tobytes(),
                                                                       weight=w.tobytes()), timeout=10),
                                  grpc.StatusCode.UNAVAILABLE, "shutting down")
            for t in calls:
                t.join(120)
            reader.join(30)
            assert not reader.is_alive(), "the Watch stream did not end during the drain"
            assert during == NOT_SERVING, during
            assert results == ["ok"] * 6, results
            print(f"ok   drain: Watch saw {seen} and ended, Check NOT_SERVING, a new call "
                  f"UNAVAILABLE (\"{refused}\"), all 6 calls completed correctly ({in_flight} "
                  f"were in flight at SIGTERM)")
    finally:
        rc = daemon.proc.wait(60)
        assert rc == 0, f"convd exited with {rc}"
    print("ok   the daemon exited 0 after the drain")


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\\]|\\\\.)*"'
                         r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\\]|\\\\.)*")*)?\})? '
                         r'(-?[0-9.eE+-]+|NaN|\+Inf|-Inf)$')


def scrape(url):
    """GET /metrics, parsed as the Prometheus text format: every line is a comment (HELP/TYPE)
    or a sample; returns {(name, labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200, r.status
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
        body = r.read().decode()
    samples, typed = {}, set()
    for line in body.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) == 4, line
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram"), line
                typed.add(parts[2])
            continue
        m = METRIC_LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, f"{name} has no TYPE line"
        samples[(name, m.group(3) or "")] = float(m.group(5))
    return samples


def metric(samples, name, **labels):
    """The sum of name's samples whose labels include the given ones."""
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(f'{k}="{val}"' in lbl for k, val in labels.items()))


def wait_idle(url, within):
    """The daemon holds nothing for calls any more: returns seconds it took, or fails."""
    t0 = time.time()
    while True:
        s = scrape(url)
        idle = {k: metric(s, k) for k in ("convd_calls_in_flight", "convd_inflight_jobs", "convd_pending_ops",
                                           "convd_queued_ops", "convd_running_ops", "convd_job_bytes_held",
                                           "convd_inflight_bytes")}
        if all(v == 0 for v in idle.values()):
            return time.time() - t0
        if time.time() - t0 > within:
            raise AssertionError(f"not idle {within} s after the call ended: {idle}")
        time.sleep(0.02)


def test_metrics_deadlines_admission(convd):
    rng = np.random.default_rng(13)
    daemon = Daemon(convd, "--metrics-listen", "127.0.0.1:0", "--cpu-kernel", "reference",
                    "--device-memory", "1M", "--max-inflight-bytes", "20M", "--max-queue-ops", "100",
                    "--max-message-bytes", "16M")
    try:
        with grpc.insecure_channel(daemon.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            s0 = scrape(daemon.metrics_url)
            assert metric(s0, "convd_serving") == 1 and metric(s0, "convd_calls_in_flight") == 0
            # counters move with the calls
            x = rng.standard_normal((1, 8, 16, 16), dtype=np.float32)
            w = rng.standard_normal((8, 8, 3, 3), dtype=np.float32)
            spec = conv_spec(x.shape, "")
            spec.weight_shape.d0, spec.weight_shape.d1, spec.weight_shape.d2, spec.weight_shape.d3 = w.shape
            for _ in range(3):
                stub.Conv2dUnary(pb.ConvCall(spec=spec, input=x.tobytes(), weight=w.tobytes()), timeout=30)
            expect_code(lambda: stub.Conv2dUnary(pb.ConvCall(spec=spec, input=x.tobytes()[:-4], weight=w.tobytes()),
                                                 timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "has")
            # a call is counted when the daemon has finished with it, just after the client got
            # its status: the scrape may come first, so wait for the counters (at most 2 s)
            t0 = time.time()
            while True:
                s1 = scrape(daemon.metrics_url)
                ok = metric(s1, "convd_requests_total", method="Conv2dUnary", status="OK")
                bad = metric(s1, "convd_requests_total", method="Conv2dUnary", status="INVALID_ARGUMENT")
                if (ok, bad) == (3, 1) or time.time() - t0 > 2:
                    break
                time.sleep(0.01)
            assert ok == 3 and bad == 1, (ok, bad)
            assert metric(s1, "convd_received_bytes_total") == 3 * (x.nbytes + w.nbytes)
            assert metric(s1, "convd_sent_bytes_total") == 3 * 8 * 16 * 16 * 4
            assert metric(s1, 'convd_request_duration_seconds_count', method="Conv2dUnary") == 4
            assert metric(s1, "convd_device_ops_total") >= 3
            assert metric(s1, "convd_device_busy_seconds_total") > 0
            ops_doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "operations.md")).read()
            names = {re.sub(r"_(bucket|sum|count)$", "", n) for n, _ in s1}
            undocumented = sorted(n for n in names if f"`{n}`" not in ops_doc)
            assert not undocumented, f"docs/operations.md lacks {undocumented}"
            print(f"ok   the scrape parses as Prometheus text ({len(s1)} samples); requests, bytes, "
                  f"durations and device ops moved as the calls did")

            # a deadline and a cancel in the middle of long jobs: back to idle within a second
            xb = rng.standard_normal((1, 32, 256, 256), dtype=np.float32)
            # 5x5: 1.7 G multiply-adds on the reference kernel (64 ops), seconds of work in 16 MiB
            # of rows (3x3 sometimes finished inside the 0.5 s deadline)
            wb = rng.standard_normal((32, 32, 5, 5), dtype=np.float32)
            big = conv_spec(xb.shape, "", pad=2)
            big.weight_shape.d0, big.weight_shape.d1, big.weight_shape.d2, big.weight_shape.d3 = wb.shape
            t0 = time.time()
            expect_code(lambda: collect_output(stub.Conv2d(conv_requests(pb, big, xb, wb, None, 60000), timeout=0.5)),
                        grpc.StatusCode.DEADLINE_EXCEEDED, "")
            took = time.time() - t0
            idle_after_deadline = wait_idle(daemon.metrics_url, 1.0)
            responses = stub.Conv2d(conv_requests(pb, big, xb, wb, None, 60000), timeout=60)
            first = next(responses)  # accepted: the job is running
            assert first.WhichOneof("msg") == "accepted"
            time.sleep(0.3)
            s_mid = scrape(daemon.metrics_url)
            assert metric(s_mid, "convd_inflight_jobs") >= 1 and metric(s_mid, "convd_pending_ops") > 0, s_mid
            responses.cancel()
            idle_after_cancel = wait_idle(daemon.metrics_url, 1.0)
            s2 = scrape(daemon.metrics_url)
            assert metric(s2, "convd_requests_total", method="Conv2d", status="DEADLINE_EXCEEDED") == 1, \
                [(k, v) for k, v in s2.items() if k[0] == "convd_requests_total"]
            assert metric(s2, "convd_requests_total", method="Conv2d", status="CANCELLED") == 1
            print(f"ok   deadline (0.5 s; the call ended after {took:.2f} s) and cancel mid-job: idle again "
                  f"{idle_after_deadline:.3f} s and {idle_after_cancel:.3f} s later (no jobs, ops, "
                  f"rows or admitted bytes left); counted as DEADLINE_EXCEEDED and CANCELLED")

            # admission: a burst of 12 unary calls of 8 MiB each against 20 MiB in flight
            xa = rng.standard_normal((1, 16, 256, 256), dtype=np.float32)  # 4 MiB in, 4 MiB out
            wa = rng.standard_normal((16, 16, 1, 1), dtype=np.float32)
            sa = conv_spec(xa.shape, "", pad=0)
            sa.weight_shape.d0, sa.weight_shape.d1, sa.weight_shape.d2, sa.weight_shape.d3 = wa.shape
            req = pb.ConvCall(spec=sa, input=xa.tobytes(), weight=wa.tobytes())
            want = np.einsum("nchw,oc->nohw", xa.astype(np.float64), wa[:, :, 0, 0].astype(np.float64))
            outcomes, refused_ms = [], []
            opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
            with grpc.insecure_channel(daemon.target, options=opts) as ch2:
                stub2 = pb_grpc.ConvolutionStub(ch2)

                def burst_call():
                    t = time.time()
                    try:
                        res = stub2.Conv2dUnary(req, timeout=60)
                        check_close(np.frombuffer(res.output, "<f4").reshape(want.shape), want)
                        outcomes.append("ok")
                    except grpc.RpcError as e:
                        admission = "--max-inflight-bytes" in (e.details() or "") or \
                            "--max-queue-ops" in (e.details() or "")
                        outcomes.append(e.code() if admission else f"{e.code()} {e.details()}")
                        refused_ms.append((time.time() - t) * 1e3)
                    except AssertionError as e:
                        outcomes.append(f"wrong answer: {e}")
                threads = [threading.Thread(target=burst_call) for _ in range(12)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
            n_ok = outcomes.count("ok")
            n_ex = outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert n_ok + n_ex == 12 and n_ok >= 1 and n_ex >= 1, outcomes
            assert daemon.alive()
            wait_idle(daemon.metrics_url, 1.0)
            print(f"ok   burst of 12 x 8 MiB against --max-inflight-bytes 20M: {n_ok} served correctly, "
                  f"{n_ex} RESOURCE_EXHAUSTED after {max(refused_ms):.0f} ms at most; idle after")
            # a plan larger than --max-queue-ops is refused at once
            xq = rng.standard_normal((1, 64, 256, 256), dtype=np.float32)
            sq = conv_spec(xq.shape, "")
            sq.weight_shape.d0, sq.weight_shape.d1, sq.weight_shape.d2, sq.weight_shape.d3 = 64, 64, 3, 3
            wq = np.zeros((64, 64, 3, 3), dtype=np.float32)
            t = time.time()
            msg = expect_code(lambda: collect_output(stub.Conv2d(conv_requests(pb, sq, xq, wq, None, 60000), timeout=30)),
                              grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-queue-ops")
            print(f"ok   a plan over --max-queue-ops: RESOURCE_EXHAUSTED in {(time.time() - t) * 1e3:.0f} ms \"{msg}\"")
            wait_idle(daemon.metrics_url, 1.0)
            # one correct call after all that
            stub.Conv2dUnary(pb.ConvCall(spec=spec, input=x.tobytes(), weight=w.tobytes()), timeout=30)
            # anything but GET /metrics
            for path, method, code in (("/other", "GET", 404), ("/metrics", "POST", 405)):
                try:
                    urllib.request.urlopen(urllib.request.Request(daemon.metrics_url.replace("/metrics", path),
                                                                  method=method, data=b"" if method == "POST" else None),
                                           timeout=10)
                    raise AssertionError(f"{method} {path} succeeded")
                except urllib.error.HTTPError as e:
                    assert e.code == code, (path, e.code)
            print("ok   GET /other: 404, POST /metrics: 405")
    finally:
        daemon.stop()


def test_reflection(convd):
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_reflection_v1 import reflection_pb2 as rpb
    daemon = Daemon(convd)
    try:
        with grpc.insecure_channel(daemon.target) as ch:
            want = ["convd.v1.Convolution", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"]
            for pkg in ("v1", "v1alpha"):
                svc = rpb.DESCRIPTOR.services_by_name["ServerReflection"]  # v1alpha: the same, renamed
                path = f"/{svc.full_name.replace('.v1.', f'.{pkg}.')}/{svc.methods[0].name}"
                info = ch.stream_stream(path,
                                        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                        response_deserializer=rpb.ServerReflectionResponse.FromString)
                reqs = [rpb.ServerReflectionRequest(list_services=""),
                        rpb.ServerReflectionRequest(file_containing_symbol="convd.v1.Convolution"),
                        rpb.ServerReflectionRequest(file_containing_symbol="convd.v1.ConvSpec.weights_id"),
                        rpb.ServerReflectionRequest(file_by_filename="grpc/health/v1/health.proto"),
                        rpb.ServerReflectionRequest(file_containing_symbol="no.such.Thing")]
                resps = list(info(iter(reqs), timeout=10))
                assert len(resps) == 5, resps
                names = [sv.name for sv in resps[0].list_services_response.service]
                assert names == want, names
                files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                         for b in resps[1].file_descriptor_response.file_descriptor_proto]
                assert [f.name for f in files] == ["convd/v1/convd.proto"], files
                conv_svc = [sv for sv in files[0].service if sv.name == "Convolution"][0]
                methods = [m.name for m in conv_svc.method]
                assert {"Conv2d", "Conv2dUnary", "ListDevices", "PutWeights"} <= set(methods), methods
                assert resps[2].file_descriptor_response.file_descriptor_proto[0] == \
                    resps[1].file_descriptor_response.file_descriptor_proto[0]
                hf = descriptor_pb2.FileDescriptorProto.FromString(
                    resps[3].file_descriptor_response.file_descriptor_proto[0])
                assert hf.package == "grpc.health.v1" and hf.service[0].name == "Health"
                assert resps[4].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], resps[4]
                print(f"ok   reflection {pkg}: {names}; convd.proto with {len(methods)} methods; "
                      f"an unknown symbol: NOT_FOUND \"{resps[4].error_response.error_message}\"")
            # a client with no proto file: message classes from the served descriptors
            pool = descriptor_pool.DescriptorPool()
            pool.Add(files[0])
            factory = message_factory.MessageFactory(pool)  # protobuf 3.x (Debian 12)
            req_cls = factory.GetPrototype(pool.FindMessageTypeByName("convd.v1.ListDevicesRequest"))
            resp_cls = factory.GetPrototype(pool.FindMessageTypeByName("convd.v1.ListDevicesResponse"))
            call = ch.unary_unary(f"/{files[0].package}.{conv_svc.name}/ListDevices",
                                  request_serializer=req_cls.SerializeToString,
                                  response_deserializer=resp_cls.FromString)
            devs = call(req_cls(), timeout=10, metadata=[("x-request-id", "trace-42.a")]).devices
            assert len(devs) >= 1 and devs[0].healthy, devs
            print(f"ok   ListDevices through classes built from reflection only: {[d.name for d in devs]}")
            # the client's request id is the log line's
            t0 = time.time()
            while "rid=trace-42.a method=ListDevices" not in daemon.read_log():
                assert time.time() - t0 < 5, daemon.read_log()
                time.sleep(0.02)
            print("ok   the log's call line carries the client's x-request-id")
    finally:
        daemon.stop()


def main():
    global pb, pb_grpc, hpb, hpb_grpc, golden_dir
    convd, stub_dir, golden_dir = sys.argv[1:4]
    pb, pb_grpc = import_stubs(stub_dir)
    from grpc_health_v1 import health_pb2, health_pb2_grpc  # noqa: E402
    hpb, hpb_grpc = health_pb2, health_pb2_grpc
    test_registry(convd)
    test_health_through_drain(convd)
    test_metrics_deadlines_admission(convd)
    test_reflection(convd)
    print("service: all checks passed")


if __name__ == "__main__":
    main()
