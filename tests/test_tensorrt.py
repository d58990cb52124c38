"""TensorRT: the readiness check runs everywhere; building and running engines needs a GPU and TensorRT."""

from __future__ import annotations

import shutil
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import utr_runtime
from conftest import expected_rows, real_sequences
from utr_runtime.errors import BundleError, UtrError
from utr_runtime.parity import TOLERANCES
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
    assert any("attribute softcap is ignored by TensorRT's parser" in p for p in problems)
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
    """cudart answers error 35 both without a driver and with one older than its CUDA: cudaDriverGetVersion tells them apart."""
    from fake_tensorrt import FakeCuda
    from utr_runtime.engines import tensorrt as trt_runner

    monkeypatch.setattr(trt_runner, "_cudart", lambda: FakeCuda(driver=11080))
    with pytest.raises(UtrError, match=r"driver supports CUDA 11.8, older than the CUDA 12.9 of the installed cuda-python \(CUDA error 35\).*tensorrt-cu12"):
        trt_runner.cuda_device()
    monkeypatch.setattr(trt_runner, "_cudart", lambda: FakeCuda(driver=0))
    with pytest.raises(UtrError, match="no NVIDIA driver is installed"):
        trt_runner.cuda_device()
    fake = types.SimpleNamespace(cudaGetDeviceCount=lambda: (100, 0), cudaError_t=types.SimpleNamespace(cudaSuccess=0))  # cudaErrorNoDevice
    monkeypatch.setattr(trt_runner, "_cudart", lambda: fake)
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


def _fake_gpu(monkeypatch, version="10.14.1.48", memory_gb=141):
    """TensorRT `version` and cudart stood in for (tests/fake_tensorrt.py) wherever the builder and runner import them."""
    from fake_tensorrt import FakeCuda, fake_tensorrt
    from utr_runtime.engines import tensorrt as trt_runner
    from utrexport import tensorrt_build

    cuda = FakeCuda(memory_gb=memory_gb)
    trt = fake_tensorrt(cuda, version)
    monkeypatch.setattr(trt_runner, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_runner, "_cudart", lambda: cuda)
    return cuda


def test_runner_on_a_fake_engine_gives_onnx_runtimes_answers(tiny_bundle, task_bundle, monkeypatch, tmp_path):
    """The TensorRT runner end to end on tests/fake_tensorrt.py (TensorRT's and cudart's documented behaviour, an
    engine that computes with ONNX Runtime): profile choice, row slices past the profile's 64 rows, an empty
    mask_positions widened to the profile's one, shapes, bindings and copies; buffers reused and freed."""
    import json

    from utr_runtime.engines import tensorrt as trt_runner
    from utr_runtime.model import Model

    cuda = _fake_gpu(monkeypatch)
    trt = trt_runner.import_tensorrt()
    seqs = [s for _, s in sorted(real_sequences(), key=lambda r: len(r[1]))[::5]]
    for path in (tiny_bundle(3, "pretraining"), task_bundle(3, "sequence", "multiclass")):
        bundle = utr_runtime.Bundle(path)
        engine_file = tmp_path / f"{bundle.path.name}.plan"
        engine_file.write_text(json.dumps({"onnx": str(bundle.path / "model.fp32.onnx"), "profiles": profile_shapes(DEFAULT_PROFILES, bundle.input_names)}))
        runner = trt_runner.TensorRTRunner(engine_file)
        model, reference = Model(bundle, runner, "fp32", "tensorrt"), utr_runtime.load(bundle, engine="onnxruntime")
        got = model.embed(seqs, batch_size=200, max_batch_tokens=60000)  # batches of up to 200 rows: run in slices of 64
        np.testing.assert_allclose(got, reference.embed(seqs), rtol=0, atol=1e-5)
        if model.task:
            np.testing.assert_allclose(model.predict(seqs), reference.predict(seqs), rtol=0, atol=1e-5)
        else:
            text = seqs[0][:30] + "<mask>" + seqs[0][30:60]
            assert [a["token"] for a in model.fill_mask(text)] == [a["token"] for a in reference.fill_mask(text)]
        model.embed(seqs[:1])  # one short window: the short-length profile
        runs = runner.context.runs
        assert max(r["input_ids"][0] for r in runs) == 64 and {r["input_ids"][1] > 128 for r in runs} == {True, False}
        assert all(r.get("mask_positions", (0, 1))[1] >= 1 for r in runs)  # the profiles start at one position
        allocated, pinned = cuda.mallocs, dict(cuda.pinned)
        model.embed(seqs, batch_size=200, max_batch_tokens=60000)
        assert cuda.mallocs == allocated  # the same batches again: every device buffer reused, none allocated per run
        assert cuda.pinned.keys() == pinned.keys() and cuda.pageable_copies == 0  # host copies through reused pinned buffers
        assert runner.plan.strategies == [trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE]  # memory for the profile in use
        with pytest.raises(UtrError, match="TensorRT refused input input_ids of shape"):  # a shape the profile does not take
            runner._run_once({n: np.zeros((65, 8), np.int64) for n in runner.input_names}, 0)
        runner.close()
        assert not cuda.memory and not cuda.streams and not cuda.pinned


