"""FORML's sample audit: rank training rows by learned weight and by the EMA of their weighted loss, and
condense the training set by dropping the lowest-ranked rows (the paper's section 4.2 drops the 10% with
the lowest EMA of the normalised weighted loss). Also the metrics every FORML run reports (TPRD, max FNR) and
the two-arm run `fairpatch bench forml` reports (FORML against uniform weighting).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from patcher.tuning import TuningData

CondenseBy = Literal["ema", "weight"]


class AuditRow(BaseModel):
    row: int  # index into the data passed to fit
    weight: float  # normalised learned weight: exp(w_i) / mean_j exp(w_j), 1.0 = uniform
    ema_weighted_loss: float
    label: int
    group: int


class SampleAudit(BaseModel):
    """Row indices refer to the data given to `fit` (exemplar rows drawn from it are not ranked)."""

    rank_by_weight: list[int]  # training rows, lowest learned weight first
    rank_by_ema: list[int]  # training rows, lowest EMA of the weighted loss first
    condense_by: CondenseBy
    drop_fraction: float
    condensed_indices: list[int]  # training rows kept, ascending
    lowest: list[AuditRow]  # the first rows of the ranking used for condensing, for a quick look
    weight_quantiles: dict[str, float]  # min, p10, median, p90, max of the normalised weights
    weight_by_cell: dict[str, float]  # mean normalised weight per "group=g,label=y" cell


def normalised_weights(weight_logits: np.ndarray) -> np.ndarray:
    """exp(w) scaled to mean 1 over the training rows (uniform weighting is all ones)."""
    e = np.exp(weight_logits - weight_logits.max())
    return e / e.mean()


def lowest_first(scores: np.ndarray) -> np.ndarray:
    """Positions sorted by score, lowest first; ties broken by position so the ranking is deterministic."""
    return np.lexsort((np.arange(len(scores)), scores))


def condensed_positions(scores: np.ndarray, drop_fraction: float = 0.1) -> np.ndarray:
    """Positions kept after dropping the `drop_fraction` lowest scores, ascending."""
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    n_drop = int(round(drop_fraction * len(scores)))
    return np.sort(lowest_first(scores)[n_drop:])


def build_audit(train_rows: np.ndarray, weight_logits: np.ndarray, ema: np.ndarray, y: np.ndarray,
                groups: np.ndarray, condense_by: CondenseBy = "ema", drop_fraction: float = 0.1,
                n_lowest: int = 20) -> SampleAudit:
    """The audit of one FORML run; `train_rows[k]` is the data row of training position k."""
    w = normalised_weights(weight_logits)
    by_weight, by_ema = lowest_first(w), lowest_first(ema)
    scores = ema if condense_by == "ema" else w
    ranking = by_ema if condense_by == "ema" else by_weight
    kept = condensed_positions(scores, drop_fraction)
    cells = {f"group={int(g)},label={int(lab)}": float(w[(groups == g) & (y == lab)].mean())
             for g in np.unique(groups) for lab in np.unique(y) if ((groups == g) & (y == lab)).any()}
    q = np.quantile(w, [0.0, 0.1, 0.5, 0.9, 1.0])
    return SampleAudit(
        rank_by_weight=train_rows[by_weight].tolist(), rank_by_ema=train_rows[by_ema].tolist(),
        condense_by=condense_by, drop_fraction=drop_fraction, condensed_indices=train_rows[kept].tolist(),
        lowest=[AuditRow(row=int(train_rows[k]), weight=float(w[k]), ema_weighted_loss=float(ema[k]),
                         label=int(y[k]), group=int(groups[k])) for k in ranking[:n_lowest]],
        weight_quantiles=dict(zip(("min", "p10", "median", "p90", "max"), map(float, q), strict=True)),
        weight_by_cell=cells,
    )


def export_condensed(data: TuningData, audit: SampleAudit | dict) -> TuningData:
    """The condensed training set: the rows of `data` (the data given to fit) that the audit keeps."""
    kept = audit.condensed_indices if isinstance(audit, SampleAudit) else audit["condensed_indices"]
    return data.subset(np.asarray(kept, dtype=np.int64))


def summary_metrics(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, n_classes: int,
                    privileged: int | None = None) -> dict[str, float]:
    """Headline metrics with TPRD and max FNR. Binary labels: per sensitive group (patcher.metrics.headline).
    More classes: per class, as the paper does for CIFAR and MNIST (TPRD = max - min recall over classes,
    max FNR = max over classes of 1 - recall), plus the worst (group, class) accuracy."""
    from patcher.metrics import headline, rate_gap

    if n_classes == 2:
        return headline(y, pred, groups, privileged)
    recall = np.array([(pred[y == c] == c).mean() for c in range(n_classes) if (y == c).any()])
    cells = [(pred[m] == y[m]).mean() for g in np.unique(groups) for c in range(n_classes)
             if (m := (groups == g) & (y == c)).any()]
    return {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(recall.mean()),
            "worst_group_accuracy": float(min(cells)), "tprd": float(rate_gap(recall)),
            "max_fnr": float(1.0 - recall.min())}


def arm_options(image: bool, epochs: int | None, **options: Any) -> dict[str, Any]:
    """fit options of both bench arms: the reference recipes (MLP: 20 epochs, batch 256; CNN: 12 epochs, batch 64)."""
    options["epochs"] = epochs or (12 if image else 20)
    if image:
        options.setdefault("batch_size", 64)
        options.setdefault("lr", 3e-3)
        options.setdefault("exemplar_batch", 128)
        options.setdefault("min_per_cell", 8)
    return options


def bench_forml_report(dataset: str = "adult", sensitive: str | None = None, criterion: str = "eopp",
                       seed: int = 0, epochs: int | None = None, meta_loss: str = "mean_loss_d",
                       reverse: str = "none", weight_lr: float | None = None, ce_weight: float | None = None,
                       fine_tune: bool = False, queries: int | None = None,
                       **options: Any) -> tuple[dict[str, Any], Any]:
    """FORML against uniform weighting, same architecture, epochs, data and seed: (the bench JSON, the FORML
    run's FormlReport with its full sample audit). Both arms train on the train split (from scratch, or
    fine-tuning the reference model), FORML's exemplar set is the tune split; both are scored on the test split
    through the patch's replacement model. `before` is the uniform arm, `after` FORML (tprd and max_fnr; per
    class for 10-class tasks, as in the paper)."""
    import time

    from patcher.access import ModelArtifact
    from patcher.apply import PatchRunner
    from patcher.methods import FitRequest, get_method
    from patcher.pipeline import load_data, patched_decisions, reference, tuning_data

    data = load_data(dataset, sensitive)
    priv = data.group_names.index(data.privileged)
    train, exemplar, test = tuning_data(data, data.train), tuning_data(data, data.tune), data.test
    options = arm_options(train.X.ndim == 4, epochs, meta_loss=meta_loss, reverse=reverse, **options)
    if weight_lr is not None:
        options["weight_lr"] = weight_lr
    if ce_weight is not None:
        options["ce_weight"] = ce_weight
    kind = "cnn" if train.X.ndim == 4 else "mlp"
    access = ModelArtifact(reference(data, seed).onnx_bytes, f"{dataset}-{kind}") if fine_tune else None
    n_classes = int(data.train.y.max()) + 1

    def arm(uniform: bool) -> tuple[dict[str, float], Any, Any, float]:
        started = time.perf_counter()
        result = get_method("forml").run(access, train, FitRequest(criterion, None, seed, exemplar=exemplar),
                                         {**options, "uniform": uniform})
        patch, report = result.patch, result.report
        seconds = time.perf_counter() - started
        pred = patched_decisions(PatchRunner(patch), None, test.X, test.groups, None)  # a weight patch
        return summary_metrics(test.y, pred, test.groups, n_classes, priv), patch, report, seconds

    before, _, base_report, base_seconds = arm(uniform=True)
    after, patch, report, seconds = arm(uniform=False)
    return {
        "method": "forml", "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion, "seed": seed,
        "queries_used": 0, "fit_seconds": round(seconds, 3), "uniform_fit_seconds": round(base_seconds, 3),
        "group_at_inference": False, "fine_tune": fine_tune, "architecture": report.architecture,
        "epochs": report.epochs, "meta_loss": report.meta_loss, "meta_groups": report.meta_groups,
        "reverse": report.reverse, "weight_lr": patch.manifest["params"]["weight_lr"],
        "ce_weight": patch.manifest["params"]["ce_weight"],
        "n_train": report.n_train, "n_exemplar": report.n_exemplar, "n_test": len(test), "patch_id": patch.id,
        "weight_quantiles": report.audit.weight_quantiles, "weight_by_cell": report.audit.weight_by_cell,
        "n_condensed": len(report.audit.condensed_indices),
        "exemplar_before": base_report.exemplar_metrics, "exemplar_after": report.exemplar_metrics,
        "before": before, "after": after,
    }, report


def bench_two_arms(flags: dict[str, Any], common: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """`fairpatch bench forml`: always the two-arm comparison."""
    return bench_forml_report(**common, fine_tune=flags["fine_tune"], **options)[0]
