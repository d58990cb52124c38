"""Running a file through a bundle with every guarantee the command line gives: the Python entry point for `utrexport
embed` and `predict` (a notebook or a workflow tool calls these, not the command).

    from utrexport import runs
    runs.embed_file("bundles/utrbert-6mer-random", "utrs.fa", "utrs.parquet", pooling="mean")
    runs.predict_file("bundles/classifier", None, "p.tsv", regions=("genome.fa", "utrs.bed", "bed", None))

The guarantees: the whole input is judged before any model work (a regular file is read twice; stdin or a pipe as
it streams), a file that changes between the two reads is an error, a bad record is an error naming it or with
`skip_invalid` is left out and listed in OUTPUT.skipped.tsv, the output is written atomically (nothing is left
behind unless the run completes), SIGTERM and Ctrl-C end the run at once, and progress is reported. The run is
local, or on a Ray cluster (`ray_address`; utrexport.distributed) inside the same calls.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field

import utr_runtime
from utr_runtime.errors import InputError, UtrError
from utr_runtime.model import NO_TASK, judge
from utr_runtime.tokenizer import foreign_letter

from .interrupts import in_background
from .progress import Progress, duration
from .records import Judge, valid_chunks
from .writers import open_prediction_writer, open_writer, write_atomic

CHUNK, RAY_CHUNK = 512, 16  # records judged and run at a time; on a cluster, the unit of work an actor takes
LONG_RUN = 600.0  # seconds: a run expected to take longer hears of the bundle's int8, if it passed its parity check


def load(bundle: str, log=print, **options):
    """utr_runtime.load, with its untrained-weights warning as one line of `log`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", utr_runtime.UntrainedModelWarning)
        model = utr_runtime.load(bundle, **options)
    for warning in caught:
        log(f"warning: {warning.message}")
    return model


def describe(precision: str, engine: str, device: str, threads: int | None, where: str = "", verb: str = "running") -> str:
    """What a run chose, said once at its start (engine auto, threads by default)."""
    if device != "cpu":
        used = device
    else:
        used = f"cpu, {threads} thread{'s' if threads != 1 else ''}" if threads else f"cpu, all {os.cpu_count()} cores"
    return f"{verb} {precision} on {engine}{where} ({used})"


@dataclass
class FileOptions:
    """How a file is read and run (the options of `embed` and `predict` that are not the model's)."""

    column: str | None = None  # the sequence column of a table
    chunk: int | None = None  # records at a time [default: CHUNK, RAY_CHUNK on a cluster]
    max_length: int = 10_000_000  # longest record (nt) read
    skip_invalid: bool = False
    force: bool = False  # replace an existing output
    ray_address: str | None = None  # "local", an address, or None: this process
    workers: int | None = None
    load: dict = field(default_factory=dict)  # utr_runtime.load's precision, device, threads, engine (default: fp32, cpu, all, auto)


class Runner:
    """embed or predict on chunks of sequences: in this process, or on a Ray cluster (utrexport.distributed).

    On a cluster this process loads no engine: it reads the bundle (for the tokenizer, to judge records, and the
    output's shape) and each actor loads the model."""

    def __init__(self, bundle: str, operation: str, options: dict, load_options: dict, ray_address: str | None, workers: int | None,
                 input: str, log=print):
        from utr_runtime.engines import choose_engine

        self.operation, self.options, self.load_options = operation, options, load_options
        self.ray_address, self.workers, self.log = ray_address, workers, log
        if ray_address is None:
            self.model = load(bundle, log, **load_options)
            self.bundle = self.model.bundle
            self.choice = describe(self.model.precision, self.model.engine, self.model.device, load_options["threads"])
        else:
            if input == "-" or (os.path.exists(input) and file_state(input) is None):
                raise UtrError("--ray reads a regular file (the cluster's reader cannot read this process's stdin or a pipe); "
                               "write the sequences to a file")
            self.bundle = start_ray(bundle, load_options, ray_address, log)
            engine = choose_engine(load_options["engine"], load_options["device"], load_options["precision"])
            self.choice = describe(load_options["precision"], engine, load_options["device"], load_options["threads"] or 1, " in each Ray worker")
        self.task = self.bundle.task
        if operation == "predict" and self.task is None:
            raise UtrError(f"{bundle}: {NO_TASK}")
        self.tokenizer = self.bundle.tokenizer()
        self.hidden_size = int(self.bundle.manifest["model"]["config"]["hidden_size"])
        contact = self.task is not None and self.task["level"] == "contact" and operation == "predict"
        self.max_kmers = self.bundle.max_tokens - 2 if contact else None

    def problems(self, seqs: list[str]) -> list[str | None]:
        return judge(self.tokenizer, seqs, self.options["strict"], self.max_kmers)[1]

    def results(self, input: str, column, chunk: int, max_length: int, judged, skip: bool, progress):
        """(names, sequences, result for the writer) per chunk of valid records, in input order."""
        if self.ray_address is not None:
            from . import distributed

            for names, seqs, result in distributed.run_file(
                    self.operation, str(self.bundle.path), input, column=column, chunk=chunk, max_length=max_length, k=self.bundle.k,
                    strict=self.options["strict"], max_kmers=self.max_kmers, workers=self.workers, threads=self.load_options["threads"] or 1,
                    load_options={k: v for k, v in self.load_options.items() if k != "threads"}, run_options=self.options):
                yield names, seqs, self._for_writer(result)
            return
        run = getattr(self.model, self.operation)
        for batch in valid_chunks(input, column, chunk, self.problems, judged, skip, max_length):
            names, seqs = [n for n, _ in batch], [s for _, s in batch]
            try:
                result = in_background(run, seqs, progress=progress.advance, **self.options)
            except InputError as e:
                if e.index is None:
                    raise
                raise InputError(f"{'stdin' if input == '-' else input}: record {names[e.index]!r}: {e.detail}") from None
            yield names, seqs, self._for_writer(result)

    def _for_writer(self, result):
        """Sequence-level raw outputs go to the writer with their probabilities (labels are decided on those)."""
        if self.operation != "predict" or self.task["level"] != "sequence":
            return result
        from utr_runtime.parity import task_outputs

        return result, task_outputs(self.task["problem_type"], result) if self.options["logits"] else result


