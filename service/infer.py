"""The data plane: OIP V2 and KServe V1 inference in front of the registered upstream, patched.

One template, `serve`, for both protocols (docs/api.md, "Inference"): resolve the model version from
an in-process cache (the registry in Redis is re-read at most every `SPEC_TTL_S` per model), parse
and validate the request (a V1 request becomes one V2 input, so both are held to service.oip's tensor
rule), take the active patch's runner from the patch store's memory (no Redis round trip), strip the
group input, run the patch's input transform, call the upstream over the pooled client (or, for a
weight patch, its own model: service.patch_serving), turn the scores into log-probabilities, run the
output transform, and answer in the caller's protocol with the scores in the model's own kind and
shape. Every other upstream output passes through, checked by the same rule (service.upstream).

Patch graphs are tiny (a few table lookups and adds over [N, C]), so they run inline on the event
loop: a thread hop would cost more than the work. The upstream's V2 metadata is fetched once per
model version (and again when its registration changes) and cached; requests are checked against it
before anything is sent, so a wrong shape or datatype is the client's 400, not an upstream error.

Requests may use the V2 binary tensor extension (Triton's client sends binary data by default): the
JSON header's length comes in `Inference-Header-Content-Length` and tensors with
`parameters.binary_data_size` take their bytes, in order, from what follows (service.binary_tensors).
Answers are JSON, or binary for the outputs the caller asks so for. An upstream registered with
`binary_data` is sent tensors, and asked for its outputs, as binary data.

The inference POSTs come in by one door, service.fast_path's endpoint, which reads the body, renders
errors and sends the `Answer`; the routes here serve model metadata and readiness.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Annotated, Any, Generic, TypeVar

import numpy as np
import orjson
import pydantic_core
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from starlette.datastructures import State

from patcher.apply import PatchRunner, UnknownGroupError
from patcher.patch import PatchError
from patcher.scores import from_log_probs, to_log_probs
from service import binary_tensors, live_observe, patch_serving
from service.binary_tensors import CONTENT_TYPE, read_request
from service.errors import ApiError
from service.estimated_groups import estimator
from service.oip import (
    NUMPY_DTYPES,
    ErrorResponse,
    InferRequest,
    InferResponse,
    InvalidRequest,
    MetadataTensor,
    ModelMetadata,
    ModelReadyResponse,
    PlainRequest,
    RequestOutput,
    Tensor,
    check_tensors,
    refuse_bools,
    rows_to_numpy,
    tensor_of,
    to_numpy,
    validate_json,
)
from service.openapi import Operation
from service.patch_serving import SERVED_BY_HEADER, SERVED_BY_PATCH, SERVED_BY_UPSTREAM
from service.probe import Probe
from service.registry import ModelRegistry, ModelSpec
from service.upstream import UpstreamClient, UpstreamError, output_array, scores_array, scores_index

log = logging.getLogger("fairpatch.service")

SPEC_TTL_S = 2.0  # how stale a replica's view of a registration may get
MISS_TTL_S = 0.5  # unknown models are remembered briefly, so a flood of them does not hammer Redis
STALE_WAIT_S = 0.25  # how long a request waits for a reload before it is served the expired value
METADATA_TTL_S = 300.0  # upstream signatures change only on redeploy; a registration change refetches at once
MAX_CACHED = 10_000
PATCH_HEADER = "fairpatch-patch"
RAW_OUTPUT = "fairpatch_raw"
RAW_PARAMETER = "fairpatch_raw"
BINARY_HEADER = binary_tensors.HEADER

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
BodyReader = Callable[[], Awaitable[bytes]]


# --- caches ------------------------------------------------------------------------------------------

class TtlCache(Generic[K, V]):
    """Values that expire, loaded once however many requests ask at the same moment. When a reload
    fails, the last value is served a while longer rather than failing requests (Redis blips)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]], ttl: Callable[[V], float],
                  valid: Callable[[V], bool] | None = None) -> V:
        hit = self._values.get(key)
        if hit is not None and hit[0] > self._clock() and (valid is None or valid(hit[1])):
            return hit[1]
        stale = hit[1] if hit is not None and (valid is None or valid(hit[1])) else None
        future = self._loading.get(key)
        if future is None:
            future = self._loading[key] = asyncio.ensure_future(self._load(key, load, ttl, stale))
            future.add_done_callback(_retrieve)  # a failure nobody waits for any more is not logged as lost
        elif stale is not None:
            return stale  # a reload is under way already: its first caller waits for it, no one else
        if stale is None:
            return await asyncio.shield(future)  # a caller that goes away does not cancel the load for others
        # A reload that Redis does not answer (a cut link waits out the client's socket timeout, seconds) must
        # not stall requests: past STALE_WAIT_S the last value is served and the reload goes on behind.
        try:
            return await asyncio.wait_for(asyncio.shield(future), STALE_WAIT_S)
        except TimeoutError:
            return stale

    def fresh(self, key: K) -> V | None:
        """The cached value for `key` while it has not expired, else None: the hot path's lookup, with no
        coroutine to run."""
        hit = self._values.get(key)
        return hit[1] if hit is not None and hit[0] > self._clock() else None

    async def _load(self, key: K, load: Callable[[], Awaitable[V]], ttl: Callable[[V], float],
                    stale: V | None) -> V:
        try:
            value = await load()
        except Exception as e:
            if stale is None:
                raise
            log.warning("reloading %s failed (%s); serving the cached value a while longer", key, e)
            value = stale
        finally:
            self._loading.pop(key, None)
        if len(self._values) >= MAX_CACHED:
            now = self._clock()
            self._values = {k: v for k, v in self._values.items() if v[0] > now}
            if len(self._values) >= MAX_CACHED:
                self._values.clear()
        self._values[key] = (self._clock() + ttl(value), value)
        return value

    def forget(self, match: Callable[[K], bool]) -> None:
        for key in [k for k in self._values if match(k)]:
            del self._values[key]


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class Signature:
    """A model version's upstream signature and what the template works out from it, once per fetch rather than
    per request: its inputs by name, the feature input's and the scores output's names, and the outputs a request
    that names none asks the upstream for. `upstream` is the registration's upstream it was fetched for (the entry
    is valid while the registration's is equal; the last equal one seen is kept, so the next check is `is`)."""

    __slots__ = ("upstream", "meta", "declared", "feature_name", "scores_name", "default_outputs")

    def __init__(self, upstream: Any, meta: ModelMetadata) -> None:
        self.upstream, self.meta = upstream, meta
        self.declared = {t.name: t for t in meta.inputs}
        self.feature_name: str = upstream.input_name or (meta.inputs[0].name if meta.inputs else "")
        self.scores_name: str = upstream.output_name or (meta.outputs[0].name if meta.outputs else "")
        self.default_outputs = self.outputs_for(None)

    def outputs_for(self, wanted: list[str] | None) -> list[RequestOutput]:
        """The outputs asked of the upstream: those the caller wants (default: every declared one) and the
        scores, always by name (a server's default answer may leave the scores out: MLServer's scikit-learn
        runtime answers `predict` alone)."""
        asked = wanted if wanted is not None else [t.name for t in self.meta.outputs]
        return [RequestOutput(name=n) for n in dict.fromkeys([*asked, self.scores_name])]

    def serves(self, upstream: Any) -> bool:
        if self.upstream is upstream:
            return True
        if self.upstream == upstream:  # the registration re-read (every SPEC_TTL_S): the same upstream
            self.upstream = upstream
            return True
        return False


