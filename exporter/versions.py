"""The versions a build records in its manifest and a benchmark in its report."""

from __future__ import annotations

import platform
from importlib import metadata


def tool_versions(packages=("utrexport", "torch", "onnx", "onnxscript", "onnxruntime", "numpy")) -> dict:
    """Python's version and those of the installed `packages`."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
