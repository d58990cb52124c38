"""PyTorch module -> ONNX (opset 23): one `Attention` node per layer, exact `Gelu`, `LayerNormalization`."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import warnings

import torch

from utr_runtime.errors import UtrError

from .network import UtrBert

OPSET = 23
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


def export_onnx(model: UtrBert, path: str | os.PathLike) -> dict:
    """Export with dynamic batch and sequence (and mask-position count); returns the graph's op counts."""
    import onnx

    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=model.config.max_position_embeddings)
    shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    if model.lm_head is not None:
        shapes["mask_positions"] = {0: batch, 1: torch.export.Dim("positions")}
    with quiet():
        program = torch.onnx.export(
            model.eval(),
            example_inputs(model),
            dynamo=True,
            opset_version=OPSET,
            optimize=True,
            input_names=model.input_names,
            output_names=model.output_names,
            dynamic_shapes=shapes,
        )
        _drop_default_attention_attributes(program.model)
        program.save(os.fspath(path))
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    if ops["Attention"] != model.config.num_hidden_layers:
        raise ExportError(f"expected one Attention node per layer ({model.config.num_hidden_layers}), got {ops['Attention']}")
    leftovers = [op for op in FORBIDDEN_OPS if ops[op]]
    if leftovers:
        raise ExportError(f"exported graph still holds {leftovers}")
    return dict(sorted(ops.items()))


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
