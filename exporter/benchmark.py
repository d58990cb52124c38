"""Benchmarks behind `utrexport bench` and the scripts under benchmarks/.

Every path is timed in one process, in alternating order (one call of each path per round), so that the
ratios between paths are fair on a noisy machine. Figures are medians (and p90) of the rounds.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from utr_calibration import real_sequences

from .versions import tool_versions

SHAPES = ((1, 128), (1, 512), (8, 128), (32, 512))


# ------------------------------------------------------------------------------------------------ timing
def alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each run, `repeats` rounds of one call each in turn, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    return alternate({"run": fn}, repeats, warmup)["run"]


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_s": statistics.median(ordered), "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "runs": len(ordered)}


# ------------------------------------------------------------------------------------------------ ceilings
GEMM = (2048, 768, 3072)  # a BERT-base FFN at 2048 tokens: (M, K) @ (K, N)


def matmul_gflops(repeats: int = 7) -> float:
    """NumPy's fp32 matrix-multiply rate on GEMM: a reference figure, not a ceiling (engines beat it)."""
    m, k, n = GEMM
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    return 2 * m * k * n / summary(timed(lambda: a @ b, repeats, warmup=2))["median_s"] / 1e9


def gemm_ceilings(engines: list[str], threads: int, repeats: int = 7) -> dict[str, dict]:
    """Per data type, the fastest GEMMs any installed engine runs here: {dtype: {gflops, engine, scheme, candidates}}.

    The work: a BERT-base feed-forward pair at 2048 tokens (see _gemm_model). fp32: plain MatMuls. int8: the Q/DQ MatMul pattern of the bundle's int8 files, in both schemes (symmetric int8,
    and uint8 activations with int8 weights), so each engine gets the one its kernels like. bf16: the fp32 MatMul
    with bf16 inference (OpenVINO, CPUs with native bf16). A model's GFLOP/s is then judged against the ceiling of
    the data type its matmuls run in.
    """
    import tempfile

    import utr_runtime.engines as engines_module

    m, k, n = GEMM
    x = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    flop = 2 * 2 * m * k * n  # two GEMMs
    candidates = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: _gemm_model(f"{tmp}/{name}.onnx", name) for name in ("fp32", "int8-symmetric", "int8-u8s8")}
        for engine in engines:
            for name, path in files.items():
                hints = ["f32"] + (["bf16"] if name == "fp32" and engine == "openvino" and _bf16() else [])
                for hint in hints:
                    runner = engines_module.open_runner(path, "cpu", threads, engine, inference_precision=hint)
                    seconds = summary(timed(lambda: runner.run({"x": x}), repeats, warmup=2))["median_s"]
                    dtype = "bf16" if hint == "bf16" else name.split("-")[0]
                    candidates.append({"dtype": dtype, "gflops": flop / seconds / 1e9, "engine": engine, "scheme": name})
    best = {}
    for c in candidates:
        if c["gflops"] > best.get(c["dtype"], {}).get("gflops", 0):
            best[c["dtype"]] = c
    return {dtype: {**c, "candidates": [d for d in candidates if d["dtype"] == dtype]} for dtype, c in best.items()}


def _bf16() -> bool:
    from utr_runtime.engines.openvino import bf16_supported

    return bf16_supported()


