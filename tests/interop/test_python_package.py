#!/usr/bin/python3
"""The Python package (client/python) as a user gets it: installed with pip into a fresh venv
(--system-site-packages, --no-build-isolation, no index: Debian's grpcio, protobuf, numpy and
setuptools), then, in that venv's Python, against a daemon started here: the README's example
verbatim, every golden case (conv2d and conv_transpose2d, by value and by registered id), 40
random shapes with every padding form, float16 and bfloat16 within their stated bounds, shared
memory over the Unix socket, progress callbacks, and errors as convd.Error subclasses.

usage: test_python_package.py CONVD_BINARY STUB_DIR GOLDEN_DIR [CONVCTL]"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from convd_harness import Daemon

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

CASES = r'''
import os, sys
import numpy as np
import convd
sys.path.insert(0, sys.argv[3])
from convd_harness import load_golden, reference_conv2d, check_close

tcp, unix, golden = sys.argv[1], sys.argv[2], sys.argv[4]
c = convd.Client(tcp)
assert c.health(), "health"
assert c.devices() and c.devices()[0]["healthy"], c.devices()

n_golden = worst = 0
for i, (name, p, a) in enumerate(load_golden(golden)):
    b = a.get("bias")
    kw = dict(stride=tuple(p["stride"]), padding=tuple(p["padding"]), dilation=tuple(p["dilation"]),
              groups=p["groups"][0])
    if p.get("op") == "conv_transpose2d":
        y = c.conv_transpose2d(a["input"], a["weight"], b, output_padding=tuple(p.get("output_padding", [0, 0])), **kw)
        wid = c.put_weights(a["weight"], b, op="conv_transpose2d", groups=p["groups"][0])
        y2 = c.conv_transpose2d(a["input"], wid, None, output_padding=tuple(p.get("output_padding", [0, 0])), **kw)
    else:
        y = c.conv2d(a["input"], a["weight"], b, **kw)
        wid = c.put_weights(a["weight"], b)
        y2 = c.conv2d(a["input"], wid, **kw)
    assert y.dtype == np.float32, y.dtype
    worst = max(worst, check_close(y, a["expected"]), check_close(y2, a["expected"]))
    assert wid in [w["id"] for w in c.list_weights()]
    c.delete_weights(wid)
    n_golden += 1
print(f"ok   {n_golden} golden cases by value and by id, max error {worst:.2e}")

rng = np.random.default_rng(0x9E7)
worst = 0.0
for i in range(40):
    g = int(rng.choice([1, 1, 2]))
    cg, og = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    kh, kw_ = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    s = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    d = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    form = i % 3
    pads = [int(v) for v in rng.integers(0, 3, 4)]
    padding = pads[0] if form == 0 else (pads[0], pads[2]) if form == 1 else tuple(pads)
    full = (pads[0],) * 4 if form == 0 else (pads[0], pads[0], pads[2], pads[2]) if form == 1 else tuple(pads)
    x = rng.standard_normal((int(rng.integers(1, 3)), cg * g, int(rng.integers(d[0] * (kh - 1) + 1, 30)),
                             int(rng.integers(d[1] * (kw_ - 1) + 1, 30))), dtype=np.float32)
    w = rng.standard_normal((og * g, cg, kh, kw_), dtype=np.float32)
    b = rng.standard_normal(og * g, dtype=np.float32) if i % 2 else None
    stride = s if i % 4 else s[0]
    want = reference_conv2d(x, w, b, s if i % 4 else (s[0], s[0]), full, d, g)
    seen = []
    y = c.conv2d(x, w, b, stride=stride, padding=padding, dilation=d, groups=g,
                 progress=lambda done, total: seen.append((done, total)))
    worst = max(worst, check_close(y, want))
    assert seen and seen[-1][0] == seen[-1][1] == want.shape[0] * want.shape[2], seen[-3:]
print(f"ok   40 random shapes (int, pair and 4-tuple padding; progress to the last row), max error {worst:.2e}")

x = rng.standard_normal((1, 8, 20, 20), dtype=np.float32)
w = rng.standard_normal((4, 8, 3, 3), dtype=np.float32)
want = reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
# float16: inputs rounded to half, sums in float32, the output rounded once (2^-11 relative);
# bfloat16: 2^-8 relative per input, so the bound scales with the sum of |x||w| terms.
y16 = c.conv2d(x.astype(np.float16), w.astype(np.float16), padding=1)
assert y16.dtype == np.float16
want16 = reference_conv2d(x.astype(np.float16), w.astype(np.float16), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
err16 = float(np.abs(y16.astype(np.float64) - want16).max())
assert err16 <= 2.0 ** -10 * max(1.0, float(np.abs(want16).max())), err16
ybf = c.conv2d(x, w, padding=1, dtype="bfloat16")
assert ybf.dtype == np.float32
mag = reference_conv2d(np.abs(x), np.abs(w), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
errbf = np.abs(ybf.astype(np.float64) - want)
assert (errbf <= 2.0 ** -7 * mag + 2.0 ** -8 * np.abs(want) + 1e-6).all(), float(errbf.max())
print(f"ok   float16 (max error {err16:.2e}) and bfloat16 (max error {float(errbf.max()):.2e})")

with convd.Client(unix) as u:
    from convd.v1 import convd_pb2
    seen, kinds = [], []

    def on_progress(d_, t):
        seen.append(d_)  # and, mid-call, what the region is: a sealed memfd used in place
        kinds.extend(r.in_place for r in u._stub.ListRegions(convd_pb2.ListRegionsRequest(), timeout=10).regions)

    y = u.conv2d(x, w, padding=1, shm=True, progress=on_progress)
    check_close(y, want)
    assert seen and seen[-1] == want.shape[0] * want.shape[2], seen
    assert kinds and all(kinds), f"the region was not used in place: {kinds}"
    assert not u._stub.ListRegions(convd_pb2.ListRegionsRequest(), timeout=10).regions, "a region was left registered"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("convd-py-")], os.listdir("/dev/shm")
    y = u.conv2d(x, w, padding=1)
    check_close(y, want)
try:
    c.conv2d(x, w, padding=1, shm=True)
    raise AssertionError("shm=True over TCP was accepted")
except ValueError as e:
    assert "unix:" in str(e)
print("ok   shm=True over the Unix socket (a memfd used in place; nothing left registered or in /dev/shm), plain calls over it; refused over TCP")

for fn, cls, words in ((lambda: c.conv2d(x, np.ones((4, 3, 3, 3), np.float32)), convd.InvalidArgument, "weight"),
                       (lambda: c.conv2d(x, "no-such-id"), convd.NotFound, "registry"),
                       (lambda: convd.Client("127.0.0.1:1", timeout=5).conv2d(x, w), convd.Unavailable, "is convd running at 127.0.0.1:1")):
    try:
        fn()
        raise AssertionError(f"{cls.__name__}: the call succeeded")
    except convd.Error as e:
        assert isinstance(e, cls) and words in e.details, (type(e), e.code, e.details)
print("ok   errors: InvalidArgument, NotFound, Unavailable (with the target named)")
c.close()
'''


SECURE = r'''
import os, sys
import numpy as np
import convd
target, ca, token = sys.argv[1:4]
x = np.ones((1, 2, 6, 6), np.float32)
w = np.ones((3, 2, 3, 3), np.float32)
with convd.Client(target, tls_ca=ca, tls_server_name="convd", token=token) as c:
    y = c.conv2d(x, w, padding=1)
    assert y.shape == (1, 3, 6, 6) and y[0, 0, 2, 2] == 18.0 and y[0, 0, 0, 0] == 8.0, y[0, 0]
os.environ["CONVD_TOKEN"] = token
with convd.Client(target, tls_ca=ca, tls_server_name="convd") as c:
    assert c.conv2d(x, w).shape == (1, 3, 4, 4)
del os.environ["CONVD_TOKEN"]
with convd.Client(target, tls_ca=ca, tls_server_name="convd") as c:
    assert c.health()  # health needs no token
    try:
        c.conv2d(x, w)
        raise AssertionError("a call without a token was served")
    except convd.Unauthenticated:
        pass
with convd.Client(target, timeout=5, token=token) as c:  # plaintext to a TLS daemon
    try:
        c.conv2d(x, w)
        raise AssertionError("a plaintext client was served")
    except convd.Unavailable:
        pass
print("ok   TLS (tls_ca, tls_server_name) and tokens (token=, $CONVD_TOKEN); none: Unauthenticated; plaintext: Unavailable")
'''


INTERRUPT = r'''
import sys, time
import numpy as np
import convd
x = np.random.default_rng(3).standard_normal((1, 32, 640, 640), dtype=np.float32)
w = np.random.default_rng(4).standard_normal((32, 32, 3, 3), dtype=np.float32)
print("started", flush=True)
try:
    convd.Client(sys.argv[1]).conv2d(x, w, padding=1)
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
'''


def readme_example():
    """The README's Python block, verbatim."""
    with open(os.path.join(ROOT, "client", "python", "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "client/python/README.md has no python example"
    return blocks[0]


def install_package(tmp):
    """pip-installs client/python into a fresh venv under tmp (as the package's README says);
    returns that venv's python. test_python_lb.py uses it too."""
    venv = os.path.join(tmp, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    # A copy of the package: building generates stubs next to it, and the source tree stays
    # as the clone left it.
    subprocess.run(["cp", "-r", os.path.join(ROOT, "client"), os.path.join(ROOT, "proto"), tmp], check=True)
    pkg = os.path.join(tmp, "client", "python")
    for d in ("build", "convd.egg-info", "convd/v1", "convd/_health"):
        subprocess.run(["rm", "-rf", os.path.join(pkg, d)], check=True)
    r = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "--no-index", pkg],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"pip install failed:\n{r.stdout}\n{r.stderr}"
    print("ok   pip install --no-build-isolation --no-index ./client/python into a fresh venv")
    return py


def main():
    convd_bin, stub_dir, golden = (os.path.abspath(a) for a in sys.argv[1:4])
    with tempfile.TemporaryDirectory(prefix="convd-pkg-") as tmp:
        py = install_package(tmp)
        d = Daemon(convd_bin, "--listen", f"unix:{tmp}/convd.sock")
        try:
            example = readme_example().replace("127.0.0.1:50051", d.target)
            r = subprocess.run([py, "-c", example], capture_output=True, text=True, cwd=tmp, timeout=120)
            assert r.returncode == 0, f"the README example failed:\n{r.stderr}"
            assert r.stdout.strip() == "(1, 16, 64, 64) float32", r.stdout
            print(f"ok   the README example, verbatim but for the address: {r.stdout.strip()}")
            cases = os.path.join(tmp, "cases.py")
            with open(cases, "w") as f:
                f.write(CASES)
            r = subprocess.run([py, cases, d.target, d.addresses[1], HERE, golden], text=True, cwd=tmp, timeout=600)
            assert r.returncode == 0, "the package's cases failed (above)"
        finally:
            d.stop()
        # Ctrl-C: the call is cancelled on the daemon (a slow daemon: the reference kernel).
        d = Daemon(convd_bin, "--cpu-kernel", "reference", "--device-memory", "2M")
        try:
            script = os.path.join(tmp, "interrupt.py")
            with open(script, "w") as f:
                f.write(INTERRUPT)
            p = subprocess.Popen([py, script, d.target], stdout=subprocess.PIPE, text=True, cwd=tmp)
            assert p.stdout.readline().strip() == "started"
            time.sleep(1.5)
            p.send_signal(signal.SIGINT)
            out, _ = p.communicate(timeout=60)
            assert out.strip() == "interrupted", out
            deadline = time.monotonic() + 10
            while "status=CANCELLED" not in d.read_log():
                assert time.monotonic() < deadline, "the daemon did not log the call as CANCELLED"
                time.sleep(0.05)
            print("ok   Ctrl-C: KeyboardInterrupt in the caller, the daemon's call CANCELLED")
        finally:
            d.stop()
        # TLS and tokens, as the daemon takes them (certificates as the deployment test makes them).
        sys.path.insert(0, os.path.join(ROOT, "tests", "deploy"))
        from serve_deploy import certificates
        certificates(tmp)
        token = "python-package-test-token-0123"
        with open(os.path.join(tmp, "tokens"), "w") as f:
            f.write(f"lab {token}\n")
        os.chmod(os.path.join(tmp, "tokens"), 0o600)
        d = Daemon(convd_bin, "--tls-cert", os.path.join(tmp, "tls.crt"), "--tls-key", os.path.join(tmp, "tls.key"),
                   "--auth-tokens", os.path.join(tmp, "tokens"))
        try:
            secure = os.path.join(tmp, "secure.py")
            with open(secure, "w") as f:
                f.write(SECURE)
            r = subprocess.run([py, secure, d.target, os.path.join(tmp, "ca.crt"), token], text=True, cwd=tmp, timeout=120)
            assert r.returncode == 0, "the package's TLS and token cases failed (above)"
        finally:
            d.stop()


if __name__ == "__main__":
    main()
