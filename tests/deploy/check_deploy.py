#!/usr/bin/python3
"""The deployment files, checked on a machine with no Docker engine or cluster: every Kubernetes
manifest parses and carries what the deployment needs (a DaemonSet with a GPU, memory and CPU
limits the daemon's defaults follow, gRPC probes on the health service, the metrics port and
scrape annotation); every CONVD_* variable they or the Dockerfile set is a real flag of this
build; the Dockerfile's build stage is Debian 12 running CI's own line (deploy/install-deps.sh,
cmake, ctest), every Debian package it names exists in Debian 12 (NVIDIA's, from NVIDIA's
repository, cannot be checked here and are only checked for consistency), the runtime stage
copies what `cmake --install` installs and its packages ship every library the binaries load
(ldd, dpkg -S; CUDA's aside), it runs as non-root and checks health with convctl; the systemd
unit passes `systemd-analyze verify` (with ExecStart pointed at this build's binary, as the
unit's own path is not installed here). Each of the three ships a secure configuration: TLS and
tokens from files (Kubernetes Secrets, mounted host files, systemd credentials), and this
build's convd, given each one's settings, passes its start-up rules (protected mode) and stops
only at the secret files that are not on this machine, while the same settings without TLS and
tokens are refused. Not run: `docker build` (no engine), `kubectl apply` (no cluster).

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
docs, services = {}, {}
for f in sorted(os.listdir(kdir)):
    with open(os.path.join(kdir, f)) as fh:
        for d in yaml.safe_load_all(fh):
            if d["kind"] == "Service":
                services[d["metadata"]["name"]] = d
            else:
                assert d["kind"] not in docs, f"{f}: a second {d['kind']}"
                docs[d["kind"]] = d
docs["Service"] = services["convd"]
assert {"DaemonSet", "Service", "ConfigMap", "Job"} <= set(docs), docs.keys()
assert set(services) == {"convd", "convd-headless"}, services.keys()
assert "Deployment" not in docs, "one pod per GPU node: a DaemonSet, not a Deployment"
for k in docs["ConfigMap"]["data"]:
    check_env(k, "configmap.yaml")
ds = docs["DaemonSet"]
# Which nodes: a GPU nodeSelector and a toleration offered as commented options.
ds_text = open(os.path.join(kdir, "daemonset.yaml")).read()
assert re.search(r"^\s*# nodeSelector:\n\s*#\s+nvidia.com/gpu.present: \"true\"", ds_text, re.M), "nodeSelector option"
assert re.search(r"^\s*# tolerations:\n\s*#\s+- key: nvidia.com/gpu", ds_text, re.M), "toleration option"
assert "replicas" not in ds["spec"] and ds["spec"]["updateStrategy"]["type"] == "RollingUpdate", ds["spec"]
assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
pod = ds["spec"]["template"]
assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
c = pod["spec"]["containers"][0]
assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
# Memory and CPU limits, which the daemon's defaults follow (its cgroup's): so the ConfigMap
# must not pin what they would derive, and the weights registry must fit beside 3/4 of the limit.
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def k8s_bytes(q):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?", str(q))
    assert m, f"unexpected memory quantity {q!r}"
    return int(m.group(1)) * UNITS.get(m.group(2) or "", 1)


def convd_bytes(v):
    m = re.fullmatch(r"(\d+)([KMGT])?", v)
    assert m, v
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " "))


limits, requests = c["resources"]["limits"], c["resources"]["requests"]
assert "memory" in limits and "cpu" in limits, f"memory and CPU limits: {limits}"
assert requests["memory"] == limits["memory"] and requests["cpu"] == limits["cpu"], "Guaranteed QoS: requests = limits"
cm = docs["ConfigMap"]["data"]
pinned = {"CONVD_MAX_INFLIGHT_BYTES", "CONVD_MAX_REQUEST_BYTES", "CONVD_CPU_THREADS"} & set(cm)
assert not pinned, f"the ConfigMap pins {pinned}: the daemon derives them from the pod's limits"
mem_limit = k8s_bytes(limits["memory"])
assert mem_limit // 4 * 3 + convd_bytes(cm.get("CONVD_WEIGHTS_MEMORY", "1G")) < mem_limit, \
    "3/4 of the memory limit in flight plus CONVD_WEIGHTS_MEMORY exceed the limit"
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
# The headless Service clients balance over: no cluster IP, the DaemonSet's pods, ready ones
# only, the gRPC port.
hs = services["convd-headless"]
assert hs["spec"]["clusterIP"] == "None" and not hs["spec"].get("publishNotReadyAddresses", False), hs["spec"]
assert hs["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), hs["spec"]["selector"]
assert [(p["name"], p["port"], p["targetPort"]) for p in hs["spec"]["ports"]] == [("grpc", 50051, "grpc")], hs["spec"]
# Connections age out, so that balancing clients re-resolve the headless name (a real flag's
# value: secrets_gate above ran convd with this ConfigMap).
assert float(cm.get("CONVD_MAX_CONNECTION_AGE", "0")) > 0, "the ConfigMap sets no CONVD_MAX_CONNECTION_AGE"
# The client example: convctl with round_robin over the headless Service's DNS name, TLS with the
# daemons' certificate name, the token from a Secret; every variable is one of convctl's.
job = docs["Job"]["spec"]["template"]["spec"]
(cc,) = job["containers"]
cenv = {e["name"]: e for e in cc["env"]}
for k in cenv:
    assert k in convctl_vars, f"client-example.yaml: {k} is not a variable of convctl ({sorted(convctl_vars)})"
server = cenv["CONVD_SERVER"]["value"]
m = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", server)
assert m and m.group(1) == "convd-headless" and int(m.group(3)) == 50051, server
assert cenv["CONVD_LB"]["value"] == "round_robin", cenv["CONVD_LB"]
assert cenv["CONVD_TLS_SERVER_NAME"]["value"] == "convd" and "secretKeyRef" in cenv["CONVD_TOKEN"]["valueFrom"], cenv
assert "value" not in cenv["CONVD_TOKEN"], "the token must come from a Secret"
assert job["securityContext"]["runAsNonRoot"] is True and job["restartPolicy"] == "Never"
print(f"ok   kubernetes: headless Service {hs['metadata']['name']} (ready pods, gRPC port), "
      f"CONVD_MAX_CONNECTION_AGE={cm['CONVD_MAX_CONNECTION_AGE']}, client Job on {server} with round_robin")
print(f"ok   kubernetes: {sorted(docs)} parse; a DaemonSet with GPU, memory ({limits['memory']}) and CPU "
      f"({limits['cpu']}) limits the daemon's defaults follow, convctl health probes over TLS, "
      f"metrics annotation, {len(docs['ConfigMap']['data'])} CONVD_* settings that are real flags; "
      f"TLS and tokens from Secrets pass protected mode")

# ---- Dockerfile ---------------------------------------------------------------------------------
# Read as Docker does: continuation lines joined, comment lines dropped, one instruction a line.
with open(os.path.join(src, "Dockerfile")) as fh:
    df = fh.read()
instructions, pending = [], ""
for line in df.splitlines():
    if line.lstrip().startswith("#") or (not line.strip() and not pending):
        continue
    if line.rstrip().endswith("\\"):
        pending += line.rstrip()[:-1] + " "
        continue
    instructions.append(pending + line)
    pending = ""
assert not pending, "the Dockerfile ends inside a continued line"
stages, global_args = [], {}
for ins in instructions:
    word, _, rest = ins.strip().partition(" ")
    word, rest = word.upper(), rest.strip()
    if word == "FROM":
        m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
        base = re.sub(r"\$\{(\w+)\}", lambda v: global_args[v.group(1)], m.group(1))
        stages.append({"base": base, "name": m.group(2), "args": {}, "ins": []})
    elif word == "ARG" and not stages:
        k, _, v = rest.partition("=")
        global_args[k] = v.strip('"')
    else:
        st = stages[-1]
        if word == "ARG":
            k, _, v = rest.partition("=")
            st["args"][k] = v.strip('"')
        st["ins"].append((word, rest))
names = [st["name"] for st in stages]
assert len(stages) == 3 and names[:2] == ["nvidia-apt", "build"], names
nv_stage, build_stage, run_stage = stages
# Debian 12 for building and running; NVIDIA's CUDA image only for its apt key and repository.
assert build_stage["base"] == "debian:bookworm" and run_stage["base"] == "debian:bookworm-slim", \
    [st["base"] for st in stages]
assert nv_stage["base"].startswith("nvidia/cuda:") and "-base-ubuntu22.04" in nv_stage["base"], nv_stage["base"]


def runs(st):
    """The stage's RUN commands with their ARGs expanded, whitespace collapsed."""
    out = []
    for word, rest in st["ins"]:
        if word == "RUN":
            cmd = re.sub(r"\$\{(\w+)\}", lambda v: st["args"].get(v.group(1), v.group(0)), rest)
            out.append(" ".join(cmd.split()))
    return out


