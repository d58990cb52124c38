"""Hostile bundles and careless use: nothing reaches outside a bundle, nothing is overwritten or lost by surprise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import utr_runtime
from conftest import real_sequences
from utr_runtime.bundle import write_manifest
from utr_runtime.errors import BundleError
from utrexport.cli import main


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    """A fresh copy of a tiny bundle and its manifest, to tamper with."""
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(3, "pretraining"), path)
    return path, json.loads((path / "manifest.json").read_text())


def tampered(path, manifest, change):
    change(manifest)
    write_manifest(path, manifest)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["models"]["fp32"].update(file="/etc/passwd"), "only plain names inside the bundle"),
        (lambda m: m["models"]["fp32"].update(file="../../etc/passwd"), "only plain names inside the bundle"),
        (lambda m: m.update(tokenizer="../tokenizer.json"), "only plain names inside the bundle"),
        (lambda m: m["files"].update({"/etc/shadow": "0" * 64}), "only plain names inside the bundle"),
        (lambda m: m["files"].pop("model.fp32.onnx"), "model.fp32.onnx is not listed with a checksum"),
        (lambda m: m.update(files=[]), "'files' must map file names to sha256 strings"),
        (lambda m: m.update(models=None), "'models' must map precisions"),
        (lambda m: m.update(model={}), "'model' must be an object with a 'config' object"),
        (lambda m: m["model"].update(k="six"), "model k must be an integer"),
        (lambda m: m.update(max_tokens="abc"), "max_tokens must be an integer"),
        (lambda m: m["model"]["config"].update(hidden_size=None), "hidden_size must be a positive integer"),
        (lambda m: m.update(inputs=[{"name": "x"}]), "must take input_ids and attention_mask"),
    ],
)
def test_hostile_manifests_are_refused_in_one_line(copy, change, message):
    path, manifest = copy
    tampered(path, manifest, change)
    with pytest.raises(BundleError, match=message):
        utr_runtime.load(path)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and message.split("'")[0] in result.output and "Traceback" not in result.output


def test_links_fifos_and_unchecked_files_are_never_opened(copy, tmp_path):
    path, manifest = copy
    outside = tmp_path / "outside.onnx"
    shutil.copy(path / "model.fp32.onnx", outside)
    (path / "model.fp32.onnx").unlink()
    (path / "model.fp32.onnx").symlink_to(outside)  # same bytes, same checksum: still refused, it could point anywhere
    with pytest.raises(BundleError, match="model.fp32.onnx is a symbolic link; a bundle holds regular files only"):
        utr_runtime.load(path)
    (path / "model.fp32.onnx").unlink()
    os.mkfifo(path / "model.fp32.onnx")  # opening a fifo would hang: refused before any open
    for action in (lambda: utr_runtime.load(path), lambda: utr_runtime.verify(path)):
        with pytest.raises(BundleError, match="model.fp32.onnx is not a regular file"):
            action()


def test_load_hashes_only_what_it_opens_and_verify_everything(copy):
    """Cold start: loading fp32 checks the fp32 model and the tokenizer; a corrupted file it does not open is
    found by verify, and by any load that opens it."""
    path, manifest = copy
    data = bytearray((path / "fixtures.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "fixtures.npz").write_bytes(bytes(data))
    assert utr_runtime.load(path).embed("ACGUAGCUAGGC").shape == (32,)
    with pytest.raises(BundleError, match="checksum mismatch for fixtures.npz"):
        utr_runtime.verify(path)
    (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text() + " ")
    with pytest.raises(BundleError, match="checksum mismatch for tokenizer.json"):
        utr_runtime.load(path)


def test_tampered_model_without_its_checksum_entry_is_refused(copy):
    """Dropping a file's checksum entry and changing its bytes must not make it pass."""
    path, manifest = copy
    data = bytearray((path / "model.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.fp32.onnx").write_bytes(bytes(data))
    tampered(path, manifest, lambda m: m["files"].pop("model.fp32.onnx"))
    result = CliRunner().invoke(main, ["embed", str(path), "-", "-o", str(path.parent / "x.npy")], input=">a\nACGUAGCUAG\n")
    assert result.exit_code == 1 and "not listed with a checksum" in result.output
    assert not (path.parent / "x.npy").exists()


def test_a_planted_temporary_file_link_is_never_followed(tiny_bundle, tmp_path):
    """Outputs go through a fresh, exclusively created temporary file, so a symlink planted at a predictable name in
    a shared folder is neither written through nor left as the output."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "in.fa").write_text(">a\nACGUAGCUAGGCAU\n")
    for name in (".out.npy.partial", f".out.npy.partial-{os.getpid()}", ".out.npy.partial-1"):
        (tmp_path / name).symlink_to(victim)
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa"), "-o", str(tmp_path / "out.npy")])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert (tmp_path / "out.npy").is_file() and not (tmp_path / "out.npy").is_symlink() and np.load(tmp_path / "out.npy").shape == (1, 32)


def test_one_overwrite_policy_and_never_the_input(task_bundle, tiny_bundle, tmp_path):
    table = tmp_path / "x.tsv"
    table.write_text("id\tsequence\na\tACGUAGGCUAGGCAUUAG\n")
    original = table.read_text()
    bundle = str(task_bundle(3, "sequence", "binary"))
    for extra in ([], ["--force"]):
        result = CliRunner().invoke(main, ["predict", bundle, str(table), "-o", str(table)] + extra)
        assert result.exit_code == 1 and "is the input" in result.output and table.read_text() == original
    out = tmp_path / "y.npy"
    out.write_bytes(b"earlier")
    args = ["embed", str(tiny_bundle(3, "pretraining")), str(table), "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "exists; pass --force to replace it" in result.output and out.read_bytes() == b"earlier"
    assert CliRunner().invoke(main, args + ["--force"]).exit_code == 0 and np.load(out).shape == (1, 32)


def test_sigterm_leaves_no_partial_output(tiny_bundle, tmp_path):
    records = list(real_sequences())[:300]
    (tmp_path / "in.fa").write_text("".join(f">{n}\n{s}\n" for n, s in records))
    out = tmp_path / "out.parquet"
    run = subprocess.Popen([sys.executable, "-m", "utrexport.cli", "embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa"),
                            "-o", str(out), "--chunk", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None, "the run was still going when terminated"
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"], "no output, no partial file"


# ------------------------------------------------------------------------------------------------ readers
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from utr_runtime.errors import InputError  # noqa: E402
from utr_runtime.sequences import read_sequences  # noqa: E402


def test_tsv_quotes_are_text_and_csv_quotes_may_not_span_records(tmp_path):
    (tmp_path / "q.tsv").write_text('id\tsequence\na\tAC"GUAGCU\nb\tGGCAUU\nc\tAUUAGC\n')
    assert [n for n, _ in read_sequences(tmp_path / "q.tsv")] == ["a", "b", "c"], "3 records in, 3 out"
    (tmp_path / "q.csv").write_text('id,sequence\na,"AC\nGU"\nb,GGCAUU\n')
    with pytest.raises(InputError, match="line 2: a quoted field runs over 2 lines"):
        list(read_sequences(tmp_path / "q.csv"))
    (tmp_path / "ok.csv").write_text('id,sequence\n"a,1",ACGU\n')
    assert list(read_sequences(tmp_path / "ok.csv")) == [("a,1", "ACGU")]


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "b.fa").write_bytes(b"\xef\xbb\xbf>x\nACGUAGC\n>y\nGGCAUUA\n")
    assert list(read_sequences(tmp_path / "b.fa")) == [("x", "ACGUAGC"), ("y", "GGCAUUA")]
    (tmp_path / "b.tsv").write_bytes(b"\xef\xbb\xbfid\tsequence\nx\tACGUAGC\n")
    assert list(read_sequences(tmp_path / "b.tsv")) == [("x", "ACGUAGC")]


def test_endless_and_huge_records_end_in_one_line(tmp_path):
    with pytest.raises(InputError, match="line 1 is longer than 1,000 characters"):
        list(read_sequences("/dev/zero", max_length=1000))
    import gzip

    with gzip.open(tmp_path / "long.fa.gz", "wt") as f:
        f.write(">a\n" + "ACGUACGUAC\n" * 20_000)  # 200,000 nt in short lines
    with pytest.raises(InputError, match="record 'a' is longer than 100,000 nucleotides"):
        list(read_sequences(tmp_path / "long.fa.gz", max_length=100_000))
    (tmp_path / "wide.tsv").write_text("id\tsequence\na\t" + "ACGU" * 50_000 + "\n")  # over csv's default field limit
    assert len(list(read_sequences(tmp_path / "wide.tsv"))[0][1]) == 200_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400) | st.builds(lambda parts: "".join(parts).encode(), st.lists(st.sampled_from(
    [">", ">a", ">b x", "\n", "\r\n", "\t", ",", '"', "ACGU", "acgun", "\ufeff", "id\tsequence\n", "seq,name\n", "\x00", "é"]), max_size=40)))
def test_readers_yield_records_or_one_clear_error(tmp_path, data):
    """Whatever the bytes (random, BOMs, quotes, CRLF, NULs), a reader yields (str, str) records or an InputError."""
    path = tmp_path / "fuzz"
    path.write_bytes(data)
    try:
        records = list(read_sequences(path, max_length=300))
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert all(isinstance(n, str) and isinstance(s, str) and len(s) <= 300 for n, s in records)


# ------------------------------------------------------------------------------------------------ records
def test_binary_and_non_sequence_records_are_refused(tiny_bundle, tmp_path):
    model = utr_runtime.load(tiny_bundle(3, "pretraining"))
    problems = model.problems(["ACGU\x00\x01ACGU", "The quick brown fox jumps over the lazy dog", "ACGUNNRYACGUACGUACGU", "AC\udcffGUAGCUAGC"])
    assert problems[0].startswith("control character '\\x00' at position 5")
    assert "not a nucleotide sequence" in problems[1]
    assert problems[2] is None and problems[3] is None, "a few IUPAC codes or a stray character are <unk>, not an error"
    (tmp_path / "bin.fa").write_bytes(b">a\nACGU\x00\x07\x1bGGCAUU\n")
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "bin.fa"), "-o", str(tmp_path / "o.npy")])
    assert result.exit_code == 1 and "record 'a': control character" in result.output


def test_a_huge_id_is_refused_not_stored(tiny_bundle, tmp_path):
    (tmp_path / "id.fa").write_text(">" + "x" * 20_000 + "\nACGUAGCUAG\n>b\nGGCAUUAGC\n")
    out = tmp_path / "o.npz"
    args = ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "id.fa"), "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "id of 20,000 characters; ids are at most 256" in result.output
    result = CliRunner().invoke(main, args + ["--skip-invalid"])
    assert result.exit_code == 0 and np.load(out)["ids"].tolist() == ["b"] and out.stat().st_size < 10_000


def test_lone_surrogates_are_unknown_characters(tiny_bundle):
    model = utr_runtime.load(tiny_bundle(3, "pretraining"))
    assert model.tokenizer.encode("AC\udcffGU").tolist() == [1, 3, 3, 3, 2]
    assert model.embed("ACGUAC\udcffGUAGCUAG").shape == (32,)


def test_forward_refuses_what_the_engine_would_misread(tiny_bundle):
    model = utr_runtime.load(tiny_bundle(3, "pretraining"))
    ids = np.full((2, 6), 7, np.int64)
    cases = [
        (dict(input_ids=np.zeros((0, 6), np.int64)), "non-empty"),
        (dict(input_ids=ids, attention_mask=np.ones((3, 4), np.int64)), "attention_mask must have the shape of input_ids"),
        (dict(input_ids=ids, attention_mask=np.full((2, 6), 7)), "0 and 1 only"),
        (dict(input_ids=ids, attention_mask=np.full((2, 6), 0.5)), "0 and 1 only"),
        (dict(input_ids=ids, attention_mask=-np.ones((2, 6), np.int64)), "0 and 1 only"),
        (dict(input_ids=ids, mask_positions=np.array([[1.7], [2.2]])), "integer array of indices"),
        (dict(input_ids=np.full((1, 600), 7)), "a single forward pass \\(and fill-mask\\) cannot"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            model.forward(**kwargs)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(num_hidden_layers=10**6), "num_hidden_layers must be an integer from 1 to 256"),
        (lambda c: c.update(hidden_size=10**6), "hidden_size must be an integer from 1 to 16384"),
        (lambda c: c.update(hidden_size="abc"), "hidden_size must be an integer"),
        (lambda c: c.update(hidden_size=-5), "hidden_size must be an integer"),
        (lambda c: c.update(num_attention_heads=5), "not divisible by num_attention_heads 5"),
        (lambda c: c.update(layer_norm_eps=None), "layer_norm_eps must be a number between 0 and 1"),
        (lambda c: c.update(num_hidden_layers=3), "num_hidden_layers is 3 but the weights have 2"),
        (lambda c: c.update(hidden_size=64, num_attention_heads=4), "hidden_size is 64 but the weights have 32"),
        (lambda c: c.clear() or c.update(nmers=3) or None, None),
    ],
)
def test_absurd_checkpoint_configs_are_refused_before_any_allocation(tiny_checkpoint, tmp_path, change, message):
    folder, _ = tiny_checkpoint(3, "base")
    edited = tmp_path / "ckpt"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    change(config)
    (edited / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["build", "--kmer", "3", "--checkpoint", str(edited), "-o", str(tmp_path / "b"), "--precision", "fp32"])
    assert result.exit_code == 1 and "Traceback" not in result.output and not (tmp_path / "b").exists()
    if message:
        assert message in result.output, result.output
    (edited / "config.json").write_text("[1, 2]")
    result = CliRunner().invoke(main, ["build", "--kmer", "3", "--checkpoint", str(edited), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "not a JSON object" in result.output


def test_outputs_get_the_permissions_a_plain_file_would(tiny_bundle, tmp_path):
    """The safe temporary file (created 0600) must not leave outputs readable by their owner alone: they follow the umask."""
    plain = tmp_path / "plain"
    plain.write_text("x")
    (tmp_path / "in.fa").write_text(">a\nACGUAGCUAGGCAU\n")
    out = tmp_path / "out.npz"
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


# ------------------------------------------------------------------------------------------------ races (round 2)


def test_a_folder_that_appears_at_the_output_while_building_is_never_replaced(tiny_checkpoint, tmp_path, monkeypatch):
    """The final swap checks the output again: a folder made meanwhile (or another build's bundle) is kept, without
    --force; and with --force a non-bundle that appeared is kept too."""
    from utrexport import build, checkpoints

    folder, _ = tiny_checkpoint(3, "base")
    out = tmp_path / "bundle"
    original = build._build_into

    def meanwhile(contents):
        def run(work, *args):
            original(work, *args)
            out.mkdir()
            for name, text in contents.items():
                (out / name).write_text(text)
        return run

    for contents, force in (({"mine.txt": "keep"}, False), ({"mine.txt": "keep"}, True), ({"manifest.json": '{"format": "utr-bundle"}'}, False)):
        monkeypatch.setattr(build, "_build_into", meanwhile(contents))
        with pytest.raises(build.BuildError, match="appeared while building"):
            build.build_bundle(checkpoints.from_folder(folder, 3), out, force=force, log=lambda m: None)
        assert {p.name: p.read_text() for p in out.iterdir()} == contents  # untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial or old folder left
        shutil.rmtree(out)


def test_two_runs_writing_one_new_output_never_lose_a_result(tiny_bundle, tmp_path, monkeypatch):
    """Checked at start and at the end: an output that appears while a run writes it (a second run's) is kept, and
    this run fails in one line; with --force it is replaced, as asked."""
    from utrexport import writers

    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">{n}\n{s}\n" for n, s in real_sequences()[:3]))
    out = tmp_path / "out.npz"
    close = writers.NumpyWriter.close

    def other_run_finishes_first(self):
        out.write_bytes(b"the other run's result")
        close(self)

    monkeypatch.setattr(writers.NumpyWriter, "close", other_run_finishes_first)
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(fasta), "-o", str(out)])
    assert result.exit_code == 1 and "appeared while this run wrote it" in result.output, result.output
    assert out.read_bytes() == b"the other run's result" and sorted(p.name for p in tmp_path.iterdir()) == ["in.fa", "out.npz"]
    out.unlink()
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(fasta), "-o", str(out), "--force"])
    assert result.exit_code == 0 and np.load(out)["vectors"].shape == (3, 32)


def test_force_replaces_files_only(tiny_bundle, tmp_path):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nACGUACGUAG\n")
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(fasta), "-o", str(fifo), "--force"])
    assert result.exit_code == 1 and "not a regular file" in result.output and fifo.is_fifo()


# ------------------------------------------------------------------------------------------------ task records (round 2)


def _set(record: dict, **values):
    return lambda m: m[record].update(values) if record != "config" else m["model"]["config"].update(values)


@pytest.mark.parametrize(
    "change, message",
    [
        (_set("task", num_labels=1, labels=["a"], problem_type="binary"), "does not match the model's task_logits (?, 3)"),
        (_set("task", num_labels=2, labels=["a", "b"]), "(sequence level, 2 labels) does not match the model's task_logits (?, 3)"),
        (_set("task", level="nucleotide"), "does not match the model's task_logits"),
        (_set("task", problem_type="bogus"), "problem_type"),
        (_set("task", num_labels=0, labels=[]), "num_labels must be an integer from 2"),
        (_set("task", num_labels=-1), "num_labels must be an integer from 2"),
        (_set("task", labels=["same", "same", "other"]), "distinct"),
        (_set("task", labels=["id", "b", "c"]), "not 'id' or 'label'"),
        (_set("task", labels=["\x1b[2J", "b", "c"]), "printable"),
        (_set("task", labels=["a\tb", "b", "c"]), "printable"),
        (_set("task", labels=["a", "b"]), "3 printable names"),
        (_set("config", hidden_size=16), "the manifest says hidden_size 16, the model gives 32"),
    ],
)
def test_a_task_record_that_disagrees_with_the_model_is_refused(task_bundle, tmp_path, change, message):
    """The manifest's task record and hidden size are checked against the model's output shape and allowed values
    when loading: a wrong record would write wrong columns or shapes, or raw terminal escapes, without a word."""
    path = tmp_path / "bundle"
    shutil.copytree(task_bundle(3, "sequence", "multiclass"), path)
    manifest = json.loads((path / "manifest.json").read_text())
    tampered(path, manifest, change)
    with pytest.raises(BundleError, match=None) as caught:
        utr_runtime.load(path, engine="onnxruntime")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nACGUACGUAG\n")
    result = CliRunner().invoke(main, ["predict", str(path), str(fasta), "-o", str(tmp_path / "p.tsv")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output and "\x1b" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p.tsv").exists()


@pytest.mark.parametrize(
    "head, config, message",
    [
        ({"num_labels": 2_000_000_000}, {}, "num_labels must be an integer from 1 to 65536"),
        ({"layer_norm_eps": "abc"}, {}, "layer_norm_eps must be a number between 0 and 1"),
        ({}, {"id2label": {"x": "a", "1": "b", "2": "c"}}, "id2label has the key 'x'"),
        ({}, {"id2label": {"0.0": "a", "1": "b", "2": "c"}}, "id2label has the key '0.0'"),
        ({}, {"id2label": {"0": "same", "1": "same", "2": "c"}}, "names two labels alike"),
        ({}, {"id2label": {"0": "label", "1": "b", "2": "c"}}, "cannot name a column"),
        ({}, {"id2label": {"0": "a\nb", "1": "b", "2": "c"}}, "cannot name a column"),
    ],
)
def test_hostile_task_checkpoints_are_refused_in_one_line(task_checkpoint, tmp_path, head, config, message):
    folder, _ = task_checkpoint(3, "sequence", "multiclass")
    edited = tmp_path / "ckpt"
    shutil.copytree(folder, edited)
    stated = json.loads((edited / "config.json").read_text())
    stated["head"].update(head)
    stated.update(config)
    (edited / "config.json").write_text(json.dumps(stated))
    start = time.monotonic()
    result = CliRunner().invoke(main, ["build", "--kmer", "3", "--checkpoint", str(edited), "-o", str(tmp_path / "b"), "--precision", "fp32"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert time.monotonic() - start < 30 and not (tmp_path / "b").exists()  # refused before any allocation


def test_only_a_requested_precision_that_fails_sets_the_exit_status(tiny_checkpoint, tmp_path, monkeypatch):
    """bf16 (checked on CPUs that run it, never asked for with --precision) may fail its gate: the build says so and
    leaves it out, but exits 0 when every precision asked for is in the bundle."""
    from utrexport import build

    real = build.verify

    def with_failing_bf16(bundle, *args, **kwargs):
        rows = real(bundle, *args, **kwargs)
        return rows + [{**rows[0], "precision": "bf16", "engine": "openvino", "passed": False}]

    monkeypatch.setattr(build, "verify", with_failing_bf16)
    folder, _ = tiny_checkpoint(3, "base")
    args = ["build", "--kmer", "3", "--checkpoint", str(folder), "-o", str(tmp_path / "b"), "--precision", "fp32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "bf16 left out of the bundle" in result.output, result.output
    assert "did not pass" not in result.output and json.loads((tmp_path / "b" / "manifest.json").read_text())["left_out"].keys() == {"bf16"}


def test_ids_with_control_characters_are_refused_so_stored_ids_stay_unique(tiny_bundle, tmp_path):
    """'>a\\0' and '>a' were one id in .npz (NumPy strips trailing NULs); an escape in an id reached the terminal."""
    fasta = tmp_path / "in.fa"
    fasta.write_bytes(b">a\x00\nACGUACGUAG\n>a\nGGCAUUAGCC\n>b\x1b[2J\nACGUACGUAG\n")
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(fasta), "-o", str(tmp_path / "o.npz")])
    assert result.exit_code == 1 and "control character in the id" in result.output and "\x1b" not in result.output
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(fasta), "-o", str(tmp_path / "o.npz"), "--skip-invalid"])
    assert result.exit_code == 0 and list(np.load(tmp_path / "o.npz")["ids"]) == ["a"]
    assert "\x1b" not in (tmp_path / "o.npz.skipped.tsv").read_text() and "\\x00" in (tmp_path / "o.npz.skipped.tsv").read_text()


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".parquet"])
def test_a_full_disk_at_the_end_leaves_no_partial_file(task_bundle, tmp_path, monkeypatch, suffix):
    from utrexport import writers

    def disk_full(self):
        raise OSError(28, "No space left on device", str(self.partial))

    monkeypatch.setattr(writers._Atomic, "_publish", disk_full)
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nACGUACGUAG\n")
    out = tmp_path / f"p{suffix}"
    result = CliRunner().invoke(main, ["predict", str(task_bundle(3, "sequence", "multiclass")), str(fasta), "-o", str(out)])
    assert result.exit_code == 1 and "No space left on device" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]


# ------------------------------------------------------------------------------------------------ what a model may hold (round 2)


def _rewrite_model(path, change) -> None:
    """Change the bundle's fp32 model with the onnx package and record its new checksum (a forger controls the manifest)."""
    import onnx

    model = onnx.load(path / "model.fp32.onnx")
    change(model, path)
    onnx.save_model(model, path / "model.fp32.onnx")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.fp32.onnx"] = utr_runtime.bundle.sha256_file(path / "model.fp32.onnx")
    write_manifest(path, manifest)


def _external(model, path):
    from onnx.external_data_helper import convert_model_to_external_data

    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="extra.bin", size_threshold=1024)


def _loop(model, path):
    from onnx import TensorProto, helper

    body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    model.graph.initializer.extend([helper.make_tensor("trips", TensorProto.INT64, [], [2**62]), helper.make_tensor("go", TensorProto.BOOL, [], [True])])
    model.graph.node.append(helper.make_node("Loop", ["trips", "go"], [], body=body))


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("change, message", [
    (_external, "reads tensor"),
    (_loop, "which utrexport never writes"),  # its body's Identity or the Loop itself: either is refused
    (lambda model, path: None, None),  # rewritten, nothing added: still runs
])
def test_a_model_may_hold_only_what_the_exporter_writes(copy, engine, change, message):
    """Every byte a model reads is checked (external data would come from a file no checksum covers, and OpenVINO
    resolves it against the working directory), and a model holds only the exporter's operators (a Loop with 2^62
    trips would hang the process)."""
    path, _ = copy
    _rewrite_model(path, change)
    if message is None:
        assert utr_runtime.load(path, engine=engine).embed(["ACGUACGUAG"]).shape == (1, 32)
        return
    with pytest.raises(BundleError, match=message):
        utr_runtime.load(path, engine=engine)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and message.split(",")[0] in result.output and "Traceback" not in result.output


def test_max_tokens_beyond_the_position_table_is_refused(copy):
    path, manifest = copy
    tampered(path, manifest, lambda m: m.update(max_tokens=2000))
    for engine in ("onnxruntime", "openvino"):
        with pytest.raises(BundleError, match="max_tokens is 2000, but model.fp32.onnx has 512 positions"):
            utr_runtime.load(path, engine=engine)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_the_bytes_that_were_checked_are_the_bytes_that_run(copy, monkeypatch, engine):
    """A model swapped after its checksum was checked is never what runs: the engine gets the checked bytes, not
    the path (a swap between the two gave 9 of 25 runs on the swapped model)."""
    from utr_runtime import onnx_facts

    path, _ = copy
    expected = utr_runtime.load(path, engine=engine).embed(["ACGUACGUAGGC"])
    judge = onnx_facts.model_facts

    def swap_then_judge(data):  # after the hash, before the engine: the worst moment for a swap
        (path / "model.fp32.onnx").write_bytes(b"not the checked model")
        return judge(data)

    monkeypatch.setattr(onnx_facts, "model_facts", swap_then_judge)
    np.testing.assert_array_equal(utr_runtime.load(path, engine=engine).embed(["ACGUACGUAGGC"]), expected)
    assert (path / "model.fp32.onnx").read_bytes() == b"not the checked model"  # the swap did happen


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"format": "utr-bundle", "format_version": ' + "9" * 5000 + "}"])
def test_json_that_python_cannot_hold_is_one_line(copy, text):
    path, _ = copy
    (path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="not valid JSON"):
        utr_runtime.Bundle(path)


# ------------------------------------------------------------------------------------------------ round 2, the rest


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(left_out=5), "'left_out' must map precisions to the failures"),
        (lambda m: m.update(left_out=None), "'left_out' must map precisions to the failures"),
        (lambda m: m.update(left_out=["fp16"]), "'left_out' must map precisions to the failures"),
        (lambda m: m.update(left_out={"fp16": "below its gate"}), "'left_out' must map precisions to the failures"),
        (lambda m: m["models"]["fp32"].update(variants=["cpu"]), "'variants' devices to such objects"),
        (lambda m: m["models"]["fp32"].update(variants={"cpu": "model.fp32.onnx"}), "'variants' devices to such objects"),
        (lambda m: m.update(engines={"fp16": {"file": "engine.fp16.plan"}}), "'engines' must map precisions to TensorRT engine records"),
        (lambda m: m.update(engines=[]), "'engines' must map precisions"),
    ],
)
def test_malformed_manifest_records_are_one_line(copy, change, message):
    path, manifest = copy
    tampered(path, manifest, change)
    with pytest.raises(BundleError, match=message):
        utr_runtime.load(path)
    for command in (["verify", str(path)], ["embed", str(path), "-", "-o", str(path.parent / "o.npz")]):
        result = CliRunner().invoke(main, command, input=">a\nACGUAGCUAGC\n")
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_a_window_too_small_for_the_overlap_is_one_line(copy, tmp_path):
    """max_tokens 3 (a window of one k-mer) left no room for the default 64-k-mer overlap: a ValueError traceback."""
    path, manifest = copy
    tampered(path, manifest, lambda m: m.update(max_tokens=3))
    with pytest.raises(InputError, match="overlap must be an integer from 0 to 0 k-mers"):
        utr_runtime.load(path).embed("ACGUAGCUAGC")
    with pytest.raises(InputError, match="overlap must be an integer from 0 to 509"):
        utr_runtime.load(copy_of(path, tmp_path, max_tokens=512)).embed("ACGUAGCUAGC", overlap=600)


