"""A stand-in for TensorRT's and cuda-python's Python APIs, as far as the runtime's runner uses them, that follows
their documented behaviour (TensorRT 10.14+ / 11, cuda-python 12.6+): `(error, value)` tuples from cudart, bool
returns from set_input_shape and execute_async_v3, profile shapes as (min, opt, max), device memory addressed by
integers. Its "engine" runs a bundle's ONNX model in ONNX Runtime, so the runner's profile selection, row slicing,
shapes, buffer binding and copies are checked end to end against ONNX Runtime's own answers, without a GPU.

The engine file it deserializes is JSON: {"onnx": path, "profiles": [[[min], [opt], [max]] per input name ...]}.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np

SUCCESS = 0


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeCuda:
    """cudart: device memory as bytearrays keyed by fake device pointers."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=SUCCESS)
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.memory: dict[int, bytearray] = {}
        self.next, self.mallocs, self.streams = 1 << 20, 0, set()

    def cudaStreamCreate(self):
        self.streams.add(7)
        return SUCCESS, 7

    def cudaStreamDestroy(self, stream):
        self.streams.discard(stream)
        return (SUCCESS,)

    def cudaStreamSynchronize(self, stream):
        return (SUCCESS,)

    def cudaMalloc(self, size):
        self.next += 1 << 30
        self.memory[self.next] = bytearray(size)
        self.mallocs += 1
        return SUCCESS, self.next

    def cudaFree(self, pointer):
        del self.memory[pointer]
        return (SUCCESS,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            assert nbytes <= len(self.memory[dst])
            self.memory[dst][:nbytes] = ctypes.string_at(src, nbytes)
        else:
            assert nbytes <= len(self.memory[src])
            ctypes.memmove(dst, bytes(self.memory[src][:nbytes]), nbytes)
        return (SUCCESS,)

    def cudaGetErrorString(self, error):
        return SUCCESS, b"fake error"


class FakeEngine:
    def __init__(self, onnx_path: str, profiles: list[dict], cuda: FakeCuda):
        import onnxruntime as ort

        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.profiles, self.cuda = profiles, cuda

    num_io_tensors = property(lambda self: len(self.inputs) + len(self.outputs))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return "INT64" if name in self.inputs else "FLOAT"

    def get_tensor_profile_shape(self, name, profile):
        return [tuple(s) for s in self.profiles[profile][name]]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.profile, self.shapes, self.addresses, self.runs = engine, 0, {}, {}, []
        self.results = None

    def set_optimization_profile_async(self, profile, stream):
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        if not all(a <= n <= b for a, n, b in zip(lo, shape, hi)):
            return False
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def _inputs(self):
        memory = self.engine.cuda.memory
        return {n: np.frombuffer(memory[self.addresses[n]], np.int64, count=int(np.prod(self.shapes[n]))).reshape(self.shapes[n])
                for n in self.engine.inputs}

    def get_tensor_shape(self, name):
        if self.results is None:  # TensorRT infers output shapes from the input shapes; here ONNX Runtime does
            session = self.engine.session
            self.results = dict(zip(self.engine.outputs, session.run(None, {n: np.zeros(self.shapes[n], np.int64) for n in self.engine.inputs})))
        return self.results[name].shape

    def execute_async_v3(self, stream):
        feeds = self._inputs()
        self.runs.append({n: a.shape for n, a in feeds.items()})
        for name, value in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
            data = np.ascontiguousarray(value, np.float32).tobytes()
            self.engine.cuda.memory[self.addresses[name]][: len(data)] = data
        return True


def fake_tensorrt(cuda: FakeCuda):
    """A module object standing in for `tensorrt`."""
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.14.1.48"
    module.TensorIOMode = TensorIOMode
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    module.nptype = lambda dtype: {"INT64": np.int64, "FLOAT": np.float32}[dtype]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            spec = json.loads(data)
            return FakeEngine(spec["onnx"], spec["profiles"], cuda)

    module.Runtime = Runtime
    return module
