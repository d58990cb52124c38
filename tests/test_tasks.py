"""Task models (fine-tuned heads): export, parity with multimolecule, predict, the predict command, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import utr_runtime
from conftest import TASK_HEADS, TRAINED, padded_real_batch, real_sequences
from utr_runtime.bundle import Bundle
from utr_runtime.engines import installed, open_runner
from utr_runtime.parity import TOLERANCES, compare, task_outputs
from utr_runtime.windows import split_windows
from utrexport import checkpoints
from utrexport.cli import main

LEVELS = ("sequence", "nucleotide", "contact")
PROBLEM_TYPES = tuple(TASK_HEADS)
# predict() against multimolecule: ONNX Runtime fp32 vs PyTorch fp32, the bundle's fp32 tolerance on logits;
# probabilities move no more than logits do (sigmoid and softmax are 1-Lipschitz), so the same bound holds.
ATOL = TOLERANCES["fp32"]["task_logits"].max_abs


def reference_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """multimolecule's task logits for a padded batch (a contact map's NestedTensor as its padded tensor)."""
    with torch.no_grad():
        logits = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    return (logits.tensor if hasattr(logits, "tensor") else logits).numpy()


def reference_one(model, tokenizer, seq: str) -> np.ndarray:
    row = tokenizer.encode(seq)
    return reference_logits(model, row[None], np.ones((1, len(row)), np.int64))[0]


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("k", [3, 6])
def test_task_bundle_equals_multimolecule_on_real_padded_batches(task_checkpoint, task_bundle, k, level, problem_type):
    _, reference = task_checkpoint(k, level, problem_type)
    bundle = Bundle(task_bundle(k, level, problem_type))
    task = bundle.task
    assert (task["level"], task["problem_type"], task["num_labels"]) == (level, problem_type, TASK_HEADS[problem_type]["num_labels"])
    assert task["labels"] == [f"label{i}" for i in range(task["num_labels"])]
    assert all(row["passed"] for row in bundle.manifest["parity"]), "build-time parity"
    assert "task_logits" in {row["output"] for row in bundle.manifest["parity"]}

    batch = padded_real_batch(k, n=5, max_tokens=160, source="human_mrna_full_length.fasta")
    ours = open_runner(bundle.model_file("fp32")).run(batch)
    ref = reference_logits(reference, batch["input_ids"], batch["attention_mask"])
    kmers = batch["attention_mask"].sum(1) - 2
    expected_rows = {"sequence": None, "nucleotide": int(kmers.max()) + k - 1, "contact": int(kmers.max())}[level]
    assert ref.shape[-1] == task["num_labels"] and (expected_rows is None or ref.shape[1] == expected_rows)
    ours_cut = ours["task_logits"][(slice(None),) + tuple(slice(0, n) for n in ref.shape[1:])]  # the reference stops at its longest row
    (row,) = compare({"task_logits": ref}, {"task_logits": ours_cut}, {"task_logits": TOLERANCES["fp32"]["task_logits"]}, batch["attention_mask"], task)
    assert row.passed and row.max_abs <= ATOL, row


def test_comparator_reads_only_each_rows_own_region():
    """Padding rows of task_logits do not count, and a change inside a row's region does."""
    task = {"level": "nucleotide", "problem_type": "binary", "k": 3}
    mask = np.array([[1] * 6 + [0] * 2, [1] * 8])  # 4 and 6 k-mers: 6 and 8 nucleotides
    ref = np.zeros((2, 8, 1), np.float32)
    junk = ref.copy()
    junk[0, 6:] = 99.0
    tolerance = {"task_logits": TOLERANCES["fp32"]["task_logits"]}
    assert compare({"task_logits": ref}, {"task_logits": junk}, tolerance, mask, task)[0].passed
    junk[0, 5] = 1.0
    (row,) = compare({"task_logits": ref}, {"task_logits": junk}, tolerance, mask, task)
    assert not row.passed and row.max_abs == 1.0


