"""Long sequences as windows, and windows as length-sorted batches.

A sequence of n k-mers longer than a window (max_tokens - 2 k-mers, room for <cls> and <eos>) is cut into the
fewest windows that share at least `overlap` k-mers with their neighbours, all of the same length, spread
evenly from the sequence's start to its end (integer arithmetic only, so that any language reproduces the plan:
docs/spec.md). When the outputs are put back together, each k-mer is taken from exactly one window: in an overlap, the left window
keeps the first half and the right window the second, so every k-mer comes from the window in which it sits
farther from the edge. Each window therefore *owns* a contiguous range of k-mers, and the owned ranges tile
the sequence.

Batches: windows are sorted by length (longest first) and packed greedily under a token budget
(batch rows x longest row), so padding is only up to the longest row of each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    sequence: int  # index of the input sequence
    start: int  # first k-mer of the window (0-based, in the sequence's k-mers)
    end: int  # one past its last k-mer
    own_start: int  # first row this window contributes to the stitched output (a k-mer, or a nucleotide)
    own_end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def window_bounds(n: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of each window over n k-mers: as few windows as keep `overlap` shared, all of one length.

    Equal windows, rather than full ones with a short remainder, run fewer tokens: 600 k-mers become two
    windows of 332, not two of 510.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window (got window={window}, overlap={overlap})")
    if n <= window:
        return [(0, n)]
    count = _ceil_div(n - overlap, window - overlap)
    length = _ceil_div(n + (count - 1) * overlap, count)  # <= window; consecutive windows share >= overlap
    # Starts rounded down: consecutive starts differ by at most ceil((n - length) / (count - 1)) <= length - overlap.
    starts = [i * (n - length) // (count - 1) for i in range(count)]
    return [(s, s + length) for s in starts]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_windows(sequence: int, n: int, window: int, overlap: int, extent: int = 0) -> list[Window]:
    """Windows over n k-mers, each owning the part of the output where it sits farther from its edges.

    extent: how far a window's output reaches past its last k-mer. 0 for k-mer rows; k - 1 for nucleotide rows
    (k-mers [start, end) cover nucleotides [start, end + k - 1)), whose ownership is then in nucleotides.
    """
    bounds = window_bounds(n, window, overlap)
    # Ownership changes hands in the middle of each overlap (an odd overlap's middle row goes to the right window).
    cuts = [0] + [(bounds[i + 1][0] + bounds[i][1] + extent) // 2 for i in range(len(bounds) - 1)] + [n + extent]
    return [Window(sequence, s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(bounds)]


def plan_batches(lengths, max_batch_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Index arrays of rows, longest first, each batch's rows x longest row within `max_batch_tokens`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < len(order):
        longest = int(lengths[order[i]])
        size = max(1, min(max_batch_size, max_batch_tokens // max(longest, 1)))
        batches.append(order[i : i + size])
        i += size
    return batches


def padding_waste(lengths, batches: list[np.ndarray]) -> float:
    """Fraction of the tokens run that are padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    run = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - float(lengths.sum()) / run if run else 0.0
