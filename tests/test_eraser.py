"""Eraser on the real Adult reference model, through the counting oracle."""

import numpy as np
import pytest

from patcher.apply import PatchRunner
from patcher.methods import eraser
from patcher.metrics import demographic_parity_difference
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from patcher.scores import log_softmax
from patcher.tuning import TuningData
from tests.conftest import fit


@pytest.fixture(scope="module")
def tune(adult):
    return TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)


def test_stratified_rows_cover_every_cell_and_reweight():
    groups = np.array([0] * 90 + [1] * 10)
    y = np.array(([0] * 80 + [1] * 10) + ([0] * 5 + [1] * 5))
    idx, w = eraser.stratified_rows(groups, y, 40, seed=0)
    assert len(idx) == 40 and len(set(idx)) == 40
    cells = groups[idx] * 2 + y[idx]
    # 10 each, small cells (5 rows) fully taken, what is left goes to the cell that still has rows
    assert np.bincount(cells, minlength=4).tolist() == [20, 10, 5, 5]
    assert w.sum() == pytest.approx(100)  # weights add back up to the population


def test_stratified_rows_keep_a_cells_unused_share_in_its_group():
    """Each group gets an equal share; a small group with few positives spends the rest of its share on its own
    negatives (its rate is then tuned on more of its real scores), not on the other groups' cells."""
    groups = np.array([0] * 400 + [1] * 60)
    y = np.array([0] * 200 + [1] * 200 + [0] * 56 + [1] * 4)
    idx, w = eraser.stratified_rows(groups, y, 80, seed=0)
    cells = groups[idx] * 2 + y[idx]
    assert np.bincount(cells, minlength=4).tolist() == [20, 20, 36, 4]
    assert w.sum() == pytest.approx(460)
    everything, _ = eraser.stratified_rows(groups, y, 1000, seed=0)  # a budget past the rows: each row once
    assert sorted(everything.tolist()) == list(range(460))


def test_group_rule_is_the_weighted_group_mean():
    logp = np.log(np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]]))
    table = eraser.group_rule(logp, np.array([0, 0, 1]), np.array([1.0, 3.0, 1.0]), 2)
    np.testing.assert_allclose(np.exp(table[0]), [0.75, 0.25])  # (0.9 + 3 * 0.7) / 4
    np.testing.assert_allclose(np.exp(table[1]), [0.2, 0.8])


def test_sweep_thresholds_matches_direct_computation():
    rng = np.random.default_rng(0)
    s, y, g = rng.normal(size=200), rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    cuts, acc, unfair = eraser.sweep_thresholds(s, y, g, 2, "dp")
    for j in (0, 17, 100, 200):
        pred = (s > cuts[j]).astype(int)
        assert acc[j] == pytest.approx(np.mean(pred == y))
        if j in (0, 200):  # no one / everyone accepted: never a candidate
            assert np.isinf(unfair[j])
        else:
            assert unfair[j] == pytest.approx(demographic_parity_difference(y, pred, g))


def test_softlabel_logreg_recovers_the_conditional_mean():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 2, 4000)
    B = np.eye(2)[b]
    p1 = np.where(b == 1, 0.7, 0.2) + rng.uniform(-0.1, 0.1, 4000)  # E[p1 | b] = 0.7 / 0.2
    W, c = eraser.fit_softlabel_logreg(B, np.stack([1 - p1, p1], 1), np.ones(4000), l2=1e-6)
    probs = np.exp(log_softmax(np.eye(2) @ W + c))
    np.testing.assert_allclose(probs[:, 1], [0.2, 0.7], atol=0.01)


