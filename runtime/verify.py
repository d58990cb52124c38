"""Bundle verification: run the parity fixtures through the runtime for every precision and compare."""

from __future__ import annotations

import os

import numpy as np

from .bundle import Bundle
from .engines import installed, open_runner
from .errors import BundleError
from .parity import TOLERANCES, compare

FIXTURE_INPUTS = ("input_ids", "attention_mask", "mask_positions")


def load_fixtures(bundle: Bundle) -> dict[str, np.ndarray]:
    name = bundle.manifest.get("fixtures")
    if not name:
        raise BundleError(f"{bundle.path}: the manifest names no parity fixtures")
    try:
        with np.load(bundle.file(name)) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle.path}: cannot read {name} ({e})") from None


def verify(bundle: Bundle | str | os.PathLike, precisions=None, device: str = "cpu", threads: int | None = None, engines=None) -> list[dict]:
    """Comparison rows (with 'precision' and 'engine' keys) of every model file's outputs, on every engine,
    against the PyTorch reference outputs.

    engines: on the CPU, every installed engine by default (ONNX Runtime, OpenVINO); bf16 is checked on OpenVINO
    where the CPU has native bf16. Besides the raw outputs, the mean-pooled embedding (what `embed` returns) is
    compared as `mean_pooled`.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    bundle.check_files()  # every file, opened here or not
    bundle.tokenizer()  # the spec must load, and agree with the model's k
    fixtures = load_fixtures(bundle)
    feeds = {k: v for k, v in fixtures.items() if k in FIXTURE_INPUTS}
    mask = fixtures["attention_mask"]
    reference = {k: v for k, v in fixtures.items() if k in bundle.output_names}
    reference["mean_pooled"] = mean_pooled(reference["last_hidden_state"], mask)
    rows = []
    for label, precision, runner in _runners(bundle, precisions, device, threads, engines):
        candidate = runner.run(feeds)
        candidate["mean_pooled"] = mean_pooled(candidate["last_hidden_state"], mask)
        for result in compare(reference, candidate, TOLERANCES[precision], mask, bundle.task):
            rows.append({"precision": label, "engine": runner.engine, **result.as_dict()})
    return rows


def default_engines(device: str = "cpu") -> list[str]:
    """The engines verify runs on a device: ONNX Runtime, and OpenVINO on the CPU where it is installed."""
    return ["onnxruntime"] + (["openvino"] if device == "cpu" and installed("openvino") else [])


def _runners(bundle: Bundle, precisions, device: str, threads, engines):
    """(label, precision, runner) for every model file of each precision on each engine, or every TensorRT engine."""
    if device == "tensorrt":
        from .engines.tensorrt import open_engine_runner

        built = bundle.engines
        if not built:
            raise BundleError(f"{bundle.path}: no TensorRT engines; build them with: utrexport engine {bundle.path} --precision fp16")
        for precision in precisions or list(built):
            yield f"{precision}/tensorrt", precision, open_engine_runner(bundle, precision)
        return
    for engine in engines or default_engines(device):
        for precision in precisions or runnable_precisions(bundle, engine):
            if precision == "bf16":
                name = bundle.model_name("bf16")
                yield "bf16", "bf16", open_runner(bundle.read_model(name), device, threads, engine, inference_precision="bf16", name=name)
                continue
            for label, name in bundle.model_names(precision).items():
                yield label, precision, open_runner(bundle.read_model(name), device, threads, engine, name=name)


def runnable_precisions(bundle: Bundle, engine: str) -> list[str]:
    """The bundle's precisions, and bf16 on OpenVINO where the CPU runs it natively."""
    if engine == "openvino" and "fp32" in bundle.precisions and "bf16" not in bundle.manifest.get("left_out", {}):
        from .engines.openvino import bf16_supported

        if bf16_supported():
            return bundle.precisions + ["bf16"]
    return bundle.precisions


def mean_pooled(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of each row's k-mer vectors: real tokens without the first (<cls>) and last (<eos>)."""
    kmers = attention_mask.astype(bool).copy()
    lengths = kmers.sum(1)
    kmers[:, 0] = False
    kmers[np.arange(len(kmers)), lengths - 1] = False
    return (hidden * kmers[..., None]).sum(1) / np.maximum(kmers.sum(1), 1)[:, None]
