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


@main.command()
@click.option("--kmer", "k", type=click.Choice(KMERS), required=True, help="k of the 3UTRBERT variant (3, 4, 5 or 6).")
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=str), help="Local checkpoint folder (multimolecule or original 3UTRBERT).")
@click.option("--hub", "hub_id", metavar="ID", help="Model hub id [default: multimolecule/utrbert-{K}mer].")
@click.option("--random-init", is_flag=True, help="Seeded random weights (untrained; works offline).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-init weights and the INT8 calibration sample.")
@click.option("--layers", type=click.IntRange(1, 48), default=12, show_default=True, help="Layers for --random-init.")
@click.option("--precision", default="fp32,fp16,int8", show_default=True, help="Comma-separated subset of fp32,fp16,int8.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False, path_type=str), help="INT8 calibration sequences (FASTA/TSV) [default: the shipped human 3'UTRs].")
@click.option("--calibration-size", type=click.IntRange(4, 4096), default=64, show_default=True, help="Calibration windows.")
@click.option("--calibration-method", type=click.Choice(["entropy", "percentile", "minmax"]), default="entropy", show_default=True)
@click.option("--problem-type", type=click.Choice(["binary", "multiclass", "multilabel", "regression"]),
              help="Problem type of a task head whose checkpoint config does not state one.")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Bundle folder [default: bundles/utrbert-{K}mer[-random]].")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.pass_context
@_fail_cleanly
def build(ctx, k, checkpoint, hub_id, random_init, seed, layers, precision, calibration_file, calibration_size, calibration_method,
          problem_type, output, force) -> None:
    """Export a checkpoint (plain, MLM or fine-tuned task model) to a verified bundle folder.

    A precision below its accuracy gate is left out of the bundle with the reason; the exit status is 1 only
    when that precision was asked for with --precision.
    """
    k = int(k)
    if sum(bool(x) for x in (checkpoint, hub_id, random_init)) > 1:
        raise CommandError("choose one of --checkpoint, --hub and --random-init")
    if layers != 12 and not random_init:
        raise CommandError("--layers applies to --random-init only")
    precisions = tuple(p.strip() for p in precision.split(",") if p.strip())
    output = output or f"bundles/utrbert-{k}mer" + ("-random" if random_init else "")
    from pathlib import Path

    if Path(output).exists() and not force:
        raise CommandError(f"{output} exists; pass --force to replace it")

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
    path = build_bundle(ckpt, output, precisions, force=force, log=_log, calibration=calibration)
    manifest = _read_manifest(path)
    _print_parity(manifest.get("parity", []))
    click.echo(f"bundle written to {path}")
    left_out = sorted(manifest.get("left_out", {}))
    asked = ctx.get_parameter_source("precision") != click.core.ParameterSource.DEFAULT
    if left_out and asked:
        raise CommandError(f"{', '.join(left_out)} did not pass its accuracy gate and is not in the bundle (see above)")


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--precision", help="Comma-separated precisions to check [default: all in the bundle].")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True, help="tensorrt: the bundle's engines.")
@_fail_cleanly
def verify_command(bundle, precision, device) -> None:
    """Check checksums and run the parity fixtures of every precision; exit 1 on any failure."""
    from utr_runtime.verify import verify

    precisions = [p.strip() for p in precision.split(",")] if precision else None
    rows = verify(bundle, precisions, device=device)
    _print_parity(rows)
    if not all(r["passed"] for r in rows):
        raise CommandError("verification FAILED")
    click.echo("verification passed")


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True)
@click.option("--profile", "profiles", multiple=True, metavar="MIN,OPT,MAX",
              help="Optimization profile as BATCHxTOKENS triples, repeatable [default: 1x8,32x128,128x128 and 1x129,8x512,32x512].")
@_fail_cleanly
def engine(bundle, precision, profiles) -> None:
    """Build a TensorRT engine from the bundle's ONNX model of one precision (needs a GPU and TensorRT 10.14+)."""
    from .tensorrt_build import DEFAULT_PROFILES, build_engine, parse_profile

    parsed = tuple(parse_profile(p) for p in profiles) or DEFAULT_PROFILES
    build_engine(bundle, precision, parsed, log=_log)
    click.echo(f"verify it with: utrexport verify {bundle} --device tensorrt")


def _model_options(fn):
    """Options of every command that runs a bundle's model on sequences from a file."""
    options = [
        click.option("--precision", default="fp32", show_default=True, help="fp32, fp16 or int8 (what the bundle holds)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True),
        click.option("--column", help="Sequence column of a TSV/CSV input [default: sequence or seq]."),
        click.option("--strict", is_flag=True, help="Refuse sequences with characters other than A, C, G, U, T, N."),
        click.option("--overlap", type=click.IntRange(0, 500), default=64, show_default=True, help="k-mers shared by neighbouring windows."),
        click.option("--batch-tokens", type=click.IntRange(512), default=8192, show_default=True, help="Token budget of one batch."),
        click.option("--chunk", type=click.IntRange(1), default=512, show_default=True, help="Sequences read, run and written at a time."),
        click.option("--threads", type=click.IntRange(1), help="Engine threads [default: all cores]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("input", metavar="INPUT", type=str)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Output file: .npy, .npz (ids + vectors) or .parquet.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True)
@click.option("--truncate", is_flag=True, help="Embed only the first window of long sequences instead of all windows.")
@_model_options
@_fail_cleanly
def embed(bundle, input, output, pooling, truncate, precision, device, column, strict, overlap, batch_tokens, chunk, threads) -> None:
    """Embed the sequences of INPUT (FASTA, gzip FASTA, TSV/CSV, or - for stdin): one vector per sequence."""
    import utr_runtime

    from .writers import open_writer

    model = utr_runtime.load(bundle, precision=precision, device=device, threads=threads)

    def run(seqs):
        return model.embed(seqs, pooling=pooling, max_batch_tokens=batch_tokens, overlap=overlap, truncation=truncate, strict=strict)

    with open_writer(output, model.hidden_size) as writer:
        _stream(input, column, chunk, run, writer)
    click.echo(f"{writer.rows} embeddings ({model.hidden_size}-d, {pooling} pooling) written to {output}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("input", metavar="INPUT", type=str)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sequence level: .tsv, .csv or .parquet. Nucleotide level: .npz or .parquet. Contact level: .npz.")
@click.option("--logits", is_flag=True, help="Write the head's raw outputs instead of probabilities.")
@click.option("--aggregate", type=click.Choice(["mean", "max"]), default="mean", show_default=True,
              help="Sequence level: how the windows of a sequence longer than one window are combined.")
@_model_options
@_fail_cleanly
def predict(bundle, input, output, logits, aggregate, precision, device, column, strict, overlap, batch_tokens, chunk, threads) -> None:
    """Run a fine-tuned bundle's task head on the sequences of INPUT (FASTA, gzip FASTA, TSV/CSV, or - for stdin)."""
    import utr_runtime
    from utr_runtime.model import NO_TASK
    from utr_runtime.parity import task_outputs

    from .writers import open_prediction_writer

    model = utr_runtime.load(bundle, precision=precision, device=device, threads=threads)
    task = model.task
    if task is None:
        raise CommandError(f"{bundle}: {NO_TASK}")

    def run(seqs):
        values = model.predict(seqs, logits=logits, aggregate=aggregate, max_batch_tokens=batch_tokens, overlap=overlap, strict=strict)
        if task["level"] != "sequence":
            return values
        return values, task_outputs(task["problem_type"], values) if logits else values

    with open_prediction_writer(output, task) as writer:
        _stream(input, column, chunk, run, writer)
    what = "raw outputs" if logits else ("values" if task["problem_type"] == "regression" else "probabilities")
    click.echo(f"{task['level']}-level {what} of {writer.rows} sequences ({', '.join(task['labels'])}) written to {output}")


def _stream(input: str, column: str | None, chunk: int, run, writer) -> None:
    """Read INPUT `chunk` records at a time, `run` them and write the results, with progress on a terminal.

    A record-level error names the record; no output is left behind unless every record went through.
    """
    import itertools
    import time

    from utr_runtime.errors import InputError
    from utr_runtime.sequences import read_sequences
    from utr_runtime.tokenizer import foreign_letter

    records = read_sequences(input, column=column)
    progress = _Progress()
    start, total_nt, unknown = time.perf_counter(), 0, 0
    while batch := list(itertools.islice(records, chunk)):
        names, seqs = [n for n, _ in batch], [s for _, s in batch]
        try:
            result = run(seqs)
        except InputError as e:
            if e.index is None:
                raise
            raise InputError(f"{input}: record {names[e.index]!r}: {e.detail}") from None
        writer.write(names, result)
        total_nt += sum(map(len, seqs))
        unknown += sum(1 for s in seqs if foreign_letter(s))
        progress.update(f"{writer.rows} sequences, {total_nt / 1e6:.2f} Mnt, {total_nt / (time.perf_counter() - start):,.0f} nt/s")
    if writer.rows == 0:
        raise InputError(f"{input}: no sequences")
    progress.done()
    if unknown:
        _log(f"note: {unknown} sequences hold characters other than A, C, G, U, T, N; the k-mers holding them were read as <unk> (--strict refuses them)")


@main.command("fill-mask")
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("text")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@click.option("--precision", default="fp32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON (the transformers pipeline's format).")
@_fail_cleanly
def fill_mask(bundle, text, top_k, precision, as_json) -> None:
    """Predict the tokens at each <mask> of TEXT (a k-mer token <mask> stands for one k-mer)."""
    import json

    import utr_runtime

    answer = utr_runtime.load(bundle, precision=precision).fill_mask(text, top_k=top_k)
    if as_json:
        click.echo(json.dumps(answer, indent=1))
        return
    for i, row in enumerate(answer if isinstance(answer[0], list) else [answer]):
        click.echo(f"mask {i + 1}:")
        for guess in row:
            click.echo(f"  {guess['token_str']:<8} {guess['score']:.4f}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--shapes", default="1x128,1x512,8x128,32x512", show_default=True, help="Comma-separated BATCHxTOKENS shapes.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Alternating rounds per shape.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--precision", help="Comma-separated precisions [default: all in the bundle].")
@click.option("--e2e-sequences", type=click.IntRange(0), default=24, show_default=True, help="Real 3'UTRs for the end-to-end run (0: skip).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch paths.")
@click.option("--no-tokenizer", is_flag=True, help="Skip the tokenizer benchmark.")
@click.option("--no-memory", is_flag=True, help="Skip the per-path peak-memory runs (one fresh process each).")
@click.option("--out", "out_prefix", type=click.Path(path_type=str), help="Write OUT.json and OUT.md (and OUT.png with --plot).")
@click.option("--plot", is_flag=True, help="Also draw a PNG chart of throughput per path and shape.")
@_fail_cleanly
def bench(bundle, shapes, repeats, threads, device, precision, e2e_sequences, no_torch, no_tokenizer, no_memory, out_prefix, plot) -> None:
    """Time every path (PyTorch, ONNX Runtime per precision) and report against this machine's ceiling."""
    import json

    from . import benchmark

    try:
        shape_list = [tuple(int(x) for x in s.lower().split("x")) for s in shapes.split(",") if s.strip()]
        assert shape_list and all(len(s) == 2 and min(s) >= 1 for s in shape_list)
    except (ValueError, AssertionError):
        raise CommandError(f"--shapes: expected BATCHxTOKENS,... (e.g. 1x128,8x128), got {shapes!r}") from None
    precisions = [p.strip() for p in precision.split(",")] if precision else None
    result = benchmark.run_benchmark(bundle, shape_list, repeats, threads, device, precisions, e2e_sequences,
                                     torch=not no_torch, tokenizer=not no_tokenizer, memory=not no_memory, log=_log)
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
    """A one-line progress report, redrawn in place, on a terminal only."""

    def __init__(self):
        self.live = sys.stderr.isatty()

    def update(self, text: str) -> None:
        if self.live:
            click.echo(f"\r\033[K{text}", err=True, nl=False)

    def done(self) -> None:
        if self.live:
            click.echo("", err=True)


def _read_manifest(path) -> dict:
    from utr_runtime.bundle import Bundle

    return Bundle(path, check=False).manifest


def _print_parity(rows: list[dict]) -> None:
    from utr_runtime.parity import format_table

    click.echo(format_table(rows))


if __name__ == "__main__":
    sys.exit(main())
