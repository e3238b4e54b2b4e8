"""Every alert kind, built by pipeline.flow.alerts and pipeline.flow.watch from real inputs (GX reports, MLflow decision records, the
deadline callback's context) and delivered through Airflow notifiers to a real SMTP server and a real
webhook receiver on 127.0.0.1 (tests/alert_receivers.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alert_receivers import RECIPIENTS, SENDER, SMTP_CONN_ID, WEBHOOK_CONN_ID, WEBHOOK_PATH, WEBHOOK_TOKEN

from pipeline.config import AlertsConfig, PipelineConfig, ValidationConfig, from_mapping
from pipeline.data.generate import generate_clicks
from pipeline.errors import TrainingError, ValidationFailed
from pipeline.flow import alerts, notify, watch
from pipeline.flow.contracts import RunPlan

DAY = dt.date(2026, 3, 1)
CHANNELS = notify.Channels(RECIPIENTS, "", SMTP_CONN_ID, WEBHOOK_CONN_ID)


@dataclass
class TaskInstance:
    """The attributes Airflow's runtime task instance gives a failure callback (and its XCom pull)."""

    task_id: str
    map_index: int
    dag_id: str = "gru4rec_daily"
    run_id: str = "scheduled__2026-03-01T00:00:00+00:00"
    try_number: int = 3
    max_tries: int = 2
    log_url: str = "http://airflow.test/log"
    partitions: list[dict[str, Any]] | None = None

    def xcom_pull(self, task_ids: str) -> Any:
        if self.partitions is None:
            raise KeyError(task_ids)
        assert task_ids == "partitions"
        return self.partitions


