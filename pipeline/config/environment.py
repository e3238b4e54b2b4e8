"""The one environment layer: every ``PIPELINE_*`` variable the pipeline reads, typed and documented here.

Deployments set these (the Airflow workers' environment, ``make run``, the process stack); code reads them
through :func:`env` (read when called, so a test or the demo can set them in-process). Settings that belong
to the config file stay in the config; these are about *where* a process runs.

Read elsewhere, and only there (listed so this stays the one place to look):

- ``PIPELINE_S3_ENDPOINT_URL``: the S3 endpoint (MinIO / a local S3 server), read by ``pipeline.storage``
  (a sibling of this layer, so it reads its own) with ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
- ``PIPELINE_S3_BUCKET``, ``PIPELINE_AIRFLOW_ADMIN_PASSWORD``, ``PIPELINE_WORKER_HOSTNAME``: set and read by
  the local process stack only (``pipeline.stack.local``: the bucket its init job creates, the Airflow admin
  password, the host name a stack worker reports).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# name -> what it does; the README's table of variables comes from here.
VARIABLES: dict[str, str] = {
    "PIPELINE_HOME": "root of everything a local run writes (SQLite stores, default data/output, scratch); "
    "default ./.local",
    "PIPELINE_CONFIG": "the YAML/JSON pipeline config the DAG's tasks read, and every command's default --config",
    "PIPELINE_DATA_URI": "click-log root with dt=YYYY-MM-DD/ partitions when airflow.data_uri is empty; "
    "default $PIPELINE_HOME/data/clicks",
    "PIPELINE_OUTPUT_URI": "output root when airflow.output_uri is empty; default $PIPELINE_HOME/output",
    "PIPELINE_DEVICE": "device of the DAG's training and promotion tasks: auto (default), cpu, cuda or cuda:N",
    "PIPELINE_MLFLOW_UI_URL": "base URL of the MLflow UI for run links in DAG run notes and alerts",
    "PIPELINE_GIT_COMMIT": "code version logged with each run where there is no .git (images)",
    "PIPELINE_ACTOR": "who runs an operator lever (promote --pin ...), when the OS user is a shared account",
    "PIPELINE_DEBUG": "any non-empty value: debug logging for every command (as -v)",
    "PIPELINE_VALIDATE_START_METHOD": "multiprocessing start method of parallel validation (fork on Linux, "
    "else spawn)",
}


@dataclass(frozen=True)
class Environment:
    """The ``PIPELINE_*`` variables of this process (see ``VARIABLES``); "" = not set."""

    home: Path  # PIPELINE_HOME, resolved
    config: str  # PIPELINE_CONFIG
    data_uri: str  # PIPELINE_DATA_URI
    output_uri: str  # PIPELINE_OUTPUT_URI
    device: str  # PIPELINE_DEVICE, default "auto"
    mlflow_ui_url: str  # PIPELINE_MLFLOW_UI_URL
    git_commit: str  # PIPELINE_GIT_COMMIT
    actor: str  # PIPELINE_ACTOR
    debug: bool  # PIPELINE_DEBUG
    validate_start_method: str  # PIPELINE_VALIDATE_START_METHOD


def env() -> Environment:
    """The environment now (cheap: a few dictionary look-ups)."""
    get = os.environ.get
    return Environment(
        home=Path(get("PIPELINE_HOME", ".local")).resolve(),
        config=get("PIPELINE_CONFIG", ""),
        data_uri=get("PIPELINE_DATA_URI", ""),
        output_uri=get("PIPELINE_OUTPUT_URI", ""),
        device=get("PIPELINE_DEVICE", "auto"),
        mlflow_ui_url=get("PIPELINE_MLFLOW_UI_URL", "").strip(),
        git_commit=get("PIPELINE_GIT_COMMIT", ""),
        actor=get("PIPELINE_ACTOR", "").strip(),
        debug=bool(get("PIPELINE_DEBUG")),
        validate_start_method=get("PIPELINE_VALIDATE_START_METHOD", ""),
    )


def pipeline_home() -> Path:
    """Everything a local run writes goes under ``$PIPELINE_HOME`` (default ``./.local``)."""
    return env().home
