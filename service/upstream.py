"""Calling the deployed model: request/response adapters per upstream protocol, and pooled HTTP clients.

Three protocols, chosen per model version by `UpstreamSpec.protocol`:
- `v2` (Open Inference Protocol: Triton, KServe, MLServer, `fairpatch upstream`):
  `POST {url}/v2/models/{model_name}[/versions/{model_version}]/infer`, typed tensors in and out;
- `v1` (KServe V1): `POST {url}/v1/models/{model_name}:predict`, `{"instances"}` -> `{"predictions"}`;
- `mlflow` (`mlflow models serve`): `POST {url}/invocations`, `{"inputs"}` -> `{"predictions"}` or a list.

The adapters are pure functions (spec + numpy in, URL + bytes out; bytes in, numpy out), so they are
tested without a network. `UpstreamClient` (asyncio, the gateway's hot path, over aiohttp) and
`SyncUpstreamClient` (the `HttpOracle` in job workers, over httpx) share them and differ only in
transport: one pooled keep-alive client each, one deadline per call (`timeout_s` of the model
version, covering retries), and bounded retries with exponential backoff where a retry is safe and
may help: connection failures (nothing was processed) and 502/503 answers. Inference is a pure
function of its input, so a retry never changes state upstream. Failures raise `UpstreamError` (the
gateway answers 502), `UpstreamTimeout` (504) or `UpstreamRejected` (the upstream refused the input
itself: 400/413); messages name the upstream URL and the cause, including the upstream's own error text.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import quote

import aiohttp
import httpx
import numpy as np
import orjson
import pydantic_core
import yarl
from pydantic import ValidationError

from service import binary_tensors
from service.errors import ApiError
from service.oip import (
    NUMPY_DTYPES,
    InferRequest,
    InferResponse,
    InvalidRequest,
    MetadataTensor,
    ModelMetadata,
    Parameters,
    PlainResponse,
    RequestInput,
    RequestOutput,
    ResponseOutput,
    Tensor,
    describe_validation_errors,
    holds_bool,
    loads,
    refuse_bools,
    response_from_doc,
    to_numpy,
)
from service.registry import ModelSpec
from service.version import __version__

RETRY_STATUSES = frozenset({502, 503})
HEADERS = {"content-type": "application/json", "accept": "application/json",
           "user-agent": f"fairpatch-gateway/{__version__}"}
DEFAULT_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=30.0)


# --- errors ------------------------------------------------------------------------------------------

class UpstreamError(ApiError):
    """The upstream failed (unreachable, 5xx, unreadable answer): the gateway answers 502."""

    status = 502

    def __init__(self, message: str, *, url: str, upstream_status: int | None = None) -> None:
        super().__init__(self.status, message)
        self.url = url
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    """No answer within the model version's `timeout_s` (or the upstream said 504): 504."""

    status = 504


class UpstreamRejected(UpstreamError):
    """The upstream refused the input it was sent (its 400/422, or 413 for a batch over its limit)."""

    status = 400

    def __init__(self, message: str, *, url: str, upstream_status: int | None = None) -> None:
        self.status = 413 if upstream_status == 413 else 400
        super().__init__(message, url=url, upstream_status=upstream_status)


