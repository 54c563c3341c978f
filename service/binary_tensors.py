"""The Open Inference Protocol's binary tensor data extension over REST (Triton's `binary_tensor_data`).

A body is a JSON header followed by raw tensor bytes; the header's length travels in the
`Inference-Header-Content-Length` HTTP header. A tensor whose `parameters` hold `binary_data_size`
takes that many bytes, in order, from what follows the header: numbers little-endian and row-major,
BOOL one byte each, BYTES elements each a 4-byte little-endian length and then the bytes. A request
asks for binary outputs with `parameters.binary_data` on an output, or `binary_data_output` on the
request (Triton's rules; an output's own flag wins).

Why it matters: a tensor as JSON text costs both ends far more than the model's work on it (a
64-row Adult batch is 31 KB of text; parsing it takes ~0.75 ms, reading the same values as bytes a
few microseconds), and image tensors are worse. Triton's clients send binary data by default.

Pure functions, no HTTP. Numeric tensors read from bytes are numpy arrays in the `data` field (the
numpy conversion in service.oip takes them as they are); BYTES tensors are lists of str.
Problems raise `InvalidRequest` with a message for whoever sent the body.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from service.oip import (
    NUMPY_DTYPES,
    InferRequest,
    InvalidRequest,
    PlainRequest,
    describe_validation_errors,
    loads,
    read_infer_request,
    refuse_bools,
    request_from_doc,
)

HEADER = "inference-header-content-length"
EXTENSION = "binary_tensor_data"  # the name Triton lists in its server metadata
CONTENT_TYPE = "application/octet-stream"
SIZE = "binary_data_size"


def header_length(value: str, body_size: int) -> int:
    """The JSON header's length from the HTTP header's value, checked against the body."""
    try:
        n = int(value)
    except ValueError:
        raise InvalidRequest(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
    if not 0 < n <= body_size:
        raise InvalidRequest(f"Inference-Header-Content-Length {n} does not fit the {body_size}-byte body")
    return n


def split(body: bytes, length: str) -> tuple[Any, memoryview]:
    """(the parsed JSON header, the binary bytes after it)."""
    n = header_length(length, len(body))
    try:
        doc = loads(body[:n])
    except ValueError:  # orjson refuses NaN literals, which json (and pydantic) accept: json decides
        try:
            doc = json.loads(body[:n])
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"malformed JSON in the inference header: {e}") from None
    return doc, memoryview(body)[n:]


def attach(tensors: Any, blob: memoryview, what: str) -> None:
    """Give each tensor dict with `parameters.binary_data_size` its values from `blob`, in order (and drop
    that parameter); every byte of `blob` must belong to one. `what`: 'input' or 'output', for messages."""
    offset = 0
    for t in tensors if isinstance(tensors, list) else ():
        params = t.get("parameters") if isinstance(t, dict) else None
        if not isinstance(params, dict) or SIZE not in params:
            continue
        size = params[SIZE]
        if type(size) is not int or size < 0 or offset + size > len(blob):
            raise InvalidRequest(f"{what} '{t.get('name')}': binary_data_size {size!r} does not fit the "
                                 f"{len(blob) - offset} binary bytes left")
        t["data"] = from_bytes(blob[offset:offset + size], t.get("datatype"), t.get("name"), what)
        t["parameters"] = {k: v for k, v in params.items() if k != SIZE} or None
        offset += size
    if offset != len(blob):
        raise InvalidRequest(f"{len(blob) - offset} bytes of binary data belong to no {what} "
                             f"(check each {what}'s binary_data_size)")


_LITTLE = {name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items()}  # the wire's byte order


def from_bytes(raw: memoryview | bytes, datatype: Any, name: Any, what: str = "input") -> np.ndarray | list[str]:
    """One tensor's values: a flat array of its datatype, or a list of str for BYTES."""
    if datatype == "BYTES":
        values, i, raw = [], 0, bytes(raw)
        while i < len(raw):
            if i + 4 > len(raw):
                raise InvalidRequest(f"{what} '{name}': truncated BYTES element in the binary data")
            (size,) = struct.unpack_from("<I", raw, i)
            if i + 4 + size > len(raw):
                raise InvalidRequest(f"{what} '{name}': truncated BYTES element in the binary data")
            values.append(raw[i + 4:i + 4 + size].decode("utf-8", errors="replace"))
            i += 4 + size
        return values
    dtype = NUMPY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidRequest(f"{what} '{name}': unknown datatype {datatype!r} for binary data")
    if len(raw) % dtype.itemsize:
        raise InvalidRequest(f"{what} '{name}': {len(raw)} bytes is not a whole number of {datatype} values")
    # A copy in the native byte order: the body's buffer is not kept alive by the request, and read-only
    # arrays surprise code that transforms rows in place.
    return np.frombuffer(raw, dtype=_LITTLE[datatype]).astype(dtype)


