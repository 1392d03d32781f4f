#!/usr/bin/python3
"""The deployment files, checked on a machine with no Docker engine or cluster: every Kubernetes
manifest parses and carries what the deployment needs (a GPU, gRPC probes on the health service,
the metrics port and scrape annotation); every CONVD_* variable they or the Dockerfile set is a
real flag of this build; the Dockerfile builds with the same scripts as CI, runs as non-root and
checks health with convctl; deploy/docker/collect.sh gathers a convd that starts from the
collected libraries alone; the systemd unit passes `systemd-analyze verify` (with ExecStart
pointed at this build's binary, as the unit's own path is not installed here). Each of the three
ships a secure configuration: TLS and tokens from files (Kubernetes Secrets, mounted host files,
systemd credentials), and this build's convd, given each one's settings, passes its start-up
rules (protected mode) and stops only at the secret files that are not on this machine, while
the same settings without TLS and tokens are refused.

usage: check_deploy.py SOURCE_DIR BUILD_DIR"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

src, build = sys.argv[1:3]
convd = os.path.join(build, "convd")
help_text = subprocess.run([convd, "--help"], capture_output=True, text=True).stdout
env_vars = set(re.findall(r"env (CONVD_[A-Z_]+)", help_text))
assert "CONVD_LISTEN" in env_vars and "CONVD_METRICS_LISTEN" in env_vars, help_text
# convctl's own variables (the HEALTHCHECK's TLS settings), from its usage text
convctl = os.path.join(build, "convctl")
convctl_vars = set(re.findall(r"CONVD_[A-Z_]+", subprocess.run([convctl, "--help"], capture_output=True, text=True).stdout))
assert {"CONVD_TLS_CA", "CONVD_TOKEN"} <= convctl_vars, convctl_vars


def check_env(name, where, also=()):
    assert name in env_vars or name in also, f"{where}: {name} is not an environment variable of convd ({sorted(env_vars)})"


def secrets_gate(where, args, env, files):
    """convd with a deployment's settings (args, env) must pass protected mode and stop at the
    first secret file, which is not here; without the TLS and tokens flags it must be refused."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("CONVD_")}
    run_env.update(env)
    r = subprocess.run([convd, *args], capture_output=True, text=True, env=run_env, timeout=60)
    assert r.returncode == 2 and "cannot open it" in r.stderr and any(f in r.stderr for f in files), \
        f"{where}: expected convd to pass its start-up rules and stop at a missing secret file: {r.stderr}"
    bare, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.split("=")[0] in ("--tls-cert", "--tls-key", "--auth-tokens", "--tls-client-ca"):
            skip = "=" not in a
        else:
            bare.append(a)
    r = subprocess.run([convd, *bare], capture_output=True, text=True, env=run_env, timeout=60)
    assert r.returncode == 2 and "can be reached from other machines" in r.stderr, \
        f"{where}: without TLS and tokens convd should refuse to start: {r.stderr}"


# ---- Kubernetes ---------------------------------------------------------------------------------
kdir = os.path.join(src, "deploy", "kubernetes")
docs = {}
for f in sorted(os.listdir(kdir)):
    with open(os.path.join(kdir, f)) as fh:
        for d in yaml.safe_load_all(fh):
            docs[d["kind"]] = d
assert {"Deployment", "Service", "ConfigMap"} <= set(docs), docs.keys()
for k in docs["ConfigMap"]["data"]:
    check_env(k, "configmap.yaml")
dep = docs["Deployment"]
pod = dep["spec"]["template"]
assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
c = pod["spec"]["containers"][0]
assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
assert ports == {"grpc": 50051, "metrics": 9464}, ports
# Kubernetes' gRPC probes speak plaintext only: the probes are convctl health over TLS.
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    cmd = c[probe]["exec"]["command"]
    assert cmd[:2] == ["convctl", "health"] and "127.0.0.1:50051" in cmd and "--tls-ca" in cmd, (probe, cmd)
rcmd = c["readinessProbe"]["exec"]["command"]
assert rcmd[rcmd.index("--service") + 1] == "convd.v1.Convolution", rcmd
assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
# Secrets: TLS from a Secret volume; the tokens copied by the init container into memory with
# mode 600 (convd refuses a file others can read); no secret in the environment.
vols = {v["name"]: v for v in pod["spec"]["volumes"]}
mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
kargs = dict(a[2:].split("=", 1) for a in c["args"])
assert c["command"] == ["convd"] and {"tls-cert", "tls-key", "auth-tokens"} <= set(kargs), c["args"]
for flag in ("tls-cert", "tls-key", "auth-tokens"):
    vol = vols[mounts[os.path.dirname(kargs[flag])]]
    assert "secret" in vol or "emptyDir" in vol, (flag, vol)
    if "secret" in vol:
        assert vol["secret"]["defaultMode"] & 0o007 == 0, vol
