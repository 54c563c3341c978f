"""Adult, COMPAS and German credit: loading, literature preprocessing, deterministic splits, encoder.

The files ship as package data (`patcher/data/`, sources and licences in its README). Every split
is deterministic: Adult's own test file is its test split; COMPAS and German are split 60/20/20.
All splits are stratified by (group, label) so small groups keep their share.

The encoder (one-hot + standardisation) is fitted on the train split only and is plain JSON, so a
reference model's expected input can be rebuilt anywhere without pickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd

from patcher.tuning import stratified_split

DATASETS = ("adult", "compas", "german")


@dataclass(frozen=True)
class SensitiveSpec:
    """How a sensitive attribute maps rows to groups. Group 0 is always the unprivileged one."""

    column: str  # raw column the attribute is read from
    group_names: tuple[str, ...]
    privileged: str
    encoded_columns: tuple[str, ...]  # raw columns that carry the attribute (dropped with --drop-sensitive)
    to_group: Callable[[pd.Series], np.ndarray] = lambda col: col.to_numpy()  # raw value -> group name
    # the privileged raw category when every category is a group (`attr:all`); None: no such form
    privileged_value: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    label: str
    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    sensitive: dict[str, SensitiveSpec]
    default_sensitive: str


SPECS: dict[str, DatasetSpec] = {
    "adult": DatasetSpec(
        name="adult",
        label="income",
        categorical=("workclass", "education", "marital_status", "occupation", "relationship", "race",
                     "sex", "native_country"),
        numeric=("age", "education_num", "capital_gain", "capital_loss", "hours_per_week"),
        sensitive={
            "sex": SensitiveSpec("sex", ("Female", "Male"), "Male", ("sex",), privileged_value="Male"),
            "race": SensitiveSpec("race", ("Non-white", "White"), "White", ("race",),
                                  lambda c: np.where(c == "White", "White", "Non-white"), "White"),
        },
        default_sensitive="sex",
    ),
    "compas": DatasetSpec(
        name="compas",
        label="two_year_recid",
        categorical=("sex", "age_cat", "race", "c_charge_degree"),
        numeric=("age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count"),
        sensitive={
            "race": SensitiveSpec("race", ("African-American", "Other"), "Other", ("race",),
                                  lambda c: np.where(c == "African-American", "African-American", "Other"),
                                  "Caucasian"),
            "sex": SensitiveSpec("sex", ("Male", "Female"), "Female", ("sex",), privileged_value="Female"),
        },
        default_sensitive="race",
    ),
    "german": DatasetSpec(
        name="german",
        label="credit",
        categorical=("status", "credit_history", "purpose", "savings", "present_employment",
                     "status_sex", "other_debtors", "property", "installment_plans", "housing", "job",
                     "telephone", "foreign_worker"),
        numeric=("month", "credit_amount", "installment_rate", "present_residence", "age",
                 "number_of_credits", "people_liable"),
        sensitive={
            "age": SensitiveSpec("age", ("<=25", ">25"), ">25", ("age",), lambda c: np.where(c > 25, ">25", "<=25")),
            "sex": SensitiveSpec("status_sex", ("female", "male"), "male", ("status_sex",),
                                 lambda c: np.where(c.str.startswith("female"), "female", "male")),
        },
        default_sensitive="age",
    ),
}


def _read(file: str) -> pd.DataFrame:
    with resources.files("patcher.data").joinpath(file).open("rb") as fh:
        return pd.read_csv(fh, compression="gzip", skipinitialspace=True)


def _adult(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.drop(columns=["fnlwgt"]).dropna().reset_index(drop=True)
    frame["income"] = (frame["income"].str.strip().str.rstrip(".") == ">50K").astype(np.int64)
    return frame


def _compas(frame: pd.DataFrame) -> pd.DataFrame:
    # ProPublica's filter; decile_score / score_text are the audited tool's output, never features.
    keep = (
        frame["days_b_screening_arrest"].between(-30, 30)
        & (frame["is_recid"] != -1)
        & (frame["c_charge_degree"] != "O")
        & frame["score_text"].notna()
        & (frame["score_text"] != "N/A")
    )
    cols = ["sex", "age", "age_cat", "race", "juv_fel_count", "juv_misd_count", "juv_other_count",
            "priors_count", "c_charge_degree", "two_year_recid"]
    return frame.loc[keep, cols].reset_index(drop=True).astype({"two_year_recid": np.int64})


def _german(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["credit"] = (frame["credit"] == "good").astype(np.int64)
    frame["telephone"] = frame["telephone"].astype(str)
    frame["foreign_worker"] = frame["foreign_worker"].astype(str)
    return frame


@lru_cache(maxsize=8)
def load_frames(name: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The preprocessed frame(s): (train file, test file or None)."""
    if name == "adult":
        return _adult(_read("adult.train.csv.gz")), _adult(_read("adult.test.csv.gz"))
    if name == "compas":
        return _compas(_read("compas-scores-two-years.csv.gz")), None
    if name == "german":
        return _german(_read("german.csv.gz")), None
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def group_codes(frame: pd.DataFrame, spec: SensitiveSpec) -> np.ndarray:
    """Group id per row: index into `spec.group_names` (0 = unprivileged)."""
    values = spec.to_group(frame[spec.column])
    lookup = {g: i for i, g in enumerate(spec.group_names)}
    codes = np.array([lookup.get(v, -1) for v in values], dtype=np.int64)
    if (codes < 0).any():
        raise ValueError(f"rows with {spec.column} outside {spec.group_names}")
    return codes


