"""Every int8 model of a bundle on every CPU engine: accuracy against the PyTorch reference and speed against fp32.

    .venv/bin/python benchmarks/int8.py [--bundle bundles/utrbert-6mer-random] [--out docs/int8]

The bundle of `make build` (full-size k=6, random weights: speed does not depend on them; accuracy is judged on its
parity fixtures, real held-out 3'UTRs with the float32 PyTorch outputs). Paths: fp32 on each engine; on ONNX Runtime
the u8s8 file (what it runs for int8) and the symmetric Q/DQ file; on OpenVINO the symmetric Q/DQ file and NNCF's IR
(where the build kept it), each with f32 float parts and, on CPUs with native bf16, bf16 float parts. Accuracy: cosine
of every real token's vector to the reference (mean, worst), by the comparator `verify` uses. Speed: interleaved runs
(median of --repeats) at each shape, as speedup over ONNX Runtime fp32. Writes OUT.json and OUT.md with the CPU model
and its ISA flags. Decision accuracy on a trained classifier: benchmarks/task_accuracy.py.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((8, 128), (1, 512), (8, 512))


def paths(bundle, threads: int) -> dict[str, tuple[str, object]]:
    """{label: (precision, runner)}: fp32 on each engine, then each int8 file on each engine and float precision."""
    from utr_runtime.engines import open_runner
    from utr_runtime.engines.openvino import bf16_supported

    found = {f"{engine} fp32": ("fp32", open_runner(bundle.read_model("model.fp32.onnx"), threads=threads, engine=engine))
             for engine in ("onnxruntime", "openvino")}
    for engine in ("onnxruntime", "openvino"):
        for label, name in bundle.model_names("int8", engine).items():
            if engine == "onnxruntime" and label == "int8/tensorrt":
                continue  # fp16 float parts: TensorRT's file, not a CPU path
            for parts in ("f32", "bf16") if engine == "openvino" else ("f32",):
                if parts == "bf16" and not bf16_supported():
                    continue
                runner = open_runner(bundle.read_model(name), threads=threads, engine=engine, inference_precision=parts)
                found[f"{engine} {name}" + (f" ({parts} float parts)" if engine == "openvino" else "")] = ("int8", runner)
    return found


def accuracy(bundle, runs: dict) -> dict[str, dict]:
    from utr_runtime.parity import TOLERANCES, compare
    from utr_runtime.verify import FIXTURE_INPUTS, load_fixtures

    fixtures = load_fixtures(bundle)
    feeds = {k: v for k, v in fixtures.items() if k in FIXTURE_INPUTS}
    reference = {"last_hidden_state": fixtures["last_hidden_state"]}
    out = {}
    for label, (precision, runner) in runs.items():
        candidate = runner.run({k: feeds[k] for k in runner.input_names})
        row = compare(reference, candidate, {"last_hidden_state": TOLERANCES[precision]["last_hidden_state"]}, fixtures["attention_mask"])[0]
        out[label] = {"mean_cosine": row.mean_cosine, "min_cosine": row.min_cosine}
    return out


def speed(bundle, runs: dict, repeats: int) -> list[dict]:
    from utrexport.benchmark import alternate, random_batch, summary

    rows = []
    for batch, length in SHAPES:
        ids, mask = random_batch(batch, length, bundle.k)
        feeds = {"input_ids": ids, "attention_mask": mask, "mask_positions": np.zeros((batch, 1), np.int64)}
        times = alternate({label: (lambda r=runner: r.run({k: feeds[k] for k in r.input_names})) for label, (_, runner) in runs.items()}, repeats)
        base = statistics.median(times["onnxruntime fp32"])
        rows += [{"shape": f"{batch}x{length}", "path": label, **summary(t), "speedup_vs_onnxruntime_fp32": base / statistics.median(t)}
                 for label, t in times.items()]
        print(f"{batch}x{length}: " + ", ".join(f"{label} {statistics.median(t) * 1e3:.0f} ms" for label, t in times.items()), flush=True)
    return rows


def to_markdown(result: dict) -> str:
    from utrexport.benchmark import describe_machine

    lines = [
        "# int8 models per engine: accuracy and speed",
        "",
        f"Bundle: `{result['bundle']}` ({result['model']}). Machine: {describe_machine(result['machine'])}, {result['threads']} threads, "
        f"{result['tools']}. Command: `.venv/bin/python benchmarks/int8.py --out docs/int8`",
        "",
        "Accuracy: cosine of every real token's `last_hidden_state` to the PyTorch float32 reference on the bundle's parity fixtures "
        "(8 held-out real 3'UTR rows of 24-512 tokens, padded in one batch). Speed: median ms of interleaved runs, speedup over ONNX Runtime fp32.",
        "",
        "| path | token cosine mean | worst token | " + " | ".join(f"{s} ms (speedup)" for s in result["shapes"]) + " |",
        "|---|---:|---:|" + "---:|" * len(result["shapes"]),
    ]
    for label, acc in result["accuracy"].items():
        cells = [f"{r['median_s'] * 1e3:.0f} ({r['speedup_vs_onnxruntime_fp32']:.2f}x)" for s in result["shapes"]
                 for r in result["speed"] if r["shape"] == s and r["path"] == label]
        lines.append(f"| {label} | {acc['mean_cosine']:.5f} | {acc['min_cosine']:.5f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(ROOT / "bundles" / "utrbert-6mer-random"), help="a bundle with int8 (default: make build's)")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: every core)")
    args = parser.parse_args()
    import os

    import utr_runtime
    from utrexport.benchmark import machine, write_report
    from utrexport.versions import tool_versions

    bundle = utr_runtime.Bundle(args.bundle)
    if "int8" not in bundle.precisions:
        raise SystemExit(f"{args.bundle} has no int8 model: build it with --precision fp32,int8")
    runs = paths(bundle, args.threads)
    config = bundle.manifest["model"]["config"]
    result = {
        "bundle": os.path.relpath(args.bundle, ROOT) if Path(args.bundle).resolve().is_relative_to(ROOT) else args.bundle,
        "model": f"k={bundle.k}, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}",
        "machine": machine(), "threads": args.threads or os.cpu_count(), "shapes": [f"{b}x{n}" for b, n in SHAPES],
        "tools": ", ".join(f"{k} {v}" for k, v in tool_versions(["openvino", "nncf", "onnxruntime"]).items()),
        "accuracy": accuracy(bundle, runs),
        "speed": speed(bundle, runs, args.repeats),
    }
    report = to_markdown(result)
    print(report)
    if args.out:
        write_report(args.out, result, report)


if __name__ == "__main__":
    main()
