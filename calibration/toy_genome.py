"""A toy genome made of shipped real 3'UTRs: the example input of `--genome` (README) and the tests' known layout.

Each 3'UTR is placed between random filler on one of two chromosomes, alternately on the plus and the minus strand
(reverse-complemented), split into 1-3 blocks by filler introns. A BED12 and a GTF (`three_prime_utr` features,
listed 3' to 5' on the minus strand, as annotations often do) describe the regions, and a VCF holds made-up
variants in them (substitutions and an insertion, not real human variants) and one in the filler. Everything is
worked out here from the placement, without utrexport's readers, so the tests can check those against it.

    python -m utr_calibration.toy_genome     # rewrites the shipped data/toy_genome.* files
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COMPLEMENT = str.maketrans("ACGT", "TGCA")
PICKS = (3, 40, 90, 150, 194, 359)  # indices into the shipped 3'UTRs sorted by length: 100 nt to about 4 kb


def revcomp(dna: str) -> str:
    return dna.translate(COMPLEMENT)[::-1]


def write_toy_genome(folder: str | Path, seed: int = 7, name: str = "toy_genome") -> dict:
    """Write NAME.fa, NAME.bed, NAME.gtf and NAME.vcf into `folder`; return the layout: chromosomes, each
    3'UTR's sequence (DNA letters), strand, chromosome and `where[id][t]`, the genome position of its base t."""
    from . import real_sequences

    rng = np.random.default_rng(seed)
    pool = sorted(real_sequences(), key=lambda r: len(r[1]))
    filler = lambda n: "".join(rng.choice(list("ACGT"), n))  # noqa: E731
    chroms = {"chr1": filler(50), "chr2": filler(80)}
    layout: dict = {"chroms": chroms, "originals": {}, "where": {}, "strand": {}, "chrom": {}, "bed": []}
    gtf = []
    for i, (utr, seq) in enumerate(pool[j] for j in PICKS):
        dna, chrom, strand = seq.upper().replace("U", "T"), ("chr1", "chr2")[i % 2], "+-"[(i // 2) % 2]
        genomic = dna if strand == "+" else revcomp(dna)
        cuts = sorted(rng.choice(np.arange(20, len(dna) - 20), size=i % 3, replace=False).tolist())
        blocks, positions = [], []
        for a, b in zip([0] + cuts, cuts + [len(dna)]):
            start = len(chroms[chrom])
            chroms[chrom] += genomic[a:b]
            blocks.append((start, start + b - a))
            positions += range(start, start + b - a)
            chroms[chrom] += filler(int(rng.integers(20, 60)))
        layout["originals"][utr], layout["strand"][utr], layout["chrom"][utr] = dna, strand, chrom
        layout["where"][utr] = positions if strand == "+" else positions[::-1]
        s0, e0 = blocks[0][0], blocks[-1][1]
        layout["bed"].append([chrom, s0, e0, utr, 0, strand, s0, e0, 0, len(blocks), ",".join(str(e - s) for s, e in blocks) + ",",
                              ",".join(str(s - s0) for s, _ in blocks) + ","])
        for s, e in blocks if strand == "+" else blocks[::-1]:
            gtf.append([chrom, "toy", "three_prime_utr", s + 1, e, ".", strand, ".", f'gene_id "gene{i}"; transcript_id "{utr}";'])
    folder = Path(folder)
    with open(folder / f"{name}.fa", "w") as f:
        for chrom, bases in chroms.items():
            f.write(f">{chrom}\n" + "".join(bases[j : j + 60] + "\n" for j in range(0, len(bases), 60)))
    (folder / f"{name}.bed").write_text("".join("\t".join(map(str, r)) + "\n" for r in layout["bed"]))
    (folder / f"{name}.gtf").write_text("".join("\t".join(map(str, r)) + "\n" for r in gtf))
    (folder / f"{name}.vcf").write_text(_vcf(layout, rng))
    return layout


def _vcf(layout: dict, rng) -> str:
    """Two substitutions in each of four 3'UTRs, an insertion, and a substitution in the filler (in no region), with
    QUAL, FILTER and an INFO field (DP) that a scored VCF must keep."""
    lines = ["##fileformat=VCFv4.2", "##source=utr_calibration.toy_genome (made-up variants of a toy genome)",
             *(f"##contig=<ID={chrom},length={len(bases)}>" for chrom, bases in layout["chroms"].items()),
             '##INFO=<ID=DP,Number=1,Type=Integer,Description="Read depth (made up)">', "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    rows = []
    for utr in list(layout["originals"])[:4]:
        chrom, seq = layout["chrom"][utr], layout["originals"][utr]
        for t in sorted(rng.choice(np.arange(5, len(seq) - 5), 2, replace=False).tolist()):
            g = layout["where"][utr][t]
            base = layout["chroms"][chrom][g]
            rows.append((chrom, g + 1, f"{utr}_{t}", base, next(c for c in "ACGT" if c != base)))
    utr = list(layout["originals"])[0]
    g = layout["where"][utr][30]
    base = layout["chroms"][layout["chrom"][utr]][g]
    rows.append((layout["chrom"][utr], g + 1, f"{utr}_ins", base, base + "GA"))
    rows.append(("chr1", 3, "outside", layout["chroms"]["chr1"][2], "A" if layout["chroms"]["chr1"][2] != "A" else "C"))
    rows.sort(key=lambda r: (r[0], r[1]))
    return "\n".join(lines + ["\t".join(map(str, (*r, 50, "PASS", f"DP={20 + i}"))) for i, r in enumerate(rows)]) + "\n"


if __name__ == "__main__":
    from . import DATA

    write_toy_genome(Path(str(DATA)))
    print(f"wrote {DATA}/toy_genome.fa, .bed, .gtf, .vcf")
