"""Zero-shot variant scores (docs/spec.md section 9): speed against the naive approach, and a VCF pipeline end to end.

    .venv/bin/python benchmarks/zero_shot.py [--out docs/zero_shot] [--work .cache/zero-shot-bench]

1. Saturation of whole real 3'UTRs with a full-size k=6 masked-LM (12 layers, hidden 768, random weights: speed does
   not depend on the values). utrexport: `utr_runtime.variants.zero_shot` on every substitution (one masked row per
   position, rows batched by the token budget) at fp32, int8 and, on CPUs with native bf16, bf16, on the engine
   `auto` picks. The naive approach, in the same run: multimolecule's UtrBertForMaskedLM, one masked forward per
   position (batch of one, the same row and the same letter probabilities), on an even sample of positions.
   Rates are positions per second (each answers 3 substitutions: variants/s is 3x).
2. A VCF of generated substitutions (`--variants`, default 100,000) over a genome made of the shipped real 3'UTRs
   (each between filler, alternately on both strands): `utrexport variants --vcf ... -o OUT.vcf.gz`, VCF in to
   bgzipped, tabix-indexed VCF out, timed end to end, with a 2-layer hidden-32 masked-LM bundle so that the pipeline
   (reading, placing, judging, writing, indexing) shows rather than the model; and the same VCF cut to
   `--full-size-variants` through the full-size int8 bundle, the rate a real run sees on this machine.
Writes OUT.json and OUT.md with the CPU model and its ISA flags.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ((140, 160), (450, 520), (950, 1050))  # nt: whole 3'UTRs of about 150, 500 and 1,000 nt (1 or 2 windows at k=6)


def naive_rate(checkpoint: Path, seq: str, positions: list[int], k: int = 6) -> float:
    """Positions per second of multimolecule's MLM, one masked forward per position (the same rows as utrexport)."""
    import multimolecule
    import torch

    from utr_runtime.tokenizer import KmerTokenizer
    from utr_runtime.variants import _letter_table, masked_row

    model = multimolecule.UtrBertForMaskedLM.from_pretrained(checkpoint).eval()
    tokenizer = multimolecule.RnaTokenizer(nmers=k)
    ids = np.array(tokenizer(seq)["input_ids"][1:-1])
    kmer_ids, one_hot = (torch.as_tensor(a) for a in _letter_table(k))
    tok = KmerTokenizer(k)
    with torch.inference_mode():
        model(torch.as_tensor(tok.with_specials(ids[:8]))[None])  # warm-up
        start = time.perf_counter()
        for p in positions:
            row, masked, offsets = masked_row(tok, ids, p, k, 510)
            logits = model(torch.as_tensor(row)[None]).logits[0, masked][:, kmer_ids].double()
            q = torch.softmax(logits, -1)
            torch.stack([q[m] @ one_hot[o].double() for m, o in enumerate(offsets)]).mean(0)
    return len(positions) / (time.perf_counter() - start)


def utrexport_rate(bundle: Path, precision: str, seq: str, positions: list[int]) -> tuple[float, str]:
    import utr_runtime
    from utr_runtime.variants import nucleotide_probabilities

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = utr_runtime.load(bundle, precision=precision)
    nucleotide_probabilities(model, [(seq, positions[:2])])  # warm-up: the engine's first call
    start = time.perf_counter()
    nucleotide_probabilities(model, [(seq, positions)])
    return len(positions) / (time.perf_counter() - start), model.engine


