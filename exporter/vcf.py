"""VCF in and out through pysam (htslib): variants read from a VCF, and the same VCF written back with scores in INFO,
bgzipped and tabix-indexed, for bcftools, VEP (`--custom`) and genome browsers.

Why pysam: it is htslib's own Python binding, so reading, BGZF and the tabix index are the code bcftools and tabix
run, header and record rules included; it keeps every column of a record (ID, QUAL, FILTER, INFO, samples) as it
writes it back, and it ships as wheels with htslib inside (cyvcf2 reads and writes as well, but has no indexer).

The INFO field (`UTRBERT`, Number=.) holds one entry per ALT allele and region holding it, `|`-separated sub-fields
named in its Description after "Format: ", as VEP's CSQ and SpliceAI's fields do. Number=A cannot hold it: one allele
may lie in several regions (overlapping transcripts).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from utr_runtime.errors import InputError, UtrError

from .writers import current_umask

INFO_ID = "UTRBERT"
FORMATS = (".vcf", ".vcf.gz", ".vcf.bgz")  # .gz and .bgz: BGZF with a tabix index
NO_ALT = (".", "<*>", "<NON_REF>")  # a reference-only (or gVCF) record: no alternative allele, so no variant
RESERVED = {c: f"%{ord(c):02X}" for c in "%,;=| \t\r\n"}  # VCF 4.3's percent-encoding, and our sub-field separator


@dataclass(frozen=True)
class VcfVariant:
    id: str  # the record's ID, with :ALT for a multi-allelic record; chrom:pos:ref:alt where ID is '.'
    chrom: str
    start: int  # 0-based
    ref: str
    alt: str
    where: str  # for errors: "FILE record N (CHROM:POS)"
    record: int  # 0-based record number in the file
    allele: int  # 0-based ALT number

    @property
    def symbolic(self) -> bool:
        return not self.ref or any(c in "<>[]*" for c in self.alt)


def is_vcf_output(path: str) -> bool:
    return path.lower().endswith(FORMATS)


def indexed(path: str) -> bool:
    return path.lower().endswith((".gz", ".bgz"))


def _pysam():
    try:
        import pysam
    except ImportError:
        raise InputError("VCF input and output need pysam: pip install 'utrexport[genome]'") from None
    pysam.set_verbosity(0)  # htslib's warnings (a contig missing from the header, ...) are not errors; ours are one line
    return pysam


def open_vcf(path: str):
    pysam = _pysam()
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such VCF")
    try:
        return pysam.VariantFile(path)
    except PermissionError as e:
        raise InputError(f"{path}: {e.strerror.lower()}") from None
    except (ValueError, OSError):
        raise InputError(f"{path}: not a VCF that htslib can read (a VCF starts with ##fileformat=VCFv4.x and has a #CHROM POS ID REF ALT "
                         "QUAL FILTER INFO line)") from None


def read_vcf(path: str) -> Iterator[VcfVariant]:
    """Each ALT allele of each record, in file order. Raises one line on a record htslib cannot read."""
    with open_vcf(path) as vcf:
        records = iter(vcf)
        number = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except (ValueError, OSError) as e:
                raise InputError(f"{path}: record {number + 1} cannot be read ({e}); check it with bcftools view") from None
            try:
                where = f"{path} record {number + 1} ({record.chrom}:{record.pos})"
                ref, alts = (record.ref or "").upper(), [a.upper() for a in record.alts or (".",)]
                name = record.id if record.id and record.id != "." else None
            except UnicodeDecodeError as e:
                raise InputError(f"{path} record {number + 1}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
            for allele, alt in enumerate(alts):
                label = (f"{name}:{alt}" if len(alts) > 1 else name) if name else f"{record.chrom}:{record.pos}:{ref}:{alt}"
                yield VcfVariant(label, record.chrom, record.pos - 1, ref, alt, where, number, allele)
            number += 1


def annotation_problem(path: str, output: str) -> str | None:
    """Why `path` cannot be written back annotated to `output`, before any model work: it holds our INFO field
    already, or (for an indexed output) it is out of order: a tabix index needs each contig's records together,
    positions rising."""
    with open_vcf(path) as vcf:
        if INFO_ID in vcf.header.info:
            return f"its INFO already has a {INFO_ID} field (a VCF scored before?): score the original VCF"
        if not indexed(output):
            return None
        done, current, last = set(), None, -1
        for number, record in enumerate(vcf, start=1):
            if record.chrom != current:
                if record.chrom in done:
                    return _unsorted(path, f"record {number} returns to contig {record.chrom} after others")
                done.add(current)
                current, last = record.chrom, -1
            if record.pos < last:
                return _unsorted(path, f"record {number} ({record.chrom}:{record.pos}) comes after position {last}")
            last = record.pos
    return None


def _unsorted(path: str, where: str) -> str:
    return f"not sorted ({where}); an indexed VCF needs sorted input: bcftools sort {path} -Oz -o sorted.vcf.gz (or write a plain .vcf, which is not indexed)"


def encode(value: str) -> str:
    return "".join(RESERVED.get(c, c) for c in value)


def write_annotated(source: str, output: str, fields: list[str], entries: dict[int, list[str]], meta: dict[str, str],
                    replace: bool = False) -> None:
    """`source` written to `output` record by record, with INFO/UTRBERT set to the entries of each record (keyed by
    record number; entries are '|'-joined `fields`, encoded) and `meta` as ##utrexport_KEY=VALUE header lines.
    A .gz/.bgz output is BGZF with a tabix index (.tbi). Both files appear whole or not at all."""
    pysam = _pysam()
    target = Path(output)
    folder = target.parent
    if not folder.is_dir():
        raise UtrError(f"{folder}: no such folder for the output")
    partial = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".partial")
    os.fchmod(partial[0], 0o666 & ~current_umask())  # mkstemp makes it 0600; the output gets what a plain open would give
    os.close(partial[0])
    index = f"{partial[1]}.tbi"
    try:
        with open_vcf(source) as first:  # contigs and keys used without a header line: htslib defines them as it reads
            for _ in first:
                pass
            implied = [r for r in first.header.records if r.type in ("CONTIG", "INFO", "FILTER", "FORMAT")]
        with open_vcf(source) as vcf:
            header = vcf.header
            _add_missing(header, implied)
            header.add_line(f'##INFO=<ID={INFO_ID},Number=.,Type=String,Description="utrexport variant scores: one entry per ALT '
                            "allele and region holding it; POSITION is 1-based in the region's 5'-3' sequence; llr is ln p_alt - ln p_ref; "
                            f'an empty score is not defined for the variant. Format: {"|".join(fields)}">')
            for key, value in meta.items():
                header.add_line(f"##utrexport_{key}={value}")
            with pysam.VariantFile(partial[1], "wz" if indexed(output) else "w", header=header) as out:
                for number, record in enumerate(vcf):
                    if number in entries:
                        record.info[INFO_ID] = tuple(entries[number])
                    out.write(record)
        if indexed(output):
            pysam.tabix_index(partial[1], preset="vcf", force=True, index=index)
            os.chmod(index, 0o666 & ~current_umask())
        _publish(partial[1], target, replace)
        if indexed(output):
            _publish(index, Path(f"{output}.tbi"), True)
    except (ValueError, OSError) as e:
        raise UtrError(f"{output}: could not be written ({e})") from None
    finally:
        for leftover in (partial[1], index):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _add_missing(header, records) -> None:
    have = {"CONTIG": header.contigs, "INFO": header.info, "FILTER": header.filters, "FORMAT": header.formats}
    for record in records:
        if record.get("ID") not in have[record.type]:
            header.add_record(record)


def _publish(partial: str, target: Path, replace: bool) -> None:
    if not replace and os.path.lexists(target):
        raise UtrError(f"{target} appeared while this run wrote it (another run?); it is left as it is: pass --force to replace it")
    os.replace(partial, target)
