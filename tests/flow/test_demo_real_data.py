"""``make run DATA=<file>`` = ``python -m pipeline demo --data <file>`` on the real samples in ../shared/data.

The demo splits the file into daily Parquet partitions, which carry what the source format implies
(``pipeline.ordered``: Diginetica rows are not time-ordered within a session, so its session-order rule
stays off after the import too), then runs the real DAG with dag.test(). One run and one epoch, and for
Diginetica (142 days, one validation task each) a 30-day window, keep each to about a minute on 2 cores.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def _demo(home: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIPELINE_", "MLFLOW_"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "demo",
            "--data",
            str(data),
            "--runs",
            "1",
            "--epochs",
            "1",
            *args,
        ],
        env={**env, "PIPELINE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check_run(home: Path, fmt: str, ordered: bool, days: int, run_day: str, window: int) -> None:
    imported = home / "data" / "imported"
    partitions = sorted(imported.glob("dt=*"))
    assert len(partitions) == days
    metadata = pq.read_schema(partitions[0] / "events.parquet").metadata
    assert metadata[b"pipeline.format"] == fmt.encode()
    assert metadata[b"pipeline.ordered"] == (b"true" if ordered else b"false")
    # Every day of the window validated without a table-level failure; the order rule followed the format.
    first = (dt.date.fromisoformat(run_day) - dt.timedelta(days=window - 1)).isoformat()
    in_window = [p.name for p in partitions if p.name >= f"dt={first}"]  # the log has days without events
    validated = sorted((home / "output" / "validated").glob("dt=*/report.json"))
    assert [p.parent.name for p in validated] == in_window
    reports = [json.loads(p.read_text()) for p in validated]
    assert all(r["success"] for r in reports)
    rules = {e["rule"] for r in reports for e in r["expectations"]}
    assert ("session_order" in rules) is ordered
    assert not any(r["quarantine_reasons"].get("session_order") for r in reports)
    summary = json.loads((home / "output" / "runs" / f"dt={run_day}" / "summary.json").read_text())
    assert summary["dataset"]["counts"] and summary["trials"] and summary["decision"]["action"]
    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        states = db.execute("select state from dag_run where dag_id = 'gru4rec_daily'").fetchall()
    assert states == [("success",)]


def test_demo_on_the_yoochoose_sample(yoochoose: dict[str, Path], tmp_path: Path) -> None:
    proc = _demo(tmp_path, yoochoose["train"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(gru4rec format) into 6 daily partitions" in proc.stdout
    assert "logical date 2014-04-06" in proc.stdout and "done in" in proc.stdout
    _check_run(tmp_path, "gru4rec", ordered=True, days=6, run_day="2014-04-06", window=6)


def test_demo_on_the_diginetica_sample(diginetica: Path, tmp_path: Path) -> None:
    proc = _demo(tmp_path, diginetica, "--train-days", "30")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(diginetica format) into 142 daily partitions" in proc.stdout
    assert "logical date 2016-06-01" in proc.stdout and "done in" in proc.stdout
    _check_run(tmp_path, "diginetica", ordered=False, days=142, run_day="2016-06-01", window=30)
