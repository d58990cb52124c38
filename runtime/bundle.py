"""The bundle: a folder that is the whole contract between the exporter and the runtime.

    manifest.json      what is in the folder: model, k, tokenizer, inputs/outputs, one ONNX file per precision,
                       engines, parity results, and the sha256 of every other file
    tokenizer.json     the KmerTokenizer spec
    model.<precision>.onnx
    model.int8-openvino.xml/.bin   OpenVINO's own int8 (IR), where it measured closer to fp32 than model.int8.onnx
    fixtures.npz       token ids and masks of real sequences with float32 PyTorch reference outputs

Reading a bundle checks the manifest and format version; every file is checked against its checksum before it
is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from .errors import BundleError
from .tokenizer import KmerTokenizer

FORMAT = "utr-bundle"
FORMAT_VERSION = 2  # 2: integer window starts, optional LM positions, conformance.json
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")  # model files a bundle may hold
# The operators the exporter writes: every head level, problem type and activation, both attention forms, every precision
# (collected from such builds; every bundle the tests build loads through this check). A model holding another (a Loop
# that never ends, say) is not run.
ALLOWED_OPS = {("", op) for op in (
    "Add", "And", "Attention", "Cast", "Concat", "DequantizeLinear", "Div", "Expand", "Gather", "GatherElements", "Gelu", "Gemm",
    "Greater", "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Max", "Mul", "Not", "QuantizeLinear", "Range",
    "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
    "Where",
)}
OPENVINO_IR = "openvino-ir"  # a variant's "format" when it is an OpenVINO IR (file: the .xml, weights: the .bin)


class OpenVinoIr(NamedTuple):
    """An OpenVINO IR model as checked bytes: OpenVINO reads it from memory, so no path in the XML is ever followed."""

    xml: bytes
    weights: bytes


# bf16 is no file: the fp32 model run with bf16 inference (OpenVINO, CPUs with native bf16).
RUNTIME_PRECISIONS = PRECISIONS + ("bf16",)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Bundle:
    """A bundle folder whose manifest has been read and whose files have been checked."""

    def __init__(self, path: str | os.PathLike, check: bool = True):
        """Read and check the manifest. With `check`, each file's checksum is checked when it is first opened
        (`file`), so loading one precision hashes that model and the tokenizer, not the whole bundle;
        `check_files` checks them all (verify does)."""
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.check = check
        self._checked: set[str] = set()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, k={self.k}, precisions={self.precisions})"

    @property
    def k(self) -> int:
        return int(self.manifest["model"]["k"])

    @property
    def max_tokens(self) -> int:
        return int(self.manifest["max_tokens"])

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.manifest["models"]]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    @property
    def engines(self) -> dict[str, dict]:
        """TensorRT engine records by precision (written by `utrexport engine`)."""
        return self.manifest.get("engines", {})

    @property
    def trained(self) -> bool:
        """False for seeded random-init weights (`utrexport build --random-init`)."""
        return self.manifest["model"].get("trained") is not False

    @property
    def has_lm_head(self) -> bool:
        return "logits" in self.output_names

    @property
    def task(self) -> dict | None:
        """A task head's record (level, problem_type, num_labels, labels, ...) with k, or None for a plain encoder."""
        task = self.manifest.get("task")
        return {**task, "k": self.k} if task else None

    def file(self, name: str) -> Path:
        """A file the runtime may open: a plain name inside the bundle, listed in the manifest with its checksum,
        and a regular file (not a link, which could point anywhere, nor a fifo or device, which would hang)."""
        path = self._listed(name)
        if self.check:
            self._check_sum(name, path)
        return path

    def _listed(self, name: str) -> Path:
        path = self.new_file(name)
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: {name} is not listed with a checksum in the manifest; it is not opened")
        _regular(path, self.path, name)
        return path

    def read(self, name: str) -> bytes:
        """A file's bytes, checked against its checksum: the very bytes that were hashed are the ones returned, so a
        file swapped after the check is never what runs."""
        path = self._listed(name)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BundleError(f"{self.path}: {name} is not a regular file; it is not opened")
            data = f.read()
        if self.check:
            if hashlib.sha256(data).hexdigest() != self.manifest["files"][name]:
                raise BundleError(f"{self.path}: checksum mismatch for {name} (the file is corrupted or was changed)")
            self._checked.add(name)
        return data

    def read_model(self, name: str) -> "bytes | OpenVinoIr":
        """A model's checked bytes: an OpenVINO IR variant's XML and weights, or an ONNX model's, judged before any
        engine sees them: no data from other files (the manifest checks none), no subgraphs or functions, only
        operators the exporter writes, and a position table that covers max_tokens (longer windows would run past it)."""
        from .onnx_facts import NotAModel, model_facts

        ir = self._ir_variant(name)
        if ir:
            return OpenVinoIr(self.read(name), self.read(ir["weights"]))
        data = self.read(name)
        try:
            facts = model_facts(data)
        except NotAModel as e:
            raise BundleError(f"{self.path}: {name} is not a well-formed ONNX model ({e})") from None
        if facts.external:
            raise BundleError(f"{self.path}: {name} reads tensor {facts.external[0]!r} from another file, which no checksum covers; refused")
        foreign = sorted(f"{domain + '.' if domain else ''}{op}" for domain, op in facts.ops - ALLOWED_OPS)
        if foreign or facts.subgraphs or facts.functions:
            what = f"operator {foreign[0]}" if foreign else "a subgraph or function"
            raise BundleError(f"{self.path}: {name} holds {what}, which utrexport never writes; refused")
        positions = [dims[0] for key, dims in facts.initializers.items() if key.endswith("position_embeddings.weight") and dims]
        if not positions or positions[0] < self.max_tokens:
            table = f"has {positions[0]} positions" if positions else "has no position table"
            raise BundleError(f"{self.path}: max_tokens is {self.max_tokens}, but {name} {table}; refused")
        return data

    def _check_sum(self, name: str, path: Path) -> None:
        if name not in self._checked:
            if sha256_file(path) != self.manifest["files"][name]:
                raise BundleError(f"{self.path}: checksum mismatch for {name} (the file is corrupted or was changed)")
            self._checked.add(name)

    def new_file(self, name: str) -> Path:
        """Where a file of this name lives in the bundle (to write it): the name must stay inside the folder."""
        if not _plain_name(name):
            raise BundleError(f"{self.path}: the manifest names a file {name!r}: only plain names inside the bundle are allowed")
        return self.path / name

    def model_name(self, precision: str, device: str = "cpu", engine: str = "onnxruntime") -> str:
        """The model file a precision runs on an engine: bf16 runs the fp32 file; where the manifest names a
        variant for this device or engine, that one: int8 on ONNX Runtime's "cpu" (its fast u8s8 scheme), int8 for
        "tensorrt" (Q/DQ around fp16 float parts; what `utrexport engine` builds from), int8 on "openvino" (NNCF's IR,
        where the build kept it). Bundles without such a variant run the precision's own file."""
        entry = self._model_entry(precision)
        variant = entry.get("variants", {}).get(device if engine == "onnxruntime" else engine)
        return (variant or entry)["file"]

    def model_file(self, precision: str, device: str = "cpu", engine: str = "onnxruntime") -> Path:
        return self.file(self.model_name(precision, device, engine))

    def model_names(self, precision: str, engine: str | None = None) -> dict[str, str]:
        """Every model file of a precision, by label: the precision itself and "<precision>/<variant>"; with an
        engine, those it runs (an OpenVINO IR runs on OpenVINO only)."""
        entry = self._model_entry(precision)
        names = {precision: entry["file"], **{f"{precision}/{name}": v["file"] for name, v in entry.get("variants", {}).items()}}
        return {label: name for label, name in names.items() if engine in (None, "openvino") or not self._ir_variant(name)}

    def model_variants(self, precision: str, engine: str | None = None) -> dict[str, Path]:
        return {label: self.file(name) for label, name in self.model_names(precision, engine).items()}

    def _ir_variant(self, name: str) -> dict | None:
        """The variant record of an OpenVINO IR file of this name, if it is one."""
        return next((v for entry in self.manifest["models"].values() for v in entry.get("variants", {}).values()
                     if v["file"] == name and v.get("format") == OPENVINO_IR), None)

    def _model_entry(self, precision: str) -> dict:
        if precision not in RUNTIME_PRECISIONS:
            raise BundleError(f"unknown precision {precision!r}; choose one of {', '.join(RUNTIME_PRECISIONS)}")
        if precision in self.manifest.get("left_out", {}):
            raise BundleError(f"{self.path}: {precision} was left out of this bundle at build time: it did not pass its accuracy gate")
        stored = "fp32" if precision == "bf16" else precision
        if stored not in self.manifest["models"]:
            present = ", ".join(self.precisions) or "none"
            raise BundleError(f"{self.path}: no {stored} model in this bundle (present: {present}); rebuild it with --precision {stored}")
        return self.manifest["models"][stored]

    def tokenizer(self) -> KmerTokenizer:
        try:
            tokenizer = KmerTokenizer.from_file(self.file(self.manifest["tokenizer"]))
        except (OSError, ValueError, RecursionError) as e:
            raise BundleError(f"{self.path}: bad tokenizer spec: {e}") from None
        if tokenizer.k != self.k:
            raise BundleError(f"{self.path}: tokenizer is {tokenizer.k}-mer but the model is {self.k}-mer")
        return tokenizer

    def check_files(self) -> None:
        """Every file the manifest lists exists and has its recorded sha256."""
        for name in self.manifest["files"]:
            self._check_sum(name, self.file(name))


