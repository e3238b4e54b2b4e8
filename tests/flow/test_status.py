"""``python -m pipeline status`` on a real, small output tree and a real MLflow registry (SQLite): click logs
generated with a few bad rows, validated day by day, built, trained and promoted through the library (as the
DAG's tasks do), a partition the run waited for; then every section is checked against its source, and each
source is made unreachable in turn."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import storage
from pipeline.config import PipelineConfig, load_config
from pipeline.data import partitions
from pipeline.flow import status
from pipeline.tracking import views as registry_views

REPO = Path(__file__).resolve().parents[2]
DAYS = ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]
RUN_DAY = DAYS[-1]
SETTINGS = ["gru4rec.layers=[32]", "gru4rec.n_sample=64", "gru4rec.batch_size=32", "gru4rec.n_epochs=1",
            "tracking.system_metrics=false", "tracking.bootstrap_samples=200", "build.min_item_support=2"]  # fmt: skip


def _clean_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    mp.setenv("PIPELINE_HOME", str(home))
    for var in ("PIPELINE_CONFIG", "PIPELINE_OUTPUT_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW_CONN_AIRFLOW_API"):  # fmt: skip
        mp.delenv(var, raising=False)


@pytest.fixture(scope="module")
def pipeline_state(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A run date's outputs under OUT and a registry with a champion (and maybe a challenger), all real."""
    import mlflow

    from pipeline.data import generate, sessions, validate
    from pipeline.flow.trial import run_trial
    from pipeline.tracking import promotion

    home = tmp_path_factory.mktemp("status-home")
    with pytest.MonkeyPatch.context() as mp:
        _clean_env(mp, home)
        cfg = load_config(None, SETTINGS)
        out = str(home / "output")
        raw = generate.generate_clicks(str(home / "raw"), days=len(DAYS), start_date=DAYS[0], sessions_per_day=300,
                                       n_items=150, seed=5, corruption={"null_item_id": 0.004})  # fmt: skip
        validated = []
        for part in raw:
            folder = storage.join(out, "validated", Path(part).name)
            validate.validate([part], folder, cfg.ingest, cfg.validation)
            validated.append(folder)
        dataset = storage.join(out, "datasets", f"dt={RUN_DAY}")
        sessions.build_dataset(validated, dataset, cfg.ingest, cfg.build)
        decisions = []
        for lr in (0.1, 0.05):
            trial = load_config(None, [*SETTINGS, f"gru4rec.learning_rate={lr}"])
            run = run_trial(dataset, trial, run_key=f"gru4rec_daily/{RUN_DAY}/fp/lr{lr}",
                            work_dir=storage.join(out, "models", f"dt={RUN_DAY}", f"lr{lr}"))  # fmt: skip
            decisions.append(promotion.promote(cfg, [run.run_id], date=RUN_DAY, actor="test"))
        # The run's partition came 90 s late: its sensor's wait record says so.
        run_info = {"run_id": "manual__x", "date": RUN_DAY, "window_start": RUN_DAY, "output_uri": out,
                    "data_uri": str(home / "raw")}  # fmt: skip
        policy = partitions.WaitPolicy(poke_interval_s=60, timeout_s=3600)
        now = dt.datetime.now(dt.UTC)
        partitions.poke(run_info, policy, first_poke=now - dt.timedelta(seconds=90), now=now)
        mlflow.set_tracking_uri(None)
    return {"home": home, "cfg": cfg, "out": out, "decisions": decisions}


@pytest.fixture
def env(pipeline_state: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    _clean_env(monkeypatch, pipeline_state["home"])
    yield pipeline_state
    import mlflow

    mlflow.set_tracking_uri(None)


def _tree_usage(folder: str) -> tuple[int, int]:
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files]
    return sum(sizes), len(sizes)


