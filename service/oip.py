"""Open Inference Protocol (KServe V2) REST wire shapes and their numpy conversions.

Field names follow the spec exactly (https://kserve.github.io/website/docs/concepts/architecture/
data-plane/v2-protocol): both the local upstream and the gateway speak it, so a client cannot tell
the gateway from the model it fronts. Nothing here knows about HTTP; a request the protocol rejects
raises `InvalidRequest`, whose message is written for the client and which servers map to 400.

Conversion is the hot path: one `np.asarray` over the list the JSON parser already built, then a
reshape. Tensor `data` is typed `list[Any]` so pydantic does not validate each element; the numpy
conversion does that in C. Bodies are parsed with orjson and checked by hand (`infer_request_from_doc`,
`infer_response_from_doc`) when they are in the plain form a client sends; anything else (bad JSON,
NaN literals, a wrong type, a value pydantic would coerce) is left to pydantic, which decides and words
the error. orjson takes about two thirds of the time pydantic's parser does.

One rule for tensor values (`to_numpy`), wherever they come from: V2 requests, KServe V1 instances
(`rows_to_numpy`) and upstream answers alike. Values must fit the declared datatype and shape, floats must
be finite, integers whole and in range, and JSON true/false are no numbers (`refuse_bools`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

try:  # optional (the service extra installs it): float tensors parsed straight into a buffer (`_simd_doc`)
    import simdjson
except ImportError:  # pragma: no cover - then orjson parses every body
    simdjson = None

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]
Parameters = dict[str, Any]

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPES = {dt: name for name, dt in NUMPY_DTYPES.items() if name != "BYTES"}


class InvalidRequest(ValueError):
    """A request the protocol rejects (bad JSON, shape, datatype, values); the message is for the client."""


# --- wire shapes -----------------------------------------------------------------------------------

class _Wire(BaseModel):
    # Unknown fields are dropped rather than rejected: the protocol grows through extensions.
    model_config = ConfigDict(extra="ignore")


class ErrorResponse(_Wire):
    error: str


class ServerMetadata(_Wire):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class LiveResponse(_Wire):
    live: bool


class ReadyResponse(_Wire):
    ready: bool


class GatewayReadyResponse(ReadyResponse):
    """The gateway's readiness: the V2 answer, plus why where it is not ready or runs without Redis."""

    redis: bool | None = Field(None, description="false while Redis does not answer (present only then)")
    error: str | None = Field(None, description="why not ready, where a registered upstream is down")


class ModelReadyResponse(_Wire):
    name: str
    ready: bool


class MetadataTensor(_Wire):
    name: str
    datatype: Datatype
    shape: list[int]  # -1 marks a dimension of any size
    parameters: Parameters | None = None


class ModelMetadata(_Wire):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor] = Field(default_factory=list)
    outputs: list[MetadataTensor] = Field(default_factory=list)
    parameters: Parameters | None = None


class RequestInput(_Wire):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Datatype
    parameters: Parameters | None = None
    # Row-major, flat or nested; checked by `to_numpy`, not per element by pydantic. A flat numpy array when
    # the values came as binary data (service.binary_tensors).
    data: list[Any]


class RequestOutput(_Wire):
    name: str
    parameters: Parameters | None = None


class InferRequest(_Wire):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Wire):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any]


class InferResponse(_Wire):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


# --- building wire objects without validation -----------------------------------------------------

M = TypeVar("M", bound=BaseModel)


_prototypes: dict[type[BaseModel], BaseModel] = {}


def construct(cls: type[M], values: dict[str, Any]) -> M:
    """`cls` from `values` without validation, for wire objects the gateway builds from data it has checked
    itself (validating `data` element by element would cost more than the rest of the request). `values`
    must hold every field. A copy of one prototype per class with `values` put in (pydantic's `model_copy`)
    costs a third of what `model_construct` does."""
    proto = _prototypes.get(cls)
    if proto is None:
        proto = _prototypes[cls] = cls.model_construct(**values)
    return proto.model_copy(update=values)  # type: ignore[return-value]


