"""Shared fixtures. The reference (multimolecule, ~10 s to import) is imported once, on first use."""

from __future__ import annotations

import functools

import pytest

from utr_calibration import DATA, real_sequences  # noqa: F401  (re-exported for the tests)

KMERS = (3, 4, 5, 6)


@functools.cache
def multimolecule():
    return pytest.importorskip("multimolecule", reason="the reference implementation (test extra) is not installed")


@functools.cache
def reference_tokenizer(k: int):
    return multimolecule().RnaTokenizer(nmers=k)
