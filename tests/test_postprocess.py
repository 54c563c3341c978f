"""Post-processing methods (thresholds, reject_option, eq_odds, calibrated_eq_odds) on real data and models."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from patcher.apply import PatchRunner, UnknownGroupError, uniform_draws
from patcher.methods import get_method
from patcher.methods.postprocess_common import StepRule
from patcher.metrics import headline
from patcher.oracle import BudgetExceeded, OnnxOracle
from patcher.patch import Patch
from patcher.tuning import TuningData
from tests.conftest import fit as fit_method

METHODS = ("thresholds", "reject_option", "eq_odds", "calibrated_eq_odds")
DEFAULT_CRITERION = {"thresholds": "dp", "reject_option": "dp", "eq_odds": "eo", "calibrated_eq_odds": "eopp"}


@pytest.fixture(scope="module")
def adult_setup(adult, adult_model):
    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    test_logp = OnnxOracle(adult_model.onnx_bytes).log_probs(adult.test.X)
    return adult, adult_model.onnx_bytes, tune, test_logp


def fit(method, model, tune, criterion, budget=None, **options):
    return fit_method(method, OnnxOracle(model, budget=budget), tune, criterion, budget, **options)


def test_registered_as_query_methods():
    for m in METHODS:
        assert get_method(m).access == ("queries",)


def test_thresholds_dp_on_adult_matches_fairlearn(adult_setup):
    """Exact dp parity on the tune rows (Fairlearn's default) against Fairlearn itself on the same test split."""
    from fairlearn.postprocessing import ThresholdOptimizer

    from benchmarks.peers import OnnxScoreClassifier

    data, model, tune, logp = adult_setup
    patch, report = fit("thresholds", model, tune, "dp", tolerance=0.0)
    assert report.queries_used == len({r.tobytes() for r in tune.X})  # every distinct tune row, once
    assert report.tune_after["dp"] < 1e-6 and report.randomized
    pred = PatchRunner(patch).predict(data.test.X, logp, data.test.groups, request_id="t")
    before, after = headline(data.test.y, logp.argmax(1), data.test.groups), headline(data.test.y, pred,
                                                                                      data.test.groups)
    assert before["dp_diff"] > 0.15 and after["dp_diff"] < 0.015
    assert before["accuracy"] - after["accuracy"] < 0.025

    opt = ThresholdOptimizer(estimator=OnnxScoreClassifier(OnnxOracle(model)), constraints="demographic_parity",
                             prefit=True, predict_method="predict_proba")
    opt.fit(data.tune.X, data.tune.y, sensitive_features=data.tune.groups)
    peer = headline(data.test.y, opt.predict(data.test.X, sensitive_features=data.test.groups, random_state=0),
                    data.test.groups)
    assert abs(after["dp_diff"] - peer["dp_diff"]) <= 0.005
    assert abs(after["accuracy"] - peer["accuracy"]) <= 0.005


@pytest.mark.parametrize("method,criterion,limit", [
    ("thresholds", "eo", 0.03), ("thresholds", "eopp", 0.05), ("reject_option", "dp", 0.08),
    ("eq_odds", "eo", 0.03), ("eq_odds", "dp", 0.03), ("calibrated_eq_odds", "eopp", 0.06)])
def test_each_method_reduces_its_gap_on_adult_test(adult_setup, method, criterion, limit):
    """The rules themselves (guard off). With the default guard, calibrated equalized odds for eopp returns no
    patch here: cross-fitted on the tune rows its change is -0.052 with an 80% interval reaching +0.022."""
    data, model, tune, logp = adult_setup
    patch, _ = fit(method, model, tune, criterion, guard=0)
    pred = PatchRunner(patch).predict(data.test.X, logp, data.test.groups, request_id="r")
    key = {"dp": "dp_diff", "eo": "eo_diff", "eopp": "eopp_diff"}[criterion]
    before, after = headline(data.test.y, logp.argmax(1), data.test.groups), headline(data.test.y, pred,
                                                                                      data.test.groups)
    assert after[key] < limit < before[key]


def test_graph_decides_like_the_fitted_rule(adult_setup):
    """The ONNX graph and the numpy rule it was built from agree row for row, with the runner's draws."""
    data, model, tune, logp = adult_setup
    patch, _ = fit("thresholds", model, tune, "dp")
    p = patch.manifest["params"]
    rule = StepRule(np.array(p["cuts"]), np.array(p["weights"]), np.array(p["bias"]))
    margin = logp[:, 1] - logp[:, 0]
    expect = rule.decide(margin, data.test.groups, uniform_draws("req-1", len(margin)))
    got = PatchRunner(patch).predict(data.test.X, logp, data.test.groups, request_id="req-1")
    assert np.mean(got == expect) > 0.999  # float32 graph vs float64 numpy: ties at a cut only


def test_randomized_decisions_reproducible_from_request_id(adult_setup):
    data, model, tune, logp = adult_setup
    patch, _ = fit("eq_odds", model, tune, "eo")
    runner = PatchRunner(patch)
    a = runner.predict(data.test.X, logp, data.test.groups, request_id="abc")
    b = PatchRunner(Patch.from_bytes(patch.to_bytes())).predict(data.test.X, logp, data.test.groups,
                                                                request_id="abc")
    c = runner.predict(data.test.X, logp, data.test.groups, request_id="abd")
    assert np.array_equal(a, b)
    assert (a != c).sum() > 100  # the mixing really is random across requests


def test_reject_option_is_deterministic(adult_setup):
    data, model, tune, logp = adult_setup
    patch, report = fit("reject_option", model, tune, "dp")
    runner = PatchRunner(patch)
    assert runner.needs_group and "uniform" not in runner._output_inputs
    assert report.favoured == ["Female"] and report.margin > 0 and report.satisfied
    a = runner.predict(data.test.X, logp, data.test.groups, request_id="x")
    assert np.array_equal(a, runner.predict(data.test.X, logp, data.test.groups, request_id="y"))


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_and_unknown_group(adult_setup, method):
    data, model, tune, logp = adult_setup
    patch, _ = fit(method, model, tune, DEFAULT_CRITERION[method])
    again = Patch.from_bytes(patch.to_bytes(), expected_id=patch.id)
    assert again.id == patch.id and again.group_at_inference and again.groups == ["Female", "Male"]
    X, lp = data.test.X[:50], logp[:50]
    names = np.array(data.group_names)[data.test.groups[:50]]
    ids = PatchRunner(patch).predict(X, lp, data.test.groups[:50], request_id="q")
    assert np.array_equal(ids, PatchRunner(again).predict(X, lp, names, request_id="q"))
    runner = PatchRunner(again)
    with pytest.raises(UnknownGroupError):
        runner.predict(X[:2], lp[:2], np.array([0, 2]), request_id="q")
    with pytest.raises(UnknownGroupError):
        runner.predict(X[:2], lp[:2], np.array(["Female", "Martian"]), request_id="q")


def three_groups(split):
    """Three groups from Adult's raw rows: women, men under 40, men 40 and over (thousands of rows each, so
    test-split rates are stable enough to compare; race would leave one group with ~100 positives)."""
    sex, age = split.frame["sex"].to_numpy(), split.frame["age"].to_numpy()
    return np.where(sex == "Female", 0, np.where(age < 40, 1, 2)).astype(np.int64)


@pytest.mark.parametrize("method,criterion", [("thresholds", "dp"), ("thresholds", "eo"), ("eq_odds", "eo"),
                                              ("reject_option", "dp")])
def test_more_than_two_groups(adult_setup, method, criterion):
    data, model, _, logp = adult_setup
    names = ("Female", "Male<40", "Male40+")
    tune = TuningData(data.tune.X, data.tune.y, three_groups(data.tune), names)
    patch, report = fit(method, model, tune, criterion)
    assert patch.groups == list(names)
    assert report.tune_after[criterion] < report.tune_before[criterion]
    if method == "eq_odds":  # exact parity (in expectation) on the tune rows, all three groups
        assert report.tune_after[criterion] < 1e-6
    if method == "thresholds":  # within the tolerance (0 for eo, the default 0.01 for dp)
        assert report.tune_after[criterion] <= report.tolerance + 1e-9
    g_test = three_groups(data.test)
    pred = PatchRunner(patch).predict(data.test.X, logp, np.array(names)[g_test], request_id="m")
    key = {"dp": "dp_diff", "eo": "eo_diff", "eopp": "eopp_diff"}[criterion]
    assert headline(data.test.y, pred, g_test)[key] < headline(data.test.y, logp.argmax(1), g_test)[key]
    with pytest.raises(UnknownGroupError):
        PatchRunner(patch).predict(data.test.X[:1], logp[:1], np.array([3]))


def test_calibrated_eq_odds_more_than_two_groups(adult_setup):
    """What Pleiss et al. equalise is a generalized (score-based) cost, not hard rates: with three groups the
    mixed groups reach the costliest group's generalized FNR on tune, and the patched scores' spread of it
    shrinks on test. (Hard TPRs need not: a base rate below 0.5 predicts no positives; see docs/postprocess.md.)"""
    data, model, _, logp = adult_setup
    names = ("Female", "Male<40", "Male40+")
    tune = TuningData(data.tune.X, data.tune.y, three_groups(data.tune), names)
    patch, r = fit("calibrated_eq_odds", model, tune, "eopp", guard=0)  # the rule itself
    assert r.cost_constraint == "fnr" and not r.unreachable
    after = {g: (1 - r.mix_rates[g]) * r.costs[g] + r.mix_rates[g] * r.trivial_costs[g] for g in names}
    np.testing.assert_allclose(list(after.values()), max(r.costs.values()), atol=1e-9)
    g_test, y = three_groups(data.test), data.test.y
    patched = np.exp(PatchRunner(patch).transform_outputs(data.test.X, logp, g_test, request_id="m"))[:, 1]

    def gfnr_spread(p1: np.ndarray) -> float:
        v = [np.mean(1 - p1[(g_test == g) & (y == 1)]) for g in range(3)]
        return max(v) - min(v)

    assert gfnr_spread(patched) < 0.5 * gfnr_spread(np.exp(logp[:, 1]))


def test_budget_is_respected(adult_setup):
    _, model, tune, _ = adult_setup
    oracle = OnnxOracle(model, budget=1500)
    _, report = fit_method("thresholds", oracle, tune, "dp", 1500)
    assert report.queries_used == oracle.queries_used <= 1500
    with pytest.raises(ValueError, match="too small"):
        fit("eq_odds", model, tune, "eo", budget=5)
    small = OnnxOracle(model, budget=100)  # the oracle's own budget wins over a larger job budget
    _, report = fit_method("eq_odds", small, tune, "eo", 1000)
    assert report.queries_used == small.queries_used <= 100
    with pytest.raises(BudgetExceeded):  # and it refuses before sending anything over it
        small.scores(tune.X[1000:1200])


def test_bad_options_and_criteria_are_errors(adult_setup):
    _, model, tune, _ = adult_setup
    with pytest.raises(ValueError, match="calibrated_eq_odds"):
        fit("calibrated_eq_odds", model, tune, "dp", budget=500)
    with pytest.raises(ValueError):
        fit("thresholds", model, tune, "dp", budget=500, tolerence=0.01)  # typo: never silently ignored
    with pytest.raises(ValueError, match="tolerance"):
        fit("thresholds", model, tune, "eo", budget=500, tolerance=0.01)


def test_aif360_same_parameters_on_german():
    """Reject-option band, equalized-odds LP and calibrated mixing rates equal AIF360's on the same predictions."""
    import pandas as pd
    from aif360.algorithms.postprocessing import (
        CalibratedEqOddsPostprocessing,
        EqOddsPostprocessing,
        RejectOptionClassification,
    )
    from aif360.datasets import BinaryLabelDataset

    from patcher.datasets import load_dataset
    from patcher.reference_models import reference_model

    data = load_dataset("german", "age")
    model = reference_model("german", "age", seed=0, data=data).onnx_bytes
    t = data.tune
    tune = TuningData(t.X, t.y, t.groups, data.group_names)
    prob = np.exp(OnnxOracle(model).log_probs(t.X))[:, 1]
    df = pd.DataFrame({"g": t.groups.astype(float), "y": t.y.astype(float)})
    true = BinaryLabelDataset(df=df, label_names=["y"], protected_attribute_names=["g"])
    pred = true.copy(deepcopy=True)
    pred.scores, pred.labels = prob[:, None], (prob > 0.5).astype(float)[:, None]
    sr = [np.mean(prob[t.groups == g] > 0.5) for g in (0, 1)]
    priv = int(np.argmax(sr))
    P, U = [{"g": float(priv)}], [{"g": float(1 - priv)}]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roc = RejectOptionClassification(U, P, num_class_thresh=25, num_ROC_margin=10).fit(true, pred)
        eo = EqOddsPostprocessing(U, P, seed=0).fit(true, pred)
        ceo = CalibratedEqOddsPostprocessing(U, P, cost_constraint="fnr", seed=0).fit(true, pred)

    _, r = fit("reject_option", model, tune, "dp", n_thresholds=25, n_margins=10)
    assert r.threshold == pytest.approx(roc.classification_threshold) and r.margin == pytest.approx(roc.ROC_margin)

    patch, _ = fit("eq_odds", model, tune, "eo", objective="balanced", guard=0)  # the rules, as AIF360's
    a, b = np.array(patch.manifest["params"]["a"]), np.array(patch.manifest["params"]["b"])
    x = eo.model_params.x
    theirs_a = np.array([x[0] if g == priv else x[2] for g in (0, 1)])
    theirs_b = np.array([x[1] if g == priv else x[3] for g in (0, 1)])
    np.testing.assert_allclose(np.c_[a, b], np.c_[theirs_a, theirs_b], atol=1e-6)

    _, c = fit("calibrated_eq_odds", model, tune, "eopp", cost_constraint="fnr", guard=0)
    mix = [ceo.priv_mix_rate if g == priv else ceo.unpriv_mix_rate for g in (0, 1)]
    # AIF360 leaves a rate above 1 (its draw u <= 2.4 always mixes); ours clips it and reports the group
    np.testing.assert_allclose(list(c.mix_rates.values()), np.clip(mix, 0, 1), atol=1e-9)
    assert c.unreachable == [data.group_names[g] for g in (0, 1) if mix[g] > 1]


def test_bench_json_fields():
    from patcher.pipeline import bench

    r = bench("reject_option", dataset="german", sensitive=None, criterion="dp", queries=None, seed=0, bound=0.05)
    for k in ("method", "dataset", "sensitive", "criterion", "seed", "queries_used", "fit_seconds",
              "group_at_inference", "before", "after"):
        assert k in r
    assert r["queries_used"] == r["n_tune"] == 200 and r["group_at_inference"] is True
    assert r["before"]["dp_diff"] > r["after"]["dp_diff"]


def test_thresholds_guard_returns_no_patch_on_300_rows_for_eo_and_keeps_the_full_fit(adult_setup):
    """Without the guard, eo thresholds from 300 scored rows made test eo worse in 2 of 3 bench seeds (seed 1: 0.072
    -> 0.147; seed 2: 0.080 -> 0.103). Cross-fitted on those rows the rule cannot show an improvement, so the patch
    keeps the model's own cut and says so. From every tune row the same check passes and the rule is kept."""
    adult, model, tune, logp = adult_setup
    test = adult.test
    patch, report = fit_method("thresholds", OnnxOracle(model, budget=300), tune, "eo", 300, seed=1)
    assert report.guard["verdict"] != "improved" and report.guard["rows"] == 300
    assert "no patch returned" in report.warning and not report.randomized
    served = PatchRunner(patch).predict(test.X, logp, test.groups, request_id="r")
    assert np.array_equal(served, logp.argmax(1))
    _, full = fit_method("thresholds", OnnxOracle(model), tune, "eo")
    assert full.guard["verdict"] == "improved" and full.warning is None and full.randomized


@pytest.mark.parametrize("method,refused", [("reject_option", True), ("calibrated_eq_odds", True),
                                            ("eq_odds", False)])
def test_every_post_processing_method_is_guarded_against_no_patch_for_eo(adult_setup, method, refused):
    """eo on every Adult tune row: reject-option's band (tune eo 0.096 -> 0.111 cross-fitted; on the test split it
    moved eo from 0.097 to 0.112) and calibrated equalized odds (it equalises one cost, not both rates: eo to 0.69)
    cannot show an improvement, so they return no patch and say so; the equalized-odds program can, and is kept."""
    adult, model, tune, logp = adult_setup
    test = adult.test
    patch, report = fit(method, model, tune, "eo")
    assert (report.guard["verdict"] != "improved") is refused and report.guard["rows"] == len(tune)
    assert patch.manifest["report"]["guard"] == report.guard
    served = PatchRunner(patch).predict(test.X, logp, test.groups, request_id="r")
    if refused:
        assert "no patch returned" in report.warning and patch.manifest["report"]["warning"] == report.warning
        assert np.array_equal(served, logp.argmax(1))  # exactly the model's own decisions
    else:
        assert report.warning is None and not np.array_equal(served, logp.argmax(1))
    _, unchecked = fit(method, model, tune, "eo", guard=0)
    assert unchecked.guard is None and unchecked.warning is None


def test_the_guard_does_not_run_for_dp_unless_asked(adult_setup):
    _, model, tune, _ = adult_setup
    patch, report = fit("reject_option", model, tune, "dp")
    assert report.guard is None and "guard" not in patch.manifest["report"]
    _, asked = fit("eq_odds", model, tune, "dp", guard=0.9)
    assert asked.guard["verdict"] == "improved" and asked.guard["confidence"] == 0.9
