"""FORML on small subsets of the real Adult data: the meta step, the sampler, the weight patch, the audit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from patcher.access import ModelArtifact
from patcher.apply import PatchRunner
from patcher.methods.forml_audit import export_condensed, normalised_weights
from patcher.methods.forml_core import ExemplarSampler, TrainConfig, lookahead, meta_loss
from patcher.methods.forml_core import train as forml_train
from patcher.tuning import TuningData
from tests.conftest import fit

FAST = {"epochs": 2, "batch_size": 128, "exemplar_batch": 128, "min_per_cell": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small(adult):
    """1500 training rows and 600 exemplar rows of real Adult, every (group, label) cell present."""
    rng = np.random.default_rng(0)
    tr = rng.choice(len(adult.train), 1500, replace=False)
    ex = rng.choice(len(adult.tune), 600, replace=False)
    train = TuningData(adult.train.X[tr], adult.train.y[tr], adult.train.groups[tr], adult.group_names)
    exemplar = TuningData(adult.tune.X[ex], adult.tune.y[ex], adult.tune.groups[ex], adult.group_names)
    return train, exemplar


@pytest.fixture(scope="module")
def fitted(small):
    train, exemplar = small
    return fit("forml", None, train, "eopp", None, seed=0, exemplar=exemplar, weight_lr=0.5, **FAST)


def _mlp(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 2))


def test_lookahead_is_a_manual_sgd_step_on_the_softmax_weighted_loss(small):
    train, _ = small
    x, y = torch.tensor(train.X[:64]), torch.tensor(train.y[:64])
    model = _mlp(x.shape[1])
    w = torch.randn(64, generator=torch.Generator().manual_seed(1))
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    ahead = lookahead(model, params, x, y, w.clone().requires_grad_(True), 0.1, reverse_model=False)

    manual = copy.deepcopy(model)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    p = torch.exp(w) / torch.exp(w).sum()  # softmax over the batch, by hand
    (p * nn.functional.cross_entropy(manual(x), y, reduction="none")).sum().backward()
    opt.step()
    for k, v in manual.named_parameters():
        torch.testing.assert_close(ahead[k].detach(), v.detach(), rtol=1e-5, atol=1e-6)

    # softmax per batch: shifting every logit of the batch changes nothing, all-equal logits = the plain mean loss
    shifted = lookahead(model, params, x, y, (w + 3.0).requires_grad_(True), 0.1, False)
    uniform = lookahead(model, params, x, y, torch.zeros(64, requires_grad=True), 0.1, False)
    mean_model = copy.deepcopy(model)
    opt = torch.optim.SGD(mean_model.parameters(), lr=0.1)
    nn.functional.cross_entropy(mean_model(x), y).backward()
    opt.step()
    for k, v in mean_model.named_parameters():
        torch.testing.assert_close(shifted[k], ahead[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(uniform[k].detach(), v.detach(), rtol=1e-5, atol=1e-6)


def test_reverse_model_steps_the_other_way(small):
    train, _ = small
    x, y = torch.tensor(train.X[:32]), torch.tensor(train.y[:32])
    model = _mlp(x.shape[1])
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    w = torch.zeros(32, requires_grad=True)
    down = lookahead(model, params, x, y, w, 0.1, reverse_model=False)
    up = lookahead(model, params, x, y, w, 0.1, reverse_model=True)
    for k, p in params.items():
        torch.testing.assert_close((up[k] - p).detach(), -(down[k] - p).detach())
        assert (down[k] - p).abs().max() > 0


def test_reverse_weights_flips_the_weight_update(small):
    train, exemplar = small
    X, y = train.X[:128], train.y[:128]  # one batch: both runs take the weight step at the same theta
    runs = {}
    for reverse in ("none", "weights"):
        cfg = TrainConfig(epochs=1, batch_size=128, weight_lr=1.0, reverse=reverse, exemplar_batch=128,
                          min_per_cell=8, seed=0)
        net = _mlp(X.shape[1])
        runs[reverse] = forml_train(net, X, y, exemplar.X, exemplar.y, exemplar.groups, 2, cfg).weight_logits
    assert np.abs(runs["none"]).max() > 1e-4
    np.testing.assert_allclose(runs["weights"], -runs["none"], rtol=1e-5, atol=1e-7)


def test_exemplar_sampler_honours_the_minimum_per_group_and_label(adult):
    rng = np.random.default_rng(0)
    rows = rng.choice(len(adult.tune), 400, replace=False)
    g, y = adult.tune.groups[rows], adult.tune.y[rows]
    # make one cell tiny (3 rows): it is drawn with replacement to reach the minimum
    tiny = np.flatnonzero((g == 0) & (y == 1))
    keep = np.setdiff1d(np.arange(400), tiny[3:])
    g, y = g[keep], y[keep]
    sampler = ExemplarSampler(g, y, batch_size=64, min_per_cell=12, seed=0)
    assert len(sampler.cells) == 4
    for _ in range(20):
        idx = sampler.sample()
        assert len(idx) == 64
        counts = np.bincount(g[idx] * 2 + y[idx], minlength=4)
        assert counts.min() >= 12, counts
    # a batch smaller than cells x minimum grows to hold the minimum of every cell
    assert len(ExemplarSampler(g, y, batch_size=10, min_per_cell=12, seed=0).sample()) == 48


def test_meta_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.0], [0.0, 0.2]])
    y = torch.tensor([0, 1, 0, 1, 1, 1])
    g = torch.tensor([0, 0, 1, 1, 1, 0])
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    pos = y == 1
    pooled = ce[pos].mean()
    gaps = torch.stack([(ce[pos & (g == k)].mean() - pooled).abs() for k in (0, 1)])
    torch.testing.assert_close(meta_loss(logits, y, g, "max_loss_d", "eopp", 2), gaps.max())
    torch.testing.assert_close(meta_loss(logits, y, g, "mean_loss_d", "eopp", 2), gaps.mean())
    torch.testing.assert_close(meta_loss(logits, y, g, "cross_entropy", "eopp", 2), ce.mean())
    torch.testing.assert_close(meta_loss(logits, y, g, "mean_loss_d", "eopp", 2, ce_weight=2.0),
                               gaps.mean() + 2 * ce.mean())
    # equal groups: no discrepancy
    same = torch.cat([logits[:2], logits[:2]])
    assert float(meta_loss(same, y[[0, 1, 0, 1]], torch.tensor([0, 0, 1, 1]), "max_loss_d", "eo", 2)) == 0.0


def test_zero_weight_lr_is_exactly_the_uniform_run(small):
    train, exemplar = small
    a, _ = fit("forml", None, train, "eopp", None, seed=3, exemplar=exemplar, weight_lr=0.0, **FAST)
    b, rep = fit("forml", None, train, "eopp", None, seed=3, exemplar=exemplar, uniform=True, **FAST)
    ra, rb = PatchRunner(a), PatchRunner(b)
    np.testing.assert_allclose(ra.model_logits(exemplar.X), rb.model_logits(exemplar.X), atol=1e-6)
    assert rep.audit.weight_quantiles["min"] == rep.audit.weight_quantiles["max"] == 1.0


def test_weight_patch_reproduces_the_trained_model(small, fitted):
    train, exemplar = small
    patch, report = fitted
    assert patch.method == "forml" and report.queries_used == 0
    assert report.onnx_max_abs_diff < 1e-4  # the exported graph against the torch model it came from
    runner = PatchRunner(patch)
    assert runner.replaces_model and not runner.needs_group
    logits = runner.model_logits(exemplar.X)
    assert logits.shape == (len(exemplar), 2)
    acc = float((logits.argmax(1) == exemplar.y).mean())
    assert acc == pytest.approx(report.exemplar_metrics["accuracy"])  # torch predictions gave the report
    assert {"tprd", "max_fnr"} <= set(report.exemplar_metrics) and {"tprd", "max_fnr"} <= set(report.train_metrics)
    # and it round-trips through onnx2torch (fine-tuning the patch again starts from these weights)
    back = ModelArtifact(patch.part("replacement_model")).torch_module()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(exemplar.X)).numpy(), logits, atol=1e-4)


def test_audit_ranking_and_condensed_export_are_consistent(small, fitted):
    train, _ = small
    patch, report = fitted
    audit = report.audit
    weights = patch.arrays()["sample_weights"]
    ema = patch.arrays()["ema_weighted_loss"]
    n = len(train)
    assert sorted(audit.rank_by_weight) == list(range(n)) == sorted(audit.rank_by_ema)
    assert weights.mean() == pytest.approx(1.0, rel=1e-4) and weights.std() > 1e-3  # weights were learned
    assert np.all(np.diff(weights[audit.rank_by_weight]) >= 0)  # lowest weight first
    assert np.all(np.diff(ema[audit.rank_by_ema]) >= 0)
    n_drop = round(0.1 * n)
    assert audit.condensed_indices == sorted(audit.rank_by_ema[n_drop:])
    assert [r.row for r in audit.lowest] == audit.rank_by_ema[:len(audit.lowest)]
    condensed = export_condensed(train, audit)
    assert len(condensed) == n - n_drop
    np.testing.assert_array_equal(condensed.X, train.X[audit.condensed_indices])
    np.testing.assert_array_equal(condensed.y, train.y[audit.condensed_indices])
    assert export_condensed(train, report.model_dump()["audit"]).X.shape == condensed.X.shape  # from JSON too


def test_held_out_exemplars_are_not_ranked(small):
    train, _ = small
    patch, report = fit("forml", None, train, "eo", None, seed=1, exemplar_fraction=0.2, **FAST)
    weights = patch.arrays()["sample_weights"]
    held = np.flatnonzero(np.isnan(weights))
    assert report.n_exemplar == len(held) and report.n_train == len(train) - len(held)
    assert not set(held) & set(report.audit.rank_by_weight)
    # every (group, label) cell keeps ~20% of its rows as exemplars
    for g in (0, 1):
        for lab in (0, 1):
            cell = (train.groups == g) & (train.y == lab)
            assert abs(np.isnan(weights[cell]).mean() - 0.2) < 0.02


def test_fine_tunes_the_given_model(small, adult_model):
    train, exemplar = small
    artifact = ModelArtifact(adult_model.onnx_bytes, "adult-ref")
    # a vanishing learning rate leaves the given weights: the patch reproduces the reference model
    patch, report = fit("forml", artifact, train, "eopp", None, seed=0, exemplar=exemplar, lr=1e-12,
                              lookahead_lr=1e-12, epochs=1, batch_size=256, exemplar_batch=64, min_per_cell=4)
    assert report.architecture == "given:adult-ref" and not report.from_scratch
    ref = artifact.oracle().scores(exemplar.X)
    np.testing.assert_allclose(PatchRunner(patch).model_logits(exemplar.X), ref, atol=1e-4)


def test_normalised_weights_and_bad_input(small):
    np.testing.assert_allclose(normalised_weights(np.zeros(5)), np.ones(5))
    np.testing.assert_allclose(normalised_weights(np.log([1.0, 3.0])), [0.5, 1.5])
    train, _ = small
    with pytest.raises(ValueError, match="criterion"):
        fit("forml", None, train, "parity", None)
    with pytest.raises(ValueError, match="weight access"):
        fit("forml", b"not an artifact", train, "eopp", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fit("forml", None, train, "eopp", None, epochs=0)
