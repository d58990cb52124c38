"""Runtime: embeddings, long-sequence windows, batching, fill-mask and the CLI, against multimolecule."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import utr_runtime
from conftest import multimolecule, real_sequences
from utr_runtime.errors import BundleError, InputError
from utr_runtime.windows import padding_waste, plan_batches, split_windows
from utrexport.cli import main

# ONNX Runtime fp32 against multimolecule's PyTorch forward: the bundle's fp32 tolerance (parity.TOLERANCES).
ATOL = 1e-4


def reference_hidden(reference, ids: np.ndarray) -> np.ndarray:
    """multimolecule's last_hidden_state for one unpadded row of ids."""
    base = getattr(reference, "model", reference)
    with torch.no_grad():
        return base(torch.from_numpy(ids[None]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state[0].numpy()


@pytest.fixture(scope="module")
def k3(tiny_checkpoint, tiny_bundle):
    _, reference = tiny_checkpoint(3, "pretraining")
    return utr_runtime.load(tiny_bundle(3, "pretraining")), reference


def test_embed_short_sequences_equals_reference(k3):
    model, reference = k3
    seqs = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][:12]
    mean, cls, tokens = (model.embed(seqs, pooling=p) for p in ("mean", "cls", "tokens"))
    assert mean.shape == cls.shape == (12, 32) and mean.dtype == np.float32
    for i, seq in enumerate(seqs):
        ref = reference_hidden(reference, model.tokenizer.encode(seq))
        assert tokens[i].shape == (len(seq) - 2, 32)
        np.testing.assert_allclose(tokens[i], ref[1:-1], atol=ATOL)
        np.testing.assert_allclose(mean[i], ref[1:-1].mean(0), atol=ATOL)
        np.testing.assert_allclose(cls[i], ref[0], atol=ATOL)


def test_long_sequence_is_stitched_from_reference_windows(k3):
    model, reference = k3
    seq = max((s for _, s in real_sequences()), key=len)[:3000]  # a real 3'UTR of 2998 k-mers: 7 windows
    kmers = model.tokenizer.encode(seq)[1:-1]
    tokens = model.embed(seq, pooling="tokens", overlap=100)
    assert tokens.shape == (len(kmers), 32)
    windows = split_windows(0, len(kmers), model.max_tokens - 2, 100)
    assert len(windows) > 5
    cls_rows = []
    for w in windows:  # each owned stretch equals the reference run on that window alone
        ref = reference_hidden(reference, np.concatenate(([1], kmers[w.start : w.end], [2])))
        np.testing.assert_allclose(tokens[w.own_start : w.own_end], ref[1 + w.own_start - w.start : 1 + w.own_end - w.start], atol=ATOL)
        cls_rows.append((w.own_end - w.own_start, ref[0]))
    np.testing.assert_allclose(model.embed(seq, overlap=100), tokens.mean(0), atol=1e-5)
    weighted_cls = sum(n * row for n, row in cls_rows) / len(kmers)
    np.testing.assert_allclose(model.embed(seq, pooling="cls", overlap=100), weighted_cls, atol=ATOL)
    truncated = model.embed(seq, pooling="tokens", truncation=True)
    assert truncated.shape == (model.max_tokens - 2, 32)


def test_order_and_batching_do_not_change_results(k3):
    model, _ = k3
    seqs = [s for _, s in real_sequences()][:30]
    a = model.embed(seqs, batch_size=64, max_batch_tokens=16384)
    b = model.embed(seqs[::-1], batch_size=3, max_batch_tokens=1024)[::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)


@given(n=st.integers(1, 5000), window=st.integers(2, 510), data=st.data())
def test_windows_tile_the_sequence(n, window, data):
    overlap = data.draw(st.integers(0, window - 1))
    windows = split_windows(0, n, window, overlap)
    assert windows[0].start == 0 and windows[-1].end == n
    assert all(w.length <= window for w in windows)
    assert [w.own_start for w in windows[1:]] == [w.own_end for w in windows[:-1]]
    assert windows[0].own_start == 0 and windows[-1].own_end == n
    assert all(w.start <= w.own_start < w.own_end <= w.end for w in windows)
    for left, right in zip(windows, windows[1:]):
        assert left.end - right.start >= overlap
    assert len({w.length for w in windows}) == 1  # one length: one padded shape per batch of them
    if len(windows) > 1:  # the fewest: one window fewer could not keep `overlap` shared and still reach n
        assert (len(windows) - 1) * window - (len(windows) - 2) * overlap < n


@given(lengths=st.lists(st.integers(1, 512), min_size=1, max_size=200), budget=st.integers(512, 20000), size=st.integers(1, 64))
def test_batches_cover_every_row_once_within_budget(lengths, budget, size):
    batches = plan_batches(lengths, budget, size)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= size and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget)


