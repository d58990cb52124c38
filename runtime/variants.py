"""Variant effects: how an edit of a sequence moves its embedding and its task predictions.

For each variant: the cosine distance between the reference's and the alternative's mean embeddings; for a
sequence-level task head, the probability of each label for both (`p_ref`, `p_alt`) and the 3UTRBERT paper's
scores (its code: `calculate_diff_scores.py`):

    diff  = (p_alt - p_ref) * max(p_ref, p_alt)
    logOR = log2(p_ref / (1 - p_ref)) - log2(p_alt / (1 - p_alt))

(regression heads give the values and their difference only). With a masked-LM head, `zero_shot` gives the
pretrained model's own score of a single-nucleotide substitution (docs/spec.md section 9): the probability of each
letter at the position with every k-mer covering it masked, and `llr = ln p_alt - ln p_ref`.

A substitution changes the k k-mers that hold its
position and nothing else: the windows of the sequence stay as they are, and only the windows holding a changed
k-mer are run again; the others' contributions (owned rows' sums, window probabilities) are the reference's. The
mutants' windows are batched together by the token-budget packer. An insertion or deletion moves every later k-mer
and the window plan with it: its alternative sequence is run whole.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import InputError, UtrError
from .parity import cosine, task_outputs
from .windows import Window, plan_batches, split_windows

NUCLEOTIDES = "ACGU"
EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] in logOR: a saturated sigmoid gives no infinity


@dataclass(frozen=True)
class Edit:
    position: int  # 0-based, in the sequence
    ref: str  # the reference allele as written in the sequence (upper case, T as U)
    alt: str

    @property
    def substitution(self) -> bool:
        return len(self.ref) == len(self.alt)


def normalize(allele: str) -> str:
    """An allele as the model reads it: upper case, T as U ('-' or '.' is the empty allele of VCF-less tables)."""
    allele = allele.strip().upper().replace("T", "U")
    return "" if allele in ("-", ".") else allele


def saturation(sequence: str) -> list[Edit]:
    """Every single-nucleotide substitution of a sequence: 3 per A, C, G or U (T) position, alternatives in ACGU
    order; positions holding anything else (N) are left out."""
    bases = sequence.upper().replace("T", "U")
    return [Edit(i, b, alt) for i, b in enumerate(bases) if b in NUCLEOTIDES for alt in NUCLEOTIDES if alt != b]


def check_edit(sequence: str, edit: Edit) -> str | None:
    """Why an edit cannot apply to a sequence, or None."""
    bases = sequence.upper().replace("T", "U")
    if not 0 <= edit.position < len(bases):
        return f"position {edit.position + 1} is outside the sequence (1..{len(bases)})"
    if not edit.ref and not edit.alt or edit.ref == edit.alt:
        return "the reference and alternative alleles are the same"
    if any(c not in "ACGUN" for c in edit.ref + edit.alt):
        return f"alleles must be nucleotides (A, C, G, U/T, N), got {edit.ref or '-'}>{edit.alt or '-'}"
    found = bases[edit.position : edit.position + len(edit.ref)]
    if found != edit.ref:
        return f"reference allele {edit.ref} does not match the sequence, which holds {found or '(its end)'} at position {edit.position + 1}"
    return None


def apply(sequence: str, edit: Edit) -> str:
    return sequence[: edit.position] + edit.alt + sequence[edit.position + len(edit.ref) :]


def effects(model, sequence: str, edits: Sequence[Edit], overlap: int = 64, batch_size: int = 64, max_batch_tokens: int = 8192,
            spare: bool = True, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Scores of each edit of one sequence (checked with `check_edit` first), as arrays over the edits:
    `cosine_distance` (E,), and for a sequence-level task head `p_ref` (labels,), `p_alt`, `diff`, `logOR` (E, labels).

    spare=False runs every window of every mutant (the naive way, for tests and benchmarks). progress(n) is called
    as mutants finish.
    """
    return effects_of(model, [(sequence, edits)], overlap, batch_size, max_batch_tokens, spare, progress)[0]