def start_ray(bundle: str, load_options: dict, address: str, log=print) -> utr_runtime.Bundle:
    """Join (or start, address "local") the Ray cluster a run uses; the bundle opened and every file checked first."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UtrError("--ray needs Ray: pip install 'utrexport[ray]'")
    if load_options["device"] == "tensorrt":
        raise UtrError("--ray with --device tensorrt is not supported yet: TensorRT engines are built per GPU; use --device cuda")
    opened = utr_runtime.Bundle(bundle)
    opened.check_files()  # every file, before any worker starts
    if not opened.trained:
        log(f"warning: {utr_runtime.UntrainedModelWarning.sentence(opened.path)}")
    from . import distributed

    distributed.start(None if address == "local" else address, log)
    return opened


def embed_file(bundle: str, input: str | None, output: str, file: FileOptions = FileOptions(), regions: tuple | None = None, log=print,
               **options) -> tuple[int, int]:
    """Embeddings of every sequence of `input` (FASTA, TSV/CSV, "-" for stdin), or of the `regions` of a genome
    ((genome, annotation, "bed" or "gtf", feature)), written to `output` (.npy, .npz, .parquet): `options` are
    Model.embed's. Returns (sequences written, hidden size)."""
    return _run_file(bundle, "embed", input, output, file, regions, log, options)


def predict_file(bundle: str, input: str | None, output: str, file: FileOptions = FileOptions(), regions: tuple | None = None, log=print,
                 **options) -> tuple[int, dict]:
    """A task bundle's predictions for every sequence of `input` or of the `regions` of a genome, written to `output`;
    `options` are Model.predict's. Returns (sequences written, the bundle's task record)."""
    return _run_file(bundle, "predict", input, output, file, regions, log, options)


def _run_file(bundle, operation, input, output, file: FileOptions, regions, log, options):
    import contextlib

    from .genome import RegionFile

    source = RegionFile(regions, output, file.skip_invalid) if regions else contextlib.nullcontext(input)
    coordinates = source.coordinates if regions else None
    load_options = {"precision": "fp32", "device": "cpu", "threads": None, "engine": "auto", **file.load}
    options = {"strict": False, **({"logits": False} if operation == "predict" else {}), **options}
    with source as path:
        runner = Runner(bundle, operation, options, load_options, file.ray_address, file.workers, path, log)
        if operation == "embed":
            writer = open_writer(output, runner.hidden_size, replace=file.force, coordinates=coordinates)
        else:
            writer = open_prediction_writer(output, runner.task, replace=file.force, coordinates=coordinates)
        with writer:
            run_file(path, runner, writer, output, file, source.skipped if regions else [], source if regions else None, log)
    return writer.rows, (runner.hidden_size if operation == "embed" else runner.task)


