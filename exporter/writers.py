"""Streaming writers for embeddings and predictions.

embeddings:             .npy (vectors), .npz (ids + vectors), .parquet (id, vector)
sequence predictions:   .tsv / .csv / .parquet (id, label, one column per label)
nucleotide predictions: .npz (ids, lengths, values: every sequence's rows, concatenated) or .parquet (id, values)
contact predictions:    .npz (ids, lengths n, values: every sequence's n x n rows, concatenated)
variant effects:        .tsv / .csv / .parquet (ColumnsWriter: named columns)
Regions read from a genome keep chrom, start, end and strand beside each id (.npz, .parquet, .tsv, .csv).

Rows arrive chunk by chunk and go to a hidden temporary file beside the target; `close` renames it into
place, `abort` removes it. A half-written output never carries the target's name.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from utr_runtime.errors import UtrError

FORMATS = (".npy", ".npz", ".parquet")
PREDICTION_FORMATS = {"sequence": (".tsv", ".csv", ".parquet"), "nucleotide": (".npz", ".parquet"), "contact": (".npz",)}


COORDINATES = ("chrom", "start", "end", "strand")  # of a region read from a genome (utrexport.genome), by record id
POSITIONS = ("start", "end")  # the integer ones


def open_writer(path: str | os.PathLike, dim: int, replace: bool = False, coordinates: dict | None = None):
    """A writer of embeddings: write(ids, vectors (N, dim)). replace: the finished file may replace one at `path`
    (--force); otherwise a file that appeared there meanwhile is an error and is left as it is. coordinates: id ->
    (chrom, start, end, strand), written beside each id (.npz and .parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    _check_coordinates(path, coordinates, (".npz", ".parquet"))
    if suffix == ".parquet":
        return ParquetWriter(path, lambda pa: [("vector", pa.list_(pa.float32(), dim))], _vector_columns, replace, coordinates)
    if suffix in (".npy", ".npz"):
        return NumpyWriter(path, dim, replace=replace, coordinates=coordinates)
    raise UtrError(f"{path}: output must end in {', '.join(FORMATS)}")


def open_prediction_writer(path: str | os.PathLike, task: dict, replace: bool = False, coordinates: dict | None = None):
    """A writer of predict() results for a task: write(ids, predictions) with predictions as predict() returns them."""
    path = Path(path)
    level, suffix = task["level"], path.suffix.lower()
    if suffix not in PREDICTION_FORMATS[level]:
        raise UtrError(f"{path}: {level}-level predictions are written as {', '.join(PREDICTION_FORMATS[level])}")
    n = task["num_labels"]
    if level == "sequence":
        if suffix == ".parquet":
            fields = lambda pa: [("label", pa.string())] * _decides(task) + [(name, pa.float32()) for name in task["labels"]]
            return ParquetWriter(path, fields, lambda pa, rows: _label_columns(task, rows), replace, coordinates)
        return TableWriter(path, task, replace, coordinates)
    if suffix == ".parquet":
        return ParquetWriter(path, lambda pa: [("values", pa.list_(pa.list_(pa.float32(), n)))], _ragged_columns, replace, coordinates)
    return NumpyWriter(path, n, name="values", ragged=True, replace=replace, coordinates=coordinates)


def _check_coordinates(path: Path, coordinates: dict | None, formats: tuple[str, ...]) -> None:
    if coordinates is not None and path.suffix.lower() not in formats:
        raise UtrError(f"{path}: regions read from a genome keep their coordinates beside each id: write {' or '.join(formats)}")


def _coordinate_columns(ids: list[str], coordinates: dict) -> dict:
    rows = [coordinates[i] for i in ids]
    return {name: [row[j] for row in rows] for j, name in enumerate(COORDINATES)}


def decide(task: dict, probabilities: np.ndarray) -> list[str]:
    """The label each row of sequence-level probabilities stands for: the class (multiclass), the label or its
    negation (binary), the labels at or over 0.5 joined by ';' (multilabel)."""
    names = task["labels"]
    if task["problem_type"] == "multiclass":
        return [names[i] for i in probabilities.argmax(-1)]
    if task["problem_type"] == "binary" and len(names) == 1:
        negative = task.get("negative_label") or f"not {names[0]}"
        return [names[0] if p >= 0.5 else negative for p in probabilities[:, 0]]
    return [";".join(name for name, p in zip(names, row) if p >= 0.5) for row in probabilities]


def _decides(task: dict) -> int:
    return int(task["problem_type"] != "regression")


def _vector_columns(pa, vectors: np.ndarray) -> dict:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return {"vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])}


def _label_columns(task: dict, rows) -> dict:
    values, probabilities = rows
    columns = {"label": decide(task, probabilities)} if _decides(task) else {}
    columns.update({name: np.ascontiguousarray(values[:, i], np.float32) for i, name in enumerate(task["labels"])})
    return columns


def _ragged_columns(pa, arrays: list[np.ndarray]) -> dict:
    n = arrays[0].shape[-1] if arrays else 1
    flat = pa.array(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32) if arrays else np.zeros(0, np.float32))
    rows = pa.FixedSizeListArray.from_arrays(flat, n)
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32))
    return {"values": pa.ListArray.from_arrays(offsets, rows)}


