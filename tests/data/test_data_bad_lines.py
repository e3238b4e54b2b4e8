"""Real-world click-log damage, one class at a time, in every format where it can happen.

Each case writes a day of good rows in one format, damages one line (or adds one stray file), validates the
partition and checks: the good rows are kept, the bad line is quarantined with its file, line, raw text and
reason (or the file fails as a whole with a clear message where it is not the format at all), and the counts
reconcile for the batch and for every file.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import IngestConfig, ValidationConfig
from pipeline.data import ingest
from pipeline.data.validate import validate
from pipeline.errors import ValidationFailed

DAY = dt.date(2024, 3, 10)
GOOD_ROWS = 200  # one bad line of 201 is 0.5%, under the default max_quarantine_share of 1%
BASE = int(dt.datetime(2024, 3, 10, 1, tzinfo=dt.UTC).timestamp())


def _rows() -> list[tuple[str, str, int]]:
    """(session, item, unix seconds): 50 sessions of 4 events one minute apart, in time order per session."""
    return [(f"s{s}", f"i{(s + k) % 13}", BASE + s * 300 + k * 60) for s in range(50) for k in range(4)]


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# Each format: header line (or None), how a row is written, and its file name.
FORMATS: dict[str, tuple[str | None, Callable[[str, str, int], str], str]] = {
    "gru4rec": ("SessionId\tItemId\tTime", lambda s, i, t: f"{s}\t{i}\t{t}", "clicks.tsv"),
    "rsc15": (None, lambda s, i, t: f"{s},{_iso(t)},{i},0", "clicks.dat"),
    "diginetica": (
        "session_id;user_id;item_id;timeframe;eventdate",
        lambda s, i, t: f"{s};NA;{i};{(t - BASE) * 1000};{DAY.isoformat()}",
        "views.csv",
    ),
    "csv": ("session_id,item_id,timestamp", lambda s, i, t: f"{s},{i},{_iso(t)}", "events.csv"),
}


def _write_day(tmp_path: Path, fmt: str, lines: list[bytes]) -> Path:
    header, _, name = FORMATS[fmt]
    folder = tmp_path / "clicks" / f"dt={DAY.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    head = [header.encode()] if header else []
    (folder / name).write_bytes(b"\n".join(head + lines) + b"\n")
    return folder


def _good_lines(fmt: str) -> list[bytes]:
    row = FORMATS[fmt][1]
    return [row(s, i, t).encode() for s, i, t in _rows()]


def _validate(tmp_path: Path, folder: Path, fmt: str, **validation) -> dict:
    config = ValidationConfig(**validation)
    report = validate([str(folder)], str(tmp_path / "out"), ingest=IngestConfig(format=fmt), validation=config)
    _assert_reconciled(report)
    return report


def _assert_reconciled(report: dict) -> None:
    assert report["reconciled"]
    for part in report["batches"] + [f for b in report["batches"] for f in b.get("file_counts", [])]:
        assert part["rows_in"] == part["rows_valid"] + part["rows_quarantined"] + part["rows_rejected"], part


def _quarantine(tmp_path: Path, report: dict) -> list[dict]:
    table = pq.read_table(tmp_path / "out" / report["batches"][0]["quarantine"])
    return table.set_column(2, "timestamp", table.column("timestamp").cast(pa.int64())).to_pylist()


def _damage(fmt: str, kind: str) -> bytes | None:
    """One damaged line of ``kind`` in format ``fmt`` (None: the class does not apply to the format)."""
    header, row, _ = FORMATS[fmt]
    sep = {"gru4rec": "\t", "rsc15": ",", "diginetica": ";", "csv": ","}[fmt]
    good = row("s99", "i1", BASE + 7200)
    cells = good.split(sep)
    if kind == "too_few_columns":  # a writer that crashed mid-line
        return sep.join(cells[:2]).encode()
    if kind == "too_many_columns":
        # rsc15 has an optional 4th column: its widest good line has 4 cells, so 6 is too many.
        return (good + sep + "x" + (sep + "y" if fmt == "rsc15" else "")).encode()
    if kind == "non_utf8_id":
        return good.replace("i1", "caf\xe9").encode("latin-1")
    if kind == "bad_time":
        time_cell = {"gru4rec": 2, "rsc15": 1, "diginetica": 4, "csv": 2}[fmt]
        cells[time_cell] = "not-a-time"
        return sep.join(cells).encode()
    if kind == "repeated_header":
        return header.encode() if header else None
    raise AssertionError(kind)


EXPECTED_REASON = {
    "too_few_columns": "malformed_row",
    "too_many_columns": "malformed_row",
    "non_utf8_id": "bad_encoding",
    "bad_time": "bad_timestamp",
    "repeated_header": "repeated_header",
}


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [(f, k) for k in EXPECTED_REASON for f in FORMATS if _damage(f, k) is not None],  # rsc15 has no header
)
def test_one_bad_line_is_quarantined_and_the_file_kept(tmp_path: Path, fmt: str, kind: str) -> None:
    bad = _damage(fmt, kind)
    assert bad is not None
    good = _good_lines(fmt)
    position = len(good) if kind == "too_few_columns" else 120  # a truncated line is the last one
    lines = good[:position] + [bad] + good[position:]
    folder = _write_day(tmp_path, fmt, lines)
    report = _validate(tmp_path, folder, fmt)
    assert report["success"], report["failures"]
    assert (report["rows_in"], report["rows_valid"], report["rows_quarantined"]) == (GOOD_ROWS + 1, GOOD_ROWS, 1)
    assert report["quarantine_reasons"] == {EXPECTED_REASON[kind]: 1}
    [row] = _quarantine(tmp_path, report)
    header_lines = 1 if FORMATS[fmt][0] else 0
    assert row["reason"] == EXPECTED_REASON[kind]
    assert row["source"].endswith(FORMATS[fmt][2]) and row["source_row"] == position
    assert row["source_line"] == position + header_lines + 1
    raw = bad.decode("utf-8", "backslashreplace")
    if fmt == "rsc15" and EXPECTED_REASON[kind] != "malformed_row":
        raw = raw.rsplit(",", 1)[0]  # a line read into cells is shown as the cells read (rsc15's category is not)
    assert row["raw"] == raw
    [counts] = report["batches"][0]["file_counts"]
    assert (counts["rows_in"], counts["rows_valid"], counts["rows_quarantined"]) == (GOOD_ROWS + 1, GOOD_ROWS, 1)


def test_many_bad_lines_fail_the_batch_by_share_with_counts(tmp_path: Path) -> None:
    good = _good_lines("gru4rec")
    lines = good + [b"s1\ti1"] * 5 + [b"s2\ti2\tnoon"] * 3
    folder = _write_day(tmp_path, "gru4rec", lines)
    with pytest.raises(ValidationFailed, match=r"rule quarantine_share failed: 8 of 208 rows"):
        validate([str(folder)], str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    _assert_reconciled(report)
    assert report["quarantine_reasons"] == {"malformed_row": 5, "bad_timestamp": 3}
    assert (report["rows_quarantined"], report["rows_rejected"], report["rows_valid"]) == (8, GOOD_ROWS, 0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # Not this format at all: still one clear whole-file error, never a day of quarantined rows.
        ("semicolons.tsv", b"SessionId;ItemId;Time\n1;2;1710000000\n", r"wrong delimiter for the gru4rec format"),
        ("all-ragged.tsv", b"SessionId\tItemId\tTime\n1\t2\n3\t4\n", r"no line has the 3 columns of the header"),
        ("binary.tsv", bytes(range(256)) * 8, r"binary data \(NUL bytes\)"),
        ("nocol.tsv", b"SessionId\tTime\n1\t1710000000\n", r"column item_id: rule required_column"),
    ],
)
def test_a_file_that_is_not_the_format_is_a_whole_file_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    folder = tmp_path / "clicks" / f"dt={DAY}"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(content)
    with pytest.raises(ValidationFailed, match=message):
        validate([str(folder)], str(tmp_path / "out"), ingest=IngestConfig(format="gru4rec"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    _assert_reconciled(report)
    assert report["rows_valid"] == 0


# ---------------------------------------------------------------------------------------------
# Timestamps far out of range: quarantined by the window rule, never a crash


def test_one_row_in_milliseconds_is_quarantined_by_the_window_rule(tmp_path: Path) -> None:
    lines = _good_lines("gru4rec") + [f"s7\ti3\t{(BASE + 60) * 1000}".encode()]  # ms read as seconds: year ~56000
    report = _validate(tmp_path, _write_day(tmp_path, "gru4rec", lines), "gru4rec")
    assert report["success"] and report["quarantine_reasons"] == {"timestamp_window": 1}
    q = pq.read_table(tmp_path / "out" / report["batches"][0]["quarantine"])
    assert q.column("session_id").to_pylist() == ["s7"]
    # Kept as read (beyond Python's datetime, so compared as microseconds): year ~56,000.
    assert q.column("timestamp").cast(pa.int64()).to_pylist() == [(BASE + 60) * 1000 * 1_000_000]


@pytest.mark.parametrize(("unit", "scale", "hint"), [("s", 1000, "ms"), ("s", 1_000_000, "us"), ("ms", 1000, "us")])
def test_a_file_in_a_finer_unit_names_the_setting(tmp_path: Path, unit: str, scale: int, hint: str) -> None:
    factor = {"s": 1, "ms": 1000}[unit]
    lines = [f"{s}\t{i}\t{t * factor * scale}".encode() for s, i, t in _rows()]
    folder = _write_day(tmp_path, "gru4rec", lines)
    with pytest.raises(ValidationFailed, match=rf"set ingest\.timestamp_unit={hint}"):
        validate([str(folder)], str(tmp_path / "out"), ingest=IngestConfig(format="gru4rec", timestamp_unit=unit))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["batches"][0]["status"] == "unreadable" and "ingest.timestamp_unit" in report["failures"][0]


def test_parquet_times_beyond_any_calendar_are_quarantined(tmp_path: Path) -> None:
    rows = _rows()
    folder = tmp_path / "clicks" / f"dt={DAY}"
    folder.mkdir(parents=True)
    seconds = [t for _, _, t in rows] + [(BASE + 60) * 1000, 10**15, -(10**14)]  # ms, far future, far past
    table = pa.table({
        "session_id": [s for s, _, _ in rows] + ["x1", "x2", "x3"],
        "item_id": [i for _, i, _ in rows] + ["i1", "i2", "i3"],
        "timestamp": pa.array(seconds, pa.int64()),
    })  # fmt: skip
    pq.write_table(table, folder / "events.parquet")
    report = _validate(tmp_path, folder, None, max_quarantine_share=0.05)
    assert report["success"] and report["quarantine_reasons"] == {"timestamp_window": 3}
    assert sorted(r["session_id"] for r in _quarantine(tmp_path, report)) == ["x1", "x2", "x3"]


@pytest.mark.parametrize("fmt", ["rsc15", "csv"])
def test_an_iso_year_past_9999_is_a_bad_timestamp(tmp_path: Path, fmt: str) -> None:
    bad = FORMATS[fmt][1]("s98", "i2", BASE).replace("2024-03-10", "12024-03-10").encode()
    report = _validate(tmp_path, _write_day(tmp_path, fmt, _good_lines(fmt) + [bad]), fmt)
    assert report["success"] and report["quarantine_reasons"] == {"bad_timestamp": 1}


# ---------------------------------------------------------------------------------------------
# Empty and whitespace-only ids are missing ids, in every format


@pytest.mark.parametrize("fmt", [*FORMATS, "parquet"])
@pytest.mark.parametrize("column", ["session_id", "item_id"])
def test_blank_ids_are_quarantined_like_nulls(tmp_path: Path, fmt: str, column: str) -> None:
    blanks = [" ", "  ", ""] if fmt == "gru4rec" else [" ", "\t ", ""]  # a tab would split a TSV line
    extra = [(b if column == "session_id" else f"b{k}", b if column == "item_id" else f"i{k}", BASE + k)
             for k, b in enumerate(blanks)]  # fmt: skip
    if fmt == "parquet":
        folder = tmp_path / "clicks" / f"dt={DAY}"
        folder.mkdir(parents=True)
        rows = _rows() + extra
        pq.write_table(pa.table({
            "session_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
            "timestamp": pa.array([r[2] * 1_000_000 for r in rows], pa.timestamp("us", tz="UTC")),
        }), folder / "events.parquet")  # fmt: skip
        report = _validate(tmp_path, folder, None, max_quarantine_share=0.05)
    else:
        row = FORMATS[fmt][1]
        lines = _good_lines(fmt) + [row(s, i, t).encode() for s, i, t in extra]
        report = _validate(tmp_path, _write_day(tmp_path, fmt, lines), fmt, max_quarantine_share=0.05)
    assert report["success"], report["failures"]
    assert report["quarantine_reasons"] == {f"null_{column}": len(blanks)}
    assert report["rows_valid"] == GOOD_ROWS


def test_empty_session_ids_never_become_one_fake_session(tmp_path: Path) -> None:
    rows = _rows() + [("", f"i{k}", BASE + k) for k in range(5)]
    events = pa.table({"session_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                       "timestamp": pa.array([r[2] for r in rows], pa.int64())})  # fmt: skip
    pq.write_table(events, tmp_path / "raw.parquet")
    table = ingest.read_file(str(tmp_path / "raw.parquet"), strict=False).table
    assert table.column("session_id").null_count == 5 and "" not in table.column("session_id").to_pylist()


# ---------------------------------------------------------------------------------------------
# Stray files in a partition folder are skipped and listed, never read as data


def test_non_data_files_in_a_partition_are_skipped_and_listed(tmp_path: Path) -> None:
    folder = _write_day(tmp_path, "gru4rec", _good_lines("gru4rec"))
    (folder / "README.txt").write_text("Exported by the click collector.\nDo not edit.\n")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".clicks.tsv.crc").write_bytes(b"\x00\x01crc")
    (folder / "manifest.json").write_text("{}")
    report = _validate(tmp_path, folder, "gru4rec")
    assert report["success"] and report["rows_valid"] == GOOD_ROWS and report["rows_quarantined"] == 0
    skipped = sorted(Path(f).name for f in report["skipped_files"])
    assert skipped == [".clicks.tsv.crc", "README.txt", "_SUCCESS", "manifest.json"]
    assert report["batches"][0]["files"] == [str(folder / "clicks.tsv")]


def test_blank_lines_before_a_malformed_last_line(tmp_path: Path) -> None:
    """Blank lines are not data lines: skipped, not counted, and line numbers count non-blank lines."""
    lines = _good_lines("gru4rec")[:100] + [b"", b""] + _good_lines("gru4rec")[100:] + [b"", b"s1\ti1"]
    report = _validate(tmp_path, _write_day(tmp_path, "gru4rec", lines), "gru4rec")
    assert report["success"] and (report["rows_in"], report["rows_valid"]) == (GOOD_ROWS + 1, GOOD_ROWS)
    [row] = _quarantine(tmp_path, report)
    non_blank = sum(1 for line in lines if line) + 1  # the header
    assert (row["reason"], row["source_line"], row["raw"]) == ("malformed_row", non_blank, "s1\ti1")
