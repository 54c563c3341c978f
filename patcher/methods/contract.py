"""What every debiasing method declares, and the one signature its fit has.

A method is one `Method`: its name, a one-line summary, the access kinds it can work with, its options
model, its fit, what it needs at inference (the group or not) and named presets of its options.
Every fit is

    fit(access, data: TuningData, request: FitRequest, options: <the method's options>) -> FitResult

This module and every options model import without torch: the gateway and the clients read the
registry (to validate a job's options, to describe methods) on machines that have no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from patcher.scores import OutputKind

if TYPE_CHECKING:
    import numpy as np

    from patcher.patch import Patch
    from patcher.tuning import TuningData

Access = Literal["queries", "zeroth_order", "gradient", "weights"]
ACCESS_ORDER: tuple[Access, ...] = ("queries", "zeroth_order", "gradient", "weights")  # least privileged first
Criterion = Literal["dp", "eo", "eopp"]
GroupAtInference = Literal["required", "none", "optional"]
Progress = Callable[[float, dict], None]


def _no_progress(_fraction: float, _info: dict) -> None:
    return None


@dataclass(frozen=True)
class FitRequest:
    """What the caller asks of a fit, apart from the method's own options."""

    criterion: Criterion = "dp"
    budget: int | None = None  # queries the caller's oracle allows (None: no limit); the oracle refuses more
    seed: int = 0
    progress: Progress | None = None  # progress(fraction, info) as the fit advances
    output_kind: OutputKind = "logits"  # what the model's output holds
    access: Access | None = None  # the access kind the caller chose (None: inferred from the access object)
    exemplar: TuningData | None = None  # a second data set, for methods that take one (FORML's exemplars)
    row_ids: np.ndarray | None = None  # ids of data's rows in the caller's own data (default: positions)
    # where torch fits and the oracles built from a model artifact run: auto, cpu or cuda (patcher.device);
    # None: FAIRPATCH_DEVICE, else auto
    device: str | None = None

    def report(self, fraction: float, info: dict) -> None:
        (self.progress or _no_progress)(fraction, info)

    def query_limit(self, access: Any, rows: int) -> int:
        """The rows a fit may plan to pay for: the least of the budget, what the oracle has left and `rows`.
        A plan only: the oracle is what refuses a query over its budget."""
        remaining = getattr(access, "remaining", None)
        return min(x for x in (self.budget, remaining, rows) if x is not None)

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Row ids (in the caller's data) of positions in the data given to fit."""
        return positions if self.row_ids is None else self.row_ids[positions]


@dataclass(frozen=True)
class FitResult:
    patch: Patch
    report: BaseModel  # the method's own report model
    # named sets of rows (`FitRequest.ids`) the method proposes to leave out of the data, e.g. FORML's
    # lowest-ranked training rows: the job API makes a new data set without them
    drop_rows: Mapping[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchFlag:
    """A `fairpatch bench` flag of the method's own that is not one of its options (e.g. eraser's --group-free)."""

    name: str  # "--group-free"
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # argparse's add_argument keywords


@dataclass(frozen=True)
class BenchDefaults:
    """How `fairpatch bench` runs the method through the one runner (`patcher.pipeline.bench`): its defaults and
    hooks. Hooks import what they need when called, so the registry stays torch-free."""

    datasets: tuple[str, ...] = ("adult", "compas", "german")
    criteria: tuple[Criterion, ...] | None = None  # default: the method's
    queries: int | None = 1000  # --queries default
    access: Access | None = None  # default: the method's least privileged (a flag `access` overrides it)
    flags: tuple[BenchFlag, ...] = ()
    request_id: str = "bench"  # the test split is scored as one request "{request_id}-{seed}"
    artifact_name: str = "{}_reference"  # the model artifact's name (weight or gradient access), from the dataset
    groups: bool = True  # add the per-group block (sizes, rates, gaps with intervals)
    # (options, flags, data) -> the options given to fit, e.g. eraser's --proxies as its proxy_columns
    prepare: Callable[[dict[str, Any], dict[str, Any], Any], dict[str, Any]] | None = None
    extras: Callable[[Any], dict[str, Any]] | None = None  # (patcher.pipeline.BenchRun) -> fields of the JSON
    # (flags, common keywords, options) -> a whole result of its own (FORML's two arms, the trigger's lambda
    # sweep), or None to run the common way
    instead: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], dict[str, Any] | None] | None = None
    print_result: Callable[[dict[str, Any]], bool] | None = None  # a table of its own (False: the common one)


