"""The control plane (docs/api.md, "Management"): models, datasets, jobs and patches under /v1.

Every route needs the admin key when one is configured (`service.auth`). Bodies are parsed here
rather than by FastAPI so that the key is checked before a byte of the body is looked at, and so
that every malformed body gets the same `{"error"}` 400. A Redis that does not answer is a 503
with the cause, never a 500. What this component opens (the dataset and job stores, an arq client
on the gateway's own Redis pool, and in embedded `fairpatch serve` one worker subprocess) is kept
on `app.state` by `startup` and closed by `shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from patcher.methods import ACCESS_ORDER, Method, OptionsError, get_method, methods
from patcher.patch import Patch, PatchError
from service import discovery, infer, worker
from service.artifacts import ONNX_TYPES, ArtifactError, inspect_onnx, upstream_conflict, verified
from service.auth import check_upstream_allowed, require_admin
from service.datasets_store import (
    CSV_TYPES,
    PARQUET_TYPES,
    DatasetError,
    DatasetLimits,
    DatasetNotFound,
    DatasetStore,
    DatasetSummary,
    LoadedDataset,
    frame_to_parquet,
    media_type,
    parse_dataset,
)
from service.errors import ApiError
from service.jobs import (
    ACTIVE,
    ARTIFACT_ACCESS,
    DEFAULT_QUERY_BUDGET,
    JobNotFound,
    JobRecord,
    JobRequest,
    JobStore,
    MethodInfo,
    abort,
    arq_client,
    enqueue,
)
from service.oip import ErrorResponse, describe_validation_errors
from service.openapi import include_schemas, json_body
from service.patch_store import PatchNotFound, PatchStore
from service.prometheus import ACTIVATIONS, JOBS
from service.registry import ArtifactInfo, Discovery, ModelRegistry, ModelSpec
from service.rollout import ActivateRequest, check_guard

log = logging.getLogger("fairpatch.service")

M = TypeVar("M", bound=BaseModel)
PATCH_TYPES = frozenset({"application/zip", "application/octet-stream", "application/x-zip-compressed", ""})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class _ManagementRoute(APIRoute):
    """Redis trouble (down, timing out) becomes a 503 that says so, instead of the catch-all 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RedisError as e:
                log.warning("%s %s: Redis error: %r", request.method, request.url.path, e)
                raise ApiError(503, f"the gateway's Redis is unavailable ({type(e).__name__}: {e}); "
                                    "retry when /v2/health/ready answers true") from None

        return route


_errors = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 503)}
router = APIRouter(prefix="/v1", tags=["management"], dependencies=[Depends(require_admin)],
                   route_class=_ManagementRoute, responses=_errors)


# ---------------------------------------------------------------- helpers


def _json(model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status_code, headers=headers)


