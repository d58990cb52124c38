"""Streaming writers for embeddings: .npy (vectors), .npz (ids + vectors), .parquet (id, vector).

Rows arrive chunk by chunk and go to a hidden temporary file beside the target; `close` renames it into
place, `abort` removes it. A half-written output never carries the target's name.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from utr_runtime.errors import UtrError

FORMATS = (".npy", ".npz", ".parquet")


def open_writer(path: str | os.PathLike, dim: int):
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetWriter(path, dim)
    if suffix in (".npy", ".npz"):
        return NumpyWriter(path, dim)
    raise UtrError(f"{path}: output must end in {', '.join(FORMATS)}")


class _Atomic:
    def __init__(self, path: Path):
        if path.is_dir():
            raise UtrError(f"{path}: is a folder")
        if not path.parent.is_dir():
            raise UtrError(f"{path.parent}: no such folder for the output")
        self.path = path
        self.partial = path.parent / f".{path.name}.partial-{os.getpid()}"
        self.rows = 0

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.close() if kind is None else self.abort()

    def abort(self) -> None:
        self.partial.unlink(missing_ok=True)


class NumpyWriter(_Atomic):
    """Vectors stream to a raw scratch file; `close` writes the .npy header (now that N is known) and the data."""

    def __init__(self, path: Path, dim: int):
        super().__init__(path)
        self.dim = dim
        self.ids: list[str] = []
        self.scratch = tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.rows-")

    def write(self, ids: list[str], vectors: np.ndarray) -> None:
        self.scratch.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
        self.ids.extend(ids)
        self.rows += len(ids)

    def _write_npy(self, out) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (self.rows, self.dim)}
        np.lib.format.write_array_header_1_0(out, header)
        self.scratch.seek(0)
        shutil.copyfileobj(self.scratch, out, 1 << 20)

    def close(self) -> None:
        try:
            if self.path.suffix.lower() == ".npy":
                with open(self.partial, "wb") as out:
                    self._write_npy(out)
            else:
                with zipfile.ZipFile(self.partial, "w", allowZip64=True) as archive:
                    buffer = io.BytesIO()
                    np.save(buffer, np.array(self.ids, dtype=str))
                    archive.writestr("ids.npy", buffer.getvalue())
                    with archive.open("vectors.npy", "w", force_zip64=True) as out:
                        self._write_npy(out)
            os.replace(self.partial, self.path)
        finally:
            self.scratch.close()
            self.partial.unlink(missing_ok=True)

    def abort(self) -> None:
        self.scratch.close()
        super().abort()


class ParquetWriter(_Atomic):
    def __init__(self, path: Path, dim: int):
        super().__init__(path)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UtrError("parquet output needs pyarrow: pip install 'utrexport[parquet]'") from None
        self.pa = pa
        self.schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])
        self.writer = pq.ParquetWriter(str(self.partial), self.schema)

    def write(self, ids: list[str], vectors: np.ndarray) -> None:
        pa = self.pa
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        self.writer.write_table(pa.Table.from_arrays([pa.array(ids, pa.string()), column], schema=self.schema))
        self.rows += len(ids)

    def close(self) -> None:
        self.writer.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.writer.close()
        super().abort()
