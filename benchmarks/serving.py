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
from pathlib import Path

import numpy as np

import utr_runtime
from utr_calibration import real_sequences
from utrexport import triton
from utrexport.benchmark import describe_machine, machine


def chosen_sequences(n: int) -> list[str]:
    seqs = sorted((s for _, s in real_sequences()), key=len)
    return seqs[:: max(1, len(seqs) // n)][:n]


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


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
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; the best of each is reported.")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--out", help="Write OUT.json and OUT.md.")
    args = parser.parse_args()

    import os

    threads = os.cpu_count() or 1
    seqs = chosen_sequences(args.sequences)
    nt = sum(map(len, seqs))
    print(f"{len(seqs)} real 3'UTRs, {nt:,} nt; {describe_machine(machine())}", flush=True)
    model = utr_runtime.load(args.bundle, precision=args.precision, engine=args.engine, threads=threads)
    model.embed(seqs[:4])  # warm-up

    with tempfile.TemporaryDirectory() as scratch:
        options = triton.RepositoryOptions(precision=args.precision, engine=args.engine, threads=threads, capabilities=["embed"],
                                           max_queue_delay_us=args.max_queue_delay_us)
        triton.write_repository(args.bundle, Path(scratch) / "models", options)
        ports = triton.Ports(*free_ports(3))
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
    nt = sum(map(len, seqs))
    expected = model.embed(seqs)
    best_batch, single = float("inf"), []
    server: dict[int, dict] = {}
    for round_ in range(args.rounds):
        start = time.perf_counter()
        model.embed(seqs)
        best_batch = min(best_batch, time.perf_counter() - start)
        if round_ == 0:
            for s in seqs:
                start = time.perf_counter()
                model.embed([s])
                single.append(time.perf_counter() - start)
        for c in args.concurrency:
            seconds, latencies, answers = client_round(port, seqs, c)
            worst = float(np.abs(np.stack(answers) - expected).max())
            if c not in server or seconds < server[c]["seconds"]:
                server[c] = {"concurrency": c, "seconds": seconds, "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                             "max_abs_vs_in_process": worst}
            print(f"round {round_ + 1}: concurrency {c}: {seconds:.1f} s (in-process {best_batch:.1f} s)", flush=True)
    in_process = {"seconds": best_batch, "sequences_per_s": len(seqs) / best_batch, "nt_per_s": nt / best_batch,
                  "single_p50_ms": percentile(single, 50), "single_p99_ms": percentile(single, 99)}
    rows = []
    for c, row in sorted(server.items()):
        row.update(sequences_per_s=len(seqs) / row["seconds"], nt_per_s=nt / row["seconds"], of_in_process=best_batch / row["seconds"],
                   p50_over_in_process_ms=row["p50_ms"] - in_process["single_p50_ms"])
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
        f"| in-process `embed` (all in one call) | {r['in_process']['sequences_per_s']:.2f} | {r['in_process']['nt_per_s']:,.0f} | 100% | "
        f"{r['in_process']['single_p50_ms']:.1f} ms (one sequence per call) | {r['in_process']['single_p99_ms']:.1f} ms | - |",
    ]
    for row in r["server"]:
        lines.append(f"| server, concurrency {row['concurrency']} | {row['sequences_per_s']:.2f} | {row['nt_per_s']:,.0f} | {row['of_in_process']:.0%} | "
                     f"{row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms | {row['max_abs_vs_in_process']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