def _upstream_message(body: bytes, limit: int = 300) -> str:
    """The upstream's own error text: `{"error"}` (OIP), `{"message"}` (MLflow), `{"detail"}`, or the body."""
    try:
        doc = pydantic_core.from_json(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("error", "message", "detail"):
            if doc.get(key):
                text = doc[key] if isinstance(doc[key], str) else pydantic_core.to_json(doc[key]).decode()
                return text[:limit]
    text = body[:limit].decode("utf-8", errors="replace").strip()
    return text or "(empty body)"


def error_from_response(url: str, status: int, body: bytes) -> UpstreamError:
    """The exception for a non-2xx upstream answer, carrying its status and error text."""
    message = f"upstream {url} answered {status}: {_upstream_message(body)}"
    if status in (400, 413, 422):
        return UpstreamRejected(f"{message} (the model refused the input)", url=url, upstream_status=status)
    if status == 504:
        return UpstreamTimeout(message, url=url, upstream_status=status)
    return UpstreamError(message, url=url, upstream_status=status)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- URLs --------------------------------------------------------------------------------------------

def upstream_model_name(spec: ModelSpec) -> str:
    return spec.upstream.model_name or spec.name


def v2_model_url(spec: ModelSpec) -> str:
    """`{url}/v2/models/{name}[/versions/{version}]`: the V2 model's metadata URL, prefix of the rest."""
    up = spec.upstream
    return _v2_model_url(up.url, upstream_model_name(spec), up.model_version)


@functools.lru_cache(maxsize=1024)  # built per request, from a few distinct registrations
def _v2_model_url(base: str, model: str, version: str | None) -> str:
    url = f"{base}/v2/models/{quote(model, safe='')}"
    return f"{url}/versions/{quote(version, safe='')}" if version else url


def infer_url(spec: ModelSpec) -> str:
    up = spec.upstream
    return _infer_url(up.protocol, up.url, upstream_model_name(spec), up.model_version)


@functools.lru_cache(maxsize=1024)  # built per request, from a few distinct registrations
def _infer_url(protocol: str, base: str, model: str, version: str | None) -> str:
    if protocol == "v2":
        return f"{_v2_model_url(base, model, version)}/infer"
    if protocol == "v1":
        return f"{base}/v1/models/{quote(model, safe='')}:predict"
    return f"{base}/invocations"


# --- requests ----------------------------------------------------------------------------------------

class Payload(NamedTuple):
    """A request body, and the length of its JSON header when it carries binary tensor data."""

    body: bytes
    header_length: int | None = None

    def headers(self) -> dict[str, str] | None:
        if self.header_length is None:
            return None
        return {binary_tensors.HEADER: str(self.header_length), "content-type": binary_tensors.CONTENT_TYPE}


def v2_tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> RequestInput:
    """A request tensor from an array (cast to `datatype`); `data` is the flat array itself (the encoders
    below write it as JSON numbers or as bytes)."""
    array = np.asarray(array, dtype=NUMPY_DTYPES[datatype])
    return RequestInput.model_construct(name=name, shape=list(array.shape), datatype=datatype, parameters=None,
                                        data=array.ravel())


def _listed(t: RequestInput | Tensor) -> RequestInput:
    if isinstance(t, Tensor):
        t = t.wire(RequestInput)
    if isinstance(t.data, np.ndarray):  # pydantic writes lists, not arrays
        return t.model_copy(update={"data": t.data.tolist()})
    return t


def _json_data(data: Any) -> Any:
    """A tensor's values as orjson writes them: numeric arrays straight from numpy, floats widened to float64 (so
    the text is `tolist`'s: each value's exact decimal, as before), anything else as it is or as a list."""
    if type(data) is not np.ndarray:
        return data
    kind = data.dtype.kind
    if kind == "f":
        return np.ascontiguousarray(data, dtype=np.float64)
    if kind in "iub":
        return np.ascontiguousarray(data)
    return data.tolist()


def encode_v2(inputs: Sequence[RequestInput] | Sequence[Tensor], outputs: Sequence[RequestOutput] | None = None,
              parameters: Parameters | None = None, request_id: str | None = None) -> bytes:
    """A V2 infer request body as JSON; tensors are not re-validated. orjson writes it: a 64-row Adult tensor in a
    quarter of pydantic-core's time (benchmarks/gateway_parse.py), in the same bytes (the same fields in the same
    order, the same number text); what orjson refuses (an integer past 64 bits, say) pydantic-core writes."""
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    doc["inputs"] = [{"name": t.name, "shape": t.shape, "datatype": t.datatype, "data": _json_data(t.data)}
                     if t.parameters is None else
                     {"name": t.name, "shape": t.shape, "datatype": t.datatype, "parameters": t.parameters,
                      "data": _json_data(t.data)} for t in inputs]
    if outputs:
        doc["outputs"] = [{"name": o.name} if o.parameters is None else {"name": o.name, "parameters": o.parameters}
                          for o in outputs]
    try:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # orjson.JSONEncodeError is one
        return encode_v2_pydantic(inputs, outputs, parameters, request_id)


def encode_v2_pydantic(inputs: Sequence[RequestInput] | Sequence[Tensor],
                       outputs: Sequence[RequestOutput] | None = None, parameters: Parameters | None = None,
                       request_id: str | None = None) -> bytes:
    """`encode_v2` by pydantic-core: what it falls back on, and what its tests compare it with."""
    request = InferRequest.model_construct(id=request_id, parameters=parameters or None,
                                           inputs=[_listed(t) for t in inputs],
                                           outputs=list(outputs) if outputs else None)
    return request.model_dump_json(exclude_none=True).encode()


def encode_v2_binary(inputs: Sequence[RequestInput] | Sequence[Tensor], outputs: Sequence[RequestOutput] | None = None,
                     parameters: Parameters | None = None, request_id: str | None = None) -> Payload:
    """The same request with every tensor as binary data, asking for binary outputs."""
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    params = dict(parameters or {})
    if outputs:
        header["outputs"] = [{"name": o.name, "parameters": {**(o.parameters or {}), "binary_data": True}}
                             for o in outputs]
    else:
        params["binary_data_output"] = True
    header["parameters"] = params
    tensors = [({"name": t.name, "shape": list(t.shape), "datatype": t.datatype,
                 **({"parameters": dict(t.parameters)} if t.parameters else {})}, t.data) for t in inputs]
    header["inputs"] = [t for t, _ in tensors]
    body, n = binary_tensors.pack(header, tensors)
    return Payload(body, n)


def encode_infer(spec: ModelSpec, inputs: Sequence[RequestInput] | Sequence[Tensor],
                 outputs: Sequence[RequestOutput] | None = None, parameters: Parameters | None = None) -> Payload:
    """A V2 infer request in the encoding the registration asks for."""
    if spec.upstream.uses_binary:
        return encode_v2_binary(inputs, outputs, parameters)
    return Payload(encode_v2(inputs, outputs, parameters))


def encode_request(spec: ModelSpec, X: np.ndarray, *, input_name: str | None = None,
                   datatype: str = "FP32", output_name: str | None = None) -> Payload:
    """One batch of rows as the body the upstream's protocol expects. A V2 request asks for the scores output by
    name (`output_name`, else the registered one): a server's default output may be another (MLServer's
    scikit-learn runtime answers `predict`, hard labels, unless asked for `predict_proba`)."""
    protocol = spec.upstream.protocol
    if protocol == "v2":
        wanted = output_name or spec.upstream.output_name
        outputs = [RequestOutput(name=wanted)] if wanted else None
        return encode_infer(spec, [v2_tensor(input_name or spec.upstream.input_name or "input", X, datatype)],
                            outputs)
    rows = np.asarray(X, dtype=np.float32).tolist()
    return Payload(pydantic_core.to_json({"instances": rows} if protocol == "v1" else {"inputs": rows}))


# --- responses ---------------------------------------------------------------------------------------

def decode_v2(body: bytes, url: str, header_length: str | None = None) -> InferResponse:
    """A V2 infer answer with every output checked against the tensor rule; `header_length` (the answer's
    Inference-Header-Content-Length) when it carries binary tensor data."""
    response = read_v2(body, url, header_length)
    for out in response.outputs:
        output_array(out, url)
    return response.wire()


def read_v2(body: bytes, url: str, header_length: str | None = None, arrays: bool = False) -> PlainResponse:
    """A V2 infer answer as the request path's plain object (service.oip.PlainResponse), its outputs not yet
    converted: the caller converts each one once (`output_array`, `scores_array`), and that checks it. `arrays`:
    binary outputs keep their values as the flat arrays they were read into (the gateway's template converts them
    once, and lists what it answers as JSON), else lists."""
    if header_length is not None:
        response = _response_from_doc(_binary_answer_doc(body, url, header_length, arrays), url)
    else:
        try:
            doc = loads(body)
        except ValueError:  # not JSON orjson reads (NaN literals, say): pydantic decides, and words the error
            try:
                response = PlainResponse.of(InferResponse.model_validate_json(body))
            except ValidationError as e:
                raise _invalid_response(url, e) from None
        else:
            response = _response_from_doc(doc, url)
    try:  # true/false for numbers: the one part of the tensor rule that needs the body (oip.refuse_bools)
        refuse_bools(body, response.outputs, "output")
    except InvalidRequest as e:
        raise UpstreamError(f"upstream {url} sent an invalid output: {e}", url=url) from None
    return response


def _response_from_doc(doc: Any, url: str) -> PlainResponse:
    response = response_from_doc(doc)
    if response is not None:
        return response
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    for t in outputs if isinstance(outputs, list) else ():  # pydantic reads `data` as a list
        if isinstance(t, dict) and isinstance(t.get("data"), np.ndarray):
            t["data"] = t["data"].tolist()
    try:  # not in plain form: pydantic decides, and words the error
        return PlainResponse.of(InferResponse.model_validate(doc))
    except ValidationError as e:
        raise _invalid_response(url, e) from None


def _invalid_response(url: str, e: ValidationError) -> UpstreamError:
    return UpstreamError(f"upstream {url} sent an invalid V2 inference response: "
                         f"{describe_validation_errors(e.errors(include_url=False), limit=3)}", url=url)


def _binary_answer_doc(body: bytes, url: str, header_length: str, arrays: bool = False) -> Any:
    """The JSON header of a binary answer with each binary output's values put in: as a list, or with `arrays` as
    the flat array they were read into."""
    try:
        doc, blob = binary_tensors.split(body, header_length)
        outputs = doc.get("outputs") if isinstance(doc, dict) else None
        binary_tensors.attach(outputs, blob, "output")
    except InvalidRequest as e:
        raise UpstreamError(f"upstream {url} sent an unreadable binary inference response: {e}", url=url) from None
    if arrays:
        return doc
    for t in outputs or ():
        if isinstance(t, dict) and isinstance(t.get("data"), np.ndarray):
            t["data"] = t["data"].tolist()
    return doc


def scores_index(response: InferResponse | PlainResponse, output_name: str | None, url: str) -> int:
    """Position of the scores output: the one named `output_name`, else the first."""
    if not response.outputs:
        raise UpstreamError(f"upstream {url} returned no outputs", url=url)
    if output_name is None:
        return 0
    for i, out in enumerate(response.outputs):
        if out.name == output_name:
            return i
    names = ", ".join(o.name for o in response.outputs)
    raise UpstreamError(f"upstream {url} returned no output '{output_name}' (it returned: {names}); "
                        "fix the model registration's output_name", url=url)


def output_array(out: ResponseOutput | Tensor, url: str) -> np.ndarray:
    """A response tensor as an array of its datatype and shape (service.oip.to_numpy's rules); 502 when
    it breaks them."""
    try:
        return to_numpy(out, "output")
    except InvalidRequest as e:
        raise UpstreamError(f"upstream {url} sent an invalid output: {e}", url=url) from None


def scores_array(out: ResponseOutput | Tensor, url: str) -> np.ndarray:
    """The scores output as an array: numeric (`output_array`)."""
    if out.datatype == "BYTES":
        raise UpstreamError(f"upstream {url}: output '{out.name}' is BYTES, not numeric scores", url=url)
    return output_array(out, url)


def _predictions_array(predictions: Any, url: str) -> np.ndarray:
    """V1 / MLflow predictions (numbers, rows of numbers, or rows as {column: number}) as a float array."""
    if isinstance(predictions, list) and predictions and all(isinstance(p, dict) for p in predictions):
        columns = list(predictions[0])
        predictions = [[row.get(c) for c in columns] for row in predictions]
    if holds_bool(predictions):
        raise UpstreamError(f"upstream {url}: predictions hold true/false, not numbers", url=url)
    try:
        arr = np.asarray(predictions, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise UpstreamError(f"upstream {url}: predictions are not a numeric array ({e})", url=url) from None
    if arr.ndim not in (1, 2) or len(arr) == 0:
        raise UpstreamError(f"upstream {url}: predictions have shape {list(arr.shape)}; expected [N] or [N, C]",
                            url=url)
    if not np.isfinite(arr).all():
        raise UpstreamError(f"upstream {url}: predictions hold NaN, infinite or null values", url=url)
    return arr


def decode_scores(spec: ModelSpec, body: bytes, url: str, header_length: str | None = None,
                  output_name: str | None = None) -> np.ndarray:
    """The scores array from an upstream answer, whatever its protocol (V2: the output `output_name`, else the
    registered one, else the first)."""
    if spec.upstream.protocol == "v2":
        response = read_v2(body, url, header_length)
        i = scores_index(response, output_name or spec.upstream.output_name, url)
        for j, out in enumerate(response.outputs):  # every output checked, each converted once
            if j != i:
                output_array(out, url)
        return scores_array(response.outputs[i], url)
    try:
        doc = pydantic_core.from_json(body)
    except ValueError as e:
        raise UpstreamError(f"upstream {url} sent invalid JSON: {e}", url=url) from None
    if isinstance(doc, dict):
        if "predictions" not in doc:
            raise UpstreamError(f"upstream {url}: answer has no 'predictions' (keys: {', '.join(doc)})", url=url)
        doc = doc["predictions"]
    elif spec.upstream.protocol == "v1":
        raise UpstreamError(f"upstream {url}: a V1 answer must be an object with 'predictions'", url=url)
    return _predictions_array(doc, url)


def decode_metadata(body: bytes, url: str) -> ModelMetadata:
    """The model's V2 metadata as the upstream sent it (its tensors may be empty: `complete_metadata`)."""
    try:
        return ModelMetadata.model_validate_json(body)
    except ValidationError as e:
        raise UpstreamError(f"upstream {url} sent invalid V2 model metadata: "
                            f"{describe_validation_errors(e.errors(include_url=False), limit=3)}", url=url) from None


def complete_metadata(spec: ModelSpec, meta: ModelMetadata) -> ModelMetadata:
    """The metadata with what the model does not declare taken from the registration (MLServer declares no
    tensors for a scikit-learn model unless its settings list them): the registered input as an FP32 matrix of
    any width, the registered output likewise. An UpstreamError with the fix when neither says it."""
    up = spec.upstream
    url = v2_model_url(spec)
    update: dict[str, Any] = {}
    for what, field, name, example in (("inputs", "input_name", up.input_name, "input-0"),
                                       ("outputs", "output_name", up.output_name, "predict_proba")):
        if getattr(meta, what):
            continue
        if not name:
            raise UpstreamError(f"upstream {url}: the model declares no {what} in its metadata and the registration "
                                f"names none; register the model again with upstream.{field} (its "
                                f"{what[:-1]} tensor's name, e.g. '{example}' for an MLServer scikit-learn model)",
                                url=url)
        update[what] = [MetadataTensor(name=name, datatype="FP32", shape=[-1, -1])]
    return meta.model_copy(update=update) if update else meta


def synthesized_metadata(spec: ModelSpec) -> ModelMetadata:
    """What a V1 / MLflow upstream would say if it could: one FP32 matrix in, one out."""
    up = spec.upstream
    return ModelMetadata(name=upstream_model_name(spec), platform=f"{up.protocol}-upstream",
                         inputs=[MetadataTensor(name=up.input_name or "input", datatype="FP32", shape=[-1, -1])],
                         outputs=[MetadataTensor(name=up.output_name or "predictions", datatype="FP32",
                                                 shape=[-1, -1])])


# --- transport ---------------------------------------------------------------------------------------

def _retryable(exc: BaseException) -> bool:
    # Refused or failed connects, and a pooled keep-alive connection the server had already closed: it
    # drops the request before any response (ServerDisconnectedError), or resets it while the request is
    # written (ClientOSError, "Can not write request body"). Under load the second is as common as the
    # first; inference is pure, so sending the request again on a new connection is safe.
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.RemoteProtocolError
                      | aiohttp.ClientOSError | aiohttp.ServerDisconnectedError)


class Reply(NamedTuple):
    """A 2xx answer's body, and its Inference-Header-Content-Length (set: binary tensor data follows)."""

    body: bytes
    header_length: str | None = None


class _Policy:
    """One call's deadline and retry budget; decides, after each attempt, to return, wait or raise."""

    def __init__(self, retries: int, backoff_s: float) -> None:
        if retries < 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        self.retries, self.backoff_s = retries, backoff_s

    def _wait(self, attempt: int, deadline: float) -> float | None:
        if attempt >= self.retries:
            return None
        wait = self.backoff_s * (2 ** attempt)
        return wait if time.monotonic() + wait < deadline else None

    def step(self, url: str, timeout_s: float, attempt: int, deadline: float,
             status: int | None, body: bytes, exc: BaseException | None) -> bytes | float:
        """The answer's body, or seconds to sleep before the next attempt; raises an UpstreamError.
        `status` is None when the attempt got no answer and raised `exc`."""
        if status is not None:
            if status < 300:
                return body
            if status in RETRY_STATUSES and (wait := self._wait(attempt, deadline)) is not None:
                return wait
            raise error_from_response(url, status, body)
        if _retryable(exc) and (wait := self._wait(attempt, deadline)) is not None:
            return wait
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            raise self.expired(url, timeout_s)
        raise UpstreamError(f"cannot reach upstream {url}: {_describe(exc)}", url=url)

    @staticmethod
    def expired(url: str, timeout_s: float) -> UpstreamTimeout:
        return UpstreamTimeout(f"upstream {url} did not answer within {timeout_s:g}s", url=url)


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    """A total timeout of `seconds`, not rounded up to a whole second as aiohttp does past `ceil_threshold`."""
    return aiohttp.ClientTimeout(total=seconds, ceil_threshold=math.inf)


# The first attempt's deadline is a model version's `timeout_s`: made once per value. A retry's (what is left of
# it) is made for that call alone.
_deadline = functools.lru_cache(maxsize=256)(_timeout)


class UpstreamClient:
    """One pooled HTTP/1.1 keep-alive client per gateway, shared by every model version.

    The transport is aiohttp: measured on the gateway's hot path, httpx's async pool (httpcore) cost
    about 1.5 ms of CPU per proxied request and fell further behind as connections were added, while
    aiohttp's costs a fraction of that (docs/gateway_overhead.md). The session is opened on first use,
    inside the event loop that will run it.
    """

    def __init__(self, *, retries: int = 2, backoff_s: float = 0.05, max_connections: int = 256,
                 keepalive_s: float = 30.0) -> None:
        self._policy = _Policy(retries, backoff_s)
        self._max_connections, self._keepalive_s = max_connections, keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._urls: dict[str, yarl.URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the upstream client is closed")
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=self._keepalive_s)
        # trust_env=False: upstream URLs are explicit; a proxy from the environment must not reroute them.
        # No session-wide timeout: each call has its own deadline (`request`).
        self._session = aiohttp.ClientSession(connector=connector, headers=HEADERS, trust_env=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    def _url(self, url: str) -> yarl.URL:
        parsed = self._urls.get(url)
        if parsed is None:  # a gateway calls few distinct URLs; parse each once
            if len(self._urls) >= 1024:
                self._urls.clear()
            parsed = self._urls[url] = yarl.URL(url)
        return parsed

    async def request(self, method: str, url: str, body: bytes | None, timeout_s: float) -> bytes:
        """The body of a 2xx answer; retries and maps every failure to an UpstreamError."""
        return (await self.call(method, url, None if body is None else Payload(body), timeout_s)).body

    async def call(self, method: str, url: str, payload: Payload | None, timeout_s: float) -> Reply:
        """`request` for a payload that may carry binary tensor data; the answer with its binary header."""
        session = self._session or self._open()
        try:
            target = self._url(url)
        except ValueError as e:  # registered before URLs were checked, say: the registration must change
            raise UpstreamError(f"upstream URL {url} is unusable ({e}); fix the model registration", url=url) \
                from None
        body, headers = (None, None) if payload is None else (payload.body, payload.headers())
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._policy.expired(url, timeout_s)
            status, content, error, binary = None, b"", None, None
            try:
                # aiohttp's own deadline for the whole exchange, answer read included: one timer, where an
                # asyncio.timeout around it would add a second (its object, scheduling and cancelling per call).
                timeout = _deadline(timeout_s) if attempt == 0 else _timeout(remaining)
                async with session.request(method, target, data=body, headers=headers, allow_redirects=False,
                                           timeout=timeout) as response:
                    status, content = response.status, await response.read()
                    binary = response.headers.get(binary_tensors.HEADER)
            except (aiohttp.ClientError, TimeoutError) as e:  # OSError from a socket is a ClientOSError
                status, error = None, e
            except ValueError as e:  # a URL aiohttp cannot connect to (a port out of range, say)
                raise UpstreamError(f"upstream URL {url} is unusable ({e}); fix the model registration",
                                    url=url) from None
            step = self._policy.step(url, timeout_s, attempt, deadline, status, content, error)
            if isinstance(step, bytes):
                return Reply(step, binary)
            await asyncio.sleep(step)
            attempt += 1

    async def metadata(self, spec: ModelSpec) -> ModelMetadata:
        """The upstream's V2 model metadata (synthesised for V1 / MLflow upstreams)."""
        if spec.upstream.protocol != "v2":
            return synthesized_metadata(spec)
        url = v2_model_url(spec)
        return complete_metadata(spec, decode_metadata(await self.request("GET", url, None, spec.upstream.timeout_s),
                                                       url))

    async def infer_v2(self, spec: ModelSpec, inputs: Sequence[RequestInput] | Sequence[Tensor],
                       outputs: Sequence[RequestOutput] | None = None,
                       parameters: Parameters | None = None) -> PlainResponse:
        """Forward V2 tensors, JSON or binary as registered; the whole V2 answer comes back as `read_v2` reads
        it, binary outputs as arrays (the caller converts the outputs, and so checks them)."""
        url = infer_url(spec)
        reply = await self.call("POST", url, encode_infer(spec, inputs, outputs, parameters), spec.upstream.timeout_s)
        return read_v2(reply.body, url, reply.header_length, arrays=True)

    async def forward_v2(self, spec: ModelSpec, body: bytes) -> PlainResponse:
        """A caller's V2 request body sent as it came: for a request the gateway checked and would re-encode
        unchanged (re-encoding a large tensor costs more than the rest of the gateway's work). The answer as
        `infer_v2` gives it."""
        url = infer_url(spec)
        reply = await self.call("POST", url, Payload(body), spec.upstream.timeout_s)
        return read_v2(reply.body, url, reply.header_length, arrays=True)

    async def scores(self, spec: ModelSpec, X: np.ndarray, *, input_name: str | None = None,
                     datatype: str = "FP32", output_name: str | None = None) -> np.ndarray:
        """Raw scores for a batch of rows, any protocol."""
        url = infer_url(spec)
        payload = encode_request(spec, X, input_name=input_name, datatype=datatype, output_name=output_name)
        reply = await self.call("POST", url, payload, spec.upstream.timeout_s)
        return decode_scores(spec, reply.body, url, reply.header_length, output_name)


class SyncUpstreamClient:
    """The blocking twin of `UpstreamClient` (job workers: `HttpOracle`); same adapters and policy."""

    def __init__(self, *, retries: int = 2, backoff_s: float = 0.05, limits: httpx.Limits = DEFAULT_LIMITS,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._policy = _Policy(retries, backoff_s)
        self._client = httpx.Client(limits=limits, headers=HEADERS, trust_env=False, transport=transport,
                                    follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SyncUpstreamClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, url: str, body: bytes | None, timeout_s: float) -> bytes:
        return self.call(method, url, None if body is None else Payload(body), timeout_s).body

    def call(self, method: str, url: str, payload: Payload | None, timeout_s: float) -> Reply:
        body, headers = (None, None) if payload is None else (payload.body, payload.headers())
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._policy.expired(url, timeout_s)
            status, content, error, binary = None, b"", None, None
            try:
                response = self._client.request(method, url, content=body, headers=headers, timeout=remaining)
                status, content = response.status_code, response.content
                binary = response.headers.get(binary_tensors.HEADER)
            except httpx.HTTPError as e:
                error = e
            except (httpx.InvalidURL, ValueError) as e:  # a URL httpx cannot connect to (a port out of range)
                raise UpstreamError(f"upstream URL {url} is unusable ({e}); fix the model registration",
                                    url=url) from None
            step = self._policy.step(url, timeout_s, attempt, deadline, status, content, error)
            if isinstance(step, bytes):
                return Reply(step, binary)
            time.sleep(step)
            attempt += 1

    def metadata(self, spec: ModelSpec) -> ModelMetadata:
        if spec.upstream.protocol != "v2":
            return synthesized_metadata(spec)
        url = v2_model_url(spec)
        return complete_metadata(spec, decode_metadata(self.request("GET", url, None, spec.upstream.timeout_s), url))

    def scores(self, spec: ModelSpec, X: np.ndarray, *, input_name: str | None = None,
               datatype: str = "FP32", output_name: str | None = None) -> np.ndarray:
        url = infer_url(spec)
        payload = encode_request(spec, X, input_name=input_name, datatype=datatype, output_name=output_name)
        reply = self.call("POST", url, payload, spec.upstream.timeout_s)
        return decode_scores(spec, reply.body, url, reply.header_length, output_name)