class _Atomic:
    """The output's temporary file: created beside the target with a fresh random name, exclusively (O_EXCL: a
    planted file or symlink is never followed or reused), written through its own descriptor, renamed at the end."""

    def __init__(self, path: Path, replace: bool = False):
        if path.is_dir():
            raise UtrError(f"{path}: is a folder")
        self.replace = replace  # may the output replace a file at its path (--force), or must the path be free
        if not path.parent.is_dir():
            raise UtrError(f"{path.parent}: no such folder for the output")
        self.path = path
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; the output gets what a plain open would give
        self.partial = Path(name)
        self.file = os.fdopen(fd, "w+b")
        self.rows = 0

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # a write or close that fails at the end (a full disk) leaves no partial file either
            with contextlib.suppress(Exception):
                self.abort()
            raise

    def _publish(self) -> None:
        self.file.close()
        if self.replace:
            os.replace(self.partial, self.path)
            return
        try:  # a hard link fails if the path was taken meanwhile (another run): rename would overwrite it
            os.link(self.partial, self.path)
        except FileExistsError:
            self.partial.unlink(missing_ok=True)
            raise UtrError(f"{self.path} appeared while this run wrote it (another run?); it is left as it is: pass --force to replace it") from None
        except OSError:  # a filesystem without hard links: check, then rename
            if os.path.lexists(self.path):
                self.partial.unlink(missing_ok=True)
                raise UtrError(f"{self.path} appeared while this run wrote it (another run?); it is left as it is: pass --force to replace it") from None
            os.replace(self.partial, self.path)
            return
        self.partial.unlink()

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:  # what was buffered cannot be written either (a full disk): the file goes all the same
            pass
        finally:
            self.partial.unlink(missing_ok=True)