# CI's line, verbatim: install-deps.sh, cmake, the build, ctest.
ci = open(os.path.join(src, ".ci", "run")).read()
ci_line = [l for l in ci.splitlines() if l.startswith("./deploy/install-deps.sh")]
assert len(ci_line) == 1 and "cmake -S . -B build" in ci_line[0] and "ctest --test-dir build" in ci_line[0], ci
assert " ".join(ci_line[0].split()) in runs(build_stage), \
    f"the build stage does not run CI's line ({ci_line[0]}); its RUNs: {runs(build_stage)}"
install = [r for r in runs(build_stage) if r.startswith("cmake --install build --prefix ")]
assert len(install) == 1, runs(build_stage)
prefix = install[0].split()[-1]

# The packages each stage installs: Debian's (checked against Debian 12's archive here) and
# NVIDIA's (the CUDA_*_PACKAGES arguments: from NVIDIA's repository, not checkable here).
def installed_by(st):
    debian, nvidia = [], []
    for word, rest in st["ins"]:
        if word != "RUN":
            continue
        for m in re.finditer(r"apt-get install ((?:[^&;|]|\|(?!\|))*)", rest):
            for tok in m.group(1).split():
                if tok.startswith("-"):
                    continue
                v = re.fullmatch(r"\$\{(\w+)\}", tok)
                if v:
                    assert v.group(1).startswith("CUDA_") and v.group(1).endswith("_PACKAGES"), tok
                    nvidia += st["args"][v.group(1)].split()
                else:
                    debian.append(tok)
    return debian, nvidia