def effects_of(model, items: Sequence[tuple[str, Sequence[Edit]]], overlap: int = 64, batch_size: int = 64, max_batch_tokens: int = 8192,
               spare: bool = True, progress: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
    """`effects` of several (sequence, edits) at once: every reference in one run of batches, then every mutant in
    another, so that many short sequences with a few variants each (a VCF over a genome's 3'UTRs) fill batches."""
    tok, k, window = model.tokenizer, model.k, model._window(overlap)
    head = model.task is not None and model.task["level"] == "sequence"
    names = ("last_hidden_state", "task_logits") if head else ("last_hidden_state",)
    refs = [_reference_ids(tok, k, sequence, edits) for sequence, edits in items]
    reference = _contributions(model, refs, [split_windows(0, len(ids), window, overlap) for ids in refs], names, batch_size, max_batch_tokens)
    views, plans, kept = [], [], []
    for i, ((sequence, edits), ids) in enumerate(zip(items, refs)):
        for e in edits:
            if e.substitution:  # the same windows; only those holding a changed k-mer run again
                lo, hi, new = _changed_kmers(tok, sequence, e, k, len(ids))
                views.append(_Edited(ids, lo, new))
                plans.append([w for w in reference.plans[i] if w.start <= hi and w.end > lo] if spare else reference.plans[i])
                kept.append(reference.without(i, plans[-1]) if spare else None)
            else:  # every later k-mer moves, and the window plan with them: the edited sequence runs whole
                views.append(tok.encode(apply(sequence, e))[1:-1])
                if len(views[-1]) < 1:
                    raise InputError(f"{e.ref or '-'}>{e.alt or '-'} at position {e.position + 1} leaves no {k}-mer")
                plans.append(split_windows(0, len(views[-1]), window, overlap))
                kept.append(None)
    mutants = _contributions(model, views, plans, names, batch_size, max_batch_tokens, progress)
    results, j = [], 0
    for i, ((_, edits), ids) in enumerate(zip(items, refs)):
        ref_sum, ref_p = reference.totals(i)
        out = {"cosine_distance": np.zeros(len(edits))}
        alt_p = np.zeros((len(edits), model.task["num_labels"])) if head else None
        for m in range(len(edits)):
            sums, p = mutants.totals(j)
            if kept[j] is not None:  # the windows not run again are the reference's
                sums, p = sums + kept[j][0], (p + kept[j][1]) if head else None
            out["cosine_distance"][m] = 1.0 - float(cosine(ref_sum / len(ids), sums / len(views[j])))
            if head:
                alt_p[m] = p / len(views[j])
            j += 1
        if head:
            out.update(_task_scores(model.task["problem_type"], ref_p / len(ids), alt_p))
        results.append(out)
    return results


def _reference_ids(tok, k: int, sequence: str, edits: Sequence[Edit]) -> np.ndarray:
    """The k-mer ids of a sequence whose edits all apply, and whose positions are its k-mers'."""
    for edit in edits:
        problem = check_edit(sequence, edit)
        if problem:
            raise InputError(problem)
    ids = tok.encode(sequence)[1:-1]
    if len(ids) != len(sequence) - k + 1:
        raise InputError("the sequence holds special tokens or characters that upper-case to several letters: positions are ambiguous")
    return ids


def _changed_kmers(tok, sequence: str, e: Edit, k: int, n: int) -> tuple[int, int, np.ndarray]:
    """The k-mers a substitution changes, [lo, hi], and their new ids."""
    lo, hi = max(0, e.position - k + 1), min(e.position + len(e.ref) - 1, n - 1)
    piece = apply(sequence, e)[lo : hi + k]
    return lo, hi, tok.encode(piece)[1:-1]


class _Edited:
    """A reference's k-mer ids with [lo, lo + len(new)) replaced: what a window slices, without a copy per mutant."""

    def __init__(self, ids: np.ndarray, lo: int, new: np.ndarray):
        self.ids, self.lo, self.new = ids, lo, new

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, part: slice) -> np.ndarray:
        start, stop, _ = part.indices(len(self.ids))
        row = self.ids[start:stop].copy()
        a, b = max(start, self.lo), min(stop, self.lo + len(self.new))
        if a < b:
            row[a - start : b - start] = self.new[a - self.lo : b - self.lo]
        return row


