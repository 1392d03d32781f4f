#!/usr/bin/python3
"""Bad input: every malformed request gets INVALID_ARGUMENT with a message that names the problem,
and a correct call right after it still succeeds, so the daemon keeps serving. A method convd
does not have gets UNIMPLEMENTED at once, not a hang until the deadline. Every bad request that
applies to both Conv2d and Conv2dUnary gets the same status and message from each.

usage: test_bad_input.py CONVD_BINARY STUB_DIR GOLDEN_DIR"""
import sys
import time

import grpc
import numpy as np

from convd_harness import Daemon, check_close, collect_output, conv_requests, import_stubs, \
    load_golden, method_path, spec_from_params

pb = pb_grpc = None


def base_spec(**override):
    """input 1x4x8x8, weight 6x4x3x3, padding 1, bias."""
    params = {"input": [1, 4, 8, 8], "weight": [6, 4, 3, 3], "stride": [1, 1],
              "dilation": [1, 1], "padding": [1, 1, 1, 1], "groups": [1]}
    params.update(override)
    return spec_from_params(pb, params, True)


def good_tensors():
    rng = np.random.default_rng(7)
    return (rng.standard_normal((1, 4, 8, 8), dtype=np.float32),
            rng.standard_normal((6, 4, 3, 3), dtype=np.float32),
            rng.standard_normal(6, dtype=np.float32))


def full_stream(spec=None, chunk=1000):
    x, w, b = good_tensors()
    return list(conv_requests(pb, spec or base_spec(), x, w, b, chunk))


def band(n, h0, h1, nbytes, offset=0):
    return pb.ConvRequest(input=pb.RowBand(n=n, h_begin=h0, h_end=h1, offset=offset,
                                           data=b"\0" * nbytes))


ROW = 4 * 8 * 4  # one input row, all channels


def weights_and_bias():
    x, w, b = good_tensors()
    return [pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes())),
            pb.ConvRequest(bias=pb.TensorChunk(offset=0, data=b.tobytes()))]


def all_rows_but(skip):
    return [band(0, h, h + 1, ROW) for h in range(8) if h != skip]


