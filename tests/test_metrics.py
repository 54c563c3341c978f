"""Tests for patcher.metrics: hand-computed values, agreement with Fairlearn and AIF360, edge cases,
bootstrap CIs."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn import metrics as flm
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from patcher import metrics as M

# aif360 logs optional-dependency notices (tensorflow, inFairness, ot) at import; they are noise here.
logging.getLogger().setLevel(logging.ERROR)
from aif360 import sklearn as _aif_sk  # noqa: E402, F401  (import order: silence the logger first)
from aif360.datasets import BinaryLabelDataset  # noqa: E402
from aif360.metrics import ClassificationMetric  # noqa: E402
from aif360.sklearn import metrics as aifm  # noqa: E402

# The brief's copy of the Adult test split; the package carries an identical one for machines without it.
_SHARED_ADULT = Path("/work/shared/datasets/adult.test.csv.gz")
ADULT = _SHARED_ADULT if _SHARED_ADULT.exists() else Path(M.__file__).parent / "data" / "adult.test.csv.gz"
TOL = 1e-12


# --------------------------------------------------------------------------- fixtures / helpers
# Tiny hand example. Group a: 4 rows, group b: 5 rows.
#   a: y = 1 1 0 0     b: y = 1 1 1 0 0
#      p = 1 0 1 0        p = 1 1 0 0 0
HAND_Y = [1, 1, 0, 0, 1, 1, 1, 0, 0]
HAND_P = [1, 0, 1, 0, 1, 1, 0, 0, 0]
HAND_G = ["a"] * 4 + ["b"] * 5


def random_data(
    seed: int, n_groups: int, n: int = 2000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, hard predictions, scores and unequal-sized groups with group-dependent behaviour."""
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(n_groups, 2.0)) * 0.7 + 0.3 / n_groups
    g = rng.choice(n_groups, size=n, p=sizes / sizes.sum())
    base = 0.2 + 0.5 * g / max(n_groups - 1, 1)
    y = (rng.random(n) < base).astype(int)
    logits = 1.5 * (2 * y - 1) + 0.6 * g - 0.5 + rng.normal(0, 1.2, n)
    s = 1 / (1 + np.exp(-logits))
    return y, (s >= 0.5).astype(int), s, g


@pytest.fixture(scope="module")
def adult_df() -> pd.DataFrame:
    return pd.read_csv(ADULT)


def adult_arrays(df: pd.DataFrame, attr: str = "sex") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (df["income"] == ">50K").to_numpy().astype(int)
    p = (df["education_num"] >= 13).to_numpy().astype(int)  # a deterministic "has a degree" rule
    return y, p, df[attr].to_numpy()


def metric_frame(y, p, g) -> flm.MetricFrame:
    return flm.MetricFrame(
        metrics={
            "selection_rate": flm.selection_rate,
            "tpr": flm.true_positive_rate,
            "fpr": flm.false_positive_rate,
            "fnr": flm.false_negative_rate,
            "tnr": flm.true_negative_rate,
            "accuracy": accuracy_score,
            "count": flm.count,
        },
        y_true=y,
        y_pred=p,
        sensitive_features=g,
    )


def aif_series(y, g) -> pd.Series:
    return pd.Series(np.asarray(y), index=pd.Index(np.asarray(g), name="grp"))


