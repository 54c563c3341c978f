"""Debiasing methods, one module each, all with one signature:

    fit(access, data, criterion, budget, *, progress=None, **options) -> (Patch, report)

`progress(fraction, info)` is called as the fit advances (jobs show it). `METHODS` maps a job's
method name to its module, so a new method plugs into the job API without new endpoints.
"""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS: dict[str, str] = {
    "eraser": "patcher.methods.eraser",
    "forml": "patcher.methods.forml",
    "thresholds": "patcher.methods.thresholds",
    "reject_option": "patcher.methods.reject_option",
    "eq_odds": "patcher.methods.eq_odds",
    "calibrated_eq_odds": "patcher.methods.calibrated_eq_odds",
    "trigger": "patcher.methods.reprogram",
    "random_perturbation": "patcher.methods.random_perturbation",
    "layerwise": "patcher.methods.layerwise",
    "adversarial_finetune": "patcher.methods.adversarial_finetune",
}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
