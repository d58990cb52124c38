"""3UTRBERT as a compact PyTorch module, written for export.

Parameter names follow multimolecule's `UtrBertModel` (and its MLM head), so its checkpoints load as they are.
What differs from the reference is only what makes a clean ONNX graph: positions are `arange(L)` (no CumSum),
the token-type row 0 is added directly, attention is one `scaled_dot_product_attention` call (one ONNX
`Attention` node) with a boolean mask of shape (B, 1, L, L), and the MLM projection runs only at the
positions asked for. An export may ask for plain attention instead (`SelfAttention.fused = False`: MatMul, Softmax,
MatMul), the form TensorRT before 10.14 parses.

A fine-tuned checkpoint adds one task head (multimolecule's default heads, same parameter names):
  sequence   `sequence_head` on the pooler output                      -> task_logits (B, num_labels)
  nucleotide `token_head` on k-mer rows unfolded to nucleotide rows    -> task_logits (B, L - 2 + k - 1, num_labels)
  contact    `contact_head`: outer product of k-mer rows, linear, symmetrised -> task_logits (B, L - 2, L - 2, num_labels)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


HEAD_TRANSFORMS = ("identity", "linear", "nonlinear")
# Activations a head may name (transformers' ACT2FN names) and their export-friendly equivalents.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class TaskHead:
    """A fine-tuned prediction head, as multimolecule's HeadConfig describes it (dropout is off at inference)."""

    level: str  # sequence | nucleotide | contact
    num_labels: int
    problem_type: str  # binary | multiclass | multilabel | regression
    transform: str = "identity"  # identity | linear | nonlinear (dense, transform_act, LayerNorm)
    transform_act: str | None = "gelu"
    bias: bool = True
    act: str | None = None  # applied to the decoder's output, as the reference does
    layer_norm_eps: float = 1e-12

    @property
    def module_name(self) -> str:
        """The head's parameter prefix in multimolecule checkpoints."""
        return {"sequence": "sequence_head", "nucleotide": "token_head", "contact": "contact_head"}[self.level]


@dataclass(frozen=True)
class UtrBertConfig:
    k: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pooler: bool = True
    lm_head: bool = False
    task: TaskHead | None = None

    @property
    def vocab_size(self) -> int:
        return 5**self.k + 6

    def to_dict(self) -> dict:
        return {**asdict(self), "vocab_size": self.vocab_size}


class Embeddings(nn.Module):
    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.layer_norm(x)


class SelfAttention(nn.Module):
    fused = True  # False: softmax(q k^T / sqrt(d)) v written out, for engines without ONNX's Attention operator

    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape

        def heads(t):
            return t.view(b, length, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # q is scaled before the product, as the fused kernels do, so fp16 scores stay in range
            scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-1, -2))
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            out = torch.matmul(scores.softmax(-1), v)
        return out.transpose(1, 2).reshape(b, length, hidden)


class DenseNorm(nn.Module):
    """dense -> dropout (none at inference) -> layer_norm(residual + .)"""

    def __init__(self, c: UtrBertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as the reference


class Layer(nn.Module):
    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class LmTransform(nn.Module):
    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.gelu(self.dense(x)))


class LmHead(nn.Module):
    """transform, then the word-embedding matrix (tied, not a copy) plus a bias."""

    def __init__(self, c: UtrBertConfig):
        super().__init__()
        self.transform = LmTransform(c)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        # 2-D linear exports as Gemm(transB=1) reading the embedding table itself; a 3-D one becomes
        # MatMul(x, Transpose(W)), which the exporter folds into a second, transposed copy of the table.
        h = self.transform(x)
        # The vocabulary size is spelled out, not -1: with no mask positions (B, 0) there is nothing to infer it from.
        logits = F.linear(h.reshape(-1, h.shape[-1]), word_embeddings, self.bias)
        return logits.reshape(h.shape[0], h.shape[1], word_embeddings.shape[0])


class HeadTransform(nn.Module):
    """multimolecule's head transforms: linear = dense + LayerNorm; nonlinear = dense + activation + LayerNorm."""

    def __init__(self, c: UtrBertConfig, head: TaskHead):
        super().__init__()
        self.activation = ACTIVATIONS[head.transform_act] if head.transform == "nonlinear" else None
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=head.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense(x)
        return self.layer_norm(self.activation(x) if self.activation is not None else x)


