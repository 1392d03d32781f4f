#!/usr/bin/python3
"""The daemon's defaults follow its cgroup's limits (server/cgroup.h), end to end: the daemon is
started with CONVD_CGROUP_ROOT pointing at a fixture tree that stands for / (proc/self/cgroup and
sys/fs/cgroup/...), as a pod with a 2 GiB memory limit and half a CPU would see it, and then
- its start-up log names the limit file and the defaults derived from it (3/4 and 1/2 of 2 GiB,
  one CPU thread), and warns that --max-inflight-bytes plus --weights-memory exceed 2 GiB;
- the metrics report convd_inflight_bytes_limit = 1.5 GiB, the CPU device runs 1 thread;
- a request over 1 GiB is refused at once with RESOURCE_EXHAUSTED naming 1073741824 bytes, while
  a small golden case is served correctly;
- a flag still wins over the cgroup (--max-inflight-bytes 100M, --cpu-threads 2);
- the v1 files (memory.limit_in_bytes, cpu.cfs_quota_us) are read the same way;
- a garbage memory.max is ignored with a warning, and the defaults come from physical memory.

usage: test_cgroup_limits.py CONVD_BINARY STUB_DIR GOLDEN_DIR [CONVCTL]"""
import os
import re
import shutil
import sys
import tempfile
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convd_harness import Daemon, check_close, conv_requests, collect_output, import_stubs, load_golden, spec_from_params  # noqa: E402

GiB = 1 << 30


