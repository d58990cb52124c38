"""Benchmarks shared by `utrexport bench` and the scripts under benchmarks/.

Figures are medians of repeated runs in one process; compare ratios measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from utr_calibration import real_sequences


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_s": statistics.median(ordered), "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "runs": len(ordered)}


def fixed_length_sequences(n: int, length: int) -> list[str]:
    """n real 3'UTR stretches of exactly `length` nt, cut from the shipped sequences end to end."""
    text = "".join(seq for _, seq in real_sequences("human_3utr_calibration.fa"))
    while len(text) < n * length:
        text += text
    return [text[i * length : (i + 1) * length] for i in range(n)]


def tokenizer_speed(ks=(3, 6), n: int = 1000, length: int = 1000, repeats: int = 15) -> list[dict]:
    """utr_runtime's KmerTokenizer against multimolecule's RnaTokenizer, one batch call each, same inputs."""
    from utr_runtime import KmerTokenizer

    seqs = fixed_length_sequences(n, length)
    rows = []
    for k in ks:
        tokenizer = KmerTokenizer(k)
        ours = summary(timed(lambda: tokenizer(seqs, padding=True), repeats, warmup=3))
        row = {"k": k, "sequences": n, "length_nt": length, "utr_runtime_s": ours["median_s"]}
        try:
            from multimolecule import RnaTokenizer
        except ImportError:
            row["reference_s"] = row["speedup"] = None
        else:
            ref_tok = RnaTokenizer(nmers=k)
            ref = summary(timed(lambda: ref_tok(seqs, padding=True, return_tensors="np"), 3))
            row["reference_s"] = ref["median_s"]
            row["speedup"] = ref["median_s"] / ours["median_s"]
        rows.append(row)
    return rows
