"""`utrexport variants`: variant effects (utr_runtime.variants) for variants from a table, from a VCF over genome
regions, or every substitution of each sequence (--saturate), as one tidy table.

Every variant is checked before any model work (its reference allele against the sequence, the region it falls in)
so a bad one fails in seconds, naming it, or is left out with --skip-invalid.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from utr_runtime.errors import InputError
from utr_runtime.variants import Edit, check_edit, normalize, saturation, scorable

from .genome import INTEGER
from .vcf import FORMATS as VCF_FORMATS
from .writers import write_atomic

VARIANT_FORMATS = (".tsv", ".csv", ".parquet", *VCF_FORMATS)  # a table, or the input VCF annotated
CHUNK = 2048  # edits scored together: fills batches, bounds memory (a long saturation reruns its reference per chunk)
VARIANT_COLUMNS = ("id", "sequence", "position", "ref", "alt")


@dataclass
class Job:
    """One reference sequence and its edits; `rows` are the columns that name each edit in the table."""

    sequence_id: str
    sequence: str
    edits: list[Edit] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def saturate_jobs(records: Iterator[tuple[str, str]]) -> Iterator[Job]:
    for name, seq in records:
        edits = saturation(seq)
        yield Job(name, seq, edits, [{"id": name, "position": e.position + 1, "ref": e.ref, "alt": e.alt} for e in edits])


def table_jobs(path: str, judged: Callable[[str, str], None]) -> list[Job]:
    """A TSV/CSV of id, sequence, position (1-based), ref, alt: edits grouped by sequence (each reference runs once)."""
    from utr_runtime.sequences import open_text

    jobs: dict[str, Job] = {}
    with open_text(path) as handle:
        first = handle.readline()
        delimiter = "\t" if "\t" in first else ","
        header = [h.strip().lower() for h in next(csv.reader([first], delimiter=delimiter))]
        missing = [c for c in VARIANT_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path}: a variant table has the columns {', '.join(VARIANT_COLUMNS)}; missing {', '.join(missing)}")
        at = {c: header.index(c) for c in VARIANT_COLUMNS}
        for number, row in enumerate(csv.reader(handle, delimiter=delimiter), start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise InputError(f"{path}: line {number}: {len(row)} columns, the header has {len(header)}")
            name, seq, position = row[at["id"]].strip(), row[at["sequence"]].strip(), row[at["position"]].strip()
            if not INTEGER.fullmatch(position) or int(position) < 1:  # ASCII digits: isdigit() also takes other scripts' digits
                judged(name, f"position must be a positive integer (1-based), got {position!r}")
                continue
            edit = Edit(int(position) - 1, normalize(row[at["ref"]]), normalize(row[at["alt"]]))
            problem = check_edit(seq, edit)
            if problem:
                judged(name, problem)
                continue
            job = jobs.setdefault(seq, Job(f"line {number}", seq))
            job.edits.append(edit)
            job.rows.append({"id": name, "position": edit.position + 1, "ref": edit.ref, "alt": edit.alt})
    return list(jobs.values())


LEFT_OUT = {  # why a VCF's variant is not scored, as the run's summary says it
    "reference_only": "reference-only (ALT '.')",
    "symbolic": "symbolic or missing allele (<DEL>, *, breakends)",
    "unknown_contig": "on a contig the genome lacks",
    "no_region": "in no region of the annotation",
}


def vcf_jobs(vcf: str, genome, regions: list, judged: Callable[[str, str], None], log: Callable[[str], None]) -> list[Job]:
    """Each VCF variant in each region that holds it (both strands; on the minus strand the alleles are
    complemented and the position counts from the region's 5' end). The VCF's contigs are the genome's by the rule
    of genome.Contigs. What is left out is counted by reason and said; if nothing lands anywhere, the error names the
    likely cause."""
    from .genome import RegionIndex, reverse_complement
    from .vcf import NO_ALT, read_vcf

    index, jobs, checked = RegionIndex(regions), {}, {}
    left_out, unknown, variants, mismatched = {reason: 0 for reason in LEFT_OUT}, {}, 0, 0
    for v in read_vcf(vcf):
        variants += 1
        chrom = genome.contigs(v.chrom)
        reason = ("reference_only" if v.alt in NO_ALT else "symbolic" if v.symbolic else "unknown_contig" if chrom is None else None)
        holding = index.holding(chrom, v.start) if reason is None else []
        if reason is None and not holding:
            reason = "no_region"
        if reason:
            left_out[reason] += 1
            if reason == "unknown_contig":
                unknown[v.chrom] = unknown.get(v.chrom, 0) + 1
            continue
        for region in holding:
            if region.id not in checked:
                checked[region.id] = genome.problem(region)
            if checked[region.id]:
                judged(v.id, f"region {region.id} ({region.where}): {checked[region.id]}")
                continue
            last = v.start + len(v.ref) - 1
            first_at, last_at = region.offset(v.start), region.offset(last)
            if last_at is None or abs(last_at - first_at) != len(v.ref) - 1:
                judged(v.id, f"its reference allele runs past a block of region {region.id}")
                continue
            on_genome = genome.base(chrom, v.start, v.start + len(v.ref)).upper()
            if on_genome != v.ref:
                mismatched += 1
                judged(v.id, f"reference allele {v.ref} does not match the genome, which holds {on_genome} at {v.chrom}:{v.start + 1}")
                continue
            minus = region.strand == "-"
            ref, alt = (reverse_complement(v.ref), reverse_complement(v.alt)) if minus else (v.ref, v.alt)
            edit = Edit(min(first_at, last_at), normalize(ref), normalize(alt))
            job = jobs.get(region.id) or jobs.setdefault(region.id, Job(region.id, genome.sequence(region)))
            problem = check_edit(job.sequence, edit)
            if problem:
                judged(v.id, problem)
                continue
            job.edits.append(edit)
            job.rows.append({"id": v.id, "region": region.id, "chrom": v.chrom, "pos": v.start + 1, "strand": region.strand,
                             "position": edit.position + 1, "ref": edit.ref, "alt": edit.alt,
                             "_record": v.record, "_allele": v.allele, "_vcf_alt": v.alt})  # for the annotated VCF, not the table
    names = sorted(unknown, key=unknown.get, reverse=True)
    detail = {"unknown_contig": f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"}
    said = [f"{n} {LEFT_OUT[reason]}{detail.get(reason, '')}" for reason, n in left_out.items() if n]
    if said:
        log(f"{vcf}: {variants} variant(s); left out: {'; '.join(said)}" + (f"; {mismatched} reference mismatch(es) skipped" if mismatched else ""))
    if variants and not any(job.edits for job in jobs.values()) and not mismatched:
        raise InputError(f"{vcf}: no variant lies in a region: {_likely_cause(left_out, unknown, variants, genome, regions)}")
    return [job for job in jobs.values() if job.edits]


def _likely_cause(left_out: dict, unknown: dict, variants: int, genome, regions: list) -> str:
    if left_out["unknown_contig"] * 2 >= variants:
        return (f"its contigs ({', '.join(sorted(unknown)[:5])}) are not the genome's ({', '.join(sorted(genome.lengths)[:5])}"
                f"{', ...' if len(genome.lengths) > 5 else ''}): map them with --contig-map FILE (two columns: VCF name, genome name)")
    if left_out["no_region"]:
        contigs = sorted({r.chrom for r in regions})
        return (f"{left_out['no_region']} fall outside every region (on {', '.join(contigs[:5])}{', ...' if len(contigs) > 5 else ''}): "
                "are the VCF, the genome and the annotation of the same assembly (GRCh38 or GRCh37)?")
    return "every record is reference-only or symbolic"


def groups(jobs: list[Job]) -> Iterator[list[tuple[Job, slice]]]:
    """The jobs' edits in groups of about CHUNK, scored together: a long saturation in pieces, many sequences with a
    few variants each (a VCF) in one run of batches. Each piece is a job and the slice of its edits."""
    group, size = [], 0
    for job in jobs:
        for at in range(0, len(job.edits), CHUNK):
            piece = slice(at, min(at + CHUNK, len(job.edits)))
            group.append((job, piece))
            size += piece.stop - piece.start
            if size >= CHUNK:
                yield group
                group, size = [], 0
    if group:
        yield group


def score_group(model, group: list[tuple[Job, slice]], overlap: int, max_batch_tokens: int, progress: Callable[[float], None],
                spare: bool = True, zero_shot: bool = True) -> dict:
    """The table's columns for a group of edits: the naming columns, cosine_distance, the task scores and, for a
    masked-LM bundle (unless zero_shot=False), the zero-shot p_ref, p_alt and llr. progress(n) adds variants done
    (halves where both the cosine and the zero-shot score are computed)."""
    from utr_runtime import variants

    items = [(job.sequence, job.edits[piece]) for job, piece in group]
    labels = model.task["labels"] if model.task is not None and model.task["level"] == "sequence" else []
    lm = zero_shot and model.bundle.has_lm_head
    share = 0.5 if lm else 1.0
    scores = variants.effects_of(model, items, overlap=overlap, max_batch_tokens=max_batch_tokens, spare=spare,
                                 progress=lambda n: progress(share * n))
    rows = [row for job, piece in group for row in job.rows[piece]]
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    columns["cosine_distance"] = np.concatenate([s["cosine_distance"] for s in scores]).astype(np.float64).tolist()
    for name in ("p_ref", "p_alt", "diff", "logOR"):
        if name not in scores[0]:
            continue
        values = np.concatenate([np.broadcast_to(s[name], (len(s["cosine_distance"]), len(labels))) for s in scores])
        for i, label in enumerate(labels):
            columns[name if len(labels) == 1 else f"{name}_{label}"] = values[:, i].astype(np.float64).tolist()
    if lm:
        scorable_edits = sum(1 for _, edits in items for e in edits if variants.scorable(e))
        positions = sum(len({e.position for e in edits if variants.scorable(e)}) for _, edits in items)
        progress(share * (len(rows) - scorable_edits))  # indels and the like: no zero-shot score
        per_row = scorable_edits / max(positions, 1)  # a masked row answers each variant at its position
        lm_scores = variants.zero_shot(model, items, max_batch_tokens=max_batch_tokens, progress=lambda n: progress(share * n * per_row))
        prefix = "lm_" if labels else ""  # a bundle with both heads keeps the task's p_ref and p_alt
        for name in ("p_ref", "p_alt", "llr"):
            columns[prefix + name] = np.concatenate([s[name] for s in lm_scores]).astype(np.float64).tolist()
    return columns


def plot_saturation(jobs: list[Job], tables: list[dict], path: str, what: str) -> None:
    """A heatmap per sequence of saturation scores: alternative base x position (reference cells blank)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(len(jobs), 1, figsize=(min(24, 4 + len(max(jobs, key=lambda j: len(j.sequence)).sequence) / 15), 1.6 * len(jobs) + 0.6),
                             squeeze=False)
    for ax, job, table in zip(axes[:, 0], jobs, tables):
        grid = np.full((4, len(job.sequence)), np.nan)
        for position, alt, value in zip(table["position"], table["alt"], table[what]):
            grid["ACGU".index(alt), position - 1] = value
        limit = np.nanmax(np.abs(grid)) or 1.0
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="RdBu_r" if what != "cosine_distance" else "viridis",
                          vmin=-limit if what != "cosine_distance" else 0, vmax=limit, extent=(0.5, len(job.sequence) + 0.5, 3.5, -0.5))
        ax.set_yticks(range(4), list("ACGU"))
        ax.set_title(job.sequence_id, fontsize=9, loc="left")
        fig.colorbar(image, ax=ax, label=what, pad=0.01)
    axes[-1, 0].set_xlabel("position (nt, 1-based)")
    fig.tight_layout()
    try:  # whole or not at all, beside the target (a symlink there is replaced, never written through)
        write_atomic(path, write=lambda file: fig.savefig(file, format=os.path.splitext(path)[1][1:].lower(), dpi=120))
    finally:
        plt.close(fig)