# --- the request path's plain objects -----------------------------------------------------------------
# The inference template (service.infer) carries requests and upstream answers in these slotted dataclasses,
# not in the pydantic models above: building a pydantic object, even unvalidated, costs several times more,
# and a request builds several. They hold the same fields, checked by the same rules; the pydantic models
# stay the wire shapes (OpenAPI, and the validation that words the errors of anything not in plain form).

@dataclass(slots=True)
class Tensor:
    """A request input or a response output."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None
    data: Any  # a list (flat or nested), or a flat numpy array

    def json(self) -> dict[str, Any]:
        """The tensor as the wire model writes it (no `parameters` when None)."""
        if self.parameters is None:
            return {"name": self.name, "shape": self.shape, "datatype": self.datatype, "data": self.data}
        return {"name": self.name, "shape": self.shape, "datatype": self.datatype, "parameters": self.parameters,
                "data": self.data}

    def wire(self, cls: type[RequestInput] | type[ResponseOutput]) -> Any:
        return construct(cls, {"name": self.name, "shape": self.shape, "datatype": self.datatype,
                               "parameters": self.parameters, "data": self.data})

    @classmethod
    def of(cls, t: RequestInput | ResponseOutput) -> Tensor:
        return cls(t.name, t.shape, t.datatype, t.parameters, t.data)


@dataclass(slots=True)
class Wanted:
    """A requested output."""

    name: str
    parameters: Parameters | None


@dataclass(slots=True)
class PlainRequest:
    """An inference request."""

    id: str | None
    parameters: Parameters | None
    inputs: list[Tensor]
    outputs: list[Wanted] | None

    def wire(self) -> InferRequest:
        outputs = None if self.outputs is None else \
            [construct(RequestOutput, {"name": o.name, "parameters": o.parameters}) for o in self.outputs]
        return construct(InferRequest, {"id": self.id, "parameters": self.parameters,
                                        "inputs": [t.wire(RequestInput) for t in self.inputs], "outputs": outputs})

    @classmethod
    def of(cls, r: InferRequest) -> PlainRequest:
        outputs = None if r.outputs is None else [Wanted(o.name, o.parameters) for o in r.outputs]
        return cls(r.id, r.parameters, [Tensor.of(t) for t in r.inputs], outputs)


@dataclass(slots=True)
class PlainResponse:
    """An inference answer (an upstream's)."""

    model_name: str
    model_version: str | None
    id: str | None
    parameters: Parameters | None
    outputs: list[Tensor]

    def wire(self) -> InferResponse:
        return construct(InferResponse, {"model_name": self.model_name, "model_version": self.model_version,
                                         "id": self.id, "parameters": self.parameters,
                                         "outputs": [t.wire(ResponseOutput) for t in self.outputs]})

    @classmethod
    def of(cls, r: InferResponse) -> PlainResponse:
        return cls(r.model_name, r.model_version, r.id, r.parameters, [Tensor.of(t) for t in r.outputs])


# --- parsing ---------------------------------------------------------------------------------------

def describe_validation_errors(errors: Iterable[Mapping[str, Any]], limit: int = 5) -> str:
    """Pydantic errors as one readable line: `inputs.0.shape.1: Input should be ...; ...`."""
    errors = list(errors)
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


def _params(v: Any) -> bool:
    return v is None or type(v) is dict


def _plain_tensor(t: Any, negative_dims: bool) -> Tensor | None:
    """The tensor when every field already has its declared type, else None (pydantic decides).
    Requests must have sizes >= 0; responses are read as upstreams send them (their shapes are checked later)."""
    if type(t) is not dict:
        return None
    name, shape, datatype, data, parameters = (t.get("name"), t.get("shape"), t.get("datatype"), t.get("data"),
                                               t.get("parameters"))
    if type(name) is not str or type(shape) is not list or type(datatype) is not str \
            or datatype not in NUMPY_DTYPES or not (type(data) is list or type(data) is np.ndarray) \
            or not _params(parameters):
        return None
    for d in shape:
        if type(d) is not int or (d < 0 and not negative_dims):
            return None
    return Tensor(name, shape, datatype, parameters, data)


def infer_request_from_doc(doc: Any) -> InferRequest | None:
    """The request a parsed JSON document holds when every field already has the type `InferRequest`
    declares (what pydantic would accept unchanged); None when pydantic must decide."""
    request = request_from_doc(doc)
    return None if request is None else request.wire()


def request_from_doc(doc: Any) -> PlainRequest | None:
    """`infer_request_from_doc` as the request path's plain object."""
    if type(doc) is not dict:
        return None
    inputs, rid, parameters, outputs = doc.get("inputs"), doc.get("id"), doc.get("parameters"), doc.get("outputs")
    if type(inputs) is not list or not inputs or not (rid is None or type(rid) is str) or not _params(parameters):
        return None
    tensors = []
    for t in inputs:
        tensor = _plain_tensor(t, negative_dims=False)
        if tensor is None:
            return None
        tensors.append(tensor)
    wanted = None
    if outputs is not None:
        if type(outputs) is not list:
            return None
        wanted = []
        for o in outputs:
            if type(o) is not dict or type(o.get("name")) is not str or not _params(o.get("parameters")):
                return None
            wanted.append(Wanted(o["name"], o.get("parameters")))
    return PlainRequest(rid, parameters, tensors, wanted)


def infer_response_from_doc(doc: Any) -> InferResponse | None:
    """`infer_request_from_doc` for an inference response (what an upstream answers)."""
    response = response_from_doc(doc)
    return None if response is None else response.wire()


def response_from_doc(doc: Any) -> PlainResponse | None:
    """`infer_response_from_doc` as the request path's plain object."""
    if type(doc) is not dict:
        return None
    name, version, rid, parameters, outputs = (doc.get("model_name"), doc.get("model_version"), doc.get("id"),
                                               doc.get("parameters"), doc.get("outputs"))
    if type(name) is not str or not (version is None or type(version) is str) or not (rid is None or type(rid) is str) \
            or not _params(parameters) or type(outputs) is not list:
        return None
    tensors = []
    for t in outputs:
        tensor = _plain_tensor(t, negative_dims=True)
        if tensor is None:
            return None
        tensors.append(tensor)
    return PlainResponse(name, version, rid, parameters, tensors)


def loads(body: bytes | str) -> Any:
    """orjson's parse; raises ValueError (orjson.JSONDecodeError) on what it refuses, NaN literals included."""
    return orjson.loads(body)


def parse_infer_request(body: bytes) -> InferRequest:
    """Parse and validate an inference request body: orjson and the checks above for a request in plain
    form, else pydantic's own validation (which words the error)."""
    return read_infer_request(body).wire()


def read_infer_request(body: bytes) -> PlainRequest:
    """`parse_infer_request` as the request path's plain object."""
    if not body:
        raise InvalidRequest("empty request body; expected an inference request JSON object")
    doc = _simd_doc(body) if simdjson is not None and len(body) >= SIMD_MIN_BYTES else None
    try:
        request = request_from_doc(doc if doc is not None else orjson.loads(body))
    except orjson.JSONDecodeError:
        request = None
    if request is None:
        request = PlainRequest.of(validate_json(InferRequest, body, "inference request"))
    refuse_bools(body, request.inputs)
    return request


# Bodies from this size on are parsed by simdjson where it is installed: a 64-row Adult request's values as Python
# floats (orjson) and then as an array cost ~0.3 ms, read into a buffer ~0.1 ms. Smaller bodies gain nothing.
SIMD_MIN_BYTES = 4096
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
_EXACT = float(2 ** 53)  # integers past this may round differently on the way to a float buffer: orjson reads those


def _simd_doc(body: bytes) -> dict[str, Any] | None:
    """The request as orjson parses it, except that the flat `data` of each float input is a float64 array of the
    same values (no Python float per value); None where simdjson refuses the body or it is not a JSON object (orjson
    then parses it, and words any error). Nested or mixed `data` stays a list."""
    try:
        root = _parser().parse(body)
        if not isinstance(root, simdjson.Object):
            return None
        doc: dict[str, Any] = {}
        for key, value in _fields(root):
            if key == "inputs" and isinstance(value, simdjson.Array):
                doc[key] = [_simd_tensor(t) for t in value]
            else:
                doc[key] = _simd_value(value)
        return doc
    except Exception:  # noqa: BLE001 - anything simdjson does otherwise: orjson decides
        return None


_local = threading.local()


def _parser() -> Any:
    """This thread's simdjson parser (a new one sizes its buffers on first use: a sixth of a 31 KB body's parse).
    None of its values outlive `_simd_doc` (the arrays are copies), so it is free again on the next call; where it
    is not (a value still held), a new one."""
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
        return parser
    try:
        parser.parse(b"0")  # refused while a value from the last parse lives
    except RuntimeError:
        parser = _local.parser = simdjson.Parser()
    return parser


def _fields(obj: Any) -> list[tuple[str, Any]]:
    """An object's fields, arrays and objects left unparsed (`items()` would convert them); a repeated key (orjson
    keeps its last value, indexing finds the first) is left to orjson."""
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):
        raise ValueError("a repeated key")
    return [(k, obj[k]) for k in keys]


