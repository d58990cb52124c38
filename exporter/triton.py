"""Triton Inference Server: a model repository made from a bundle (`utrexport triton`), which `utrexport serve` runs
(utrexport.serve) and NVIDIA's Triton container runs as it is.

The repository holds one Python-backend model per capability of the bundle (embed; predict with a task head;
fill_mask with an MLM head). Each model folder is self-contained: config.pbtxt, and in its version folder 1/ the
model.py (utr_runtime.serving's TritonPythonModel), a copy of utr_runtime and the bundle (hard links where the
filesystem allows, so the models share one copy on disk). Its server needs Python with NumPy and the engine only.
Triton does the transport (KServe v2 over HTTP and gRPC), the queue and dynamic batching, health and metrics. Each
model answers a warm-up request (a real 3'UTR) before Triton calls it ready, so no user request pays the first run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import utr_runtime
from utr_runtime import serving
from utr_runtime.errors import UtrError

from .writers import current_umask

MARKER = "utrexport-repository.json"  # what `--force` may replace, and what was written
WARMUP = "warmup"  # each model's folder of warm-up inputs (Triton's model_warmup)
MODEL_PY = '''"""Triton Python-backend model written by `utrexport triton`: loads the bundle beside it once per instance and
answers batches of requests with utr_runtime.serving (a copy of the runtime beside it, so it needs only NumPy and
the engine)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utr_runtime.serving import TritonPythonModel  # noqa: E402,F401
'''


class ServeError(UtrError):
    """The repository or the server cannot be made or started as asked."""


@dataclass
class RepositoryOptions:
    precision: str = "fp32"
    engine: str = "auto"
    device: str = "cpu"
    threads: int | None = None  # per instance; None: the cores divided among the instances
    instances: int = 1
    max_batch_size: int = 64  # sequences Triton puts in one batch (and the most one request may send)
    max_queue_delay_us: int = 2000
    limits: serving.Limits = serving.Limits()  # what one request may cost; its max_sequences is max_batch_size
    capabilities: list[str] = field(default_factory=list)  # empty: all the bundle has

    def limits_served(self) -> serving.Limits:
        """The limits each model enforces: `limits`, with max_batch_size as the most sequences in one request."""
        return dataclasses.replace(self.limits, max_sequences=self.max_batch_size)


def write_repository(bundles, output: str | os.PathLike, options: RepositoryOptions, force: bool = False) -> list[str]:
    """Write a Triton model repository serving `bundles` (one folder, or several) at `output`, aside and then renamed
    into place; returns the models' names. One bundle's models are named by capability (embed, predict, fill_mask);
    with several, each name starts with its bundle's folder name (classifier_predict)."""
    output = Path(output)
    bundles = [bundles] if isinstance(bundles, (str, os.PathLike)) else list(bundles)
    checked = [_checked_bundle(b, options) for b in bundles]
    names = model_names(checked, options)
    _check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    try:
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes it 0700: a server running as another user must read it
        for bundle, models in zip(checked, names):
            _write_models(work, bundle, models, options)
        record = {"bundles": [str(b.path.resolve()) for b in checked], "models": [n for models in names for n in models.values()],
                  "options": {**{k: v for k, v in vars(options).items() if k not in ("capabilities", "limits")}, **vars(options.limits)},
                  "utrexport": utr_runtime.__version__}
        (work / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        if output.exists() or output.is_symlink():  # replaced only as --force allows, checked again: it may have appeared meanwhile
            _check_output(output, force)
            shutil.rmtree(output)
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record["models"]


def model_names(bundles: list[utr_runtime.Bundle], options: RepositoryOptions) -> list[dict[str, str]]:
    """For each bundle, its models' names by capability."""
    names = []
    for bundle in bundles:
        served = options.capabilities or serving.capabilities(bundle.task, bundle.has_lm_head)
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", bundle.path.resolve().name)
        names.append({c: c if len(bundles) == 1 else f"{stem}_{c}" for c in served})
    flat = [n for models in names for n in models.values()]
    if len(set(flat)) < len(flat):
        folders = [b.path.resolve().name for b in bundles]
        raise ServeError(f"bundles {', '.join(map(repr, folders))} would give models the same names (a model name keeps A-Z, a-z, 0-9, "
                         "_ and - of its bundle's folder name, other characters become _): rename a folder")
    return names


def _checked_bundle(bundle, options: RepositoryOptions) -> utr_runtime.Bundle:
    checked = utr_runtime.Bundle(bundle)
    checked.check_files()  # every checksum now: a repository is never made from a damaged bundle
    served = serving.capabilities(checked.task, checked.has_lm_head)
    wrong = [c for c in options.capabilities if c not in served]
    if wrong:
        raise ServeError(f"{bundle} cannot serve {', '.join(wrong)}: it serves {', '.join(served)}")
    if options.precision != "bf16" and options.precision not in checked.precisions:
        raise ServeError(f"{bundle} has no {options.precision} model (it has {', '.join(checked.precisions)})")
    if options.device == "tensorrt" and options.precision not in checked.engines:
        raise ServeError(f"{bundle} has no TensorRT engine for {options.precision}: build it on the serving GPU with "
                         f"utrexport engine {bundle} --precision {options.precision}")
    return checked


def _check_output(output: Path, force: bool) -> None:
    from .writers import check_output

    check_output(output, force, replaceable=lambda path: None if not Path(path).is_symlink() and (Path(path) / MARKER).is_file() else
                 f"{path} is not a repository utrexport wrote; --force replaces those only: choose another output", error=ServeError)


def _write_models(work: Path, bundle: utr_runtime.Bundle, models: dict[str, str], options: RepositoryOptions) -> None:
    """One model folder per capability: config.pbtxt, and 1/ with model.py, the runtime and the bundle."""
    hidden = int(bundle.manifest["model"]["config"]["hidden_size"])
    runtime = Path(utr_runtime.__file__).parent
    first = None
    for capability, name in models.items():
        version = work / name / "1"
        version.mkdir(parents=True)
        (work / name / "config.pbtxt").write_text(model_config(name, capability, hidden, bundle.task, options))
        _write_warmup(work / name / WARMUP, capability, serving.interface(capability, hidden, bundle.task)[0][0].name)
        (version / "model.py").write_text(MODEL_PY)
        shutil.copytree(runtime, version / "utr_runtime", ignore=shutil.ignore_patterns("__pycache__"))
        _link_tree(first or bundle.path, version / "bundle", ["manifest.json", *bundle.manifest["files"]])
        first = first or version / "bundle"


def _link_tree(source: Path, target: Path, names: list[str]) -> None:
    """The bundle's manifest and the files it lists, as hard links where the filesystem allows (else copies)."""
    target.mkdir()
    for name in names:
        try:
            os.link(source / name, target / name)
        except OSError:
            try:
                shutil.copy2(source / name, target / name)
            except OSError as e:  # name the file being written (a full disk), not the bundle's it was copied from
                raise ServeError(f"{target / name}: cannot write it ({e.strerror or e})") from None


def _write_warmup(folder: Path, capability: str, input_name: str) -> None:
    """The warm-up input: a real 3'UTR's first 200 nt (one window at any k; a mask in its middle for fill-mask), as
    Triton reads a STRING element from a file: a 4-byte little-endian length, then the bytes."""
    from utr_calibration import real_sequences

    text = real_sequences()[0][1][:200]
    text = text[:100] + "<mask>" + text[101:] if capability == "fill_mask" else text
    folder.mkdir()
    data = text.encode()
    (folder / input_name).write_bytes(len(data).to_bytes(4, "little") + data)


def model_config(name: str, capability: str, hidden_size: int, task: dict | None, options: RepositoryOptions) -> str:
    """config.pbtxt of one model: its interface (utr_runtime.serving.interface), batching, instances, parameters."""
    inputs, outputs = serving.interface(capability, hidden_size, task)

    def tensors(entries):
        return ",\n".join(f'  {{ name: "{t.name}" data_type: TYPE_{t.dtype} dims: [ {", ".join(map(str, t.dims))} ] }}' for t in entries)

    kind = "KIND_CPU" if options.device == "cpu" else "KIND_GPU"
    parameters = {"capability": capability, "bundle": "bundle", "precision": options.precision, "engine": options.engine,
                  "device": options.device, "threads": str(options.threads or ""),
                  **{name: str(value) for name, value in vars(options.limits_served()).items()}}
    source = inputs[0]
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {options.max_batch_size}",
        f"input [\n{tensors(inputs)}\n]",
        f"output [\n{tensors(outputs)}\n]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}",
        f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]",
        f'model_warmup [ {{ name: "real_3utr" batch_size: 1 inputs {{ key: "{source.name}" value: {{ data_type: TYPE_{source.dtype} '
        f'dims: [ 1 ] input_data_file: "{source.name}" }} }} }} ]',
        *(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()),
    ]
    return "\n".join(lines) + "\n"
