#!/usr/bin/python3
"""The Node.js client (client/node) as a user gets it: `npm ci` in a copy of it (the npm
registry, from its lockfile), then against a daemon started here: its README's example verbatim
(but for the address), every conv2d golden case and 20 random shapes compared element by element
with the reference, and an error's code and message. Skipped (77) without node and npm.

usage: test_node_client.py CONVD_BINARY STUB_DIR GOLDEN_DIR [CONVCTL]"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from convd_harness import Daemon, load_golden, reference_conv2d

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

CASES_JS = r"""
const fs = require('fs');
const path = require('path');
const { Client } = require(process.argv[2]);
const [target, dir] = process.argv.slice(3);
const cases = JSON.parse(fs.readFileSync(path.join(dir, 'cases.json')));
const f32 = (name) => { const b = fs.readFileSync(path.join(dir, name));
  return new Float32Array(b.buffer, b.byteOffset, b.length / 4); };
(async () => {
  const c = new Client(target);
  const out = {};
  for (const k of cases) {
    let seen = 0;
    const y = await c.conv2d(f32(k.x), k.xs, f32(k.w), k.ws, { bias: k.b ? f32(k.b) : undefined,
      stride: k.stride, padding: k.padding, dilation: k.dilation, groups: k.groups,
      progress: (d) => { seen = d; } });
    fs.writeFileSync(path.join(dir, k.name + '.out'), Buffer.from(y.data.buffer));
    out[k.name] = { shape: y.shape, rows: seen };
  }
  try {
    await c.conv2d(new Float32Array(8), [1, 2, 2, 2], new Float32Array(27), [1, 3, 3, 3]);
    out.error = 'none';
  } catch (e) { out.error = { code: e.codeName, details: e.details }; }
  fs.writeFileSync(path.join(dir, 'results.json'), JSON.stringify(out));
  c.close();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def main():
    convd_bin, stub_dir, golden = (os.path.abspath(a) for a in sys.argv[1:4])
    if not shutil.which("node") or not shutil.which("npm"):
        print("SKIPPED: node and npm are not installed")
        sys.exit(77)
    with tempfile.TemporaryDirectory(prefix="convd-node-") as tmp:
        os.makedirs(os.path.join(tmp, "client"))
        shutil.copytree(os.path.join(ROOT, "client", "node"), os.path.join(tmp, "client", "node"),
                        ignore=shutil.ignore_patterns("node_modules", "proto"))
        shutil.copytree(os.path.join(ROOT, "proto"), os.path.join(tmp, "proto"))
        mod = os.path.join(tmp, "client", "node")
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=mod, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"npm ci failed:\n{r.stdout}\n{r.stderr}")
        print("ok   npm ci in a copy of client/node")
        d = Daemon(convd_bin)
        try:
            with open(os.path.join(mod, "README.md")) as f:
                example = re.findall(r"```js\n(.*?)```", f.read(), re.S)[0]
            lines = [l for l in example.strip().splitlines()]
            assert len(lines) <= 20, f"the README example has {len(lines)} lines"
            ex = os.path.join(mod, "example.js")
            with open(ex, "w") as f:
                f.write(example.replace("127.0.0.1:50051", d.target))
            r = subprocess.run(["node", ex], cwd=mod, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"the README example failed:\n{r.stderr}"
            assert r.stdout.startswith("1x8x32x32 ") and "serving: true" in r.stdout, r.stdout
            x = (np.arange(3 * 32 * 32) % 7 - 3).astype(np.float32).reshape(1, 3, 32, 32)
            w = (np.arange(8 * 27) % 5 / 5).astype(np.float32).reshape(8, 3, 3, 3)
            first = reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)[0, 0, 0, 0]
            assert r.stdout.split()[1] == f"{first:.4f}", (r.stdout, first)
            print(f"ok   the README example ({len(lines)} lines): {r.stdout.splitlines()[0]}")

            cases, wants = [], {}
            rng = np.random.default_rng(0x40DE)
            for name, p, a in load_golden(golden):
                if p.get("op") == "conv_transpose2d":
                    continue
                cases.append((name, a["input"], a["weight"], a.get("bias"), p["stride"], p["padding"], p["dilation"], p["groups"][0]))
                wants[name] = a["expected"]
            for i in range(20):
                g = int(rng.choice([1, 2]))
                kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
                x_ = rng.standard_normal((int(rng.integers(1, 3)), g * int(rng.integers(1, 4)), int(rng.integers(kh, 24)), int(rng.integers(kw, 24))), dtype=np.float32)
                w_ = rng.standard_normal((g * int(rng.integers(1, 4)), x_.shape[1] // g, kh, kw), dtype=np.float32)
                pad = [int(v) for v in rng.integers(0, 2, 4)]
                b_ = rng.standard_normal(w_.shape[0], dtype=np.float32) if i % 2 else None
                name = f"random{i}"
                cases.append((name, x_, w_, b_, [1, 1], pad, [1, 1], g))
                wants[name] = reference_conv2d(x_, w_, b_, (1, 1), pad, (1, 1), g)
            spec = []
            for name, x_, w_, b_, s, pad, dil, g in cases:
                for tag, t in (("x", x_), ("w", w_), ("b", b_)):
                    if t is not None:
                        np.ascontiguousarray(t, np.float32).tofile(os.path.join(tmp, f"{name}.{tag}"))
                spec.append({"name": name, "x": f"{name}.x", "xs": list(x_.shape), "w": f"{name}.w", "ws": list(w_.shape),
                             "b": f"{name}.b" if b_ is not None else None, "stride": list(s),
                             "padding": list(pad), "dilation": list(dil), "groups": g})
            with open(os.path.join(tmp, "cases.json"), "w") as f:
                json.dump(spec, f)
            runner = os.path.join(mod, "cases.js")
            with open(runner, "w") as f:
                f.write(CASES_JS)
            r = subprocess.run(["node", runner, mod, d.target, tmp], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"the Node cases failed:\n{r.stderr}"
            with open(os.path.join(tmp, "results.json")) as f:
                res = json.load(f)
            worst = 0.0
            for name, want in wants.items():
                got = np.fromfile(os.path.join(tmp, name + ".out"), np.float32).reshape(res[name]["shape"])
                assert got.shape == want.shape, (name, got.shape, want.shape)
                tol = 1e-4 * max(1.0, float(np.abs(want).max()))
                err = float(np.abs(got.astype(np.float64) - want).max())
                assert err <= tol, f"{name}: max error {err} > {tol}"
                assert res[name]["rows"] == want.shape[0] * want.shape[2], (name, res[name])
                worst = max(worst, err)
            print(f"ok   {len(wants)} cases (golden conv2d and random) through Node, max error {worst:.2e}, progress to the last row")
            e = res["error"]
            assert e != "none" and e["code"] == "INVALID_ARGUMENT" and "C_in/groups" in e["details"], e
            print(f"ok   a bad shape rejected with INVALID_ARGUMENT: {e['details'][:70]}")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
