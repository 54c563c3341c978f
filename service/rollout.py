"""Safe rollout of a patch: its stage, the canary's arm of a request, and the activation guard's rule.

Stages: `shadow` (the raw model serves; the patch runs beside it and both are recorded), `canary`
(a percentage of requests, picked by a hash of the request id, get the patch), `active` (every
request). The stage lives beside the active pointer in Redis (service.patch_store); an absent stage
is `active`, so a patch activated the old way is served as before.

The arm rule is deterministic: the first 8 bytes of sha256(request id), big-endian, modulo 10,000,
below `percent * 100` -> the patched arm. The same id always gets the same arm on every replica;
a request without an id gets a random arm.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Stage = Literal["shadow", "canary", "active"]
STAGES: tuple[Stage, ...] = ("shadow", "canary", "active")
DEFAULT_CANARY_PERCENT = 10.0


class Rollout(BaseModel):
    """A patch's stage as stored (JSON) and as the API shows it."""

    model_config = ConfigDict(extra="forbid")

    patch: str
    stage: Stage = "active"
    percent: float | None = Field(None, ge=0, le=100, description="canary only: the patched share of requests")

    @model_validator(mode="after")
    def _percent_for_canary(self) -> Rollout:
        if self.stage == "canary" and self.percent is None:
            self.percent = DEFAULT_CANARY_PERCENT
        if self.stage != "canary":
            self.percent = None
        return self


class PromoteRequest(BaseModel):
    """`POST .../patches/{id}/promote`: move a patch to a stage (default: the next one along)."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage | None = None
    percent: float | None = Field(None, ge=0, le=100, description="canary: the patched share (default 10)")
    force: bool = Field(False, description="promote past shadow even though the patch did not improve its "
                                           "criterion on its held-out rows")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="activate even though the patch did not improve its criterion on "
                                           "its held-out rows")


def next_stage(current: Stage | None) -> Stage:
    """Along shadow -> canary -> active (a patch not yet in rollout starts in shadow)."""
    if current is None:
        return "shadow"
    return STAGES[min(STAGES.index(current) + 1, len(STAGES) - 1)]


def bucket(request_id: str) -> int:
    """The request's place in 0..9999 (see the module's rule)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") % 10_000


def patched_arm(request_id: str | None, percent: float) -> bool:
    """Whether a canary sends this request to the patched arm."""
    b = random.randrange(10_000) if request_id is None else bucket(request_id)  # noqa: S311 - not security
    return b < round(percent * 100)


def refusal(verdict: dict | None, patch_id: str, what: str) -> str | None:
    """Why the guard refuses `what` (activating, promoting) a patch, or None. Only a patch whose job measured
    it and found it did not improve its criterion is refused; no verdict (an uploaded patch, holdout 0) passes."""
    if not verdict or verdict.get("verdict") != "not improved":
        return None
    change = verdict.get("change")
    ci = verdict.get("change_ci") or [None, None]
    return (f"patch {patch_id[:12]} did not improve its criterion ({verdict.get('criterion')}) on its "
            f"{verdict.get('rows')} held-out rows: gap {verdict.get('gap_before')} -> {verdict.get('gap_after')} "
            f"(change {change}, 95% CI [{ci[0]}, {ci[1]}]); refusing {what} it. Pass force "
            "(API: {\"force\": true}; CLI: --force) to do it anyway, or shadow it first to see its live figures")


async def check_guard(patches: Any, patch_id: str, force: bool, what: str) -> None:
    """409 (service.errors.ApiError) when the guard refuses `what` for the patch and `force` is not given."""
    from service.errors import ApiError

    if force:
        return
    reason = refusal(await patches.verdict(patch_id), patch_id, what)
    if reason is not None:
        raise ApiError(409, reason)
