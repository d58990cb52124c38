"""Tokenizer speed: utr_runtime.KmerTokenizer vs multimolecule.RnaTokenizer, 1000 real 3'UTR stretches of 1000 nt.

Run: .venv/bin/python benchmarks/tokenizer.py
"""

from utrexport.benchmark import tokenizer_speed

if __name__ == "__main__":
    print("| k | sequences x nt | utr_runtime (median s) | multimolecule (median s) | speed-up |")
    print("|---|---|---|---|---|")
    for row in tokenizer_speed():
        ref = f"{row['reference_s']:.3f}" if row["reference_s"] else "not installed"
        up = f"{row['speedup']:.0f}x" if row["speedup"] else "-"
        print(f"| {row['k']} | {row['sequences']} x {row['length_nt']} | {row['utr_runtime_s']:.4f} | {ref} | {up} |")
