"""Genomic inputs (utrexport.genome: --genome with --bed/--gtf) and variant effects (utr_runtime.variants,
`utrexport variants`), against shipped 3'UTRs placed on a genome built here and against multimolecule."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import utr_runtime
from conftest import TRAINED, multimolecule, real_sequences
from utr_runtime.variants import Edit, apply, effects, effects_of, saturation
from utrexport.cli import main

PROBABILITY_ATOL = 1e-4  # variant probabilities vs multimolecule's on the mutated sequences (the fp32 parity gate)
COMPLEMENT = str.maketrans("ACGT", "TGCA")


def revcomp(dna: str) -> str:
    return dna.translate(COMPLEMENT)[::-1]


def run(*args) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def table(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    """The toy genome (utr_calibration.toy_genome): shipped 3'UTRs on both strands in 1-3 blocks between filler, a
    BED12 and a GTF; `where[id][t]` is the genome position of a 3'UTR's base t, known from the placement."""
    from utr_calibration.toy_genome import write_toy_genome

    folder = tmp_path_factory.mktemp("genome")
    layout = write_toy_genome(folder)
    (folder / "utrs.fa").write_text("".join(f">{n}\n{s}\n" for n, s in layout["originals"].items()))
    return {**layout, "genome": folder / "toy_genome.fa", "bed": folder / "toy_genome.bed", "gtf": folder / "toy_genome.gtf",
            "fasta": folder / "utrs.fa", "bed_rows": layout["bed"]}


def test_the_shipped_toy_genome_is_the_generators(genome):
    from utr_calibration import DATA

    for suffix in ("fa", "bed", "gtf", "vcf"):
        assert (DATA / f"toy_genome.{suffix}").read_text() == (genome["genome"].parent / f"toy_genome.{suffix}").read_text(), suffix


@pytest.mark.parametrize("kind", ["bed", "gtf"])
def test_regions_read_back_the_original_sequences(genome, kind):
    from utrexport.genome import Genome, read_regions

    regions = list(read_regions(str(genome[kind]), kind))
    assert [r.id for r in regions] == list(genome["originals"])
    assert {r.strand for r in regions} == {"+", "-"} and max(len(r.blocks) for r in regions) == 3
    opened = Genome(str(genome["genome"]))
    assert {r.id: opened.sequence(r) for r in regions} == genome["originals"]


def test_embeddings_of_regions_equal_embeddings_of_the_sequences(genome, tiny_bundle, tmp_path):
    bundle = tiny_bundle(3, "pretraining")
    assert run("embed", bundle, genome["fasta"], "-o", tmp_path / "plain.npz").exit_code == 0
    result = run("embed", bundle, "--genome", genome["genome"], "--bed", genome["bed"], "-o", tmp_path / "regions.npz")
    assert result.exit_code == 0, result.output
    plain, regions = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "regions.npz")
    assert plain["ids"].tolist() == regions["ids"].tolist()
    np.testing.assert_array_equal(regions["vectors"], plain["vectors"])
    bed = genome["bed_rows"]
    assert regions["chrom"].tolist() == [r[0] for r in bed] and regions["start"].tolist() == [r[1] for r in bed]
    assert regions["end"].tolist() == [r[2] for r in bed] and regions["strand"].tolist() == [r[5] for r in bed]
    assert not list(tmp_path.glob(".*")), "the regions' temporary file is removed"


def test_predictions_of_gtf_regions_keep_their_coordinates(genome, trained_bundle, tmp_path):
    result = run("predict", trained_bundle, "--genome", genome["genome"], "--gtf", genome["gtf"], "-o", tmp_path / "p.tsv")
    assert result.exit_code == 0, result.output
    rows = table(tmp_path / "p.tsv")
    assert list(rows[0])[:6] == ["id", "chrom", "start", "end", "strand", "label"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = utr_runtime.load(trained_bundle).predict(list(genome["originals"].values()))
    np.testing.assert_allclose([float(r["positive"]) for r in rows], expected[:, 0], atol=1e-5)
    assert [(r["chrom"], int(r["start"]), r["strand"]) for r in rows] == [(b[0], b[1], b[5]) for b in genome["bed_rows"]]


@pytest.mark.parametrize("line, error", [
    ("chrX\t10\t50\tmissing\t0\t+", "region 'missing': chromosome 'chrX' is not in"),
    ("chr1\t10\t999999\tpast\t0\t+", "region 'past': ends at 999,999, past the end of chr1"),
    ("chr1\t10\t60\toverlap\t0\t+\t10\t60\t0\t2\t30,30,\t0,20,", "region 'overlap': blocks overlap or are out of order"),
    ("chr1\t10\t10\tempty\t0\t+", "region 'empty': empty region"),
    ("chr1\tten\t60\tbad\t0\t+", "line 2: coordinates are not integers"),
])
def test_bad_regions_are_one_line_errors_or_skipped(genome, tiny_bundle, tmp_path, line, error):
    bed = tmp_path / "bad.bed"
    bed.write_text("\t".join(map(str, genome["bed_rows"][0][:6])) + "\n" + line + "\n")
    args = ["embed", tiny_bundle(3, "pretraining"), "--genome", genome["genome"], "--bed", bed, "-o", tmp_path / "e.npz"]
    result = run(*args)
    assert result.exit_code == 1 and error in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "e.npz").exists()
    if "integers" not in error:
        result = run(*args, "--skip-invalid")
        assert result.exit_code == 0 and len(np.load(tmp_path / "e.npz")["ids"]) == 1, result.output
        assert error.split(": ", 1)[1].split(" ")[0] in (tmp_path / "e.npz.skipped.tsv").read_text()


def test_vcf_variants_on_both_strands_equal_the_same_edits_of_the_sequences(genome, trained_bundle, tmp_path):
    """Substitutions and an insertion on plus- and minus-strand regions, placed by genome coordinate, score as the
    transcript edits the test works out itself: minus-strand alleles complemented, positions from the 5' end."""
    rng = np.random.default_rng(3)
    vcf, edits = ["##fileformat=VCFv4.2", "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"], []
    chrom_of = {r[3]: r[0] for r in genome["bed_rows"]}
    strand_of = {r[3]: r[5] for r in genome["bed_rows"]}
    for name, seq in list(genome["originals"].items())[:4]:
        for t in rng.choice(np.arange(5, len(seq) - 5), 2, replace=False).tolist():
            g = genome["where"][name][t]
            base = genome["chroms"][chrom_of[name]][g]
            alt = next(c for c in "ACGT" if c != base)
            vcf.append(f"{chrom_of[name]}\t{g + 1}\t{name}_{t}\t{base}\t{alt}\t.\t.\t.")
            edits.append((f"{name}_{t}", seq, t, seq[t], alt if strand_of[name] == "+" else alt.translate(COMPLEMENT)))
    vcf.append(f"chr1\t3\toutside\t{genome['chroms']['chr1'][2]}\tA\t.\t.\t.")  # in the filler: in no region
    (tmp_path / "v.vcf").write_text("\n".join(vcf) + "\n")
    (tmp_path / "v.tsv").write_text("id\tsequence\tposition\tref\talt\n" + "".join(f"{i}\t{s}\t{t + 1}\t{r}\t{a}\n" for i, s, t, r, a in edits))
    result = run("variants", trained_bundle, "--vcf", tmp_path / "v.vcf", "--genome", genome["genome"], "--bed", genome["bed"], "-o", tmp_path / "g.tsv")
    assert result.exit_code == 0 and "left out: 1 in no region of the annotation" in result.output, result.output
    assert run("variants", trained_bundle, tmp_path / "v.tsv", "-o", tmp_path / "t.tsv").exit_code == 0
    from_genome = {r["id"]: r for r in table(tmp_path / "g.tsv")}
    from_table = {r["id"]: r for r in table(tmp_path / "t.tsv")}
    assert set(from_genome) == set(from_table) == {e[0] for e in edits}
    assert {strand_of[i.rsplit("_", 1)[0]] for i in from_genome} == {"+", "-"}
    for i, row in from_table.items():
        assert [from_genome[i][c] for c in ("position", "ref", "alt")] == [row[c] for c in ("position", "ref", "alt")]
        for column in ("cosine_distance", "p_ref", "p_alt", "diff", "logOR"):
            assert float(from_genome[i][column]) == pytest.approx(float(row[column]), abs=1e-6), (i, column)
    # a reference allele that is not the genome's
    name = edits[0][0]
    wrong = [line.replace(f"\t{name}\t", f"\t{name}\tN\t").split("\t") for line in vcf if f"\t{name}\t" in line][0]
    (tmp_path / "w.vcf").write_text("\n".join(vcf[:2]) + "\n" + "\t".join(wrong[:4] + wrong[5:]) + "\n")
    result = run("variants", trained_bundle, "--vcf", tmp_path / "w.vcf", "--genome", genome["genome"], "--bed", genome["bed"], "-o", tmp_path / "w.tsv")
    assert result.exit_code == 1 and f"variant '{name}': reference allele N does not match the genome" in result.output, result.output
    assert not (tmp_path / "w.tsv").exists()


