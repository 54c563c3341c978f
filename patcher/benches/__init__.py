"""`fairpatch bench <method>`: every registered method, with a bench module of its own or the generic one.

A bench module defines `DATASETS` (the datasets it supports), `add_arguments(parser)` for flags of its
own that are not method options (the CLI adds --dataset, --sensitive, --criterion, --queries, --seed,
-o and --preset to every method), and `run(**kwargs) -> dict`, the JSON `fairpatch bench <method> --json`
prints; the method's options arrive as keyword arguments. A method without a module here runs through
`patcher.benches.generic`. Every result has
`method, dataset, sensitive, criterion, seed, queries_used, fit_seconds, group_at_inference` and
`before`/`after` headline metrics on the test split (see `patcher.metrics.headline`), which the
method never saw. Modules import torch and friends inside `run`, so the CLI stays light.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

BENCHES: dict[str, str] = {
    "eraser": "patcher.benches.eraser",
    "forml": "patcher.benches.forml",
    "thresholds": "patcher.benches.thresholds",
    "reject_option": "patcher.benches.reject_option",
    "eq_odds": "patcher.benches.eq_odds",
    "calibrated_eq_odds": "patcher.benches.calibrated_eq_odds",
    "trigger": "patcher.benches.trigger",
    "random_perturbation": "patcher.benches.random_perturbation",
    "layerwise": "patcher.benches.layerwise",
    "adversarial_finetune": "patcher.benches.adversarial_finetune",
}


def available() -> list[str]:
    """Every registered method (those without a bench module of their own run through the generic one)."""
    from patcher.methods import names

    return names()


def get_bench(name: str) -> ModuleType:
    if name not in available():
        raise ValueError(f"unknown bench {name!r}; available: {', '.join(available())}")
    return importlib.import_module(BENCHES.get(name, "patcher.benches.generic"))


def run(name: str, **kwargs: Any) -> dict[str, Any]:
    """One bench run of method `name` (its own bench, or the generic one): the JSON `fairpatch bench` prints."""
    module = get_bench(name)
    return module.run(**kwargs) if name in BENCHES else module.run(name, **kwargs)
