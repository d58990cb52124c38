"""The `utrexport` command line.

torch is imported only inside the commands that export (`build`), so `verify`, `embed`, `predict`, `fill-mask`
and `bench` of ONNX bundles work where torch is not installed.
"""

from __future__ import annotations

import functools
import sys

import click

from utr_runtime.errors import UtrError

KMERS = ("3", "4", "5", "6")
FILE_PRECISIONS = ("fp32", "fp16", "int8")  # what a build writes
PRECISIONS = FILE_PRECISIONS + ("bf16",)  # what a bundle runs (bf16: the fp32 file, bf16 inference on OpenVINO)
ENGINES = ("auto", "onnxruntime", "openvino")
DEVICES = ("cpu", "cuda", "tensorrt")


class PrecisionList(click.ParamType):
    """A comma-separated subset of `choices`, checked and in the order given."""

    name = "LIST"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def get_metavar(self, param, *args, **kwargs) -> str:  # click 8.2+ passes ctx, by keyword since 8.5
        return "[" + ",".join(self.choices) + "]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = tuple(dict.fromkeys(p.strip() for p in str(value).split(",") if p.strip()))
        wrong = [p for p in items if p not in self.choices]
        if wrong or not items:
            self.fail(f"{', '.join(wrong) or 'nothing'}: choose from {', '.join(self.choices)} (comma-separated)", param, ctx)
        return items


def _engine_option(fn):
    return click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
                        help="CPU engine; auto: OpenVINO where installed, else ONNX Runtime.")(fn)


class CommandError(click.ClickException):
    """A user's mistake: printed as one line, exit status 1."""

    def format_message(self) -> str:
        return self.message


