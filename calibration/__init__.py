"""utr_calibration: the real human 3'UTR sequences shipped with utrexport, and INT8 calibration sets built from them."""

from __future__ import annotations

import functools
import importlib.resources

from utr_runtime.sequences import read_sequences

DATA = importlib.resources.files(__name__) / "data"


@functools.cache
def real_sequences(name: str = "human_3utr_calibration.fa") -> tuple[tuple[str, str], ...]:
    """(id, sequence) pairs of one shipped data file (see data/README.md for sources and licenses)."""
    return tuple(read_sequences(str(DATA / name)))