def _gemm_model(path: str, scheme: str) -> str:
    """A BERT feed-forward pair, y = (x @ W1) @ W2 with constant weights (2 GEMMs, so conversions at the model's
    edges weigh as little as inside a real model), plain or in the bundle's Q/DQ int8 form."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = GEMM
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((k, n), dtype=np.float32) * 0.05, rng.standard_normal((n, k), dtype=np.float32) * 0.05]
    nodes, inits, x = [], [], "x"
    for i, w in enumerate(weights):
        y = "y" if i == len(weights) - 1 else f"h{i}"
        if scheme == "fp32":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        else:
            unsigned = scheme == "int8-u8s8"  # per-tensor weights with uint8 activations, per-channel with int8
            w_scale = (np.array(np.abs(w).max() / 127) if unsigned else np.abs(w).max(0) / 127).astype(np.float32)
            inits += [numpy_helper.from_array(np.clip(np.round(w / w_scale), -127, 127).astype(np.int8), f"w{i}q"),
                      numpy_helper.from_array(w_scale, f"w{i}s"), numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), f"w{i}z"),
                      numpy_helper.from_array(np.array(8.0 / 127, np.float32), f"x{i}s"),
                      numpy_helper.from_array(np.array(128 if unsigned else 0, np.uint8 if unsigned else np.int8), f"x{i}z")]
            nodes += [helper.make_node("QuantizeLinear", [x, f"x{i}s", f"x{i}z"], [f"x{i}q"]),
                      helper.make_node("DequantizeLinear", [f"x{i}q", f"x{i}s", f"x{i}z"], [f"x{i}d"]),
                      helper.make_node("DequantizeLinear", [f"w{i}q", f"w{i}s", f"w{i}z"], [f"w{i}d"], axis=1),
                      helper.make_node("MatMul", [f"x{i}d", f"w{i}d"], [y])]
        x = y
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, k])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def path_dtype(precision: str) -> str:
    """The data type a precision's matmuls run in on the CPU (fp16 files run in fp32 there)."""
    return {"bf16": "bf16", "int8": "int8"}.get(precision, "fp32")