def fixture(root, files):
    shutil.rmtree(root, ignore_errors=True)
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def env_with(root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVD_")}
    env["CONVD_CGROUP_ROOT"] = root
    return env


def limits_line(log):
    lines = [l for l in log.splitlines() if 'msg="memory and CPU limits"' in l]
    assert len(lines) == 1, f"expected one limits line in the log:\n{log}"
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', lines[0]))


def metric(url, name):
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    m = re.search(rf"^{name} (\S+)$", body, re.M)
    assert m, f"{name} is not in the metrics:\n{body}"
    return float(m.group(1))


def case_pod_v2(convd, pb, pb_grpc, golden, root):
    fixture(root, {
        "proc/self/cgroup": "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope\n",
        # The container's own cgroup has no memory limit of its own here; the pod's has 2 GiB.
        "sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope/memory.max": "max\n",
        "sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/memory.max": f"{2 * GiB}\n",
        "sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope/cpu.max": "50000 100000\n",
    })
    d = Daemon(convd, "--metrics-listen", "127.0.0.1:0", env=env_with(root))
    try:
        got = limits_line(d.read_log())
        mem_file = os.path.join(root, "sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/memory.max")
        assert got["memory_bytes"] == str(2 * GiB), got
        assert got["memory_from"] == f'"{mem_file}"', got
        assert got["max_inflight_bytes"] == str(3 * GiB // 2), got
        assert got["max_request_bytes"] == str(GiB), got
        assert got["cpu_threads"] == "1" and got["cpus"] == "1", got
        if int(got["online_cpus"]) > 1:
            assert got["cpus_from"].endswith('cpu.max (50000/100000)"'), got
        log = d.read_log()
        assert "--max-inflight-bytes and --weights-memory together exceed" in log, log
        assert re.search(r'msg="device ready" device=0 name=cpu0 .*detail="[^"]*\b1 threads?"', log), log
        limit = metric(d.metrics_url, "convd_inflight_bytes_limit")
        assert limit == 3 * GiB // 2, limit
        with grpc.insecure_channel(d.target) as ch:
            stub = pb_grpc.ConvolutionStub(ch)
            # 1 x 1 x 16384 x 16384 float32 in and out: 2 GiB, over the 1 GiB per request.
            spec = pb.ConvSpec(op=pb.OP_CONV2D, dtype=pb.DTYPE_FLOAT32, groups=1)
            spec.input_shape.d0, spec.input_shape.d1, spec.input_shape.d2, spec.input_shape.d3 = 1, 1, 16384, 16384
            spec.weight_shape.d0, spec.weight_shape.d1, spec.weight_shape.d2, spec.weight_shape.d3 = 1, 1, 1, 1
            spec.stride.h = spec.stride.w = spec.dilation.h = spec.dilation.w = 1
            try:
                list(stub.Conv2d(iter([pb.ConvRequest(spec=spec)]), timeout=30))
                raise AssertionError("a 2 GiB request was accepted under a 2 GiB cgroup")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
                assert f"limit of {GiB} bytes per request" in e.details(), e.details()
            name, params, a = next(iter(load_golden(golden)))
            b = a.get("bias")
            spec = spec_from_params(pb, params, b is not None)
            y, _, _ = collect_output(stub.Conv2d(conv_requests(pb, spec, a["input"], a["weight"], b, 1 << 16), timeout=60))
            check_close(y, a["expected"])
    finally:
        d.stop()
    # A flag wins over the cgroup.
    d = Daemon(convd, "--metrics-listen", "127.0.0.1:0", "--max-inflight-bytes", "100M", "--cpu-threads", "2",
               env=env_with(root))
    try:
        got = limits_line(d.read_log())
        assert got["max_inflight_bytes"] == str(100 << 20) and got["max_request_bytes"] == str(GiB), got
        assert got["cpu_threads"] == "2", got
        assert metric(d.metrics_url, "convd_inflight_bytes_limit") == 100 << 20
        assert "--weights-memory together exceed" not in d.read_log()
    finally:
        d.stop()
    return (f"2 GiB pod limit on a parent cgroup and cpu.max 0.5: max_inflight_bytes 1.5 GiB (log and "
            f"metrics), max_request_bytes 1 GiB (a 2 GiB request refused, {name} served), 1 CPU thread; "
            f"flags win")


def case_v1(convd, root):
    fixture(root, {
        "proc/self/cgroup": "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{4 * GiB}\n",
        "sys/fs/cgroup/cpu/docker/abc/cpu.cfs_quota_us": "100000\n",
        "sys/fs/cgroup/cpu/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    d = Daemon(convd, env=env_with(root))
    try:
        got = limits_line(d.read_log())
    finally:
        d.stop()
    assert got["memory_bytes"] == str(4 * GiB) and got["max_inflight_bytes"] == str(3 * GiB), got
    assert got["max_request_bytes"] == str(2 * GiB) and got["cpu_threads"] == "1", got
    return "memory.limit_in_bytes 4 GiB and cfs quota 1 CPU: 3 GiB in flight, 2 GiB per request, 1 thread"


def case_garbage(convd, root):
    fixture(root, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "lots\n",
                   "sys/fs/cgroup/cpu.max": "max 100000\n"})
    d = Daemon(convd, env=env_with(root))
    try:
        log = d.read_log()
    finally:
        d.stop()
    got = limits_line(log)
    assert got["memory_from"] == "physical" and got["memory_bytes"] == got["physical_memory_bytes"], got
    assert int(got["max_inflight_bytes"]) == int(got["physical_memory_bytes"]) // 4 * 3, got
    assert got["cpus_from"] == "online" and got["cpu_threads"] == got["online_cpus"], got
    assert re.search(r'level=warn msg="a cgroup limit file could not be read" why="[^"]*memory.max holds '
                     r'\\"lots\\", not a limit: ignored"', log), log
    return "memory.max 'lots': a warning naming the file, the defaults from physical memory"


def main():
    convd, stub_dir, golden = sys.argv[1:4]
    pb, pb_grpc = import_stubs(stub_dir)
    tmp = tempfile.mkdtemp(prefix="convd-cgroup-")
    try:
        root = os.path.join(tmp, "root")
        for name, fn in (("cgroup v2 pod", lambda: case_pod_v2(convd, pb, pb_grpc, golden, root)),
                         ("cgroup v1", lambda: case_v1(convd, root)),
                         ("garbage limit file", lambda: case_garbage(convd, root))):
            print(f"ok   {name}: {fn()}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("cgroup_limits: 3 cases passed")


if __name__ == "__main__":
    main()
