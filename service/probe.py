"""What one inference request leaves for observability: filled in by service.infer.serve as it goes, read by
service.fast_path when the answer (or the error) is out, for the metrics and the payload log."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import Any


@dataclass(slots=True)
class Probe:
    start: float  # perf_counter() when the request came in
    spec: Any = None  # the resolved ModelSpec (None: the request failed before its model resolved)
    patch: str | None = None  # the active patch's id
    upstream_s: float | None = None  # the upstream call
    patch_s: float | None = None  # the patch's transforms
    request_id: str | None = None  # the V2 request's `id`
    body: bytes | None = None  # the request body as read (kept only when the payload log wants it)

    def add_patch_time(self, since: float) -> None:
        self.patch_s = (self.patch_s or 0.0) + (perf_counter() - since)
