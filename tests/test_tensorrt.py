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


# ------------------------------------------------------------------------------------------------ without a GPU
from utr_runtime.engines.tensorrt import numpy_dtype, plan_profile_runs  # noqa: E402
from utr_runtime.windows import plan_batches  # noqa: E402
from utrexport.tensorrt_build import DEFAULT_PROFILES, profile_shapes  # noqa: E402


@pytest.mark.parametrize("batch_size, budget", [(64, 8192), (256, 65536), (1, 512)])
@pytest.mark.parametrize("inputs", [["input_ids", "attention_mask"], ["input_ids", "attention_mask", "mask_positions"]])
def test_default_profiles_take_every_batch_the_runtime_plans(batch_size, budget, inputs):
    """Every window length from 1 to 512 tokens, in batches as plan_batches makes them for these settings, runs on
    the default profiles: the right profile, in row slices the profile takes, covering every row once."""
    profiles = profile_shapes(DEFAULT_PROFILES, inputs)
    for length in range(1, 513):
        for batch in plan_batches([length] * batch_size, budget, batch_size):
            shapes = {"input_ids": (len(batch), length), "attention_mask": (len(batch), length)}
            if "mask_positions" in inputs:
                shapes["mask_positions"] = (len(batch), 1)
            index, slices = plan_profile_runs(profiles, shapes)
            rows = [r for s in slices for r in range(len(batch))[s]]
            assert rows == list(range(len(batch)))
            assert all(s.stop - s.start <= profiles[index]["input_ids"][2][0] for s in slices)
            assert profiles[index]["input_ids"][0][1] <= length <= profiles[index]["input_ids"][2][1]


def test_uncovered_shapes_are_refused_with_the_fix():
    profiles = profile_shapes((((1, 8), (4, 64), (8, 128)),), ["input_ids", "attention_mask", "mask_positions"])
    with pytest.raises(UtrError, match="no optimization profile of this engine covers .* rebuild it with a --profile"):
        plan_profile_runs(profiles, {"input_ids": (2, 300), "attention_mask": (2, 300), "mask_positions": (2, 1)})
    with pytest.raises(UtrError, match="no optimization profile"):  # more masked positions than the engine takes
        plan_profile_runs(profiles, {"input_ids": (2, 64), "attention_mask": (2, 64), "mask_positions": (2, 65)})
    index, slices = plan_profile_runs(profiles, {"input_ids": (20, 64), "attention_mask": (20, 64), "mask_positions": (20, 3)})
    assert index == 0 and [(s.start, s.stop) for s in slices] == [(0, 8), (8, 16), (16, 20)]


def test_an_old_driver_is_named_as_such(monkeypatch):
    from utr_runtime.engines import tensorrt as trt_runner

    fake = types.SimpleNamespace(cudaGetDeviceCount=lambda: (35, 0), cudaError_t=types.SimpleNamespace(cudaSuccess=0))
    monkeypatch.setattr(trt_runner, "_cudart", lambda: fake)
    with pytest.raises(UtrError, match=r"driver is older than the CUDA of the installed cuda-python \(CUDA error 35\).*tensorrt-cu12"):
        trt_runner.cuda_device()
    fake.cudaGetDeviceCount = lambda: (100, 0)  # cudaErrorNoDevice
    with pytest.raises(UtrError, match="no CUDA GPU is visible"):
        trt_runner.cuda_device()


def test_engine_io_types_numpy_cannot_hold_are_refused():
    def nptype(dtype):
        if dtype == "BF16":
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return np.float32

    fake = types.SimpleNamespace(nptype=nptype)
    assert numpy_dtype(fake, "FLOAT") == np.float32
    with pytest.raises(UtrError, match="engine I/O of type BF16 is not supported"):
        numpy_dtype(fake, "BF16")