def _attention_graph(tmp_path, q_shape, q_type=onnx.TensorProto.FLOAT, mask=None, **attributes):
    """One Attention node on graph inputs Q = K = V of q_shape, with an optional (type, shape) mask."""
    h = onnx.helper
    inputs = [h.make_tensor_value_info("q", q_type, q_shape)]
    names = ["q", "q", "q"]
    if mask:
        inputs.append(h.make_tensor_value_info("mask", mask[0], mask[1]))
        names.append("mask")
    node = h.make_node("Attention", names, ["y"], name="attention", **attributes)
    graph = h.make_graph([node], "g", inputs, [h.make_tensor_value_info("y", q_type, None)])
    path = tmp_path / f"attention{len(list(tmp_path.iterdir()))}.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 23)]), path)
    return {f.problem for f in check_model(path)}


def test_readiness_follows_tensorrts_attention_importer(tmp_path):
    """What onnx-tensorrt's Attention importer accepts passes; what it refuses, or reads past, is named."""
    T = onnx.TensorProto
    assert _attention_graph(tmp_path, [1, 4, 8, 16], mask=(T.BOOL, [1, 8])) == set()  # masks of rank <= 4 are broadcast
    assert _attention_graph(tmp_path, [1, 8, 64], q_num_heads=4, kv_num_heads=4) == set()  # 3-D with head counts
    assert any("3-D with q_num_heads" in p for p in _attention_graph(tmp_path, [1, 8, 64]))
    assert any("INT8" in p for p in _attention_graph(tmp_path, [1, 4, 8, 16], q_type=T.INT8))  # IAttention: float Q/K/V only
    assert any("Q's type FP32, is FP16" in p for p in _attention_graph(tmp_path, [1, 4, 8, 16], mask=(T.FLOAT16, [1, 1, 8, 8])))
    assert any("is_causal together with attn_mask" in p for p in _attention_graph(tmp_path, [1, 4, 8, 16], mask=(T.BOOL, [8, 8]), is_causal=1))
    assert any("qk_matmul_output_mode is ignored" in p for p in _attention_graph(tmp_path, [1, 4, 8, 16], qk_matmul_output_mode=1))


@pytest.mark.parametrize("trans_b, axis, ready", [(1, 0, True), (1, 1, False), (0, 1, True), (0, 0, False)])
def test_per_channel_gemm_weights_follow_trans_b(tmp_path, trans_b, axis, ready):
    h, T = onnx.helper, onnx.TensorProto
    weight = np.ones((6, 4) if trans_b else (4, 6), np.int8)
    initializers = [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(np.full(weight.shape[axis], 0.1, np.float32), "s"),
                    onnx.numpy_helper.from_array(np.zeros(weight.shape[axis], np.int8), "z")]
    nodes = [h.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="dq", axis=axis),
             h.make_node("Gemm", ["x", "wf"], ["y"], name="gemm", transB=trans_b)]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 4])], [h.make_tensor_value_info("y", T.FLOAT, [2, 6])], initializers)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 23)]), tmp_path / "gemm.onnx")
    problems = [f.problem for f in check_model(tmp_path / "gemm.onnx")]
    assert (problems == []) == ready, problems


