"""What the gateway tells operators: `GET /metrics` (Prometheus text format) and the per-request observer that
feeds it and the payload log (service.payload_log).

The inference endpoint (service.fast_path) calls `Observer.served` once the answer is sent, or `Observer.failed`
with the error's status; both only touch in-process objects (the metrics' buffers, a bounded queue).
`/metrics` is open like the health routes (Prometheus scrapes without credentials); it names models and
patch ids, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from time import perf_counter

from fastapi import APIRouter, FastAPI, Request, Response
from redis.exceptions import RedisError
from starlette.types import Scope

from service.infer import Answer
from service.payload_log import REQUEST_TYPE, RESPONSE_TYPE, Payload, PayloadLogger
from service.probe import Probe
from service.prometheus import CONTENT_TYPE, FOLD_S, RequestMetrics, exposition, job_gauges, upstream_error_kind

log = logging.getLogger("fairpatch.service")
ROUTES = {"v2": "v2_infer", "v1": "v1_predict"}  # the `route` label
_REQUEST_ID = b"x-request-id"
_CONTENT_TYPE = b"content-type"
_JSON = "application/json"
_OCTETS = "application/octet-stream"

router = APIRouter(tags=["health"])


class Observer:
    """Records each inference request: metrics (when on) and the payload log (when a sink is set)."""

    def __init__(self, metrics: RequestMetrics | None, payload: PayloadLogger | None) -> None:
        self.metrics, self.payload = metrics, payload
        self._folding: asyncio.Task | None = None

    def start(self) -> None:
        """Fold the metrics' buffered requests every FOLD_S (service.prometheus.RequestMetrics)."""
        if self.metrics is not None:
            self._folding = asyncio.create_task(self._fold_every(self.metrics))

    @staticmethod
    async def _fold_every(metrics: RequestMetrics) -> None:
        while True:
            await asyncio.sleep(FOLD_S)
            try:
                metrics.fold()
            except Exception as e:  # noqa: BLE001 - a failed fold must not end the folding
                log.warning("folding the request metrics failed: %s", e)

    async def stop(self) -> None:
        if self._folding is not None:
            self._folding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._folding
            self._folding = None
        if self.metrics is not None:
            self.metrics.fold()  # in multiprocess mode, what this process recorded outlives it in the files
        if self.payload is not None:
            await self.payload.stop()

    def served(self, protocol: str, probe: Probe, answer: Answer, scope: Scope) -> None:
        spec = probe.spec
        if self.metrics is not None:
            self.metrics.observe(spec.name, spec.version, answer.patch or "", ROUTES[protocol], 200,
                                 perf_counter() - probe.start, probe.upstream_s, probe.patch_s)
        if self.payload is not None:
            rid = _request_id(scope, probe)
            patch = answer.patch or "none"
            self.payload.log(Payload(REQUEST_TYPE, rid, spec.name, spec.version, patch,
                                     _content_type(scope), probe.body or b""))
            self.payload.log(Payload(RESPONSE_TYPE, rid, spec.name, spec.version, patch,
                                     _JSON if answer.binary_header is None else _OCTETS, answer.body))

    def failed(self, protocol: str, probe: Probe, status: int, exc: BaseException) -> None:
        if self.metrics is None:
            return
        # A model that never resolved is labelled "": unknown names sent by clients mint no series.
        model, version = ("", "") if probe.spec is None else (probe.spec.name, probe.spec.version)
        self.metrics.observe(model, version, probe.patch or "", ROUTES[protocol], status,
                             perf_counter() - probe.start, probe.upstream_s, probe.patch_s)
        kind = upstream_error_kind(exc)
        if kind is not None:
            self.metrics.upstream_error(model, version, kind)


def _request_id(scope: Scope, probe: Probe) -> str:
    """KServe's choice: the caller's X-Request-Id, else (ours) the V2 request's id, else a new one."""
    for key, value in scope["headers"]:
        if key == _REQUEST_ID:
            return value.decode("latin-1")
    return probe.request_id or str(uuid.uuid4())


def _content_type(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == _CONTENT_TYPE:
            return value.decode("latin-1")
    return _JSON


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format: this process's metrics (all processes' in multiprocess mode) and the job queue."""
    app = request.app
    observer: Observer | None = getattr(app.state, "observer", None)
    if observer is not None and observer.metrics is not None:
        observer.metrics.fold()  # this process's buffered requests: a scrape sees every request answered
    extra = None
    try:
        queued = await app.state.redis.zcard(app.state.settings.job_queue)
        running = await app.state.jobs.running_count()
        extra = job_gauges(queued, running)
    except (RedisError, OSError) as e:  # the request metrics are still worth a scrape
        log.warning("metrics: cannot read the job queue from Redis (%s)", e)
    return Response(exposition(extra), media_type=CONTENT_TYPE)


async def startup(app: FastAPI) -> None:
    settings = app.state.settings
    payload = None
    if settings.payload_log_url:
        payload = PayloadLogger(settings.payload_log_url, settings.payload_log_source, settings.payload_log_queue,
                                settings.payload_log_timeout_s)
        await payload.start()
    metrics = RequestMetrics() if settings.metrics else None
    observer = Observer(metrics, payload) if metrics is not None or payload is not None else None
    if observer is not None:
        observer.start()
    app.state.observer = observer


async def shutdown(app: FastAPI) -> None:
    observer: Observer | None = getattr(app.state, "observer", None)
    app.state.observer = None
    if observer is not None:
        await observer.stop()