init = pod["spec"]["initContainers"][0]
assert init["command"][:3] == ["install", "-m", "0600"] and init["command"][-1] == kargs["auth-tokens"], init
assert vols[mounts[os.path.dirname(kargs["auth-tokens"])]]["emptyDir"]["medium"] == "Memory"
assert pod["spec"]["securityContext"]["fsGroup"] == 10001
assert not any(k in docs["ConfigMap"]["data"] for k in ("CONVD_TLS_CERT", "CONVD_TLS_KEY", "CONVD_AUTH_TOKENS", "CONVD_ALLOW_INSECURE"))
secrets_gate("kubernetes", c["args"], docs["ConfigMap"]["data"], [kargs["tls-cert"]])
assert pod["spec"]["terminationGracePeriodSeconds"] > int(docs["ConfigMap"]["data"]["CONVD_DRAIN_TIMEOUT"])
assert c["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
svc_ports = {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}
assert svc_ports == {"grpc": 50051, "metrics": 9464}, svc_ports
print(f"ok   kubernetes: {sorted(docs)} parse; GPU limit, convctl health probes over TLS, "
      f"metrics annotation, {len(docs['ConfigMap']['data'])} CONVD_* settings that are real flags; "
      f"TLS and tokens from Secrets pass protected mode")

# ---- Dockerfile ---------------------------------------------------------------------------------
with open(os.path.join(src, "Dockerfile")) as fh:
    df = fh.read()
froms = re.findall(r"^FROM (\S+)", df, re.M)
assert len(froms) == 2 and "devel" in froms[0] and "runtime" in froms[1], froms
assert "./deploy/install-deps.sh" in df and "ctest --test-dir build" in df
ci = open(os.path.join(src, ".ci", "run")).read()
assert "./deploy/install-deps.sh" in ci and "ctest --test-dir build" in ci
assert re.search(r"^USER 10001$", df, re.M) and re.search(r"^EXPOSE 50051 9464$", df, re.M)
assert re.search(r'^HEALTHCHECK .*\n\s*CMD \["convctl", "health"', df, re.M), "HEALTHCHECK"
for name in re.findall(r"\b(CONVD_[A-Z_]+)=", df):
    check_env(name, "Dockerfile", also=convctl_vars)
entry = json.loads(re.search(r"^ENTRYPOINT (\[.*?\])", df.replace("\\\n", " "), re.M | re.S).group(1))
assert entry[0] == "convd" and {"--tls-cert", "--tls-key", "--auth-tokens"} <= set(entry), entry
df_code = "\n".join(l for l in df.splitlines() if not l.lstrip().startswith("#"))
denv = dict(re.findall(r"\b(CONVD_[A-Z_]+)=(\S+)", df_code))
assert not {"CONVD_TLS_CERT", "CONVD_TLS_KEY", "CONVD_ALLOW_INSECURE"} & set(denv), denv
secrets_gate("Dockerfile", entry[1:], {k: v for k, v in denv.items() if k in env_vars}, ["/etc/convd/tls/tls.crt"])
print("ok   Dockerfile: two stages (devel build, runtime), CI's scripts and tests, non-root, "
      "EXPOSE 50051 9464, HEALTHCHECK by convctl health; TLS and tokens from mounted files pass "
      "protected mode")

# ---- collect.sh: the runtime stage's files work on their own -----------------------------------
with tempfile.TemporaryDirectory() as d:
    out = subprocess.run([os.path.join(src, "deploy", "docker", "collect.sh"), build, d],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(d, "lib"))
    r = subprocess.run([os.path.join(d, "bin", "convd"), "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "CONVD_LISTEN" in r.stdout, r.stderr
    ldd = subprocess.run(["ldd", os.path.join(d, "bin", "convd")], capture_output=True, text=True, env=env).stdout
    for lib in ("libgrpc", "libprotobuf-c", "libuv", "libxxhash"):
        line = [l for l in ldd.splitlines() if lib in l]
        assert line and d in line[0], f"{lib} is not taken from the collected libraries: {line}"
    print(f"ok   collect.sh: {out.stdout.strip()}; the collected convd starts and loads them")

# ---- systemd ------------------------------------------------------------------------------------
analyze = shutil.which("systemd-analyze")
if analyze is None:
    print("skip systemd unit: systemd-analyze is not installed here")
else:
    with open(os.path.join(src, "deploy", "systemd", "convd.service")) as fh:
        unit = fh.read()
    assert "ExecStart=/usr/bin/convd" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    creds = dict(re.findall(r"^LoadCredential=([^:\s]+):(\S+)$", unit, re.M))
    for flag in ("--tls-cert", "--tls-key", "--auth-tokens"):
        path = exec_start[exec_start.index(flag) + 1]
        assert path.startswith("%d/") and path[3:] in creds, (flag, path, creds)
    example = re.search(r'CONVD_ARGS="([^"]*)"', unit).group(1).split()  # the example in its comment
    sargs = [a.replace("%d", "/run/credentials/convd.service").replace("/var/log/convd/convd.log", os.devnull)
             for a in exec_start[1:] if a != "$CONVD_ARGS"]
    secrets_gate("systemd", sargs + example, {}, ["/run/credentials/convd.service/tls.crt"])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "convd.service")
        with open(path, "w") as fh:
            fh.write(unit.replace("/usr/bin/convd", os.path.abspath(convd)))
        r = subprocess.run([analyze, "verify", path], capture_output=True, text=True)
        problems = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
        assert r.returncode == 0 and not problems, "\n".join(problems)
    print("ok   systemd unit: systemd-analyze verify passes; TLS and tokens as credentials pass protected mode")
# ---- docs/operations.md names every flag ---------------------------------------------------------
ops = open(os.path.join(src, "docs", "operations.md")).read()
flags = re.findall(r"^  (--[a-z-]+)", help_text, re.M)
missing = [f for f in flags if f"`{f}`" not in ops]
assert not missing, f"docs/operations.md lacks {missing}"
print(f"ok   docs/operations.md lists all {len(flags)} flags")
print("deploy: all checks passed")
