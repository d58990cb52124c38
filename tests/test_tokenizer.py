"""KmerTokenizer against multimolecule's RnaTokenizer: ids and masks must be equal, not close."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import KMERS, real_sequences, reference_tokenizer
from utr_runtime import KmerTokenizer
from utr_runtime.tokenizer import SPECIAL_TOKENS

ALL_K = (2, 3, 4, 5, 6)
# Letters, other IUPAC codes, lower case, whitespace, punctuation, digits, non-ASCII (incl. 'ß' whose capital is 2 letters),
# special tokens and near-misses of them.
PIECES = list("ACGTUNacgtunRYSWKMBDHVXrykI-.*?|0 \t\n\rßÀéﬁ<>") + list(SPECIAL_TOKENS) + ["<MASK>", "<mas", "k>", "<cls"]
texts = st.one_of(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), st.text(max_size=30))


def as_lists(x):
    return [as_lists(r) for r in x] if isinstance(x, list) else np.asarray(x).tolist()


def assert_same(ours, ref):
    for key in ("input_ids", "attention_mask"):
        assert type(ours[key]) is type(ref[key]), key  # list when unpadded, array when padded
        assert as_lists(ours[key]) == as_lists(ref[key]), key


@pytest.mark.parametrize("k", ALL_K)
def test_vocabulary_equals_reference(k):
    ref = reference_tokenizer(k)
    tok = KmerTokenizer(k)
    assert tok.vocab_size == 5**k + 6
    assert {t: i for i, t in enumerate(tok.vocabulary)} == ref.get_vocab()
    for name in ("pad", "cls", "eos", "unk", "mask", "bos", "sep"):
        assert getattr(tok, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name


@pytest.mark.parametrize("k", KMERS)
@pytest.mark.parametrize("source", ["human_3utr_calibration.fa", "human_mrna_full_length.fasta", "utrbert_seq_to_extract.fasta"])
def test_real_sequences_single_and_batch(k, source):
    seqs = [s for _, s in real_sequences(source)][:60]
    ref, tok = reference_tokenizer(k), KmerTokenizer(k)
    for s in seqs[:10]:
        assert_same(tok(s), ref(s))
    assert_same(tok(seqs), ref(seqs))
    assert_same(tok(seqs, padding=True), ref(seqs, padding=True, return_tensors="np"))
    for options in (dict(truncation=True, max_length=512), dict(padding="max_length", truncation=True, max_length=300)):
        assert_same(tok(seqs, **options), ref(seqs, **options, return_tensors="np" if "padding" in options else None))


@pytest.mark.parametrize("k", ALL_K)
@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_any_string_matches_reference(k, text):
    assert_same(KmerTokenizer(k)(text), reference_tokenizer(k)(text))


@pytest.mark.parametrize("k", ALL_K)
@settings(max_examples=60, deadline=None)
@given(batch=st.lists(texts, min_size=1, max_size=6), max_length=st.integers(1, 24), padding=st.sampled_from([False, True, "max_length"]))
def test_batches_with_padding_and_truncation_match_reference(k, batch, max_length, padding):
    ref = reference_tokenizer(k)(batch, padding=padding, truncation=True, max_length=max_length, return_tensors="np" if padding else None)
    assert_same(KmerTokenizer(k)(batch, padding=padding, truncation=True, max_length=max_length), ref)


@pytest.mark.parametrize("k", (3, 6))
def test_decoding_matches_reference(k):
    ref, tok = reference_tokenizer(k), KmerTokenizer(k)
    ids = tok("ACGUAC<mask>GGUNNU")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.convert_tokens_to_ids(["<mask>", "ZZZ"]) == [4, 3]


def test_shapes_and_types():
    tok = KmerTokenizer(3)
    single = tok("ACGUA", padding="max_length", max_length=8)
    assert single["input_ids"].shape == (8,) and single["input_ids"].dtype == np.int64
    batch = tok(["ACGUA", "A"], padding=True)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].dtype == np.int64
    assert isinstance(tok(["ACGUA", "A"])["input_ids"][0], list)
    assert tok.encode("ACGU").tolist() == [1, 13, 44, 2]


def test_spec_file_round_trip(tmp_path):
    tok = KmerTokenizer(5)
    tok.save(tmp_path / "tokenizer.json")
    again = KmerTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again == tok and again.vocabulary == tok.vocabulary


def test_spec_file_that_lies_is_refused(tmp_path):
    spec = KmerTokenizer(3).to_spec()
    spec["vocabulary"][10], spec["vocabulary"][11] = spec["vocabulary"][11], spec["vocabulary"][10]
    (tmp_path / "bad.json").write_text(__import__("json").dumps(spec))
    with pytest.raises(ValueError, match="differs"):
        KmerTokenizer.from_file(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KmerTokenizer.from_file(tmp_path / "junk.json")


@pytest.mark.parametrize("k", [1, 7, 0, -3, 2.5, "3", True, None])
def test_k_outside_range_is_refused(k):
    with pytest.raises(ValueError, match="k must be"):
        KmerTokenizer(k)


def test_non_string_item_names_its_index():
    with pytest.raises(TypeError, match="sequence 2 is int"):
        KmerTokenizer(3)(["ACG", "UUU", 7])
    with pytest.raises(TypeError, match="sequence 0 is bytes"):
        KmerTokenizer(3)([b"ACG"])


def test_option_errors_are_clear():
    tok = KmerTokenizer(3)
    with pytest.raises(ValueError, match="needs max_length"):
        tok("ACGU", truncation=True)
    with pytest.raises(ValueError, match="more than max_length"):
        tok(["ACGUACGU"], padding="max_length", max_length=4)
    with pytest.raises(ValueError, match="padding must be"):
        tok("ACGU", padding="left")
