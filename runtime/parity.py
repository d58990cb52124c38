"""The comparator: reference arrays vs candidate arrays under a tolerance, as a table of results.

`utrexport verify`, the build, the tests and the benchmark all judge parity here and nowhere else.
Tolerances live next to the precision they belong to (`TOLERANCES`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Bounds a candidate output must meet; None means not checked."""

    max_abs: float | None = None  # largest |candidate - reference| over real (non-padding) positions
    mean_cosine: float | None = None  # lowest allowed mean cosine similarity of the vectors
    min_cosine: float | None = None  # lowest allowed cosine of any single vector
    top1: float | None = None  # lowest allowed top-1 agreement (logits only)
    # task heads (task_logits): judged on decisions, after the problem type's output function
    prob_max_abs: float | None = None  # largest |p - p_ref| of probabilities; of values / max|ref| for regression
    agreement: float | None = None  # lowest fraction of decisive reference labels (see `labels`) reproduced

    def describe(self) -> str:
        parts = []
        if self.max_abs is not None:
            parts.append(f"abs<={self.max_abs:g}")
        if self.mean_cosine is not None:
            parts.append(f"cos>={self.mean_cosine:g}")
        if self.min_cosine is not None:
            parts.append(f"min cos>={self.min_cosine:g}")
        if self.top1 is not None:
            parts.append(f"top1>={self.top1:g}")
        if self.prob_max_abs is not None:
            parts.append(f"prob abs<={self.prob_max_abs:g}")
        if self.agreement is not None:
            parts.append(f"labels>={self.agreement:g}")
        return ", ".join(parts)


# fp32: the exported graph must reproduce PyTorch's float32 arithmetic (issue figure: 1e-4 on real positions).
# fp16: half-precision matmuls with fp32 LayerNorm/softmax/residuals: direction kept to 1e-4.
# int8: quantised matmuls: per-vector direction within 2% worst case, 1% on average. Fill-mask top-1 agreement is
#       reported but not gated: where the reference's top tokens are near-ties (any untrained model, and uncertain
#       positions of a trained one) a tiny logit change flips the order without the model being any worse.
# task_logits: fp32 as every fp32 output. fp16 and int8 are judged as decisions: probabilities (values for
#       regression, relative to the reference's largest) within 0.01 / 0.05, and every decisive label kept (a label
#       whose reference probability is within DECISIVE_MARGIN of the threshold may flip: it was a coin toss).
DECISIVE_MARGIN = 0.1
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {
        "last_hidden_state": Tolerance(max_abs=1e-4),
        "mean_pooled": Tolerance(max_abs=1e-4),
        "pooler_output": Tolerance(max_abs=1e-4),
        "logits": Tolerance(max_abs=1e-4),
        "task_logits": Tolerance(max_abs=1e-4),
    },
    "fp16": {
        "last_hidden_state": Tolerance(mean_cosine=0.9999),
        "mean_pooled": Tolerance(mean_cosine=0.9999),
        "pooler_output": Tolerance(mean_cosine=0.9999),
        "logits": Tolerance(mean_cosine=0.9999),
        "task_logits": Tolerance(prob_max_abs=0.01, agreement=1.0),
    },
    "int8": {
        "last_hidden_state": Tolerance(mean_cosine=0.99, min_cosine=0.98),
        "mean_pooled": Tolerance(mean_cosine=0.99, min_cosine=0.98),
        "pooler_output": Tolerance(mean_cosine=0.99, min_cosine=0.98),
        "logits": Tolerance(mean_cosine=0.99, min_cosine=0.98),  # top-1 agreement is reported, not gated (below)
        "task_logits": Tolerance(prob_max_abs=0.05, agreement=1.0),
    },
}


# bf16 (the fp32 model with bf16 inference, OpenVINO): as near-lossless as fp16 must be.
TOLERANCES["bf16"] = TOLERANCES["fp16"]
# fp32 TensorRT engines built with TF32 (utrexport engine --tf32): fp32 range, 10 mantissa bits in the matmuls, as fp16.
TOLERANCES["tf32"] = TOLERANCES["fp16"]


@dataclass(frozen=True)
class Comparison:
    output: str
    max_abs: float
    mean_cosine: float
    min_cosine: float
    top1: float | None
    tolerance: Tolerance
    passed: bool
    prob_max_abs: float | None = None
    agreement: float | None = None

    def as_dict(self) -> dict:
        row = asdict(self)
        row["tolerance"] = self.tolerance.describe()
        return row


def vectors(name: str, array: np.ndarray, attention_mask: np.ndarray | None, task: dict | None = None) -> np.ndarray:
    """The vectors of an output that count: token rows at real positions, a task head's rows within each
    sequence (nucleotides, or k-mer pairs of a contact map), or every row of a pooled/logit output."""
    array = np.asarray(array, dtype=np.float64)
    if attention_mask is not None and name == "last_hidden_state":
        return array[np.asarray(attention_mask).astype(bool)]
    if attention_mask is not None and name == "task_logits" and task and task["level"] != "sequence":
        return array[task_rows(task, array.shape, np.asarray(attention_mask))]
    return array.reshape(-1, array.shape[-1])