def generated_genome(folder: Path, variants: int, seed: int = 11) -> dict:
    """genome.fa, utrs.bed and variants.vcf (sorted substitutions, a tenth of them in the filler): the shipped real
    3'UTRs on four chromosomes."""
    from utr_calibration import real_sequences

    rng = np.random.default_rng(seed)
    chroms, bed = {f"chr{i + 1}": [] for i in range(4)}, []
    lengths = dict.fromkeys(chroms, 0)
    for i, (name, seq) in enumerate(real_sequences()):
        chrom, strand = f"chr{i % 4 + 1}", "+-"[i % 2]
        dna = seq.upper().replace("U", "T")
        if strand == "-":
            dna = dna.translate(str.maketrans("ACGT", "TGCA"))[::-1]
        gap = "".join(rng.choice(list("ACGT"), 200))
        chroms[chrom] += [gap, dna]
        start = lengths[chrom] + len(gap)
        bed.append((chrom, start, start + len(dna), f"{name}_{i}", 0, strand))
        lengths[chrom] = start + len(dna)
    genome = {c: "".join(parts) + "ACGT" * 50 for c, parts in chroms.items()}
    with open(folder / "genome.fa", "w") as f:
        for chrom, bases in genome.items():
            f.write(f">{chrom}\n" + "".join(bases[j : j + 60] + "\n" for j in range(0, len(bases), 60)))
    (folder / "utrs.bed").write_text("".join("\t".join(map(str, r)) + "\n" for r in bed))
    rows = set()
    spans = np.array([r[2] - r[1] for r in bed], float)
    inside = {c: np.zeros(len(b), bool) for c, b in genome.items()}
    for chrom, start, end, *_ in bed:
        inside[chrom][start:end] = True
    while len(rows) < variants:
        if rng.random() < 0.1:  # in the filler between 3'UTRs
            chrom = f"chr{rng.integers(1, 5)}"
            position = int(rng.choice(np.flatnonzero(~inside[chrom])))
        else:
            r = bed[rng.choice(len(bed), p=spans / spans.sum())]
            chrom, position = r[0], int(rng.integers(r[1], r[2]))
        ref = genome[chrom][position]
        rows.add((chrom, position + 1, ref, str(rng.choice([c for c in "ACGT" if c != ref]))))
    header = ["##fileformat=VCFv4.2", *(f"##contig=<ID={c},length={len(b)}>" for c, b in genome.items()),
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    body = [f"{c}\t{p}\tv{i}\t{r}\t{a}\t.\tPASS\t." for i, (c, p, r, a) in enumerate(sorted(rows, key=lambda r: (int(r[0][3:]), r[1])))]
    (folder / "variants.vcf").write_text("\n".join(header + body) + "\n")
    return {"variants": variants, "regions": len(bed), "utr_nt": int(spans.sum())}


def vcf_run(bundle: Path, folder: Path, vcf: Path, precision: str) -> dict:
    """`utrexport variants --vcf VCF -o OUT.vcf.gz` in this process (scoring.score_file, as the command runs it)."""
    from utrexport import scoring

    name = bundle.parent.name  # "full-size" or "tiny": the folder random_bundle made it in
    output = folder / f"scored-{name}-{precision}.vcf.gz"
    run = scoring.VariantRun(vcf=str(vcf), regions=(str(folder / "genome.fa"), str(folder / "utrs.bed"), "bed", None), force=True,
                             load={"precision": precision})
    start = time.perf_counter()
    rows, sequences = scoring.score_file(str(bundle), str(output), run, log=lambda m: None)
    seconds = time.perf_counter() - start
    return {"bundle": name, "precision": precision, "entries": rows, "regions": sequences, "seconds": seconds, "rate": rows / seconds}


def overhead(folder: Path, vcf: Path) -> dict:
    """Seconds of the pipeline's own work on the VCF, no model: reading the genome, annotation and VCF, placing and
    checking every variant (scoring.vcf_jobs), and writing the annotated VCF with an entry per placed variant and
    indexing it (vcf.write_annotated)."""
    from utrexport import scoring
    from utrexport.genome import RegionFile
    from utrexport.vcf import write_annotated

    start = time.perf_counter()
    regions = RegionFile((str(folder / "genome.fa"), str(folder / "utrs.bed"), "bed", None), str(folder / "x.tsv"), False)
    jobs = scoring.vcf_jobs(str(vcf), regions.genome, regions.regions, lambda name, why: None, lambda m: None)
    placed = time.perf_counter()
    fields = ["ALLELE", "REGION", "STRAND", "POSITION", "cosine_distance", "p_ref", "p_alt", "llr"]
    entries: dict[int, list[str]] = {}
    for job in jobs:
        for row in job.rows:
            entries.setdefault(row["_record"], []).append(f"{row['_vcf_alt']}|{row['region']}|{row['strand']}|{row['position']}|0.001|0.25|0.25|0")
    write_annotated(str(vcf), str(folder / "overhead.vcf.gz"), fields, entries, {"version": "benchmark"}, replace=True)
    written = time.perf_counter()
    return {"entries": sum(map(len, entries.values())), "place_seconds": placed - start, "write_seconds": written - placed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "zero-shot-bench", help="where the models, bundles and genome are kept")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--naive-sample", type=int, default=12, help="positions the naive approach runs per 3'UTR")
    parser.add_argument("--fp32-sample", type=int, default=60, help="positions utrexport runs at fp32 and bf16 per 3'UTR (int8: all)")
    parser.add_argument("--variants", type=int, default=100_000, help="substitutions in the generated VCF")
    parser.add_argument("--full-size-variants", type=int, default=1_000, help="of those, how many the full-size int8 bundle scores")
    parser.add_argument("--parts", default="speed,vcf,overhead",
                        help="what to run: speed (part 1), vcf (part 2 with the models), overhead (part 2 without a model); "
                             "parts not run keep their figures from an earlier OUT.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.work.mkdir(parents=True, exist_ok=True)

    from utr_calibration import real_sequences
    from utr_runtime.engines.openvino import bf16_supported
    from utrexport.benchmark import describe_machine, machine, random_bundle, write_report

    checkpoint, bundle = random_bundle(args.work / "full-size", "UtrBertForMaskedLM", ("fp32", "int8"))
    _, tiny = random_bundle(args.work / "tiny", "UtrBertForMaskedLM", ("fp32",), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64)
    earlier = json.loads(args.out.with_suffix(".json").read_text()) if args.out and args.out.with_suffix(".json").is_file() else {}
    precisions = ("fp32", "int8", *(("bf16",) if bf16_supported() else ()))
    rows = earlier.get("rows", [])
    if "speed" in parts:
        rows = []
        for low, high in LENGTHS:
            seq = next(s for _, s in real_sequences() if low <= len(s) <= high).upper().replace("T", "U")
            every = list(range(len(seq)))
            even = lambda n: sorted({every[i] for i in np.linspace(0, len(every) - 1, n).round().astype(int)})  # noqa: E731
            row = {"length": len(seq), "naive_positions": len(even(args.naive_sample)), "naive": naive_rate(checkpoint, seq, even(args.naive_sample))}
            for precision in precisions:
                positions = every if precision == "int8" else even(args.fp32_sample)
                row[precision], row[f"{precision}_engine"] = utrexport_rate(bundle, precision, seq, positions)
                row[f"{precision}_positions"] = len(positions)
            rows.append(row)
            print(f"{len(seq)} nt: naive {row['naive']:.2f} positions/s; "
                  + ", ".join(f"{p} {row[p]:.2f}/s ({row[p] / row['naive']:.1f}x)" for p in precisions), flush=True)
    folder = args.work / "genome"
    folder.mkdir(exist_ok=True)
    made = generated_genome(folder, args.variants)
    pipeline, cost = earlier.get("pipeline", []), earlier.get("overhead")
    if "vcf" in parts:
        pipeline = [vcf_run(tiny, folder, folder / "variants.vcf", "fp32")]
        with open(folder / "variants.vcf") as f, open(folder / "subset.vcf", "w") as out:
            lines = list(f)
            head = [line for line in lines if line.startswith("#")]
            body = [line for line in lines if not line.startswith("#")]
            picked = np.linspace(0, len(body) - 1, args.full_size_variants).round().astype(int)
            out.writelines(head + [body[i] for i in sorted(set(picked))])
        pipeline.append(vcf_run(bundle, folder, folder / "subset.vcf", "int8"))
        for p in pipeline:
            print(f"VCF end to end, {p['bundle']} {p['precision']}: {p['entries']:,} entries in {p['seconds']:.1f} s, {p['rate']:.1f}/s", flush=True)
    if "overhead" in parts:
        cost = overhead(folder, folder / "variants.vcf")
        print(f"without a model: placing {cost['place_seconds']:.1f} s, writing and indexing {cost['write_seconds']:.1f} s", flush=True)
    result = {"machine": machine(), "rows": rows, "precisions": list(precisions), "genome": made, "pipeline": pipeline, "overhead": cost,
              "command": "benchmarks/zero_shot.py" + (f" --out {args.out}" if args.out else "")}
    text = to_markdown(result, describe_machine(result["machine"]))
    print(text)
    if args.out:
        write_report(args.out, result, text)


def to_markdown(result: dict, where: str) -> str:
    precisions = result["precisions"]
    lines = ["# Zero-shot variant scores: positions per second, and a VCF end to end", "",
             f"`{result['command']}` on {where}, Python {result['machine']['python']}. A full-size k=6 masked-LM (random "
             "weights). Naive: multimolecule (PyTorch, fp32), one masked forward per position, batch of one. utrexport: "
             "`utr_runtime.variants.zero_shot` (what `utrexport variants` adds for a masked-LM bundle): one masked row per "
             "position, rows batched. A position answers its 3 substitutions: variants/s is 3x positions/s. Both run one "
             "row per position (no two positions can share a row exactly: docs/spec.md section 9), so the ratio is one "
             "engine's forward against another's: batching, OpenVINO and int8.", "",
             "| 3'UTR | naive | " + " | ".join(f"utrexport {p}" for p in precisions) + " |",
             "|---:|---:|" + "---:|" * len(precisions)]
    for r in result["rows"]:
        cells = [f"{r[p]:.2f}/s, **{r[p] / r['naive']:.1f}x** ({r[f'{p}_positions']} positions, {r[f'{p}_engine']})" for p in precisions]
        lines.append(f"| {r['length']:,} nt | {r['naive']:.2f}/s ({r['naive_positions']} positions) | " + " | ".join(cells) + " |")
    g = result["genome"]
    lines += ["", f"VCF in to bgzipped, tabix-indexed VCF out (`utrexport variants --vcf ... -o OUT.vcf.gz`): {g['variants']:,} "
              f"generated substitutions over {g['regions']} real 3'UTRs ({g['utr_nt']:,} nt) on a generated genome, a tenth "
              "of them outside every region; cosine distance and zero-shot scores of each.", "",
              "| bundle | precision | VCF entries written | seconds | entries/s |", "|---|---|---:|---:|---:|"]
    for p in result["pipeline"]:
        name = "2 layers, hidden 32" if p["bundle"] == "tiny" else "full size (12 layers, hidden 768)"
        lines.append(f"| {name} | {p['precision']} | {p['entries']:,} | {p['seconds']:.1f} | {p['rate']:.1f} |")
    c = result.get("overhead")
    if c:
        total = c["place_seconds"] + c["write_seconds"]
        lines += ["", f"The pipeline's own work on the {g['variants']:,}-variant VCF, without a model: reading the genome, "
                  f"annotation and VCF and placing and checking every variant {c['place_seconds']:.1f} s, writing the annotated "
                  f"VCF ({c['entries']:,} entries) and its index {c['write_seconds']:.1f} s: {c['entries'] / total:,.0f} entries/s. "
                  "The rest of an end-to-end run is the model: the reference windows of each region once, for each "
                  "substitution the windows holding it, and one masked row per position."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