def _files_by_key(entries) -> bool:
    """An object whose values are objects naming a 'file'."""
    return isinstance(entries, dict) and all(isinstance(v, dict) and isinstance(v.get("file"), str) for v in entries.values())


def _plain_name(name) -> bool:
    """A file name that stays inside the bundle folder: no path separators, no '..', not the manifest itself."""
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and not any(c in name for c in "/\\\0") \
        and name == os.path.basename(name)


def _regular(path: Path, bundle: Path, name: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise BundleError(f"{bundle}: missing file {name} (the bundle is incomplete)") from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise BundleError(f"{bundle}: {name} is {kind}; a bundle holds regular files only")


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle, or an unfinished one")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or text, a 5,000-digit number, nesting past Python's stack
        raise BundleError(f"{manifest_file}: not valid JSON ({str(e)[:200] or type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_file}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{manifest_file}: bundle format version {version!r}, this runtime reads version {FORMAT_VERSION}; rebuild the bundle or upgrade utrexport")
    for key in ("model", "max_tokens", "tokenizer", "inputs", "outputs", "models", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_file}: missing {key!r}")
    _check_schema(manifest, manifest_file)
    return manifest


def _check_schema(m: dict, where: Path) -> None:
    """The manifest's fields the runtime relies on have the types it relies on; one line naming the first that does not."""

    def fail(what: str):
        raise BundleError(f"{where}: malformed manifest: {what}")

    def names(entries) -> bool:
        return isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries)

    model = m["model"]
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        fail("'model' must be an object with a 'config' object")
    if type(model.get("k")) is not int or not 1 <= model["k"] <= 8:
        fail(f"model k must be an integer from 1 to 8, not {model.get('k')!r}")
    if type(model["config"].get("hidden_size")) is not int or model["config"]["hidden_size"] < 1:
        fail("model config hidden_size must be a positive integer")
    if type(m["max_tokens"]) is not int or not 3 <= m["max_tokens"] <= 1 << 16:
        fail(f"max_tokens must be an integer from 3 to 65536, not {m['max_tokens']!r}")
    if not isinstance(m["files"], dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m["files"].items()):
        fail("'files' must map file names to sha256 strings")
    outside = [name for name in m["files"] if not _plain_name(name)]
    if outside:
        fail(f"the manifest names a file {outside[0]!r}: only plain names inside the bundle are allowed")
    if not _files_by_key(m["models"]) or not all(_files_by_key(v.get("variants", {})) for v in m["models"].values()):
        fail("'models' must map precisions to objects with a 'file' (and 'variants' devices to such objects)")
    if not all(isinstance(v.get("weights"), str) for e in m["models"].values() for v in e.get("variants", {}).values()
               if v.get("format") == OPENVINO_IR):
        fail(f"a variant of format {OPENVINO_IR!r} must name its 'weights' file")
    if not isinstance(m.get("left_out", {}), dict) or not all(isinstance(v, list) for v in m.get("left_out", {}).values()):
        fail("'left_out' must map precisions to the failures that left them out")
    engines = m.get("engines", {})
    if not _files_by_key(engines) or not all(isinstance(e.get(key), str) for e in engines.values() for key in ("tensorrt", "gpu", "compute_capability")):
        fail("'engines' must map precisions to TensorRT engine records (file, tensorrt, gpu, compute_capability)")
    if not names(m["inputs"]) or not names(m["outputs"]):
        fail("'inputs' and 'outputs' must be lists of objects with a 'name'")
    if [i["name"] for i in m["inputs"]][:2] != ["input_ids", "attention_mask"] or "last_hidden_state" not in [o["name"] for o in m["outputs"]]:
        fail("the model must take input_ids and attention_mask and give last_hidden_state")
    if not isinstance(m["tokenizer"], str):
        fail("'tokenizer' must be a file name")
    task = m.get("task")
    if task is not None:
        _check_task(task, fail)


