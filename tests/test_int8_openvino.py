"""OpenVINO's own int8 (NNCF, an IR in the bundle): kept only where it is closer to fp32 than the Q/DQ file, run by
OpenVINO's int8 where present, checked like every bundle file; int8's float parts in bf16 where the CPU has it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import utr_runtime
from utr_runtime.bundle import OpenVinoIr
from utr_runtime.engines import inference_precision, installed, open_runner
from utr_runtime.errors import BundleError, UtrError

pytestmark = pytest.mark.skipif(not installed("openvino"), reason="OpenVINO is not installed (pip install 'utrexport[openvino]')")

IR = "model.int8-openvino.xml"


def token_cosines(runner, fixtures) -> np.ndarray:
    """Cosine of every real token's vector to the PyTorch reference (float64), computed here, apart from parity.py."""
    feeds = {k: fixtures[k] for k in runner.input_names}
    got = runner.run(feeds)["last_hidden_state"].astype(np.float64)
    mask = fixtures["attention_mask"].astype(bool)
    a, b = got[mask], fixtures["last_hidden_state"].astype(np.float64)[mask]
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_nncf_int8_is_no_worse_than_the_qdq_file_on_the_fixtures(all_precisions):
    """On the real-width model NNCF's int8 is kept, and on the held-out fixtures (f32 float parts on both) its token
    cosines to fp32 are at least the Q/DQ file's, mean and worst token."""
    bundle = utr_runtime.Bundle(all_precisions)
    assert bundle.model_name("int8", "cpu", "openvino") == IR
    fixtures = dict(np.load(all_precisions / "fixtures.npz"))
    nncf = token_cosines(open_runner(bundle.read_model(IR), engine="openvino"), fixtures)
    qdq = token_cosines(open_runner(bundle.read_model("model.int8.onnx"), engine="openvino"), fixtures)
    assert nncf.mean() >= qdq.mean() and nncf.min() >= qdq.min(), (nncf.mean(), qdq.mean(), nncf.min(), qdq.min())
    record = bundle.manifest["models"]["int8"]["variants"]["openvino"]
    assert record["format"] == "openvino-ir" and record["weights"] == "model.int8-openvino.bin"
    assert record["quantizer"]["model_type"] == "TRANSFORMER" and record["quantizer"]["subset_size"] == 16
    assert {"nncf", "openvino", "smooth_quant_alpha", "bias_correction"} <= set(record["quantizer"])
    kept = [r for r in bundle.manifest["parity"] if r["precision"] == "int8/openvino"]
    assert kept and all(r["engine"] == "openvino" and r["passed"] for r in kept)


def test_nncf_int8_is_left_out_where_it_loses(trained_bundle):
    """On the trained classifier NNCF's int8 moved the task probabilities more than the Q/DQ file (docs/int8.md): the
    build measures that, keeps the Q/DQ file for OpenVINO and records why; the IR's files are gone."""
    bundle = utr_runtime.Bundle(trained_bundle)
    entry = bundle.manifest["models"]["int8"]
    assert "openvino" not in entry["variants"] and "probability error" in entry["not_kept"]["openvino"]["why"]
    assert bundle.model_name("int8", "cpu", "openvino") == "model.int8.onnx"
    assert not (trained_bundle / IR).exists() and IR not in bundle.manifest["files"]
    assert not any(r["precision"] == "int8/openvino" for r in bundle.manifest["parity"])


def test_openvino_int8_runs_the_ir_and_older_bundles_the_qdq_file(all_precisions, tmp_path):
    bundle = utr_runtime.Bundle(all_precisions)
    model = utr_runtime.load(bundle, precision="int8", engine="openvino")
    assert model.runner.name.endswith(IR)
    assert utr_runtime.load(bundle, precision="int8", engine="onnxruntime").runner.name.endswith("model.int8-cpu.onnx")
    assert set(bundle.model_names("int8", "onnxruntime")) == {"int8", "int8/cpu", "int8/tensorrt"}
    assert "int8/openvino" in bundle.model_names("int8", "openvino")

    older = tmp_path / "older"
    shutil.copytree(all_precisions, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["models"]["int8"]["variants"]["openvino"]
    for name in (IR, "model.int8-openvino.bin"):
        del manifest["files"][name]
        (older / name).unlink()
    (older / "manifest.json").write_text(json.dumps(manifest))
    model = utr_runtime.load(older, precision="int8", engine="openvino")
    assert model.runner.name.endswith("model.int8.onnx")
    assert model.embed(["ACGUAGCUAGGCAUUAGCAGGAUUAGC"]).shape == (1, 768)


def test_the_ir_is_checked_and_read_from_memory(all_precisions, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(all_precisions, bad)
    weights = bytearray((bad / "model.int8-openvino.bin").read_bytes())
    weights[100] ^= 1
    (bad / "model.int8-openvino.bin").write_bytes(bytes(weights))
    with pytest.raises(BundleError, match="checksum mismatch for model.int8-openvino.bin"):
        utr_runtime.load(bad, precision="int8", engine="openvino")

    manifest = json.loads((all_precisions / "manifest.json").read_text())
    manifest["models"]["int8"]["variants"]["openvino"]["weights"] = "../outside.bin"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="only plain names inside the bundle"):
        utr_runtime.load(bad, precision="int8", engine="openvino")
    del manifest["models"]["int8"]["variants"]["openvino"]["weights"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="must name its 'weights' file"):
        utr_runtime.Bundle(bad)

    ir = utr_runtime.Bundle(all_precisions).read_model(IR)
    assert isinstance(ir, OpenVinoIr) and ir.xml.startswith(b"<?xml")
    with pytest.raises(UtrError, match="is an OpenVINO model: it runs with engine='openvino'"):
        open_runner(ir, engine="onnxruntime", name=IR)
    with pytest.raises(UtrError, match="OpenVINO cannot load it"):
        open_runner(OpenVinoIr(ir.xml, ir.weights[:1000]), engine="openvino")


def test_int8_float_parts_follow_the_cpu(all_precisions, monkeypatch):
    """bf16 float parts for int8 on OpenVINO where the CPU has native bf16, f32 elsewhere and on other engines. The
    capability is stood in for both ways; the bf16 run itself only where this CPU has it."""
    import utr_runtime.engines.openvino as ov_engine

    here = ov_engine.bf16_supported()
    for supported in (False, True):
        monkeypatch.setattr(ov_engine, "bf16_supported", lambda supported=supported: supported)
        assert inference_precision("int8", "openvino") == ("bf16" if supported else "f32")
        assert inference_precision("int8", "onnxruntime") == "f32" and inference_precision("fp32", "openvino") == "f32"
        assert inference_precision("bf16", "openvino") == "bf16"
    monkeypatch.setattr(ov_engine, "bf16_supported", lambda: False)
    assert utr_runtime.load(all_precisions, precision="int8", engine="openvino").runner.inference_precision == "f32"
    monkeypatch.undo()
    if here:
        model = utr_runtime.load(all_precisions, precision="int8", engine="openvino")
        assert model.runner.inference_precision == "bf16"
        rows = utr_runtime.verify(all_precisions, ["int8"], engines=["openvino"])
        assert rows and all(r["passed"] for r in rows)
