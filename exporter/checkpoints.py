"""Checkpoint loaders: every source becomes one `Checkpoint` (config + state dict named as `network.UtrBert`).

Sources: a multimolecule folder, a hub id (through huggingface_hub, so its cache and offline settings hold),
an original 3UTRBERT (DNABERT-style `BertForMaskedLM`) folder, or seeded random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utr_runtime.bundle import MAX_LABELS, NOT_PRINTABLE, PROBLEM_TYPES, RESERVED_LABELS, sha256_file
from utr_runtime.errors import UtrError
from utr_runtime.tokenizer import KmerTokenizer

from .network import ACTIVATIONS, HEAD_TRANSFORMS, TaskHead, UtrBert, UtrBertConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# multimolecule's conversion of original checkpoints draws the rows new to its vocabulary from this seed.
ORIGINAL_NEW_ROWS_SEED = 1016


class CheckpointError(UtrError):
    """A checkpoint that cannot be read or does not fit the request."""


@dataclass
class Checkpoint:
    config: UtrBertConfig
    state_dict: dict[str, torch.Tensor]
    source: dict  # how it was obtained: kind, path/id/seed, sha256 of the weight file
    trained: bool
    ignored_keys: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # names of a task head's outputs, in order
    negative_label: str | None = None  # a binary head's name for "not the label", where the config gives one

    def module(self) -> UtrBert:
        model = UtrBert(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def weights_sha256(self) -> str:
        """Checksum of the weights as exported (names, dtypes, shapes, values), whatever file they came from."""
        digest = hashlib.sha256()
        for name in sorted(self.state_dict):
            t = self.state_dict[name].detach().to(torch.float32).contiguous()
            digest.update(f"{name}:{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- sources
def from_random_init(k: int, seed: int, num_hidden_layers: int = 12, **sizes) -> Checkpoint:
    """The exact architecture (pooler and MLM head included) with seeded random weights: untrained."""
    config = UtrBertConfig(k=k, num_hidden_layers=num_hidden_layers, pooler=True, lm_head=True, **sizes)
    model = UtrBert(config).init_weights(seed)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return Checkpoint(config, state, {"kind": "random-init", "seed": seed}, trained=False)


def from_folder(path: str | os.PathLike, k: int | None = None, problem_type: str | None = None) -> Checkpoint:
    """A multimolecule checkpoint folder, or an original 3UTRBERT one (told apart by its weight names).

    `problem_type` fills in a task head's problem type where the checkpoint's config does not state it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a multimolecule or original 3UTRBERT checkpoint)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    weights_file, state = _read_weights(folder)
    source = {"kind": "folder", "path": str(folder.resolve()), "file": weights_file.name, "sha256": sha256_file(weights_file)}
    if any(key.startswith("bert.") for key in state):
        source["format"] = "original-3utrbert"
        return _from_original(config, state, folder, k, source)
    source["format"] = "multimolecule"
    return _from_multimolecule(config, state, k, source, problem_type)


