"""The method contract: every method is one declared object in one registry, and a new method (a toy here:
a constant shift of the class-1 logit) runs through `fairpatch bench` and the job API with nothing else
added. The job test runs on real servers on loopback (gateway, worker thread, Redis, the ONNX upstream)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from patcher.methods import FitRequest, FitResult, Method, OptionsError, get_method, methods, register, unregister
from patcher.onnx_graphs import GraphBuilder, float_tensor
from patcher.patch import Patch

REPO = Path(__file__).resolve().parents[1]
KEY = "methods-admin-key"
RUN = uuid.uuid4().hex[:6]


# ---------------------------------------------------------------- the toy method: one class, one fit, one Method


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shift: float = Field(0.0, description="added to the class-1 log-probability")
    rows: int = Field(40, ge=1, description="tuning rows it scores (within the budget)")


class ToyReport(BaseModel):
    queries_used: int
    shift: float


def toy_fit(access, data, request: FitRequest, opts: ToyOptions) -> FitResult:
    n = request.query_limit(access, min(opts.rows, len(data)))
    before = access.queries_used
    access.scores(np.asarray(data.X)[:n])
    request.report(0.5, {"stage": "scored"})
    g = GraphBuilder()
    g.op("Add", ["log_probs", g.const(np.array([0.0, opts.shift], np.float32), "shift")], "patched_log_probs")
    graph = g.model([float_tensor("log_probs", ["N", 2])], [float_tensor("patched_log_probs", ["N", 2])], "toy")
    patch = Patch.build(method="toy", n_classes=2, groups=list(data.group_names),
                        output_transform=graph.SerializeToString(), params={"shift": opts.shift})
    return FitResult(patch, ToyReport(queries_used=access.queries_used - before, shift=opts.shift))


TOY = Method(name="toy", summary="a constant shift of the class-1 logit", access=("queries",), options=ToyOptions,
             fit=toy_fit, group_at_inference="none", presets={"accept-more": {"shift": 2.0}})


@pytest.fixture(scope="module")
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


# ---------------------------------------------------------------- the registry


def test_every_method_declares_access_options_with_defaults_and_descriptions_and_presets_that_validate():
    names = [m.name for m in methods()]
    assert {"eraser", "thresholds", "trigger", "forml", "adversarial_finetune"} <= set(names)
    for m in methods():
        assert get_method(m.name) is m and m.access and m.summary
        assert m.options.model_config.get("extra") == "forbid", m.name
        for field, info in m.options.model_fields.items():
            assert not info.is_required() and info.description, (m.name, field)
        for preset in m.presets:
            m.parse_options(preset=preset)
    trigger = get_method("trigger")
    assert trigger.parse_options({"q": 3}, "colored-digits").q == 3  # options override the preset
    assert trigger.parse_options(preset="colored-digits").trigger == "color"


def test_bad_options_and_presets_name_what_is_valid():
    eraser = get_method("eraser")
    with pytest.raises(OptionsError, match=r"unknown option\(s\) alpha for eraser; valid options: bias, .*alpha_max"):
        eraser.parse_options({"alpha": 1})
    with pytest.raises(OptionsError, match="invalid options for eraser: alpha_max"):
        eraser.parse_options({"alpha_max": -1})
    with pytest.raises(OptionsError, match="no preset 'fast'; its presets: none"):
        eraser.parse_options(preset="fast")
    with pytest.raises(OptionsError, match="unknown method 'nope'; available: .*eraser"):
        get_method("nope")


def test_the_registry_and_the_job_api_import_without_torch():
    code = ("import sys, patcher.methods as m, service.jobs, service.worker; "
            "[x.options.model_json_schema() for x in m.methods()]; print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_methods_show_eraser_lists_every_option_with_its_default():
    p = cli("methods", "show", "eraser", "--json")
    assert p.returncode == 0, p.stderr
    shown = {o["name"]: o for o in json.loads(p.stdout)["options"]}
    fields = get_method("eraser").options.model_fields
    assert set(shown) == set(fields)
    for name, info in fields.items():
        assert shown[name]["default"] == info.get_default() and shown[name]["description"] == info.description
    table = cli("methods", "show", "eraser")
    assert table.returncode == 0, table.stderr
    for name in fields:
        assert name in table.stdout
    assert "fairness_tolerance" in table.stdout and "0.03" in table.stdout and "81" in table.stdout
    listing = cli("methods")
    assert listing.returncode == 0 and all(m.name in listing.stdout for m in methods())
    bad = cli("methods", "show", "nope")
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


def test_docs_methods_md_is_generated_from_the_registry():
    from clients.methods_cli import markdown

    committed = (REPO / "docs" / "methods.md").read_text()
    assert committed == markdown(), "docs/methods.md is stale: regenerate it with " \
                                    "`fairpatch methods --markdown > docs/methods.md`"


def test_bench_options_are_validated_by_the_options_model():
    p = cli("bench", "eraser", "--dataset", "german", "--queries", "100", "-o", "alpha=2", "--json")
    assert p.returncode == 2 and "unknown option(s) alpha for eraser; valid options: bias" in p.stderr
    p = cli("bench", "eraser", "--dataset", "german", "--queries", "100", "-o", "alpha_max=0")
    assert p.returncode == 2 and "invalid options for eraser: alpha_max" in p.stderr
    p = cli("bench", "eraser", "--dataset", "german", "--queries", "100", "-o", "bias")
    assert p.returncode == 2 and "KEY=VALUE" in p.stderr
    p = cli("bench", "eraser", "--dataset", "german", "--queries", "100", "-o", "bias=estimator", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["group_at_inference"] is False and json.loads(p.stdout)["bias"] == "estimator"


def test_a_new_method_runs_through_fairpatch_bench(toy, capsys):
    from clients.cli import main

    args = ["bench", "toy", "--dataset", "german", "--queries", "30", "--seed", "0", "--json"]
    with pytest.raises(SystemExit) as done:
        main([*args, "-o", "shift=-50"])
    assert done.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "toy" and out["queries_used"] == 30 and out["group_at_inference"] is False
    assert out["after"]["accuracy"] != out["before"]["accuracy"]  # every row is now class 0
    with pytest.raises(SystemExit) as done:
        main([*args, "--preset", "accept-more"])
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out)["after"] != out["after"]
    with pytest.raises(SystemExit) as done:
        main([*args, "-o", "shfit=1"])
    assert done.value.code == 2 and "valid options: shift, rows" in capsys.readouterr().err


# ---------------------------------------------------------------- the job API, on real servers


@pytest.fixture(scope="module")
def gateway(toy, redis_url, tmp_path_factory, adult_model, adult):
    import pandas as pd

    from service.app import create_app
    from service.local_upstream import OnnxModel, create_upstream_app
    from service.serve_thread import ServerThread
    from service.settings import Settings
    from service.worker import WorkerThread

    settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                        job_queue=f"test-methods:{RUN}")
    with ServerThread(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult"))) as upstream, \
            ServerThread(create_app(settings)) as server, WorkerThread(settings, settings.redis_url), \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        spec = {"name": f"adult-{RUN}", "version": "1", "groups": ["Female", "Male"],
                "upstream": {"url": upstream.url, "model_name": "adult", "input_name": "input",
                             "output_name": "logits", "output_kind": "logits", "timeout_s": 10}}
        assert c.post("/v1/models", json=spec).status_code == 201
        frame = pd.DataFrame(adult.tune.X[:600], columns=[f"f{i}" for i in range(adult.tune.X.shape[1])])
        frame["income"] = adult.tune.y[:600]
        frame["sex"] = [adult.group_names[g] for g in adult.tune.groups[:600]]
        r = c.post("/v1/datasets", params={"label": "income", "group": "sex"},
                   content=frame.to_csv(index=False).encode(), headers={"content-type": "text/csv"})
        assert r.status_code == 201, r.text
        yield c, spec["name"], r.json()["id"]


def job(model: str, dataset: str, **extra) -> dict:
    return {"model": model, "method": "toy", "dataset": dataset, "query_budget": 25, "seed": 0, **extra}


def test_a_new_method_runs_through_the_job_api(gateway):
    c, model, dataset = gateway
    r = c.post("/v1/jobs", json=job(model, dataset, preset="accept-more", options={"rows": 100}))
    assert r.status_code == 202, r.text
    assert r.json()["preset"] == "accept-more" and r.json()["access"] == "queries"
    deadline = time.monotonic() + 120
    while (record := c.get(f"/v1/jobs/{r.json()['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    assert record["status"] == "succeeded", record["error"]
    result = record["result"]
    assert result["queries_used"] == 25
    # the method's own report comes through; the activation guard adds its words when the patch did not improve
    own = {k: v for k, v in result["report"].items() if k != "warning"}
    assert own == {"queries_used": 25, "shift": 2.0}
    assert ("warning" in result["report"]) == (result["held_out"]["verdict"] != "improved")
    assert result["group_at_inference"] is False and result["drop_rows"] == {}
    assert result["after"]["dp_diff"] != result["before"]["dp_diff"]


@pytest.mark.parametrize(("extra", "message"), [
    ({"options": {"shfit": 1}}, "unknown option(s) shfit for toy; valid options: shift, rows"),
    ({"options": {"rows": 0}}, "invalid options for toy: rows"),
    ({"preset": "nope"}, "method toy has no preset 'nope'; its presets: accept-more"),
    ({"method": "nope"}, "unknown method 'nope'; available: "),
    ({"method": "calibrated_eq_odds", "criterion": "dp"}, "method calibrated_eq_odds fits for criterion eo, eopp"),
])
def test_the_job_api_refuses_unknown_options_and_presets(gateway, extra, message):
    c, model, dataset = gateway
    r = c.post("/v1/jobs", json=job(model, dataset, **extra))
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_the_methods_endpoints_and_the_openapi_document_carry_every_option(gateway):
    c, _, _ = gateway
    listed = c.get("/v1/methods").json()
    assert [m["name"] for m in listed] == [m.name for m in methods()]
    toy = c.get("/v1/methods/toy").json()
    assert toy["access"] == ["queries"] and toy["group_at_inference"] == "none"
    assert toy["presets"] == {"accept-more": {"shift": 2.0}}
    assert set(toy["options_schema"]["properties"]) == {"shift", "rows"}
    r = c.get("/v1/methods/nope")
    assert r.status_code == 404 and "unknown method 'nope'" in r.json()["error"]
    schemas = c.get("/openapi.json").json()["components"]["schemas"]
    for m in methods():
        props = schemas[m.options.__name__]["properties"]
        assert set(props) == set(m.options.model_fields), m.name
        for name, info in m.options.model_fields.items():
            assert props[name].get("description") == info.description, (m.name, name)
    assert "preset" in schemas["JobRequest"]["properties"] and "MethodInfo" in schemas


def test_every_method_benches_through_the_one_runner():
    from patcher.methods import methods

    assert not (REPO / "patcher" / "benches").exists()  # no per-method bench modules: patcher.pipeline.bench
    for m in methods():
        assert set(m.bench.criteria or m.criteria) <= set(m.criteria), m.name
        assert all(f.name.startswith("--") for f in m.bench.flags), m.name
