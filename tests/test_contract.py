"""The bundle as a contract (docs/spec.md): conformance vectors, the runtime against them, and the Node.js client
against both the vectors and utr_runtime on real sequences."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import utr_runtime
from conftest import real_sequences, reference_tokenizer
from utr_runtime.conformance import check
from utr_runtime.engines import installed

NODE_CLIENT = Path(__file__).parent.parent / "clients" / "node"
HOSTILE_MANIFESTS = 15  # the cases of clients/node/test/manifest.test.js
# The Node client vs utr_runtime, both on ONNX Runtime (Node 1.30, Python 1.32 here): float rounding only (fp32 and
# int8 measured bit-identical). fp16 models round in half precision, and the two versions' fp16 kernels differ by an
# occasional ulp: 2^-10 at values of 1-2 measured, so up to 2^-8 for the values up to 4 of these vectors.
NODE_ATOL = {"fp32": 1e-5, "int8": 1e-5, "fp16": 2**-8}


def vectors(bundle) -> dict:
    return json.loads((Path(bundle) / "conformance.json").read_text())


@pytest.fixture(scope="module")
def contract_bundles(tiny_bundle, task_bundle, all_precisions):
    """An MLM bundle at k=3 and k=6 (and k=6 with plain attention), a task bundle of each level, and a full-width
    one with fp16 and int8."""
    return [tiny_bundle(3, "pretraining"), tiny_bundle(6, "pretraining"), tiny_bundle(6, "pretraining", "plain"),
            task_bundle(3, "sequence", "multiclass"), task_bundle(3, "nucleotide", "multiclass"), task_bundle(3, "contact", "binary"),
            all_precisions]


@pytest.mark.parametrize("k", [3, 6])
def test_conformance_ids_are_the_reference_tokenizers(tiny_bundle, k):
    v = vectors(tiny_bundle(k, "pretraining"))
    reference = reference_tokenizer(k)
    for case in v["tokenizer"]:
        assert case["input_ids"] == reference(case["text"])["input_ids"], case["text"]
    for case in v["truncation"]:
        assert case["input_ids"] == reference(case["text"], truncation=True, max_length=case["max_length"])["input_ids"], case["text"]


def test_conformance_windows_follow_the_spec(tiny_bundle):
    """The spec's formulas, written out here from docs/spec.md section 4, against the file."""
    v = vectors(tiny_bundle(3, "pretraining"))
    for case in v["windows"]:
        n, w, o, e = case["kmers"], case["window"], case["overlap"], case["extent"]
        if n <= w:
            bounds = [(0, n)]
        else:
            count = -(-(n - o) // (w - o))
            length = -(-(n + (count - 1) * o) // count)
            bounds = [(i * (n - length) // (count - 1), i * (n - length) // (count - 1) + length) for i in range(count)]
        cuts = [0] + [(bounds[i + 1][0] + bounds[i][1] + e) // 2 for i in range(len(bounds) - 1)] + [n + e]
        assert case["windows"] == [[s, t, cuts[i], cuts[i + 1]] for i, (s, t) in enumerate(bounds)]
    plans = {c["kmers"]: c["windows"] for c in v["windows"] if c["overlap"] == 64 and c["extent"] == 0}
    assert [w[:2] for w in plans[960]] == [[0, 363], [298, 661], [597, 960]]  # 298.5 floored (JavaScript's Math.round: 299)
    assert [w[:2] for w in plans[600]] == [[0, 332], [268, 600]]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_runtime_meets_the_conformance_vectors(contract_bundles, engine):
    """Every precision of every bundle, under the vectors' tolerance for that precision."""
    if not installed(engine):
        pytest.skip(f"{engine} is not installed")
    for bundle in contract_bundles:
        for precision in utr_runtime.Bundle(bundle).precisions:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = utr_runtime.load(bundle, precision=precision, engine=engine)
                assert check(model, vectors(bundle)) == [], (bundle, precision)


def test_upper_casing_reaches_the_ids_only_through_lengths_and_alphabet_letters():
    """docs/spec.md section 2's claim, on this Python's Unicode data: outside ASCII a-z, a code point whose full
    upper case is one code point never gives A, C, G, T, U or N, so only the expansions (all in one vector) matter."""
    from utr_runtime.conformance import upper_case_expansions

    single = {c: chr(c).upper() for c in range(128, 0x110000) if not 0xD800 <= c <= 0xDFFF and len(chr(c).upper()) == 1}
    assert {chr(c) + u for c, u in single.items() if u in "ACGTUN"} == set()
    assert {chr(c) + u for c, u in single.items() if u.isascii() and u != chr(c)} == {"ıI", "ſS"}
    assert len(upper_case_expansions()) == 8 + 102


def test_conformance_check_can_fail(tiny_bundle):
    bundle = tiny_bundle(3, "pretraining")
    v = vectors(bundle)
    v["tokenizer"][0]["input_ids"][1] += 1
    v["windows"][-1]["windows"][0][0] += 1
    v["model"]["mean"][0][0] += 1e-3
    v["model"]["fill_mask"]["refused"].append("ACGU<mask>ACGUAG")  # a text it answers
    v["model"]["fill_mask"]["top_k_past_vocabulary"]["answers"] += 1
    v["padding"]["attention_mask"][2][5] = 0  # the written <pad>
    v["truncated_windows"][-1]["windows"][0][1] += 1
    v["validity"][-1]["refused"] = True  # one window of k-mers is not too many for an MLM bundle
    v["model"]["forward"]["last_hidden_state"][1][0][0] += 1e-3
    v["model"]["zero_shot"]["probabilities"][-1][0] += 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failures = check(utr_runtime.load(bundle), v)
    assert [f.split(":")[0] for f in failures] == ["tokenizer", "padding", "validity", "windows", "truncated windows", "embed mean",
                                                   "forward with (B, 0) mask_positions", "fill-mask must refuse 'ACGU<mask>ACGUAG'",
                                                   "fill-mask", "zero-shot letter probabilities"]


def test_conformance_tolerance_below_fp32_can_fail(all_precisions):
    """int8 meets its own tolerance, not fp32's; a tolerance missing for a precision is a failure, not a pass."""
    v = vectors(all_precisions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = utr_runtime.load(all_precisions, precision="int8")
    assert check(model, v) == []
    v["model"]["tolerances"]["int8"] = v["model"]["tolerances"]["fp32"]
    assert "embed mean" in check(model, v)
    del v["model"]["tolerances"]["int8"]
    assert check(model, v)[-1] == "no tolerance for precision int8"


def test_every_precision_runs_without_mask_positions(all_precisions):
    """Embeddings need no LM input: an empty (B, 0) mask_positions works for every batch size and model file."""
    bundle = utr_runtime.Bundle(all_precisions)
    tok = bundle.tokenizer()
    ids, mask = tok.pad(tok.encode_batch([s for _, s in real_sequences()[:3]], max_length=200))
    for precision in bundle.precisions:
        for name in {v: None for v in bundle.model_variants(precision, "onnxruntime").values()}:
            session = ort.InferenceSession(str(bundle.path / name), providers=["CPUExecutionProvider"])
            out = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {"input_ids": ids, "attention_mask": mask, "mask_positions": np.zeros((3, 0), np.int64)})))
            assert out["logits"].shape == (3, 0, tok.vocab_size) and out["last_hidden_state"].shape == (*ids.shape, 768), name


def _parity_record(bundle: Path, precision: str) -> dict:
    """utr_runtime's answers on real 3'UTRs (short to several windows), for the Node client to reproduce."""
    pool = sorted((s for _, s in real_sequences()), key=len)
    seqs = pool[:: max(1, len(pool) // 12)][:12] + [pool[-1][:2600]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = utr_runtime.load(bundle, precision=precision, engine="onnxruntime")
        record = {"bundle": str(bundle), "precision": precision, "sequences": seqs, "atol": NODE_ATOL[precision],
                  "ids": [model.tokenizer.encode(s).tolist() for s in seqs],
                  "mean": model.embed(seqs).tolist(), "cls": model.embed(seqs, pooling="cls").tolist(),
                  "tokens": [t.tolist() for t in model.embed(seqs[:4] + seqs[-1:], pooling="tokens")]}
        if "logits" in model.bundle.output_names:
            texts = [s[:40] + "<mask>" + s[40:90] for s in seqs[3:6]]
            record["fill_mask"] = [{"text": t, "answers": model.fill_mask(t, top_k=5)} for t in texts]
        if model.task:
            fits = seqs if model.task["level"] != "contact" else seqs[:3]
            record["predict"] = {"sequences": fits, "values": [np.asarray(p).tolist() for p in model.predict(fits)]}
    return record


def test_node_client(contract_bundles, tmp_path):
    """The Node.js client (clients/node, onnxruntime-node) on every bundle: the conformance vectors, and utr_runtime's
    answers on real sequences (exact ids, vectors within NODE_ATOL) for every precision of the bundles."""
    node = shutil.which("node")
    assert node, "Node.js (20+) is needed for the Node client's tests: install it (the README's test command expects it)"
    assert (NODE_CLIENT / "node_modules" / "onnxruntime-node").is_dir(), \
        "clients/node has no node_modules: run `make test` (it runs npm ci there) or `npm ci` in clients/node"
    records = []
    for bundle in contract_bundles:
        for precision in utr_runtime.Bundle(bundle).precisions:
            path = tmp_path / f"parity{len(records)}.json"
            path.write_text(json.dumps(_parity_record(Path(bundle), precision)))
            records.append(str(path))
    env = {**os.environ, "UTR_BUNDLES": os.pathsep.join(map(str, contract_bundles)), "UTR_PARITY": os.pathsep.join(records)}
    result = subprocess.run([node, "--test", "--test-reporter=spec", *sorted(map(str, (NODE_CLIENT / "test").glob("*.test.js")))],
                            cwd=NODE_CLIENT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # none skipped: per bundle 3 conformance tests and one per precision, per record (a bundle's precision) one parity
    # test, and the hostile-manifest cases
    assert "skipped 0\n" in result.stdout and f"pass {len(contract_bundles) * 3 + 2 * len(records) + HOSTILE_MANIFESTS}\n" in result.stdout, \
        result.stdout[-3000:]
    print(*[line for line in result.stdout.splitlines() if "max abs difference" in line], sep="\n")


def test_conformance_check_of_task_outputs_can_fail(task_bundle):
    bundle = task_bundle(3, "sequence", "multiclass")
    v = vectors(bundle)
    assert check(utr_runtime.load(bundle), v) == []
    v["model"]["predict"]["max_values"][0][0] += 1e-3
    assert check(utr_runtime.load(bundle), v) == ["predict, aggregate max"]


def test_the_node_readme_example_runs_as_pasted(tiny_bundle, task_bundle, tmp_path):
    """clients/node/README.md's example, with its two bundle paths pointed at test bundles of the same kinds (an MLM
    bundle for embed and fillMask, a classifier for predict), run by node from clients/node as the README says."""
    import re

    readme = (NODE_CLIENT / "README.md").read_text()
    example = re.search(r"```js\n(.*?)```", readme, re.S).group(1)
    assert "'../../bundles/utrbert-6mer-random'" in example and "'../../bundles/classifier'" in example
    example = example.replace("'../../bundles/utrbert-6mer-random'", repr(str(tiny_bundle(3, "pretraining"))))
    example = example.replace("'../../bundles/classifier'", repr(str(task_bundle(3, "sequence", "binary"))))
    script = NODE_CLIENT / f".readme-example-{os.getpid()}.mjs"  # beside src/, so './src/index.js' resolves as pasted
    script.write_text(example + "\nconsole.log('ran');\n")
    try:
        done = subprocess.run(["node", str(script)], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=300)
    finally:
        script.unlink()
    assert done.returncode == 0 and done.stdout.strip().endswith("ran"), done.stderr[-2000:]
