"""FORML (Yan, Seto, Apostoloff, ICML 2022): train or fine-tune a model with meta-learned sample weights.

Needs weight access: either no model (train from scratch: the reference MLP for tabular rows, the
reference CNN for [N, 3, H, W] images) or a `ModelArtifact` to fine-tune (its ONNX graph through
onnx2torch). The training rows are `data`; the exemplar set (where fairness is measured during
training) is `exemplar`, or a stratified share of `data` held out from training when none is given.

The result is a weight patch: the trained model as ONNX (`replacement_model`, output `logits`) and the
learned weights as an array (`sample_weights`, normalised to mean 1 over the training rows, NaN for rows
held out as exemplars). The report carries the sample audit (forml_audit): training rows ranked by learned
weight and by the EMA of their weighted loss, and the rows of the condensed dataset without the lowest
10%, plus TPRD and max FNR on the training and exemplar rows. The loop itself is in forml_core.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from patcher.access import ModelArtifact
from patcher.methods.contract import BenchDefaults, BenchFlag, FitRequest, FitResult, Method
from patcher.methods.forml_audit import (
    CondenseBy,
    SampleAudit,
    bench_two_arms,
    build_audit,
    normalised_weights,
    summary_metrics,
)
from patcher.patch import Patch
from patcher.tuning import TuningData, stratified_split

MetaLoss = Literal["max_loss_d", "mean_loss_d", "cross_entropy"]
Reverse = Literal["none", "model", "weights", "both"]


class FormlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1, le=500, description="training epochs")
    batch_size: int = Field(256, ge=2, description="training rows per step")
    lr: float = Field(1e-3, gt=0, description="model learning rate (Adam)")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay of the model")
    lookahead_lr: float = Field(0.1, gt=0, description="eta_c of the one-step SGD lookahead")
    weight_lr: float = Field(0.01, ge=0, description="eta_f per row (the weight gradient is scaled by the batch size)")
    meta_loss: MetaLoss = Field("mean_loss_d", description="the fairness loss on the exemplars that the sample "
                                "weights descend: max or mean over groups of the loss gap, or plain cross-entropy")
    ce_weight: float = Field(0.0, ge=0, description="add this times the exemplar cross-entropy to the meta-loss")
    reverse: Reverse = Field("none", description="appendix A.2: flip the sign of the lookahead ('model'), "
                             "of the weight update ('weights') or both")
    meta_groups: Literal["auto", "sensitive", "label"] = Field(
        "auto", description="groups of the meta-loss: the sensitive groups, or the classes (the paper's CIFAR/MNIST "
        "setting); auto = sensitive for binary labels, classes otherwise")
    exemplar_batch: int = Field(512, ge=2, description="exemplar rows per meta step")
    min_per_cell: int = Field(32, ge=1, description="minimum exemplar rows per (group, label) cell in each batch")
    exemplar_fraction: float = Field(0.2, gt=0, lt=1, description="share of data held out as exemplars when "
                                     "no exemplar set is given (stratified by group and label)")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="decay of the per-row EMA of the weighted loss (audit)")
    condense_by: CondenseBy = Field("ema", description="what ranks the training rows for the condensed data set: "
                                    "the EMA of the weighted loss, or the learned weight")
    drop_fraction: float = Field(0.1, ge=0, lt=1, description="share of the lowest-ranked training rows the "
                                 "condensed data set drops")
    uniform: bool = Field(False, description="baseline: the same training with uniform weights (no meta step)")
    fine_tune: bool = Field(True, description="with a model given: start from its weights (else only its "
                            "architecture is kept and it is re-initialised)")


class FormlReport(BaseModel):
    method: str = "forml"
    criterion: str
    meta_loss: str
    meta_groups: str
    reverse: str
    uniform: bool
    from_scratch: bool
    architecture: str
    epochs: int
    batches: int
    n_train: int
    n_exemplar: int
    queries_used: int = 0
    fit_seconds: float
    train_metrics: dict[str, float]  # the trained model on its training rows (tprd, max_fnr included)
    exemplar_metrics: dict[str, float]  # ... and on the exemplar rows
    history: list[dict[str, float]]
    onnx_max_abs_diff: float  # exported patch model vs the trained torch model, exemplar rows
    audit: SampleAudit


def build_model(X: np.ndarray, n_classes: int, seed: int):
    """The from-scratch architecture: the reference MLP (tabular) or the reference CNN recipe (images,
    patcher.digits.CNN_RECIPE: two conv blocks and a flatten head)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if X.ndim == 2:
        from patcher.reference_models import RECIPE

        sizes = [X.shape[1], *RECIPE["hidden"], n_classes]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        return nn.Sequential(*layers[:-1]), f"mlp{RECIPE['hidden']}"
    if X.ndim == 4 and X.shape[2] == X.shape[3]:
        from patcher.digits import CNN_RECIPE, _cnn

        if X.shape[2] != 16:
            raise ValueError(f"the reference CNN takes [N, 3, 16, 16] images, got {list(X.shape)}")
        return _cnn(torch, n_classes, CNN_RECIPE), f"cnn{CNN_RECIPE['channels']}"
    raise ValueError(f"cannot build a model for inputs of shape {list(X.shape)}: give a model to fine-tune")