# --------------------------------------------------------------------------- hand-computed values
def test_hand_example_rates_and_differences():
    r = M.fairness_report(HAND_Y, HAND_P, HAND_G, privileged="a")
    a, b = r.by_group["a"], r.by_group["b"]
    # a: SR = 2/4; TPR = 1/2 (one of two positives); FPR = 1/2; FNR = 1/2; TNR = 1/2; acc = 2/4
    assert (a["selection_rate"], a["tpr"], a["fpr"], a["fnr"], a["tnr"], a["accuracy"]) == (
        0.5, 0.5, 0.5, 0.5, 0.5, 0.5,
    )  # fmt: skip
    # b: SR = 2/5; TPR = 2/3; FPR = 0/2; FNR = 1/3; TNR = 2/2; acc = (2 + 2)/5 = 0.8
    assert b["selection_rate"] == pytest.approx(0.4)
    assert b["tpr"] == pytest.approx(2 / 3)
    assert b["fpr"] == 0.0 and b["tnr"] == 1.0
    assert b["fnr"] == pytest.approx(1 / 3)
    assert b["accuracy"] == pytest.approx(0.8)
    assert (a["count"], b["count"]) == (4, 5)
    # overall: SR 4/9; TPR (1+2)/(2+3) = 3/5; FPR (1+0)/(2+2) = 1/4; acc (2+4)/9 = 2/3
    o = r.overall
    assert o["selection_rate"] == pytest.approx(4 / 9)
    assert o["tpr"] == pytest.approx(3 / 5) and o["fpr"] == pytest.approx(1 / 4)
    assert o["accuracy"] == pytest.approx(2 / 3)

    s = r.summary
    assert s["dp_diff"] == pytest.approx(0.1)  # 0.5 - 0.4
    assert s["dp_ratio"] == pytest.approx(0.8)  # 0.4 / 0.5
    assert s["eopp_diff"] == pytest.approx(1 / 6)  # 2/3 - 1/2
    assert s["tprd"] == pytest.approx(1 / 6)
    assert s["eo_diff"] == pytest.approx(0.5)  # max(TPR gap 1/6, FPR gap 1/2 - 0)
    assert s["eo_ratio"] == 0.0  # min(TPR ratio 0.5/(2/3) = 0.75, FPR ratio 0/0.5 = 0)
    assert s["max_fnr"] == pytest.approx(0.5)  # max(1/2, 1/3)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"] == pytest.approx(0.675)  # ½(3/5 + 3/4)
    # cells (a,1) 1/2, (a,0) 1/2, (b,1) 2/3, (b,0) 1 -> min 1/2
    assert s["worst_group_accuracy"] == pytest.approx(0.5)
    # dp_ed = ½(|0.5 - 4/9| + |0.4 - 4/9|) = ½(1/18 + 2/45) = ½(9/90) = 0.05
    assert s["dp_ed"] == pytest.approx(0.05)
    # ED_FPR = ½(|1/2 - 1/4| + |0 - 1/4|) = 1/4; ED_FNR = ½(|1/2 - 2/5| + |1/3 - 2/5|) = ½(1/10 + 1/15) = 1/12
    # eo_ed = ½(1/4 + 1/12) = 1/6
    assert s["eo_ed"] == pytest.approx(1 / 6)
    # AIF360 signs, privileged a: SPD = 0.4 - 0.5; DIR = 0.4/0.5; EOD = 2/3 - 1/2
    # AOD = ½[(0 - 1/2) + (2/3 - 1/2)] = ½(-1/3) = -1/6
    assert s["spd"] == pytest.approx(-0.1)
    assert s["dir"] == pytest.approx(0.8)
    assert s["eod"] == pytest.approx(1 / 6)
    assert s["aod"] == pytest.approx(-1 / 6)
    # difference / ratio tables over groups
    assert r.difference["fpr"] == pytest.approx(0.5)
    assert r.ratio["tpr"] == pytest.approx(0.75)
    assert "count" not in r.difference


def test_hand_example_function_api_matches_report():
    r = M.fairness_report(HAND_Y, HAND_P, HAND_G, privileged="a").summary
    args = (HAND_Y, HAND_P, HAND_G)
    assert M.demographic_parity_difference(*args) == pytest.approx(r["dp_diff"])
    assert M.demographic_parity_ratio(*args) == pytest.approx(r["dp_ratio"])
    assert M.equalized_odds_difference(*args) == pytest.approx(r["eo_diff"])
    assert M.equalized_odds_ratio(*args) == pytest.approx(r["eo_ratio"])
    assert M.equal_opportunity_difference(*args) == pytest.approx(r["eopp_diff"])
    assert M.true_positive_rate_difference(*args) == pytest.approx(r["tprd"])
    assert M.max_false_negative_rate(*args) == pytest.approx(r["max_fnr"])
    assert M.worst_group_accuracy(*args) == pytest.approx(r["worst_group_accuracy"])
    assert M.demographic_parity_ed(*args) == pytest.approx(r["dp_ed"])
    assert M.equalized_odds_ed(*args) == pytest.approx(r["eo_ed"])
    assert M.statistical_parity_difference(*args, "a") == pytest.approx(-0.1)
    assert M.statistical_parity_difference(*args, "b") == pytest.approx(0.1)  # sign flips with privilege
    assert M.disparate_impact_ratio(*args, "a") == pytest.approx(0.8)
    assert M.disparate_impact_ratio(*args, "b") == pytest.approx(1.25)
    assert M.average_odds_difference(*args, "a") == pytest.approx(-1 / 6)
    assert M.signed_equal_opportunity_difference(*args, "a") == pytest.approx(1 / 6)
    assert M.accuracy(HAND_Y, HAND_P) == pytest.approx(2 / 3)
    assert M.balanced_accuracy(HAND_Y, HAND_P) == pytest.approx(0.675)
    rates = M.group_rates(*args)
    assert list(rates) == ["a", "b"]
    assert rates["b"]["tpr"] == pytest.approx(2 / 3)


