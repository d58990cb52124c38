"""Serve a bundle: what a server's model does with one batch of requests.

A server hands its model every request that arrived within the queue delay (Triton's dynamic batcher). `Service.run`
flattens the sequences of all of them into one `embed`/`predict` call, so requests share the runtime's token-budget
batches and windows, and splits the answers back per request. A request whose input cannot be run (not UTF-8, empty,
shorter than k, a line break inside, a foreign letter with strict on, an unknown parameter) or would cost more than
the server's `Limits` allow gets its own one-line error; the rest of the batch is answered and the server stays up.
`Limits.check` is also what `utrexport serve`'s front asks before it forwards a request, so the two refuse alike.

`TritonPythonModel` adapts `Service` to Triton's Python backend: the model.py that `utrexport triton` writes is
that class and nothing more. The interface (names, shapes, parameters) is `interface()`, which the repository
writer turns into config.pbtxt, so the two cannot disagree.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import UtrError

CAPABILITIES = ("embed", "predict", "fill_mask")
MAX_LENGTH = 100_000  # nt per sequence a server takes by default: longer than any human 3'UTR, far from exhausting memory
# Request parameters each capability takes: name -> allowed values (None: a positive integer); the first is the default.
PARAMETERS = {
    "embed": {"pooling": ("mean", "cls", "tokens"), "truncation": (False, True), "strict": (False, True)},
    "predict": {"logits": (False, True), "aggregate": ("mean", "max"), "strict": (False, True)},
    "fill_mask": {"top_k": None},
}
TOP_K = 5


@dataclass(frozen=True)
class Tensor:
    """One input or output of a served model: Triton's name, data type and dims (without the batch axis)."""

    name: str
    dtype: str  # Triton's TYPE_* without the prefix: FP32, INT32, STRING
    dims: tuple[int, ...]


