"""Payload logging as KServe's logger does it: each inference request and its served answer posted as a
CloudEvent (binary content mode) to a sink, so TrustyAI or any CloudEvents consumer sees the patched output.

The headers follow KServe's logger (pkg/logger/worker.go): `ce-type` org.kubeflow.serving.inference.request
or .response, `ce-id` the request id (the pair shares it), `ce-source`, `ce-specversion` 1.0, `ce-time`, and
the extensions `ce-inferenceservicename` (the model), `ce-component`, `ce-endpoint` ("default"), with the
payload itself as the body under its own content type. fairpatch adds `ce-modelversion` and `ce-fairpatchpatch`
(the patch that served, or "none").

Off the hot path: a request only puts two tuples on a bounded queue (`put_nowait`); a few sender tasks build
and post the events. A full queue drops the event and counts it (fairpatch_payload_events{outcome="dropped"});
a sink that fails or is slow never delays or fails a prediction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import NamedTuple

import aiohttp
from cloudevents.core.bindings.http import to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from service.prometheus import PAYLOAD_EVENTS
from service.redact import redact_url

log = logging.getLogger("fairpatch.service")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
COMPONENT = "predictor"  # what KServe's logger says for the predictor's traffic: fairpatch answers in its place
ENDPOINT = "default"  # KServe: default or canary
SENDERS = 4
_FORMAT = JSONFormat()


class Payload(NamedTuple):
    type: str
    id: str
    model: str
    version: str
    patch: str
    content_type: str
    body: bytes


def event(p: Payload, source: str) -> CloudEvent:
    return CloudEvent({"type": p.type, "source": source, "id": p.id, "datacontenttype": p.content_type,
                       "inferenceservicename": p.model, "component": COMPONENT, "endpoint": ENDPOINT,
                       "modelversion": p.version, "fairpatchpatch": p.patch}, p.body)


class PayloadLogger:
    """A bounded queue of payloads and the tasks that post them to `url`."""

    def __init__(self, url: str, source: str, max_queued: int = 1000, timeout_s: float = 5.0) -> None:
        self.url, self.source, self.timeout_s = url, source, timeout_s
        self.queue: asyncio.Queue[Payload] = asyncio.Queue(max_queued)
        self._sent = PAYLOAD_EVENTS.labels("sent")
        self._failed = PAYLOAD_EVENTS.labels("failed")
        self._dropped = PAYLOAD_EVENTS.labels("dropped")
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._failures = 0

    def log(self, payload: Payload) -> None:
        """Queue one event; never blocks, never raises."""
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self._dropped.inc()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._tasks = [asyncio.create_task(self._send_loop()) for _ in range(SENDERS)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    async def _send_loop(self) -> None:
        assert self._session is not None
        while True:
            payload = await self.queue.get()
            message = to_binary(event(payload, self.source), _FORMAT)
            try:
                async with self._session.post(self.url, data=message.body, headers=message.headers) as r:
                    await r.read()
                    ok = r.status < 300
                    reason = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                ok, reason = False, f"{type(e).__name__}: {e}"
            if ok:
                self._sent.inc()
                continue
            self._failed.inc()
            self._failures += 1
            if self._failures % 1000 == 1:  # the first failure and every 1000th: a down sink must not flood the log
                log.warning("payload log: the sink %s refused or missed event %s (%s); %d failed so far",
                            redact_url(self.url), payload.id, reason, self._failures)
