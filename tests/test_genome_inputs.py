"""Genome and variant inputs read strictly (hardening, round 3): region names, attributes, numbers, strands, text,
indexes and reference-only VCF records. Each case failed before: a wrong region, a wrong base, or a traceback."""

from __future__ import annotations

import os
import time

import pytest

from utr_runtime.errors import InputError
from utrexport import genome
from utrexport.genome import Genome, read_regions
from utrexport.scoring import vcf_jobs


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_a_region_name_given_twice_is_an_error_naming_both_lines(tmp_path):
    """Outputs and variants are keyed by region name: two regions named alike scored a variant on the other's bases."""
    bed = write(tmp_path / "r.bed", "chr1\t100\t400\tutr\t0\t+\nchr1\t1000\t1300\tutr\t0\t+\n")
    with pytest.raises(InputError, match=r"r.bed line 2: region name 'utr' is also the name of .*r.bed line 1"):
        list(read_regions(bed, "bed"))


def test_gtf_and_gff3_attributes_are_key_value_pairs(tmp_path):
    gtf = write(tmp_path / "a.gtf", 'chr1\tx\tthree_prime_utr\t11\t20\t.\t+\t.\tccds_transcript_id "WRONG"; transcript_id "t1";\n'
                                    'chr1\tx\tthree_prime_utr\t31\t40\t.\t+\t.\tgene_id "g"; transcript_id "t2"; note "transcript_id X";\n')
    assert [r.id for r in read_regions(gtf, "gtf")] == ["t1", "t2"]
    gff = write(tmp_path / "a.gff3", "chr1\tx\tthree_prime_UTR\t11\t20\t.\t-\t.\tID=u1;Note=see transcript_id X9;Parent=T1\n"
                                     "chr1\tx\tthree_prime_UTR\t31\t40\t.\t-\t.\tID=u2;Parent=tx%3B2\n")
    regions = list(read_regions(gff, "gtf"))
    assert [r.id for r in regions] == ["T1", "tx;2"] and regions[0].blocks == ((10, 20),)


@pytest.mark.parametrize("line, words", [
    ("chr1\t1_0\t300\tr\t0\t+", "coordinates are not integers"),
    ("chr1\t\u0661\u0660\t300\tr\t0\t+", "coordinates are not integers"),  # Arabic-Indic digits
    ("chr1\t100\t300\tr\t0\t.", "strand must be \\+ or -"),
    ("chr1\t100\t300\tr\t0\t?", "strand must be \\+ or -"),
    ("chr1\t100\t300\tr\t0\t+\t100\t300\t0\t3\t50,50,\t0,150,", "blockCount 3 does not match 2 sizes"),
    ("chr1\t100\t300\tr\t0\t+\t100\t300\t0\t2\t50,50,\t0,100,", "the blocks must start at chromStart and end at chromEnd"),
])
def test_bed_numbers_strands_and_blocks_are_read_strictly(tmp_path, line, words):
    with pytest.raises(InputError, match=words):
        list(read_regions(write(tmp_path / "r.bed", line + "\n"), "bed"))


def test_gtf_positions_count_from_one_and_strands_are_known(tmp_path):
    for row, words in [("chr1\tx\tthree_prime_utr\t0\t20\t.\t+\t.\ttranscript_id \"t\";", "count from 1"),
                       ("chr1\tx\tthree_prime_utr\t5\t20\t.\t.\t.\ttranscript_id \"t\";", "strand must be \\+ or -")]:
        with pytest.raises(InputError, match=words):
            list(read_regions(write(tmp_path / "a.gtf", row + "\n"), "gtf"))


@pytest.mark.parametrize("name", ["r.bed", "a.gtf"])
def test_invalid_utf8_is_one_line_naming_the_line(tmp_path, name):
    path = write(tmp_path / name, b"chr1\t100\t300\tr\xff1\t0\t+\n")
    with pytest.raises(InputError, match=rf"{name} line 1: not UTF-8 text \(byte 0xff\)"):
        list(read_regions(path, "bed" if name.endswith("bed") else "gtf"))