def test_decision_gates_fail_a_flipped_decisive_label():
    task = {"level": "sequence", "problem_type": "multiclass", "k": 3}
    ref = np.array([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]], np.float32)  # row 0 decisive, row 1 a near-tie
    tie_flipped = ref.copy()
    tie_flipped[1] = [0.1, 0.0, 0.0]
    (row,) = compare({"task_logits": ref}, {"task_logits": tie_flipped}, {"task_logits": TOLERANCES["int8"]["task_logits"]}, None, task)
    assert row.passed and row.agreement == 1.0, "a near-tie may flip"
    decisive_flipped = ref.copy()
    decisive_flipped[0] = [0.0, 4.0, 0.0]
    (row,) = compare({"task_logits": ref}, {"task_logits": decisive_flipped}, {"task_logits": TOLERANCES["int8"]["task_logits"]}, None, task)
    assert not row.passed and row.agreement == 0.0 and row.prob_max_abs > 0.9


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_predict_sequence_level_equals_reference(task_checkpoint, task_bundle, problem_type):
    _, reference = task_checkpoint(3, "sequence", problem_type)
    model = utr_runtime.load(task_bundle(3, "sequence", problem_type))
    seqs = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][:10]
    probabilities, logits = model.predict(seqs), model.predict(seqs, logits=True)
    assert probabilities.shape == (10, TASK_HEADS[problem_type]["num_labels"]) and probabilities.dtype == np.float32
    assert model.labels == [f"label{i}" for i in range(probabilities.shape[1])]
    for i, seq in enumerate(seqs):
        ref = reference_one(reference, model.tokenizer, seq)
        np.testing.assert_allclose(logits[i], ref, atol=ATOL)
        np.testing.assert_allclose(probabilities[i], task_outputs(problem_type, ref), atol=ATOL)
    if problem_type == "multiclass":
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-6)
    if problem_type in ("binary", "multilabel"):
        np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-6)


def test_predict_sequence_level_aggregates_windows(task_checkpoint, task_bundle):
    _, reference = task_checkpoint(3, "sequence", "multiclass")
    model = utr_runtime.load(task_bundle(3, "sequence", "multiclass"))
    seq = max((s for _, s in real_sequences()), key=len)[:2000]
    kmers = model.tokenizer.encode(seq)[1:-1]
    windows = split_windows(0, len(kmers), model.max_tokens - 2, 64)
    assert len(windows) == 5
    per_window = model.predict(seq, aggregate=None)
    assert per_window.shape == (5, 3)
    for w, row in zip(windows, per_window):
        ref = reference_logits(reference, np.concatenate(([1], kmers[w.start : w.end], [2]))[None], np.ones((1, w.length + 2), np.int64))[0]
        np.testing.assert_allclose(row, task_outputs("multiclass", ref), atol=ATOL)
    owned = np.array([w.own_end - w.own_start for w in windows], np.float64)
    np.testing.assert_allclose(model.predict(seq), (per_window * owned[:, None]).sum(0) / owned.sum(), atol=1e-6)
    np.testing.assert_allclose(model.predict(seq, aggregate="max"), per_window.max(0), atol=1e-7)


@pytest.mark.parametrize("k", [3, 6])
def test_predict_nucleotide_level_stitches_reference_windows(task_checkpoint, task_bundle, k):
    """One row per nucleotide; a long sequence's rows each come from the reference run on the window that owns them."""
    _, reference = task_checkpoint(k, "nucleotide", "multilabel")
    model = utr_runtime.load(task_bundle(k, "nucleotide", "multilabel"))
    short = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][:3]
    long = max((s for _, s in real_sequences()), key=len)[:1500]
    out = model.predict(short + [long], logits=True, overlap=33)
    assert [len(o) for o in out] == [len(s) for s in short + [long]]
    for seq, rows in zip(short, out):
        np.testing.assert_allclose(rows, reference_one(reference, model.tokenizer, seq), atol=ATOL)
    kmers = model.tokenizer.encode(long)[1:-1]
    windows = split_windows(0, len(kmers), model.max_tokens - 2, 33, extent=k - 1)
    assert len(windows) >= 3 and windows[-1].own_end == len(long)
    for w in windows:
        ref = reference_one(reference, model.tokenizer, long[w.start : w.end + k - 1])
        np.testing.assert_allclose(out[3][w.own_start : w.own_end], ref[w.own_start - w.start : w.own_end - w.start], atol=ATOL)
    probabilities = model.predict(long, overlap=33)
    np.testing.assert_allclose(probabilities, task_outputs("multilabel", out[3]), atol=1e-6)