def test_engine_builds_and_runs_on_a_fake_tensorrt(tiny_bundle, tmp_path, monkeypatch):
    """`utrexport engine` end to end on the stand-in: parse, every attention marked decomposable (the stand-in, like a GPU
    without a fused kernel for these heads, fails the build otherwise), profiles, timing cache (one from another GPU
    replaced), the manifest's record; then verify and embed on the engine as on ONNX Runtime."""
    import json

    cuda = _fake_gpu(monkeypatch)
    bundle_dir = tmp_path / "b"
    shutil.copytree(tiny_bundle(3, "pretraining"), bundle_dir)
    result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "2 attention layers may fall back to unfused kernels" in result.output
    record = utr_runtime.Bundle(bundle_dir).engines["fp32"]
    assert (record["tensorrt"], record["gpu"], record["compute_capability"], record["decomposable_attention_layers"]) == ("10.14.1.48", "Fake GPU", "9.0", 2)
    assert json.loads((bundle_dir / record["file"]).read_text())["profiles"][1]["input_ids"] == [[1, 129], [8, 512], [64, 512]]
    cache = bundle_dir / "tensorrt.timing-cache"
    assert cache.read_bytes() == b"timing cache of TensorRT 10.14.1.48 on Fake GPU"

    cache.write_bytes(b"timing cache of another GPU")
    result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "fp32"])
    assert result.exit_code == 0 and "timing cache is from another GPU or TensorRT version: starting a new one" in result.output
    assert cache.read_bytes() == b"timing cache of TensorRT 10.14.1.48 on Fake GPU"

    rows = utr_runtime.verify(bundle_dir, ["fp32"], device="tensorrt")
    assert rows and all(r["passed"] for r in rows)
    seqs = [s for _, s in real_sequences()][:6]
    got = utr_runtime.load(bundle_dir, device="tensorrt").embed(seqs)
    np.testing.assert_allclose(got, utr_runtime.load(bundle_dir, engine="onnxruntime").embed(seqs), rtol=0, atol=1e-5)
    assert not cuda.streams and not cuda.memory  # the models above are gone: their runners freed stream and buffers


def test_engine_build_fails_without_decomposable_attention(tiny_bundle, tmp_path, monkeypatch):
    """The stand-in's failure is the one the builder's marking prevents: without it, no engine and nothing recorded."""
    from utrexport import tensorrt_build

    _fake_gpu(monkeypatch)
    monkeypatch.setattr(tensorrt_build, "allow_decomposed_attention", lambda trt, network, log: 0)
    bundle_dir = tmp_path / "b"
    shutil.copytree(tiny_bundle(3, "pretraining"), bundle_dir)
    result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "fp32"])
    assert result.exit_code == 1 and "TensorRT failed to build the fp32 engine" in result.output
    assert "engines" not in utr_runtime.Bundle(bundle_dir).manifest and not (bundle_dir / "engine.fp32.plan").exists()


def test_older_tensorrt_takes_the_plain_attention_export(tiny_bundle, tmp_path, monkeypatch):
    """TensorRT 10.3 (Jetson's) has no Attention importer: a fused bundle is refused before parsing, with the fix; the
    plain export builds, runs and verifies."""
    _fake_gpu(monkeypatch, version="10.3.0")
    for attention in ("fused", "plain"):
        bundle_dir = tmp_path / attention
        shutil.copytree(tiny_bundle(3, "pretraining", attention), bundle_dir)
        result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "fp32"])
        manifest = utr_runtime.Bundle(bundle_dir).manifest
        if attention == "fused":
            assert result.exit_code == 1, result.output
            assert "needs TensorRT 10.14 or newer, this is 10.3.0: its attention is ONNX Attention nodes; rebuild the bundle with: " \
                   "utrexport build --attention plain" in result.output
            assert manifest["models"]["fp32"]["tensorrt_min"] == "10.14"
        else:
            assert result.exit_code == 0, result.output
            assert manifest["models"]["fp32"]["tensorrt_min"] == "10.0"
            assert manifest["models"]["fp32"]["opset"] == 20  # the opsets TensorRT 10.0's parser states: 9-20
            assert manifest["engines"]["fp32"]["decomposable_attention_layers"] == 0
            assert all(r["passed"] for r in utr_runtime.verify(bundle_dir, ["fp32"], device="tensorrt"))


class _PybindMethod:
    """Callable as a pybind11 method is: no signature to inspect, its signatures in the docstring."""

    def __init__(self, doc):
        self.__doc__ = doc

    def __call__(self, *args):
        pass

    @property
    def __signature__(self):
        raise ValueError("no signature found for builtin")


