"""Fairness Reprogramming: trigger forms and their ONNX export, the projected gradient, cell weights and
the selection holdout, gradient and zeroth-order fits on the real Adult reference model and the colored
digits CNN (scored on the test split), budgets, the bench JSON."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from patcher.access import ModelArtifact
from patcher.apply import PatchRunner
from patcher.methods import get_method, reprogram
from patcher.methods.eraser import sweep_thresholds
from patcher.methods.reprogram import crossfit_folds
from patcher.methods.reprogram_fairness import cell_accuracy_curve, cell_weights, worst_cell_point
from patcher.methods.reprogram_gradient import project
from patcher.methods.reprogram_triggers import (
    BorderTrigger,
    ColorTrigger,
    FrameTrigger,
    PatchTrigger,
    TabularTrigger,
    group_columns,
)
from patcher.methods.trigger import TriggerOptions
from patcher.metrics import criterion_gap, headline
from patcher.oracle import OnnxOracle
from patcher.tuning import TuningData
from tests.conftest import fit


def run_onnx(graph: bytes, X: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]


@pytest.mark.parametrize("trigger", [TabularTrigger(7), TabularTrigger(7, [1, 4], mask="binary"),
                                     BorderTrigger((3, 16, 16), width=2, block=4), PatchTrigger((3, 16, 16), 4),
                                     FrameTrigger((3, 16, 16), width=2, block=4), FrameTrigger((3, 16, 16), 2),
                                     ColorTrigger((3, 16, 16)), ColorTrigger((3, 7)), ColorTrigger((2, 3, 4, 5))],
                         ids=["tabular-scale", "tabular-binary", "border", "patch", "frame-coarse", "frame", "color",
                              "color-1d", "color-3d"])
def test_exported_trigger_is_exactly_the_torch_trigger(trigger) -> None:
    rng = np.random.default_rng(0)
    X = rng.random((5, *trigger.shape), dtype=np.float32)
    theta = trigger.init().float() + torch.tensor(rng.normal(size=trigger.dim), dtype=torch.float32)
    graph = trigger.to_onnx(theta)
    with torch.no_grad():
        expected = trigger.apply(torch.tensor(X), theta).numpy()
    out = run_onnx(graph, X)
    assert out.shape == X.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)
    if not isinstance(trigger, PatchTrigger | FrameTrigger):  # these replace pixels; the others start as identity
        np.testing.assert_allclose(run_onnx(trigger.to_onnx(trigger.init().float()), X), X, atol=1e-7)


def test_color_trigger_mixes_channels_the_same_at_every_pixel_and_can_send_two_hues_to_one() -> None:
    from patcher.digits import COLORS

    trig = ColorTrigger((3, 16, 16))
    assert trig.dim == 12 and trig.identity_start and not trig.random_starts
    red, blue = COLORS.astype(np.float64)
    w = np.linalg.pinv(np.stack([red, blue])) @ np.ones(2)  # w . red = w . blue = 1
    target = np.array([0.5, 0.3, 0.7])
    theta = torch.tensor(np.concatenate([np.outer(target, w).ravel(), [0.1, 0.0, -0.1]]))
    gray = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    X = np.stack([gray[0][None] * red[:, None, None], gray[0][None] * blue[:, None, None],
                  gray[1][None] * blue[:, None, None]]).astype(np.float32)
    out = run_onnx(trig.to_onnx(theta.float()), X)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)  # the same strokes in either hue look the same
    expected = gray[1][None] * target[:, None, None] + np.array([0.1, 0.0, -0.1])[:, None, None]
    np.testing.assert_allclose(out[2], expected, atol=1e-5)  # every pixel: A x + b
    d = trig.describe(theta)
    assert d["form"] == "color" and len(d["mix"]) == 3 and d["bias"] == [0.1, 0.0, -0.1]
    with pytest.raises(ValueError, match="channels-first"):
        ColorTrigger((7,))


def test_zo_trigger_is_the_zeroth_order_form_and_colored_digits_defaults_use_the_color_mix() -> None:
    from patcher.methods.reprogram import make_trigger
    from patcher.methods.trigger import dataset_options

    X, g = np.zeros((4, 3, 16, 16), np.float32), np.array([0, 1, 0, 1])
    split = TriggerOptions(trigger="frame", zo_trigger="color")
    assert isinstance(make_trigger(X, g, split, "zeroth_order"), ColorTrigger)
    assert isinstance(make_trigger(X, g, split, "gradient"), FrameTrigger)  # zo_trigger leaves gradients alone
    opts = get_method("trigger").parse_options(preset="colored-digits")
    assert opts.zo_trigger is None
    assert all(isinstance(make_trigger(X, g, opts, a), ColorTrigger) for a in ("gradient", "zeroth_order"))
    with pytest.raises(ValueError, match="color trigger needs"):
        make_trigger(np.zeros((4, 5), np.float32), g, TriggerOptions(trigger="color"), "gradient")
    # an explicit frame keeps the frame's zeroth-order search settings (the colored-digits-frame preset)
    frame = dataset_options("colored-digits", "frame")
    assert frame == dict(get_method("trigger").presets["colored-digits-frame"]) and frame["trigger"] == "frame"
    assert (frame["q"], frame["zo_batch"], frame["zo_lr"]) == (4, 32, 0.2)
    color = dataset_options("colored-digits", "color")
    assert color == dataset_options("colored-digits") and color["trigger"] == "color"
    assert (color["q"], color["zo_batch"], color["zo_lr"]) == (2, 64, 0.1)
    assert dataset_options("adult") == dataset_options("adult", "tabular") == {}


def test_border_and_patch_touch_only_their_pixels() -> None:
    X = np.zeros((1, 3, 16, 16), np.float32)
    border, patch = BorderTrigger((3, 16, 16), width=2), PatchTrigger((3, 16, 16), size=4)
    b = run_onnx(border.to_onnx(torch.ones(border.dim)), X)[0]
    assert np.all(b[:, 2:14, 2:14] == 0) and np.all(b[:, :2, :] > 0.7)
    p = run_onnx(patch.to_onnx(torch.ones(patch.dim)), X + 0.5)[0]
    assert np.allclose(p[:, :4, :4], 1 / (1 + np.exp(-1))) and np.all(p[:, 4:, :] == 0.5)


def test_frame_replaces_its_pixels_the_same_for_every_image_with_no_dead_parameters() -> None:
    frame = FrameTrigger((3, 16, 16), width=2, block=4, seed=3)
    assert frame.dim == 3 * 12  # the 4 inner cells of the 4 x 4 grid hold no frame pixels: no parameters
    theta = frame.init().float()
    assert not torch.equal(theta, FrameTrigger((3, 16, 16), width=2, block=4, seed=4).init().float())
    X = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    out = run_onnx(frame.to_onnx(theta), X)
    np.testing.assert_array_equal(out[:, :, 2:14, 2:14], X[:, :, 2:14, 2:14])
    np.testing.assert_allclose(out[0, :, :2], out[1, :, :2], atol=0)  # the frame does not depend on the image
    assert np.all((out[:, :, :2] > 0) & (out[:, :, :2] < 1))
    with torch.no_grad():
        base = frame.apply(torch.tensor(X), theta)
        for i in range(frame.dim):  # every parameter moves some frame pixel
            assert not torch.equal(frame.apply(torch.tensor(X), theta + 0.5 * torch.eye(frame.dim)[i]), base)


def test_cell_weights_make_every_group_label_cell_count_the_same() -> None:
    y, groups = np.array([0, 0, 0, 0, 1, 1, 0, 1]), np.array([0, 0, 0, 1, 0, 0, 1, 1])
    w = cell_weights(y, groups)
    assert w.mean() == pytest.approx(1.0)
    sums = {(g, c): w[(groups == g) & (y == c)].sum() for g in (0, 1) for c in (0, 1)}
    assert all(v == pytest.approx(2.0) for v in sums.values()), sums


def test_crossfit_folds_split_every_group_label_cell_evenly() -> None:
    rng = np.random.default_rng(1)
    y, groups = rng.integers(0, 2, 1001), (rng.random(1001) < 0.15).astype(np.int64)
    folds = crossfit_folds(y, groups, 3, seed=0)
    assert set(folds.tolist()) == {0, 1, 2} and np.array_equal(folds, crossfit_folds(y, groups, 3, seed=0))
    assert np.ptp(np.bincount(folds)) <= 1
    for g in (0, 1):
        for c in (0, 1):
            counts = np.bincount(folds[(groups == g) & (y == c)], minlength=3)
            assert np.ptp(counts) <= 1, (g, c, counts)
    assert not np.array_equal(folds, crossfit_folds(y, groups, 3, seed=1))


def test_crossfit_selection_scores_each_fold_with_a_trigger_that_did_not_train_on_it(adult_model, tune,
                                                                                     monkeypatch) -> None:
    trained, scored_rows = [], []
    real_train, real_logits = reprogram.train_trigger, reprogram.model_logits

    def spy_train(model, trigger, X, *args, **kwargs):
        trained.append(len(X))
        return real_train(model, trigger, X, *args, **kwargs)

    def spy_logits(model, X, trigger=None, theta=None, **kwargs):
        if trigger is not None:
            scored_rows.append(len(X))
        return real_logits(model, X, trigger, theta, **kwargs)

    monkeypatch.setattr(reprogram, "train_trigger", spy_train)
    monkeypatch.setattr(reprogram, "model_logits", spy_logits)
    n = len(tune.y)
    folds = np.bincount(crossfit_folds(tune.y, tune.groups, 2, seed=0))
    patch, report = fit("trigger", ModelArtifact(adult_model.onnx_bytes), tune, "dp", None, lams=[1.0, 5.0],
                                  steps=30, select_folds=2, holdout=0.3, select="worst_cell")
    # per lambda: fold f trained on the other fold, then scored fold f; last: the chosen lambda on every row
    assert trained == [n - folds[0], n - folds[1]] * 2 + [n]
    assert scored_rows == [folds[0], folds[1]] * 2
    assert report.selection["folds"] == 2 and report.selection["selection_rows"] == n  # holdout ignored
    assert report.steps == 30 * 5 and report.lam in (1.0, 5.0)
    assert [c["lam"] for c in report.candidates] == [1.0, 5.0]
    chosen = [c for c in report.candidates if c["lam"] == report.lam][0]
    assert report.threshold == chosen["threshold"] and report.tune_after["dp"] == pytest.approx(chosen["unfairness"])
    with pytest.raises(ValueError, match="select_folds"):
        TriggerOptions(select_folds=1)
    from patcher.methods.trigger import dataset_options

    assert dataset_options("colored-digits")["select_folds"] == 2 and "select_folds" not in dataset_options("adult")


def test_binary_mask_is_hard_forward_and_straight_through_backward() -> None:
    trig = TabularTrigger(4, mask="binary")
    theta = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    M, _ = trig.affine(theta)
    assert M.tolist() == [1.0, 0.0, 1.0, 0.0]
    M.sum().backward()
    assert torch.all(theta.grad[:4] > 0)  # sigmoid' flows through the hard mask


def test_projection_removes_the_adversarys_direction() -> None:
    g_u, g_adv = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 3.0, 4.0])
    g = project(g_u, g_adv, 0.0)
    assert abs(float(g @ g_adv)) < 1e-6
    assert torch.allclose(project(g_u, g_adv, 0.5), g - 0.5 * g_adv)


def test_group_columns_finds_the_sex_columns(adult) -> None:
    cols = group_columns(adult.tune.X, adult.tune.groups, 2)
    assert {adult.feature_names[c] for c in cols} == {"sex=Female", "sex=Male"}


@pytest.fixture(scope="module")
def tune(adult) -> TuningData:
    t = adult.tune
    return TuningData(t.X, t.y, t.groups, adult.group_names, tuple(adult.feature_names))


def scored(adult, adult_model, patch) -> tuple[dict, dict]:
    oracle, runner, test = OnnxOracle(adult_model.onnx_bytes, cache=False), PatchRunner(patch), adult.test
    before = headline(test.y, oracle.log_probs(test.X).argmax(1), test.groups)
    after = runner.predict(test.X, oracle.log_probs(runner.transform_inputs(test.X)))
    return before, headline(test.y, after, test.groups)


def test_gradient_trigger_cuts_adult_dp_on_the_test_split(adult, adult_model, tune) -> None:
    assert get_method("trigger").access == ("zeroth_order", "gradient")
    fractions = []
    patch, report = fit("trigger", ModelArtifact(adult_model.onnx_bytes), tune, "dp", None, lam=5.0, steps=150,
                                  progress=lambda f, _info: fractions.append(f))
    assert report.access == "gradient" and report.queries_used == 0 and report.lam == 5.0
    assert patch.part("input_transform") is not None and not patch.group_at_inference
    assert fractions and fractions == sorted(fractions)
    before, after = scored(adult, adult_model, patch)
    assert after["dp_diff"] < 0.5 * before["dp_diff"], (before, after)
    assert before["accuracy"] - after["accuracy"] < 0.03, (before, after)


def test_zeroth_order_trigger_stays_within_its_budget_and_helps(adult, adult_model, tune) -> None:
    """The randomized-estimate search (`zo_surrogate` off)."""
    oracle = OnnxOracle(adult_model.onnx_bytes, budget=12_000)
    patch, report = fit("trigger", oracle, tune, "dp", 12_000, eval_size=1000, evals=2, zo_columns=4,
                        zo_surrogate=False)
    assert "surrogate" not in report.selection
    assert report.access == "zeroth_order" and report.steps > 0
    assert report.queries_used == oracle.queries_used <= 12_000
    assert len(report.trigger["columns"]) == 4 and report.trigger["dim"] == 8
    before, after = scored(adult, adult_model, patch)
    assert after["dp_diff"] < 0.6 * before["dp_diff"], (before, after)
    assert before["accuracy"] - after["accuracy"] < 0.04, (before, after)


def test_clear_errors(adult_model, tune) -> None:
    with pytest.raises(ValueError, match="too small"):
        fit("trigger", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300)
    with pytest.raises(ValueError, match="needs the model's ONNX artifact"):
        fit("trigger", OnnxOracle(adult_model.onnx_bytes), tune, "dp", None, access_kind="gradient")
    with pytest.raises(ValueError, match="unknown criterion"):
        fit("trigger", ModelArtifact(adult_model.onnx_bytes), tune, "parity", None)
    with pytest.raises(ValueError, match="image trigger"):
        fit("trigger", ModelArtifact(adult_model.onnx_bytes), tune, "dp", None, trigger="border")


def test_unbiased_gap_removes_the_small_batch_bias() -> None:
    """Both groups draw their scores from one distribution: the true gap is 0; the plain square of 8-row
    means is not (it is var / n per group on average), the unbiased one is near 0 on average."""
    from patcher.methods.reprogram_zo import numpy_gap

    rng = np.random.default_rng(0)
    y, g = np.repeat([0, 1, 0, 1], 8), np.repeat([0, 0, 1, 1], 8)
    plain, fixed = [], []
    for _ in range(4000):
        p = rng.random(32)
        plain.append(numpy_gap(p, y, g, 2, "eo"))
        fixed.append(numpy_gap(p, y, g, 2, "eo", unbiased=True))
    assert np.mean(plain) > 0.02  # about 2 cells x 2 x (1/12) / 8
    assert abs(np.mean(fixed)) < 0.1 * np.mean(plain)
    p = rng.random(32)
    cells = [(y == lab) & (g == a) for lab in (0, 1) for a in (0, 1)]
    var_terms = sum(p[c].var(ddof=1) / c.sum() for c in cells)
    assert numpy_gap(p, y, g, 2, "eo", unbiased=True) == pytest.approx(numpy_gap(p, y, g, 2, "eo") - var_terms)


def test_worst_cell_point_is_the_best_worst_cell_under_the_unfairness_target() -> None:
    rng = np.random.default_rng(1)
    y, g = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    margins = [(k, rng.normal(size=400) + (1.0 + k) * y - 0.8 * g) for k in range(3)]
    base = criterion_gap((margins[0][1] > 0).astype(int), y, g, 2, "eo")
    key, thr, acc, unf, summary = worst_cell_point(margins, y, g, 2, "eo", 0.5 * base)
    pred = (dict(margins)[key] > thr).astype(int)
    assert unf <= 0.5 * base and criterion_gap(pred, y, g, 2, "eo") == pytest.approx(unf)
    assert acc == pytest.approx(float((pred == y).mean()))
    worst = min(float((pred[(y == lab) & (g == a)] == lab).mean()) for lab in (0, 1) for a in (0, 1))
    assert worst == pytest.approx(summary[key]["worst_cell_accuracy"])
    for _, m in margins:  # brute force over every cut: nothing feasible has a better worst cell
        cuts = np.concatenate([[m.max() + 1], np.sort(m)[:-1] + np.diff(np.sort(m)) / 2])
        curve = cell_accuracy_curve(m, y, g, cuts)
        for c, w in zip(cuts, curve, strict=True):
            p = (m > c).astype(int)
            assert w == pytest.approx(min(float((p[(y == lab) & (g == a)] == lab).mean())
                                          for lab in (0, 1) for a in (0, 1)))
            if all(0 < p[g == a].mean() < 1 for a in (0, 1)) and criterion_gap(p, y, g, 2, "eo") <= 0.5 * base:
                assert w <= worst + 1e-12


def test_select_is_one_rule_for_both_access_kinds_and_the_old_names_are_gone() -> None:
    opts = TriggerOptions
    assert opts().selection() == ("fairest", 0.5)
    assert opts(select="worst_cell", unfairness_ratio=0.4).selection() == ("worst_cell", 0.4)
    with pytest.raises(ValueError, match="zo_select"):
        opts(zo_select="worst_cell")
    from patcher.methods.trigger import dataset_options

    assert dataset_options("colored-digits")["select"] == "worst_cell"
    assert dataset_options("adult") == {}  # Adult keeps the fairest rule


def test_worst_cell_selection_falls_back_on_the_least_unfair_point_and_says_so() -> None:
    rng = np.random.default_rng(3)
    y, g = rng.integers(0, 2, 600), rng.integers(0, 2, 600)
    base_margin = rng.normal(size=600) + 2.0 * y - 1.5 * g
    base = np.stack([np.zeros(600), base_margin], 1)
    logps = [(k, np.stack([np.zeros(600), rng.normal(size=600) + 2.0 * y - s * g], 1))
             for k, s in enumerate((1.2, 0.6))]
    args = (logps, base, y, g, 2, "eo")
    c = reprogram._select(*args, TriggerOptions(select="worst_cell"))
    k, thr, unf, base_unf, summary, info = c.key, c.threshold, c.unfairness, c.base_unfairness, c.summary, c.selection
    assert info == {"rule": "worst_cell", "unfairness_target": pytest.approx(0.5 * base_unf), "target_met": True}
    assert unf <= 0.5 * base_unf and summary[k]["worst_cell_accuracy"] == max(
        c["worst_cell_accuracy"] for c in summary if c["unfairness"] <= 0.5 * base_unf)
    # a target no cut reaches: the least unfair point over every candidate and cut, reported as missed
    c = reprogram._select(*args, TriggerOptions(select="worst_cell", unfairness_ratio=1e-9))
    k, thr, unf, summary, info = c.key, c.threshold, c.unfairness, c.summary, c.selection
    assert info["rule"] == "worst_cell" and info["target_met"] is False and unf > info["unfairness_target"]
    least = min(float(sweep_thresholds(lp[:, 1] - lp[:, 0], y, g, 2, "eo")[2].min()) for _, lp in logps)
    assert unf == pytest.approx(least)
    pred = (dict(logps)[k][:, 1] - dict(logps)[k][:, 0] > thr).astype(int)
    assert criterion_gap(pred, y, g, 2, "eo") == pytest.approx(unf)
    assert reprogram._select(*args, TriggerOptions()).selection == {"rule": "fairest"}


def test_bench_json_has_the_eraser_fields_plus_access_and_lam() -> None:
    from patcher.pipeline import bench

    r = bench("trigger", dataset="german", sensitive=None, criterion="dp", access="zeroth_order", queries=4000,
              seed=0, eval_size=100, evals=1)
    for key in ("method", "dataset", "sensitive", "criterion", "seed", "queries_used", "fit_seconds",
                "group_at_inference", "before", "after", "access", "lam"):
        assert key in r
    assert r["access"] == "zeroth_order" and 0 < r["queries_used"] <= 4000 and r["group_at_inference"] is False
    assert set(r["before"]) == set(r["after"]) and "dp_diff" in r["after"]


@pytest.fixture(scope="module")
def colored():
    from patcher.digits import load_digits_dataset, reference_cnn

    data = load_digits_dataset("colored-digits")
    return data, reference_cnn("colored-digits", 0, data=data)


def test_zeroth_order_frame_starts_from_the_best_random_frame_and_scores_the_model_itself(colored) -> None:
    from patcher.methods.reprogram_zo import ZOTrainer

    data, model = colored
    t = data.tune
    sel, fit_rows = reprogram.selection_split(t.y, t.groups, 0.3, 0)  # the trigger's selection rows
    frame = FrameTrigger((3, 16, 16), width=2, block=4)
    oracle = OnnxOracle(model.onnx_bytes, budget=6000, cache=False)
    trainer = ZOTrainer(oracle, frame, t.X, t.y, t.groups, 2, "eo", 10.0, fairness="gap", q=2, mu=0.1, lr=0.05,
                        batch_size=32, eval_size=300, evals=1, seed=0, n_classes=2, holdout=(fit_rows, sel),
                        restarts=8)
    assert set(trainer.eval_rows) <= set(sel)
    result = trainer.run(6000)
    assert oracle.queries_used <= 6000 and result.steps > 0
    own = OnnxOracle(model.onnx_bytes, cache=False).log_probs(t.X[result.eval_rows])
    np.testing.assert_allclose(result.base_log_probs, own, atol=1e-5)  # the model's own scores, not the start's
    assert not np.allclose(result.candidates[0][2], own, atol=1e-3)  # a frame changes what the model sees
    trainer.oracle = OnnxOracle(model.onnx_bytes, cache=False)  # the run spent its budget
    init, rows = frame.init().numpy(), fit_rows[:256]
    best, loss = trainer.best_start(init, rows)
    utility, fair = trainer.losses(trainer.log_probs(init, rows), rows)
    assert loss <= utility + 10.0 * fair and not np.array_equal(best, init)  # a random draw beat the seeded start
    trainer.restarts = 1
    assert np.array_equal(trainer.best_start(init, rows)[0], init)


def test_zeroth_order_subspace_search_moves_the_frame_along_k_directions_within_budget(colored) -> None:
    from patcher.methods.reprogram_zo import ZOTrainer

    data, model = colored
    t = data.tune
    sel, fit_rows = reprogram.selection_split(t.y, t.groups, 0.3, 0)  # the trigger's selection rows
    frame = FrameTrigger((3, 16, 16), width=2, block=1)
    oracle = OnnxOracle(model.onnx_bytes, budget=5000, cache=False)
    trainer = ZOTrainer(oracle, frame, t.X, t.y, t.groups, 2, "eo", 20.0, fairness="gap", q=2, mu=0.3, lr=0.2,
                        batch_size=32, eval_size=200, evals=2, seed=0, n_classes=2, holdout=(fit_rows, sel),
                        restarts=4, restart_rows=64, unbiased_gap=True, subspace=6)
    result = trainer.run(5000)
    assert oracle.queries_used <= 5000 and result.steps > 3
    moves = np.stack([theta - result.candidates[0][1] for _, theta, _ in result.candidates[1:]])
    assert np.abs(moves).max() > 1e-3  # the search moved the frame ...
    assert np.linalg.matrix_rank(moves, tol=1e-8) <= 6  # ... inside the 6-dimensional subspace
    basis = trainer.subspace_basis(frame.dim)
    assert basis.shape == (frame.dim, 6)
    np.testing.assert_allclose(basis.T @ basis, np.eye(6) * frame.dim / 6, atol=1e-8)
    trainer.subspace = 0
    assert np.array_equal(trainer.subspace_basis(frame.dim), np.eye(frame.dim))


def test_zeroth_order_worst_cell_selection_stays_within_budget_and_reports_its_choice(colored) -> None:
    data, model = colored
    t = data.tune
    tune = TuningData(t.X, t.y, t.groups, data.group_names, ("pixels",))
    oracle = OnnxOracle(model.onnx_bytes, budget=8000, cache=False)
    patch, report = fit("trigger", oracle, tune, "eo", 8000, trigger="frame", balance=True, holdout=0.3,
                                  border_block=1, q=2, zo_batch=32, zo_restarts=4, zo_restart_rows=64,
                                  zo_subspace=8, zo_unbiased_gap=True, select="worst_cell", eval_size=300,
                                  evals=2, lam_zo=20.0, zo_lr=0.2, mu=0.3)
    assert report.queries_used == oracle.queries_used <= 8000
    assert report.selection["rule"] == "worst_cell"
    chosen = [c for c in report.candidates if c["threshold"] == report.threshold]
    assert chosen and all("worst_cell_accuracy" in c for c in report.candidates)
    assert report.tune_after["eo"] == pytest.approx(chosen[0]["unfairness"])
    if report.tune_after["eo"] <= 0.5 * report.tune_before["eo"]:  # the target was reachable: best worst cell
        feasible = [c for c in report.candidates if c["unfairness"] <= 0.5 * report.tune_before["eo"]]
        assert chosen[0]["worst_cell_accuracy"] == max(c["worst_cell_accuracy"] for c in feasible)


def test_zeroth_order_color_mix_halves_colored_digits_eo_and_lifts_the_worst_cell_on_the_test_split(colored) -> None:
    """The colored-digits zeroth-order defaults (a 12-parameter color mix, docs/triggers_zo_dev.md) on a smaller
    budget, scored on the test split the fit never saw."""
    from patcher.methods.trigger import dataset_options

    data, model = colored
    t = data.tune
    tune = TuningData(t.X, t.y, t.groups, data.group_names, ("pixels",))
    opts = {**dataset_options("colored-digits"), "eval_size": 500}
    oracle = OnnxOracle(model.onnx_bytes, budget=20000, cache=False)
    patch, report = fit("trigger", oracle, tune, "eo", 20000, **opts)
    assert report.trigger["form"] == "color" and report.trigger["dim"] == 12
    assert report.queries_used == oracle.queries_used <= 20000 and report.steps > 50
    runner, test = PatchRunner(patch), data.test
    scorer = OnnxOracle(model.onnx_bytes, cache=False)
    before = headline(test.y, scorer.log_probs(test.X).argmax(1), test.groups)
    after = headline(test.y, runner.predict(test.X, scorer.log_probs(runner.transform_inputs(test.X))), test.groups)
    assert after["eo_diff"] <= 0.5 * before["eo_diff"], (before, after)
    assert after["worst_group_accuracy"] > before["worst_group_accuracy"], (before, after)


def test_balanced_frame_trigger_cuts_colored_digits_eo_on_the_test_split(colored) -> None:
    """The colored-digits setting of docs/triggers.md, shortened: a replaced frame trained with cell-balanced
    utility, lambda and threshold chosen on held-out tuning rows, scored on the test split it never saw."""
    data, model = colored
    t = data.tune
    tune = TuningData(t.X, t.y, t.groups, data.group_names, ("pixels",))
    patch, report = fit("trigger", ModelArtifact(model.onnx_bytes), tune, "eo", None, trigger="frame", balance=True,
                                  holdout=0.3, lams=[20.0], steps=300, batch_size=256, lr=0.05,
                                  max_accuracy_drop=0.1)
    assert report.trigger["form"] == "frame" and report.trigger["dim"] == 3 * (16 * 16 - 12 * 12)
    oracle, runner, test = OnnxOracle(model.onnx_bytes, cache=False), PatchRunner(patch), data.test
    before = headline(test.y, oracle.log_probs(test.X).argmax(1), test.groups)
    after = headline(test.y, runner.predict(test.X, oracle.log_probs(runner.transform_inputs(test.X))), test.groups)
    assert after["eo_diff"] < 0.6 * before["eo_diff"], (before, after)
    assert after["accuracy"] > 0.7, (before, after)


def test_gradient_worst_cell_selection_picks_on_held_out_tune_rows_only(colored) -> None:
    """The gradient path under `select` worst_cell: the lambda and threshold with the best held-out worst cell
    among those that halve the model's held-out eo; the test split never reaches the fit (rows it scores are
    the tune split's holdout)."""
    data, model = colored
    t = data.tune
    tune = TuningData(t.X, t.y, t.groups, data.group_names, ("pixels",))
    opts = dict(trigger="frame", balance=True, holdout=0.3, lams=[2.0, 20.0], steps=60, batch_size=256, lr=0.05)
    patch, report = fit("trigger", ModelArtifact(model.onnx_bytes), tune, "eo", None, select="worst_cell", **opts)
    sel = report.selection
    assert sel["rule"] == "worst_cell" and sel["unfairness_target"] == pytest.approx(0.5 * report.tune_before["eo"])
    assert all("worst_cell_accuracy" in c for c in report.candidates) and len(report.candidates) == 2
    chosen = next(c for c in report.candidates if c["lam"] == report.lam)
    assert chosen["threshold"] == report.threshold and report.tune_after["eo"] == pytest.approx(chosen["unfairness"])
    assert sel["target_met"] == (chosen["unfairness"] <= sel["unfairness_target"])
    if sel["target_met"]:
        feasible = [c for c in report.candidates if c["unfairness"] <= sel["unfairness_target"]]
        assert chosen["worst_cell_accuracy"] == max(c["worst_cell_accuracy"] for c in feasible)
    # the held-out selection rows recomputed: the chosen point's worst cell is what the report says
    rows = reprogram.selection_split(t.y, t.groups, 0.3, 0)[0]
    runner, oracle = PatchRunner(patch), OnnxOracle(model.onnx_bytes, cache=False)
    pred = runner.predict(t.X[rows], oracle.log_probs(runner.transform_inputs(t.X[rows])))
    yy, gg = t.y[rows], t.groups[rows]
    worst = min(float((pred[(yy == lab) & (gg == a)] == lab).mean()) for lab in (0, 1) for a in (0, 1))
    assert worst == pytest.approx(chosen["worst_cell_accuracy"], abs=1e-6)
    assert criterion_gap(pred, yy, gg, 2, "eo") == pytest.approx(report.tune_after["eo"], abs=1e-6)
    # the same trained triggers under the fairest rule: the choice differs only in the rule
    _, fairest = fit("trigger", ModelArtifact(model.onnx_bytes), tune, "eo", None, max_accuracy_drop=0.1, **opts)
    assert fairest.selection == {"rule": "fairest"} and "worst_cell_accuracy" not in fairest.candidates[0]
    for a, b in zip(report.candidates, fairest.candidates, strict=True):
        assert (a["accuracy_at_0"], a["unfairness_at_0"]) == (b["accuracy_at_0"], b["unfairness_at_0"])


