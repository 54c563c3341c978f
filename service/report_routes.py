"""`GET /v1/jobs/{job_id}/report.html`: a job's result as one self-contained page (service.report_html).

The page adds the patch's manifest (from the patch store) and, when the gateway serves live fairness figures
(`GET /v1/models/{m}/versions/{v}/fairness`), the version's: asked of this same app in process, with the
caller's credentials, so the page shows what that API would show the caller. Admin key, like the job API.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from redis.exceptions import RedisError
from starlette.routing import Route

from patcher.patch import PatchError
from service.auth import require_admin
from service.errors import ApiError
from service.jobs import JobNotFound, JobStore
from service.oip import ErrorResponse
from service.patch_store import PatchNotFound, PatchStore
from service.report_html import render

log = logging.getLogger("fairpatch.service")
LIVE_PATH = "/v1/models/{model}/versions/{version}/fairness"

router = APIRouter(prefix="/v1", tags=["management"], dependencies=[Depends(require_admin)],
                   responses={code: {"model": ErrorResponse} for code in (401, 403, 404, 503)})


async def _manifest(store: PatchStore, patch_id: str | None) -> dict[str, Any] | None:
    if patch_id is None:
        return None
    try:
        return (await store.get(patch_id)).manifest
    except (PatchNotFound, PatchError):
        return None


async def _live(request: Request, model: str, version: str) -> dict[str, Any] | None:
    """The version's live figures when this gateway has the live-fairness API and it has figures; else None."""
    if not any(isinstance(r, Route) and r.path == LIVE_PATH and "GET" in (r.methods or ()) for r in request.app.routes):
        return None
    headers = {k: v for k, v in request.headers.items() if k == "authorization"}
    transport = httpx.ASGITransport(app=request.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers) as client:
        r = await client.get(f"/v1/models/{model}/versions/{version}/fairness")
    if r.status_code != 200:
        return None
    try:
        body = r.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) and body else None


@router.get("/jobs/{job_id}/report.html", response_class=HTMLResponse, summary="the job's result as an HTML page")
async def job_report(request: Request, job_id: str) -> HTMLResponse:
    jobs: JobStore = request.app.state.jobs
    try:
        job = (await jobs.get(job_id)).model_dump(mode="json")
        result = job.get("result") or {}
        manifest = await _manifest(request.app.state.patches, result.get("patch_id"))
    except JobNotFound as e:
        raise ApiError(404, str(e)) from None
    except RedisError as e:
        raise ApiError(503, f"the gateway's Redis is unavailable ({type(e).__name__}: {e}); retry shortly") from None
    live = await _live(request, job["model"], job["version"]) if job["status"] == "succeeded" else None
    return HTMLResponse(render(job, manifest, live))
