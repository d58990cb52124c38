"""Native TensorRT runner: a bundle's engine file, run with execute_async_v3 on device buffers from cuda-python.

No torch. An engine only runs on the GPU model and TensorRT version that built it; both are in the manifest
and checked before deserializing, with the command that rebuilds it.
"""

from __future__ import annotations

import numpy as np

from ..errors import BundleError, UtrError


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UtrError("TensorRT is not installed: pip install 'utrexport[tensorrt]' (needs an NVIDIA GPU)") from None
    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise UtrError("cuda-python is not installed: pip install 'utrexport[tensorrt]'") from None
    return cudart


def _call(result):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    cudart = _cudart()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise UtrError(f"CUDA error: {cudart.cudaGetErrorString(error)[1]}")
    return values[0] if len(values) == 1 else values


def cuda_device(index: int = 0) -> dict:
    """Name and compute capability of a GPU, or a clear error where there is none."""
    cudart = _cudart()
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count == 0:
        raise UtrError("no CUDA GPU is visible; TensorRT engines need one")
    props = _call(cudart.cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def open_engine_runner(bundle, precision: str) -> "TensorRTRunner":
    record = bundle.engines.get(precision)
    rebuild = f"utrexport engine {bundle.path} --precision {precision}"
    if record is None:
        raise BundleError(f"{bundle.path}: no TensorRT {precision} engine; build one on this machine with: {rebuild}")
    trt = import_tensorrt()
    device = cuda_device()
    if record["tensorrt"] != trt.__version__ or record["compute_capability"] != device["compute_capability"]:
        raise BundleError(
            f"{bundle.path}: the {precision} engine was built for {record['gpu']} (compute capability {record['compute_capability']}) "
            f"with TensorRT {record['tensorrt']}; this is {device['name']} ({device['compute_capability']}) with TensorRT {trt.__version__}. "
            f"Engines are not portable: rebuild it here with: {rebuild}"
        )
    return TensorRTRunner(bundle.file(record["file"]))


class TensorRTRunner:
    engine = "tensorrt"

    def __init__(self, engine_file):
        trt = import_tensorrt()
        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise UtrError(f"{engine_file}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = _call(self.cudart.cudaStreamCreate())
        self.profile = None

    def _pick_profile(self, feeds: dict[str, np.ndarray]) -> int:
        for p in range(self.engine.num_optimization_profiles):
            fits = True
            for name in self.input_names:
                low, _, high = self.engine.get_tensor_profile_shape(name, p)
                shape = feeds[name].shape
                fits &= all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))
            if fits:
                return p
        shapes = {n: feeds[n].shape for n in self.input_names}
        raise UtrError(f"no optimization profile of this engine fits {shapes}; rebuild it with a --profile that covers them")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self.trt, self.cudart
        profile = self._pick_profile(feeds)
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream)
            self.profile = profile
        buffers, outputs = [], {}
        try:
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, host.shape)
                device = _call(cudart.cudaMallocAsync(host.nbytes, self.stream))
                buffers.append(device)
                _call(cudart.cudaMemcpyAsync(device, host.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                self.context.set_tensor_address(name, device)
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                device = _call(cudart.cudaMallocAsync(max(host.nbytes, 1), self.stream))
                buffers.append(device)
                self.context.set_tensor_address(name, device)
                outputs[name] = (host, device)
            if not self.context.execute_async_v3(self.stream):
                raise UtrError("TensorRT execution failed")
            for host, device in outputs.values():
                _call(cudart.cudaMemcpyAsync(host.ctypes.data, device, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _call(cudart.cudaStreamSynchronize(self.stream))
        finally:
            for device in buffers:
                cudart.cudaFreeAsync(device, self.stream)
        return {name: host.astype(np.float32, copy=False) for name, (host, _) in outputs.items()}