class _Contributions:
    """Per window: the sum of the k-mer rows it owns (float64) and, with a task head, its probabilities times the
    rows it owns (the weights of predict's mean)."""

    def __init__(self, plans, sums, probabilities):
        self.plans, self.sums, self.probabilities = plans, sums, probabilities

    def totals(self, i: int):
        p = sum(self.probabilities[i].values()) if self.probabilities is not None else None
        return sum(self.sums[i].values()), p

    def without(self, i: int, plan) -> tuple:
        """Sums over the windows of sequence i that are not in `plan`."""
        kept = [w for w in self.plans[i] if w not in plan]
        probabilities = sum((self.probabilities[i][w] for w in kept), 0.0) if self.probabilities is not None else None
        return sum((self.sums[i][w] for w in kept), np.zeros_like(next(iter(self.sums[i].values())))), probabilities


def _contributions(model, kmers, plans, names, batch_size, max_batch_tokens, progress=None) -> _Contributions:
    windows = [Window(i, w.start, w.end, w.own_start, w.own_end) for i, plan in enumerate(plans) for w in plan]
    sums = [dict() for _ in plans]
    probabilities = [dict() for _ in plans] if len(names) > 1 else None
    left = np.array([len(p) for p in plans])
    for w, out in model._window_outputs(windows, kmers, names, batch_size, max_batch_tokens):
        key = Window(0, w.start, w.end, w.own_start, w.own_end)  # as the plan names it
        owned = out["last_hidden_state"][1 + w.own_start - w.start : 1 + w.own_end - w.start]
        sums[w.sequence][key] = owned.sum(0, dtype=np.float64)
        if probabilities is not None:
            p = task_outputs(model.task["problem_type"], out["task_logits"]).astype(np.float64)
            probabilities[w.sequence][key] = (w.own_end - w.own_start) * p
        left[w.sequence] -= 1
        if progress and left[w.sequence] == 0:
            progress(1)
    return _Contributions(plans, sums, probabilities)


def _task_scores(problem_type: str, p_ref: np.ndarray, p_alt: np.ndarray) -> dict[str, np.ndarray]:
    if problem_type == "regression":
        return {"p_ref": p_ref, "p_alt": p_alt, "diff": p_alt - p_ref}
    ref, alt = np.clip(p_ref, EPSILON, 1 - EPSILON), np.clip(p_alt, EPSILON, 1 - EPSILON)
    return {"p_ref": p_ref, "p_alt": p_alt, "diff": (p_alt - p_ref) * np.maximum(p_ref, p_alt),
            "logOR": np.log2(ref / (1 - ref)) - np.log2(alt / (1 - alt))}


