"""The `utrexport` command line.

torch is imported only inside the commands that export (`build`), so `verify`, `embed`, `fill-mask` and
`bench` of ONNX bundles work where torch is not installed.
"""

from __future__ import annotations

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
    import functools

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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-init.")
@click.option("--layers", type=click.IntRange(1, 48), default=12, show_default=True, help="Layers for --random-init.")
@click.option("--precision", default="fp32", show_default=True, help="Comma-separated subset of fp32,fp16,int8.")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Bundle folder [default: bundles/utrbert-{K}mer[-random]].")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@_fail_cleanly
def build(k, checkpoint, hub_id, random_init, seed, layers, precision, output, force) -> None:
    """Export a checkpoint to a verified bundle folder."""
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
    from .build import build_bundle

    if random_init:
        _log(f"random-init {k}-mer model, seed {seed}, {layers} layers (untrained)")
        ckpt = checkpoints.from_random_init(k, seed, num_hidden_layers=layers)
    elif checkpoint:
        _log(f"loading checkpoint {checkpoint}")
        ckpt = checkpoints.from_folder(checkpoint, k)
    else:
        hub_id = hub_id or f"multimolecule/utrbert-{k}mer"
        _log(f"fetching {hub_id} from the model hub")
        ckpt = checkpoints.from_hub(hub_id, k)
    path = build_bundle(ckpt, output, precisions, force=force, log=_log)
    _print_parity(_read_parity(path))
    click.echo(f"bundle written to {path}")


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--precision", help="Comma-separated precisions to check [default: all in the bundle].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
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


def _read_parity(path) -> list[dict]:
    from utr_runtime.bundle import Bundle

    return Bundle(path, check=False).manifest.get("parity", [])


def _print_parity(rows: list[dict]) -> None:
    from utr_runtime.parity import format_table

    click.echo(format_table(rows))


if __name__ == "__main__":
    sys.exit(main())
