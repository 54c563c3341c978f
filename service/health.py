"""The gateway's V2 server surface: server metadata, liveness and readiness.

Live means the process answers; ready means it can do its job, which needs Redis (patch pointers,
jobs) and the registered upstreams (service.readiness). Redis is checked per probe and never cached, so
an outage shows up at once; upstream answers are cached for a second or two.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import binary_tensors
from service.oip import LiveResponse, ReadyResponse, ServerMetadata
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


@router.get("/health/ready", response_model=ReadyResponse,
            responses={503: {"model": ReadyResponse, "description": "Not ready: Redis does not answer"}})
async def ready(request: Request) -> JSONResponse:
    ok = await redis_answers(request.app.state.redis)
    # 503 (not the spec's generic 4xx) when not ready: the cause is on the server side, and probes and
    # load balancers treat any non-2xx as "take out of rotation" either way.
    if not ok:
        return JSONResponse({"ready": False}, status_code=503)
    readiness = getattr(request.app.state, "readiness", None)
    if readiness is not None and request.app.state.settings.ready_checks_upstreams:
        try:
            specs = await request.app.state.registry.list()
        except (RedisError, OSError):
            return JSONResponse({"ready": False}, status_code=503)
        problem = await readiness.server_problem(specs)
        if problem is not None:
            return JSONResponse({"ready": False, "error": problem}, status_code=503)
    return JSONResponse({"ready": True})

