"""A stand-in for TensorRT's and cuda-python's Python APIs, as far as utrexport's engine builder and the runtime's
runner use them, that follows their documented behaviour (TensorRT 10.x / 11, cuda-python 12.6+): `(error, value)`
tuples from cudart, bool returns from set_timing_cache, set_input_shape and execute_async_v3, None from a failed
build, profile shapes as (min, opt, max), device memory addressed by integers, and `get_layer` returning the base
ILayer (a subclass's members need a cast). Its "engine" runs the bundle's ONNX model in ONNX Runtime, so the builder
and the runner are checked end to end against ONNX Runtime's own answers, without a GPU.

Classes, members and parameters carry the real APIs' names: `make tensorrt-api` checks every one against the
real bindings of each supported version (tests/test_tensorrt_api.py), so code that passes here calls what exists
there. What arrived in a later TensorRT is left out of an older version's module (SINCE).

A serialized engine is JSON: {"onnx": path, "profiles": [{input name: [min, opt, max]}, ...]}.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np

SUCCESS = 0
# Module members that arrived after TensorRT 10.0: left out of an older version's module.
SINCE = {"IAttention": (10, 14), "IAttentionInputLayer": (10, 14), "LayerType.ATTENTION_INPUT": (10, 14), "LayerType.ATTENTION_OUTPUT": (10, 14),
         "ICudaEngine.get_device_memory_size_for_profile_v2": (10, 1)}


# ------------------------------------------------------------------------------------------------------ cudart
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaDeviceProp:
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int


class FakeCuda:
    """cudart: device memory as bytearrays keyed by fake device pointers; one GPU of compute capability 9.0."""

    cudaError_t, cudaMemcpyKind, cudaDeviceProp = cudaError_t, cudaMemcpyKind, cudaDeviceProp

    def __init__(self, driver: int = 12090, memory_gb: float = 141):
        self.memory: dict[int, bytearray] = {}
        self.next, self.mallocs, self.streams, self.driver, self.memory_gb = 1 << 20, 0, set(), driver, memory_gb
        self.pinned: dict[int, ctypes.Array] = {}  # page-locked host buffers by address
        self.pageable_copies = 0  # asynchronous copies from or to host memory that is not page-locked

    def cudaGetDeviceCount(self):
        return (SUCCESS, 1) if self.driver >= 12000 else (cudaError_t.cudaErrorInsufficientDriver, 0)

    def cudaDriverGetVersion(self):
        return SUCCESS, self.driver

    def cudaRuntimeGetVersion(self):
        return SUCCESS, 12090

    def cudaGetDeviceProperties(self, device):
        props = cudaDeviceProp()
        props.name, props.major, props.minor, props.totalGlobalMem = b"Fake GPU", 9, 0, int(self.memory_gb * 2**30)
        return SUCCESS, props

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

    def cudaFree(self, devPtr):
        del self.memory[devPtr]
        return (SUCCESS,)

    def cudaMallocHost(self, size):
        buffer = ctypes.create_string_buffer(size)
        self.pinned[ctypes.addressof(buffer)] = buffer
        return SUCCESS, ctypes.addressof(buffer)

    def cudaFreeHost(self, ptr):
        del self.pinned[ptr]
        return (SUCCESS,)

    def _is_pinned(self, address, count) -> bool:
        return any(start <= address and address + count <= start + len(b) for start, b in self.pinned.items())

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.pageable_copies += not self._is_pinned(src if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else dst, count)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            assert count <= len(self.memory[dst])
            self.memory[dst][:count] = ctypes.string_at(src, count)
        else:
            assert count <= len(self.memory[src])
            ctypes.memmove(dst, bytes(self.memory[src][:count]), count)
        return (SUCCESS,)

    def cudaGetErrorString(self, error):
        return SUCCESS, b"fake error"


# ---------------------------------------------------------------------------------------------------- TensorRT
class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    INT64 = 12


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    TF32 = 7


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1


def nptype(trt_type):
    return {DataType.INT64: np.int64, DataType.FLOAT: np.float32}[trt_type]


class Logger:
    WARNING = 2

    def __init__(self, min_severity=2):
        pass


class IHostMemory(bytes):
    nbytes = property(len)


class ITensor:
    name: str

    def __init__(self, name):
        self.name = name


class IAttention:
    decomposable: bool

    def __init__(self):
        self.decomposable = False  # TensorRT's default: one fused kernel or a failed build


class ILayer:
    type: "enum.Enum"
    name: str

    def __init__(self, type, name, attention=None):
        self.type, self.name, self._attention = type, name, attention


class IAttentionInputLayer(ILayer):
    attention = property(lambda self: self._attention)


class ParserError:
    def __init__(self, text):
        self.text = text

    def desc(self):
        return self.text


class INetworkDefinition:
    def __init__(self, flags):
        self.flags, self.onnx, self.inputs, self.layers = flags, None, [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, index):
        return self.inputs[index]

    def get_layer(self, index):
        layer = self.layers[index]
        return ILayer(layer.type, layer.name, layer._attention)  # the base class, as TensorRT's Python API returns it


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, index):
        return ParserError(self.errors[index])

    def parse_from_file(self, model):
        """Inputs and one layer per node; ONNX Attention becomes IAttention boundary layers (10.14+), else is refused."""
        import onnx

        graph = onnx.load(model, load_external_data=False).graph
        layer_types = self.trt.LayerType
        for node in graph.node:
            if node.op_type == "Attention":
                if not hasattr(layer_types, "ATTENTION_INPUT"):
                    self.errors.append(f"No importer registered for op: Attention (node {node.name})")
                    continue
                attention = IAttention()
                self.network.layers += [ILayer(layer_types.ATTENTION_INPUT, node.name, attention), ILayer(layer_types.ATTENTION_OUTPUT, node.name)]
            else:
                self.network.layers.append(ILayer(getattr(layer_types, node.op_type.upper(), layer_types.IDENTITY), node.name))
        self.network.inputs = [ITensor(i.name) for i in graph.input]
        self.network.onnx = model
        return not self.errors


class ITimingCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return IHostMemory(self.data)


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):
        self.shapes[input] = [list(min), list(opt), list(max)]


class IBuilderConfig:
    def __init__(self, device_key):
        self.device_key, self.profiles, self.cache, self.rejected_caches = device_key, [], None, 0
        self.flags = {BuilderFlag.TF32}  # TensorRT's default: fp32 layers may run in TF32

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def create_timing_cache(self, serialized_timing_cache):
        if bytes(serialized_timing_cache).startswith(b"unreadable"):  # a cache this version cannot even read
            raise RuntimeError("Failed to create timing cache")
        return ITimingCache(bytes(serialized_timing_cache) or self.device_key)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data != self.device_key and not ignore_mismatch:  # made on another GPU or TensorRT version
            self.rejected_caches += 1
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger):
        self.last_config = None

    def create_network(self, flags=0):
        return INetworkDefinition(flags)

    def create_builder_config(self):
        self.last_config = IBuilderConfig(f"timing cache of TensorRT {self.trt.__version__} on Fake GPU".encode())
        return self.last_config

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        """None where an attention has no fused kernel and may not be decomposed: this stand-in has no fused kernels."""
        if any(layer._attention is not None and not layer._attention.decomposable for layer in network.layers):
            return None
        if not config.profiles or any(set(p.shapes) != {t.name for t in network.inputs} for p in config.profiles):
            return None
        return IHostMemory(json.dumps({"onnx": network.onnx, "profiles": [p.shapes for p in config.profiles],
                                       "tf32": BuilderFlag.TF32 in config.flags}).encode())


class ICudaEngine:
    def __init__(self, onnx_path: str, profiles: list[dict], cuda: FakeCuda, tf32: bool = False):
        import onnxruntime as ort

        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.profiles, self.cuda, self.tf32, self.strategies = profiles, cuda, tf32, []
        self.refused_profiles: set[int] = set()  # profiles set_optimization_profile_async refuses (a test's fault)

    num_io_tensors = property(lambda self: len(self.inputs) + len(self.outputs))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, index):
        return (self.inputs + self.outputs)[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType.INT64 if name in self.inputs else DataType.FLOAT

    def get_tensor_profile_shape(self, name, profile_index):
        return [tuple(s) for s in self.profiles[profile_index][name]]

    def get_device_memory_size_for_profile_v2(self, profile_index):
        """Bytes for one fp32 attention score tensor (12 heads) at the profile's largest shape: the dominant term."""
        rows, tokens = self.profiles[profile_index]["input_ids"][2]
        return rows * 12 * tokens * tokens * 4

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        self.strategies.append(strategy)
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine, self.profile, self.shapes, self.addresses, self.runs = engine, 0, {}, {}, []
        self.results = None

    def set_optimization_profile_async(self, profile_index, stream_handle):
        if not 0 <= profile_index < len(self.engine.profiles) or profile_index in self.engine.refused_profiles:
            return False
        self.profile = profile_index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        if not all(a <= n <= b for a, n, b in zip(lo, shape, hi)):
            return False
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name, memory):
        self.addresses[name] = memory
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

    def execute_async_v3(self, stream_handle):
        feeds = self._inputs()
        self.runs.append({n: a.shape for n, a in feeds.items()})
        for name, value in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
            data = np.ascontiguousarray(value, np.float32).tobytes()
            self.engine.cuda.memory[self.addresses[name]][: len(data)] = data
        return True


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, serialized_engine):
        spec = json.loads(bytes(serialized_engine))
        return self.engine_class(spec["onnx"], spec["profiles"], self.cuda, spec.get("tf32", False))


