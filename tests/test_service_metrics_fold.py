"""service.prometheus's buffered request metrics: folding a buffer gives the exposition that one `observe` per
value gives (the fold reaches into prometheus-client's histogram children, so this pins that behaviour)."""

from __future__ import annotations

import uuid

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import prometheus as P


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created")}


def test_histogram_add_exposes_what_observe_does():
    rng = np.random.default_rng(3)
    # bucket bounds themselves (a value equal to a bound goes in that bucket), below, between and above them
    values = np.concatenate([np.array(P._BUCKETS), rng.exponential(0.05, 500), [0.0, 31.0, 1e9]])
    one, bulk = CollectorRegistry(), CollectorRegistry()
    by_value = Histogram("h_seconds", "h", ["m"], buckets=P._BUCKETS, registry=one)
    in_bulk = Histogram("h_seconds", "h", ["m"], buckets=P._BUCKETS, registry=bulk)
    for v in values:
        by_value.labels("x").observe(float(v))
    P.histogram_add(in_bulk.labels("x"), values[:200])
    P.histogram_add(in_bulk.labels("x"), values[200:])
    P.histogram_add(in_bulk.labels("x"), values[:0])  # nothing to add
    expected, got = samples(one), samples(bulk)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if key[0].endswith("_sum"):  # summed in another order: equal up to rounding
            assert np.isclose(got[key], value, rtol=1e-12)
        else:
            assert got[key] == value, key


def value(name: str, **labels: str) -> float:
    got = samples(P.REGISTRY)
    return got.get((name, frozenset(labels.items())), 0.0)


def test_request_metrics_count_after_a_fold_and_fold_a_full_buffer_at_once():
    model = f"fold-{uuid.uuid4().hex[:8]}"
    m = P.RequestMetrics()
    m.observe(model, "1", "p", "v2_infer", 200, 0.003, 0.002, 0.0004)
    m.observe(model, "1", "p", "v2_infer", 200, 0.02, 0.01, None)
    m.observe(model, "1", "", "v2_infer", 400, 0.0001, None, None)
    assert value("fairpatch_requests_total", model=model, version="1", patch="p", route="v2_infer",
                 status="200") == 0  # buffered until folded
    m.fold()
    assert value("fairpatch_requests_total", model=model, version="1", patch="p", route="v2_infer",
                 status="200") == 2
    assert value("fairpatch_requests_total", model=model, version="1", patch="", route="v2_infer",
                 status="400") == 1
    assert value("fairpatch_request_seconds_count", model=model, version="1", route="v2_infer") == 3
    assert value("fairpatch_request_seconds_bucket", model=model, version="1", route="v2_infer", le="0.005") == 2
    assert value("fairpatch_upstream_seconds_count", model=model, version="1") == 2
    assert value("fairpatch_patch_seconds_count", model=model, version="1") == 1
    assert np.isclose(value("fairpatch_request_seconds_sum", model=model, version="1", route="v2_infer"), 0.0231)

    for _ in range(P._FOLD_AT):  # a full buffer is folded by the request that fills it
        m.observe(model, "2", "", "v1_predict", 200, 0.001, 0.001, None)
    assert value("fairpatch_requests_total", model=model, version="2", patch="", route="v1_predict",
                 status="200") == P._FOLD_AT
    m.fold()
    assert value("fairpatch_request_seconds_count", model=model, version="2", route="v1_predict") == P._FOLD_AT