class ModelCache:
    """Registrations (from the registry) and upstream metadata (from the upstream), both in memory."""

    def __init__(self, registry: ModelRegistry, upstream: UpstreamClient) -> None:
        self.registry = registry
        self.upstream = upstream
        self._specs: TtlCache[tuple[str, str | None], ModelSpec | None] = TtlCache()
        self._metadata: TtlCache[tuple[str, str], Signature] = TtlCache()

    async def _lookup(self, name: str, version: str | None) -> ModelSpec | None:
        async def load() -> ModelSpec | None:
            try:
                return await (self.registry.get(name, version) if version else self.registry.latest(name))
            except (RedisError, OSError) as e:
                raise ApiError(503, f"the model registry (Redis) is unavailable ({e}); retry shortly") from None

        return await self._specs.get((name, version), load, lambda s: SPEC_TTL_S if s else MISS_TTL_S)

    def fresh_spec(self, name: str, version: str | None = None) -> ModelSpec | None:
        """`spec` when it is cached and fresh, else None (then await `spec`)."""
        return self._specs.fresh((name, version))

    def fresh_signature(self, spec: ModelSpec) -> Signature | None:
        """`signature` when it is cached and fresh for the spec's upstream, else None (then await `signature`)."""
        hit = self._metadata.fresh((spec.name, spec.version))
        return hit if hit is not None and hit.serves(spec.upstream) else None

    async def spec(self, name: str, version: str | None = None) -> ModelSpec:
        """The registration of `name` at `version` (latest when None); 404 when there is none."""
        spec = await self._lookup(name, version)
        if spec is not None:
            return spec
        latest = await self._lookup(name, None) if version else None
        if latest is None:
            raise ApiError(404, f"unknown model '{name}'; register it first (POST /v1/models)")
        raise ApiError(404, f"unknown model version: model '{name}' has no version '{version}' "
                            f"(the latest is '{latest.version}')")

    async def signature(self, spec: ModelSpec) -> Signature:
        """The upstream's signature under the gateway's name for the model version, with what the template
        works out from it."""
        upstream = spec.upstream

        async def load() -> Signature:
            meta = await self.upstream.metadata(spec)
            return Signature(upstream, meta.model_copy(update={"name": spec.name, "versions": [spec.version]}))

        return await self._metadata.get((spec.name, spec.version), load, lambda _v: METADATA_TTL_S,
                                        valid=lambda v: v.serves(upstream))

    async def metadata(self, spec: ModelSpec) -> ModelMetadata:
        """The upstream's signature under the gateway's name for the model version."""
        return (await self.signature(spec)).meta

    def forget(self, name: str, version: str | None = None) -> None:
        """Drop what is cached for a model (all versions when None): the next request re-reads it."""
        self._specs.forget(lambda k: k[0] == name and (version is None or k[1] in (None, version)))
        self._metadata.forget(lambda k: k[0] == name and (version is None or k[1] == version))


