"""Airflow test harness: a throw-away AIRFLOW_HOME on SQLite, migrated once per session, whose dags
folder is the repository's ``dags/``.

Airflow reads its configuration when it is first imported, so the environment is set in a session
fixture before any test imports it; every Airflow import in these tests happens inside a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point Airflow at a fresh SQLite metadata DB (``airflow db migrate`` once) for the whole session."""
    from pipeline.flow import embedded

    home = tmp_path_factory.mktemp("airflow")
    env = embedded.airflow_env(home, DAGS)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        embedded.migrate_airflow_db(env)
        if "airflow.settings" in sys.modules:
            # Airflow was imported earlier in this session with another home: re-point its ORM.
            from airflow import settings

            settings.configure_vars()
            settings.reconfigure_orm()
        yield home


@pytest.fixture
def pipeline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$PIPELINE_HOME`` (MLflow store, outputs) per test; no config file, no alert hook."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PIPELINE_HOME", str(home))
    for var in (
        "PIPELINE_CONFIG",
        "PIPELINE_DATA_URI",
        "PIPELINE_OUTPUT_URI",
        "PIPELINE_ALERT_CALLBACK",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    """Run a snippet in a fresh interpreter (for checks that need an untouched ``sys.modules``)."""

    def run(
        code: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
