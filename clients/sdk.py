"""The fairpatch Python SDK: a small typed client for the gateway's HTTP API (docs/api.md).

    from clients.sdk import Client, ModelSpec, UpstreamSpec

    with Client("http://127.0.0.1:8080", admin_key="...") as fp:
        fp.register_model(ModelSpec(name="adult", upstream=UpstreamSpec(url="http://127.0.0.1:9000")))
        ds = fp.upload_dataset("tune.csv", label="income", group="sex")
        job = fp.wait_job(fp.create_job("adult", ds.id, query_budget=1000).id)
        fp.activate_patch("adult", job.result.patch_id)
        out = fp.infer("adult", X, groups=["Female", "Male", ...], raw=True)
        out.scores, out.raw, out.patch_id

`Client` is synchronous, `AsyncClient` the same API with `await`. Every call is described once as a
`_Call` (method, path, body, how to read the answer) and both clients only send it. Any answer
outside 2xx raises `FairpatchError(status, message)` with the server's `{"error": ...}` text; a
gateway that cannot be reached raises it with status 0. Needs httpx, numpy and pydantic: no torch,
and nothing from `patcher` or `service` (the SDK talks HTTP only).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ArtifactInfo", "AsyncClient", "Client", "DatasetInfo", "FairpatchError", "InferResult", "Job", "JobProgress",
    "JobResult", "ModelSpec", "PatchInfo", "PatchList", "UpstreamSpec",
]

DEFAULT_URL = "http://127.0.0.1:8080"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RAW_OUTPUT = "fairpatch_raw"
PATCH_HEADER = "fairpatch-patch"
SERVED_BY_HEADER = "fairpatch-served-by"
SHA_HEADER = "fairpatch-patch-sha256"
ARTIFACT_SHA_HEADER = "fairpatch-artifact-sha256"
T = TypeVar("T")


class FairpatchError(Exception):
    """The gateway said no (`status` is the HTTP status, `message` its `{"error"}` text), or could not be
    reached (`status` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status = status
        self.message = message


# --- wire shapes (what the SDK returns; unknown fields are kept, so a newer gateway does not break it) ---

class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class UpstreamSpec(_Shape):
    url: str
    protocol: Literal["v2", "v1", "mlflow"] = "v2"
    model_name: str | None = None
    model_version: str | None = None
    input_name: str | None = None
    output_name: str | None = None
    output_kind: Literal["logits", "probabilities"] = "logits"
    timeout_s: float = 10.0
    # v2: tensors to and from the upstream as binary data (Triton, fairpatch upstream); auto: where the upstream's
    # GET /v2 advertises the binary tensor extension (the gateway resolves it at registration)
    binary_data: bool | Literal["auto"] = "auto"


class ArtifactInfo(_Shape):
    """A model version's uploaded ONNX file, as the gateway recorded it."""

    sha256: str
    bytes: int
    opset: int | None = None
    input_name: str | None = None
    input_shape: list[int | str] = Field(default_factory=list)
    input_datatype: str | None = None
    output_name: str | None = None
    output_shape: list[int | str] = Field(default_factory=list)
    uploaded_at: float | None = None


class ModelSpec(_Shape):
    name: str
    version: str = "1"
    upstream: UpstreamSpec
    group_input: str = "group"
    groups: list[str] | None = None
    created_at: float | None = None
    artifact: ArtifactInfo | None = None  # set by upload_artifact, never by register_model
    discovery: dict[str, Any] | None = None  # what the gateway read from the upstream at registration


class DatasetInfo(_Shape):
    id: str
    rows: int
    columns: list[str] = Field(default_factory=list)
    label: str | None = None
    group: str | None = None
    groups: list[str] = Field(default_factory=list)
    group_counts: dict[str, int] = Field(default_factory=dict)
    label_values: list[Any] = Field(default_factory=list)
    label_counts: list[int] | None = None
    features: list[str] = Field(default_factory=list)
    bytes: int | None = None

    def one_line(self) -> str:
        """The upload in one line: rows, columns, label balance and groups."""
        text = f"dataset {self.id}: {self.rows:,} rows, {len(self.columns)} columns ({len(self.features)} features)"
        if self.label:
            text += f"; label {self.label}"
            if self.label_counts and self.rows:
                shown = f"{self.label_values[1]}" if len(self.label_values) == 2 else "1"
                text += f" ({self.label_counts[1] / self.rows:.0%} {shown})"
        if self.group:
            counts = ", ".join(f"{g} {self.group_counts.get(g, '?'):,}" if g in self.group_counts else g
                               for g in self.groups)
            text += f"; group {self.group}: {counts}"
        return text


class JobProgress(_Shape):
    fraction: float = 0.0
    queries_used: int = 0
    stage: str | None = None


class JobResult(_Shape):
    patch_id: str | None = None
    queries_used: int | None = None
    eval_queries: int | None = None
    group_at_inference: bool | None = None
    access: str | None = None
    served_by: str | None = None  # "patch": a weight patch, the gateway serves its model itself
    before: dict[str, Any] = Field(default_factory=dict)  # empty: no held-out report (holdout 0)
    after: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, Any] = Field(default_factory=dict)
    eval_budget: int | None = None
    holdout_rows: int | None = None
    note: str | None = None

    @field_validator("before", "after", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class Job(_Shape):
    id: str
    status: str
    method: str | None = None
    model: str | None = None
    version: str | None = None
    access: str | None = None
    preset: str | None = None
    exemplar_dataset: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None  # host:pid of the worker that runs the job (or ran it last)
    progress: JobProgress = Field(default_factory=JobProgress)
    result: JobResult | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class PatchInfo(_Shape):
    id: str
    method: str | None = None
    created_at: float | None = None
    group_at_inference: bool | None = None


class PatchList(_Shape):
    active: str | None = None
    patches: list[PatchInfo] = Field(default_factory=list)


@dataclass
class InferResult:
    """One V2 inference: `scores` is the (patched) scores output, `raw` the upstream's own scores when
    asked for, `outputs` every output tensor by name, `patch_id` the patch that was applied (None: none),
    `served_by` "upstream", or "patch" when an active weight patch's own model answered."""

    scores: np.ndarray
    patch_id: str | None
    raw: np.ndarray | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    model_version: str | None = None
    served_by: str | None = None

    @property
    def predictions(self) -> np.ndarray:
        """The decision per row: the argmax of the scores (a single column is read as P(class 1) > 0.5)."""
        s = self.scores
        return s.argmax(axis=1) if s.ndim == 2 and s.shape[1] > 1 else (s.reshape(len(s)) > 0.5).astype(np.int64)


# --- calls: described once, sent by either client -----------------------------------------------------

@dataclass
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None

    def build(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        headers = dict(self.headers or {})
        content = self.content
        if self.json is not None:
            content = pydantic_core.to_json(self.json)
            headers["content-type"] = "application/json"
        return client.build_request(self.method, self.path, params=self.params, content=content, headers=headers)


def _seg(s: str) -> str:
    return quote(str(s), safe="")


def _json(r: httpx.Response) -> Any:
    return pydantic_core.from_json(r.content) if r.content else None


def _shape(kind: type[T]) -> Callable[[httpx.Response], T]:
    return lambda r: kind.model_validate(_json(r))  # type: ignore[attr-defined]


def _nothing(_r: httpx.Response) -> None:
    return None


def _error_message(r: httpx.Response) -> str:
    try:
        body = pydantic_core.from_json(r.content)
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return body["error"]
    except ValueError:
        pass
    text = r.text.strip()
    return text[:500] if text else (r.reason_phrase or "error")


def _check(r: httpx.Response) -> httpx.Response:
    if not r.is_success:
        raise FairpatchError(r.status_code, _error_message(r))
    return r


def _unreachable(base_url: str, e: httpx.HTTPError) -> FairpatchError:
    if isinstance(e, httpx.TimeoutException):
        return FairpatchError(0, f"the gateway at {base_url} did not answer in time ({type(e).__name__})")
    return FairpatchError(0, f"cannot reach the gateway at {base_url}: {e or type(e).__name__}")


def _models_path(model: str, version: str | None) -> str:
    return f"/v1/models/{_seg(model)}/versions/{_seg(version or '1')}"


def _v2_path(model: str, version: str | None) -> str:
    return f"/v2/models/{_seg(model)}" + (f"/versions/{_seg(version)}" if version else "")


def _dataset_body(data: str | os.PathLike | pd.DataFrame | bytes, content_type: str | None) -> tuple[bytes, str]:
    if isinstance(data, bytes):
        return data, content_type or "text/csv"
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        parquet = path.suffix.lower() in (".parquet", ".pq")
        return path.read_bytes(), content_type or ("application/vnd.apache.parquet" if parquet else "text/csv")
    if hasattr(data, "to_csv"):  # a pandas DataFrame: Parquet when pyarrow is there (smaller, exact), else CSV
        try:
            import pyarrow  # noqa: F401

            buf = io.BytesIO()
            data.to_parquet(buf, index=False)
            return buf.getvalue(), "application/vnd.apache.parquet"
        except ImportError:
            return data.to_csv(index=False).encode(), "text/csv"
    raise TypeError(f"upload a file path, bytes or a pandas DataFrame, not {type(data).__name__}")


def _onnx_bytes(data: bytes | str | os.PathLike) -> bytes:
    return data if isinstance(data, bytes) else Path(data).read_bytes()


def _artifact_bytes(r: httpx.Response) -> bytes:
    expected = r.headers.get(ARTIFACT_SHA_HEADER)
    if expected and hashlib.sha256(r.content).hexdigest() != expected:
        raise FairpatchError(0, f"downloaded artifact does not match its {ARTIFACT_SHA_HEADER} header "
                                "(corrupted in transit?)")
    return r.content


def _patch_bytes(r: httpx.Response) -> bytes:
    expected = r.headers.get(SHA_HEADER)
    if expected and hashlib.sha256(r.content).hexdigest() != expected:
        raise FairpatchError(0, f"downloaded patch does not match its {SHA_HEADER} header "
                                "(corrupted in transit?)")
    return r.content


def _tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    kind = array.dtype.kind
    if kind in "USO":
        datatype, data = "BYTES", [str(v) for v in array.ravel().tolist()]
    elif kind in "iu":
        datatype, data = "INT64", array.astype(np.int64, copy=False).ravel().tolist()
    elif kind == "b":
        datatype, data = "BOOL", array.ravel().tolist()
    else:
        datatype = "FP64" if array.dtype == np.float64 else "FP32"
        data = array.ravel().tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def _infer_body(features: np.ndarray, groups: Sequence[Any] | np.ndarray | None, input_name: str,
                datatype: str | None, group_input: str, raw: bool,
                parameters: Mapping[str, Any] | None, request_id: str | None = None) -> dict[str, Any]:
    X = np.asarray(features)
    if datatype in _NP and datatype != "BYTES":
        X = X.astype(_NP[datatype], copy=False)  # the model's declared input type (float64 frames -> FP32)
    elif X.dtype.kind == "f":
        X = X.astype(np.float32, copy=False)  # unknown signature: most models take FP32
    inputs = [_tensor(input_name, X)]
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (len(X),):
            raise ValueError(f"groups must hold one value per row: {len(X)} rows, groups of shape {g.shape}")
        inputs.append(_tensor(group_input, g))
    params = dict(parameters or {})
    if raw:
        params["fairpatch_raw"] = True
    body: dict[str, Any] = {"inputs": inputs}
    if request_id is not None:
        body["id"] = request_id
    if params:
        body["parameters"] = params
    return body


_NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
       "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
       "FP32": np.float32, "FP64": np.float64, "BYTES": object}


def _infer_reader(output_name: str | None) -> Callable[[httpx.Response], InferResult]:
    def read(r: httpx.Response) -> InferResult:
        body = _json(r)
        outputs = {o["name"]: np.asarray(o["data"], dtype=_NP.get(o.get("datatype"))).reshape(o["shape"])
                   for o in body.get("outputs", [])}
        named = [n for n in outputs if n != RAW_OUTPUT]
        name = output_name or (named[0] if named else None)
        if name not in outputs:
            raise FairpatchError(r.status_code, f"the response has no output {name!r} (outputs: {list(outputs)})")
        header = r.headers.get(PATCH_HEADER)
        return InferResult(scores=outputs[name], patch_id=None if header in (None, "", "none") else header,
                           raw=outputs.get(RAW_OUTPUT), outputs=outputs, model_version=body.get("model_version"),
                           served_by=r.headers.get(SERVED_BY_HEADER))
    return read


class _Calls:
    """Every endpoint of docs/api.md as a `_Call`."""

    # health and metadata
    @staticmethod
    def live() -> _Call[bool]:
        return _Call("GET", "/v2/health/live", lambda r: bool(_json(r).get("live")))

    @staticmethod
    def server_metadata() -> _Call[dict]:
        return _Call("GET", "/v2", _json)

    @staticmethod
    def model_metadata(model: str, version: str | None) -> _Call[dict]:
        return _Call("GET", _v2_path(model, version), _json)

    # models
    @staticmethod
    def register_model(spec: ModelSpec | Mapping[str, Any]) -> _Call[ModelSpec]:
        body = spec.model_dump(exclude_none=True) if isinstance(spec, BaseModel) else dict(spec)
        return _Call("POST", "/v1/models", _shape(ModelSpec), json=body)

    @staticmethod
    def list_models() -> _Call[list[ModelSpec]]:
        return _Call("GET", "/v1/models", lambda r: [ModelSpec.model_validate(m) for m in _json(r)["models"]])

    @staticmethod
    def get_model(model: str, version: str) -> _Call[ModelSpec]:
        return _Call("GET", _models_path(model, version), _shape(ModelSpec))

    @staticmethod
    def delete_model(model: str, version: str) -> _Call[None]:
        return _Call("DELETE", _models_path(model, version), _nothing)

    @staticmethod
    def check_model(model: str, version: str, dataset: str | None, rows: int) -> _Call[dict]:
        body = {"rows": rows, **({"dataset": dataset} if dataset else {})}
        return _Call("POST", f"{_models_path(model, version)}/check", _json, json=body)

    # model artifacts (ONNX, for gradient and weight access)
    @staticmethod
    def upload_artifact(model: str, version: str, data: bytes | str | os.PathLike) -> _Call[ArtifactInfo]:
        return _Call("POST", f"{_models_path(model, version)}/artifact", _shape(ArtifactInfo),
                     content=_onnx_bytes(data), headers={"content-type": "application/octet-stream"})

    @staticmethod
    def get_artifact(model: str, version: str) -> _Call[ArtifactInfo]:
        return _Call("GET", f"{_models_path(model, version)}/artifact", _shape(ArtifactInfo))

    @staticmethod
    def download_artifact(model: str, version: str) -> _Call[bytes]:
        return _Call("GET", f"{_models_path(model, version)}/artifact", _artifact_bytes,
                     headers={"accept": "application/octet-stream"})

    @staticmethod
    def delete_artifact(model: str, version: str) -> _Call[None]:
        return _Call("DELETE", f"{_models_path(model, version)}/artifact", _nothing)

    # datasets
    @staticmethod
    def upload_dataset(data: Any, label: str, group: str, name: str | None,
                       content_type: str | None) -> _Call[DatasetInfo]:
        body, ctype = _dataset_body(data, content_type)
        params = {"label": label, "group": group} | ({"name": name} if name else {})
        return _Call("POST", "/v1/datasets", _shape(DatasetInfo), params=params, content=body,
                     headers={"content-type": ctype})

    @staticmethod
    def get_dataset(dataset_id: str) -> _Call[DatasetInfo]:
        return _Call("GET", f"/v1/datasets/{_seg(dataset_id)}", _shape(DatasetInfo))

    @staticmethod
    def delete_dataset(dataset_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/datasets/{_seg(dataset_id)}", _nothing)

    # jobs
    @staticmethod
    def create_job(body: dict[str, Any]) -> _Call[Job]:
        return _Call("POST", "/v1/jobs", _shape(Job), json=body)

    @staticmethod
    def get_job(job_id: str) -> _Call[Job]:
        return _Call("GET", f"/v1/jobs/{_seg(job_id)}", _shape(Job))

    @staticmethod
    def cancel_job(job_id: str) -> _Call[Job | None]:
        return _Call("DELETE", f"/v1/jobs/{_seg(job_id)}", _maybe_job)

    @staticmethod
    def methods() -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/v1/methods", _json)

    @staticmethod
    def method(name: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/v1/methods/{_seg(name)}", _json)

    @staticmethod
    def job_report(job_id: str) -> _Call[str]:
        return _Call("GET", f"/v1/jobs/{_seg(job_id)}/report.html", lambda r: r.text, headers={"accept": "text/html"})

    @staticmethod
    def condensed_dataset(job_id: str) -> _Call[DatasetInfo]:
        return _Call("POST", f"/v1/jobs/{_seg(job_id)}/datasets/condensed", _shape(DatasetInfo))

    @staticmethod
    def list_jobs() -> _Call[list[Job]]:
        return _Call("GET", "/v1/jobs", lambda r: [Job.model_validate(j) for j in _jobs_of(_json(r))])

    # patches
    @staticmethod
    def list_patches(model: str, version: str) -> _Call[PatchList]:
        return _Call("GET", f"{_models_path(model, version)}/patches", _shape(PatchList))

    @staticmethod
    def activate_patch(model: str, version: str, patch_id: str, force: bool = False) -> _Call[None]:
        return _Call("POST", f"{_models_path(model, version)}/patches/{_seg(patch_id)}/activate", _nothing,
                     json={"force": True} if force else None)

    @staticmethod
    def promote_patch(model: str, version: str, patch_id: str, stage: str | None, percent: float | None,
                      force: bool) -> _Call[dict[str, Any]]:
        body = {k: v for k, v in (("stage", stage), ("percent", percent), ("force", force or None)) if v is not None}
        return _Call("POST", f"{_models_path(model, version)}/patches/{_seg(patch_id)}/promote", _json,
                     json=body or None)

    @staticmethod
    def fairness(model: str, version: str, window_s: float | None) -> _Call[dict[str, Any]]:
        return _Call("GET", f"{_models_path(model, version)}/fairness", _json,
                     params=None if window_s is None else {"window_s": window_s})

    @staticmethod
    def feedback(labels: dict[str, int | list[int]]) -> _Call[dict[str, Any]]:
        items = [{"request_id": rid, "label": label} for rid, label in labels.items()]
        return _Call("POST", "/v1/feedback", _json, json={"feedback": items})

    @staticmethod
    def deactivate_patch(model: str, version: str) -> _Call[None]:
        return _Call("POST", f"{_models_path(model, version)}/patches/deactivate", _nothing)

    @staticmethod
    def download_patch(patch_id: str) -> _Call[bytes]:
        return _Call("GET", f"/v1/patches/{_seg(patch_id)}", _patch_bytes)

    @staticmethod
    def upload_patch(model: str, version: str, data: bytes | str | os.PathLike) -> _Call[str]:
        body = data if isinstance(data, bytes) else Path(data).read_bytes()
        return _Call("POST", f"{_models_path(model, version)}/patches", lambda r: str(_json(r)["id"]),
                     content=body, headers={"content-type": "application/zip"})

    # data plane
    @staticmethod
    def infer(model: str, version: str | None, body: dict[str, Any], output_name: str | None) -> _Call[InferResult]:
        return _Call("POST", f"{_v2_path(model, version)}/infer", _infer_reader(output_name), json=body)


def _maybe_job(r: httpx.Response) -> Job | None:
    body = _json(r)
    return Job.model_validate(body) if isinstance(body, dict) and "id" in body and "status" in body else None


def _jobs_of(body: Any) -> list[dict]:
    return body if isinstance(body, list) else body.get("jobs", [])


def _job_body(model: str, dataset: str, version: str | None, method: str, criterion: str, query_budget: int | None,
              holdout: float, seed: int, options: Mapping[str, Any] | None, access: str | None = None,
              exemplar_dataset: str | None = None, preset: str | None = None,
              eval_budget: int | None = None) -> dict[str, Any]:
    """The job request; without a version the gateway uses the model's latest, without an access kind the
    least privileged one the method supports."""
    body = {"model": model, "version": version, "method": method, "dataset": dataset, "criterion": criterion,
            "query_budget": query_budget, "holdout": holdout, "seed": seed, "options": dict(options or {}),
            "access": access, "exemplar_dataset": exemplar_dataset, "preset": preset, "eval_budget": eval_budget}
    return {k: v for k, v in body.items() if v is not None}


def _feature_input(metadata: dict, group_input: str, input_name: str | None) -> tuple[str, str | None]:
    """(name, datatype) of the model's feature input, read from its V2 metadata."""
    inputs = [t for t in metadata.get("inputs", []) if t.get("name") != group_input]
    if input_name is not None:
        inputs = [t for t in inputs if t.get("name") == input_name] or [{"name": input_name}]
    if len(inputs) != 1:
        raise FairpatchError(0, f"cannot tell the model's feature input from its metadata (inputs: "
                                f"{[t.get('name') for t in inputs]}); pass input_name=")
    return inputs[0]["name"], inputs[0].get("datatype")


class _Base:
    def __init__(self, base_url: str | None, admin_key: str | None, timeout: float | httpx.Timeout) -> None:
        self.base_url = (base_url or os.environ.get("FAIRPATCH_URL") or DEFAULT_URL).rstrip("/")
        key = admin_key if admin_key is not None else os.environ.get("FAIRPATCH_ADMIN_KEY")
        self._headers = {"authorization": f"Bearer {key}"} if key else {}
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        # (model, version, group input, input name) -> the feature input's (name, datatype), from metadata
        self._inputs: dict[tuple[str, str | None, str, str | None], tuple[str, str | None]] = {}


class Client(_Base):
    """Synchronous client. `base_url` defaults to $FAIRPATCH_URL (else http://127.0.0.1:8080) and
    `admin_key` to $FAIRPATCH_ADMIN_KEY (sent as `Authorization: Bearer`, needed for /v1 management)."""

    def __init__(self, base_url: str | None = None, admin_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, admin_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _do(self, call: _Call[T]) -> T:
        try:
            r = self._http.send(call.build(self._http))
        except httpx.HTTPError as e:
            raise _unreachable(self.base_url, e) from None
        return call.read(_check(r))

    # health
    def live(self) -> bool:
        return self._do(_Calls.live())

    def ready(self) -> bool:
        """True when the gateway can serve (it answers 503 while Redis is down)."""
        try:
            r = self._http.get("/v2/health/ready")
        except httpx.HTTPError as e:
            raise _unreachable(self.base_url, e) from None
        return r.status_code == 200 and bool(_json(r).get("ready"))

    def server_metadata(self) -> dict:
        return self._do(_Calls.server_metadata())

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        return self._do(_Calls.model_metadata(model, version))

    # models
    def register_model(self, spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
        return self._do(_Calls.register_model(spec))

    def list_models(self) -> list[ModelSpec]:
        return self._do(_Calls.list_models())

    def get_model(self, model: str, version: str = "1") -> ModelSpec:
        return self._do(_Calls.get_model(model, version))

    def delete_model(self, model: str, version: str = "1") -> None:
        self._do(_Calls.delete_model(model, version))

    def check_model(self, model: str, version: str = "1", *, dataset: str | None = None, rows: int = 8) -> dict:
        """Read the upstream again and check the registration against it (and `rows` of a dataset): the
        gateway's findings, or an ApiError whose message says what to register."""
        return self._do(_Calls.check_model(model, version, dataset, rows))

    # model artifacts
    def upload_artifact(self, model: str, data: bytes | str | os.PathLike, version: str = "1") -> ArtifactInfo:
        """Upload the model version's ONNX file (bytes or a path): gradient and weight-access jobs use it."""
        return self._do(_Calls.upload_artifact(model, version, data))

    def get_artifact(self, model: str, version: str = "1") -> ArtifactInfo:
        return self._do(_Calls.get_artifact(model, version))

    def download_artifact(self, model: str, version: str = "1", path: str | os.PathLike | None = None) -> bytes:
        """The ONNX bytes (checked against their sha256 header); written to `path` when given."""
        data = self._do(_Calls.download_artifact(model, version))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def delete_artifact(self, model: str, version: str = "1") -> None:
        self._do(_Calls.delete_artifact(model, version))

    # datasets
    def upload_dataset(self, data: str | os.PathLike | pd.DataFrame | bytes, *, label: str, group: str,
                       name: str | None = None, content_type: str | None = None) -> DatasetInfo:
        """Upload a CSV or Parquet file (by path or bytes) or a DataFrame: feature columns, label, group."""
        return self._do(_Calls.upload_dataset(data, label, group, name, content_type))

    def get_dataset(self, dataset_id: str) -> DatasetInfo:
        return self._do(_Calls.get_dataset(dataset_id))

    def delete_dataset(self, dataset_id: str) -> None:
        self._do(_Calls.delete_dataset(dataset_id))

    # jobs
    def create_job(self, model: str, dataset: str, *, version: str | None = None, method: str = "eraser",
                   criterion: str = "dp", query_budget: int | None = 1000, holdout: float = 0.3, seed: int = 0,
                   options: Mapping[str, Any] | None = None, access: str | None = None,
                   exemplar_dataset: str | None = None, preset: str | None = None,
                   eval_budget: int | None = None) -> Job:
        """Start a patch-training job. `access`: "queries", "zeroth_order", "gradient" or "weights" (the last two
        need the version's artifact, see `upload_artifact`); `exemplar_dataset`: a second dataset id (FORML);
        `preset`: a named set of the method's options (`methods()` lists them), which `options` override;
        `eval_budget`: held-out rows sent to score the patch (default 2000; the job sends at most
        query_budget + eval_budget rows); `holdout` 0: no held-out report."""
        return self._do(_Calls.create_job(_job_body(model, dataset, version, method, criterion, query_budget,
                                                    holdout, seed, options, access, exemplar_dataset, preset,
                                                    eval_budget)))

    def methods(self) -> list[dict[str, Any]]:
        """Every method the gateway runs: access kinds, inference needs, presets, options with their schema."""
        return self._do(_Calls.methods())

    def method(self, name: str) -> dict[str, Any]:
        return self._do(_Calls.method(name))

    def get_job(self, job_id: str) -> Job:
        return self._do(_Calls.get_job(job_id))

    def cancel_job(self, job_id: str) -> Job | None:
        return self._do(_Calls.cancel_job(job_id))

    def list_jobs(self) -> list[Job]:
        return self._do(_Calls.list_jobs())

    def job_report(self, job_id: str, path: str | os.PathLike | None = None) -> str:
        """The job's result as one self-contained HTML page; written to `path` when given."""
        html = self._do(_Calls.job_report(job_id))
        if path is not None:
            Path(path).write_text(html, encoding="utf-8")
        return html

    def condensed_dataset(self, job_id: str) -> DatasetInfo:
        """A new dataset: the job's dataset without the training rows its sample audit drops (FORML jobs' row set
        "condensed")."""
        return self._do(_Calls.condensed_dataset(job_id))

    def wait_job(self, job_id: str, progress: Callable[[Job], None] | None = None, timeout: float | None = 600.0,
                 poll: float = 0.1, max_poll: float = 1.0) -> Job:
        """Poll until the job is finished (succeeded, failed or cancelled) and return it; `progress` sees
        every poll. Polls start at `poll` seconds and back off to `max_poll`. Raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if progress is not None:
                progress(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() + poll > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout:g}s")
            time.sleep(poll)
            poll = min(poll * 1.5, max_poll)

    # patches
    def list_patches(self, model: str, version: str = "1") -> PatchList:
        return self._do(_Calls.list_patches(model, version))

    def activate_patch(self, model: str, patch_id: str, version: str = "1", force: bool = False) -> None:
        """Serve a patch; a patch its job found not to improve its criterion needs `force` (else 409)."""
        self._do(_Calls.activate_patch(model, version, patch_id, force))

    def promote_patch(self, model: str, patch_id: str, version: str = "1", stage: str | None = None,
                      percent: float | None = None, force: bool = False) -> dict[str, Any]:
        """Move a patch along shadow -> canary (percent) -> active; returns its rollout stage."""
        return self._do(_Calls.promote_patch(model, version, patch_id, stage, percent, force))

    def fairness(self, model: str, version: str = "1", window_s: float | None = None) -> dict[str, Any]:
        """The version's live fairness figures, per patch and rollout arm (docs/rollout.md)."""
        return self._do(_Calls.fairness(model, version, window_s))

    def feedback(self, labels: dict[str, int | list[int]]) -> dict[str, Any]:
        """Ground-truth labels by request id (one per row of the request)."""
        return self._do(_Calls.feedback(labels))

    def deactivate_patch(self, model: str, version: str = "1") -> None:
        self._do(_Calls.deactivate_patch(model, version))

    def download_patch(self, patch_id: str, path: str | os.PathLike | None = None) -> bytes:
        """The patch's bytes (a zip, checked against its sha256 header); written to `path` when given."""
        data = self._do(_Calls.download_patch(patch_id))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def upload_patch(self, model: str, data: bytes | str | os.PathLike, version: str = "1") -> str:
        return self._do(_Calls.upload_patch(model, version, data))

    # data plane
    def infer(self, model: str, features: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None, *,
              version: str | None = None, raw: bool = False, input_name: str | None = None,
              group_input: str = "group", output_name: str | None = None,
              parameters: Mapping[str, Any] | None = None, request_id: str | None = None) -> InferResult:
        """V2 inference through the gateway. `groups` (names or int ids, one per row) travel as the
        `group_input` tensor; `raw=True` also returns the upstream's unpatched scores; `request_id` is the V2
        request id, from which a randomized patch draws its decisions (the same id, the same decisions). The
        feature input's
        name (unless given) and datatype are read once per model from its V2 metadata, and `features` are
        cast to that datatype (a float64 array or DataFrame goes as FP32 to an FP32 model)."""
        key = (model, version, group_input, input_name)
        if key not in self._inputs:
            self._inputs[key] = _feature_input(self.model_metadata(model, version), group_input, input_name)
        name, datatype = self._inputs[key]
        body = _infer_body(features, groups, name, datatype, group_input, raw, parameters, request_id)
        return self._do(_Calls.infer(model, version, body, output_name))


class AsyncClient(_Base):
    """The same API as `Client`, for asyncio (`async with AsyncClient(...) as fp: await fp.infer(...)`)."""

    def __init__(self, base_url: str | None = None, admin_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 30.0, transport: httpx.AsyncBaseTransport | None = None,
                 limits: httpx.Limits | None = None) -> None:
        super().__init__(base_url, admin_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                       transport=transport, limits=limits or httpx.Limits())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def _do(self, call: _Call[T]) -> T:
        try:
            r = await self._http.send(call.build(self._http))
        except httpx.HTTPError as e:
            raise _unreachable(self.base_url, e) from None
        return call.read(_check(r))

    # health
    async def live(self) -> bool:
        return await self._do(_Calls.live())

    async def ready(self) -> bool:
        try:
            r = await self._http.get("/v2/health/ready")
        except httpx.HTTPError as e:
            raise _unreachable(self.base_url, e) from None
        return r.status_code == 200 and bool(_json(r).get("ready"))

    async def server_metadata(self) -> dict:
        return await self._do(_Calls.server_metadata())

    async def model_metadata(self, model: str, version: str | None = None) -> dict:
        return await self._do(_Calls.model_metadata(model, version))

    # models
    async def register_model(self, spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
        return await self._do(_Calls.register_model(spec))

    async def list_models(self) -> list[ModelSpec]:
        return await self._do(_Calls.list_models())

    async def get_model(self, model: str, version: str = "1") -> ModelSpec:
        return await self._do(_Calls.get_model(model, version))

    async def delete_model(self, model: str, version: str = "1") -> None:
        await self._do(_Calls.delete_model(model, version))

    async def check_model(self, model: str, version: str = "1", *, dataset: str | None = None,
                          rows: int = 8) -> dict:
        return await self._do(_Calls.check_model(model, version, dataset, rows))

    # model artifacts
    async def upload_artifact(self, model: str, data: bytes | str | os.PathLike, version: str = "1") -> ArtifactInfo:
        return await self._do(_Calls.upload_artifact(model, version, data))

    async def get_artifact(self, model: str, version: str = "1") -> ArtifactInfo:
        return await self._do(_Calls.get_artifact(model, version))

    async def download_artifact(self, model: str, version: str = "1",
                                path: str | os.PathLike | None = None) -> bytes:
        data = await self._do(_Calls.download_artifact(model, version))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def delete_artifact(self, model: str, version: str = "1") -> None:
        await self._do(_Calls.delete_artifact(model, version))

    # datasets
    async def upload_dataset(self, data: str | os.PathLike | pd.DataFrame | bytes, *, label: str, group: str,
                             name: str | None = None, content_type: str | None = None) -> DatasetInfo:
        return await self._do(_Calls.upload_dataset(data, label, group, name, content_type))

    async def get_dataset(self, dataset_id: str) -> DatasetInfo:
        return await self._do(_Calls.get_dataset(dataset_id))

    async def delete_dataset(self, dataset_id: str) -> None:
        await self._do(_Calls.delete_dataset(dataset_id))

    # jobs
    async def create_job(self, model: str, dataset: str, *, version: str | None = None, method: str = "eraser",
                         criterion: str = "dp", query_budget: int | None = 1000, holdout: float = 0.3, seed: int = 0,
                         options: Mapping[str, Any] | None = None, access: str | None = None,
                         exemplar_dataset: str | None = None, preset: str | None = None,
                         eval_budget: int | None = None) -> Job:
        return await self._do(_Calls.create_job(_job_body(model, dataset, version, method, criterion, query_budget,
                                                          holdout, seed, options, access, exemplar_dataset,
                                                          preset, eval_budget)))

    async def methods(self) -> list[dict[str, Any]]:
        return await self._do(_Calls.methods())

    async def method(self, name: str) -> dict[str, Any]:
        return await self._do(_Calls.method(name))

    async def get_job(self, job_id: str) -> Job:
        return await self._do(_Calls.get_job(job_id))

    async def cancel_job(self, job_id: str) -> Job | None:
        return await self._do(_Calls.cancel_job(job_id))

    async def list_jobs(self) -> list[Job]:
        return await self._do(_Calls.list_jobs())

    async def job_report(self, job_id: str, path: str | os.PathLike | None = None) -> str:
        html = await self._do(_Calls.job_report(job_id))
        if path is not None:
            Path(path).write_text(html, encoding="utf-8")
        return html

    async def condensed_dataset(self, job_id: str) -> DatasetInfo:
        return await self._do(_Calls.condensed_dataset(job_id))

    async def wait_job(self, job_id: str, progress: Callable[[Job], None] | None = None,
                       timeout: float | None = 600.0, poll: float = 0.1, max_poll: float = 1.0) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if progress is not None:
                progress(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() + poll > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout:g}s")
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, max_poll)

    # patches
    async def list_patches(self, model: str, version: str = "1") -> PatchList:
        return await self._do(_Calls.list_patches(model, version))

    async def activate_patch(self, model: str, patch_id: str, version: str = "1", force: bool = False) -> None:
        await self._do(_Calls.activate_patch(model, version, patch_id, force))

    async def promote_patch(self, model: str, patch_id: str, version: str = "1", stage: str | None = None,
                            percent: float | None = None, force: bool = False) -> dict[str, Any]:
        return await self._do(_Calls.promote_patch(model, version, patch_id, stage, percent, force))

    async def fairness(self, model: str, version: str = "1", window_s: float | None = None) -> dict[str, Any]:
        return await self._do(_Calls.fairness(model, version, window_s))

    async def feedback(self, labels: dict[str, int | list[int]]) -> dict[str, Any]:
        return await self._do(_Calls.feedback(labels))

    async def deactivate_patch(self, model: str, version: str = "1") -> None:
        await self._do(_Calls.deactivate_patch(model, version))

    async def download_patch(self, patch_id: str, path: str | os.PathLike | None = None) -> bytes:
        data = await self._do(_Calls.download_patch(patch_id))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def upload_patch(self, model: str, data: bytes | str | os.PathLike, version: str = "1") -> str:
        return await self._do(_Calls.upload_patch(model, version, data))

    # data plane
    async def infer(self, model: str, features: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None, *,
                    version: str | None = None, raw: bool = False, input_name: str | None = None,
                    group_input: str = "group", output_name: str | None = None,
                    parameters: Mapping[str, Any] | None = None, request_id: str | None = None) -> InferResult:
        key = (model, version, group_input, input_name)
        if key not in self._inputs:
            self._inputs[key] = _feature_input(await self.model_metadata(model, version), group_input, input_name)
        name, datatype = self._inputs[key]
        body = _infer_body(features, groups, name, datatype, group_input, raw, parameters, request_id)
        return await self._do(_Calls.infer(model, version, body, output_name))