def _fail_cleanly(fn):
    """Turn the runtime's and exporter's user errors into one-line CLI errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UtrError as e:
            raise CommandError(str(e)) from None
        except OSError as e:
            raise CommandError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None

    return wrapper


def _log(message: str) -> None:
    click.echo(f"utrexport: {message}", err=True)


def _load(bundle: str, **options):
    """utr_runtime.load, with its untrained-weights warning as one line on stderr, and what it chose."""
    import warnings

    import utr_runtime

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", utr_runtime.UntrainedModelWarning)
        model = utr_runtime.load(bundle, **options)
    for warning in caught:
        _log(f"warning: {warning.message}")
    return model


def _running(precision: str, engine: str, device: str, threads: int | None, where: str = "", verb: str = "running") -> str:
    """What a run chose, said once at its start (engine auto, threads by default)."""
    return f"{verb} {precision} on {engine}{where} ({_threads(device, threads)})"


def _threads(device: str, threads: int | None) -> str:
    import os

    if device != "cpu":
        return device
    return f"cpu, {threads} thread{'s' if threads != 1 else ''}" if threads else f"cpu, all {os.cpu_count()} cores"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="utrexport")
def main() -> None:
    """Export 3UTRBERT to ONNX/TensorRT bundles and run them without PyTorch."""
    import signal

    # SIGTERM (a scheduler's kill, a timeout) and Ctrl-C unwind alike, so temporary outputs are removed, not left behind,
    # and end with the status shells give them (143, 130), which a script tells apart from an error's 1.
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _terminated)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _check_output(output: str, input: str, force: bool) -> None:
    """One overwrite policy for every command that writes: an existing output is replaced only with --force, and
    never when it is the input itself."""
    import os

    if not os.path.lexists(output):
        return
    if input != "-" and os.path.exists(input) and os.path.exists(output) and os.path.samefile(input, output):
        raise CommandError(f"{output} is the input {input}: writing it would destroy the input; choose another output")
    if not force:
        raise CommandError(f"{output} exists; pass --force to replace it")
    if not os.path.islink(output) and not os.path.isfile(output):
        raise CommandError(f"{output} is not a regular file (a device, a fifo, a folder?); --force replaces files only")


@main.command()
@click.option("--kmer", "k", type=click.Choice(KMERS), required=True, help="k of the 3UTRBERT variant (3, 4, 5 or 6).")
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=str), help="Local checkpoint folder (multimolecule or original 3UTRBERT).")
@click.option("--hub", "hub_id", metavar="ID", help="Model hub id [default: multimolecule/utrbert-{K}mer].")
@click.option("--random-init", is_flag=True, help="Seeded random weights (untrained; works offline).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-init weights and the INT8 calibration sample.")
@click.option("--layers", type=click.IntRange(1, 48), default=12, show_default=True, help="Layers for --random-init.")
@click.option("--precision", type=PrecisionList(FILE_PRECISIONS), default="fp32,fp16,int8", show_default=True, help="Precisions to write.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False, path_type=str), help="INT8 calibration sequences (FASTA/TSV) [default: the shipped human 3'UTRs].")
@click.option("--calibration-size", type=click.IntRange(4, 4096), default=64, show_default=True, help="Calibration windows.")
@click.option("--calibration-method", type=click.Choice(["entropy", "percentile", "minmax"]), default="entropy", show_default=True)
@click.option("--attention", type=click.Choice(["fused", "plain"]), default="fused", show_default=True,
              help="fused: one ONNX Attention node per layer (TensorRT 10.14+); plain: MatMul/Softmax/MatMul, for "
                   "TensorRT 10.0-10.13 (e.g. Jetson's 10.3).")
@click.option("--problem-type", type=click.Choice(["binary", "multiclass", "multilabel", "regression"]),
              help="Problem type of a task head whose checkpoint config does not state one.")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Bundle folder [default: bundles/utrbert-{K}mer[-random]].")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.pass_context
@_fail_cleanly
def build(ctx, k, checkpoint, hub_id, random_init, seed, layers, precision, calibration_file, calibration_size, calibration_method,
          attention, problem_type, output, force) -> None:
    """Export a checkpoint (plain, MLM or fine-tuned task model) to a verified bundle folder.

    A precision below its accuracy gate is left out of the bundle with the reason; the exit status is 1 only
    when that precision was asked for with --precision.
    """
    k = int(k)
    if sum(bool(x) for x in (checkpoint, hub_id, random_init)) > 1:
        raise CommandError("choose one of --checkpoint, --hub and --random-init")
    if layers != 12 and not random_init:
        raise CommandError("--layers applies to --random-init only")
    precisions = precision
    output = output or f"bundles/utrbert-{k}mer" + ("-random" if random_init else "")
    import importlib.util
    from pathlib import Path

    missing = [m for m in ("torch", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandError(f"utrexport build needs the exporter's packages ({', '.join(missing)} missing): pip install 'utrexport[export]'")
    from .build import check_output

    check_output(Path(output), force)  # before minutes of work
    from . import checkpoints
    from .build import Calibration, build_bundle

    calibration = Calibration(size=calibration_size, seed=seed, method=calibration_method)
    if calibration_file:
        from utr_runtime.sequences import read_sequences
        from utr_runtime.bundle import sha256_file

        calibration.sequences = [s for _, s in read_sequences(calibration_file)]
        calibration.source = f"{calibration_file} (sha256 {sha256_file(calibration_file)[:16]}...)"
        if "int8" not in precisions:
            raise CommandError("--calibration applies to --precision int8 only")

    if random_init:
        _log(f"random-init {k}-mer model, seed {seed}, {layers} layers (untrained)")
        ckpt = checkpoints.from_random_init(k, seed, num_hidden_layers=layers)
    elif checkpoint:
        _log(f"loading checkpoint {checkpoint}")
        ckpt = checkpoints.from_folder(checkpoint, k, problem_type)
    else:
        hub_id = hub_id or f"multimolecule/utrbert-{k}mer"
        _log(f"fetching {hub_id} from the model hub")
        ckpt = checkpoints.from_hub(hub_id, k, problem_type=problem_type)
    if ckpt.config.task is not None:
        task = ckpt.config.task
        _log(f"task head: {task.level} level, {task.problem_type}, {task.num_labels} label(s) {ckpt.labels}")
    elif problem_type:
        raise CommandError("--problem-type applies to checkpoints with a task head only")
    path = build_bundle(ckpt, output, precisions, force=force, log=_log, calibration=calibration, attention=attention)
    manifest = _read_manifest(path)
    _print_parity(manifest.get("parity", []))
    _log_tensorrt_readiness(manifest)
    click.echo(f"bundle written to {path}")
    asked = ctx.get_parameter_source("precision") != click.core.ParameterSource.DEFAULT
    failed = [p for p in sorted(manifest.get("left_out", {})) if p in precisions]  # bf16, never asked for, only informs
    if failed and asked:
        raise CommandError(f"{', '.join(failed)} did not pass its accuracy gate and is not in the bundle (see above)")


def _log_tensorrt_readiness(manifest: dict) -> None:
    """Which of the bundle's models TensorRT can build, from which version on (the readiness check's verdict)."""
    ready = {p: m["tensorrt_min"] for p, m in manifest["models"].items() if m.get("tensorrt_ready")}
    if not ready:
        return
    versions = " or ".join(f"{v}+" for v in sorted(set(ready.values())))
    hint = "; for older TensorRT (e.g. Jetson's 10.3) build with --attention plain" if manifest["attention"]["form"] == "fused" else ""
    _log(f"TensorRT-ready: {', '.join(ready)} (TensorRT {versions}{hint})")


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--precision", type=PrecisionList(PRECISIONS), help="Precisions to check [default: all in the bundle, and bf16 where it runs].")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="tensorrt: the bundle's engines.")
@click.option("--engine", "engines", type=click.Choice(ENGINES[1:]), multiple=True, help="Engine to check, repeatable [default: every installed one].")
@_fail_cleanly
def verify_command(bundle, precision, device, engines) -> None:
    """Check checksums and run the parity fixtures of every precision on every engine; exit 1 on any failure."""
    from utr_runtime.verify import verify

    from utr_runtime import Bundle

    checked = Bundle(bundle)
    if not checked.trained:
        _log(f"warning: {bundle} holds untrained (random-init) weights: its outputs are for tests and timing, not for analysis")
    from utr_runtime.verify import default_engines

    _log(f"checking {', '.join(precision or checked.precisions)} on {', '.join(engines or default_engines(device)) if device != 'tensorrt' else 'TensorRT'}"
         + ("" if precision or device != "cpu" else " (and bf16 where this CPU runs it)"))
    rows = verify(checked, list(precision) if precision else None, device=device, engines=list(engines) or None)
    _print_parity(rows)
    if not all(r["passed"] for r in rows):
        raise CommandError("verification FAILED")
    click.echo("verification passed")


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True)
@click.option("--profile", "profiles", multiple=True, metavar="MIN,OPT,MAX",
              help="Optimization profile as MIN,OPT,MAX BATCHxTOKENS, min batch 1, repeatable [default: 1x1,32x128,64x128 and "
                   "1x129,8x512,64x512; on a GPU with under 16 GB a quarter of the rows]. Larger batches run in row slices.")
@click.option("--tf32", is_flag=True, help="Let fp32 layers run in TF32 (Ampere and later; off by default: fp32 is judged at max abs "
                                           "1e-4, TF32 by the tf32 tolerances).")
@click.option("--mask-positions", type=click.IntRange(1, 512), default=64, show_default=True,
              help="Masked positions per row the engine of an MLM bundle takes (fill-mask's <mask> count).")
@_fail_cleanly
def engine(bundle, precision, profiles, tf32, mask_positions) -> None:
    """Build a TensorRT engine from the bundle's ONNX model of one precision (needs a GPU and TensorRT 10.14+, or 10.0+
    for a bundle built with --attention plain)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # the readiness check reads the model before TensorRT does
        raise CommandError("utrexport engine needs the onnx package: pip install 'utrexport[tensorrt]'")
    from .tensorrt_build import build_engine, parse_profile

    parsed = tuple(parse_profile(p) for p in profiles) or None
    build_engine(bundle, precision, parsed, log=_log, tf32=tf32, mask_positions=mask_positions)
    click.echo(f"verify it with: utrexport verify {bundle} --device tensorrt")


