"""TensorRT readiness, checked without a GPU or TensorRT: would TensorRT's ONNX parser take this model?

Every node must be an operator, with input types and attributes, that the parser supports, and Q/DQ must
follow TensorRT's explicit-quantization rules. The table below is TensorRT 10.15's ONNX operator support
matrix (onnx-tensorrt docs/operators.md), restricted to the operators an exporter graph can contain; an
operator missing from it is reported, so a graph that grows a new operator is caught here first.

Which TensorRT a ready model needs (`minimum_tensorrt`): the newest of 10.0 (the oldest TensorRT the builder and
runner target: strongly typed networks and the Python API they call, checked by `make tensorrt-api`) and the
versions whose parser first reads the model's operators: `Gelu` (opset 20) from 10.0, `Attention` (as IAttention)
from 10.14; every other operator here is in the matrix of 8.6 already (onnx-tensorrt's operator matrices of 8.6,
10.0, 10.1 and 10.15).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

OLDEST_TENSORRT = "10.0"
OPERATOR_SINCE = {"Gelu": "10.0", "Attention": "10.14"}  # operators TensorRT's parser read later than 8.6

_F = ("FP32", "FP16", "BF16")
_I = ("INT32", "INT64")
SUPPORTED_TYPES: dict[str, tuple[str, ...]] = {
    "Add": _F + _I, "Sub": _F + _I, "Mul": _F + _I, "Div": _F + _I, "Equal": _F + _I, "Where": _F + _I + ("BOOL",),
    "Attention": _F + ("BOOL",),  # IAttention takes float Q/K/V only (no INT8/FP8 inputs); BOOL: the mask
    "Cast": _F + _I + ("UINT8", "BOOL"), "Concat": _F + _I + ("BOOL",), "Constant": _F + _I + ("BOOL",),
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"), "QuantizeLinear": _F,
    "Expand": _F + _I + ("BOOL",), "Gather": _F + _I + ("BOOL",), "GatherElements": _F + _I + ("BOOL",),
    "Gelu": _F + ("INT8",) + _I, "Gemm": _F, "MatMul": _F, "LayerNormalization": _F, "Tanh": _F,
    "Range": _F + _I, "Reshape": _F + _I + ("BOOL",), "Shape": _F + _I + ("BOOL",), "Slice": _F + _I + ("BOOL",),
    "Squeeze": _F + _I + ("BOOL",), "Unsqueeze": _F + _I + ("BOOL",), "Transpose": _F + _I + ("BOOL",),
    "Identity": _F + _I + ("BOOL",), "Softmax": _F, "Erf": _F, "Sqrt": _F, "Pow": _F + _I,
    "ReduceMean": _F + _I, "Not": ("BOOL",), "And": ("BOOL",), "Or": ("BOOL",),
}
ONNX_TYPES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL", 17: "FP8", 23: "FP4", 22: "INT4"}
# Attributes onnx-tensorrt's Attention importer reads past without applying: a non-default value changes the result.
ATTENTION_IGNORED_ATTRIBUTES = ("qk_matmul_output_mode", "softcap")


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"{self.op} node {self.node!r}: {self.problem}"


def check_model(path: str | os.PathLike) -> list[Finding]:
    """Everything in the model that TensorRT's ONNX parser would refuse; an empty list means ready."""
    return readiness(path)[0]