def _simd_value(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _simd_tensor(tensor: Any) -> Any:
    if not isinstance(tensor, simdjson.Object):
        return _simd_value(tensor)
    out: dict[str, Any] = {}
    data = None
    for key, value in _fields(tensor):
        if key == "data" and isinstance(value, simdjson.Array):
            out[key] = data = value
        else:
            out[key] = _simd_value(value)
    if data is not None:
        values = None
        if out.get("datatype") in _FLOATS:
            try:  # a flat array of numbers (as_buffer flattens nested ones: their count tells them apart)
                values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
            except (TypeError, ValueError):  # strings, true/false, null in it: orjson's list, as it was
                values = None
            if values is not None and (len(values) != len(data) or (len(values) and np.abs(values).max() >= _EXACT)):
                values = None
        if values is None:
            out["data"] = data.as_list()
        else:  # FP64 data is used as it is (`convert`): its own writable memory, not the parser's read-only bytes
            out["data"] = values.copy() if out["datatype"] == "FP64" else values
    return out


def validate_json(model: type[M], body: bytes, what: str) -> M:
    """`model` from a JSON body by pydantic, every failure an InvalidRequest worded for the client."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            detail = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
            raise InvalidRequest(f"malformed JSON: {detail}") from None
        raise InvalidRequest(f"invalid {what}: {describe_validation_errors(errors)}") from None


# --- tensor -> numpy: one rule for every tensor, in requests (V2 and V1) and in upstream answers ------

def to_numpy(tensor: RequestInput | ResponseOutput | Tensor, what: str = "input") -> np.ndarray:
    """The tensor as an array of its declared datatype and shape; rejects what would mislead the model
    (wrong element count, non-finite floats, fractional or out-of-range integers). `what` names the
    tensor's kind in messages ('input', 'output')."""
    arr = convert(tensor.data, tensor.datatype, tensor.name, what)
    expected = math.prod(tensor.shape)
    if arr.size != expected or min(tensor.shape, default=0) < 0:
        if min(tensor.shape) < 0:
            raise InvalidRequest(f"{what} '{tensor.name}': shape {tensor.shape} has a negative dimension")
        raise InvalidRequest(f"{what} '{tensor.name}': shape {tensor.shape} needs {expected} values, got {arr.size}")
    return arr.reshape(tensor.shape)


def rows_to_numpy(rows: list[Any], datatype: str, name: str) -> np.ndarray:
    """Rows of values (KServe V1 `instances`) as an array [N, ...] of `datatype`, by `to_numpy`'s rules."""
    if not rows:
        raise InvalidRequest("instances is empty; send at least one row")
    try:
        arr = convert(rows, datatype, name, "input")
    except InvalidRequest as e:
        if "is not a valid" not in str(e):
            raise
        raise InvalidRequest(f"instances must be rows of numbers of equal length: {e}") from None
    if arr.ndim < 2:
        raise InvalidRequest("each instance must be a row (a list of numbers)")
    return arr


def convert(data: Any, datatype: str, name: str, what: str = "input") -> np.ndarray:
    """A tensor's values (flat or nested lists, or an array) as an array of `datatype`, shape as nested."""
    target = NUMPY_DTYPES[datatype]
    try:
        if type(data) is np.ndarray and data.dtype == target:  # binary data, or rows converted already
            arr = data
        elif target.kind == "f" and type(data) is list and (arr := _float_list(data, target)) is not None:
            return arr  # finite and in range: checked on the way
        elif target.kind == "f":
            # Direct conversion is the fast path; None becomes NaN and overflow becomes inf, both
            # caught by the finite check below (so the overflow needs no warning).
            with np.errstate(over="ignore"):
                arr = np.asarray(data, dtype=target)
        elif target.kind in "iu":
            arr = _integers(data, target, name, datatype, what)
        elif target.kind == "b":
            arr = np.asarray(data)
            if arr.size and arr.dtype.kind != "b":
                raise InvalidRequest(f"{what} '{name}': BOOL data must be JSON true/false values")
            arr = arr.astype(target, copy=False)
        else:
            arr = _strings(data, name, what)
    except InvalidRequest:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidRequest(f"{what} '{name}': data is not a valid {datatype} tensor ({e})") from None
    if target.kind == "f" and not np.isfinite(arr).all():
        raise InvalidRequest(f"{what} '{name}': data holds NaN, infinite or null values (or values outside "
                             f"the {datatype} range); send finite numbers")
    return arr


_FLOAT_MAX = {dt: float(np.finfo(dt).max) for dt in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))}


