"""Zero-shot variant scores of masked-LM bundles (utr_runtime.variants.zero_shot, docs/spec.md section 9) against
an independent computation with multimolecule's UtrBertForMaskedLM on the masked token ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import utr_runtime
from conftest import multimolecule, real_sequences
from utr_runtime.variants import Edit, nucleotide_probabilities, saturation, zero_shot

PROBABILITY_ATOL, LLR_ATOL = 1e-4, 1e-3  # fp32 engine against PyTorch: the fp32 parity gate, and its effect on a log ratio


def reference_letters(module, k: int, sequence: str, p: int, window: int = 510) -> np.ndarray:
    """P(A, C, G, U) at nucleotide p, computed here from the definition: mask the k-mers covering p in the
    reference tokenizer's ids, run the PyTorch MLM, restrict each masked k-mer's softmax to the A/C/G/U k-mers,
    sum by the letter at p, average over the masked k-mers."""
    import torch

    tokenizer = multimolecule().RnaTokenizer(nmers=k)
    ids = tokenizer(sequence)["input_ids"][1:-1]
    n = len(ids)
    covering = list(range(max(0, p - k + 1), min(p, n - 1) + 1))
    start = 0
    if n > window:  # the window of `window` k-mers centred on the masked ones, kept inside the sequence
        start = min(max(0, covering[0] - (window - len(covering)) // 2), n - window)
    row = [tokenizer.cls_token_id] + ids[start : start + window] + [tokenizer.sep_token_id]
    for i in covering:
        row[1 + i - start] = tokenizer.mask_token_id
    with torch.no_grad():
        logits = module(torch.tensor([row])).logits[0].double()
    kmers = ["".join(c) for c in itertools.product("ACGU", repeat=k)]
    kmer_ids = tokenizer.convert_tokens_to_ids(kmers)
    letters = []
    for i in covering:
        q = torch.softmax(logits[1 + i - start, kmer_ids], -1).numpy()
        letters.append([sum(q[m] for m, kmer in enumerate(kmers) if kmer[p - i] == letter) for letter in "ACGU"])
    return np.mean(letters, axis=0)


@pytest.mark.parametrize("k", [3, 6])
def test_letter_probabilities_equal_the_definition_on_multimolecule(tiny_checkpoint, tiny_bundle, k):
    """First and last nucleotides, the window cuts and the middle of a multi-window real 3'UTR, and a short one."""
    _, module = tiny_checkpoint(k, "mlm")
    model = utr_runtime.load(tiny_bundle(k, "mlm"))
    long = next(s for _, s in real_sequences() if 1300 < len(s) < 1700).replace("T", "U")
    short = next(s for _, s in real_sequences() if 60 < len(s) < 120).replace("T", "U")
    n = len(long) - k + 1
    positions = sorted({0, 1, k - 1, 300, 509, 510, len(long) // 2, n - 1, len(long) - k, len(long) - 2, len(long) - 1})
    got = nucleotide_probabilities(model, [(long, positions), (short, [0, len(short) // 2, len(short) - 1])], max_batch_tokens=2048)
    for sequence, chosen, probabilities in zip((long, short), (positions, [0, len(short) // 2, len(short) - 1]), got):
        for p, row in zip(chosen, probabilities):
            expected = reference_letters(module, k, sequence, p)
            np.testing.assert_allclose(row, expected, atol=PROBABILITY_ATOL, rtol=0, err_msg=f"k={k} position {p}")
            assert row.sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("k", [3, 6])
def test_scores_are_the_llr_of_the_alleles_and_a_saturation_equals_each_position_alone(tiny_checkpoint, tiny_bundle, k):
    _, module = tiny_checkpoint(k, "mlm")
    model = utr_runtime.load(tiny_bundle(k, "mlm"))
    sequence = next(s for _, s in real_sequences() if 600 < len(s) < 700).replace("T", "U")
    edits = [e for e in saturation(sequence) if e.position in (0, 7, 333, len(sequence) - 1)]
    scores = zero_shot(model, [(sequence, edits)])[0]
    for e, p_ref, p_alt, llr in zip(edits, scores["p_ref"], scores["p_alt"], scores["llr"]):
        expected = reference_letters(module, k, sequence, e.position)
        assert p_ref == pytest.approx(expected["ACGU".index(e.ref)], abs=PROBABILITY_ATOL)
        assert p_alt == pytest.approx(expected["ACGU".index(e.alt)], abs=PROBABILITY_ATOL)
        assert llr == pytest.approx(np.log(expected["ACGU".index(e.alt)] / expected["ACGU".index(e.ref)]), abs=LLR_ATOL)
    # grouped (every position's rows in shared batches) against ungrouped (one row per forward)
    whole = zero_shot(model, [(sequence, saturation(sequence)[: 3 * 40])])[0]
    alone = [zero_shot(model, [(sequence, [e])], batch_size=1)[0] for e in saturation(sequence)[: 3 * 40]]
    for name in ("p_ref", "p_alt", "llr"):
        np.testing.assert_allclose(whole[name], [a[name][0] for a in alone], atol=1e-6, rtol=0)


def test_what_zero_shot_does_not_score_is_nan_and_a_bundle_without_mlm_head_is_refused(tiny_bundle):
    model = utr_runtime.load(tiny_bundle(3, "mlm"))
    scores = zero_shot(model, [("ACGUACGUNACGUAC", [Edit(3, "U", ""), Edit(2, "GU", "CA"), Edit(8, "N", "A"), Edit(1, "C", "N"),
                                                    Edit(5, "C", "G")])])[0]
    assert np.isnan(scores["llr"][:4]).all() and np.isfinite(scores["llr"][4])
    with pytest.raises(utr_runtime.InputError, match="reference allele G does not match the sequence, which holds C at position 2"):
        zero_shot(model, [("ACGUACGU", [Edit(1, "G", "A")])])
    with pytest.raises(utr_runtime.UtrError, match="no MLM head"):
        zero_shot(utr_runtime.load(tiny_bundle(3, "base")), [("ACGUACGU", [Edit(3, "U", "A")])])
