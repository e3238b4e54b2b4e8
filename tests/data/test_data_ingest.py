"""pipeline.data.ingest: every supported format into the canonical schema, and clear errors for unreadable input."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import IngestConfig
from pipeline.data import ingest
from pipeline.data.schema import EVENT_SCHEMA
from pipeline.errors import ConfigError, InputError


def _us(table: pa.Table) -> list[int]:
    return table.column("timestamp").cast(pa.int64()).to_pylist()


def _write(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def test_gru4rec_tsv_keeps_ids_and_exact_times(tmp_path: Path) -> None:
    uri = _write(tmp_path / "log.tsv", "SessionId\tItemId\tTime\n3\t0214716935\t1396437466.94\n3\t214832672\t1396438212.318\n")
    read = ingest.read_file(uri)
    assert read.format == "gru4rec" and read.table.schema == EVENT_SCHEMA
    assert read.table.column("item_id").to_pylist() == ["0214716935", "214832672"]  # original ids, leading zero kept
    assert _us(read.table) == [1396437466_940000, 1396438212_318000]  # rounded, not truncated
    assert read.table.column("user_id").null_count == 2


def test_rsc15_clicks_dat(tmp_path: Path) -> None:
    uri = _write(
        tmp_path / "yoochoose-clicks.dat",
        "1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n2,2014-04-07T13:56:37.614Z,214662742,S\n",
    )
    table = ingest.read_events([uri])
    assert table.column("session_id").to_pylist() == ["1", "1", "2"]
    assert table.column("timestamp")[0].as_py() == dt.datetime(2014, 4, 7, 10, 51, 9, 277000, tzinfo=dt.UTC)


@pytest.mark.parametrize("header", ["session_id;user_id;item_id;timeframe;eventdate", "sessionId;userId;itemId;timeframe;eventdate"])
def test_diginetica_both_header_styles(tmp_path: Path, header: str) -> None:
    uri = _write(tmp_path / "train-item-views.csv", f"{header}\n1;NA;81766;526309;2016-05-09\n2;17;31331;1031018;2016-05-10\n")
    read = ingest.read_file(uri)
    assert read.format == "diginetica" and not read.ordered  # its rows are not in time order by design
    assert read.table.column("user_id").to_pylist() == [None, "17"]
    assert read.table.column("timestamp")[0].as_py() == dt.datetime(2016, 5, 9, tzinfo=dt.UTC) + dt.timedelta(milliseconds=526309)


def test_generic_csv_with_column_map_and_millisecond_times(tmp_path: Path) -> None:
    uri = _write(tmp_path / "export.csv", "visit,product,ms,who\na,p1,1700000000123,u1\na,p2,1700000001123,u1\n")
    config = IngestConfig(column_map={"session_id": "visit", "item_id": "product", "timestamp": "ms", "user_id": "who"}, timestamp_unit="ms")
    table = ingest.read_events([uri], config)
    assert table.column("item_id").to_pylist() == ["p1", "p2"]
    assert _us(table) == [1700000000123000, 1700000001123000]
    assert table.column("user_id").to_pylist() == ["u1", "u1"]


def test_generic_csv_iso_times_and_parquet_naive_times(tmp_path: Path) -> None:
    uri = _write(tmp_path / "a.csv", "session_id,item_id,timestamp\ns,i,2024-01-01T10:00:00+02:00\ns,j,2024-01-01 09:00:00\n")
    assert _us(ingest.read_events([uri])) == [1704096000000000, 1704099600000000]  # +02:00 converted; no zone = UTC
    pq.write_table(
        pa.table({"session_id": [7, 7], "item_id": [1, 2], "timestamp": pa.array([0, 1_000_000_000], pa.timestamp("ns"))}),
        tmp_path / "b.parquet",
    )
    table = ingest.read_events([str(tmp_path / "b.parquet")])
    assert table.schema == EVENT_SCHEMA
    assert table.column("session_id").to_pylist() == ["7", "7"] and _us(table) == [0, 1_000_000]


def test_folders_of_partitions_and_compressed_files(tmp_path: Path) -> None:
    tsv = "SessionId\tItemId\tTime\n1\ta\t1704067200\n"
    _write(tmp_path / "logs" / "dt=2024-01-01" / "part-0.tsv.gz", gzip.compress(tsv.encode()))
    _write(tmp_path / "logs" / "dt=2024-01-02" / "part-0.tsv", tsv.replace("1\ta", "2\tb"))
    _write(tmp_path / "logs" / "dt=2024-01-02" / "_SUCCESS", "")
    batches = ingest.plan_batches([str(tmp_path / "logs")])
    assert [b.name for b in batches] == ["dt=2024-01-01", "dt=2024-01-02"]
    assert batches[0].partition_end == dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
    assert ingest.read_events([str(tmp_path / "logs")]).column("session_id").to_pylist() == ["1", "2"]


def test_user_only_logs_are_sessionized_by_inactivity_gap(tmp_path: Path) -> None:
    rows = "user_id,item_id,timestamp\nu1,a,1000\nu2,x,1100\nu1,b,1500\nu1,c,4000\nu1,d,4100\n"
    uri = _write(tmp_path / "users.csv", rows)
    table = ingest.read_events([uri], IngestConfig(session_gap_minutes=30))
    # u1: 1000, 1500 (gap 500 s) | 4000, 4100 (gap 2500 s > 30 min); u2 alone
    assert table.column("session_id").to_pylist() == ["u1@1000000000", "u2@1100000000", "u1@1000000000", "u1@4000000000", "u1@4000000000"]


def test_format_detection(tmp_path: Path) -> None:
    assert ingest.detect_format("x.csv", b"SessionId\tItemId\tTime\n") == "gru4rec"
    assert ingest.detect_format("x.csv", b"sessionId;userId;itemId;timeframe;eventdate\n") == "diginetica"
    assert ingest.detect_format("x.txt", b"1,2014-04-07T10:51:09.277Z,214536502,0\n") == "rsc15"
    assert ingest.detect_format("x.txt", b"session_id,item_id,timestamp\n") == "csv"
    assert ingest.detect_format("x.bin", b"PAR1....") == "parquet"
    with pytest.raises(ConfigError, match="unknown input format"):
        ingest.read_events([_write(tmp_path / "a.csv", "x\n")], IngestConfig(format="excel"))


# ---------------------------------------------------------------------------------------------
# Unreadable input: a clear error naming the file, never a library traceback


def test_truncated_parquet(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"session_id": ["a"] * 1000, "item_id": ["b"] * 1000, "timestamp": list(range(1000))}), good)
    bad = _write(tmp_path / "bad.parquet", good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file \(truncated or corrupt"):
        ingest.read_events([bad])


@pytest.mark.parametrize("name", ["garbage.csv", "garbage.tsv", "garbage.dat"])
def test_binary_garbage(tmp_path: Path, name: str) -> None:
    uri = _write(tmp_path / name, bytes(range(256)) * 40)
    with pytest.raises(InputError, match=rf"{name}: binary data \(NUL bytes\)"):
        ingest.read_events([uri])


def test_garbage_with_parquet_name(tmp_path: Path) -> None:
    uri = _write(tmp_path / "x.parquet", b"this is not parquet at all" * 10)
    with pytest.raises(InputError, match=r"x\.parquet: not a readable Parquet file"):
        ingest.read_events([uri])


def test_non_utf8_text(tmp_path: Path) -> None:
    uri = _write(tmp_path / "latin1.tsv", "SessionId\tItemId\tTime\n1\tcaf\xe9\t1704067200\n".encode("latin-1"))
    # Strict reading (build, train) names the line and the rule; validation quarantines the line instead.
    with pytest.raises(InputError, match=r"latin1\.tsv: line 2: rule bad_encoding: '1\\tcaf\\\\xe9\\t1704067200'"):
        ingest.read_events([uri])
    header = _write(tmp_path / "header.tsv", "Session\xe9\tItemId\tTime\n1\t2\t1704067200\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"header\.tsv: not UTF-8 text \(invalid byte 0xe9 at offset 7 of the first line"):
        ingest.read_events([header])


def test_non_utf8_beyond_the_sniffed_head(tmp_path: Path) -> None:
    body = "".join(f"1\titem{i}\t1704067200\n" for i in range(8000))  # > 64 KiB of clean text first
    uri = _write(tmp_path / "late.tsv", ("SessionId\tItemId\tTime\n" + body).encode() + b"2\t\xff\xfe\t1704067200\n")
    read = ingest.read_file(uri, strict=False)
    assert read.table.num_rows == 8000 and read.rows_in == 8001
    assert read.rejected.to_pylist() == [
        {"row": 8000, "line": 8002, "reason": "bad_encoding", "raw": "2\t\\xff\\xfe\t1704067200"}
    ]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("log.tsv", "SessionId,ItemId,Time\n1,2,1704067200\n", r"wrong delimiter for the gru4rec format: expected '\\t'"),
        ("views.csv", "session_id,user_id,item_id,timeframe,eventdate\n1,NA,2,3,2016-01-01\n", "wrong delimiter for the diginetica format"),
        ("clicks.dat", "1\t2014-04-07T10:51:09.277Z\t214536502\t0\n", "wrong delimiter or layout for the rsc15 format"),
    ],
)
def test_wrong_delimiter(tmp_path: Path, name: str, text: str, expected: str) -> None:
    uri = _write(tmp_path / name, text)
    fmt = {"log.tsv": "gru4rec", "views.csv": "diginetica", "clicks.dat": "rsc15"}[name]
    with pytest.raises(InputError, match=expected):
        ingest.read_events([uri], IngestConfig(format=fmt))


def test_malformed_rows(tmp_path: Path) -> None:
    uri = _write(tmp_path / "ragged.tsv", "SessionId\tItemId\tTime\n1\t2\t1704067200\n1\t2\t3\t4\n")
    with pytest.raises(InputError, match=r"ragged\.tsv: line 3: rule malformed_row: '1\\t2\\t3\\t4'"):
        ingest.read_events([uri])
    everything_ragged = _write(tmp_path / "all.tsv", "SessionId\tItemId\tTime\n1\t2\n3\t4\n")
    with pytest.raises(InputError, match=r"all\.tsv: malformed gru4rec file: no line has the 3 columns of the header"):
        ingest.read_events([everything_ragged])


def test_missing_column_names_file_column_and_rule(tmp_path: Path) -> None:
    pq.write_table(pa.table({"session_id": ["a"], "timestamp": [1]}), tmp_path / "noitem.parquet")
    with pytest.raises(InputError, match=r"noitem\.parquet: column item_id: rule required_column"):
        ingest.read_events([str(tmp_path / "noitem.parquet")])
    # Lenient reading (what validation does) reports it instead of raising.
    read = ingest.read_file(str(tmp_path / "noitem.parquet"), strict=False)
    assert [(p.column, p.rule) for p in read.problems] == [("item_id", "required_column")]


def test_wrong_type_names_file_column_and_rule(tmp_path: Path) -> None:
    uri = _write(tmp_path / "badtime.tsv", "SessionId\tItemId\tTime\n1\t2\tyesterday\n")
    with pytest.raises(InputError, match=r"badtime\.tsv: column timestamp: rule column_type: 'Time' holds no numbers"):
        ingest.read_events([uri])
    pq.write_table(pa.table({"session_id": ["a"], "item_id": [1.5], "timestamp": [1]}), tmp_path / "floatitem.parquet")
    with pytest.raises(InputError, match=r"floatitem\.parquet: column item_id: rule column_type: 'item_id' is double"):
        ingest.read_events([str(tmp_path / "floatitem.parquet")])


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input not found"):
        ingest.read_events([str(tmp_path / "nothing-here")])
