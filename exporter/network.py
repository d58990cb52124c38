"""3UTRBERT as a compact PyTorch module, written for export.

Parameter names follow multimolecule's `UtrBertModel` (and its MLM head), so its checkpoints load as they are.
What differs from the reference is only what makes a clean ONNX graph: positions are `arange(L)` (no CumSum),
the token-type row 0 is added directly, attention is one `scaled_dot_product_attention` call (one ONNX
`Attention` node) with a boolean mask of shape (B, 1, L, L), and the MLM projection runs only at the
positions asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


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

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=mask)
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
        logits = F.linear(h.reshape(-1, h.shape[-1]), word_embeddings, self.bias)
        return logits.reshape(*h.shape[:-1], -1)


class UtrBert(nn.Module):
    """inputs (input_ids, attention_mask[, mask_positions]) -> last_hidden_state[, pooler_output][, logits]"""

    def __init__(self, config: UtrBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if config.pooler else None
        self.lm_head = LmHead(config) if config.lm_head else None

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
        return tuple(outputs)

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