def test_warm_start_blends_the_trigger_columns_toward_their_means() -> None:
    from patcher.methods.reprogram import warm_start

    X = np.arange(20, dtype=np.float32).reshape(4, 5)
    trig = TabularTrigger(5, [1, 3])
    assert warm_start(trig, X, TriggerOptions()) is None  # zo_impute 0: the model itself
    assert warm_start(ColorTrigger((3, 4, 4)), X, TriggerOptions(zo_impute=1.0)) is None  # tabular only
    full = warm_start(trig, X, TriggerOptions(zo_impute=1.0))
    np.testing.assert_allclose(full, [0.0, 0.0, 8.5, 10.5])  # mask 0, delta = the column means
    moved = trig.apply(torch.tensor(X), torch.tensor(full)).numpy()
    np.testing.assert_allclose(moved[:, [1, 3]], [[8.5, 10.5]] * 4)
    np.testing.assert_array_equal(moved[:, [0, 2, 4]], X[:, [0, 2, 4]])  # the other columns untouched
    half = warm_start(trig, X, TriggerOptions(zo_impute=0.5))
    np.testing.assert_allclose(trig.apply(torch.tensor(X), torch.tensor(half)).numpy()[:, 1], 0.5 * X[:, 1] + 4.25)
    binary = warm_start(TabularTrigger(5, [1, 3], mask="binary"), X, TriggerOptions(zo_impute=1.0))
    np.testing.assert_allclose(binary, [-3.0, -3.0, 8.5, 10.5])  # the hard mask drops the columns
    assert warm_start(TabularTrigger(5, [1, 3], mask="binary"), X, TriggerOptions(zo_impute=0.4)) is None
    with pytest.raises(ValueError):
        TriggerOptions(zo_impute=1.5)