@dataclass
class VariantRun:
    """What `variants` scores and how: a variant table (`input`), the variants of a `vcf` in the `regions` of a genome,
    or every substitution (`saturate`) of the sequences of `input` or of the regions."""

    input: str | None = None
    vcf: str | None = None
    saturate: bool = False
    regions: tuple | None = None  # (genome FASTA, annotation, "bed" or "gtf", feature[, contig map])
    plot: str | None = None  # with saturate: heatmaps (.png, .pdf, .svg)
    overlap: int = 64
    batch_tokens: int = 8192
    max_length: int = 10_000_000
    skip_invalid: bool = False
    force: bool = False
    zero_shot: bool = True  # masked-LM bundles: p_ref, p_alt, llr
    ray_address: str | None = None  # "local", an address, or None: this process
    workers: int | None = None
    load: dict = field(default_factory=dict)  # utr_runtime.load's precision, device, threads, engine


def score_file(bundle: str, output: str, run: VariantRun, log=print) -> tuple[int, int]:
    """Score the variants of `run` with a bundle into `output`: a table (.tsv, .csv, .parquet), or with `vcf` the input
    VCF annotated (.vcf, or .vcf.gz: bgzipped and tabix-indexed), with the guarantees of utrexport.runs (judged first,
    atomic output, skipped records listed, SIGTERM and Ctrl-C at once, progress), in this process or on a Ray cluster.
    Returns (variants scored, sequences)."""
    from . import runs
    from .genome import RegionFile
    from .progress import Progress
    from .records import Judge
    from .vcf import annotation_problem, is_vcf_output

    if is_vcf_output(output):
        if not run.vcf:
            raise InputError(f"{output}: a VCF output annotates the --vcf input; write a table (.tsv, .csv, .parquet) for other inputs")
        problem = annotation_problem(run.vcf, output)
        if problem:
            raise InputError(f"{run.vcf}: {problem}")
    judged = Judge(run.skip_invalid, lambda name: f"variant {name!r}")
    regions = RegionFile(run.regions, output, run.skip_invalid) if run.regions else None
    if run.vcf:
        jobs = vcf_jobs(run.vcf, regions.genome, regions.regions, judged, log)
    elif run.saturate:
        if regions:
            records = [(r.id, regions.genome.sequence(r)) for r in regions.judged()]
            judged.skipped += regions.skipped
        else:
            from utr_runtime.sequences import read_sequences

            records = list(read_sequences(run.input, max_length=run.max_length))
        jobs = list(saturate_jobs(iter(records)))
    else:
        jobs = table_jobs(run.input, judged)
    scorer = Scorer(bundle, run, log)
    jobs = runnable(scorer.bundle.tokenizer(), jobs, judged)
    if not jobs:
        raise InputError("no variants to score" + (f" ({len(judged.skipped)} skipped)" if judged.skipped else ""))
    if run.plot and len(jobs) > 12:
        raise InputError(f"--plot draws one heatmap per sequence, at most 12; this run has {len(jobs)}")
    task = scorer.bundle.task
    if task is not None and task["level"] != "sequence":
        log(f"note: the {task['level']}-level head is not scored (p_ref, p_alt, diff, logOR are sequence-level); cosine distances are")
    if scorer.zero_shot and any(not scorable(e) for job in jobs for e in job.edits):
        log("note: zero-shot scores (p_ref, p_alt, llr) are for single-nucleotide substitutions; indels and longer substitutions get "
            "cosine_distance only (docs/spec.md section 9)")
    log(scorer.choice)
    tables = []
    writer = VcfAnnotation(run.vcf, output, scorer, run.force) if is_vcf_output(output) else ColumnsTable(output, run.force)
    with writer, Progress(sum(len(j.edits) for j in jobs), "variant", log) as progress:
        for columns in scorer.scored(groups(jobs), progress):
            writer.write(columns)
            if run.plot:
                tables.append(columns)
    if run.plot:
        what = next((c for c in tables[0] if c.startswith(("diff", "llr"))), "cosine_distance")
        plot_saturation(jobs, per_job(jobs, tables), run.plot, what)
    report = runs.write_skipped(output, judged.skipped)
    if judged.skipped:
        log(f"skipped {len(judged.skipped)} invalid variant(s), listed in {report}")
    return writer.rows, len(jobs)