def test_padding_waste_on_real_sequences_is_under_5_percent():
    lengths = []
    for name in ("human_3utr_calibration.fa", "human_mrna_full_length.fasta", "utrbert_seq_to_extract.fasta"):
        for i, (_, seq) in enumerate(real_sequences(name)):
            lengths += [w.length + 2 for w in split_windows(i, len(seq) - 5, 510, 64)]
    waste = padding_waste(lengths, plan_batches(lengths, 8192, 64))
    assert waste < 0.05, waste


@pytest.mark.parametrize("text", ["ACGUAGC<mask>UAGCUAGGACUUAG", "<mask>GGCAUUAGCAGG", "GCGUUAGC<mask><mask><mask>GGUACAAUGC",
                                  "ACGUAGC<pad>UAGCUU<mask>GGCAUCCAG", "ACGUAGC<pad>UAGCUU<mask>GGCAU<mask>CCAGUUAG"])
def test_fill_mask_equals_the_transformers_pipeline(k3, text):
    model, reference = k3
    from transformers import pipeline

    pipe = pipeline("fill-mask", model=reference, tokenizer=multimolecule().RnaTokenizer(nmers=3), device="cpu")
    expected = pipe(text, top_k=4)
    ours = model.fill_mask(text, top_k=4)
    rows = ours if isinstance(ours[0], list) else [ours]
    expected_rows = expected if isinstance(expected[0], list) else [expected]
    assert len(rows) == len(expected_rows) == text.count("<mask>")
    for row, exp in zip(rows, expected_rows):
        assert [g["token"] for g in row] == [g["token"] for g in exp]
        assert [g["token_str"] for g in row] == [g["token_str"] for g in exp]
        assert [g["sequence"] for g in row] == [g["sequence"] for g in exp]
        np.testing.assert_allclose([g["score"] for g in row], [g["score"] for g in exp], rtol=1e-4)


def test_forward_guards_the_engine(k3):
    model, _ = k3
    with pytest.raises(InputError, match="more than this model's maximum of 512"):
        model.forward(np.ones((1, 513), np.int64))
    with pytest.raises(InputError, match="token ids must lie in 0..130"):
        model.forward(np.array([[1, 131, 2]]))
    out = model.forward(np.array([[1, 10, 20, 2, 0]]))
    assert set(out) == {"last_hidden_state", "pooler_output"} and out["last_hidden_state"].shape == (1, 5, 32)
    with pytest.raises(InputError, match="no <mask>"):
        model.fill_mask("ACGUACGU")


def test_bad_sequences_get_clear_errors(k3):
    model, _ = k3
    with pytest.raises(InputError, match="sequence 1: no 3-mer: the sequence is empty"):
        model.embed(["ACGUA", ""])
    with pytest.raises(InputError, match="sequence 0: no 3-mer: the sequence is empty"):
        model.embed(["AC"])
    with pytest.raises(InputError, match=r"sequence 0: character 'R' at position 3 .*strict"):
        model.embed(["ACRGU"], strict=True)
    assert model.embed(["ACRGU"]).shape == (1, 32)  # not strict: k-mers holding R are <unk>
    with pytest.raises(InputError, match="pooling must be"):
        model.embed(["ACGU"], pooling="max")


def test_bundle_problems_are_named(tiny_bundle, tmp_path):
    import shutil

    from utr_runtime.bundle import sha256_file, write_manifest
    from utr_runtime.tokenizer import KmerTokenizer

    with pytest.raises(BundleError, match="no fp16 model in this bundle"):
        utr_runtime.load(tiny_bundle(3, "pretraining"), precision="fp16")
    other = tmp_path / "other-k"
    shutil.copytree(tiny_bundle(4, "base"), other)
    KmerTokenizer(5).save(other / "tokenizer.json")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = sha256_file(other / "tokenizer.json")
    write_manifest(other, manifest)
    with pytest.raises(BundleError, match="tokenizer is 5-mer but the model is 4-mer"):
        utr_runtime.load(other)
    manifest["format_version"] = 99
    write_manifest(other, manifest)
    with pytest.raises(BundleError, match="format version 99"):
        utr_runtime.load(other)
    (other / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        utr_runtime.load(other)


# ------------------------------------------------------------------------------------------------ CLI
def write_fasta(path, records, compress=False):
    text = "".join(f">{name}\n{seq}\n" for name, seq in records)
    (gzip.open if compress else open)(path, "wt").write(text)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".parquet"])
