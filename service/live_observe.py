"""Recording live fairness: the hot path's hook, the periodic flush to Redis, feedback joins, reads.

No Redis round trip per request, and little work: `observe` appends the request (its rows' groups and
the raw and patched scores, as served) to in-process lists. A task flushes every `live_flush_s`: the
waiting requests are counted at once (one decision per row over the batch, counts by group with
bincount), each request with an id is encoded for feedback, and the counts go out as HINCRBYs on the
current time bucket's hash and the requests as fields of one hash, in one pipeline. Every replica
flushes into the same hashes, so a read merges all of them: the last `live_window_s` of buckets,
HGETALL in one pipeline.

Layout (prefix `fp:`): `live:{model}:{version}:{bucket}` (a hash of counts, bucket = unix time //
`live_bucket_s`, expiring after the window) and `live-req:{bucket}` (a hash of request id -> the
request's decisions, one per tenth of `feedback_ttl_s`, expiring after it).

A drift check runs every `live_check_s`: a version whose served dp gap is above the alert threshold
(service.live_fairness.figures) is logged when it starts and stops drifting, and each listener added
with `on_drift` is called with the version's figures (the hook metrics use for gauges).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import chain, islice
from typing import Any

import numpy as np
from redis.asyncio import Redis

from service import live_fairness as lf
from service.estimated_groups import estimator
from service.rollout import Rollout, patched_arm

log = logging.getLogger("fairpatch.service")

DriftListener = Callable[[str, str, list[lf.ArmFigures]], None]


def counts_request(live: LiveRecorder | None, call: Any, runner: Any) -> bool:
    """Whether live fairness counts this request: it carries its group, or the patch estimates it."""
    return live is not None and (call.group is not None or estimator(runner) is not None)


def arm_of(stage: Rollout | None, runner: Any, request_id: str | None) -> tuple[str, Any, Any]:
    """(arm, the runner that serves, the runner to shadow) for a request, by the patch's rollout stage."""
    if stage is None:
        return "active", runner, None
    if stage.stage == "shadow":
        return "shadow", None, runner
    if patched_arm(request_id, stage.percent or 0.0):
        return "canary", runner, None
    return "control", None, None


_STR = {str}


def group_names(group: Any, spec: Any, runner: Any) -> list[str]:
    """Each row's group name from the group input (ids are named by the patch's groups, else the
    registration's). The JSON case, a flat list of names, is taken as it is (the template validated it)."""
    data = group.data
    if isinstance(data, list) and data and set(map(type, data)) == _STR:  # map and set: no Python loop per row
        return data
    from service.oip import to_numpy

    g = np.asarray(to_numpy(group)).reshape(-1)
    if g.dtype.kind in "iu":
        names = list(runner.patch.groups) if runner is not None and runner.patch.groups else list(spec.groups or [])
        return [names[i] if 0 <= i < len(names) else str(i) for i in g.tolist()]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in g.tolist()]


def record(live: LiveRecorder, spec: Any, call: Any, runner: Any, pid: str | None, arm: str, trace: Any,
           patched: np.ndarray | None) -> None:
    """The hot path's hook: one served request's decisions into the in-process counts. Never fails the request
    it observes (a scores shape it cannot read is logged once)."""
    try:
        _record(live, spec, call, runner, pid, arm, trace, patched)
    except Exception as e:  # noqa: BLE001
        if spec.name not in _unreadable:
            _unreadable.add(spec.name)
            log.warning("live fairness cannot count model %s's answers (%s: %s)", spec.name, type(e).__name__, e)


_unreadable: set[str] = set()


def _record(live: LiveRecorder, spec: Any, call: Any, runner: Any, pid: str | None, arm: str, trace: Any,
            patched: np.ndarray | None) -> None:
    kind = spec.upstream.output_kind
    if arm == "shadow":
        if patched is None:
            return  # the shadow failed (logged): its row would be half a record
        raw, raw_kind, out = trace.served, kind, patched  # what was served is the raw model's answer
    else:
        raw, raw_kind, out = trace.raw, trace.raw_kind or kind, trace.served
    if call.group is not None:
        groups, source = group_names(call.group, spec, None), "given"
    else:  # only reached when the patch has an attribute estimator (service.infer.serve)
        groups, source = estimator(runner).groups(trace.features, trace.kept), "estimated"
    if len(groups) != len(raw):
        return
    live.observe(spec.name, spec.version, pid, arm, groups, raw, raw_kind, out, kind, call.request.id, source)


_shadow_logged: set[str] = set()


def shadow_failed(spec: Any, runner: Any, error: Exception) -> None:
    """A shadow patch that cannot run is logged once per patch, not once per request."""
    pid = runner.patch.id
    if pid not in _shadow_logged:
        _shadow_logged.add(pid)
        log.warning("the shadow patch %s of model %s version %s cannot run (%s: %s); its figures are not recorded",
                    pid[:12], spec.name, spec.version, type(error).__name__, error)