def test_hand_soft_rates():
    # a: y = 1 0, s = 0.8 0.4 -> SR 0.6, TPR 0.8, FPR 0.4, soft acc ½(0.8 + 0.6) = 0.7
    # b: y = 1 0, s = 0.6 0.2 -> SR 0.4, TPR 0.6, FPR 0.2, soft acc ½(0.6 + 0.8) = 0.7
    y, s, g = [1, 0, 1, 0], [0.8, 0.4, 0.6, 0.2], ["a", "a", "b", "b"]
    r = M.fairness_report(y, s, g, soft=True, privileged="a")
    assert r.by_group["a"]["selection_rate"] == pytest.approx(0.6)
    assert r.by_group["b"]["tpr"] == pytest.approx(0.6)
    assert r.by_group["a"]["fnr"] == pytest.approx(0.2)
    assert r.by_group["a"]["accuracy"] == pytest.approx(0.7)
    assert r.summary["dp_diff"] == pytest.approx(0.2)
    assert r.summary["eo_diff"] == pytest.approx(0.2)  # TPR gap 0.2, FPR gap 0.2
    assert r.summary["spd"] == pytest.approx(-0.2)  # 0.4 - 0.6
    assert r.summary["dir"] == pytest.approx(2 / 3)
    assert r.summary["accuracy"] == pytest.approx(0.7)
    # Soft mode on 0/1 predictions is the hard mode.
    hard = M.fairness_report(HAND_Y, HAND_P, HAND_G).summary
    soft = M.fairness_report(HAND_Y, np.asarray(HAND_P, float), HAND_G, soft=True).summary
    assert soft == pytest.approx(hard)


def test_hand_three_groups_pooled_privileged_set():
    # x: y = 1 0, p = 1 0 | y: y = 1 0, p = 1 1 | z: y = 1 1 0 0, p = 0 1 0 0
    y = [1, 0, 1, 0, 1, 1, 0, 0]
    p = [1, 0, 1, 1, 0, 1, 0, 0]
    g = ["x", "x", "y", "y", "z", "z", "z", "z"]
    # privileged {x, y} pooled: SR 3/4, TPR 2/2, FPR 1/2. unprivileged z: SR 1/4, TPR 1/2, FPR 0
    # SPD = 1/4 - 3/4 = -1/2; DIR = 1/3; EOD = 1/2 - 1 = -1/2; AOD = ½[(0 - 1/2) + (1/2 - 1)] = -1/2
    s = M.fairness_report(y, p, g, privileged=["x", "y"]).summary
    assert s["spd"] == pytest.approx(-0.5)
    assert s["dir"] == pytest.approx(1 / 3)
    assert s["eod"] == pytest.approx(-0.5)
    assert s["aod"] == pytest.approx(-0.5)
    # privileged x only: unprivileged = y ∪ z pooled: SR 3/6, TPR 2/3, FPR 1/3; x: SR 1/2, TPR 1, FPR 0
    # SPD = 0; EOD = 2/3 - 1 = -1/3; AOD = ½[(1/3 - 0) + (-1/3)] = 0
    s = M.fairness_report(y, p, g, privileged="x").summary
    assert s["spd"] == pytest.approx(0.0)
    assert s["eod"] == pytest.approx(-1 / 3)
    assert s["aod"] == pytest.approx(0.0, abs=1e-15)
    # between-group gaps over x, y, z: SR 1/2, 1, 1/4 -> 3/4
    assert s["dp_diff"] == pytest.approx(0.75)


# --------------------------------------------------------------------------- agreement with Fairlearn
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_groups", [2, 3, 5])
def test_matches_fairlearn_random(seed: int, n_groups: int):
    y, p, _, g = random_data(seed, n_groups)
    mf = metric_frame(y, p, g)
    r = M.fairness_report(y, p, g)
    assert r.groups == [str(v) for v in mf.by_group.index]
    for metric in ["selection_rate", "tpr", "fpr", "fnr", "tnr", "accuracy", "count"]:
        ours = np.array([r.by_group[k][metric] for k in r.groups])
        np.testing.assert_allclose(ours, mf.by_group[metric].to_numpy(dtype=float), rtol=0, atol=TOL)
        assert r.overall[metric] == pytest.approx(float(mf.overall[metric]), abs=TOL)
        if metric != "count":
            assert r.difference[metric] == pytest.approx(float(mf.difference()[metric]), abs=TOL)
            assert r.ratio[metric] == pytest.approx(float(mf.ratio()[metric]), abs=TOL)

    kw = {"sensitive_features": g}
    s = r.summary
    assert s["dp_diff"] == pytest.approx(flm.demographic_parity_difference(y, p, **kw), abs=TOL)
    assert s["dp_ratio"] == pytest.approx(flm.demographic_parity_ratio(y, p, **kw), abs=TOL)
    assert s["eo_diff"] == pytest.approx(flm.equalized_odds_difference(y, p, **kw), abs=TOL)
    assert s["eo_ratio"] == pytest.approx(flm.equalized_odds_ratio(y, p, **kw), abs=TOL)
    assert s["eopp_diff"] == pytest.approx(flm.equal_opportunity_difference(y, p, **kw), abs=TOL)
    assert s["tprd"] == pytest.approx(flm.true_positive_rate_difference(y, p, **kw), abs=TOL)
    assert s["max_fnr"] == pytest.approx(float(mf.group_max()["fnr"]), abs=TOL)
    assert s["accuracy"] == pytest.approx(accuracy_score(y, p), abs=TOL)
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p), abs=TOL)
    # worst-group accuracy = Fairlearn's accuracy group_min over (group, label) cells
    cells = flm.MetricFrame(
        metrics=accuracy_score, y_true=y, y_pred=p, sensitive_features=pd.DataFrame({"g": g, "y": y})
    )
    assert s["worst_group_accuracy"] == pytest.approx(float(cells.group_min()), abs=TOL)
    # Fairness Reprogramming's ED metrics = mean over groups of |M_g - M_all|, from Fairlearn's frame
    dev = (mf.by_group - mf.overall).abs().mean()
    assert s["dp_ed"] == pytest.approx(float(dev["selection_rate"]), abs=TOL)
    assert s["eo_ed"] == pytest.approx(0.5 * float(dev["fpr"] + dev["fnr"]), abs=TOL)