class OptionsError(ValueError):
    """Options (or a preset) a method does not take; the message names the valid ones."""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line
    access: tuple[Access, ...]  # the access kinds it can work with, least privileged first
    options: type[BaseModel]  # extra="forbid"; every field has a default and a description
    fit: Callable[[Any, TuningData, FitRequest, Any], FitResult]
    group_at_inference: GroupAtInference  # optional: depends on the options (see the summary)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    criteria: tuple[Criterion, ...] = ("dp", "eo", "eopp")  # the fairness criteria it can fit for
    takes_exemplar: bool = False  # whether FitRequest.exemplar means anything to it
    bench: BenchDefaults = field(default_factory=BenchDefaults)  # how `fairpatch bench` runs it

    @property
    def default_access(self) -> Access:
        return next(kind for kind in ACCESS_ORDER if kind in self.access)

    def check_criterion(self, criterion: str) -> None:
        """Raises OptionsError for a criterion this method cannot fit for (the job API refuses it at submission)."""
        if criterion not in ("dp", "eo", "eopp"):
            raise OptionsError(f"unknown criterion {criterion!r}; choose dp, eo or eopp")
        if criterion not in self.criteria:
            raise OptionsError(f"method {self.name} fits for criterion {', '.join(self.criteria)}; got {criterion!r}")

    def parse_options(self, options: Mapping[str, Any] | None = None, preset: str | None = None) -> Any:
        """The options model from a preset (if named) overridden by `options`. Raises OptionsError."""
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in self.presets:
                have = ", ".join(sorted(self.presets)) or "none"
                raise OptionsError(f"method {self.name} has no preset {preset!r}; its presets: {have}")
            values.update(self.presets[preset])
        values.update(options or {})
        unknown = sorted(set(values) - set(self.options.model_fields))
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(unknown)} for {self.name}; valid options: "
                               f"{', '.join(self.options.model_fields)}")
        try:
            return self.options(**values)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: "
                                 f"{str(err['msg']).removeprefix('Value error, ')}" for err in e.errors())
            raise OptionsError(f"invalid options for {self.name}: {problems}") from None

    def run(self, access: Any, data: TuningData, request: FitRequest | None = None,
            options: Mapping[str, Any] | None = None, preset: str | None = None) -> FitResult:
        """Check the criterion, parse the options and fit: the one way callers run a method."""
        request = request or FitRequest()
        self.check_criterion(request.criterion)
        return self.fit(access, data, request, self.parse_options(options, preset))

    def describe(self) -> dict[str, Any]:
        """The method as JSON: what `GET /v1/methods/{name}` and `fairpatch methods show` give."""
        return {"name": self.name, "summary": self.summary, "access": list(self.access),
                "default_access": self.default_access, "criteria": list(self.criteria),
                "group_at_inference": self.group_at_inference,
                "takes_exemplar": self.takes_exemplar, "presets": {k: dict(v) for k, v in self.presets.items()},
                "options": option_rows(self.options), "options_schema": self.options.model_json_schema()}


def option_rows(model: type[BaseModel]) -> list[dict[str, Any]]:
    """name, type, default, description of every option."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        kind = getattr(ann, "__name__", None) if isinstance(ann, type) else None
        rows.append({"name": name, "type": kind or str(ann).replace("typing.", ""),
                     "default": f.get_default(call_default_factory=True), "description": f.description or ""})
    return rows