def _reference_probability(reference, tokenizer, sequences: list[str]) -> np.ndarray:
    import torch

    batch = tokenizer(sequences, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reference(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.sigmoid(logits.double()).numpy()[:, 0]


def test_variant_scores_equal_the_papers_formulas_on_multimolecule(trained_bundle):
    """p_ref, p_alt, diff and logOR of the shipped fine-tuned classifier equal the paper's formulas computed from
    multimolecule's model on the mutated sequences (calculate_diff_scores.py), substitutions and indels alike."""
    mm = multimolecule()
    reference = mm.UtrBertForSequencePrediction.from_pretrained(TRAINED).eval()
    tokenizer = mm.RnaTokenizer(nmers=3)
    seq = real_sequences("utrbert_dev_100nt.tsv")[0][1]
    edits = saturation(seq)[::11] + [Edit(30, seq[30], ""), Edit(60, seq[60], seq[60] + "GA")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = effects(utr_runtime.load(trained_bundle), seq, edits)
    p_ref = _reference_probability(reference, tokenizer, [seq])[0]
    p_alt = _reference_probability(reference, tokenizer, [apply(seq, e) for e in edits])
    assert got["p_ref"][0] == pytest.approx(p_ref, abs=PROBABILITY_ATOL)
    np.testing.assert_allclose(got["p_alt"][:, 0], p_alt, atol=PROBABILITY_ATOL)
    np.testing.assert_allclose(got["diff"][:, 0], (p_alt - p_ref) * np.maximum(p_ref, p_alt), atol=PROBABILITY_ATOL)
    np.testing.assert_allclose(got["logOR"][:, 0], np.log2(p_ref / (1 - p_ref)) - np.log2(p_alt / (1 - p_alt)), atol=1e-3)
    assert np.abs(got["p_alt"][:, 0] - p_ref).max() > 1e-3, "the edits move the prediction: the comparison can fail"


def test_saturation_of_a_window_equals_scoring_each_mutant_alone(trained_bundle, tmp_path):
    seq = real_sequences("utrbert_dev_100nt.tsv")[1][1]
    assert len(seq) == 100 and set(seq) <= set("ACGU")
    (tmp_path / "w.fa").write_text(f">w\n{seq}\n")
    result = run("variants", trained_bundle, tmp_path / "w.fa", "--saturate", "-o", tmp_path / "s.tsv", "--plot", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    rows = table(tmp_path / "s.tsv")
    assert len(rows) == 300 and (tmp_path / "s.png").stat().st_size > 10_000
    assert {(int(r["position"]), r["alt"]) for r in rows} == {(i + 1, a) for i in range(100) for a in "ACGU" if a != seq[i]}
    mutants = [seq[: int(r["position"]) - 1] + r["alt"] + seq[int(r["position"]) :] for r in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = utr_runtime.load(trained_bundle)
    alone = model.predict(mutants)[:, 0]
    np.testing.assert_allclose([float(r["p_alt"]) for r in rows], alone, atol=1e-5)
    vectors = model.embed([seq] + mutants).astype(np.float64)
    cosine = vectors[1:] @ vectors[0] / np.linalg.norm(vectors[1:], axis=1) / np.linalg.norm(vectors[0])
    np.testing.assert_allclose([float(r["cosine_distance"]) for r in rows], 1 - cosine, atol=1e-6)


def test_window_sparing_equals_running_every_window(trained_bundle):
    """A long 3'UTR (several windows): rerunning only the windows that hold a substitution gives the scores of
    rerunning them all."""
    seq = next(s for _, s in sorted(real_sequences(), key=lambda r: len(r[1])) if len(s) > 1400)
    edits = saturation(seq)[::97]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = utr_runtime.load(trained_bundle)
    spared, naive = effects(model, seq, edits), effects(model, seq, edits, spare=False)
    assert len(edits) > 40
    for name in spared:
        np.testing.assert_allclose(spared[name], naive[name], atol=1e-6, err_msg=name)
    short = real_sequences("utrbert_dev_100nt.tsv")[2][1]
    together = effects_of(model, [(seq, edits), (short, saturation(short)[:7])])  # one run of batches for both
    for alone, both in zip([spared, effects(model, short, saturation(short)[:7])], together):
        for name in alone:
            np.testing.assert_allclose(both[name], alone[name], atol=1e-6, err_msg=name)


def test_bad_variants_are_one_line_errors(trained_bundle, tmp_path):
    seq = real_sequences("utrbert_dev_100nt.tsv")[0][1]
    cases = {"position 101 is outside the sequence": (101, "A", "C"), "reference allele": (1, "N", "C"),
             "position must be a positive integer": ("x", "A", "C"), "alleles must be nucleotides": (1, seq[0], "Z")}
    for error, (position, ref, alt) in cases.items():
        (tmp_path / "v.tsv").write_text(f"id\tsequence\tposition\tref\talt\nv\t{seq}\t{position}\t{ref}\t{alt}\n")
        result = run("variants", trained_bundle, tmp_path / "v.tsv", "-o", tmp_path / "o.tsv")
        assert result.exit_code == 1 and error in result.output and len(result.output.strip().splitlines()) == 1, result.output
    (tmp_path / "v.tsv").write_text("id\tsequence\tpos\n")
    result = run("variants", trained_bundle, tmp_path / "v.tsv", "-o", tmp_path / "o.tsv")
    assert result.exit_code == 1 and "missing position, ref, alt" in result.output
    result = run("variants", trained_bundle, "--vcf", tmp_path / "v.tsv", "-o", tmp_path / "o.tsv")
    assert result.exit_code == 1 and "give --genome and --bed or --gtf" in result.output


def test_inputs_are_a_file_or_a_genome_with_one_annotation(genome, tiny_bundle, tmp_path):
    bundle, out = tiny_bundle(3, "pretraining"), tmp_path / "e.npz"
    cases = {("--genome", genome["genome"]): "give --bed or --gtf", ("--bed", genome["bed"]): "give --genome FASTA",
             (genome["fasta"], "--genome", genome["genome"], "--bed", genome["bed"]): "give INPUT or --genome with --bed/--gtf, not both",
             (): "give INPUT (FASTA, TSV/CSV, or - for stdin), or --genome with --bed or --gtf",
             ("--genome", genome["bed"], "--bed", genome["bed"]): "not an indexable FASTA"}
    for args, error in cases.items():
        result = run("embed", bundle, *args, "-o", out)
        assert result.exit_code != 0 and error in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)
    result = run("embed", bundle, "--genome", genome["genome"], "--bed", genome["bed"], "-o", tmp_path / "e.npy")
    assert result.exit_code == 1 and "keep their coordinates beside each id: write .npz or .parquet" in result.output


def test_gff3_parents_and_a_chosen_feature_type(genome, tmp_path):
    """GFF3 (Parent=transcript:ID, as Ensembl writes it) reads as the GTF does; --feature picks another type, and a file
    without the type is one line naming the types it has."""
    from utr_runtime.errors import InputError
    from utrexport.genome import read_regions

    lines = [line.split("\t") for line in genome["gtf"].read_text().splitlines()]
    parent = lambda attributes: attributes.split("transcript_id")[1].strip(' ";')  # noqa: E731
    gff = "##gff-version 3\n" + "".join("\t".join(r[:2] + ["three_prime_UTR"] + r[3:8] + [f"Parent=transcript:{parent(r[8])}"]) + "\n" for r in lines)
    (tmp_path / "a.gff3").write_text(gff)
    got = {r.id: (r.chrom, r.strand, r.blocks) for r in read_regions(str(tmp_path / "a.gff3"), "gtf")}
    assert got == {r.id: (r.chrom, r.strand, r.blocks) for r in read_regions(str(genome["gtf"]), "gtf")}
    (tmp_path / "b.gtf").write_text(genome["gtf"].read_text().replace("three_prime_utr", "UTR"))
    assert [r.id for r in read_regions(str(tmp_path / "b.gtf"), "gtf", "UTR")] == list(genome["originals"])
    with pytest.raises(InputError, match=r"no 3utr or three_prime_utr features \(it has UTR\): choose one with --feature"):
        list(read_regions(str(tmp_path / "b.gtf"), "gtf"))


def test_saturation_of_regions_equals_saturation_of_their_sequences(genome, trained_bundle, tmp_path):
    """--saturate over a plus- and a minus-strand region gives the table of the same sequences from a FASTA."""
    rows = [r for r in genome["bed_rows"] if r[2] - r[1] < 700][:3]
    assert {r[5] for r in rows} == {"+", "-"}
    (tmp_path / "some.bed").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    (tmp_path / "some.fa").write_text("".join(f">{r[3]}\n{genome['originals'][r[3]]}\n" for r in rows))
    result = run("variants", trained_bundle, "--saturate", "--genome", genome["genome"], "--bed", tmp_path / "some.bed", "-o", tmp_path / "g.tsv")
    assert result.exit_code == 0, result.output
    assert run("variants", trained_bundle, tmp_path / "some.fa", "--saturate", "-o", tmp_path / "f.tsv").exit_code == 0
    assert table(tmp_path / "g.tsv") == table(tmp_path / "f.tsv")
    assert len(table(tmp_path / "g.tsv")) == 3 * sum(len(genome["originals"][r[3]]) for r in rows)


def test_a_long_run_reports_progress_in_a_log(trained_bundle, tmp_path, monkeypatch):
    """Outside a terminal (a log file, a cluster job) progress is a plain line every LOG_INTERVAL seconds."""
    from utrexport.progress import Progress

    monkeypatch.setattr(Progress, "LOG_INTERVAL", 0.0)
    (tmp_path / "w.fa").write_text(f">w\n{real_sequences('utrbert_dev_100nt.tsv')[0][1]}\n")
    result = run("variants", trained_bundle, tmp_path / "w.fa", "--saturate", "-o", tmp_path / "s.tsv")
    assert result.exit_code == 0 and "of 300 variants scored (" in result.output and " to go)" in result.output, result.output


# ------------------------------------------------------------------------------------------ VCF out, contig names
def _vcf_text(rows: list[tuple], contigs=("chr1", "chr2"), samples=True) -> str:
    header = ["##fileformat=VCFv4.2", *(f"##contig=<ID={c}>" for c in contigs), '##INFO=<ID=DP,Number=1,Type=Integer,Description="depth">',
              '##FILTER=<ID=q10,Description="low quality">', '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO" + ("\tFORMAT\tS1" if samples else "")]
    return "\n".join(header + ["\t".join(map(str, r[: 8 + 2 * samples])) for r in rows]) + "\n"


@pytest.fixture(scope="module")
def scored_vcf(genome, tiny_bundle, tmp_path_factory):
    """A VCF over the toy genome (a variant in two overlapping regions, a multi-allelic record, one outside every
    region, a reference-only record, QUAL, FILTER, INFO and a sample column) scored by a masked-LM bundle into an
    indexed VCF and into a table."""
    folder = tmp_path_factory.mktemp("scored_vcf")
    first, second = genome["bed_rows"][0], genome["bed_rows"][2]
    (folder / "twin.bed").write_text(genome["bed"].read_text() + "\t".join(map(str, [*first[:3], "twin", *first[4:]])) + "\n")
    chroms = genome["chroms"]

    def at(row, t):  # the genome position (0-based) of a region's base t, and the base there
        g = genome["where"][row[3]][t]
        return g, chroms[row[0]][g]

    g1, b1 = at(first, 12)
    g2, b2 = at(second, 20)
    alts2 = [c for c in "ACGT" if c != b2][:2]
    rows = [(first[0], g1 + 1, "two_regions", b1, next(c for c in "ACGT" if c != b1), 30, "PASS", "DP=5", "GT", "0/1"),
            (second[0], g2 + 1, "multi", b2, ",".join(alts2), 12.5, "q10", "DP=9", "GT", "1/2"),
            (second[0], g2 + 3, ".", chroms[second[0]][g2 + 2], ".", ".", ".", ".", "GT", "0/0"),
            ("chr1", 3, "outside", chroms["chr1"][2], "A" if chroms["chr1"][2] != "A" else "C", 40, "PASS", "DP=1", "GT", "0/1")]
    rows.sort(key=lambda r: (r[0], r[1]))
    (folder / "in.vcf").write_text(_vcf_text(rows))
    bundle = tiny_bundle(3, "pretraining")
    args = ["variants", bundle, "--vcf", folder / "in.vcf", "--genome", genome["genome"], "--bed", folder / "twin.bed"]
    for output in ("out.vcf.gz", "out.tsv", "out.vcf"):
        result = run(*args, "-o", folder / output)
        assert result.exit_code == 0, result.output
    return {"folder": folder, "rows": rows, "alts2": alts2, "first": first, "g1": g1}


def _entries(record, fields: list[str]) -> list[dict]:
    return [dict(zip(fields, entry.split("|"), strict=True)) for entry in record.info.get("UTRBERT", ())]


def test_the_annotated_vcf_keeps_every_record_and_holds_the_tables_scores(scored_vcf):
    import pysam

    folder = scored_vcf["folder"]
    source, out = pysam.VariantFile(folder / "in.vcf"), pysam.VariantFile(folder / "out.vcf.gz")
    described = out.header.info["UTRBERT"].description
    fields = described.split("Format: ")[1].split("|")
    assert fields[:4] == ["ALLELE", "REGION", "STRAND", "POSITION"] and {"cosine_distance", "p_ref", "p_alt", "llr"} <= set(fields)
    assert out.header.info["UTRBERT"].number == "."
    meta = {r.key: r.value for r in out.header.records if r.key.startswith("utrexport_")}
    assert set(meta) == {"utrexport_version", "utrexport_bundle", "utrexport_bundle_sha256", "utrexport_precision", "utrexport_engine"}
    assert len(meta["utrexport_bundle_sha256"]) == 64 and meta["utrexport_precision"] == "fp32"
    table = {(r["id"], r["region"]): r for r in globals()["table"](folder / "out.tsv")}
    records, entries = list(out), {}
    for before, after in zip(source, records, strict=True):  # every record, in order, as it was
        assert (after.chrom, after.pos, after.id, after.ref, after.alts, after.qual, list(after.filter)) == \
               (before.chrom, before.pos, before.id, before.ref, before.alts, before.qual, list(before.filter))
        assert {k: v for k, v in after.info.items() if k != "UTRBERT"} == dict(before.info)
        assert after.samples["S1"]["GT"] == before.samples["S1"]["GT"]
        entries[after.id or f"{after.chrom}:{after.pos}"] = _entries(after, fields)
    assert [e["REGION"] for e in entries["two_regions"]] == [scored_vcf["first"][3], "twin"]  # a variant in two regions: two entries
    assert [e["ALLELE"] for e in entries["multi"]] == scored_vcf["alts2"]  # one entry per ALT
    assert not entries["outside"] and sum(1 for r in records if "UTRBERT" in r.info) == 2
    scored = 0
    for name, found in entries.items():
        for entry in found:
            row = table[(name if name != "multi" else f"multi:{entry['ALLELE']}", entry["REGION"])]
            assert (entry["STRAND"], entry["POSITION"]) == (row["strand"], row["position"])
            for field in fields[4:]:
                assert float(entry[field]) == pytest.approx(float(row[field]), rel=1e-5), (name, field)
            scored += 1
    assert scored == len(table) == 4
    hit = list(out.fetch(scored_vcf["first"][0], scored_vcf["g1"], scored_vcf["g1"] + 1))  # the tabix index answers a region query
    assert [r.id for r in hit] == ["two_regions"]
    from utrexport.writers import current_umask

    for written in ("out.vcf.gz", "out.vcf.gz.tbi"):  # what a plain open would give, not mkstemp's 0600
        assert (folder / written).stat().st_mode & 0o777 == 0o666 & ~current_umask(), written
    plain = pysam.VariantFile(folder / "out.vcf")  # a plain .vcf: the same records, no index
    assert [str(r) for r in plain] == [str(r) for r in records] and not (folder / "out.vcf.tbi").exists()


def test_contig_names_match_across_spellings_or_by_a_map(genome, tiny_bundle, tmp_path):
    """A VCF that says 1 and 2 where the genome says chr1 and chr2 scores the same; names no rule matches need
    --contig-map, and without it the error says so."""
    from utr_calibration import DATA

    bundle = tiny_bundle(3, "pretraining")
    base = ["variants", bundle, "--genome", genome["genome"], "--bed", genome["bed"]]
    assert run(*base, "--vcf", DATA / "toy_genome.vcf", "-o", tmp_path / "chr.tsv").exit_code == 0
    text = (DATA / "toy_genome.vcf").read_text()
    (tmp_path / "ensembl.vcf").write_text(text.replace("chr1", "1").replace("chr2", "2"))
    result = run(*base, "--vcf", tmp_path / "ensembl.vcf", "-o", tmp_path / "ensembl.tsv")
    assert result.exit_code == 0, result.output
    (tmp_path / "odd.vcf").write_text(text.replace("chr1", "one").replace("chr2", "two"))
    result = run(*base, "--vcf", tmp_path / "odd.vcf", "-o", tmp_path / "odd.tsv")
    assert result.exit_code == 1 and "no variant lies in a region" in result.output and "--contig-map" in result.output, result.output
    assert not (tmp_path / "odd.tsv").exists()
    (tmp_path / "map.txt").write_text("one\tchr1\n# a comment\ntwo chr2\n")
    result = run(*base, "--vcf", tmp_path / "odd.vcf", "--contig-map", tmp_path / "map.txt", "-o", tmp_path / "mapped.tsv")
    assert result.exit_code == 0, result.output
    (tmp_path / "ensembl.bed").write_text(genome["bed"].read_text().replace("chr", ""))  # the annotation spelled otherwise too
    result = run("variants", bundle, "--genome", genome["genome"], "--bed", tmp_path / "ensembl.bed", "--vcf", DATA / "toy_genome.vcf",
                 "-o", tmp_path / "bed.tsv")
    assert result.exit_code == 0, result.output
    expected = table(tmp_path / "chr.tsv")
    for name in ("ensembl", "mapped", "bed"):
        got = table(tmp_path / f"{name}.tsv")
        assert [{k: v for k, v in r.items() if k != "chrom"} for r in got] == [{k: v for k, v in r.items() if k != "chrom"} for r in expected], name


def test_an_indexed_vcf_needs_sorted_input_and_a_vcf_output_needs_a_vcf(genome, tiny_bundle, tmp_path):
    from utr_calibration import DATA

    bundle = tiny_bundle(3, "pretraining")
    lines = (DATA / "toy_genome.vcf").read_text().splitlines()
    body = [line for line in lines if not line.startswith("#")]
    (tmp_path / "unsorted.vcf").write_text("\n".join([line for line in lines if line.startswith("#")] + body[::-1]) + "\n")
    base = ["variants", bundle, "--genome", genome["genome"], "--bed", genome["bed"], "--vcf", tmp_path / "unsorted.vcf"]
    result = run(*base, "-o", tmp_path / "out.vcf.gz")
    assert result.exit_code == 1 and "not sorted" in result.output and "bcftools sort" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsorted.vcf"]
    assert run(*base, "-o", tmp_path / "out.vcf").exit_code == 0  # not indexed: any order, kept
    result = run(*base[:-1], tmp_path / "out.vcf", "-o", tmp_path / "again.vcf")  # a scored VCF scored again
    assert result.exit_code == 1 and "already has a UTRBERT field" in result.output and not (tmp_path / "again.vcf").exists(), result.output
    result = run("variants", bundle, "--saturate", genome["fasta"], "-o", tmp_path / "s.vcf.gz")
    assert result.exit_code != 0 and "annotates the --vcf input" in result.output, result.output


def test_bcftools_reads_the_annotated_vcf_and_its_index(scored_vcf):
    import shutil
    import subprocess

    if shutil.which("bcftools") is None:
        pytest.skip("bcftools is not installed (Debian: apt-get install bcftools); the index is checked with pysam above")
    out, chrom, g1 = scored_vcf["folder"] / "out.vcf.gz", scored_vcf["first"][0], scored_vcf["g1"]
    view = subprocess.run(["bcftools", "view", "-H", "-r", f"{chrom}:{g1 + 1}", str(out)], capture_output=True, text=True, check=True)
    assert [line.split("\t")[2] for line in view.stdout.splitlines()] == ["two_regions"]
    query = subprocess.run(["bcftools", "query", "-f", "%ID\t%INFO/UTRBERT\n", str(out)], capture_output=True, text=True, check=True)
    found = dict(line.split("\t") for line in query.stdout.splitlines())
    assert found["outside"] == "." and len(found["multi"].split(",")) == 2 and [e.split("|")[1] for e in found["two_regions"].split(",")] == [scored_vcf["first"][3], "twin"]
