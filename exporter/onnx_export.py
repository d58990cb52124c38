"""PyTorch module -> ONNX: exact `Gelu`, `LayerNormalization`, and attention in one of two forms.

fused: one ONNX `Attention` node per layer (opset 23, where `Attention` arrived), read by ONNX Runtime 1.23+,
       OpenVINO 2026.1+ and TensorRT 10.14+ (as IAttention); the default.
plain: MatMul, Softmax, MatMul per layer, at opset 20 (`Gelu` arrived there): the opsets TensorRT 10.0's parser
       states (9-20), read by OpenVINO 2024.2+ and TensorRT 10.0+, which fuses the pattern into its own attention
       kernels where it can. Same operators and bit-identical outputs as at opset 23 on ONNX Runtime and OpenVINO
       (measured); the same outputs as fused; docs/attention_forms.md.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import warnings

import torch

from utr_runtime.errors import UtrError

from .network import SelfAttention, UtrBert

OPSETS = {"fused": 23, "plain": 20}  # by attention form: the lowest opset that holds its operators
ATTENTION_FORMS = {
    "fused": "one ONNX Attention node per layer (TensorRT 10.14+)",
    "plain": "MatMul, Softmax and MatMul per layer (TensorRT 10.0+, which fuses them itself)",
}
FORBIDDEN_OPS = ("CumSum",)  # left-overs of mask/position sub-graphs that the export must not produce
# Attention attributes written at their defaults that TensorRT's ONNX parser (10.14+) lists as unsupported.
ATTENTION_DEFAULTS = {"qk_matmul_output_mode": 0, "softcap": 0.0, "is_causal": 0}


class ExportError(UtrError):
    pass


def example_inputs(model: UtrBert, batch: int = 2, length: int = 16) -> tuple[torch.Tensor, ...]:
    ids = torch.full((batch, length), 6, dtype=torch.long)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    extra = (torch.zeros(batch, 2, dtype=torch.long),) if model.lm_head is not None else ()
    return (ids, mask, *extra)


def model_opset(path: str | os.PathLike) -> int:
    """The default-domain opset a model file imports."""
    import onnx

    return next(o.version for o in onnx.load(os.fspath(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(model: UtrBert, path: str | os.PathLike, attention: str = "fused") -> dict:
    """Export with dynamic batch and sequence (and mask-position count); returns the graph's op counts."""
    import onnx

    if attention not in ATTENTION_FORMS:
        raise ExportError(f"unknown attention form {attention!r}; choose from {', '.join(ATTENTION_FORMS)}")

    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=model.config.max_position_embeddings)
    shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    if model.lm_head is not None:
        shapes["mask_positions"] = {0: batch, 1: torch.export.Dim("positions")}
    with quiet(), _attention_form(model, attention):
        program = torch.onnx.export(
            model.eval(),
            example_inputs(model),
            dynamo=True,
            opset_version=OPSETS[attention],
            optimize=True,
            input_names=model.input_names,
            output_names=model.output_names,
            dynamic_shapes=shapes,
        )
        _drop_default_attention_attributes(program.model)
        program.save(os.fspath(path))
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    layers = model.config.num_hidden_layers
    expected = {"Attention": layers, "Softmax": 0} if attention == "fused" else {"Attention": 0, "Softmax": layers}
    if any(ops[op] != n for op, n in expected.items()):
        raise ExportError(f"{attention} attention: expected {expected} for {layers} layers, got {({op: ops[op] for op in expected})}")
    leftovers = [op for op in FORBIDDEN_OPS if ops[op]]
    if leftovers:
        raise ExportError(f"exported graph still holds {leftovers}")
    return dict(sorted(ops.items()))


@contextlib.contextmanager
def _attention_form(model: torch.nn.Module, attention: str):
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    for layer in layers:
        layer.fused = attention == "fused"
    try:
        yield
    finally:
        for layer in layers:
            del layer.fused  # back to the class default


def _drop_default_attention_attributes(model) -> None:
    for node in model.graph:
        if node.op_type == "Attention":
            for name, default in ATTENTION_DEFAULTS.items():
                attribute = node.attributes.get(name)
                if attribute is not None and attribute.value == default:
                    del node.attributes[name]


@contextlib.contextmanager
def quiet():
    """torch.onnx and ORT's quantizer print progress and warnings about unrelated packages: keep the CLI's output clean."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
