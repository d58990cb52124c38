"""Throughput of `utrexport embed` in one process and on a local Ray with 1 and 2 workers, and the driver's peak
memory on a large input: the measured part of docs/scaling.md.

    python benchmarks/scaling.py BUNDLE --precision int8 --sequences 40 160 \
        --memory-bundle SMALL_BUNDLE --memory-sequences 100000 --out docs/scaling.json

Throughput runs real human 3'UTRs (the shipped ones, evenly over their length range) through the CLI, each run a
fresh process (a local Ray starts inside it; its start-up is part of the time). The memory run feeds
--memory-sequences real 3'UTR pieces of 100 nt to `embed --ray` and samples the driver's resident memory: the driver
never loads the model on a cluster, so a small bundle measures the same driver faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from utr_calibration import real_sequences
from utrexport.benchmark import machine


def timed_run(args: list[str]) -> tuple[float, int]:
    """Wall seconds of one CLI run, and the peak resident memory (bytes) of its driver process, sampled every 50 ms."""
    start = time.perf_counter()
    driver = psutil.Popen([sys.executable, "-m", "utrexport.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while driver.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    stderr = driver.stderr.read()
    if driver.returncode:
        raise SystemExit(f"failed: utrexport {' '.join(args)}\n{stderr[-2000:]}")
    return time.perf_counter() - start, peak


def throughput(bundle: str, precision: str, n: int, work: Path) -> list[dict]:
    """Each path on n real 3'UTRs, evenly over their length range."""
    seqs = sorted(real_sequences(), key=lambda r: len(r[1]))
    chosen = seqs[:: max(1, len(seqs) // n)][:n]
    fasta = work / "utrs.fa"
    fasta.write_text("".join(f">{name}\n{seq}\n" for name, seq in chosen))
    nt = sum(len(s) for _, s in chosen)
    cores = psutil.cpu_count(logical=True)
    runs = [("one process", ["--threads", str(cores)]),
            ("Ray, 1 worker x 2 threads", ["--ray", "--workers", "1", "--threads", str(cores)]),
            ("Ray, 2 workers x 1 thread", ["--ray", "--workers", "2", "--threads", "1"])]  # --chunk: the default, 16 with --ray
    rows = []
    for label, extra in runs:
        seconds, peak = timed_run(["embed", bundle, str(fasta), "-o", str(work / "out.npy"), "--force", "--precision", precision, *extra])
        rows.append({"path": label, "sequences": len(chosen), "nt": nt, "seconds": round(seconds, 1), "nt_per_s": round(nt / seconds),
                     "sequences_per_hour_per_worker": round(len(chosen) / seconds * 3600 / (2 if "2 workers" in label else 1))})
        print(rows[-1], flush=True)
    return rows


def fit(rows: list[dict]) -> list[dict]:
    """Per path, from its two largest runs: seconds = start-up + nt / steady rate."""
    out = []
    for path in dict.fromkeys(r["path"] for r in rows):
        a, b = sorted((r for r in rows if r["path"] == path), key=lambda r: r["nt"])[-2:]
        rate = (b["nt"] - a["nt"]) / (b["seconds"] - a["seconds"])
        out.append({"path": path, "startup_seconds": round(a["seconds"] - a["nt"] / rate, 1), "steady_nt_per_s": round(rate)})
        print(out[-1], flush=True)
    return out


def driver_memory(bundle: str, n: int, work: Path) -> dict:
    pieces = [(f"{name}:{i}", seq[i : i + 100]) for name, seq in real_sequences() for i in range(0, len(seq) - 99, 100)]
    fasta = work / "pieces.fa"
    with fasta.open("w") as f:
        for j in range(n):
            name, seq = pieces[j % len(pieces)]
            f.write(f">{j}_{name}\n{seq}\n")
    seconds, peak = timed_run(["embed", bundle, str(fasta), "-o", str(work / "mem.npy"), "--force", "--ray", "--threads", "1"])
    record = {"sequences": n, "input_mb": round(fasta.stat().st_size / 1e6, 1), "seconds": round(seconds, 1), "driver_peak_rss_mb": round(peak / 1e6)}
    print(record, flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--sequences", type=int, nargs="+", default=[40, 160],
                        help="input sizes: two give the fixed start-up cost and the steady rate of each path")
    parser.add_argument("--memory-bundle")
    parser.add_argument("--memory-sequences", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {"cpu": machine(), "bundle": args.bundle, "precision": args.precision,
                  "throughput": [row for n in args.sequences for row in throughput(args.bundle, args.precision, n, Path(tmp))]}
        report["fit"] = fit(report["throughput"])
        if args.memory_bundle:
            report["driver_memory"] = driver_memory(args.memory_bundle, args.memory_sequences, Path(tmp))
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
