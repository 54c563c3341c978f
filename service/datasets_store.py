"""Tuning datasets: uploaded as CSV or Parquet, validated, kept in Redis as zstd Parquet (never pickle).

A dataset is a table with one binary label column, one group column (any values: they are the
group names) and feature columns, every one numeric and finite: they are the model's input
features, in column order. `parse_dataset` turns the uploaded bytes into a clean frame and a
summary, or raises `DatasetError` whose message says what to fix (the API answers 400). The job
worker reads a dataset back with `DatasetStore.load` as arrays.

Layout (prefix `fp:`): `dataset:{id}` -> hash {summary: JSON, data: Parquet bytes};
`datasets` -> sorted set of ids scored by upload time.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import time
import uuid
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel
from redis.asyncio import Redis

CSV_TYPES = frozenset({"text/csv", "application/csv", "text/plain"})
PARQUET_TYPES = frozenset({"application/vnd.apache.parquet", "application/x-parquet", "application/parquet"})
MAX_GROUPS = 256  # more distinct values than this is an id column, not a group
_SHOW = 8  # how many column names / values an error message lists


class DatasetError(ValueError):
    """A dataset that cannot be used as uploaded; the message is for the client."""

    status = 400


class DatasetTooLarge(DatasetError):
    """An upload that decodes to more rows, columns or bytes than the gateway accepts."""

    status = 413


class DatasetSummary(BaseModel):
    id: str
    name: str | None = None
    format: str
    rows: int
    columns: list[str]
    features: list[str]
    label: str
    label_values: list[Any]  # the original values mapped to 0 and 1
    label_counts: list[int] | None = None  # rows labelled 0 and 1 (None: stored before it was counted)
    group: str
    groups: list[str]
    group_counts: dict[str, int]
    bytes: int  # size of the upload
    stored_bytes: int
    created_at: float


@dataclass(frozen=True)
class LoadedDataset:
    X: np.ndarray  # float32 [N, d]
    y: np.ndarray  # int64 [N], 0/1
    groups: np.ndarray  # int64 [N], index into group_names
    group_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    summary: DatasetSummary


def _listed(values: list[Any]) -> str:
    shown = ", ".join(repr(v) for v in values[:_SHOW])
    return f"[{shown}{', ...' if len(values) > _SHOW else ''}]"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


# ---------------------------------------------------------------- reading the upload

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class DatasetLimits:
    """What an upload may decode to (the settings `max_dataset_*`), checked while it is read: a small gzip CSV or
    zstd Parquet file can hold far more rows than its size suggests."""

    rows: int = 2_000_000
    columns: int = 10_000
    decoded_bytes: int = 256 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Any) -> DatasetLimits:
        return cls(rows=settings.max_dataset_rows, columns=settings.max_dataset_columns,
                   decoded_bytes=settings.max_dataset_decoded_bytes)

    @staticmethod
    def _refuse(found: str, limit: int, setting: str) -> DatasetTooLarge:
        return DatasetTooLarge(f"the dataset {found}, over the gateway's limit of {limit:,} (FAIRPATCH_{setting}); "
                               "upload a sample of it, or raise that setting")

    def check_rows(self, n: int, exact: bool = True) -> None:
        if n > self.rows:
            raise self._refuse(f"has {n:,} rows" if exact else f"has more than {self.rows:,} rows", self.rows,
                               "MAX_DATASET_ROWS")

    def check_columns(self, n: int) -> None:
        if n > self.columns:
            raise self._refuse(f"has {n:,} columns", self.columns, "MAX_DATASET_COLUMNS")

    def check_bytes(self, n: int, what: str) -> None:
        if n > self.decoded_bytes:
            raise self._refuse(f"decodes to more than {self.decoded_bytes:,} bytes of {what}", self.decoded_bytes,
                               "MAX_DATASET_DECODED_BYTES")


def read_table(data: bytes, content_type: str | None, limits: DatasetLimits | None = None) -> tuple[pd.DataFrame, str]:
    """The uploaded bytes as a frame, and the format name; DatasetError when they are not a readable table,
    DatasetTooLarge as soon as reading them passes one of `limits`."""
    limits = limits or DatasetLimits()
    kind = media_type(content_type)
    if not data:
        raise DatasetError("the uploaded file is empty")
    if kind in PARQUET_TYPES:
        return _read_parquet(data, limits), "parquet"
    if kind in CSV_TYPES:
        if data.startswith(GZIP_MAGIC):  # tune.csv.gz sent as text/csv
            return _read_csv(_gunzip(data, limits), limits), "csv.gz"
        limits.check_bytes(len(data), "CSV text")
        return _read_csv(data, limits), "csv"
    raise DatasetError(f"unsupported content type {kind or '(none)'!r}")  # the endpoint checks this first


def _gunzip(data: bytes, limits: DatasetLimits) -> bytes:
    """The gzip body decompressed (members concatenated, trailing padding allowed, as gzip itself does), refused
    once it passes `limits.decoded_bytes`: reading stops one byte past the cap."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(limits.decoded_bytes + 1)
    except EOFError:
        raise DatasetError("the gzip body is cut short; upload the whole file") from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"the body starts like gzip but does not decompress: {e}") from None
    limits.check_bytes(len(out), "CSV text")
    return out