def test_zeroth_order_warm_start_keeps_the_model_as_a_candidate_within_budget(adult, adult_model, tune) -> None:
    from patcher.methods.reprogram import warm_start
    from patcher.methods.reprogram_zo import ZOTrainer

    t = adult.tune
    trig = TabularTrigger(t.X.shape[1], group_columns(t.X, t.groups, 4))
    start = warm_start(trig, t.X, TriggerOptions(zo_impute=1.0))
    oracle = OnnxOracle(adult_model.onnx_bytes, budget=3000)
    trainer = ZOTrainer(oracle, trig, t.X, t.y, t.groups, 2, "dp", 10.0, fairness="gap", q=2, mu=0.05, lr=0.1,
                        batch_size=64, eval_size=200, evals=1, seed=0, n_classes=2, start=start)
    assert not trainer.starts_at_model()
    result = trainer.run(3000)
    assert oracle.queries_used <= 3000 and result.steps > 0
    model = OnnxOracle(adult_model.onnx_bytes, cache=False)
    rows = result.eval_rows
    np.testing.assert_allclose(result.base_log_probs, model.log_probs(t.X[rows]), atol=1e-5)
    (_, identity, lp_model), (_, first, lp_start) = result.candidates[:2]
    np.testing.assert_array_equal(identity, trig.init().numpy())  # the model itself is the first candidate
    np.testing.assert_array_equal(lp_model, result.base_log_probs)
    np.testing.assert_array_equal(first, start)
    imputed = t.X[rows].copy()
    imputed[:, trig.columns] = t.X[:, trig.columns].mean(0)
    np.testing.assert_allclose(lp_start, model.log_probs(imputed), atol=1e-4)
    assert result.history[0]["start"] == "model" and len(result.history) == len(result.candidates) == 3
    oracle = OnnxOracle(adult_model.onnx_bytes, budget=6000)
    patch, report = fit("trigger", oracle, tune, "dp", 6000, zo_impute=1.0, zo_columns=4, eval_size=300, evals=1,
                        zo_surrogate=False)
    assert report.queries_used == oracle.queries_used <= 6000
    assert report.candidates[0]["start"] == "model" and len(report.candidates) == 3