def forget(app: FastAPI, name: str, version: str | None = None) -> None:
    """For the management API: make this replica see a (de)registration at once, not within seconds."""
    cache = getattr(app.state, "model_cache", None)
    if cache is not None:
        cache.forget(name, version)


_patch_ids: weakref.WeakKeyDictionary[PatchRunner, str] = weakref.WeakKeyDictionary()


def patch_id(runner: PatchRunner | None) -> str | None:
    """The active patch's id, hashed once per runner rather than per request."""
    if runner is None:
        return None
    pid = _patch_ids.get(runner)
    if pid is None:
        pid = _patch_ids[runner] = runner.patch.id
    return pid


# --- wire shapes of the KServe V1 protocol -----------------------------------------------------------

class V1Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instances: list[Any] = Field(description="rows of numbers, [N, ...]")
    groups: list[Annotated[str, Field(strict=True)] | Annotated[int, Field(strict=True)]] | None = Field(
        None, description="each row's group: all names or all ids")


class V1Response(BaseModel):
    predictions: list[Any] = Field(description="the patched scores, one row per instance")


# --- one call, whichever protocol ---------------------------------------------------------------------

@dataclass(slots=True)
class Call:
    """An inference request, parsed: where the protocols' differences end. A V1 request is one V2 input (its
    instances, named and typed as the model's feature input once that is known) plus a group input."""

    protocol: str  # "v2" or "v1": how the request came, and how it is answered
    request: PlainRequest  # V1: the instances as an input named "instances" until `_v1_inputs` names it
    body: bytes  # the caller's bytes, forwarded as they are when nothing in them changes
    binary: str | None = None  # the caller's Inference-Header-Content-Length
    inputs: list[Tensor] = field(default_factory=list)  # the feature inputs (the group input stripped)
    group: Tensor | None = None

    @property
    def raw_wanted(self) -> bool:
        return bool((self.request.parameters or {}).get(RAW_PARAMETER))


def parse_call(protocol: str, spec: ModelSpec, body: bytes, binary: str | None) -> Call:
    """The request in either protocol, by the same tensor rules (service.oip), its group input set apart."""
    if protocol == "v2":
        req = read_request(body, binary)
    else:
        if not body:
            raise InvalidRequest('empty request body; expected {"instances": [[...], ...]}')
        v1 = validate_json(V1Request, body, "V1 request")
        inputs = [Tensor("instances", [], "FP32", None, v1.instances)]
        if v1.groups is not None:
            inputs.append(_v1_groups(spec, v1.groups))
        req = PlainRequest(None, None, inputs, None)
    call = Call(protocol, req, body, binary)
    for t in req.inputs:
        if t.name == spec.group_input:
            call.group = t
        else:
            call.inputs.append(t)
    if not call.inputs:
        raise InvalidRequest(f"no feature input: the request has only the group input '{spec.group_input}'")
    if protocol == "v1":
        refuse_bools(body, req.inputs)
    return call


def _v1_groups(spec: ModelSpec, groups: list[str | int]) -> Tensor:
    """V1 `groups` as the V2 group input: BYTES names or INT64 ids."""
    if all(type(g) is str for g in groups):
        datatype = "BYTES"
    elif all(type(g) is int for g in groups):
        datatype = "INT64"
    else:
        raise InvalidRequest("groups must be all group names (strings) or all group ids (integers)")
    return Tensor(spec.group_input, [len(groups)], datatype, None, groups)


def _v1_inputs(call: Call, spec: ModelSpec, meta: ModelMetadata | None) -> None:
    """Name and type a V1 request's instances as the model's one floating-point input."""
    datatype, name = "FP32", spec.upstream.input_name or "input"
    if meta is not None:
        named = [t for t in meta.inputs if t.name == spec.upstream.input_name] if spec.upstream.input_name \
            else meta.inputs
        if len(named) != 1 or NUMPY_DTYPES[named[0].datatype].kind != "f":
            raise InvalidRequest(f"model '{spec.name}' does not take one floating-point input; use the V2 "
                                 f"endpoint /v2/models/{spec.name}/infer")
        datatype, name = named[0].datatype, named[0].name
    X = rows_to_numpy(call.inputs[0].data, datatype, "instances")
    call.inputs = [Tensor(name, list(X.shape), datatype, None, X.ravel())]


