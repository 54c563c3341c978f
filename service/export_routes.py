"""`POST /v1/models/{model}/versions/{version}/patches/{patch_id}/export`: the patched model as one ONNX file.

The version's uploaded ONNX artifact and the patch are composed by patcher.export with the version's
registration (output kind, input and output names, group input), so the file answers what the gateway
answers for that version, with no gateway in the path. A weight patch needs no artifact (its replacement
model is the model). Admin key, like the other management routes.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from patcher.export import export_patched_model
from patcher.patch import Patch, PatchError
from service.artifacts import verified
from service.auth import require_admin
from service.errors import ApiError
from service.infer import PATCH_HEADER
from service.oip import ErrorResponse
from service.patch_store import PatchNotFound, PatchStore
from service.registry import ModelRegistry, ModelSpec

router = APIRouter(prefix="/v1", tags=["management"], dependencies=[Depends(require_admin)],
                   responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 503)})


async def _inputs(request: Request, model: str, version: str, patch_id: str) -> tuple[ModelSpec, Patch, bytes | None]:
    registry: ModelRegistry = request.app.state.registry
    store: PatchStore = request.app.state.patches
    spec = await registry.get(model, version)
    if spec is None:
        raise ApiError(404, f"unknown model {model!r} version {version!r}; register it with POST /v1/models")
    try:
        patch = await store.get(patch_id)
    except PatchNotFound:
        raise ApiError(404, f"unknown patch {patch_id!r}") from None
    except PatchError as e:
        raise ApiError(409, f"the stored patch {patch_id} fails verification: {e}") from None
    try:
        patch.check_model(model, version)
    except PatchError as e:
        raise ApiError(400, str(e)) from None
    if patch.part("replacement_model") is not None:
        return spec, patch, None
    if spec.artifact is None:
        raise ApiError(409, f"exporting needs the model's ONNX file, and model {model} version {version} has none: "
                            f"upload it with POST /v1/models/{model}/versions/{version}/artifact")
    data = await registry.artifact_bytes(model, version)
    try:
        return spec, patch, verified(data, spec.artifact, f"model {model} version {version}")
    except ValueError as e:
        raise ApiError(409, str(e)) from None


@router.post("/models/{model}/versions/{version}/patches/{patch_id}/export",
             summary="the model and the patch composed into one ONNX model (bytes)",
             responses={200: {"content": {"application/octet-stream": {}}}})
async def export_patch(request: Request, model: str, version: str, patch_id: str,
                       uniform_input: bool = Query(False, description="for patches with randomized decisions: "
                                                   "an extra FP32 [N] input 'fairpatch_uniform' takes the draws")
                       ) -> Response:
    try:
        spec, patch, artifact = await _inputs(request, model, version, patch_id)
    except RedisError as e:
        raise ApiError(503, f"the gateway's Redis is unavailable ({type(e).__name__}: {e}); retry when "
                            "/v2/health/ready answers true") from None
    up = spec.upstream
    try:
        data = await run_in_threadpool(export_patched_model, patch, artifact, output_kind=up.output_kind,
                                       input_name=up.input_name, output_name=up.output_name,
                                       group_input=spec.group_input, uniform_input=uniform_input)
    except PatchError as e:  # patcher.export.ExportError: the message says why and what to do
        raise ApiError(400, f"cannot export patch {patch_id[:12]} for model {model} version {version}: {e}") \
            from None
    return Response(data, media_type="application/octet-stream", headers={
        PATCH_HEADER: patch.id,
        "content-disposition": f'attachment; filename="{model}-{version}-patched.onnx"'})