def test_predict_contact_level_equals_reference_and_refuses_long_sequences(task_checkpoint, task_bundle):
    _, reference = task_checkpoint(3, "contact", "binary")
    model = utr_runtime.load(task_bundle(3, "contact", "binary"))
    seqs = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][:2] + [s for _, s in real_sequences()][:1]
    seqs[2] = seqs[2][:400]
    maps = model.predict(seqs, logits=True)
    for seq, contact in zip(seqs, maps):
        assert contact.shape == (len(seq) - 2, len(seq) - 2, 1)
        np.testing.assert_allclose(contact, reference_one(reference, model.tokenizer, seq), atol=ATOL)
        np.testing.assert_allclose(contact, contact.transpose(1, 0, 2), atol=1e-6)
    with pytest.raises(utr_runtime.InputError, match="sequence 1: 598 3-mers; a contact map covers one window, at most 510"):
        model.predict(["ACGUACGU", "A" * 600])


def test_embeddings_still_work_on_a_task_bundle(task_checkpoint, task_bundle):
    _, reference = task_checkpoint(3, "nucleotide", "binary")
    model = utr_runtime.load(task_bundle(3, "nucleotide", "binary"))
    seq = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][5]
    row = model.tokenizer.encode(seq)
    with torch.no_grad():
        hidden = reference.model(torch.from_numpy(row[None])).last_hidden_state[0].numpy()
    np.testing.assert_allclose(model.embed(seq), hidden[1:-1].mean(0), atol=ATOL)


