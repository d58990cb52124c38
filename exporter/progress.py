"""Progress of a long run, one rule for every command: a tqdm bar on a terminal; elsewhere (a log file, a cluster
job) a plain line on stderr every LOG_INTERVAL seconds."""

from __future__ import annotations

import sys
import time


def amount(nt: float) -> str:
    """nt, knt or Mnt: whichever reads as a number a person would say."""
    return f"{nt:,.0f} nt" if nt < 1e4 else f"{nt / 1e3:,.1f} knt" if nt < 1e7 else f"{nt / 1e6:,.2f} Mnt"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """Work done out of `total` (None: unknown), in `unit`s: "nt" for sequences run (sequences counted alongside; the
    total is an estimate, the input's size, so the ETA errs long) or a thing counted exactly, such as "variant".

    `advance` adds a batch's provisional count (rows of k-mers, about as many nt); `settle` replaces what was
    provisional with a chunk's exact count; `update` adds exact counts (variants scored)."""

    LOG_INTERVAL = 30.0

    def __init__(self, total: int | None, unit: str = "nt", log=print):
        from tqdm import tqdm

        self.live, self.total, self.unit, self.log = sys.stderr.isatty(), total, unit, log
        nt = unit == "nt"
        self.bar = tqdm(total=total, unit=unit, unit_scale=nt, dynamic_ncols=True, file=sys.stderr, disable=not self.live,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} nt [{elapsed}<{remaining}, {rate_fmt}]{postfix}" if total and nt else None)
        self.start = self.last_log = time.monotonic()
        self.done = self.sequences = self.pending = self.pending_sequences = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if not self.live and self.unit == "nt" and self.sequences and exc[0] is None:
            self.log(self._line(final=True))

    def advance(self, rows: int, sequences: int = 0) -> None:
        """A batch finished `rows` k-mers (about as many nucleotides) and completed `sequences`."""
        self.pending += rows
        self.pending_sequences += sequences
        self.bar.update(rows)
        self.bar.set_postfix_str(f"{self.sequences + self.pending_sequences:,} sequences", refresh=False)
        self._maybe_log()

    def settle(self, sequences: int, done: int) -> None:
        """A chunk's exact count replaces its per-batch estimate."""
        self.sequences += sequences
        self.done += done
        self.pending = self.pending_sequences = 0
        self.bar.n = self.done
        if self.unit == "nt":
            self.bar.set_postfix_str(f"{self.sequences:,} sequences", refresh=True)
        else:
            self.bar.refresh()
        self._maybe_log()

    def update(self, n: int) -> None:
        self.settle(0, n)

    def eta(self) -> float | None:
        """Seconds left, from the rate so far and the total (None without one)."""
        elapsed, done = time.monotonic() - self.start, self.done + self.pending
        if not self.total or not done or elapsed <= 0:
            return None
        return max(self.total - done, 0) / (done / elapsed)

    def _maybe_log(self) -> None:
        if not self.live and time.monotonic() - self.last_log >= self.LOG_INTERVAL:
            self.last_log = time.monotonic()
            self.log(self._line())

    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        done = self.done + self.pending
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.unit != "nt":
            left = f", about {duration((self.total - done) / rate)} to go" if rate > 0 else ""
            return f"{done:,.0f} of {self.total:,} {self.unit}s scored ({rate:.1f}/s{left})"
        count = self.sequences + self.pending_sequences
        line = f"{count:,} sequence{'s' if count != 1 else ''}, {amount(done)}, {rate:,.0f} nt/s, {elapsed:.0f} s"
        if self.total and not final and rate > 0:
            line += f", about {min(done / self.total, 0.99):.0%} of the input, ETA {max(self.total - done, 0) / rate:.0f} s"
        return ("done: " if final else "") + line