@pytest.mark.parametrize("seed", [3, 4])
def test_soft_matches_fairlearn_mean_prediction_and_aif360_generalized_rates(seed: int):
    y, _, s, g = random_data(seed, 3)
    r = M.fairness_report(y, s, g, soft=True)
    mf = flm.MetricFrame(metrics=flm.mean_prediction, y_true=y, y_pred=s, sensitive_features=g)
    ours_sr = np.array([r.by_group[k]["selection_rate"] for k in r.groups])
    np.testing.assert_allclose(ours_sr, mf.by_group.to_numpy(dtype=float), atol=TOL)
    assert r.summary["dp_diff"] == pytest.approx(float(mf.difference()), abs=TOL)
    for k, lab in zip(r.groups, np.unique(g), strict=True):
        m = g == lab
        # AIF360's generalized FPR/FNR are exactly the soft rates: mean score on negatives / 1 - on positives.
        assert r.by_group[k]["fpr"] == pytest.approx(aifm.generalized_fpr(y[m], s[m]), abs=TOL)
        assert r.by_group[k]["fnr"] == pytest.approx(aifm.generalized_fnr(y[m], s[m]), abs=TOL)
    # Soft metrics differ from thresholded ones: this is not the hard path in disguise.
    hard = M.fairness_report(y, (s >= 0.5).astype(int), g).summary
    assert abs(hard["dp_diff"] - r.summary["dp_diff"]) > 1e-3


# --------------------------------------------------------------------------- agreement with AIF360
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_groups", [2, 3, 5])
def test_matches_aif360_sklearn_random(seed: int, n_groups: int):
    y, p, _, g = random_data(seed, n_groups)
    yt = aif_series(y, g)
    for priv in range(n_groups):
        kw = {"prot_attr": "grp", "priv_group": priv}
        s = M.fairness_report(y, p, g, privileged=priv).summary
        assert s["spd"] == pytest.approx(aifm.statistical_parity_difference(yt, p, **kw), abs=TOL)
        assert s["dir"] == pytest.approx(aifm.disparate_impact_ratio(yt, p, **kw), abs=TOL)
        assert s["aod"] == pytest.approx(aifm.average_odds_difference(yt, p, **kw), abs=TOL)
        assert s["eod"] == pytest.approx(aifm.equal_opportunity_difference(yt, p, **kw), abs=TOL)


@pytest.mark.parametrize("seed", [0, 5])
def test_matches_aif360_classification_metric_with_privileged_set(seed: int):
    # AIF360's dataset API with several privileged and unprivileged groups (pooled on each side).
    y, p, _, g = random_data(seed, 4)
    df = pd.DataFrame({"g": g.astype(float), "y": y.astype(float)})
    truth = BinaryLabelDataset(
        df=df, label_names=["y"], protected_attribute_names=["g"], favorable_label=1.0, unfavorable_label=0.0
    )
    pred = truth.copy(deepcopy=True)
    pred.labels = p.reshape(-1, 1).astype(float)
    cm = ClassificationMetric(
        truth, pred, unprivileged_groups=[{"g": 2.0}, {"g": 3.0}], privileged_groups=[{"g": 0.0}, {"g": 1.0}]
    )
    s = M.fairness_report(y, p, g, privileged=[0, 1]).summary
    assert s["spd"] == pytest.approx(cm.statistical_parity_difference(), abs=TOL)
    assert s["dir"] == pytest.approx(cm.disparate_impact(), abs=TOL)
    assert s["aod"] == pytest.approx(cm.average_odds_difference(), abs=TOL)
    assert s["eod"] == pytest.approx(cm.equal_opportunity_difference(), abs=TOL)
    # A numpy array of labels works as the privileged set too.
    assert M.statistical_parity_difference(y, p, g, np.array([0, 1])) == pytest.approx(s["spd"])


