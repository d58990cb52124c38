"""Engine runners: one file per engine, one small interface.

A runner is made from a model file and has `engine`, `input_names`, `output_names` and
`run(feeds) -> {name: array}`. The engine's package is imported only when its runner is made.

On the CPU, `engine="auto"` takes OpenVINO where it is installed and ONNX Runtime otherwise: OpenVINO was faster
for every precision on the x86 CPU measured (docs/benchmarks.md). CUDA runs ONNX Runtime; TensorRT engines are
opened by `utr_runtime.load(..., device="tensorrt")`.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import UtrError

DEVICES = ("cpu", "cuda", "tensorrt")
ENGINES = ("auto", "onnxruntime", "openvino")


def installed(engine: str) -> bool:
    return importlib.util.find_spec(engine) is not None


def choose_engine(engine: str, device: str = "cpu", precision: str = "fp32") -> str:
    """The engine `engine` names, or for "auto" the fastest one installed for this device and precision."""
    if engine not in ENGINES:
        raise UtrError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if device == "cpu" and (precision == "bf16" or installed("openvino")):
        return "openvino"
    return "onnxruntime"


def inference_precision(precision: str, engine: str) -> str:
    """The precision of the float parts a bundle precision runs in on an engine: "bf16" for bf16 (the fp32 model in
    bf16), and for int8 on OpenVINO where the CPU has native bf16 (its LayerNorm, GELU, softmax and residuals: faster at
    the same accuracy, docs/int8.md); "f32" otherwise."""
    if precision == "bf16":
        return "bf16"  # on any engine: open_runner says where bf16 runs
    if precision != "int8" or engine != "openvino":
        return "f32"
    from .openvino import bf16_supported

    return "bf16" if bf16_supported() else "f32"


def open_bundle_model(bundle, name: str, precision: str, device: str = "cpu", threads: int | None = None,
                      engine: str = "onnxruntime", label: str | None = None):
    """A runner for one of a bundle's model files as `load` runs `precision` on `engine`: its checked bytes, its float
    parts (inference_precision). label: what errors call it (default: the file's name)."""
    return open_runner(bundle.read_model(name), device, threads, engine, inference_precision(precision, engine), name=label or name)


def open_runner(model, device: str = "cpu", threads: int | None = None, engine: str = "onnxruntime",
                inference_precision: str = "f32", name: str | None = None):
    """A runner for a model: an ONNX model's bytes as Bundle.read_model checked them, or a file, on ONNX Runtime ("cpu"
    or "cuda") or OpenVINO ("cpu"); or an OpenVINO IR (Bundle.read_model's OpenVinoIr, or an .xml file) on OpenVINO.
    name: what errors call the model (default: the file).
    inference_precision: "f32", or "bf16" (OpenVINO on a CPU with native bf16: the model's float parts in bf16).
    """
    from ..bundle import OpenVinoIr

    name = name or ("the model" if isinstance(model, (bytes, OpenVinoIr)) else os.fspath(model))
    model = model if isinstance(model, (bytes, OpenVinoIr)) else os.fspath(model)
    if device == "tensorrt":
        raise UtrError("device='tensorrt' runs a TensorRT engine file, not ONNX: use utr_runtime.load(bundle, device='tensorrt')")
    if device not in DEVICES:
        raise UtrError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    engine = choose_engine(engine, device)
    if engine == "openvino":
        from .openvino import OpenVinoRunner

        return OpenVinoRunner(model, device=device, threads=threads, inference_precision=inference_precision, name=name)
    if isinstance(model, OpenVinoIr) or (isinstance(model, str) and model.endswith(".xml")):
        raise UtrError(f"{name} is an OpenVINO model: it runs with engine='openvino'")
    if inference_precision != "f32":
        raise UtrError(f"{inference_precision} inference runs on OpenVINO only: pip install 'utrexport[openvino]' and use engine='openvino'")
    from .onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, device=device, threads=threads, name=name)
