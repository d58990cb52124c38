"""KServe v2 (Open Inference Protocol) inference requests and answers over HTTP, as `utrexport serve`'s front reads and
writes them: JSON, and Triton's binary tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then
the tensors' bytes), which tritonclient's HTTP client uses by default.

Written here because the front must judge every byte before Triton sees it: the request is read strictly for the
one BYTES input our models take (shape [n, 1], n strings), and anything else is a one-line `Malformed` error
(a 400), never passed on. No library reads this protocol on the server side apart from a whole server.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

INT64 = 2**63
NUMPY_TYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
               "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


class Malformed(ValueError):
    """What is wrong with a request's form (HTTP 400)."""


@dataclass
class InferRequest:
    texts: list[bytes]  # the one input's n elements
    parameters: dict  # request parameters for the model (scalars), Triton's own binary_data_output taken out
    outputs: list[str] | None  # the outputs asked for, in order (None: every output the model gives)
    binary: set[str]  # outputs to answer as binary tensors
    binary_all: bool  # binary_data_output: every output as binary
    id: str | None


def read_request(body: bytes, header_length: str | None, input_name: str, output_names: list[str]) -> InferRequest:
    """An inference request for a model with one BYTES input named `input_name` (shape [n, 1]) and these outputs."""
    header, binary = _split(body, header_length)
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise Malformed(f"the body is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(request, dict):
        raise Malformed("the request must be a JSON object with 'inputs'")
    unknown = sorted(set(request) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise Malformed(f"unknown request field {unknown[0]!r}: a request has id, parameters, inputs and outputs")
    parameters = _parameters(request.get("parameters"), "the request's parameters")
    binary_all = parameters.pop("binary_data_output", False) is True
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Malformed(f"'inputs' must be a list of one input, {input_name!r}")
    texts = _texts(inputs[0], input_name, binary)
    outputs, wanted_binary = _outputs(request.get("outputs"), output_names)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise Malformed("'id' must be a string")
    return InferRequest(texts, parameters, outputs, wanted_binary, binary_all, request_id)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise Malformed(f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the body")
    return body[: int(header_length)], body[int(header_length):]


def _parameters(parameters, where: str) -> dict:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise Malformed(f"{where} must be a JSON object")
    for name, value in parameters.items():
        if isinstance(value, bool) or isinstance(value, str) or (isinstance(value, int) and -INT64 <= value < INT64):
            continue
        raise Malformed(f"parameter {name!r} must be a string, a boolean or a 64-bit integer, got {json.dumps(value)[:40]}")
    return dict(parameters)


def _only(parameters: dict, allowed: set[str], where: str) -> None:
    """Tensor parameters this server takes (shared-memory regions are never among them: tensors travel in the body)."""
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        raise Malformed(f"{where}: parameter {unknown[0]!r} is not supported here (tensors travel in the request and answer bodies)")


def _texts(tensor: dict, name: str, binary: bytes) -> list[bytes]:
    if tensor.get("name") != name:
        raise Malformed(f"this model's input is {name!r}, not {str(tensor.get('name'))[:40]!r}")
    if tensor.get("datatype") != "BYTES":
        raise Malformed(f"input {name!r} must have datatype BYTES (strings), not {str(tensor.get('datatype'))[:20]!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape) and shape[0] >= 1 and shape[1] == 1):
        raise Malformed(f"input {name!r} must have shape [n, 1] with n >= 1 (one sequence per row), got {json.dumps(shape)[:60]}")
    parameters = _parameters(tensor.get("parameters"), f"input {name!r}'s parameters")
    _only(parameters, {"binary_data_size"}, f"input {name!r}")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
            raise Malformed(f"input {name!r}: binary_data_size {size!r} does not match the {len(binary)} bytes after the JSON header")
        if "data" in tensor:
            raise Malformed(f"input {name!r} has both 'data' and binary data")
        texts = _unpack_bytes(binary, name)
    else:
        if binary:
            raise Malformed("bytes after the JSON header, but no input has binary_data_size")
        texts = [t.encode("utf-8", "surrogatepass") for t in _flat_strings(tensor.get("data"), name)]
        for j, text in enumerate(texts):
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                raise Malformed(f"input {name!r}: element {j} holds a lone surrogate (\\ud800-\\udfff), which is no text") from None
    if len(texts) != shape[0]:
        raise Malformed(f"input {name!r} has shape {shape} but {len(texts)} elements")
    return texts


def _flat_strings(data, name: str) -> list[str]:
    if not isinstance(data, list):
        raise Malformed(f"input {name!r} needs 'data': a list of strings")
    flat = []
    for item in data:
        if isinstance(item, list):  # row-major nesting [[s], [s]] is allowed, one level per axis
            flat += _flat_strings(item, name)
        elif isinstance(item, str):
            flat.append(item)
        else:
            raise Malformed(f"input {name!r} is BYTES: its data must be strings, not {json.dumps(item)[:40]}")
    return flat


def _unpack_bytes(binary: bytes, name: str) -> list[bytes]:
    """BYTES elements as the binary extension sends them: a 4-byte little-endian length, then that many bytes."""
    texts, at = [], 0
    while at < len(binary):
        if at + 4 > len(binary):
            raise Malformed(f"input {name!r}: binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", binary, at)
        if at + 4 + n > len(binary):
            raise Malformed(f"input {name!r}: an element of {n} bytes runs past the binary data")
        texts.append(binary[at + 4 : at + 4 + n])
        at += 4 + n
    return texts


def _outputs(outputs, names: list[str]) -> tuple[list[str] | None, set[str]]:
    if outputs is None:
        return None, set()
    if not isinstance(outputs, list) or not outputs:
        raise Malformed("'outputs' must be a non-empty list of {\"name\": ...}")
    wanted, binary = [], set()
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in names:
            raise Malformed(f"unknown output {str(name)[:40]!r}: this model answers {', '.join(names)}")
        parameters = _parameters(output.get("parameters"), f"output {name!r}'s parameters")
        _only(parameters, {"binary_data"}, f"output {name!r}")
        if parameters.get("binary_data") is True:
            binary.add(name)
        wanted.append(name)
    return wanted, binary


def write_answer(model: str, outputs: list[tuple[str, str, np.ndarray]], binary: set[str], binary_all: bool,
                 request_id: str | None) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers: (name, datatype, array) outputs as JSON data, or as binary tensors where asked."""
    entries, tail = [], []
    for name, datatype, array in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary_all or name in binary:
            raw = _pack_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array, np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            flat = array.reshape(-1)
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in flat.tolist()]
        entries.append(entry)
    answer = {"model_name": model, "model_version": "1", "outputs": entries}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not tail:
        return header, {"content-type": "application/json"}
    return header + b"".join(tail), {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}


def _pack_bytes(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in (x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)))