def _model_options(fn):
    """Options of every command that runs a bundle's model on sequences from a file."""
    options = [
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="bf16: the fp32 model in bf16 (OpenVINO, CPUs with native bf16)."),
        click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True),
        _engine_option,
        click.option("--column", help="Sequence column of a TSV/CSV input [default: sequence or seq]."),
        click.option("--strict", is_flag=True, help="Refuse sequences with characters other than A, C, G, U, T, N."),
        click.option("--max-length", type=click.IntRange(1), default=10_000_000, show_default=True,
                     help="Longest record (nt) read; longer is an error (or skipped): a guard against wrong files."),
        click.option("--skip-invalid", is_flag=True,
                     help="Leave out bad records (duplicate id, no k-mer, --strict characters) and list them in OUTPUT.skipped.tsv."),
        click.option("--overlap", type=click.IntRange(0, 500), default=64, show_default=True, help="k-mers shared by neighbouring windows."),
        click.option("--batch-tokens", type=click.IntRange(512), default=8192, show_default=True, help="Token budget of one batch."),
        click.option("--chunk", type=click.IntRange(1), help="Sequences read, run and written at a time [default: 512; with --ray, 16: "
                     "the unit of work an actor takes, small enough to keep every actor busy]."),
        click.option("--threads", type=click.IntRange(1), help="Engine threads [default: all cores; with --ray, 1 per worker]."),
        click.option("--force", is_flag=True, help="Replace an existing OUTPUT (never the input)."),
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="Run on a Ray cluster: join the one at ADDRESS (or 'auto'), or start a local Ray without one. Needs utrexport[ray]."),
        click.option("--workers", type=click.IntRange(1), help="With --ray: model actors [default: the cluster's CPUs // --threads, or its GPUs]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _genome_options(fn):
    """Inputs from coordinates: regions of a genome FASTA described by a BED or GTF/GFF3 file (utrexport.genome)."""
    options = [
        click.option("--genome", type=click.Path(dir_okay=False, path_type=str),
                     help="Genome FASTA (plain or bgzip; indexed beside it on first use) to read regions from, with --bed or --gtf."),
        click.option("--bed", type=click.Path(dir_okay=False, path_type=str), help="Regions: BED6 or BED12 (blocks spliced in order)."),
        click.option("--gtf", type=click.Path(dir_okay=False, path_type=str),
                     help="Regions: GTF or GFF3 features grouped by transcript (transcript_id or Parent)."),
        click.option("--feature", help="GTF/GFF3 feature type to read [default: three_prime_utr, any letter case]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _Regions:
    """The sequences of a genome's regions, written to a hidden TSV beside the output (id, sequence), with each id's
    coordinates for the writer; regions that cannot be read are errors naming them, or skipped with --skip-invalid."""

    def __init__(self, genome: str | None, bed: str | None, gtf: str | None, feature: str | None, output: str, skip: bool):
        from .genome import Genome, read_regions

        if bool(bed) == bool(gtf):
            raise CommandError("--genome reads the regions of one annotation: give --bed or --gtf")
        if not genome:
            raise CommandError("--bed and --gtf describe regions of a genome: give --genome FASTA")
        self.genome, self.skipped, self.coordinates = Genome(genome), [], {}
        self.regions = list(read_regions(bed or gtf, "bed" if bed else "gtf", feature))
        if not self.regions:
            raise CommandError(f"{bed or gtf}: no regions")
        self.annotation, self.where = bed or gtf, {region.id: region.where for region in self.regions}
        self.output, self.skip = output, skip

    def judged(self) -> list:
        """The regions that can be read; the others raise, or are listed in `skipped`."""
        from utr_runtime.errors import InputError

        good = []
        for region in self.regions:
            problem = self.genome.problem(region)
            if problem and not self.skip:
                raise InputError(f"{region.where}: region {region.id!r}: {problem}")
            if problem:
                self.skipped.append((region.id, problem))
            else:
                good.append(region)
        return good

    def __enter__(self) -> str:
        import os
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
        import os

        os.unlink(self.path)


def _inputs(input: str | None, genome, bed, gtf, feature, output: str, skip_invalid: bool):
    """INPUT, or the regions of --genome: (a context giving the file to read, the coordinates or None, skipped)."""
    import contextlib

    if genome or bed or gtf:
        if input:
            raise CommandError("give INPUT or --genome with --bed/--gtf, not both")
        regions = _Regions(genome, bed, gtf, feature, output, skip_invalid)
        return regions, regions.coordinates, regions.skipped
    if not input:
        raise CommandError("give INPUT (FASTA, TSV/CSV, or - for stdin), or --genome with --bed or --gtf")
    return contextlib.nullcontext(input), None, []


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("input", metavar="[INPUT]", type=str, required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Output file: .npy, .npz (ids + vectors) or .parquet.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True)
@click.option("--truncate", is_flag=True, help="Embed only the first 510 k-mers of long sequences instead of all windows.")
@_model_options
@_genome_options
@_fail_cleanly
def embed(bundle, input, output, pooling, truncate, precision, device, engine, column, strict, max_length, skip_invalid, overlap,
          batch_tokens, chunk, threads, force, ray_address, workers, genome, bed, gtf, feature) -> None:
    """Embed the sequences of INPUT (FASTA, gzip FASTA, TSV/CSV, or - for stdin), or the regions of --genome with --bed
    or --gtf: one vector per sequence."""
    from .writers import FORMATS, open_writer

    _check_outputs(output, input or genome or "", force, FORMATS)

    source, coordinates, skipped = _inputs(input, genome, bed, gtf, feature, output, skip_invalid)
    with source as path:
        runner = _Runner(bundle, "embed", dict(pooling=pooling, max_batch_tokens=batch_tokens, overlap=overlap, truncation=truncate, strict=strict),
                         dict(precision=precision, device=device, threads=threads, engine=engine), ray_address, workers, path)
        with open_writer(output, runner.hidden_size, replace=force, coordinates=coordinates) as writer:
            _stream(path, column, chunk, runner, writer, skip_invalid, output, max_length, skipped, source if coordinates is not None else None)
    click.echo(f"{writer.rows} embeddings ({runner.hidden_size}-d, {pooling} pooling) written to {output}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("input", metavar="[INPUT]", type=str, required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sequence level: .tsv, .csv or .parquet. Nucleotide level: .npz or .parquet. Contact level: .npz.")
@click.option("--logits", is_flag=True, help="Write the head's raw outputs instead of probabilities.")
@click.option("--aggregate", type=click.Choice(["mean", "max"]), default="mean", show_default=True,
              help="Sequence level: how the windows of a sequence longer than one window are combined.")
@_model_options
@_genome_options
@_fail_cleanly
def predict(bundle, input, output, logits, aggregate, precision, device, engine, column, strict, max_length, skip_invalid, overlap,
            batch_tokens, chunk, threads, force, ray_address, workers, genome, bed, gtf, feature) -> None:
    """Run a fine-tuned bundle's task head on the sequences of INPUT (FASTA, gzip FASTA, TSV/CSV, or - for stdin), or on
    the regions of --genome with --bed or --gtf."""
    from .writers import PREDICTION_FORMATS, open_prediction_writer

    _check_outputs(output, input or genome or "", force, sorted({f for formats in PREDICTION_FORMATS.values() for f in formats}))

    source, coordinates, skipped = _inputs(input, genome, bed, gtf, feature, output, skip_invalid)
    with source as path:
        runner = _Runner(bundle, "predict", dict(logits=logits, aggregate=aggregate, max_batch_tokens=batch_tokens, overlap=overlap, strict=strict),
                         dict(precision=precision, device=device, threads=threads, engine=engine), ray_address, workers, path)
        task = runner.task
        with open_prediction_writer(output, task, replace=force, coordinates=coordinates) as writer:
            _stream(path, column, chunk, runner, writer, skip_invalid, output, max_length, skipped, source if coordinates is not None else None)
    what = "raw outputs" if logits else ("values" if task["problem_type"] == "regression" else "probabilities")
    click.echo(f"{task['level']}-level {what} of {writer.rows} sequences ({', '.join(task['labels'])}) written to {output}")


class _Runner:
    """embed or predict on chunks of sequences: in this process, or on a Ray cluster (--ray; utrexport.distributed).

    On a cluster this process loads no engine: it reads the bundle (for the tokenizer, to judge records, and the
    output's shape) and each actor loads the model."""

    def __init__(self, bundle: str, operation: str, options: dict, load_options: dict, ray_address: str | None, workers: int | None, input: str):
        from utr_runtime.model import NO_TASK

        self.operation, self.options, self.load_options = operation, options, load_options
        self.ray_address, self.workers = ray_address, workers
        if ray_address is None:
            self.model = _load(bundle, **load_options)
            self.bundle = self.model.bundle
            self.choice = _running(self.model.precision, self.model.engine, self.model.device, load_options["threads"])
        else:
            from utr_runtime.engines import choose_engine

            self.bundle = self._start_ray(bundle, input)
            engine = choose_engine(load_options["engine"], load_options["device"], load_options["precision"])
            self.choice = _running(load_options["precision"], engine, load_options["device"], load_options["threads"] or 1, " in each Ray worker")
        self.task = self.bundle.task
        if operation == "predict" and self.task is None:
            raise CommandError(f"{bundle}: {NO_TASK}")
        self.tokenizer = self.bundle.tokenizer()
        self.hidden_size = int(self.bundle.manifest["model"]["config"]["hidden_size"])
        contact = self.task is not None and self.task["level"] == "contact" and operation == "predict"
        self.max_kmers = self.bundle.max_tokens - 2 if contact else None

    def _start_ray(self, bundle: str, input: str):
        import importlib.util
        import os

        import utr_runtime

        if importlib.util.find_spec("ray") is None:
            raise CommandError("--ray needs Ray: pip install 'utrexport[ray]'")
        if input == "-" or (os.path.exists(input) and _file_state(input) is None):
            raise CommandError("--ray reads a regular file (the cluster's reader cannot read this process's stdin or a pipe); "
                               "write the sequences to a file")
        if self.load_options["device"] == "tensorrt":
            raise CommandError("--ray with --device tensorrt is not supported yet: TensorRT engines are built per GPU; use --device cuda")
        opened = utr_runtime.Bundle(bundle)
        opened.check_files()  # every file, before any worker starts
        if not opened.trained:
            _log(f"warning: {opened.path} holds untrained (random-init) weights: its outputs are for tests and timing, not for analysis")
        from . import distributed

        distributed.start(None if self.ray_address == "local" else self.ray_address, _log)
        return opened

    def problems(self, seqs: list[str]) -> list[str | None]:
        from utr_runtime.model import judge

        return judge(self.tokenizer, seqs, self.options["strict"], self.max_kmers)[1]

    def results(self, input: str, column, chunk: int, max_length: int, judged, skip: bool, progress):
        """(names, sequences, result for the writer) per chunk of valid records, in input order."""
        from utr_runtime.errors import InputError

        from .records import valid_chunks

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
                result = _in_background(run, seqs, progress=progress.advance, **self.options)
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


def _in_background(fn, *args, **kwargs):
    """fn(*args, **kwargs), computed in a daemon thread while this one waits. Signal handlers run in the main thread
    only, and only between bytecodes: an engine call running here would hold off SIGTERM and Ctrl-C until it returned
    (minutes on a long batch). Waiting here instead, they end the run at once and remove its partial outputs."""
    import queue
    import threading

    done: queue.SimpleQueue = queue.SimpleQueue()

    def work():
        try:
            done.put((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting thread, which raises it
            done.put((False, e))

    threading.Thread(target=work, name="utrexport-engine", daemon=True).start()
    try:
        finished, value = done.get()
    except BaseException as interrupt:  # SIGTERM's SystemExit or Ctrl-C, while the engine still runs
        _end_after_unwinding(interrupt)
        raise
    if not finished:
        raise value
    return value


def _end_after_unwinding(interrupt: BaseException) -> None:
    """An engine's call cannot be stopped, and tearing the interpreter down around it can abort the process (SIGABRT,
    seen once in a CI run). So once the run has unwound (its partial output removed), the process ends at once, with
    the status it was ending with, skipping the teardown."""
    import atexit
    import os
    import sys

    code = interrupt.code if isinstance(interrupt, SystemExit) and isinstance(interrupt.code, int) else 1

    def end():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    atexit.register(end)


CHUNK, RAY_CHUNK = 512, 16  # --chunk defaults: on a cluster, the unit of work an actor takes


def _stream(input: str, column: str | None, chunk: int | None, runner: _Runner, writer, skip_invalid: bool, output: str, max_length: int,
            skipped: list[tuple[str, str]] | None = None, regions: "_Regions | None" = None) -> None:
    """Read INPUT `chunk` records at a time, run them and write the results, reporting progress per batch.

    Records are judged before any model work: a regular file is scanned whole first (stdin or a pipe as it streams),
    so a bad record near the end of a large input costs seconds, not the run; a file that changes between the two
    reads is an error, never a silently different run. A bad record (duplicate id, no k-mer, ...)
    is an error naming it, or with `skip_invalid` is left out and listed in OUTPUT.skipped.tsv. No output is left
    behind unless the run completes.
    """
    from utr_runtime.errors import InputError
    from utr_runtime.tokenizer import foreign_letter

    from .records import valid_chunks

    chunk = chunk or (RAY_CHUNK if runner.ray_address else CHUNK)
    skipped = list(skipped or [])  # records left out before this read (regions of a genome)
    label = "stdin" if input == "-" else regions.annotation if regions else input  # as the readers name it; regions: their annotation

    def judged(name: str, reason: str) -> None:
        if not skip_invalid:
            raise InputError(f"{regions.where[name]}: region {name!r}: {reason}" if regions else f"{label}: record {name!r}: {reason}")
        skipped.append((name, reason))

    state = _file_state(input)
    read_twice = state is not None  # a regular file; stdin, a pipe or <(...) can be read once, and is judged as it streams
    if read_twice:  # judged here, once: the run below meets the same records again and skips them silently
        valid = sum(len(batch) for batch in valid_chunks(input, column, chunk, runner.problems, judged, skip_invalid, max_length))
        if not valid:
            raise InputError(f"{label}: no valid sequences" if skipped else f"{label}: no sequences")
        judged = lambda name, reason: None  # noqa: E731
    _log(runner.choice)  # once the input is judged: a bad record's error stays the one line

    def changed():  # records added or rewritten between the two reads: the run would not be what was judged
        raise InputError(f"{label} changed while this run read it; nothing was written: run again on a file that stays still, or pipe it in")

    unknown = 0
    with _Progress(_size_estimate(input)) as progress:
        for names, seqs, result in runner.results(input, column, chunk, max_length, judged, skip_invalid, progress):
            if read_twice and _file_state(input) != state:
                changed()
            writer.write(names, result)
            progress.chunk_done(len(names), sum(map(len, seqs)))
            unknown += sum(1 for s in seqs if foreign_letter(s))
            if progress.sequences == len(names):  # after the first chunk: the rate of this run is known
                _suggest_faster(runner, progress.eta())
        if writer.rows == 0:
            raise InputError(f"{label}: no valid sequences" if skipped else f"{label}: no sequences")
        if read_twice and writer.rows != valid:
            changed()
    report = _write_skipped(output, skipped)
    if skipped:
        _log(f"skipped {len(skipped)} invalid record(s), listed in {report}")
    if unknown:
        _log(f"note: {unknown} sequences hold characters other than A, C, G, U, T, N; the k-mers holding them were read as <unk> (--strict refuses them)")


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("input", metavar="[INPUT]", type=str, required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Table: .tsv, .csv or .parquet.")
@click.option("--vcf", type=click.Path(dir_okay=False, path_type=str), help="Variants of a VCF (plain or gzip), in the regions of --genome with --bed/--gtf.")
@click.option("--saturate", is_flag=True, help="Every single-nucleotide substitution of each sequence of INPUT (or region): 3 per position.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), help="With --saturate: a PNG heatmap (alternative x position) per sequence (at most 12).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@_engine_option
@click.option("--threads", type=click.IntRange(1), help="Engine threads [default: all cores].")
@click.option("--overlap", type=click.IntRange(0, 500), default=64, show_default=True, help="k-mers shared by neighbouring windows.")
@click.option("--batch-tokens", type=click.IntRange(512), default=8192, show_default=True, help="Token budget of one batch.")
@click.option("--max-length", type=click.IntRange(1), default=10_000_000, show_default=True, help="Longest record (nt) read.")
@click.option("--skip-invalid", is_flag=True, help="Leave out bad variants (reference allele not matching, ...) and list them in OUTPUT.skipped.tsv.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@_genome_options
@_fail_cleanly
def variants(bundle, input, output, vcf, saturate, plot, precision, device, engine, threads, overlap, batch_tokens, max_length, skip_invalid, force,
             genome, bed, gtf, feature) -> None:
    """Variant effects: for each variant, the cosine distance between the reference's and the alternative's mean
    embeddings and, for a sequence-level task head, p_ref, p_alt, diff and logOR (the 3UTRBERT paper's scores).

    \b
    Variants come from INPUT, a TSV/CSV with columns id, sequence, position (1-based), ref, alt;
    or from --vcf with --genome and --bed/--gtf (strand-aware: minus-strand alleles are complemented);
    or with --saturate, every substitution of the sequences of INPUT (FASTA, TSV/CSV) or of the regions.
    Substitutions rerun only the windows that hold them; insertions and deletions rerun the edited sequence whole.
    """
    from utr_runtime.errors import InputError

    from . import scoring
    from .writers import ColumnsWriter

    _check_outputs(output, input or vcf or genome or "", force)
    if plot and not saturate:
        raise CommandError("--plot draws saturation heatmaps: use it with --saturate")
    if plot:
        _check_plot(plot, input or vcf or genome or "", force)
    if vcf and saturate:
        raise CommandError("--vcf scores the VCF's variants; --saturate scores every substitution: choose one")
    skipped: list[tuple[str, str]] = []

    def judged(name: str, reason: str) -> None:
        if not skip_invalid:
            raise InputError(f"variant {name!r}: {reason}")
        skipped.append((name, reason))

    regions = _Regions(genome, bed, gtf, feature, output, skip_invalid) if (genome or bed or gtf) else None
    if regions and input:
        raise CommandError("give INPUT or --genome with --bed/--gtf, not both")
    if vcf and not regions:
        raise CommandError("--vcf places variants on regions of a genome: give --genome and --bed or --gtf")
    if not (input or regions):
        raise CommandError("give INPUT (a variant table, or sequences with --saturate), or --genome with --bed/--gtf")
    if vcf:
        jobs = scoring.vcf_jobs(vcf, regions.genome, regions.regions, judged, _log)
    elif saturate:
        if regions:
            records = [(r.id, regions.genome.sequence(r)) for r in regions.judged()]
            skipped += regions.skipped
        else:
            from utr_runtime.sequences import read_sequences

            records = list(read_sequences(input, max_length=max_length))
        jobs = list(scoring.saturate_jobs(iter(records)))
    elif regions:
        raise CommandError("with --genome, give --vcf (the variants) or --saturate (every substitution of each region)")
    else:
        jobs = scoring.table_jobs(input, judged)
    model = _load(bundle, precision=precision, device=device, threads=threads, engine=engine)
    jobs = _judge_jobs(model, jobs, judged)
    if not jobs:
        raise InputError("no variants to score" + (f" ({len(skipped)} skipped)" if skipped else ""))
    if plot and len(jobs) > 12:
        raise CommandError(f"--plot draws one heatmap per sequence, at most 12; this run has {len(jobs)}")
    if model.task is not None and model.task["level"] != "sequence":
        _log(f"note: the {model.task['level']}-level head is not scored (p_ref, p_alt, diff, logOR are sequence-level); cosine distances are")
    _log(_running(model.precision, model.engine, model.device, threads))
    tables = []
    with ColumnsWriter(output, replace=force) as writer, _VariantProgress(sum(len(j.edits) for j in jobs)) as progress:
        for group in scoring.groups(jobs):  # the engine runs in a background thread: SIGTERM and Ctrl-C end the run at once
            columns = _in_background(scoring.score_group, model, group, overlap, batch_tokens, progress.update)
            writer.write(columns)
            if plot:
                tables.append(columns)
    if plot:
        what = next((c for c in tables[0] if c.startswith("diff")), "cosine_distance")
        scoring.plot_saturation(jobs, _merge_tables(jobs, tables), plot, what)
    report = _write_skipped(output, skipped)
    if skipped:
        _log(f"skipped {len(skipped)} invalid variant(s), listed in {report}")
    click.echo(f"{writer.rows} variant effects of {len(jobs)} sequence(s) written to {output}" + (f"; heatmaps in {plot}" if plot else ""))


class _VariantProgress:
    """Variants scored: a tqdm bar on a terminal; elsewhere (a log file, a cluster job) a line every LOG_INTERVAL s."""

    LOG_INTERVAL = 30.0

    def __init__(self, total: int):
        import time

        from tqdm import tqdm

        self.live, self.total, self.done, self.clock = sys.stderr.isatty(), total, 0, time.monotonic
        self.start = self.last = self.clock()
        self.bar = tqdm(total=total, unit="variant", file=sys.stderr, disable=not self.live, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if not self.live and self.clock() - self.last >= self.LOG_INTERVAL:
            self.last = self.clock()
            rate = self.done / (self.last - self.start)
            _log(f"{self.done:,} of {self.total:,} variants scored ({rate:.1f}/s, about {_duration((self.total - self.done) / rate)} to go)")


def _judge_jobs(model, jobs: list, judged) -> list:
    """Jobs whose sequence the model can run (section 3 of docs/spec.md); the variants of the others are judged."""
    problems = model.problems([job.sequence for job in jobs])
    for job, problem in zip(jobs, problems):
        if problem:
            for row in job.rows:
                judged(row["id"], f"its sequence {job.sequence_id!r}: {problem}")
    return [job for job, problem in zip(jobs, problems) if not problem]


def _merge_tables(jobs: list, tables: list[dict]) -> list[dict]:
    """One table per job, from the groups' tables (rows in job order)."""
    import itertools

    whole = {name: [value for t in tables for value in t[name]] for name in tables[0]}
    starts = [0, *itertools.accumulate(len(job.edits) for job in jobs)]
    return [{name: values[a:b] for name, values in whole.items()} for a, b in zip(starts, starts[1:])]

LONG_RUN = 600.0  # seconds: a run expected to take longer hears of the bundle's int8, if it passed its parity check


def _amount(nt: float) -> str:
    """nt, knt or Mnt: whichever reads as a number a person would say."""
    return f"{nt:,.0f} nt" if nt < 1e4 else f"{nt / 1e3:,.1f} knt" if nt < 1e7 else f"{nt / 1e6:,.2f} Mnt"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _suggest_faster(runner: _Runner, eta: float | None) -> None:
    """On a long fp32 or fp16 run, name the bundle's int8 and what its parity check measured. The default stays fp32
    (the reference's own numbers): whether int8's agreement is enough is the user's call, made with the figure."""
    if eta is None or eta < LONG_RUN or runner.load_options["precision"] not in ("fp32", "fp16") or "int8" not in runner.bundle.precisions:
        return
    rows = [r for r in runner.bundle.manifest.get("parity", []) if r["precision"].split("/")[0] == "int8" and r["output"] == "mean_pooled"]
    if rows and all(r["passed"] for r in rows):
        _log(f"note: about {_duration(eta)} to go; this bundle's int8 passed its parity check (embeddings: minimum cosine "
             f"{min(r['min_cosine'] for r in rows):.4f} against PyTorch fp32) and ran 2.1-3.5x faster than fp32 in docs/benchmarks.md "
             "(x86 with AVX-512 VNNI): --precision int8")


def _check_outputs(output: str, input: str, force: bool, formats=None) -> None:
    """Before anything loads: the input is there, the output's format is one written, and the output and its
    skipped-records report (outputs alike) are replaced only with --force."""
    import os

    if input and input != "-" and not os.path.exists(input):
        raise CommandError(f"{input}: no such file")
    if formats and os.path.splitext(output)[1].lower() not in formats:
        raise CommandError(f"{output}: output must end in {', '.join(formats)}")
    _check_output(output, input, force)
    _check_output(f"{output}.skipped.tsv", input, force)


def _check_plot(plot: str, input: str, force: bool) -> None:
    """--plot is an output too, checked before the run: its format, matplotlib, and whether it may be replaced."""
    import os

    formats = (".png", ".pdf", ".svg")
    if os.path.splitext(plot)[1].lower() not in formats:
        raise CommandError(f"--plot {plot}: name a {', '.join(formats)} file (the format follows the name)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install matplotlib") from None
    _check_output(plot, input, force)


def _write_skipped(output: str, skipped: list[tuple[str, str]]) -> str | None:
    """OUTPUT.skipped.tsv: id and reason of each record left out, written whole or not at all. A run that skips nothing
    removes the report of an earlier run (--force allowed replacing it), so none is left beside the new output."""
    import csv
    import io
    import os

    from .writers import write_atomic

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


def _file_state(input: str) -> tuple | None:
    """What tells a regular file's content changed (identity, size, modification time); None for what is read once
    (stdin, a pipe, a process substitution)."""
    import os
    import stat

    try:
        st = os.stat(input) if input != "-" else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st and stat.S_ISREG(st.st_mode) else None


def _size_estimate(input: str) -> int | None:
    """About how many nucleotides INPUT holds, for an ETA: its size (uncompressed size for gzip); None for stdin."""
    import os

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


@main.command("fill-mask")
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("text")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@_engine_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON (the transformers pipeline's format).")
@_fail_cleanly
def fill_mask(bundle, text, top_k, precision, device, engine, as_json) -> None:
    """Predict the tokens at each <mask> of TEXT (a k-mer token <mask> stands for one k-mer)."""
    import json

    import warnings

    import utr_runtime

    model = _load(bundle, precision=precision, device=device, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", utr_runtime.InputWarning)
        answer = model.fill_mask(text, top_k=top_k)
    _log(_running(model.precision, model.engine, model.device, None, verb="ran"))
    for warning in caught:
        _log(f"warning: {warning.message}")
    if as_json:
        click.echo(json.dumps(answer, indent=1))
        return
    for i, row in enumerate(answer if isinstance(answer[0], list) else [answer]):
        click.echo(f"mask {i + 1}:")
        for guess in row:
            click.echo(f"  {guess['token_str']:<8} {guess['score']:.4f}")


def _repository_options(fn):
    """Options of the Triton model repository, for `triton` and `serve`: what runs, and what one request may cost."""
    from utr_runtime.serving import CAPABILITIES, Limits

    options = [
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="int8: the fast CPU path; bf16: OpenVINO on CPUs with native bf16."),
        click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                     help="cpu: KIND_CPU instances; cuda or tensorrt: KIND_GPU, one GPU per instance."),
        _engine_option,
        click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True, help="Model instances (processes) per model."),
        click.option("--threads", type=click.IntRange(1), help="Engine threads per instance [default: the cores divided among the instances]."),
        click.option("--max-batch-size", type=click.IntRange(1, 4096), default=64, show_default=True,
                     help="Sequences Triton batches into one execution (and the most one request may send)."),
        click.option("--max-queue-delay-us", type=click.IntRange(0), default=2000, show_default=True,
                     help="How long the dynamic batcher waits for more requests to batch."),
        click.option("--max-length", type=click.IntRange(1), default=Limits.max_length, show_default=True, help="Longest sequence (nt) a request may send."),
        click.option("--max-request-nt", type=click.IntRange(1), default=Limits.max_request_nt, show_default=True,
                     help="Most nt in all the sequences of one request."),
        click.option("--max-token-rows", type=click.IntRange(1), default=Limits.max_token_rows, show_default=True,
                     help="Most rows of one tokens-pooling answer (sequences x the longest one's k-mers)."),
        click.option("--max-fill-mask-answers", type=click.IntRange(1), default=Limits.max_fill_mask_answers, show_default=True,
                     help="Most fill-mask guesses in one request (masks x top_k)."),
        click.option("--model", "models", type=click.Choice(CAPABILITIES), multiple=True,
                     help="Serve only this capability, repeatable [default: every one the bundle has: embed, predict, fill_mask]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _repository(precision, device, engine, instances, threads, max_batch_size, max_queue_delay_us, max_length, max_request_nt, max_token_rows,
                max_fill_mask_answers, models):
    from utr_runtime.serving import Limits

    from .triton import RepositoryOptions

    limits = Limits(max_length=max_length, max_sequences=max_batch_size, max_request_nt=max_request_nt, max_token_rows=max_token_rows,
                    max_fill_mask_answers=max_fill_mask_answers)
    return RepositoryOptions(precision=precision, engine=engine, device=device, threads=threads, instances=instances, max_batch_size=max_batch_size,
                             max_queue_delay_us=max_queue_delay_us, limits=limits, capabilities=list(models))


@main.command()
@click.argument("bundles", metavar="BUNDLE...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=str), help="Model repository folder to write.")
@click.option("--force", is_flag=True, help="Replace a repository utrexport wrote before.")
@_repository_options
@_fail_cleanly
def triton(bundles, output, force, **options) -> None:
    """Write a Triton Inference Server model repository serving one or more bundles (Python backend: the server needs
    NumPy and the engine only). One bundle's models are named embed, predict, fill_mask; several bundles' names start
    with the bundle's folder name."""
    from .triton import write_repository
    from .tritonserver import ADMIN_APIS

    names = write_repository(bundles, output, _repository(**options), force=force)
    click.echo(f"Triton model repository written to {output}: models {', '.join(names)}")
    click.echo(f"run it locked: tritonserver --model-repository={output} --model-control-mode=none "
               f"--http-restricted-api={ADMIN_APIS}:admin-key=SECRET --grpc-restricted-protocol={ADMIN_APIS}:admin-key=SECRET   "
               f"(or: utrexport serve {' '.join(bundles)})")


@main.command()
@click.argument("bundles", metavar="BUNDLE...", nargs=-1, type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the front (HTTP: OpenAI embeddings, KServe v2) listens on; 0.0.0.0: every network, with an API key.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="The front's port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="Triton's gRPC port (on 127.0.0.1).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True, help="Triton's metrics port (on 127.0.0.1).")
@click.option("--api-key", envvar="UTREXPORT_API_KEY", show_envvar=True,
              help="Key every request but health must send as 'Authorization: Bearer KEY' (prefer the variable or --api-key-file: "
                   "a command line is visible to every user of the machine).")
@click.option("--api-key-file", type=click.File("r"), help="A file whose first line is the API key.")
@click.option("--no-api-key", is_flag=True, help="Serve a non-loopback --host without a key (behind a gateway that checks one).")
@click.option("--expose-triton", is_flag=True,
              help="Triton's gRPC and metrics ports on --host too (locked; only a tritonserver of NVIDIA's release 25.07 or later).")
@click.option("--max-body-bytes", type=click.IntRange(1), default=16 * 2**20, show_default=True, help="Largest request body (413 past it).")
@click.option("--max-waiting", type=click.IntRange(1), default=256, show_default=True,
              help="Requests the front holds at once (queued or running); more are answered 429 with Retry-After.")
@click.option("--drain-timeout", type=click.FloatRange(0), default=30, show_default=True,
              help="Seconds requests in flight get to finish after SIGTERM, SIGINT or SIGHUP.")
@click.option("--triton-log", type=click.Path(dir_okay=False, path_type=str),
              help="Triton's own log file; '-' for this terminal [default: utrexport-tritonserver-PORT.log in the temporary folder].")
@click.option("--tritonserver", type=click.Path(dir_okay=False, path_type=str),
              help="The tritonserver to run [default: the one on PATH, else the server environment's].")
@click.option("--server-env", type=click.Path(file_okay=False, path_type=str),
              help="The server environment, made on first use [default: $UTREXPORT_SERVER_ENV, else ~/.cache/utrexport/triton-server].")
@click.option("--setup", is_flag=True, help="Only make the server environment (if it is not made yet), then exit.")
@click.option("--timeout", type=click.FloatRange(1), default=600, show_default=True, help="Seconds to wait for the models to be ready.")
@_repository_options
@_fail_cleanly
def serve(bundles, host, http_port, grpc_port, metrics_port, api_key, api_key_file, no_api_key, expose_triton, max_body_bytes, max_waiting,
          drain_timeout, triton_log, tritonserver, server_env, setup, timeout, **options) -> None:
    """Serve bundles until Ctrl-C, SIGTERM or SIGHUP: OpenAI's /v1/embeddings and KServe v2 over HTTP (the front: API key,
    limits, drain), on Triton Inference Server (dynamic batching, metrics) kept on loopback and locked. Without a
    tritonserver on PATH, it runs the one of a server environment it makes once."""
    from . import serve as serving
    from . import tritonserver as triton_server

    if setup:
        server = triton_server.find_server(tritonserver, server_env, _log)
        click.echo(f"server ready: {server.binary}")
        return
    if not bundles:
        raise CommandError("name at least one BUNDLE to serve (or pass --setup)")
    if api_key_file:
        api_key = (api_key_file.readline().strip() or None) if not api_key else api_key
        if not api_key:
            raise CommandError(f"{api_key_file.name}: no API key on its first line")
    run = serving.ServeOptions(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, api_key=api_key,
                               no_api_key=no_api_key, expose_triton=expose_triton, max_body_bytes=max_body_bytes, max_waiting=max_waiting,
                               drain_timeout=drain_timeout, ready_timeout=timeout, tritonserver=tritonserver, server_env=server_env,
                               triton_log=triton_log, repository=_repository(**options))
    serving.run(bundles, run, _log)


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--shapes", default="1x128,1x512,8x128,32x512", show_default=True, help="Comma-separated BATCHxTOKENS shapes.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Alternating rounds per shape.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--precision", type=PrecisionList(PRECISIONS), help="Precisions [default: all in the bundle, and bf16 where it runs].")
@click.option("--engine", "engines", type=click.Choice(ENGINES[1:]), multiple=True, help="CPU engine to time, repeatable [default: every installed one].")
@click.option("--e2e-sequences", type=click.IntRange(0), default=24, show_default=True, help="Real 3'UTRs for the end-to-end run (0: skip).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch paths.")
@click.option("--no-tokenizer", is_flag=True, help="Skip the tokenizer benchmark.")
@click.option("--no-memory", is_flag=True, help="Skip the fresh-process runs of each path (peak memory, cold start).")
@click.option("--out", "out_prefix", type=click.Path(path_type=str), help="Write OUT.json and OUT.md (and OUT.png with --plot).")
@click.option("--plot", is_flag=True, help="Also draw a PNG chart of throughput per path and shape.")
@_fail_cleanly
def bench(bundle, shapes, repeats, threads, device, precision, engines, e2e_sequences, no_torch, no_tokenizer, no_memory, out_prefix, plot) -> None:
    """Time every path (PyTorch; each engine x precision) against this machine's GEMM ceiling of its data type."""
    import json

    from . import benchmark

    try:
        shape_list = [tuple(int(x) for x in s.lower().split("x")) for s in shapes.split(",") if s.strip()]
        assert shape_list and all(len(s) == 2 and min(s) >= 1 for s in shape_list)
    except (ValueError, AssertionError):
        raise CommandError(f"--shapes: expected BATCHxTOKENS,... (e.g. 1x128,8x128), got {shapes!r}") from None
    precisions = list(precision) if precision else None
    import os
    import warnings

    import utr_runtime

    if not utr_runtime.Bundle(bundle, check=False).trained:
        _log(f"note: {bundle} holds untrained (random-init) weights: fine for timing, which does not depend on the values")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the reference's deprecation notes are not the user's business
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", utr_runtime.UntrainedModelWarning)  # said once above, not once per path
        result = benchmark.run_benchmark(bundle, shape_list, repeats, threads, device, precisions, e2e_sequences,
                                         torch=not no_torch, tokenizer=not no_tokenizer, memory=not no_memory,
                                         engines=list(engines) or None, log=_log)
    result["command"] = "utrexport " + " ".join(sys.argv[1:])
    report = benchmark.to_markdown(result)
    click.echo(report)
    if out_prefix:
        from pathlib import Path

        Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out_prefix}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{out_prefix}.md").write_text(report)
        if plot:
            benchmark.plot(result, f"{out_prefix}.png")
        _log(f"results written to {out_prefix}.json, {out_prefix}.md" + (f", {out_prefix}.png" if plot else ""))
    elif plot:
        raise CommandError("--plot needs --out PREFIX")


class _Progress:
    """Progress of a long run in nucleotides, updated after every batch: a tqdm bar on a terminal; elsewhere (a log
    file, a cluster job) a plain line on stderr every LOG_INTERVAL seconds. The total is an estimate (the input's
    size, headers included), so the ETA errs long; each chunk's exact count replaces the per-batch estimate."""

    LOG_INTERVAL = 30.0

    def __init__(self, total: int | None):
        import time

        from tqdm import tqdm

        self.live = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="nt", unit_scale=True, dynamic_ncols=True, file=sys.stderr, disable=not self.live,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} nt [{elapsed}<{remaining}, {rate_fmt}]{postfix}" if total else None)
        self.total, self.start, self.last_log = total, time.monotonic(), time.monotonic()
        self.nt = self.sequences = self.pending = self.pending_sequences = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if not self.live and self.sequences and exc[0] is None:
            self._log_line(final=True)

    def advance(self, rows: int, sequences: int = 0) -> None:
        """A batch finished `rows` k-mers (about as many nucleotides) and completed `sequences`."""
        self.pending += rows
        self.pending_sequences += sequences
        self.bar.update(rows)
        self.bar.set_postfix_str(f"{self.sequences + self.pending_sequences:,} sequences", refresh=False)
        self._maybe_log()

    def chunk_done(self, sequences: int, nucleotides: int) -> None:
        """The chunk's exact count replaces its per-batch estimate."""
        self.sequences += sequences
        self.nt += nucleotides
        self.pending = self.pending_sequences = 0
        self.bar.n = self.nt
        self.bar.set_postfix_str(f"{self.sequences:,} sequences", refresh=True)
        self._maybe_log()

    def eta(self) -> float | None:
        """Seconds left, from the rate so far and the input's estimated size (None without one)."""
        import time

        elapsed = time.monotonic() - self.start
        done = self.nt + self.pending
        if not self.total or not done or elapsed <= 0:
            return None
        return max(self.total - done, 0) / (done / elapsed)

    def _maybe_log(self) -> None:
        import time

        if not self.live and time.monotonic() - self.last_log >= self.LOG_INTERVAL:
            self.last_log = time.monotonic()
            self._log_line()

    def _log_line(self, final: bool = False) -> None:
        import time

        elapsed = time.monotonic() - self.start
        done = self.nt + self.pending
        rate = done / elapsed if elapsed > 0 else 0.0
        count = self.sequences + self.pending_sequences
        line = f"{count:,} sequence{'s' if count != 1 else ''}, {_amount(done)}, {rate:,.0f} nt/s, {elapsed:.0f} s"
        if self.total and not final and rate > 0:
            line += f", about {min(done / self.total, 0.99):.0%} of the input, ETA {max(self.total - done, 0) / rate:.0f} s"
        _log(("done: " if final else "") + line)


def _read_manifest(path) -> dict:
    from utr_runtime.bundle import Bundle

    return Bundle(path, check=False).manifest


def _print_parity(rows: list[dict]) -> None:
    from utr_runtime.parity import format_table

    click.echo(format_table(rows))


if __name__ == "__main__":
    sys.exit(main())