class Scorer:
    """score_group over groups of edits, in order: with one model in this process, or with one per Ray actor."""

    def __init__(self, bundle: str, run: VariantRun, log):
        from . import runs

        self.run, self.log = run, log
        self.load_options = {"precision": "fp32", "device": "cpu", "threads": None, "engine": "auto", **run.load}
        if run.ray_address is None:
            self.model = runs.load(bundle, log, **self.load_options)
            self.bundle, engine = self.model.bundle, self.model.engine
            self.choice = runs.describe(self.model.precision, engine, self.model.device, self.load_options["threads"])
        else:
            from utr_runtime.engines import choose_engine

            self.bundle = runs.start_ray(bundle, self.load_options, run.ray_address, log)
            engine = choose_engine(self.load_options["engine"], self.load_options["device"], self.load_options["precision"])
            self.choice = runs.describe(self.load_options["precision"], engine, self.load_options["device"], self.load_options["threads"] or 1,
                                        " in each Ray worker")
        self.engine = engine
        self.zero_shot = run.zero_shot and self.bundle.has_lm_head

    def scored(self, groups: Iterator[list[tuple[Job, slice]]], progress) -> Iterator[dict]:
        from .interrupts import in_background

        run = self.run
        if run.ray_address is None:
            for group in groups:  # the engine runs in a background thread: SIGTERM and Ctrl-C end the run at once
                yield in_background(score_group, self.model, group, run.overlap, run.batch_tokens, progress.update, zero_shot=run.zero_shot)
            return
        from . import distributed

        for group, columns in distributed.score_groups(str(self.bundle.path), groups, self.load_options, run.workers, run.overlap,
                                                       run.batch_tokens, run.zero_shot):
            progress.update(sum(piece.stop - piece.start for _, piece in group))
            yield columns


