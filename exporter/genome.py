"""Sequences from coordinates: regions of a genome FASTA described by a BED or GTF/GFF3 file, strand-aware.

A region is a transcript's blocks on one chromosome strand, in genome order (0-based, half-open). Its sequence is
the blocks' bases joined in genome order, reverse-complemented on the minus strand, so it reads 5' to 3' as the
transcript does. The genome is read with pyfaidx (an indexed FASTA, plain or bgzip; the index is made beside it
on first use).

The annotation files are read here with the csv module: BED and GTF/GFF3 are tab-separated lines whose few
columns this needs (and GTF's attribute column, two small grammars); the libraries that parse them (pyranges,
gtfparse, pysam) bring compiled dependencies and their own data frames for what is a line split, and none checks
what matters here with an error naming the record: blocks that overlap or run out of order, an empty region.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from typing import Iterator

from utr_runtime.errors import InputError
from utr_runtime.sequences import open_text

FEATURES = ("three_prime_utr", "3utr", "three_prime_UTR")  # the default --feature, in any letter case
COMPLEMENT = str.maketrans("ACGTUNacgtunRYKMrykmBDHVbdhvSWsw", "TGCAANtgcaanYRMKyrmkVHDBvhdbSWsw")  # DNA letters, as the genome


@dataclass(frozen=True)
class Region:
    id: str
    chrom: str
    strand: str  # "+" or "-"
    blocks: tuple[tuple[int, int], ...]  # (start, end), 0-based half-open, in genome order
    where: str  # the record it came from, for errors: "FILE line N" or "FILE transcript ID"

    @property
    def start(self) -> int:
        return self.blocks[0][0]

    @property
    def end(self) -> int:
        return self.blocks[-1][1]

    @property
    def length(self) -> int:
        return sum(e - s for s, e in self.blocks)

    def offset(self, genome_position: int) -> int | None:
        """The 0-based position in the region's sequence (5' to 3') of a 0-based genome position, or None outside."""
        before = 0
        for s, e in self.blocks:
            if s <= genome_position < e:
                forward = before + genome_position - s
                return forward if self.strand != "-" else self.length - 1 - forward
            before += e - s
        return None


def problem(region: Region) -> str | None:
    """Why a region cannot be read (before the genome is looked at), or None."""
    if not region.blocks or region.length == 0:
        return "empty region"
    if any(s < 0 or e < s for s, e in region.blocks):
        return "a block ends before it starts"
    for (_, e), (s, _) in zip(region.blocks, region.blocks[1:]):
        if s < e:
            return "blocks overlap or are out of order"
    return None


def _index_fits(path: str, index: str) -> bool:
    """Whether a FASTA index (.fai) describes this plain FASTA: each record's header line ends where its sequence starts,
    and its last base is inside the file. (A .fai newer than its FASTA is trusted by pyfaidx whatever it says.) A
    compressed genome's index counts uncompressed bytes: pyfaidx checks that one itself."""
    with open(path, "rb") as fasta:
        if fasta.read(2) == b"\x1f\x8b":
            return True
        size = os.fstat(fasta.fileno()).st_size
        try:
            with open(index) as entries:
                for line in entries:
                    name, length, offset, bases, width = line.rstrip("\n").split("\t")[:5]
                    length, offset, bases, width = int(length), int(offset), int(bases), int(width)
                    if offset < 2 or bases < 1 or width <= bases:
                        return False
                    fasta.seek(offset - 1)
                    if fasta.read(1) != b"\n":
                        return False
                    fasta.seek(max(0, offset - 65536))  # the header line: ">NAME[ description]"
                    header = fasta.read(offset - fasta.tell()).rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
                    last = offset + (length - 1) // bases * width + (length - 1) % bases if length else offset
                    named = header.startswith(b">" + name.encode()) and header[len(name) + 1 : len(name) + 2] in (b"", b" ", b"\t")
                    if not named or last >= size:
                        return False
                    fasta.seek(last)
                    if length and fasta.read(1) in (b"\n", b"\r", b">", b""):
                        return False
        except (ValueError, OSError, UnicodeDecodeError):
            return False
    return True


def reverse_complement(seq: str) -> str:
    return seq.translate(COMPLEMENT)[::-1]