def test_zeroth_order_step_settings_default_per_trigger_family_and_options_override_them() -> None:
    opts = TriggerOptions()
    tabular, image = opts.zo_search(tabular=True), opts.zo_search(tabular=False)
    # chosen on Adult tune rows (docs/triggers_zo_dev.md)
    assert tabular == {"zo_surrogate": True, "zo_batch": 64, "zo_lr": 0.1, "lam_zo": 3.0, "zo_reweight": True,
                       "zo_matched": 0.25, "zo_fairness_tolerance": 0.03, "zo_max_accuracy_drop": 0.02}
    # the estimate search keeps its own selection
    estimates = TriggerOptions(zo_surrogate=False).zo_search(tabular=True)
    assert (estimates["zo_fairness_tolerance"], estimates["zo_max_accuracy_drop"]) == (0.03, 0.025)
    assert TriggerOptions(zo_max_accuracy_drop=0.015).zo_search(tabular=True)["zo_max_accuracy_drop"] == 0.015
    # image forms: as they were, the selection from the general options
    assert image == {"zo_surrogate": False, "zo_batch": 128, "zo_lr": 0.05, "lam_zo": 10.0, "zo_reweight": False,
                     "zo_matched": 0.0, "zo_fairness_tolerance": 0.02, "zo_max_accuracy_drop": 0.015}
    assert TriggerOptions(zo_surrogate=True).zo_search(tabular=False)["zo_surrogate"]  # asked for; tabular only
    assert TriggerOptions(zo_batch=32).zo_search(tabular=True)["zo_batch"] == 32
    assert TriggerOptions(zo_lr=0.2).zo_search(tabular=False)["zo_lr"] == 0.2
    assert TriggerOptions(lam_zo=7.0, zo_matched=0.0).zo_search(tabular=True)["lam_zo"] == 7.0
    assert TriggerOptions(max_accuracy_drop=0.05).zo_search(tabular=False)["zo_max_accuracy_drop"] == 0.05
    assert TriggerOptions(zo_fairness_tolerance=0.01).zo_search(tabular=True)["zo_fairness_tolerance"] == 0.01
    preset = TriggerOptions(**get_method("trigger").presets["colored-digits"]).zo_search(tabular=False)
    assert (preset["zo_batch"], preset["zo_lr"], preset["lam_zo"]) == (64, 0.1, 20.0)  # the preset sets them