def bad_streams():
    """(name, list of requests, words the message must contain)."""
    spec = pb.ConvRequest
    yield ("zero dim", [spec(spec=base_spec(input=[1, 0, 8, 8]))], "every dimension must be at least 1")
    yield ("negative dim", [spec(spec=base_spec(weight=[6, 4, -3, 3]))], "6,4,-3,3")
    yield ("negative padding", [spec(spec=base_spec(padding=[1, -1, 1, 1]))], "padding bottom = -1")
    yield ("zero stride", [spec(spec=base_spec(stride=[0, 1]))], "stride height = 0")
    yield ("kernel larger than padded input",
           [spec(spec=base_spec(weight=[6, 4, 7, 7], dilation=[2, 2], padding=[0, 0, 0, 0]))],
           "kernel 7x7 (dilated 13x13) is larger than padded input 8x8")
    yield ("groups not dividing channels", [spec(spec=base_spec(groups=[3], weight=[6, 1, 3, 3]))],
           "groups = 3 does not divide the 4 input channels")
    yield ("weight shape vs groups", [spec(spec=base_spec(groups=[2], weight=[6, 4, 3, 3]))],
           "weight shape has C_in/groups = 4")
    s = base_spec()
    s.ClearField("weight_shape")
    yield ("missing weight shape", [spec(spec=s)], "spec.weight_shape is missing")
    yield ("missing weights", [spec(spec=base_spec())] + all_rows_but(-1) + weights_and_bias()[1:],
           "weights incomplete at half-close: 0 of 864 bytes")
    yield ("weight bytes do not match the shape",
           [spec(spec=base_spec()), spec(weight=pb.TensorChunk(offset=0, data=b"\0" * 868))],
           "ends past the weight's 864 bytes")
    yield ("weights out of order",
           [spec(spec=base_spec()), spec(weight=pb.TensorChunk(offset=4, data=b"\0" * 4))],
           "weight chunk at byte offset 4, but 0 bytes have arrived")
    yield ("band bytes do not match the shape", [spec(spec=base_spec()), band(0, 0, 2, 2 * ROW + 4)],
           "end past the band's 256 bytes")
    yield ("overlapping bands", [spec(spec=base_spec()), band(0, 0, 4, 4 * ROW), band(0, 3, 5, 2 * ROW)],
           "overlaps rows already received (row 3 of batch item 0)")
    yield ("band n out of range", [spec(spec=base_spec()), band(1, 0, 1, ROW)],
           "n = 1, outside the batch [0, 1)")
    yield ("band with negative rows", [spec(spec=base_spec()), band(0, -1, 1, 2 * ROW)],
           "rows [-1, 1)")
    yield ("band beyond H", [spec(spec=base_spec()), band(0, 6, 9, 3 * ROW)],
           "rows [6, 9): need 0 <= h_begin < h_end <= H = 8")
    yield ("input never completed",
           [spec(spec=base_spec())] + weights_and_bias() + all_rows_but(5),
           "7 of 8 rows arrived; row 5 of batch item 0 is missing")
    yield ("band cut short at half-close",
           [spec(spec=base_spec())] + weights_and_bias() + [band(0, 0, 1, ROW // 2)],
           "has 64 of 128 bytes")
    yield ("data before the spec", [band(0, 0, 1, ROW)], "the first message must be the spec")
    half = base_spec()
    half.dtype = pb.DTYPE_FLOAT16
    yield ("float32 band in a float16 call", [spec(spec=half), band(0, 0, 1, ROW)],
           "C x rows x W x 2 = 4 x 1 x 8 x 2, float16")
    yield ("float32 weights in a float16 call",
           [spec(spec=half)] + weights_and_bias()[:1], "ends past the weight's 432 bytes")
    tr = base_spec(weight=[4, 6, 3, 3])  # transpose layout: C_in first
    tr.op = pb.OP_CONV_TRANSPOSE2D
    tr.stride.h = tr.stride.w = 2
    tr.output_padding.h, tr.output_padding.w = 2, 0
    yield ("output padding not below the stride", [spec(spec=tr)], "output_padding 2,0")
    trw = base_spec()
    trw.op = pb.OP_CONV_TRANSPOSE2D  # weight 6x4x3x3 with 4 input channels: C_in must come first
    yield ("transpose weights in the conv2d layout", [spec(spec=trw)], "must be the input's 4 channels")
    op_on_conv = base_spec()
    op_on_conv.output_padding.h = 1
    yield ("output padding on conv2d", [spec(spec=op_on_conv)], "applies to OP_CONV_TRANSPOSE2D only")
    tf32 = base_spec()
    tf32.dtype = pb.DTYPE_BFLOAT16
    tf32.allow_tf32 = True
    yield ("TF32 on bfloat16", [spec(spec=tf32)], "allow_tf32 applies to float32 tensors")
    yield ("empty stream", [], "the stream ended before the spec arrived")


def spec_cases(stub):
    """(name, spec, extra stream messages, unary weight bytes or None) for every bad request that
    applies to both Conv2d and Conv2dUnary: whatever is wrong is in the spec, or in weights
    named by id. Each is sent with correct tensors, so only the spec can be refused."""
    for name, reqs, _ in bad_streams():
        if len(reqs) == 1 and reqs[0].HasField("spec"):
            yield name, reqs[0].spec, None, None
    bad_op = base_spec()
    bad_op.op = 7
    yield "unknown op", bad_op, None, None
    bad_dtype = base_spec()
    bad_dtype.dtype = 9
    yield "unknown dtype", bad_dtype, None, None
    unknown = base_spec()
    unknown.ClearField("weight_shape")
    unknown.weights_id = "0" * 32
    yield "unknown weights id", unknown, [], None
    _, w, b = good_tensors()
    put = [pb.PutWeightsRequest(spec=pb.WeightsSpec(weight_shape=pb.Shape4(d0=6, d1=4, d2=3, d3=3),
                                                    has_bias=True)),
           pb.PutWeightsRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes())),
           pb.PutWeightsRequest(bias=pb.TensorChunk(offset=0, data=b.tobytes()))]
    wid = stub.PutWeights(iter(put), timeout=30).weights_id
    other = base_spec(weight=[6, 4, 1, 1])
    other.weights_id = wid
    yield "weight shape differs from the registered weights", other, [], None
    beside = base_spec()
    beside.weights_id = wid
    yield ("weight bytes beside a weights id", beside,
           [pb.ConvRequest(weight=pb.TensorChunk(offset=0, data=w.tobytes()))], w.tobytes())