@pytest.mark.parametrize("bias", ["group", "estimator"])
def test_eraser_reduces_dp_within_budget_and_the_patch_applies_offline(adult, adult_model, tune, bias):
    oracle = OnnxOracle(adult_model.onnx_bytes, budget=300)
    patch, report = fit("eraser", oracle, tune, "dp", 300, bias=bias, seed=0)
    assert oracle.queries_used == report.queries_used <= 300
    assert report.group_at_inference is (bias == "group")
    # round trip through bytes, then apply on the held-out test split
    runner = PatchRunner(Patch.from_bytes(patch.to_bytes(), expected_id=patch.id))
    logp = OnnxOracle(adult_model.onnx_bytes).log_probs(adult.test.X)
    before = logp.argmax(1)
    after = runner.predict(adult.test.X, logp, adult.test.groups if runner.needs_group else None)
    dp_before = demographic_parity_difference(adult.test.y, before, adult.test.groups)
    dp_after = demographic_parity_difference(adult.test.y, after, adult.test.groups)
    assert dp_before > 0.1 and dp_after < 0.05, (dp_before, dp_after)
    # the patch is exactly the formula: log p - alpha * rule(group) with the binary cut moved
    table = np.asarray(report.rule)
    if bias == "group":
        expected = (logp - report.alpha * table[adult.test.groups])
        expected[:, 1] -= report.threshold
        np.testing.assert_allclose(runner.transform_outputs(adult.test.X, logp, adult.test.groups), expected,
                                   atol=1e-4)


def test_proxies_need_columns(tune, adult_model):
    with pytest.raises(ValueError, match="proxy_columns"):
        fit("eraser", OnnxOracle(adult_model.onnx_bytes), tune, "dp", 100, bias="proxies")


def test_budget_too_small_is_a_clear_error(tune, adult_model):
    with pytest.raises(ValueError, match="too small"):
        fit("eraser", OnnxOracle(adult_model.onnx_bytes), tune, "dp", 3)


def test_multiclass_model_gets_a_patch(adult):
    from tests.conftest import random_mlp

    X = adult.tune.X[:2000]
    model = random_mlp(X.shape[1], c=3, seed=4)
    logp = OnnxOracle(model).log_probs(X)
    y = logp.argmax(1)  # labels the model agrees with, three classes
    data = TuningData(X, y, adult.tune.groups[:2000], adult.group_names)
    patch, report = fit("eraser", OnnxOracle(model, budget=600), data, "dp", 600, bias="group")
    assert patch.manifest["n_classes"] == 3 and report.queries_used <= 600
    out = PatchRunner(patch).transform_outputs(X, logp, data.groups)
    assert out.shape == (2000, 3)


def test_weighted_sweep_equals_replicated_rows():
    rng = np.random.default_rng(1)
    s, y, g = rng.normal(size=60), rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    reps = rng.integers(1, 4, 60)
    cuts, acc, unfair = eraser.sweep_thresholds(s, y, g, 2, "eo", weights=reps.astype(float))
    big = [np.repeat(a, reps) for a in (s, y, g)]
    for t, a, u in zip(cuts[::7], acc[::7], unfair[::7], strict=True):
        pred = (big[0] > t).astype(int)
        assert a == pytest.approx(np.mean(pred == big[1]))
        tpr = [pred[(big[2] == k) & (big[1] == 1)].mean() for k in (0, 1)]
        fpr = [pred[(big[2] == k) & (big[1] == 0)].mean() for k in (0, 1)]
        sr = [pred[big[2] == k].mean() for k in (0, 1)]
        if min(sr) == 0 or max(sr) == 1:
            assert np.isinf(u)
        else:
            assert u == pytest.approx(max(abs(tpr[0] - tpr[1]), abs(fpr[0] - fpr[1])))


def test_proxy_rule_needs_no_group_and_uses_only_its_columns(adult, adult_model, tune):
    from patcher.datasets import feature_columns

    cols = feature_columns(adult.feature_names, ["relationship", "marital_status"])
    assert all(adult.feature_names[i].startswith(("relationship=", "marital_status=")) for i in cols)
    patch, report = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=500), tune, "dp", 500,
                               bias="proxies", proxy_columns=cols)
    runner = PatchRunner(patch)
    assert not runner.needs_group and not report.group_at_inference
    logp = OnnxOracle(adult_model.onnx_bytes).log_probs(adult.test.X[:500])
    X = adult.test.X[:500].copy()
    other = [i for i in range(X.shape[1]) if i not in cols]
    X2 = X.copy()
    X2[:, other] = 0.0  # the correction reads the proxy columns only
    np.testing.assert_allclose(runner.transform_outputs(X, logp), runner.transform_outputs(X2, logp), atol=1e-5)
    with pytest.raises(ValueError, match="no such column"):
        feature_columns(adult.feature_names, ["height"])


