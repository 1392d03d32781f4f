#!/usr/bin/python3
"""The shipped deployment files start a daemon that serves, secured as they say: the systemd
unit and the Kubernetes DaemonSet + ConfigMap are read as files (not copied into this test),
their command lines and environment run here with their paths mapped into a temporary
directory, their secrets made here and their addresses moved onto loopback (tests listen on
loopback only), and their probes' commands are run against the daemon. The pod's daemon runs
under a fixture cgroup holding the DaemonSet's memory and CPU limits as the kubelet writes them
(memory.max, cpu.max; CONVD_CGROUP_ROOT), and its defaults must follow them. check_deploy.py checks
the files themselves (syntax, systemd-analyze, protected mode). What this cannot show: the container image, systemd's sandboxing and credentials,
Kubernetes' scheduling and GPU plugin; docs/operations.md says so.

usage: serve_deploy.py CONVD_BINARY CONVCTL_BINARY SOURCE_DIR"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

TOKEN = "deploy-test-token-0123456789abcdef"


def certificates(d):
    """A CA and a server certificate for the name the probes check ("convd") and 127.0.0.1."""
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=convd-deploy-test-ca")
    run("openssl", "req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=convd")
    with open(os.path.join(d, "san.cnf"), "w") as f:
        f.write("subjectAltName=DNS:convd,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "san.cnf")


def start(argv, env):
    """The daemon with argv and env; its gRPC port (from the line scripts wait for)."""
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.match(r"convd listening on \S+:(\d+)$", line.strip())
    if not m:
        p.kill()
        raise AssertionError(f"the daemon did not start: {line!r}\n{p.stderr.read()}")
    return p, int(m.group(1))


def stop(p, what):
    """SIGTERM, a clean exit; returns the daemon's log (stderr)."""
    p.send_signal(signal.SIGTERM)
    rc = p.wait(60)
    err = p.stderr.read()
    assert rc == 0, f"{what}: exit {rc}\n{err}"
    assert "Sanitizer" not in err and "runtime error" not in err, f"{what}: sanitizer report\n{err}"
    return err


UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def cgroup_fixture(d, limits):
    """A tree standing for / as a container with these Kubernetes limits sees it (cgroup v2 with a
    cgroup namespace): memory.max in bytes, cpu.max as QUOTA PERIOD with the kubelet's period."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?", str(limits["memory"]))
    mem = int(m.group(1)) * UNITS.get(m.group(2) or "", 1)
    cpu = str(limits["cpu"])
    quota = int(cpu[:-1]) * 100 if cpu.endswith("m") else int(float(cpu) * 100000)
    os.makedirs(os.path.join(d, "proc/self"))
    os.makedirs(os.path.join(d, "sys/fs/cgroup"))
    for rel, text in (("proc/self/cgroup", "0::/\n"), ("sys/fs/cgroup/memory.max", f"{mem}\n"),
                      ("sys/fs/cgroup/cpu.max", f"{quota} 100000\n")):
        with open(os.path.join(d, rel), "w") as f:
            f.write(text)
    return mem, -(-quota // 100000)


def served(convctl, port, ca, token_file, what):
    """health without a token (probes send none), then ListDevices with the token and without."""
    tls = ["--tls-ca", ca, "--tls-server-name", "convd"]
    r = subprocess.run([convctl, "health", "--server", f"127.0.0.1:{port}", *tls, "--timeout", "10"],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{what}: health: {r.stdout}{r.stderr}"
    r = subprocess.run([convctl, "devices", "--server", f"127.0.0.1:{port}", *tls, "--token-file", token_file],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "cpu" in r.stdout.lower(), f"{what}: devices with the token: {r.stdout}{r.stderr}"
    r = subprocess.run([convctl, "devices", "--server", f"127.0.0.1:{port}", *tls], capture_output=True, text=True)
    assert r.returncode != 0 and "UNAUTHENTICATED" in (r.stdout + r.stderr), \
        f"{what}: devices without a token was not refused: {r.stdout}{r.stderr}"
    r = subprocess.run([convctl, "health", "--server", f"127.0.0.1:{port}", "--timeout", "3"],
                       capture_output=True, text=True)
    assert r.returncode != 0, f"{what}: a plaintext client was served"


def systemd_case(convd, convctl, src, tmp):
    unit = open(os.path.join(src, "deploy/systemd/convd.service")).read()
    # The credentials the unit loads, in a directory standing for %d.
    creds = os.path.join(tmp, "credentials")
    os.mkdir(creds)
    for name in ("tls.crt", "tls.key"):
        shutil.copy(os.path.join(tmp, name), creds)
    with open(os.path.join(creds, "tokens"), "w") as f:
        f.write(f"lab {TOKEN}\n")
    for name in os.listdir(creds):
        os.chmod(os.path.join(creds, name), 0o400)  # as systemd hands credentials over
    loads = re.findall(r"^LoadCredential=([^:\n]+):", unit, re.M)
    assert sorted(loads) == sorted(os.listdir(creds)), f"the unit loads {loads}"
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    # The documented /etc/default/convd example, with its addresses on loopback.
    example = re.search(r'CONVD_ARGS="([^"]*)"', unit).group(1)
    args = example.replace("0.0.0.0:50051", "127.0.0.1:0").replace("127.0.0.1:9464", "127.0.0.1:0")
    cmd = exec_start.replace("%d", creds).replace("$CONVD_ARGS", args)
    argv = shlex.split(cmd)
    assert argv[0] == "/usr/bin/convd", argv
    log = os.path.join(tmp, "systemd.log")
    argv = [convd] + [a if a != "/var/log/convd/convd.log" else log for a in argv[1:]]
    p, port = start(argv, {k: v for k, v in os.environ.items() if not k.startswith("CONVD_")})
    try:
        token_file = os.path.join(tmp, "token")
        served(convctl, port, os.path.join(tmp, "ca.crt"), token_file, "systemd unit")
    finally:
        stop(p, "systemd unit")
    text = open(log).read()
    assert "tls=on" in text and "tokens=1" in text, f"the unit's daemon did not log TLS and tokens:\n{text}"
    return "ExecStart served TLS + tokens, refused plaintext and a missing token"


def client_example(convctl, src, port, ca):
    """client-example.yaml's command with its environment, against the pod's daemon: its
    dns:/// target with the headless Service's name replaced by localhost (which resolves to
    127.0.0.1, where the daemon is, and maybe ::1, where none is: round_robin uses the one that
    answers), the CA and token from here."""
    with open(os.path.join(src, "deploy/kubernetes/client-example.yaml")) as f:
        (job,) = yaml.safe_load_all(f)
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVD_")}
    env["PATH"] = os.path.dirname(convctl) + os.pathsep + env.get("PATH", "")
    for e in c["env"]:
        env[e["name"]] = e.get("value", "")
    assert re.fullmatch(r"dns:///[a-z0-9.-]+:50051", env["CONVD_SERVER"]), env["CONVD_SERVER"]
    env["CONVD_SERVER"] = f"dns:///localhost:{port}"
    env["CONVD_TLS_CA"] = ca
    env["CONVD_TOKEN"] = TOKEN
    r = subprocess.run(c["command"] + c.get("args", []), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "SERVING" in r.stdout and "cpu" in r.stdout.lower(), \
        f"the client example's command: {r.stdout}{r.stderr}"


def kubernetes_case(convd, convctl, src, tmp):
    docs = {}
    for name in ("daemonset.yaml", "configmap.yaml", "service.yaml"):
        with open(os.path.join(src, "deploy/kubernetes", name)) as f:
            for doc in yaml.safe_load_all(f):
                docs[doc["kind"]] = doc
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "convd"]
    env = dict(docs["ConfigMap"]["data"])
    assert container["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["CONVD_LISTEN"].endswith(f":{ports['grpc']}"), (env["CONVD_LISTEN"], ports)
    svc_ports = {p.get("targetPort", p["port"]) for p in docs["Service"]["spec"]["ports"]}
    assert "grpc" in svc_ports or ports["grpc"] in svc_ports, f"the Service does not reach gRPC: {svc_ports}"
    # Mounts: the secret volumes map to directories here.
    mounts = {}
    for m in container["volumeMounts"]:
        d = os.path.join(tmp, "k8s" + m["mountPath"].replace("/", "_"))
        os.makedirs(d, exist_ok=True)
        mounts[m["mountPath"]] = d
    tls_dir = mounts["/etc/convd/tls"]
    for name in ("tls.crt", "tls.key", "ca.crt"):
        shutil.copy(os.path.join(tmp, name), tls_dir)
        os.chmod(os.path.join(tls_dir, name), 0o440)  # the secret volume's defaultMode
    secret_dir = os.path.join(tmp, "k8s_secret_tokens")
    os.mkdir(secret_dir)
    with open(os.path.join(secret_dir, "tokens"), "w") as f:
        f.write(f"lab {TOKEN}\n")
    os.chmod(os.path.join(secret_dir, "tokens"), 0o440)

    def mapped(arg):
        for path, d in {**mounts, "/secrets/tokens": secret_dir}.items():
            arg = arg.replace(path + "/", d + "/")
        return arg

    # The init container's command: the tokens copied with the mode the daemon accepts.
    (init,) = pod["initContainers"]
    r = subprocess.run([mapped(a) for a in init["command"]], capture_output=True, text=True)
    assert r.returncode == 0, f"the init container's command: {r.stderr}"
    env.update(CONVD_LISTEN="127.0.0.1:0", CONVD_METRICS_LISTEN="127.0.0.1:0",
               CONVD_GPUS="0")  # no GPU here; the manifest's own value is checked above
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONVD_")}
    full_env.update(env)
    # The container's cgroup, as the kubelet sets it from the limits.
    cg_root = os.path.join(tmp, "k8s_cgroup")
    mem_limit, cpu_limit = cgroup_fixture(cg_root, container["resources"]["limits"])
    full_env["CONVD_CGROUP_ROOT"] = cg_root
    assert container["command"] == ["convd"], container["command"]
    p, port = start([convd] + [mapped(a) for a in container["args"]], full_env)
    log = ""
    try:
        line = p.stdout.readline()
        m = re.match(r"convd metrics on (http://\S+)$", line.strip())
        assert m, f"the pod's daemon did not report its metrics address: {line!r}"
        with urllib.request.urlopen(m.group(1), timeout=10) as r:
            inflight_metric = int(float(re.search(r"^convd_inflight_bytes_limit (\S+)$", r.read().decode(), re.M).group(1)))
        served(convctl, port, os.path.join(tls_dir, "ca.crt"), os.path.join(tmp, "token"), "Kubernetes pod")
        probes = 0
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            argv = [mapped(a) for a in container[kind]["exec"]["command"]]
            assert argv[0] == "convctl", argv
            argv = [convctl] + [a.replace("127.0.0.1:50051", f"127.0.0.1:{port}") for a in argv[1:]]
            t0 = time.monotonic()
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            took = time.monotonic() - t0
            assert r.returncode == 0, f"{kind}: {r.stdout}{r.stderr}"
            assert took < container[kind]["timeoutSeconds"], f"{kind} took {took:.1f} s"
            probes += 1
        client_example(convctl, src, port, os.path.join(tls_dir, "ca.crt"))
    finally:
        log = stop(p, "Kubernetes pod")
    # The defaults follow the pod's limits: 3/4 and 1/2 of the memory limit (or of physical memory
    # where that is lower: the limit then binds nothing), the CPU limit (or the online CPUs).
    (limits_line,) = [l for l in log.splitlines() if 'msg="memory and CPU limits"' in l]
    got = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', limits_line))
    physical, online = int(got["physical_memory_bytes"]), int(got["online_cpus"])
    mem = min(mem_limit, physical)
    assert int(got["memory_bytes"]) == mem, (mem_limit, got)
    assert got["memory_from"] == (f'"{cg_root}/sys/fs/cgroup/memory.max"' if mem_limit < physical else "physical"), got
    assert int(got["max_inflight_bytes"]) == mem // 4 * 3 == inflight_metric, (got, inflight_metric)
    assert int(got["max_request_bytes"]) == mem // 2, got
    assert int(got["cpu_threads"]) == min(cpu_limit, online), got
    assert "together exceed the memory" not in log, f"the pod's settings over-commit its memory:\n{log}"
    which = "the limit" if mem_limit < physical else f"physical memory, {physical >> 20} MiB here, below the limit"
    return (f"init container, {probes} probes, the client example (dns:///, round_robin) and the "
            f"container's args served TLS + tokens; under its "
            f"limits ({container['resources']['limits']['memory']}, {container['resources']['limits']['cpu']} CPUs) "
            f"the daemon admitted {int(got['max_inflight_bytes']) >> 20} MiB in flight (3/4 of {which}) and ran "
            f"{got['cpu_threads']} CPU threads")


def main():
    convd, convctl, src = (os.path.abspath(a) for a in sys.argv[1:4])
    if shutil.which("openssl") is None:
        print("SKIPPED: no openssl to make certificates")
        sys.exit(77)
    with tempfile.TemporaryDirectory(prefix="convd-deploy-") as tmp:
        certificates(tmp)
        with open(os.path.join(tmp, "token"), "w") as f:
            f.write(TOKEN + "\n")
        os.chmod(os.path.join(tmp, "token"), 0o600)
        for name, fn in (("systemd unit", systemd_case), ("Kubernetes DaemonSet", kubernetes_case)):
            print(f"ok   {name}: {fn(convd, convctl, src, tmp)}", flush=True)


if __name__ == "__main__":
    main()