build_debian, build_nvidia = installed_by(build_stage)
run_debian, run_nvidia = installed_by(run_stage)
deps_sh = open(os.path.join(src, "deploy", "install-deps.sh")).read()
deps_code = "\n".join(l.split("#")[0] for l in deps_sh.splitlines())  # comments may hold parentheses
deps = [p for block in re.findall(r"^\s*packages\+?=\(([^)]*)\)", deps_code, re.M | re.S) for p in block.split()]
assert {"libgrpc-dev", "libdnnl-dev", "openssl", "python3-yaml"} <= set(deps), deps
for p in build_nvidia + run_nvidia:
    assert re.fullmatch(r"(cuda-[a-z-]+-\d+-\d+|libcudnn\d+(-dev)?-cuda-\d+)", p), f"not an NVIDIA package name: {p}"
    assert not p.startswith("cuda-") or p.endswith("-" + build_stage["args"]["CUDA_VERSION"].replace(".", "-")), \
        f"{p} is not CUDA {build_stage['args']['CUDA_VERSION']}, the release the build stage's PATH names"
# each NVIDIA runtime package is the runtime half of a -dev package the build used
for p in run_nvidia:
    assert any(b.replace("-dev", "", 1) == p for b in build_nvidia), (p, build_nvidia)
assert any(p.startswith("libcudnn") for p in run_nvidia) and any(p.startswith("cuda-cudart-") for p in run_nvidia)

os_release = dict(l.split("=", 1) for l in open("/etc/os-release").read().split("\n") if "=" in l)
on_debian12 = os_release.get("VERSION_CODENAME") == "bookworm" and shutil.which("apt-cache") and shutil.which("dpkg")
if not on_debian12:
    print(f"skip Dockerfile packages: this machine is not Debian 12 ({os_release.get('PRETTY_NAME')}), "
          f"so its apt cannot say what Debian 12 has")