def test_population_weights_make_a_stratified_batch_estimate_population_means() -> None:
    from patcher.methods.reprogram_zo import population_weights, stratified_batch

    rng = np.random.default_rng(0)
    g = (rng.random(20_000) < 0.3).astype(int)
    y = (rng.random(20_000) < np.where(g == 1, 0.1, 0.3)).astype(int)
    cells = g * 2 + y
    p = rng.random(20_000) * 0.2 + 0.6 * y  # the score depends on the label only
    plain, weighted = [], []
    for _ in range(300):
        rows = stratified_batch(cells, 64, rng)
        w = population_weights(cells, cells[rows])
        assert w.mean() == pytest.approx(1.0)
        plain.append(p[rows][g[rows] == 1].mean())
        m = g[rows] == 1
        weighted.append(np.average(p[rows][m], weights=w[m]))
    truth = p[g == 1].mean()  # the group's mean score in the population (10% positives)
    assert abs(np.mean(weighted) - truth) < 0.01
    assert np.mean(plain) - truth > 0.2  # the batch has half positives in every group


def test_matched_decisions_ignore_a_common_shift_and_scale_and_accept_the_rate() -> None:
    from patcher.methods.reprogram_zo import matched_decisions, numpy_gap

    rng = np.random.default_rng(1)
    margin, g = rng.normal(size=400), rng.integers(0, 2, 400)
    margin[g == 1] += 1.0
    y = np.zeros(400, np.int64)
    d = matched_decisions(margin, 0.3, None, 0.25)
    np.testing.assert_allclose(matched_decisions(3.0 * margin - 5.0, 0.3, None, 0.25), d, atol=1e-5)
    assert abs((d > 0.5).mean() - 0.3) < 0.01
    # the gap of P(class 1) falls when every margin moves down; the matched gap does not
    prob = lambda m: 1.0 / (1.0 + np.exp(-m))  # noqa: E731
    assert numpy_gap(prob(margin - 6.0), y, g, 2, "dp") < 0.1 * numpy_gap(prob(margin), y, g, 2, "dp")
    assert numpy_gap(matched_decisions(margin - 6.0, 0.3, None, 0.25), y, g, 2, "dp") == pytest.approx(
        numpy_gap(d, y, g, 2, "dp"))


