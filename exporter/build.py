"""Checkpoint -> bundle folder: export, fixtures, manifest, verification; written aside, then renamed into place."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utr_calibration import real_sequences
from utr_runtime.bundle import FORMAT, FORMAT_VERSION, PRECISIONS, Bundle, sha256_file, write_manifest
from utr_runtime.errors import UtrError
from utr_runtime.tokenizer import KmerTokenizer
from utr_runtime.verify import verify

from .checkpoints import Checkpoint
from .versions import tool_versions
from .writers import current_umask
from .onnx_export import ATTENTION_FORMS, export_onnx, model_opset
from .precision import (CALIBRATION_METHODS, FP16_SCHEME, INT8_FP16, INT8_SCHEMES, OPENVINO_SCHEME, OPENVINO_WINDOWS, export_fp16,
                        quantize_int8, quantize_openvino, with_fp16_float_parts)

# Parity fixtures: held-out real sequences (never used for calibration), cut to these token counts so that the
# padded batch holds a full-length row, a long, a medium and a short one.
FIXTURE_SOURCES = ("utrbert_seq_to_extract.fasta", "human_mrna_full_length.fasta")
FIXTURE_LENGTHS = (512, 450, 384, 300, 200, 128, 64, 24)
MASKS_PER_ROW = 8
CONFORMANCE = "conformance.json"
CONFORMANCE_SOURCE = "utrbert_seq_to_extract.fasta"  # held out: 79, 828 and 1201 nt (one, two and three windows at k=6)


class BuildError(UtrError):
    pass


@dataclass
class Calibration:
    """Where INT8 calibration windows come from (see utr_calibration.calibration_windows)."""

    sequences: list[str] | None = None  # None: the shipped human 3'UTRs
    source: str = "shipped human 3'UTRs (utr_calibration)"
    size: int = 64
    seed: int = 0
    method: str = "entropy"


def build_bundle(
    checkpoint: Checkpoint,
    output: str | os.PathLike,
    precisions: tuple[str, ...] = ("fp32",),
    force: bool = False,
    log: Callable[[str], None] = print,
    calibration: Calibration | None = None,
    attention: str = "fused",
) -> Path:
    """Write a verified bundle for `checkpoint` at `output`; nothing is left at `output` unless it verifies.
    attention: the form of every model's attention (onnx_export.ATTENTION_FORMS)."""
    output = Path(output)
    check_output(output, force)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise BuildError(f"unknown precision {unknown}; choose from {', '.join(PRECISIONS)}")
    calibration = calibration or Calibration()
    if calibration.method not in CALIBRATION_METHODS:
        raise BuildError(f"unknown calibration method {calibration.method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    if attention not in ATTENTION_FORMS:
        raise BuildError(f"unknown attention form {attention!r}; choose from {', '.join(ATTENTION_FORMS)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))  # fresh, ours alone
    try:
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes it 0700: workers running as another user must read the bundle
        _build_into(work, checkpoint, precisions, calibration, attention, log)
        _replace(work, output, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _build_into(work: Path, checkpoint: Checkpoint, precisions, calibration: Calibration, attention: str, log) -> None:
    config = checkpoint.config
    model = checkpoint.module()
    tokenizer = KmerTokenizer(config.k)
    tokenizer.save(work / "tokenizer.json")

    models = {}
    log(f"exporting fp32 ONNX ({config.num_hidden_layers} layers, hidden {config.hidden_size}, k={config.k}, {attention} attention)")
    models["fp32"] = _timed_export(lambda path: export_onnx(model, path, attention), work / "model.fp32.onnx")
    if "fp16" in precisions:
        log("exporting fp16 ONNX")
        models["fp16"] = {**_timed_export(lambda path: export_fp16(model, path, attention), work / "model.fp16.onnx"), "scheme": FP16_SCHEME}
    if "int8" in precisions:
        models["int8"] = _quantize(work, config, calibration, log)
    _record_tensorrt_readiness(work, models)
    if "fp32" not in precisions:  # exported only as the source of the others
        (work / "model.fp32.onnx").unlink()
        del models["fp32"]

    log("computing parity fixtures on held-out real sequences (PyTorch, float32)")
    np.savez(work / "fixtures.npz", **make_fixtures(model, tokenizer))

    manifest = _manifest(checkpoint, model, models, attention, work)
    write_manifest(work, manifest)
    log("writing conformance vectors (PyTorch, float32)")
    write_conformance(work, model, manifest)
    log("verifying every precision against the PyTorch reference")
    rows = verify(Bundle(work))
    failed = sorted({r["precision"].split("/")[0] for r in rows if not r["passed"]})
    if "fp32" in failed:  # the export itself is wrong: nothing derived from it can be trusted
        from utr_runtime.parity import format_table

        log("parity results:\n" + format_table(rows))
        outputs = sorted({r["output"] for r in rows if not r["passed"] and r["precision"] == "fp32"})
        raise BuildError(f"parity check failed for fp32 {', '.join(outputs)}; the bundle was not written")
    manifest["parity"] = [r for r in rows if r["precision"].split("/")[0] not in failed]
    if "int8" in manifest["models"] and "int8" not in failed:
        _keep_closer_openvino_int8(work, manifest, log)
    if failed:
        manifest["left_out"] = _leave_out(work, manifest, failed, rows, log)
    write_manifest(work, manifest)


def _keep_closer_openvino_int8(work: Path, manifest: dict, log) -> None:
    """OpenVINO's int8 is NNCF's model only where it measured closer to fp32 than the Q/DQ file on OpenVINO, for every
    output (cosine to the reference, and a task's probability error): else it is removed and the comparison recorded.
    NNCF won on the full-size model (docs/int8.md) and lost on the small trained classifier (docs/task_accuracy.md):
    it is judged per model."""
    entry = manifest["models"]["int8"]
    if "openvino" not in entry["variants"]:
        return
    rows = {(r["precision"], r["output"]): r for r in manifest["parity"] if r["engine"] == "openvino"}
    pairs = [(output, r, rows.get(("int8", output))) for (label, output), r in rows.items() if label == "int8/openvino"]
    losses = ["not compared (OpenVINO did not run it)"] if not pairs or any(q is None for _, _, q in pairs) else [
        f"{output}: cosine {r['mean_cosine']:.5f} against {q['mean_cosine']:.5f}"
        + (f", probability error {r['prob_max_abs']:.3g} against {q['prob_max_abs']:.3g}" if r.get("prob_max_abs") is not None else "")
        for output, r, q in pairs if _worse(r, q)]
    if not losses:
        hidden = rows[("int8/openvino", "last_hidden_state")], rows[("int8", "last_hidden_state")]
        log(f"OpenVINO runs NNCF's int8 model: closer to fp32 on every output (token cosine {hidden[0]['mean_cosine']:.5f} "
            f"against {hidden[1]['mean_cosine']:.5f} for model.int8.onnx)")
        return
    variant = entry["variants"].pop("openvino")
    _remove_files(work, manifest, [variant["file"], variant["weights"]])
    manifest["parity"] = [r for r in manifest["parity"] if r["precision"] != "int8/openvino"]
    entry["not_kept"] = {"openvino": {"scheme": variant["scheme"], "quantizer": variant["quantizer"], "why": "; ".join(losses)}}
    log(f"OpenVINO runs model.int8.onnx: NNCF's int8 model was not closer to fp32 ({'; '.join(losses)})")


def _remove_files(work: Path, manifest: dict, names) -> None:
    for name in filter(None, names):
        (work / name).unlink(missing_ok=True)
        manifest["files"].pop(name, None)


def _worse(candidate: dict, incumbent: dict) -> bool:
    lower = [(candidate.get(k), incumbent.get(k)) for k in ("mean_cosine", "min_cosine")]
    higher = (candidate.get("prob_max_abs"), incumbent.get("prob_max_abs"))
    return any(None not in pair and pair[0] < pair[1] for pair in lower) or (None not in higher and higher[0] > higher[1])


def _leave_out(work: Path, manifest: dict, precisions: list[str], rows: list[dict], log) -> dict:
    """Remove precisions that failed their gate from the bundle; return why, with the failing figures."""
    reasons = {}
    for precision in precisions:
        entry = manifest["models"].pop(precision, {"file": None})  # bf16 has no file of its own
        _remove_files(work, manifest, [entry["file"], *(v.get(key) for v in entry.get("variants", {}).values() for key in ("file", "weights"))])
        failures = [r for r in rows if r["precision"].split("/")[0] == precision and not r["passed"]]
        reasons[precision] = [
            {k: r.get(k) for k in ("precision", "output", "max_abs", "mean_cosine", "min_cosine", "prob_max_abs", "agreement", "tolerance")}
            for r in failures
        ]
        detail = "; ".join(f"{r['precision']} {r['output']}: {_figures(r)} (needs {r['tolerance']})" for r in failures)
        log(f"{precision} left out of the bundle: below its accuracy gate ({detail}). "
            f"{LEAVE_OUT_HINTS.get(precision, '')}".rstrip())
    return reasons


LEAVE_OUT_HINTS = {
    "int8": "Try --calibration with sequences like yours, a larger --calibration-size, or --calibration-method percentile.",
    "fp16": "The model's activations may overflow half precision; use fp32.",
    "bf16": "Run fp32 or int8 on this model.",
}


def _figures(row: dict) -> str:
    parts = [f"max abs {row['max_abs']:.3g}", f"cosine {row['mean_cosine']:.4f} (min {row['min_cosine']:.4f})"]
    if row.get("prob_max_abs") is not None:
        parts.append(f"probability error {row['prob_max_abs']:.3g}")
    if row.get("agreement") is not None:
        parts.append(f"labels kept {row['agreement']:.3f}")
    return ", ".join(parts)


def _record_tensorrt_readiness(work: Path, models: dict) -> None:
    """Whether TensorRT's ONNX parser would take each model (the CPU int8 scheme is not meant to be), and from which
    TensorRT version on."""
    from .tensorrt_check import readiness

    for entry in [*models.values(), *(v for m in models.values() for v in m.get("variants", {}).values())]:
        if entry.get("format") == "openvino-ir":
            continue
        findings, minimum = readiness(work / entry["file"])
        entry["tensorrt_ready"] = not findings
        if not findings:
            entry["tensorrt_min"] = minimum
        else:
            entry["tensorrt_findings"] = [str(f) for f in findings[:5]] + ([f"... {len(findings) - 5} more"] if len(findings) > 5 else [])


def _timed_export(export, path: Path) -> dict:
    start = time.perf_counter()
    ops = export(path)
    return {"file": path.name, "opset": model_opset(path), "export_seconds": round(time.perf_counter() - start, 1), "ops": ops}


def _quantize(work: Path, config, calibration: Calibration, log) -> dict:
    from utr_calibration import calibration_windows

    rows = calibration_windows(config.k, calibration.size, calibration.seed, calibration.sequences)
    record = {**{key: value for key, value in asdict(calibration).items() if key != "sequences"}, "windows": len(rows),
              "tokens": int(sum(map(len, rows))), "lengths": [int(min(map(len, rows))), int(max(map(len, rows)))]}
    entry = {"file": "model.int8.onnx", "opset": None, "scheme": INT8_SCHEMES["tensorrt"], "calibration": record, "variants": {}}
    for scheme, name in (("tensorrt", "model.int8.onnx"), ("cpu", "model.int8-cpu.onnx")):
        log(f"calibrating int8 ({scheme} scheme, {calibration.method}, {len(rows)} real windows)")
        start = time.perf_counter()
        quantize_int8(work / "model.fp32.onnx", work / name, rows, scheme, calibration.method)
        seconds = round(time.perf_counter() - start, 1)
        if scheme == "tensorrt":
            entry["quantize_seconds"] = seconds
        else:
            entry["variants"]["cpu"] = {"file": name, "scheme": INT8_SCHEMES["cpu"], "quantize_seconds": seconds}
    entry["opset"] = model_opset(work / "model.int8.onnx")
    log("writing int8 with fp16 float parts (the file TensorRT's int8 engine is built from)")
    with_fp16_float_parts(work / "model.int8.onnx", work / "model.int8-fp16.onnx")
    entry["variants"]["tensorrt"] = {"file": "model.int8-fp16.onnx", "scheme": INT8_FP16}
    log(f"quantizing int8 for OpenVINO (NNCF, {min(len(rows), OPENVINO_WINDOWS)} of the windows)")
    start = time.perf_counter()
    options = quantize_openvino(work / "model.fp32.onnx", work / "model.int8-openvino.xml", rows, config.num_hidden_layers)
    entry["variants"]["openvino"] = {"file": "model.int8-openvino.xml", "weights": "model.int8-openvino.bin", "format": "openvino-ir",
                                     "scheme": OPENVINO_SCHEME, "quantizer": options, "quantize_seconds": round(time.perf_counter() - start, 1)}
    return entry


def make_fixtures(model, tokenizer: KmerTokenizer) -> dict[str, np.ndarray]:
    """A padded batch of held-out real sequences with the module's float32 outputs."""
    seqs = [seq for name in FIXTURE_SOURCES for _, seq in real_sequences(name)]
    seqs = sorted(seqs, key=len, reverse=True)[: len(FIXTURE_LENGTHS)]
    rows = [tokenizer.encode_batch([s], max_length=min(n, model.config.max_position_embeddings))[0] for s, n in zip(seqs, FIXTURE_LENGTHS)]
    input_ids, attention_mask = tokenizer.pad(rows)
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.lm_head is not None:
        rng = np.random.default_rng(0)
        positions = np.stack([np.sort(rng.choice(np.arange(1, len(r) - 1), MASKS_PER_ROW, replace=False)) for r in rows])
        np.put_along_axis(input_ids, positions, tokenizer.mask_token_id, axis=1)
        feeds["mask_positions"] = positions.astype(np.int64)
    with torch.no_grad():
        outputs = model(*(torch.from_numpy(feeds[name]) for name in model.input_names))
    return {**feeds, **{name: out.numpy() for name, out in zip(model.output_names, outputs)}}


class TorchRunner:
    """The PyTorch module behind the runtime's runner interface: the runtime's windows and pooling on the reference."""

    engine = "torch"

    def __init__(self, module):
        self.module = module
        self.input_names = module.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = self.module(*(torch.from_numpy(feeds[name]) for name in self.input_names))
        return {name: out.numpy() for name, out in zip(self.module.output_names, outputs)}


def write_conformance(work: Path, model, manifest: dict) -> None:
    """conformance.json: the spec's test vectors, with this model's outputs on held-out real sequences."""
    import warnings

    from utr_runtime.conformance import make_vectors
    from utr_runtime.model import Model

    seqs = sorted((seq for _, seq in real_sequences(CONFORMANCE_SOURCE)), key=len)
    short = seqs[0]
    masked = [short[:30] + "<mask>" + short[30:60], short[:20] + "<mask>" + short[20:40] + "<mask>" + short[40:70],
              short[:12] + "<pad>" + short[12:24] + "<mask>" + short[24:50],  # a written <pad> is attended to (spec section 7)
              short[:12] + "<pad>" + short[12:24] + "<mask>" + short[24:40] + "<mask>" + short[40:60]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained weights and short pieces: expected here
        vectors = make_vectors(Model(Bundle(work), TorchRunner(model), "fp32", "cpu"), seqs, masked)
    (work / CONFORMANCE).write_text(json.dumps(vectors, separators=(",", ":")) + "\n", encoding="utf-8")
    manifest["conformance"] = CONFORMANCE
    manifest["files"][CONFORMANCE] = sha256_file(work / CONFORMANCE)
    write_manifest(work, manifest)


def _manifest(checkpoint: Checkpoint, model, models: dict, attention: str, work: Path) -> dict:
    config = checkpoint.config
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "mask_positions": ["batch", "positions"],
        "last_hidden_state": ["batch", "sequence", hidden],
        "pooler_output": ["batch", hidden],
        "logits": ["batch", "positions", vocab],
    }
    if config.task is not None:
        shapes["task_logits"] = TASK_SHAPES[config.task.level] + [config.task.num_labels]
    files = [p.name for p in sorted(work.iterdir()) if p.name != "manifest.json"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": f"utrbert-{config.k}mer",
            "architecture": "3UTRBERT (BERT encoder, overlapping k-mer tokens)",
            "k": config.k,
            "config": config.to_dict(),
            "trained": checkpoint.trained,
            "source": checkpoint.source,
            "weights_sha256": checkpoint.weights_sha256(),
            "ignored_checkpoint_keys": checkpoint.ignored_keys,
        },
        **({"task": task_record(checkpoint)} if config.task is not None else {}),
        "max_tokens": config.max_position_embeddings,
        "tokenizer": "tokenizer.json",
        "inputs": [{"name": n, "dtype": "int64", "shape": shapes[n]} for n in model.input_names],
        "outputs": [{"name": n, "dtype": "float32", "shape": shapes[n]} for n in model.output_names],
        "models": models,
        "attention": {"form": attention, "meaning": ATTENTION_FORMS[attention]},
        "fixtures": "fixtures.npz",
        "tools": tool_versions(),
        "files": {name: sha256_file(work / name) for name in files},
    }


TASK_SHAPES = {
    "sequence": ["batch"],
    "nucleotide": ["batch", "sequence - 2 + k - 1"],
    "contact": ["batch", "sequence - 2", "sequence - 2"],
}
TASK_MEANING = {
    "sequence": "one row per input row, from the pooler output",
    "nucleotide": "one row per nucleotide: row j of an input with n k-mers (j < n + k - 1) is the head applied to the "
                  "mean of the k-mer rows covering nucleotide j; later rows are padding",
    "contact": "one row per pair of k-mers (i, j < n, the input's k-mer count), symmetric in i and j; later rows are padding",
}
OUTPUT_FUNCTIONS = {
    "binary": "sigmoid: probability of the label",
    "multilabel": "sigmoid: probability of each label",
    "multiclass": "softmax over the labels: probability of each class",
    "regression": "none: the values themselves",
}


def task_record(checkpoint: Checkpoint) -> dict:
    """The manifest's description of a task head: what it predicts and how to read `task_logits`."""
    head = checkpoint.config.task
    record = {
        "level": head.level,
        "problem_type": head.problem_type,
        "num_labels": head.num_labels,
        "labels": checkpoint.labels,
        "output": "task_logits",
        "rows": TASK_MEANING[head.level],
        "output_function": OUTPUT_FUNCTIONS[head.problem_type],
        "head": {"transform": head.transform, "transform_act": head.transform_act, "bias": head.bias, "act": head.act},
    }
    if checkpoint.negative_label is not None:
        record["negative_label"] = checkpoint.negative_label
    return record


def build_from(k: int, output: str, precisions, checkpoint: str | None = None, hub_id: str | None = None, random_init: bool = False,
               seed: int = 0, layers: int = 12, problem_type: str | None = None, calibration: "Calibration | None" = None,
               calibration_file: str | None = None, attention: str = "fused", force: bool = False, log=print) -> Path:
    """`utrexport build` as one call: the checkpoint (a folder, a hub id, or seeded random weights), exported to a
    verified bundle at `output`. The output is checked before minutes of work."""
    from . import checkpoints

    check_output(Path(output), force)
    calibration = calibration or Calibration()
    if calibration_file:
        from utr_runtime.sequences import read_sequences

        calibration.sequences = [s for _, s in read_sequences(calibration_file)]
        calibration.source = f"{calibration_file} (sha256 {sha256_file(calibration_file)[:16]}...)"
        if "int8" not in precisions:
            raise BuildError("--calibration applies to --precision int8 only")
    if random_init:
        log(f"random-init {k}-mer model, seed {seed}, {layers} layers (untrained)")
        ckpt = checkpoints.from_random_init(k, seed, num_hidden_layers=layers)
    elif checkpoint:
        log(f"loading checkpoint {checkpoint}")
        ckpt = checkpoints.from_folder(checkpoint, k, problem_type)
    else:
        hub_id = hub_id or f"multimolecule/utrbert-{k}mer"
        log(f"fetching {hub_id} from the model hub")
        ckpt = checkpoints.from_hub(hub_id, k, problem_type=problem_type)
    if ckpt.config.task is not None:
        task = ckpt.config.task
        log(f"task head: {task.level} level, {task.problem_type}, {task.num_labels} label(s) {ckpt.labels}")
    elif problem_type:
        raise BuildError("--problem-type applies to checkpoints with a task head only")
    return build_bundle(ckpt, output, precisions, force=force, log=log, calibration=calibration, attention=attention)


def check_output(output: Path, force: bool) -> None:
    """A bundle may be written at `output`: nothing is there, or a bundle that --force allows to be replaced."""
    from .writers import check_output as check

    check(output, force, replaceable=lambda path: None if not Path(path).is_symlink() and is_bundle(Path(path)) else
          f"{path} is not a bundle; --force replaces bundles only, never other files or folders: choose another --output, or remove it yourself",
          error=BuildError)


def is_bundle(path: Path) -> bool:
    """A folder whose manifest.json says it is a bundle (of any format version): what --force may replace."""
    import json

    try:
        return path.is_dir() and json.loads((path / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _replace(work: Path, output: Path, force: bool) -> None:
    """Move the finished folder into place; an old bundle there is removed only once the new one is in.

    What is at `output` is checked again (minutes have passed: a folder may have appeared, or another build finished),
    and the final rename cannot replace anything but an empty folder, so nothing that appeared meanwhile is lost."""
    try:
        check_output(output, force)
    except BuildError as e:
        raise BuildError(f"{e} (it appeared while building; the new bundle was not written)") from None
    old = None
    if output.exists() or output.is_symlink():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    try:
        os.rename(work, output)  # a non-empty folder or a file that appeared since the check makes this fail
    except OSError as e:
        if old is not None and not output.exists():
            os.replace(old, output)
        raise BuildError(f"{output} appeared while building ({e.strerror}); it is left as it is and the new bundle was not written") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
