"""ONNX Runtime runner (CPU, or CUDA where onnxruntime-gpu is installed)."""

from __future__ import annotations

import numpy as np

from ..errors import UtrError, engine_failed

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OnnxRuntimeRunner:
    engine = "onnxruntime"

    def __init__(self, model: bytes | str, device: str = "cpu", threads: int | None = None, name: str = "the model"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UtrError("ONNX Runtime is not installed: pip install 'utrexport[onnxruntime]' (or [gpu] for CUDA)") from None
        available = ort.get_available_providers()
        if PROVIDERS[device][0] not in available:
            raise UtrError(f"ONNX Runtime here has no {PROVIDERS[device][0]} (available: {', '.join(available)}); install onnxruntime-gpu for device='cuda'")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(model, options, providers=PROVIDERS[device])
        except Exception as e:
            raise UtrError(f"{name}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})") from None
        self.device, self.name = device, name
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_shapes = {o.name: tuple(d if isinstance(d, int) else None for d in o.shape) for o in self.session.get_outputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: feeds[name] for name in self.input_names}
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as e:  # noqa: BLE001 -- ONNX Runtime's errors have no common base but Exception
            raise engine_failed(self.name, "ONNX Runtime", e) from None
        return dict(zip(self.output_names, outputs))
