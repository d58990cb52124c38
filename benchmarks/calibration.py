"""Compare INT8 calibration methods (entropy, percentile, minmax) for both Q/DQ schemes on a bundle's fp32 model.

Accuracy against the bundle's PyTorch float32 fixtures (held-out real sequences), with the same comparator as
`utrexport verify`. Run: .venv/bin/python benchmarks/calibration.py BUNDLE [--size 64]
"""

import argparse
import tempfile
import time
from pathlib import Path

import utr_runtime
from utr_calibration import calibration_windows
from utr_runtime.engines import open_runner
from utr_runtime.parity import TOLERANCES, compare
from utr_runtime.verify import FIXTURE_INPUTS, load_fixtures, mean_pooled
from utrexport.precision import CALIBRATION_METHODS, INT8_SCHEMES, quantize_int8

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    bundle = utr_runtime.Bundle(args.bundle)
    fixtures = load_fixtures(bundle)
    feeds = {k: v for k, v in fixtures.items() if k in FIXTURE_INPUTS}
    reference = {k: v for k, v in fixtures.items() if k in bundle.output_names}
    reference["mean_pooled"] = mean_pooled(reference["last_hidden_state"], fixtures["attention_mask"])
    rows = calibration_windows(bundle.k, args.size)
    print(f"{len(rows)} calibration windows; accuracy vs PyTorch fp32 on {len(fixtures['input_ids'])} held-out real sequences\n")
    print("| scheme | method | token cos mean / min | pooled cos mean / min | logits cos mean | top-1 | quantize s |")
    print("|---|---|---|---|---|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in INT8_SCHEMES:
            for method in CALIBRATION_METHODS:
                out = Path(tmp) / f"{scheme}-{method}.onnx"
                start = time.perf_counter()
                quantize_int8(bundle.model_file("fp32"), out, rows, scheme, method)
                seconds = time.perf_counter() - start
                got = open_runner(out).run(feeds)
                got["mean_pooled"] = mean_pooled(got["last_hidden_state"], fixtures["attention_mask"])
                r = {c.output: c for c in compare(reference, got, TOLERANCES["int8"], fixtures["attention_mask"])}
                logits = f"{r['logits'].mean_cosine:.5f}" if "logits" in r else "-"
                top1 = f"{r['logits'].top1:.3f}" if "logits" in r else "-"
                t, p = r["last_hidden_state"], r["mean_pooled"]
                print(f"| {scheme} | {method} | {t.mean_cosine:.5f} / {t.min_cosine:.5f} | {p.mean_cosine:.5f} / {p.min_cosine:.5f} | {logits} | {top1} | {seconds:.0f} |", flush=True)