def test_api_check_names_every_drift():
    """tests/tensorrt_api/check.py (`make tensorrt-api`, against the real bindings) on a pybind11-like copy of the
    stand-in: the copy passes; a renamed parameter, a missing method and a method that is a property fail."""
    import inspect

    from fake_tensorrt import IExecutionContext
    from tensorrt_api.check import compare_class, parameter_lists

    def copy(**changes):
        members = {}
        for name, member in vars(IExecutionContext).items():
            if not name.startswith("_"):
                params = ", ".join(f"{p}: int" for p in list(inspect.signature(member).parameters)[1:])
                members[name] = _PybindMethod(f"{name}(self: tensorrt.IExecutionContext, {params}) -> bool")
        members.update(changes)
        return type("IExecutionContext", (), {k: v for k, v in members.items() if v is not None})

    assert compare_class("IExecutionContext", IExecutionContext, copy()) == []
    overloaded = _PybindMethod("set_input_shape(*args, **kwargs)\nOverloaded function.\n\n1. set_input_shape(self: X, name: str, shape: tuple) -> bool\n\n"
                               "2. set_input_shape(self: X, name: str, shape: tensorrt.Dims) -> bool")
    assert compare_class("IExecutionContext", IExecutionContext, copy(set_input_shape=overloaded)) == []
    drifted = copy(set_tensor_address=_PybindMethod("set_tensor_address(self: X, name: str, pointer: int) -> bool"),
                   get_tensor_shape=None, execute_async_v3=property(lambda self: True))
    assert compare_class("IExecutionContext", IExecutionContext, drifted) == [
        "IExecutionContext.execute_async_v3 is not a method in the real API",
        "IExecutionContext.get_tensor_shape does not exist",
        "IExecutionContext.set_tensor_address(name, memory): the real parameters are (name, pointer)",
    ]
    assert parameter_lists(_PybindMethod("cudaMemcpyAsync(dst, src, size_t count, kind: cudaMemcpyKind, stream)"), "cudaMemcpyAsync") == \
        [["dst", "src", "count", "kind", "stream"]]


def test_attention_that_cannot_be_marked_is_reported(tiny_bundle):
    """Should a TensorRT refuse the cast to IAttentionInputLayer, the build goes on with a warning naming the fix."""
    from fake_tensorrt import FakeCuda, fake_tensorrt
    from utrexport.tensorrt_build import allow_decomposed_attention

    trt = fake_tensorrt(FakeCuda())
    network = trt.Builder(None).create_network()
    assert trt.OnnxParser(network, None).parse_from_file(str(utr_runtime.Bundle(tiny_bundle(3, "pretraining")).model_file("fp32")))
    logged = []
    assert allow_decomposed_attention(trt, network, logged.append) == 2 and logged[-1].startswith("2 attention layers")
    trt.IAttentionInputLayer = type("IAttentionInputLayer", (int,), {})  # a layout the layer cannot be recast to
    logged.clear()
    assert allow_decomposed_attention(trt, network, logged.append) == 0
    assert len(logged) == 2 and all("could not mark attention" in m and "--attention plain" in m for m in logged)


def test_engine_without_onnx_says_what_to_install(all_precisions, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    result = CliRunner().invoke(main, ["engine", str(all_precisions), "--precision", "fp16"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "utrexport engine needs the onnx package: pip install 'utrexport[tensorrt]'" in result.output


def _engine(monkeypatch, tmp_path, bundle, *args, **fake):
    """`utrexport engine` on a copy of `bundle`, on the stand-in; returns (cuda, bundle folder, result)."""
    cuda = _fake_gpu(monkeypatch, **fake)
    bundle_dir = tmp_path / "b"
    shutil.copytree(bundle, bundle_dir)
    return cuda, bundle_dir, CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "fp32", *args])


def test_tf32_is_off_unless_asked_for_and_judged_by_its_own_gate(tiny_bundle, monkeypatch, tmp_path):
    """TensorRT turns TF32 on by default for fp32 layers (Ampere and later): an fp32 engine would miss fp32's 1e-4 gate.
    The builder clears it; --tf32 sets it, the manifest records it and verify judges that engine with the tf32 gate."""
    import json

    _, bundle_dir, result = _engine(monkeypatch, tmp_path, tiny_bundle(3, "pretraining"))
    assert result.exit_code == 0, result.output
    record = utr_runtime.Bundle(bundle_dir).engines["fp32"]
    assert record["tf32"] is False and json.loads((bundle_dir / record["file"]).read_text())["tf32"] is False
    assert {r["precision"] for r in utr_runtime.verify(bundle_dir, ["fp32"], device="tensorrt")} == {"fp32/tensorrt"}
    result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "fp32", "--tf32"])
    record = utr_runtime.Bundle(bundle_dir).engines["fp32"]
    assert result.exit_code == 0 and record["tf32"] is True and json.loads((bundle_dir / record["file"]).read_text())["tf32"] is True
    rows = utr_runtime.verify(bundle_dir, ["fp32"], device="tensorrt")
    assert {r["precision"] for r in rows} == {"fp32/tensorrt-tf32"} and all(r["tolerance"] == TOLERANCES["tf32"][r["output"]].describe() for r in rows)


