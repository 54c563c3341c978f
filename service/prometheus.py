"""The gateway's and the worker's Prometheus metrics: one set of metric objects per process.

With `PROMETHEUS_MULTIPROC_DIR` set (several gateway workers, or a worker process beside the gateway),
prometheus-client keeps every process's values in files there and `exposition` merges them; the
directory must exist and be emptied before the processes start (prometheus-client's rule).

The hot path (service.fast_path) records one request through `RequestMetrics.observe`, which buffers
it: a request costs a dict lookup and three appends to an array of doubles, and the buffers are folded
into the metrics in bulk (`RequestMetrics.fold`) rather than each request taking prometheus-client's
locks four times. Label values are bounded: a request whose model did not resolve is labelled with model "" (a flood of
unknown names must not mint a series each).
"""

from __future__ import annotations

import os
from array import array

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from service.upstream import UpstreamError, UpstreamRejected, UpstreamTimeout

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Upstream calls and whole requests: a few ms on loopback to the 30 s of a slow model.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A patch's graphs over a batch: tens of microseconds to a few ms.
_PATCH_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

REQUESTS = Counter("fairpatch_requests", "inference requests answered",
                   ["model", "version", "patch", "route", "status"])
REQUEST_SECONDS = Histogram("fairpatch_request_seconds", "whole inference request, body read to answer",
                            ["model", "version", "route"], buckets=_BUCKETS)
UPSTREAM_SECONDS = Histogram("fairpatch_upstream_seconds", "the upstream model's call",
                             ["model", "version"], buckets=_BUCKETS)
PATCH_SECONDS = Histogram("fairpatch_patch_seconds", "the patch's input and output transforms",
                          ["model", "version"], buckets=_PATCH_BUCKETS)
UPSTREAM_ERRORS = Counter("fairpatch_upstream_errors", "failed upstream calls by kind",
                          ["model", "version", "kind"])
JOBS = Counter("fairpatch_jobs", "training jobs reaching a state (queued at submission, then how they ended)",
               ["method", "state"])
JOB_QUERIES = Counter("fairpatch_job_queries", "rows training jobs sent the upstream while fitting", ["method"])
ACTIVATIONS = Counter("fairpatch_patch_activations", "patches activated (patch '' = deactivated)",
                      ["model", "version", "patch"])
PAYLOAD_EVENTS = Counter("fairpatch_payload_events", "payload-log CloudEvents by outcome (sent, failed, dropped)",
                         ["outcome"])


def upstream_error_kind(exc: BaseException) -> str | None:
    """What went wrong upstream, as a label: timeout, unreachable, rejected, status or invalid (an unreadable
    answer); None when `exc` is not an upstream failure."""
    if not isinstance(exc, UpstreamError):
        return None
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamRejected):
        return "rejected"
    if exc.upstream_status is not None:
        return "status"
    return "unreachable" if str(exc).startswith("cannot reach") else "invalid"


_Children = tuple[Counter, Histogram, Histogram, Histogram]  # requests, request, upstream and patch seconds
_Key = tuple[str, str, str, str, int]  # model, version, patch, route, status
FOLD_S = 1.0  # how often a running gateway folds its buffered observations (service.observability)
_FOLD_AT = 1024  # a label combination's buffer is folded at once when it holds this many requests
_NAN = float("nan")


