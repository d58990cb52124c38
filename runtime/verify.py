"""Bundle verification: run the parity fixtures through the runtime for every precision and compare."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np

from .bundle import Bundle
from .engines import installed, open_bundle_model
from .errors import BundleError
from .parity import TOLERANCES, compare

FIXTURE_INPUTS = ("input_ids", "attention_mask", "mask_positions")


def load_fixtures(bundle: Bundle) -> dict[str, np.ndarray]:
    """The parity fixtures, checked for what verify feeds and compares: the model's inputs and every output it gives,
    token ids inside the vocabulary, a 0/1 mask and mask positions inside their rows."""
    name = bundle.manifest.get("fixtures")
    if not isinstance(name, str) or not name:
        raise BundleError(f"{bundle.path}: the manifest names no parity fixtures")
    try:
        with np.load(io.BytesIO(bundle.read(name)), allow_pickle=False) as data:
            fixtures = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"{bundle.path}: cannot read {name} ({str(e)[:200]})") from None
    problem = _fixture_problem(fixtures, bundle)
    if problem:
        raise BundleError(f"{bundle.path}: {name}: {problem}")
    return fixtures


def _fixture_problem(fixtures: dict[str, np.ndarray], bundle: Bundle) -> str | None:
    missing = [key for key in bundle.input_names + bundle.output_names if key not in fixtures]
    if missing:
        return f"no {missing[0]!r} array (the model's inputs and outputs are all needed)"
    ids, mask = fixtures["input_ids"], fixtures["attention_mask"]
    vocabulary = bundle.tokenizer().vocab_size
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or mask.shape != ids.shape or mask.dtype.kind not in "iu":
        return "input_ids and attention_mask must be integer arrays of one (batch, tokens) shape"
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocabulary or not np.isin(mask, (0, 1)).all() or ids.shape[1] > bundle.max_tokens:
        return f"token ids must be 0 to {vocabulary - 1}, the mask 0 or 1, rows at most {bundle.max_tokens} tokens"
    positions = fixtures.get("mask_positions")
    if positions is not None and (positions.ndim != 2 or len(positions) != len(ids) or positions.dtype.kind not in "iu"
                                  or positions.min(initial=0) < 0 or positions.max(initial=0) >= ids.shape[1]):
        return "mask_positions must be (batch, positions) indices into each row"
    if any(len(fixtures[name]) != len(ids) or fixtures[name].dtype.kind != "f" for name in bundle.output_names):
        return "every output must be a float array with one entry per row"
    hidden = fixtures["last_hidden_state"]
    if hidden.shape != ids.shape + (int(bundle.manifest["model"]["config"]["hidden_size"]),):
        return f"last_hidden_state must be (batch, tokens, hidden_size), not {hidden.shape}"
    return None


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
            tf32 = precision == "fp32" and built.get(precision, {}).get("tf32") is True  # fp32 layers in TF32: its own gate
            yield f"{precision}/tensorrt{'-tf32' if tf32 else ''}", "tf32" if tf32 else precision, open_engine_runner(bundle, precision)
        return
    for engine in engines or default_engines(device):
        for precision in precisions or runnable_precisions(bundle, engine):
            if precision == "bf16":
                name = bundle.model_name("bf16")
                yield "bf16", "bf16", open_bundle_model(bundle, name, "bf16", device, threads, engine)
                continue
            for label, name in bundle.model_names(precision, engine).items():  # what runs: int8's float parts as load runs them
                yield label, precision, open_bundle_model(bundle, name, precision, device, threads, engine)


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