class PredictionHead(nn.Module):
    """transform -> decoder (-> activation); the contact level decodes outer products of k-mer rows."""

    def __init__(self, c: UtrBertConfig):
        super().__init__()
        head = c.task
        self.level = head.level
        if head.transform != "identity":
            self.transform = HeadTransform(c, head)
        self.decoder = nn.Linear(c.hidden_size, head.num_labels, bias=head.bias)
        self.activation = ACTIVATIONS[head.act] if head.act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "transform"):
            x = self.transform(x)
        if self.level == "contact":
            x = self._contact(x)
        else:
            x = self.decoder(x)
        return self.activation(x) if self.activation is not None else x

    def _contact(self, h: torch.Tensor) -> torch.Tensor:
        """decoder(h_i * h_j), symmetrised, without the (B, n, n, hidden) outer product: for each label l,
        sum_c h_i[c] W[l, c] h_j[c] is one (n, hidden) x (hidden, n) MatMul of h scaled by W[l]."""
        scaled = h[:, None] * self.decoder.weight[None, :, None, :]  # (B, labels, n, hidden)
        maps = torch.matmul(scaled, h[:, None].transpose(-1, -2))  # (B, labels, n, n)
        if self.decoder.bias is not None:
            maps = maps + self.decoder.bias[None, :, None, None]
        maps = maps.permute(0, 2, 3, 1)
        return (maps + maps.transpose(1, 2)) / 2


def kmer_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask -> (B, L - 2) mask of the k-mer rows (the real tokens less <cls> and <eos>)."""
    kmers = attention_mask.sum(1, keepdim=True) - 2
    return torch.arange(attention_mask.shape[1] - 2, device=attention_mask.device)[None] < kmers


def unfold_kmers(rows: torch.Tensor, kmers: torch.Tensor, k: int) -> torch.Tensor:
    """k-mer rows (B, n, H) -> nucleotide rows (B, n + k - 1, H): nucleotide j is the mean of the k-mer rows
    that cover it (k-mers j-k+1 .. j that exist), as multimolecule's `unfold_kmer_embeddings`; as one MatMul
    with an averaging matrix, so the export needs no loop. Rows past a sequence's end are zero."""
    n = rows.shape[1]
    j = torch.arange(n + k - 1, device=rows.device)[:, None]
    i = torch.arange(n, device=rows.device)[None, :]
    cover = ((i <= j) & (i > j - k))[None] & kmers[:, None, :]  # (B, n + k - 1, n)
    weights = cover.to(rows.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return torch.matmul(weights, rows)


class UtrBert(nn.Module):
    """inputs (input_ids, attention_mask[, mask_positions]) -> last_hidden_state[, pooler_output][, logits][, task_logits]"""

    def __init__(self, config: UtrBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if config.pooler else None
        self.lm_head = LmHead(config) if config.lm_head else None
        if config.task is not None:
            self.add_module(config.task.module_name, PredictionHead(config))

    @property
    def task_head(self) -> PredictionHead | None:
        return getattr(self, self.config.task.module_name) if self.config.task is not None else None

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["mask_positions"] if self.lm_head is not None else [])

    @property
    def output_names(self) -> list[str]:
        names = ["last_hidden_state"]
        if self.pooler is not None:
            names.append("pooler_output")
        if self.lm_head is not None:
            names.append("logits")
        if self.config.task is not None:
            names.append("task_logits")
        return names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor | None = None):
        keys = attention_mask.bool()[:, None, None, :]
        # (B, 1, L, L): ONNX Runtime's CPU Attention kernel refuses the broadcast (B, 1, 1, L) form.
        mask = keys.expand(-1, 1, input_ids.shape[1], -1)
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        outputs = [x]
        if self.pooler is not None:
            outputs.append(self.pooler(x))
        if self.lm_head is not None:
            # (B, P) positions -> (B, P, V) logits: the vocabulary projection only where it is asked for.
            index = mask_positions[:, :, None].expand(-1, -1, x.shape[-1])
            outputs.append(self.lm_head(torch.gather(x, 1, index), self.embeddings.word_embeddings.weight))
        if self.config.task is not None:
            outputs.append(self._task(x, outputs[1] if self.pooler is not None else None, attention_mask))
        return tuple(outputs)

    def _task(self, x: torch.Tensor, pooled: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
        level = self.config.task.level
        if level == "sequence":
            return self.task_head(pooled)
        kmers = kmer_mask(attention_mask)
        rows = x[:, 1:-1] * kmers[..., None].to(x.dtype)  # k-mer rows; <cls>, <eos> and padding dropped
        if level == "nucleotide":
            return self.task_head(unfold_kmers(rows, kmers, self.config.k))
        return self.task_head(rows)

    def init_weights(self, seed: int) -> "UtrBert":
        """BERT's initialisation (normal(0, initializer_range), zero biases, unit LayerNorm), from a seed."""
        generator = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if "layer_norm.weight" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)
            self.embeddings.word_embeddings.weight[0].zero_()  # <pad>, as nn.Embedding(padding_idx=0) does
        return self
