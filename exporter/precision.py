"""FP16 and INT8 models: precision lives in the ONNX file itself (what TensorRT 10.12+/11 strongly typed networks read).

fp16: the module is exported in half precision: weights, matmuls, attention and residuals in fp16, LayerNorm
      statistics in fp32 (LayerNormalization stash_type=1), int64 inputs and fp32 outputs, as fp32's.
int8: explicit Q/DQ on the encoder's MatMul inputs (the pooler, the LM head and task heads stay float: small, and
      their outputs feed a softmax or a decision), calibrated on real 3'UTR windows. Two schemes of one calibration, because the
      hardware that runs them wants different ones (measured, see docs/benchmarks.md):
        tensorrt: symmetric int8 activations and per-channel int8 weights, all zero-points 0: TensorRT's rules.
                  ONNX Runtime on x86 CPUs runs it no faster than fp32.
        cpu:      asymmetric uint8 activations, per-tensor symmetric int8 weights: ONNX Runtime's fast x86 path
                  (u8s8 integer matmuls), about 2x fp32 there. Not for TensorRT (zero-points are not 0).
      and the tensorrt scheme once more with fp16 float parts (with_fp16_float_parts): the file TensorRT engines build.
      openvino: NNCF's post-training quantization of the fp32 model read by OpenVINO, saved as OpenVINO IR
                (quantize_openvino): OpenVINO's int8, kept only where it measures closer to fp32 than the Q/DQ file.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from .network import UtrBert
from .onnx_export import export_onnx, quiet

INT8_FP16 = "the tensorrt scheme with fp16 float parts (Q/DQ around fp16 tensors): what TensorRT builds its int8 engine from"
INT8_SCHEMES = {
    "tensorrt": "symmetric int8 activations (zero-point 0), per-channel symmetric int8 weights; TensorRT explicit quantization",
    "cpu": "asymmetric uint8 activations, per-tensor symmetric int8 weights; ONNX Runtime x86 u8s8 kernels",
}
FP16_SCHEME = "fp16 weights and activations, LayerNorm statistics in fp32 (stash_type=1), int64 inputs, fp32 outputs"
CALIBRATION_METHODS = ("entropy", "percentile", "minmax")


class _FloatOutputs(torch.nn.Module):
    """The half-precision module with fp32 outputs, so every precision has the same interface."""

    def __init__(self, inner: UtrBert):
        super().__init__()
        self.inner = inner
        self.config, self.lm_head = inner.config, inner.lm_head
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def forward(self, input_ids, attention_mask, mask_positions=None):
        args = (input_ids, attention_mask) + ((mask_positions,) if self.lm_head is not None else ())
        return tuple(o.float() for o in self.inner(*args))


def export_fp16(model: UtrBert, path: str | os.PathLike, attention: str = "fused") -> dict:
    return export_onnx(_FloatOutputs(copy.deepcopy(model).half()), path, attention)


def quantize_int8(fp32_file, out_file, rows: list[np.ndarray], scheme: str, method: str = "entropy") -> None:
    """Q/DQ int8 model from the fp32 ONNX file, calibrated on `rows` (token ids with <cls>/<eos>) one at a time."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}")
    import onnx

    graph = onnx.load(os.fspath(fp32_file), load_external_data=False).graph
    wants_positions = any(i.name == "mask_positions" for i in graph.input)

    class Rows(CalibrationDataReader):
        """One window per run. Fed to the calibrator one at a time (set_range, stride 1): ORT's histogram
        calibrators stack each tensor's values across the runs of one pass, which fails for windows of
        different lengths."""

        def __init__(self):
            self.start, self.end = 0, len(rows)

        def __len__(self):
            return len(rows)

        def set_range(self, start_index: int, end_index: int):
            self.start, self.end = start_index, end_index

        def get_next(self):
            if self.start >= self.end:
                return None
            row = rows[self.start]
            self.start += 1
            feeds = {"input_ids": row[None].astype(np.int64), "attention_mask": np.ones((1, len(row)), np.int64)}
            if wants_positions:
                feeds["mask_positions"] = np.zeros((1, 1), np.int64)
            return feeds

    options = {
        "tensorrt": dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}),
        "cpu": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False,
                    extra_options={"WeightSymmetric": True}),
    }[scheme]
    calibrate = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax}[method]
    with quiet():
        quantize_static(
            os.fspath(fp32_file), os.fspath(out_file), Rows(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            nodes_to_quantize=encoder_matmuls(graph), calibrate_method=calibrate, **{**options, "extra_options": {**options["extra_options"], "CalibStridedMinMax": 1}},
        )


def with_fp16_float_parts(int8_file, out_file) -> None:
    """The TensorRT int8 model with its float parts in fp16: in a strongly typed network precision comes from the ONNX
    types, and model.int8.onnx dequantizes to fp32, so LayerNorm, GELU, residual adds and attention would run in
    fp32 around the int8 matmuls (likely slower than the fp16 engine). Here Q/DQ sit around fp16 tensors, as NVIDIA's
    BERT demo builds it; inputs and outputs keep their types. ONNX Runtime's float16 converter does the rewrite."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        model = convert_float_to_float16(onnx.load(os.fspath(int8_file)), keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, os.fspath(out_file))


MATMULS_PER_LAYER = 6  # query, key, value, attention output, intermediate, output


def encoder_matmuls(graph) -> list[str]:
    """Names of the encoder's weight MatMuls: the first 6 per layer in graph order, since every head's MatMul
    (nucleotide unfolding, contact maps, 3-D head projections) consumes the encoder's output and comes later."""
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    layers = sum(node.op_type in ("Attention", "Softmax") for node in graph.node)  # one per layer, in either attention form
    weighted = [node.name for node in graph.node if node.op_type == "MatMul" and any(x in constants for x in node.input)]
    if len(weighted) < MATMULS_PER_LAYER * layers:
        raise ValueError(f"expected {MATMULS_PER_LAYER} weight MatMuls per encoder layer, found {len(weighted)} for {layers} layers")
    return weighted[: MATMULS_PER_LAYER * layers]


# NNCF's options for the OpenVINO int8 model, measured on the full-size k=6 bundle's fixtures (random weights, 16
# windows): SmoothQuant off, since with it (NNCF's transformer default, alpha 0.95) the worst token's cosine to fp32
# fell to 0.9948 (0.9996 without; the Q/DQ file's 0.9979), and on the trained classifier no alpha (0.5, 0.95) beat off
# by more than one flipped label in 655. The attention's inputs stay float (NNCF would quantize them). Calibrated one
# window per run, as the Q/DQ files are, on the first OPENVINO_WINDOWS of the (shuffled) calibration windows: NNCF's
# statistics cost about 1.6 s a window for the full-size model on 2 cores.
OPENVINO_WINDOWS = 16
OPENVINO_SCHEME = ("NNCF post-training quantization (ModelType.TRANSFORMER, SmoothQuant off, fast bias correction) of "
                   "the encoder's weight MatMuls; OpenVINO IR")


def quantize_openvino(fp32_file, out_xml, rows: list[np.ndarray], layers: int) -> dict:
    """OpenVINO int8 IR (out_xml and its .bin) from the fp32 ONNX file, by NNCF, calibrated on `rows`; returns the
    options to record. Only the encoder's weight MatMuls are quantized, as in the Q/DQ files: the heads stay float."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = ov.Core().read_model(os.fspath(fp32_file))
    wants_positions = any(port.get_any_name() == "mask_positions" for port in model.inputs)

    def feeds(row: np.ndarray) -> dict:
        out = {"input_ids": row[None].astype(np.int64), "attention_mask": np.ones((1, len(row)), np.int64)}
        return {**out, "mask_positions": np.zeros((1, 1), np.int64)} if wants_positions else out

    matmuls = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
    encoder = [op for op in matmuls if _constant_weights(op)][: MATMULS_PER_LAYER * layers]
    if len(encoder) < MATMULS_PER_LAYER * layers:
        raise ValueError(f"expected {MATMULS_PER_LAYER} weight MatMuls per encoder layer, found {len(encoder)} for {layers} layers")
    others = [op.get_friendly_name() for op in matmuls if op not in encoder]
    rows = rows[:OPENVINO_WINDOWS]
    with quiet():
        nncf.set_log_level(40)  # errors only: NNCF logs every ignored node and draws progress bars
        quantized = nncf.quantize(
            model, nncf.Dataset(rows, feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(rows),
            ignored_scope=nncf.IgnoredScope(names=others, types=["ScaledDotProductAttention"], validate=False),
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)),
        )
    ov.save_model(quantized, os.fspath(out_xml), compress_to_fp16=False)
    return {"nncf": nncf.__version__, "openvino": ov.get_version().split("-")[0], "model_type": "TRANSFORMER",
            "smooth_quant_alpha": None, "bias_correction": "fast", "subset_size": len(rows), "calibration_batch": 1}


def _constant_weights(op) -> bool:
    """Whether a MatMul's second input is a weight (a constant, perhaps converted or reshaped), not an activation."""
    node = op.input(1).get_source_output().get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose") and node.get_input_size():
        node = node.input(0).get_source_output().get_node()
    return node.get_type_name() == "Constant"
