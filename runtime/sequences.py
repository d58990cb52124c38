"""Streaming readers for sequence files: FASTA (plain or gzip), TSV/CSV with a sequence column, stdin.

Each reader yields `(name, sequence)` pairs one at a time, so memory stays bounded whatever the file size.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import os
import sys
import zlib
from typing import IO, Iterable, Iterator

from .errors import InputError

SEQUENCE_COLUMNS = ("sequence", "seq", "sequences")
NAME_COLUMNS = ("id", "name", "identifier")


def read_sequences(source: str | os.PathLike, column: str | None = None, unique: bool = True) -> Iterator[tuple[str, str]]:
    """Yield (name, sequence) from a FASTA, TSV or CSV file (gzip or not), or stdin for "-".

    The format is read from the content: '>' first means FASTA; otherwise a table whose header names a
    sequence column (`column`, or one of sequence/seq); a header-less stream is one sequence per line.
    Duplicate names are refused (outputs are keyed by them) unless `unique=False`, for a caller that judges them.
    """
    label = "stdin" if os.fspath(source) == "-" else os.fspath(source)
    seen: set[str] = set()
    with _open_text(source) as handle:
        try:
            for name, seq in _parse(handle, label, column):
                if unique:
                    if name in seen:
                        raise InputError(f"{label}: duplicate sequence id {name!r}")
                    seen.add(name)
                yield name, seq
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InputError(f"{label}: truncated or corrupt gzip data ({e})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{label}: not a text file ({e.reason} at byte {e.start})") from None


def read_fasta(source: str | os.PathLike) -> list[tuple[str, str]]:
    """All records of a FASTA file, as a list."""
    return list(read_sequences(source))


def _open_text(source) -> IO[str]:
    if os.fspath(source) == "-":
        raw = sys.stdin.buffer
    else:
        try:
            raw = open(source, "rb")
        except FileNotFoundError:
            raise InputError(f"{os.fspath(source)}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{os.fspath(source)}: is a folder, not a sequence file") from None
    buffered = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        buffered = gzip.GzipFile(fileobj=buffered)
    return io.TextIOWrapper(buffered, encoding="utf-8", newline="")


def _parse(handle: IO[str], label: str, column: str | None) -> Iterator[tuple[str, str]]:
    first = handle.readline()
    while first and not first.strip():
        first = handle.readline()
    if not first:
        return
    if first.startswith(">"):
        yield from _parse_fasta(first, handle, label)
    else:
        yield from _parse_table(first, handle, label, column)


def _parse_fasta(first: str, lines: Iterable[str], label: str) -> Iterator[tuple[str, str]]:
    name, parts = _fasta_name(first, label, 1), []
    for number, line in enumerate(lines, start=2):
        line = line.rstrip("\r\n")
        if line.startswith(">"):
            yield name, "".join(parts)
            name, parts = _fasta_name(line, label, number), []
        elif line.strip():
            parts.append(line.strip())
    yield name, "".join(parts)


def _fasta_name(header: str, label: str, number: int) -> str:
    fields = header[1:].split()
    if not fields:
        raise InputError(f"{label}: line {number}: FASTA header without an id")
    return fields[0]


def _parse_table(first: str, lines: Iterable[str], label: str, column: str | None) -> Iterator[tuple[str, str]]:
    delimiter = "\t" if "\t" in first else "," if "," in first else None
    header = [h.strip() for h in next(csv.reader([first], delimiter=delimiter))] if delimiter else [first.strip()]
    lowered = [h.lower() for h in header]
    wanted = [column.lower()] if column else list(SEQUENCE_COLUMNS)
    seq_col = next((lowered.index(c) for c in wanted if c in lowered), None)
    if seq_col is None:
        if column or delimiter:
            raise InputError(f"{label}: no {' or '.join(repr(c) for c in wanted)} column in header {header}")
        # Header-less: one sequence per line, named by line number.
        yield from _plain_lines(first, lines)
        return
    name_col = next((lowered.index(c) for c in NAME_COLUMNS if c in lowered), None)
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter or "\t"), start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if seq_col >= len(row):
            raise InputError(f"{label}: line {number}: no value in column {header[seq_col]!r}")
        name = row[name_col].strip() if name_col is not None and name_col < len(row) else str(number - 1)
        yield name, row[seq_col].strip()


def _plain_lines(first: str, lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    number = 0
    for line in itertools.chain([first], lines):
        if line.strip():
            number += 1
            yield str(number), line.strip()