def test_cli_embed_writes_each_format(k3, tiny_bundle, tmp_path, suffix):
    model, _ = k3
    records = list(real_sequences("utrbert_seq_to_extract.fasta")) + list(real_sequences())[:5]
    write_fasta(tmp_path / "in.fa.gz", records, compress=True)
    out = tmp_path / f"out{suffix}"
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa.gz"), "-o", str(out), "--chunk", "3"])
    assert result.exit_code == 0, result.output
    expected = model.embed([s for _, s in records])
    if suffix == ".npy":
        vectors, ids = np.load(out), [n for n, _ in records]
    elif suffix == ".npz":
        data = np.load(out)
        vectors, ids = data["vectors"], data["ids"].tolist()
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        vectors, ids = np.array(table["vector"].to_pylist(), np.float32), table["id"].to_pylist()
    assert ids == [n for n, _ in records]
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.fa.gz", out.name]), "no partial files left"


def test_cli_embed_reads_tables_and_stdin(tiny_bundle, tmp_path):
    bundle = str(tiny_bundle(3, "pretraining"))
    (tmp_path / "in.tsv").write_text("name\tsequence\tlabel\nx\tACGUAGGCUA\t1\ny\tGGCAUCGA\t0\n")
    result = CliRunner().invoke(main, ["embed", bundle, str(tmp_path / "in.tsv"), "-o", str(tmp_path / "t.npz")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "t.npz")["ids"].tolist() == ["x", "y"]
    result = CliRunner().invoke(main, ["embed", bundle, "-", "-o", str(tmp_path / "s.npy")], input=">q\nACGUACGUAC\n")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "s.npy").shape == (1, 32)


@pytest.mark.parametrize(
    "content, message",
    [
        (">a\nACGUACG\n>a\nGGCAUU\n", "duplicate sequence id 'a'"),
        (">a\nACGUACG\n>b\n\n", "record 'b': no 3-mer: the sequence is empty"),
        (">a\nACGUXCG\n", "record 'a': character 'X'"),
        ("", "no sequences"),
    ],
)
def test_cli_embed_bad_input_fails_cleanly(tiny_bundle, tmp_path, content, message):
    (tmp_path / "in.fa").write_text(content)
    out = tmp_path / "out.npy"
    out.write_bytes(b"previous result")
    args = ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa"), "-o", str(out), "--strict", "--chunk", "1", "--force"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous result", "the earlier output is neither lost nor half-replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa", "out.npy"]


def test_cli_embed_truncated_gzip_fails_cleanly(tiny_bundle, tmp_path):
    records = list(real_sequences())[:40]
    write_fasta(tmp_path / "in.fa.gz", records, compress=True)
    data = (tmp_path / "in.fa.gz").read_bytes()
    (tmp_path / "in.fa.gz").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa.gz"), "-o", str(tmp_path / "o.npy")])
    assert result.exit_code == 1 and "truncated or corrupt compressed data" in result.output
    assert not (tmp_path / "o.npy").exists()


