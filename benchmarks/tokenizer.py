"""Tokenizer speed: utr_runtime.KmerTokenizer vs multimolecule.RnaTokenizer, 1000 real 3'UTR stretches of 1000 nt.

Run: .venv/bin/python benchmarks/tokenizer.py      (the same table is part of `utrexport bench`)

In a fresh process the first k timed (k=3 here) runs at about 17 ms instead of 10-12: glibc's adaptive mmap
threshold starts low, so each call's multi-MB arrays are fresh pages until some larger block has been freed.
`MALLOC_MMAP_THRESHOLD_=67108864` shows it (k=3: 9.7 ms); inside `utrexport bench`, or any process that has
loaded a model, the steady figure is what you get.
"""

from utrexport.benchmark import tokenizer_table, tokenizer_speed

if __name__ == "__main__":
    print(tokenizer_table(tokenizer_speed()))