class RequestMetrics:
    """The hot path's recorder. A request appends its three durations to its label combination's buffer (no
    lock, no walk over the buckets); `fold` moves the buffers into prometheus-client's metrics, which alone
    expose them (in multiprocess mode through their files). `fold` runs before every scrape of this process,
    every FOLD_S while the gateway runs (so other processes' scrapes see this one's requests), at shutdown, and
    when a buffer reaches _FOLD_AT requests (bounded memory). The event loop is the only caller."""

    def __init__(self) -> None:
        # Per label combination, three floats per request (whole, upstream, patch; NaN: not met): an array of
        # doubles, so buffered requests are no objects for the garbage collector to walk.
        self._pending: dict[_Key, array[float]] = {}
        self._children: dict[_Key, _Children] = {}
        self._errors: dict[tuple[str, str, str], Counter] = {}

    def observe(self, model: str, version: str, patch: str, route: str, status: int, total_s: float,
                upstream_s: float | None, patch_s: float | None) -> None:
        key = (model, version, patch, route, status)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = array("d")
        pending.append(total_s)
        pending.append(_NAN if upstream_s is None else upstream_s)
        pending.append(_NAN if patch_s is None else patch_s)
        if len(pending) >= 3 * _FOLD_AT:
            del self._pending[key]
            self._fold(key, pending)

    def fold(self) -> None:
        """Every buffered request into the metrics prometheus-client exposes."""
        pending, self._pending = self._pending, {}
        for key, observed in pending.items():
            self._fold(key, observed)

    def _fold(self, key: _Key, observed: array[float]) -> None:
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 10_000:  # bounded labels make this unreachable; a guard all the same
                self._children.clear()
            model, version, patch, route, status = key
            children = self._children[key] = (REQUESTS.labels(model, version, patch, route, str(status)),
                                               REQUEST_SECONDS.labels(model, version, route),
                                               UPSTREAM_SECONDS.labels(model, version),
                                               PATCH_SECONDS.labels(model, version))
        requests, total, upstream, patched = children
        durations = np.frombuffer(observed, dtype=np.float64).reshape(-1, 3)
        requests.inc(len(durations))
        for histogram, column in ((total, 0), (upstream, 1), (patched, 2)):
            values = durations[:, column]
            histogram_add(histogram, values[~np.isnan(values)])

    def upstream_error(self, model: str, version: str, kind: str) -> None:
        key = (model, version, kind)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = UPSTREAM_ERRORS.labels(model, version, kind)
        child.inc()


def histogram_add(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every v in `values`, a bucket increment per bucket rather than per value. A value
    goes in the first bucket whose upper bound is >= it (side="left"), as `observe` puts it. This reaches into the
    child's `_upper_bounds`, `_buckets` and `_sum`: prometheus-client is pinned, and tests/test_service_metrics_fold.py
    checks the exposition is the one `observe` gives."""
    if not len(values):
        return
    bounds = histogram._upper_bounds  # ends with +Inf
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, n in zip(histogram._buckets, counts.tolist(), strict=True):
        if n:
            bucket.inc(n)
    histogram._sum.inc(float(values.sum()))


class _JobGauges:
    """A collector of two values read at scrape time (prometheus-client's collector protocol: `collect`)."""

    def __init__(self, queued: int, running: int) -> None:
        self.queued, self.running = queued, running

    def collect(self) -> list[GaugeMetricFamily]:
        depth = GaugeMetricFamily("fairpatch_job_queue_depth", "training jobs queued and not started")
        depth.add_metric([], self.queued)
        run = GaugeMetricFamily("fairpatch_jobs_running", "training jobs a worker is running")
        run.add_metric([], self.running)
        return [depth, run]


def job_gauges(queued: int, running: int) -> CollectorRegistry:
    """The job queue as read from Redis at scrape time: shared by every replica, so a gauge of the scrape, not a
    value summed over processes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_JobGauges(queued, running))
    return registry


def exposition(extra: CollectorRegistry | None = None) -> bytes:
    """The text format of every metric: this process's (or, in multiprocess mode, all processes'), plus `extra`."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry)
    else:
        text = generate_latest(REGISTRY)
    return text + (generate_latest(extra) if extra is not None else b"")


# Live fairness (service.live_observe's drift check, every live_check_s): the served dp gap per arm, and whether
# the version is drifting. Set by whichever replica checked last: the figures are merged in Redis, so alike.
LIVE_DP_GAP = Gauge("fairpatch_live_dp_gap", "live dp gap of the served traffic over the window",
                    ["model", "version", "patch", "arm", "output"], multiprocess_mode="mostrecent")
LIVE_DRIFTING = Gauge("fairpatch_live_drifting", "1 when the version's served dp gap is above the alert threshold "
                      "with 95% confidence", ["model", "version"], multiprocess_mode="mostrecent")


def live_gauges(model: str, version: str, arms: list) -> None:
    """service.live_observe's drift listener: the arms' figures as gauges."""
    for a in arms:
        for output, figures in a.outputs.items():
            if figures.dp_gap is not None:
                LIVE_DP_GAP.labels(model, version, a.patch or "", a.arm, output).set(figures.dp_gap)
    LIVE_DRIFTING.labels(model, version).set(1.0 if any(a.drifting for a in arms) else 0.0)