# --------------------------------------------------------------------------- real data (Adult)
def test_adult_sex_matches_fairlearn_and_aif360(adult_df: pd.DataFrame):
    y, p, g = adult_arrays(adult_df, "sex")
    r = M.fairness_report(y, p, g, privileged="Male")
    s = r.summary
    kw = {"sensitive_features": g}
    assert r.groups == ["Female", "Male"]
    assert s["dp_diff"] == pytest.approx(flm.demographic_parity_difference(y, p, **kw), abs=TOL)
    assert s["eo_diff"] == pytest.approx(flm.equalized_odds_difference(y, p, **kw), abs=TOL)
    assert s["eopp_diff"] == pytest.approx(flm.equal_opportunity_difference(y, p, **kw), abs=TOL)
    mf = metric_frame(y, p, g)
    for metric in ["selection_rate", "tpr", "fpr", "fnr", "accuracy"]:
        for k in r.groups:
            assert r.by_group[k][metric] == pytest.approx(float(mf.by_group.loc[k, metric]), abs=TOL)
    yt = aif_series(y, g)
    aif = {"prot_attr": "grp", "priv_group": "Male"}
    assert s["spd"] == pytest.approx(aifm.statistical_parity_difference(yt, p, **aif), abs=TOL)
    assert s["dir"] == pytest.approx(aifm.disparate_impact_ratio(yt, p, **aif), abs=TOL)
    assert s["aod"] == pytest.approx(aifm.average_odds_difference(yt, p, **aif), abs=TOL)
    assert s["eod"] == pytest.approx(aifm.equal_opportunity_difference(yt, p, **aif), abs=TOL)
    # Sanity on the data itself: the rule selects women less often (SPD < 0, DIR < 1).
    assert s["spd"] < 0 < s["dp_diff"] and s["dir"] < 1
    assert r.n == len(adult_df) == 16281


def test_adult_race_five_groups(adult_df: pd.DataFrame):
    y, p, g = adult_arrays(adult_df, "race")
    r = M.fairness_report(y, p, g, privileged="White")
    assert len(r.groups) == 5
    mf = metric_frame(y, p, g)
    for metric in ["selection_rate", "tpr", "fpr"]:
        assert r.difference[metric] == pytest.approx(float(mf.difference()[metric]), abs=TOL)
    kw = {"sensitive_features": g}
    assert r.summary["eo_diff"] == pytest.approx(flm.equalized_odds_difference(y, p, **kw), abs=TOL)
    yt = aif_series(y, g)
    aif = {"prot_attr": "grp", "priv_group": "White"}
    assert r.summary["spd"] == pytest.approx(aifm.statistical_parity_difference(yt, p, **aif), abs=TOL)
    assert r.summary["aod"] == pytest.approx(aifm.average_odds_difference(yt, p, **aif), abs=TOL)


# --------------------------------------------------------------------------- edge cases
def _no_positive_group() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # a: y = 1 1 0 0, p = 1 0 1 0 (TPR 1/2, FPR 1/2)
    # b: y = 1 1 1 0, p = 1 1 1 0 (TPR 1,   FPR 0)
    # c: y = 0 0 0,   p = 1 0 0   (no positives: TPR undefined; FPR 1/3)
    y = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0])
    g = np.array(list("aaaabbbbccc"))
    return y, p, g


def test_group_without_positives_is_nan_and_skipped():
    y, p, g = _no_positive_group()
    r = M.fairness_report(y, p, g, privileged="b")
    assert r.by_group["c"]["tpr"] is None and r.by_group["c"]["fnr"] is None  # NaN -> None
    assert r.by_group["c"]["fpr"] == pytest.approx(1 / 3)
    assert r.summary["eopp_diff"] == pytest.approx(0.5)  # TPR gap over a, b only: 1 - 1/2
    assert r.summary["eo_diff"] == pytest.approx(0.5)  # FPR gap 1/2 - 0 = 1/2 too
    assert r.summary["max_fnr"] == pytest.approx(0.5)  # FNR a 1/2, b 0, c undefined
    # worst-group accuracy skips the empty (c, y=1) cell: cells a1 1/2, a0 1/2, b1 1, b0 1, c0 2/3
    assert r.summary["worst_group_accuracy"] == pytest.approx(0.5)
    # Fairlearn's aggregation skips NaN the same way (pandas max/min) when a rate is NaN:
    nan_tpr = {"tpr": lambda yt, yp: yp[yt == 1].mean() if (yt == 1).any() else np.nan}
    mf = flm.MetricFrame(metrics=nan_tpr, y_true=y, y_pred=p, sensitive_features=g)
    assert r.difference["tpr"] == pytest.approx(float(mf.difference()["tpr"]))
    assert r.ratio["tpr"] == pytest.approx(float(mf.ratio()["tpr"]))
    # ... but Fairlearn's own true_positive_rate says 0.0 for c, so its EOpp gap is 1 - 0 = 1:
    fl = flm.equal_opportunity_difference(y, p, sensitive_features=g)
    assert fl == pytest.approx(1.0)
    assert fl != pytest.approx(r.summary["eopp_diff"])