def readiness(path: str | os.PathLike) -> tuple[list[Finding], str]:
    """check_model's findings and the oldest TensorRT that builds the model, from one read of the file."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(os.fspath(path))).graph
    return _findings(graph), minimum_tensorrt({node.op_type for node in graph.node})


def _findings(graph) -> list[Finding]:
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    types, ranks = {}, {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        types[value.name] = ONNX_TYPES.get(tensor.elem_type, f"onnx type {tensor.elem_type}")
        if tensor.HasField("shape"):
            ranks[value.name] = len(tensor.shape.dim)
    for t in graph.initializer:
        types[t.name] = ONNX_TYPES.get(t.data_type, f"onnx type {t.data_type}")
        ranks[t.name] = len(t.dims)
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    findings = []
    for node in graph.node:
        def problem(text: str) -> None:
            findings.append(Finding(node.name, node.op_type, text))

        if node.domain not in ("", "ai.onnx"):
            problem(f"custom domain {node.domain!r}")
            continue
        allowed = SUPPORTED_TYPES.get(node.op_type)
        if allowed is None:
            problem("operator not in TensorRT's ONNX support matrix")
            continue
        checked_inputs = node.input[:1] if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Gather", "GatherElements", "Range", "Reshape", "Expand", "Slice", "Squeeze", "Unsqueeze") else node.input
        for name in checked_inputs:
            if name and types.get(name) and types[name] not in allowed:
                problem(f"input {name!r} is {types[name]}, TensorRT supports {', '.join(allowed)}")
        if node.op_type == "Attention":
            findings += _check_attention(node, ranks, types)
        elif node.op_type == "LayerNormalization" and any(node.output[1:]):
            problem("only the first output (Y) is supported")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            findings += _check_qdq(node, constants, consumers)
    return findings


def minimum_tensorrt(ops: set[str]) -> str:
    """The oldest TensorRT that builds a ready model holding these operators."""
    return max([OLDEST_TENSORRT] + [OPERATOR_SINCE[op] for op in ops if op in OPERATOR_SINCE], key=version_tuple)


def version_tuple(text: str) -> tuple[int, int]:
    """'10.14.1.48.post1' -> (10, 14)"""
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _check_attention(node, ranks, types) -> list[Finding]:
    """onnx-tensorrt's Attention importer (TensorRT 10.14+): 4-D Q/K/V, or 3-D with q_num_heads/kv_num_heads; a mask
    of rank <= 4 (broadcast), bool or of Q's float type, not together with is_causal; no KV cache."""
    out = []

    def problem(text):
        out.append(Finding(node.name, "Attention", text))

    attributes = {a.name: a for a in node.attribute}
    if len([i for i in node.input if i]) > 4:
        problem("past_key/past_value/nonpad_kv_seqlen inputs are unsupported")
    if len([o for o in node.output if o]) > 1:
        problem("present_key/present_value/qk_matmul_output outputs are unsupported")
    heads_given = "q_num_heads" in attributes and "kv_num_heads" in attributes
    for name, role in zip(node.input[:3], ("Q", "K", "V")):
        rank = ranks.get(name)
        if rank is not None and not (rank == 4 or (rank == 3 and heads_given)):
            problem(f"{role} must be 4-D, or 3-D with q_num_heads and kv_num_heads, is {rank}-D")
    if len(node.input) > 3 and node.input[3]:
        mask = node.input[3]
        if ranks.get(mask) is not None and ranks[mask] > 4:
            problem(f"attn_mask must have rank <= 4, has {ranks[mask]}")
        if types.get(mask) not in (None, "BOOL", types.get(node.input[0])):
            problem(f"a float attn_mask must have Q's type {types.get(node.input[0])}, is {types[mask]}")
        if "is_causal" in attributes and attributes["is_causal"].i:
            problem("is_causal together with attn_mask is unsupported")
    for name in ATTENTION_IGNORED_ATTRIBUTES:
        if name in attributes and (attributes[name].i or attributes[name].f):
            problem(f"attribute {name} is ignored by TensorRT's parser: the engine's results would differ")
    return out


def _check_qdq(node, constants, consumers) -> list[Finding]:
    """Zero-point 0 (symmetric), constant scales, per-tensor activations, per-channel weights on the output-channel axis."""
    out = []

    def problem(text):
        out.append(Finding(node.name, node.op_type, text))

    scale = constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        problem("scale must be a constant")
        return out
    if len(node.input) > 2 and node.input[2]:
        zero = constants.get(node.input[2])
        if zero is None:
            problem("zero-point must be a constant")
        elif np.any(zero != 0):
            problem("zero-point must be 0 (symmetric quantization)")
        elif zero.dtype != np.int8:
            problem(f"zero-point type {zero.dtype} must be int8")
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    is_weight = node.op_type == "DequantizeLinear" and node.input[0] in constants
    if scale.size > 1:
        if not is_weight:
            problem("activations must be quantized per tensor")
        else:
            weight = constants[node.input[0]]
            for user in consumers.get(node.output[0], []):
                if weight.ndim != 2 or user.op_type not in ("MatMul", "Gemm") or list(user.input).index(node.output[0]) != 1:
                    continue
                trans_b = user.op_type == "Gemm" and any(a.name == "transB" and a.i for a in user.attribute)
                channels = 0 if trans_b else 1  # B is (K, N), or (N, K) with transB: the output channels are N
                if axis % 2 != channels:
                    problem(f"per-channel {user.op_type} weights must be quantized on the output-channel axis {channels}, not {axis}")
            if scale.size != weight.shape[axis]:
                problem(f"{scale.size} scales for {weight.shape[axis]} channels")
    return out
