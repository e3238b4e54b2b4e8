"""MLflow fixtures: an embedded store in a temp dir, and a real ``mlflow server`` on PostgreSQL + SeaweedFS.

No ``__init__.py`` here on purpose: this folder must not shadow the ``mlflow`` package.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow_testkit import VENV_BIN, background, free_port, tool_env, wait_http

from pipeline.config import BuildConfig
from pipeline.stack.databases import scratch_database


def fresh_database(prefix: str = "pipeline_mlflow") -> AbstractContextManager[str]:
    """A new PostgreSQL database on 127.0.0.1:5432 (like the ``postgres_url`` fixture, but for any scope)."""
    return scratch_database(prefix)


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    artifacts: str  # s3://pipeline-test/<prefix>: where the server keeps artifacts
    backend: str  # postgresql://...


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1: PostgreSQL backend (fresh database), artifacts proxied to SeaweedFS."""
    if shutil.which("mlflow", path=VENV_BIN) is None:
        pytest.fail(f"mlflow not found in {VENV_BIN}")
    log_dir = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    artifacts = f"s3://pipeline-test/mlflow-{uuid.uuid4().hex[:8]}"
    with fresh_database() as url:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, which is not installed: name the driver.
        backend = url.replace("postgresql://", "postgresql+psycopg2://", 1)
        args = [
            "mlflow", "server",
            "--backend-store-uri", backend,
            "--artifacts-destination", artifacts,
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", "2",
        ]  # fmt: skip
        log_file = log_dir / "server.log"
        with background(args, log_file, tool_env(s3_server.env())) as proc:
            wait_http(f"http://127.0.0.1:{port}/health", proc, log_file)
            yield MlflowServer(f"http://127.0.0.1:{port}", artifacts, backend)


def _isolate_mlflow(mp: pytest.MonkeyPatch) -> None:
    """Let MLflow change its env vars during a test and get them back afterwards.

    ``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI; setting the variables through ``mp`` first
    makes the monkeypatch record (and later restore) their original state.
    """
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mp.setenv(key, "")
        mp.delenv(key)


def _reset_mlflow() -> None:
    """Forget the process-wide tracking URI a test set, so later tests start from their own env."""
    import mlflow

    mlflow.set_tracking_uri(None)


@contextmanager
def embedded(home: Path) -> Iterator[str]:
    """The embedded default: no MLFLOW_TRACKING_URI, SQLite + artifacts under ``home`` ($PIPELINE_HOME)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate_mlflow(mp)
        mp.setenv("PIPELINE_HOME", str(home))
        try:
            yield f"sqlite:///{home / 'mlflow.db'}"
        finally:
            _reset_mlflow()


@contextmanager
def against_server(server: MlflowServer, home: Path) -> Iterator[MlflowServer]:
    """Point the process at the real server; clients get no S3 credentials (artifacts go through the proxy)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate_mlflow(mp)
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        mp.setenv("PIPELINE_HOME", str(home))
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        try:
            yield server
        finally:
            _reset_mlflow()


@pytest.fixture(scope="module")
def server_store(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """This module's tests talk to the real server (PostgreSQL + S3 artifacts)."""
    with against_server(mlflow_server, tmp_path_factory.mktemp("mlflow-client-home")) as server:
        yield server


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded store shared by a test module (runs are trained once per module)."""
    with embedded(tmp_path_factory.mktemp("mlflow-home")) as uri:
        yield uri


# ---------------------------------------------------------------------------------------------
# Session datasets, built by the real data layer (generate -> validate -> build)

SMALL = {"days": 4, "sessions_per_day": 300, "n_items": 300}  # ~2.9k training events, ~1.2k test predictions
DAILY = {"sessions_per_day": 300, "n_items": 300}


@dataclass(frozen=True)
class Datasets:
    a: str  # validated; the dataset most tests train on
    b: str  # validated, another catalogue: a different item space
    raw: str  # built straight from raw logs: no validation report
    failed: str  # validated, then re-validated with corrupted data: its report now fails
    novalid: str  # dataset a's validated clicks built without a validation split (build.valid_days=0)


@pytest.fixture(scope="session")
def mlflow_datasets(tmp_path_factory: pytest.TempPathFactory) -> Datasets:
    from pipeline.data import generate, sessions, validate
    from pipeline.errors import ValidationFailed

    root = tmp_path_factory.mktemp("mlflow-data")

    def build(name: str, inputs: list[str]) -> str:
        out = str(root / f"dataset-{name}")
        sessions.build_dataset(inputs, out)
        return out

    def validated(name: str, seed: int, n_items: int) -> str:
        parts = generate.generate_clicks(
            str(root / f"raw-{name}"), seed=seed, **(SMALL | {"n_items": n_items})
        )
        folder = str(root / f"validated-{name}")
        assert validate.validate(parts, folder)["success"]
        return folder

    folder_a = validated("a", 0, 300)
    a = build("a", [folder_a])
    novalid = str(root / "dataset-novalid")
    sessions.build_dataset([folder_a], novalid, build=BuildConfig(valid_days=0))
    b = build("b", [validated("b", 1, 240)])
    raw = build("raw", generate.generate_clicks(str(root / "raw-raw"), seed=2, **SMALL))
    folder = validated("failed", 3, 300)
    failed = build("failed", [folder])
    corrupted = generate.generate_clicks(
        str(root / "raw-corrupted"), seed=3, corruption={"null_item_id": 0.05}, **SMALL
    )
    with pytest.raises(ValidationFailed):
        validate.validate(corrupted, folder)  # re-validated in place: the dataset's report now fails
    return Datasets(a=a, b=b, raw=raw, failed=failed, novalid=novalid)


@dataclass(frozen=True)
class DailyDatasets:
    """Session datasets as the DAG builds them for consecutive run dates (a rolling 4-day window)."""

    by_date: dict[str, str]  # run date -> dataset of the 4 days ending that date (train 2, valid 1, test 1)


@pytest.fixture(scope="session")
def daily_datasets(tmp_path_factory: pytest.TempPathFactory) -> DailyDatasets:
    """Seven days of clicks, each day validated on its own; a dataset per run date from the 4th day on."""
    import datetime as dt

    from pipeline.data import generate, sessions, validate

    root = tmp_path_factory.mktemp("mlflow-daily")
    parts = generate.generate_clicks(str(root / "raw"), days=7, start_date="2024-03-01", seed=11, **DAILY)
    validated = []
    for part in parts:
        folder = str(root / "validated" / Path(part).name)
        assert validate.validate([part], folder)["success"]
        validated.append(folder)
    by_date = {}
    for last in range(3, len(validated)):
        day = (dt.date(2024, 3, 1) + dt.timedelta(days=last)).isoformat()
        by_date[day] = str(root / "datasets" / f"dt={day}")
        sessions.build_dataset(validated[last - 3 : last + 1], by_date[day])
    return DailyDatasets(by_date)