def test_every_section_matches_its_source(env: Any) -> None:
    cfg: PipelineConfig = env["cfg"]
    out = env["out"]
    result = status.collect(cfg, out, runs=5, days=3)
    sections = result.sections

    # No Airflow here (no API connection, no metadata DB): that section says so, the others still show.
    assert sections["runs"].rows == [] and "no Airflow metadata DB" in sections["runs"].error
    assert {name: s.error for name, s in sections.items() if name != "runs"} == dict.fromkeys(
        ["models", "decisions", "days", "waits", "usage"]
    )

    # Validation per day: the newest 3 days, with the report's own counts.
    days = sections["days"].rows
    assert [d["date"] for d in days] == DAYS[::-1][:3]
    for day in days:
        report = json.loads(Path(day["report"]).read_text())
        assert (day["rows_in"], day["rows_quarantined"]) == (report["rows_in"], report["rows_quarantined"])
        assert day["share"] == pytest.approx(report["rows_quarantined"] / report["rows_in"])
    assert sum(d["rows_quarantined"] for d in days) > 0, "the generated bad rows were not quarantined"
    assert {d["top_reason"] for d in days if d["rows_quarantined"]} == {"null_item_id"}

    # Models: what the registry's aliases point at, with the metric the version carries and when it got there.
    import mlflow

    client = mlflow.MlflowClient()
    name = cfg.tracking.registered_model
    champion = client.get_model_version_by_alias(name, "champion")
    shown = {m["alias"]: m for m in sections["models"].rows}
    assert shown["champion"]["version"] == str(champion.version)
    assert shown["champion"]["value"] == pytest.approx(float(champion.tags["metric.mrr_at_20"]))
    assert shown["champion"]["spop"] == pytest.approx(float(champion.tags["metric.baseline_spop_mrr_at_20"]))
    history = registry_views.history(cfg, limit=None)
    moved = [e for e in history if e.candidate_version == str(champion.version) and e.action == "promoted"]
    assert shown["champion"]["since"] == moved[0].decided_at
    aliases = client.get_registered_model(name).aliases
    challenger = aliases.get("challenger")  # none when the second run was promoted
    assert shown["challenger"]["version"] == (str(challenger) if challenger is not None else None)

    # Decisions: the recorded ones, newest first.
    assert [d["record_run_id"] for d in sections["decisions"].rows] == [e.record_run_id for e in history]
    assert [d.action for d in env["decisions"]][::-1] == [d["action"] for d in sections["decisions"].rows]

    # The partition the run waited for.
    assert sections["waits"].rows == [
        {**sections["waits"].rows[0], "date": RUN_DAY, "state": "ready", "waited_for": [RUN_DAY]}
    ]
    assert sections["waits"].rows[0]["waited_s"] == pytest.approx(90)

    # Usage, counted independently.
    usage = {u["folder"]: u for u in sections["usage"].rows}
    for folder in ("validated", "datasets", "models", "runs"):
        assert (usage[folder]["bytes"], usage[folder]["files"]) == _tree_usage(os.path.join(out, folder))
    assert usage["models"]["bytes"] > 0 and usage["total"]["bytes"] == sum(
        usage[f]["bytes"] for f in ("validated", "datasets", "models", "runs")
    )

    # The terminal view: every section titled, the unreachable one says why, tables aligned.
    text = status.format_status(result)
    assert text.count("\n== ") == 6
    assert "UNAVAILABLE: FileNotFoundError: no Airflow metadata DB" in text
    block = text.split("== validation per day")[1].split("\n\n")[0].splitlines()[1:]
    ends = {line.index("%") for line in block[1:]}  # right-aligned shares end in one column
    assert len(block) == 4 and len(ends) == 1 and block[0].index("share") + len("share") == ends.pop() + 1


def test_unreachable_sources_are_reported_per_section(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg: PipelineConfig = env["cfg"]
    # Airflow's REST API, MLflow and S3 at addresses where nothing listens.
    monkeypatch.setenv("AIRFLOW_CONN_AIRFLOW_API", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 9,
                                                              "login": "admin", "password": "x"}))  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("PIPELINE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    result = status.collect(cfg, "s3://nowhere/output", runs=3, days=3)
    errors = {name: s.error for name, s in result.sections.items()}
    assert all(errors.values()), errors
    assert result.sections["runs"].source == "Airflow REST API http://127.0.0.1:9 ($AIRFLOW_CONN_AIRFLOW_API)"
    assert "Connection refused" in errors["runs"]
    text = status.format_status(result)
    assert text.count("UNAVAILABLE") == 6


def test_cli_prints_the_screen_and_the_same_as_json(env: Any) -> None:
    run = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 300,
           "env": {**os.environ, "PIPELINE_HOME": str(env["home"])}}  # fmt: skip
    shown = subprocess.run([sys.executable, "-m", "pipeline", "status", "--days", "2"], **run)
    as_json = subprocess.run([sys.executable, "-m", "pipeline", "status", "--days", "2", "--json"], **run)
    assert shown.returncode == as_json.returncode == 0, shown.stderr + as_json.stderr
    data = json.loads(as_json.stdout)
    assert list(data["sections"]) == ["runs", "models", "decisions", "days", "waits", "usage"]
    champion = next(m for m in data["sections"]["models"]["rows"] if m["alias"] == "champion")
    assert re.search(rf"^   champion\s+{champion['version']}\s+mrr_at_20\s+{champion['value']:.4f}", shown.stdout, re.M)
    for day in data["sections"]["days"]["rows"]:
        assert re.search(rf"^   {day['date']}\s+{day['rows_in']}\s+{day['rows_valid']}\s+{day['rows_quarantined']}\s",
                         shown.stdout, re.M)  # fmt: skip
    bad = subprocess.run([sys.executable, "-m", "pipeline", "status", "--runs", "0"], **run)
    assert bad.returncode != 0 and "--runs and --days must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
