"""Bundle ONNX model -> TensorRT engine (TensorRT 10.x / 11 Python API), recorded in the bundle's manifest.

Networks are strongly typed: precision comes from the ONNX file (fp16 tensors, int8 Q/DQ), not from builder
flags (TensorRT 11 removed the FP16/INT8 flags and calibrators; 10.x still needs the STRONGLY_TYPED creation
flag, 11 ignores it). One optimization profile per (min, opt, max) shape range of (batch, tokens); the runtime
picks the first profile that fits a batch. A timing cache beside the engine makes rebuilds fast.
Engines are tied to the GPU and the TensorRT version that built them; the manifest records both.

Attention: a bundle exported with fused attention (ONNX `Attention`) becomes IAttention layers, which TensorRT
makes non-decomposable: where no fused kernel covers them (fp32 Q/K/V, some head sizes), the build would fail. The
builder marks each one decomposable, so TensorRT falls back to several kernels there and keeps its fused kernel
everywhere else. A bundle exported with plain attention (MatMul/Softmax/MatMul) has no IAttention at all, and runs
on TensorRT 10.0+; `tensorrt_check.readiness` says which applies to a model.
"""

from __future__ import annotations

import time
from pathlib import Path

from utr_runtime.bundle import Bundle, sha256_file, write_manifest
from utr_runtime.engines.tensorrt import cuda_device, import_tensorrt
from utr_runtime.errors import UtrError

from .tensorrt_check import OPERATOR_SINCE, readiness, version_tuple
from .writers import write_atomic

# (batch, tokens) ranges covering every length from 1 token to 512 with up to 64 rows (embed's default batch_size):
# short windows tuned for large batches, long ones for smaller. The runner runs a larger batch in row slices, so
# every batch the runtime plans fits (plan_profile_runs).
DEFAULT_PROFILES = (((1, 1), (32, 128), (64, 128)), ((1, 129), (8, 512), (64, 512)))
# On a GPU with less memory (Jetson-class devices, the plain form's reason to exist), a quarter of the rows: the
# context's memory grows with rows x tokens^2 (one fp32 attention score tensor at 64 x 512 is 0.8 GB).
SMALL_GPU_GB = 16
SMALL_PROFILES = (((1, 1), (8, 128), (16, 128)), ((1, 129), (2, 512), (16, 512)))
MASK_POSITIONS = 64  # masked positions per row an engine of an MLM bundle takes (engine --mask-positions)
TIMING_CACHE = "tensorrt.timing-cache"


class EngineError(UtrError):
    pass


def parse_profile(text: str) -> tuple[tuple[int, int], ...]:
    """'1x8,32x128,128x128' -> ((1, 8), (32, 128), (128, 128)): min, opt and max (batch x tokens)."""
    try:
        shapes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))
        assert len(shapes) == 3 and all(len(s) == 2 and min(s) >= 1 for s in shapes)
        assert all(a <= b for lo, hi in zip(shapes, shapes[1:]) for a, b in zip(lo, hi))
    except (ValueError, AssertionError):
        raise EngineError(f"profile {text!r}: expected MIN,OPT,MAX as BATCHxTOKENS, each at least the one before (e.g. 1x8,32x128,128x128)") from None
    return shapes


def default_profiles(device: dict) -> tuple:
    return SMALL_PROFILES if device.get("memory_gb", SMALL_GPU_GB) < SMALL_GPU_GB else DEFAULT_PROFILES


def profile_shapes(profiles, inputs: list[str], mask_positions: int = MASK_POSITIONS) -> list[dict[str, tuple]]:
    """Each (batch, tokens) profile as per-input (min, opt, max) shapes; mask_positions is (batch, positions)."""
    return [
        {name: ((lo[0], 1), (opt[0], 1), (hi[0], mask_positions)) if name == "mask_positions" else (lo, opt, hi) for name in inputs}
        for lo, opt, hi in profiles
    ]


def set_tf32(trt, config, allowed: bool) -> bool:
    """TensorRT runs fp32 matmuls in TF32 by default on Ampere and later: 10 mantissa bits, far outside the fp32 gate
    (max abs 1e-4). Cleared unless asked for; an engine built with it is judged with the tf32 tolerances. Returns the
    setting the engine was built with."""
    flag = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    if flag is None:  # a TensorRT without the flag: fp32 layers run in fp32
        return False
    (config.set_flag if allowed else config.clear_flag)(flag)
    return bool(config.get_flag(flag))


def timing_cache(config, cache_file: Path, log):
    """The timing cache beside the bundle, or a fresh one where it is from another GPU or TensorRT version: TensorRT
    refuses such a cache when setting it, or already when reading it (None or an exception, by version)."""
    try:
        cache = config.create_timing_cache(cache_file.read_bytes()) if cache_file.is_file() else None
    except Exception:  # noqa: BLE001 -- a cache TensorRT cannot read is only a slower build
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if cache_file.is_file():
        log("the timing cache is from another GPU or TensorRT version: starting a new one")
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def profile_memory(trt, serialized, count: int) -> list[int] | None:
    """Device memory (bytes) an execution context needs for each profile, from the built engine (None where this
    TensorRT cannot say)."""
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    size = getattr(engine, "get_device_memory_size_for_profile_v2", None) if engine is not None else None  # TensorRT 10.1+
    return [int(size(p)) for p in range(count)] if size else None


