"""The whole DAG with ``dag.test()`` on generated click logs: real Airflow (SQLite), GX, PyTorch, MLflow (SQLite).

Tiny data and a tiny network keep each run to tens of seconds; what is checked is the orchestration:
promotion across dates, idempotent re-runs, quarantine, and stopping before training on bad data.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.dataset as ds
import pytest
import yaml

from pipeline.data.generate import generate_clicks
from pipeline.flow import embedded

DAY = dt.date(2026, 3, 1)
CONFIG = {
    "airflow": {
        "train_days": 3,
        "retries": 2,  # table-level failures must still fail at the first try
        "retry_delay_minutes": 0.01,
        "grid": {"learning_rate": [0.05, 0.1]},
    },
    "gru4rec": {"layers": [16], "n_epochs": 1, "n_sample": 64, "batch_size": 16},
    "tracking": {"bootstrap_samples": 200, "system_metrics": False},
}


def day(offset: int) -> dt.date:
    return DAY + dt.timedelta(days=offset)


@pytest.fixture
def pipeline_env(
    airflow_home: Path, pipeline_home: Path, monkeypatch: pytest.MonkeyPatch, alert_receivers: Any
) -> dict[str, Any]:
    """A fresh pipeline home with the test config, alerts sent to a real SMTP server and webhook receiver,
    and its click-log root."""
    config = pipeline_home / "pipeline.yaml"
    # No deadline under dag.test(): Airflow 3.3.2's dag.test() fails a DAG with a deadline when the run
    # succeeds (it looks the DeadlineAlert objects up as database ids); tests/stack/test_stack.py covers it.
    alerts = {**alert_receivers.alerts_config(), "deadline_hours": 0}
    config.write_text(yaml.safe_dump({**CONFIG, "alerts": alerts}))
    monkeypatch.setenv("PIPELINE_CONFIG", str(config))
    return {"home": pipeline_home, "clicks": pipeline_home / "data" / "clicks", "alerts": alert_receivers}


def generate(clicks: Path, start: dt.date, days: int, **kwargs: Any) -> dict[str, Any]:
    generate_clicks(
        str(clicks), days=days, start_date=start, sessions_per_day=200, n_items=100, seed=3, **kwargs
    )
    return json.loads((clicks / "_generated.json").read_text())


def mlflow_state() -> dict[str, Any]:
    """Everything a re-run must not change: runs per kind, registry versions and aliases."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.config import TrackingConfig
    from pipeline.tracking import runs as tracking

    experiment = tracking.configure(TrackingConfig())
    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment], max_results=1000)
    versions = client.search_model_versions("name = 'gru4rec'")
    aliases = {}
    for alias in ("champion", "challenger"):
        try:
            aliases[alias] = str(client.get_model_version_by_alias("gru4rec", alias).version)
        except MlflowException:
            aliases[alias] = None
    return {
        "runs": collections.Counter((r.data.tags.get("pipeline.kind"), r.info.status) for r in runs),
        "run_ids": sorted(r.info.run_id for r in runs),
        "versions": sorted((str(v.version), v.run_id) for v in versions),
        "aliases": aliases,
    }


def task_instances(run_id: str) -> dict[str, Any]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.run_id == run_id)).all()
        return {
            (ti.task_id, ti.map_index): {
                "state": str(ti.state),
                "queue": ti.queue,
                "pool": ti.pool,
                "try": ti.try_number,
            }
            for ti in tis
        }


def dag_run_note(run_id: str) -> str | None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(select(DagRun).where(DagRun.run_id == run_id)).note


def asset_events(run_id: str) -> list[dict[str, Any]]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == run_id)).all()
        return [dict(e.extra) for e in events]


