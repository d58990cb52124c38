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
    """Comparison rows (with a 'precision' key) of each precision's outputs against the PyTorch reference outputs."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    fixtures = load_fixtures(bundle)
    feeds = {k: v for k, v in fixtures.items() if k in FIXTURE_INPUTS}
    reference = {k: v for k, v in fixtures.items() if k in bundle.output_names}
    rows = []
    for precision in precisions or bundle.precisions:
        runner = open_runner(bundle.model_file(precision), device=device, threads=threads)
        candidate = runner.run(feeds)
        for result in compare(reference, candidate, TOLERANCES[precision], fixtures["attention_mask"]):
            rows.append({"precision": precision, **result.as_dict()})
    return rows