def test_cuts_that_accept_or_reject_a_whole_group_are_never_fair():
    s = np.array([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    y = np.array([1, 0, 1, 0, 1, 0])
    g = np.array([0, 1, 0, 1, 0, 1])
    cuts, acc, unfair = eraser.sweep_thresholds(s, y, g, 2, "eo")
    assert np.isinf(unfair[0]) and np.isinf(unfair[-1])  # nobody / everybody accepted
    assert np.isinf(unfair[1]) and np.isinf(unfair[5])  # none of group 1 / all of group 0
    assert np.isfinite(unfair[2]) and np.isfinite(unfair[4])


def test_the_guard_returns_no_patch_when_cross_fitting_cannot_show_eo_improves(adult, adult_model, tune):
    """Eraser for eo on 100 queries fits noise (on the test split its patch moved eo from 0.097 to 0.276): the
    cross-fitted comparison on the paid rows cannot show an improvement, so the patch is the identity and the
    report says why in words."""
    patch, report = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=100), tune, "eo", 100)
    g = report.guard
    assert g["rows"] == 100 and g["folds"] == 5 and g["confidence"] == 0.9 and g["verdict"] != "improved"
    assert g["change_ci"][1] >= 0 and "no patch returned" in report.warning and "eo" in report.warning
    assert report.alpha == 0.0 and report.threshold == 0.0 and report.queries_used == 100  # the folds pay nothing
    logp = OnnxOracle(adult_model.onnx_bytes).log_probs(adult.test.X)
    served = PatchRunner(patch).predict(adult.test.X, logp, adult.test.groups)
    assert np.array_equal(served, logp.argmax(1))  # exactly the model's own decisions
    assert patch.manifest["report"]["warning"] == report.warning


def test_the_guard_keeps_a_patch_that_improves_and_can_be_turned_off(adult_model, tune):
    oracle = OnnxOracle(adult_model.onnx_bytes, budget=300)
    patch, report = fit("eraser", oracle, tune, "dp", 300, guard=0.9)
    assert report.guard["verdict"] == "improved" and report.guard["change_ci"][1] < 0 and report.warning is None
    assert report.alpha > 0 and oracle.queries_used == report.queries_used <= 300  # the folds pay nothing
    _, unchecked = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=100), tune, "eo", 100, guard=0)
    assert unchecked.guard is None and unchecked.warning is None and unchecked.alpha > 0


def test_weighted_verdict_equals_replicated_rows():
    from patcher.verdict import held_out_verdict

    rng = np.random.default_rng(1)
    n = 400
    g, y = rng.integers(0, 2, n), rng.integers(0, 2, n)
    before, after = rng.integers(0, 2, n), rng.integers(0, 2, n)
    reps = rng.integers(1, 4, n)
    weighted = held_out_verdict(y, before, after, g, 2, "eo", weights=reps.astype(float), n_boot=10)
    rows = np.repeat(np.arange(n), reps)
    replicated = held_out_verdict(y[rows], before[rows], after[rows], g[rows], 2, "eo", n_boot=10)
    for key in ("gap_before", "gap_after", "change"):
        assert weighted[key] == pytest.approx(replicated[key], abs=1e-9)