class Genome:
    """An indexed genome FASTA: sequences of regions, checked against its chromosomes."""

    def __init__(self, path: str, contig_map: str | None = None):
        try:
            import pyfaidx
        except ImportError:
            raise InputError("--genome needs pyfaidx: pip install 'utrexport[genome]'") from None
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such genome FASTA")
        index, writable = f"{path}.fai", os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
        if os.path.exists(index) and not _index_fits(path, index):  # written for another file with the same name (or damaged)
            if not writable:
                raise InputError(f"{path}: its index {index} does not fit the file (made for an older version of it?) and cannot be "
                                 "rewritten here: index it again where it is writable (samtools faidx)")
            os.unlink(index)
        if not os.path.exists(index) and not writable:
            raise InputError(f"{path}: it has no index ({index}) and its folder is read-only: index it once where it is writable "
                             "(samtools faidx), or copy it to a writable folder")
        try:
            self.fasta = pyfaidx.Fasta(path, as_raw=True, sequence_always_upper=True)
        except PermissionError:
            raise InputError(f"{path}: its index ({path}.fai) cannot be written beside it: index it once where it is writable "
                             "(samtools faidx), or copy it to a writable folder") from None
        except (pyfaidx.FastaIndexingError, pyfaidx.UnsupportedCompressionFormat, ValueError, OSError) as e:
            raise InputError(f"{path}: not an indexable FASTA ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "gzip genomes must be bgzip-compressed (bgzip, and pip install biopython)") from None
        self.path = path
        self.lengths = {name: len(self.fasta[name]) for name in self.fasta.keys()}
        self.contigs = Contigs(self.lengths, read_contig_map(contig_map, self.lengths) if contig_map else None)

    def problem(self, region: Region) -> str | None:
        why = problem(region)
        if why:
            return why
        if region.chrom not in self.lengths:
            return f"chromosome {region.chrom!r} is not in {self.path}"
        if region.end > self.lengths[region.chrom]:
            return f"ends at {region.end:,}, past the end of {region.chrom} ({self.lengths[region.chrom]:,} bp)"
        return None

    def sequence(self, region: Region) -> str:
        seq = "".join(self.fasta[region.chrom][s:e] for s, e in region.blocks)
        return reverse_complement(seq) if region.strand == "-" else seq

    def base(self, chrom: str, start: int, end: int) -> str:
        return self.fasta[chrom][start:end]


def read_regions(path: str, kind: str, feature: str | None = None) -> Iterator[Region]:
    """Regions of a BED (kind "bed") or GTF/GFF3 file (kind "gtf"). Names are unique: they key every output row and
    every variant's region, so a name given twice is an error naming both lines."""
    seen: dict[str, str] = {}
    for region in read_bed(path) if kind == "bed" else read_gtf(path, feature):
        if region.id in seen:
            raise InputError(f"{region.where}: region name {region.id!r} is also the name of {seen[region.id]}: names must be unique "
                             "(they key the outputs); rename one")
        seen[region.id] = region.where
        yield region


def _rows(path: str) -> Iterator[tuple[int, list[str]]]:
    number = 0
    with open_text(path) as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise InputError(f"{path} line {number + 1}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
            number += 1
            if row and row[0].strip() and not row[0].startswith(("#", "track", "browser")):
                yield number, row


INTEGER = re.compile(r"-?[0-9]+")


def integer(text: str, where: str, what: str = "coordinates are not integers") -> int:
    """An integer written in ASCII digits only (int() also takes '1_0' and other scripts' digits)."""
    text = text.strip()
    if not INTEGER.fullmatch(text):
        raise InputError(f"{where}: {what} ({text[:20]!r})")
    return int(text)


def read_bed(path: str) -> Iterator[Region]:
    """BED3 to BED12: name (column 4, else chrom:start-end), strand (column 6, else +), blocks (columns 10-12)."""
    for number, row in _rows(path):
        where = f"{path} line {number}"
        if len(row) < 3:
            raise InputError(f"{where}: a BED line has at least 3 tab-separated columns (chrom, start, end), found {len(row)}")
        start, end = integer(row[1], where), integer(row[2], where)
        blocks = [(start, end)]
        if len(row) >= 12 and row[9].strip():
            count = integer(row[9], where, "blockCount is not an integer")
            sizes = [integer(x, where, "blockSizes are not integers") for x in row[10].strip().rstrip(",").split(",")]
            starts = [integer(x, where, "blockStarts are not integers") for x in row[11].strip().rstrip(",").split(",")]
            if count != len(sizes) or count != len(starts):
                raise InputError(f"{where}: blockCount {count} does not match {len(sizes)} sizes and {len(starts)} starts")
            blocks = [(start + s, start + s + size) for s, size in zip(starts, sizes)]
            if blocks and (blocks[0][0] != start or blocks[-1][1] != end):
                raise InputError(f"{where}: the blocks must start at chromStart and end at chromEnd")
        strand = row[5].strip() if len(row) >= 6 else "+"
        if strand not in ("+", "-"):
            raise InputError(f"{where}: strand must be + or - (a 3'UTR reads 5' to 3' on one strand), got {strand!r}")
        name = row[3].strip() if len(row) >= 4 and row[3].strip() else f"{row[0]}:{start}-{end}"
        yield Region(name, row[0].strip(), "-" if strand == "-" else "+", tuple(blocks), where)


GTF_PAIR = re.compile(r'\s*([A-Za-z0-9_.:-]+)\s+(?:"([^"]*)"|([^;\s]+))\s*(?:;|$)')


def attributes(column: str) -> dict[str, str]:
    """GTF (`key "value";`) or GFF3 (`key=value;`, percent-encoded) attributes as key-value pairs: a key never matches
    inside another key's name or value."""
    from urllib.parse import unquote

    if "=" in column.split(";")[0] or ('"' not in column and "=" in column):  # GFF3
        return {k.strip(): unquote(v.strip()) for k, _, v in (p.partition("=") for p in column.split(";") if p.strip())}
    return {m.group(1): m.group(2) if m.group(2) is not None else m.group(3) for m in GTF_PAIR.finditer(column)}


def read_gtf(path: str, feature: str | None = None) -> Iterator[Region]:
    """GTF or GFF3: the features of type `feature` (default three_prime_utr, in any letter case) grouped by transcript
    (GTF `transcript_id`, GFF3 `Parent`), in the order transcripts first appear."""
    wanted = {f.lower() for f in ((feature,) if feature else FEATURES)}
    groups: dict[str, list] = {}
    types: set[str] = set()
    for number, row in _rows(path):
        where = f"{path} line {number}"
        if len(row) < 9:
            raise InputError(f"{where}: a GTF/GFF3 line has 9 tab-separated columns, found {len(row)}")
        types.add(row[2])
        if row[2].lower() not in wanted:
            continue
        pairs = attributes(row[8])
        found = pairs.get("transcript_id") or pairs.get("Parent")
        if not found:
            raise InputError(f"{where}: no transcript_id (GTF) or Parent (GFF3) attribute")
        start, end = integer(row[3], where) - 1, integer(row[4], where)  # 1-based inclusive -> 0-based half-open
        if start < 0:
            raise InputError(f"{where}: start {row[3].strip()}: GTF/GFF3 positions count from 1")
        if row[6] not in ("+", "-"):
            raise InputError(f"{where}: strand must be + or - (a 3'UTR reads 5' to 3' on one strand), got {row[6]!r}")
        for transcript in found.split(","):
            transcript = transcript.strip().removeprefix("transcript:")
            group = groups.setdefault(transcript, [row[0], row[6], [], where])
            if (group[0], group[1]) != (row[0], row[6]):
                raise InputError(f"{where}: transcript {transcript!r} has features on {group[0]} {group[1]} and {row[0]} {row[6]}")
            group[2].append((start, end))
    if not groups:
        raise InputError(f"{path}: no {' or '.join(sorted(wanted))} features (it has {', '.join(sorted(types)) or 'none'}): choose one with --feature")
    for transcript, (chrom, strand, blocks, where) in groups.items():
        yield Region(transcript, chrom, "-" if strand == "-" else "+", tuple(sorted(blocks)), f"{where} (transcript {transcript})")


def canonical(name: str) -> str:
    """A contig's name as the rule of `Contigs` compares it: without a leading 'chr' (any case), M as MT."""
    bare = name[3:] if name[:3].lower() == "chr" and len(name) > 3 else name
    return "MT" if bare.upper() in ("M", "MT") else bare


class Contigs:
    """The genome's name for a contig as a VCF or an annotation spells it: the same name; else the one `mapping`
    (--contig-map) gives; else the genome's only contig whose name is the same without a leading 'chr' and with M
    read as MT (so 1 and chr1, MT and chrM, X and chrX meet); else None."""

    def __init__(self, names, mapping: dict[str, str] | None = None):
        self.names, self.mapping = set(names), dict(mapping or {})
        by_canonical: dict[str, list[str]] = {}
        for name in self.names:
            by_canonical.setdefault(canonical(name), []).append(name)
        self.by_canonical = {key: found[0] for key, found in by_canonical.items() if len(found) == 1}

    def __call__(self, name: str) -> str | None:
        if name in self.names:
            return name
        if name in self.mapping:
            return self.mapping[name] if self.mapping[name] in self.names else None
        return self.by_canonical.get(canonical(name))


def read_contig_map(path: str, genome_names) -> dict[str, str]:
    """--contig-map: two whitespace-separated columns per line, a name as the VCF or annotation spells it and the
    genome's name for it ('#' starts a comment)."""
    mapping = {}
    for number, row in _rows(path):
        cells = row[0].split() if len(row) == 1 else [c.strip() for c in row]
        if len(cells) != 2:
            raise InputError(f"{path} line {number}: a contig map line has two columns (the name used, the genome's name), found {len(cells)}")
        if cells[1] not in genome_names:
            raise InputError(f"{path} line {number}: {cells[1]!r} is not a contig of the genome")
        mapping[cells[0]] = cells[1]
    if not mapping:
        raise InputError(f"{path}: no contig names")
    return mapping


class RegionIndex:
    """The regions holding a genome position, by chromosome (sorted block starts, searched with bisect)."""

    def __init__(self, regions: list[Region]):
        import bisect

        self._bisect = bisect.bisect_right
        self.blocks: dict[str, list[tuple[int, int, int]]] = {}
        for i, region in enumerate(regions):
            for s, e in region.blocks:
                self.blocks.setdefault(region.chrom, []).append((s, e, i))
        for blocks in self.blocks.values():
            blocks.sort()
        self.starts = {chrom: [b[0] for b in blocks] for chrom, blocks in self.blocks.items()}
        self.longest = {chrom: max(e - s for s, e, _ in blocks) for chrom, blocks in self.blocks.items()}
        self.regions = regions

    def holding(self, chrom: str, position: int) -> list[Region]:
        """Regions with a block that holds `position`, in annotation order."""
        if chrom not in self.blocks:
            return []
        blocks, starts = self.blocks[chrom], self.starts[chrom]
        last = self._bisect(starts, position)
        first = self._bisect(starts, position - self.longest[chrom])
        return [self.regions[i] for i in sorted({i for s, e, i in blocks[first:last] if s <= position < e})]


class RegionFile:
    """The sequences of a genome's regions, as a hidden TSV (id, sequence) beside `output` while a run reads it, with
    each id's coordinates for the writer. Regions that cannot be read are errors naming their annotation line, or
    with `skip` are listed in `skipped`."""

    def __init__(self, regions: tuple, output: str, skip: bool):
        import dataclasses

        from .records import Judge

        genome, annotation, kind, feature, contig_map = (*regions, None)[:5]  # (genome, annotation, "bed"/"gtf", feature[, contig map])
        self.genome, self.coordinates, self.annotation, self.output = Genome(genome, contig_map), {}, annotation, output
        # the genome's names for the annotation's contigs (Contigs); an unknown one stays, and is judged as missing
        self.regions = [dataclasses.replace(r, chrom=self.genome.contigs(r.chrom) or r.chrom) for r in read_regions(annotation, kind, feature)]
        if not self.regions:
            raise InputError(f"{annotation}: no regions")
        self.where = {region.id: region.where for region in self.regions}
        self.judge = Judge(skip, lambda name: f"{self.where[name]}: region {name!r}")
        self.skipped = self.judge.skipped

    def judged(self) -> list[Region]:
        """The regions that can be read; the others raise, or are listed in `skipped`."""
        good = []
        for region in self.regions:
            problem = self.genome.problem(region)
            if problem:
                self.judge(region.id, problem)
            else:
                good.append(region)
        return good

    def __enter__(self) -> str:
        import tempfile

        folder = os.path.dirname(os.path.abspath(self.output))
        fd, self.path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(self.output)}.regions-", suffix=".tsv")
        try:
            with os.fdopen(fd, "w") as out:  # ids come from tab-separated cells and sequences from the genome: no tab or newline
                out.write("id\tsequence\n")
                for region in self.judged():
                    out.write(f"{region.id}\t{self.genome.sequence(region)}\n")
                    self.coordinates[region.id] = (region.chrom, region.start, region.end, region.strand)
        except BaseException:  # a bad region, a full disk, a signal: the file is this run's own, never left behind
            os.unlink(self.path)
            raise
        return self.path

    def __exit__(self, *exc) -> None:
        os.unlink(self.path)
