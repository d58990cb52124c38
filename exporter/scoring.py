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
from utr_runtime.variants import Edit, check_edit, normalize, saturation

from .genome import INTEGER
from .writers import write_atomic

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


def vcf_jobs(vcf: str, genome, regions: list, judged: Callable[[str, str], None], log: Callable[[str], None]) -> list[Job]:
    """Each VCF variant in each region that holds it (both strands; on the minus strand the alleles are
    complemented and the position counts from the region's 5' end)."""
    from .genome import NO_ALT, RegionIndex, read_vcf, reverse_complement

    index, jobs, outside, checked, reference_only = RegionIndex(regions), {}, 0, {}, 0
    for v in read_vcf(vcf):
        if v.alt in NO_ALT:
            reference_only += 1
            continue
        holding = index.holding(v.chrom, v.start)
        if not holding:
            outside += 1
            continue
        for region in holding:
            if region.id not in checked:
                checked[region.id] = genome.problem(region)
            if checked[region.id]:
                judged(v.id, f"region {region.id} ({region.where}): {checked[region.id]}")
                continue
            if any(c == "<" or c == "*" for c in v.alt) or not v.ref:
                judged(v.id, f"symbolic or missing allele {v.ref or '-'}>{v.alt}: only sequence alleles are scored")
                continue
            last = v.start + len(v.ref) - 1
            first_at, last_at = region.offset(v.start), region.offset(last)
            if last_at is None or abs(last_at - first_at) != len(v.ref) - 1:
                judged(v.id, f"its reference allele runs past a block of region {region.id}")
                continue
            on_genome = genome.base(v.chrom, v.start, v.start + len(v.ref)).upper()
            if on_genome != v.ref:
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
                             "position": edit.position + 1, "ref": edit.ref, "alt": edit.alt})
    if outside:
        log(f"{outside} variant(s) lie in no region of the annotation: left out")
    if reference_only:
        log(f"{reference_only} reference-only record(s) (ALT '.'): no variant, left out")
    return [job for job in jobs.values() if job.edits]


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


def score_group(model, group: list[tuple[Job, slice]], overlap: int, max_batch_tokens: int, progress: Callable[[int], None],
                spare: bool = True) -> dict:
    """The table's columns for a group of edits: the naming columns, cosine_distance and the task scores."""
    from utr_runtime.variants import effects_of

    labels = model.task["labels"] if model.task is not None and model.task["level"] == "sequence" else []
    scores = effects_of(model, [(job.sequence, job.edits[piece]) for job, piece in group], overlap=overlap,
                        max_batch_tokens=max_batch_tokens, spare=spare, progress=progress)
    rows = [row for job, piece in group for row in job.rows[piece]]
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    columns["cosine_distance"] = np.concatenate([s["cosine_distance"] for s in scores]).astype(np.float64).tolist()
    for name in ("p_ref", "p_alt", "diff", "logOR"):
        if name not in scores[0]:
            continue
        values = np.concatenate([np.broadcast_to(s[name], (len(s["cosine_distance"]), len(labels))) for s in scores])
        for i, label in enumerate(labels):
            columns[name if len(labels) == 1 else f"{name}_{label}"] = values[:, i].astype(np.float64).tolist()
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
    regions: tuple | None = None  # (genome FASTA, annotation, "bed" or "gtf", feature)
    plot: str | None = None  # with saturate: heatmaps (.png, .pdf, .svg)
    overlap: int = 64
    batch_tokens: int = 8192
    max_length: int = 10_000_000
    skip_invalid: bool = False
    force: bool = False
    load: dict = field(default_factory=dict)  # utr_runtime.load's precision, device, threads, engine


def score_file(bundle: str, output: str, run: VariantRun, log=print) -> tuple[int, int]:
    """Score the variants of `run` with a bundle into `output` (.tsv, .csv, .parquet), with the guarantees of
    utrexport.runs (judged first, atomic output, skipped records listed, SIGTERM and Ctrl-C at once, progress).
    Returns (variants written, sequences)."""
    from . import runs
    from .genome import RegionFile
    from .interrupts import in_background
    from .progress import Progress
    from .records import Judge
    from .writers import ColumnsWriter

    judged = Judge(run.skip_invalid, lambda name: f"variant {name!r}")
    regions = RegionFile(*run.regions, output, run.skip_invalid) if run.regions else None
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
    model = runs.load(bundle, log, **run.load)
    jobs = runnable(model, jobs, judged)
    if not jobs:
        raise InputError("no variants to score" + (f" ({len(judged.skipped)} skipped)" if judged.skipped else ""))
    if run.plot and len(jobs) > 12:
        raise InputError(f"--plot draws one heatmap per sequence, at most 12; this run has {len(jobs)}")
    if model.task is not None and model.task["level"] != "sequence":
        log(f"note: the {model.task['level']}-level head is not scored (p_ref, p_alt, diff, logOR are sequence-level); cosine distances are")
    log(runs.describe(model.precision, model.engine, model.device, run.load.get("threads")))
    tables = []
    with ColumnsWriter(output, replace=run.force) as writer, Progress(sum(len(j.edits) for j in jobs), "variant", log) as progress:
        for group in groups(jobs):  # the engine runs in a background thread: SIGTERM and Ctrl-C end the run at once
            columns = in_background(score_group, model, group, run.overlap, run.batch_tokens, progress.update)
            writer.write(columns)
            if run.plot:
                tables.append(columns)
    if run.plot:
        what = next((c for c in tables[0] if c.startswith("diff")), "cosine_distance")
        plot_saturation(jobs, per_job(jobs, tables), run.plot, what)
    report = runs.write_skipped(output, judged.skipped)
    if judged.skipped:
        log(f"skipped {len(judged.skipped)} invalid variant(s), listed in {report}")
    return writer.rows, len(jobs)


def runnable(model, jobs: list[Job], judged) -> list[Job]:
    """Jobs whose sequence the model can run (section 3 of docs/spec.md); the variants of the others are judged."""
    problems = model.problems([job.sequence for job in jobs])
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