def _reset(module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


def predict(model, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.as_tensor(X[i:i + batch])).argmax(1).numpy()
                               for i in range(0, len(X), batch)])


def fit(access: ModelArtifact | None, data: TuningData, request: FitRequest, opts: FormlOptions) -> FitResult:
    """Train (access None) or fine-tune (a ModelArtifact) on `data` with FORML, on `request.exemplar` if given
    (no queries)."""
    import torch

    from patcher.access import torch_to_onnx
    from patcher.device import torch_device
    from patcher.methods.forml_core import TrainConfig, train

    criterion, seed, exemplar, progress = request.criterion, request.seed, request.exemplar, request.progress
    if criterion not in ("dp", "eo", "eopp"):
        raise ValueError(f"unknown criterion {criterion!r}; choose dp, eo or eopp")
    if access is not None and not isinstance(access, ModelArtifact):
        raise ValueError("FORML needs weight access: a ModelArtifact (ONNX) or None to train from scratch")
    started = time.perf_counter()
    # writable copies: a decoded upload is a read-only view, which torch warns about
    X, y = np.array(data.X, np.float32), np.asarray(data.y, np.int64)
    groups = np.asarray(data.groups, np.int64)
    if exemplar is None:
        ex_rows, train_rows = stratified_split(y, groups, opts.exemplar_fraction, seed, hold_one=True)
        Xv, yv, gv = X[ex_rows], y[ex_rows], groups[ex_rows]
    else:
        train_rows = np.arange(len(data))
        Xv, yv = np.array(exemplar.X, np.float32), np.asarray(exemplar.y, np.int64)
        gv = np.asarray(exemplar.groups, np.int64)
    n_classes = int(max(y.max(), yv.max())) + 1
    if n_classes < 2:
        raise ValueError("FORML needs at least two classes in the training labels")
    label_groups = opts.meta_groups == "label" or (opts.meta_groups == "auto" and n_classes > 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads cost more than they save on a shared CPU
    try:
        if access is None:
            model, arch = build_model(X, n_classes, seed)
            input_name = "input"
        else:
            model = access.torch_module()
            arch, input_name = f"given:{access.name}", _input_name(access)
            if not opts.fine_tune:
                torch.manual_seed(seed)
                _reset(model)
        cfg = TrainConfig(
            epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, weight_decay=opts.weight_decay,
            lookahead_lr=opts.lookahead_lr, weight_lr=opts.weight_lr, meta_loss=opts.meta_loss,
            criterion="loss" if label_groups else criterion, ce_weight=opts.ce_weight, reverse=opts.reverse,
            exemplar_batch=opts.exemplar_batch, min_per_cell=opts.min_per_cell, ema_decay=opts.ema_decay,
            uniform=opts.uniform, seed=seed)
        meta_gv = yv if label_groups else gv
        n_meta_groups = n_classes if label_groups else max(data.n_groups, int(gv.max()) + 1)
        device = torch_device(request.device)
        result = train(model.to(device), X[train_rows], y[train_rows], Xv, yv, meta_gv, n_meta_groups, cfg, progress,
                       device)
        model.cpu()  # exported, checked and scored on the CPU
        onnx_bytes = torch_to_onnx(model, torch.as_tensor(X[:2]), input_name=input_name)
        train_pred, ex_pred = predict(model, X[train_rows]), predict(model, Xv)
        onnx_diff = _onnx_gap(model, onnx_bytes, Xv[:512])
    finally:
        torch.set_num_threads(threads)

    audit = build_audit(request.ids(train_rows), result.weight_logits, result.ema_weighted_loss, y[train_rows],
                        groups[train_rows], opts.condense_by, opts.drop_fraction)
    weights = np.full(len(data), np.nan, np.float32)
    weights[train_rows] = normalised_weights(result.weight_logits)
    ema = np.full(len(data), np.nan, np.float32)
    ema[train_rows] = result.ema_weighted_loss
    report = FormlReport(
        criterion=criterion, meta_loss=opts.meta_loss, meta_groups="label" if label_groups else "sensitive",
        reverse=opts.reverse, uniform=opts.uniform, from_scratch=access is None or not opts.fine_tune,
        architecture=arch, epochs=opts.epochs, batches=result.batches, n_train=len(train_rows),
        n_exemplar=len(yv), fit_seconds=round(time.perf_counter() - started, 3),
        train_metrics=summary_metrics(y[train_rows], train_pred, groups[train_rows], n_classes),
        exemplar_metrics=summary_metrics(yv, ex_pred, gv, n_classes), history=result.history,
        onnx_max_abs_diff=onnx_diff, audit=audit)
    patch = Patch.build(
        method="forml", n_classes=n_classes, groups=list(data.group_names), replacement_model=onnx_bytes,
        arrays={"sample_weights": weights, "ema_weighted_loss": ema},
        params={**opts.model_dump(), "criterion": criterion, "seed": seed},
        report={"exemplar_metrics": report.exemplar_metrics, "n_train": report.n_train,
                "weight_quantiles": audit.weight_quantiles})
    dropped = sorted(set(audit.rank_by_weight) - set(audit.condensed_indices))
    return FitResult(patch, report, drop_rows={"condensed": dropped})


def _onnx_gap(model, onnx_bytes: bytes, X: np.ndarray) -> float:
    """Max |logit| difference between the exported graph (onnxruntime) and the torch model: the export is checked."""
    import torch

    from patcher.oracle import OnnxOracle

    with torch.no_grad():
        ref = model(torch.as_tensor(X)).numpy()
    got = OnnxOracle(onnx_bytes).scores(X)
    return float(np.abs(got - ref).max())


def _input_name(access: ModelArtifact) -> str:
    import onnx

    graph = onnx.load_from_string(access.onnx_bytes).graph
    inits = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


METHOD = Method(
    name="forml",
    summary=("FORML (Yan et al. 2022): train or fine-tune the model with meta-learned sample weights that lower "
             "the unfairness on an exemplar set; a weight patch"),
    access=("weights",), options=FormlOptions, fit=fit, group_at_inference="none", takes_exemplar=True,
    bench=BenchDefaults(datasets=("adult", "compas", "german", "colored-digits", "noisy-digits"), queries=0,
                        instead=bench_two_arms, flags=(
        BenchFlag("--fine-tune", {"action": "store_true", "help": "fine-tune the reference model instead of "
                                  "training from scratch (both arms); -o epochs=N sets both arms' epochs (default: "
                                  "20 tabular as the reference recipe, 12 images as the reference CNN)"}),)))
