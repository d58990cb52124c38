"""Exporter: checkpoints -> compact module -> ONNX -> bundle, each step proven against multimolecule."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import KMERS, TINY, multimolecule, padded_real_batch
from utr_runtime.bundle import Bundle
from utr_runtime.engines import open_runner
from utr_runtime.parity import TOLERANCES, compare
from utr_runtime.verify import verify
from utrexport import checkpoints
from utrexport.cli import main

# Our module and multimolecule's, same weights, both float32 PyTorch on the CPU: differences are summation order.
MODULE_ATOL = 1e-5
# The exported graph in ONNX Runtime against multimolecule: the bundle's fp32 tolerance.
ONNX_ATOL = TOLERANCES["fp32"]["last_hidden_state"].max_abs


def reference_outputs(model, batch, positions=None) -> dict:
    """multimolecule's forward, named as our outputs."""
    ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
    with torch.no_grad():
        if hasattr(model, "lm_head"):
            base = model.model(ids, attention_mask=mask)
            logits = model(ids, attention_mask=mask).logits
            out = {"last_hidden_state": base.last_hidden_state.numpy()}
            if base.pooler_output is not None:
                out["pooler_output"] = base.pooler_output.numpy()
            if positions is not None:
                out["logits"] = np.take_along_axis(logits.numpy(), positions[:, :, None], axis=1)
            return out
        out = model(ids, attention_mask=mask)
        return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}


def some_positions(mask: np.ndarray) -> np.ndarray:
    lengths = mask.sum(1)
    return np.stack([[1, n // 2, n - 2] for n in lengths]).astype(np.int64)


def assert_close(ours: dict, ref: dict, mask, atol: float):
    assert set(ref) <= set(ours)
    for name in ref:
        diff = np.abs(ours[name] - ref[name])
        if name == "last_hidden_state":
            diff = diff[mask.astype(bool)]
        assert diff.max() <= atol, f"{name}: max abs diff {diff.max():.2e} > {atol}"


@pytest.mark.parametrize("kind", ["base", "mlm", "pretraining"])
@pytest.mark.parametrize("k", KMERS)
def test_module_equals_multimolecule_on_real_padded_batches(tiny_checkpoint, k, kind):
    folder, reference = tiny_checkpoint(k, kind)
    ckpt = checkpoints.from_folder(folder, k)
    assert ckpt.config.pooler == (kind != "mlm") and ckpt.config.lm_head == (kind != "base")
    module = ckpt.module()
    batch = padded_real_batch(k)
    positions = some_positions(batch["attention_mask"]) if module.lm_head is not None else None
    args = [torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])]
    if positions is not None:
        args.append(torch.from_numpy(positions))
    with torch.no_grad():
        ours = dict(zip(module.output_names, (o.numpy() for o in module(*args))))
    assert_close(ours, reference_outputs(reference, batch, positions), batch["attention_mask"], MODULE_ATOL)


@pytest.mark.parametrize("k, attention", [(k, "fused") for k in KMERS] + [(3, "plain"), (6, "plain")])
def test_bundle_in_onnxruntime_equals_multimolecule(tiny_checkpoint, tiny_bundle, k, attention):
    _, reference = tiny_checkpoint(k, "pretraining")
    bundle = Bundle(tiny_bundle(k, "pretraining", attention))
    assert bundle.k == k and bundle.has_lm_head
    runner = open_runner(bundle.model_file("fp32"))
    batch = padded_real_batch(k, n=6, max_tokens=512, source="human_mrna_full_length.fasta")
    positions = some_positions(batch["attention_mask"])
    ours = runner.run({**batch, "mask_positions": positions})
    assert_close(ours, reference_outputs(reference, batch, positions), batch["attention_mask"], ONNX_ATOL)


def test_bundle_manifest_and_verify(tiny_bundle):
    path = tiny_bundle(3, "pretraining")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["k"] == 3 and manifest["model"]["trained"] is True
    assert manifest["model"]["source"]["format"] == "multimolecule"
    assert set(manifest["files"]) == {"model.fp32.onnx", "tokenizer.json", "fixtures.npz", "conformance.json"}
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "mask_positions"]
    assert [o["name"] for o in manifest["outputs"]] == ["last_hidden_state", "pooler_output", "logits"]
    assert manifest["max_tokens"] == 512 and manifest["models"]["fp32"]["opset"] >= 23
    assert all(r["passed"] for r in manifest["parity"])
    assert [r["output"] for r in manifest["parity"] if r["engine"] == "onnxruntime"] == ["last_hidden_state", "mean_pooled", "pooler_output", "logits"]
    fixtures = np.load(path / "fixtures.npz")
    assert (fixtures["attention_mask"] == 0).any(), "the fixture batch must include padding"
    assert fixtures["attention_mask"].sum(1).max() == 512, "and a full-length row"
    assert all(r["passed"] for r in verify(path))


