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

csv.field_size_limit(1 << 30)  # records are bounded by MAX_LENGTH per line instead of csv's 131,072 characters

SEQUENCE_COLUMNS = ("sequence", "seq", "sequences")
NAME_COLUMNS = ("id", "name", "identifier")
# The longest record read (nucleotides): real 3'UTRs reach tens of kb and the longest human mRNAs about 100 kb;
# an endless line (a wrong file, /dev/zero) must end in an error, not in all of the machine's memory.
MAX_LENGTH = 10_000_000


def read_sequences(source: str | os.PathLike, column: str | None = None, unique: bool = True,
                   max_length: int = MAX_LENGTH) -> Iterator[tuple[str, str]]:
    """Yield (name, sequence) from a FASTA, TSV or CSV file (gzip or not), or stdin for "-".

    The format is read from the content: '>' first means FASTA; otherwise a table whose header names a
    sequence column (`column`, or one of sequence/seq); a header-less stream is one sequence per line. A UTF-8
    byte-order mark is ignored. TSV fields are taken as they are (no CSV quoting: a stray quote in a sequence
    file must not swallow the records after it); CSV fields may be quoted but not span lines. Duplicate names
    are refused (outputs are keyed by them) unless `unique=False`, for a caller that judges them. A record or
    line longer than `max_length` characters is refused.
    """
    label = "stdin" if os.fspath(source) == "-" else os.fspath(source)
    seen: set[str] = set()
    with _open_text(source) as handle:
        try:
            for name, seq in _parse(_lines(handle, label, max_length), label, column, max_length):
                if unique:
                    if name in seen:
                        raise InputError(f"{label}: duplicate sequence id {name!r}")
                    seen.add(name)
                yield name, seq
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InputError(f"{label}: truncated or corrupt gzip data ({e})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{label}: not a text file ({e.reason} at byte {e.start})") from None


def _lines(handle: IO[str], label: str, max_length: int) -> Iterator[str]:
    """The lines of a text stream, none read past max_length characters (so an endless line costs no memory)."""
    number = 0
    while line := handle.readline(max_length + 2):
        number += 1
        if len(line) > max_length + 1 or (len(line) == max_length + 2 and not line.endswith("\n")):
            raise InputError(f"{label}: line {number} is longer than {max_length:,} characters (the record length limit)")
        yield line


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
    return io.TextIOWrapper(buffered, encoding="utf-8-sig", newline="")  # -sig: a leading byte-order mark is not text


def _parse(lines: Iterator[str], label: str, column: str | None, max_length: int) -> Iterator[tuple[str, str]]:
    first = next(lines, "")
    while first and not first.strip():
        first = next(lines, "")
    if not first:
        return
    if first.startswith(">"):
        yield from _parse_fasta(first, lines, label, max_length)
    else:
        yield from _parse_table(first, lines, label, column)


def _parse_fasta(first: str, lines: Iterable[str], label: str, max_length: int) -> Iterator[tuple[str, str]]:
    name, parts, length = _fasta_name(first, label, 1), [], 0
    for number, line in enumerate(lines, start=2):
        line = line.rstrip("\r\n")
        if line.startswith(">"):
            yield name, "".join(parts)
            name, parts, length = _fasta_name(line, label, number), [], 0
        elif line.strip():
            parts.append(line.strip())
            length += len(parts[-1])
            if length > max_length:
                raise InputError(f"{label}: record {name!r} is longer than {max_length:,} nucleotides (the record length limit)")
    yield name, "".join(parts)


def _fasta_name(header: str, label: str, number: int) -> str:
    fields = header[1:].split()
    if not fields:
        raise InputError(f"{label}: line {number}: FASTA header without an id")
    return fields[0]


def _parse_table(first: str, lines: Iterable[str], label: str, column: str | None) -> Iterator[tuple[str, str]]:
    delimiter = "\t" if "\t" in first else "," if "," in first else None
    # TSV: fields as they are. CSV: quoting allowed, since commas may be quoted, but a field may not span lines.
    quoting = {"quoting": csv.QUOTE_NONE} if delimiter != "," else {}
    header = [h.strip() for h in next(csv.reader([first], delimiter=delimiter, **quoting))] if delimiter else [first.strip()]
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
    reader = csv.reader(lines, delimiter=delimiter or "\t", **quoting)
    read = 0  # lines the reader has taken; the file's line number is one more (the header)
    for row in reader:
        if reader.line_num != read + 1:
            raise InputError(f"{label}: line {read + 2}: a quoted field runs over {reader.line_num - read} lines; "
                             "a sequence table has one record per line")
        read = reader.line_num
        line = read + 1
        if not row or not any(cell.strip() for cell in row):
            continue
        if seq_col >= len(row):
            raise InputError(f"{label}: line {line}: no value in column {header[seq_col]!r}")
        name = row[name_col].strip() if name_col is not None and name_col < len(row) else str(line - 1)
        yield name, row[seq_col].strip()


def _plain_lines(first: str, lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    number = 0
    for line in itertools.chain([first], lines):
        if line.strip():
            number += 1
            yield str(number), line.strip()
