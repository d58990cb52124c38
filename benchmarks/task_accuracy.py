"""Decision accuracy of every precision on a trained task model: AUROC and labels flipped against fp32.

    .venv/bin/python benchmarks/task_accuracy.py [--out docs/task_accuracy.md]

Builds a bundle (fp32, fp16, int8) from the classifier fine-tuned on real labelled 3'UTR windows
(`tests/data/utrbert-3mer-dev-classifier`, made by `tests/data/make_task_model.py`) and runs `predict` on its
held-out windows (never seen in training, nor in INT8 calibration) with each model file on each CPU engine (ONNX
Runtime, and OpenVINO where installed), NNCF's OpenVINO int8 included even where the build did not keep it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

CHECKPOINT = Path(__file__).resolve().parents[1] / "tests" / "data" / "utrbert-3mer-dev-classifier"


def held_out() -> tuple[list[str], np.ndarray, dict]:
    import csv

    from utr_calibration import DATA

    metrics = json.loads((CHECKPOINT / "metrics.json").read_text())
    with open(DATA / "utrbert_dev_100nt.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    picked = [rows[i] for i in metrics["held_out_rows"]]
    return [r["sequence"] for r in picked], np.array([int(r["label"]) for r in picked]), metrics


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    import torch
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels)))


def measure(bundle_dir: Path, work: Path) -> list[dict]:
    """One row per model file and CPU engine: AUROC, labels flipped against fp32 (ONNX Runtime), largest probability
    difference. int8 runs as `load` runs it (on OpenVINO, bf16 float parts where the CPU has native bf16). NNCF's
    OpenVINO int8 is measured even where the build did not keep it (quantized here as the build does, into `work`)."""
    import utr_runtime
    from utr_runtime.engines import inference_precision, installed, open_bundle_model, open_runner

    bundle = utr_runtime.Bundle(bundle_dir)
    sequences, labels, _ = held_out()
    runs = []
    for engine in ["onnxruntime"] + (["openvino"] if installed("openvino") else []):
        for precision in bundle.precisions:
            for label, name in bundle.model_names(precision, engine).items():
                runs.append((label, f"{label} ({name}), {engine}", precision, name, engine))
        if engine == "openvino" and "not_kept" in bundle.manifest["models"].get("int8", {}):
            runs.append(("int8/openvino", "int8/openvino (NNCF, not kept by the build), openvino", "int8", str(_nncf_model(bundle, work)), engine))
    rows, reference = [], None
    for label, name, precision, model_file, engine in runs:
        if model_file in bundle.manifest["files"]:
            runner = open_bundle_model(bundle, model_file, precision, engine=engine)
        else:  # NNCF's model the build did not keep, made here
            runner = open_runner(model_file, engine=engine, inference_precision=inference_precision(precision, engine))
        p = utr_runtime.Model(bundle, runner, precision, "cpu").predict(sequences)[:, 0]
        reference = p if reference is None else reference
        rows.append({
            "label": label, "engine": engine,
            "model": name + (f" ({runner.inference_precision} float parts)" if engine == "openvino" and precision == "int8" else ""),
            "auroc": auroc(p, labels),
            "flipped": float(((p >= 0.5) != (reference >= 0.5)).mean()),
            "flipped_count": int(((p >= 0.5) != (reference >= 0.5)).sum()),
            "prob_max_abs": float(np.abs(p - reference).max()),
        })
    return rows


def _nncf_model(bundle, work: Path) -> Path:
    from utr_calibration import calibration_windows
    from utrexport.build import Calibration
    from utrexport.precision import quantize_openvino

    config = bundle.manifest["model"]["config"]
    calibration = Calibration()
    rows = calibration_windows(bundle.k, calibration.size, calibration.seed)
    quantize_openvino(bundle.file("model.fp32.onnx"), work / "nncf.xml", rows, config["num_hidden_layers"])
    return work / "nncf.xml"


def to_markdown(rows: list[dict], metrics: dict, n: int) -> str:
    from utrexport.benchmark import describe_machine, machine

    lines = [
        "# Task model accuracy per precision",
        "",
        f"`{CHECKPOINT.name}`: {metrics['model']['class']} (k={metrics['model']['nmers']}, {metrics['model']['num_hidden_layers']} layers, "
        f"hidden {metrics['model']['hidden_size']}), fine-tuned on {metrics['training']['train_rows']} real labelled 100-nt 3'UTR windows; "
        f"{n} held-out windows. PyTorch (multimolecule) held-out AUROC: {metrics['held_out_auroc_pytorch']:.4f}.",
        f"Machine: {describe_machine(machine())}, Python {platform.python_version()}. Command: `.venv/bin/python benchmarks/task_accuracy.py --out docs/task_accuracy.md`",
        "",
        "| model, engine | AUROC | labels flipped vs fp32 | max probability difference vs fp32 |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['auroc']:.4f} | {r['flipped']:.2%} ({r['flipped_count']}) | {r['prob_max_abs']:.2e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    from utrexport import checkpoints
    from utrexport.build import build_bundle

    with tempfile.TemporaryDirectory() as tmp:
        path = build_bundle(checkpoints.from_folder(CHECKPOINT), Path(tmp) / "bundle", ("fp32", "fp16", "int8"), log=lambda m: None)
        rows = measure(path, Path(tmp))
    sequences, _, metrics = held_out()
    report = to_markdown(rows, metrics, len(sequences))
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