def copy_of(path, tmp_path, **changes):
    fresh = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    shutil.copytree(path, fresh)
    manifest = json.loads((fresh / "manifest.json").read_text())
    return tampered(fresh, manifest, lambda m: m.update(changes))


def _refixture(path, change):
    """Rewrite fixtures.npz (and its checksum, as a forger would)."""
    with np.load(path / "fixtures.npz") as data:
        arrays = {key: data[key] for key in data.files}
    change(arrays)
    np.savez(path / "fixtures.npz", **arrays)
    _refixture_checksum(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("attention_mask"), "no 'attention_mask' array"),
        (lambda a: a.pop("last_hidden_state"), "no 'last_hidden_state' array"),
        (lambda a: a.pop("logits"), "no 'logits' array"),  # else verify would skip the MLM head unseen
        (lambda a: a["input_ids"].__setitem__((0, 1), 99_999), "token ids must be 0 to"),
        (lambda a: a["input_ids"].__setitem__((0, 1), -5), "token ids must be 0 to"),
        (lambda a: a["attention_mask"].__setitem__((0, 1), 7), "the mask 0 or 1"),
        (lambda a: a.update(mask_positions=a["mask_positions"] + 10_000), "mask_positions must be"),
        (lambda a: a.update(last_hidden_state=a["last_hidden_state"][..., :5]), "last_hidden_state must be (batch, tokens, hidden_size)"),
        (lambda a: a.update(input_ids=a["input_ids"].astype(np.float32)), "must be integer arrays"),
    ],
)
def test_tampered_fixtures_are_one_line(copy, change, message):
    path, _ = copy
    _refixture(path, change)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_fixtures_that_are_no_npz_are_one_line(copy):
    path, _ = copy
    for junk in (b"not a zip", b"PK\x03\x04broken zip"):
        (path / "fixtures.npz").write_bytes(junk)
        _refixture_checksum(path)
        result = CliRunner().invoke(main, ["verify", str(path)])
        assert result.exit_code == 1 and "cannot read fixtures.npz" in result.output and "Traceback" not in result.output, result.output