def model_flops(config: dict, batch: int, length: int) -> float:
    """Multiply-adds x2 of the encoder: projections and FFN per token, plus attention scores and mixing."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_token = layers * (2 * 4 * hidden * hidden + 2 * 2 * hidden * inter)  # ~170 MFLOP for BERT-base
    attention = layers * 2 * 2 * length * hidden  # QK^T and AV, per token
    return batch * length * (per_token + attention)


# ------------------------------------------------------------------------------------------------ paths
@dataclass
class Path:
    name: str
    run: Callable[[np.ndarray, np.ndarray], object]  # (input_ids, attention_mask) -> anything
    dtype: str = "fp32"  # what its matmuls run in: the ceiling it is judged against
    model: object = None  # the utr_runtime Model of a bundle path


def path_keys(bundle, device: str, precisions=None, torch: bool = True, engines=None, int8_variants: bool = False) -> list[str]:
    """Every path to time, in order; the first is the baseline the others are compared with.

    "multimolecule" (if installed) and "module" are PyTorch with the bundle's architecture and random weights
    (speed does not depend on the values); on a GPU device they run on CUDA, "module-fp16" too. Then the bundle's
    models: "<engine>:<precision>" for each engine (every installed one on the CPU) and precision (the bundle's,
    and bf16 on OpenVINO where the CPU has it), or "tensorrt:<precision>" engines. int8_variants: also every other
    int8 file each engine runs, "<engine>:int8@<file>" (what `load` would run instead with another bundle).
    """
    from utr_runtime.verify import default_engines, runnable_precisions

    keys = []
    if torch and _installed("torch"):
        keys += (["multimolecule"] if _installed("multimolecule") else []) + ["module"] + (["module-fp16"] if device != "cpu" else [])
    if device == "tensorrt":
        return keys + [f"tensorrt:{p}" for p in precisions or list(bundle.engines)]
    for engine in engines or default_engines(device):
        available = runnable_precisions(bundle, engine)
        keys += [f"{engine}:{p}" for p in (precisions or available) if p in available]
        if int8_variants and "int8" in available and "int8" in (precisions or available):
            chosen = bundle.model_name("int8", device, engine)
            keys += [f"{engine}:int8@{name}" for name in bundle.model_names("int8", engine).values() if name != chosen]
    return keys


ENGINE_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}


def make_path(key: str, bundle, threads: int, device: str) -> Path:
    config = {**bundle.manifest["model"]["config"], "k": bundle.k}
    if ":" in key:
        import utr_runtime

        engine, precision = key.split(":")
        precision, _, file = precision.partition("@")
        if engine == "tensorrt":
            model = utr_runtime.load(bundle, precision=precision, device="tensorrt")
        elif file:  # one int8 file of several: run as `load` runs its precision on this engine, float parts included
            from utr_runtime.engines import open_bundle_model

            model = utr_runtime.Model(bundle, open_bundle_model(bundle, file, precision, device, threads, engine), precision, device)
        else:
            model = utr_runtime.load(bundle, precision=precision, device=device, threads=threads, engine=engine)
        where = "" if engine == "tensorrt" else f" ({device})"
        return Path(f"{ENGINE_NAMES[engine]} {precision}{' ' + file if file else ''}{where}", lambda i, m: model.forward(i, m), path_dtype(precision), model)
    import torch

    torch.set_num_threads(threads)
    where = "cuda" if device != "cpu" else "cpu"
    if key == "multimolecule":
        import multimolecule

        reference = multimolecule.UtrBertModel(_multimolecule_config(config)).eval().to(where)
        return Path(f"multimolecule (PyTorch {where})", _torch_call(lambda i, m: reference(i, attention_mask=m), where), model=reference)
    from .network import UtrBert, UtrBertConfig

    fields = {k: v for k, v in config.items() if k in UtrBertConfig.__dataclass_fields__}
    module = UtrBert(UtrBertConfig(**{**fields, "lm_head": False, "task": None})).init_weights(0).eval().to(where)
    if key == "module-fp16":
        module = module.half()
    return Path(f"utrexport module (PyTorch {where}{' fp16' if key == 'module-fp16' else ''})", _torch_call(lambda i, m: module(i, m), where))


def _torch_call(fn, where: str = "cpu"):
    import torch

    def run(ids, mask):
        with torch.inference_mode():
            out = fn(torch.from_numpy(ids).to(where), torch.from_numpy(mask).to(where))
            if where == "cuda":
                torch.cuda.synchronize()
            return out

    return run


def _multimolecule_config(config: dict, task: dict | None = None):
    """The reference's config for a bundle's architecture (and task head)."""
    import multimolecule

    head = {"num_labels": task["num_labels"], "problem_type": task["problem_type"], **task["head"]} if task else None
    return multimolecule.UtrBertConfig(
        nmers=config["k"], hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"], head=head,
    )


TASK_CLASSES = {"sequence": "UtrBertForSequencePrediction", "nucleotide": "UtrBertForTokenPrediction", "contact": "UtrBertForContactPrediction"}


def bench_predict(bundle, paths: list[Path], threads: int, repeats: int, n: int = 128, batch: int = 64) -> list[dict]:
    """predict() on n real 100-nt windows (the fine-tuning data's length), per bundle path, against multimolecule's
    task model of the same architecture and head (random weights: speed does not depend on them) run on the same
    windows in batches of `batch` rows, its tokenizer included as ours is."""
    seqs = evenly_sampled("utrbert_dev_100nt.tsv", n)
    runs = {}
    if _installed("multimolecule") and _installed("torch"):
        import multimolecule
        import torch

        torch.set_num_threads(threads)
        config = {**bundle.manifest["model"]["config"], "k": bundle.k}
        reference = getattr(multimolecule, TASK_CLASSES[bundle.task["level"]])(_multimolecule_config(config, bundle.task)).eval()
        tokenizer = multimolecule.RnaTokenizer(nmers=bundle.k)

        def forward():
            with torch.inference_mode():
                for first in range(0, len(seqs), batch):
                    reference(**tokenizer(seqs[first : first + batch], padding=True, return_tensors="pt"))

        runs["multimolecule forward (PyTorch)"] = forward
    for p in paths:
        if p.model is not None and not p.name.startswith("multimolecule"):
            runs[f"utr_runtime predict, {p.name}"] = lambda model=p.model: model.predict(seqs, batch_size=batch)
    times = alternate(runs, repeats)
    base = statistics.median(next(iter(times.values())))
    return [{"path": name, "sequences": n, "length_nt": len(seqs[0]), **summary(t), "sequences_per_s": n / statistics.median(t),
             "speedup_vs_first": base / statistics.median(t)} for name, t in times.items()]


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def peak_memory(key: str, bundle_path: str, shape: tuple[int, int], threads: int, device: str) -> float:
    """Peak RSS (MiB) of a fresh process that loads one path and runs one batch of `shape`: paths measured apart."""
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    code = (
        "import re, numpy as np, utr_runtime\n"
        "from utrexport.benchmark import make_path, random_batch\n"
        f"path = make_path({key!r}, utr_runtime.Bundle({bundle_path!r}, check=False), {threads}, {device!r})\n"
        f"path.run(*random_batch({shape[0]}, {shape[1]}, {bundle_path!r}))\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return float("nan")
    return float(done.stdout.strip().splitlines()[-1])


def cold_start(key: str, bundle_path: str, threads: int) -> float:
    """Seconds for a fresh process to import utr_runtime, load a bundle path (checksums, engine, compile) and embed
    one 500-nt real 3'UTR stretch: what a command-line call or a new worker pays before its first result."""
    import subprocess
    import sys

    if ":" not in key or "@" in key:  # PyTorch, or one int8 file of several: `load` opens neither
        return float("nan")
    engine, precision = key.split(":")
    seq = fixed_length_sequences(1, 500)[0]
    code = (
        "import time; start = time.perf_counter()\n"
        "import utr_runtime\n"
        f"utr_runtime.load({bundle_path!r}, precision={precision!r}, engine={engine!r}, threads={threads}).embed({seq!r})\n"
        "print(time.perf_counter() - start)\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else float("nan")


def random_batch(batch: int, length: int, bundle_or_k) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of real k-mer range with <cls>/<eos>, and an all-ones mask (seeded)."""
    if isinstance(bundle_or_k, int):
        k = bundle_or_k
    else:
        import utr_runtime

        k = utr_runtime.Bundle(bundle_or_k, check=False).k if isinstance(bundle_or_k, str) else bundle_or_k.k
    ids = np.random.default_rng(0).integers(6, 5**k + 6, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 1, 2
    return ids, np.ones_like(ids)


# ------------------------------------------------------------------------------------------------ runs
def bench_shapes(paths: list[Path], config: dict, shapes, repeats: int, ceilings: dict, log=lambda m: None) -> list[dict]:
    rows = []
    for batch, length in shapes:
        ids, mask = random_batch(batch, length, config["k"])
        times = alternate({p.name: (lambda p=p: p.run(ids, mask)) for p in paths}, repeats)
        flops = model_flops(config, batch, length)
        base = statistics.median(times[paths[0].name])
        for p in paths:
            s = summary(times[p.name])
            ceiling = ceilings.get(p.dtype, {}).get("gflops")
            rows.append({
                "shape": f"{batch}x{length}", "path": p.name, "dtype": p.dtype, **s,
                "tokens_per_s": batch * length / s["median_s"],
                "gflops": flops / s["median_s"] / 1e9,
                "fraction_of_ceiling": flops / s["median_s"] / 1e9 / ceiling if ceiling else None,
                "speedup_vs_first": base / s["median_s"],
            })
        log(f"{batch}x{length}: " + ", ".join(f"{p.name} {statistics.median(times[p.name]) * 1e3:.0f} ms" for p in paths))
    return rows


def bench_fill_mask(model, repeats: int) -> list[dict] | None:
    """One masked k-mer in a 500-token real 3'UTR window: this runtime's fill_mask (vocabulary projection at the
    masked position only) vs the transformers fill-mask pipeline on multimolecule's MLM model (projection at every
    position), same architecture, random weights."""
    if not (_installed("multimolecule") and _installed("torch")):
        return None
    import multimolecule
    import torch
    from transformers import pipeline

    seq = fixed_length_sequences(1, 500 + model.k - 1)[0]
    text = seq[:250] + "<mask>" + seq[250 + model.k :]
    reference = multimolecule.UtrBertForMaskedLM(_multimolecule_config(model.bundle.manifest["model"]["config"])).eval()
    pipe = pipeline("fill-mask", model=reference, tokenizer=multimolecule.RnaTokenizer(nmers=model.k), device="cpu")
    runs = {"utr_runtime fill_mask": lambda: model.fill_mask(text), "transformers pipeline (multimolecule)": lambda: pipe(text)}
    with torch.inference_mode():
        times = alternate(runs, repeats)
    base = statistics.median(times["transformers pipeline (multimolecule)"])
    return [{"path": f"{name} ({model.precision})" if name.startswith("utr") else name, "tokens": 502, **summary(t),
             "speedup_vs_reference": base / statistics.median(t)} for name, t in times.items()]


END_TO_END_SETS = {"3'UTRs": "human_3utr_calibration.fa", "100-nt windows": "utrbert_dev_100nt.tsv"}


def evenly_sampled(name: str, n: int) -> list[str]:
    """n sequences spread evenly over a shipped file, so their lengths follow the whole file's."""
    seqs = [s for _, s in real_sequences(name)]
    return seqs[:: max(1, len(seqs) // n)][:n]


def bench_end_to_end(paths: list[Path], label: str, seqs: list[str], repeats: int, k: int) -> list[dict]:
    """Real sequences end to end (tokenize + window + batch + run + pool), every path on the same sequences:
    `embed` of each bundle path, multimolecule's model on the same windows (its tokenizer, batches of up to 8192
    tokens padded to their longest row), and the first bundle path with every window padded to 512 (what
    length-sorted batching saves)."""
    runs = {}
    for p in paths:
        if p.name.startswith("multimolecule"):
            runs[p.name] = lambda p=p: _embed_with_multimolecule(p.model, k, seqs)
        elif p.model is not None:
            runs[p.name] = lambda p=p: p.model.embed(seqs)
    first = next(p for p in paths if p.model is not None and not p.name.startswith("multimolecule"))
    runs[f"{first.name}, every window padded to 512"] = lambda: _embed_padded_to_max(first.model, seqs)
    times = alternate(runs, repeats, warmup=0)  # each run is seconds long: no warm-up round
    nt = sum(map(len, seqs))
    base = statistics.median(next(iter(times.values())))
    return [
        {"path": name, "data": label, "sequences": len(seqs), "nucleotides": nt, **summary(t),
         "nt_per_s": nt / statistics.median(t), "speedup_vs_first": base / statistics.median(t)}
        for name, t in times.items()
    ]


def _embed_with_multimolecule(reference, k: int, seqs: list[str], max_batch_tokens: int = 8192) -> None:
    """The reference on the windows `embed` would run (its own tokenizer and padding), batches in input order."""
    import multimolecule
    import torch

    from utr_runtime.windows import split_windows

    tokenizer = _reference_tokenizer(multimolecule, k)
    pieces = []
    for seq in seqs:
        n = max(len(seq) - k + 1, 1)
        pieces += [seq[w.start : w.end + k - 1] for w in split_windows(0, n, 510, 64)]
    per_batch = max(1, max_batch_tokens // 512)
    where = next(reference.parameters()).device  # the CPU, or the GPU of a --device cuda/tensorrt run
    with torch.inference_mode():
        for first in range(0, len(pieces), per_batch):
            encoded = tokenizer(pieces[first : first + per_batch], padding=True, return_tensors="pt")
            reference(encoded["input_ids"].to(where), attention_mask=encoded["attention_mask"].to(where))
        if where.type == "cuda":
            torch.cuda.synchronize()


def _embed_padded_to_max(model, seqs: list[str], max_batch_tokens: int = 8192) -> None:
    """The baseline: the same windows, in input order, every one padded to the model's maximum length."""
    from utr_runtime.windows import split_windows

    tok, window = model.tokenizer, model.max_tokens - 2
    kmers = [ids[1:-1] for ids in tok.encode_batch(seqs)]
    windows = [w for i, ids in enumerate(kmers) for w in split_windows(i, len(ids), window, 64)]  # as embed() does
    per_batch = max_batch_tokens // model.max_tokens
    for first in range(0, len(windows), per_batch):
        rows = [tok.with_specials(kmers[w.sequence][w.start : w.end]) for w in windows[first : first + per_batch]]
        model.forward(*tok.pad(rows, model.max_tokens))


@functools.cache
def _reference_tokenizer(multimolecule, k: int):
    return multimolecule.RnaTokenizer(nmers=k)


def tokenizer_speed(ks=(3, 6), n: int = 1000, length: int = 1000, repeats: int = 15) -> list[dict]:
    """utr_runtime's KmerTokenizer against multimolecule's RnaTokenizer, one batch call each, same inputs."""
    from utr_runtime import KmerTokenizer

    seqs = fixed_length_sequences(n, length)
    rows = []
    for k in ks:
        tokenizer = KmerTokenizer(k)
        ours = summary(timed(lambda: tokenizer(seqs, padding=True), repeats, warmup=3))
        row = {"k": k, "sequences": n, "length_nt": length, "utr_runtime_s": ours["median_s"], "reference_s": None, "speedup": None}
        try:
            from multimolecule import RnaTokenizer
        except ImportError:
            rows.append(row)
            continue
        ref_tok = RnaTokenizer(nmers=k)
        row["reference_s"] = summary(timed(lambda: ref_tok(seqs, padding=True, return_tensors="np"), 3))["median_s"]
        row["speedup"] = row["reference_s"] / row["utr_runtime_s"]
        rows.append(row)
    return rows


def fixed_length_sequences(n: int, length: int) -> list[str]:
    """n real 3'UTR stretches of exactly `length` nt, cut from the shipped sequences end to end."""
    text = "".join(seq for _, seq in real_sequences("human_3utr_calibration.fa"))
    while len(text) < n * length:
        text += text
    return [text[i * length : (i + 1) * length] for i in range(n)]


ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")  # what CPU inference speed turns on


def machine() -> dict:
    """CPU model, the ISA extensions that matter for inference, cores, Python and platform."""
    import os

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def describe_machine(m: dict) -> str:
    return f"{m['cpu']} ({', '.join(m.get('isa', [])) or 'no AVX2'}), {m['cores']} cores"


def write_report(prefix, result: dict, markdown: str) -> None:
    """A benchmark's PREFIX.json (its figures) and PREFIX.md (its report), the folder made if need be."""
    import json
    from pathlib import Path

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{prefix}.md").write_text(markdown)


def random_bundle(folder, model_class: str, precisions: tuple[str, ...], log=print, **config):
    """(checkpoint, bundle): a k=6 multimolecule `model_class` with seeded random weights, saved in FOLDER/checkpoint
    and built into FOLDER/bundle; both kept and reused by later runs. The model of the benchmark scripts: speed does
    not depend on the weights."""
    from pathlib import Path

    folder = Path(folder)
    checkpoint, bundle = folder / "checkpoint", folder / "bundle"
    if (bundle / "manifest.json").is_file():
        return checkpoint, bundle
    import multimolecule
    import torch

    from . import checkpoints
    from .build import build_bundle

    torch.manual_seed(0)
    getattr(multimolecule, model_class)(multimolecule.UtrBertConfig(nmers=6, **config)).eval().save_pretrained(checkpoint)
    build_bundle(checkpoints.from_folder(checkpoint, 6), bundle, precisions, log=log, force=True)
    return checkpoint, bundle


# ------------------------------------------------------------------------------------------------ report
def run_benchmark(bundle, shapes=SHAPES, repeats: int = 5, threads: int = 2, device: str = "cpu", precisions=None,
                  e2e_sequences: int = 24, torch: bool = True, tokenizer: bool = True, memory: bool = True, engines=None,
                  int8_variants: bool = False, log=lambda m: None) -> dict:
    """Everything in one process: ceilings, model paths per shape, predict, end to end on real 3'UTRs, tokenizer."""
    import datetime

    import utr_runtime
    from utr_runtime.verify import default_engines

    if not isinstance(bundle, utr_runtime.Bundle):
        bundle = utr_runtime.Bundle(bundle)
    config = {**bundle.manifest["model"]["config"], "k": bundle.k}
    engines = engines or default_engines(device)
    ceilings = {}
    if device == "cpu":
        log(f"measuring GEMM ceilings per data type ({', '.join(engines)})")
        ceilings = gemm_ceilings(engines, threads)
    keys = path_keys(bundle, device, precisions, torch, engines, int8_variants)
    paths = [make_path(key, bundle, threads, device) for key in keys]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "threads": threads, "device": device, "engines": engines, "versions": tool_versions([*engines, "torch", "multimolecule"]),
        "bundle": str(bundle.path), "model": {k: config[k] for k in ("k", "num_hidden_layers", "hidden_size")},
        "trained": bundle.manifest["model"]["trained"], "numpy_matmul_gflops": matmul_gflops(), "ceilings": ceilings,
        "flops_per_token_mflop": model_flops(config, 1, 1) / 1e6, "repeats": repeats,
    }
    result["shapes"] = bench_shapes(paths, config, shapes, repeats, ceilings, log)
    if memory:
        largest = max(shapes, key=lambda s: s[0] * s[1])
        log(f"peak memory of each path alone, one {largest[0]}x{largest[1]} batch in a fresh process")
        result["memory"] = [{"path": p.name, "shape": f"{largest[0]}x{largest[1]}", "peak_rss_mib": peak_memory(key, str(bundle.path), largest, threads, device)}
                            for key, p in zip(keys, paths)]
        if device == "cpu":
            log("cold start of each bundle path: import + load + first embed in a fresh process")
            result["cold_start"] = [{"path": p.name, "seconds": cold_start(key, str(bundle.path), threads)} for key, p in zip(keys, paths) if ":" in key and "@" not in key]
    if bundle.has_lm_head and torch and device == "cpu":
        log("fill-mask: one mask in a 500-token window")
        rows = bench_fill_mask(utr_runtime.load(bundle, threads=threads, engine=engines[0]), max(3, repeats))
        if rows:
            result["fill_mask"] = rows
    if bundle.task is not None and device == "cpu":
        log(f"predict: real 100-nt windows, {bundle.task['level']}-level head")
        result["predict"] = bench_predict(bundle, paths, threads, max(3, repeats))
    result["end_to_end"] = []
    if e2e_sequences:
        e2e_paths = [p for p in paths if p.model is not None]
        for label, name in END_TO_END_SETS.items():
            n = e2e_sequences if label == "3'UTRs" else 8 * e2e_sequences  # the short set: about as many tokens
            log(f"end to end on {n} {label}")
            result["end_to_end"] += bench_end_to_end(e2e_paths, label, evenly_sampled(name, n), max(1, repeats // 2), bundle.k)
    if tokenizer:
        log("tokenizer: 1000 x 1000 nt")
        result["tokenizer"] = tokenizer_speed(repeats=max(3, repeats))
    return result


def to_markdown(result: dict) -> str:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    lines = [f"Command: `{result['command']}`" if result.get("command") else "",
        f"Machine: {describe_machine(m)}; {result['threads']} threads; device {result['device']}; {result['date']}. {versions}.",
        f"Model: k={result['model']['k']}, {result['model']['num_hidden_layers']} layers, hidden {result['model']['hidden_size']} "
        f"({'trained' if result['trained'] else 'random-init'} weights; speed does not depend on them), "
        f"{result['flops_per_token_mflop']:.0f} MFLOP per token plus attention. Medians of {result['repeats']} alternating rounds.",
    ]
    if result.get("ceilings"):
        lines += ["", "Ceilings: the fastest BERT feed-forward GEMM pair (2048x768 @ 768x3072 @ 3072x768) any installed engine runs, "
                  f"per data type (NumPy fp32 matmul, for reference: {result['numpy_matmul_gflops']:.0f} GFLOP/s):", "",
                  "| data type | GFLOP/s (GOP/s) | engine, scheme | all candidates |", "|---|---:|---|---|"]
        def scheme(dtype: str, x: dict) -> str:  # bf16 runs the fp32 GEMMs with bf16 inference: say so, not "fp32"
            return f"{x['scheme']} model run in bf16" if dtype == "bf16" else x["scheme"]

        for dtype, c in result["ceilings"].items():
            others = "; ".join(f"{x['engine']} {scheme(dtype, x)} {x['gflops']:.0f}" for x in c["candidates"])
            lines.append(f"| {dtype} | {c['gflops']:.0f} | {c['engine']}, {scheme(dtype, c)} | {others} |")
    lines += ["", "| shape | path | median ms | p90 ms | tokens/s | GFLOP/s | of its ceiling | vs first path |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["shapes"]:
        fraction = "-" if r.get("fraction_of_ceiling") is None else f"{r['fraction_of_ceiling']:.0%} ({r['dtype']})"
        lines.append(
            f"| {r['shape']} | {r['path']} | {r['median_s'] * 1e3:.1f} | {r['p90_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['gflops']:.0f} | {fraction} | {r['speedup_vs_first']:.2f}x |"
        )
    if result.get("memory"):
        lines += ["", "Peak memory, each path alone in a fresh process (Python, NumPy and the engine included):", "",
                  "| path | batch | peak RSS MiB |", "|---|---|---:|"]
        lines += [f"| {r['path']} | {r['shape']} | {r['peak_rss_mib']:,.0f} |" for r in result["memory"]]
    if result.get("cold_start"):
        lines += ["", "Cold start, each bundle path in a fresh process: import utr_runtime, load (checksums of the files it opens, "
                  "engine, compile) and embed one 500-nt sequence:", "", "| path | seconds |", "|---|---:|"]
        lines += [f"| {r['path']} | {r['seconds']:.2f} |" for r in result["cold_start"]]
    if result.get("fill_mask"):
        lines += ["", "Fill-mask, one masked k-mer in a 500-token window (encoder included):", "",
                  "| path | median ms | p90 ms | vs reference |", "|---|---:|---:|---:|"]
        lines += [f"| {r['path']} | {r['median_s'] * 1e3:.1f} | {r['p90_s'] * 1e3:.1f} | {r['speedup_vs_reference']:.2f}x |" for r in result["fill_mask"]]
    if result.get("predict"):
        lines += ["", "Task predictions on real 100-nt windows (tokenize + batch + run + head; the reference in batches of 64):", "",
                  "| path | sequences | median s | sequences/s | vs first path |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['path']} | {r['sequences']} | {r['median_s']:.2f} | {r['sequences_per_s']:,.1f} | {r['speedup_vs_first']:.2f}x |" for r in result["predict"]]
    if result.get("end_to_end"):
        lines += ["", "End to end on real sequences, sampled evenly from the shipped files (tokenize + window + batch + run + pool):", "",
                  "| data | path | sequences | nt | median s | nt/s | vs first path |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in result["end_to_end"]:
            lines.append(f"| {r['data']} | {r['path']} | {r['sequences']} | {r['nucleotides']:,} | {r['median_s']:.2f} | {r['nt_per_s']:,.0f} | {r['speedup_vs_first']:.2f}x |")
    if result.get("tokenizer"):
        lines += ["", tokenizer_table(result["tokenizer"])]
    return "\n".join(lines).lstrip("\n") + "\n"


def tokenizer_table(rows: list[dict]) -> str:
    lines = ["Tokenizer, one batch call on 1000 real 3'UTR stretches of 1000 nt:", "",
             "| k | utr_runtime ms | multimolecule ms | speed-up |", "|---:|---:|---:|---:|"]
    for r in rows:
        ref = f"{r['reference_s'] * 1e3:.0f}" if r["reference_s"] else "not installed"
        up = f"{r['speedup']:.0f}x" if r["speedup"] else "-"
        lines.append(f"| {r['k']} | {r['utr_runtime_s'] * 1e3:.1f} | {ref} | {up} |")
    return "\n".join(lines)


def plot_benchmark(result: dict, path) -> None:
    """Throughput (tokens/s) per path and shape, as a grouped bar chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from utr_runtime.errors import UtrError

        raise UtrError("--plot needs matplotlib: pip install matplotlib") from None
    shapes = list(dict.fromkeys(r["shape"] for r in result["shapes"]))
    paths = list(dict.fromkeys(r["path"] for r in result["shapes"]))
    value = {(r["shape"], r["path"]): r["tokens_per_s"] for r in result["shapes"]}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(paths)
    for j, p in enumerate(paths):
        ax.bar([i + j * width for i in range(len(shapes))], [value.get((s, p), 0) for s in shapes], width, label=p)
    ax.set_xticks([i + width * (len(paths) - 1) / 2 for i in range(len(shapes))], shapes)
    ax.set_xlabel("batch x tokens")
    ax.set_ylabel("tokens per second")
    ax.set_title(f"3UTRBERT k={result['model']['k']} on {result['machine']['cpu']} ({result['threads']} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