def interface(capability: str, hidden_size: int, task: dict | None) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of the model serving `capability` (dims per sequence; -1 varies with the request)."""
    if capability == "embed":  # pooling "tokens" answers `tokens` and `length` instead of `embedding`
        return [Tensor("sequence", "STRING", (1,))], [Tensor("embedding", "FP32", (hidden_size,)), Tensor("tokens", "FP32", (-1, hidden_size)),
                                                       Tensor("length", "INT32", (1,))]
    if capability == "predict":
        labels = int(task["num_labels"])
        if task["level"] == "sequence":
            return [Tensor("sequence", "STRING", (1,))], [Tensor("predictions", "FP32", (labels,))]
        dims = (-1, labels) if task["level"] == "nucleotide" else (-1, -1, labels)
        return [Tensor("sequence", "STRING", (1,))], [Tensor("predictions", "FP32", dims), Tensor("length", "INT32", (1,))]
    if capability == "fill_mask":
        return [Tensor("text", "STRING", (1,))], [Tensor("scores", "FP32", (-1, -1)), Tensor("token_ids", "INT32", (-1, -1)),
                                                   Tensor("tokens", "STRING", (-1, -1)), Tensor("sequences", "STRING", (-1, -1)),
                                                   Tensor("num_masks", "INT32", (1,))]
    raise UtrError(f"unknown capability {capability!r}; choose one of {', '.join(CAPABILITIES)}")


def capabilities(task: dict | None, has_lm_head: bool) -> list[str]:
    """What a bundle can serve: embeddings always, predictions with a task head, fill-mask with an MLM head."""
    return ["embed"] + (["predict"] if task else []) + (["fill_mask"] if has_lm_head else [])


class RequestError(UtrError):
    """What is wrong with one request: it alone is answered with this message (HTTP 400; `status` 413 for a request
    over a size limit; `internal`: the server's fault, such as an engine failure, HTTP 500)."""

    def __init__(self, message: str, internal: bool = False, status: int = 400):
        super().__init__(message)
        self.internal, self.status = internal, 500 if internal else status


@dataclass(frozen=True)
class Limits:
    """What one request may cost, so that no small request makes a huge answer or a long run. Each limit is a flag
    of `utrexport triton` and `serve` (the name with dashes), named in the error that refuses a request over it."""

    max_length: int = MAX_LENGTH  # nt in one sequence (400: that sequence cannot be run here)
    max_sequences: int = 64  # sequences (or fill-mask texts) in one request; Triton's max_batch_size (413)
    max_request_nt: int = 200_000  # nt in all the sequences of one request: the compute one request may ask for (413)
    max_token_rows: int = 8_192  # rows of a tokens-pooling answer, sequences x the longest one's k-mers (413): 25 MB of float32 at 768
    max_fill_mask_answers: int = 1_000  # masks x top_k over a request's texts: each guess carries its whole text (413)

    def check(self, capability: str, texts: Sequence[str], options: dict, k: int) -> RequestError | None:
        """Why this request is over a limit or cannot be read as sequences, or None. Cheap: counts, no tokenizing."""
        if len(texts) > self.max_sequences:
            return self._over("max_sequences", f"{len(texts):,} sequences")
        for j, text in enumerate(texts):
            if len(text) > self.max_length:
                return RequestError(f"sequence {j}: {len(text):,} characters, more than this server's max_length of {self.max_length:,} "
                                    "(--max-length raises it)")
            line_break = _LINE_BREAK.search(text) if capability != "fill_mask" else None
            if line_break:
                return RequestError(f"sequence {j}: a line break at position {line_break.start() + 1}: send each sequence "
                                    "as one string without line breaks (one FASTA record's lines joined)")
        total = sum(map(len, texts))
        if total > self.max_request_nt:
            return self._over("max_request_nt", f"{total:,} nt")
        if options.get("pooling") == "tokens" and len(texts) * max(len(t) - k + 1 for t in texts) > self.max_token_rows:
            return self._over("max_token_rows", f"a tokens answer of {len(texts):,} x {max(len(t) for t in texts) - k + 1:,} rows")
        if capability == "fill_mask":
            answers = sum(t.lower().count("<mask>") for t in texts) * options.get("top_k", TOP_K)
            if answers > self.max_fill_mask_answers:
                return self._over("max_fill_mask_answers", f"{answers:,} fill-mask answers (masks x top_k)")
        return None

    def _over(self, name: str, what: str) -> RequestError:
        return RequestError(f"{what} in one request, more than this server's {name} of {getattr(self, name):,} "
                            f"(--{name.replace('_', '-')} raises it)", status=413)


_LINE_BREAK = re.compile(r"[\r\n\v\f\x85\u2028\u2029]")


def decode(texts: Sequence[Any]) -> list[str]:
    """A request's sequences as text (bytes as UTF-8): what the models and `utrexport serve`'s front both read."""
    decoded = []
    for j, text in enumerate(texts):
        try:
            decoded.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        except UnicodeDecodeError as e:
            raise RequestError(f"sequence {j}: not UTF-8 text (byte {e.start})") from None
    return decoded


class Service:
    """One capability of a loaded model, answering batches of requests: `run([(texts, parameters), ...])`."""

    def __init__(self, model, capability: str, limits: Limits = Limits()):
        if capability not in capabilities(model.task, model.bundle.has_lm_head):
            raise UtrError(f"this bundle cannot serve {capability!r}: it serves {', '.join(capabilities(model.task, model.bundle.has_lm_head))}")
        self.model, self.capability, self.limits = model, capability, limits

    def run(self, requests: Sequence[tuple[Sequence[Any], dict]]) -> list[dict[str, np.ndarray] | RequestError]:
        """For each (texts, parameters) request, its outputs ((n, ...) arrays, n = len(texts)) or its error."""
        answers: list[dict[str, np.ndarray] | RequestError | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[str]]]] = {}  # requests with the same options run as one call
        for i, (texts, parameters) in enumerate(requests):
            try:
                options = self._options(parameters)
                groups.setdefault(tuple(sorted(options.items())), []).append((i, self._texts(texts, options)))
            except RequestError as e:
                answers[i] = e
        for options, members in groups.items():
            try:
                results = self._call([t for _, texts in members for t in texts], dict(options))
            except Exception as e:  # noqa: BLE001 -- an engine's failure fails the requests of this call, never the server
                message = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
                results = [RequestError(message if isinstance(e, UtrError) else f"the engine failed: {message}", internal=True)] * \
                    sum(len(texts) for _, texts in members)
            start = 0
            for i, texts in members:
                answers[i] = self._pack(results[start : start + len(texts)])
                start += len(texts)
        return answers

    def _options(self, parameters: dict) -> dict:
        allowed = PARAMETERS[self.capability]
        unknown = sorted(set(parameters) - set(allowed))
        if unknown:
            raise RequestError(f"unknown parameter {unknown[0]!r}; {self.capability} takes {', '.join(allowed)}")
        options = {}
        for name, values in allowed.items():
            value = parameters.get(name, TOP_K if values is None else values[0])
            if values is None:
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.model.tokenizer.vocab_size:
                    raise RequestError(f"parameter {name} must be an integer from 1 to {self.model.tokenizer.vocab_size}, got {value!r}")
            else:
                if isinstance(values[0], bool) and value in ("true", "false"):  # KServe parameters may carry booleans as text
                    value = value == "true"
                if value not in values or type(value) is not type(values[0]):
                    raise RequestError(f"parameter {name} must be one of {', '.join(json.dumps(v) for v in values)}, got {json.dumps(value)}")
            options[name] = value
        return options

    def _texts(self, texts: Sequence[Any], options: dict) -> list[str]:
        """The request's sequences as text, each checked as the runtime would (fill-mask texts: when run)."""
        if not len(texts):
            raise RequestError("no sequences in the request")
        decoded = decode(texts)
        over = self.limits.check(self.capability, decoded, options, self.model.k)
        if over:
            raise over
        if self.capability != "fill_mask":
            problem = next(((j, p) for j, p in enumerate(self.model.problems(decoded, options["strict"], self.model.max_kmers)) if p), None)
            if problem:
                raise RequestError(f"sequence {problem[0]}: {problem[1]}")
        return decoded

    def _call(self, texts: list[str], options: dict) -> list:
        """One result per text: the runtime's answer for it, or a RequestError (fill-mask runs text by text)."""
        if self.capability == "embed":
            return list(self.model.embed(texts, **options))
        if self.capability == "predict":
            return list(self.model.predict(texts, **options))
        results = []
        for text in texts:
            try:
                answer = self.model.fill_mask(text, top_k=options["top_k"])
                results.append(answer if answer and isinstance(answer[0], list) else [answer])
            except UtrError as e:
                results.append(RequestError(str(e)))
        return results

    def _pack(self, results: list) -> dict[str, np.ndarray] | RequestError:
        """One request's results as its output arrays, padded where sequences differ in length."""
        failed = next(((j, r) for j, r in enumerate(results) if isinstance(r, RequestError)), None)
        if failed:
            j, error = failed
            return error if len(results) == 1 or error.internal else RequestError(f"sequence {j}: {error}")
        if self.capability == "fill_mask":
            return _pack_fill_mask(results)
        name = "embedding" if self.capability == "embed" else "predictions"
        if results[0].ndim == 1:  # one row per sequence
            return {name: np.stack(results).astype(np.float32)}
        # Rows per sequence (k-mers, nucleotides, k-mer pairs): zero-padded to the request's longest, with the lengths.
        padded = np.zeros((len(results),) + tuple(max(r.shape[a] for r in results) for a in range(results[0].ndim)), np.float32)
        for j, r in enumerate(results):
            padded[(j,) + tuple(slice(0, n) for n in r.shape)] = r
        return {"tokens" if self.capability == "embed" else name: padded, "length": np.array([[len(r)] for r in results], np.int32)}


