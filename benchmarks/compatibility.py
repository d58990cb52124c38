"""Which runtime versions load and run a bundle's models: each version in its own virtual environment.

    python benchmarks/compatibility.py BUNDLE --onnxruntime 1.22.0 1.23.0 --openvino 2025.2.0 2025.3.0 \
        --node 1.22.0 1.23.0 --out docs/compatibility.md

For each version and model file, a probe loads the model, runs the bundle's parity fixtures (real sequences, a
512-token row, padding) with an empty `mask_positions`, and compares `last_hidden_state` on real tokens with the
PyTorch reference (mean cosine; the build's gates are in utr_runtime/parity.py). Needs network access to PyPI and
npm (versions are installed into --cache). TensorRT cannot be installed here: it is not probed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import venv
from pathlib import Path

from utrexport.benchmark import describe_machine, machine

PYTHON_PROBE = r"""
import json, sys
import numpy as np
bundle, engine, files = sys.argv[1], sys.argv[2], sys.argv[3:]
data = np.load(f"{bundle}/fixtures.npz")
feeds = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
mask = data["attention_mask"].astype(bool)
results = {}
for name in files:
    try:
        if engine == "onnxruntime":
            import onnxruntime as ort
            session = ort.InferenceSession(f"{bundle}/{name}", providers=["CPUExecutionProvider"])
            inputs = [i.name for i in session.get_inputs()]
            run = lambda f: dict(zip([o.name for o in session.get_outputs()], session.run(None, f)))
        else:
            import openvino as ov
            core = ov.Core()
            compiled = core.compile_model(core.read_model(f"{bundle}/{name}"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            inputs = [i.get_any_name() for i in compiled.inputs]
            run = lambda f: {o.get_any_name(): v for o, v in compiled(f).items()}
        f = dict(feeds)
        if "mask_positions" in inputs:
            f["mask_positions"] = np.zeros((len(mask), 0), np.int64)
        out = run(f)["last_hidden_state"][mask].astype(np.float64)
        ref = data["last_hidden_state"][mask].astype(np.float64)
        cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
        results[name] = {"ok": True, "mean_cosine": float(cos.mean()), "max_abs": float(np.abs(out - ref).max())}
    except Exception as e:
        results[name] = {"ok": False, "error": str(e)[:2000] or type(e).__name__}
print(json.dumps(results))
"""

NODE_PROBE = r"""
const ort = require('onnxruntime-node');
const [bundle, ...files] = process.argv.slice(2);
(async () => {
  const results = {};
  for (const name of files) {
    try {
      const s = await ort.InferenceSession.create(`${bundle}/${name}`);
      const L = 16;
      const ids = new BigInt64Array(2 * L).fill(7n); ids[0] = 1n; ids[L - 1] = 2n; ids[L] = 1n; ids[2 * L - 1] = 2n;
      const feeds = { input_ids: new ort.Tensor('int64', ids, [2, L]), attention_mask: new ort.Tensor('int64', new BigInt64Array(2 * L).fill(1n), [2, L]) };
      if (s.inputNames.includes('mask_positions')) feeds.mask_positions = new ort.Tensor('int64', new BigInt64Array(0), [2, 0]);
      const out = await s.run(feeds);
      const finite = out.last_hidden_state.data.every(Number.isFinite);
      results[name] = finite ? { ok: true } : { ok: false, error: 'non-finite outputs' };
    } catch (e) {
      results[name] = { ok: false, error: String(e.message).slice(0, 2000) };
    }
  }
  console.log(JSON.stringify(results));
})();
"""


def model_files(bundle: Path) -> dict[str, str]:
    """precision label -> file, for every model file of the bundle."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {}
    for precision, entry in manifest["models"].items():
        files[precision] = entry["file"]
        for variant, v in entry.get("variants", {}).items():
            files[f"{precision}/{variant}"] = v["file"]
    return files


def python_env(cache: Path, package: str, version: str) -> Path:
    env = cache / f"{package}-{version}"
    python = env / "bin" / "python"
    if not (env / ".ready").exists():
        venv.create(env, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", f"{package}=={version}", "numpy"], check=True)
        (env / ".ready").touch()
    return python


def node_env(cache: Path, version: str) -> Path:
    env = cache / f"onnxruntime-node-{version}"
    if not (env / "node_modules" / "onnxruntime-node").is_dir():
        env.mkdir(parents=True, exist_ok=True)
        (env / "package.json").write_text('{"private": true}')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", f"onnxruntime-node@{version}"], cwd=env, check=True,
                       env={**os.environ, "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"})
    return env


def probe(bundle: Path, files: dict[str, str], runtime: str, version: str, cache: Path) -> dict[str, dict]:
    names = sorted(set(files.values()))
    if runtime == "onnxruntime-node":
        env = node_env(cache, version)
        (env / "probe.js").write_text(NODE_PROBE)
        out = subprocess.run(["node", "probe.js", str(bundle), *names], cwd=env, capture_output=True, text=True)
    else:
        python = python_env(cache, runtime, version)
        out = subprocess.run([python, "-c", PYTHON_PROBE, str(bundle), runtime, *names], capture_output=True, text=True)
    if out.returncode:
        return {name: {"ok": False, "error": (out.stderr.strip().splitlines() or ["crashed"])[-1][:200]} for name in names}
    return json.loads(out.stdout.strip().splitlines()[-1])


KNOWN_ERRORS = {  # what a runtime's long error message means, in a few words
    r"ValidateOpsetForDomain|opset.*(not|un)supported": "no: opset 23 unsupported",
    r"does not support the following ONNX operations: (\w+)": "no: no ONNX {0} operator",
    r"Could not find an implementation for (\w+\(\d+\))": "no: no {0} kernel",
}


def cell(result: dict) -> str:
    if not result["ok"]:
        for pattern, text in KNOWN_ERRORS.items():
            found = re.search(pattern, result["error"])
            if found:
                return text.format(*found.groups())
        lines = [line for line in result["error"].splitlines() if line.strip()]
        return "no: " + (lines[-1] if lines else "failed")[:120].replace("|", "/")
    return f"yes (cosine {result['mean_cosine']:.6f})" if "mean_cosine" in result else "yes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--onnxruntime", nargs="*", default=[])
    parser.add_argument("--openvino", nargs="*", default=[])
    parser.add_argument("--node", nargs="*", default=[], help="onnxruntime-node versions")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "utrexport-compatibility")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    files = model_files(bundle)
    rows = []
    for runtime, versions in (("onnxruntime", args.onnxruntime), ("openvino", args.openvino), ("onnxruntime-node", args.node)):
        for version in versions:
            results = probe(bundle, files, runtime, version, args.cache)
            rows.append(f"| {runtime} {version} | " + " | ".join(cell(results[f]) for f in files.values()) + " |")
            print(rows[-1], flush=True)
    table = "\n".join([f"| runtime | {' | '.join(f'{p} (`{f}`)' for p, f in files.items())} |", "|---|" + "---|" * len(files), *rows])
    command = "python benchmarks/compatibility.py BUNDLE " + " ".join(
        f"--{name} {' '.join(v)}" for name, v in (("onnxruntime", args.onnxruntime), ("openvino", args.openvino), ("node", args.node)) if v)
    report = f"Machine: {describe_machine(machine())}, Python {platform.python_version()}, Node {node_version()}.\nCommand: `{command}`\n\n{table}\n"
    print(report)
    if args.out:
        args.out.write_text(report)


def node_version() -> str:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "not installed"


if __name__ == "__main__":
    main()