@pytest.mark.parametrize("k, attention", [(3, "fused"), (6, "fused"), (6, "plain")])
def test_graph_is_clean(tiny_bundle, k, attention):
    bundle = Bundle(tiny_bundle(k, "pretraining", attention))
    graph = onnx.load(str(bundle.model_file("fp32"))).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    layers = TINY["num_hidden_layers"]
    # fused: one Attention per layer; plain: one Softmax per layer between two activation MatMuls
    assert (ops["Attention"], ops["Softmax"]) == ((layers, 0) if attention == "fused" else (0, layers))
    assert bundle.manifest["attention"]["form"] == attention
    assert ops["Gelu"] >= layers and ops["LayerNormalization"] >= 2 * layers + 1
    assert not ops["CumSum"] and not ops["Erf"]
    vocab = 5**k + 6
    tables = [i.name for i in graph.initializer if len(i.dims) == 2 and vocab in i.dims]
    assert len(tables) == 1, f"tied word embeddings must be stored once, found {tables}"


def test_verify_catches_corruption_and_missing_files(tiny_bundle, tmp_path):
    import shutil

    good = tiny_bundle(4, "base")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    data = bytearray((broken / "model.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.fp32.onnx").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(broken)])
    assert result.exit_code == 1 and "checksum mismatch for model.fp32.onnx" in result.output
    shutil.copy(good / "model.fp32.onnx", broken / "model.fp32.onnx")
    (broken / "tokenizer.json").unlink()
    result = CliRunner().invoke(main, ["verify", str(broken)])
    assert result.exit_code == 1 and "missing file tokenizer.json" in result.output
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such bundle folder" in result.output
    assert "Traceback" not in result.output


def test_verify_fails_when_outputs_drift(tiny_bundle, tmp_path):
    """A bundle whose reference outputs disagree with its model must fail verification (the check can fail)."""
    import shutil

    from utr_runtime.bundle import sha256_file, write_manifest

    drifted = tmp_path / "drifted"
    shutil.copytree(tiny_bundle(5, "base"), drifted)
    fixtures = dict(np.load(drifted / "fixtures.npz"))
    fixtures["pooler_output"] = fixtures["pooler_output"] + 1e-3
    np.savez(drifted / "fixtures.npz", **fixtures)
    manifest = json.loads((drifted / "manifest.json").read_text())
    manifest["files"]["fixtures.npz"] = sha256_file(drifted / "fixtures.npz")
    write_manifest(drifted, manifest)
    result = CliRunner().invoke(main, ["verify", str(drifted)])
    assert result.exit_code == 1 and "FAIL" in result.output and "verification FAILED" in result.output


def test_comparator_fails_out_of_tolerance_values():
    ref = {"pooler_output": np.ones((2, 4), np.float32)}
    bad = {"pooler_output": np.ones((2, 4), np.float32) * [1, 1, 1, 1.01]}
    (row,) = compare(ref, bad, TOLERANCES["fp32"])
    assert not row.passed and row.max_abs == pytest.approx(0.01, rel=1e-3)
    (row,) = compare(ref, {"pooler_output": np.full((2, 4), np.nan, np.float32)}, TOLERANCES["int8"])
    assert not row.passed
    (row,) = compare(ref, {}, TOLERANCES["fp16"])
    assert not row.passed


