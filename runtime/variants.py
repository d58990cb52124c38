"""Variant effects: how an edit of a sequence moves its embedding and its task predictions.

For each variant: the cosine distance between the reference's and the alternative's mean embeddings; for a
sequence-level task head, the probability of each label for both (`p_ref`, `p_alt`) and the 3UTRBERT paper's
scores (its code: `calculate_diff_scores.py`):

    diff  = (p_alt - p_ref) * max(p_ref, p_alt)
    logOR = log2(p_ref / (1 - p_ref)) - log2(p_alt / (1 - p_alt))

(regression heads give the values and their difference only). A substitution changes the k k-mers that hold its
position and nothing else: the windows of the sequence stay as they are, and only the windows holding a changed
k-mer are run again; the others' contributions (owned rows' sums, window probabilities) are the reference's. The
mutants' windows are batched together by the token-budget packer. An insertion or deletion moves every later k-mer
and the window plan with it: its alternative sequence is run whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import InputError
from .parity import task_outputs
from .windows import Window, split_windows

NUCLEOTIDES = "ACGU"
COMPLEMENT = str.maketrans("ACGTUNacgtun", "UGCAANugcaan")
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


def reverse_complement(allele: str) -> str:
    return allele.translate(COMPLEMENT)[::-1]


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
    for edit in edits:
        problem = check_edit(sequence, edit)
        if problem:
            raise InputError(problem)
    tok, k = model.tokenizer, model.k
    ref_ids = tok.encode(sequence)[1:-1]
    if len(ref_ids) != len(sequence) - k + 1:
        raise InputError("the sequence holds special tokens or characters that upper-case to several letters: positions are ambiguous")
    window = model._window(overlap)
    head = model.task is not None and model.task["level"] == "sequence"
    names = ("last_hidden_state", "task_logits") if head else ("last_hidden_state",)
    reference = _contributions(model, [ref_ids], [split_windows(0, len(ref_ids), window, overlap)], names, batch_size, max_batch_tokens)
    ref_sum, ref_p = reference.totals(0)
    n = len(ref_ids)
    out = {"cosine_distance": np.zeros(len(edits))}
    alt_p = np.zeros((len(edits), model.task["num_labels"])) if head else None
    views, plans, base = [], [], []
    for e in edits:
        if e.substitution:
            lo, hi, new = _changed_kmers(tok, sequence, e, k, n)
            views.append(_Edited(ref_ids, lo, new))
            plan = reference.plans[0] if not spare else [w for w in reference.plans[0] if w.start <= hi and w.end > lo]
            base.append(reference.without(0, plan) if spare else None)
        else:
            alt_ids = tok.encode(apply(sequence, e))[1:-1]
            if len(alt_ids) < 1:
                raise InputError(f"{e.ref or '-'}>{e.alt or '-'} at position {e.position + 1} leaves no {k}-mer")
            views.append(alt_ids)
            plan = split_windows(0, len(alt_ids), window, overlap)
            base.append(None)
        plans.append(plan)
    mutants = _contributions(model, views, plans, names, batch_size, max_batch_tokens, progress)
    ref_mean = ref_sum / n
    for j, e in enumerate(edits):
        sums, p = mutants.totals(j)
        if base[j] is not None:  # the windows not run again are the reference's
            sums, p = sums + base[j][0], (p + base[j][1]) if head else None
        length = n if e.substitution else len(views[j])
        out["cosine_distance"][j] = 1.0 - _cosine(ref_mean, sums / length)
        if head:
            alt_p[j] = p / length
    if head:
        out.update(_task_scores(model.task["problem_type"], ref_p / n, alt_p))
    return out


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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else 1.0


def _task_scores(problem_type: str, p_ref: np.ndarray, p_alt: np.ndarray) -> dict[str, np.ndarray]:
    if problem_type == "regression":
        return {"p_ref": p_ref, "p_alt": p_alt, "diff": p_alt - p_ref}
    ref, alt = np.clip(p_ref, EPSILON, 1 - EPSILON), np.clip(p_alt, EPSILON, 1 - EPSILON)
    return {"p_ref": p_ref, "p_alt": p_alt, "diff": (p_alt - p_ref) * np.maximum(p_ref, p_alt),
            "logOR": np.log2(ref / (1 - ref)) - np.log2(alt / (1 - alt))}
