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


CALIBRATION_FILE = "human_3utr_calibration.fa"


def calibration_windows(k: int, n: int = 64, seed: int = 0, sequences=None, max_tokens: int = 512, overlap: int = 64) -> list:
    """n token-id rows (<cls> k-mers <eos>) for INT8 calibration, reproducible from `seed`.

    Half are windows exactly as the runtime cuts real 3'UTRs (so long, full windows and whole short UTRs),
    picked evenly across their length range; half are short crops (16-256 k-mers) from random places, the
    length of the short sequences users also embed. `sequences` (strings) replaces the shipped 3'UTRs.
    """
    import numpy as np

    from utr_runtime.tokenizer import KmerTokenizer
    from utr_runtime.windows import split_windows

    if sequences is None:
        sequences = [s for _, s in real_sequences(CALIBRATION_FILE)]
    tokenizer = KmerTokenizer(k)
    kmers = [row[1:-1] for row in tokenizer.encode_batch(list(sequences))]
    kmers = [ids for ids in kmers if len(ids) >= 16]
    if not kmers:
        raise ValueError("no calibration sequence is long enough (at least 16 k-mers needed)")
    rng = np.random.default_rng(seed)
    windows = [(i, w.start, w.end) for i, ids in enumerate(kmers) for w in split_windows(i, len(ids), max_tokens - 2, overlap)]
    windows.sort(key=lambda w: w[2] - w[1])
    picks = np.linspace(0, len(windows) - 1, n - n // 2).round().astype(int)
    chosen = [windows[j] for j in picks]
    for _ in range(n // 2):
        i = int(rng.integers(len(kmers)))
        length = int(rng.integers(16, min(256, len(kmers[i])) + 1))
        start = int(rng.integers(0, len(kmers[i]) - length + 1))
        chosen.append((i, start, start + length))
    rng.shuffle(chosen)
    return [tokenizer.with_specials(kmers[i][a:b]) for i, a, b in chosen]
