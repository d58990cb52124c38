"""Serving throughput and latency: `utrexport serve` (its front, and Triton's gRPC behind it) against in-process
`embed`, in one run.

    python benchmarks/serving.py BUNDLE --precision int8 --engine openvino --out docs/serving

Real human 3'UTRs (the shipped ones, evenly over their length range). The server (`utrexport serve`, run as a user
would, with an API key) runs one model instance with all cores; the in-process model is loaded with the same engine,
precision and threads, and the two never run at the same time (rounds alternate). Clients send one sequence per
request, from `concurrency` threads, each with its own connection: over gRPC straight to Triton (tritonclient), and
over HTTP to the front's OpenAI `/v1/embeddings` (base64, as OpenAI's clients ask).

- throughput: sequences/s and nt/s of every sequence at each concurrency, against in-process `embed` of the same
  sequences in one call (the runtime's best case: every window sorted and packed by its token budget);
- latency: p50 and p99 of one request at each concurrency; at concurrency 1 each sequence runs in-process, over
  gRPC and through the front one after the other, so the medians of the differences are each path's own cost.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

import utr_runtime
from utr_calibration import real_sequences
from utrexport import tritonserver
from utrexport.benchmark import describe_machine, machine, write_report


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


def front_round(port: int, seqs: list[str], concurrency: int, key: str) -> tuple[float, list[float], list[np.ndarray]]:
    """The same through the front's /v1/embeddings (base64 float32 answers): `concurrency` clients, each with its own
    keep-alive connection, from one asyncio thread (aiohttp), as a load generator would; 64 Python threads of a
    blocking client would take a core of this machine from the server."""
    import asyncio
    import base64

    import aiohttp

    async def run() -> list[tuple[float, np.ndarray]]:
        done: list = [None] * len(seqs)
        queue = list(range(len(seqs)))[::-1]
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

        async def client(session):
            while queue:
                i = queue.pop()
                body = json.dumps({"model": "embed", "input": seqs[i], "encoding_format": "base64"})
                start = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/v1/embeddings", data=body, headers=headers) as answer:
                    data = await answer.read()
                seconds = time.perf_counter() - start
                if answer.status != 200:
                    raise RuntimeError(f"the front answered {answer.status}: {data[:300]!r}")
                done[i] = seconds, np.frombuffer(base64.b64decode(json.loads(data)["data"][0]["embedding"]), "<f4")

        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return done

    start = time.perf_counter()
    done = asyncio.run(run())
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

    threads = os.cpu_count() or 1
    seqs = chosen_sequences(args.sequences, args.max_nt)
    nt = sum(map(len, seqs))
    print(f"{len(seqs)} real 3'UTRs, {nt:,} nt; {describe_machine(machine())}", flush=True)
    warnings.filterwarnings("ignore", category=utr_runtime.UntrainedModelWarning)  # speed does not depend on the weights
    model = utr_runtime.load(args.bundle, precision=args.precision, engine=args.engine, threads=threads)
    model.embed(seqs[:4])  # warm-up

    key = "benchmark-key"
    ports = tritonserver.Ports.free()
    with tempfile.TemporaryDirectory() as scratch:
        command = [str(Path(sys.executable).parent / "utrexport"), "serve", args.bundle, "--model", "embed", "--precision", args.precision,
                   "--engine", args.engine, "--threads", str(threads), "--max-queue-delay-us", str(args.max_queue_delay_us),
                   "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
                   "--max-waiting", "1024", "--triton-log", str(Path(scratch) / "triton.log")]
        with open(Path(scratch) / "serve.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "UTREXPORT_API_KEY": key})
        try:
            wait_ready(process, ports.http, Path(scratch) / "serve.log")
            client_round(ports.grpc, seqs[:4], 4)  # warm-up
            front_round(ports.http, seqs[:4], 4, key)
            rows, in_process = run_rounds(model, ports, key, seqs, args)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)

    report = {"machine": machine(), "bundle": str(args.bundle), "precision": args.precision, "engine": args.engine, "threads": threads,
              "sequences": len(seqs), "nt": nt, "max_queue_delay_us": args.max_queue_delay_us, "in_process": in_process, "server": rows,
              "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:])}
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        write_report(args.out, report, markdown)


def wait_ready(process, port: int, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"utrexport serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit("utrexport serve was not ready in 10 minutes")


PATHS = {"grpc": "gRPC to Triton", "front": "front, /v1/embeddings"}


def run_rounds(model, ports, key: str, seqs: list[str], args) -> tuple[list[dict], dict]:
    """Alternating rounds: in-process embed of all sequences in one call, then each path at each concurrency. At
    concurrency 1 each sequence runs in-process alone, then over gRPC, then through the front, one after the other, so
    the latencies of a sequence are measured under the same conditions (this machine's speed drifts)."""
    nt = sum(map(len, seqs))
    expected = model.embed(seqs)
    best_batch = float("inf")
    server: dict[tuple[str, int], dict] = {}
    single: dict[str, list[float]] = {}
    rounds = {"grpc": lambda ss, c: client_round(ports.grpc, ss, c), "front": lambda ss, c: front_round(ports.http, ss, c, key)}
    for round_ in range(args.rounds):
        start = time.perf_counter()
        model.embed(seqs)
        best_batch = min(best_batch, time.perf_counter() - start)
        for c in args.concurrency:
            if c == 1:
                latencies, answers, alone = {"grpc": [], "front": []}, {"grpc": [], "front": []}, []
                for s in seqs:
                    start = time.perf_counter()
                    model.embed([s])
                    alone.append(time.perf_counter() - start)
                    for path, one_round in rounds.items():
                        _, latency, answer = one_round([s], 1)
                        latencies[path] += latency
                        answers[path] += answer
                if round_ == 0 or sum(latencies["front"]) < server["front", 1]["seconds"]:
                    single = {"in_process": alone, **latencies}
                results = {path: (sum(latencies[path]), latencies[path], answers[path]) for path in rounds}
            else:
                results = {path: one_round(seqs, c) for path, one_round in rounds.items()}
            for path, (seconds, latency, answer) in results.items():
                worst = float(np.abs(np.stack(answer) - expected).max())
                if (path, c) not in server or seconds < server[path, c]["seconds"]:
                    server[path, c] = {"path": path, "concurrency": c, "seconds": seconds, "p50_ms": percentile(latency, 50),
                                       "p99_ms": percentile(latency, 99), "max_abs_vs_in_process": worst}
                print(f"round {round_ + 1}: {PATHS[path]}, concurrency {c}: {seconds:.1f} s (in-process, all in one call: {best_batch:.1f} s)",
                      flush=True)
    in_process = {"seconds": best_batch, "sequences_per_s": len(seqs) / best_batch, "nt_per_s": nt / best_batch,
                  "single_p50_ms": percentile(single["in_process"], 50), "single_p99_ms": percentile(single["in_process"], 99),
                  "single_sequences_per_s": len(seqs) / sum(single["in_process"])}
    rows = []
    for (path, c), row in sorted(server.items(), key=lambda item: (item[0][1], item[0][0])):
        row.update(sequences_per_s=len(seqs) / row["seconds"], nt_per_s=nt / row["seconds"], of_in_process=best_batch / row["seconds"])
        if c == 1:  # each path's own cost per request: the median of (path - in-process) over the same sequences
            row["p50_overhead_ms"] = percentile(np.subtract(single[path], single["in_process"]).tolist(), 50)
            if path == "front":  # and the front's over a direct gRPC request
                row["p50_over_grpc_ms"] = percentile(np.subtract(single["front"], single["grpc"]).tolist(), 50)
        rows.append(row)
    return rows, in_process


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Serving benchmark: utrexport serve (its front, and Triton's gRPC) against in-process embed",
        "",
        f"Machine: {m['cpu']}, ISA {', '.join(m['isa'])}, {m['cores']} cores; Python {m['python']}.",
        f"Bundle `{r['bundle']}`, {r['precision']} on {r['engine']}, {r['threads']} threads, one model instance; "
        f"{r['sequences']} real 3'UTRs ({r['nt']:,} nt), one sequence per request; queue delay {r['max_queue_delay_us']} us.",
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
        lines.append(f"| {PATHS[row['path']]}, concurrency {row['concurrency']} | {row['sequences_per_s']:.2f} | {row['nt_per_s']:,.0f} | {row['of_in_process']:.0%} | "
                     f"{row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms | {row['max_abs_vs_in_process']:.1e} |")
    for row in r["server"]:
        if "p50_overhead_ms" in row:
            lines += ["", f"At concurrency 1, {PATHS[row['path']]}: a request's median cost over an in-process call of the same sequence "
                          f"{row['p50_overhead_ms']:+.1f} ms" + (f", over a direct gRPC request {row['p50_over_grpc_ms']:+.1f} ms."
                                                                  if "p50_over_grpc_ms" in row else ".")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