def from_hub(repo_id: str, k: int | None = None, revision: str | None = None, problem_type: str | None = None) -> Checkpoint:
    """A hub checkpoint through huggingface_hub (its cache, HF_HUB_OFFLINE and token settings apply)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("--hub needs huggingface_hub: pip install 'utrexport[export]'") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", *WEIGHT_FILES, "vocab.txt"])
    except Exception as e:  # network, offline-cache miss, missing repo: all end the same way for the user
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the model hub ({type(e).__name__}: {_first_sentence(e)}); "
            "use --checkpoint DIR for a local folder, or --random-init for untrained weights"
        ) from None
    checkpoint = from_folder(folder, k, problem_type)
    checkpoint.source.update(kind="hub", id=repo_id, revision=revision or "main")
    return checkpoint


# ---------------------------------------------------------------------------------------------- formats
def _from_multimolecule(config: dict, state: dict, k: int | None, source: dict, problem_type: str | None = None) -> Checkpoint:
    k_file = config.get("nmers")
    if k_file is None:
        raise CheckpointError(f"{source['path']}: config.json has no 'nmers' (is this a 3UTRBERT checkpoint?)")
    _check_k(k_file, k, source)
    for key, expected in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if config.get(key, expected) != expected:
            raise CheckpointError(f"{source['path']}: {key}={config[key]!r} is not supported (3UTRBERT uses {expected!r})")
    state = {key.removeprefix("model."): value for key, value in state.items()}
    head = {key: value for key, value in state.items() if key.startswith("lm_head.")}
    head_levels = {level for level, prefix in TASK_PREFIXES.items() if any(key.startswith(prefix) for key in state)}
    if len(head_levels) > 1:
        raise CheckpointError(f"{source['path']}: more than one task head ({', '.join(sorted(head_levels))}); export one head per bundle")
    task = _task_head(config, head_levels.pop(), source, problem_type) if head_levels else None
    kept = ("embeddings.", "encoder.", "pooler.", "lm_head.") + ((task.module_name + ".",) if task else ())
    ignored = sorted(key for key in state if not key.startswith(kept))
    if "lm_head.decoder.weight" in head:
        if not torch.equal(head["lm_head.decoder.weight"], state["embeddings.word_embeddings.weight"]):
            raise CheckpointError(f"{source['path']}: the MLM decoder is not tied to the word embeddings; untied heads are not supported")
    wanted = {key: value for key, value in state.items() if key not in ignored and not key.startswith("lm_head.decoder.")}
    wanted = {key: value for key, value in wanted.items() if not key.endswith("position_ids")}
    cfg = _config_from(config, k_file, pooler="pooler.dense.weight" in wanted, lm_head="lm_head.bias" in wanted, task=task,
                       state=wanted, where=source["path"])
    if task is not None and task.level == "sequence" and not cfg.pooler:
        raise CheckpointError(f"{source['path']}: a sequence head reads the pooler output, but the checkpoint has no pooler")
    checkpoint = Checkpoint(cfg, wanted, source, trained=True, ignored_keys=ignored)
    if task is not None:
        checkpoint.labels, checkpoint.negative_label = _label_names(config, task, source["path"])
    return _checked(checkpoint)


# A task head's parameter prefix in multimolecule checkpoints, by level (UtrBertFor{Sequence,Token,Contact}Prediction).
TASK_PREFIXES = {"sequence": "sequence_head.", "nucleotide": "token_head.", "contact": "contact_head."}


def _task_head(config: dict, level: str, source: dict, problem_type: str | None) -> TaskHead:
    """The head's settings as multimolecule resolves them (config.head, else the model config), checked."""
    where = source["path"]
    head = config.get("head") or {}
    if not isinstance(head, dict):
        raise CheckpointError(f"{where}: config 'head' is not an object")

    def setting(name, default=None):
        value = head.get(name)
        return value if value is not None else config.get(name, default)

    num_labels = head.get("num_labels") or config.get("num_labels", 1)
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or not 1 <= num_labels <= MAX_LABELS:
        raise CheckpointError(f"{where}: num_labels must be an integer from 1 to {MAX_LABELS}, got {num_labels!r}")
    stated = setting("problem_type")
    if stated is not None and problem_type is not None and stated != problem_type:
        raise CheckpointError(f"{where}: the checkpoint's problem_type is {stated!r}, not {problem_type!r}")
    kind = stated or problem_type
    if kind is None:
        raise CheckpointError(f"{where}: the {level} head's config states no problem_type; pass --problem-type ({', '.join(PROBLEM_TYPES)})")
    if kind not in PROBLEM_TYPES:
        raise CheckpointError(f"{where}: problem_type {kind!r} is not supported ({', '.join(PROBLEM_TYPES)})")
    if kind == "multiclass" and num_labels < 2:
        raise CheckpointError(f"{where}: a multiclass head needs num_labels >= 2, got {num_labels}")
    transform = head.get("transform") or "identity"
    if transform not in HEAD_TRANSFORMS:
        raise CheckpointError(f"{where}: head transform {transform!r} is not supported ({', '.join(HEAD_TRANSFORMS)})")
    transform_act = head.get("transform_act", "gelu")
    if transform == "nonlinear" and transform_act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: head transform_act {transform_act!r} is not supported ({', '.join(ACTIVATIONS)})")
    act = head.get("act")
    if act is not None and act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: head act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    default_input = {"sequence": "pooler_output"}.get(level, "last_hidden_state")
    if head.get("output_name") not in (None, default_input):
        raise CheckpointError(f"{where}: a {level} head reading {head['output_name']!r} is not supported (only {default_input!r})")
    if head.get("hidden_size") not in (None, config.get("hidden_size", 768)):
        raise CheckpointError(f"{where}: head hidden_size {head['hidden_size']} differs from the model's {config.get('hidden_size')}")
    return TaskHead(
        level=level,
        num_labels=num_labels,
        problem_type=kind,
        transform=transform,
        transform_act=transform_act if transform == "nonlinear" else None,
        bias=bool(head.get("bias", True)),
        act=act,
        layer_norm_eps=_eps(head.get("layer_norm_eps"), where),
    )


def _eps(value, where: str) -> float:
    if value is None:
        return 1e-12
    if type(value) not in (int, float) or not 0 < value < 1:
        raise CheckpointError(f"{where}: head layer_norm_eps must be a number between 0 and 1, not {value!r}")
    return float(value)