def same_answer_both_calls(stub):
    """Every spec-level bad request gets the same status and message from both calls."""
    x, w, b = good_tensors()
    n = 0
    for name, spec, extra, unary_w in spec_cases(stub):
        if extra is None:  # the weights travel with the call
            stream = [pb.ConvRequest(spec=spec)] + weights_and_bias() + all_rows_but(-1)
            call = pb.ConvCall(spec=spec, input=x.tobytes(), weight=w.tobytes(), bias=b.tobytes())
        else:  # registered weights: the input only, plus what the case adds
            stream = [pb.ConvRequest(spec=spec)] + extra + all_rows_but(-1)
            call = pb.ConvCall(spec=spec, input=x.tobytes(), weight=unary_w or b"")
        answers = []
        for fn in (lambda: list(stub.Conv2d(iter(stream), timeout=30)),
                   lambda: stub.Conv2dUnary(call, timeout=30)):
            try:
                fn()
                raise AssertionError(f"{name}: the call succeeded")
            except grpc.RpcError as e:
                answers.append((e.code(), e.details()))
        assert answers[0] == answers[1], f"{name}: Conv2d {answers[0]} but Conv2dUnary {answers[1]}"
        assert answers[0][0] != grpc.StatusCode.OK and answers[0][1], (name, answers[0])
        print(f"ok   {name}: Conv2d and Conv2dUnary both {answers[0][0].name} \"{answers[0][1]}\"")
        n += 1
    good_call(stub)
    return n


def expect_invalid(call, words, what):
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {e.code()} {e.details()}"
        assert words in e.details(), f"{what}: message {e.details()!r} lacks {words!r}"
        return e.details()
    raise AssertionError(f"{what}: the call succeeded")


def good_call(stub):
    """A correct call, checked against a float64 computation of the same convolution."""
    x, w, b = good_tensors()
    y, _, _ = collect_output(stub.Conv2d(iter(full_stream()), timeout=30))
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((1, 6, 8, 8))
    for i in range(3):
        for j in range(3):
            want += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 8, j:j + 8], w[:, :, i, j])
    want += b[None, :, None, None]
    check_close(y, want)


