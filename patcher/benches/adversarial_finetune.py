"""Intra-processing: adversarial fine-tuning against a bias critic (weight access), best epoch by phi."""

from __future__ import annotations

import argparse
from typing import Any

from patcher.benches.intra import CRITERIA, DATASETS, DEFAULT_QUERIES, add_common_arguments, run_intra

__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--epochs", type=int, default=None, help="critic/model rounds (default 16)")
    parser.add_argument("--lam", type=float, default=None, help="weight of the critic's bias estimate (default 20)")
    parser.add_argument("--critic", choices=("set", "flat", "exact"), default=None,
                        help="set: per-row scores pooled by the measure (default); flat: the reference's MLP; "
                             "exact: no learned critic, the bias of the model's own soft decisions")
    parser.add_argument("--bias-target", choices=("operating", "scores"), default=None,
                        help="what the critic regresses: decisions at the operating point (default) or scores")
    parser.add_argument("--train-layers", choices=("all", "last"), default=None,
                        help="fine-tune every weight (default) or only the last linear layer")
    parser.add_argument("--holdout", type=float, default=None,
                        help="share of the tuning rows kept out of fine-tuning to pick the epoch and threshold")


def run(**kwargs: Any) -> dict[str, Any]:
    return run_intra("adversarial_finetune", **kwargs)
