"""Tokenizer speed: utr_runtime.KmerTokenizer vs multimolecule.RnaTokenizer, 1000 real 3'UTR stretches of 1000 nt.

Run: .venv/bin/python benchmarks/tokenizer.py      (the same table is part of `utrexport bench`)
"""

from utrexport.benchmark import tokenizer_table, tokenizer_speed

if __name__ == "__main__":
    print(tokenizer_table(tokenizer_speed()))