# --- the patch, applied ------------------------------------------------------------------------------

def group_ids(runner: PatchRunner | None, spec: ModelSpec, groups: np.ndarray | None, n: int) -> np.ndarray | None:
    """Each row's group as the patch's int64 id; 400 for a missing (when needed) or unknown group."""
    if groups is None:
        if runner is not None and runner.needs_group:
            known = ", ".join(runner.patch.groups)
            raise InvalidRequest(f"the active patch needs every row's group: add the input '{spec.group_input}' "
                                 f"(BYTES group names: {known}; or INT64 ids)")
        return None
    if groups.dtype.kind not in "iuO" or groups.ndim not in (1, 2) or (groups.ndim == 2 and groups.shape[1] != 1):
        raise InvalidRequest(f"the group input '{spec.group_input}' must be [N] or [N, 1] BYTES group names "
                             "or INT64 ids")
    groups = groups.reshape(-1)
    if len(groups) != n:
        raise InvalidRequest(f"the group input '{spec.group_input}' has {len(groups)} values for {n} rows")
    if runner is not None and runner.patch.groups:
        try:
            return runner.group_ids(groups)
        except UnknownGroupError as e:
            raise InvalidRequest(str(e)) from None
    if spec.groups and groups.dtype.kind == "O":
        unknown = [g for g in groups if g not in spec.groups]
        if unknown:
            raise InvalidRequest(f"unknown group {unknown[0]!r}; model '{spec.name}' knows {spec.groups}")
    return None


def transform_inputs(runner: PatchRunner | None, X: np.ndarray) -> np.ndarray:
    """The rows the model sees: the patch's input transform applied (an empty batch passes as it is)."""
    if runner is None or not len(X):
        return X
    try:
        return runner.transform_inputs(X)
    except PatchError as e:
        raise InvalidRequest(str(e)) from None


def apply_patch(runner: PatchRunner, spec: ModelSpec, features: np.ndarray, scores: np.ndarray,
                groups: np.ndarray | None, request_id: str | None = None, scores_kind: str | None = None,
                keep: dict[str, Any] | None = None) -> np.ndarray:
    """The patched scores in the model's own kind, shape and dtype. `features` are the rows the model saw
    (after the patch's input transform, as the job worker evaluates a patch); `scores_kind` what `scores` are
    (default: the registered output kind); randomized decisions are drawn from `request_id` (the same id, the
    same decisions); `keep`: graph values wanted as well (PatchRunner.transform_outputs)."""
    n = len(features)
    if scores.ndim not in (1, 2) or len(scores) != n:
        raise UpstreamError(f"upstream {spec.upstream.url}: scores have shape {list(scores.shape)}; expected "
                            f"[{n}], [{n}, 1] or [{n}, C]", url=spec.upstream.url)
    kind = spec.upstream.output_kind
    dtype = scores.dtype if scores.dtype.kind == "f" and scores_kind is None else np.float32
    if n == 0:  # nothing to transform: the empty batch in the answer's shape
        return np.zeros(scores.shape, dtype=dtype)
    try:
        patched = runner.transform_outputs(features, to_log_probs(scores, scores_kind or kind), groups, request_id,
                                           keep)
    except (UnknownGroupError, PatchError) as e:
        raise InvalidRequest(str(e)) from None
    except Exception as e:  # noqa: BLE001 - onnxruntime: the patch does not fit this model's outputs
        raise ApiError(500, f"the active patch {patch_id(runner)[:12]} cannot be applied to model "
                            f"'{spec.name}' version '{spec.version}' ({type(e).__name__}: {e}); deactivate it "
                            "or fix the registration") from None
    out = from_log_probs(patched, kind, 1 if scores.ndim == 1 else scores.shape[1])
    return out.reshape(scores.shape).astype(dtype, copy=False)


def _features(t: Tensor) -> np.ndarray:
    X = to_numpy(t)
    if X.dtype.kind not in "fiub" or X.ndim == 0:
        raise InvalidRequest(f"input '{t.name}' must be a numeric tensor of rows, [N, ...]")
    return X


