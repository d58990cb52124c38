"""Streaming readers for sequence files: FASTA (plain, gzip, bzip2 or xz), TSV/CSV with a sequence column, stdin.

Each reader yields `(name, sequence)` pairs one at a time, so memory stays bounded whatever the file size.
"""

from __future__ import annotations

import csv
import bz2
import gzip
import io
import itertools
import lzma
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
    """Yield (name, sequence) from a FASTA, TSV or CSV file (plain, gzip, bzip2 or xz), or stdin for "-".

    The format is read from the content: '>' first means FASTA (after comment lines starting with '#' or ';',
    which are skipped inside it too); otherwise a table whose header names a sequence column (`column`, or one of
    sequence/seq); a header-less stream is one sequence per line, and a line with spaces or a '>' there is refused
    (a space-separated table, a FASTA with text before its first header). A UTF-8
    byte-order mark is ignored. TSV fields are taken as they are (no CSV quoting: a stray quote in a sequence
    file must not swallow the records after it); CSV fields may be quoted but not span lines. Duplicate names
    are refused (outputs are keyed by them) unless `unique=False`, for a caller that judges them. A record or
    line longer than `max_length` characters is refused.
    """
    label = _label(source)
    seen: set[str] = set()
    with open_text(source) as handle:
        try:
            for name, seq in _parse(_lines(handle, label, max_length), label, column, max_length):
                if unique:
                    if name in seen:
                        raise InputError(f"{label}: duplicate sequence id {name!r}")
                    seen.add(name)
                yield name, seq
        except (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError) as e:
            raise InputError(f"{label}: truncated or corrupt compressed data ({e})") from None
        except OSError as e:  # bz2's corrupt data, or the disk's read error
            raise InputError(f"{label}: cannot be read ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{label}: not a text file ({e.reason} at byte {e.start})") from None


def _label(source) -> str:
    return "stdin" if os.fspath(source) == "-" else os.fspath(source)


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


def open_text(source) -> IO[str]:
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
    start = buffered.peek(6)[:6]
    if start.startswith(b"\x1f\x8b"):
        buffered = gzip.GzipFile(fileobj=buffered)
    elif start.startswith(b"BZh"):
        buffered = bz2.BZ2File(buffered)
    elif start.startswith(b"\xfd7zXZ\x00"):
        buffered = lzma.LZMAFile(buffered)
    elif start.startswith((b"\x28\xb5\x2f\xfd", b"PK\x03\x04")):
        kind = "zstd" if start[0] == 0x28 else "zip"
        raise InputError(f"{_label(source)}: {kind}-compressed; gzip, bzip2 and xz are read (or decompress it and pipe it in)")
    return io.TextIOWrapper(buffered, encoding="utf-8-sig", newline="")  # -sig: a leading byte-order mark is not text


COMMENTS = ("#", ";")  # comment lines: before a FASTA's first header, and inside it; before a table


def _parse(lines: Iterator[str], label: str, column: str | None, max_length: int) -> Iterator[tuple[str, str]]:
    first, comments, number = next(lines, ""), [], 1
    while first and (not first.strip() or first.startswith(COMMENTS)):
        comments += [first] if first.strip() else []
        first, number = next(lines, ""), number + 1
    if not first:
        return
    if first.startswith(">"):
        yield from _parse_fasta(first, lines, label, max_length, number)
        return
    if comments and not _names_column(first, column) and _names_column(comments[-1][1:], column):
        # a "#id<TAB>sequence" header, as some tools write it
        first, lines, number = comments[-1][1:], itertools.chain([first], lines), number - 1
    yield from _parse_table(first, lines, label, column, number)


def _names_column(line: str, column: str | None) -> bool:
    cells = {cell.strip().lower() for cell in line.replace(",", "\t").split("\t")}
    return bool(cells & ({column.lower()} if column else set(SEQUENCE_COLUMNS)))


def _parse_fasta(first: str, lines: Iterable[str], label: str, max_length: int, start: int) -> Iterator[tuple[str, str]]:
    name, parts, length = _fasta_name(first, label, start), [], 0
    for number, line in enumerate(lines, start=start + 1):
        line = line.rstrip("\r\n")
        if line.startswith(COMMENTS):
            continue
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


def _parse_table(first: str, lines: Iterable[str], label: str, column: str | None, start: int) -> Iterator[tuple[str, str]]:
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
        yield from _plain_lines(first, lines, label, start)
        return
    name_col = next((lowered.index(c) for c in NAME_COLUMNS if c in lowered), None)
    reader = csv.reader(lines, delimiter=delimiter or "\t", **quoting)
    read = 0  # lines the reader has taken; the file's line number is `start` more (the header and the lines before it)
    for row in reader:
        if reader.line_num != read + 1:
            raise InputError(f"{label}: line {read + start + 1}: a quoted field runs over {reader.line_num - read} lines; "
                             "a sequence table has one record per line")
        read = reader.line_num
        line = read + start
        if not row or not any(cell.strip() for cell in row):
            continue
        if seq_col >= len(row):
            raise InputError(f"{label}: line {line}: no value in column {header[seq_col]!r}")
        name = row[name_col].strip() if name_col is not None and name_col < len(row) else str(read)
        yield name, row[seq_col].strip()


def _plain_lines(first: str, lines: Iterable[str], label: str, start: int) -> Iterator[tuple[str, str]]:
    """One sequence per line. A line with spaces, or one that starts like a FASTA header or a comment, means the
    file is something else (a space-separated table, a FASTA with text before its first header): refused, not
    read as sequences."""
    number = 0
    for line_number, line in enumerate(itertools.chain([first], lines), start=start):
        text = line.strip()
        if not text:
            continue
        if len(text.split()) > 1 or text.startswith((">",) + COMMENTS):
            what = "holds spaces" if len(text.split()) > 1 else f"starts with {text[0]!r}"
            raise InputError(f"{label}: line {line_number} {what}, so this is not one sequence per line; a FASTA starts with "
                             f"'>' (after '#' or ';' comment lines), a table has tab- or comma-separated columns and a header "
                             f"naming a {' or '.join(SEQUENCE_COLUMNS[:2])} column")
        number += 1
        yield str(number), text