def _float_list(data: list[Any], target: np.dtype) -> np.ndarray | None:
    """A JSON list of numbers as a float array of `target` when every value is finite and within its range; None
    otherwise (`convert`'s checked conversion then decides and words the error). By way of float64: numpy casts
    Python floats to float32 one at a time with an overflow check, several times slower than reading them as the
    doubles they are and casting the array (the same values: a Python float is a double)."""
    arr = np.asarray(data, dtype=np.float64)
    if not arr.size:
        return arr.astype(target, copy=False)
    if not np.maximum.reduce(np.abs(arr), axis=None) <= _FLOAT_MAX[target]:  # NaN fails it too
        return None
    return arr.astype(target, copy=False)


def refuse_bools(text: bytes, tensors: Iterable[Any], what: str = "input") -> None:
    """JSON true/false are no numbers: numpy would read them as 1 and 0. `text` is the JSON the tensors came
    from; only when it holds a `true` or `false` at all are the numeric tensors' values looked at."""
    if not _mentions_bool(text):
        return
    for t in tensors:
        if t.datatype not in ("BOOL", "BYTES") and not isinstance(t.data, np.ndarray) and holds_bool(t.data):
            raise InvalidRequest(f"{what} '{t.name}': {t.datatype} data holds true/false; send numbers")


