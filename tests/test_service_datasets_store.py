"""Dataset uploads: caps on what an upload decodes to (rows, columns, bytes; CSV, gzip CSV and Parquet), line
endings, gzip. `parse_dataset` directly, and the endpoint over a real gateway on loopback and a real Redis."""

from __future__ import annotations

import gzip
import io

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.app import create_app
from service.datasets_store import DatasetError, DatasetLimits, DatasetTooLarge, parse_dataset
from service.serve_thread import ServerThread
from service.settings import Settings

PARQUET = "application/vnd.apache.parquet"
LF_CSV = b"a,b,label,g\n1,2,0,x\n3,4,1,y\n5,6,1,x\n7,8,0,y\n"


def many_rows_parquet(rows: int = 4_000_000) -> bytes:
    """Millions of constant rows: zstd makes them a file of a few dozen KB."""
    table = pa.table({"f0": np.zeros(rows, np.float32), "f1": np.ones(rows, np.float32),
                      "label": np.zeros(rows, np.int8), "g": pa.array(np.arange(rows) % 2).cast(pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


@pytest.fixture(scope="module")
def huge_parquet() -> bytes:
    data = many_rows_parquet()
    assert len(data) < 200_000
    return data


def test_a_small_parquet_of_millions_of_rows_is_refused_before_it_is_decoded(huge_parquet):
    with pytest.raises(DatasetTooLarge, match=r"4,000,000 rows.*FAIRPATCH_MAX_DATASET_ROWS") as e:
        parse_dataset(huge_parquet, PARQUET, "label", "g")
    assert e.value.status == 413


def test_parquet_column_data_is_capped_while_it_is_read(huge_parquet):
    with pytest.raises(DatasetTooLarge, match="FAIRPATCH_MAX_DATASET_DECODED_BYTES"):
        parse_dataset(huge_parquet, PARQUET, "label", "g", limits=DatasetLimits(rows=10**8, decoded_bytes=10**6))
    wide = pa.table({f"f{i}": [0.0, 1.0] for i in range(30)} | {"label": [0, 1], "g": ["a", "b"]})
    buf = io.BytesIO()
    pq.write_table(wide, buf)
    with pytest.raises(DatasetTooLarge, match="32 columns.*FAIRPATCH_MAX_DATASET_COLUMNS"):
        parse_dataset(buf.getvalue(), PARQUET, "label", "g", limits=DatasetLimits(columns=20))


def test_csv_rows_columns_and_gzip_text_are_capped():
    limits = DatasetLimits(rows=4)
    assert parse_dataset(LF_CSV, "text/csv", "label", "g", limits=limits)[1].rows == 4
    with pytest.raises(DatasetTooLarge, match="more than 4 rows.*FAIRPATCH_MAX_DATASET_ROWS"):
        parse_dataset(LF_CSV + b"9,9,1,x\n", "text/csv", "label", "g", limits=limits)
    with pytest.raises(DatasetTooLarge, match="4 columns.*FAIRPATCH_MAX_DATASET_COLUMNS"):
        parse_dataset(LF_CSV, "text/csv", "label", "g", limits=DatasetLimits(columns=3))
    bomb = gzip.compress(b"a,b,label,g\n" + b"1,2,0,x\n" * 1_000_000)  # 8 MB of text in a few KB
    assert len(bomb) < 100_000
    with pytest.raises(DatasetTooLarge, match="1,000,000 bytes of CSV text.*FAIRPATCH_MAX_DATASET_DECODED_BYTES"):
        parse_dataset(bomb, "text/csv", "label", "g", limits=DatasetLimits(decoded_bytes=1_000_000))


def test_gzip_csv_and_old_mac_line_endings_read_like_plain_csv():
    plain = parse_dataset(LF_CSV, "text/csv", "label", "g")[1]
    for body in (gzip.compress(LF_CSV), LF_CSV.replace(b"\n", b"\r"), LF_CSV.replace(b"\n", b"\r\n"),
                 gzip.compress(LF_CSV[:20]) + gzip.compress(LF_CSV[20:])):  # two gzip members, as `cat` makes
        summary = parse_dataset(body, "text/csv", "label", "g")[1]
        assert (summary.rows, summary.columns, summary.group_counts) == (plain.rows, plain.columns,
                                                                        plain.group_counts)
    assert parse_dataset(gzip.compress(LF_CSV), "text/csv", "label", "g")[1].format == "csv.gz"
    with pytest.raises(DatasetError, match="cut short"):
        parse_dataset(gzip.compress(LF_CSV)[:-12], "text/csv", "label", "g")
    with pytest.raises(DatasetError, match="malformed"):  # a lone \r inside an unclosed quote: 400, not a 500
        parse_dataset(b'a,b,label,g\r1,"2\r3,4,1,y\r', "text/csv", "label", "g")


@pytest.fixture(scope="module")
def client(redis_url, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, max_dataset_columns=50)
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def upload(client, body: bytes, content_type: str = "text/csv") -> httpx.Response:
    return client.post("/v1/datasets", params={"label": "label", "group": "g"}, content=body,
                       headers={"content-type": content_type})


def test_the_endpoint_refuses_past_a_cap_with_413_naming_the_setting(client, huge_parquet):
    r = upload(client, huge_parquet, PARQUET)
    assert r.status_code == 413 and "FAIRPATCH_MAX_DATASET_ROWS" in r.json()["error"]
    header = ",".join(f"f{i}" for i in range(60)) + ",label,g\n"
    r = upload(client, (header + ",".join(["1"] * 60) + ",0,x\n").encode())
    assert r.status_code == 413 and "62 columns" in r.json()["error"]
    assert "FAIRPATCH_MAX_DATASET_COLUMNS" in r.json()["error"]


def test_the_endpoint_takes_gzip_csv_and_cr_line_endings(client):
    r = upload(client, gzip.compress(LF_CSV))
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 4 and r.json()["format"] == "csv.gz"
    r = upload(client, LF_CSV.replace(b"\n", b"\r"))
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 4 and r.json()["group_counts"] == {"x": 2, "y": 2}
