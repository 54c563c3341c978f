"""Debiasing methods: the registry.

Each method is one module that declares `METHOD = Method(...)` (see `patcher.methods.contract`): its
access kinds, options model, fit, what it needs at inference and its presets. Adding a method is that
module plus one line in `REGISTRY`; the job API, `fairpatch methods`, `fairpatch bench` and
docs/methods.md all read it from here. Method modules import without torch (their fits import it).
"""

from __future__ import annotations

import importlib

from patcher.methods.contract import (
    ACCESS_ORDER,
    Access,
    BenchDefaults,
    BenchFlag,
    FitRequest,
    FitResult,
    Method,
    OptionsError,
    option_rows,
)

__all__ = ["ACCESS_ORDER", "REGISTRY", "Access", "BenchDefaults", "BenchFlag", "FitRequest", "FitResult", "Method",
           "OptionsError", "get_method", "methods", "option_rows", "register"]

REGISTRY: dict[str, str] = {  # method name -> the module that declares its METHOD
    "eraser": "patcher.methods.eraser",
    "thresholds": "patcher.methods.thresholds",
    "reject_option": "patcher.methods.reject_option",
    "eq_odds": "patcher.methods.eq_odds",
    "calibrated_eq_odds": "patcher.methods.calibrated_eq_odds",
    "trigger": "patcher.methods.trigger",
    "forml": "patcher.methods.forml",
    "random_perturbation": "patcher.methods.random_perturbation",
    "layerwise": "patcher.methods.layerwise",
    "adversarial_finetune": "patcher.methods.adversarial_finetune",
}
_registered: dict[str, Method] = {}  # methods declared outside this package (register)


def register(method: Method) -> Method:
    """Add a method declared elsewhere (a plugin, a test) under its name."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _registered[method.name] = method
    return method


def unregister(name: str) -> None:
    _registered.pop(name, None)


def names() -> list[str]:
    return [*REGISTRY, *_registered]


def get_method(name: str) -> Method:
    if name in _registered:
        return _registered[name]
    if name not in REGISTRY:
        raise OptionsError(f"unknown method {name!r}; available: {', '.join(sorted(names()))}")
    method = importlib.import_module(REGISTRY[name]).METHOD
    if method.name != name:
        raise RuntimeError(f"{REGISTRY[name]} declares method {method.name!r}, registered as {name!r}")
    return method


def methods() -> list[Method]:
    return [get_method(n) for n in names()]
