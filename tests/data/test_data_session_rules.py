"""Whole-session rules over the build's window: validation sees a day at a time, the build sees whole sessions.

A session crossing midnight is two short, in-order pieces to the validation of each day; the build puts it
back together, quarantines it when it is too long or out of order as a whole (with the same rule names as
validation), and its counts reconcile. Also: the build's work folders never outlive it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import BuildConfig, IngestConfig, ValidationConfig
from pipeline.data import sessions
from pipeline.data.validate import validate

DAYS = [dt.date(2024, 3, 10) + dt.timedelta(days=k) for k in range(4)]
LIMIT = ValidationConfig(max_session_length=20)
BUILD = BuildConfig(min_item_support=0)


def _utc(day: dt.date, hh: int, mm: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=dt.UTC)


def _validate_days(tmp_path: Path, write_partition, good_day, extra: dict[dt.date, list[tuple]]) -> list[str]:
    outs = []
    for k, day in enumerate(DAYS):
        part = write_partition(good_day(day, prefix=f"d{k}s") + extra.get(day, []), day)
        out = tmp_path / "validated" / f"dt={day}"
        report = validate([str(part)], str(out), validation=LIMIT)
        assert report["success"] and report["rows_quarantined"] == 0  # each day alone breaks no rule
        outs.append(str(out))
    return outs


def _raw_days(write_partition, good_day) -> str:
    for k, day in enumerate(DAYS):
        part = write_partition(good_day(day, prefix=f"d{k}s"), day)
    return str(part.parent)


def _quarantine(tmp_path: Path, manifest: dict) -> list[dict]:
    return pq.read_table(tmp_path / "ds" / manifest["files"]["quarantine"]["path"]).to_pylist()


def _assert_reconciled(manifest: dict) -> None:
    counts = manifest["counts"]
    dropped = sum(v for k, v in counts["dropped"].items() if k in ("repeats", "short_sessions", "rare_items"))
    assert counts["input"]["events"] == counts["quarantined"]["events"] + dropped + counts["after_filtering"]["events"]


def test_a_session_too_long_only_across_midnight_is_quarantined_whole(tmp_path: Path, write_partition, good_day) -> None:
    # 12 events late on day 1 and 12 early on day 2: each day sees 12 (<= 20), the window sees 24.
    late = [("bot", f"i{k % 9}", _utc(DAYS[1], 23, 40 + k)) for k in range(12)]
    early = [("bot", f"i{k % 9}", _utc(DAYS[2], 0, k)) for k in range(12)]
    outs = _validate_days(tmp_path, write_partition, good_day, {DAYS[1]: late, DAYS[2]: early})
    manifest = sessions.build_dataset(outs, str(tmp_path / "ds"), IngestConfig(), BUILD)
    assert manifest["counts"]["quarantined"] == {"events": 24, "session_order": 0, "session_length": 24}
    rows = _quarantine(tmp_path, manifest)
    assert {r["session_id"] for r in rows} == {"bot"} and {r["reason"] for r in rows} == {"session_length"}
    train = sessions.read_split(str(tmp_path / "ds"), "train")
    assert "bot" not in set(train.column("session_id").to_pylist())
    _assert_reconciled(manifest)
    assert manifest["config"]["session_rules"] == {"max_session_length": 20, "check_order": True}


def test_an_event_out_of_order_across_partitions_is_quarantined(tmp_path: Path, write_partition, good_day) -> None:
    # Day 2's file holds a late-arriving event of a session whose later events were in day 1's file.
    day1 = [("late", "i1", _utc(DAYS[1], 23, 50)), ("late", "i2", _utc(DAYS[1], 23, 55))]
    day2 = [("late", "i3", _utc(DAYS[1], 23, 52)), ("late", "i4", _utc(DAYS[2], 0, 5))]
    outs = _validate_days(tmp_path, write_partition, good_day, {DAYS[1]: day1, DAYS[2]: day2})
    manifest = sessions.build_dataset(outs, str(tmp_path / "ds"), IngestConfig(), BUILD)
    assert manifest["counts"]["quarantined"] == {"events": 1, "session_order": 1, "session_length": 0}
    [row] = _quarantine(tmp_path, manifest)
    assert (row["session_id"], row["item_id"], row["reason"]) == ("late", "i3", "session_order")
    _assert_reconciled(manifest)


def test_unordered_sources_keep_the_order_rule_off_in_the_build(tmp_path: Path, write_partition, good_day) -> None:
    day1 = [("late", "i1", _utc(DAYS[1], 23, 50)), ("late", "i2", _utc(DAYS[1], 23, 55))]
    day2 = [("late", "i3", _utc(DAYS[1], 23, 52))]
    outs = _validate_days(tmp_path, write_partition, good_day, {DAYS[1]: day1, DAYS[2]: day2})
    # The same clean rows, marked as coming from a format without per-session order (as Diginetica's are).
    for out in outs:
        for path in Path(out, "clean").glob("*.parquet"):
            table = pq.read_table(path)
            pq.write_table(table.replace_schema_metadata({b"pipeline.ordered": b"false"}), path)
    manifest = sessions.build_dataset(outs, str(tmp_path / "ds"), IngestConfig(), BUILD)
    assert manifest["counts"]["quarantined"]["events"] == 0 and "quarantine" not in manifest["files"]
    assert manifest["config"]["session_rules"]["check_order"] is False


def test_raw_inputs_get_no_session_rules(tmp_path: Path, write_partition, good_day) -> None:
    manifest = sessions.build_dataset([_raw_days(write_partition, good_day)], str(tmp_path / "ds"), IngestConfig(), BUILD)
    assert manifest["config"]["session_rules"] == {"max_session_length": None, "check_order": False}


def test_stale_work_folders_are_swept_and_fresh_ones_kept(tmp_path: Path, write_partition, good_day) -> None:
    work = tmp_path / "work"
    stale, fresh = work / "pipeline-build-dead1", work / "pipeline-spill-alive"
    for folder in (stale, fresh):
        (folder / "part").mkdir(parents=True)
    old = time.time() - 7 * 3600
    for path in (stale, stale / "part"):
        os.utime(path, (old, old))
    (work / "pipeline-build-not-a-dir").write_text("x")
    sessions.build_dataset([_raw_days(write_partition, good_day)], str(tmp_path / "ds"), IngestConfig(),
                           BuildConfig(min_item_support=0, spill_dir=str(work)))  # fmt: skip
    assert sorted(p.name for p in work.iterdir()) == ["pipeline-build-not-a-dir", "pipeline-spill-alive"]


def test_a_terminated_build_removes_its_work_folder(tmp_path: Path) -> None:
    from pipeline.data.generate import generate_clicks

    data = tmp_path / "clicks"
    generate_clicks(str(data), days=3, sessions_per_day=60_000, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "pipeline", "build", str(data), "--out", str(tmp_path / "ds"),
           "--set", f"build.spill_dir={work}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not any(work.iterdir()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the build ended before it could be stopped: make the input bigger"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(work.iterdir()) == [], json.dumps([p.name for p in work.iterdir()])
