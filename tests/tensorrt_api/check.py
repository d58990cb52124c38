"""Compare the TensorRT / cudart stand-in (tests/fake_tensorrt.py) with the real Python bindings on this path.

    python tests/tensorrt_api/check.py tensorrt   # tensorrt_bindings importable (stub libraries on LD_LIBRARY_PATH)
    python tests/tensorrt_api/check.py cudart     # cuda-python or cuda-bindings importable

Every member of the stand-in (the API that utrexport's builder and the runtime's runner were tested against) must
exist in the real module with the same kind (method, property, enum member) and, for methods, the same parameter
names in the same order; names the stand-in leaves out of an older version must be absent from it too. Prints
JSON: {"version": ..., "problems": [...], "behaviour": {...}}. One process per installed version: the bindings of
TensorRT 10 and 11 share a module name.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for fake_tensorrt

import fake_tensorrt  # noqa: E402

# Classes the code constructs itself: only their __init__ is compared (the others have no Python constructor).
CONSTRUCTED = {"Builder", "OnnxParser", "Runtime", "Logger"}


def parameter_lists(function, name: str) -> list[list[str]] | None:
    """Each overload's parameter names (self left out), from the signature or the pybind11/Cython docstring."""
    try:
        return [[p for p in inspect.signature(function).parameters if p != "self"]]
    except (TypeError, ValueError):
        pass
    lists = []
    for line in (function.__doc__ or "").splitlines():
        match = re.match(rf"\s*(?:\d+\.\s*)?{re.escape(name)}\((.*)\)(?:\s*->.*)?$", line)
        if match:
            lists.append([_parameter_name(p) for p in _split(match.group(1))])
    return [[p for p in names if p and p != "self"] for names in lists] or None


def _split(text: str) -> list[str]:
    """Top-level comma split of a parameter list (types hold brackets, defaults hold <...>)."""
    parts, depth, current = [], 0, ""
    for c in text:
        if c in "[(<":
            depth += 1
        elif c in "])>":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    return [p.strip() for p in parts + [current] if p.strip()]


def _parameter_name(param: str) -> str:
    """'name: type = default' (pybind11) or 'size_t name' (Cython) -> name."""
    param = param.split("=")[0].strip()
    return param.split(":")[0].strip() if ":" in param else param.split()[-1].lstrip("*")


