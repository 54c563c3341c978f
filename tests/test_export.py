"""Zero-hop export: the exported model answers what the gateway answers, on the Adult test split, in onnxruntime.

The gateway's side is its own code run offline (service.infer.apply_patch and service.patch_serving.logits over
PatchRunner, on the model's raw scores) and, once, a real gateway in front of `fairpatch upstream` over HTTP.
The Triton repository's configs are parsed with Triton's own model_config proto (shipped, as generated code,
in tritonclient, which the dev extra installs) and its patch models run in onnxruntime, step by step as the
ensemble wires them.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from patcher.apply import PatchRunner, uniform_draws
from patcher.export import UNIFORM_INPUT, ExportError, TensorSpec, export_patched_model, export_triton_repo
from patcher.methods import eraser
from patcher.methods.postprocess_common import StepRule, step_rule_graph
from patcher.methods.reprogram import threshold_graph
from patcher.onnx_graphs import GraphBuilder, float_tensor, mlp_model
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from patcher.tuning import TuningData
from service import patch_serving
from service.infer import apply_patch
from service.registry import ModelSpec, UpstreamSpec
from tests.conftest import fit

TOL = 1e-5
D = 103  # Adult's one-hot feature count


def session(model: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def spec(kind: str = "logits") -> ModelSpec:
    return ModelSpec(name="m", version="1", upstream=UpstreamSpec(url="http://127.0.0.1:9", output_kind=kind))


def gateway_answer(patch: Patch, model: bytes | None, X: np.ndarray, groups: np.ndarray | None, kind: str = "logits",
                   request_id: str | None = None) -> np.ndarray:
    """What the gateway answers, by its own functions: input transform, the upstream's raw scores, apply_patch
    (for a weight patch, its replacement model's logits from patch_serving)."""
    runner = PatchRunner(patch)
    sent = runner.transform_inputs(X)
    if runner.replaces_model:
        logits = patch_serving.logits(runner, spec(kind), sent)
        return apply_patch(runner, spec(kind), sent, logits, groups, request_id, scores_kind="logits")
    raw = session(model).run(None, {"input": sent})[0]
    return apply_patch(runner, spec(kind), sent, raw, groups, request_id)


def exported_answer(exported: bytes, X: np.ndarray, groups: np.ndarray | None, uniform: np.ndarray | None = None,
                    output: str = "logits") -> np.ndarray:
    s = session(exported)
    feeds = {"input": X}
    names = {i.name for i in s.get_inputs()}
    if "group" in names:
        feeds["group"] = groups.astype(np.int64)
    if UNIFORM_INPUT in names:
        feeds[UNIFORM_INPUT] = uniform
    return s.run([output], feeds)[0]


@pytest.fixture(scope="module")
def data(adult, adult_model):
    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    group_patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="group")
    free_patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="estimator")
    assert group_patch.group_at_inference and not free_patch.group_at_inference
    return {"X": adult.test.X.astype(np.float32), "groups": adult.test.groups.astype(np.int64),
            "model": adult_model.onnx_bytes, "eraser_group": group_patch, "eraser_free": free_patch,
            "group_names": list(adult.group_names)}


def trigger_graph(seed: int = 0, scale: float = 0.3) -> bytes:
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    scaled = g.op("Mul", ["input", g.const((1 + scale * rng.normal(size=D)).astype(np.float32), "mask")])
    g.op("Add", [scaled, g.const((scale * rng.normal(size=D)).astype(np.float32), "delta")], "output")
    return g.model([float_tensor("input", ["N", D])], [float_tensor("output", ["N", D])], "trigger").SerializeToString()


def thresholds_patch(randomized: bool) -> Patch:
    """Group thresholds on the margin; randomized: the second group accepts at random between two cuts."""
    cuts = np.array([[0.4, 1e9], [-0.3, 0.9]])
    weights = np.array([[1.0, 0.0], [0.5 if randomized else 1.0, 0.5 if randomized else 0.0]])
    rule = StepRule(cuts, weights, np.zeros(2))
    assert rule.randomized == randomized
    graph = step_rule_graph(rule, "group_thresholds", doc="test thresholds")
    return Patch.build(method="thresholds", n_classes=2, groups=["Female", "Male"], group_at_inference=True,
                       output_transform=graph)


def mlp(seed: int, d: int = D, c: int = 2) -> bytes:
    rng = np.random.default_rng(seed)
    return mlp_model([(rng.normal(size=(d, 16)) / np.sqrt(d), rng.normal(size=16)),
                      (rng.normal(size=(16, c)), rng.normal(size=c))])