def _label_names(config: dict, task: TaskHead, where: str = "checkpoint") -> tuple[list[str], str | None]:
    """Output names from id2label; a one-output binary head with two names is the probability of the second.
    Names become column headers, so they must be distinct, printable, and not `id` or `label` (columns of their own)."""
    id2label = config.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise CheckpointError(f"{where}: config id2label must map label ids to names")
    names = {}
    for i, name in id2label.items():
        if not (isinstance(i, int) or (isinstance(i, str) and i.isdigit())):
            raise CheckpointError(f"{where}: config id2label has the key {i!r}; keys are label ids 0, 1, ...")
        if not isinstance(name, str) or not name or NOT_PRINTABLE.search(name) or name in RESERVED_LABELS:
            raise CheckpointError(f"{where}: label name {name!r} cannot name a column: names are printable text without tabs or "
                                  "line breaks, and not 'id' or 'label'")
        names[int(i)] = name
    if len(set(names.values())) < len(names):
        raise CheckpointError(f"{where}: config id2label names two labels alike; each column needs a name of its own")
    if task.problem_type == "binary" and task.num_labels == 1 and sorted(names) == [0, 1]:
        return [names[1]], names[0]
    if sorted(names) == list(range(task.num_labels)):
        return [names[i] for i in range(task.num_labels)], None
    return [f"LABEL_{i}" for i in range(task.num_labels)], None


def _from_original(config: dict, state: dict, folder: Path, k: int | None, source: dict) -> Checkpoint:
    vocab_file = folder / "vocab.txt"
    if not vocab_file.is_file():
        raise CheckpointError(f"{folder}: an original 3UTRBERT checkpoint needs its vocab.txt")
    old_vocab = [_original_token(t) for t in vocab_file.read_text().splitlines() if t.strip()]
    kmer_lengths = {len(t) for t in old_vocab if not t.startswith("<")}
    if len(kmer_lengths) != 1:
        raise CheckpointError(f"{vocab_file}: cannot tell k from the vocabulary")
    k_file = kmer_lengths.pop()
    _check_k(k_file, k, source)
    renamed = {}
    for key, value in state.items():
        key = key.replace("LayerNorm", "layer_norm").replace("gamma", "weight").replace("beta", "bias")
        if key.startswith("bert."):
            renamed[key[len("bert.") :]] = value
        elif key.startswith("cls.predictions."):
            renamed["lm_head." + key[len("cls.predictions.") :]] = value
    if "embeddings.word_embeddings.weight" not in renamed:
        raise CheckpointError(f"{folder}: no bert.embeddings.word_embeddings.weight in the weights")
    lm_head = "lm_head.bias" in renamed or "lm_head.decoder.bias" in renamed
    cfg = _config_from(config, k_file, pooler="pooler.dense.weight" in renamed, lm_head=lm_head, state=renamed, where=str(folder))
    new_vocab = KmerTokenizer(k_file).vocabulary
    std = cfg.initializer_range
    # The decoder's bias is the one the MLM used (BERT ties lm_head.bias to it); take it as multimolecule does.
    old_bias = renamed.get("lm_head.decoder.bias", renamed.get("lm_head.bias"))
    words, bias = _remap_rows(renamed["embeddings.word_embeddings.weight"], old_bias, old_vocab, new_vocab, std)
    renamed["embeddings.word_embeddings.weight"] = words
    if bias is not None:
        renamed["lm_head.bias"] = bias
    renamed = {key: value for key, value in renamed.items() if not key.startswith("lm_head.decoder") and not key.endswith("position_ids")}
    return _checked(Checkpoint(cfg, renamed, source, trained=True))


def _original_token(token: str) -> str:
    token = token.strip()
    if token.startswith("["):
        token = {"[SEP]": "<eos>"}.get(token, token.lower().replace("[", "<").replace("]", ">"))
    return token.replace("T", "U")


def _remap_rows(words: torch.Tensor, bias: torch.Tensor | None, old_vocab: list[str], new_vocab: list[str], std: float):
    """Move rows to the 5-letter vocabulary; new rows (k-mers with N, <null>) drawn as multimolecule draws them."""
    torch.manual_seed(ORIGINAL_NEW_ROWS_SEED)
    new_words = torch.normal(size=(len(new_vocab), words.shape[1]), mean=0.0, std=std, dtype=words.dtype)
    new_bias = None if bias is None else bias.new_zeros(len(new_vocab))
    index = {token: i for i, token in enumerate(new_vocab)}
    for old_i, token in enumerate(old_vocab):
        if token not in index:
            raise CheckpointError(f"original vocabulary token {token!r} has no place in the 3UTRBERT vocabulary")
        new_words[index[token]] = words[old_i]
        if new_bias is not None:
            new_bias[index[token]] = bias[old_i]
    return new_words, new_bias