async def _parse(request: Request, model: type[M]) -> M:
    body = await request.body()
    if not body.strip():
        raise ApiError(400, f"empty request body; expected a JSON {model.__name__} object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise ApiError(400, f"invalid request: {describe_validation_errors(e.errors())}") from None


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    """The raw body, refused with 413 as soon as it is known to be over `limit` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ApiError(413, f"the {what} is {int(declared)} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the {what} is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def _patches(request: Request) -> PatchStore:
    return request.app.state.patches


async def _spec(request: Request, model: str, version: str) -> ModelSpec:
    spec = await _registry(request).get(model, version)
    if spec is None:
        versions = await _registry(request).versions(model)
        known = f"registered versions: {', '.join(versions)}" if versions else "no version of it is registered"
        raise ApiError(404, f"unknown model {model!r} version {version!r} ({known})")
    return spec


# ---------------------------------------------------------------- models


@router.post("/models", status_code=201, response_model=ModelSpec, openapi_extra=json_body(ModelSpec),
             summary="register a model version (its upstream must be on the allow-list)")
async def register_model(request: Request) -> JSONResponse:
    spec = await _parse(request, ModelSpec)
    check_upstream_allowed(spec.upstream.url, request.app.state.settings.upstream_allowlist)
    registry = _registry(request)
    existing = await registry.get(spec.name, spec.version)
    # only POST .../artifact sets the artifact; the upstream is read here (a registration that cannot work is
    # refused with the fix), and `binary_data: auto` resolved
    spec = await discovery.discover(request.app.state.upstream,
                                    spec.model_copy(update={"artifact": None, "discovery": None}))
    if existing is not None:
        same = {"created_at", "artifact", "discovery"}
        if spec.upstream.binary_data == "auto":  # unchecked this time: as resolved before
            spec = spec.model_copy(update={"upstream": spec.upstream.model_copy(
                update={"binary_data": existing.upstream.binary_data})})
        if existing.model_dump(exclude=same) == spec.model_dump(exclude=same):
            return _json(existing, 200)  # the same registration again: nothing to do
        raise ApiError(409, f"model {spec.name} version {spec.version} is already registered with a different "
                            "spec; DELETE it first or register a new version")
    await registry.put(spec)
    infer.forget(request.app, spec.name)  # this replica's "latest" and remembered misses are re-read at once
    return _json(spec, 201, {"Location": f"/v1/models/{spec.name}/versions/{spec.version}"})


class CheckRequest(BaseModel):
    dataset: str | None = Field(None, min_length=1, max_length=128,
                                description="an uploaded dataset whose first rows probe the output kind")
    rows: int = Field(8, ge=1, le=1024, description="how many of its rows to send")


@router.post("/models/{model}/versions/{version}/check", response_model=Discovery,
             openapi_extra=json_body(CheckRequest),
             summary="read the upstream again and check the registration against it (and a dataset's rows)")
async def check_model(request: Request, model: str, version: str) -> JSONResponse:
    spec = await _spec(request, model, version)
    check = await _parse(request, CheckRequest) if (await request.body()).strip() else CheckRequest()
    found = (await discovery.discover(request.app.state.upstream, spec, probe=check.dataset is None)).discovery \
        or Discovery(checked=False)
    if check.dataset is not None:
        try:
            data = await _datasets(request).load(check.dataset, group_order=spec.groups)
        except DatasetNotFound as e:
            raise ApiError(404, str(e)) from None
        kind = await discovery.probe_rows(request.app.state.upstream, spec, data.X[:check.rows])
        found = found.model_copy(update={"output_kind_seen": kind, "notes": [
            *found.notes, f"{min(check.rows, len(data.X))} rows of dataset {check.dataset} probed: {kind}"]})
    return _json(found)


@router.get("/models", summary="every registered model version")
async def list_models(request: Request) -> JSONResponse:
    specs = await _registry(request).list()
    return JSONResponse({"models": [s.model_dump(mode="json") for s in specs]})


@router.get("/models/{model}/versions/{version}", response_model=ModelSpec)
async def get_model(request: Request, model: str, version: str) -> JSONResponse:
    return _json(await _spec(request, model, version))


@router.delete("/models/{model}/versions/{version}", status_code=204,
               summary="unregister a model version (its active patch pointer goes too; patches are kept)")
async def delete_model(request: Request, model: str, version: str) -> Response:
    await _spec(request, model, version)
    if await _patches(request).active_id(model, version) is not None:
        await _patches(request).deactivate(model, version)
    await _registry(request).delete(model, version)
    # This replica forgets the version at once (others within the registration cache's few seconds).
    infer.forget(request.app, model, version)
    _patches(request).forget(model, version)
    return Response(status_code=204)


# ---------------------------------------------------------------- model artifacts (ONNX, for weight access)


def _artifact_path(model: str, version: str) -> str:
    return f"/v1/models/{model}/versions/{version}/artifact"


@router.post("/models/{model}/versions/{version}/artifact", status_code=201, response_model=ArtifactInfo,
             summary="upload the model version's ONNX file (for gradient and weight access)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_artifact(request: Request, model: str, version: str) -> JSONResponse:
    spec = await _spec(request, model, version)
    kind = media_type(request.headers.get("content-type"))
    if kind not in ONNX_TYPES:
        raise ApiError(415, f"unsupported content type {kind!r}: send the ONNX file as the raw body "
                            "(Content-Type application/octet-stream)")
    data = await _read_limited(request, request.app.state.settings.max_artifact_bytes, "model artifact")
    try:
        info = await run_in_threadpool(inspect_onnx, data)
    except ArtifactError as e:
        raise ApiError(400, str(e)) from None
    info = await _check_against_upstream(request, spec, info)
    if await _registry(request).set_artifact(model, version, info, data) is None:
        raise ApiError(404, f"model {model!r} version {version!r} was unregistered during the upload")
    return _json(info, 201, {"Location": _artifact_path(model, version)})


async def _check_against_upstream(request: Request, spec: ModelSpec, info: ArtifactInfo,
                                  wait_s: float = 5.0) -> ArtifactInfo:
    """400 when the upstream's V2 metadata shows the artifact cannot be its model (another input shape). An
    upstream that does not answer is no reason to refuse: the record says it was not checked."""
    cache = getattr(request.app.state, "model_cache", None)
    if cache is None or spec.upstream.protocol != "v2":
        return info
    try:
        meta = await asyncio.wait_for(cache.metadata(spec), wait_s)
    except (TimeoutError, ApiError) as e:
        log.info("artifact of %s/%s not checked against its upstream: %s", spec.name, spec.version, e)
        return info
    conflict = upstream_conflict(info, [(t.name, list(t.shape)) for t in meta.inputs], spec.upstream.input_name)
    if conflict is not None:
        raise ApiError(400, conflict)
    return info.model_copy(update={"upstream_checked": True})


@router.get("/models/{model}/versions/{version}/artifact", response_model=ArtifactInfo,
            summary="the artifact's metadata; its bytes with Accept: application/octet-stream",
            responses={200: {"content": {"application/octet-stream": {}}}})
async def get_artifact(request: Request, model: str, version: str) -> Response:
    spec = await _spec(request, model, version)
    if spec.artifact is None:
        raise ApiError(404, f"model {model!r} version {version!r} has no artifact; upload one with "
                            f"POST {_artifact_path(model, version)}")
    accept = {media_type(a) for a in request.headers.get("accept", "").split(",")}
    if not accept & {"application/octet-stream", "application/onnx"}:
        return _json(spec.artifact)
    data = await _registry(request).artifact_bytes(model, version)
    try:
        verified(data, spec.artifact, f"model {model} version {version}")
    except ValueError as e:
        raise ApiError(409, str(e)) from None
    return Response(data, media_type="application/octet-stream", headers={
        "fairpatch-artifact-sha256": spec.artifact.sha256,
        "content-disposition": f'attachment; filename="{model}-{version}.onnx"'})


@router.delete("/models/{model}/versions/{version}/artifact", status_code=204, summary="drop the artifact")
async def delete_artifact(request: Request, model: str, version: str) -> Response:
    spec = await _spec(request, model, version)
    if spec.artifact is None:
        raise ApiError(404, f"model {model!r} version {version!r} has no artifact")
    await _registry(request).set_artifact(model, version, None)
    return Response(status_code=204)


# ---------------------------------------------------------------- datasets


def _datasets(request: Request) -> DatasetStore:
    return request.app.state.datasets


@router.post("/datasets", status_code=201, summary="upload a tuning dataset (CSV or Parquet as the raw body)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "text/csv": {"schema": {"type": "string"}},
                 "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_dataset(
        request: Request,
        label: str = Query(min_length=1, description="the binary label column"),
        group: str = Query(min_length=1, description="the group column (its values are the group names)"),
        name: str | None = Query(None, max_length=200, description="a name to remember it by")) -> JSONResponse:
    kind = media_type(request.headers.get("content-type"))
    if kind not in CSV_TYPES | PARQUET_TYPES:
        raise ApiError(415, f"unsupported content type {kind or '(none)'!r}: send the file as the raw body with "
                            "Content-Type text/csv or application/vnd.apache.parquet")
    limit = request.app.state.settings.max_dataset_bytes
    data = await _read_limited(request, limit, "dataset")
    try:
        stored, summary = await run_in_threadpool(parse_dataset, data, kind, label, group, name=name,
                                                  limits=DatasetLimits.from_settings(request.app.state.settings))
    except DatasetError as e:  # 400, or 413 past a cap on what the upload decodes to
        raise ApiError(e.status, str(e)) from None
    await _datasets(request).put(stored, summary)
    return _json(summary, 201, {"Location": f"/v1/datasets/{summary.id}"})


@router.get("/datasets", summary="recent datasets (newest first)")
async def list_datasets(request: Request, limit: int = Query(100, ge=1, le=1000)) -> JSONResponse:
    found = await _datasets(request).list(limit)
    return JSONResponse({"datasets": [s.model_dump(mode="json") for s in found]})


@router.get("/datasets/{dataset_id}")
async def get_dataset(request: Request, dataset_id: str) -> JSONResponse:
    try:
        return _json(await _datasets(request).summary(dataset_id))
    except DatasetNotFound as e:
        raise ApiError(404, str(e)) from None


@router.delete("/datasets/{dataset_id}", status_code=204)
async def delete_dataset(request: Request, dataset_id: str) -> Response:
    if not await _datasets(request).delete(dataset_id):
        raise ApiError(404, f"unknown dataset {dataset_id!r}")
    return Response(status_code=204)


# ---------------------------------------------------------------- jobs


def _jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def _method(name: str) -> Method:
    try:
        return get_method(name)
    except OptionsError as e:
        raise ApiError(404, str(e)) from None


@router.get("/methods", summary="the debiasing methods a job can use", response_model=list[MethodInfo])
async def list_methods() -> JSONResponse:
    return JSONResponse([MethodInfo.of(m).model_dump(mode="json") for m in methods()])


@router.get("/methods/{name}", summary="one method: access kinds, inference needs, presets, options schema",
            response_model=MethodInfo)
async def describe_method(name: str) -> JSONResponse:
    return _json(MethodInfo.of(_method(name)))


def _resolve_access(req: JobRequest, method: Method) -> JobRequest:
    """The job's access kind: the one asked for if the method supports it, else 400 naming what it does."""
    supported = method.access
    access = req.access or method.default_access
    if access not in supported:
        listed = ", ".join(k for k in ACCESS_ORDER if k in supported)
        raise ApiError(400, f"method {req.method} does not support access {access!r}; it supports: {listed}")
    update: dict[str, object] = {"access": access}
    if access not in ARTIFACT_ACCESS and req.query_budget is None:
        update["query_budget"] = DEFAULT_QUERY_BUDGET
    return req.model_copy(update=update)


async def _check_dataset(request: Request, dataset_id: str, spec: ModelSpec, what: str) -> None:
    try:
        dataset = await _datasets(request).summary(dataset_id)
    except DatasetNotFound as e:
        raise ApiError(404, f"{what}: {e}: upload it with POST /v1/datasets first") from None
    if spec.groups:
        unknown = sorted(set(dataset.groups) - set(spec.groups))
        if unknown:
            raise ApiError(400, f"dataset {dataset_id} has group(s) {unknown} that model {spec.name} version "
                                f"{spec.version} does not know (its groups: {spec.groups})")


@router.post("/jobs", status_code=202, response_model=JobRecord, openapi_extra=json_body(JobRequest),
             summary="start a patch-training job")
async def create_job(request: Request) -> JSONResponse:
    req = await _parse(request, JobRequest)
    # Options are checked before the job is queued, so a typo is a 400 now rather than a failed job later.
    try:
        method = get_method(req.method)
        method.check_criterion(req.criterion)
        method.parse_options(req.options, req.preset)
    except OptionsError as e:
        raise ApiError(400, str(e)) from None
    req = _resolve_access(req, method)
    if req.exemplar_dataset is not None and not method.takes_exemplar:
        raise ApiError(400, f"method {req.method} takes no exemplar dataset; leave exemplar_dataset out")
    registry = _registry(request)
    if req.version is None:
        latest = await registry.latest(req.model)
        if latest is None:
            raise ApiError(404, f"unknown model {req.model!r}: register it with POST /v1/models first")
        req = req.model_copy(update={"version": latest.version})
    spec = await _spec(request, req.model, req.version)
    if req.access in ARTIFACT_ACCESS and spec.artifact is None:
        raise ApiError(409, f"access {req.access!r} needs the model's ONNX file, and model {spec.name} version "
                            f"{spec.version} has none: upload it with POST {_artifact_path(spec.name, spec.version)}")
    await _check_dataset(request, req.dataset, spec, "dataset")
    if req.exemplar_dataset is not None:
        await _check_dataset(request, req.exemplar_dataset, spec, "exemplar_dataset")
    jobs = _jobs(request)
    record = await jobs.create(req)
    try:
        await enqueue(request.app.state.arq, record.id)
    except Exception as e:
        await jobs.transition(record.id, "failed", ACTIVE, error=f"could not be queued: {e}")
        raise
    JOBS.labels(record.method, "queued").inc()
    return _json(record, 202, {"Location": f"/v1/jobs/{record.id}"})


@router.get("/jobs", summary="recent jobs (newest first)")
async def list_jobs(request: Request, limit: int = Query(50, ge=1, le=1000)) -> JSONResponse:
    records = await _jobs(request).list(limit)
    return JSONResponse({"jobs": [r.model_dump(mode="json") for r in records]})


@router.get("/jobs/{job_id}", response_model=JobRecord)
async def get_job(request: Request, job_id: str) -> JSONResponse:
    try:
        return _json(await _jobs(request).get(job_id))
    except JobNotFound as e:
        raise ApiError(404, str(e)) from None


@router.delete("/jobs/{job_id}", status_code=202, response_model=JobRecord, summary="cancel a job")
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    jobs = _jobs(request)
    changed, before = await jobs.transition(job_id, "cancelled", ACTIVE, finished_at=time.time())
    if before is None:
        raise ApiError(404, f"unknown job {job_id!r}")
    if not changed:
        raise ApiError(409, f"job {job_id} has already {'been ' if before == 'cancelled' else ''}{before}; "
                            "only a queued or running job can be cancelled")
    record = await jobs.get(job_id)
    JOBS.labels(record.method, "cancelled").inc()  # here, not in the worker: a queued job never reaches one
    await jobs.set_progress(job_id, {**record.progress, "stage": "cancelled"})
    await abort(request.app.state.arq, job_id)
    return _json(await jobs.get(job_id), 202)


@router.post("/jobs/{job_id}/datasets/{row_set}", status_code=201,
             summary="a new dataset: the job's dataset without a set of rows its method proposed leaving out "
                     "(forml: condensed)")
async def dataset_without_rows(request: Request, job_id: str, row_set: str) -> JSONResponse:
    try:
        job = await _jobs(request).get(job_id)
    except JobNotFound as e:
        raise ApiError(404, str(e)) from None
    if job.status != "succeeded":
        raise ApiError(409, f"job {job_id} is {job.status}; only a succeeded job has row sets")
    sets = (job.result or {}).get("drop_rows") or {}
    if row_set not in sets:
        have = ", ".join(sorted(sets)) or "none"
        raise ApiError(404, f"job {job_id} ({job.method}) proposed no row set {row_set!r}; its row sets: {have}")
    dropped = sorted(int(i) for i in sets[row_set])
    try:
        data = await _datasets(request).load(job.dataset)
    except DatasetNotFound:
        raise ApiError(409, f"job {job_id}'s dataset {job.dataset} has been deleted; nothing to build from") from None
    stored, summary = await run_in_threadpool(_without_rows, data, dropped, f"{data.summary.name or job.dataset} "
                                              f"without {row_set} rows of job {job_id}")
    await _datasets(request).put(stored, summary)
    body = {**summary.model_dump(mode="json"), "source_dataset": job.dataset, "row_set": row_set,
            "dropped_rows": len(dropped)}
    return JSONResponse(body, status_code=201, headers={"Location": f"/v1/datasets/{summary.id}"})


def _without_rows(data: LoadedDataset, dropped: list[int], name: str) -> tuple[bytes, DatasetSummary]:
    import uuid

    import numpy as np
    import pandas as pd

    keep = np.setdiff1d(np.arange(len(data.y)), np.asarray(dropped, dtype=np.int64))
    src = data.summary
    frame = pd.DataFrame(data.X[keep], columns=list(data.feature_names))
    frame[src.label] = data.y[keep]
    frame[src.group] = np.asarray(data.group_names, dtype=object)[data.groups[keep]]
    stored = frame_to_parquet(frame)
    counts = frame[src.group].value_counts()
    summary = src.model_copy(update={
        "id": uuid.uuid4().hex, "name": name, "format": "parquet", "rows": len(frame),
        "groups": sorted(counts.index), "group_counts": {str(k): int(v) for k, v in sorted(counts.items())},
        "bytes": len(stored), "stored_bytes": len(stored), "created_at": time.time()})
    return stored, summary


# ---------------------------------------------------------------- patches


def _patch_summary(patch: Patch, created_at: float) -> dict[str, Any]:
    report = patch.manifest.get("report") or {}
    return {"id": patch.id, "method": patch.method, "created_at": created_at,
            "group_at_inference": patch.group_at_inference, "groups": patch.groups,
            "criterion": report.get("criterion")}


@router.get("/models/{model}/versions/{version}/patches", summary="the version's patches and the active one")
async def list_patches(request: Request, model: str, version: str) -> JSONResponse:
    await _spec(request, model, version)
    store = _patches(request)
    rows = []
    for pid, created_at in await store.list(model, version):
        try:
            rows.append(_patch_summary(await store.get(pid), created_at))
        except (PatchNotFound, PatchError) as e:  # listed but unreadable: say so rather than hide it
            rows.append({"id": pid, "created_at": created_at, "error": str(e)})
    rollout = await store.rollout(model, version)
    return JSONResponse({"active": None if rollout is None else rollout.patch, "patches": rows,
                         "rollout": None if rollout is None else rollout.model_dump(mode="json")})


@router.post("/models/{model}/versions/{version}/patches/{patch_id}/activate", summary="serve a patch",
             openapi_extra={"requestBody": {"required": False, "content": {"application/json": {"schema": {
                 "$ref": "#/components/schemas/ActivateRequest"}}}}})
async def activate_patch(request: Request, model: str, version: str, patch_id: str) -> JSONResponse:
    await _spec(request, model, version)
    # The activation guard (service.rollout): a patch its job found not to improve its criterion needs force.
    force = (await _parse(request, ActivateRequest)).force if (await request.body()).strip() else False
    await check_guard(_patches(request), patch_id, force, "activating")
    try:
        patch = await _patches(request).activate(model, version, patch_id)
    except PatchNotFound:
        raise ApiError(404, f"unknown patch {patch_id!r}") from None
    except PatchError as e:
        raise ApiError(409, str(e)) from None
    ACTIVATIONS.labels(model, version, patch.id).inc()
    return JSONResponse({"model": model, "version": version, "active": patch.id})


@router.post("/models/{model}/versions/{version}/patches/deactivate", summary="serve unpatched")
async def deactivate_patch(request: Request, model: str, version: str) -> JSONResponse:
    await _spec(request, model, version)
    await _patches(request).deactivate(model, version)
    ACTIVATIONS.labels(model, version, "").inc()
    return JSONResponse({"model": model, "version": version, "active": None})


@router.get("/patches/{patch_id}", summary="download a patch (zip bytes)",
            responses={200: {"content": {"application/zip": {}}}})
async def download_patch(request: Request, patch_id: str) -> Response:
    raw = await _patches(request).raw(patch_id)
    if raw is None:
        raise ApiError(404, f"unknown patch {patch_id!r}")
    try:
        await run_in_threadpool(Patch.from_bytes, raw, patch_id)  # never hand out bytes that fail their hash
    except PatchError as e:
        raise ApiError(409, f"the stored patch {patch_id} fails verification ({e}); upload it again") from None
    return Response(raw, media_type="application/zip", headers={
        "fairpatch-patch": patch_id, "fairpatch-patch-sha256": hashlib.sha256(raw).hexdigest(),
        "content-disposition": f'attachment; filename="{patch_id}.zip"'})


@router.post("/models/{model}/versions/{version}/patches", status_code=201,
             summary="upload a patch (zip bytes); it is verified and bound to this version",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/zip": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_patch(request: Request, model: str, version: str) -> JSONResponse:
    await _spec(request, model, version)
    kind = media_type(request.headers.get("content-type"))
    if kind not in PATCH_TYPES:
        raise ApiError(415, f"unsupported content type {kind!r}: send the patch zip as the raw body "
                            "(Content-Type application/zip)")
    data = await request.body()
    if not data:
        raise ApiError(400, "empty request body; expected the patch's zip bytes")
    try:
        patch = await run_in_threadpool(Patch.from_bytes, data)
    except PatchError as e:
        raise ApiError(400, f"not a valid patch: {e}") from None
    bound = patch.manifest.get("model") or {}
    if bound:
        try:
            patch.check_model(model, version)
        except PatchError as e:
            raise ApiError(409, f"{e}; upload it under that version, or re-bind it explicitly") from None
    else:
        patch = patch.for_model(model, version)
    pid = await _patches(request).put(patch)
    return JSONResponse({"id": pid, "model": model, "version": version, "method": patch.method}, status_code=201,
                        headers={"Location": f"/v1/patches/{pid}"})


# ---------------------------------------------------------------- lifecycle


async def startup(app: FastAPI) -> None:
    """Stores and the arq client on the gateway's Redis; one worker subprocess when `start_worker` is set."""
    settings = app.state.settings
    redis = app.state.redis
    app.state.datasets = DatasetStore(redis)
    app.state.jobs = JobStore(redis)
    app.state.arq = arq_client(redis, settings.job_queue)
    app.state.worker_process = None
    app.state.worker_watch = None
    include_schemas(app, ModelSpec, JobRequest, CheckRequest, MethodInfo, ActivateRequest,
                    *(m.options for m in methods()))
    if settings.admin_key is None and settings.host not in LOOPBACK_HOSTS:
        log.warning("FAIRPATCH_ADMIN_KEY is not set and the gateway listens on %s: anyone who can reach it can "
                    "register models and run jobs", settings.host)
    if settings.start_worker:
        app.state.worker_process = worker.spawn(app.state.redis_url, settings)
        log.info("started a job worker (pid %d)", app.state.worker_process.pid)
        app.state.worker_watch = asyncio.create_task(_watch_worker(app))


async def _watch_worker(app: FastAPI, every_s: float = 2.0, max_backoff_s: float = 60.0) -> None:
    """Start the worker again if it dies (waiting longer after each death in a row)."""
    backoff = every_s
    while True:
        await asyncio.sleep(backoff)
        process = app.state.worker_process
        if process is None or process.poll() is None:
            backoff = every_s
            continue
        log.warning("the job worker (pid %d) exited with code %s; starting another", process.pid, process.returncode)
        app.state.worker_process = worker.spawn(app.state.redis_url, app.state.settings)
        backoff = min(backoff * 2, max_backoff_s)


async def shutdown(app: FastAPI) -> None:
    watch = getattr(app.state, "worker_watch", None)
    if watch is not None:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    process = getattr(app.state, "worker_process", None)
    if process is not None:
        await asyncio.to_thread(worker.stop, process)
        log.info("job worker (pid %d) stopped", process.pid)
        app.state.worker_process = None
