"""Overlapping k-mer tokenizer of 3UTRBERT, in NumPy.

Reproduces `multimolecule.RnaTokenizer(nmers=k)` id for id (see `tests/test_tokenizer.py`):
`<cls>`, the L-k+1 overlapping k-mers, `<eos>`; text upper-cased and T read as U; a k-mer holding any
character outside A,C,G,U,N becomes `<unk>`; a special token written in the text splits it there.
A whole batch is k-merised in one pass over one concatenated code array, so the cost per sequence is a
few string operations, not a Python loop per k-mer.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from typing import Sequence

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eos>", "<unk>", "<mask>", "<null>")
ALPHABET = "ACGUN"
SPEC_FORMAT = "utr-kmer-tokenizer"
SPEC_VERSION = 1
MIN_K, MAX_K = 2, 6

_INVALID = len(ALPHABET)  # code of any character outside the alphabet
_CODES = np.full(0x110000, _INVALID, dtype=np.int8)  # every Unicode code point -> letter code
for _i, _c in enumerate(ALPHABET):
    _CODES[ord(_c)] = _i
_FOREIGN = re.compile(r"[^ACGTUNacgtun]")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class KmerTokenizer:
    """Turns RNA/DNA text into 3UTRBERT token ids.

    >>> tok = KmerTokenizer(3)
    >>> tok("uagcuuauc")["input_ids"]
    [1, 83, 17, 64, 49, 96, 84, 22, 2]
    """

    pad_token_id, cls_token_id, eos_token_id, unk_token_id, mask_token_id, null_token_id = range(6)
    bos_token_id = cls_token_id  # the reference's names for the same ids
    sep_token_id = eos_token_id
    special_tokens = SPECIAL_TOKENS
    alphabet = ALPHABET

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not MIN_K <= k <= MAX_K:
            raise ValueError(f"k must be an integer from {MIN_K} to {MAX_K}, got {k!r}")
        self.k = int(k)
        kmers = ("".join(p) for p in itertools.product(ALPHABET, repeat=self.k))
        self.vocabulary: list[str] = [*SPECIAL_TOKENS, *kmers]
        self._token_to_id = {t: i for i, t in enumerate(self.vocabulary)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"KmerTokenizer(k={self.k})"

    def __eq__(self, other) -> bool:
        return isinstance(other, KmerTokenizer) and other.k == self.k

    # ---------------------------------------------------------------- encoding
    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> dict:
        """Encode one string or a list of strings.

        `padding`: False, True / "longest" (to the longest in the batch) or "max_length".
        `truncation`: cut on the right to `max_length` tokens, keeping `<cls>` and `<eos>`.
        Padded results are int64 arrays, (L,) for one string and (B, L) for a list; unpadded ones are lists.
        """
        single = isinstance(text, str)
        texts = [text] if single else _check_texts(text)
        pad_to = _check_options(padding, truncation, max_length)
        cut = max_length if truncation else None
        if pad_to is None:
            input_ids = [r.tolist() for r in self.encode_batch(texts, cut)]
            attention_mask = [[1] * len(r) for r in input_ids]
        else:
            length = None
            if pad_to == "max_length":  # truncation never drops <cls>/<eos>, so a row is at least 2 tokens
                length = max(max_length, 2) if truncation else max_length
            input_ids, attention_mask = self._pad_flat(*self._encode_flat(texts, cut), length)
        if single:
            input_ids, attention_mask = input_ids[0], attention_mask[0]
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def encode(self, text: str) -> np.ndarray:
        """Ids of one string, with `<cls>` and `<eos>`, as an int64 array."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[np.ndarray]:
        """Ids of each string (int64 arrays, unpadded), optionally cut to `max_length` tokens."""
        flat, lengths = self._encode_flat(_check_texts(texts), max_length)
        return np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1]) if len(lengths) else []

    def _encode_flat(self, texts: list[str], max_length: int | None) -> tuple[np.ndarray, np.ndarray]:
        """All inputs' ids end to end, with `<cls>`/`<eos>`, and each input's token count.

        Every input is laid out as <cls>, its text pieces and the special tokens written in it, <eos>, all in one
        string (a special token is one placeholder character). The k-mer id is computed at every position at
        once; a text position is kept when its window ends inside its own piece, a special position always.
        """
        if any("<" in t for t in texts):
            pieces, special_ids, piece_input = self._split_specials(texts)
        else:  # fast path: no special token written in any text
            pieces = [p for t in texts for p in ("<", t, "<")]
            special_ids = [self.cls_token_id, -1, self.eos_token_id] * len(texts)
            piece_input = np.repeat(np.arange(len(texts)), 3)
        special = np.asarray(special_ids, dtype=np.int64)
        ids, starts, lengths = self._kmerise(pieces)
        ends = starts + lengths
        keep = np.ones(len(ids), dtype=bool)
        for j in range(1, self.k):  # windows that start in the last k-1 letters of a piece run past its end
            pos = ends - j
            keep[pos[pos >= starts]] = False
        is_special = special >= 0
        keep[starts[is_special]] = True
        ids[starts[is_special]] = special[is_special]
        flat = ids[keep]  # int32 until written into the int64 outputs: fewer large temporaries
        per_piece = np.where(is_special, 1, np.maximum(lengths - self.k + 1, 0))
        counts = np.bincount(piece_input, weights=per_piece, minlength=len(texts)).astype(np.int64)
        if max_length is not None and len(counts) and counts.max() > max(max_length, 2):
            limit = max(max_length, 2)  # truncation keeps <cls> and <eos>
            rank = _ranks(counts)
            flat = flat[(rank < limit - 1) | (rank == np.repeat(counts - 1, counts))]
            counts = np.minimum(counts, limit)
        return flat, counts

    def _split_specials(self, texts: list[str]) -> tuple[list[str], list[int], np.ndarray]:
        """Pieces of every input (special tokens as one placeholder letter), their special id or -1, their input."""
        pieces: list[str] = []
        special_ids: list[int] = []
        piece_input: list[int] = []
        for i, text in enumerate(texts):
            parts = _SPECIAL_SPLIT.split(text)
            pieces.append("<")
            special_ids.append(self.cls_token_id)
            for j, part in enumerate(parts):
                if j % 2 or part:
                    pieces.append("<" if j % 2 else part)
                    special_ids.append(self._token_to_id[part] if j % 2 else -1)
            pieces.append("<")
            special_ids.append(self.eos_token_id)
            piece_input.extend([i] * (len(pieces) - len(piece_input)))
        return pieces, special_ids, np.asarray(piece_input, dtype=np.int64)

    def _kmerise(self, pieces: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """K-mer id starting at every position of the concatenated pieces, plus each piece's start and length."""
        joined = "".join(pieces)
        upper = joined.upper()
        if len(upper) != len(joined):  # a character whose capital is longer (e.g. 'ß' -> 'SS')
            pieces = [p.upper() for p in pieces]
            upper = "".join(pieces)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        starts = np.cumsum(lengths) - lengths
        text = upper.replace("T", "U")
        # One byte a letter for ASCII text (the usual case; str.isascii is O(1)), four otherwise.
        points = np.frombuffer(text.encode("ascii"), np.uint8) if text.isascii() else np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        codes = np.full(len(points) + self.k - 1, _INVALID, dtype=np.int8)
        codes[: len(points)] = _CODES[points]
        # Pack each k-mer's codes at 3 bits a letter, then one table maps packed -> id (<unk> if any invalid).
        n = len(points)
        packed = codes[:n].astype(np.int32)
        for j in range(1, self.k):
            packed <<= 3
            packed |= codes[j : j + n]
        return _packed_to_id(self.k)[packed], starts, lengths

    def with_specials(self, kmer_ids) -> np.ndarray:
        """<cls>, the given k-mer ids, <eos>: one model row (a window of a longer sequence, say), int64."""
        return np.concatenate(([self.cls_token_id], kmer_ids, [self.eos_token_id])).astype(np.int64)

    def pad(self, rows: Sequence[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad id rows into (B, L) `input_ids` and `attention_mask`; L is the longest row or `length`."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        flat = np.concatenate(rows).astype(np.int64) if len(rows) else np.zeros(0, dtype=np.int64)
        return self._pad_flat(flat, lengths, length)

    def _pad_flat(self, flat: np.ndarray, lengths: np.ndarray, length: int | None) -> tuple[np.ndarray, np.ndarray]:
        longest = int(lengths.max()) if len(lengths) else 0
        if length is None:
            length = longest
        elif longest > length:
            raise ValueError(f"input {int(lengths.argmax())} has {longest} tokens, more than max_length={length}; pass truncation=True")
        real = np.arange(length) < lengths[:, None]
        input_ids = np.full((len(lengths), length), self.pad_token_id, dtype=np.int64)
        input_ids[real] = flat
        return input_ids, real.astype(np.int64)

    # ---------------------------------------------------------------- decoding
    def convert_ids_to_tokens(self, ids):
        """Token string of one id, or a list of them for a sequence of ids."""
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token(int(ids))
        return [self._id_to_token(int(i)) for i in np.asarray(ids).reshape(-1)]

    def convert_tokens_to_ids(self, tokens):
        """Id of one token string (`<unk>` for an unknown one), or a list of them."""
        if isinstance(tokens, str):
            return self._token_to_id.get(tokens, self.unk_token_id)
        return [self._token_to_id.get(t, self.unk_token_id) for t in tokens]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Tokens joined by spaces, as the reference's `decode`."""
        tokens = self.convert_ids_to_tokens(list(np.asarray(ids).reshape(-1)))
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in SPECIAL_TOKENS]
        return " ".join(tokens)

    def _id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1}) of k={self.k}")
        return self.vocabulary[i]

    # ---------------------------------------------------------------- spec file
    def to_spec(self) -> dict:
        """The JSON spec: everything another implementation needs (documented in the README)."""
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "k": self.k,
            "alphabet": ALPHABET,
            "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
            "rules": {
                "uppercase": True,
                "replace": {"T": "U"},
                "kmer_id": "len(special_tokens) + sum(alphabet.index(c) * len(alphabet) ** (k - 1 - i))",
                "unknown_kmer": "<unk>",
                "split_on_special_tokens": True,
                "prefix": ["<cls>"],
                "suffix": ["<eos>"],
                "padding_side": "right",
                "truncation_side": "right",
            },
            "vocabulary": self.vocabulary,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON spec (atomically)."""
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_spec(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def from_spec(cls, spec: dict) -> "KmerTokenizer":
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"not a {SPEC_FORMAT} spec")
        if spec.get("version") != SPEC_VERSION:
            raise ValueError(f"tokenizer spec version {spec.get('version')!r} is not supported (expected {SPEC_VERSION})")
        tokenizer = cls(spec.get("k"))
        if spec != tokenizer.to_spec():
            raise ValueError(f"tokenizer spec for k={tokenizer.k} differs from the 3UTRBERT k-mer vocabulary and rules")
        return tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "KmerTokenizer":
        """Read a spec written by `save`."""
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from None
        try:
            return cls.from_spec(spec)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None


def short_pieces(text: str, k: int) -> list[str]:
    """The non-empty stretches between special tokens in `text` that are shorter than k: they give no k-mer and
    so vanish from the encoding (e.g. 'GGUC' before a <mask> when k=6)."""
    return [part for part in _SPECIAL_SPLIT.split(text) if part and part not in SPECIAL_TOKENS and len(part) < k]


def foreign_fraction(sequence: str) -> float:
    """The fraction of characters that are not A, C, G, U, T or N (any case)."""
    return len(_FOREIGN.findall(sequence)) / len(sequence) if sequence else 0.0


def foreign_letter(sequence: str) -> tuple[int, str] | None:
    """(position, character) of the first character that is not A, C, G, U, T or N (any case), or None."""
    found = _FOREIGN.search(sequence)
    return (found.start(), found.group()) if found else None


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"sequence {i} is {type(t).__name__}, not str")
    return texts


def _check_options(padding, truncation, max_length) -> str | None:
    """Normalise `padding` to None, "longest" or "max_length" and check the options go together."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if truncation and max_length is None:
        raise ValueError("truncation=True needs max_length")
    if padding in (False, None, "do_not_pad"):
        return None
    if padding in (True, "longest"):
        return "longest"
    if padding == "max_length":
        if max_length is None:
            raise ValueError('padding="max_length" needs max_length')
        return "max_length"
    raise ValueError(f'padding must be False, True, "longest" or "max_length", got {padding!r}')


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, end to end: the position of every item inside its group."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


@functools.cache
def _packed_to_id(k: int) -> np.ndarray:
    """Table from a k-mer packed at 3 bits a letter to its token id; any invalid letter gives <unk>."""
    digits = np.indices((8,) * k).reshape(k, -1)  # digits[j] = code of letter j, most significant first
    table = len(SPECIAL_TOKENS) + ((len(ALPHABET) ** np.arange(k - 1, -1, -1))[:, None] * digits).sum(axis=0)
    table[(digits >= len(ALPHABET)).any(axis=0)] = KmerTokenizer.unk_token_id
    return table.astype(np.int32)
