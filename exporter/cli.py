"""The `utrexport` command line: option parsing, the checks that name flags, one library call per command, and what
it prints. The machinery of a run lives in the library: utrexport.runs (embed and predict of a file), .scoring
(variants), .build, .tensorrt_build, .triton and .serve, .benchmark; progress and interrupts in .progress and
.interrupts.

torch, Ray, tritonclient and matplotlib are imported only by the commands that need them, so `verify`, `embed`,
`predict`, `fill-mask` and `bench` of ONNX bundles work where torch is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import warnings

import click

import utr_runtime
from utr_runtime import Bundle
from utr_runtime.bundle import PRECISIONS as FILE_PRECISIONS
from utr_runtime.bundle import RUNTIME_PRECISIONS as PRECISIONS
from utr_runtime.engines import DEVICES, ENGINES
from utr_runtime.errors import UtrError
from utr_runtime.parity import format_table
from utr_runtime.serving import CAPABILITIES, Limits
from utr_runtime.verify import default_engines, verify

from . import benchmark, interrupts, runs, scoring
from .triton import RepositoryOptions, write_repository
from .tritonserver import ADMIN_APIS, find_server
from .writers import FORMATS, PREDICTION_FORMATS, check_output

KMERS = ("3", "4", "5", "6")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="utrexport")
def main() -> None:
    """Export 3UTRBERT to ONNX/TensorRT bundles and run them without PyTorch."""
    interrupts.unwind_on_signals()  # temporary outputs removed; exit 143 or 130 as shells give them


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
    missing = [m for m in ("torch", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandError(f"utrexport build needs the exporter's packages ({', '.join(missing)} missing): pip install 'utrexport[export]'")
    from .build import Calibration, build_from  # torch

    path = build_from(k, output or f"bundles/utrbert-{k}mer" + ("-random" if random_init else ""), precision, checkpoint, hub_id, random_init, seed,
                      layers, problem_type, Calibration(size=calibration_size, seed=seed, method=calibration_method), calibration_file,
                      attention, force, _log)
    manifest = Bundle(path, check=False).manifest
    click.echo(format_table(manifest.get("parity", [])))
    _log_tensorrt_readiness(manifest)
    click.echo(f"bundle written to {path}")
    asked = ctx.get_parameter_source("precision") != click.core.ParameterSource.DEFAULT
    failed = [p for p in sorted(manifest.get("left_out", {})) if p in precision]  # bf16, never asked for, only informs
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
    checked = Bundle(bundle)
    if not checked.trained:
        _log(f"warning: {utr_runtime.UntrainedModelWarning.sentence(bundle)}")
    _log(f"checking {', '.join(precision or checked.precisions)} on {', '.join(engines or default_engines(device)) if device != 'tensorrt' else 'TensorRT'}"
         + ("" if precision or device != "cpu" else " (and bf16 where this CPU runs it)"))
    rows = verify(checked, list(precision) if precision else None, device=device, engines=list(engines) or None)
    click.echo(format_table(rows))
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
        click.option("--contig-map", type=click.Path(dir_okay=False, path_type=str),
                     help="Two columns per line: a contig name as the annotation or VCF spells it, and the genome's. Without it, names "
                          "match as written, else without a leading 'chr' and with M as MT (1 = chr1, MT = chrM)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _regions(input: str | None, genome, bed, gtf, feature, contig_map=None) -> tuple | None:
    """The (genome, annotation, kind, feature, contig map) of --genome with --bed/--gtf, or None for INPUT; the flags checked."""
    if contig_map and not genome:
        raise CommandError("--contig-map matches contig names to a genome's: use it with --genome")
    if not (genome or bed or gtf):
        if not input:
            raise CommandError("give INPUT (FASTA, TSV/CSV, or - for stdin), or --genome with --bed or --gtf")
        return None
    if input:
        raise CommandError("give INPUT or --genome with --bed/--gtf, not both")
    if bool(bed) == bool(gtf):
        raise CommandError("--genome reads the regions of one annotation: give --bed or --gtf")
    if not genome:
        raise CommandError("--bed and --gtf describe regions of a genome: give --genome FASTA")
    return genome, bed or gtf, "bed" if bed else "gtf", feature, contig_map


def _file_options(column, max_length, skip_invalid, chunk, force, ray_address, workers, precision, device, engine, threads) -> runs.FileOptions:
    return runs.FileOptions(column=column, chunk=chunk, max_length=max_length, skip_invalid=skip_invalid, force=force, ray_address=ray_address,
                            workers=workers, load=dict(precision=precision, device=device, threads=threads, engine=engine))


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
          batch_tokens, chunk, threads, force, ray_address, workers, genome, bed, gtf, feature, contig_map) -> None:
    """Embed the sequences of INPUT (FASTA, gzip FASTA, TSV/CSV, or - for stdin), or the regions of --genome with --bed
    or --gtf: one vector per sequence."""
    _check_outputs(output, input or genome or "", force, FORMATS)
    regions = _regions(input, genome, bed, gtf, feature, contig_map)
    file = _file_options(column, max_length, skip_invalid, chunk, force, ray_address, workers, precision, device, engine, threads)
    rows, hidden = runs.embed_file(bundle, input, output, file, regions, _log, pooling=pooling, max_batch_tokens=batch_tokens, overlap=overlap,
                                   truncation=truncate, strict=strict)
    click.echo(f"{rows} embeddings ({hidden}-d, {pooling} pooling) written to {output}")


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
            batch_tokens, chunk, threads, force, ray_address, workers, genome, bed, gtf, feature, contig_map) -> None:
    """Run a fine-tuned bundle's task head on the sequences of INPUT (FASTA, gzip FASTA, TSV/CSV, or - for stdin), or on
    the regions of --genome with --bed or --gtf."""
    _check_outputs(output, input or genome or "", force, sorted({f for formats in PREDICTION_FORMATS.values() for f in formats}))
    regions = _regions(input, genome, bed, gtf, feature, contig_map)
    file = _file_options(column, max_length, skip_invalid, chunk, force, ray_address, workers, precision, device, engine, threads)
    rows, task = runs.predict_file(bundle, input, output, file, regions, _log, logits=logits, aggregate=aggregate, max_batch_tokens=batch_tokens,
                                   overlap=overlap, strict=strict)
    what = "raw outputs" if logits else ("values" if task["problem_type"] == "regression" else "probabilities")
    click.echo(f"{task['level']}-level {what} of {rows} sequences ({', '.join(task['labels'])}) written to {output}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("input", metavar="[INPUT]", type=str, required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Table: .tsv, .csv or .parquet; with --vcf also .vcf or .vcf.gz (the input VCF with scores in INFO/UTRBERT; .gz: "
                   "bgzipped, with a tabix index OUTPUT.tbi).")
@click.option("--vcf", type=click.Path(dir_okay=False, path_type=str),
              help="Variants of a VCF (plain, gzip or bgzip), in the regions of --genome with --bed/--gtf.")
@click.option("--saturate", is_flag=True, help="Every single-nucleotide substitution of each sequence of INPUT (or region): 3 per position.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), help="With --saturate: a PNG heatmap (alternative x position) per sequence (at most 12).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@_engine_option
@click.option("--threads", type=click.IntRange(1), help="Engine threads [default: all cores; with --ray, 1 per worker].")
@click.option("--overlap", type=click.IntRange(0, 500), default=64, show_default=True, help="k-mers shared by neighbouring windows.")
@click.option("--batch-tokens", type=click.IntRange(512), default=8192, show_default=True, help="Token budget of one batch.")
@click.option("--max-length", type=click.IntRange(1), default=10_000_000, show_default=True, help="Longest record (nt) read.")
@click.option("--skip-invalid", is_flag=True, help="Leave out bad variants (reference allele not matching, ...) and list them in OUTPUT.skipped.tsv.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--zero-shot/--no-zero-shot", default=True, show_default=True,
              help="Masked-LM bundles: p_ref, p_alt and llr of each single-nucleotide substitution (one masked forward per position).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Score on a Ray cluster: join the one at ADDRESS (or 'auto'), or start a local Ray without one. Needs utrexport[ray].")
@click.option("--workers", type=click.IntRange(1), help="With --ray: model actors [default: the cluster's CPUs // --threads, or its GPUs].")
@_genome_options
@_fail_cleanly
def variants(bundle, input, output, vcf, saturate, plot, precision, device, engine, threads, overlap, batch_tokens, max_length, skip_invalid, force,
             zero_shot, ray_address, workers, genome, bed, gtf, feature, contig_map) -> None:
    """Variant effects: for each variant, the cosine distance between the reference's and the alternative's mean
    embeddings; for a sequence-level task head, p_ref, p_alt, diff and logOR (the 3UTRBERT paper's scores); for a
    masked-LM bundle, the zero-shot p_ref, p_alt and llr = ln p_alt - ln p_ref of single-nucleotide substitutions.

    \b
    Variants come from INPUT, a TSV/CSV with columns id, sequence, position (1-based), ref, alt;
    or from --vcf with --genome and --bed/--gtf (strand-aware: minus-strand alleles are complemented);
    or with --saturate, every substitution of the sequences of INPUT (FASTA, TSV/CSV) or of the regions.
    Substitutions rerun only the windows that hold them; insertions and deletions rerun the edited sequence whole.
    """
    _check_outputs(output, input or vcf or genome or "", force, scoring.VARIANT_FORMATS)
    if output.lower().endswith((".gz", ".bgz")):
        check_output(f"{output}.tbi", force, vcf or "", error=CommandError)
    if workers and not ray_address:
        raise CommandError("--workers sizes the Ray actor pool: use it with --ray")
    if plot and not saturate:
        raise CommandError("--plot draws saturation heatmaps: use it with --saturate")
    if plot:
        _check_plot(plot, input or vcf or genome or "", force)
    if vcf and saturate:
        raise CommandError("--vcf scores the VCF's variants; --saturate scores every substitution: choose one")
    regions = _regions(input, genome, bed, gtf, feature, contig_map) if (genome or bed or gtf or contig_map) else None
    if vcf and not regions:
        raise CommandError("--vcf places variants on regions of a genome: give --genome and --bed or --gtf")
    if not (input or regions):
        raise CommandError("give INPUT (a variant table, or sequences with --saturate), or --genome with --bed/--gtf")
    if regions and not (vcf or saturate):
        raise CommandError("with --genome, give --vcf (the variants) or --saturate (every substitution of each region)")
    run = scoring.VariantRun(input=input, vcf=vcf, saturate=saturate, regions=regions, plot=plot, overlap=overlap, batch_tokens=batch_tokens,
                             max_length=max_length, skip_invalid=skip_invalid, force=force, zero_shot=zero_shot, ray_address=ray_address,
                             workers=workers, load=dict(precision=precision, device=device, threads=threads, engine=engine))
    rows, sequences = scoring.score_file(bundle, output, run, _log)
    click.echo(f"{rows} variant effects of {sequences} sequence(s) written to {output}" + (f"; heatmaps in {plot}" if plot else ""))


def _check_outputs(output: str, input: str, force: bool, formats=None) -> None:
    """Before anything loads: the input is there, the output's format is one written, and the output and its
    skipped-records report (outputs alike) are replaced only with --force."""
    if input and input != "-" and not os.path.exists(input):
        raise CommandError(f"{input}: no such file")
    if formats and not output.lower().endswith(tuple(formats)):
        raise CommandError(f"{output}: output must end in {', '.join(formats)}")
    check_output(output, force, input, error=CommandError)
    check_output(f"{output}.skipped.tsv", force, input, error=CommandError)


def _check_plot(plot: str, input: str, force: bool) -> None:
    """--plot is an output too, checked before the run: its format, matplotlib, and whether it may be replaced."""
    formats = (".png", ".pdf", ".svg")
    if os.path.splitext(plot)[1].lower() not in formats:
        raise CommandError(f"--plot {plot}: name a {', '.join(formats)} file (the format follows the name)")
    if importlib.util.find_spec("matplotlib") is None:
        raise CommandError("--plot needs matplotlib: pip install matplotlib")
    check_output(plot, force, input, error=CommandError)


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
    model = runs.load(bundle, _log, precision=precision, device=device, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", utr_runtime.InputWarning)
        answer = model.fill_mask(text, top_k=top_k)
    _log(runs.describe(model.precision, model.engine, model.device, None, verb="ran"))
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
    from . import serve as serving  # starlette, uvicorn: the serve extra

    if setup:
        server = find_server(tritonserver, server_env, _log)
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
@click.option("--int8-variants", is_flag=True, help="Also time every other int8 file each engine runs (the Q/DQ files, NNCF's OpenVINO model).")
@click.option("--out", "out_prefix", type=click.Path(path_type=str), help="Write OUT.json and OUT.md (and OUT.png with --plot).")
@click.option("--plot", is_flag=True, help="Also draw a PNG chart of throughput per path and shape.")
@_fail_cleanly
def bench(bundle, shapes, repeats, threads, device, precision, engines, e2e_sequences, no_torch, no_tokenizer, no_memory, int8_variants, out_prefix, plot) -> None:
    """Time every path (PyTorch; each engine x precision) against this machine's GEMM ceiling of its data type."""
    try:
        shape_list = [tuple(int(x) for x in s.lower().split("x")) for s in shapes.split(",") if s.strip()]
        assert shape_list and all(len(s) == 2 and min(s) >= 1 for s in shape_list)
    except (ValueError, AssertionError):
        raise CommandError(f"--shapes: expected BATCHxTOKENS,... (e.g. 1x128,8x128), got {shapes!r}") from None
    precisions = list(precision) if precision else None
    if not Bundle(bundle, check=False).trained:
        _log(f"note: {bundle} holds untrained (random-init) weights: fine for timing, which does not depend on the values")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the reference's deprecation notes are not the user's business
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", utr_runtime.UntrainedModelWarning)  # said once above, not once per path
        result = benchmark.run_benchmark(bundle, shape_list, repeats, threads, device, precisions, e2e_sequences,
                                         torch=not no_torch, tokenizer=not no_tokenizer, memory=not no_memory,
                                         engines=list(engines) or None, int8_variants=int8_variants, log=_log)
    result["command"] = "utrexport " + " ".join(sys.argv[1:])
    report = benchmark.to_markdown(result)
    click.echo(report)
    if out_prefix:
        benchmark.write_report(out_prefix, result, report)
        if plot:
            benchmark.plot_benchmark(result, f"{out_prefix}.png")
        _log(f"results written to {out_prefix}.json, {out_prefix}.md" + (f", {out_prefix}.png" if plot else ""))
    elif plot:
        raise CommandError("--plot needs --out PREFIX")


if __name__ == "__main__":
    sys.exit(main())
