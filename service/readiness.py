"""Readiness that reflects the upstreams: a gateway whose model servers do not answer is not ready.

An orchestrator's readiness probe should take a gateway out of rotation when what it fronts is down, so
`/v2/health/ready` asks each registered upstream (distinct base URLs, concurrently) and
`/v2/models/{m}/ready` asks the model's own (V2: its model-ready endpoint; KServe V1: the model's
status; MLflow: `/ping`). Answers are cached for `TTL_S` per URL, failures too, so a storm of probes
sends each upstream at most one request that often. Liveness stays local. The setting
`ready_checks_upstreams` (FAIRPATCH_READY_CHECKS_UPSTREAMS=false) turns this off.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from service.infer import TtlCache
from service.registry import ModelSpec
from service.upstream import UpstreamClient, UpstreamError, upstream_model_name, v2_model_url

TTL_S = 1.5
CHECK_TIMEOUT_S = 2.0  # a readiness probe waits this long for an upstream, at most


def server_ready_url(spec: ModelSpec) -> str:
    up = spec.upstream
    if up.protocol == "v2":
        return f"{up.url}/v2/health/ready"
    if up.protocol == "v1":
        return f"{up.url}/v1/models/{quote(upstream_model_name(spec), safe='')}"
    return f"{up.url}/ping"


def model_ready_url(spec: ModelSpec) -> str:
    return f"{v2_model_url(spec)}/ready" if spec.upstream.protocol == "v2" else server_ready_url(spec)


class UpstreamReadiness:
    """Whether upstream URLs answer 2xx, each asked at most once per `ttl_s`."""

    def __init__(self, client: UpstreamClient, ttl_s: float = TTL_S) -> None:
        self.client, self.ttl_s = client, ttl_s
        self._seen: TtlCache[str, str | None] = TtlCache()

    async def problem(self, url: str, timeout_s: float) -> str | None:
        """None when `url` answers 2xx, else why not (the upstream's error, in words)."""

        async def load() -> str | None:
            try:
                await self.client.request("GET", url, None, min(timeout_s, CHECK_TIMEOUT_S))
            except UpstreamError as e:
                return str(e)
            return None

        return await self._seen.get(url, load, lambda _v: self.ttl_s)

    async def model_problem(self, spec: ModelSpec) -> str | None:
        return await self.problem(model_ready_url(spec), spec.upstream.timeout_s)

    async def server_problem(self, specs: list[ModelSpec]) -> str | None:
        """The first problem among the distinct upstreams of `specs`, None when all answer."""
        urls = {server_ready_url(s): s.upstream.timeout_s for s in specs}
        problems = await asyncio.gather(*(self.problem(u, t) for u, t in urls.items()))
        return next((p for p in problems if p is not None), None)