# A recorded request as Redis keeps it: model, version, patch, arm, group source, groups, raw and patched
# decisions (separated by \x1f, groups by \x1e, decisions as a string of 0s and 1s): cheaper than JSON.
_RS = "\x1e"
_BITS = np.int8(ord("0"))  # a 0/1 decision + this = the character "0" or "1"


def _decode(raw: bytes | str) -> tuple:
    text = raw.decode() if isinstance(raw, bytes) else raw
    model, version, pid, arm, source, groups, r, o = text.split("\x1f")
    return model, version, pid, arm, source, groups.split(_RS), [int(c) for c in r], [int(c) for c in o]


# What requests waiting to be counted share: model, version, patch, arm, group source, raw and patched score kinds.
_Cell = tuple[str, str, str, str, str, str, str]
# Requests waiting are counted at once past about this many bytes (their scores, groups and records): bounded memory.
_COUNT_AT = 16 << 20


class LiveRecorder:
    def __init__(self, redis: Redis, *, prefix: str = "fp:", bucket_s: int = 60, window_s: float = 3600.0,
                 flush_s: float = 1.0, check_s: float = 10.0, alert_gap: float = 0.1,
                 feedback_ttl_s: float = 3600.0, max_requests: int = 100_000) -> None:
        self.redis, self.prefix = redis, prefix
        self.bucket_s, self.window_s, self.flush_s, self.check_s = bucket_s, window_s, flush_s, check_s
        self.alert_gap, self.feedback_ttl_s, self.max_requests = alert_gap, feedback_ttl_s, max_requests
        self._counts: dict[tuple[str, str], dict[str, int]] = {}
        # Requests observed and not yet counted (`_count`), one entry per request in each list, and about how many
        # bytes they hold. Each entry is a string, an array, None or a shared cell: nothing the request allocates
        # outlives it as an object the garbage collector tracks, so waiting requests do not make its passes more
        # frequent (each pass would carry the requests then in flight into older generations, and on to full
        # collections of the whole heap).
        self._cells: dict[_Cell, _Cell] = {}
        self._p_cell: list[_Cell] = []
        self._p_groups: list[str | tuple[str, ...]] = []  # joined by _RS (a tuple when a name holds _RS)
        self._p_raw: list[np.ndarray] = []
        self._p_out: list[np.ndarray] = []
        self._p_id: list[str | None] = []
        self._pending_size = 0
        # Counted requests by id, encoded, not yet written to Redis (bounded); once written, Redis (with its TTL)
        # is the one copy, so every replica sees a request labelled once.
        self._unflushed: dict[str, str] = {}
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}  # (patch, arm, source, group) -> count fields
        self._seen: set[tuple[str, str]] = set()
        self._drifting: set[tuple[str, str]] = set()
        self._listeners: list[DriftListener] = []
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # ------------------------------------------------------------------ the hot path
    def observe(self, model: str, version: str, patch: str | None, arm: str, groups: Sequence[str], raw: np.ndarray,
                raw_kind: str, out: np.ndarray, out_kind: str, request_id: str | None, source: str = "given") -> None:
        """One served request: its rows' groups, the raw scores and the patch's (the raw ones where the patch did
        not run), each in its kind. Kept (a view's rows copied) until the next flush counts every waiting request
        at once (`_count`): a few list appends per request."""
        n = len(groups)
        if len(raw) != n or len(out) != n:
            raise ValueError(f"{n} groups for {len(raw)} raw and {len(out)} patched rows")
        # A view would keep what it views (a binary upstream answer's whole body, say) until the flush.
        if raw.base is not None:
            raw = raw.copy()
        if out.base is not None:
            out = out.copy()
        key = (model, version, patch or "none", arm, source, raw_kind, out_kind)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = key
        joined = _RS.join(groups)
        self._p_cell.append(cell)
        self._p_groups.append(joined if n and joined.count(_RS) == n - 1 else tuple(groups))
        self._p_raw.append(raw)
        self._p_out.append(out)
        self._p_id.append(request_id)
        self._pending_size += raw.nbytes + out.nbytes + len(joined) + 64  # the arrays, the groups, the entries
        if self._pending_size >= _COUNT_AT:
            self._count()

    def _count(self) -> None:
        """The waiting requests into counts and encoded records, a batch per (version, patch, arm, group source,
        score kinds and shapes): one decision per row over the batch, counted by group with bincount."""
        cells, groups, raws, outs, ids = self._p_cell, self._p_groups, self._p_raw, self._p_out, self._p_id
        self._p_cell, self._p_groups, self._p_raw, self._p_out, self._p_id = [], [], [], [], []
        self._pending_size = 0
        batches: dict[tuple, list[int]] = {}
        for i, cell in enumerate(cells):
            key = (cell, raws[i].shape[1:], outs[i].shape[1:])
            batch = batches.get(key)
            if batch is None:
                batches[key] = [i]
            else:
                batch.append(i)
        for (cell, _, _), batch in batches.items():
            try:
                self._count_batch(cell, [groups[i] for i in batch], [raws[i] for i in batch],
                                  [outs[i] for i in batch], [ids[i] for i in batch])
            except Exception as e:  # noqa: BLE001 - scores it cannot read lose their own batch only
                if cell[0] not in _unreadable:
                    _unreadable.add(cell[0])
                    log.warning("live fairness cannot count model %s's answers (%s: %s)", cell[0], type(e).__name__,
                                e)
        if len(self._unflushed) > self.max_requests:  # the oldest go first
            for rid in list(islice(self._unflushed, len(self._unflushed) - self.max_requests)):
                del self._unflushed[rid]

    def _count_batch(self, cell: _Cell, joined: list[str | tuple[str, ...]], raws: list[np.ndarray],
                     outs: list[np.ndarray], request_ids: list[str | None]) -> None:
        model, version, pid, arm, source, raw_kind, out_kind = cell
        raw = lf.decisions(np.concatenate(raws), raw_kind)
        out = lf.decisions(np.concatenate(outs), out_kind)
        counts = self._counts.get((model, version))
        if counts is None:
            counts = self._counts[(model, version)] = defaultdict(int)
        names = self._names
        groups = list(chain.from_iterable(g.split(_RS) if type(g) is str else g for g in joined))
        present = list(set(groups))
        index = {g: i for i, g in enumerate(present)}
        ids = np.fromiter(map(index.__getitem__, groups), dtype=np.intp, count=len(groups))
        rows = np.bincount(ids, minlength=len(present)).tolist()
        raw_pos = np.bincount(ids, weights=raw, minlength=len(present)).astype(np.int64).tolist()
        out_pos = np.bincount(ids, weights=out, minlength=len(present)).astype(np.int64).tolist()
        for g, n, r, o in zip(present, rows, raw_pos, out_pos, strict=True):
            fields = names.get((pid, arm, source, g))
            if fields is None:
                fields = names[(pid, arm, source, g)] = tuple(lf.field(pid, arm, source, g, name)
                                                              for name in ("n", "raw_pos", "out_pos"))
            counts[fields[0]] += n
            if r:
                counts[fields[1]] += r
            if o:
                counts[fields[2]] += o
        prefix = "\x1f".join((model, version, pid, arm, source, ""))
        raw_bits = (raw + _BITS).tobytes().decode("ascii")
        out_bits = (out + _BITS).tobytes().decode("ascii")
        unflushed = self._unflushed
        start = 0
        for g, scores, rid in zip(joined, raws, request_ids, strict=True):
            end = start + len(scores)
            if rid is not None:
                named = g if type(g) is str else _RS.join(g)
                unflushed[rid] = f"{prefix}{named}\x1f{raw_bits[start:end]}\x1f{out_bits[start:end]}"
            start = end

    # ------------------------------------------------------------------ flushing
    def _key(self, model: str, version: str, bucket: int) -> str:
        return f"{self.prefix}live:{model}:{version}:{bucket}"

    @property
    def _req_bucket_s(self) -> float:
        """Requests by id live in one hash per this many seconds (about 10 per TTL: few hashes to look in)."""
        return max(1.0, self.feedback_ttl_s / 10)

    def _req_key(self, bucket: int) -> str:
        return f"{self.prefix}live-req:{bucket}"

    async def flush(self) -> None:
        self._count()
        counts, self._counts = self._counts, {}
        requests, self._unflushed = self._unflushed, {}
        if not counts and not requests:
            return
        bucket = int(time.time() // self.bucket_s)
        ttl = int(self.window_s + 2 * self.bucket_s)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (model, version), fields in counts.items():
                    key = self._key(model, version, bucket)
                    for name, value in fields.items():
                        pipe.hincrby(key, name, value)
                    pipe.expire(key, ttl)
                if requests:
                    key = self._req_key(int(time.time() // self._req_bucket_s))
                    pipe.hset(key, mapping=requests)
                    pipe.expire(key, int(self.feedback_ttl_s + self._req_bucket_s) + 1)
                await pipe.execute()
        except Exception as e:  # noqa: BLE001 - Redis away: keep the counts for the next flush, drop the ids
            log.warning("flushing live fairness counts failed (%s); retrying at the next flush", e)
            for key, fields in counts.items():
                mine = self._counts.setdefault(key, defaultdict(int))
                for name, value in fields.items():
                    mine[name] += value
            return
        self._seen.update(counts)

    # ------------------------------------------------------------------ reads
    def effective_window(self, window_s: float | None) -> float:
        """The asked window, at most the configured one: older buckets have expired, and an unbounded
        window would walk (and pipeline) one key per bucket back to the epoch."""
        return self.window_s if window_s is None else min(window_s, self.window_s)

    async def merged(self, model: str, version: str, window_s: float | None = None) -> dict[str, int]:
        """The counts every replica flushed for the version over the window (default: the configured one)."""
        window = self.effective_window(window_s)
        now = int(time.time() // self.bucket_s)
        first = int((time.time() - window) // self.bucket_s)
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in range(first, now + 1):
                pipe.hgetall(self._key(model, version, b))
            hashes = await pipe.execute()
        return lf.merge(hashes)

    async def figures(self, model: str, version: str, window_s: float | None = None) -> list[lf.ArmFigures]:
        return lf.figures(await self.merged(model, version, window_s), self.alert_gap)

    # ------------------------------------------------------------------ feedback
    async def feedback(self, items: list[tuple[str, list[int]]]) -> tuple[int, list[str], list[str]]:
        """Join labels to recorded requests by id; (rows labelled, ids unknown or expired, ids whose label count
        does not match their rows). Each request is labelled once: its record is taken when joined."""
        self._count()
        entries: dict[str, tuple | None] = {}
        for rid, _ in items:
            mine = self._unflushed.pop(rid, None)
            entries[rid] = None if mine is None else _decode(mine)
        ids = list(entries)
        now = time.time()
        newest = int(now // self._req_bucket_s)
        keys = [self._req_key(b) for b in range(int((now - self.feedback_ttl_s) // self._req_bucket_s), newest + 1)]
        async with self.redis.pipeline(transaction=True) as pipe:  # read and take at once: labelled once
            for key in keys:
                pipe.hmget(key, ids)
                pipe.hdel(key, *ids)
            found = (await pipe.execute())[::2]
        for values in found:
            for rid, raw in zip(ids, values, strict=True):
                if entries[rid] is None and raw is not None:
                    entries[rid] = _decode(raw)
        unknown, mismatched, rows = [], [], 0
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for rid, labels in items:
            entry = entries.get(rid)
            if entry is None:
                unknown.append(rid)
                continue
            model, version, pid, arm, source, groups, raw, out = entry
            if len(labels) != len(groups):
                mismatched.append(rid)
                continue
            entries[rid] = None  # a second label for the same id in one batch counts once
            fields = counts.setdefault((model, version), defaultdict(int))
            for k, v in lf.label_counts(pid, arm, source, groups, raw, out, labels).items():
                fields[k] += v
            rows += len(labels)
        if counts:
            bucket = int(time.time() // self.bucket_s)
            async with self.redis.pipeline(transaction=False) as pipe:
                for (model, version), fields in counts.items():
                    key = self._key(model, version, bucket)
                    for name, value in fields.items():
                        pipe.hincrby(key, name, value)
                    pipe.expire(key, int(self.window_s + 2 * self.bucket_s))
                await pipe.execute()
        return rows, unknown, mismatched

    # ------------------------------------------------------------------ drift
    def on_drift(self, listener: DriftListener) -> None:
        """Call `listener(model, version, figures)` at every drift check of a version this replica serves."""
        self._listeners.append(listener)

    async def check(self) -> None:
        for model, version in list(self._seen):
            arms = await self.figures(model, version)
            key = (model, version)
            drifting = any(a.drifting for a in arms)
            if drifting and key not in self._drifting:
                worst = max((a for a in arms if a.drifting), key=lambda a: a.outputs["served"].dp_gap or 0)
                log.warning("model %s version %s is drifting: live dp gap %s (95%% CI %s) of arm %s above the alert "
                            "threshold %s", model, version, worst.outputs["served"].dp_gap,
                            worst.outputs["served"].dp_gap_ci, worst.arm, self.alert_gap)
                self._drifting.add(key)
            elif not drifting and key in self._drifting:
                log.info("model %s version %s is no longer drifting", model, version)
                self._drifting.discard(key)
            for listener in self._listeners:
                try:
                    listener(model, version, arms)
                except Exception as e:  # noqa: BLE001 - a listener's bug must not stop the checks
                    log.warning("live fairness listener failed: %s", e)

    # ------------------------------------------------------------------ lifecycle
    async def _loop(self, every: float, step: Callable[[], Any], what: str) -> None:
        while not self._stopping:
            await asyncio.sleep(every)
            try:
                await step()
            except Exception as e:  # noqa: BLE001
                if not self._stopping:  # a step cut short by shutdown is not worth a warning
                    log.warning("%s failed: %s", what, e)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(self.flush_s, self.flush, "live fairness flush")),
                       asyncio.create_task(self._loop(self.check_s, self.check, "live fairness drift check"))]

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.flush()  # what this replica counted since the last flush
