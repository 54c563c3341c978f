"""Many-valued and intersectional sensitive attributes: specs, small-cell pooling, metrics against Fairlearn's
MetricFrame, and the methods with G > 2 real groups against ThresholdOptimizer on the same sensitive features."""

from __future__ import annotations

import numpy as np
import pytest

from patcher.apply import PatchRunner, UnknownGroupError
from patcher.datasets import MIN_CELL_LABEL, MIN_CELL_ROWS, load_dataset, merge_small_cells, pooled_name
from patcher.metrics import (
    decision_rates,
    fairness_report,
    gap_intervals,
    group_table,
    headline,
    wilson_interval,
)
from patcher.oracle import OnnxOracle
from patcher.reference_models import reference_model
from patcher.tuning import TuningData
from tests.conftest import fit as fit_method


@pytest.fixture(scope="module")
def sex_race():
    return load_dataset("adult", "sex,race")


@pytest.fixture(scope="module")
def sex_race_setup(sex_race):
    data = sex_race
    model = reference_model("adult", data.sensitive, seed=0, data=data)
    tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
    test_logp = OnnxOracle(model.onnx_bytes).log_probs(data.test.X)
    return data, model.onnx_bytes, tune, test_logp


# ---------------------------------------------------------------- specs


def test_every_category_and_intersections(sex_race):
    race = load_dataset("adult", "race:all")
    assert race.sensitive == "race:all" and race.merged == ()
    assert race.group_names == ("Amer-Indian-Eskimo", "Asian-Pac-Islander", "Black", "Other", "White")
    assert race.privileged == "White"
    names = np.asarray(race.group_names)
    np.testing.assert_array_equal(names[race.test.groups], race.test.frame["race"].to_numpy())

    assert sex_race.group_names == ("Female & Non-white", "Female & White", "Male & Non-white", "Male & White")
    assert sex_race.privileged == "Male & White"
    f = sex_race.test.frame
    want = f["sex"] + " & " + np.where(f["race"] == "White", "White", "Non-white")
    np.testing.assert_array_equal(np.asarray(sex_race.group_names)[sex_race.test.groups], want.to_numpy())
    # the single-attribute spelling is the binary attribute, as it always was
    assert load_dataset("adult", "race").group_names == ("Non-white", "White")


def test_splits_keep_every_cell_share(sex_race):
    for g in range(len(sex_race.group_names)):
        share = [np.mean(s.groups == g) for s in (sex_race.train, sex_race.tune)]
        assert abs(share[0] - share[1]) < 0.002


def test_small_cells_are_pooled_until_measurable():
    compas = load_dataset("compas", "race:all")
    assert set(compas.merged) >= {"Asian", "Native American"}
    assert compas.group_names[-1] == pooled_name(list(compas.merged))
    assert "African-American" in compas.group_names and compas.privileged == "Caucasian"
    for g in range(len(compas.group_names)):  # every group is measurable on the tune rows
        y = compas.tune.y[compas.tune.groups == g]
        assert len(y) >= MIN_CELL_ROWS and min((y == 0).sum(), (y == 1).sum()) >= MIN_CELL_LABEL
    cells = compas.test.frame["race"].to_numpy()
    assert set(cells[compas.test.groups == len(compas.group_names) - 1]) == set(compas.merged)


def test_merge_rule():
    counts = {"a": (100, 50), "b": (3, 1), "c": (40, 20), "d": (2, 2)}
    # b and d pooled are still too small (5 rows, 3 positives): the smallest measurable cell, c, joins them
    assert merge_small_cells(counts, ["a", "b", "c", "d"]) == (["a"], ["b", "c", "d"])
    assert merge_small_cells({"a": (100, 50), "c": (40, 20)}, ["a", "c"]) == (["a", "c"], [])
    with pytest.raises(ValueError, match="fewer than two measurable groups"):
        merge_small_cells({"a": (3, 1), "b": (2, 2)}, ["a", "b"])


@pytest.mark.parametrize("spec,match", [("colour", "no sensitive attribute 'colour'"),
                                        ("sex,sex", "given twice"), ("sex,race:al", "no sensitive attribute")])