def _mentions_bool(text: bytes) -> bool:
    """Whether `text` holds `true` or `false`. The numbers that make up most of a large body hold no t or f:
    the few there are (in keys and names) are found by `find` (memchr) and looked at one by one, several
    times faster than searching for the words themselves over the whole body."""
    if len(text) < 4096:
        return b"true" in text or b"false" in text
    for word in (b"true", b"false"):
        first, hits = word[:1], 0
        i = text.find(first)
        while i != -1:
            if text.startswith(word, i):
                return True
            hits += 1
            if hits > 16:  # a text full of t or f (names, say): search for the word itself
                if word in text:
                    return True
                break
            i = text.find(first, i + 1)
    return False


def holds_bool(data: Any) -> bool:
    """Whether a JSON value is, or nests, a true or false."""
    if type(data) is bool:
        return True
    return type(data) is list and any(holds_bool(x) for x in data)


def _integers(data: Any, target: np.dtype, name: str, datatype: str, what: str) -> np.ndarray:
    # Infer first: a direct cast would silently truncate 1.5 to 1 and wrap out-of-range values.
    arr = np.asarray(data)
    if arr.dtype.kind == "f":
        if not np.all(np.mod(arr, 1) == 0):
            raise InvalidRequest(f"{what} '{name}': {datatype} data holds non-integer values")
    elif arr.dtype.kind not in "iu" and arr.size:
        # Python ints past 64 bits arrive as objects: name the range rather than the type
        if arr.dtype.kind == "O" and all(type(x) is int for x in arr.ravel()):
            info = np.iinfo(target)
            raise InvalidRequest(f"{what} '{name}': values outside the {datatype} range [{info.min}, {info.max}]")
        raise InvalidRequest(f"{what} '{name}': {datatype} data must be integers")
    if arr.size:
        info = np.iinfo(target)
        # Floats are checked against the exclusive bound max + 1 (a power of two, exact as a float): max itself
        # rounds up as a float (2**63 - 1 to 2**63), so `> max` let 2**63 through and the cast wrapped it.
        high = arr.max() >= float(int(info.max) + 1) if arr.dtype.kind == "f" else arr.max() > info.max
        if arr.min() < info.min or high:
            raise InvalidRequest(f"{what} '{name}': values outside the {datatype} range "
                                 f"[{info.min}, {info.max}]")
    return arr.astype(target, copy=False)