def to_bytes(array: Any, datatype: str) -> bytes:
    """A tensor's values as the extension lays them out (see the module docstring)."""
    if datatype == "BYTES":
        parts = []
        for x in np.asarray(array, dtype=object).ravel():
            b = x if isinstance(x, bytes) else str(x).encode()
            parts += (struct.pack("<I", len(b)), b)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=_LITTLE[datatype]).tobytes()


def pack(header: dict[str, Any], tensors: Sequence[tuple[dict[str, Any], Any]]) -> tuple[bytes, int]:
    """(body, header length): `header` as JSON, then each tensor's bytes. Each (tensor dict, values)
    pair: the dict sits in `header` (an input or output) and gets `parameters.binary_data_size`."""
    blobs = []
    for t, values in tensors:
        raw = to_bytes(values, t["datatype"])
        t["parameters"] = {**(t.get("parameters") or {}), SIZE: len(raw)}
        blobs.append(raw)
    head = orjson.dumps(header)
    return b"".join((head, *blobs)), len(head)


def wants_binary(output_parameters: dict[str, Any] | None, request_parameters: dict[str, Any] | None) -> bool:
    """Whether an output is to be answered as binary data, by Triton's rules."""
    if output_parameters and "binary_data" in output_parameters:
        return bool(output_parameters["binary_data"])
    return bool((request_parameters or {}).get("binary_data_output"))


def parse_request(body: bytes, binary_header_length: str | None) -> InferRequest:
    """A V2 infer request: JSON, or a JSON header plus binary tensor data."""
    return read_request(body, binary_header_length).wire()


def read_request(body: bytes, binary_header_length: str | None) -> PlainRequest:
    """`parse_request` as the request path's plain object (service.oip.PlainRequest)."""
    if binary_header_length is None:
        return read_infer_request(body)
    doc, blob = split(body, binary_header_length)
    attach(doc.get("inputs") if isinstance(doc, dict) else None, blob, "input")
    request = request_from_doc(doc) or PlainRequest.of(_validated(doc))
    refuse_bools(body[:header_length(binary_header_length, len(body))], request.inputs)  # the JSON header's
    return request


def _validated(doc: Any) -> InferRequest:
    for t in doc.get("inputs") or () if isinstance(doc, dict) else ():  # pydantic reads lists, not arrays
        if isinstance(t, dict) and isinstance(t.get("data"), np.ndarray):
            t["data"] = t["data"].tolist()
    try:
        return InferRequest.model_validate(doc)
    except ValidationError as e:
        raise InvalidRequest(f"invalid inference request: {describe_validation_errors(e.errors())}") from None


def encode_response(header: dict[str, Any], outputs: Sequence[tuple[str, Any, str, list[int], dict | None]],
                    binary: Sequence[bool]) -> tuple[bytes, int]:
    """An infer answer with the outputs marked in `binary` as bytes after the JSON header and the rest as
    JSON data: (body, header length). Each output: (name, values, datatype, shape, parameters); `header`
    holds the answer's other fields (model_name, id, ...)."""
    tensors, listed = [], []
    for (name, values, datatype, shape, parameters), as_bytes in zip(outputs, binary, strict=True):
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(shape)}
        if parameters:
            t["parameters"] = dict(parameters)
        if as_bytes:
            tensors.append((t, values))
        else:
            t["data"] = values.ravel().tolist() if isinstance(values, np.ndarray) else values
        listed.append(t)
    return pack({**{k: v for k, v in header.items() if v is not None}, "outputs": listed}, tensors)