class _Recording(OnnxOracle):
    """The reference model's oracle, keeping every batch of rows it was asked to score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[np.ndarray] = []

    def scores(self, X):
        self.asked.append(np.array(X))
        return super().scores(X)


def test_the_second_round_pays_for_rows_near_the_cut_and_leaves_the_rule_to_the_stratified_rows(adult_model, tune):
    """adaptive_share: the first 70% of the budget is the stratified draw a 700-query fit makes (so the rule
    table, a population mean, is the same), the other 30% are new rows, and they lie nearer the patched cut than
    the tuning rows at large."""
    plain = _Recording(adult_model.onnx_bytes, budget=700)
    _, first_only = fit("eraser", plain, tune, "dp", 700, seed=0)
    oracle = _Recording(adult_model.onnx_bytes, budget=1000)
    patch, report = fit("eraser", oracle, tune, "dp", 1000, seed=0, adaptive_share=0.3)
    assert oracle.queries_used == report.queries_used <= 1000
    assert len(oracle.asked) == 2 and len(oracle.asked[1]) == 300
    np.testing.assert_array_equal(oracle.asked[0], plain.asked[0])
    np.testing.assert_allclose(report.rule, first_only.rule)
    first = {r.tobytes() for r in oracle.asked[0]}
    assert not any(r.tobytes() in first for r in oracle.asked[1])
    logp = OnnxOracle(adult_model.onnx_bytes).log_probs(tune.X)
    patched = PatchRunner(patch).transform_outputs(tune.X, logp, tune.groups)
    distance = np.abs(patched[:, 1] - patched[:, 0])  # the patch moved the cut to 0
    second = np.isin(np.arange(len(tune)), [i for i, r in enumerate(tune.X) if r.tobytes() in
                                            {s.tobytes() for s in oracle.asked[1]}])
    assert np.median(distance[second]) < 0.5 * np.median(distance)


def test_no_second_round_for_eo_or_when_the_budget_covers_every_row(adult_model, tune):
    oracle = _Recording(adult_model.onnx_bytes, budget=300)
    fit("eraser", oracle, tune, "eo", 300, seed=0, adaptive_share=0.3, guard=0)  # eo tunes on paid rows only
    assert len(oracle.asked) == 1
    small = tune.subset(np.arange(200))
    whole = _Recording(adult_model.onnx_bytes, budget=300)
    fit("eraser", whole, small, "dp", 300, seed=0, adaptive_share=0.3)
    assert len(whole.asked) == 1 and len(whole.asked[0]) == 200


def test_imputed_draws_put_each_groups_surrogate_error_back():
    """surrogate_draws: paid rows once and exact; every unpaid row as `draws` copies of weight 1/draws around its
    imputed margin, spread like the surrogate's error in the row's group (here noise of sd 0.3 and 2.0)."""
    rng = np.random.default_rng(0)
    n = 4000
    X = rng.normal(size=(n, 5))
    groups = (rng.random(n) < 0.5).astype(np.int64)
    margin = X @ np.array([1.0, -0.5, 0.3, 0.0, 0.8]) + np.where(groups == 1, 2.0, 0.3) * rng.normal(size=n)
    idx = rng.choice(n, 600, replace=False)
    weights = np.ones(600)
    plain = eraser.surrogate_margins(X, idx, weights, margin[idx])
    m, rows, w = eraser.imputed_draws(X, idx, weights, margin[idx], groups, 8)
    unpaid = np.setdiff1d(np.arange(n), idx)
    assert len(m) == len(rows) == len(w) == 600 + 8 * len(unpaid)
    np.testing.assert_allclose(m[:600], margin[idx])
    assert w.sum() == pytest.approx(n)
    copies = m[600:].reshape(len(unpaid), 8)
    np.testing.assert_array_equal(rows[600:].reshape(len(unpaid), 8)[:, 0], unpaid)
    spread = copies.std(1) / np.std(eraser._draw_quantiles(8))
    assert spread[groups[unpaid] == 0].mean() == pytest.approx(0.3, rel=0.25)
    assert spread[groups[unpaid] == 1].mean() == pytest.approx(2.0, rel=0.25)
    np.testing.assert_allclose(copies.mean(1), plain[unpaid], atol=0.3)  # centred on the imputation (+ group bias)
    same, _, ones = eraser.imputed_draws(X, idx, weights, margin[idx], groups, 1)
    np.testing.assert_array_equal(same, plain)
    np.testing.assert_array_equal(ones, np.ones(n))


def _point(base_accuracy: float) -> eraser.OperatingPoint:
    return eraser.OperatingPoint(1.0, 0.0, base_accuracy, 1.0, base_accuracy, 1.0, [])


def test_group_rates_solve_gives_every_group_the_same_selection_rate():
    """dp with the group at inference: the solved strengths put every group's cut where its rate is the common one
    (up to one row of the smallest group), and the most accurate such rate is kept."""
    rng = np.random.default_rng(1)
    sizes, shifts = [3000, 400, 90], [0.0, -1.0, -2.0]
    groups = np.concatenate([np.full(n, a) for a, n in enumerate(sizes)])
    y = (rng.random(len(groups)) < 0.3).astype(np.int64)
    margin = 1.5 * (2 * y - 1) + np.take(shifts, groups) + rng.normal(size=len(groups))
    d = np.log(np.array([0.3, 0.15, 0.05]) / np.array([0.7, 0.85, 0.95]))
    opts = eraser.EraserOptions()
    strengths, point = eraser.solve_group_rates(margin, d, y, groups, 3, None, _point(0.9), opts)
    assert strengths[int(np.argmax(d))] == 0.0  # the anchor: the group whose rule is nearest neutral
    decision = margin - strengths[groups] * d[groups] > point.threshold
    rates = np.array([decision[groups == a].mean() for a in range(3)])
    assert rates.max() - rates.min() <= 1 / sizes[-1] + 1e-12
    assert point.unfairness == pytest.approx(rates.max() - rates.min())
    assert point.accuracy == pytest.approx((decision == y).mean())
    # no common rate is more accurate (each group at its attainable rate nearest r, r on a fine grid)
    compared = 0
    for r in np.linspace(0.05, 0.6, 56):
        cuts = [np.quantile(margin[groups == a], 1 - r) for a in range(3)]
        other = margin > np.take(cuts, groups)
        spread = np.ptp([other[groups == a].mean() for a in range(3)])
        if spread <= opts.fairness_tolerance:
            compared += 1
            assert (other == y).mean() <= point.accuracy + 1e-9
    assert compared >= 40  # the comparison ran over most of the grid


def test_group_rates_solve_honours_the_weights():
    """Weighted rows count as their weight (the surrogate's draws): doubling every weight changes nothing, and
    a row of weight 2 counts as two rows."""
    rng = np.random.default_rng(2)
    groups = np.repeat([0, 1, 2], [500, 200, 100])
    y = (rng.random(800) < 0.4).astype(np.int64)
    margin = 2.0 * y - 1 + 0.5 * groups + rng.normal(size=800)
    d = np.array([-0.2, -0.5, -0.9])
    w = rng.integers(1, 3, 800).astype(float)
    opts = eraser.EraserOptions()
    s1, p1 = eraser.solve_group_rates(margin, d, y, groups, 3, w, _point(0.8), opts)
    s2, p2 = eraser.solve_group_rates(margin, d, y, groups, 3, 2 * w, _point(0.8), opts)
    np.testing.assert_allclose(s1, s2)
    rep = np.repeat(np.arange(800), w.astype(int))
    s3, p3 = eraser.solve_group_rates(margin[rep], d, y[rep], groups[rep], 3, None, _point(0.8), opts)
    assert p3.accuracy == pytest.approx(p1.accuracy) and p3.unfairness == pytest.approx(p1.unfairness)


def test_group_rates_solve_declines_a_group_without_tuning_rows():
    """A group with no tuning rows (or only zero weights) has no rate to read: the solve declines (None) and the
    caller searches the strengths instead, rather than indexing an empty curve."""
    rng = np.random.default_rng(3)
    groups = np.repeat([0, 1], [300, 100])  # group 2 of 3: no rows
    y = (rng.random(400) < 0.4).astype(np.int64)
    margin = 2.0 * y - 1 + rng.normal(size=400)
    d = np.array([-0.2, -0.5, -0.9])
    opts = eraser.EraserOptions()
    assert eraser.solve_group_rates(margin, d, y, groups, 3, None, _point(0.8), opts) is None
    w = np.where(groups == 1, 0.0, 1.0)  # group 1's rows all weigh nothing
    assert eraser.solve_group_rates(margin, d[:2], y, groups, 2, w, _point(0.8), opts) is None
    assert eraser.solve_group_rates(margin, d[:2], y, groups, 2, None, _point(0.8), opts) is not None
