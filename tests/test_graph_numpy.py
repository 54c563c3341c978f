"""Patch graphs run by numpy (patcher.graph_numpy): the same answers as onnxruntime, or onnxruntime runs them."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from patcher.apply import PatchRunner
from patcher.graph_numpy import compile_graph
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from tests.conftest import fit


def _model(nodes, inputs, initializers, output="out", opset=17) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def _floats(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _session(model: bytes):
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def test_every_interpreted_op_answers_as_onnxruntime_does():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["x", "wt", "b"], ["gt"], transB=1),
        helper.make_node("Add", ["g", "gt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=1),
        helper.make_node("LogSoftmax", ["s"], ["lp"], axis=-1),
        helper.make_node("MatMul", ["p", "m"], ["pm"]),
        helper.make_node("Relu", ["lp"], ["r"]),
        helper.make_node("Sigmoid", ["pm"], ["sg"]),
        helper.make_node("Max", ["r", "sg", "half"], ["mx"]),
        helper.make_node("Min", ["mx", "two"], ["mn"]),
        helper.make_node("Abs", ["lp"], ["ab"]),
        helper.make_node("Neg", ["ab"], ["ng"]),
        helper.make_node("Exp", ["ng"], ["ex"]),
        helper.make_node("Log", ["ex"], ["lg"]),
        helper.make_node("Div", ["mn", "two"], ["dv"]),
        helper.make_node("Mul", ["dv", "lg"], ["mu"]),
        helper.make_node("Sub", ["mu", "pm"], ["sb"]),
        helper.make_node("Gather", ["table", "group"], ["row"], axis=0),
        helper.make_node("Add", ["sb", "row"], ["ad"]),
        helper.make_node("Identity", ["ad"], ["out"]),
    ]
    inits = {"w": w, "wt": w.T.copy(), "b": rng.normal(size=4).astype(np.float32),
             "m": rng.normal(size=(4, 4)).astype(np.float32), "half": np.float32(0.5), "two": np.float32(2.0),
             "table": rng.normal(size=(3, 4)).astype(np.float32)}
    model = _model(nodes, [_floats("x", ["N", 3]), helper.make_tensor_value_info("group", TensorProto.INT64, ["N"])],
                   inits)
    session = _session(model)
    graph = compile_graph(model, session, int_high=3)
    assert graph is not None
    for n in (1, 5, 64):
        feeds = {"x": rng.normal(size=(n, 3)).astype(np.float32), "group": rng.integers(0, 3, size=n)}
        want, got = session.run(None, feeds)[0], graph.run(feeds)[0]
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("node", [
    helper.make_node("Where", ["c", "x", "x"], ["out"]),  # an op it does not interpret
    helper.make_node("Softmax", ["x"], ["out"], axis=1, unknown=1),  # an attribute it does not know
])
def test_a_graph_with_anything_else_is_left_to_onnxruntime(node):
    inputs = [_floats("x", ["N", 2])]
    if node.op_type == "Where":
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, ["N", 2]))
    model = _model([node], inputs, {})
    assert compile_graph(model, None) is None  # refused before onnxruntime is even asked


def test_softmax_before_opset_13_is_left_to_onnxruntime():
    node = helper.make_node("Softmax", ["x"], ["out"], axis=1)  # it flattened [N, 2, 3] from axis 1 on then
    assert compile_graph(_model([node], [_floats("x", ["N", 2, 3])], {}, opset=11), None) is None
    assert compile_graph(_model([node], [_floats("x", ["N", 2, 3])], {}, opset=13),
                         _session(_model([node], [_floats("x", ["N", 2, 3])], {}, opset=13))) is not None


def test_a_numpy_form_that_answers_otherwise_is_not_used():
    model = _model([helper.make_node("Add", ["x", "c"], ["out"])], [_floats("x", ["N", 2])],
                   {"c": np.float32(1.0)})

    class Other:  # a session that answers something else than the graph says
        def run(self, _outputs, feeds):
            return [feeds["x"] + np.float32(2.0)]

    assert compile_graph(model, _session(model)) is not None
    assert compile_graph(model, Other()) is None


@pytest.mark.parametrize("bias", ["group", "estimator"])
def test_an_eraser_patch_runs_by_numpy_and_answers_as_its_onnx_graph(adult, adult_model, bias):
    from patcher.tuning import TuningData

    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias=bias, seed=0)
    runner = PatchRunner(Patch.from_bytes(patch.to_bytes(), expected_id=patch.id))
    assert runner._output_np is not None
    X, groups = adult.test.X, adult.test.groups if runner.needs_group else None
    logp = OnnxOracle(adult_model.onnx_bytes).log_probs(X)
    got = runner.transform_outputs(X, logp, groups)
    runner._output_np = None  # the same runner by onnxruntime
    want = runner.transform_outputs(X, logp, groups)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_feeds_the_graph_does_not_take_get_onnxruntimes_own_error(adult, adult_model):
    from patcher.tuning import TuningData

    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="estimator",
                   seed=0)
    runner = PatchRunner(patch)
    logp = np.log(np.full((4, 2), 0.5))
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # one column short: refused, not broadcast
        runner.transform_outputs(adult.test.X[:4, :-1], logp)



def test_the_estimator_scores_kept_from_the_output_transform_are_the_estimators_own(adult, adult_model):
    """Live fairness takes a group-free patch's estimated groups from its output transform's run (the same Gemm on
    the same rows) rather than computing them again: the same scores, the same groups; onnxruntime keeps nothing."""
    from patcher.tuning import TuningData
    from service.estimated_groups import estimator

    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="estimator",
                   seed=0)
    runner = PatchRunner(patch)
    est = estimator(runner)
    assert est is not None and est.output is not None
    X = adult.test.X[:50]
    logp = OnnxOracle(adult_model.onnx_bytes).log_probs(X)
    kept: dict = {est.output: None}
    runner.transform_outputs(X, logp, keep=kept)
    x = np.asarray(X, dtype=np.float32)
    if est.columns is not None:
        x = x[:, est.columns]
    np.testing.assert_array_equal(kept[est.output], x @ est.W + est.b)
    assert est.groups(X, kept) == est.groups(X)
    assert est.groups(X, {est.output: kept[est.output][:3]}) == est.groups(X)  # not these rows': computed
    runner._output_np = None
    by_onnx: dict = {est.output: None}
    runner.transform_outputs(X, logp, keep=by_onnx)
    assert by_onnx[est.output] is None