class ColumnsTable:
    """The table of a run: its columns without the hidden ones (the VCF's record and allele numbers)."""

    def __init__(self, output: str, force: bool):
        from .writers import ColumnsWriter

        self.writer = ColumnsWriter(output, replace=force)

    @property
    def rows(self) -> int:
        return self.writer.rows

    def __enter__(self):
        self.writer.__enter__()
        return self

    def __exit__(self, *exc):
        return self.writer.__exit__(*exc)

    def write(self, columns: dict) -> None:
        self.writer.write({name: values for name, values in columns.items() if not name.startswith("_")})


NAMING = ("id", "region", "chrom", "pos", "strand", "position", "ref", "alt")


class VcfAnnotation:
    """The input VCF, written back with each scored allele's entries in INFO (utrexport.vcf), when the run ends."""

    def __init__(self, source: str, output: str, scorer: Scorer, force: bool):
        from utr_runtime.bundle import sha256_file

        from .versions import tool_versions

        self.source, self.output, self.force, self.rows, self.fields = source, output, force, 0, None
        self.entries: dict[int, list[tuple[int, int, str]]] = {}
        self.meta = {"version": tool_versions(("utrexport",)).get("utrexport", "unknown"),
                     "bundle": _header_value(scorer.bundle.path.name),
                     "bundle_sha256": sha256_file(scorer.bundle.path / "manifest.json"),  # the manifest holds every file's sha256
                     "precision": scorer.load_options["precision"], "engine": scorer.engine}

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            from .vcf import write_annotated

            entries = {record: [entry for _, _, entry in sorted(found)] for record, found in self.entries.items()}
            write_annotated(self.source, self.output, self.fields, entries, self.meta, replace=self.force)

    def write(self, columns: dict) -> None:
        from .vcf import encode

        scores = [name for name in columns if name not in NAMING and not name.startswith("_")]
        self.fields = self.fields or ["ALLELE", "REGION", "STRAND", "POSITION", *scores]
        for i in range(len(columns["id"])):
            cells = [encode(columns["_vcf_alt"][i]), encode(columns["region"][i]), columns["strand"][i], str(columns["position"][i]),
                     *(_cell(columns[name][i]) for name in scores)]
            self.entries.setdefault(columns["_record"][i], []).append((columns["_allele"][i], self.rows, "|".join(cells)))
            self.rows += 1


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.6g}"  # NaN: not scored


def _header_value(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "<>\"" else "_" for c in text)


def runnable(tokenizer, jobs: list[Job], judged) -> list[Job]:
    """Jobs whose sequence the model can run (section 3 of docs/spec.md); the variants of the others are judged."""
    from utr_runtime.model import judge

    problems = judge(tokenizer, [job.sequence for job in jobs])[1]
    for job, problem in zip(jobs, problems):
        if problem:
            for row in job.rows:
                judged(row["id"], f"its sequence {job.sequence_id!r}: {problem}")
    return [job for job, problem in zip(jobs, problems) if not problem]


def per_job(jobs: list[Job], tables: list[dict]) -> list[dict]:
    """One table per job, from the groups' tables (rows in job order)."""
    import itertools

    whole = {name: [value for t in tables for value in t[name]] for name in tables[0]}
    starts = [0, *itertools.accumulate(len(job.edits) for job in jobs)]
    return [{name: values[a:b] for name, values in whole.items()} for a, b in zip(starts, starts[1:])]
