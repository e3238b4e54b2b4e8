"""pipeline.data.validate: the GX suite's rules, quarantine, reconciliation, table-level failures, reports, CLI."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.cli.main import main as cli
from pipeline.config import BuildConfig, IngestConfig, ValidationConfig
from pipeline.data import sessions, validation_output
from pipeline.data import validate as validate_module
from pipeline.data.generate import generate_clicks
from pipeline.data.validate import validate
from pipeline.errors import InputError, ValidationFailed

DAY = dt.date(2024, 3, 10)
LENIENT = ValidationConfig(max_quarantine_share=1.0)


def utc(hh: int, mm: int = 0, day: dt.date = DAY) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=dt.UTC)


def read(path: Path) -> pa.Table:
    return pq.read_table(path)


def listed(out: Path, kind: str, batch: int = 0) -> Path:
    """The ``clean`` or ``quarantine`` file that report.json lists for a batch."""
    return out / json.loads((out / "report.json").read_text())["batches"][batch][kind]


def data_files(out: Path) -> list[str]:
    """Every file under clean/ and quarantine/, relative to ``out``."""
    return sorted(str(p.relative_to(out)) for kind in ("clean", "quarantine") for p in (out / kind).glob("*"))


def reasons(out: Path) -> list[tuple[str, str]]:
    q = read(listed(out, "quarantine"))
    return sorted(zip(q.column("item_id").to_pylist(), q.column("reason").to_pylist(), strict=True), key=str)


def test_clean_batch_passes_and_writes_everything(tmp_path: Path, write_partition, good_day, tree_digest) -> None:
    part = write_partition(good_day())
    before = tree_digest(tmp_path / "clicks")
    report = validate([str(part)], str(tmp_path / "out"))
    assert report["success"] and report["reconciled"]
    assert report["rows_in"] == report["rows_valid"] == 160 and report["rows_quarantined"] == 0
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["rows_valid"] == 160
    assert read(listed(out, "clean")).num_rows == 160
    assert data_files(out) == [report["batches"][0]["clean"]]  # the report lists every data file
    assert not (out / "quarantine").exists()
    assert (out / "data_docs" / "index.html").exists()
    assert list((out / "data_docs" / "validations").rglob("*.html"))
    rules = {e["rule"] for e in report["batches"][0]["expectations"]}
    assert rules == {"required_column", "column_type", "min_rows", "freshness", "null_session_id", "null_item_id",
                     "null_timestamp", "timestamp_window", "duplicate_event", "session_order", "session_length"}  # fmt: skip
    assert tree_digest(tmp_path / "clicks") == before  # the raw input is never modified


def test_row_rules_quarantine_with_reasons(tmp_path: Path, write_partition, good_day, tree_digest) -> None:
    rows = good_day()
    rows += [
        (None, "null-session", utc(12)),
        ("s1", None, utc(12)),
        ("s2", "null-time", None),
        ("s3", "too-old", dt.datetime(1999, 1, 1, tzinfo=dt.UTC)),
        ("s4", "after-end", utc(0, 0, DAY + dt.timedelta(days=1))),  # the partition ends at midnight
        ("s5", "late-arrival", utc(0, 30)),  # earlier than s5's earlier events: out of order
    ]
    rows.append(rows[11])  # an exact duplicate of an earlier event (the last of its session: no order issue)
    rows += [("bot", f"b{k % 3}", utc(5, k % 60)) for k in range(8)]  # a bot-like session (limit 6 below)
    part = write_partition(rows)
    before = tree_digest(part)
    config = ValidationConfig(max_quarantine_share=1.0, max_session_length=6)
    report = validate([str(part)], str(tmp_path / "out"), validation=config)
    got = reasons(tmp_path / "out")
    assert got == sorted(
        [("null-session", "null_session_id"), (None, "null_item_id"), ("null-time", "null_timestamp"),
         ("too-old", "timestamp_window"), ("after-end", "timestamp_window"), ("late-arrival", "session_order"),
         (rows[11][1], "duplicate_event")] + [(f"b{k % 3}", "session_length") for k in range(8)],
        key=str,
    )  # fmt: skip
    assert report["rows_in"] == 160 + 7 + 8 == report["rows_valid"] + report["rows_quarantined"]
    assert report["quarantine_reasons"] == {
        "null_session_id": 1, "null_item_id": 1, "null_timestamp": 1, "timestamp_window": 2,
        "duplicate_event": 1, "session_order": 1, "session_length": 8,
    }  # fmt: skip
    clean = read(listed(tmp_path / "out", "clean"))
    assert clean.num_rows == 160 and clean.column("session_id").null_count == 0
    q = read(listed(tmp_path / "out", "quarantine"))
    assert set(q.column("source").to_pylist()) == {str(part / "events.parquet")}
    assert q.column("source_row").to_pylist()[0] == 160  # row numbers point into the raw file
    assert tree_digest(part) == before


def test_a_row_failing_several_rules_lists_them_all(tmp_path: Path, write_partition, good_day) -> None:
    part = write_partition(good_day() + [(None, None, utc(3))])
    validate([str(part)], str(tmp_path / "out"), validation=LENIENT)
    assert reasons(tmp_path / "out") == [(None, "null_session_id;null_item_id")]


def test_generated_corruption_is_quarantined_exactly(tmp_path: Path) -> None:
    corruption = {"null_session_id": 0.004, "null_item_id": 0.004, "null_timestamp": 0.004, "out_of_window": 0.004,
                  "duplicate": 0.004, "out_of_order": 0.004, "bot_sessions": 1}  # fmt: skip
    generate_clicks(str(tmp_path / "clicks"), days=2, sessions_per_day=400, n_items=200, seed=5, corruption=corruption)
    summary = json.loads((tmp_path / "clicks" / "_generated.json").read_text())
    report = validate([str(tmp_path / "clicks")], str(tmp_path / "out"), validation=ValidationConfig(max_quarantine_share=0.25))
    for batch, part in zip(report["batches"], summary["partitions"], strict=True):
        injected = part["injected"]
        assert batch["rows_in"] == part["rows"]
        assert batch["rows_quarantined"] == part["expected_quarantined"]
        assert batch["quarantine_reasons"] == {
            "null_session_id": injected["null_session_id"], "null_item_id": injected["null_item_id"],
            "null_timestamp": injected["null_timestamp"], "timestamp_window": injected["out_of_window"],
            "duplicate_event": injected["duplicate"], "session_order": injected["out_of_order"],
            "session_length": injected["bot_session_rows"],
        }  # fmt: skip


def test_reruns_are_byte_identical(tmp_path: Path, write_partition, good_day, tree_digest) -> None:
    folder = write_partition(good_day() + [("s1", "dup", utc(2))] * 2)
    validate([str(folder)], str(tmp_path / "a"), validation=LENIENT)
    report = validate([str(folder)], str(tmp_path / "b"), validation=LENIENT)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    data = {k: v for k, v in a.items() if k.startswith(("clean", "quarantine"))}
    assert data == {k: v for k, v in b.items() if k.startswith(("clean", "quarantine"))}  # same names, bytes
    # Each data file is named by its batch and its content: part-<batch>-<first 16 hex of its sha256>.parquet.
    batch = report["batches"][0]
    assert sorted(data) == sorted([batch["clean"], batch["quarantine"]]) == data_files(tmp_path / "b")
    for relative, digest in data.items():
        assert Path(relative).name == f"part-00000-{digest[:16]}.parquet"


def test_clean_files_follow_the_report(tmp_path: Path, write_partition, good_day) -> None:
    root = tmp_path / "clicks"
    days = [DAY, DAY + dt.timedelta(days=1), DAY + dt.timedelta(days=2)]
    for day in days:
        write_partition(good_day(day), day, root=root)
    out = tmp_path / "val"
    validate([str(root)], str(out))
    # A stray file in clean/ (say, of an older version still being deleted on S3) is not an input.
    (out / "clean" / "part-00000-0000000000000000.parquet").write_bytes(b"stale")
    files = validation_output.clean_files(str(out))
    assert files == [str(listed(out, "clean", i)) for i in range(3)]
    assert [Path(f).name[:10] for f in files] == ["part-00000", "part-00001", "part-00002"]  # batch order
    assert sum(pq.read_metadata(f).num_rows for f in files) == 3 * 160
    with pytest.raises(InputError, match=r"not a validation output: no report\.json"):
        validation_output.clean_files(str(tmp_path / "clicks"))
    # Reading the report must not import Great Expectations (seconds of start-up for every build).
    code = (
        "import sys; from pipeline.data import validate; from pipeline.data import validation_output as v; "
        "v.clean_files(sys.argv[1]); print(*sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True, text=True)
    loaded = run.stdout
    assert "pipeline.data.validate" in loaded and "great_expectations" not in loaded


# ---------------------------------------------------------------------------------------------
# Table-level failures: non-zero exit, report written first, message names file, column and rule


def _fails(tmp_path: Path, inputs: list[str], match: str, **config) -> dict:
    out = tmp_path / "out"
    with pytest.raises(ValidationFailed, match=match):
        validate(inputs, str(out), validation=ValidationConfig(**config), ingest=IngestConfig())
    report = json.loads((out / "report.json").read_text())
    assert report["success"] is False and report["reconciled"] is True
    assert report["rows_in"] == report["rows_valid"] + report["rows_quarantined"] + report["rows_rejected"]
    return report


def test_quarantine_share_above_threshold_fails(tmp_path: Path, write_partition, good_day) -> None:
    part = write_partition(good_day() + [(None, "x", utc(3))] * 5)  # 5 of 165 rows: 3% > 1%
    report = _fails(tmp_path, [str(part)], r"dt=2024-03-10/events.parquet: rule quarantine_share failed: 5 of 165 rows \(3.03%\)")
    assert report["rows_quarantined"] == 5 and report["rows_rejected"] == 160 and report["rows_valid"] == 0
    assert not (tmp_path / "out" / "clean").exists()  # a failed batch passes nothing on
    assert read(listed(tmp_path / "out", "quarantine")).num_rows == 5


def test_missing_column_fails(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"session_id": ["a"], "timestamp": pa.array([0], pa.timestamp("us", tz="UTC"))}), tmp_path / "in" / "x.parquet")
    report = _fails(tmp_path, [str(tmp_path / "in")], r"in/x\.parquet: column item_id: rule required_column")
    failed = [e for e in report["batches"][0]["expectations"] if not e["success"]]
    assert [(e["expectation"], e["column"]) for e in failed] == [("expect_column_to_exist", "item_id"), ("expect_column_type_to_be", "item_id")]
    assert report["batches"][0]["status"] == "rejected" and report["rows_rejected"] == 1


def test_wrong_type_fails(tmp_path: Path) -> None:
    path = tmp_path / "in" / "log.tsv"
    path.parent.mkdir()
    # No value of the column is a time: not this format's time column at all (one bad value is quarantined).
    path.write_text("SessionId\tItemId\tTime\n1\t2\tmorning\n1\t3\tnoon\n")
    report = _fails(tmp_path, [str(path)], r"log\.tsv: column timestamp: rule column_type: 'Time' holds no numbers")
    bad = [e for e in report["batches"][0]["expectations"] if not e["success"]]
    assert bad[0]["expectation"] == "expect_column_type_to_be" and bad[0]["observed_value"] == "str"


def test_empty_batch_fails(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "header-only.tsv").write_text("SessionId\tItemId\tTime\n")
    (tmp_path / "in" / "zero-bytes.csv").write_bytes(b"")
    _fails(tmp_path, [str(tmp_path / "in")], r"header-only\.tsv: rule min_rows \(expect_table_row_count_to_be_between\) failed: observed 0")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [b["status"] for b in report["batches"]] == ["failed", "failed"]


def test_stale_partition_fails_freshness(tmp_path: Path, write_partition) -> None:
    part = write_partition([("a", "x", utc(1)), ("a", "y", utc(2))])  # newest event 22 h before the day's end
    _fails(tmp_path, [str(part)], r"column timestamp: rule freshness \(expect_column_max_to_be_between\) failed",
           max_partition_age_days=0.5)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("trunc.parquet", None, r"trunc\.parquet: not a readable Parquet file"),
        ("garbage.csv", bytes(range(256)) * 8, r"garbage\.csv: binary data"),
        ("semicolons.tsv", b"SessionId;ItemId;Time\n1;2;1710000000\n", r"semicolons\.tsv: wrong delimiter"),
        # Not UTF-8 in the header line: the file is not text of this format (a bad byte in a data line is
        # quarantined instead: tests/data/test_data_bad_lines.py).
        ("latin1.tsv", "S\xe9ssionId\tItemId\tTime\n1\tcafe\t1710000000\n".encode("latin-1"), r"latin1\.tsv: not UTF-8"),
    ],
)
def test_unreadable_input_fails_with_a_report(tmp_path: Path, name: str, content: bytes | None, match: str) -> None:
    (tmp_path / "in").mkdir()
    if content is None:
        full = tmp_path / "full.parquet"
        pq.write_table(pa.table({"session_id": ["a"] * 500, "item_id": ["b"] * 500}), full)
        content = full.read_bytes()[:200]
    (tmp_path / "in" / name).write_bytes(content)
    config = {"format": "gru4rec"} if name == "semicolons.tsv" else {}
    out = tmp_path / "out"
    with pytest.raises(ValidationFailed, match=match):
        validate([str(tmp_path / "in")], str(out), ingest=IngestConfig(**config))
    report = json.loads((out / "report.json").read_text())
    assert report["batches"][0]["status"] == "unreadable" and "(rule: readable)" in report["failures"][0]


def test_one_bad_batch_does_not_hide_the_others(tmp_path: Path, write_partition, good_day) -> None:
    root = tmp_path / "clicks"
    write_partition(good_day(), DAY, root=root)
    write_partition(good_day(DAY + dt.timedelta(days=1)) + [(None, "x", utc(3, 0, DAY + dt.timedelta(days=1)))] * 9,
                    DAY + dt.timedelta(days=1), root=root)  # fmt: skip
    report = _fails(tmp_path, [str(root)], "dt=2024-03-11/events.parquet: rule quarantine_share")
    assert [b["status"] for b in report["batches"]] == ["passed", "failed"]
    assert report["rows_valid"] == 160 and listed(tmp_path / "out", "clean").exists()
    assert "clean" not in report["batches"][1] and data_files(tmp_path / "out") == [
        report["batches"][0]["clean"], report["batches"][1]["quarantine"]
    ]  # fmt: skip


def test_diginetica_sample_ingest_validate_build(diginetica, tmp_path: Path) -> None:
    report = validate([str(diginetica)], str(tmp_path / "val"))
    assert report["success"] and report["rows_in"] == 12391 == report["rows_valid"] + report["rows_quarantined"]
    batch = report["batches"][0]
    assert batch["format"] == "diginetica"
    assert {s["rule"] for s in batch["skipped"]} == {"freshness", "session_order"}  # no dt= folder; unordered rows
    manifest = sessions.build_dataset(
        [str(tmp_path / "val")], str(tmp_path / "ds"), build=BuildConfig(test_days=7, valid_days=7, min_item_support=2)
    )
    counts = manifest["counts"]
    assert counts["input"]["events"] == report["rows_valid"] and counts["input"]["sessions"] == 2986
    assert counts["train"]["events"] > 0 and counts["test"]["events"] > 0
    train = sessions.read_split(str(tmp_path / "ds"), "train")
    assert train.column("timestamp").type == pa.timestamp("us", tz="UTC")
    # Within each session the rows are now in time order, although the raw file's were not.
    frame = train.to_pandas()
    assert (frame.groupby("session_id", sort=False).timestamp.diff().dropna() >= dt.timedelta(0)).all()


def test_build_refuses_a_failed_validation(tmp_path: Path, write_partition, good_day) -> None:
    part = write_partition(good_day() + [(None, "x", utc(3))] * 5)
    with pytest.raises(ValidationFailed):
        validate([str(part)], str(tmp_path / "val"))
    with pytest.raises(InputError, match="holds a failed validation"):
        sessions.build_dataset([str(tmp_path / "val")], str(tmp_path / "ds"))
    report_uri = storage.join(str(tmp_path / "val"), "report.json")
    with pytest.raises(InputError, match=re.escape(f"holds a failed validation (see {report_uri})")):
        validation_output.clean_files(str(tmp_path / "val"))


def test_cli_exit_codes_and_contract(tmp_path: Path, write_partition, good_day, capsys) -> None:
    part = write_partition(good_day())
    assert cli(["validate", str(part), "--out", str(tmp_path / "val")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["success"] and summary["rows_valid"] == 160
    assert cli(["build", str(tmp_path / "val"), "--out", str(tmp_path / "ds"), "--test-days", "0.5", "--valid-days", "0",
                "--min-item-support", "1"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["items", "manifest.json", "test", "train", "valid"]
    bad = tmp_path / "bad" / "dt=2024-03-10"
    shutil.copytree(part, bad)
    (bad / "events.parquet").write_bytes(b"not parquet")
    assert cli(["validate", str(bad), "--out", str(tmp_path / "val2")]) == 1
    err = capsys.readouterr().err
    assert "error: validation failed" in err and "not a readable Parquet file" in err and "Traceback" not in err
    assert cli(["build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ds2")]) == 2
    assert "input not found" in capsys.readouterr().err


def test_parallel_workers_give_the_same_result(tmp_path: Path, write_partition, good_day, tree_digest, monkeypatch) -> None:
    root = tmp_path / "clicks"
    for d in range(4):
        day = DAY + dt.timedelta(days=d)
        write_partition(good_day(day, prefix=f"d{d}-") + [(f"d{d}-s1", "dup", utc(2, 0, day))] * 2, day, root=root)
    one = validate([str(root)], str(tmp_path / "one"), validation=ValidationConfig(workers=1, max_quarantine_share=0.05))
    # All batches in the helper process (normally this process works too and takes back unstarted ones).
    monkeypatch.setattr(validate_module, "WORK_IN_PARENT", False)
    two = validate([str(root)], str(tmp_path / "two"), validation=ValidationConfig(workers=2, max_quarantine_share=0.05))
    assert two["workers"] == 2
    strip = lambda r: {k: v for k, v in r.items() if k not in ("created_at", "workers", "config")}  # noqa: E731
    assert strip(one) == strip(two)
    assert {k: v for k, v in tree_digest(tmp_path / "one").items() if not k.startswith(("data_docs", "report"))} == {
        k: v for k, v in tree_digest(tmp_path / "two").items() if not k.startswith(("data_docs", "report"))
    }
    assert len(list((tmp_path / "two" / "data_docs" / "validations").rglob("*.html"))) == 4


DEFERRED_USE = """
import gc
import sys
import pandas as pd
from pipeline.data import gx_runner
context, _ = gx_runner.gx_context()
gc_back_on = gc.isenabled()  # the GC is paused while GX loads, not left off
placeholders = sorted(n for n in gx_runner.DEFERRED_GX_IMPORTS if type(sys.modules[n]).__name__ == "_DeferredModule")
import importlib.util
specs = all(importlib.util.find_spec(n) is not None for n in gx_runner.DEFERRED_GX_IMPORTS)  # no load needed
import great_expectations as gx
import great_expectations.expectations as gxe
# An expectation that needs scipy.stats, run by GX itself: the placeholder must turn into the real module.
frame = pd.DataFrame({"x": [1.0, 2.0, 2.0, 3.0] * 50})
batch = context.data_sources.add_pandas("kl").add_dataframe_asset("a").add_batch_definition_whole_dataframe("b")
result = batch.get_batch(batch_parameters={"dataframe": frame}).validate(
    gxe.ExpectColumnKLDivergenceToBeLessThan(
        column="x", partition_object={"bins": [0.5, 1.5, 2.5, 3.5], "weights": [0.25, 0.5, 0.25]}, threshold=0.1
    )
)
import altair as alt
from scipy import stats
import scipy.stats.distributions
print(placeholders, specs, gc_back_on, result.success, round(float(result.result["observed_value"]), 6), alt.Chart.__name__, stats.norm.name)
"""


def test_imports_deferred_for_gx_load_when_something_uses_them() -> None:
    """GX's imports that the suite never uses start as placeholders; using them (GX included) works as usual.
    Loading GX leaves the garbage collector as it found it."""
    out = subprocess.run([sys.executable, "-c", DEFERRED_USE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['altair', 'scipy.stats'] True True True 0.0 Chart norm", out.stdout
