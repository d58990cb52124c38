"""What an ONNX model file holds, read from its bytes: operators, initializer shapes, external data.

The runtime must judge a bundle's model before an engine runs it (a bundle is untrusted input), and it needs NumPy
only, so it cannot import the `onnx` package. These few fields are read straight from the protobuf wire format
(developers.google.com/protocol-buffers/docs/encoding): a walk over the messages that can hold nodes or tensors,
skipping every other field by its length, so the megabytes of weights are never copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Field numbers of onnx.proto3 that lead to nodes and tensors.
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE, NODE_OP_TYPE, NODE_DOMAIN = 5, 4, 7
ATTRIBUTE_TENSOR, ATTRIBUTE_GRAPH, ATTRIBUTE_TENSORS, ATTRIBUTE_GRAPHS, ATTRIBUTE_SPARSE, ATTRIBUTE_SPARSES = 5, 6, 10, 11, 22, 23
FUNCTION_NODE = 7
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_DIMS, TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 1, 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_DEPTH = 64  # subgraphs nest; a hostile file could nest without end


class NotAModel(ValueError):
    """The bytes are not a well-formed ONNX model."""


@dataclass
class ModelFacts:
    ops: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type); "" is the default domain
    initializers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # top-level graph: name -> dims
    external: list[str] = field(default_factory=list)  # tensors whose data lies in another file
    subgraphs: int = 0  # graphs inside node attributes (If, Loop, Scan bodies)
    functions: int = 0


def model_facts(data: bytes) -> ModelFacts:
    facts = ModelFacts()
    for number, value in _fields(memoryview(data)):
        if number == MODEL_GRAPH:
            _graph(value, facts, 0, top=True)
        elif number == MODEL_FUNCTIONS:
            facts.functions += 1
            for n, v in _fields(value):
                if n == FUNCTION_NODE:
                    _node(v, facts, 1)
    return facts


def _graph(data, facts: ModelFacts, depth: int, top: bool = False) -> None:
    if depth > MAX_DEPTH:
        raise NotAModel(f"graphs nested more than {MAX_DEPTH} deep")
    for number, value in _fields(data):
        if number == GRAPH_NODE:
            _node(value, facts, depth)
        elif number == GRAPH_INITIALIZER:
            name, dims = _tensor(value, facts)
            if top:
                facts.initializers[name] = dims
        elif number == GRAPH_SPARSE_INITIALIZER:
            _sparse(value, facts)


def _node(data, facts: ModelFacts, depth: int) -> None:
    op_type, domain = "", ""
    for number, value in _fields(data):
        if number == NODE_OP_TYPE:
            op_type = _text(value)
        elif number == NODE_DOMAIN:
            domain = _text(value)
        elif number == NODE_ATTRIBUTE:
            for n, v in _fields(value):
                if n in (ATTRIBUTE_TENSOR, ATTRIBUTE_TENSORS):
                    _tensor(v, facts)
                elif n in (ATTRIBUTE_SPARSE, ATTRIBUTE_SPARSES):
                    _sparse(v, facts)
                elif n in (ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS):
                    facts.subgraphs += 1
                    _graph(v, facts, depth + 1)
    facts.ops.add(("" if domain == "ai.onnx" else domain, op_type))


def _sparse(data, facts: ModelFacts) -> None:
    for number, value in _fields(data):
        if number in (SPARSE_VALUES, SPARSE_INDICES):
            _tensor(value, facts)


def _tensor(data, facts: ModelFacts) -> tuple[str, tuple[int, ...]]:
    name, dims, external = "", [], False
    for number, value in _fields(data):
        if number == TENSOR_NAME:
            name = _text(value)
        elif number == TENSOR_DIMS:
            dims.extend(_packed(value) if isinstance(value, memoryview) else [value])
        elif number == TENSOR_EXTERNAL_DATA or (number == TENSOR_DATA_LOCATION and value == EXTERNAL):
            external = True
    if external and name not in facts.external:
        facts.external.append(name)
    return name, tuple(dims)


def _fields(data):
    """(field number, value) of a message: an int for varints and fixed-size fields, a memoryview for the rest."""
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            value, position = int.from_bytes(data[position : position + size], "little"), position + size
        elif wire == 2:
            size, position = _varint(data, position)
            value, position = data[position : position + size], position + size
        else:
            raise NotAModel(f"wire type {wire} at byte {position}")
        if position > end or number == 0:
            raise NotAModel("truncated or malformed protobuf")
        yield number, value


def _varint(data, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise NotAModel("truncated or malformed protobuf")
        byte = data[position]
        result |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return result, position
        shift += 7


def _packed(data) -> list[int]:
    values, position = [], 0
    while position < len(data):
        value, position = _varint(data, position)
        values.append(value)
    return values


def _text(value) -> str:
    if not isinstance(value, memoryview):
        raise NotAModel("a text field of the wrong type")
    return bytes(value).decode("utf-8", "replace")