# ---------------------------------------------------------------------------------------------- helpers
SIZE_LIMITS = {  # generous bounds: a config outside them is a wrong or hostile file, not a model
    "hidden_size": (1, 16384), "num_hidden_layers": (1, 256), "num_attention_heads": (1, 1024),
    "intermediate_size": (1, 65536), "max_position_embeddings": (3, 65536), "type_vocab_size": (1, 64),
}
DEFAULTS = {key: UtrBertConfig.__dataclass_fields__[key].default for key in SIZE_LIMITS}  # the module's own (BERT-base)


def _config_from(config: dict, k: int, pooler: bool, lm_head: bool, task: TaskHead | None = None, state: dict | None = None,
                 where: str = "checkpoint") -> UtrBertConfig:
    """The architecture the config states, checked for types and ranges, and against the weights' shapes before
    anything of that size is allocated."""
    sizes = {}
    for key, (low, high) in SIZE_LIMITS.items():
        value = config.get(key, DEFAULTS[key])
        if type(value) is not int or not low <= value <= high:
            raise CheckpointError(f"{where}: config {key} must be an integer from {low} to {high}, not {value!r}")
        sizes[key] = value
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise CheckpointError(f"{where}: hidden_size {sizes['hidden_size']} is not divisible by num_attention_heads {sizes['num_attention_heads']}")
    numbers = {}
    for key, default in (("layer_norm_eps", 1e-12), ("initializer_range", 0.02)):
        value = config.get(key, default)
        if type(value) not in (int, float) or not 0 < value < 1:
            raise CheckpointError(f"{where}: config {key} must be a number between 0 and 1, not {value!r}")
        numbers[key] = float(value)
    if state is not None:
        _check_sizes_against_weights(sizes, state, where)
    return UtrBertConfig(k=k, **sizes, **numbers, pooler=pooler, lm_head=lm_head, task=task)


def _check_sizes_against_weights(sizes: dict, state: dict, where: str) -> None:
    layers = {key.split(".")[2] for key in state if key.startswith("encoder.layer.")}
    found = {
        "hidden_size": _dim(state, "embeddings.word_embeddings.weight", 1),
        "max_position_embeddings": _dim(state, "embeddings.position_embeddings.weight", 0),
        "intermediate_size": _dim(state, "encoder.layer.0.intermediate.dense.weight", 0),
        "num_hidden_layers": len(layers) or None,
    }
    for key, value in found.items():
        if value is not None and value != sizes[key]:
            raise CheckpointError(f"{where}: config {key} is {sizes[key]} but the weights have {value}")


def _dim(state: dict, key: str, axis: int) -> int | None:
    tensor = state.get(key)
    return int(tensor.shape[axis]) if tensor is not None and tensor.dim() > axis else None


def _checked(checkpoint: Checkpoint) -> Checkpoint:
    """The weights must be exactly those of the architecture the config describes."""
    expected = UtrBert(checkpoint.config).state_dict()
    missing = sorted(set(expected) - set(checkpoint.state_dict))
    unexpected = sorted(set(checkpoint.state_dict) - set(expected))
    where = checkpoint.source.get("path", checkpoint.source.get("id", "checkpoint"))
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"{where}: weights do not match a 3UTRBERT of this config: {detail.strip()}")
    for name, tensor in expected.items():
        if tuple(checkpoint.state_dict[name].shape) != tuple(tensor.shape):
            got = tuple(checkpoint.state_dict[name].shape)
            raise CheckpointError(f"{where}: {name} has shape {got}, expected {tuple(tensor.shape)}")
    checkpoint.state_dict = {name: t.to(torch.float32) for name, t in checkpoint.state_dict.items()}
    broken = next((name for name, t in checkpoint.state_dict.items() if not torch.isfinite(t).all()), None)
    if broken:  # every output would be inf or NaN, and int8 calibration cannot bin them
        raise CheckpointError(f"{where}: {broken} holds inf or NaN values; a model with non-finite weights cannot be exported")
    return checkpoint


def _first_sentence(error: Exception, limit: int = 300) -> str:
    """An exception's first line, whole where it fits, else cut at a word with an ellipsis (never mid-word)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0].strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _check_k(k_file: int, k: int | None, source: dict) -> None:
    if k is not None and int(k_file) != int(k):
        where = source.get("path", "checkpoint")
        raise CheckpointError(f"{where} is a {k_file}-mer checkpoint but --kmer {k} was asked for")


def _read_weights(folder: Path) -> tuple[Path, dict]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return path, load_file(str(path))
                return path, torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {_first_sentence(e)})") from None
    raise CheckpointError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")
