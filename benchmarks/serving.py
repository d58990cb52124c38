"""Serving throughput and latency: `utrexport serve`'s tritonserver against in-process `embed`, in one run.

    python benchmarks/serving.py BUNDLE --precision int8 --engine openvino --out docs/serving

Real human 3'UTRs (the shipped ones, evenly over their length range). The server runs one model instance with all
cores; the in-process model is loaded with the same engine, precision and threads, and the two never run at the
same time (rounds alternate). Clients send one sequence per request over gRPC (tritonclient), from `concurrency`
threads, each with its own connection.

- throughput: sequences/s and nt/s of every sequence at each concurrency, against in-process `embed` of the same
  sequences in one call (the runtime's best case: every window sorted and packed by its token budget);
- latency: p50 and p99 of one request at each concurrency, against one in-process `embed([sequence])` call of each
  sequence at concurrency 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

import utr_runtime
from utr_calibration import real_sequences
from utrexport import triton
from utrexport.benchmark import describe_machine, machine


def chosen_sequences(n: int, max_nt: int | None = None) -> list[str]:
    """n real 3'UTRs evenly over their length range; with max_nt, a piece of at most that many nt of each."""
    seqs = sorted((s for _, s in real_sequences()), key=len)
    chosen = seqs[:: max(1, len(seqs) // n)][:n]
    return [s[:max_nt] for s in chosen] if max_nt else chosen


def client_round(port: int, seqs: list[str], concurrency: int) -> tuple[float, list[float], list[np.ndarray]]:
    """Wall seconds for every sequence, each request's latency, and the answers in sequence order."""
    import tritonclient.grpc as grpcclient

    local = threading.local()

    def one(i: int):
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        data = np.array([[seqs[i].encode()]], dtype=object)
        tensor = grpcclient.InferInput("sequence", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        start = time.perf_counter()
        result = local.client.infer("embed", [tensor])
        return time.perf_counter() - start, result.as_numpy("embedding")[0]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(len(seqs))))
    return time.perf_counter() - start, [d[0] for d in done], [d[1] for d in done]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--max-nt", type=int, help="Cut each 3'UTR to its first MAX_NT nt (e.g. 100: the windows 3UTRBERT's tasks score).")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; the best of each is reported.")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--out", help="Write OUT.json and OUT.md.")
    args = parser.parse_args()

    import os

    threads = os.cpu_count() or 1
    seqs = chosen_sequences(args.sequences, args.max_nt)
    nt = sum(map(len, seqs))
    print(f"{len(seqs)} real 3'UTRs, {nt:,} nt; {describe_machine(machine())}", flush=True)
    warnings.filterwarnings("ignore", category=utr_runtime.UntrainedModelWarning)  # speed does not depend on the weights
    model = utr_runtime.load(args.bundle, precision=args.precision, engine=args.engine, threads=threads)
    model.embed(seqs[:4])  # warm-up

    with tempfile.TemporaryDirectory() as scratch:
        options = triton.RepositoryOptions(precision=args.precision, engine=args.engine, threads=threads, capabilities=["embed"],
                                           max_queue_delay_us=args.max_queue_delay_us)
        triton.write_repository(args.bundle, Path(scratch) / "models", options)
        ports = triton.Ports.free()
        server = triton.find_server(None, None, print)
        with open(Path(scratch) / "server.log", "wb") as log:
            process = triton.start(server, Path(scratch) / "models", ports, "127.0.0.1", log)
        try:
            triton.wait_ready(process, "127.0.0.1", ports.http)
            client_round(ports.grpc, seqs[:4], 4)  # warm-up
            rows, in_process = run_rounds(model, ports.grpc, seqs, args)
        finally:
            triton.stop(process)

    report = {"machine": machine(), "bundle": str(args.bundle), "precision": args.precision, "engine": args.engine, "threads": threads,
              "sequences": len(seqs), "nt": nt, "max_queue_delay_us": args.max_queue_delay_us, "in_process": in_process, "server": rows,
              "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:])}
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(markdown)


def run_rounds(model, port: int, seqs: list[str], args) -> tuple[list[dict], dict]:
    """Alternating rounds: in-process embed of all sequences in one call, then the server at each concurrency. At
    concurrency 1 each sequence runs in-process alone and then through the server, one after the other, so the two
    latencies of a sequence are measured under the same conditions (this machine's speed drifts)."""
    nt = sum(map(len, seqs))
    expected = model.embed(seqs)
    best_batch = float("inf")
    server: dict[int, dict] = {}
    single: dict[str, list[float]] = {"in_process": [], "server": []}
    for round_ in range(args.rounds):
        start = time.perf_counter()
        model.embed(seqs)
        best_batch = min(best_batch, time.perf_counter() - start)
        for c in args.concurrency:
            if c == 1:
                latencies, answers, alone = [], [], []
                for s in seqs:
                    start = time.perf_counter()
                    model.embed([s])
                    alone.append(time.perf_counter() - start)
                    _, latency, answer = client_round(port, [s], 1)
                    latencies += latency
                    answers += answer
                seconds = sum(latencies)
                if round_ == 0 or seconds < server[1]["seconds"]:
                    single = {"in_process": alone, "server": latencies}
            else:
                seconds, latencies, answers = client_round(port, seqs, c)
            worst = float(np.abs(np.stack(answers) - expected).max())
            if c not in server or seconds < server[c]["seconds"]:
                server[c] = {"concurrency": c, "seconds": seconds, "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                             "max_abs_vs_in_process": worst}
            print(f"round {round_ + 1}: concurrency {c}: {seconds:.1f} s (in-process, all in one call: {best_batch:.1f} s)", flush=True)
    in_process = {"seconds": best_batch, "sequences_per_s": len(seqs) / best_batch, "nt_per_s": nt / best_batch,
                  "single_p50_ms": percentile(single["in_process"], 50), "single_p99_ms": percentile(single["in_process"], 99),
                  "single_sequences_per_s": len(seqs) / sum(single["in_process"])}
    rows = []
    for c, row in sorted(server.items()):
        row.update(sequences_per_s=len(seqs) / row["seconds"], nt_per_s=nt / row["seconds"], of_in_process=best_batch / row["seconds"])
        if c == 1:  # the server's own cost per request: the median of (server - in-process) over the same sequences
            row["p50_overhead_ms"] = percentile(np.subtract(single["server"], single["in_process"]).tolist(), 50)
        rows.append(row)
    return rows, in_process


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Serving benchmark: tritonserver (utrexport serve) against in-process embed",
        "",
        f"Machine: {m['cpu']}, ISA {', '.join(m['isa'])}, {m['cores']} cores; Python {m['python']}.",
        f"Bundle `{r['bundle']}`, {r['precision']} on {r['engine']}, {r['threads']} threads, one model instance; "
        f"{r['sequences']} real 3'UTRs ({r['nt']:,} nt), one sequence per gRPC request; queue delay {r['max_queue_delay_us']} us.",
        f"Command: `{r['command']}`",
        "",
        "| path | sequences/s | nt/s | of in-process | p50 latency | p99 latency | max abs vs in-process |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| in-process `embed`, all in one call | {r['in_process']['sequences_per_s']:.2f} | {r['in_process']['nt_per_s']:,.0f} | 100% | - | - | - |",
        f"| in-process `embed`, one sequence per call | {r['in_process']['single_sequences_per_s']:.2f} | "
        f"{r['in_process']['single_sequences_per_s'] / r['in_process']['sequences_per_s'] * r['in_process']['nt_per_s']:,.0f} | "
        f"{r['in_process']['single_sequences_per_s'] / r['in_process']['sequences_per_s']:.0%} | "
        f"{r['in_process']['single_p50_ms']:.1f} ms | {r['in_process']['single_p99_ms']:.1f} ms | - |",
    ]
    for row in r["server"]:
        lines.append(f"| server, concurrency {row['concurrency']} | {row['sequences_per_s']:.2f} | {row['nt_per_s']:,.0f} | {row['of_in_process']:.0%} | "
                     f"{row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms | {row['max_abs_vs_in_process']:.1e} |")
    overhead = next((row["p50_overhead_ms"] for row in r["server"] if "p50_overhead_ms" in row), None)
    if overhead is not None:
        lines += ["", f"At concurrency 1, a request's median cost over an in-process call of the same sequence: {overhead:+.1f} ms."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