def _forward_parameters(parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Request parameters for the upstream: ours (`fairpatch_*`) and binary-output requests stay here."""
    if not parameters:
        return None
    kept = {k: v for k, v in parameters.items() if not k.startswith("fairpatch_") and k != "binary_data_output"}
    return kept or None


# --- answers -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Answer:
    """A 200 answer: the body, the active patch's id (None: unpatched) and what served it. The inference
    endpoint (service.fast_path) sends it; the metadata route wraps it in a Response."""

    body: bytes
    patch: str | None
    served_by: str = SERVED_BY_UPSTREAM
    binary_header: int | None = None  # set: binary tensor data follows a JSON header of this length

    def response(self) -> Response:
        media_type = "application/json" if self.binary_header is None else binary_tensors.CONTENT_TYPE
        headers = {PATCH_HEADER: self.patch or "none", SERVED_BY_HEADER: self.served_by}
        if self.binary_header is not None:
            headers[BINARY_HEADER] = str(self.binary_header)
        return Response(self.body, media_type=media_type, headers=headers)


def _answer(payload: BaseModel | dict, pid: str | None, served_by: str = SERVED_BY_UPSTREAM) -> Answer:
    body = payload.model_dump_json(exclude_none=True).encode() if isinstance(payload, BaseModel) \
        else pydantic_core.to_json(payload)
    return Answer(body, pid, served_by)


def _infer_answer(response: dict[str, Any], outputs: list[Tensor], req: PlainRequest, pid: str | None,
                  served_by: str = SERVED_BY_UPSTREAM) -> Answer:
    """A V2 infer answer (`response`: its fields but the outputs, None for absent): JSON, or with the outputs
    the caller asked for as binary data (Triton's rules: `parameters.binary_data` on a requested output, else
    the request's `binary_data_output`). Serialized from a plain dict: an InferResponse object built only to
    be written out would cost more than the writing."""
    header = {k: v for k, v in response.items() if v is not None}
    asked = {o.name: o.parameters for o in req.outputs or ()}
    binary = [binary_tensors.wants_binary(asked.get(o.name), req.parameters) for o in outputs]
    if not any(binary):  # an upstream's binary outputs come as arrays (service.upstream.read_v2): listed here
        listed = [o.json() if type(o.data) is not np.ndarray else {**o.json(), "data": o.data.tolist()}
                  for o in outputs]
        return Answer(_json({**header, "outputs": listed}), pid, served_by)
    tensors = [(o.name, o.data if o.datatype == "BYTES" else np.asarray(o.data, dtype=NUMPY_DTYPES[o.datatype]),
                o.datatype, o.shape, o.parameters) for o in outputs]
    body, n = binary_tensors.encode_response(header, tensors, binary)
    return Answer(body, pid, served_by, n)


def _json(doc: dict[str, Any]) -> bytes:
    """An answer as JSON: by orjson (half pydantic-core's time on a 64-row answer, the same bytes), or by
    pydantic-core for what orjson refuses (an integer past 64 bits an upstream passed through, say)."""
    try:
        return orjson.dumps(doc)
    except TypeError:  # orjson.JSONEncodeError is one
        return pydantic_core.to_json(doc)


def _reply(call: Call, spec: ModelSpec, runner: PatchRunner | None, outputs: list[Tensor],
           scores: np.ndarray, served_by: str, parameters: dict[str, Any] | None = None) -> Answer:
    """The answer in the caller's protocol: V2 outputs, or V1 predictions (the patched scores)."""
    if call.protocol == "v1":
        return _answer({"predictions": scores.tolist()}, patch_id(runner), served_by)
    response = {"model_name": spec.name, "model_version": spec.version, "id": call.request.id,
                "parameters": parameters}
    return _infer_answer(response, outputs, call.request, patch_id(runner), served_by)


# --- the template ------------------------------------------------------------------------------------

async def serve(state: State, protocol: str, model_name: str, model_version: str | None, read_body: BodyReader,
                binary: str | None = None, probe: Probe | None = None) -> Answer:
    """One inference request, V2 or V1: parse and validate -> strip the group -> input transform -> the
    upstream, or the active weight patch's own model -> output transform -> the answer in the caller's
    protocol. The body is read only once the model is known (an unknown model is a 404 whatever was sent);
    `binary` is the Inference-Header-Content-Length; `probe`, when given, is told what the request met (the
    model, the patch, the upstream's and the patch's time) for the metrics and the payload log."""
    cache: ModelCache = state.model_cache
    spec = cache.fresh_spec(model_name, model_version) or await cache.spec(model_name, model_version)
    if probe is not None:
        probe.spec = spec
    call = parse_call(protocol, spec, await read_body(), binary)
    known, runner = state.patches.runner_now(spec.name, spec.version)  # no coroutine when it is in memory
    if not known:
        runner = await state.patches.runner(spec.name, spec.version)
    live = state.live
    stage = state.patches.stage_now(spec.name, spec.version) if runner is not None else None
    counted = live_observe.counts_request(live, call, runner)  # the group given, or the patch estimates it
    if stage is None and not counted:  # nothing to record, no rollout: the template
        return await _serve(state, call, spec, runner, binary, None, probe)
    # The rollout arm (service.rollout) picks what serves; live fairness records it (service.live_observe).
    arm, served, shadow = live_observe.arm_of(stage, runner, call.request.id)
    trace = Trace() if counted else None
    answer = await _serve(state, call, spec, served, binary, trace, probe)
    if trace is not None and trace.raw is not None:
        patched = None
        if shadow is not None:
            patched = await _shadow_scores(state, call, spec, shadow, trace)
        live_observe.record(live, spec, call, runner, patch_id(runner), arm, trace, patched)  # the id hashed once
    return answer


@dataclass(slots=True)
class Trace:
    """What live fairness needs of one served request: the scores before and after the patch (in `raw_kind`
    and the model's kind) and the feature rows as the caller sent them."""

    raw: np.ndarray | None = None
    served: np.ndarray | None = None
    raw_kind: str | None = None
    features: np.ndarray | None = None
    feature_input: Tensor | None = None
    kept: dict[str, Any] | None = None  # values the patch's output transform computed anyway (`_kept`)


async def _shadow_scores(state: State, call: Call, spec: ModelSpec, runner: PatchRunner,
                         trace: Trace) -> np.ndarray | None:
    """The patch's answer for a request the raw model served (shadow): the served scores through the patch, or
    for a trigger a second upstream call, or the weight patch's own model. Never fails the request."""
    try:
        X = trace.features
        groups = group_ids(runner, spec, None if call.group is None else to_numpy(call.group), len(X))
        sent = transform_inputs(runner, X)
        if runner.replaces_model:
            logits = patch_serving.logits(runner, spec, sent)
            return apply_patch(runner, spec, sent, logits, groups, call.request.id, scores_kind="logits")
        scores = trace.raw if sent is X else await state.upstream.scores(
            spec, sent, input_name=trace.feature_input.name, datatype=trace.feature_input.datatype)
        return apply_patch(runner, spec, sent, scores, groups, call.request.id)
    except Exception as e:  # noqa: BLE001 - the shadow is observed, never served
        live_observe.shadow_failed(spec, runner, e)
        return None


async def _serve(state: State, call: Call, spec: ModelSpec, runner: PatchRunner | None, binary: str | None,
                 trace: Trace | None, probe: Probe | None) -> Answer:
    """The template proper, with `runner` serving (None: unpatched); `trace`, when given, is filled in."""
    cache: ModelCache = state.model_cache
    if probe is not None:
        probe.patch, probe.request_id = patch_id(runner), call.request.id
    if runner is not None and runner.replaces_model:
        t = perf_counter()
        answer = _serve_weight_patch(call, spec, runner, trace)
        if probe is not None:
            probe.add_patch_time(t)
        return answer
    sig = (cache.fresh_signature(spec) or await cache.signature(spec)) if spec.upstream.protocol == "v2" else None
    if call.protocol == "v1":
        _v1_inputs(call, spec, None if sig is None else sig.meta)
    features = _feature_input(call, spec, sig)
    X = _features(features)
    groups = group_ids(runner, spec, None if call.group is None else to_numpy(call.group), len(X))
    t = perf_counter()
    sent = transform_inputs(runner, X)
    if probe is not None and runner is not None:
        probe.add_patch_time(t)
    upstream: UpstreamClient = state.upstream
    if trace is not None:
        trace.features, trace.feature_input, trace.raw_kind = X, features, spec.upstream.output_kind

    if sig is None:  # V1 / MLflow upstream: one matrix in, one scores matrix out
        t = perf_counter()
        scores = await upstream.scores(spec, sent)
        if probe is not None:
            probe.upstream_s = perf_counter() - t
        t = perf_counter()
        kept = _kept(trace, runner, sent, X)
        out = scores if runner is None else apply_patch(runner, spec, sent, scores, groups, call.request.id,
                                                        keep=kept)
        if probe is not None and runner is not None:
            probe.add_patch_time(t)
        if trace is not None:
            trace.raw, trace.served = scores, out
        outputs = [tensor_of(spec.upstream.output_name or "predictions", out.astype(np.float32, copy=False))]
        if call.raw_wanted:  # the name as in upstream.synthesized_metadata
            outputs.append(tensor_of(RAW_OUTPUT, scores.astype(np.float32, copy=False)))
        return _reply(call, spec, runner, outputs, out, SERVED_BY_UPSTREAM)

    req = call.request
    inputs = call.inputs
    # Rows the input transform changed go in the request's datatype; a binary leg takes the converted rows as
    # they are rather than converting the request's list a second time.
    if sent is not X or (spec.upstream.uses_binary and not isinstance(features.data, np.ndarray)):
        features_sent = Tensor(features.name, list(sent.shape), features.datatype, features.parameters,
                               np.asarray(sent, dtype=NUMPY_DTYPES[features.datatype]).ravel())
        inputs = [features_sent if t is features else t for t in inputs]
    scores_name = sig.scores_name
    wanted = [o.name for o in req.outputs] if req.outputs else None
    # Outputs are always asked for by name (only names go upstream; binary_data etc. are answered here).
    forward_outputs = sig.default_outputs if wanted is None else sig.outputs_for(wanted)
    forward_parameters = _forward_parameters(req.parameters)
    t = perf_counter()
    if call.protocol == "v2" and binary is None and call.group is None and sent is X and req.outputs is None \
            and not spec.upstream.uses_binary and forward_parameters == req.parameters:
        # nothing to change but the outputs asked for: the caller's bytes, with them put in
        result = await upstream.forward_v2(spec, asking_for(call.body, forward_outputs))
    else:
        result = await upstream.infer_v2(spec, inputs, forward_outputs, forward_parameters)
    if probe is not None:
        probe.upstream_s = perf_counter() - t
    url = spec.upstream.url
    i = scores_index(result, scores_name, url)
    raw = result.outputs[i]
    outputs = list(result.outputs)
    # every output by the tensor rule (service.upstream.read_v2 and output_array), each converted once
    arrays = [scores_array(o, url) if j == i else output_array(o, url) for j, o in enumerate(outputs)]
    scores = arrays[i]
    if trace is not None:
        trace.raw = scores
    if runner is not None:
        t = perf_counter()
        scores = apply_patch(runner, spec, sent, scores, groups, req.id, keep=_kept(trace, runner, sent, X))
        outputs[i] = tensor_of(raw.name, scores, raw.parameters)
        if probe is not None:
            probe.add_patch_time(t)
    if trace is not None:
        trace.served = scores
    if wanted is not None:
        outputs = [o for o in outputs if o.name in wanted]
    if call.raw_wanted:
        outputs.append(Tensor(RAW_OUTPUT, raw.shape, raw.datatype, None, raw.data))
    return _reply(call, spec, runner, outputs, scores, SERVED_BY_UPSTREAM, result.parameters)


def _kept(trace: Trace | None, runner: PatchRunner | None, sent: np.ndarray, X: np.ndarray) -> dict[str, Any] | None:
    """For live fairness of a request without its group: the patch's attribute estimator runs inside its output
    transform, on the same rows when there is no input transform, so its scores are kept from there (into
    `trace.kept`) rather than computed a second time (service.estimated_groups)."""
    if trace is None or runner is None or sent is not X:
        return None
    est = estimator(runner)
    if est is None or est.output is None:
        return None
    trace.kept = {est.output: None}
    return trace.kept


def asking_for(body: bytes, outputs: list[RequestOutput]) -> bytes:
    """A JSON infer request that names no outputs, with `outputs` put in at the front of its object: cheaper
    than re-encoding a large tensor."""
    start = body.index(b"{")  # the request parsed as a JSON object, so there is one
    head = pydantic_core.to_json({"outputs": [{"name": o.name} for o in outputs]})
    return body[:start] + head[:-1] + b"," + body[start + 1:]


def _feature_input(call: Call, spec: ModelSpec, sig: Signature | None) -> Tensor:
    """The input that carries the rows, the request checked against the upstream's signature when known."""
    if sig is not None:
        meta = sig.meta
        check_tensors(meta, call.inputs, call.request.outputs, sig.declared)
        name = sig.feature_name
        found = next((t for t in call.inputs if t.name == name), None)
        if found is None:  # check_tensors passed, so the registration names an input the model lacks
            raise UpstreamError(f"model '{spec.name}' is registered with input_name '{name}', which upstream "
                                f"{spec.upstream.url} does not declare (its inputs: "
                                f"{', '.join(t.name for t in meta.inputs)}); fix the registration",
                                url=spec.upstream.url)
        return found
    if len(call.inputs) == 1:
        return call.inputs[0]
    raise InvalidRequest(f"model '{spec.name}' takes one feature input (plus '{spec.group_input}'); "
                         f"got {', '.join(t.name for t in call.inputs)}")


def _serve_weight_patch(call: Call, spec: ModelSpec, runner: PatchRunner, trace: Trace | None = None) -> Answer:
    """The template with the active weight patch's own model in the upstream's place (service.patch_serving)."""
    if call.protocol == "v1":
        _v1_inputs(call, spec, None)
        call.inputs = [replace(call.inputs[0], name=patch_serving.input_name(spec, runner))]
    name = patch_serving.output_name(spec, runner)
    unknown = [o.name for o in call.request.outputs or [] if o.name != name]
    if unknown:
        raise InvalidRequest(f"model '{spec.name}' is served by its active weight patch, which has one output, "
                             f"'{name}'; no {', '.join(repr(n) for n in unknown)}")
    X = patch_serving.features(spec, runner, call.inputs)
    groups = group_ids(runner, spec, None if call.group is None else to_numpy(call.group), len(X))
    sent = transform_inputs(runner, X)
    logits = patch_serving.logits(runner, spec, sent)
    out = apply_patch(runner, spec, sent, logits, groups, call.request.id, scores_kind="logits")
    if trace is not None:
        trace.raw, trace.served, trace.raw_kind, trace.features = logits, out, "logits", X
    outputs = [tensor_of(name, out)]
    if call.raw_wanted:  # the replacement model's logits, before any output transform
        outputs.append(tensor_of(RAW_OUTPUT, logits))
    return _reply(call, spec, runner, outputs, out, SERVED_BY_PATCH)


# --- routes: inference is served by service.fast_path's endpoint; model metadata and readiness here ------

V2_INFER_PATHS = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")
V1_PREDICT_PATH = "/v1/models/{model_name}:predict"
_ERRORS = {code: ErrorResponse for code in (400, 404, 409, 413, 415, 502, 503, 504)}
_BINARY_BODY = {CONTENT_TYPE: {"schema": {"type": "string", "format": "binary", "description":
                "the binary tensor extension: a JSON InferRequest of Inference-Header-Content-Length bytes, "
                "then the tensors' bytes"}}}
OPERATIONS = [
    *(Operation("POST", p, "OIP inference, patched", InferRequest, InferResponse, _ERRORS, ["inference"],
                _BINARY_BODY) for p in V2_INFER_PATHS),
    Operation("POST", V1_PREDICT_PATH, "KServe V1 predict, patched", V1Request, V1Response, _ERRORS, ["inference"]),
]
SCHEMAS = [ErrorResponse]

router = APIRouter(tags=["inference"], responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                                                  502: {"model": ErrorResponse}, 504: {"model": ErrorResponse}})


def _cache(request: Request) -> ModelCache:
    return request.app.state.model_cache


@router.get("/v2/models/{model_name}", response_model=ModelMetadata)
@router.get("/v2/models/{model_name}/versions/{model_version}", response_model=ModelMetadata)
async def model_metadata(request: Request, model_name: str, model_version: str | None = None) -> Response:
    cache = _cache(request)
    spec = await cache.spec(model_name, model_version)
    runner = await request.app.state.patches.runner(spec.name, spec.version)
    if runner is not None and runner.replaces_model:  # a weight patch: its model's signature; no upstream call
        meta = ModelMetadata.model_validate(patch_serving.metadata(spec, runner))
    else:
        meta = await cache.metadata(spec)
    inputs = list(meta.inputs)
    if runner is not None and runner.needs_group:
        inputs.append(MetadataTensor(name=spec.group_input, datatype="BYTES", shape=[-1],
                                     parameters={"groups": list(runner.patch.groups)}))
    body = meta.model_dump(mode="json", exclude_none=True)
    body["inputs"] = [t.model_dump(mode="json", exclude_none=True) for t in inputs]
    served_by = SERVED_BY_PATCH if runner is not None and runner.replaces_model else SERVED_BY_UPSTREAM
    body["parameters"] = {**(meta.parameters or {}), "fairpatch_patch": patch_id(runner),
                          "fairpatch_served_by": served_by}
    return _answer(body, patch_id(runner), served_by).response()


@router.get("/v2/models/{model_name}/ready", response_model=ModelReadyResponse)
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", response_model=ModelReadyResponse)
async def model_ready(request: Request, model_name: str, model_version: str | None = None) -> Response:
    spec = await _cache(request).spec(model_name, model_version)
    readiness = getattr(request.app.state, "readiness", None)
    if readiness is not None and request.app.state.settings.ready_checks_upstreams:
        runner = await request.app.state.patches.runner(spec.name, spec.version)
        if runner is None or not runner.replaces_model:  # a weight patch serves without the upstream
            problem = await readiness.model_problem(spec)
            if problem is not None:
                return JSONResponse({"name": model_name, "ready": False, "error": problem}, status_code=503)
    return JSONResponse(ModelReadyResponse(name=model_name, ready=True).model_dump(mode="json", exclude_none=True))


# --- lifecycle ---------------------------------------------------------------------------------------

async def startup(app: FastAPI) -> None:
    """The pooled upstream client and the model cache, on app.state."""
    app.state.upstream = UpstreamClient()
    app.state.model_cache = ModelCache(app.state.registry, app.state.upstream)
    from service.readiness import UpstreamReadiness  # it builds on this module's cache

    app.state.readiness = UpstreamReadiness(app.state.upstream)


async def shutdown(app: FastAPI) -> None:
    upstream: UpstreamClient | None = getattr(app.state, "upstream", None)
    if upstream is not None:
        await upstream.aclose()

