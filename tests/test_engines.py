"""CPU engines: ONNX Runtime and OpenVINO run every bundle file with the same answers; bf16 where the CPU has it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner

import utr_runtime
from conftest import real_sequences
from utr_runtime.engines import choose_engine, installed, open_runner
from utr_runtime.errors import UtrError
from utr_runtime.parity import cosine
from utrexport.cli import main

openvino = pytest.mark.skipif(not installed("openvino"), reason="OpenVINO is not installed (pip install 'utrexport[openvino]')")


def bf16_here() -> bool:
    from utr_runtime.engines.openvino import bf16_supported

    return bf16_supported()


def test_auto_engine_prefers_openvino_on_the_cpu(monkeypatch):
    assert choose_engine("onnxruntime", "cpu") == "onnxruntime" and choose_engine("openvino", "cpu") == "openvino"
    assert choose_engine("auto", "cuda") == "onnxruntime"
    assert choose_engine("auto", "cpu", "bf16") == "openvino", "bf16 exists on OpenVINO only"
    monkeypatch.setattr("utr_runtime.engines.installed", lambda engine: False)
    assert choose_engine("auto", "cpu") == "onnxruntime"
    with pytest.raises(UtrError, match="unknown engine 'tvm'"):
        choose_engine("tvm")


@openvino
@pytest.mark.parametrize("precision, file", [("fp32", "model.fp32.onnx"), ("fp16", "model.fp16.onnx"), ("int8", "model.int8-openvino.xml")])
def test_each_engine_runs_the_file_meant_for_it(all_precisions, precision, file):
    """int8 is NNCF's model on OpenVINO (kept: closer to fp32 here) and the u8s8 file on ONNX Runtime's CPU."""
    bundle = utr_runtime.Bundle(all_precisions)
    seqs = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][:6] + [max((s for _, s in real_sequences()), key=len)[:1500]]
    on_ort = utr_runtime.load(bundle, precision=precision, engine="onnxruntime")
    on_ov = utr_runtime.load(bundle, precision=precision)
    assert on_ov.engine == "openvino" and on_ort.engine == "onnxruntime" and "engine='openvino'" in repr(on_ov)
    assert bundle.model_file(precision, "cpu", "openvino").name == file
    expected_ort = "model.int8-cpu.onnx" if precision == "int8" else file
    assert bundle.model_file(precision, "cpu", "onnxruntime").name == expected_ort
    a, b = on_ort.embed(seqs), on_ov.embed(seqs)
    bound = {"fp32": 1 - 1e-9, "fp16": 0.9999, "int8": 0.99}[precision]  # the engines' own rounding, within the precision's gate
    assert cosine(a.astype(np.float64), b.astype(np.float64)).min() >= bound
    if precision == "fp32":
        np.testing.assert_allclose(a, b, atol=1e-4)


@openvino
def test_verify_covers_every_engine_with_one_comparator(all_precisions):
    rows = utr_runtime.verify(all_precisions)
    assert {r["engine"] for r in rows} == {"onnxruntime", "openvino"}
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    assert ("bf16", "openvino") in {(r["precision"], r["engine"]) for r in rows} or not bf16_here()
    only = utr_runtime.verify(all_precisions, ["fp32"], engines=["openvino"])
    assert {(r["precision"], r["engine"]) for r in only} == {("fp32", "openvino")}


@openvino
def test_bf16_runs_where_the_cpu_has_it_and_is_refused_elsewhere(all_precisions, monkeypatch):
    seqs = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")][:4]
    if bf16_here():
        model = utr_runtime.load(all_precisions, precision="bf16")
        assert model.engine == "openvino" and model.runner.inference_precision == "bf16"
        reference = utr_runtime.load(all_precisions, engine="onnxruntime").embed(seqs)
        assert cosine(reference.astype(np.float64), model.embed(seqs).astype(np.float64)).min() >= 0.9999
    with pytest.raises(UtrError, match="bf16 inference runs on OpenVINO only"):
        utr_runtime.load(all_precisions, precision="bf16", engine="onnxruntime")
    with pytest.raises(UtrError, match="bf16 is a CPU precision here .* on device 'cuda' use fp16"):
        utr_runtime.load(all_precisions, precision="bf16", device="cuda")
    monkeypatch.setattr("utr_runtime.engines.openvino.bf16_supported", lambda: False)
    with pytest.raises(UtrError, match=r"bf16 needs a CPU with native bf16 \(AVX512-BF16 or AMX\); this one has neither"):
        utr_runtime.load(all_precisions, precision="bf16")
    assert "bf16" not in {r["precision"] for r in utr_runtime.verify(all_precisions, engines=["openvino"])}
    result = CliRunner().invoke(main, ["embed", str(all_precisions), "-", "-o", "x.npy", "--precision", "bf16"], input=">a\nACGUAGCUAG\n")
    assert result.exit_code == 1 and "bf16 needs a CPU with native bf16" in result.output and "Traceback" not in result.output


def test_a_missing_engine_is_named_with_its_extra(all_precisions, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(UtrError, match=r"OpenVINO is not installed: pip install 'utrexport\[openvino\]'"):
        open_runner(utr_runtime.Bundle(all_precisions).model_file("fp32"), engine="openvino")


@openvino
def test_cli_commands_take_an_engine(all_precisions, tmp_path):
    bundle = str(all_precisions)
    (tmp_path / "in.fa").write_text(">a\nACGUAGCUAGGCAUUAGCAGG\n>b\nGGCAUCGAUUAGCCAUAGGA\n")
    vectors = {}
    for engine in ("onnxruntime", "openvino"):
        out = tmp_path / f"{engine}.npy"
        result = CliRunner().invoke(main, ["embed", bundle, str(tmp_path / "in.fa"), "-o", str(out), "--engine", engine])
        assert result.exit_code == 0, result.output
        vectors[engine] = np.load(out)
    np.testing.assert_allclose(vectors["onnxruntime"], vectors["openvino"], atol=1e-4)
    result = CliRunner().invoke(main, ["fill-mask", bundle, "ACGUAGC<mask>GCAUUAGCAGG", "--engine", "openvino", "--precision", "int8"])
    assert result.exit_code == 0 and "mask 1:" in result.output, result.output
    result = CliRunner().invoke(main, ["verify", bundle, "--engine", "openvino", "--precision", "fp32,int8"])
    assert result.exit_code == 0 and "openvino" in result.output and "onnxruntime" not in result.output, result.output
    result = CliRunner().invoke(main, ["embed", bundle, str(tmp_path / "in.fa"), "-o", str(tmp_path / "x.npy"), "--precision", "int4"])
    assert result.exit_code == 2 and "'int4' is not one of 'fp32', 'fp16', 'int8', 'bf16'" in result.output
    result = CliRunner().invoke(main, ["verify", bundle, "--precision", "fp32,int4"])
    assert result.exit_code == 2 and "int4: choose from fp32, fp16, int8, bf16" in result.output


@pytest.mark.parametrize("engine", ["onnxruntime", pytest.param("openvino", marks=openvino)])
def test_a_loaded_model_is_safe_to_share_between_threads(all_precisions, engine):
    """Threads sharing one model get the answers of one thread (one shared OpenVINO infer request gave about 1 in 4
    wrong and IndexErrors): 8 threads, batches of different shapes, each answer checked."""
    import concurrent.futures

    model = utr_runtime.load(all_precisions, engine=engine, threads=1)
    seqs = [s for _, s in real_sequences()]
    batches = [seqs[i : i + 1 + i % 3] for i in range(0, 48, 2)]
    batches = [[s[: 60 + 40 * (i % 5)] for s in batch] for i, batch in enumerate(batches)]  # lengths differ from call to call
    alone = [model.embed(b) for b in batches]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        shared = list(pool.map(model.embed, batches * 3))
    for got, want in zip(shared, alone * 3):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