def allow_decomposed_attention(trt, network, log=print) -> int:
    """Mark every IAttention the parser made decomposable; returns how many. TensorRT before 10.14 has none."""
    attention_input = getattr(getattr(trt, "LayerType", None), "ATTENTION_INPUT", None)
    if attention_input is None:
        return 0
    count = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != attention_input:
            continue
        try:
            layer.__class__ = trt.IAttentionInputLayer  # get_layer returns the base ILayer; Polygraphy casts the same way
            layer.attention.decomposable = True
        except (AttributeError, TypeError) as e:
            log(f"warning: could not mark attention {layer.name!r} decomposable ({e}); if the build finds no fused kernel for "
                "it, rebuild the bundle with: utrexport build --attention plain")
            continue
        count += 1
    if count:
        log(f"{count} attention layers may fall back to unfused kernels where no fused kernel covers them")
    return count


def build_engine(bundle_path, precision: str, profiles=None, log=print, tf32: bool = False, mask_positions: int = MASK_POSITIONS) -> Path:
    """Build, write and record `engine.<precision>.plan`; returns its path.

    profiles: (min, opt, max) (batch, tokens) ranges [default: DEFAULT_PROFILES, or SMALL_PROFILES on a GPU with
    under 16 GB]. tf32: let fp32 layers run in TF32 (off by default). mask_positions: masked positions per row the
    engine of an MLM bundle takes."""
    bundle = Bundle(bundle_path)
    onnx_file = bundle.model_file(precision, device="tensorrt")
    findings, needed = readiness(onnx_file)
    if findings:
        raise EngineError(f"{onnx_file.name} is not TensorRT-ready: {findings[0]} (and {len(findings) - 1} more)")
    for profile in profiles or ():
        if profile[2][1] > bundle.max_tokens:
            raise EngineError(f"profile max {profile[2][1]} tokens exceeds the model's {bundle.max_tokens}")
        if profile[0][0] != 1:
            raise EngineError(f"profile min batch must be 1 (the runner runs any batch in row slices), got {profile[0][0]}")
    trt = import_tensorrt()
    if version_tuple(trt.__version__) < version_tuple(needed):
        fix = ("its attention is ONNX Attention nodes; rebuild the bundle with: utrexport build --attention plain"
               if needed == OPERATOR_SINCE["Attention"] else "use a newer TensorRT")
        raise EngineError(f"{onnx_file.name} needs TensorRT {needed} or newer, this is {trt.__version__}: {fix}")
    device = cuda_device()
    profiles = profiles or default_profiles(device)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # required in 10.x, deprecated (always on) in 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log(f"parsing {onnx_file.name} into a strongly typed network (TensorRT {trt.__version__})")
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_file.name}: {errors}")
    decomposable = allow_decomposed_attention(trt, network, log)

    config = builder.create_builder_config()
    tf32 = set_tf32(trt, config, tf32)
    cache_file = bundle.new_file(TIMING_CACHE)
    timing_cache(config, cache_file, log)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for shapes in profile_shapes(profiles, inputs, mask_positions):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    log(f"building the {precision} engine for {device['name']} (compute capability {device['compute_capability']}); this takes minutes")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build the {precision} engine (see the messages above)")
    seconds = time.perf_counter() - start
    memory = profile_memory(trt, serialized, len(profiles))
    for (lo, _, hi), size in zip(profiles, memory or []):
        log(f"profile {lo[0]}-{hi[0]} rows x {lo[1]}-{hi[1]} tokens: {size / 2**30:.2f} GB of device memory per execution context")

    engine_name = f"engine.{precision}.plan"
    write_atomic(bundle.new_file(engine_name), bytes(serialized))
    manifest = bundle.manifest
    manifest.setdefault("engines", {})[precision] = {
        "file": engine_name, "precision": precision, "onnx": onnx_file.name, "tensorrt": trt.__version__,
        "gpu": device["name"], "compute_capability": device["compute_capability"],
        "profiles": [[list(s) for s in p] for p in profiles], "build_seconds": round(seconds, 1), "timing_cache": TIMING_CACHE,
        "decomposable_attention_layers": decomposable, "tf32": tf32, "profile_memory_bytes": memory,
        "mask_positions": mask_positions if "mask_positions" in inputs else None,
    }
    manifest["files"][engine_name] = sha256_file(bundle.new_file(engine_name))
    write_manifest(bundle.path, manifest)  # the engine is recorded before anything else can fail
    timing = config.get_timing_cache()
    if timing is not None:
        write_atomic(cache_file, bytes(timing.serialize()))
    log(f"engine written to {bundle.new_file(engine_name)} in {seconds:.0f} s")
    return bundle.new_file(engine_name)