def write_original_checkpoint(folder, k: int, seed: int = 7):
    """A DNABERT-style BertForMaskedLM folder (keys bert.*/cls.predictions.*, gamma/beta, 4-letter vocab with T)."""
    torch.manual_seed(seed)
    hidden, inter, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    import itertools

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["".join(p) for p in itertools.product("ATCG", repeat=k)]
    state = {
        "bert.embeddings.word_embeddings.weight": torch.randn(len(vocab), hidden),
        "bert.embeddings.position_embeddings.weight": torch.randn(512, hidden),
        "bert.embeddings.token_type_embeddings.weight": torch.randn(2, hidden),
        "bert.embeddings.LayerNorm.gamma": 1 + 0.1 * torch.randn(hidden),
        "bert.embeddings.LayerNorm.beta": 0.1 * torch.randn(hidden),
        "bert.pooler.dense.weight": torch.randn(hidden, hidden) * 0.1,
        "bert.pooler.dense.bias": torch.randn(hidden) * 0.1,
        "cls.predictions.bias": torch.randn(len(vocab)),
        "cls.predictions.transform.dense.weight": torch.randn(hidden, hidden) * 0.1,
        "cls.predictions.transform.dense.bias": torch.randn(hidden) * 0.1,
        "cls.predictions.transform.LayerNorm.gamma": 1 + 0.1 * torch.randn(hidden),
        "cls.predictions.transform.LayerNorm.beta": 0.1 * torch.randn(hidden),
    }
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name, shape in [("attention.self.query", (hidden, hidden)), ("attention.self.key", (hidden, hidden)), ("attention.self.value", (hidden, hidden)),
                            ("attention.output.dense", (hidden, hidden)), ("intermediate.dense", (inter, hidden)), ("output.dense", (hidden, inter))]:
            state[p + name + ".weight"] = torch.randn(*shape) * 0.1
            state[p + name + ".bias"] = torch.randn(shape[0]) * 0.1
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[p + name + ".gamma"] = 1 + 0.1 * torch.randn(hidden)
            state[p + name + ".beta"] = 0.1 * torch.randn(hidden)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = {"architectures": ["BertForMaskedLM"], "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": TINY["num_attention_heads"],
              "intermediate_size": inter, "vocab_size": len(vocab), "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
              "hidden_act": "gelu", "initializer_range": 0.02, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (folder / "config.json").write_text(json.dumps(config))
    return state, vocab, config


@pytest.mark.parametrize("k", [3, 4])
def test_original_checkpoint_converts_as_multimolecule_does(tmp_path, k):
    state, vocab, config = write_original_checkpoint(tmp_path / f"{k}-new", k)
    ours = checkpoints.from_folder(tmp_path / f"{k}-new", k)
    assert ours.source["format"] == "original-3utrbert" and ours.config.pooler and ours.config.lm_head

    mm = multimolecule()
    from multimolecule.models.utrbert.convert_checkpoint import _convert_checkpoint
    from multimolecule.tokenisers.rna.utils import get_alphabet

    mm_config = mm.UtrBertConfig(nmers=k, **TINY)
    old_vocab = [t.lower().replace("[", "<").replace("]", ">").replace("<sep>", "<eos>") if t.startswith("[") else t.replace("T", "U") for t in vocab]
    theirs = _convert_checkpoint(mm_config, dict(state), get_alphabet(nmers=k).vocabulary, old_vocab)
    theirs = {key.removeprefix("model."): value for key, value in theirs.items() if not key.startswith("lm_head.decoder")}
    assert set(theirs) == set(ours.state_dict)
    for key, value in theirs.items():
        assert torch.equal(ours.state_dict[key], value.float()), key


def test_checkpoint_errors_are_clear(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint(3, "base")
    runner = CliRunner()
    result = runner.invoke(main, ["build", "--kmer", "4", "--checkpoint", str(folder), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "is a 3-mer checkpoint but --kmer 4 was asked for" in result.output
    result = runner.invoke(main, ["build", "--kmer", "3", "--checkpoint", str(tmp_path / "absent"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no such checkpoint folder" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"nmers": 3}')
    result = runner.invoke(main, ["build", "--kmer", "3", "--checkpoint", str(tmp_path / "empty"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no weights" in result.output
    result = runner.invoke(main, ["build", "--kmer", "3", "--random-init", "--checkpoint", str(folder)])
    assert result.exit_code == 1 and "choose one of" in result.output
    result = runner.invoke(main, ["build", "--kmer", "7", "--random-init"])
    assert result.exit_code == 2
    for r in (result,):
        assert "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_force_replaces_a_bundle_and_nothing_else(tiny_checkpoint, tmp_path):
    """An existing output is kept without --force; with it, a bundle is replaced, but a folder or file that is not a
    bundle never is (it could be anyone's work)."""
    folder, _ = tiny_checkpoint(3, "base")
    important = tmp_path / "important"
    (important / "sub").mkdir(parents=True)
    (important / "thesis.txt").write_text("mine")
    plain = tmp_path / "plain.txt"
    plain.write_text("mine too")
    build = ["build", "--kmer", "3", "--checkpoint", str(folder), "--precision", "fp32", "-o"]
    for target in (important, plain):
        result = CliRunner().invoke(main, build + [str(target)])
        assert result.exit_code == 1 and "exists; pass --force" in result.output
        result = CliRunner().invoke(main, build + [str(target), "--force"])
        assert result.exit_code == 1 and "is not a bundle; --force replaces bundles only" in result.output, result.output
    assert (important / "thesis.txt").read_text() == "mine" and (important / "sub").is_dir() and plain.read_text() == "mine too"

    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, build + [str(out)])
    assert result.exit_code == 0, result.output
    assert "TensorRT-ready: fp32 (TensorRT 10.14+; for older TensorRT (e.g. Jetson's 10.3) build with --attention plain)" in result.output
    first = (out / "manifest.json").read_text()
    result = CliRunner().invoke(main, build + [str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").read_text() != first, "replaced by the new build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "important", "plain.txt"], "no temporary folders left behind"


def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "utrexport.cli", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


def test_hub_id_through_an_offline_cache(tiny_checkpoint, tmp_path):
    """The real huggingface_hub path: a hub cache laid out as the hub lays it, read with HF_HUB_OFFLINE=1."""
    folder, _ = tiny_checkpoint(3, "pretraining")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--multimolecule--utrbert-3mer"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = run_cli(["build", "--kmer", "3", "--precision", "fp32", "-o", str(tmp_path / "b")], env)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"]["source"]["kind"] == "hub" and manifest["model"]["source"]["id"] == "multimolecule/utrbert-3mer"

    missing = run_cli(["build", "--kmer", "5", "-o", str(tmp_path / "c")], env)
    assert missing.returncode == 1
    assert "multimolecule/utrbert-5mer" in missing.stderr and "--checkpoint" in missing.stderr and "--random-init" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "c").exists()


def test_random_init_is_seeded_and_marked_untrained():
    a = checkpoints.from_random_init(3, seed=1, num_hidden_layers=1)
    b = checkpoints.from_random_init(3, seed=1, num_hidden_layers=1)
    c = checkpoints.from_random_init(3, seed=2, num_hidden_layers=1)
    assert a.weights_sha256() == b.weights_sha256() != c.weights_sha256()
    assert a.trained is False and a.source == {"kind": "random-init", "seed": 1}


def test_build_without_the_exporter_extra_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "onnxscript") else real(name, *a))
    result = CliRunner().invoke(main, ["build", "--kmer", "3", "--random-init", "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "needs the exporter's packages (torch, onnxscript missing): pip install 'utrexport[export]'" in result.output
