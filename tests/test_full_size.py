"""One full-size (12-layer, hidden 768) k=6 build, checked against multimolecule with the same weights."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import utr_runtime
from conftest import expected_rows, multimolecule, padded_real_batch
from utr_runtime.verify import default_engines
from utrexport import checkpoints

ATOL = 1e-4  # the fp32 tolerance of parity.TOLERANCES, here against multimolecule itself


@pytest.fixture(scope="module")
def full_k6(readme_run):
    """The README's main job, `utrexport build --kmer 6 --random-init --seed 0` (run once for the suite by the README
    test), and the same seeded weights as a checkpoint for multimolecule."""
    folder, _ = readme_run
    path = folder / "bundles" / "utrbert-6mer-random"
    source = utr_runtime.Bundle(path).manifest["model"]["source"]
    assert source == {"kind": "random-init", "seed": 0}, source  # what the README built
    return checkpoints.from_random_init(6, seed=0), path


def test_full_size_k6_bundle_verifies(full_k6):
    """fp32, fp16 and both int8 schemes within their tolerances (parity.TOLERANCES) on held-out real sequences."""
    _, path = full_k6
    rows = utr_runtime.verify(path)
    assert {(r["precision"], r["engine"]) for r in rows} == expected_rows(utr_runtime.Bundle(path))
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    bundle = utr_runtime.Bundle(path)
    assert bundle.manifest["model"]["trained"] is False
    assert bundle.manifest["model"]["config"]["num_hidden_layers"] == 12
    assert bundle.model_file("fp32").stat().st_size < 400 * 2**20  # tied embeddings stored once
    # int8 encoder weights are a quarter of fp32's; the 50 MB embedding table stays float (it is a lookup).
    assert bundle.model_file("int8").stat().st_size < 0.4 * bundle.model_file("fp32").stat().st_size


def test_full_size_k6_equals_multimolecule(full_k6):
    ckpt, path = full_k6
    mm = multimolecule()
    reference = mm.UtrBertForPreTraining(mm.UtrBertConfig(nmers=6)).eval()
    state = {("" if key.startswith("lm_head.") else "model.") + key: value for key, value in ckpt.state_dict.items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith("lm_head.decoder") for key in missing)
    batch = padded_real_batch(6, n=8, max_tokens=128)
    with torch.no_grad():
        expected = reference.model(torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"]))
    real = batch["attention_mask"].astype(bool)
    for engine in default_engines():
        got = utr_runtime.load(path, engine=engine).forward(batch["input_ids"], batch["attention_mask"])
        assert np.abs(got["last_hidden_state"] - expected.last_hidden_state.numpy())[real].max() <= ATOL, engine
        assert np.abs(got["pooler_output"] - expected.pooler_output.numpy()).max() <= ATOL, engine


def test_sigterm_ends_a_long_engine_call_at_once(full_k6, tmp_path):
    """SIGTERM's handler ran only when the engine's call returned (35 s for this batch on 2 cores): the engine now runs
    in a thread the main thread waits on, so the run ends at once and removes its partial output."""
    _, path = full_k6
    rng = np.random.default_rng(0)
    (tmp_path / "long.fa").write_text("".join(f">l{i}\n{''.join(rng.choice(list('ACGU'), 20_000))}\n" for i in range(4)))
    run = subprocess.Popen([sys.executable, "-m", "utrexport.cli", "embed", str(path), str(tmp_path / "long.fa"), "-o", str(tmp_path / "o.npz"),
                            "--batch-tokens", "65536", "--engine", "onnxruntime"], stderr=subprocess.PIPE, text=True)
    while "running" not in run.stderr.readline():
        assert run.poll() is None, run.stderr.read()
    time.sleep(2)  # inside the engine's call: one batch of 128 windows
    sent = time.monotonic()
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=60)
    assert time.monotonic() - sent < 5 and run.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in run.stderr.read() and sorted(p.name for p in tmp_path.iterdir()) == ["long.fa"]
