"""Bundle verification: run the parity fixtures through the runtime for every precision and compare."""

from __future__ import annotations

import os

import numpy as np

from .bundle import Bundle
from .engines import open_runner
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


def verify(bundle: Bundle | str | os.PathLike, precisions=None, device: str = "cpu", threads: int | None = None) -> list[dict]:
    """Comparison rows (with a 'precision' key) of every model file's outputs against the PyTorch reference outputs.

    Besides the raw outputs, the mean-pooled embedding (what `embed` returns) is compared as `mean_pooled`.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    fixtures = load_fixtures(bundle)
    feeds = {k: v for k, v in fixtures.items() if k in FIXTURE_INPUTS}
    mask = fixtures["attention_mask"]
    reference = {k: v for k, v in fixtures.items() if k in bundle.output_names}
    reference["mean_pooled"] = mean_pooled(reference["last_hidden_state"], mask)
    rows = []
    for label, precision, runner in _runners(bundle, precisions, device, threads):
        candidate = runner.run(feeds)
        candidate["mean_pooled"] = mean_pooled(candidate["last_hidden_state"], mask)
        for result in compare(reference, candidate, TOLERANCES[precision], mask, bundle.task):
            rows.append({"precision": label, **result.as_dict()})
    return rows


def _runners(bundle: Bundle, precisions, device: str, threads):
    """(label, precision, runner) for every model file of each precision, or every engine on device="tensorrt"."""
    if device == "tensorrt":
        from .engines.tensorrt import open_engine_runner

        engines = bundle.engines
        if not engines:
            raise BundleError(f"{bundle.path}: no TensorRT engines; build them with: utrexport engine {bundle.path} --precision fp16")
        for precision in precisions or list(engines):
            yield f"{precision}/tensorrt", precision, open_engine_runner(bundle, precision)
        return
    for precision in precisions or bundle.precisions:
        for label, model_file in bundle.model_variants(precision).items():
            yield label, precision, open_runner(model_file, device=device, threads=threads)


def mean_pooled(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of each row's k-mer vectors: real tokens without the first (<cls>) and last (<eos>)."""
    kmers = attention_mask.astype(bool).copy()
    lengths = kmers.sum(1)
    kmers[:, 0] = False
    kmers[np.arange(len(kmers)), lengths - 1] = False
    return (hidden * kmers[..., None]).sum(1) / np.maximum(kmers.sum(1), 1)[:, None]
