"""The TensorRT stand-in (tests/fake_tensorrt.py) against the real Python bindings of each supported version.

Run with `make tensorrt-api`: it installs the TensorRT bindings wheels (about 1 MB each; TensorRT's libraries
themselves cannot be installed here) and cuda-python into .cache/tensorrt-api, builds a stub of TensorRT's shared
libraries with the C compiler (tests/tensorrt_api/stub.c), and runs this file with UTR_TENSORRT_API pointing there.
It needs those downloads, so the default test run skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(os.environ["UTR_TENSORRT_API"]) if os.environ.get("UTR_TENSORRT_API") else None
CHECK = Path(__file__).parent / "tensorrt_api" / "check.py"
pytestmark = pytest.mark.skipif(ROOT is None, reason="needs the TensorRT bindings wheels: run `make tensorrt-api`")


def installs(prefix: str) -> list[Path]:
    return sorted(ROOT.glob(f"{prefix}*")) if ROOT else []


def check(what: str, install: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(install), "LD_LIBRARY_PATH": str(ROOT / "stub")}
    done = subprocess.run([sys.executable, str(CHECK), what], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("install", installs("tensorrt"), ids=lambda p: p.name)
def test_stand_in_is_tensorrts_api(install):
    """Every class, method (with its parameter names), property and enum member the builder and runner were tested
    with exists in this TensorRT; nptype refuses BF16 as numpy_dtype expects; the layer recast works."""
    result = check("tensorrt", install)
    assert result["problems"] == [], f"TensorRT {result['version']}: " + "; ".join(result["problems"])
    behaviour = result["behaviour"]
    assert (behaviour["int64"], behaviour["float"]) == ("int64", "float32")
    assert "engine I/O of type DataType.BF16 is not supported" in behaviour["bf16"]
    assert behaviour["recast"] == "Dims2" and behaviour["logger"] == "Logger"


@pytest.mark.parametrize("install", installs("cuda"), ids=lambda p: p.name)
def test_stand_in_is_cudarts_api(install):
    """Every cudart function (with its parameter names) and enum member the runner uses exists in this cuda-python;
    cuda_device() answers a machine without a GPU driver in one clear line."""
    result = check("cudart", install)
    assert result["problems"] == [], f"{result['version']}: " + "; ".join(result["problems"])
    said = result["behaviour"]["cuda_device"]
    assert said.startswith("device {") or said.startswith("no NVIDIA driver is installed, so no CUDA GPU is visible"), said
