#!/usr/bin/python3
"""The deployment files, checked on a machine with no Docker engine or cluster: every Kubernetes
manifest parses and carries what the deployment needs (a GPU, gRPC probes on the health service,
the metrics port and scrape annotation); every CONVD_* variable they or the Dockerfile set is a
real flag of this build; the Dockerfile builds with the same scripts as CI, runs as non-root and
checks health with convctl; deploy/docker/collect.sh gathers a convd that starts from the
collected libraries alone; the systemd unit passes `systemd-analyze verify` (with ExecStart
pointed at this build's binary, as the unit's own path is not installed here).

usage: check_deploy.py SOURCE_DIR BUILD_DIR"""
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


def check_env(name, where):
    assert name in env_vars, f"{where}: {name} is not an environment variable of convd ({sorted(env_vars)})"


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
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    assert c[probe]["grpc"]["port"] == 50051, probe
assert c["readinessProbe"]["grpc"]["service"] == "convd.v1.Convolution"
assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
assert pod["spec"]["terminationGracePeriodSeconds"] > int(docs["ConfigMap"]["data"]["CONVD_DRAIN_TIMEOUT"])
assert c["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
svc_ports = {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}
assert svc_ports == {"grpc": 50051, "metrics": 9464}, svc_ports
print(f"ok   kubernetes: {sorted(docs)} parse; GPU limit, gRPC probes on the health service, "
      f"metrics annotation, {len(docs['ConfigMap']['data'])} CONVD_* settings that are real flags")

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
    check_env(name, "Dockerfile")
print("ok   Dockerfile: two stages (devel build, runtime), CI's scripts and tests, non-root, "
      "EXPOSE 50051 9464, HEALTHCHECK by convctl health")

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
    assert "ExecStart=/usr/local/bin/convd" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "convd.service")
        with open(path, "w") as fh:
            fh.write(unit.replace("/usr/local/bin/convd", os.path.abspath(convd)))
        r = subprocess.run([analyze, "verify", path], capture_output=True, text=True)
        problems = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
        assert r.returncode == 0 and not problems, "\n".join(problems)
    print("ok   systemd unit: systemd-analyze verify passes")
# ---- docs/operations.md names every flag ---------------------------------------------------------
ops = open(os.path.join(src, "docs", "operations.md")).read()
flags = re.findall(r"^  (--[a-z-]+)", help_text, re.M)
missing = [f for f in flags if f"`{f}`" not in ops]
assert not missing, f"docs/operations.md lacks {missing}"
print(f"ok   docs/operations.md lists all {len(flags)} flags")
print("deploy: all checks passed")