def test_two_dates_promote_then_compete_and_a_rerun_changes_nothing(pipeline_env: dict[str, Path]) -> None:
    generate(pipeline_env["clicks"], DAY, 4)
    dag = embedded.load_dag()

    first = embedded.run_dag(dag, day(2))
    assert first.ok, first.failed
    decision = first.summary["decision"]
    assert decision["action"] == "promoted" and decision["champion_version"] is None
    assert first.summary["champion"]["version"] == decision["candidate_version"] == "1"
    assert len(first.summary["trials"]) == 2 and all(t["run_id"] for t in first.summary["trials"])
    # Training went to the GPU queue and pool; everything else to the default queue.
    tis = task_instances(first.run_id)
    assert {(k[1], v["queue"], v["pool"]) for k, v in tis.items() if k[0] == "train"} == {
        (0, "gpu", "gpu"),
        (1, "gpu", "gpu"),
    }
    assert tis[("validate", 0)]["queue"] == "default"
    assert len([k for k in tis if k[0] == "validate"]) == 3  # the 3-day training window, one task per day
    # The summary is the DAG run's note, and build told other DAGs about the new dataset.
    assert dag_run_note(first.run_id) == first.summary["note"]
    assert first.summary["note"].startswith(f"**promoted**: gru4rec v1 is now @champion ({day(2)})")
    dataset_uri = first.summary["dataset"]["uri"]
    assert asset_events(first.run_id) == [
        {"uri": dataset_uri, "date": str(day(2)), "fingerprint": first.summary["dataset"]["fingerprint"],
         "dag_run_id": first.run_id}
    ]  # fmt: skip

    second = embedded.run_dag(dag, day(3))
    assert second.ok, second.failed
    decision = second.summary["decision"]
    # The second date competes with the first date's champion, re-evaluated on the same (new) test data.
    assert decision["champion_version"] == "1" and decision["champion_reevaluated"] is True
    assert decision["action"] in {"promoted", "challenger"}
    assert decision["candidate_version"] == "2"
    assert decision["test"]["n"] > 0 and decision["champion_value"] is not None
    expected_champion = "2" if decision["action"] == "promoted" else "1"
    assert second.summary["champion"]["version"] == expected_champion
    before = mlflow_state()
    assert before["runs"][("training", "FINISHED")] == 4 and before["runs"][("parent", "FINISHED")] == 2
    assert [v for v, _ in before["versions"]] == ["1", "2"]

    rerun = embedded.run_dag(dag, day(2))
    assert rerun.ok, rerun.failed
    assert rerun.run_id != first.run_id  # Airflow replaced the run of that date...
    assert mlflow_state() == before  # ...but no MLflow run, registry version or alias changed
    assert rerun.summary["decision"] == first.summary["decision"]
    assert [t["run_id"] for t in rerun.summary["trials"]] == [t["run_id"] for t in first.summary["trials"]]
    assert all(t["reused"] for t in rerun.summary["trials"])
    assert rerun.summary["dataset"]["fingerprint"] == first.summary["dataset"]["fingerprint"]
    assert pipeline_env["alerts"].posts == pipeline_env["alerts"].mails == []  # nothing failed, nobody was paged


