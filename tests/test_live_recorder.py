"""service.live_observe.LiveRecorder on its own against a real Redis: requests counted in batches at the flush give
the counts one request at a time gives, feedback finds requests not yet flushed, and scores it cannot read lose
their own batch only."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections import Counter

import numpy as np
from redis.asyncio import Redis

from service import live_fairness as lf
from service.live_observe import _COUNT_AT, LiveRecorder


def expected_counts(requests: list[tuple]) -> Counter:
    """Each request's rows counted one by one (live_fairness's definitions): the reference for the batches."""
    want: Counter = Counter()
    for pid, arm, source, groups, raw, raw_kind, out, out_kind in requests:
        if not groups:
            continue  # no rows, no counts
        r, o = lf.decisions(raw, raw_kind), lf.decisions(out, out_kind)
        for g, rd, od in zip(groups, r.tolist(), o.tolist(), strict=True):
            want[lf.field(pid, arm, source, g, "n")] += 1
            want[lf.field(pid, arm, source, g, "raw_pos")] += rd
            want[lf.field(pid, arm, source, g, "out_pos")] += od
    return +want  # zero counts are never written


def test_batched_counts_equal_per_row_counts_and_feedback_joins_unflushed_requests(redis_url):
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        live = LiveRecorder(redis, prefix=f"t{uuid.uuid4().hex[:8]}:")
        rng = np.random.default_rng(5)
        model = "m"
        requests = []
        for i in range(300):  # batches of 0 to 5 rows, scores of three kinds and shapes, four arms
            n = int(rng.integers(0, 6))
            groups = [["a", "b", "c"][j] for j in rng.integers(0, 3, n)]
            kind, raw = [("logits", rng.normal(size=(n, 2))), ("probabilities", rng.uniform(size=(n, 1))),
                         ("logits", rng.normal(size=(n, 3)))][i % 3]
            out = raw + rng.normal(scale=0.5, size=raw.shape)
            pid, arm = [("p1", "active"), ("p1", "shadow"), ("p2", "canary"), ("p2", "control")][i % 4]
            source = "given" if i % 5 else "estimated"
            live.observe(model, "1", pid, arm, groups, raw, kind, out, kind, f"r{i}", source)
            requests.append((pid, arm, source, groups, raw, kind, out, kind))
        # feedback before any flush: the requests are found in this process (and each is labelled once)
        labels = [("r0", [1] * len(requests[0][3])), ("r1", [0] * len(requests[1][3])), ("nope", [1])]
        rows, unknown, mismatched = await live.feedback(labels)
        assert unknown == ["nope"] and mismatched == [] and rows == len(requests[0][3]) + len(requests[1][3])
        await live.flush()
        merged = await live.merged(model, "1")
        counts = {k: v for k, v in merged.items() if k.split(lf.SEP)[4] in ("n", "raw_pos", "out_pos") and v}
        assert counts == dict(expected_counts(requests))
        # the rest of the requests went to Redis with their decisions: feedback joins them there
        i = 7
        pid, arm, source, groups, raw, kind, out, _ = requests[i]
        rows, unknown, _ = await live.feedback([(f"r{i}", [1] * len(groups)), ("r0", [1] * len(requests[0][3]))])
        assert rows == len(groups) and unknown == ["r0"]  # r0 was labelled already
        merged = await live.merged(model, "1")
        for g in set(groups):
            k = sum(1 for x in groups if x == g)
            assert merged[lf.field(pid, arm, source, g, "lab_n")] >= k
        await redis.aclose()

    asyncio.run(run())


def test_scores_it_cannot_read_lose_their_own_batch_only(redis_url):
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        live = LiveRecorder(redis, prefix=f"t{uuid.uuid4().hex[:8]}:")
        good = np.array([[0.0, 1.0], [1.0, 0.0]])
        live.observe("m", "1", None, "active", ["a", "b"], good, "logits", good, "logits", "ok")
        live.observe("m", "1", None, "active", ["a"], np.zeros((1, 0)), "logits", np.zeros((1, 0)), "logits",
                     "bad")  # no score columns: no decision
        await live.flush()
        merged = await live.merged("m", "1")
        assert merged[lf.field("none", "active", "given", "a", "n")] == 1
        assert merged[lf.field("none", "active", "given", "b", "n")] == 1
        assert merged[lf.field("none", "active", "given", "b", "raw_pos")] == 0
        assert merged[lf.field("none", "active", "given", "a", "out_pos")] == 1
        rows, unknown, _ = await live.feedback([("ok", [1, 0]), ("bad", [1])])
        assert rows == 2 and unknown == ["bad"]
        await redis.aclose()

    asyncio.run(run())


def test_requests_kept_for_feedback_are_bounded():
    live = LiveRecorder(None, max_requests=10)  # type: ignore[arg-type] - nothing here reaches Redis
    s = np.zeros((1, 2))
    for i in range(25):
        live.observe("m", "1", None, "active", ["a"], s, "logits", s, "logits", f"r{i}")
    live._count()
    assert list(live._unflushed) == [f"r{i}" for i in range(15, 25)]  # the newest ten
    assert live._counts[("m", "1")][lf.field("none", "active", "given", "a", "n")] == 25


def test_requests_waiting_to_be_counted_are_bounded_in_bytes():
    live = LiveRecorder(None)  # type: ignore[arg-type] - nothing here reaches Redis
    big = np.zeros((1000, 2))
    groups = ["a"] * 1000
    i = 0
    while not live._counts:  # counted without a flush once they hold about _COUNT_AT bytes
        live.observe("m", "1", None, "active", groups, big, "logits", big, "logits", None)
        i += 1
        assert i * 2 * big.nbytes <= 2 * _COUNT_AT
    assert live._p_cell == [] and live._counts[("m", "1")][lf.field("none", "active", "given", "a", "n")] == i * 1000


def test_waiting_requests_leave_no_object_for_the_garbage_collector():
    """A request waiting for the flush holds strings and arrays only (its groups joined): a second of traffic must
    not make the collector's passes more frequent (the in-flight requests they catch go to older generations)."""
    live = LiveRecorder(None)  # type: ignore[arg-type] - nothing here reaches Redis
    scores = [np.zeros((2, 2)) for _ in range(1000)]
    groups = [["a", "b"] for _ in range(1000)]
    ids = [f"r{i}" for i in range(1000)]
    live.observe("m", "1", None, "active", groups[0], scores[0], "logits", scores[0], "logits", ids[0])
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1, 1000):
        live.observe("m", "1", None, "active", groups[i], scores[i], "logits", scores[i], "logits", ids[i])
    assert len(gc.get_objects()) - before < 10
    live._count()
    assert live._counts[("m", "1")][lf.field("none", "active", "given", "a", "n")] == 1000


def test_group_names_holding_the_separator_are_counted_as_they_are():
    live = LiveRecorder(None)  # type: ignore[arg-type] - nothing here reaches Redis
    s = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    live.observe("m", "1", None, "active", ["a\x1eb", "c", "a\x1eb"], s, "logits", s, "logits", None)
    live.observe("m", "1", None, "active", [], s[:0], "logits", s[:0], "logits", "empty")
    live._count()
    counts = live._counts[("m", "1")]
    assert counts[lf.field("none", "active", "given", "a\x1eb", "n")] == 2
    assert counts[lf.field("none", "active", "given", "a\x1eb", "raw_pos")] == 2
    assert counts[lf.field("none", "active", "given", "c", "n")] == 1
    assert "empty" in live._unflushed