def task_rows(task: dict, shape: tuple, attention_mask: np.ndarray) -> np.ndarray:
    """Boolean mask over task_logits' leading axes: the nucleotides (n + k - 1) or k-mer pairs (n x n) of each row."""
    kmers = attention_mask.sum(1) - 2
    if task["level"] == "nucleotide":
        return np.arange(shape[1])[None] < (kmers + task["k"] - 1)[:, None]
    inside = np.arange(shape[1])[None] < kmers[:, None]
    return inside[:, :, None] & inside[:, None, :]


def task_outputs(problem_type: str, logits: np.ndarray) -> np.ndarray:
    """What a task head's raw outputs mean: probabilities (sigmoid for binary and multilabel, softmax over the
    labels for multiclass) or values (regression), float32, same shape."""
    logits = np.asarray(logits, dtype=np.float64)
    if problem_type in ("binary", "multilabel"):
        out = 0.5 * (1.0 + np.tanh(0.5 * logits))  # the logistic function without overflow
    elif problem_type == "multiclass":
        out = np.exp(logits - logits.max(-1, keepdims=True))
        out /= out.sum(-1, keepdims=True)
    else:
        out = logits
    return out.astype(np.float32)


def labels(problem_type: str, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(decisions, margins) from task_outputs: the class (multiclass) or each label's yes/no (binary,
    multilabel), and how far each decision is from flipping (probability gap to the runner-up or to 0.5).
    None for regression, which decides nothing."""
    if problem_type == "regression":
        return None
    if problem_type == "multiclass":
        top2 = np.sort(outputs, axis=-1)[..., -2:]
        return outputs.argmax(-1), top2[..., 1] - top2[..., 0]
    return outputs >= 0.5, np.abs(outputs - 0.5)


def _decisions(problem_type: str, ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(probability max abs, agreement on decisive labels) of two sets of task_logits rows."""
    p_ref, p_cand = task_outputs(problem_type, ref), task_outputs(problem_type, cand)
    error = float(np.abs(p_cand.astype(np.float64) - p_ref).max()) if ref.size else 0.0
    judged = labels(problem_type, p_ref)
    if judged is None:
        return error / max(float(np.abs(p_ref).max()), 1e-12), None
    decided, margin = judged
    decisive = margin > DECISIVE_MARGIN
    agree = (decided == labels(problem_type, p_cand)[0])[decisive]
    return error, float(agree.mean()) if agree.size else 1.0


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (1 where both rows are zero)."""
    dot = (a * b).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 1.0)


def compare(reference: dict, candidate: dict, tolerances: dict[str, Tolerance], attention_mask=None, task: dict | None = None) -> list[Comparison]:
    """One Comparison per output named in both `reference` and `tolerances`; a missing candidate output fails.

    `task` (the manifest's task record: level, problem_type, k) says how to read `task_logits`.
    """
    rows = []
    for name, tolerance in tolerances.items():
        if name not in reference:
            continue
        ref = vectors(name, reference[name], attention_mask, task)
        if name not in candidate or np.shape(candidate[name]) != np.shape(reference[name]):
            rows.append(Comparison(name, float("inf"), 0.0, 0.0, None, tolerance, False))
            continue
        cand = vectors(name, candidate[name], attention_mask, task)
        finite = bool(np.isfinite(cand).all())
        max_abs = float(np.abs(cand - ref).max()) if finite and ref.size else (0.0 if finite else float("inf"))
        cos = cosine(ref, cand) if finite else np.zeros(1)
        top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean()) if name == "logits" else None
        prob_error, agreement = _decisions(task["problem_type"], ref, cand) if name == "task_logits" and task and finite else (None, None)
        measured = Comparison(name, max_abs, float(cos.mean()), float(cos.min()), top1, tolerance, False, prob_error, agreement)
        rows.append(replace(measured, passed=finite and _within(tolerance, measured)))
    return rows


def _within(t: Tolerance, c: Comparison) -> bool:
    def at_most(bound, value):
        return bound is None or (value is not None and value <= bound)

    def at_least(bound, value):
        return bound is None or value is None or value >= bound

    return (
        at_most(t.max_abs, c.max_abs)
        and at_least(t.mean_cosine, c.mean_cosine)
        and at_least(t.min_cosine, c.min_cosine)
        and at_least(t.top1, c.top1)
        and at_most(t.prob_max_abs, c.prob_max_abs)
        and at_least(t.agreement, c.agreement)
    )


def format_table(rows: list[dict]) -> str:
    """Rows of `Comparison.as_dict()` (plus a 'precision' key) as an aligned text table."""
    header = ("precision", "engine", "output", "max abs diff", "mean cosine", "min cosine", "top-1", "prob abs", "labels", "tolerance", "result")
    lines = [header]

    def optional(value, form):
        return "-" if value is None else format(value, form)

    for r in rows:
        lines.append(
            (r.get("precision", ""), r.get("engine", ""), r["output"], f"{r['max_abs']:.3e}", f"{r['mean_cosine']:.6f}", f"{r['min_cosine']:.6f}",
             optional(r.get("top1"), ".4f"), optional(r.get("prob_max_abs"), ".2e"), optional(r.get("agreement"), ".4f"),
             r["tolerance"], "PASS" if r["passed"] else "FAIL")
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
