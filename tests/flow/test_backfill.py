"""``python -m pipeline backfill``: what it asks Airflow for, and the clear errors before it asks.

The backfill itself runs on the process stack (tests/stack/test_stack.py: two dates, repeated, forced)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.flow import airflow_api, backfill

REPO = Path(__file__).resolve().parents[2]


def test_request_body_is_airflows_backfill_body() -> None:
    request = backfill.Request("gru4rec_daily", dt.date(2026, 3, 1), dt.date(2026, 3, 3), "completed", 1, True,
                               {"grid": {"learning_rate": [0.1]}})  # fmt: skip
    assert request.body() == {
        "dag_id": "gru4rec_daily",
        "from_date": "2026-03-01T00:00:00+00:00",
        "to_date": "2026-03-03T00:00:00+00:00",
        "reprocess_behavior": "completed",
        "max_active_runs": 1,
        "run_backwards": True,
        "dag_run_conf": {"grid": {"learning_rate": [0.1]}},
    }


@pytest.mark.parametrize(
    ("start", "end", "reprocess", "runs", "message"),
    [
        ("2026-03-05", "2026-03-01", "none", 1, "--from 2026-03-05 is after --to 2026-03-01"),
        ("2026-03-01", None, "none", 1, "is not a past day"),
        ("2026-03-01", "2026-03-02", "all", 1, "reprocess must be one of"),
        ("2026-03-01", "2026-03-02", "none", 0, "--max-active-runs must be >= 1"),
    ],
)
def test_bad_requests_fail_before_airflow_is_asked(
    start: str, end: str | None, reprocess: str, runs: int, message: str
) -> None:
    last = dt.date.fromisoformat(end) if end else dt.datetime.now(dt.UTC).date()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        backfill.Request("gru4rec_daily", dt.date.fromisoformat(start), last, reprocess, runs)


def test_api_address_from_the_connection_in_both_env_forms() -> None:
    as_json = json.dumps({"conn_type": "http", "schema": "http", "host": "airflow-api-server", "port": 8080,
                          "login": "pipeline", "password": "p@ss"})  # fmt: skip
    assert airflow_api.api_from_connection(as_json) == ("http://airflow-api-server:8080", "pipeline", "p@ss")
    assert airflow_api.api_from_connection("http://pipeline:p%40ss@airflow-api-server:8080/https") == (
        "https://airflow-api-server:8080",
        "pipeline",
        "p@ss",
    )


def test_cli_without_an_airflow_api_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "PIPELINE_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "backfill", "--from", "2026-03-01", "--to", "2026-03-02"],
        cwd=REPO, env=env | {"PIPELINE_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "set AIRFLOW_CONN_AIRFLOW_API" in done.stderr and "--stack DIR" in done.stderr