def _read_csv(data: bytes, limits: DatasetLimits) -> pd.DataFrame:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"the CSV is not valid UTF-8 (byte {e.start} is {data[e.start:e.start + 1]!r}); "
                           "save it as UTF-8 and upload it again") from None
    if not text.strip():
        raise DatasetError("the uploaded CSV is empty")
    try:  # newline="": the csv module sees \n, \r\n and a lone \r (old Mac files) as line ends alike
        header = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as e:
        raise DatasetError(f"the CSV header cannot be read: {e}") from None
    limits.check_columns(len(header))
    dupes = sorted(c for c, n in Counter(header).items() if n > 1)
    if dupes:
        raise DatasetError(f"the CSV header repeats column(s) {_listed(dupes)}; column names must be unique")
    try:  # one row past the cap is enough to refuse: pandas stops reading there
        frame = pd.read_csv(io.StringIO(text, newline=""), low_memory=False, nrows=limits.rows + 1)
    except pd.errors.EmptyDataError:
        raise DatasetError("the uploaded CSV has no columns") from None
    except (pd.errors.ParserError, ValueError, csv.Error) as e:
        raise DatasetError(f"the CSV is malformed: {str(e).strip()}") from None
    limits.check_rows(len(frame), exact=False)
    return frame


def _read_parquet(data: bytes, limits: DatasetLimits) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        meta, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError(f"the body is not a readable Parquet file: {e}") from None
    names = schema.names
    limits.check_columns(len(names))  # what the footer declares, before a row is decoded
    limits.check_rows(meta.num_rows)
    declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    limits.check_bytes(declared, "column data")
    dupes = sorted(c for c, n in Counter(names).items() if n > 1)
    if dupes:
        raise DatasetError(f"the Parquet file repeats column(s) {_listed(dupes)}; column names must be unique")
    batches, rows, size = [], 0, 0
    try:  # and what the pages really hold, batch by batch: a footer can understate them
        for batch in pf.iter_batches(batch_size=65_536):
            rows += batch.num_rows
            size += batch.nbytes
            limits.check_rows(rows, exact=False)
            limits.check_bytes(size, "column data")
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema=schema)
    except DatasetError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError(f"the body is not a readable Parquet file: {e}") from None
    try:
        return table.to_pandas()
    except (pa.ArrowException, ValueError, TypeError) as e:
        raise DatasetError(f"the Parquet file has columns pandas cannot read: {e}") from None


# ---------------------------------------------------------------- validation


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _label_codes(col: pd.Series, label: str) -> tuple[np.ndarray, list[Any]]:
    missing = int(col.isna().sum())
    if missing:
        raise DatasetError(f"label column {label!r} has {missing} missing value(s) (first in row "
                           f"{int(np.flatnonzero(col.isna().to_numpy())[0]) + 1}); every row needs a label")
    values = [_plain(v) for v in pd.unique(col)]
    if len(values) != 2:
        raise DatasetError(f"label column {label!r} must be binary (two distinct values), found {len(values)}: "
                           f"{_listed(values)}")
    numeric = all(isinstance(v, int | float | bool) for v in values)
    if numeric and {float(v) for v in values} == {0.0, 1.0}:
        ordered = sorted(values, key=float)
    else:
        try:
            ordered = sorted(values)
        except TypeError:  # mixed types: order by their text
            ordered = sorted(values, key=str)
    y = (col.to_numpy() == ordered[1]).astype(np.int8) if not numeric else \
        (col.to_numpy(dtype=np.float64) == float(ordered[1])).astype(np.int8)
    return y, ordered


def _group_names(col: pd.Series, group: str) -> pd.Series:
    missing = int(col.isna().sum())
    if missing:
        raise DatasetError(f"group column {group!r} has {missing} missing value(s) (first in row "
                           f"{int(np.flatnonzero(col.isna().to_numpy())[0]) + 1}); every row needs a group")
    names = col.map(lambda v: str(_plain(v)))
    n = names.nunique()
    if n < 2:
        raise DatasetError(f"group column {group!r} has a single group ({names.iloc[0]!r}); fairness needs at "
                           "least two")
    if n > MAX_GROUPS:
        raise DatasetError(f"group column {group!r} has {n} distinct values (at most {MAX_GROUPS}); is it an id "
                           "column rather than a group?")
    return names