@dataclass
class TabularEncoder:
    """One-hot for categoricals (train categories only; unseen -> all zeros), z-score for numerics."""

    categories: dict[str, list[str]] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, frame: pd.DataFrame, categorical: list[str], numeric: list[str]) -> TabularEncoder:
        cats = {c: sorted(frame[c].astype(str).unique().tolist()) for c in categorical}
        means = {c: float(frame[c].mean()) for c in numeric}
        stds = {c: float(frame[c].std(ddof=0)) or 1.0 for c in numeric}
        return cls(cats, means, stds)

    @property
    def feature_names(self) -> list[str]:
        names = list(self.means)
        for col, cats in self.categories.items():
            names += [f"{col}={v}" for v in cats]
        return names

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        parts = [((frame[c].to_numpy(np.float64) - self.means[c]) / self.stds[c])[:, None] for c in self.means]
        for col, cats in self.categories.items():
            values = frame[col].astype(str).to_numpy()
            parts.append((values[:, None] == np.asarray(cats)[None, :]).astype(np.float64))
        return np.hstack(parts).astype(np.float32)

    def to_json(self) -> str:
        # key order is feature order: never sort
        return json.dumps({"categories": self.categories, "means": self.means, "stds": self.stds})

    @classmethod
    def from_json(cls, text: str) -> TabularEncoder:
        d = json.loads(text)
        return cls(d["categories"], d["means"], d["stds"])


def feature_columns(feature_names: list[str], columns: list[str]) -> list[int]:
    """Encoded feature indices of raw columns (a numeric column, or every one-hot `col=value`)."""
    idx = [i for i, n in enumerate(feature_names) if n in columns or n.split("=", 1)[0] in columns]
    missing = [c for c in columns if not any(n == c or n.startswith(c + "=") for n in feature_names)]
    if missing:
        raise ValueError(f"no such column(s) {missing}; the model's inputs come from "
                         f"{sorted({n.split('=', 1)[0] for n in feature_names})}")
    return idx


# ---------------------------------------------------------------- many-valued and intersectional groups
# `--sensitive` spelling: one attribute as in SPECS (binary, as every figure so far), `attr:all` for every
# category of the attribute, and several of either joined by commas for their product (`sex,race:all`).
ALL = ":all"
CELL_JOIN = " & "  # "Female & White": one group of an intersectional spec
# A cell is measurable when its tune rows can carry a selection rate and both error rates: at least
# MIN_CELL_ROWS rows and MIN_CELL_LABEL of each label. Cells below that are pooled into one "other (...)"
# group; while the pool is still too small, the smallest measurable cell joins it.
MIN_CELL_ROWS = 50
MIN_CELL_LABEL = 5