else:
    # Every Debian package named exists in Debian 12 (the archive this machine's apt reads); one
    # apt-cache call for all (each call reads the whole archive's lists).
    wanted = sorted(set(build_debian + run_debian + deps))
    shown = subprocess.run(["apt-cache", "show", "--no-all-versions", *wanted], capture_output=True, text=True)
    missing = sorted(set(wanted) - set(re.findall(r"^Package: (\S+)$", shown.stdout, re.M)))
    assert not missing, f"not packages of this Debian 12's archive: {missing} ({shown.stderr.strip()})"
    pol = subprocess.run(["apt-cache", "policy", *wanted], capture_output=True, text=True).stdout
    for block in re.split(r"^(?=\S)", pol, flags=re.M):
        if block.strip():
            assert "bookworm" in block, f"no bookworm version in apt-cache policy:\n{block}"
    # The runtime stage installs the runtime package of each -dev package the build links.
    devs = [p for p in deps if p.startswith("lib") and p.endswith("-dev")]
    out = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests", *devs],
                         capture_output=True, text=True).stdout
    for block in re.split(r"^(?=\S)", out, flags=re.M):
        if not block.strip():
            continue
        dev = block.split()[0]
        libs = [l.split(":", 1)[1].strip() for l in block.splitlines()[1:] if l.strip().startswith("Depends:")]
        # Shared-library packages, named for their soname (libgrpc29, libopenmpi3): not the
        # documentation's libjs-* that libopenmpi-dev also depends on.
        libs = [l for l in libs if l.startswith("lib") and not l.endswith("-dev") and not l.startswith("<")
                and re.search(r"\d(t64)?$", l)]
        assert libs and set(libs) <= set(run_debian), f"{dev} depends on {libs}; the runtime stage installs {run_debian}"
    # What apt-get installs for the runtime stage's Debian names on an empty system (a simulation
    # with no dpkg status): every package the runtime image will hold, besides the base image's.
    sim = subprocess.run(["apt-get", "install", "-s", "--no-install-recommends", "-o", "Dir::State::status=/dev/null",
                          *run_debian], capture_output=True, text=True)
    assert sim.returncode == 0, sim.stderr
    closure = set(re.findall(r"^Inst (\S+)", sim.stdout, re.M))
    assert set(run_debian) <= closure, (run_debian, closure)

# What the runtime stage copies from the build stage is what `cmake --install` puts in the prefix,
# and the names the image runs (ENTRYPOINT, HEALTHCHECK) are in it, on PATH.
copies = [rest.split() for word, rest in run_stage["ins"] if word == "COPY"]
from_build = [c[1:] for c in copies if c[0] == "--from=build"]
assert from_build == [[prefix, prefix]], f"the runtime stage copies {from_build}; the build installs into {prefix}"
for c in copies:
    m = re.fullmatch(r"--from=(\S+)", c[0])
    assert m and m.group(1) in names[:2], f"COPY {c}: not from an earlier stage"
for st in (build_stage, run_stage):  # the repository list the nvidia-apt stage writes, moved into place
    for c in (rest.split() for word, rest in st["ins"] if word == "COPY" and rest.startswith("--from=nvidia-apt")):
        if c[1] != "/usr/share/keyrings/cuda-archive-keyring.gpg":  # the cuda-keyring package's
            assert any(f"> {c[1]}" in r for r in runs(nv_stage)), f"nvidia-apt does not write {c[1]}"
            assert any(f"mv {c[2]} /etc/apt/sources.list.d/" in r for r in runs(st)), f"{c[2]} is never put in place"
# The nvidia-apt stage's sed, run on the line NVIDIA's image holds (host name elided): the key
# stays, the distribution becomes debian12.
sed = re.search(r"sed -n '([^']*)'", runs(nv_stage)[0]).group(1)
sample = "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] https://nvidia.invalid/compute/cuda/repos/ubuntu2204/x86_64/ /\n"
out = subprocess.run(["sed", "-n", sed], input=sample, capture_output=True, text=True).stdout
assert out == sample.replace("/ubuntu2204/", "/debian12/"), out
env_path = [rest for word, rest in run_stage["ins"] if word == "ENV" and "PATH=" in rest]
assert env_path and re.search(rf"\bPATH={re.escape(prefix)}/bin:\$PATH\b", env_path[0]), env_path
assert re.search(r"^USER 10001$", df, re.M) and re.search(r"^EXPOSE 50051 9464$", df, re.M)
assert re.search(r"useradd --system --uid 10001 --gid 10001 ", df), "the convd user, uid and gid 10001"
assert re.search(r'^HEALTHCHECK .*\n\s*CMD \["convctl", "health"', df, re.M), "HEALTHCHECK"
for name in re.findall(r"\b(CONVD_[A-Z_]+)=", df):
    check_env(name, "Dockerfile", also=convctl_vars)
entry = json.loads(re.search(r"^ENTRYPOINT (\[.*?\])", df.replace("\\\n", " "), re.M | re.S).group(1))
assert entry[0] == "convd" and {"--tls-cert", "--tls-key", "--auth-tokens"} <= set(entry), entry
df_code = "\n".join(l for l in df.splitlines() if not l.lstrip().startswith("#"))
denv = dict(re.findall(r"\b(CONVD_[A-Z_]+)=(\S+)", df_code))
assert not {"CONVD_TLS_CERT", "CONVD_TLS_KEY", "CONVD_ALLOW_INSECURE"} & set(denv), denv
secrets_gate("Dockerfile", entry[1:], {k: v for k, v in denv.items() if k in env_vars}, ["/etc/convd/tls/tls.crt"])