# ------------------------------------------------------------------------------------------ zero-shot (masked LM)
def nucleotide_probabilities(model, items: Sequence[tuple[str, Sequence[int]]], batch_size: int = 64, max_batch_tokens: int = 8192,
                             progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """For each (sequence, positions): (len(positions), 4) probabilities of A, C, G, U at each 0-based position, from
    the masked-LM head (docs/spec.md section 9).

    One model row per position: its window (the sequence's k-mers, or `max_tokens - 2` of them around the position)
    with every k-mer covering the position masked. Each masked k-mer's distribution is restricted to the 4^k k-mers
    of A, C, G, U and renormalised; the letter it puts at the position is summed over; the masked k-mers' letter
    distributions are averaged. Two positions never share a row: every token attends to every other, so a second
    masked span would change the first's answer. Rows of many positions share each batch (the token budget).
    progress(n) is called as positions finish.
    """
    tok, k = model.tokenizer, model.k
    return _probabilities(model, [(_reference_ids(tok, k, sequence, ()), len(sequence), positions) for sequence, positions in items],
                          batch_size, max_batch_tokens, progress)


def _probabilities(model, items: Sequence[tuple[np.ndarray, int, Sequence[int]]], batch_size: int, max_batch_tokens: int,
                   progress) -> list[np.ndarray]:
    """nucleotide_probabilities of (k-mer ids, sequence length, positions) items."""
    if not model.bundle.has_lm_head:
        raise UtrError("this bundle's model has no MLM head; zero-shot scores need one (build it from a MaskedLM/PreTraining checkpoint)")
    tok, k, window = model.tokenizer, model.k, model.max_tokens - 2
    rows, where = [], []  # model rows (ids, mask positions, offsets); (item, index) of each
    for i, (ids, length, positions) in enumerate(items):
        for j, p in enumerate(positions):
            if not 0 <= p < length:
                raise InputError(f"position {p + 1} is outside the sequence (1..{length})")
            rows.append(masked_row(tok, ids, int(p), k, window))
            where.append((i, j))
    out = [np.zeros((len(positions), 4)) for _, _, positions in items]
    letters = _letter_table(k)
    for batch in plan_batches([len(r[0]) for r in rows], max_batch_tokens, batch_size):
        input_ids, attention_mask = tok.pad([rows[b][0] for b in batch])
        mask_positions = np.array([np.resize(rows[b][1], k) for b in batch])  # fewer than k near the ends: repeated, then dropped
        logits = model.forward(input_ids, attention_mask, mask_positions)["logits"]
        for b, row_logits in zip(batch, logits):
            _, positions, offsets = rows[b]
            i, j = where[b]
            out[i][j] = _letters_at(row_logits[: len(positions)], offsets, letters)
        if progress:
            progress(len(batch))
    return out


def masked_row(tok, ids: np.ndarray, p: int, k: int, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model row scoring nucleotide p: (token ids with <cls>/<eos>, indices of its masked k-mers in the row, the
    offset of p in each masked k-mer). The window is the whole sequence if it fits, else `window` k-mers centred on
    the masked ones (moved inwards at the ends)."""
    n = len(ids)
    lo, hi = max(0, p - k + 1), min(p, n - 1)
    start = 0 if n <= window else min(max(0, lo - (window - (hi - lo + 1)) // 2), n - window)
    row = tok.with_specials(ids[start : start + window].copy())
    covering = np.arange(lo, hi + 1)
    row[1 + covering - start] = tok.mask_token_id
    return row, 1 + covering - start, p - covering


@functools.cache
def _letter_table(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids of the 4^k k-mers of A, C, G, U and, per offset, a (4^k, 4) one-hot of the letter each holds there."""
    from .tokenizer import KmerTokenizer

    kmers = ["".join(c) for c in itertools.product(NUCLEOTIDES, repeat=k)]
    ids = np.array(KmerTokenizer(k).convert_tokens_to_ids(kmers), np.int64)
    codes = np.array([[NUCLEOTIDES.index(c) for c in kmer] for kmer in kmers])
    return ids, np.eye(4)[codes.T]  # (k, 4^k, 4)


def _letters_at(logits: np.ndarray, offsets: np.ndarray, letters) -> np.ndarray:
    """The mean over masked k-mers of the probability of each letter at the scored position (float64)."""
    ids, one_hot = letters
    z = logits[:, ids].astype(np.float64)
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return np.mean([q[m] @ one_hot[o] for m, o in enumerate(offsets)], axis=0)


def scorable(edit: Edit) -> bool:
    """Zero-shot scores are defined for single-nucleotide substitutions between A, C, G, U (docs/spec.md section 9)."""
    return len(edit.ref) == len(edit.alt) == 1 and edit.ref in NUCLEOTIDES and edit.alt in NUCLEOTIDES


def zero_shot(model, items: Sequence[tuple[str, Sequence[Edit]]], batch_size: int = 64, max_batch_tokens: int = 8192,
              progress: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
    """Per (sequence, edits): `p_ref`, `p_alt` (the probabilities of the alleles at the masked position) and `llr` =
    ln p_alt - ln p_ref, arrays over the edits, NaN where the score is not defined (indels, several nucleotides, N).
    One masked row per distinct position answers every alternative there (a saturation: one row per position)."""
    tok, k = model.tokenizer, model.k
    wanted = [sorted({e.position for e in edits if scorable(e)}) for _, edits in items]
    probabilities = _probabilities(model, [(_reference_ids(tok, k, sequence, edits), len(sequence), positions)  # edits checked there
                                           for (sequence, edits), positions in zip(items, wanted)], batch_size, max_batch_tokens, progress)
    results = []
    for (_, edits), positions, p in zip(items, wanted, probabilities):
        at = {position: row for position, row in zip(positions, p)}
        p_ref, p_alt = np.full(len(edits), np.nan), np.full(len(edits), np.nan)
        for m, e in enumerate(edits):
            if scorable(e):
                p_ref[m], p_alt[m] = at[e.position][NUCLEOTIDES.index(e.ref)], at[e.position][NUCLEOTIDES.index(e.alt)]
        results.append({"p_ref": p_ref, "p_alt": p_alt, "llr": np.log(p_alt) - np.log(p_ref)})
    return results