@dataclass(frozen=True)
class GroupSpec:
    """A parsed sensitive spec: (attribute, its SensitiveSpec, every category?) per part; groups = product."""

    dataset: str
    parts: tuple[tuple[str, SensitiveSpec, bool], ...]

    @property
    def name(self) -> str:
        return ",".join(attr + (ALL if every else "") for attr, _, every in self.parts)

    @property
    def encoded_columns(self) -> tuple[str, ...]:
        return tuple(c for _, sens, _ in self.parts for c in sens.encoded_columns)

    def part_values(self, frame: pd.DataFrame) -> list[np.ndarray]:
        return [frame[sens.column].astype(str).to_numpy() if every else np.asarray(sens.to_group(frame[sens.column]))
                for _, sens, every in self.parts]

    def cells(self, frame: pd.DataFrame) -> np.ndarray:
        """The raw cell of every row, e.g. "Female & White"."""
        values = self.part_values(frame)
        out = values[0].astype(object)
        for v in values[1:]:
            out = out + CELL_JOIN + v.astype(object)
        return out

    def cell_order(self, frame: pd.DataFrame) -> list[str]:
        """The cells present in `frame`, in product order (each part's categories sorted, binary parts as in
        SPECS)."""
        present = set(self.cells(frame).tolist())
        order = [""]
        for (_, sens, every), values in zip(self.parts, self.part_values(frame), strict=True):
            cats = sorted(set(values.tolist())) if every else list(sens.group_names)
            order = [f"{o}{CELL_JOIN if o else ''}{c}" for o in order for c in cats]
        return [c for c in order if c in present]

    @property
    def privileged_cell(self) -> str:
        return CELL_JOIN.join((sens.privileged_value or sens.privileged) if every else sens.privileged
                              for _, sens, every in self.parts)


def parse_sensitive(dataset: str, text: str) -> GroupSpec:
    """`sex`, `race:all`, `sex,race`, `sex,race:all` -> GroupSpec; unknown attributes are errors that list the
    choices."""
    spec = SPECS[dataset]
    parts = []
    for raw in text.split(","):
        attr = raw.strip()
        every = attr.endswith(ALL)
        attr = attr[: -len(ALL)] if every else attr
        if attr not in spec.sensitive:
            raise ValueError(f"{dataset} has no sensitive attribute {attr!r}; choose from "
                             f"{', '.join(spec.sensitive)} (each may be `NAME{ALL}` for every category, and "
                             "several joined by commas for their intersection, e.g. sex,race)")
        sens = spec.sensitive[attr]
        if every and (sens.privileged_value is None or sens.column not in spec.categorical):
            raise ValueError(f"{dataset}'s {attr!r} has no many-valued form (its column {sens.column!r} is not "
                             f"a plain category); use {attr!r}")
        if any(a == attr for a, _, _ in parts):
            raise ValueError(f"sensitive attribute {attr!r} given twice in {text!r}")
        parts.append((attr, sens, every))
    if not parts:
        raise ValueError("empty sensitive spec")
    return GroupSpec(dataset, tuple(parts))


def merge_small_cells(counts: dict[str, tuple[int, int]], order: list[str]) -> tuple[list[str], list[str]]:
    """(kept cells, pooled cells) from each cell's (negatives, positives) on the tune rows (rule above)."""
    def measurable(neg: int, pos: int) -> bool:
        return neg + pos >= MIN_CELL_ROWS and min(neg, pos) >= MIN_CELL_LABEL

    kept = [c for c in order if measurable(*counts.get(c, (0, 0)))]
    pooled = [c for c in order if c not in kept]
    while pooled and kept:
        neg = sum(counts.get(c, (0, 0))[0] for c in pooled)
        pos = sum(counts.get(c, (0, 0))[1] for c in pooled)
        if measurable(neg, pos):
            break
        smallest = min(kept, key=lambda c: sum(counts[c]))
        kept.remove(smallest)
        pooled = [c for c in order if c in pooled or c == smallest]
    if len(kept) + bool(pooled) < 2:
        raise ValueError(f"fewer than two measurable groups among {order} (each needs {MIN_CELL_ROWS} tune rows "
                         f"and {MIN_CELL_LABEL} of each label); use a coarser sensitive spec")
    return kept, pooled


def pooled_name(pooled: list[str]) -> str:
    return f"other ({' | '.join(pooled)})"


@dataclass(frozen=True)
class Split:
    X: np.ndarray  # encoded features, float32 [N, d]: the reference model's input
    y: np.ndarray  # labels, int64 [N]
    groups: np.ndarray  # group ids, int64 [N]
    frame: pd.DataFrame  # the raw rows, for proxies and reports

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    name: str
    sensitive: str
    group_names: tuple[str, ...]
    privileged: str
    drop_sensitive: bool
    encoder: TabularEncoder
    train: Split
    tune: Split
    test: Split
    merged: tuple[str, ...] = ()  # many-valued specs: the raw cells pooled into the "other (...)" group

    @property
    def feature_names(self) -> list[str]:
        return self.encoder.feature_names

    @property
    def n_features(self) -> int:
        return self.train.X.shape[1]


