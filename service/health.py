"""The gateway's V2 server surface: server metadata, liveness and readiness.

Live means the process answers; ready means it can do its job: serve predictions through the registered
upstreams (service.readiness, answers cached for a second or two). Redis is checked on every probe, never
cached. Before this gateway has reached Redis once it holds nothing to serve, and is not ready. Once it has,
a Redis outage does not take it out of rotation: it keeps serving the registrations and patches it holds
(what it never loaded is a 503 naming Redis), and the readiness answer says `"redis": false` beside
`"ready": true`. Were it unready instead, every replica would leave a Kubernetes Service at the same moment
and all predictions would fail while each gateway could still serve them. Setting
`ready_without_redis=false` restores the strict rule (503 whenever Redis does not answer).
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import binary_tensors
from service.oip import GatewayReadyResponse, LiveResponse, ServerMetadata
from service.version import __version__

SERVER_NAME = "fairpatch"
# V2 extensions this gateway implements: binary tensor data, in requests and (when asked) answers.
EXTENSIONS: list[str] = [binary_tensors.EXTENSION]

router = APIRouter(prefix="/v2", tags=["health"])


async def redis_answers(client: Redis, timeout: float = 1.0) -> bool:
    try:
        return bool(await asyncio.wait_for(client.ping(), timeout))
    except (RedisError, OSError, TimeoutError):
        return False


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", response_model=LiveResponse)
async def live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get("/health/ready", response_model=GatewayReadyResponse,
            responses={503: {"model": GatewayReadyResponse, "description": "Not ready: Redis has not answered yet (or, "
                             "with ready_without_redis off, does not answer), or a registered upstream is down"}})
async def ready(request: Request) -> JSONResponse:
    state, settings = request.app.state, request.app.state.settings
    redis_ok = await redis_answers(state.redis)
    if redis_ok:
        state.redis_reached = True
    elif not (settings.ready_without_redis and state.redis_reached):
        # 503 (not the spec's generic 4xx) when not ready: the cause is on the server side, and probes and
        # load balancers treat any non-2xx as "take out of rotation" either way.
        return JSONResponse({"ready": False, "redis": False}, status_code=503)
    degraded = {} if redis_ok else {"redis": False}
    readiness = getattr(state, "readiness", None)
    if readiness is not None and settings.ready_checks_upstreams:
        # While Redis is away: the registrations listed at the last probe (none known: none to check); not
        # asked again, as a cut link would hold the probe for the client's socket timeout.
        specs = state.ready_specs
        if redis_ok:
            with contextlib.suppress(RedisError, OSError):  # Redis just answered a ping: rare, keep the last list
                specs = state.ready_specs = await state.registry.list()
        problem = await readiness.server_problem(specs) if specs else None
        if problem is not None:
            return JSONResponse({"ready": False, "error": problem, **degraded}, status_code=503)
    return JSONResponse({"ready": True, **degraded})