TASK_LEVELS = ("sequence", "nucleotide", "contact")
PROBLEM_TYPES = ("binary", "multiclass", "multilabel", "regression")
MAX_LABELS = 65536  # task outputs: far above any real head, far below what would exhaust memory
RESERVED_LABELS = ("id", "label")  # columns of their own in every prediction table
# Control characters: tabs and line breaks split table rows, escapes reach terminals, NumPy strips trailing NULs.
# Never in a label or an id.
NOT_PRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_task(task, fail) -> None:
    """The task record predict() and the writers rely on: known values, and labels that can name columns."""
    if not isinstance(task, dict) or task.get("level") not in TASK_LEVELS or task.get("problem_type") not in PROBLEM_TYPES:
        fail(f"'task' must give a level ({', '.join(TASK_LEVELS)}) and a problem_type ({', '.join(PROBLEM_TYPES)})")
    n, labels, negative = task.get("num_labels"), task.get("labels"), task.get("negative_label")
    if type(n) is not int or not 1 <= n <= MAX_LABELS or (task["problem_type"] == "multiclass" and n < 2):
        fail(f"task num_labels must be an integer from {2 if task['problem_type'] == 'multiclass' else 1} to {MAX_LABELS}, not {n!r}")
    names = labels + ([negative] if negative is not None else []) if isinstance(labels, list) else None
    if names is None or len(labels) != n or not all(isinstance(x, str) and x and not NOT_PRINTABLE.search(x) for x in names):
        fail(f"task labels must be {n} printable names (num_labels)")
    if len(set(labels)) < n or set(RESERVED_LABELS) & set(labels):
        fail("task labels must be distinct and not 'id' or 'label' (each names a column of its own)")


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json last, atomically: a folder without it is not a bundle."""
    path = Path(path)
    tmp = path / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path / MANIFEST)