def _strings(data: Any, name: str, what: str) -> np.ndarray:
    arr = np.asarray(data, dtype=object)
    flat = arr.ravel()
    for i, x in enumerate(flat):
        if isinstance(x, bytes):
            flat[i] = x.decode("utf-8", errors="replace")
        elif not isinstance(x, str):
            raise InvalidRequest(f"{what} '{name}': BYTES data must be strings")
    return flat.reshape(arr.shape)


# --- numpy -> response tensor ----------------------------------------------------------------------

def datatype_of(dtype: np.dtype) -> str:
    """The OIP datatype name for a numpy dtype (strings and objects are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "USO":
        return "BYTES"
    try:
        return _DATATYPES[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def from_numpy(name: str, array: np.ndarray, parameters: Parameters | None = None) -> ResponseOutput:
    """A response tensor: flat row-major data (`tolist` runs in C) plus the array's shape."""
    return tensor_of(name, array, parameters).wire(ResponseOutput)


def tensor_of(name: str, array: np.ndarray, parameters: Parameters | None = None) -> Tensor:
    """`from_numpy` as the request path's plain object."""
    array = np.asarray(array)
    datatype = datatype_of(array.dtype)
    data = array.ravel().tolist()
    if datatype == "BYTES":
        data = [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in data]
    return Tensor(name, list(array.shape), datatype, parameters, data)


# --- request vs model signature --------------------------------------------------------------------

def shape_matches(expected: list[int], actual: list[int]) -> bool:
    """Same rank, and every fixed dimension equal (-1 in `expected` matches any size)."""
    if len(expected) != len(actual):
        return False
    return all(e < 0 or e == a for e, a in zip(expected, actual, strict=True))


def check_signature(metadata: ModelMetadata, request: InferRequest) -> None:
    """Reject a request whose inputs or requested outputs do not fit the model's declared signature,
    before any data is converted or sent."""
    check_tensors(metadata, request.inputs, request.outputs)


def check_tensors(metadata: ModelMetadata, inputs: list[RequestInput] | list[Tensor],
                  outputs: list[RequestOutput] | list[Wanted] | None,
                  declared: dict[str, MetadataTensor] | None = None) -> None:
    """`check_signature` for inputs and requested outputs given apart (the gateway checks the request less
    its group input); `declared`: the metadata's inputs by name, when the caller keeps them."""
    if declared is None:
        declared = {t.name: t for t in metadata.inputs}
    seen: set[str] = set()
    for t in inputs:
        spec = declared.get(t.name)
        if spec is None:
            raise InvalidRequest(f"model '{metadata.name}' has no input '{t.name}' "
                                 f"(its inputs: {', '.join(declared) or 'none'})")
        if t.name in seen:
            raise InvalidRequest(f"input '{t.name}' is given more than once")
        seen.add(t.name)
        if t.datatype != spec.datatype:
            raise InvalidRequest(f"input '{t.name}' has datatype {t.datatype}; model expects {spec.datatype}")
        if not shape_matches(spec.shape, t.shape):
            raise InvalidRequest(f"input '{t.name}' has shape {t.shape}; model expects {spec.shape} "
                                 "(-1 = any size)")
    missing = [n for n in declared if n not in seen]
    if missing:
        raise InvalidRequest(f"missing input(s) {', '.join(missing)} for model '{metadata.name}'")
    if outputs:
        names = {t.name for t in metadata.outputs}
        unknown = [o.name for o in outputs if o.name not in names]
        if unknown:
            raise InvalidRequest(f"model '{metadata.name}' has no output(s) {', '.join(unknown)} "
                                 f"(its outputs: {', '.join(sorted(names))})")