def _refixture_checksum(path):
    from utr_runtime.bundle import sha256_file

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["fixtures.npz"] = sha256_file(path / "fixtures.npz")
    write_manifest(path, manifest)


class _FailingRequest:
    def infer(self, feeds):
        raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223:\nstd::bad_alloc\n")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_engine_failing_while_running_is_one_line(tiny_bundle, tmp_path, monkeypatch, engine):
    """Out of memory, or anything an engine raises mid-run: one line naming the model and the engine, no output."""
    pytest.importorskip(engine)
    model = utr_runtime.load(tiny_bundle(3, "pretraining"), engine=engine)
    if engine == "onnxruntime":
        class Failing:
            def run(self, names, feeds):
                import onnxruntime

                raise onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException(
                    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node.\nbad_alloc")
        model.runner.session = Failing()
    else:
        model.runner.idle = [_FailingRequest()]
        model.runner.compiled = type("Compiled", (), {"create_infer_request": lambda self: _FailingRequest(), "outputs": []})()
    with pytest.raises(utr_runtime.EngineError) as caught:
        model.embed("ACGUAGCUAGCUAGC")
    assert "failed while running it" in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setattr("utrexport.runs.load", lambda *a, **k: model)
    (tmp_path / "in.fa").write_text(">a\nACGUAGCUAGCUAGC\n")
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa"), "-o", str(tmp_path / "o.npz")])
    assert result.exit_code == 1 and "failed while running it" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]