def _features(frame: pd.DataFrame, names: list[str]) -> np.ndarray:
    bad = [c for c in names if not (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
           or pd.api.types.is_complex_dtype(frame[c])]
    if bad:
        col = frame[bad[0]]
        example = next((v for v in col if not isinstance(v, int | float | bool | np.number)), col.iloc[0])
        raise DatasetError(f"feature column(s) {_listed(bad)} are not numeric (e.g. {bad[0]!r} has "
                           f"{_plain(example)!r}); every column other than the label and the group is a model "
                           "input and must be a number")
    try:
        with warnings.catch_warnings():  # values past float32's range become inf, reported just below
            warnings.simplefilter("ignore", RuntimeWarning)
            X = frame[names].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"feature columns cannot be read as numbers: {e}") from None
    finite = np.isfinite(X)
    if not finite.all():
        counts = (~finite).sum(0)
        cols = [names[j] for j in np.flatnonzero(counts)]
        j = names.index(cols[0])
        row = int(np.flatnonzero(~finite[:, j])[0])
        raise DatasetError(f"feature column(s) {_listed(cols)} have missing, infinite or out-of-range values "
                           f"({int(counts[j])} in {cols[0]!r}, first in row {row + 1}); fill or drop those rows")
    return X


def parse_dataset(data: bytes, content_type: str | None, label: str, group: str, *,
                  name: str | None = None, limits: DatasetLimits | None = None) -> tuple[bytes, DatasetSummary]:
    """Validate an upload; returns the Parquet bytes to store and the summary (its id filled in)."""
    frame, fmt = read_table(data, content_type, limits)
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    for role, col in (("label", label), ("group", group)):
        if col not in columns:
            raise DatasetError(f"unknown {role} column {col!r}; the file's columns are {_listed(columns)}")
    if label == group:
        raise DatasetError(f"the label and the group are both {label!r}; they must be different columns")
    if len(frame) == 0:
        raise DatasetError("the file has a header but no rows")
    features = [c for c in columns if c not in (label, group)]
    if not features:
        raise DatasetError("the file has no feature columns besides the label and the group")
    y, label_values = _label_codes(frame[label], label)
    groups = _group_names(frame[group], group)
    X = _features(frame, features)

    clean = pd.DataFrame(X, columns=features)
    clean[label] = y
    clean[group] = groups.to_numpy(dtype=object)
    stored = frame_to_parquet(clean)
    counts = groups.value_counts()
    summary = DatasetSummary(
        id=uuid.uuid4().hex, name=name, format=fmt, rows=len(clean), columns=columns, features=features,
        label=label, label_values=label_values, label_counts=[int((y == 0).sum()), int((y == 1).sum())],
        group=group, groups=sorted(counts.index),
        group_counts={str(k): int(v) for k, v in sorted(counts.items())}, bytes=len(data),
        stored_bytes=len(stored), created_at=time.time())
    return stored, summary


def frame_to_parquet(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def to_arrays(stored: bytes, summary: DatasetSummary, group_order: list[str] | None = None) -> LoadedDataset:
    """The stored Parquet as arrays; `group_order` (e.g. the model's known groups) fixes the group ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pq.read_table(pa.BufferReader(stored)).to_pandas()
    names = list(group_order) if group_order else list(summary.groups)
    unknown = sorted(set(summary.groups) - set(names))
    if unknown:
        raise DatasetError(f"the dataset has group(s) {_listed(unknown)} that are not among {_listed(names)}")
    index = {n: i for i, n in enumerate(names)}
    groups = frame[summary.group].map(index).to_numpy(dtype=np.int64)
    X = frame[summary.features].to_numpy(dtype=np.float32)
    y = frame[summary.label].to_numpy(dtype=np.int64)
    return LoadedDataset(X, y, groups, tuple(names), tuple(summary.features), summary)


# ---------------------------------------------------------------- storage


class DatasetNotFound(LookupError):
    pass


class DatasetStore:
    def __init__(self, redis: Redis, prefix: str = "fp:") -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, dataset_id: str) -> str:
        return f"{self.prefix}dataset:{dataset_id}"

    async def put(self, stored: bytes, summary: DatasetSummary) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(summary.id), mapping={"summary": summary.model_dump_json(), "data": stored})
            pipe.zadd(f"{self.prefix}datasets", {summary.id: summary.created_at})
            await pipe.execute()

    async def summary(self, dataset_id: str) -> DatasetSummary:
        raw = await self.redis.hget(self._key(dataset_id), "summary")
        if raw is None:
            raise DatasetNotFound(f"unknown dataset {dataset_id!r}")
        return DatasetSummary.model_validate_json(raw)

    async def list(self, limit: int = 100) -> list[DatasetSummary]:
        ids = await self.redis.zrevrange(f"{self.prefix}datasets", 0, limit - 1)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hget(self._key(i.decode() if isinstance(i, bytes) else i), "summary")
            raws = await pipe.execute()
        return [DatasetSummary.model_validate_json(r) for r in raws if r is not None]

    async def load(self, dataset_id: str, group_order: list[str] | None = None) -> LoadedDataset:
        summary_raw, stored = await self.redis.hmget(self._key(dataset_id), ["summary", "data"])
        if summary_raw is None or stored is None:
            raise DatasetNotFound(f"dataset {dataset_id!r} no longer exists")
        summary = DatasetSummary.model_validate_json(summary_raw)
        return await asyncio.to_thread(to_arrays, stored, summary, group_order)

    async def delete(self, dataset_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(dataset_id))
            pipe.zrem(f"{self.prefix}datasets", dataset_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