class NumpyWriter(_Atomic):
    """Rows stream to a raw scratch file; `close` writes the .npy header (now that the row count is known) and the data.

    ragged: each record is an array of rows of its own length (nucleotides, or n x n contact pairs); the .npz then
    holds `lengths` (rows per record, or n for a contact map) and `values` (all records' rows, concatenated).
    """

    def __init__(self, path: Path, dim: int, name: str = "vectors", ragged: bool = False, replace: bool = False, coordinates: dict | None = None):
        if ragged and path.suffix.lower() != ".npz":
            raise UtrError(f"{path}: this output is ragged (one array per record): write it as .npz")
        super().__init__(path, replace)
        self.dim, self.name, self.ragged, self.coordinates = dim, name, ragged, coordinates
        self.ids: list[str] = []
        self.lengths: list[int] = []
        self.value_rows = 0
        try:
            self.scratch = tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.rows-")
        except BaseException:
            super().abort()
            raise

    def write(self, ids: list[str], vectors) -> None:
        arrays = list(vectors) if self.ragged else [vectors]
        for array in arrays:
            array = np.ascontiguousarray(array, dtype=np.float32)
            self.scratch.write(array.tobytes())
            self.value_rows += array.size // self.dim
        if self.ragged:
            self.lengths.extend(len(a) for a in arrays)
        self.ids.extend(ids)
        self.rows += len(ids)

    def _write_npy(self, out) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (self.value_rows, self.dim)}
        np.lib.format.write_array_header_1_0(out, header)
        self.scratch.seek(0)
        shutil.copyfileobj(self.scratch, out, 1 << 20)

    def close(self) -> None:
        try:
            if self.path.suffix.lower() == ".npy":
                self._write_npy(self.file)
            else:
                with zipfile.ZipFile(self.file, "w", allowZip64=True) as archive:
                    _add_array(archive, "ids", np.array(self.ids, dtype=str))
                    for column, values in (_coordinate_columns(self.ids, self.coordinates) if self.coordinates else {}).items():
                        _add_array(archive, column, np.array(values, dtype=np.int64 if column in POSITIONS else str))
                    if self.ragged:
                        _add_array(archive, "lengths", np.array(self.lengths, dtype=np.int64))
                    with archive.open(f"{self.name}.npy", "w", force_zip64=True) as out:
                        self._write_npy(out)
            self._publish()
        finally:
            self.scratch.close()
            self.file.close()
            self.partial.unlink(missing_ok=True)

    def abort(self) -> None:
        self.scratch.close()
        super().abort()


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike, force: bool, input: str | None = None, replaceable=None, error: type = UtrError) -> None:
    """One overwrite policy for every output (a file, a bundle, a repository), checked before the work: nothing at
    `path`; or, with --force, what `replaceable(path)` allows (it returns why not, or None; default: a regular file or
    a symlink, which is replaced, never written through), and never the input itself."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if input and input != "-" and os.path.exists(input) and os.path.exists(path) and os.path.samefile(input, path):
        raise error(f"{path} is the input {input}: writing it would destroy the input; choose another output")
    if not force:
        raise error(f"{path} exists; pass --force to replace it")
    why = (replaceable or _replaceable_file)(path)
    if why:
        raise error(why)


def _replaceable_file(path: str) -> str | None:
    if os.path.islink(path) or os.path.isfile(path):
        return None
    return f"{path} is not a regular file (a device, a fifo, a folder?); --force replaces files only"


def write_atomic(path: str | os.PathLike, data: bytes | None = None, write=None) -> None:
    """A file written whole or not at all, through the same safe temporary file as every output (replacing the file
    at `path`, or a symlink there, never the file it points to): `data`, or what `write(file)` writes."""
    out = _Atomic(Path(path), replace=True)
    try:
        out.file.write(data) if write is None else write(out.file)
        out._publish()
    except BaseException:
        out.abort()
        raise


def _add_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    archive.writestr(f"{name}.npy", buffer.getvalue())


class TableWriter(_Atomic):
    """Sequence-level predictions as a TSV or CSV table: id, label (not for regression), one column per label."""

    def __init__(self, path: Path, task: dict, replace: bool = False, coordinates: dict | None = None):
        super().__init__(path, replace)
        self.task, self.coordinates = task, coordinates
        self.text, self.table = _csv_table(self.file, path)
        self.table.writerow(["id"] + list(COORDINATES if coordinates else ()) + ["label"] * _decides(task) + list(task["labels"]))

    def write(self, ids: list[str], rows) -> None:
        values, probabilities = rows
        decided = decide(self.task, probabilities) if _decides(self.task) else [None] * len(ids)
        for name, label, row in zip(ids, decided, values):
            located = list(self.coordinates[name]) if self.coordinates else []
            self.table.writerow([name] + located + ([label] if label is not None else []) + [f"{v:.6g}" for v in row])
        self.rows += len(ids)

    def close(self) -> None:
        self.text.flush()
        self._publish()


class ParquetWriter(_Atomic):
    """An `id` column and the columns `fields(pa)` names, filled by `columns(pa, rows)` for each chunk."""

    def __init__(self, path: Path, fields, columns, replace: bool = False, coordinates: dict | None = None):
        pa, pq = _pyarrow()  # before the temporary file exists: the import is slow, and may fail or be interrupted
        self.pa, self.columns, self.coordinates = pa, columns, coordinates
        located = [(name, pa.int64() if name in POSITIONS else pa.string()) for name in COORDINATES] if coordinates else []
        self.schema = pa.schema([("id", pa.string()), *located, *fields(pa)])
        super().__init__(path, replace)
        try:
            self.writer = pq.ParquetWriter(self.file, self.schema)
        except BaseException:
            super().abort()
            raise

    def write(self, ids: list[str], rows) -> None:
        pa = self.pa
        located = _coordinate_columns(ids, self.coordinates) if self.coordinates else {}
        columns = {"id": pa.array(ids, pa.string()), **located, **self.columns(pa, rows)}
        self.writer.write_table(pa.Table.from_pydict(columns, schema=self.schema))
        self.rows += len(ids)

    def close(self) -> None:
        self.writer.close()
        self._publish()

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 -- its footer cannot be written (a full disk): the file is removed all the same
            pass
        finally:
            super().abort()


class ColumnsWriter:
    """A table of named columns, `id` first (.tsv, .csv or .parquet), written chunk by chunk: write({name: values}).
    The columns are those of the first chunk; a half-written table never carries the target's name."""

    def __init__(self, path: str | os.PathLike, replace: bool = False):
        self.path, self.replace, self.out = Path(path), replace, None
        if self.path.suffix.lower() not in (".tsv", ".csv", ".parquet"):
            raise UtrError(f"{self.path}: the table must end in .tsv, .csv or .parquet")
        if self.path.suffix.lower() == ".parquet":
            _pyarrow()  # before any model work

    @property
    def rows(self) -> int:
        return self.out.rows if self.out else 0

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if self.out is None:
            if kind is None:
                raise UtrError("nothing to write")
            return
        self.out.__exit__(kind, value, tb)

    def write(self, columns: dict) -> None:
        rest = {name: values for name, values in columns.items() if name != "id"}
        if self.out is None:
            self.out = self._open(rest)
        self.out.write(columns["id"], rest)

    def _open(self, first: dict):
        if self.path.suffix.lower() == ".parquet":
            schema = _pyarrow()[0].Table.from_pydict(first).schema
            return ParquetWriter(self.path, lambda pa: list(zip(schema.names, schema.types)), lambda pa, rows: rows, self.replace)
        return _CsvColumns(self.path, list(first), self.replace)


class _CsvColumns(_Atomic):
    """ColumnsWriter's TSV or CSV table: floats to 6 significant digits, as TableWriter writes them."""

    def __init__(self, path: Path, names: list[str], replace: bool):
        super().__init__(path, replace)
        self.text, self.table = _csv_table(self.file, path)
        self.table.writerow(["id", *names])

    def write(self, ids: list[str], columns: dict) -> None:
        cells = [[f"{v:.6g}" if isinstance(v, (float, np.floating)) else v for v in values] for values in columns.values()]
        self.table.writerows(zip(ids, *cells))
        self.rows += len(ids)

    def close(self) -> None:
        self.text.flush()
        self._publish()


def _csv_table(file, path: Path):
    """(text stream, csv writer) over a binary file: tab-separated for .tsv, comma-separated otherwise."""
    text = io.TextIOWrapper(file, encoding="utf-8", newline="")
    return text, csv.writer(text, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", lineterminator="\n")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UtrError("parquet output needs pyarrow: pip install 'utrexport[parquet]'") from None
    return pa, pq
