"""MLflow fixtures: an embedded store in a temp dir, and a real ``mlflow server`` on PostgreSQL + SeaweedFS.

No ``__init__.py`` here on purpose: this folder must not shadow the ``mlflow`` package.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the venv's bin first (mlflow, uvicorn), plus ``extra``."""
    env = os.environ | (extra or {})
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    return env


def wait_http(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200; fail with the process log when it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log_file.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_process(proc)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s:\n{log_file.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@contextmanager
def background(args: list[str], log_file: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def fresh_database(prefix: str = "pipeline_mlflow") -> Iterator[str]:
    """A new PostgreSQL database on 127.0.0.1:5432 (like the ``postgres_url`` fixture, but for any scope)."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


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


@pytest.fixture
def embedded_store(tmp_path: Path) -> Iterator[str]:
    with embedded(tmp_path / "home") as uri:
        yield uri


@pytest.fixture(scope="module")
def server_store(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
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


@dataclass(frozen=True)
class Datasets:
    a: str  # validated; the dataset most tests train on
    b: str  # validated, another catalogue: a different item space
    raw: str  # built straight from raw logs: no validation report
    failed: str  # validated, then re-validated with corrupted data: its report now fails


@pytest.fixture(scope="session")
def mlflow_datasets(tmp_path_factory: pytest.TempPathFactory) -> Datasets:
    from pipeline import generate, sessions, validate
    from pipeline.errors import ValidationFailed

    root = tmp_path_factory.mktemp("mlflow-data")

    def build(name: str, inputs: list[str]) -> str:
        out = str(root / f"dataset-{name}")
        sessions.build_dataset(inputs, out)
        return out

    def validated(name: str, seed: int, n_items: int) -> str:
        parts = generate.generate_clicks(str(root / f"raw-{name}"), seed=seed, **(SMALL | {"n_items": n_items}))
        folder = str(root / f"validated-{name}")
        assert validate.validate(parts, folder)["success"]
        return folder

    a = build("a", [validated("a", 0, 300)])
    b = build("b", [validated("b", 1, 240)])
    raw = build("raw", generate.generate_clicks(str(root / "raw-raw"), seed=2, **SMALL))
    folder = validated("failed", 3, 300)
    failed = build("failed", [folder])
    corrupted = generate.generate_clicks(str(root / "raw-corrupted"), seed=3, corruption={"null_item_id": 0.05}, **SMALL)
    with pytest.raises(ValidationFailed):
        validate.validate(corrupted, folder)  # re-validated in place: the dataset's report now fails
    return Datasets(a=a, b=b, raw=raw, failed=failed)


def quick_config(*overrides: str):
    """Small, fast GRU4Rec settings for tests (1-3 epochs on ~3k events), plus ``overrides``."""
    from pipeline.config import load_config

    return load_config(
        None,
        [
            "gru4rec.layers=[32]",
            "gru4rec.n_sample=128",
            "gru4rec.batch_size=32",
            "gru4rec.n_epochs=1",
            "tracking.system_metrics=false",
            "tracking.bootstrap_samples=500",
            *overrides,
        ],
    )


def race(cfg, run_ids: list[str]) -> dict:
    """Run one ``promote`` per run id in its own thread; all compare against the same champion first.

    A barrier in ``on_compared`` holds each one after its first comparison until all have compared, so
    they then race for the alias with a stale view of the champion: the case the lock and the
    re-verification exist for. Returns {run_id: Decision}.
    """
    import threading

    from pipeline import registry

    barrier = threading.Barrier(len(run_ids), timeout=300)
    decisions: dict[str, registry.Decision] = {}
    errors: list[BaseException] = []

    def contender(run_id: str) -> None:
        waited = False

        def line_up(decision: registry.Decision) -> None:
            nonlocal waited
            if not waited:
                waited = True
                barrier.wait()

        try:
            decisions[run_id] = registry.promote(cfg, [run_id], on_compared=line_up)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=contender, args=(r,)) for r in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return decisions
