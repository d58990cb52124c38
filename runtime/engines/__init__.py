"""Engine runners: one file per engine, one small interface.

A runner is made from a model file and has `input_names`, `output_names` and `run(feeds) -> {name: array}`.
The engine's package is imported only when its runner is made.
"""

from __future__ import annotations

import os

from ..errors import UtrError

DEVICES = ("cpu", "cuda", "tensorrt")


def open_runner(model_file: str | os.PathLike, device: str = "cpu", threads: int | None = None):
    """A runner for an ONNX model: ONNX Runtime on "cpu" or "cuda"; native TensorRT engines use `device="tensorrt"`."""
    if device in ("cpu", "cuda"):
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model_file, device=device, threads=threads)
    if device == "tensorrt":
        raise UtrError("device='tensorrt' runs a TensorRT engine file, not ONNX: use utr_runtime.load(bundle, device='tensorrt')")
    raise UtrError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