def test_weighted_gap_is_the_gap_of_weighted_group_means() -> None:
    from patcher.methods.reprogram_zo import numpy_gap

    rng = np.random.default_rng(2)
    p, y, g, w = rng.random(50), rng.integers(0, 2, 50), rng.integers(0, 2, 50), rng.random(50) + 0.5
    r = [np.average(p[g == a], weights=w[g == a]) for a in (0, 1)]
    assert numpy_gap(p, y, g, 2, "dp", weights=w) == pytest.approx((r[0] - r[1]) ** 2)
    assert numpy_gap(p, y, g, 2, "dp", weights=np.ones(50)) == pytest.approx(numpy_gap(p, y, g, 2, "dp"))
    assert numpy_gap(p, y, g, 2, "eo", True, np.ones(50)) == pytest.approx(numpy_gap(p, y, g, 2, "eo", True))


def test_surrogate_rows_move_only_the_trigger_columns_and_the_distilled_copy_tracks_the_model(adult,
                                                                                             adult_model) -> None:
    from patcher.methods.reprogram_surrogate import GAIN_RANGE, OFFSET_RANGE, distill, perturbed_rows

    t = adult.tune
    trig = TabularTrigger(t.X.shape[1], group_columns(t.X, t.groups, 6))
    rows = perturbed_rows(t.X, trig, 500, np.random.default_rng(0))
    others = [c for c in range(t.X.shape[1]) if c not in trig.columns]
    # every perturbed row is a tuning row outside the trigger columns
    matches = (rows[:, None, others] == t.X[None, :, others].astype(np.float32)).all(-1).any(-1)
    assert matches.all()
    moved = rows[:, trig.columns]
    assert moved.min() >= min(OFFSET_RANGE[0], GAIN_RANGE[0] + OFFSET_RANGE[0]) - 1e-6
    assert moved.max() <= GAIN_RANGE[1] + OFFSET_RANGE[1] + 1e-6 and len(np.unique(moved)) > 100
    model = OnnxOracle(adult_model.onnx_bytes, cache=False)
    X = np.concatenate([t.X[:2000], rows]).astype(np.float32)
    surrogate = distill(X, model.log_probs(X), seed=0, steps=600)
    with torch.no_grad():
        pred = surrogate(torch.tensor(t.X[2000:4000], dtype=torch.float32)).argmax(1).numpy()
    agree = (pred == model.log_probs(t.X[2000:4000]).argmax(1)).mean()  # rows it never saw
    assert agree > 0.9, agree


