"""The gateway application: `create_app(settings)` wires settings, Redis, error handling and routers.

Kept thin on purpose: each concern is a router or a module of its own. The inference POSTs have one
endpoint (service.fast_path), taken ahead of FastAPI's stack; the other routers share `app.state`
(Redis, the registry, the patch store, the pooled upstream client opened in `lifespan`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from service import export_routes, health, infer, live_routes, management, observability, report_routes
from service.body_limit import BodySizeLimit
from service.errors import install_error_handlers
from service.fast_path import InferenceEndpoint
from service.openapi import document
from service.patch_store import PatchStore
from service.redact import redact_url as _redacted
from service.redis_embedded import redis_url_for
from service.registry import ModelRegistry
from service.settings import Settings
from service.version import __version__

log = logging.getLogger("fairpatch.service")


class Gateway(FastAPI):
    """The FastAPI app, with the inference POSTs handed to `fast_path` (service.fast_path's endpoint) before
    FastAPI's own stack when set; everything else, and every request when it is None, goes through FastAPI,
    whose route list holds the same endpoint for the same paths."""

    fast_path: InferenceEndpoint | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_path
        if fast is not None and not self.root_path and (target := fast.match(scope)) is not None:
            await fast(target, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> Gateway:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Starting the embedded Redis blocks for a few tens of ms; nothing is served yet, so that is fine.
        with redis_url_for(settings.redis_url, settings.data_dir) as url:
            client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
            app.state.redis, app.state.redis_url = client, url
            if await health.redis_answers(client):
                app.state.redis_reached = True
                log.info("Redis at %s answers", _redacted(url))
            else:  # keep serving: /v2/health/ready reports it, and Redis may come back
                log.warning("Redis at %s does not answer; the gateway is not ready", _redacted(url))
            app.state.registry = ModelRegistry(client)
            app.state.patches = PatchStore(client, recheck_s=settings.patch_recheck_s, device=settings.device)
            app.state.patches.start()
            # Each component opens what it needs (pooled upstream client, job queue) and closes it.
            await infer.startup(app)
            await management.startup(app)
            await observability.startup(app)
            live_routes.startup(app)
            # What startup built lives as long as the app: out of the collector's sight, a full collection no longer
            # walks the libraries' and the app's hundred thousand objects (a few percent of a request's CPU).
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()
                await live_routes.shutdown(app)
                await observability.shutdown(app)
                await management.shutdown(app)
                await infer.shutdown(app)
                await app.state.patches.stop()
                await client.aclose()

    app = Gateway(title="fairpatch gateway", version=__version__, lifespan=lifespan,
                  description="Fairness-patched predictions over the Open Inference Protocol (KServe V2).")
    app.state.settings = settings
    app.state.live = None  # service.live_routes.startup sets the recorder when live fairness is on
    app.state.redis_reached = False  # set once Redis has answered: readiness survives an outage after that
    app.state.ready_specs = []  # the registrations the last readiness probe listed (service.health)
    endpoint = InferenceEndpoint(app.state, settings.max_body_bytes)
    if settings.fast_path:
        app.fast_path = endpoint
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.router.routes.extend(endpoint.routes())  # ahead of the routers below, so matched first
    app.include_router(health.router)
    app.include_router(infer.router)
    app.include_router(management.router)
    app.include_router(export_routes.router)
    app.include_router(live_routes.router)
    app.include_router(observability.router)
    app.include_router(report_routes.router)
    document(app, schemas=infer.SCHEMAS, operations=infer.OPERATIONS)
    return app
