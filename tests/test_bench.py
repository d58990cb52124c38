"""Smoke test of the benchmark: it runs end to end on a tiny bundle and writes its reports. No timing is asserted."""

from __future__ import annotations

import json

from click.testing import CliRunner

from utr_runtime.engines import installed
from utrexport.benchmark import model_flops, peak_memory
from utrexport.cli import main


def test_bench_writes_json_markdown_and_plot(tiny_bundle, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", str(tiny_bundle(3, "pretraining")), "--shapes", "1x16,2x24", "--repeats", "1", "--e2e-sequences", "1",
            "--no-memory", "--no-tokenizer", "--out", str(out), "--plot"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    paths = {r["path"] for r in report["shapes"]}
    assert {"multimolecule (PyTorch cpu)", "utrexport module (PyTorch cpu)", "ONNX Runtime fp32 (cpu)"} <= paths
    if installed("openvino"):
        assert {"OpenVINO fp32 (cpu)"} <= paths
    assert {r["shape"] for r in report["shapes"]} == {"1x16", "2x24"}
    assert report["ceilings"]["fp32"]["gflops"] > 0 and all(r["gflops"] > 0 for r in report["shapes"])
    assert all(r["fraction_of_ceiling"] > 0 for r in report["shapes"] if r["dtype"] in report["ceilings"])
    assert report["machine"]["cpu"] and isinstance(report["machine"]["isa"], list)
    assert {r["data"] for r in report["end_to_end"]} == {"3'UTRs", "100-nt windows"}
    assert report["fill_mask"] and "speedup_vs_reference" in report["fill_mask"][0]
    assert "| 2x24 |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_peak_memory_is_measured_in_a_fresh_process(tiny_bundle):
    mib = peak_memory("onnxruntime:fp32", str(tiny_bundle(3, "base")), (1, 16), 1, "cpu")
    assert 20 < mib < 2000  # a fresh interpreter with NumPy and ONNX Runtime, not this test session's peak


def test_flop_count_matches_bert_base():
    config = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    per_token = model_flops(config, 1, 1) / 1e6
    assert 169 < per_token < 171  # the well-known ~170 MFLOP per token of BERT-base (attention excluded at L=1)


def test_bad_shapes_are_refused(tiny_bundle):
    result = CliRunner().invoke(main, ["bench", str(tiny_bundle(3, "base")), "--shapes", "8by128"])
    assert result.exit_code == 1 and "--shapes" in result.output


def test_bench_times_predict_on_a_task_bundle(task_bundle, tmp_path):
    args = ["bench", str(task_bundle(3, "sequence", "binary")), "--shapes", "1x16", "--repeats", "1", "--e2e-sequences", "0",
            "--no-memory", "--no-tokenizer", "--engine", "onnxruntime", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["predict"]
    assert [r["path"] for r in rows] == ["multimolecule forward (PyTorch)", "utr_runtime predict, ONNX Runtime fp32 (cpu)"]
    assert all(r["sequences_per_s"] > 0 for r in rows)


def test_bench_times_every_int8_file_per_engine(all_precisions, tmp_path):
    """--int8-variants: besides what `load` runs for int8 on each engine, every other int8 file that engine runs, in
    the same interleaved rounds as fp32 (the speedups are against its first path)."""
    out = tmp_path / "bench"
    args = ["bench", str(all_precisions), "--shapes", "1x24", "--repeats", "1", "--e2e-sequences", "0", "--no-torch",
            "--no-tokenizer", "--precision", "fp32,int8", "--int8-variants", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    paths = {r["path"] for r in json.loads((tmp_path / "bench.json").read_text())["shapes"]}
    expected = {"ONNX Runtime fp32 (cpu)", "ONNX Runtime int8 (cpu)", "ONNX Runtime int8 model.int8.onnx (cpu)",
                "ONNX Runtime int8 model.int8-fp16.onnx (cpu)"}
    if installed("openvino"):
        expected |= {"OpenVINO int8 (cpu)", "OpenVINO int8 model.int8.onnx (cpu)", "OpenVINO int8 model.int8-cpu.onnx (cpu)"}
    assert expected <= paths and not any("model.int8-openvino.xml" in p and "ONNX Runtime" in p for p in paths), paths