def test_cli_fill_mask(tiny_bundle):
    result = CliRunner().invoke(main, ["fill-mask", str(tiny_bundle(3, "pretraining")), "ACGU<mask>GGUA", "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)  # stdout: the JSON alone (stderr says what ran)
    assert len(answer) == 2 and set(answer[0]) == {"score", "token", "token_str", "sequence"}
    result = CliRunner().invoke(main, ["fill-mask", str(tiny_bundle(3, "base")), "ACGU<mask>GGUA"])
    assert result.exit_code == 1 and "no MLM head" in result.output


def test_runtime_works_without_torch(tiny_bundle):
    """utr_runtime imports NumPy and the engine only: torch, transformers, multimolecule and onnx are made
    uninstallable in a fresh interpreter, and a bundle still loads, verifies and embeds."""
    script = textwrap.dedent(
        f"""
        import sys
        BLOCKED = ("torch", "transformers", "multimolecule", "onnx", "onnxscript", "safetensors", "huggingface_hub")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")

        sys.meta_path.insert(0, Block())
        before = set(sys.modules)
        import utr_runtime
        third_party = {{m.split(".")[0] for m in set(sys.modules) - before}} - set(sys.stdlib_module_names) - {{"utr_runtime"}}
        assert third_party <= {{"numpy"}}, third_party
        model = utr_runtime.load({str(tiny_bundle(3, "pretraining"))!r})
        assert all(row["passed"] for row in utr_runtime.verify(model.bundle))
        print(model.embed(["ACGUAGCUAGGCAUUAGC", "GGGAUCCA"]).shape)
        from utrexport.cli import main
        main(["embed", "--help"], standalone_mode=False)
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert "(2, 32)" in done.stdout


def test_cli_finds_a_bad_record_before_any_model_work(tiny_bundle, tmp_path, monkeypatch):
    """A duplicate id at the end of a large input is reported before the first batch runs, not after hours."""
    records = list(real_sequences())[:40]
    write_fasta(tmp_path / "in.fa", records + [records[0]])
    calls = []
    monkeypatch.setattr(utr_runtime.Model, "embed", lambda self, *a, **k: calls.append(1) or np.zeros((len(a[0]), 32), np.float32))
    result = CliRunner().invoke(main, ["embed", str(tiny_bundle(3, "pretraining")), str(tmp_path / "in.fa"), "-o", str(tmp_path / "o.npy"), "--chunk", "4"])
    assert result.exit_code == 1 and f"record {records[0][0]!r}: duplicate sequence id" in result.output
    assert not calls, "the model never ran"
    assert not (tmp_path / "o.npy").exists()


def test_cli_skip_invalid_writes_the_valid_records_and_a_report(k3, tiny_bundle, tmp_path):
    model, _ = k3
    good = list(real_sequences("utrbert_seq_to_extract.fasta"))
    records = [good[0], ("short", "AC"), good[1], (good[0][0], "ACGUACGUAC"), ("odd", "ACGUXXACGU"), good[2], ("empty", "")]
    write_fasta(tmp_path / "in.fa", records)
    bundle = str(tiny_bundle(3, "pretraining"))
    for source, stdin in ((str(tmp_path / "in.fa"), None), ("-", (tmp_path / "in.fa").read_text())):
        out = tmp_path / "o.npz"
        result = CliRunner().invoke(main, ["embed", bundle, source, "-o", str(out), "--strict", "--skip-invalid", "--chunk", "2", "--force"], input=stdin)
        assert result.exit_code == 0, result.output
        assert "skipped 4 invalid record(s)" in result.output
        data = np.load(out)
        assert data["ids"].tolist() == [n for n, _ in good]
        np.testing.assert_allclose(data["vectors"], model.embed([s for _, s in good]), atol=1e-5)
        report = (tmp_path / "o.npz.skipped.tsv").read_text().splitlines()
        assert report[0] == "id\treason" and [line.split("\t")[0] for line in report[1:]] == ["short", good[0][0], "odd", "empty"]
        assert "duplicate sequence id" in report[2] and "character 'X' at position 5" in report[3] and "no 3-mer" in report[1]
    result = CliRunner().invoke(main, ["embed", bundle, "-", "-o", str(tmp_path / "none.npy"), "--skip-invalid"], input=">a\nAC\n")
    assert result.exit_code == 1 and "no valid sequences" in result.output and not (tmp_path / "none.npy").exists()


def test_fill_mask_warns_about_text_that_gives_no_kmer(k3, tiny_bundle):
    model, _ = k3
    with pytest.warns(utr_runtime.InputWarning, match=r"'GG' is shorter than k=3 and gives no 3-mer: left out of the input"):
        model.fill_mask("GG<mask>ACGUAGCUAG")
    result = CliRunner().invoke(main, ["fill-mask", str(tiny_bundle(3, "pretraining")), "GG<mask>ACGUAGCUAG"])
    assert result.exit_code == 0 and "warning: 'GG' is shorter than k=3" in result.output


def test_untrained_bundles_say_so(tmp_path):
    from utrexport import checkpoints
    from utrexport.build import build_bundle

    path = build_bundle(checkpoints.from_random_init(3, seed=0, num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                                     intermediate_size=64), tmp_path / "random", log=lambda m: None)
    with pytest.warns(utr_runtime.UntrainedModelWarning, match="untrained"):
        model = utr_runtime.load(path)
    assert "UNTRAINED" in repr(model)
    for args in (["verify", str(path)], ["fill-mask", str(path), "ACG<mask>GCAUUAG"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "warning:" in result.output and "untrained (random-init) weights" in result.output