def test_zero_division_zero_reproduces_fairlearn_and_aif360_exactly():
    y, p, g = _no_positive_group()
    kw = {"sensitive_features": g}
    assert M.equal_opportunity_difference(y, p, g, zero_division=0.0) == pytest.approx(
        flm.equal_opportunity_difference(y, p, **kw)
    )
    assert M.equalized_odds_difference(y, p, g, zero_division=0.0) == pytest.approx(
        flm.equalized_odds_difference(y, p, **kw)
    )
    assert M.max_false_negative_rate(y, p, g, zero_division=0.0) == pytest.approx(0.5)
    # AIF360 with c privileged: recall of c is ill-defined and set to 0 (with a warning).
    yt = aif_series(y, g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aif = aifm.equal_opportunity_difference(yt, p, prot_attr="grp", priv_group="c")
    assert M.signed_equal_opportunity_difference(y, p, g, "c", zero_division=0.0) == pytest.approx(aif)
    assert math.isnan(M.signed_equal_opportunity_difference(y, p, g, "c"))
    # DIR with no privileged selections: AIF360 returns 0.0, we NaN unless asked.
    p0 = np.where(g == "c", 0, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aif_dir = aifm.disparate_impact_ratio(yt, p0, prot_attr="grp", priv_group="c")
    assert aif_dir == 0.0
    assert M.disparate_impact_ratio(y, p0, g, "c", zero_division=0.0) == 0.0
    assert math.isnan(M.disparate_impact_ratio(y, p0, g, "c"))


def test_single_group_differences_are_zero():
    y, p = [1, 0, 1, 0, 1], [1, 1, 0, 0, 1]
    r = M.fairness_report(y, p, ["only"] * 5, n_boot=50)
    for key in ["dp_diff", "eo_diff", "eopp_diff", "tprd", "dp_ed", "eo_ed"]:
        assert r.summary[key] == 0.0, key
    assert r.summary["dp_ratio"] == 1.0
    assert all(v == 0.0 for v in r.difference.values())
    assert M.demographic_parity_difference(y, p, [7] * 5) == 0.0
    with pytest.raises(ValueError, match="every group"):
        M.statistical_parity_difference(y, p, ["only"] * 5, "only")


def test_all_zero_selection_ratio_is_nan_like_fairlearn():
    y, p, g = [1, 0, 1, 0], [0, 0, 0, 0], ["a", "a", "b", "b"]
    assert math.isnan(flm.demographic_parity_ratio(y, p, sensitive_features=g))
    assert math.isnan(M.demographic_parity_ratio(y, p, g))
    assert M.demographic_parity_difference(y, p, g) == 0.0


def test_class_absent_balanced_accuracy_like_sklearn():
    y, p = [1, 1, 1, 1], [1, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(y, p)
    assert M.balanced_accuracy(y, p) == pytest.approx(expected) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("y", "p", "g", "match"),
    [
        ([], [], [], "empty input"),
        ([0, 1], [0, 1, 1], ["a", "b", "a"], "same length"),
        ([0, 1, 1], [0, 1, 1], ["a", "b"], "same length"),
        ([0, 1, 2], [0, 1, 1], ["a", "b", "a"], r"y_true must be binary 0/1; found values \[0, 1, 2\]"),
        ([-1, 1, 1], [0, 1, 1], ["a", "b", "a"], r"found values \[-1, 1\]"),
        (["no", "yes", "no"], [0, 1, 1], ["a", "b", "a"], r"found values \['no', 'yes'\]"),
        ([0, 1, 1], [0, 0.7, 1], ["a", "b", "a"], "pass soft=True"),
        ([[0, 1]], [[0, 1]], [["a", "b"]], "must be 1-D"),
    ],
)
def test_invalid_inputs_raise(y, p, g, match):
    with pytest.raises(ValueError, match=match):
        M.fairness_report(y, p, g)


def test_invalid_soft_scores_and_options_raise():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.fairness_report([0, 1], [0.2, 1.3], ["a", "b"], soft=True)
    with pytest.raises(ValueError, match="NaN"):
        M.fairness_report([0, 1], [0.2, np.nan], ["a", "b"], soft=True)
    with pytest.raises(ValueError, match="not found"):
        M.fairness_report([0, 1], [0, 1], ["a", "b"], privileged="z")
    with pytest.raises(ValueError, match="ci must be"):
        M.fairness_report([0, 1], [0, 1], ["a", "b"], ci=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        M.fairness_report([0, 1], [0, 1], ["a", "b"], n_boot=-1)


def test_input_types_bool_pandas_and_mixed_group_labels():
    y, p, g = _no_positive_group()
    base = M.fairness_report(y, p, g).summary
    as_pandas = M.fairness_report(pd.Series(y.astype(bool)), pd.Series(p.astype(float)), pd.Series(g)).summary
    assert as_pandas == base
    as_objects = M.fairness_report(y.astype(object), pd.array(p, dtype="Int64"), g.astype(object)).summary
    assert as_objects == base
    with pytest.raises(ValueError, match=r"found values \[0.0, 1.0, nan\]"):
        M.fairness_report(np.array([0, 1, None], dtype=object), [0, 1, 1], ["a", "b", "a"])
    # Unsortable labels (None beside strings) still work; None is its own group.
    mixed = np.array(["a", None, "a", None], dtype=object)
    r = M.fairness_report([1, 0, 0, 1], [1, 0, 1, 1], mixed)
    assert sorted(r.groups) == ["None", "a"]
    assert r.by_group["None"]["accuracy"] == 1.0 and r.by_group["a"]["accuracy"] == 0.5


def test_report_is_json_serialisable_with_nan_as_null():
    y, p, g = _no_positive_group()
    r = M.fairness_report(y, p, g, privileged=["a", "b"], n_boot=20)
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)  # fails on any NaN/inf left behind
    back = json.loads(text)
    assert back["by_group"]["c"]["tpr"] is None
    assert back["privileged"] == ["a", "b"]
    assert set(back["ci"]) == set(back["summary"])
    assert M.FairnessReport.model_validate_json(r.model_dump_json()) == r


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_contains_point_and_is_deterministic(adult_df: pd.DataFrame):
    y, p, g = adult_arrays(adult_df, "sex")
    r1 = M.fairness_report(y, p, g, privileged="Male", n_boot=400, seed=11)
    r2 = M.fairness_report(y, p, g, privileged="Male", n_boot=400, seed=11)
    r3 = M.fairness_report(y, p, g, privileged="Male", n_boot=400, seed=12)
    assert r1.ci == r2.ci
    assert r1.ci != r3.ci
    assert set(r1.ci) == set(r1.summary)
    for key, point in r1.summary.items():
        lo, hi = r1.ci[key]
        assert lo < point < hi, (key, lo, point, hi)


def test_bootstrap_width_matches_binomial_theory(adult_df: pd.DataFrame):
    # Stratified by group, SR_Female - SR_Male has SE = sqrt(Σ_g SR_g (1 - SR_g) / n_g); a 95% CI
    # is ±1.96 SE wide. The bootstrap must agree to ~10% (sampling error of 4000 replicates ≈ 2%).
    y, p, g = adult_arrays(adult_df, "sex")
    r = M.fairness_report(y, p, g, privileged="Male", n_boot=4000, seed=0)
    se = math.sqrt(
        sum(b["selection_rate"] * (1 - b["selection_rate"]) / b["count"] for b in r.by_group.values())
    )
    lo, hi = r.ci["spd"]
    assert hi - lo == pytest.approx(2 * 1.959964 * se, rel=0.1)
    # and half as wide at 90%: z 1.645 vs 1.960
    lo90, hi90 = M.fairness_report(y, p, g, privileged="Male", n_boot=4000, seed=0, ci=0.9).ci["spd"]
    assert (hi90 - lo90) / (hi - lo) == pytest.approx(1.6449 / 1.95996, rel=0.08)


def test_bootstrap_narrows_with_more_data(adult_df: pd.DataFrame):
    y, p, g = adult_arrays(adult_df, "sex")
    small = M.fairness_report(y[:1500], p[:1500], g[:1500], n_boot=500, seed=0).ci
    full = M.fairness_report(y, p, g, n_boot=500, seed=0).ci
    for key in ["accuracy", "dp_diff", "eo_diff", "balanced_accuracy", "dp_ed"]:
        w_small = small[key][1] - small[key][0]
        w_full = full[key][1] - full[key][0]
        # ~sqrt(16281 / 1500) ≈ 3.3x narrower; ask for at least 2x
        assert w_full < w_small / 2, (key, w_small, w_full)


def test_bootstrap_soft_path_agrees_with_hard_path(adult_df: pd.DataFrame):
    # Hard labels resample cell counts (multinomial); soft scores resample row indices. On 0/1
    # predictions both are the same stratified bootstrap, so the intervals must agree closely.
    y, p, g = adult_arrays(adult_df, "sex")
    hard = M.fairness_report(y, p, g, n_boot=1500, seed=1).ci
    soft = M.fairness_report(y, p.astype(float), g, soft=True, n_boot=1500, seed=2).ci
    for key in ["accuracy", "dp_diff", "eo_diff", "worst_group_accuracy"]:
        w = hard[key][1] - hard[key][0]
        assert soft[key][0] == pytest.approx(hard[key][0], abs=0.1 * w), key
        assert soft[key][1] == pytest.approx(hard[key][1], abs=0.1 * w), key


def test_bootstrap_soft_scores_random():
    y, _, s, g = random_data(7, 3, n=3000)
    r = M.fairness_report(y, s, g, soft=True, n_boot=300, seed=3)
    again = M.fairness_report(y, s, g, soft=True, n_boot=300, seed=3)
    assert r.ci == again.ci
    for key in ["accuracy", "dp_diff", "eo_ed"]:
        lo, hi = r.ci[key]
        assert lo < r.summary[key] < hi


# --------------------------------------------------------------------------- gaps and sweeps methods select on
def test_rate_gap_over_any_number_of_groups_skips_undefined_rates():
    assert M.rate_gap([0.2, 0.5, 0.9, np.nan]) == pytest.approx(0.7)
    assert M.rate_gap([0.3, np.nan]) == 0.0
    assert np.isnan(M.rate_gap([np.nan, np.nan]))
    assert M.rate_gap([0.2, 0.5], signed=True) == pytest.approx(-0.3)
    assert M.rate_gap([0.2, 0.5, 0.4], signed=True) == pytest.approx(0.3)  # no sign beyond two groups
    np.testing.assert_allclose(M.rate_gap(np.array([[0.1, 0.4, 0.2], [0.5, 0.5, 0.5]])), [0.3, 0.0])


@pytest.mark.parametrize("criterion,key", [("dp", "dp_diff"), ("eo", "eo_diff"), ("eopp", "eopp_diff")])
@pytest.mark.parametrize("soft", [False, True])
def test_criterion_gap_is_the_reports_gap_on_hard_and_soft_decisions(criterion, key, soft):
    rng = np.random.default_rng(5)
    y, g = rng.integers(0, 2, 500), rng.integers(0, 4, 500)
    pred = rng.random(500) if soft else rng.integers(0, 2, 500)
    expected = M.fairness_report(y, pred, g, soft=soft).summary[key]
    assert M.criterion_gap(pred, y, g, 4, criterion) == pytest.approx(expected, abs=1e-12)


def test_sweep_every_cut_and_given_cuts_agree_with_the_decisions_themselves():
    rng = np.random.default_rng(6)
    y, g = rng.integers(0, 2, 300), rng.integers(0, 3, 300)
    score = np.round(rng.normal(size=300), 1)  # ties: only cuts between distinct scores are realisable
    every = M.sweep(score, y, g, 3)
    s = every.ordered
    realisable = np.flatnonzero(np.concatenate([[True], s[:-1] > s[1:], [True]]))
    given = M.sweep(score, y, g, 3, cuts=every.cuts[realisable])
    acc_every, acc_given = every.accuracy()[realisable], given.accuracy()
    for criterion in ("dp", "eo", "eopp"):
        gaps = every.gap(criterion)[realisable]
        np.testing.assert_allclose(given.gap(criterion), gaps, atol=1e-12)
        for k, cut in zip(realisable[::7], every.cuts[realisable][::7], strict=True):
            pred = (score > cut).astype(int)
            assert gaps[list(realisable).index(k)] == pytest.approx(M.criterion_gap(pred, y, g, 3, criterion))
    np.testing.assert_allclose(acc_given, acc_every, atol=1e-12)
    cut = every.cuts[realisable[5]]
    assert acc_given[5] == pytest.approx(np.mean((score > cut) == y))


def test_a_weighted_sweep_counts_each_row_by_its_weight():
    rng = np.random.default_rng(7)
    y, g, score = rng.integers(0, 2, 50), rng.integers(0, 2, 50), rng.normal(size=50)
    w = rng.integers(0, 4, (3, 50)).astype(float)
    sw = M.sweep(score, y, g, 2, weights=w)
    assert sw.positive.shape == (3, 51, 2, 2)
    order = np.argsort(-score, kind="stable")
    for k in (0, 10, 33, 50):
        top = order[:k]
        for group in (0, 1):
            for label in (0, 1):
                rows = top[(g[top] == group) & (y[top] == label)]
                np.testing.assert_allclose(sw.positive[:, k, group, label], w[:, rows].sum(1))
    np.testing.assert_allclose(sw.weight, w.sum(1))