@pytest.mark.parametrize("body, words", [
    (b"#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\nchr1\t100\tr\xff1\tA\tG\t.\t.\t.\n", r"v.vcf record 1: not UTF-8 text \(byte 0xff\)"),
    (b"#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\nchr1\tx\tr1\tA\tG\t.\t.\t.\n", r"v.vcf: record 1 cannot be read"),
    (b"chr1\t100\tr1\tA\tG\n", r"v.vcf: not a VCF that htslib can read"),  # no header
])
def test_a_bad_vcf_is_one_line_naming_the_record(tmp_path, body, words):
    from utrexport.vcf import read_vcf

    header = b"##fileformat=VCFv4.2\n" if body.startswith(b"#") else b""
    with pytest.raises(InputError, match=words):
        list(read_vcf(write(tmp_path / "v.vcf", header + body)))


def test_a_stale_index_newer_than_its_genome_is_rebuilt(tmp_path):
    """pyfaidx trusts a .fai newer than the FASTA; one written for an older version of the file read wrong bases."""
    fasta = tmp_path / "g.fa"
    write(fasta, ">chr1\n" + "\n".join(["ACGTACGTAC"] * 5) + "\n")
    assert Genome(str(fasta)).base("chr1", 0, 4) == "ACGT"
    write(fasta, ">chrNew\n" + "\n".join(["TTTTTTT"] * 3) + "\n>chr1\n" + "\n".join(["GGCCAAT"] * 6) + "\n")
    later = time.time() + 10
    os.utime(f"{fasta}.fai", (later, later))  # the index looks newer than the genome
    rebuilt = Genome(str(fasta))
    assert rebuilt.lengths == {"chrNew": 21, "chr1": 42} and rebuilt.base("chr1", 0, 7) == "GGCCAAT" and rebuilt.base("chr1", 7, 9) == "GG"


def test_a_genome_in_a_read_only_folder_gets_the_projects_message(tmp_path, monkeypatch):
    fasta = write(tmp_path / "g.fa", ">chr1\nACGTACGTAC\n")
    monkeypatch.setattr(genome.os, "access", lambda path, mode: mode != os.W_OK)  # as on a read-only mount (root included)
    with pytest.raises(InputError, match="has no index .* its folder is read-only: index it once where it is writable"):
        Genome(fasta)


def test_a_reference_only_vcf_record_is_no_variant_and_is_counted(tmp_path):
    fasta = write(tmp_path / "g.fa", ">chr1\n" + "ACGTTGCAAC" * 10 + "\n")
    regions = list(read_regions(write(tmp_path / "r.bed", "chr1\t10\t80\tr\t0\t+\n"), "bed"))
    vcf = write(tmp_path / "v.vcf", "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                "chr1\t20\tref_only\tT\t.\t.\t.\t.\nchr1\t21\tsv\tT\t<DEL>\t.\t.\t.\nchr1\t22\tsnv\tC\tA\t.\t.\t.\n"
                "chrUn\t5\tnowhere\tA\tC\t.\t.\t.\nchr1\t95\toutside\tC\tA\t.\t.\t.\n")
    logged, judged = [], []
    jobs = vcf_jobs(vcf, Genome(fasta), regions, lambda name, why: judged.append((name, why)), logged.append)
    assert [row["id"] for job in jobs for row in job.rows] == ["snv"] and not judged  # not scored as a deletion
    assert logged == [f"{vcf}: 5 variant(s); left out: 1 reference-only (ALT '.'); 1 symbolic or missing allele (<DEL>, *, breakends); "
                      "1 on a contig the genome lacks (chrUn); 1 in no region of the annotation"]


def test_a_variant_table_position_is_ascii_digits(tmp_path):
    """'١' (an Arabic-Indic one) was read as position 1."""
    from utrexport.scoring import table_jobs

    path = write(tmp_path / "v.tsv", "id\tsequence\tposition\tref\talt\nv\tACGUACGUAC\t\u0661\tA\tG\nw\tACGUACGUAC\t1\tA\tG\n")
    judged = []
    jobs = table_jobs(path, lambda name, why: judged.append((name, why)))
    assert judged == [("v", "position must be a positive integer (1-based), got '\u0661'")]
    assert [row["id"] for job in jobs for row in job.rows] == ["w"]
