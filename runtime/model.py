"""The user API: `load(bundle)` -> Model with `embed`, `predict`, `forward` and `fill_mask`."""

from __future__ import annotations

import os
import re
import warnings
from typing import Callable, Sequence

import numpy as np

from .bundle import Bundle
from .engines import choose_engine, open_bundle_model
from .errors import BundleError, InputError, InputWarning, UntrainedModelWarning, UtrError
from .parity import task_outputs
from .tokenizer import foreign_fraction, foreign_letter, short_pieces
from .windows import Window, plan_batches, split_windows

POOLINGS = ("mean", "cls", "tokens")
AGGREGATES = ("mean", "max", None)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # tab, newline aside: a sequence never holds them
MOST_FOREIGN = 0.5  # a "sequence" mostly of other characters is a wrong file or column, not RNA with a few IUPAC codes
NO_TASK = "this bundle has no task head; build it from a fine-tuned checkpoint (UtrBertFor{Sequence,Token,Contact}Prediction)"


def load(bundle: str | os.PathLike | Bundle, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
         engine: str = "auto") -> "Model":
    """Open a bundle (format version and checksums checked) and the engine for one of its precisions.

    precision: "fp32", "fp16", "int8", or "bf16" (the fp32 model in bf16; OpenVINO on CPUs with native bf16).
    device: "cpu" or "cuda" (ONNX Runtime), or "tensorrt" (a TensorRT engine built into the bundle).
    engine: "auto" (OpenVINO on the CPU where installed, else ONNX Runtime), "onnxruntime" or "openvino".
    int8 means the bundle's symmetric int8 file on TensorRT, its u8s8 CPU file on ONNX Runtime's CPU, and on OpenVINO
    its NNCF model where the build kept one (else the symmetric file), with bf16 float parts where the CPU has bf16.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    if precision == "bf16" and device != "cpu":
        raise UtrError(f"bf16 is a CPU precision here (OpenVINO on CPUs with native bf16); on device {device!r} use fp16")
    if device == "tensorrt":
        from .engines.tensorrt import open_engine_runner

        runner = open_engine_runner(bundle, precision)
    else:
        engine = choose_engine(engine, device, precision)
        name = bundle.model_name(precision, device, engine)
        runner = open_bundle_model(bundle, name, precision, device, threads, engine, label=str(bundle.path / name))
    if not bundle.trained:
        warnings.warn(UntrainedModelWarning.sentence(bundle.path), UntrainedModelWarning, stacklevel=2)
    return Model(bundle, runner, precision, device)


class Model:
    def __init__(self, bundle: Bundle, runner, precision: str, device: str):
        self.bundle = bundle
        self.runner = runner
        self.precision = precision
        self.device = device
        self.tokenizer = bundle.tokenizer()
        self.k = bundle.k
        self.max_tokens = bundle.max_tokens
        self.hidden_size = int(bundle.manifest["model"]["config"]["hidden_size"])
        _check_outputs(bundle, getattr(runner, "output_shapes", {}))

    def __repr__(self) -> str:
        task = f", task={self.task['level']}/{self.task['problem_type']}" if self.task else ""
        untrained = "" if self.bundle.trained else ", UNTRAINED"
        return f"Model(k={self.k}{task}{untrained}, precision={self.precision!r}, engine={self.engine!r}, device={self.device!r}, bundle={str(self.bundle.path)!r})"

    @property
    def engine(self) -> str:
        return getattr(self.runner, "engine", "tensorrt")

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask=None, mask_positions=None) -> dict[str, np.ndarray]:
        """Raw outputs for (B, L) token ids: last_hidden_state, pooler_output (if any), logits (if positions given)."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or 0 in input_ids.shape or not np.issubdtype(input_ids.dtype, np.integer):
            raise InputError(f"input_ids must be a non-empty (batch, length) integer array, got shape {input_ids.shape} {input_ids.dtype}")
        if input_ids.shape[1] > self.max_tokens:
            raise InputError(f"{input_ids.shape[1]} tokens is more than this model's maximum of {self.max_tokens}; embed() and predict() "
                             "split long sequences into windows, but a single forward pass (and fill-mask) cannot")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.tokenizer.vocab_size):
            raise InputError(f"token ids must lie in 0..{self.tokenizer.vocab_size - 1} for k={self.k}")
        if attention_mask is None:
            attention_mask = (input_ids != self.tokenizer.pad_token_id).astype(np.int64)
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask must have the shape of input_ids {input_ids.shape}, got {attention_mask.shape}")
        if not np.isin(attention_mask, (0, 1)).all() or attention_mask.dtype.kind not in "biu":
            raise InputError("attention_mask must hold 0 and 1 only (integers or booleans)")
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if "mask_positions" in self.runner.input_names:
            # No positions, (B, 0): the LM head then does no work (docs/spec.md, "Model inputs and outputs").
            positions = np.zeros((len(input_ids), 0), np.int64) if mask_positions is None else np.asarray(mask_positions)
            if (positions.ndim != 2 or len(positions) != len(input_ids) or positions.dtype.kind not in "iu"
                    or positions.min(initial=0) < 0 or positions.max(initial=0) >= input_ids.shape[1]):
                raise InputError("mask_positions must be a (batch, positions) integer array of indices into each row")
            positions = positions.astype(np.int64)
            feeds["mask_positions"] = positions
        elif mask_positions is not None:
            raise InputError("this bundle's model has no MLM head (no logits); build it from a MaskedLM/PreTraining checkpoint")
        outputs = self.runner.run(feeds)
        if mask_positions is None:
            outputs.pop("logits", None)
        return outputs

    # ------------------------------------------------------------------------------------------ embed
    def embed(
        self,
        sequences: str | Sequence[str],
        pooling: str = "mean",
        batch_size: int = 64,
        max_batch_tokens: int = 8192,
        overlap: int = 64,
        truncation: bool = False,
        strict: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ):
        """One vector per sequence, in input order: (N, hidden) for "mean"/"cls", a list of (n_kmers, hidden) for "tokens".

        mean:   average of the sequence's k-mer rows (no <cls>/<eos>/padding), each k-mer counted once
        cls:    the <cls> row; for a long sequence, the windows' <cls> rows weighted by the k-mers each owns
        tokens: one row per k-mer (L - k + 1 rows), long sequences stitched from overlapping windows
        Sequences longer than one window (max_tokens - 2 k-mers) are split into windows overlapping by `overlap`
        k-mers (or cut to one window with truncation=True). Characters outside A,C,G,U,T,N make every k-mer that
        holds them <unk>; strict=True refuses such sequences instead.
        """
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        single = isinstance(sequences, str)
        sequences = [sequences] if single else list(sequences)
        kmers = self._kmers(sequences, strict)
        window = self._window(overlap)
        windows = [
            w
            for i, ids in enumerate(kmers)
            for w in (split_windows(i, min(len(ids), window), window, 0) if truncation else split_windows(i, len(ids), window, overlap))
        ]
        sums = np.zeros((len(sequences), self.hidden_size), np.float64)
        counts = np.zeros(len(sequences), np.int64)
        pieces: dict[int, list[tuple[int, np.ndarray]]] = {i: [] for i in range(len(sequences))}
        for w, out in self._window_outputs(windows, kmers, ("last_hidden_state",), batch_size, max_batch_tokens, progress):
            rows = out["last_hidden_state"]
            owned = rows[1 + w.own_start - w.start : 1 + w.own_end - w.start]  # row 0 is <cls>
            n_owned = w.own_end - w.own_start
            if pooling == "mean":
                sums[w.sequence] += owned.sum(0, dtype=np.float64)
            elif pooling == "cls":
                sums[w.sequence] += n_owned * rows[0].astype(np.float64)
            else:
                pieces[w.sequence].append((w.own_start, owned))
            counts[w.sequence] += n_owned
        out = _stitch(pieces) if pooling == "tokens" else (sums / counts[:, None]).astype(np.float32)
        return out[0] if single else out

    def problems(self, sequences: Sequence[str], strict: bool = False, max_kmers: int | None = None) -> list[str | None]:
        """Why each sequence cannot be run as given, or None: a control character, mostly characters other than
        A, C, G, U, T, N (over half of at least 20: not a sequence), no k-mer (empty, or shorter than k), any such
        character (strict), more than `max_kmers` k-mers (contact maps: one window)."""
        return judge(self.tokenizer, sequences, strict, max_kmers)[1]

    def _kmers(self, sequences: list[str], strict: bool, max_kmers: int | None = None) -> list[np.ndarray]:
        rows, problems = judge(self.tokenizer, sequences, strict, max_kmers)
        for i, problem in enumerate(problems):
            if problem:
                raise InputError(problem, index=i)
        return [row[1:-1] for row in rows]

    @property
    def max_kmers(self) -> int | None:
        """The most k-mers predict() takes in one sequence (contact maps cover one window), or None for no limit."""
        return self.max_tokens - 2 if self.task and self.task["level"] == "contact" else None

    def _window(self, overlap: int) -> int:
        """The k-mers of one window, which `overlap` must leave room in."""
        window = self.max_tokens - 2
        if not isinstance(overlap, (int, np.integer)) or isinstance(overlap, bool) or not 0 <= overlap < window:
            raise InputError(f"overlap must be an integer from 0 to {window - 1} k-mers (a window holds {window}), not {overlap!r}")
        return window

    def _window_outputs(self, windows: list[Window], kmers: Sequence, names: tuple[str, ...], batch_size: int, max_batch_tokens: int,
                        progress=None):
        """(window, {name: its rows of that output, unpadded}) for every window, run in length-sorted batches.

        kmers: per sequence, its k-mer ids (anything that slices to an id array: utr_runtime.variants passes edited
        views of one reference).

        progress, if given, is called after each batch with the number of rows the batch finished (the rows its
        windows own: k-mers, or nucleotides for nucleotide-level predictions) and of sequences it completed (their
        last window ran), so the calls add up to the totals.
        """
        left = np.bincount([w.sequence for w in windows]) if windows else np.zeros(0, np.int64)  # windows to run per sequence
        for batch in plan_batches([w.length + 2 for w in windows], max_batch_tokens, batch_size):
            chosen = [windows[j] for j in batch]
            yield from zip(chosen, self._run_windows(chosen, kmers, names))
            if progress:
                np.subtract.at(left, [w.sequence for w in chosen], 1)
                completed = len({w.sequence for w in chosen if left[w.sequence] == 0})
                progress(sum(w.own_end - w.own_start for w in chosen), completed)

    def _run_windows(self, windows: list[Window], kmers: Sequence, names: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
        """The named outputs' rows for each window, without padding: last_hidden_state (<cls>, k-mers, <eos>), or
        task_logits (the sequence's row, its nucleotides, or its k-mer pairs). One forward pass for all of them."""
        tok = self.tokenizer
        rows = [tok.with_specials(kmers[w.sequence][w.start : w.end]) for w in windows]
        input_ids, attention_mask = tok.pad(rows)
        outputs = self.forward(input_ids, attention_mask)
        return [{name: self._unpadded(name, outputs[name][j], w, len(r)) for name in names} for j, (w, r) in enumerate(zip(windows, rows))]

    def _unpadded(self, name: str, out: np.ndarray, w: Window, tokens: int) -> np.ndarray:
        level = self.task["level"] if name == "task_logits" else None
        if level == "sequence":
            return out
        if level == "nucleotide":
            return out[: w.length + self.k - 1]
        if level == "contact":
            return out[: w.length, : w.length]
        return out[:tokens]

    # ------------------------------------------------------------------------------------------ predict
    @property
    def task(self) -> dict | None:
        """The task head's record from the manifest (level, problem_type, num_labels, labels, ...), or None."""
        return self.bundle.task

    @property
    def labels(self) -> list[str]:
        """Names of the task head's outputs, in the order of predict()'s last axis."""
        return list(self._require_task()["labels"])

    def _require_task(self) -> dict:
        if self.task is None:
            raise UtrError(NO_TASK)
        return self.task

    def predict(
        self,
        sequences: str | Sequence[str],
        logits: bool = False,
        aggregate: str | None = "mean",
        batch_size: int = 64,
        max_batch_tokens: int = 8192,
        overlap: int = 64,
        strict: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ):
        """The task head's predictions, float32, last axis = `labels`: probabilities (sigmoid for binary and
        multilabel, softmax for multiclass) or values (regression); `logits=True` gives the raw head outputs.

        sequence level:   (N, num_labels). A sequence longer than one window is predicted per window; `aggregate`
                          combines them: "mean" (weighted by the k-mers each window owns), "max", or None for a
                          list of (windows, num_labels) arrays, windows in sequence order.
        nucleotide level: a list of (len(sequence), num_labels) arrays, one row per nucleotide; long sequences are
                          stitched from windows, each nucleotide taken from the window where it sits farther from the edge.
        contact level:    a list of (n, n, num_labels) arrays over the n k-mers; a sequence must fit one window.
        """
        task = self._require_task()
        if aggregate not in AGGREGATES:
            raise InputError(f"aggregate must be one of {', '.join(map(str, AGGREGATES))}, got {aggregate!r}")
        single = isinstance(sequences, str)
        sequences = [sequences] if single else list(sequences)
        kmers = self._kmers(sequences, strict, self.max_kmers)
        level, window = task["level"], self._window(overlap)
        extent = self.k - 1 if level == "nucleotide" else 0
        windows = [w for i, ids in enumerate(kmers) for w in split_windows(i, len(ids), window, overlap, extent)]
        finish = (lambda x: x.astype(np.float32)) if logits else (lambda x: task_outputs(task["problem_type"], x))
        pieces: dict[int, list[tuple[int, np.ndarray]]] = {i: [] for i in range(len(sequences))}
        weights: dict[int, list[int]] = {i: [] for i in range(len(sequences))}
        for w, out in self._window_outputs(windows, kmers, ("task_logits",), batch_size, max_batch_tokens, progress):
            rows = out["task_logits"]
            if level == "nucleotide":
                rows = rows[w.own_start - w.start : w.own_end - w.start]
            pieces[w.sequence].append((w.own_start, finish(rows)))
            weights[w.sequence].append(w.own_end - w.own_start)
        if level == "sequence":
            out = _aggregate(pieces, weights, aggregate)
        elif level == "nucleotide":
            out = _stitch(pieces)
        else:
            out = [pieces[i][0][1] for i in range(len(sequences))]
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------ fill-mask
    def fill_mask(self, text: str | Sequence[str], top_k: int = 5):
        """Top-k predictions for each <mask> in the text, in the format of the transformers fill-mask pipeline.

        One mask: a list of {score, token, token_str, sequence}; several: one such list per mask. A list of
        texts gives a list of those answers.
        """
        if not isinstance(text, str):
            return [self.fill_mask(t, top_k) for t in text]
        if "logits" not in self.bundle.output_names:
            raise UtrError("this bundle's model has no MLM head; build it from a MaskedLM/PreTraining checkpoint for fill-mask")
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        tok = self.tokenizer
        dropped = short_pieces(text, self.k)
        if dropped:
            warnings.warn(f"{', '.join(map(repr, dropped))} {'is' if len(dropped) == 1 else 'are'} shorter than k={self.k} and "
                          f"give{'s' if len(dropped) == 1 else ''} no {self.k}-mer: left out of the input", InputWarning, stacklevel=2)
        ids = tok.encode(text)
        masked = np.flatnonzero(ids == tok.mask_token_id)
        if not len(masked):
            mask = tok.special_tokens[tok.mask_token_id]
            other = re.search(re.escape(mask), text, re.IGNORECASE)
            raise InputError(f"no {mask} token in the text" + (f": {other.group()!r} is not it, the mask token is written {mask}, in lower case"
                                                                 if other else ""))
        # Every token of the text is attended to, a <pad> written in it too: the reference tokenizer gives the text a
        # mask of ones (docs/spec.md section 7); a mask of 0 is for the padding a batch adds.
        logits = self.forward(ids[None], np.ones_like(ids)[None], masked[None])["logits"][0].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        single = len(masked) == 1
        answers = []
        for i, position in enumerate(masked):
            row = []
            for token in top[i]:
                filled = ids.copy()
                filled[position] = token
                row.append(
                    {
                        "score": float(probs[i, token]),
                        "token": int(token),
                        "token_str": tok.decode([token]),
                        "sequence": tok.decode(filled[filled != tok.pad_token_id], skip_special_tokens=single),
                    }
                )
            answers.append(row)
        return answers[0] if single else answers


TASK_RANKS = {"sequence": 2, "nucleotide": 3, "contact": 4}  # task_logits: (B, labels), (B, n, labels), (B, n, n, labels)


def _check_outputs(bundle: Bundle, shapes: dict[str, tuple]) -> None:
    """The manifest's hidden size and task record against the model's own output shapes (dims the engine reports as
    fixed): a record that disagrees would write wrong columns or shapes without a word."""
    hidden = shapes.get("last_hidden_state", (None,))[-1]
    if hidden is not None and hidden != int(bundle.manifest["model"]["config"]["hidden_size"]):
        raise BundleError(f"{bundle.path}: the manifest says hidden_size {bundle.manifest['model']['config']['hidden_size']}, the model gives {hidden}")
    task = bundle.task
    if not task:
        return
    shape = shapes.get("task_logits")
    if shape is None and shapes:
        raise BundleError(f"{bundle.path}: the manifest describes a task head, but the model has no task_logits output")
    if shape is not None and (len(shape) != TASK_RANKS[task["level"]] or shape[-1] not in (None, task["num_labels"])):
        raise BundleError(f"{bundle.path}: the manifest's task ({task['level']} level, {task['num_labels']} labels) does not match the "
                          f"model's task_logits ({', '.join('?' if d is None else str(d) for d in shape)})")


def judge(tokenizer, sequences: Sequence[str], strict: bool = False, max_kmers: int | None = None) -> tuple[list[np.ndarray], list[str | None]]:
    """Each sequence's token ids and why it cannot be run, or None (docs/spec.md section 3), tokenizing once.
    Needs only the tokenizer: readers that run apart from the model (a cluster's) judge records alike."""
    for i, seq in enumerate(sequences):
        if not isinstance(seq, str):
            raise TypeError(f"sequence {i} is {type(seq).__name__}, not str")
    rows = tokenizer.encode_batch(list(sequences))
    found = []
    for seq, row in zip(sequences, rows):
        bad = foreign_letter(seq) if strict else None
        n = len(row) - 2
        control = _CONTROL.search(seq)
        foreign = foreign_fraction(seq) if len(seq) >= 20 else 0.0
        if control:
            found.append(f"control character {control.group()!r} at position {control.start() + 1}: not a sequence (a binary file?)")
        elif foreign > MOST_FOREIGN:
            found.append(f"{foreign:.0%} of its characters are not A, C, G, U, T or N: not a nucleotide sequence")
        elif bad:
            found.append(f"character {bad[1]!r} at position {bad[0] + 1} is not A, C, G, U, T or N (strict mode)")
        elif n < 1:
            found.append(f"no {tokenizer.k}-mer: the sequence is empty or shorter than k={tokenizer.k}")
        elif max_kmers is not None and n > max_kmers:
            found.append(f"{n} {tokenizer.k}-mers; a contact map covers one window, at most {max_kmers} {tokenizer.k}-mers ({max_kmers + tokenizer.k - 1} nt)")
        else:
            found.append(None)
    return rows, found


def _stitch(pieces: dict[int, list[tuple[int, np.ndarray]]]) -> list[np.ndarray]:
    """Each sequence's owned rows, concatenated in order of their first row."""
    return [np.concatenate([rows for _, rows in sorted(pieces[i], key=lambda p: p[0])]) for i in range(len(pieces))]


def _aggregate(pieces: dict[int, list[tuple[int, np.ndarray]]], weights: dict[int, list[int]], how: str | None):
    """Sequence-level outputs of each sequence's windows (in window order): the mean weighted by the k-mers each
    window owns, the max, or all of them (None)."""
    out = []
    for i in range(len(pieces)):
        order = np.argsort([start for start, _ in pieces[i]], kind="stable")
        rows = np.stack([pieces[i][j][1] for j in order])
        if how == "mean":
            w = np.asarray(weights[i], np.float64)[order]
            rows = (rows * w[:, None]).sum(0) / w.sum()
        elif how == "max":
            rows = rows.max(0)
        out.append(rows.astype(np.float32))
    return out if how is None else np.stack(out)