def group_table_graph(c: int = 2) -> bytes:
    table = np.log(np.array([[0.8, 0.2], [0.45, 0.55]]))
    return eraser.build_output_graph(D, c, alpha=1.0, threshold=0.2, bias="group", table=table)


def with_head(model: bytes, head: str) -> bytes:
    """The Adult model with its [N, 2] logits turned into another kind of scores under the name `logits`:
    `margin` [N], `margin1` [N, 1] logit, `prob1` [N, 1] P(class 1), `probs` [N, 2] probabilities."""
    m = onnx.load_from_string(model)
    g = m.graph
    g.output[0].name = "raw_logits"
    for node in g.node:
        node.output[:] = ["raw_logits" if o == "logits" else o for o in node.output]
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "h_one"),
                          numpy_helper.from_array(np.array([0], np.int64), "h_zero"),
                          numpy_helper.from_array(np.array([1], np.int64), "h_axis")])
    margin = [helper.make_node("Gather", ["raw_logits", "h_one"], ["h_l1"], axis=1),
              helper.make_node("Gather", ["raw_logits", "h_zero"], ["h_l0"], axis=1),
              helper.make_node("Sub", ["h_l1", "h_l0"], ["h_margin1"])]  # [N, 1]
    nodes, shape = {
        "margin": (margin + [helper.make_node("Squeeze", ["h_margin1", "h_axis"], ["logits"])], ["N"]),
        "margin1": (margin + [helper.make_node("Identity", ["h_margin1"], ["logits"])], ["N", 1]),
        "prob1": (margin + [helper.make_node("Sigmoid", ["h_margin1"], ["logits"])], ["N", 1]),
        "probs": ([helper.make_node("Softmax", ["raw_logits"], ["logits"], axis=1)], ["N", 2]),
    }[head]
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape))
    onnx.checker.check_model(m)
    return m.SerializeToString()