def _fake_parameters(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def compare_function(label: str, fake, real, name: str) -> list[str]:
    if isinstance(real, property) or not callable(real):
        return [f"{label} is not a method in the real API"]
    wanted = _fake_parameters(fake)
    overloads = parameter_lists(real, name)
    if overloads is None:
        return [f"{label}: the real signature could not be read"]
    # The stand-in's parameters must be the real ones, in order; real ones past them must have defaults (not checked
    # here: every call the code makes passes the stand-in's parameters, so none is left out).
    if not any(names[: len(wanted)] == wanted for names in overloads):
        return [f"{label}({', '.join(wanted)}): the real parameters are {' or '.join('(' + ', '.join(n) + ')' for n in overloads)}"]
    return []


def compare_class(label: str, fake: type, real: type, absent: set[str] = frozenset()) -> list[str]:
    """absent: 'Class.member' paths this version has not got yet (fake_tensorrt.SINCE; checked apart)."""
    problems = []
    members = {}
    for cls in reversed([c for c in fake.__mro__ if c.__module__ == fake_tensorrt.__name__]):
        members.update({n: v for n, v in vars(cls).items() if not n.startswith("_") or (n == "__init__" and fake.__name__ in CONSTRUCTED)})
        members.update({n: property() for n in getattr(cls, "__annotations__", {})})
    for name, member in sorted(members.items()):
        where = f"{label}.{name}"
        if where.removeprefix("tensorrt.") in absent:
            continue
        if not hasattr(real, name):
            problems.append(f"{where} does not exist")
            continue
        actual = inspect.getattr_static(real, name) if name != "__init__" else real.__init__
        if isinstance(member, property):
            if not inspect.isdatadescriptor(actual):  # pybind11's property, Cython's getset descriptor
                problems.append(f"{where} is not a property in the real API")
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            problems += compare_enum(where, member, getattr(real, name))
        elif callable(member) and not isinstance(member, type):
            problems += compare_function(where, member, getattr(real, name), name)
    return problems


def compare_enum(label: str, fake: type, real) -> list[str]:
    return [f"{label}.{m.name} does not exist" for m in fake if not hasattr(real, m.name)]


def compare(label: str, fake, real, absent: set[str] = frozenset()) -> list[str]:
    if isinstance(fake, type) and issubclass(fake, enum.Enum):
        return compare_enum(label, fake, real)
    if isinstance(fake, type):
        return compare_class(label, fake, real, absent)
    return compare_function(label, fake, real, label.rsplit(".", 1)[-1])


def check_tensorrt() -> dict:
    import tensorrt_bindings as real

    sys.modules["tensorrt"] = real  # the full `tensorrt` package is these bindings plus the libraries
    version = real.__version__
    fake = fake_tensorrt.fake_tensorrt(fake_tensorrt.FakeCuda(), version)
    problems = []
    absent = {path for path in fake_tensorrt.SINCE if not _has(fake, path)}
    for name in sorted(n for n in vars(fake) if not n.startswith("_")):
        member = fake_tensorrt.API.get(name, getattr(fake, name))
        if not hasattr(real, name):
            problems.append(f"tensorrt.{name} does not exist")
        else:
            problems += compare(f"tensorrt.{name}", member, getattr(real, name), absent)
    for path in fake_tensorrt.SINCE:  # what the stand-in leaves out of this version must be missing from it too
        in_fake, in_real = (_has(module, path) for module in (fake, real))
        if in_fake != in_real:
            problems.append(f"tensorrt.{path} {'exists' if in_real else 'does not exist'} in {version}: correct SINCE")
    return {"version": version, "problems": problems, "behaviour": _tensorrt_behaviour(real)}


def _has(module, path: str) -> bool:
    target = module
    for part in path.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def _tensorrt_behaviour(trt) -> dict:
    """What the code relies on beyond names: nptype's refusals, the cast allow_decomposed_attention makes."""
    from utr_runtime.engines.tensorrt import numpy_dtype
    from utr_runtime.errors import UtrError

    facts = {"int64": str(numpy_dtype(trt, trt.DataType.INT64)), "float": str(numpy_dtype(trt, trt.DataType.FLOAT))}
    try:
        numpy_dtype(trt, trt.DataType.BF16)
        facts["bf16"] = "accepted"
    except UtrError as e:
        facts["bf16"] = str(e)
    dims = trt.Dims([1, 2])
    dims.__class__ = trt.Dims2  # pybind11 lets a base-class object be recast to a subclass, as ILayer to IAttentionInputLayer
    facts["recast"] = type(dims).__name__
    facts["logger"] = type(trt.Logger(trt.Logger.WARNING)).__name__
    return facts


def check_cudart() -> dict:
    from utr_runtime.engines.tensorrt import _cudart, cuda_device
    from utr_runtime.errors import UtrError

    real = _cudart()  # the runtime's own import: cuda.bindings.runtime, or cuda.cudart of older cuda-python
    cuda = fake_tensorrt.FakeCuda
    problems = []
    for name, member in sorted(vars(cuda).items()):
        if name.startswith("_"):
            continue
        if not hasattr(real, name):
            problems.append(f"cudart.{name} does not exist")
        else:
            problems += compare(f"cudart.{name}", member, getattr(real, name))
    try:
        said = f"device {cuda_device()}"
    except UtrError as e:
        said = str(e)
    return {"version": _distributions("cuda-python", "cuda-bindings"), "module": real.__name__, "problems": problems,
            "behaviour": {"cuda_device": said}}


def _distributions(*names: str) -> str:
    """'cuda-bindings 12.9.10': the installed ones of these packages, with their versions."""
    from importlib import metadata

    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


if __name__ == "__main__":
    print(json.dumps({"tensorrt": check_tensorrt, "cudart": check_cudart}[sys.argv[1]]()))
