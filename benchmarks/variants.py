"""Saturation mutagenesis speed: the 3UTRBERT paper's approach against `utrexport variants --saturate`, same run.

    .venv/bin/python benchmarks/variants.py [--out docs/variants] [--work .cache/variants-bench]

The paper's approach (its `mutate.py` + PyTorch scoring) runs the fine-tuned model on every mutant sequence: here
multimolecule's UtrBertForSequencePrediction on each mutant, a long 3'UTR cut into the same windows the runtime
uses (all of them per mutant), 100-nt windows in batches of 32 mutants. utrexport scores the same substitutions with
`utr_runtime.variants.effects` (what `utrexport variants --saturate` runs): the reference once, then only the windows
holding each substitution, packed by the token budget, on the engine `auto` picks. The model is a full-size k=6
sequence classifier (12 layers, hidden 768) with random weights: speed does not depend on the values. Mutants are an
even sample of each sequence's 3 x length substitutions (the same positions for both approaches where both run
them); the rate is variants per second. Writes OUT.json and OUT.md with the CPU model and its ISA flags.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LONG_RANGE = (2800, 3400)  # nt: a long 3'UTR, 6-7 windows of 510 6-mers


def paper_rate(checkpoint: Path, seq: str, edits, k: int = 6) -> float:
    """Variants per second of multimolecule's forward over each mutant sequence (every window of it)."""
    import multimolecule
    import torch

    from utr_runtime.variants import apply
    from utr_runtime.windows import split_windows

    model = multimolecule.UtrBertForSequencePrediction.from_pretrained(checkpoint).eval()
    tokenizer = multimolecule.RnaTokenizer(nmers=k)
    mutants = [apply(seq, e) for e in edits]
    n = len(seq) - k + 1
    windows = split_windows(0, n, 510, 64)
    group = 32 if len(windows) == 1 else 1  # short: mutants batched; long: one mutant's windows per batch
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(mutants), group):
            pieces = [m[w.start : w.end + k - 1] for m in mutants[first : first + group] for w in windows]
            encoded = tokenizer(pieces, padding=True, return_tensors="pt")
            torch.sigmoid(model(encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits)
    return len(mutants) / (time.perf_counter() - start)


def utrexport_rate(bundle: Path, precision: str, seq: str, edits) -> tuple[float, str]:
    import utr_runtime
    from utr_runtime.variants import effects

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = utr_runtime.load(bundle, precision=precision)
    effects(model, seq, edits[:3])  # warm-up: the engine's first call
    start = time.perf_counter()
    effects(model, seq, edits)
    return len(edits) / (time.perf_counter() - start), model.engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "variants-bench", help="where the model and bundle are kept")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--paper-sample", type=int, default=12, help="mutants the paper's approach runs on the long 3'UTR")
    parser.add_argument("--sample", type=int, default=64, help="mutants utrexport runs on the long 3'UTR")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from utr_calibration import real_sequences
    from utr_runtime.variants import saturation
    from utr_runtime.windows import split_windows
    from utrexport.benchmark import describe_machine, machine, random_bundle, write_report

    # a full-size k=6 binary classifier (random weights), built into an fp32 + int8 bundle
    checkpoint, bundle = random_bundle(args.work, "UtrBertForSequencePrediction", ("fp32", "int8"), num_labels=1, problem_type="binary")
    windows = [s for _, s in real_sequences("utrbert_dev_100nt.tsv")[:2]]
    long = next(s for _, s in sorted(real_sequences(), key=lambda r: len(r[1])) if LONG_RANGE[0] <= len(s) <= LONG_RANGE[1])
    cases = [(f"100-nt window {i + 1}", w, saturation(w), saturation(w)) for i, w in enumerate(windows)]
    every = saturation(long)
    pick = lambda n: [every[i] for i in np.linspace(0, len(every) - 1, n).round().astype(int)]  # noqa: E731
    cases.append((f"3'UTR of {len(long):,} nt", long, pick(args.paper_sample), pick(args.sample)))
    rows = []
    for name, seq, paper_edits, edits in cases:
        row = {"sequence": name, "length": len(seq), "windows": len(split_windows(0, len(seq) - 5, 510, 64)),
               "paper_variants": len(paper_edits), "variants": len(edits)}
        row["paper"] = paper_rate(checkpoint, seq, paper_edits)
        for precision in ("fp32", "int8"):
            row[precision], row[f"{precision}_engine"] = utrexport_rate(bundle, precision, seq, edits)
        rows.append(row)
        print(f"{name}: paper {row['paper']:.2f}/s, fp32 {row['fp32']:.2f}/s ({row['fp32'] / row['paper']:.1f}x), "
              f"int8 {row['int8']:.2f}/s ({row['int8'] / row['paper']:.1f}x)", flush=True)
    result = {"machine": machine(), "rows": rows, "command": "benchmarks/variants.py" + (f" --out {args.out}" if args.out else "")}
    text = to_markdown(result, describe_machine(result["machine"]))
    print(text)
    if args.out:
        write_report(args.out, result, text)


def to_markdown(result: dict, where: str) -> str:
    lines = ["# Saturation mutagenesis: variants per second", "",
             f"`{result['command']}` on {where}, Python {result['machine']['python']}. A full-size k=6 sequence classifier "
             "(random weights). The paper's approach: multimolecule (PyTorch) on every window of each mutant sequence. "
             "utrexport: `utr_runtime.variants.effects`, what `utrexport variants --saturate` runs (the reference once, "
             "then only the windows holding each substitution).", "",
             "| sequence | windows | paper's approach | utrexport fp32 | utrexport int8 |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['sequence']} | {r['windows']} | {r['paper']:.2f}/s ({r['paper_variants']} mutants) | "
                     f"{r['fp32']:.2f}/s, **{r['fp32'] / r['paper']:.1f}x** ({r['fp32_engine']}) | "
                     f"{r['int8']:.2f}/s, **{r['int8'] / r['paper']:.1f}x** ({r['int8_engine']}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