# ---- cmake --install: the image's /opt/convd, made here into a scratch prefix ----------------------
with tempfile.TemporaryDirectory() as d:
    r = subprocess.run(["cmake", "--install", build, "--prefix", d], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for prog in ("convd", "convctl"):
        assert os.access(os.path.join(d, "bin", prog), os.X_OK), f"cmake --install puts no bin/{prog}"
    clean = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH" and not k.startswith("CONVD_")}
    clean["PATH"] = os.path.join(d, "bin") + ":" + clean.get("PATH", "/usr/bin:/bin")  # as the image's ENV
    r = subprocess.run([entry[0], "--help"], capture_output=True, text=True, env=clean)
    assert r.returncode == 0 and "CONVD_LISTEN" in r.stdout, r.stderr
    r = subprocess.run(["convctl", "--version"], capture_output=True, text=True, env=clean)
    assert r.returncode == 0 and r.stdout.startswith("convctl "), (r.stdout, r.stderr)
    # The libraries the binaries load: each non-CUDA one a file of a package the runtime stage
    # installs (or of what those pull in); libconvd_client from the prefix itself.
    # Every library ldd lists, then one dpkg -S for all their paths (as ldd names them, their
    # targets, and their /usr-merged twins).
    seen = {}
    for binary in (os.path.join(build, "convd"), os.path.join(build, "convctl"),
                   os.path.join(d, "bin", "convd"), os.path.join(d, "bin", "convctl")):
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, env=clean).stdout
        for line in ldd.splitlines():
            m = re.match(r"\s*(\S+) => (\S+)", line)
            if not m:
                continue
            name, path = m.groups()
            assert path != "not", f"{binary}: {name} not found"
            if name.startswith("libconvd_client"):
                if binary.startswith(d):
                    assert os.path.realpath(path).startswith(os.path.realpath(d)), f"{binary} loads {path}, not the prefix's"
                continue
            seen.setdefault(name, (binary, path))
    owners = {}
    if on_debian12:
        cands = {n: [p, os.path.realpath(p), re.sub(r"^/lib/", "/usr/lib/", p), re.sub(r"^/usr/lib/", "/lib/", p)]
                 for n, (_, p) in seen.items()}
        r = subprocess.run(["dpkg", "-S", *sorted({c for cs in cands.values() for c in cs})], capture_output=True, text=True)
        by_path = {}
        for line in r.stdout.splitlines():
            pkg, _, path = line.partition(": ")
            by_path[path] = pkg.split(":")[0]
        owners = {n: next((by_path[c] for c in cs if c in by_path), None) for n, cs in cands.items()}
    checked, cuda_libs = {}, {}
    for name, (binary, path) in sorted(seen.items()) if on_debian12 else ():
        owner = owners[name]
        if re.match(r"lib(cuda|cudart|cudnn|nvrtc|cublas)", name):
            # NVIDIA's: in the image's build stage they come from NVIDIA's packages, which must
            # be the runtime stage's; elsewhere (a toolkit copied in) they belong to none.
            assert owner is None or owner in run_nvidia, \
                f"{name} comes from {owner}, which the runtime stage does not install ({run_nvidia})"
            cuda_libs[name] = owner or "no package here"
            continue
        assert owner, f"{binary}: {name} ({path}) is in no Debian package here"
        assert owner in closure, f"{name} comes from {owner}, which the runtime stage's packages do not bring"
        checked[name] = owner
    assert on_debian12 is False or len(checked) >= 10, checked
print(f"ok   Dockerfile: Debian 12 stages (debian:bookworm build, debian:bookworm-slim runtime), CI's line "
      f"verbatim, {len(set(build_debian + run_debian + deps))} Debian packages that Debian 12 has "
      f"({len(build_nvidia + run_nvidia)} NVIDIA ones not checkable here: {' '.join(build_nvidia + run_nvidia)}), "
      f"the runtime stage copies {prefix} = cmake --install's prefix, whose convd and convctl run; "
      f"{len(checked)} libraries the binaries load all from the runtime packages "
      f"({', '.join(sorted(set(checked.values())))}); CUDA's, skipped: "
      f"{', '.join(f'{k} ({v})' for k, v in sorted(cuda_libs.items())) or 'none linked'}; "
      f"non-root, EXPOSE 50051 9464, HEALTHCHECK by convctl health; TLS and tokens from mounted files "
      f"pass protected mode")

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