def main():
    global pb, pb_grpc
    convd, stub_dir, golden = sys.argv[1:4]
    pb, pb_grpc = import_stubs(stub_dir)
    daemon = Daemon(convd)
    checked = 0
    try:
        with grpc.insecure_channel(daemon.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            good_call(stub)
            for name, reqs, words in bad_streams():
                msg = expect_invalid(lambda: list(stub.Conv2d(iter(reqs), timeout=30)), words, name)
                good_call(stub)
                print(f"ok   {name}: INVALID_ARGUMENT \"{msg}\"")
                checked += 1

            # unary: byte counts that don't match the shape, bias that was not announced
            x, w, b = good_tensors()
            for name, call, words in [
                ("unary input too short", pb.ConvCall(spec=base_spec(), input=x.tobytes()[:-4],
                                                      weight=w.tobytes(), bias=b.tobytes()),
                 "ConvCall.input has 1020 bytes, but its shape needs 1024"),
                ("unary without spec", pb.ConvCall(input=x.tobytes()), "ConvCall.spec is missing"),
                ("unary zero dim", pb.ConvCall(spec=base_spec(input=[0, 4, 8, 8])),
                 "every dimension must be at least 1"),
            ]:
                msg = expect_invalid(lambda: stub.Conv2dUnary(call, timeout=30), words, name)
                good_call(stub)
                print(f"ok   {name}: INVALID_ARGUMENT \"{msg}\"")
                checked += 1

            # garbage bytes where a message should be, streaming and unary
            raw_stream = ch.stream_stream(method_path(pb, "Conv2d"),
                                          request_serializer=lambda m: m,
                                          response_deserializer=lambda m: m)
            raw_unary = ch.unary_unary(method_path(pb, "Conv2dUnary"),
                                       request_serializer=lambda m: m,
                                       response_deserializer=lambda m: m)
            garbage = bytes(range(255, 0, -3)) * 7
            msg = expect_invalid(lambda: list(raw_stream(iter([garbage]), timeout=30)),
                                 "is not a valid convd.v1.ConvRequest", "garbage stream")
            good_call(stub)
            print(f"ok   garbage stream message: INVALID_ARGUMENT \"{msg}\"")
            first = full_stream()[0].SerializeToString()
            msg = expect_invalid(lambda: list(raw_stream(iter([first, garbage]), timeout=30)),
                                 "message 2 of the stream is not a valid", "garbage second message")
            good_call(stub)
            print(f"ok   garbage after the spec: INVALID_ARGUMENT \"{msg}\"")
            msg = expect_invalid(lambda: raw_unary(garbage, timeout=30),
                                 "is not a valid convd.v1.ConvCall", "garbage unary")
            good_call(stub)
            print(f"ok   garbage unary message: INVALID_ARGUMENT \"{msg}\"")
            checked += 3
            checked += same_answer_both_calls(stub)

            # the client gives up mid-upload: the daemon drops the call and keeps serving
            def half_sent():
                reqs = full_stream(chunk=64)
                yield from reqs[:len(reqs) // 2]
                time.sleep(0.2)
                yield from reqs[len(reqs) // 2:]
            fut = stub.Conv2d(half_sent(), timeout=30)
            time.sleep(0.1)
            fut.cancel()
            try:
                list(fut)
                raise AssertionError("a cancelled call returned output")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.CANCELLED, (e.code(), e.details())
            good_call(stub)
            print("ok   client cancelled mid-upload: the next call is served")

            # the deadline passes while the daemon computes (~10 G multiply-adds on a daemon
            # running the slow reference kernel, so that the computation outlasts the deadline)
            spec = base_spec(input=[1, 128, 256, 256], weight=[128, 128, 3, 3])
            spec.has_bias = False
            rng = np.random.default_rng(3)
            big_x = rng.standard_normal((1, 128, 256, 256), dtype=np.float32)
            big_w = rng.standard_normal((128, 128, 3, 3), dtype=np.float32)
            slow = Daemon(convd, "--cpu-kernel", "reference")
            try:
                with grpc.insecure_channel(slow.target) as slow_ch:
                    slow_stub = pb_grpc.ConvolutionStub(slow_ch)
                    t0 = time.monotonic()
                    try:
                        list(slow_stub.Conv2d(conv_requests(pb, spec, big_x, big_w, None, 1 << 20),
                                              timeout=2))
                        raise AssertionError("a call past its deadline returned output")
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.code(), e.details())
                    good_call(slow_stub)
            finally:
                slow.stop()
            print(f"ok   deadline during compute: DEADLINE_EXCEEDED after {time.monotonic() - t0:.1f} s, "
                  "the next call is served")
            checked += 2

            # a method that does not exist: UNIMPLEMENTED, at once
            nope = ch.unary_unary(method_path(pb, "NoSuchMethod"),
                                  request_serializer=lambda m: m, response_deserializer=lambda m: m)
            t0 = time.monotonic()
            try:
                nope(b"", timeout=20)
                raise AssertionError("unknown method succeeded")
            except grpc.RpcError as e:
                took = time.monotonic() - t0
                assert e.code() == grpc.StatusCode.UNIMPLEMENTED, (e.code(), e.details())
                assert took < 10, f"UNIMPLEMENTED took {took:.1f} s: the call waited for its deadline"
                print(f"ok   unknown method: UNIMPLEMENTED in {took * 1000:.1f} ms \"{e.details()}\"")
            good_call(stub)
            checked += 1
            assert daemon.alive()
    finally:
        daemon.stop()
    print(f"bad input: {checked} malformed requests refused, the daemon served a correct call after each")


if __name__ == "__main__":
    main()
