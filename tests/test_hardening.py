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
    with pytest.raises(BundleError, match="model.fp32.onnx is not a regular file"):
        utr_runtime.Bundle(path)


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
