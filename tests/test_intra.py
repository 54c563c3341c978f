"""Intra-processing debiasers on the real Adult reference model: weight patches, the objective, bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patcher.access import ModelArtifact
from patcher.apply import PatchRunner
from patcher.methods import adversarial_finetune, get_method, layerwise
from patcher.methods import intra_common as ic
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from patcher.tuning import TuningData
from tests.conftest import fit

FAST = {
    "random_perturbation": {"trials": 8},
    "layerwise": {"layers": 2, "calls": 6, "initial_points": 3, "candidates": 200},
    # holdout=0: the threshold is chosen on every tuning row, so the test below can recompute it on them
    "adversarial_finetune": {"epochs": 3, "critic_steps": 40, "actor_steps": 80, "holdout": 0.0},
}


@pytest.fixture(scope="module")
def artifact(adult_model):
    return ModelArtifact(adult_model.onnx_bytes, name="adult_reference")


@pytest.fixture(scope="module")
def tune(adult):
    t = adult.tune
    return TuningData(t.X, t.y, t.groups, adult.group_names, tuple(adult.feature_names))


@pytest.fixture(scope="module")
def held_out(adult):
    idx = np.random.default_rng(1).choice(len(adult.test.y), 6000, replace=False)
    return adult.test.X[idx], adult.test.y[idx], adult.test.groups[idx]


@pytest.fixture(scope="module")
def fitted(artifact, tune):
    """Each method fitted once (small settings) on the same rows."""
    torch.set_num_threads(1)
    return {name: fit(name, artifact, tune, "dp", None, seed=0, **opts) for name, opts in FAST.items()}


def _direct(margin, y, g, cut, measure):
    pred = (margin > cut).astype(float)
    ba = 0.5 * (pred[y == 1].mean() + (1 - pred[y == 0]).mean())
    return ba, ic.bias(pred, y, g, int(g.max()) + 1, measure)


@pytest.mark.parametrize("measure", ["spd", "eod", "aod"])
@pytest.mark.parametrize("n_groups", [2, 3])
def test_threshold_search_is_the_best_cut_by_phi(measure, n_groups):
    rng = np.random.default_rng(n_groups)
    g = rng.integers(0, n_groups, 600)
    y = rng.binomial(1, 0.3 + 0.2 * (g == 0))
    margin = rng.normal(size=600) + y + 0.5 * (g == 0)
    op = ic.threshold_search(margin, y, g, n_groups, measure, bound=0.04)
    ba, b = _direct(margin, y, g, op.threshold, measure)
    assert op.balanced_accuracy == pytest.approx(ba) and op.bias == pytest.approx(b)
    assert op.feasible and abs(b) < 0.04 and op.objective == pytest.approx(ba)
    # no cut on a fine grid does better under the bound
    for cut in np.quantile(margin, np.linspace(0.005, 0.995, 150)):
        ba_c, b_c = _direct(margin, y, g, cut, measure)
        if abs(b_c) < 0.04:
            assert ba_c <= op.objective + 1e-12


def test_bootstrap_objective_is_phi_averaged_over_the_resamples():
    rng = np.random.default_rng(7)
    g = rng.integers(0, 2, 800)
    y = rng.binomial(1, 0.3 + 0.2 * (g == 0))
    margin = rng.normal(size=800) + y + 0.5 * (g == 0)
    resamples = ic.bootstrap_weights(800, 6, seed=0)
    op = ic.threshold_search(margin, y, g, 2, "spd", 0.04, resamples)
    pred = margin > op.threshold
    per_resample = []
    for w in resamples:  # phi of the same decisions, each row counted w times
        rows = np.repeat(np.arange(800), w.astype(int))
        ba, b = _direct(margin[rows], y[rows], g[rows], op.threshold, "spd")
        per_resample.append(ba if abs(b) < 0.04 else 0.0)
    assert op.objective == pytest.approx(np.mean(per_resample))
    assert op.feasible and abs(ic.bias(pred, y, g, 2, "spd")) < 0.04
    plain = ic.threshold_search(margin, y, g, 2, "spd", 0.04)
    assert op.objective <= plain.objective + 1e-12


def test_bias_measures_match_their_definitions():
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([1, 0, 1, 0, 1, 1, 0, 0])
    assert ic.bias(pred, y, g, 2, "spd") == pytest.approx(0.5 - 0.5)
    assert ic.bias(pred, y, g, 2, "eod") == pytest.approx(0.5 - 1.0)  # TPR_0 - TPR_1
    assert ic.bias(pred, y, g, 2, "aod") == pytest.approx(0.5 * ((0.5 - 0.0) + (0.5 - 1.0)))
    assert ic.resolve_measure("dp", None) == "spd" and ic.resolve_measure("eo", None) == "eod"
    assert ic.resolve_measure("dp", "aod") == "aod"


def test_exported_weight_patch_model_reproduces_torch_decisions(artifact, tune):
    module = artifact.torch_module()
    with torch.no_grad():  # some change so the export is not just the original graph
        for p in module.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    margin = ic.Scorer(tune.X).margin(module)
    cut = float(np.quantile(margin, 0.7))
    onnx_bytes = ic.export_weight_patch_model(artifact, module, cut, "logits", tune.X)
    onnx_margin = ic.onnx_margin(onnx_bytes, tune.X)
    np.testing.assert_allclose(onnx_margin, margin - cut, atol=1e-4)
    assert np.array_equal(onnx_margin > 0, margin > cut)


@pytest.mark.parametrize("name", list(FAST))
def test_method_returns_a_weight_patch_that_debiases_held_out_rows(name, fitted, artifact, tune, held_out):
    patch, report = fitted[name]
    assert get_method(name).access == ("weights",)
    assert report.access == "weights" and report.queries_used == 0 and report.bias_measure == "spd"
    assert patch.method == name and not patch.group_at_inference and patch.part("output_transform") is None
    runner = PatchRunner(patch)
    assert runner.replaces_model and not runner.needs_group

    # the ONNX, run by onnxruntime, makes exactly the decisions the fit scored with torch on the tuning rows
    pred_tune = runner.model_logits(tune.X).argmax(1)
    assert ic.balanced_accuracy(pred_tune, tune.y) == pytest.approx(report.tune_after["balanced_accuracy"], abs=1e-9)
    assert ic.bias(pred_tune, tune.y, tune.groups, 2, "spd") == pytest.approx(report.tune_after["bias"], abs=1e-9)
    assert report.tune_after["objective"] >= report.tune_base["objective"]

    # held-out rows the method never saw: less bias than the deployed model, still better than chance
    X, y, g = held_out
    before = OnnxOracle(artifact.onnx_bytes).log_probs(X).argmax(1)
    after = runner.model_logits(X).argmax(1)
    bias_before, bias_after = ic.bias(before, y, g, 2, "spd"), ic.bias(after, y, g, 2, "spd")
    assert abs(bias_after) < report.epsilon < abs(bias_before)
    assert ic.balanced_accuracy(after, y) > 0.55


def test_adversarial_beats_rethresholding_the_unchanged_model(fitted, artifact, held_out):
    """Even three short epochs find a fair operating point far above the unchanged model's fair threshold,
    on the tuning rows and on held-out rows."""
    patch, report = fitted["adversarial_finetune"]
    assert report.tune_after["balanced_accuracy"] > report.tune_base["balanced_accuracy"] + 0.05
    X, y, _ = held_out
    after = PatchRunner(patch).model_logits(X).argmax(1)
    logp = OnnxOracle(artifact.onnx_bytes).log_probs(X)
    rethresholded = (logp[:, 1] - logp[:, 0]) > report.tune_base["threshold"]
    assert ic.balanced_accuracy(after, y) > ic.balanced_accuracy(rethresholded, y) + 0.05


def test_patch_round_trip(fitted, tune):
    patch, _ = fitted["random_perturbation"]
    again = Patch.from_bytes(patch.to_bytes(), expected_id=patch.id)
    assert again.id == patch.id and again.manifest["params"]["bias_measure"] == "spd"
    assert np.array_equal(PatchRunner(again).model_logits(tune.X[:500]), PatchRunner(patch).model_logits(tune.X[:500]))
    assert patch.to_bytes() == again.to_bytes()


def test_criterion_eo_defaults_to_eod_and_is_reproducible(artifact, tune):
    a, ra = fit("random_perturbation", artifact, tune, "eo", None, seed=5, trials=3)
    b, rb = fit("random_perturbation", artifact, tune, "eo", None, seed=5, trials=3)
    assert ra.bias_measure == "eod" and a.id == b.id and ra.threshold == rb.threshold


def test_gbrt_minimize_stays_in_the_box_and_returns_its_best():
    rng = np.random.default_rng(0)
    lower, upper = np.array([-1.0, -1.0, -1.0]), np.array([1.0, 1.0, 1.0])
    seen = []

    def f(x):
        seen.append(x)
        return float(((x - 0.3) ** 2).sum())

    x, value, values = layerwise.gbrt_minimize(f, lower, upper, 15, 5, 500, 0.01, rng)
    assert len(values) == 15 and value == min(values) and f(x) == value
    assert all(((s >= lower) & (s <= upper)).all() for s in seen)
    assert value < min(values[:5])  # the trees improved on the random start


@pytest.mark.parametrize("method,options,message", [
    ("random_perturbation", {"trials": 0}, "trials"),
    ("random_perturbation", {"triels": 5}, "unknown option.*triels.*valid options: .*trials"),
    ("layerwise", {"bias_measure": "xyz"}, "bias_measure"),
    ("layerwise", {"epsilon": 0.01, "margin": 0.02}, "margin"),
    ("adversarial_finetune", {"critic": "huge"}, "critic"),
    ("adversarial_finetune", {"lr": -1}, "lr"),
])
def test_bad_options_are_value_errors_that_say_what_is_wrong(method, options, message, artifact, tune):
    with pytest.raises(ValueError, match=message):
        fit(method, artifact, tune, "dp", None, **options)


def test_bad_inputs_are_value_errors(artifact, tune):
    with pytest.raises(ValueError, match="criterion"):
        fit("random_perturbation", artifact, tune, "parity", None)
    with pytest.raises(ValueError, match="weights"):
        fit("random_perturbation", OnnxOracle(artifact.onnx_bytes), tune, "dp", None)
    one_group = TuningData(tune.X[:50], tune.y[:50], np.zeros(50, np.int64), tune.group_names)
    with pytest.raises(ValueError, match="two groups"):
        fit("random_perturbation", artifact, one_group, "dp", None)


@pytest.mark.parametrize("measure", ["spd", "eod", "aod"])
@pytest.mark.parametrize("n_groups", [2, 3])
def test_soft_bias_of_hard_decisions_is_the_measure(measure, n_groups):
    """The exact critic's differentiable bias equals the objective's bias when the decisions are 0/1."""
    rng = np.random.default_rng(4)
    y, g = rng.integers(0, 2, 300), rng.integers(0, n_groups, 300)
    pred = rng.integers(0, 2, 300).astype(np.float64)
    soft = adversarial_finetune.soft_bias(torch.from_numpy(pred), y, g, n_groups, measure)
    assert float(soft) == pytest.approx(ic.bias(pred, y, g, n_groups, measure), abs=1e-12)


def test_exact_critic_debiases_held_out_rows(artifact, tune, held_out):
    """critic="exact" (no learned critic: the batch's bias of the model's own soft decisions) gives a fair,
    useful model on rows it never saw."""
    torch.set_num_threads(1)
    opts = {**FAST["adversarial_finetune"], "critic": "exact"}
    patch, report = fit("adversarial_finetune", artifact, tune, "dp", None, seed=0, **opts)
    assert report.details["critic"] == "exact" and all("operating_bias" in h for h in report.details["history"])
    X, y, g = held_out
    after = PatchRunner(patch).model_logits(X).argmax(1)
    assert abs(ic.bias(after, y, g, 2, "spd")) < report.epsilon
    logp = OnnxOracle(artifact.onnx_bytes).log_probs(X)
    rethresholded = (logp[:, 1] - logp[:, 0]) > report.tune_base["threshold"]
    assert ic.balanced_accuracy(after, y) > ic.balanced_accuracy(rethresholded, y) + 0.05


def _gap_se_direct(pred, y, g, n_groups, measure):
    """Binomial standard error of the bias of hard decisions, computed group by group."""
    rates, var = [], []
    for k in range(n_groups):
        pos, neg = pred[(g == k) & (y == 1)], pred[(g == k) & (y == 0)]
        if measure == "spd":
            r = pred[g == k].mean()
            rates.append(r)
            var.append(r * (1 - r) / (g == k).sum())
        elif measure == "eod":
            rates.append(pos.mean())
            var.append(pos.mean() * (1 - pos.mean()) / len(pos))
        else:
            rates.append(0.5 * (pos.mean() + neg.mean()))
            var.append(0.25 * (pos.mean() * (1 - pos.mean()) / len(pos) + neg.mean() * (1 - neg.mean()) / len(neg)))
    return float(np.sqrt(var[int(np.argmax(rates))] + var[int(np.argmin(rates))]))


@pytest.mark.parametrize("measure", ["spd", "eod", "aod"])
@pytest.mark.parametrize("n_groups", [2, 3])
def test_se_margin_needs_the_gap_under_epsilon_minus_its_standard_error(measure, n_groups):
    rng = np.random.default_rng(20 + n_groups)
    g = rng.integers(0, n_groups, 400)
    y = rng.binomial(1, 0.3 + 0.2 * (g == 0))
    margin = rng.normal(size=400) + y + 0.3 * (g == 0)

    def allowed(cut):
        pred = (margin > cut).astype(float)
        _, b = _direct(margin, y, g, cut, measure)
        return abs(b) < min(0.04, 0.05 - 1.5 * _gap_se_direct(pred, y, g, n_groups, measure))

    op = ic.threshold_search(margin, y, g, n_groups, measure, bound=0.04, epsilon=0.05, se_margin=1.5)
    plain = ic.threshold_search(margin, y, g, n_groups, measure, bound=0.04)
    assert op.feasible and allowed(op.threshold)
    assert op.objective == pytest.approx(_direct(margin, y, g, op.threshold, measure)[0])
    for cut in np.quantile(margin, np.linspace(0.005, 0.995, 150)):  # no allowed cut does better
        if allowed(cut):
            assert _direct(margin, y, g, cut, measure)[0] <= op.objective + 1e-12
    # the standard-error margin is stricter here: the plain search's cut is not allowed
    assert not allowed(plain.threshold) and op.objective < plain.objective


def test_train_layers_last_fine_tunes_only_the_last_linear_layer(artifact, tune, monkeypatch):
    torch.set_num_threads(1)
    captured = {}
    finish = adversarial_finetune.finish

    def keep_module(method, ctx, module, op, details):
        captured["module"] = module
        return finish(method, ctx, module, op, details)

    monkeypatch.setattr(adversarial_finetune, "finish", keep_module)
    opts = {**FAST["adversarial_finetune"], "critic": "exact", "train_layers": "last", "keep": "last"}
    _, report = fit("adversarial_finetune", artifact, tune, "dp", None, seed=0, **opts)
    assert report.details["train_layers"] == "last"
    module = captured["module"]
    head = {id(p) for p in ic.last_linear(module).parameters()}
    original = artifact.torch_module().state_dict()
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, original[name])}
    head_names = {name for name, p in module.named_parameters() if id(p) in head}
    assert changed and changed <= head_names  # the head moved, nothing else did
    for name, buf in module.named_buffers():  # batch-norm statistics stay as trained (eval mode)
        assert torch.equal(buf, original[name]), name