def _pack_fill_mask(answers: list[list[list[dict]]]) -> dict[str, np.ndarray]:
    """Fill-mask answers (per text: per mask: top_k guesses) as (n, masks, top_k) arrays; a text with fewer masks
    than the request's most is padded with score NaN, token id -1 and empty strings."""
    masks, top_k = max(len(a) for a in answers), len(answers[0][0])
    out = {"scores": np.full((len(answers), masks, top_k), np.nan, np.float32), "token_ids": np.full((len(answers), masks, top_k), -1, np.int32),
           "tokens": np.full((len(answers), masks, top_k), b"", object), "sequences": np.full((len(answers), masks, top_k), b"", object),
           "num_masks": np.array([[len(a)] for a in answers], np.int32)}
    for j, answer in enumerate(answers):
        for m, guesses in enumerate(answer):
            for g, guess in enumerate(guesses):
                out["scores"][j, m, g] = guess["score"]
                out["token_ids"][j, m, g] = guess["token"]
                out["tokens"][j, m, g] = guess["token_str"].encode()
                out["sequences"][j, m, g] = guess["sequence"].encode()
    return out


class TritonPythonModel:
    """Triton's Python backend model (the repository's model.py): one instance loads the bundle once.

    Model parameters (config.pbtxt): capability, bundle (a folder beside model.py), precision, engine, device,
    threads, and the `Limits` (max_length, ...). A KIND_GPU instance sees only its own GPU (CUDA_VISIBLE_DEVICES, set before any engine starts).
    """

    def initialize(self, args: dict) -> None:
        import warnings

        import triton_python_backend_utils as pb

        from .model import load

        self.pb = pb
        config = json.loads(args["model_config"])
        parameters = {name: p["string_value"] for name, p in config.get("parameters", {}).items()}
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        if args.get("model_instance_kind") == "GPU":
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
            threads = int(parameters.get("threads") or 0) or None
        else:  # instances are processes: by default each takes its share of the cores, not all of them
            threads = int(parameters.get("threads") or 0) or max(1, (os.cpu_count() or 1) // instances)
        here = os.path.join(args["model_repository"], args["model_version"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load(os.path.join(here, parameters.get("bundle", "bundle")), precision=parameters.get("precision", "fp32"),
                         device=parameters.get("device", "cpu"), threads=threads, engine=parameters.get("engine", "auto"))
        for warning in caught:
            pb.Logger.log_warn(f"{args['model_name']}: {warning.message}")
        limits = Limits(**{name: int(parameters[name]) for name in Limits.__dataclass_fields__ if parameters.get(name)})
        self.service = Service(model, parameters["capability"], limits)
        self.input = interface(self.service.capability, model.hidden_size, model.task)[0][0].name
        pb.Logger.log_info(f"{args['model_instance_name']}: {model!r}, {threads or 'default'} threads")

    def execute(self, requests):
        pb = self.pb
        # A request whose client has gone (the front cancels it when its client hangs up) is not computed.
        cancelled = [request.is_cancelled() for request in requests]
        live = [request for request, gone in zip(requests, cancelled) if not gone]
        answers = iter(self._answer(live))
        return [pb.InferenceResponse(error=pb.TritonError("the client cancelled the request", pb.TritonError.CANCELLED)) if gone
                else next(answers) for gone in cancelled]

    def _answer(self, requests):
        pb = self.pb
        batch = []
        for request in requests:
            texts = pb.get_input_tensor_by_name(request, self.input).as_numpy().reshape(-1)
            try:
                parameters = json.loads(request.parameters() or "{}")
            except ValueError:
                parameters = {}
            batch.append((list(texts), parameters))
        responses = []
        for answer in self.service.run(batch):
            if isinstance(answer, RequestError):
                code = pb.TritonError.INTERNAL if answer.internal else pb.TritonError.INVALID_ARG
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(answer), code)))
            else:
                responses.append(pb.InferenceResponse([pb.Tensor(name, array) for name, array in answer.items()]))
        return responses
