"""Live fairness and rollout routes (docs/rollout.md): the version's live figures, feedback labels, promotion.

- `GET /v1/models/{m}/versions/{v}/fairness`: every arm's figures over the window (service.live_fairness),
  the rollout stage, and `drifting`.
- `POST /v1/feedback`: `{"feedback": [{"request_id", "label"}, ...]}` joins ground-truth labels (one per
  row of the request: an int, or a list for a batch) to the decisions recorded for that request id.
- `POST /v1/models/{m}/versions/{v}/patches/{id}/promote`: shadow -> canary -> active (service.rollout),
  past shadow only when the activation guard allows it or `force` is given.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from patcher.patch import PatchError
from service.auth import require_admin
from service.errors import ApiError
from service.live_fairness import ArmFigures
from service.live_observe import LiveRecorder
from service.management import _errors, _ManagementRoute, _parse, _patches, _spec
from service.openapi import include_schemas, json_body, ref
from service.patch_store import PatchNotFound
from service.rollout import PromoteRequest, Rollout, check_guard, next_stage

router = APIRouter(prefix="/v1", tags=["live fairness and rollout"], dependencies=[Depends(require_admin)],
                   route_class=_ManagementRoute, responses=_errors)

MAX_FEEDBACK = 10_000


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256)
    label: int | list[int] = Field(description="the request's true label (0/1), or one per row for a batch")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feedback: list[FeedbackItem] = Field(min_length=1, max_length=MAX_FEEDBACK)


class FeedbackResult(BaseModel):
    labelled_rows: int
    unknown: list[str] = Field(description="request ids never recorded, expired, or labelled already")
    mismatched: list[str] = Field(description="request ids whose label count is not their row count")


class FairnessResponse(BaseModel):
    model: str
    version: str
    window_s: float
    alert_gap: float
    drifting: bool
    rollout: Rollout | None
    arms: list[ArmFigures]


def _live(request: Request) -> LiveRecorder:
    live: LiveRecorder | None = request.app.state.live
    if live is None:
        raise ApiError(409, "live fairness is off on this gateway (FAIRPATCH_LIVE_FAIRNESS=false)")
    return live


@router.get("/models/{model}/versions/{version}/fairness", response_model=FairnessResponse,
            summary="live fairness of the version's served traffic, per patch and rollout arm")
async def fairness(request: Request, model: str, version: str,
                   window_s: float | None = Query(None, gt=0, allow_inf_nan=False,
                                                 description="default and at most: the gateway's live_window_s")
                   ) -> JSONResponse:
    await _spec(request, model, version)
    live = _live(request)
    arms = await live.figures(model, version, window_s)
    body = FairnessResponse(model=model, version=version, window_s=live.effective_window(window_s),
                            alert_gap=live.alert_gap, drifting=any(a.drifting for a in arms),
                            rollout=await _patches(request).rollout(model, version), arms=arms)
    return JSONResponse(body.model_dump(mode="json"))


@router.post("/feedback", response_model=FeedbackResult, openapi_extra=json_body(FeedbackRequest),
             summary="ground-truth labels for served requests, by request id")
async def feedback(request: Request) -> JSONResponse:
    req = await _parse(request, FeedbackRequest)
    items = [(f.request_id, f.label if isinstance(f.label, list) else [f.label]) for f in req.feedback]
    bad = [rid for rid, labels in items if any(y not in (0, 1) for y in labels)]
    if bad:
        raise ApiError(400, f"labels must be 0 or 1; request {bad[0]!r} has {dict(items)[bad[0]]}")
    rows, unknown, mismatched = await _live(request).feedback(items)
    return JSONResponse(FeedbackResult(labelled_rows=rows, unknown=unknown, mismatched=mismatched).model_dump())


@router.post("/models/{model}/versions/{version}/patches/{patch_id}/promote", response_model=Rollout,
             openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                 "schema": ref(PromoteRequest)}}}}, summary="move a patch along shadow -> canary -> active")
async def promote(request: Request, model: str, version: str, patch_id: str) -> JSONResponse:
    await _spec(request, model, version)
    req = await _parse(request, PromoteRequest) if (await request.body()).strip() else PromoteRequest()
    store = _patches(request)
    current = await store.rollout(model, version)
    here = current.stage if current is not None and current.patch == patch_id else None
    stage = req.stage or next_stage(here)
    if stage != "shadow":
        await check_guard(store, patch_id, req.force, f"promoting to {stage}")
    rollout = Rollout(patch=patch_id, stage=stage, percent=req.percent)
    try:
        await store.activate(model, version, patch_id, rollout)
    except PatchNotFound:
        raise ApiError(404, f"unknown patch {patch_id!r}") from None
    except PatchError as e:
        raise ApiError(409, str(e)) from None
    return JSONResponse(rollout.model_dump(mode="json"))


def startup(app: FastAPI) -> None:
    settings = app.state.settings
    include_schemas(app, PromoteRequest, FeedbackRequest)
    if not settings.live_fairness:
        return
    app.state.live = LiveRecorder(app.state.redis, bucket_s=settings.live_bucket_s, window_s=settings.live_window_s,
                                  flush_s=settings.live_flush_s, check_s=settings.live_check_s,
                                  alert_gap=settings.live_alert_gap, feedback_ttl_s=settings.feedback_ttl_s,
                                  max_requests=settings.feedback_max_requests)
    if settings.metrics:  # the drift checks' figures as Prometheus gauges
        from service.prometheus import live_gauges

        app.state.live.on_drift(live_gauges)
    app.state.live.start()


async def shutdown(app: FastAPI) -> None:
    if app.state.live is not None:
        await app.state.live.stop()