# The module's members, by their names in `tensorrt`.
API = {cls.__name__: cls for cls in (TensorIOMode, DataType, NetworkDefinitionCreationFlag, BuilderFlag, ExecutionContextAllocationStrategy, Logger, IHostMemory, ITensor, IAttention,
                                      ILayer, IAttentionInputLayer, ParserError, INetworkDefinition, ITimingCache, IOptimizationProfile,
                                      IBuilderConfig, ICudaEngine, IExecutionContext, Builder, OnnxParser, Runtime)}
API["nptype"] = nptype


def fake_tensorrt(cuda: FakeCuda, version: str = "10.14.1.48") -> types.ModuleType:
    """A module object standing in for `tensorrt` of that version."""
    release = tuple(int(v) for v in version.split(".")[:2])
    present = {name for name, since in SINCE.items() if release >= since}
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    for name, member in API.items():
        if name not in SINCE or name in present:
            setattr(module, name, member)
    layer_types = ["MATRIX_MULTIPLY", "SOFTMAX", "IDENTITY"] + [n.split(".")[1] for n in sorted(present) if n.startswith("LayerType.")]
    module.LayerType = enum.Enum("LayerType", layer_types)
    # The builder, parser and runtime see their own module and GPU (subclasses, so the API check reads the bases).
    module.Builder = type("Builder", (Builder,), {"trt": module})
    module.OnnxParser = type("OnnxParser", (OnnxParser,), {"trt": module})
    # A class member that arrived later: this version's class is a copy without it.
    for path in set(SINCE) - present:
        owner, _, name = path.partition(".")
        if name and owner in API and not owner == "LayerType":
            cls = API[owner]
            setattr(module, owner, type(owner, cls.__bases__, {k: v for k, v in vars(cls).items() if k != name}))
    module.Runtime = type("Runtime", (Runtime,), {"cuda": cuda, "engine_class": module.ICudaEngine})
    return module