def run_file(input: str, runner: Runner, writer, output: str, file: FileOptions, skipped: list | None = None, regions=None, log=print) -> None:
    """Read INPUT `chunk` records at a time, run them and write the results, reporting progress per batch (the
    guarantees of this module's docstring). `regions`: the RegionFile INPUT holds, so errors name annotation lines."""
    chunk = file.chunk or (RAY_CHUNK if runner.ray_address else CHUNK)
    label = "stdin" if input == "-" else regions.annotation if regions else input  # as the readers name it
    judged = Judge(file.skip_invalid, (lambda name: f"{regions.where[name]}: region {name!r}") if regions else
                   (lambda name: f"{label}: record {name!r}"), list(skipped or []))  # records left out before (regions)
    state = file_state(input)
    read_twice = state is not None  # a regular file; stdin, a pipe or <(...) can be read once, and is judged as it streams
    quiet = judged
    if read_twice:  # judged here, once: the run below meets the same records again and skips them silently
        valid = sum(len(batch) for batch in valid_chunks(input, file.column, chunk, runner.problems, judged, file.skip_invalid, file.max_length))
        if not valid:
            raise InputError(f"{label}: no valid sequences" if judged.skipped else f"{label}: no sequences")
        quiet = lambda name, reason: None  # noqa: E731
    log(runner.choice)  # once the input is judged: a bad record's error stays the one line

    def changed():  # records added or rewritten between the two reads: the run would not be what was judged
        raise InputError(f"{label} changed while this run read it; nothing was written: run again on a file that stays still, or pipe it in")

    unknown = 0
    with Progress(size_estimate(input), log=log) as progress:
        for names, seqs, result in runner.results(input, file.column, chunk, file.max_length, quiet, file.skip_invalid, progress):
            if read_twice and file_state(input) != state:
                changed()
            writer.write(names, result)
            progress.settle(len(names), sum(map(len, seqs)))
            unknown += sum(1 for s in seqs if foreign_letter(s))
            if progress.sequences == len(names):  # after the first chunk: the rate of this run is known
                suggest_faster(runner, progress.eta(), log)
        if writer.rows == 0:
            raise InputError(f"{label}: no valid sequences" if judged.skipped else f"{label}: no sequences")
        if read_twice and writer.rows != valid:
            changed()
    report = write_skipped(output, judged.skipped)
    if judged.skipped:
        log(f"skipped {len(judged.skipped)} invalid record(s), listed in {report}")
    if unknown:
        log(f"note: {unknown} sequences hold characters other than A, C, G, U, T, N; the k-mers holding them were read as <unk> (--strict refuses them)")


def suggest_faster(runner: Runner, eta: float | None, log=print) -> None:
    """On a long fp32 or fp16 run, name the bundle's int8 and what its parity check measured. The default stays fp32
    (the reference's own numbers): whether int8's agreement is enough is the user's call, made with the figure."""
    if eta is None or eta < LONG_RUN or runner.load_options["precision"] not in ("fp32", "fp16") or "int8" not in runner.bundle.precisions:
        return
    rows = [r for r in runner.bundle.manifest.get("parity", []) if r["precision"].split("/")[0] == "int8" and r["output"] == "mean_pooled"]
    if rows and all(r["passed"] for r in rows):
        log(f"note: about {duration(eta)} to go; this bundle's int8 passed its parity check (embeddings: minimum cosine "
            f"{min(r['min_cosine'] for r in rows):.4f} against PyTorch fp32) and ran 2.1-3.5x faster than fp32 in docs/benchmarks.md "
            "(x86 with AVX-512 VNNI): --precision int8")


def write_skipped(output: str, skipped: list[tuple[str, str]]) -> str | None:
    """OUTPUT.skipped.tsv: id and reason of each record left out, written whole or not at all. A run that skips nothing
    removes the report of an earlier run (--force allowed replacing it), so none is left beside the new output."""
    import csv
    import io

    report = f"{output}.skipped.tsv"
    if not skipped:
        if os.path.lexists(report):
            os.unlink(report)
        return None
    text = io.StringIO()
    table = csv.writer(text, delimiter="\t", lineterminator="\n")
    table.writerow(["id", "reason"])
    table.writerows(skipped)
    write_atomic(report, text.getvalue().encode("utf-8"))
    return report


def file_state(input: str) -> tuple | None:
    """What tells a regular file's content changed (identity, size, modification time); None for what is read once
    (stdin, a pipe, a process substitution)."""
    try:
        st = os.stat(input) if input != "-" else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st and stat.S_ISREG(st.st_mode) else None


def size_estimate(input: str) -> int | None:
    """About how many nucleotides INPUT holds, for an ETA: its size (uncompressed size for gzip); None for stdin."""
    if input == "-" or not os.path.isfile(input):
        return None
    size = os.path.getsize(input)
    try:
        with open(input, "rb") as f:
            start = f.read(6)
            if start[:2] == b"\x1f\x8b" and size >= 18:  # gzip: its trailer holds the uncompressed size mod 2**32
                f.seek(-4, os.SEEK_END)
                stored = int.from_bytes(f.read(4), "little")
                return max(stored, size)  # a file over 4 GiB uncompressed wraps; never guess below the compressed size
            if start.startswith((b"BZh", b"\xfd7zXZ\x00")):  # bzip2, xz: no stored size to estimate from
                return None
    except OSError:
        return None
    return size