def test_predict_needs_a_task_bundle(tiny_bundle):
    model = utr_runtime.load(tiny_bundle(3, "base"))
    with pytest.raises(utr_runtime.UtrError, match="no task head"):
        model.predict("ACGUACGU")
    result = CliRunner().invoke(main, ["predict", str(tiny_bundle(3, "base")), "-", "-o", "x.tsv"], input=">a\nACGUAGC\n")
    assert result.exit_code == 1 and "no task head" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_predict_sequence_level_tables(task_bundle, tmp_path):
    bundle = task_bundle(3, "sequence", "multiclass")
    model = utr_runtime.load(bundle)
    records = list(real_sequences("utrbert_seq_to_extract.fasta"))
    (tmp_path / "in.fa").write_text("".join(f">{n}\n{s}\n" for n, s in records))
    expected = model.predict([s for _, s in records])
    for suffix in (".tsv", ".csv", ".parquet"):
        out = tmp_path / f"p{suffix}"
        result = CliRunner().invoke(main, ["predict", str(bundle), str(tmp_path / "in.fa"), "-o", str(out), "--chunk", "2"])
        assert result.exit_code == 0, result.output
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(out).to_pydict()
        else:
            import csv

            with open(out, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            table = {key: [row[key] for row in rows] for key in rows[0]}
        assert list(table) == ["id", "label", "label0", "label1", "label2"]
        assert table["id"] == [n for n, _ in records]
        values = np.array([table[f"label{i}"] for i in range(3)], np.float64).T
        np.testing.assert_allclose(values, expected, atol=1e-5)
        assert table["label"] == [f"label{i}" for i in expected.argmax(1)]


def test_cli_predict_binary_labels_and_regression_columns(task_bundle, tmp_path):
    (tmp_path / "in.tsv").write_text("id\tsequence\na\tACGUAGGCUAGGCAUUAG\nb\tGGCAUCGAUUAGCCAUAG\n")
    out = tmp_path / "b.tsv"
    result = CliRunner().invoke(main, ["predict", str(task_bundle(3, "sequence", "binary")), str(tmp_path / "in.tsv"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    header, *rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert header == ["id", "label", "label0"]
    assert all((r[1] == "label0") == (float(r[2]) >= 0.5) and r[1] in ("label0", "not label0") for r in rows)
    result = CliRunner().invoke(main, ["predict", str(task_bundle(3, "sequence", "regression")), str(tmp_path / "in.tsv"), "-o", str(out), "--force"])
    assert result.exit_code == 0 and out.read_text().splitlines()[0] == "id\tlabel0\tlabel1"


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_cli_predict_nucleotide_level(task_bundle, tmp_path, suffix):
    bundle = task_bundle(3, "nucleotide", "multiclass")
    records = list(real_sequences("utrbert_seq_to_extract.fasta"))
    (tmp_path / "in.fa").write_text("".join(f">{n}\n{s}\n" for n, s in records))
    out = tmp_path / f"n{suffix}"
    result = CliRunner().invoke(main, ["predict", str(bundle), str(tmp_path / "in.fa"), "-o", str(out), "--logits"])
    assert result.exit_code == 0, result.output
    expected = utr_runtime.load(bundle).predict([s for _, s in records], logits=True)
    if suffix == ".npz":
        data = np.load(out)
        assert data["ids"].tolist() == [n for n, _ in records] and data["lengths"].tolist() == [len(s) for _, s in records]
        got = np.split(data["values"], np.cumsum(data["lengths"])[:-1])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        got = [np.array(v, np.float32) for v in table["values"].to_pylist()]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.fa", out.name]), "no partial files left"


def test_cli_predict_contact_level_and_format_errors(task_bundle, tmp_path):
    bundle = str(task_bundle(3, "contact", "multiclass"))
    (tmp_path / "in.fa").write_text(">a\nACGUAGGCUAGGCAUUAG\n>b\nGGCAUCGAUUAGC\n")
    result = CliRunner().invoke(main, ["predict", bundle, str(tmp_path / "in.fa"), "-o", str(tmp_path / "c.npz")])
    assert result.exit_code == 0, result.output
    data = np.load(tmp_path / "c.npz")
    assert data["lengths"].tolist() == [16, 11] and data["values"].shape == (16 * 16 + 11 * 11, 3)
    result = CliRunner().invoke(main, ["predict", bundle, str(tmp_path / "in.fa"), "-o", str(tmp_path / "c.tsv")])
    assert result.exit_code == 1 and "contact-level predictions are written as .npz" in result.output
    (tmp_path / "long.fa").write_text(">short\nACGUACGU\n>long\n" + "ACGU" * 200 + "\n")
    result = CliRunner().invoke(main, ["predict", bundle, str(tmp_path / "long.fa"), "-o", str(tmp_path / "l.npz")])
    assert result.exit_code == 1 and "record 'long': 798 3-mers; a contact map covers one window" in result.output
    assert not (tmp_path / "l.npz").exists()


# ------------------------------------------------------------------------------------------------ refusals
def _edit_config(folder, tmp_path, change):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["head"].update(transform="mlp"), "head transform 'mlp' is not supported"),
        (lambda c: c["head"].update(act="softplus"), "head act 'softplus' is not supported"),
        (lambda c: c["head"].update(transform_act="mish"), "head transform_act 'mish' is not supported"),
        (lambda c: c["head"].update(output_name="last_hidden_state"), "reading 'last_hidden_state' is not supported"),
        (lambda c: c["head"].update(problem_type="ranking"), "problem_type 'ranking' is not supported"),
        (lambda c: c["head"].update(num_labels=5), "sequence_head.decoder.weight has shape (3, 32), expected (5, 32)"),
        (lambda c: c["head"].update(problem_type=None), "states no problem_type; pass --problem-type"),
    ],
)
def test_unsupported_head_settings_are_refused_in_one_line(task_checkpoint, tmp_path, change, message):
    folder, _ = task_checkpoint(3, "sequence", "multiclass")
    edited = _edit_config(folder, tmp_path, change)
    result = CliRunner().invoke(main, ["build", "--kmer", "3", "--checkpoint", str(edited), "-o", str(tmp_path / "b"), "--precision", "fp32"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()


def test_problem_type_option_fills_in_a_missing_one(task_checkpoint, tmp_path):
    folder, _ = task_checkpoint(3, "sequence", "multilabel")
    edited = _edit_config(folder, tmp_path, lambda c: c["head"].update(problem_type=None))
    args = ["build", "--kmer", "3", "--checkpoint", str(edited), "-o", str(tmp_path / "b"), "--precision", "fp32", "--problem-type", "multilabel"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert Bundle(tmp_path / "b").task["problem_type"] == "multilabel"
    assert checkpoints.from_folder(folder, 3).config.task.problem_type == "multilabel"
    with pytest.raises(checkpoints.CheckpointError, match="problem_type is 'multilabel', not 'regression'"):
        checkpoints.from_folder(folder, 3, problem_type="regression")


def test_binary_label_names_from_id2label(task_checkpoint, tmp_path):
    folder, _ = task_checkpoint(3, "sequence", "binary")
    edited = _edit_config(folder, tmp_path, lambda c: c.update(id2label={"0": "unbound", "1": "bound"}))
    checkpoint = checkpoints.from_folder(edited, 3)
    assert checkpoint.labels == ["bound"] and checkpoint.negative_label == "unbound"


def test_a_precision_below_its_gate_is_left_out(task_checkpoint, tmp_path, monkeypatch):
    """The build writes the precisions that pass, says which was left out and why, and fails only if it was asked for."""
    from utr_runtime import parity

    folder, _ = task_checkpoint(3, "sequence", "multiclass")
    strict = dict(parity.TOLERANCES["int8"], task_logits=parity.Tolerance(prob_max_abs=1e-9))
    monkeypatch.setitem(parity.TOLERANCES, "int8", strict)
    args = ["build", "--kmer", "3", "--checkpoint", str(folder), "-o", str(tmp_path / "b"), "--calibration-size", "8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "int8 left out of the bundle: below its accuracy gate" in result.output and "--calibration" in result.output
    bundle = Bundle(tmp_path / "b")
    assert bundle.precisions == ["fp32", "fp16"] and set(bundle.manifest["left_out"]) == {"int8"}
    assert not list((tmp_path / "b").glob("model.int8*")) and all(r["passed"] for r in bundle.manifest["parity"])
    result = CliRunner().invoke(main, args + ["--force", "--precision", "fp32,int8"])
    assert result.exit_code == 1 and "int8 did not pass its accuracy gate" in result.output
    assert Bundle(tmp_path / "b").precisions == ["fp32"], "the bundle is still written with what passed"


# ------------------------------------------------------------------------------------------------ a trained model


def test_trained_classifier_keeps_its_decisions_in_every_precision(trained_bundle, tmp_path):
    """The classifier fine-tuned on real labelled windows (tests/data/make_task_model.py): fp32 reproduces its
    PyTorch AUROC on the held-out windows, and fp16 / every int8 model on every CPU engine keep its decisions
    (benchmarks/task_accuracy.py), NNCF's OpenVINO int8 included, which the build measured and did not keep."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("task_accuracy", Path(__file__).parents[1] / "benchmarks" / "task_accuracy.py")
    task_accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_accuracy)
    bundle = Bundle(trained_bundle)
    assert bundle.precisions == ["fp32", "fp16", "int8"] and "left_out" not in bundle.manifest
    assert bundle.task["labels"] == ["positive"] and bundle.task["negative_label"] == "negative"
    _, _, metrics = task_accuracy.held_out()
    rows = {(row["label"], row["engine"]): row for row in task_accuracy.measure(trained_bundle, tmp_path)}
    engines = ["onnxruntime"] + (["openvino"] if installed("openvino") else [])
    int8 = ["int8", "int8/cpu", "int8/tensorrt"]
    assert set(rows) == {(label, e) for e in engines for label in ["fp32", "fp16", *int8]} | ({("int8/openvino", "openvino")} if len(engines) > 1 else set())
    assert metrics["held_out_auroc_pytorch"] > 0.7, "the shipped model learned something"
    fp32 = rows[("fp32", "onnxruntime")]
    assert fp32["auroc"] == pytest.approx(metrics["held_out_auroc_pytorch"], abs=1e-4)
    for key, row in rows.items():
        if key[0] == "fp16":
            assert row["flipped"] == 0 and row["prob_max_abs"] < 1e-3, row
        if key[0].startswith("int8"):
            assert abs(row["auroc"] - fp32["auroc"]) < 0.01 and row["flipped"] < 0.02, row


def test_trained_classifier_predict_equals_multimolecule(trained_bundle):
    multimolecule = pytest.importorskip("multimolecule")
    reference = multimolecule.UtrBertForSequencePrediction.from_pretrained(TRAINED).eval()
    model = utr_runtime.load(trained_bundle)
    seqs = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][:64]
    batch = model.tokenizer(seqs, padding=True)
    ref = reference_logits(reference, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(model.predict(seqs, logits=True), ref, atol=ATOL)
    np.testing.assert_allclose(model.predict(seqs), task_outputs("binary", ref), atol=ATOL)
