"""Late data under ``dag.test()``: the sensor waits (reschedule mode) for a partition that arrives after the
run started, and fails the run with a clear message when one never arrives.

Real Airflow (SQLite), GX, PyTorch and MLflow (SQLite) on tiny generated data; looks every second.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.data.generate import generate_clicks
from pipeline.flow import embedded

DAY = dt.date(2026, 3, 1)
RUN_DAY = DAY + dt.timedelta(days=2)
CONFIG = {
    "airflow": {
        "train_days": 3,
        "retries": 2,  # a partition that never came must still fail at the first try
        "retry_delay_minutes": 0.01,
        "grid": {"learning_rate": [0.1]},
        "partition_poke_minutes": 1 / 60,
        "partition_marker": "_SUCCESS",
    },
    "gru4rec": {"layers": [16], "n_epochs": 1, "n_sample": 64, "batch_size": 16},
    "tracking": {"bootstrap_samples": 200, "system_metrics": False},
}


def _setup(home: Path, monkeypatch: pytest.MonkeyPatch, timeout_s: float) -> tuple[Path, Path]:
    """Three generated days in a staging folder; the first two in the click-log root with their marker."""
    config = home / "pipeline.yaml"
    settings = json.loads(json.dumps(CONFIG))
    settings["airflow"]["partition_timeout_hours"] = timeout_s / 3600
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("PIPELINE_CONFIG", str(config))
    staging, clicks = home / "staging", home / "data" / "clicks"
    generate_clicks(str(staging), days=3, start_date=DAY, sessions_per_day=200, n_items=100, seed=3)
    clicks.mkdir(parents=True)
    for offset in (0, 1):
        day = f"dt={DAY + dt.timedelta(days=offset)}"
        shutil.move(staging / day, clicks / day)
        (clicks / day / "_SUCCESS").touch()
    return staging / f"dt={RUN_DAY}", clicks / f"dt={RUN_DAY}"


def _record(home: Path) -> dict[str, Any] | None:
    path = home / "output" / "runs" / f"dt={RUN_DAY}" / "partition_wait.json"
    return json.loads(path.read_text()) if path.exists() else None


def _looks_after(home: Path, checked_at: str | None, deadline: float) -> str:
    """Wait for the sensor's next look (its record is rewritten at every look); return its time."""
    while True:
        record = _record(home)
        if record and record["state"] == "waiting" and record["checked_at"] != checked_at:
            return record["checked_at"]
        if time.monotonic() > deadline:
            raise TimeoutError("the sensor did not look again")
        time.sleep(0.1)


def _reschedules(run_id: str, task_id: str) -> int:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.scalar(
            select(func.count())
            .select_from(TaskReschedule)
            .join(TaskInstance, TaskInstance.id == TaskReschedule.ti_id)
            .where(TaskInstance.run_id == run_id, TaskInstance.task_id == task_id)
        )


def _states(run_id: str) -> dict[str, tuple[str, int]]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.run_id == run_id)).all()
        return {ti.task_id: (str(ti.state), ti.try_number) for ti in tis if ti.map_index < 1}


def test_a_partition_that_arrives_after_the_run_started_is_waited_for(
    airflow_home: Path, pipeline_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged, target = _setup(pipeline_home, monkeypatch, timeout_s=300)
    late_writer: list[BaseException] = []  # the writer thread's error, re-raised here

    def arrive() -> None:
        try:
            deadline = time.monotonic() + 120
            seen = _looks_after(pipeline_home, None, deadline)
            shutil.move(staged, target)  # the data lands, its writer has not finished yet...
            _looks_after(pipeline_home, seen, deadline)  # ...so the next look still waits (no marker)
            (target / "_SUCCESS").touch()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            late_writer.append(exc)

    writer = threading.Thread(target=arrive, daemon=True)
    writer.start()
    outcome = embedded.run_dag(embedded.load_dag(), RUN_DAY)
    writer.join(timeout=5)
    assert not late_writer, late_writer
    assert outcome.ok, outcome.failed

    record = _record(pipeline_home)
    assert record["state"] == "ready" and record["marker"] == "_SUCCESS"
    # Reschedule mode: the sensor gave its worker slot back between looks (one reschedule per look).
    assert _reschedules(outcome.run_id, "wait_for_partition") >= 2
    assert _states(outcome.run_id)["wait_for_partition"] == ("success", 1)
    waited = outcome.summary["partitions_waited"]
    assert [(w["date"], w["uri"]) for w in waited] == [(str(RUN_DAY), str(target))]
    assert waited[0]["waited_s"] >= 1.0 and waited[0]["waited_s"] == record["waited_s"]
    assert (
        len([t for t in outcome.task_states if t.startswith("validate")]) == 3
    )  # the late day was validated


def test_a_partition_that_never_arrives_fails_the_run_with_a_clear_message(
    airflow_home: Path, pipeline_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, target = _setup(pipeline_home, monkeypatch, timeout_s=3)
    (pipeline_home / "data" / "clicks" / f"dt={DAY + dt.timedelta(days=1)}" / "_SUCCESS").unlink()
    terminal = io.StringIO()

    with embedded.progress_listener(terminal):
        # Two required days: the day before has data but its writer never finished; the run's day never came.
        outcome = embedded.run_dag(
            embedded.load_dag(), RUN_DAY, conf={"window_start": str(DAY + dt.timedelta(days=1))}
        )

    assert outcome.state == "failed"
    states = _states(outcome.run_id)
    assert states["wait_for_partition"] == ("failed", 1)  # not retried, although retries=2
    assert {states[t][0] for t in ("partitions", "validate", "build", "summary")} == {"upstream_failed"}
    line = next(line for line in terminal.getvalue().splitlines() if "FAILED wait_for_partition" in line)
    previous = target.parent / f"dt={DAY + dt.timedelta(days=1)}"
    assert (
        f"no partition dt={DAY + dt.timedelta(days=1)}, dt={RUN_DAY} after 3 s: {previous} exists but "
        f"its completion marker _SUCCESS is missing; {target} does not exist "
        "(airflow.partition_timeout_hours=0.000833333; clear the task to wait again)"
    ) in line, line
    assert _record(pipeline_home)["state"] == "timed_out"