def test_bad_specs_say_what_to_write(spec, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("adult", spec)
    with pytest.raises(ValueError, match="no many-valued form"):
        load_dataset("german", "age:all")


# ---------------------------------------------------------------- metrics against MetricFrame


def test_metrics_match_metric_frame_over_many_groups():
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )

    rng = np.random.default_rng(3)
    names = np.array(["a", "b", "c", "d", "e"])
    g = rng.choice(5, size=3000, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    y = (rng.random(3000) < 0.3 + 0.05 * g).astype(int)
    pred = (rng.random(3000) < 0.2 + 0.1 * g).astype(int)
    mf = MetricFrame(metrics={"selection_rate": selection_rate, "tpr": true_positive_rate,
                              "fpr": false_positive_rate}, y_true=y, y_pred=pred, sensitive_features=names[g])
    rows = group_table(y, {"after": pred}, g, list(names))
    for row in rows:
        for k in ("selection_rate", "tpr", "fpr"):
            assert row[f"{k}_after"] == pytest.approx(mf.by_group.loc[row["name"], k], abs=1e-6)
            lo, hi = row[f"{k}_after_ci"]
            assert lo <= row[f"{k}_after"] <= hi
    rep = fairness_report(y, pred, names[g])
    for k, ours in (("selection_rate", "selection_rate"), ("tpr", "tpr"), ("fpr", "fpr")):
        assert rep.difference[ours] == pytest.approx(mf.difference()[k])
        assert rep.ratio[ours] == pytest.approx(mf.ratio()[k])
    h = headline(y, pred, g)
    assert h["dp_diff"] == pytest.approx(demographic_parity_difference(y, pred, sensitive_features=g))
    assert h["eo_diff"] == pytest.approx(equalized_odds_difference(y, pred, sensitive_features=g))
    gaps = gap_intervals(y, pred, g, n_boot=300)
    assert gaps["dp_diff"]["value"] == pytest.approx(h["dp_diff"], abs=1e-6)
    assert gaps["dp_diff"]["ci"][0] <= gaps["dp_diff"]["value"] <= gaps["dp_diff"]["ci"][1]
    assert gaps["dp_ratio"]["value"] == pytest.approx(mf.ratio()["selection_rate"], abs=1e-6)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval([0, 5, 10], [10, 10, 0])
    np.testing.assert_allclose([lo[0], hi[0]], [0.0, 0.27753], atol=1e-4)
    np.testing.assert_allclose([lo[1], hi[1]], [0.23659, 0.76341], atol=1e-4)
    assert np.isnan(lo[2]) and np.isnan(hi[2])


# ---------------------------------------------------------------- methods with G > 2 real groups


@pytest.fixture(scope="module")
def peer(sex_race):
    from benchmarks.peers import threshold_optimizer

    return threshold_optimizer("adult", "sex,race", "dp", seed=0)


def test_thresholds_reach_threshold_optimizer_on_sex_x_race(sex_race_setup, peer):
    """The same rule Fairlearn learns, with its default tolerance 0.01: test dp within 0.01 of ThresholdOptimizer's
    (which reaches exact tune parity), accuracy within 1 point."""
    data, model, tune, logp = sex_race_setup
    patch, report = fit_method("thresholds", OnnxOracle(model), tune, "dp")
    assert patch.groups == list(data.group_names) and report.tune_after["dp"] <= 0.01 + 1e-9
    pred = PatchRunner(patch).predict(data.test.X, logp, data.test.groups, request_id="t")
    after = headline(data.test.y, pred, data.test.groups)
    assert after["dp_diff"] <= peer["after"]["dp_diff"] + 0.01
    assert after["accuracy"] >= peer["after"]["accuracy"] - 0.01
    assert len(peer["groups"]) == 4 and [r["name"] for r in peer["groups"]] == list(data.group_names)


def test_eraser_on_sex_x_race_with_group_strengths(sex_race_setup, peer):
    """Eraser with 1000 queries and one strength per group: near parity on the tune rows with the model's real
    scores, and on test at least a fourfold cut of the dp gap, within 1.5 points of ThresholdOptimizer's accuracy.
    (Seed 0 measures test dp 0.048 against ThresholdOptimizer's 0.026: the 925-row Female & Non-white group moves
    by 0.02 between tune and test; docs/groups.md.)"""
    data, model, tune, logp = sex_race_setup
    patch, report = fit_method("eraser", OnnxOracle(model, budget=1000), tune, "dp", 1000)
    assert report.strengths is not None and len(report.strengths) == 4
    assert patch.manifest["params"]["strengths"] == report.strengths
    tune_logp = OnnxOracle(model).log_probs(data.tune.X)
    on_tune = PatchRunner(patch).predict(data.tune.X, tune_logp, data.tune.groups)
    # with the surrogate's label prior (chosen on held-out tuning rows, docs/guard.md) this reads 0.029 at seed 0;
    # the spread on the tuning rows themselves is a fit figure, not what the prior was chosen for
    assert rate_spread(on_tune, data.tune.y, data.tune.groups, 4) <= 0.03
    pred = PatchRunner(patch).predict(data.test.X, logp, data.test.groups)
    before, after = headline(data.test.y, logp.argmax(1), data.test.groups), headline(data.test.y, pred,
                                                                                        data.test.groups)
    assert after["dp_diff"] <= before["dp_diff"] / 4
    assert after["accuracy"] >= peer["after"]["accuracy"] - 0.015


def test_group_free_eraser_on_sex_x_race(sex_race_setup, peer):
    """No group at inference (the attribute estimator) with four groups: the strengths solved on the tuning rows'
    own groups start the search over the estimator's soft group weights; on test at least a fourfold cut of the
    dp gap, within 1.5 points of ThresholdOptimizer's accuracy (seed 0 reads dp 0.247 -> 0.031)."""
    data, model, tune, logp = sex_race_setup
    patch, report = fit_method("eraser", OnnxOracle(model, budget=1000), tune, "dp", 1000, bias="estimator")
    assert not patch.group_at_inference and report.strengths is not None and len(report.strengths) == 4
    pred = PatchRunner(patch).predict(data.test.X, logp, None)
    before, after = headline(data.test.y, logp.argmax(1), data.test.groups), headline(data.test.y, pred,
                                                                                        data.test.groups)
    assert after["dp_diff"] <= before["dp_diff"] / 4
    assert after["accuracy"] >= peer["after"]["accuracy"] - 0.015


def rate_spread(decision, y, groups, n_groups) -> float:
    sr = decision_rates(decision, y, groups, n_groups)["sr"]
    return float(sr.max() - sr.min())


@pytest.mark.parametrize("method,criterion", [("reject_option", "dp"), ("eq_odds", "eo"),
                                              ("calibrated_eq_odds", "eopp"), ("thresholds", "eo")])
def test_every_postprocessing_method_takes_sex_x_race(sex_race_setup, method, criterion):
    data, model, tune, _ = sex_race_setup
    # the rule itself (guard off: calibrated equalized odds for eopp cannot show an improvement cross-fitted here)
    patch, report = fit_method(method, OnnxOracle(model), tune, criterion, guard=0)
    assert patch.groups == list(data.group_names)
    assert report.tune_after[criterion] < report.tune_before[criterion]


def test_patch_runner_takes_group_ids_and_names_for_four_groups(sex_race_setup):
    data, model, tune, logp = sex_race_setup
    patch, _ = fit_method("thresholds", OnnxOracle(model), tune, "dp")
    runner = PatchRunner(patch)
    ids = data.test.groups[:500]
    by_id = runner.predict(data.test.X[:500], logp[:500], ids, request_id="r")
    by_name = runner.predict(data.test.X[:500], logp[:500], np.asarray(data.group_names)[ids], request_id="r")
    np.testing.assert_array_equal(by_id, by_name)
    assert set(ids.tolist()) == {0, 1, 2, 3}
    with pytest.raises(UnknownGroupError, match="unknown group id 4"):
        runner.predict(data.test.X[:1], logp[:1], np.array([4]))
    with pytest.raises(UnknownGroupError, match="unknown group 'Female'"):
        runner.predict(data.test.X[:1], logp[:1], np.array(["Female"]))


def test_bench_json_lists_the_groups():
    from patcher.pipeline import bench

    r = bench("thresholds", dataset="adult", sensitive="sex,race", criterion="dp", queries=None, seed=0)
    assert [g["name"] for g in r["groups"]] == ["Female & Non-white", "Female & White", "Male & Non-white",
                                                "Male & White"]
    assert sum(g["n_test"] for g in r["groups"]) == r["n_test"]
    sr = [g["selection_rate_after"] for g in r["groups"]]
    assert max(sr) - min(sr) == pytest.approx(r["after"]["dp_diff"], abs=1e-5)
    assert r["gaps"]["after"]["dp_diff"]["value"] == pytest.approx(r["after"]["dp_diff"], abs=1e-5)
    assert all(g["selection_rate_after_ci"][0] <= g["selection_rate_after"] <= g["selection_rate_after_ci"][1]
               for g in r["groups"])
    assert r["merged_cells"] == []


def test_eraser_estimator_over_four_groups(sex_race_setup):
    """No group at inference: the attribute estimator predicts the four cells, each erased with its own strength."""
    data, model, tune, logp = sex_race_setup
    patch, report = fit_method("eraser", OnnxOracle(model, budget=1000), tune, "dp", 1000, bias="estimator")
    assert not PatchRunner(patch).needs_group and len(report.strengths) == 4
    assert report.tune_after["dp"] < report.tune_before["dp"] / 2
    pred = PatchRunner(patch).predict(data.test.X, logp)
    assert headline(data.test.y, pred, data.test.groups)["dp_diff"] < headline(data.test.y, logp.argmax(1),
                                                                               data.test.groups)["dp_diff"]
