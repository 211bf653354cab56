"""The Open Inference Protocol (v2) codec shared by the REST and gRPC transports: tensors in, tensors and model
descriptions out. Both v2 transports decode and encode through here, so they cannot disagree.

The model the gateway exposes over v2: one input ``text`` (BYTES, shape ``[n]`` or ``[n, 1]``, UTF-8 texts) and two
outputs, ``probabilities`` (FP32 ``[n, num_labels]``, columns in the order of the model's labels) and ``labels``
(BYTES ``[n]``, the most probable label of each text). BYTES tensors in binary form are Triton's serialization: each
element is a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.gateway.dataplane import Classified, ModelDescription
from service.gateway.errors import InvalidInput

INPUT_NAME = "text"
PROBABILITIES = "probabilities"
LABELS = "labels"
OUTPUT_NAMES = (PROBABILITIES, LABELS)
#: The value of ``platform`` in model metadata: not a Triton backend, so clients can tell they reach the gateway.
PLATFORM = "loraserve_gateway"
#: Protocol extensions the gateway implements (server metadata).
EXTENSIONS = ["binary_tensor_data", "parameters"]
_LENGTH = struct.Struct("<I")


def decode_bytes_tensor(raw: bytes, *, max_items: int) -> list[bytes]:
    """Split Triton's serialized BYTES tensor into its elements, strictly.

    Args:
        raw: Length-prefixed elements.
        max_items: Stop (with an error) beyond this many elements, so a hostile payload cannot make a huge list.

    Returns:
        The elements.

    Raises:
        InvalidInput: A truncated length or element, or more than ``max_items`` elements.
    """
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if len(items) >= max_items:
            raise InvalidInput(f"input {INPUT_NAME!r} holds more than {max_items} elements")
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {INPUT_NAME!r}: truncated BYTES element length at byte {offset}")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"input {INPUT_NAME!r}: BYTES element of {size} bytes runs past the end of the data")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    return items


def encode_bytes_tensor(items: Sequence[bytes]) -> bytes:
    """Serialize elements as Triton's BYTES tensor (4-byte little-endian length, then the bytes)."""
    return b"".join(_LENGTH.pack(len(b)) + b for b in items)


def texts_from_bytes(items: Sequence[bytes]) -> list[str]:
    """Decode BYTES elements as UTF-8 texts.

    Raises:
        InvalidInput: An element is not valid UTF-8 (named by index).
    """
    texts = []
    for i, item in enumerate(items):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"input {INPUT_NAME!r} element {i} is not valid UTF-8") from None
    return texts


def check_input_header(name: str, datatype: str, shape: Sequence[int]) -> int:
    """Validate the declared input and return its element count.

    Args:
        name: Declared input name.
        datatype: Declared datatype.
        shape: Declared shape.

    Returns:
        The number of texts the shape declares.

    Raises:
        InvalidInput: Wrong name, datatype or shape (accepted: ``[n]`` or ``[n, 1]``, n >= 1).
    """
    if name != INPUT_NAME:
        raise InvalidInput(f"unknown input {name!r}; the model takes one BYTES input named {INPUT_NAME!r}")
    if datatype != "BYTES":
        raise InvalidInput(f"input {INPUT_NAME!r} must have datatype BYTES, got {datatype!r}")
    dims = list(shape)
    if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)) or any(d < 0 for d in dims):
        raise InvalidInput(f"input {INPUT_NAME!r} must have shape [n] or [n, 1], got {dims}")
    count = math.prod(dims)
    if count < 1:
        raise InvalidInput(f"input {INPUT_NAME!r} holds no texts (shape {dims})")
    return count


def check_outputs(requested: Sequence[str] | None) -> list[str]:
    """Return the outputs to send (all when none are requested).

    Raises:
        InvalidInput: An unknown or repeated output name.
    """
    if not requested:
        return list(OUTPUT_NAMES)
    for name in requested:
        if name not in OUTPUT_NAMES:
            raise InvalidInput(f"unknown output {name!r}; outputs: {', '.join(OUTPUT_NAMES)}")
    if len(set(requested)) != len(requested):
        raise InvalidInput("an output is requested twice")
    return list(requested)


def decode_texts(count: int, *, raw: bytes | None, items: Sequence[bytes] | None, max_items: int) -> list[str]:
    """The texts of the ``text`` input, from binary data or from a list of elements, checked against its shape.

    Args:
        count: The element count the declared shape gives (:func:`check_input_header`).
        raw: Serialized BYTES tensor (binary data), or None.
        items: Already split elements (gRPC ``bytes_contents``), or None.
        max_items: Most elements accepted while splitting.

    Raises:
        InvalidInput: Bad serialization, bad UTF-8, or a count that differs from the shape.
    """
    elements = decode_bytes_tensor(raw, max_items=max_items) if raw is not None else list(items or [])
    texts = texts_from_bytes(elements)
    if len(texts) != count:
        raise InvalidInput(f"input {INPUT_NAME!r} has {len(texts)} elements but its shape says {count}")
    return texts


@dataclass(frozen=True)
class OutputTensor:
    """One encoded output: what both v2 transports put on the wire.

    Attributes:
        name: Output name.
        datatype: v2 datatype (``FP32`` or ``BYTES``).
        shape: Tensor shape.
        raw: Binary form (little-endian FP32, or Triton's length-prefixed BYTES).
        values: JSON form (a flat list).
    """

    name: str
    datatype: str
    shape: list[int]
    raw: bytes
    values: list[Any]


def encode_outputs(done: Classified, wanted: Sequence[str]) -> list[OutputTensor]:
    """Encode the requested outputs of a classification, in the requested order."""
    out = []
    for name in wanted:
        if name == PROBABILITIES:
            matrix = done.probabilities.astype("<f4")
            out.append(OutputTensor(name, "FP32", list(matrix.shape), matrix.tobytes(), matrix.reshape(-1).tolist()))
        else:
            labels = [label for label, _ in done.best()]
            raw = encode_bytes_tensor([lbl.encode() for lbl in labels])
            out.append(OutputTensor(name, "BYTES", [len(labels)], raw, labels))
    return out


def model_metadata(desc: ModelDescription) -> dict[str, Any]:
    """The v2 model metadata: name, versions, platform, the ``text`` input and both outputs."""
    return {
        "name": desc.name,
        "versions": list(desc.versions),
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(desc.labels)]},
            {"name": LABELS, "datatype": "BYTES", "shape": [-1]},
        ],
    }


def model_config(desc: ModelDescription) -> dict[str, Any]:
    """A Triton-shaped model configuration: max_batch_size is the texts one request may carry; labels in a
    parameter (JSON list)."""
    return {
        "name": desc.name,
        "platform": PLATFORM,
        "max_batch_size": desc.max_client_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [
            {"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [-1, len(desc.labels)]},
            {"name": LABELS, "data_type": "TYPE_STRING", "dims": [-1]},
        ],
        "parameters": {"labels": {"string_value": json.dumps(list(desc.labels))}},
    }


def timeout_seconds(parameter: object) -> float | None:
    """Read Triton's ``timeout`` request parameter (microseconds) as seconds.

    Raises:
        InvalidInput: Not a positive integer.
    """
    if parameter is None:
        return None
    if isinstance(parameter, bool) or not isinstance(parameter, int) or parameter < 1:
        raise InvalidInput(f"parameter 'timeout' must be a positive integer of microseconds, got {parameter!r}")
    return parameter / 1_000_000
