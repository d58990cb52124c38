"""Shared fixtures. The reference (multimolecule, ~10 s to import) is imported once, on first use."""

from __future__ import annotations

import functools
import zlib
import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI draws the same examples every run (a red CI is then always reproducible); local runs keep exploring.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from utr_calibration import DATA, real_sequences  # noqa: F401  (re-exported for the tests)

KMERS = (3, 4, 5, 6)


@functools.cache
def multimolecule():
    return pytest.importorskip("multimolecule", reason="the reference implementation (test extra) is not installed")


@functools.cache
def reference_tokenizer(k: int):
    return multimolecule().RnaTokenizer(nmers=k)


TRAINED = Path(__file__).parent / "data" / "utrbert-3mer-dev-classifier"  # fine-tuned here: tests/data/make_task_model.py


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory):
    """The shipped fine-tuned classifier (k=3, binary) as a bundle in fp32, fp16 and int8."""
    from utrexport import checkpoints
    from utrexport.build import build_bundle

    out = tmp_path_factory.mktemp("trained") / "bundle"
    return build_bundle(checkpoints.from_folder(TRAINED, 3), out, ("fp32", "fp16", "int8"), log=lambda m: None)


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """factory(k, kind) -> folder of a 2-layer random multimolecule checkpoint saved by `save_pretrained`.

    kind: "base" (UtrBertModel: pooler), "mlm" (UtrBertForMaskedLM: head, no pooler), "pretraining" (both).
    """
    made = {}

    def make(k: int, kind: str = "base"):
        if (k, kind) not in made:
            mm = multimolecule()
            import torch

            torch.manual_seed(1000 * k + len(kind))
            config = mm.UtrBertConfig(nmers=k, **TINY)
            cls = {"base": mm.UtrBertModel, "mlm": mm.UtrBertForMaskedLM, "pretraining": mm.UtrBertForPreTraining}[kind]
            model = cls(config).eval()
            folder = tmp_path_factory.mktemp(f"utrbert{k}{kind}")
            model.save_pretrained(folder)
            made[k, kind] = (folder, model)
        return made[k, kind]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """factory(k, kind, attention="fused") -> fp32 bundle folder built from the tiny checkpoint."""
    built = {}

    def make(k: int, kind: str = "pretraining", attention: str = "fused"):
        if (k, kind, attention) not in built:
            from utrexport import checkpoints
            from utrexport.build import build_bundle

            folder, _ = tiny_checkpoint(k, kind)
            out = tmp_path_factory.mktemp("bundles") / f"b{k}{kind}{attention}"
            built[k, kind, attention] = build_bundle(checkpoints.from_folder(folder, k), out, log=lambda m: None, attention=attention)
        return built[k, kind, attention]

    return make


def padded_real_batch(k: int, n: int = 5, max_tokens: int = 200, source: str = "human_3utr_calibration.fa"):
    """A padded batch of real sequences of different lengths (some longer than max_tokens, cut)."""
    from utr_runtime import KmerTokenizer

    seqs = [s for _, s in real_sequences(source)][: n * 7 : 7]
    return KmerTokenizer(k)(seqs, padding=True, truncation=True, max_length=max_tokens)


# Task heads as multimolecule builds them: class name per level, and settings that exercise every head option.
TASK_CLASSES = {"sequence": "UtrBertForSequencePrediction", "nucleotide": "UtrBertForTokenPrediction", "contact": "UtrBertForContactPrediction"}
TASK_HEADS = {
    "binary": {"num_labels": 1},
    "multiclass": {"num_labels": 3, "transform": "nonlinear"},
    "multilabel": {"num_labels": 4, "transform": "linear", "bias": False},
    "regression": {"num_labels": 2, "transform": "nonlinear", "transform_act": "relu", "act": "tanh"},
}


@pytest.fixture(scope="session")
def task_checkpoint(tmp_path_factory):
    """factory(k, level, problem_type) -> (folder, model): a 2-layer random fine-tuned checkpoint (save_pretrained)."""
    made = {}

    def make(k: int, level: str, problem_type: str):
        key = (k, level, problem_type)
        if key not in made:
            mm = multimolecule()
            import torch

            torch.manual_seed(zlib.crc32(repr(key).encode()))  # str hashes differ per process
            head = {"problem_type": problem_type, **TASK_HEADS[problem_type]}
            config = mm.UtrBertConfig(nmers=k, head=head, id2label={i: f"label{i}" for i in range(head["num_labels"])}, **TINY)
            model = getattr(mm, TASK_CLASSES[level])(config).eval()
            folder = tmp_path_factory.mktemp(f"task{k}{level}{problem_type}")
            model.save_pretrained(folder)
            made[key] = (folder, model)
        return made[key]

    return make


@pytest.fixture(scope="session")
def task_bundle(task_checkpoint, tmp_path_factory):
    """factory(k, level, problem_type) -> fp32 bundle folder of that task checkpoint."""
    built = {}

    def make(k: int, level: str, problem_type: str):
        if (k, level, problem_type) not in built:
            from utrexport import checkpoints
            from utrexport.build import build_bundle

            folder, _ = task_checkpoint(k, level, problem_type)
            out = tmp_path_factory.mktemp("task-bundles") / f"b{k}{level}{problem_type}"
            built[k, level, problem_type] = build_bundle(checkpoints.from_folder(folder, k), out, log=lambda m: None)
        return built[k, level, problem_type]

    return make


@pytest.fixture(scope="session")
def all_precisions(tmp_path_factory):
    """A 2-layer model at the real width (hidden 768) in fp32, fp16 and int8: quantization error depends on width,
    so a toy width would judge the int8 tolerances on a model nobody deploys."""
    from utrexport import checkpoints
    from utrexport.build import Calibration, build_bundle

    out = tmp_path_factory.mktemp("precisions") / "b4"
    ckpt = checkpoints.from_random_init(4, seed=3, num_hidden_layers=2)
    return build_bundle(ckpt, out, ("fp32", "fp16", "int8"), log=lambda m: None, calibration=Calibration(size=16))


def expected_rows(bundle) -> set[tuple[str, str]]:
    """(precision label, engine) of every verify row group for a bundle on this machine: each model file on
    ONNX Runtime, and on OpenVINO where installed, with bf16 where this CPU runs it natively."""
    from utr_runtime.engines import installed

    rows = {(label, "onnxruntime") for p in bundle.precisions for label in bundle.model_names(p, "onnxruntime")}
    if installed("openvino"):
        from utr_runtime.engines.openvino import bf16_supported

        rows |= {(label, "openvino") for p in bundle.precisions for label in bundle.model_names(p, "openvino")}
        rows |= {("bf16", "openvino")} if bf16_supported() else set()
    return rows


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory):
    """(folder, commands run): the README's commands and examples, run once, in order (tests/test_readme.py). Its
    `utrexport build --kmer 6 --random-init --seed 0` is the one full-size bundle of the suite (tests/test_full_size.py)."""
    from test_readme import run_readme

    folder = tmp_path_factory.mktemp("readme")
    return folder, run_readme(folder)
