"""Shared fixtures: the real data in ../shared, a real S3 server (SeaweedFS) and real PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"real data not found at {path} (expected ../shared/data beside the checkout)"
        if IN_CI:
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: skip where absent, fail when CI=true."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def yoochoose(shared_data: Path) -> dict[str, Path]:
    d = _need(shared_data / "yoochoose-100k")
    return {"train": _need(d / "train_tr.tsv"), "valid": _need(d / "train_valid.tsv")}


@pytest.fixture(scope="session")
def diginetica(shared_data: Path) -> Path:
    return _need(shared_data / "diginetica-sample" / "train-item-views.csv")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session, with a ``pipeline-test`` bucket."""
    from pipeline.stack import s3server

    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        s3server.create_bucket(server, "pipeline-test")
        yield server
    finally:
        s3server.stop(server.pid)


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point this test's process at the S3 server; returns a fresh ``s3://`` prefix to write under."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://pipeline-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 (user postgres), dropped afterwards."""
    from pipeline.stack.databases import scratch_database

    with scratch_database("pipeline_test") as url:
        yield url


@pytest.fixture
def alert_receivers(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A real SMTP server and a real webhook receiver on 127.0.0.1, and the Airflow connections to them."""
    from alert_receivers import running_receivers

    with running_receivers() as receivers:
        for key, value in receivers.connections().items():
            monkeypatch.setenv(key, value)
        yield receivers