def test_corrupted_rows_are_quarantined_and_training_goes_on(
    pipeline_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    corruption = {"null_item_id": 0.003, "duplicate": 0.003, "out_of_order": 0.002}
    generated = generate(pipeline_env["clicks"], DAY, 3, corruption=corruption)
    dag = embedded.load_dag()

    outcome = embedded.run_dag(dag, day(2), conf={"grid": [{"learning_rate": 0.1}]})
    assert outcome.ok, outcome.failed
    out = pipeline_env["home"] / "output" / "validated"
    for partition in generated["partitions"]:
        assert partition["expected_quarantined"] > 0
        report = json.loads((out / f"dt={partition['date']}" / "report.json").read_text())
        assert report["success"] is True
        assert report["rows_quarantined"] == partition["expected_quarantined"]
        assert (
            report["rows_in"] == report["rows_valid"] + report["rows_quarantined"] + report["rows_rejected"]
        )
        quarantine = ds.dataset(out / f"dt={partition['date']}" / "quarantine").to_table()
        assert quarantine.num_rows == partition["expected_quarantined"]
        assert "reason" in quarantine.column_names
    summary = outcome.summary
    assert summary["dataset"]["rows_quarantined"] == sum(
        p["expected_quarantined"] for p in generated["partitions"]
    )
    assert len(summary["trials"]) == 1 and summary["trials"][0]["metrics"]["mrr_at_20"] > 0
    assert summary["decision"]["action"] == "promoted"
    # The run's own day is above the 0.5% warning share (below the 1% that fails): the watch task warns.
    own = json.loads((out / f"dt={day(2)}" / "report.json").read_text())
    assert 0.005 < own["quarantine_share"] < 0.01
    receivers = pipeline_env["alerts"]
    receivers.wait_for(lambda r: len(r.posts) == 1 and len(r.mails) == 1)
    assert receivers.kinds() == (["quarantine_warning"], ["quarantine_warning"])
    assert receivers.posts[0]["json"]["details"]["report"] == str(out / f"dt={day(2)}" / "report.json")


def test_table_level_failure_stops_before_training_and_registers_nothing(
    pipeline_env: dict[str, Path],
) -> None:
    generate(pipeline_env["clicks"], DAY, 2)
    # The run's own day: 5% of the rows have no session id, far above the 1% quarantine threshold.
    generate(pipeline_env["clicks"], day(2), 1, corruption={"null_session_id": 0.05})
    dag = embedded.load_dag()

    outcome = embedded.run_dag(dag, day(2))
    assert outcome.state == "failed"
    tis = task_instances(outcome.run_id)
    failed = {k: v for k, v in tis.items() if v["state"] == "failed"}
    assert list(failed) == [("validate", 2)]
    assert failed[("validate", 2)]["try"] == 1  # bad data is not retried, although retries=2
    for task_id in ("build", "prepare_trials", "train", "promote", "summary"):
        states = {v["state"] for k, v in tis.items() if k[0] == task_id}
        assert states == {"upstream_failed"}, (task_id, states)
    # The failed partition's report is where the log says, and nothing reached MLflow.
    report = pipeline_env["home"] / "output" / "validated" / f"dt={day(2)}" / "report.json"
    assert json.loads(report.read_text())["success"] is False
    state = mlflow_state()
    assert state["versions"] == [] and state["run_ids"] == []
    assert outcome.summary is None
    # One validation alert, by e-mail and webhook, naming the report and its top quarantine reason.
    receivers = pipeline_env["alerts"]
    receivers.wait_for(lambda r: len(r.posts) == 1 and len(r.mails) == 1)
    assert receivers.kinds() == (["validation_failed"], ["validation_failed"])
    alert = receivers.posts[0]["json"]
    assert f"task validate[2] failed (try 1/3): ValidationFailed: partition {day(2)}" in alert["text"]
    assert alert["details"]["report"] == str(report)
    assert alert["details"]["top_reasons"][0][0] == "null_session_id"
    assert str(report) in receivers.mails[0].body


@pytest.fixture
def airflow_api(airflow_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A real ``airflow api-server`` (REST API only) on the session's metadata DB, and the connection to it."""
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # tokens without credentials (GET /auth/token)
        "AIRFLOW__API_AUTH__JWT_SECRET": "dag-tests-only",
    }
    log = open(tmp_path / "api-server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow", "api-server", "--apps", "core", "--workers", "1", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"airflow api-server did not start:\n{(tmp_path / 'api-server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        monkeypatch.setenv(
            "AIRFLOW_CONN_AIRFLOW_API", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": port})
        )
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the worker it started, nothing else
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_summary_task_sets_the_run_note_through_the_rest_api(
    pipeline_env: dict[str, Path], airflow_api: str
) -> None:
    """In a deployment tasks cannot reach the metadata DB: the note goes through the api-server."""
    generate(pipeline_env["clicks"], DAY, 3)
    dag = embedded.load_dag()
    logical = dt.datetime.combine(day(2), dt.time(), tzinfo=dt.UTC)
    dr = dag.test(logical_date=logical, run_conf={"grid": [{"learning_rate": 0.1}]})  # no embedded.set_note here
    assert str(dr.state) == "success"
    note = dag_run_note(dr.run_id)
    assert note is not None and note.startswith(f"**promoted**: gru4rec v1 is now @champion ({day(2)})")
    summary = json.loads(
        (pipeline_env["home"] / "output" / "runs" / f"dt={day(2)}" / "summary.json").read_text()
    )
    assert note == summary["note"]


def test_a_diverging_trial_fails_the_run_without_retry_and_closes_its_mlflow_runs(
    pipeline_env: dict[str, Path],
) -> None:
    generate(pipeline_env["clicks"], DAY, 3)
    dag = embedded.load_dag()

    outcome = embedded.run_dag(dag, day(2), conf={"grid": [{"learning_rate": 1e30}]})  # the loss diverges
    assert outcome.state == "failed"
    tis = task_instances(outcome.run_id)
    # A NaN loss is not retried (retries=2): the same seed would diverge the same way.
    assert (tis[("train", 0)]["state"], tis[("train", 0)]["try"]) == ("failed", 1)
    assert {tis[("promote", -1)]["state"], tis[("summary", -1)]["state"]} == {"upstream_failed"}
    state = mlflow_state()
    # The trial's run and the DAG run's parent run are closed as failed; nothing was registered.
    assert state["runs"] == collections.Counter({("training", "FAILED"): 1, ("parent", "FAILED"): 1})
    assert state["versions"] == []
    receivers = pipeline_env["alerts"]
    receivers.wait_for(lambda r: len(r.posts) == 1 and len(r.mails) == 1)
    assert receivers.kinds() == (["task_failed"], ["task_failed"])
    assert "task train[0] failed (try 1/3): TrainingError: loss became nan" in receivers.posts[0]["json"]["text"]


@pytest.mark.slow
def test_the_readme_run_command_end_to_end(tmp_path: Path) -> None:
    """``make run`` = ``python -m pipeline demo``: generate, run two dates, print champion and UI commands."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIPELINE_", "MLFLOW_"))}
    args = [
        "--days",
        "4",
        "--sessions-per-day",
        "200",
        "--items",
        "100",
        "--epochs",
        "1",
        "--end-date",
        "2026-03-04",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", *args],
        env={**env, "PIPELINE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "logical date 2026-03-03" in out and "logical date 2026-03-04" in out
    assert "**promoted**: gru4rec v1 is now @champion (2026-03-03)" in out
    assert "champion: models:/gru4rec@champion = version" in out
    assert f"AIRFLOW_HOME={home / 'airflow'}" in out and "airflow standalone" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{home / 'mlflow.db'}" in out
    # Airflow's own chatter went to the log file, not the terminal.
    assert "[DAG TEST]" not in out and "[DAG TEST]" in (home / "logs" / "demo.log").read_text()
    # The runs, with their notes, are in the metadata DB the printed `airflow standalone` command opens.
    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        runs = db.execute(
            "select substr(r.logical_date, 1, 10), r.state, n.content from dag_run r "
            "left join dag_run_note n on n.dag_run_id = r.id where r.dag_id = 'gru4rec_daily' order by 1"
        ).fetchall()
    assert [(d, s) for d, s, _ in runs] == [("2026-03-03", "success"), ("2026-03-04", "success")]
    assert all(note and note.startswith("**") for _, _, note in runs)