# --- one ONNX model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["eraser_group", "eraser_free"])
def test_an_eraser_patch_exports_to_the_gateways_answers(data, which):
    patch = data[which]
    exported = export_patched_model(patch, data["model"], output_kind="logits")
    groups = data["groups"] if patch.group_at_inference else None
    got = exported_answer(exported, data["X"], groups)
    want = gateway_answer(patch, data["model"], data["X"], groups)
    assert got.shape == want.shape == (len(data["X"]), 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    names = [i.name for i in session(exported).get_inputs()]
    assert names == (["input", "group"] if patch.group_at_inference else ["input"])
    # the patch changes decisions: the comparison is not one of two unpatched models
    raw = session(data["model"]).run(None, {"input": data["X"]})[0]
    assert (raw.argmax(1) != got.argmax(1)).any()


def test_the_export_adds_only_the_steps_the_answer_needs(data):
    """Around an Eraser patch on float32 logits the model gains its scores' conversion to log-probabilities (in
    float64, as the gateway) and the patch's output transform, no more: features already FP32 [N, D] are not
    flattened again, and log-probabilities that go back as float32 logits skip the float64 round trip (exact)."""
    patch = data["eraser_free"]
    ops = [n.op_type for n in onnx.load_from_string(export_patched_model(patch, data["model"])).graph.node]
    model_ops = [n.op_type for n in onnx.load_from_string(data["model"]).graph.node]
    transform_ops = [n.op_type for n in onnx.load_from_string(patch.part("output_transform")).graph.node]
    assert sorted(op for op in ops if op != "Identity") == sorted(model_ops + ["Cast", "LogSoftmax", "Cast"]
                                                                  + transform_ops)


def test_a_threshold_patch_exports_to_the_gateways_answers(data):
    patch = thresholds_patch(randomized=False)
    got = exported_answer(export_patched_model(patch, data["model"]), data["X"], data["groups"])
    np.testing.assert_allclose(got, gateway_answer(patch, data["model"], data["X"], data["groups"]), atol=TOL, rtol=0)


def test_a_trigger_patch_exports_to_the_gateways_answers(data):
    """An input transform, with a threshold after it; and with an output transform that reads the triggered rows."""
    for out in (threshold_graph(2, 0.3), data["eraser_free"].part("output_transform")):
        patch = Patch.build(method="reprogram", n_classes=2, input_transform=trigger_graph(), output_transform=out)
        got = exported_answer(export_patched_model(patch, data["model"]), data["X"], None)
        want = gateway_answer(patch, data["model"], data["X"], None)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        assert not np.allclose(want, gateway_answer(Patch.build(method="thresholds", n_classes=2, output_transform=out),
                                                    data["model"], data["X"], None), atol=1e-3)  # the trigger acts


@pytest.mark.parametrize("head,kind", [("margin", "logits"), ("margin1", "logits"), ("prob1", "probabilities"),
                                       ("probs", "probabilities")])
def test_every_kind_and_shape_of_scores_comes_back_as_the_gateway_answers_it(data, head, kind):
    model = with_head(data["model"], head)
    patch = data["eraser_group"]
    exported = export_patched_model(patch, model, output_kind=kind)
    got = exported_answer(exported, data["X"], data["groups"])
    want = gateway_answer(patch, model, data["X"], data["groups"], kind)
    assert got.shape == want.shape
    assert [o.shape for o in session(exported).get_outputs()] == [o.shape for o in session(model).get_outputs()]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("trigger", [False, True])
def test_a_weight_patch_exports_to_the_gateways_answers(data, trigger):
    patch = Patch.build(method="forml", n_classes=2, groups=["Female", "Male"], group_at_inference=True,
                        replacement_model=mlp(1), output_transform=group_table_graph(),
                        input_transform=trigger_graph(2) if trigger else None)
    for kind in ("logits", "probabilities"):
        exported = export_patched_model(patch, data["model"], output_kind=kind)
        got = exported_answer(exported, data["X"], data["groups"])
        np.testing.assert_allclose(got, gateway_answer(patch, None, data["X"], data["groups"], kind), atol=TOL, rtol=0)
    # the replacement model answers, not the model
    raw = session(data["model"]).run(None, {"input": data["X"]})[0]
    assert not np.allclose(got, np.exp(raw - np.logaddexp(raw[:, :1], raw[:, 1:])), atol=1e-3)


def test_randomized_decisions_are_refused_unless_the_draws_become_an_input(data):
    patch = thresholds_patch(randomized=True)
    with pytest.raises(ExportError, match="randomized decisions.*request's id"):
        export_patched_model(patch, data["model"])
    exported = export_patched_model(patch, data["model"], uniform_input=True)
    u = uniform_draws("request-7", len(data["X"]))
    got = exported_answer(exported, data["X"], data["groups"], uniform=u)
    want = gateway_answer(patch, data["model"], data["X"], data["groups"], request_id="request-7")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    other = exported_answer(exported, data["X"], data["groups"], uniform=uniform_draws("request-8", len(data["X"])))
    assert (other.argmax(1) != got.argmax(1)).any()  # the draws do decide


def test_bad_exports_say_why(data):
    with pytest.raises(ExportError, match="not an ONNX model"):
        export_patched_model(data["eraser_group"], b"not onnx")
    with pytest.raises(ExportError, match="no output 'scores'"):
        export_patched_model(data["eraser_group"], data["model"], output_name="scores")
    with pytest.raises(ExportError, match="already has an input named 'input'"):
        export_patched_model(data["eraser_group"], data["model"], group_input="input")
    with pytest.raises(ExportError, match="give the model's ONNX file"):
        export_patched_model(data["eraser_group"], None)


# --- Triton ensemble -----------------------------------------------------------------------------------------

def triton_model_config():
    """Triton's ModelConfig message. tritonclient ships model_config_pb2 under tritonclient.grpc, whose package
    import needs grpcio (not in the http extra); the generated module itself needs only protobuf."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec_ = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.ModelConfig


def parse_config(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), triton_model_config()())  # unknown fields fail the parse


def run_ensemble(repo: Path, name: str, black_box: dict[str, bytes], feeds: dict[str, np.ndarray]) -> dict:
    """The ensemble's steps in order, as Triton would run them: each step's input_map reads ensemble tensors,
    its output_map writes them; the black box by its name, the patch models from the repository."""
    config = parse_config(repo / name / "config.pbtxt")
    tensors = dict(feeds)
    for step in config.ensemble_scheduling.step:
        model = black_box.get(step.model_name) or (repo / step.model_name / "1" / "model.onnx").read_bytes()
        s = session(model)
        out_names = list(step.output_map)
        results = s.run(out_names, {k: tensors[v] for k, v in step.input_map.items()})
        tensors.update({step.output_map[k]: r for k, r in zip(out_names, results, strict=True)})
    return {o.name: tensors[o.name] for o in config.output}


@pytest.mark.parametrize("which", ["eraser_group", "trigger"])
def test_a_triton_repository_wires_model_then_patch(data, tmp_path, which):
    patch = data["eraser_group"] if which == "eraser_group" else Patch.build(
        method="reprogram", n_classes=2, input_transform=trigger_graph(), output_transform=threshold_graph(2, 0.3))
    features, scores = TensorSpec("input", TensorProto.FLOAT, ["N", D]), TensorSpec("logits", TensorProto.FLOAT,
                                                                                    ["N", 2])
    written = export_triton_repo(patch, tmp_path, model_name="adult", model_version="3", features=features,
                                 scores=scores, group_input="group")
    configs = {p.parent.name: parse_config(p) for p in written if p.name == "config.pbtxt"}
    ensemble = configs["adult_fairpatch"]
    assert ensemble.platform == "ensemble" and (tmp_path / "adult_fairpatch" / "1").is_dir()
    steps = list(ensemble.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == (["adult_fairpatch_input"] if which == "trigger" else []) + [
        "adult", "adult_fairpatch_output"]
    model_step = next(s for s in steps if s.model_name == "adult")
    assert model_step.model_version == 3 and list(model_step.input_map) == ["input"] \
        and list(model_step.output_map) == ["logits"]
    assert [(o.name, list(o.dims)) for o in ensemble.output] == [("logits", [-1, 2])]
    want_inputs = [("input", [-1, D])] + ([("group", [-1])] if patch.group_at_inference else [])
    assert [(i.name, list(i.dims)) for i in ensemble.input] == want_inputs
    for name, config in configs.items():  # every patch model's config matches its ONNX signature
        if name == "adult_fairpatch":
            continue
        s = session((tmp_path / name / "1" / "model.onnx").read_bytes())
        assert config.platform == "onnxruntime_onnx"
        assert [i.name for i in config.input] == [i.name for i in s.get_inputs()]
        assert [o.name for o in config.output] == [o.name for o in s.get_outputs()]
    produced = {i.name for i in ensemble.input}
    for step in steps:  # every tensor a step reads is an ensemble input or an earlier step's output
        assert set(step.input_map.values()) <= produced, step
        produced |= set(step.output_map.values())

    feeds = {"input": data["X"]} | ({"group": data["groups"]} if patch.group_at_inference else {})
    got = run_ensemble(tmp_path, "adult_fairpatch", {"adult": data["model"]}, feeds)["logits"]
    groups = data["groups"] if patch.group_at_inference else None
    np.testing.assert_allclose(got, gateway_answer(patch, data["model"], data["X"], groups), atol=TOL, rtol=0)


def test_a_triton_export_refuses_what_it_cannot_wrap(data, tmp_path):
    weight = Patch.build(method="forml", n_classes=2, replacement_model=mlp(1))
    f, s = TensorSpec("input", TensorProto.FLOAT, ["N", D]), TensorSpec("logits", TensorProto.FLOAT, ["N", 2])
    with pytest.raises(ExportError, match="weight patch replaces the model"):
        export_triton_repo(weight, tmp_path, model_name="adult", model_version="1", features=f, scores=s)
    with pytest.raises(ExportError, match="versions are integers"):
        export_triton_repo(data["eraser_group"], tmp_path, model_name="adult", model_version="v2", features=f,
                           scores=s)


# --- through a real gateway in front of `fairpatch upstream` -------------------------------------------------

KEY = "export-admin-key"


@pytest.fixture(scope="module")
def gateway(data, redis_url, tmp_path_factory):
    import uuid

    from clients.sdk import Client
    from service.app import create_app
    from service.local_upstream import OnnxModel, create_upstream_app
    from service.serve_thread import ServerThread
    from service.settings import Settings

    name = f"export-{uuid.uuid4().hex[:6]}"
    settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                        patch_recheck_s=0.2)
    with ServerThread(create_upstream_app(OnnxModel(data["model"], name="adult-ref", version="3"))) as up, \
            ServerThread(create_app(settings)) as gw, Client(gw.url, KEY) as client:
        client.register_model({"name": name, "version": "1", "groups": data["group_names"], "upstream": {
            "url": up.url, "model_name": "adult-ref", "model_version": "3", "output_name": "logits"}})
        client.upload_artifact(name, data["model"], "1")
        pid = client.upload_patch(name, data["eraser_group"].to_bytes(), "1")
        client.activate_patch(name, pid, "1")
        with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
            yield {"url": gw.url, "name": name, "pid": pid, "http": http, "client": client}
        client.deactivate_patch(name, "1")
        client.delete_model(name, "1")


def v2_infer(http: httpx.Client, path: str, X: np.ndarray, groups: list | np.ndarray, datatype: str) -> httpx.Response:
    body = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()},
                       {"name": "group", "shape": [len(groups)], "datatype": datatype, "data": list(groups)}]}
    return http.post(path, json=body)


def patched_answer(gateway, X: np.ndarray, groups: list[str], pid: str) -> np.ndarray:
    deadline = time.monotonic() + 30
    while True:  # the activation reaches the gateway through Redis; wait for the condition, not a fixed time
        r = v2_infer(gateway["http"], f"/v2/models/{gateway['name']}/versions/1/infer", X, groups, "BYTES")
        assert r.status_code == 200, r.text
        if r.headers.get("fairpatch-patch") == pid or time.monotonic() > deadline:
            break
    assert r.headers.get("fairpatch-patch") == pid
    (out,) = r.json()["outputs"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_the_export_route_the_cli_and_the_gateway_agree(data, gateway, tmp_path):
    from clients.cli import main
    from service.local_upstream import OnnxModel, create_upstream_app
    from service.serve_thread import ServerThread

    n = 300
    X, ids = data["X"][:n], data["groups"][:n]
    names = [data["group_names"][i] for i in ids]
    served = patched_answer(gateway, X, names, gateway["pid"])

    r = gateway["http"].post(f"/v1/models/{gateway['name']}/versions/1/patches/{gateway['pid']}/export")
    assert r.status_code == 200, r.text
    assert r.headers["fairpatch-patch"] == gateway["pid"]
    np.testing.assert_allclose(exported_answer(r.content, X, ids), served, atol=TOL, rtol=0)

    # zero hop: the exported model served by `fairpatch upstream` answers as the gateway does
    with ServerThread(create_upstream_app(OnnxModel(r.content, name="patched"))) as zero, \
            httpx.Client(base_url=zero.url, timeout=30) as direct:
        z = v2_infer(direct, "/v2/models/patched/infer", X, ids.tolist(), "INT64")
        assert z.status_code == 200, z.text
        (out,) = z.json()["outputs"]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), served, atol=TOL,
                                   rtol=0)

    def cli(*argv: str) -> int:
        with pytest.raises(SystemExit) as e:
            main(["patches", "export", *argv, "--url", gateway["url"], "--admin-key", KEY])
        return e.value.code

    # by patch id, the artifact and registration from the gateway; and from a local .fpatch with --model
    assert cli(gateway["pid"], "--out", str(tmp_path / "by_id.onnx")) == 0
    local = tmp_path / "p.fpatch"
    data["eraser_group"].save(local)
    model = tmp_path / "model.onnx"
    model.write_bytes(data["model"])
    assert cli(str(local), "--model", str(model), "--out", str(tmp_path / "local.onnx")) == 0
    for f in ("by_id.onnx", "local.onnx"):
        np.testing.assert_allclose(exported_answer((tmp_path / f).read_bytes(), X, ids), served, atol=TOL, rtol=0)

    # the Triton repository from the registration and the upstream's signature the gateway reports
    assert cli(gateway["pid"], "--triton-repo", str(tmp_path / "repo")) == 0
    ensemble = parse_config(tmp_path / "repo" / "adult-ref_fairpatch" / "config.pbtxt")
    assert next(s for s in ensemble.ensemble_scheduling.step if s.model_name == "adult-ref").model_version == 3
    got = run_ensemble(tmp_path / "repo", "adult-ref_fairpatch", {"adult-ref": data["model"]},
                       {"input": X, "group": ids})["logits"]
    np.testing.assert_allclose(got, served, atol=TOL, rtol=0)


def test_the_export_route_refuses_with_a_reason(data, gateway):
    http, name = gateway["http"], gateway["name"]
    r = http.post(f"/v1/models/{name}/versions/1/patches/{'0' * 64}/export")
    assert r.status_code == 404 and "unknown patch" in r.json()["error"]
    r = http.post(f"/v1/models/nope-{name}/versions/1/patches/{gateway['pid']}/export")
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    randomized = gateway["client"].upload_patch(name, thresholds_patch(randomized=True).to_bytes(), "1")
    r = http.post(f"/v1/models/{name}/versions/1/patches/{randomized}/export")
    assert r.status_code == 400 and "randomized decisions" in r.json()["error"]
    r = http.post(f"/v1/models/{name}/versions/1/patches/{randomized}/export", params={"uniform_input": "true"})
    assert r.status_code == 200 and UNIFORM_INPUT in {i.name for i in session(r.content).get_inputs()}
    r = httpx.post(f"{gateway['url']}/v1/models/{name}/versions/1/patches/{gateway['pid']}/export")
    assert r.status_code == 401
