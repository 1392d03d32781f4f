#!/usr/bin/python3
"""Unix-socket listeners beside TCP (--listen repeated, --unix-socket-mode): the socket file's
mode whatever the umask; every golden case streamed over the socket with the Python stubs and
compared element by element; convctl health and devices over it; the listening lines (first
the first --listen, then one per address, then metrics); a stale socket file replaced, a live
one (a second daemon) and a file that is not a socket refused naming the path, the first daemon
still serving; bad addresses refused at start; protected mode over every listener; the file
gone after SIGTERM; --max-connections counting Unix and TCP connections together.

usage: test_unix.py CONVD_BINARY STUB_DIR GOLDEN_DIR CONVCTL_BINARY"""
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import grpc

from convd_harness import Daemon, check_close, collect_output, conv_requests, import_stubs, \
    load_golden, spec_from_params

pb = pb_grpc = hpb = hpb_grpc = None
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def socket_mode(path):
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket: {st.st_mode:o}"
    return stat.S_IMODE(st.st_mode)


def health(target):
    with grpc.insecure_channel(target) as ch:
        r = hpb_grpc.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=10)
    assert r.status == hpb.HealthCheckResponse.SERVING, r


def with_umask(mask, fn):
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


def refused(convd, *args, env=None):
    """Runs convd expecting it to stop at start: (exit status, stderr)."""
    r = subprocess.run([convd, "--log-level", "warn", *args], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode != 0, f"convd {' '.join(args)} started: {r.stdout}{r.stderr}"
    return r.returncode, r.stderr


def case_serve(convd, convctl, golden, tmp):
    """Both listeners serve; golden cases over the socket; convctl; mode 0660 under umask 077;
    the file removed at exit."""
    path = os.path.join(tmp, "convd.sock")
    d = with_umask(0o077, lambda: Daemon(convd, "--listen", f"unix:{path}", "--chunk-bytes", "3000",
                                         "--metrics-listen", "127.0.0.1:0"))
    try:
        assert d.addresses == [d.target, f"unix:{path}"], d.addresses
        assert d.metrics_url and d.metrics_url.startswith("http://127.0.0.1:"), d.metrics_url
        mode = socket_mode(path)
        assert mode == 0o660, f"socket mode {mode:04o}, expected 0660 (umask was 077)"
        cases = 0
        with grpc.insecure_channel(f"unix:{path}") as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            for name, params, a in load_golden(golden):
                b = a.get("bias")
                spec = spec_from_params(pb, params, b is not None)
                y, accepted, summary = collect_output(
                    stub.Conv2d(conv_requests(pb, spec, a["input"], a["weight"], b, 2000), timeout=60))
                assert accepted is not None and summary is not None, name
                check_close(y, a["expected"])
                cases += 1
        assert cases >= 19, cases
        health(d.target)  # TCP beside it
        r = subprocess.run([convctl, "health", "--server", f"unix:{path}", "--timeout", "10"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "SERVING" in r.stdout, f"convctl health: {r.stdout}{r.stderr}"
        r = subprocess.run([convctl, "devices", "--server", f"unix:{path}"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "cpu0" in r.stdout, f"convctl devices: {r.stdout}{r.stderr}"
        log = d.read_log()
        assert f'address=unix:{path} ' in log and "socket_mode=0660" in log, log
    finally:
        d.stop()
    assert not os.path.lexists(path), "the socket file is still there after SIGTERM"
    return f"{cases} golden cases over unix:, convctl health and devices, mode 0660, removed at exit"


def case_mode(convd, tmp):
    """--unix-socket-mode 0600 under umask 0: the file is never left as open as the umask says."""
    path = os.path.join(tmp, "mode.sock")
    d = with_umask(0, lambda: Daemon(convd, "--listen", f"unix:{path}", "--unix-socket-mode", "0600"))
    try:
        mode = socket_mode(path)
        assert mode == 0o600, f"socket mode {mode:04o}, expected 0600"
        health(f"unix:{path}")
    finally:
        d.stop()
    assert not os.path.lexists(path)
    return "0600"


def case_stale_and_live(convd, tmp):
    """A socket file nothing listens on is replaced; a second daemon on a live one stops, naming
    the path, and the first keeps serving on it."""
    path = os.path.join(tmp, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # not unlinked: what a crashed daemon leaves
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    d = Daemon(convd, "--listen", f"unix:{path}")
    try:
        health(f"unix:{path}")
        assert "removed a stale socket file" in d.read_log(), d.read_log()
        rc, err = refused(convd, "--listen", "127.0.0.1:0", "--listen", f"unix:{path}")
        assert path in err and "another convd is serving there" in err, err
        health(f"unix:{path}")  # a new connection: the file is still the first daemon's
        socket_mode(path)
        # A start that fails on a later address (the first daemon's port) leaves no socket file.
        other = os.path.join(tmp, "failed-start.sock")
        rc2, err = refused(convd, "--listen", f"unix:{other}", "--listen", d.target)
        assert "in use" in err and not os.path.lexists(other), (err, os.listdir(tmp))
    finally:
        d.stop()
    assert not os.path.lexists(path)
    return (f"stale one replaced; a live one refused the second daemon (exit {rc}); a failed "
            f"start removed the socket it bound")


def case_refused(convd, tmp):
    """Addresses refused at start, each with a message that says why."""
    plain = os.path.join(tmp, "not-a-socket")
    with open(plain, "w") as f:
        f.write("keep me\n")
    checks = [
        (["--listen", "unix:convd.sock"], ["unix:convd.sock", "must be absolute"]),
        (["--listen", f"unix:{plain}"], [plain, "exists and is not a socket"]),
        (["--listen", "unix:/" + "d" * 120 + ".sock"], ["longer than the 107"]),
        (["--listen", "unix-abstract:convd"], ["abstract", "unix:/absolute/path"]),
        (["--listen", "unix:" + os.path.join(tmp, "no-such-dir", "x.sock")], ["no-such-dir", "No such file"]),
        (["--listen", "127.0.0.1:0,127.0.0.1:0"], ["one address per --listen"]),
        (["--listen", "localhost"], ["expected HOST:PORT", "unix:/absolute/path"]),
        (["--listen", "unix:/tmp/x.sock", "--listen", "unix:/tmp/x.sock"], ["unix:/tmp/x.sock is given twice"]),
        ([a for _ in range(9) for a in ("--listen", "127.0.0.1:0")], ["at most 8 addresses"]),
        (["--unix-socket-mode", "0689"], ["--unix-socket-mode=0689", "octal"]),
        # protected mode looks at every listener, not only the last one given
        (["--listen", "0.0.0.0:0", "--listen", "unix:" + os.path.join(tmp, "p.sock")],
         ["--listen 0.0.0.0:0 can be reached from other machines"]),
    ]
    for args, words in checks:
        rc, err = refused(convd, *args)
        for w in words:
            assert w in err, f"convd {' '.join(args)}: {w!r} not in {err!r}"
    with open(plain) as f:
        assert f.read() == "keep me\n", "the file that is not a socket was changed"
    env = dict(os.environ, CONVD_LISTEN="127.0.0.1:0,,unix:/tmp/x.sock")
    rc, err = refused(convd, env=env)
    assert "CONVD_LISTEN: an empty address" in err, err
    assert not os.path.lexists(os.path.join(tmp, "p.sock"))
    return f"{len(checks) + 1} bad starts refused"


def case_environment(convd, tmp):
    """CONVD_LISTEN with two addresses serves both; a --listen flag replaces the variable's."""
    path = os.path.join(tmp, "env.sock")
    env = dict(os.environ, CONVD_LISTEN=f"127.0.0.1:0, unix:{path}")
    p = subprocess.Popen([convd, "--log-level", "warn"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        first, second = p.stdout.readline().strip(), p.stdout.readline().strip()
        assert re.match(r"^convd listening on 127\.0\.0\.1:\d+$", first), first
        assert second == f"convd listening on unix:{path}", second
        health(first.rsplit(" ", 1)[1])
        health(f"unix:{path}")
    finally:
        p.terminate()
        assert p.wait(60) == 0, p.stderr.read()
    assert not os.path.lexists(path)
    # Flags replace the variable's list (the harness's --listen 127.0.0.1:0 comes first).
    from_env, from_flag = os.path.join(tmp, "from-env.sock"), os.path.join(tmp, "flag.sock")
    os.environ["CONVD_LISTEN"] = f"unix:{from_env}"
    try:
        d = Daemon(convd, "--listen", f"unix:{from_flag}")
    finally:
        del os.environ["CONVD_LISTEN"]
    try:
        assert d.addresses == [d.target, f"unix:{from_flag}"], d.addresses
        assert not os.path.lexists(from_env), "CONVD_LISTEN was served beside --listen"
    finally:
        d.stop()
    return "two addresses from CONVD_LISTEN; --listen flags replace them"


def case_fd_socket(convd, tmp):
    """The descriptor socket beside a unix: listener: its mode, a stale one replaced, removed at
    exit, none with --max-shm-bytes 0, and a path too long for it is a warning, not a failure."""
    path = os.path.join(tmp, "fd.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(path + ".fd")
    stale.close()  # what a crashed daemon leaves
    d = with_umask(0, lambda: Daemon(convd, "--listen", f"unix:{path}", "--unix-socket-mode", "0600"))
    try:
        mode = socket_mode(path + ".fd")
        assert mode == 0o600, f"descriptor socket mode {mode:04o}, expected 0600"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as so:
            so.settimeout(10)
            so.connect(path + ".fd")
            so.send(b"convd-region/1")  # no descriptor
            ans = so.recv(1024).decode()
        assert ans.startswith("error INVALID_ARGUMENT") and "got 0" in ans, ans
    finally:
        d.stop()
    assert not os.path.lexists(path + ".fd"), "the descriptor socket outlived the daemon"
    d = Daemon(convd, "--listen", f"unix:{path}", "--max-shm-bytes", "0")
    try:
        assert not os.path.lexists(path + ".fd"), "a descriptor socket without shared memory"
    finally:
        d.stop()
    # 105 bytes: room for the gRPC socket, none for ".fd" beside it.
    deep = os.path.join(tmp, "l" * (104 - len(tmp) - 6))
    os.makedirs(deep, exist_ok=True)
    long_path = os.path.join(deep, "x.sock")
    assert 104 <= len(long_path) <= 107, len(long_path)
    d = Daemon(convd, "--listen", f"unix:{long_path}")
    try:
        health(f"unix:{long_path}")
        assert "no descriptor socket" in d.read_log(), d.read_log()
        assert not os.path.lexists(long_path + ".fd")
    finally:
        d.stop()
    return "mode 0600, stale one replaced, removed at exit, none without shared memory, a long path warned"


def unix_preface(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(PREFACE)
    return s


def tcp_preface(target):
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(PREFACE)
    return s


def closed_within(sock, seconds, t0):
    """Seconds from t0 until the daemon closed the connection, or None."""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


def case_max_connections(convd, tmp):
    """--max-connections 2 counts connections to the socket and to the TCP port together: a
    third, on either, is closed; the counted ones are left alone."""
    path = os.path.join(tmp, "limit.sock")
    d = Daemon(convd, "--listen", f"unix:{path}", "--max-connections", "2",
               "--connection-idle-timeout", "60", "--handshake-timeout", "60")
    held = []
    try:
        for _ in range(2):
            held.append(unix_preface(path))
            time.sleep(0.4)  # each one seen by a scan (every 100 ms) before the next arrives, under load too
        t0 = time.monotonic()
        third = unix_preface(path)
        t_unix = closed_within(third, 3, t0)
        third.close()
        assert t_unix is not None, "a 3rd Unix-socket connection was still open after 3 s with --max-connections 2"
        t0 = time.monotonic()
        tcp = tcp_preface(d.target)
        t_tcp = closed_within(tcp, 3, t0)
        tcp.close()
        assert t_tcp is not None, "a TCP connection beyond 2 Unix-socket ones was still open after 3 s"
        for s in held:
            assert closed_within(s, 0.3, time.monotonic()) is None, "a counted connection was closed"
        held.pop().close()
        time.sleep(0.5)
        held.append(tcp_preface(d.target))  # the freed slot, now a TCP one
        time.sleep(0.5)
        t0 = time.monotonic()
        third = unix_preface(path)
        t_again = closed_within(third, 3, t0)
        third.close()
        assert t_again is not None, "a Unix-socket connection beyond one Unix and one TCP was still open"
        assert "--max-connections reached" in d.read_log(), "the refusal was not logged"
    finally:
        for s in held:
            s.close()
        d.stop()
    return (f"3rd closed after {t_unix * 1e3:.0f} ms (unix), {t_tcp * 1e3:.0f} ms (TCP), "
            f"{t_again * 1e3:.0f} ms (unix beside TCP)")


def main():
    global pb, pb_grpc, hpb, hpb_grpc
    convd, stub_dir, golden, convctl = sys.argv[1:5]
    pb, pb_grpc = import_stubs(stub_dir)
    from grpc_health_v1 import health_pb2, health_pb2_grpc  # noqa: E402  (from STUB_DIR)
    hpb, hpb_grpc = health_pb2, health_pb2_grpc
    tmp = tempfile.mkdtemp(prefix="convd-unix-")
    try:
        cases = [("serve over unix: beside TCP", lambda: case_serve(convd, convctl, golden, tmp)),
                 ("--unix-socket-mode", lambda: case_mode(convd, tmp)),
                 ("stale and live socket files", lambda: case_stale_and_live(convd, tmp)),
                 ("refused at start", lambda: case_refused(convd, tmp)),
                 ("CONVD_LISTEN", lambda: case_environment(convd, tmp)),
                 ("the descriptor socket", lambda: case_fd_socket(convd, tmp)),
                 ("--max-connections", lambda: case_max_connections(convd, tmp))]
        for name, fn in cases:
            t0 = time.monotonic()
            what = fn()
            print(f"ok   {name} ({time.monotonic() - t0:.1f} s): {what}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"unix: {len(cases)} cases passed")


if __name__ == "__main__":
    main()