def test_a_file_that_changes_between_judging_and_running_is_an_error(tiny_bundle, tmp_path, monkeypatch):
    """A regular file is read twice (judged whole, then run): records appended between the reads were silently
    dropped (602 in, 600 out). Now the run sees the change and fails, writing nothing."""
    from utrexport import runs

    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">{n}\n{s}\n" for n, s in real_sequences()[:6]))
    results = runs.Runner.results

    def appended_meanwhile(self, *args):
        with open(fasta, "a") as f:
            f.write(">late\nACGUAGCUAGCUAGGCAU\n")
        yield from results(self, *args)

    monkeypatch.setattr(runs.Runner, "results", appended_meanwhile)
    out = tmp_path / "o.npz"
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(fasta), "-o", str(out), "--chunk", "2"])
    assert result.exit_code == 1 and "in.fa changed while this run read it; nothing was written" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]


def test_a_pipe_or_process_substitution_is_read_once(tiny_bundle, tmp_path):
    """`<(cat x.fa)` was read twice: the judging pass drained it and the run said "no sequences"."""
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">{n}\n{s}\n" for n, s in real_sequences()[:3]))
    out = tmp_path / "o.npz"
    script = f'exec {sys.executable} -m utrexport.cli embed "$0" <(cat "$1") -o "$2"'
    run = subprocess.run(["bash", "-c", script, str(tiny_bundle(3, "pretraining")), str(fasta), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert np.load(out)["ids"].tolist() == [n for n, _ in real_sequences()[:3]]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("# made by a tool\n; an old-style comment\n>a desc\nACGU\nAC\n;inside\n>b\nGGGG\n", [("a", "ACGUAC"), ("b", "GGGG")]),
        ("# a comment\n#id\tsequence\nx\tACGU\ny\tGGCC\n", [("x", "ACGU"), ("y", "GGCC")]),
        ("# a comment\nid,sequence\nx,ACGU\n", [("x", "ACGU")]),
        ("# a comment\nACGU\nGGCC\n", [("1", "ACGU"), ("2", "GGCC")]),
        ("id sequence\na ACGUAGC\nb GGCAUUA\n", "line 1 holds spaces, so this is not one sequence per line"),
        ("ACGUAGC\n>b\nGGCAUUA\n", "line 2 starts with '>', so this is not one sequence per line"),
        ("text before the header\n>a\nACGU\n", "line 1 holds spaces"),
    ],
)
def test_comment_lines_and_ambiguous_files(tmp_path, text, expected):
    """A FASTA whose first line was a comment, or a space-separated table, was read one sequence per line: headers
    became sequences (2 records gave 6 rows)."""
    path = tmp_path / "in.txt"
    path.write_text(text)
    if isinstance(expected, str):
        with pytest.raises(InputError, match=expected):
            list(read_sequences(path))
    else:
        assert list(read_sequences(path)) == expected