SPLIT_SEED = 0  # the splits never move with a method's seed: every run is scored on the same rows


def load_dataset(name: str, sensitive: str | None = None, drop_sensitive: bool = False) -> Dataset:
    """Preprocessed, split and encoded dataset. `drop_sensitive` removes the attribute's columns."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = SPECS[name]
    sensitive = sensitive or spec.default_sensitive
    if sensitive not in spec.sensitive:
        return _load_groups(parse_sensitive(name, sensitive), drop_sensitive)
    sens = spec.sensitive[sensitive]
    full, test_file = load_frames(name)
    frames = _split_frames(spec, full, test_file, group_codes(full, sens))
    encoder, splits = _encode(spec, frames, sens.encoded_columns if drop_sensitive else (),
                              lambda f: group_codes(f, sens))
    return Dataset(name, sensitive, sens.group_names, sens.privileged, drop_sensitive, encoder, *splits)


def _split_frames(spec: DatasetSpec, full: pd.DataFrame, test_file: pd.DataFrame | None,
                  strata: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, tune, test) frames, stratified by (strata, label) with the fixed split seed; a dataset that ships
    its own test file keeps it and splits the rest 70/30."""
    y = full[spec.label].to_numpy()
    if test_file is not None:
        train_idx, tune_idx = stratified_split(y, strata, (0.7, 0.3), SPLIT_SEED)
        return full.iloc[train_idx], full.iloc[tune_idx], test_file
    train_idx, tune_idx, test_idx = stratified_split(y, strata, (0.6, 0.2, 0.2), SPLIT_SEED)
    return full.iloc[train_idx], full.iloc[tune_idx], full.iloc[test_idx]


def _encode(spec: DatasetSpec, frames: tuple[pd.DataFrame, ...], dropped: Iterable[str],
            codes: Callable[[pd.DataFrame], np.ndarray]) -> tuple[TabularEncoder, list[Split]]:
    """The encoder fitted on the training frame (without the `dropped` columns) and every frame as a Split."""
    dropped = set(dropped)
    categorical = [c for c in spec.categorical if c not in dropped]
    numeric = [c for c in spec.numeric if c not in dropped]
    encoder = TabularEncoder.fit(frames[0], categorical, numeric)
    return encoder, [Split(encoder.transform(f), f[spec.label].to_numpy(np.int64), codes(f), f.reset_index(drop=True))
                     for f in frames]


def _load_groups(gs: GroupSpec, drop_sensitive: bool) -> Dataset:
    """A many-valued or intersectional spec: split stratified by (raw cell, label), then cells too small on the
    tune split pooled (merge_small_cells), then encoded like load_dataset."""
    spec = SPECS[gs.dataset]
    full, test_file = load_frames(gs.dataset)
    order = gs.cell_order(full)
    lookup = {c: i for i, c in enumerate(order)}
    frames = _split_frames(spec, full, test_file, np.array([lookup[c] for c in gs.cells(full)], np.int64))
    tune_cells, tune_y = gs.cells(frames[1]), frames[1][spec.label].to_numpy()
    counts = {c: (int(np.sum((tune_cells == c) & (tune_y == 0))), int(np.sum((tune_cells == c) & (tune_y == 1))))
              for c in order}
    kept, pooled = merge_small_cells(counts, order)
    names = tuple(kept) + ((pooled_name(pooled),) if pooled else ())
    to_name = {c: c for c in kept} | {c: pooled_name(pooled) for c in pooled}
    index = {n: i for i, n in enumerate(names)}

    def codes(frame: pd.DataFrame) -> np.ndarray:
        cells = gs.cells(frame)
        unknown = sorted(set(cells.tolist()) - set(to_name))
        if unknown:
            raise ValueError(f"rows in cells {unknown} that the {gs.name!r} groups do not cover")
        return np.array([index[to_name[c]] for c in cells], np.int64)

    encoder, splits = _encode(spec, frames, gs.encoded_columns if drop_sensitive else (), codes)
    if gs.privileged_cell not in to_name:  # the signed (AIF360) metrics compare against it: never guess
        raise ValueError(f"the privileged cell {gs.privileged_cell!r} of {gs.name!r} is not among its groups {names}")
    privileged = to_name[gs.privileged_cell]
    return Dataset(gs.dataset, gs.name, names, privileged, drop_sensitive, encoder, *splits, merged=tuple(pooled))
