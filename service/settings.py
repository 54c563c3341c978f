"""Gateway settings, read from `FAIRPATCH_*` environment variables (and CLI flags on top).

Only what the code reads today plus the obvious security knobs; new components add their own
fields here when they land.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


def default_data_dir() -> Path:
    """Where the embedded Redis (and later the patch blobs) live: the XDG data home."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "fairpatch"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAIRPATCH_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    # None = start a private embedded Redis under data_dir. The bare REDIS_URL is honoured too: it is
    # the convention tests and container platforms already use; FAIRPATCH_REDIS_URL wins over it.
    redis_url: str | None = Field(default=None,
                                  validation_alias=AliasChoices("FAIRPATCH_REDIS_URL", "REDIS_URL"))
    host: str = "127.0.0.1"  # loopback by default; containers set FAIRPATCH_HOST=0.0.0.0
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "info"
    max_body_bytes: int = Field(default=64 * MiB, gt=0)
    # How often each replica re-reads the active-patch pointers (pub/sub can drop messages).
    patch_recheck_s: float = Field(default=5.0, gt=0)
    # Management endpoints need `Authorization: Bearer <key>` when set; None = they are open (the gateway
    # warns at start when that happens on a non-loopback host).
    admin_key: SecretStr | None = None
    # Upstream URL prefixes the gateway may call; comma-separated or a JSON list in the environment.
    upstream_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Uploaded datasets (raw CSV / Parquet bodies) larger than this are refused with 413.
    max_dataset_bytes: int = Field(default=64 * MiB, gt=0)
    # Caps on what an uploaded dataset decodes to, checked while it is read (a small gzip CSV or zstd Parquet
    # file can hold far more than its size): rows, columns, and bytes of CSV text or Parquet column data.
    max_dataset_rows: int = Field(default=2_000_000, gt=0)
    max_dataset_columns: int = Field(default=10_000, gt=0)
    max_dataset_decoded_bytes: int = Field(default=256 * MiB, gt=0)
    # Uploaded model artifacts (ONNX) larger than this are refused with 413 (max_body_bytes caps it too).
    max_artifact_bytes: int = Field(default=64 * MiB, gt=0)
    # The arq queue patch-training jobs go to; gateways and workers on one Redis must agree on it.
    job_queue: str = Field(default="fairpatch:jobs", min_length=1)
    # A training job (fit + evaluation) that runs longer than this fails.
    job_timeout_s: float = Field(default=3600.0, gt=0)
    # A running job whose worker has not written a heartbeat for this long is taken as lost: re-queued once,
    # failed the second time. Workers beat every third of it; the value each worker runs with is recorded
    # in the job, so gateways and readers need not agree on it.
    job_heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    # Jobs one worker process runs at once (each fit runs in a thread of its own).
    worker_max_jobs: int = Field(default=2, ge=1)
    # Start one `fairpatch worker` subprocess beside the gateway (what `fairpatch serve` does in
    # embedded mode) and stop it with the gateway.
    start_worker: bool = False
    # Serve the inference POSTs on a lean ASGI path ahead of FastAPI (service.fast_path); off: FastAPI
    # serves them too, with the same answers, at about twice the gateway's CPU per request.
    fast_path: bool = True
    # Live fairness of served traffic (service.live_observe): requests that carry their group are counted in
    # process and flushed to Redis every live_flush_s into buckets of live_bucket_s, read over live_window_s.
    live_fairness: bool = True
    live_flush_s: float = Field(default=1.0, gt=0)
    live_bucket_s: int = Field(default=60, gt=0)
    live_window_s: float = Field(default=3600.0, gt=0)
    # A version is drifting when the dp gap it serves is above this with 95% confidence (checked every
    # live_check_s: a log line, the API's `drifting`, the drift listeners).
    live_alert_gap: float = Field(default=0.1, ge=0, le=1)
    live_check_s: float = Field(default=10.0, gt=0)
    # Served requests are remembered by id this long (and at most this many per replica) for feedback labels.
    feedback_ttl_s: float = Field(default=3600.0, gt=0)
    feedback_max_requests: int = Field(default=100_000, gt=0)
    # Prometheus metrics at GET /metrics (service.prometheus); off: the hot path records nothing.
    metrics: bool = True
    # KServe-style payload logging (service.payload_log): each inference request and its served answer posted
    # as CloudEvents to this URL, off the hot path; None = off.
    payload_log_url: str | None = None
    payload_log_queue: int = Field(default=1000, ge=1)  # events waiting to be sent; more are dropped and counted
    payload_log_source: str = "fairpatch"  # the events' `source` (KServe: the logger's own URL)
    payload_log_timeout_s: float = Field(default=5.0, gt=0)  # one post to the sink; past it the event counts as failed
    # /v2/health/ready and /v2/models/{m}/ready ask the upstreams too (answers cached ~1.5 s), so a readiness
    # probe takes a gateway whose model servers are down out of rotation; off: they check Redis alone.
    ready_checks_upstreams: bool = True
    # Where models run (patcher.device): the weight patches served in process, the local upstream, and the worker's
    # fits (torch) and oracles (onnxruntime). auto: the GPU where onnxruntime-gpu / a CUDA torch finds one, else
    # the CPU; cuda: the GPU or a start-up error that says what to install; cpu: the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("redis_url", "payload_log_url", mode="before")
    @classmethod
    def _blank_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("upstream_allowlist", mode="before")
    @classmethod
    def _split_list(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: object) -> object:
        return (v.strip().lower() or "auto") if isinstance(v, str) else v

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()