def _run(dag_id: str, run_id: str) -> RunPlan:
    """A run's plan with what the alerts read (DAG, run, first day of its window); the rest left empty."""
    day = str(DAY)
    return RunPlan(dag_id, run_id, day, day, day, "", "", "", "", "", trials=[], config={})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    for var in ("PIPELINE_CONFIG", "MLFLOW_TRACKING_URI", "PIPELINE_OUTPUT_URI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def _validated(tmp_path: Path, corruption: dict[str, float]) -> tuple[str, ValidationFailed | None]:
    """Validate one generated day with this corruption for real; (output folder, the failure if any)."""
    from pipeline.data.validate import validate

    clicks = tmp_path / "clicks"
    generate_clicks(
        str(clicks), days=1, start_date=DAY, sessions_per_day=300, n_items=80, seed=5, corruption=corruption
    )
    out = str(tmp_path / "validated" / f"dt={DAY}")
    try:
        validate([str(clicks / f"dt={DAY}")], out, None, ValidationConfig())
    except ValidationFailed as exc:
        return out, exc
    return out, None


def _record_decisions(cfg: PipelineConfig, actions: list[str], model: str | None = None) -> None:
    """Decision records as pipeline.tracking.registry logs them (kind=promotion, registered model, decision and reason
    tags), oldest first; ``model``: another registered model's records."""
    import time

    import mlflow

    from pipeline.tracking import registry
    from pipeline.tracking import runs as tracking

    experiment = tracking.configure(cfg.tracking)
    client = mlflow.MlflowClient()
    for i, action in enumerate(actions):
        run = client.create_run(
            experiment,
            start_time=int(time.time() * 1000) + i,
            tags={tracking.TAG_KIND: "promotion", registry.TAG_DECISION: action,
                  registry.TAG_RECORD_MODEL: model or cfg.tracking.registered_model,
                  registry.TAG_REASON: f"decision {i}: {action}"},
        )  # fmt: skip
        client.set_terminated(run.info.run_id, "FINISHED")


def test_every_alert_kind_arrives_by_email_and_webhook(
    tmp_path: Path, home: Path, alert_receivers: Any
) -> None:
    run = _run("gru4rec_daily", "manual__1")
    cfg = from_mapping(PipelineConfig, {"alerts": {"champion_stale_runs": 3, "quarantine_warn_share": 0.001}})

    # 1. a task failed after its last retry, through the DAG's failure notifier (Airflow's __call__ path)
    notifier = alerts.FailureNotifier(CHANNELS.to_dict())
    notifier({"ti": TaskInstance("train", 0), "exception": TrainingError("loss became nan at epoch 1")})

    # 2. validation failed: a real GX report (5% rows without a session id, above the 1% limit)
    failed_out, failure = _validated(tmp_path / "bad", {"null_session_id": 0.05})
    assert failure is not None
    ti = TaskInstance("validate", 0, partitions=[{"out_uri": failed_out}])
    notifier({"ti": ti, "exception": failure})

    # 3. a run past its deadline: the coroutine the triggerer awaits, with the scheduler's context
    context = {
        "dag_run": {"dag_id": "gru4rec_daily", "dag_run_id": "scheduled__2026-03-02", "state": "running",
                    "queued_at": "2026-03-03T00:00:05Z"},
        "deadline": {"id": "d1", "deadline_time": "2026-03-03T06:00:05Z"},
    }  # fmt: skip
    assert asyncio.run(alerts.deadline_missed(CHANNELS.to_dict(), 6.0, context=context)) == []

    # 4. the champion stayed in place for 3 decisions (MLflow records; an older promotion ends the streak)
    # ("unchanged": a re-run's no-op, neither counts nor ends the streak)
    _record_decisions(cfg, ["challenger", "promoted", "challenger", "unchanged", "refused", "challenger"])
    _record_decisions(cfg, ["promoted"], model="another-model")  # another model's decision is not counted
    decisions = watch.recent_decisions(cfg, 10)
    assert [d.action for d in decisions] == [
        "challenger",
        "refused",
        "unchanged",
        "challenger",
        "promoted",
        "challenger",
    ]
    assert watch.champion_stale_alert(cfg, run, decisions[1:]) is None  # 2 < 3
    stale = watch.champion_stale_alert(cfg, run, decisions)
    assert stale is not None and stale.details["streak"] == 3
    assert notify.send(stale, CHANNELS) == []

    # 5. a quarantined share above the warning threshold, below the failing one (a passing real report)
    ok_out, ok_failure = _validated(tmp_path / "ok", {"null_item_id": 0.004})
    assert ok_failure is None
    warnings = watch.quarantine_alerts(run, [f"{ok_out}/report.json"], cfg.alerts, cfg.validation)
    assert len(warnings) == 1
    assert notify.send(warnings[0], CHANNELS) == []

    alert_receivers.wait_for(lambda r: len(r.mails) == 5 and len(r.posts) == 5)
    mail_kinds, post_kinds = alert_receivers.kinds()
    expected = ["task_failed", "validation_failed", "deadline_missed", "champion_stale", "quarantine_warning"]
    assert mail_kinds == post_kinds == expected

    for mail in alert_receivers.mails:
        assert mail.sender == SENDER and sorted(mail.recipients) == sorted(RECIPIENTS)
        assert mail.subject.startswith("[gru4rec-pipeline] ")
    for post in alert_receivers.posts:
        assert post["path"] == WEBHOOK_PATH
        assert post["headers"]["Authorization"] == f"Bearer {WEBHOOK_TOKEN}"
        assert post["headers"]["X-Alert-Source"] == "tests"
        assert post["json"]["source"] == "gru4rec-pipeline" and post["json"]["text"]
    by_kind = {p["json"]["kind"]: p["json"] for p in alert_receivers.posts}

    task = by_kind["task_failed"]
    assert task["severity"] == "critical"
    assert "task train[0] failed (try 3/3): TrainingError: loss became nan at epoch 1" in task["text"]

    validation = by_kind["validation_failed"]
    report = json.loads(Path(failed_out, "report.json").read_text())
    assert validation["details"]["report"] == f"{failed_out}/report.json"
    assert report["quarantine_reasons"]["null_session_id"] > 0  # the rule GX quarantined the rows for
    top = validation["details"]["top_reasons"]
    assert top[0] == ["null_session_id", report["quarantine_reasons"]["null_session_id"]]
    assert f"null_session_id: {top[0][1]}" in validation["text"]
    assert f"{failed_out}/report.json" in alert_receivers.mails[1].body  # the e-mail names the report too

    deadline = by_kind["deadline_missed"]
    assert (
        deadline["run_id"] == "scheduled__2026-03-02"
        and deadline["details"]["deadline"] == "2026-03-03T06:00:05Z"
    )
    assert "not finished 6 h after it was queued" in deadline["text"]

    champion = by_kind["champion_stale"]
    assert champion["details"]["actions"] == {"challenger": 2, "refused": 1}
    assert "latest reason: decision 5: challenger" in champion["text"]
    assert len(champion["details"]["decisions"]) == 3

    quarantine = by_kind["quarantine_warning"]
    ok_report = json.loads(Path(ok_out, "report.json").read_text())
    assert quarantine["details"]["quarantine_share"] == pytest.approx(ok_report["quarantine_share"])
    assert 0.001 < ok_report["quarantine_share"] < ValidationConfig().max_quarantine_share
    assert quarantine["details"]["top_reasons"][0][0] == "null_item_id"


def test_validation_alert_finds_the_report_in_the_message_without_xcom(
    tmp_path: Path, alert_receivers: Any
) -> None:
    failed_out, failure = _validated(tmp_path, {"null_session_id": 0.05})
    assert failure is not None
    alert = alerts.alert_for_failure({"ti": TaskInstance("validate", 2), "exception": failure})
    assert alert.kind == "validation_failed"
    assert alert.details["report"] == f"{failed_out}/report.json" and alert.details["rows_quarantined"] > 0


def test_an_operator_pin_ends_the_streak() -> None:
    cfg = from_mapping(PipelineConfig, {"alerts": {"champion_stale_runs": 2}})
    records = [
        watch.DecisionRecord(str(i), a, "", i)
        for i, a in enumerate(["refused", "pinned", "challenger", "refused"])
    ]
    assert watch.unchanged_streak(records) == 1
    assert watch.champion_stale_alert(cfg, _run("d", "r"), records) is None


def test_quiet_by_default_no_channel_no_notifier_no_deadline(home: Path) -> None:
    cfg = PipelineConfig()
    assert alerts.failure_callbacks(cfg) == []
    assert alerts.deadline(cfg) is None
    assert not notify.Channels.from_config(cfg.alerts).any


def test_deadline_alert_is_built_from_the_config(home: Path) -> None:
    from airflow.sdk import AsyncCallback, DeadlineReference

    cfg = from_mapping(PipelineConfig, {"alerts": {"webhook_conn_id": "hook", "deadline_hours": 2.5}})
    deadline = alerts.deadline(cfg)
    assert deadline.reference == DeadlineReference.DAGRUN_QUEUED_AT or isinstance(
        deadline.reference, type(DeadlineReference.DAGRUN_QUEUED_AT)
    )
    assert deadline.interval == dt.timedelta(hours=2.5)
    assert isinstance(deadline.callback, AsyncCallback)
    assert deadline.callback.path == "pipeline.flow.alerts.deadline_missed"
    assert deadline.callback.kwargs["channels"]["webhook_conn_id"] == "hook"


def test_a_broken_channel_is_logged_and_the_other_still_delivers(
    alert_receivers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alert_receivers import free_port

    monkeypatch.setenv("AIRFLOW_CONN_DEAD_HOOK", json.dumps({"conn_type": "http", "host": "127.0.0.1",
                                                             "port": free_port(), "schema": "http"}))  # fmt: skip
    channels = notify.Channels(RECIPIENTS, "", SMTP_CONN_ID, "dead_hook")
    alert = notify.Alert("task_failed", "critical", "t", "text")
    assert notify.send(alert, channels) == ["webhook dead_hook"]
    alert_receivers.wait_for(lambda r: len(r.mails) == 1)
    assert alert_receivers.posts == []


def test_alerts_config_rejects_bad_values() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="quarantine_warn_share in \\[0, 1\\]"):
        AlertsConfig(quarantine_warn_share=2.0)
    with pytest.raises(ConfigError, match="deadline_hours"):
        from_mapping(PipelineConfig, {"alerts": {"deadline_hours": -1}})


DAG_PROBE = """
import json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder="dags")
assert not bag.import_errors, bag.import_errors
dag = bag.dags["gru4rec_daily"]  # parsed, not read back from a database
print(json.dumps({
    "deadline": [[str(a.interval), a.callback.path] for a in dag.deadline or []],
    "callbacks": {t.task_id: [getattr(c, "__name__", type(c).__name__) for c in t.on_failure_callback] for t in dag.tasks},
}))
"""


@pytest.mark.parametrize(
    ("alerts_section", "deadline", "callbacks"),
    [
        ({}, [], ["on_task_failure"]),  # the default: quiet, nothing registered
        ({"webhook_conn_id": "hook", "deadline_hours": 3}, [["3:00:00", "pipeline.flow.alerts.deadline_missed"]],
         ["on_task_failure", "FailureNotifier"]),
    ],
)  # fmt: skip
def test_the_dag_wires_notifiers_and_deadline_from_the_config(
    tmp_path: Path, alerts_section: dict[str, Any], deadline: list[Any], callbacks: list[str]
) -> None:
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"alerts": alerts_section}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIPELINE_"))}
    env |= {"AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PIPELINE_CONFIG": str(config), "PIPELINE_HOME": str(tmp_path / "home")}  # fmt: skip
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", DAG_PROBE], cwd=repo, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    wired = json.loads(out.stdout.strip().splitlines()[-1])
    assert wired["deadline"] == deadline
    assert len(wired["callbacks"]) >= 10 and all(c == callbacks for c in wired["callbacks"].values())