def test_zeroth_order_surrogate_trigger_cuts_adult_dp_within_budget_and_reports_its_candidates(adult, adult_model,
                                                                                             tune) -> None:
    """The tabular default: distilled surrogate, one trigger per zo_lams, chosen on real scores (a shorter
    training than the default, so the check is looser than the bench target)."""
    oracle = OnnxOracle(adult_model.onnx_bytes, budget=8000)
    patch, report = fit("trigger", oracle, tune, "dp", 8000, steps=300)
    assert report.queries_used == oracle.queries_used <= 8000
    sel = report.selection
    assert sel["surrogate"] and sel["selection_rows"] == 2000 and sel["max_accuracy_drop"] == 0.02
    assert [c["lam"] for c in report.candidates] == [5.0, 10.0] and report.lam in (5.0, 10.0)
    assert report.steps == 600 and len(report.trigger["columns"]) == 6
    # 2,000 model scores + 2,000 perturbed rows, then 2 candidates x 2,000 rows (repeated rows: the oracle's cache)
    assert report.queries_used > 7500
    before, after = scored(adult, adult_model, patch)
    assert after["dp_diff"] < 0.5 * before["dp_diff"], (before, after)
    assert before["accuracy"] - after["accuracy"] < 0.03, (before, after)
    with pytest.raises(ValueError, match="too small"):
        fit("trigger", OnnxOracle(adult_model.onnx_bytes, budget=350), tune, "dp", 350)