def test_small_gpus_get_smaller_profiles_and_each_profiles_memory_is_said(tiny_bundle, monkeypatch, tmp_path):
    import json

    _, bundle_dir, result = _engine(monkeypatch, tmp_path, tiny_bundle(3, "pretraining"), memory_gb=8)
    assert result.exit_code == 0, result.output
    record = utr_runtime.Bundle(bundle_dir).engines["fp32"]
    assert json.loads((bundle_dir / record["file"]).read_text())["profiles"][1]["input_ids"] == [[1, 129], [2, 512], [16, 512]]
    assert record["profile_memory_bytes"] == [16 * 12 * 128 * 128 * 4, 16 * 12 * 512 * 512 * 4]  # the stand-in's sizes
    assert "profile 1-16 rows x 129-512 tokens: 0.19 GB of device memory per execution context" in result.output


def test_an_unreadable_timing_cache_only_costs_a_fresh_one(tiny_bundle, monkeypatch, tmp_path):
    """create_timing_cache itself may refuse another version's cache (before set_timing_cache's mismatch check)."""
    _fake_gpu(monkeypatch)
    bundle_dir = tmp_path / "b"
    shutil.copytree(tiny_bundle(3, "pretraining"), bundle_dir)
    (bundle_dir / "tensorrt.timing-cache").write_bytes(b"unreadable: TensorRT 9")
    result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "fp32"])
    assert result.exit_code == 0 and "timing cache is from another GPU or TensorRT version: starting a new one" in result.output
    assert (bundle_dir / "tensorrt.timing-cache").read_bytes() == b"timing cache of TensorRT 10.14.1.48 on Fake GPU"


def test_a_refused_profile_is_said_and_more_masks_than_the_engine_takes_name_the_fix(tiny_bundle, monkeypatch, tmp_path):
    _, bundle_dir, result = _engine(monkeypatch, tmp_path, tiny_bundle(3, "pretraining"), "--mask-positions", "4")
    assert result.exit_code == 0 and utr_runtime.Bundle(bundle_dir).engines["fp32"]["mask_positions"] == 4
    model = utr_runtime.load(bundle_dir, device="tensorrt")
    text = "ACGUAGCUAGCUAGGCAUCCAGUUAGCAUCG"
    assert len(model.fill_mask(text[:6] + "<mask>" + text[6:12] + "<mask>" + text[12:])) == 2
    with pytest.raises(UtrError, match="takes at most 4 masked positions per row, got 5: rebuild it with utrexport engine --mask-positions 5"):
        model.fill_mask("".join(f"{text[i:i + 5]}<mask>" for i in range(0, 25, 5)))
    model.runner.plan.refused_profiles.add(1)  # TensorRT says no (False, not an exception): said, and not recorded as set
    with pytest.raises(UtrError, match="TensorRT refused optimization profile 1 of this engine"):
        model.embed("ACGU" * 100)
    assert model.runner.profile is None
    model.runner.plan.refused_profiles.clear()
    assert model.embed("ACGU" * 100).shape == (32,)


def test_the_int8_engine_builds_from_the_model_with_fp16_float_parts(all_precisions, monkeypatch, tmp_path):
    """model.int8.onnx dequantizes to fp32: a strongly typed network would run LayerNorm, GELU, the residual adds and
    attention in fp32. The int8 engine builds from model.int8-fp16.onnx (Q/DQ around fp16 tensors), which every build
    checks like int8 (verify rows int8/tensorrt on each CPU engine) and judges TensorRT-ready."""
    import json

    import onnx

    bundle = utr_runtime.Bundle(all_precisions)
    variant = bundle.manifest["models"]["int8"]["variants"]["tensorrt"]
    assert variant["file"] == "model.int8-fp16.onnx" and variant["tensorrt_ready"] is True
    graph = onnx.load(bundle.path / variant["file"]).graph
    types = {onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type) for t in graph.value_info} | \
        {onnx.TensorProto.DataType.Name(i.data_type) for i in graph.initializer}
    assert "FLOAT16" in types and "INT8" in types
    assert [i.type.tensor_type.elem_type for i in graph.output] == [onnx.TensorProto.FLOAT] * len(graph.output)  # io types kept
    rows = [r for r in bundle.manifest["parity"] if r["precision"] == "int8/tensorrt"]
    assert rows and all(r["passed"] for r in rows)
    _, bundle_dir, result = _engine(monkeypatch, tmp_path, all_precisions)
    result = CliRunner().invoke(main, ["engine", str(bundle_dir), "--precision", "int8"])
    record = utr_runtime.Bundle(bundle_dir).engines["int8"]
    assert result.exit_code == 0 and record["onnx"] == "model.int8-fp16.onnx", result.output
    assert json.loads((bundle_dir / record["file"]).read_text())["onnx"].endswith("model.int8-fp16.onnx")
    assert all(r["passed"] for r in utr_runtime.verify(bundle_dir, ["int8"], device="tensorrt"))
