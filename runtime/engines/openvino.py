"""OpenVINO runner (CPU): reads the bundle's ONNX files as they are, opset 23 Attention included.

Inference precision is explicit, because OpenVINO's CPU plugin otherwise runs float models in bf16 wherever the
CPU has native bf16: "f32" for the fp32 and fp16 files, "bf16" for precision="bf16" (the fp32 file, bf16 inside) and
for int8's float parts on such CPUs (engines.inference_precision).
Models: ONNX (bytes or a file), or OpenVINO IR (the bundle's NNCF int8: XML and weights as checked bytes, or an .xml file).
The model is compiled once per runner (about 1-2 s for a full-size model). OpenVINO can cache compiled blobs, but a
full-size int8 blob is about 140 MB and saves about 0.7 s per load, so no cache is written.
A runner may be shared between threads: each concurrent run has an infer request of its own.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np

from ..errors import UtrError, engine_failed

INFERENCE_PRECISIONS = {"f32": "f32", "bf16": "bf16"}


@functools.cache
def bf16_supported() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), as OpenVINO reports it."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _core():
    try:
        import openvino
    except ImportError:
        raise UtrError("OpenVINO is not installed: pip install 'utrexport[openvino]'") from None
    return openvino.Core()


def _read(core, model):
    from ..bundle import OpenVinoIr

    if isinstance(model, OpenVinoIr):  # from memory: the weights are the checked bytes, and no path is opened
        import openvino

        return core.read_model(model.xml, openvino.Tensor(np.frombuffer(model.weights, np.uint8)))
    return core.read_model(model)


class OpenVinoRunner:
    engine = "openvino"

    def __init__(self, model, device: str = "cpu", threads: int | None = None, inference_precision: str = "f32",
                 name: str = "the model"):
        if device != "cpu":
            raise UtrError(f"the OpenVINO runner runs on device='cpu', not {device!r}")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise UtrError(f"unknown OpenVINO inference precision {inference_precision!r}")
        core = _core()
        if inference_precision == "bf16" and not bf16_supported():
            raise UtrError("bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this one has neither: use fp32 or int8")
        try:
            model = _read(core, model)
            # Names from the model as read: compiling may rename outputs whose producers it fuses.
            self.input_names = [port.get_any_name() for port in model.inputs]
            self.output_names = [port.get_any_name() for port in model.outputs]
            self.output_shapes = {port.get_any_name(): tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
                                  for port in model.outputs}
            config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[inference_precision]}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
                if threads < (os.cpu_count() or 1):
                    # A share of the machine (one of several workers): OpenVINO pins each process's threads to the same
                    # first cores, so two 1-thread processes ran on one core at half speed (docs/scaling.md). Unpinned,
                    # the OS spreads them.
                    config["ENABLE_CPU_PINNING"] = False
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise UtrError(f"{name}: OpenVINO cannot load it ({str(e).strip().splitlines()[0][:300]})") from None
        # One infer request runs one inference at a time, and shared between threads it gave wrong answers: each
        # run takes an idle request from this pool (made when none is idle, so as many as threads run at once).
        self.idle = [self.compiled.create_infer_request()]
        self.lock = threading.Lock()
        self.device, self.name = device, name
        self.inference_precision = inference_precision

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            request = self.idle.pop() if self.idle else self.compiled.create_infer_request()
        try:
            feeds = {name: feeds[name] for name in self.input_names}
            try:
                results = request.infer(feeds)
            except Exception as e:  # noqa: BLE001 -- OpenVINO raises RuntimeError and others
                raise engine_failed(self.name, "OpenVINO", e) from None
            # Copies: the request's output memory is reused by its next inference.
            return {name: np.array(results[port]) for name, port in zip(self.output_names, self.compiled.outputs)}
        finally:
            with self.lock:
                self.idle.append(request)
