"""Native TensorRT runner: a bundle's engine file, run with execute_async_v3 on device buffers from cuda-python.

No torch. An engine only runs on the GPU model and TensorRT version that built it; both are in the manifest
and checked before deserializing, with the command that rebuilds it.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from ..errors import BundleError, UtrError

CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: no driver, or one older than cuda-python's CUDA
NO_DRIVER = "no NVIDIA driver is installed, so no CUDA GPU is visible{}; TensorRT engines need one"


def plan_profile_runs(profiles: list[dict[str, tuple]], shapes: dict[str, tuple]) -> tuple[int, list[slice]]:
    """Which optimization profile runs a batch, and the row slices to run it in.

    profiles: per profile, {input name: (min shape, opt shape, max shape)}. A profile fits when every non-batch
    dimension of every input lies in its range; of those, the one taking the most rows wins, and a batch with more
    rows than it takes runs in slices of at most that many. So any batch the runtime plans runs, whatever its
    batch_size and token budget, as long as some profile covers its lengths.
    """
    fitting = []
    for index, profile in enumerate(profiles):
        if all(all(lo <= n <= hi for lo, n, hi in zip(profile[name][0][1:], shape[1:], profile[name][2][1:])) for name, shape in shapes.items()):
            fitting.append((min(profile[name][2][0] for name in shapes), -index, index))
    if not fitting:
        raise UtrError(f"no optimization profile of this engine covers inputs of shape {shapes}; rebuild it with a --profile that does")
    rows, _, index = max(fitting)
    batch = next(iter(shapes.values()))[0]
    low = max(profiles[index][name][0][0] for name in shapes)
    if batch < low:
        raise UtrError(f"the engine's profile for these lengths needs at least {low} rows, got {batch}; rebuild it with a --profile of min batch 1")
    return index, [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UtrError("TensorRT is not installed: pip install 'utrexport[tensorrt]' (needs an NVIDIA GPU)") from None
    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-bindings, and cuda-python from 12.6.2
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 12.6.0 and older
        except ImportError:
            raise UtrError("cuda-python is not installed: pip install 'utrexport[tensorrt]'") from None
    return cudart


def _call(result):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    cudart = _cudart()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise UtrError(f"CUDA error: {_error_text(cudart, error)}")
    return values[0] if len(values) == 1 else values


def _error_text(cudart, error) -> str:
    text = cudart.cudaGetErrorString(error)[1]
    return text.decode() if isinstance(text, bytes) else str(text)


def cuda_device(index: int = 0) -> dict:
    """Name and compute capability of a GPU, or a clear error where there is none."""
    cudart = _cudart()
    try:
        error, count = cudart.cudaGetDeviceCount()
    except RuntimeError as e:  # cuda-python 12.6.0 raises where libcuda is missing ("Failed to dlopen libcuda.so.1")
        raise UtrError(NO_DRIVER.format(f" ({e})")) from None
    if int(error) == CUDA_ERROR_INSUFFICIENT_DRIVER:  # no driver at all, or one older than cuda-python's CUDA
        driver = cudart.cudaDriverGetVersion()[1]  # 0 where no driver is installed
        if not driver:
            raise UtrError(NO_DRIVER.format(""))
        runtime = cudart.cudaRuntimeGetVersion()[1]
        raise UtrError(f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the CUDA {_cuda_version(runtime)} of the "
                       "installed cuda-python (CUDA error 35); install the extra for your driver's CUDA major, e.g. "
                       "pip install 'utrexport[tensorrt-cu12]', or update the driver")
    if error != cudart.cudaError_t.cudaSuccess or count == 0:
        raise UtrError("no CUDA GPU is visible; TensorRT engines need one")
    props = _call(cudart.cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}", "memory_gb": round(props.totalGlobalMem / 2**30, 1)}


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"  # 12090 -> 12.9


def numpy_dtype(trt, dtype):
    """The NumPy type of an engine I/O tensor; bundles' inputs are int64 and outputs float32, so a BF16, FP8 or
    4-bit I/O tensor (which trt.nptype cannot map) means an engine this runner was not built for."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise UtrError(f"engine I/O of type {dtype} is not supported (bundles take int64 and give float32)") from None


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
    return TensorRTRunner(bundle.read(record["file"]), name=str(bundle.path / record["file"]))


