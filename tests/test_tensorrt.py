"""TensorRT: the readiness check runs everywhere; building and running engines needs a GPU and TensorRT."""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import utr_runtime
from conftest import expected_rows
from utr_runtime.errors import BundleError, UtrError
from utrexport.cli import main
from utrexport.tensorrt_build import EngineError, parse_profile
from utrexport.tensorrt_check import check_model


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_models_meant_for_tensorrt_are_ready(all_precisions, precision):
    bundle = utr_runtime.Bundle(all_precisions)
    assert check_model(bundle.model_file(precision, device="tensorrt")) == []
    assert bundle.manifest["models"][precision]["tensorrt_ready"] is True


def test_cpu_int8_scheme_is_reported_not_ready(all_precisions):
    """The u8s8 model for ONNX Runtime's CPU kernels breaks TensorRT's Q/DQ rules, and the check says so."""
    findings = check_model(utr_runtime.Bundle(all_precisions).model_file("int8", device="cpu"))
    problems = {f.problem for f in findings}
    assert "zero-point must be 0 (symmetric quantization)" in problems
    assert any("UINT8" in p for p in problems)


def test_readiness_catches_what_the_parser_refuses(all_precisions, tmp_path):
    model = onnx.load(str(utr_runtime.Bundle(all_precisions).model_file("int8")))
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    attention.attribute.append(onnx.helper.make_attribute("softcap", 30.0))
    model.graph.node.append(onnx.helper.make_node("NonMaxSuppression", ["last_hidden_state"], ["nms"], name="extra"))
    weight_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2)
    zero = next(t for t in model.graph.initializer if t.name == weight_dq.input[2])
    zero.CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(zero).shape, 3, np.int8), zero.name))
    onnx.save(model, tmp_path / "bad.onnx")
    problems = {str(f) for f in check_model(tmp_path / "bad.onnx")}
    assert any("attribute softcap is unsupported" in p for p in problems)
    assert any("NonMaxSuppression" in p and "not in TensorRT's ONNX support matrix" in p for p in problems)
    assert any("zero-point must be 0" in p for p in problems)


def test_int8_and_fp16_bundle_verifies_and_embeds(all_precisions):
    rows = utr_runtime.verify(all_precisions)
    assert {(r["precision"], r["engine"]) for r in rows} == expected_rows(utr_runtime.Bundle(all_precisions))
    assert all(r["passed"] for r in rows)
    seqs = ["ACGUAGCUAGGCAUUAGCAGGUUAC" * 8, "GGGAUCCAUUAGC" * 3]
    reference = utr_runtime.load(all_precisions).embed(seqs)
    for precision, bound in (("fp16", 0.9999), ("int8", 0.99)):
        got = utr_runtime.load(all_precisions, precision=precision).embed(seqs)
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        assert cos.min() >= bound, (precision, cos)


def test_profiles_are_parsed_and_checked():
    assert parse_profile("1x8,32x128,128x128") == ((1, 8), (32, 128), (128, 128))
    for bad in ("1x8,32x128", "8x8,1x128,128x128", "axb,1x1,1x1"):
        with pytest.raises(EngineError, match="expected MIN,OPT,MAX"):
            parse_profile(bad)


def test_tensorrt_device_without_an_engine_says_how_to_build_one(all_precisions):
    with pytest.raises(BundleError, match="no TensorRT fp16 engine; build one on this machine with: utrexport engine"):
        utr_runtime.load(all_precisions, precision="fp16", device="tensorrt")
    result = CliRunner().invoke(main, ["verify", str(all_precisions), "--device", "tensorrt"])
    assert result.exit_code == 1 and "no TensorRT engines" in result.output


def test_engine_from_another_gpu_or_version_is_refused(all_precisions, tmp_path, monkeypatch):
    """The portability check itself (TensorRT and the GPU are stood in for: only their version strings matter here)."""
    from utr_runtime.bundle import write_manifest
    from utr_runtime.engines import tensorrt as trt_runner

    bundle_dir = tmp_path / "b"
    shutil.copytree(all_precisions, bundle_dir)
    bundle = utr_runtime.Bundle(bundle_dir)
    bundle.manifest["engines"] = {"fp16": {"file": "engine.fp16.plan", "tensorrt": "10.14.1", "gpu": "NVIDIA H100", "compute_capability": "9.0"}}
    write_manifest(bundle_dir, bundle.manifest)
    monkeypatch.setattr(trt_runner, "import_tensorrt", lambda: types.SimpleNamespace(__version__="11.0.0"))
    monkeypatch.setattr(trt_runner, "cuda_device", lambda index=0: {"name": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(BundleError, match=r"built for NVIDIA H100 \(compute capability 9.0\) with TensorRT 10.14.1.*not portable.*utrexport engine"):
        utr_runtime.load(bundle_dir, precision="fp16", device="tensorrt")


def _tensorrt_and_gpu():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'utrexport[tensorrt]'; needs an NVIDIA GPU)"
    try:
        from utr_runtime.engines.tensorrt import cuda_device

        cuda_device()
    except UtrError as e:
        return str(e)
    return None


@pytest.mark.skipif(_tensorrt_and_gpu() is not None, reason=f"engine build and run not tested: {_tensorrt_and_gpu()}")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_verifies_and_embeds_on_the_gpu(all_precisions, tmp_path, precision):
    bundle_dir = tmp_path / "gpu"
    shutil.copytree(all_precisions, bundle_dir)
    result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", precision, "--profile", "1x8,4x64,8x512"])
    assert result.exit_code == 0, result.output
    rows = utr_runtime.verify(bundle_dir, [precision], device="tensorrt")
    assert rows and all(r["passed"] for r in rows)
    model = utr_runtime.load(bundle_dir, precision=precision, device="tensorrt")
    assert model.embed(["ACGUAGCUAGGCAUUAGC" * 40]).shape == (1, 768)