@pytest.mark.parametrize("compress, suffix", [("bz2", ".bz2"), ("lzma", ".xz")])
def test_bzip2_and_xz_are_read_and_zstd_is_named(tmp_path, compress, suffix):
    import importlib

    records = real_sequences()[:3]
    text = "".join(f">{n}\n{s}\n" for n, s in records).encode()
    path = tmp_path / f"in.fa{suffix}"
    path.write_bytes(importlib.import_module(compress).compress(text))
    assert list(read_sequences(path)) == list(records)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match="truncated or corrupt compressed data|cannot be read"):
        list(read_sequences(path))
    (tmp_path / "in.fa.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(20))
    with pytest.raises(InputError, match="zstd-compressed; gzip, bzip2 and xz are read"):
        list(read_sequences(tmp_path / "in.fa.zst"))


def test_bundle_folders_follow_the_umask(tiny_bundle):
    """mkdtemp made bundles 0700: a worker running as another user could not read them."""
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_bundle(3, "pretraining").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_checkpoint_with_non_finite_weights_is_one_line(tiny_checkpoint, tmp_path):
    """An inf encoder weight ended the default int8 build in numpy's histogram ValueError."""
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_checkpoint(3, "base")
    edited = tmp_path / "ckpt"
    shutil.copytree(folder, edited)
    weights = load_file(edited / "model.safetensors")
    name = next(n for n in weights if n.endswith("intermediate.dense.weight"))
    weights[name][0, 0] = float("inf")
    save_file(weights, edited / "model.safetensors")
    result = CliRunner().invoke(main, ["build", "--kmer", "3", "--checkpoint", str(edited), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "holds inf or NaN values" in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "b").exists()