class TensorRTRunner:
    engine = "tensorrt"

    def __init__(self, engine, name: str | None = None):
        """engine: the plan's bytes (as Bundle.read checked them), or its file."""
        trt = import_tensorrt()
        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.plan = self.runtime.deserialize_cuda_engine(engine if isinstance(engine, bytes) else engine.read_bytes())
        if self.plan is None:
            raise UtrError(f"{name or engine}: TensorRT could not deserialize the engine")
        # Memory for the profile in use only, (re)allocated when the profile changes, rather than for the largest one
        # (0.8 GB of fp32 attention scores at 64 x 512) from the start; TensorRT before 10.0 lacks the choice.
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        self.context = self.plan.create_execution_context(strategy) if strategy is not None else self.plan.create_execution_context()
        names = [self.plan.get_tensor_name(i) for i in range(self.plan.num_io_tensors)]
        self.input_names = [n for n in names if self.plan.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.plan.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: numpy_dtype(trt, self.plan.get_tensor_dtype(n)) for n in names}
        self.profiles = [{n: tuple(map(tuple, self.plan.get_tensor_profile_shape(n, p))) for n in self.input_names}
                         for p in range(self.plan.num_optimization_profiles)]
        self.stream = _call(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes): grown, never shrunk
        self.pinned: dict[str, tuple[int, int]] = {}  # name -> (page-locked host pointer, bytes): staging for async copies
        self.profile = None
        # One execution context, stream and set of buffers: threads sharing the runner take turns (the GPU runs one
        # batch at a time anyway; a server gets concurrency from instances, each with its own runner).
        self.lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for a batch, run in the row slices the engine's profiles take (see plan_profile_runs)."""
        with self.lock:
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        positions = feeds.get("mask_positions")
        most = max((p["mask_positions"][2][1] for p in self.profiles if "mask_positions" in p), default=None)
        if positions is not None and most is not None and np.shape(positions)[1] > most:
            raise UtrError(f"this TensorRT engine takes at most {most} masked positions per row, got {np.shape(positions)[1]}: "
                           f"rebuild it with utrexport engine --mask-positions {np.shape(positions)[1]}, or run it on the CPU")
        if positions is not None and np.shape(positions)[1] == 0:
            # The profiles start at one mask position (empty dimensions are not relied on): run one, return none.
            out = self._run({**feeds, "mask_positions": np.zeros((len(positions), 1), np.int64)})
            return {**out, "logits": out["logits"][:, :0]}
        profile, slices = plan_profile_runs(self.profiles, {n: np.shape(feeds[n]) for n in self.input_names})
        parts = [self._run_once({n: feeds[n][rows] for n in self.input_names}, profile) for rows in slices]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.output_names}

    def _run_once(self, feeds: dict[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        cudart = self.cudart
        if profile != self.profile:
            self.profile = None  # until TensorRT takes it: a refusal must not leave a profile recorded that is not set
            if not self.context.set_optimization_profile_async(profile, self.stream):  # False, not an exception
                raise UtrError(f"TensorRT refused optimization profile {profile} of this engine")
            self.profile = profile
        for name in self.input_names:
            host = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if not self.context.set_input_shape(name, host.shape):  # False, not an exception, outside the profile
                raise UtrError(f"TensorRT refused input {name} of shape {host.shape} for optimization profile {profile}")
            device, staging = self._buffer(name, host.nbytes), self._staging(name, host.nbytes)
            staging[: host.nbytes] = host.reshape(-1).view(np.uint8)
            _call(cudart.cudaMemcpyAsync(device, staging.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
            self.context.set_tensor_address(name, device)
        shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.output_names}
        sizes = {name: int(np.prod(shape)) * self.dtypes[name].itemsize for name, shape in shapes.items()}
        for name, nbytes in sizes.items():
            self.context.set_tensor_address(name, self._buffer(name, nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise UtrError("TensorRT execution failed")
        staged = {name: self._staging(name, nbytes)[:nbytes] for name, nbytes in sizes.items()}
        for name, staging in staged.items():
            _call(cudart.cudaMemcpyAsync(staging.ctypes.data, self.buffers[name][0], sizes[name], cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _call(cudart.cudaStreamSynchronize(self.stream))
        # astype copies: the staging buffers are reused by the next run
        return {name: staging.view(self.dtypes[name]).reshape(shapes[name]).astype(np.float32) for name, staging in staged.items()}

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least nbytes for a tensor, reused across runs and grown when a batch needs more."""
        pointer, size = self.buffers.get(name, (None, 0))
        if nbytes > size:
            if pointer is not None:
                _call(self.cudart.cudaFree(pointer))
            size = max(nbytes, 2 * size, 1)
            pointer = _call(self.cudart.cudaMalloc(size))
            self.buffers[name] = (pointer, size)
        return pointer

    def _staging(self, name: str, nbytes: int) -> np.ndarray:
        """A page-locked host buffer of at least nbytes for a tensor, as a uint8 array: copies from pageable memory are
        not asynchronous (the driver stages them itself), so the samples copy through pinned buffers. Reused, grown."""
        pointer, size = self.pinned.get(name, (None, 0))
        if nbytes > size or pointer is None:
            if pointer is not None:
                _call(self.cudart.cudaFreeHost(pointer))
            size = max(nbytes, 2 * size, 1)
            pointer = _call(self.cudart.cudaMallocHost(size))
            self.pinned[name] = (pointer, size)
        return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(int(pointer)))

    def close(self) -> None:
        """Free the device and pinned host buffers and the stream (also when the runner is garbage-collected)."""
        cudart, self.cudart = self.cudart, None
        if cudart is None:
            return
        for pointer, _ in self.buffers.values():
            cudart.cudaFree(pointer)
        for pointer, _ in self.pinned.values():
            cudart.cudaFreeHost(pointer)
        self.buffers.clear()
        self.pinned.clear()
        cudart.cudaStreamDestroy(self.stream)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
