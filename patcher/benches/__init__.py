"""`fairpatch bench <method>`: one module per method, registered here by name.

A bench module defines `DATASETS` (the datasets it supports), `add_arguments(parser)` for its own
options (the CLI adds --dataset, --sensitive, --criterion, --queries and --seed to every method), and
`run(**kwargs) -> dict`, the JSON `fairpatch bench <method> --json` prints. Every result has
`method, dataset, sensitive, criterion, seed, queries_used, fit_seconds, group_at_inference` and
`before`/`after` headline metrics on the test split (see `patcher.bench.headline`), which the
method never saw. Modules import torch and friends inside `run`, so the CLI stays light.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

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
    """Registered benches whose module exists in this build."""
    return [name for name, mod in BENCHES.items() if importlib.util.find_spec(mod) is not None]


def get_bench(name: str) -> ModuleType:
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}; available: {', '.join(available())}")
    return importlib.import_module(BENCHES[name])
