"""Fused attention (one ONNX Attention node per layer) against plain (MatMul, Softmax, MatMul) on the CPU engines.

    utrexport build --kmer 6 --random-init --output /tmp/fused
    utrexport build --kmer 6 --random-init --attention plain --output /tmp/plain
    python benchmarks/attention_forms.py /tmp/fused /tmp/plain --out docs/attention_forms

The two bundles hold the same weights (same seed). Every engine x precision of both runs in one process, in
alternating order, at each shape; the report gives each median time, plain's time relative to fused, and the
largest difference between the two forms' `last_hidden_state` on real tokens. TensorRT is not timed: it cannot
be installed here (the plain form exists for TensorRT before 10.14).
"""

from __future__ import annotations

import argparse

import numpy as np

import utr_runtime
from utrexport.benchmark import bench_shapes, describe_machine, machine, make_path, random_batch, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fused", help="bundle built with --attention fused")
    parser.add_argument("plain", help="the same checkpoint built with --attention plain")
    parser.add_argument("--shapes", nargs="+", default=["1x512", "8x128", "32x512"], help="BATCHxTOKENS")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    args = parser.parse_args()

    bundles = {form: utr_runtime.Bundle(getattr(args, form)) for form in ("fused", "plain")}
    for form, bundle in bundles.items():
        if bundle.manifest.get("attention", {}).get("form") != form:
            parser.error(f"{bundle.path} is not a bundle built with --attention {form}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    config = {**bundles["fused"].manifest["model"]["config"], "k": bundles["fused"].k}
    pairs = []
    for engine in args.engines:
        for precision in args.precisions:
            paths = [make_path(f"{engine}:{precision}", bundles[form], args.threads, "cpu") for form in ("fused", "plain")]
            for path, form in zip(paths, ("fused", "plain")):
                path.name = f"{path.name} {form}"
            pairs.append((engine, precision, paths, _difference(paths)))
    rows = bench_shapes([p for _, _, paths, _ in pairs for p in paths], config, shapes, args.repeats, {}, log=print)
    result = {"machine": machine(), "threads": args.threads, "rows": rows, "pairs": [
        {"engine": e, "precision": p, "max_abs_difference": d, "fused": paths[0].name, "plain": paths[1].name} for e, p, paths, d in pairs]}
    report = to_markdown(result, shapes)
    print(report)
    if args.out:
        write_report(args.out, result, report)


def _difference(paths) -> float:
    """Largest |fused - plain| of last_hidden_state on the real tokens of a padded batch."""
    ids, mask = random_batch(4, 300, paths[0].model.bundle.k)
    mask[1, 200:], mask[2, 40:] = 0, 0
    fused, plain = (p.model.forward(ids, mask)["last_hidden_state"] for p in paths)
    return float(np.abs(fused - plain)[mask.astype(bool)].max())


def to_markdown(result: dict, shapes) -> str:
    times = {(r["path"], r["shape"]): r["median_s"] for r in result["rows"]}
    names = [f"{b}x{n}" for b, n in shapes]
    lines = [
        "# Fused against plain attention on the CPU",
        "",
        f"{describe_machine(result['machine'])}; {result['threads']} threads. Reproduce: `python benchmarks/attention_forms.py FUSED PLAIN` "
        "(the command is in the script's docstring). Median of the runs, alternating order; plain/fused > 1 means plain is slower.",
        "",
        "| engine, precision | " + " | ".join(f"{s} fused | {s} plain | plain/fused" for s in names) + " | max abs difference |",
        "|---|" + "---:|" * (3 * len(names)) + "---:|",
    ]
    for pair in result["pairs"]:
        cells = []
        for shape in names:
            fused, plain = times[pair["fused"], shape], times[pair["plain"], shape]
            cells += [f"{fused * 1e3:.0f} ms", f"{plain * 1e3:.0f} ms", f"{plain / fused:.2f}"]
        lines.append(f"| {pair['engine']} {pair['precision']} | " + " | ".join(cells) + f" | {pair['max_abs_difference']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
