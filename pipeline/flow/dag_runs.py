"""The last runs of the DAG for ``status``: from Airflow's REST API when one is reachable, else its metadata DB.

The API client (pipeline.flow.airflow_api) comes from the caller (the CLI passes the process stack's) or from
the connection ``airflow.api_conn_id`` in ``AIRFLOW_CONN_<ID>`` (set on every Airflow component of the stack,
compose and Kubernetes, where the DAG's summary task uses it too). Without either, the runs are read from the
metadata DB: ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``, else ``make run``'s SQLite under ``$PIPELINE_HOME``.
"""

from __future__ import annotations

import datetime as dt
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, pipeline_home
from pipeline.flow.airflow_api import AirflowAPI, quote


@dataclass(frozen=True)
class AirflowSource:
    """How to read DAG runs: the REST API (``api``) or the metadata database (``db_url``)."""

    api: AirflowAPI | None = None
    db_url: str | None = None
    label: str = ""


def airflow_api(
    cfg: PipelineConfig, given: tuple[AirflowAPI, str] | None = None
) -> tuple[AirflowAPI, str] | None:
    """The REST API client and where its address came from: ``given`` (the CLI's ``--stack``), else the
    connection ``airflow.api_conn_id`` from ``AIRFLOW_CONN_<ID>``; None when neither is there."""
    return given or AirflowAPI.from_env(cfg.airflow.api_conn_id)


def airflow_db_url() -> str:
    """The metadata DB: Airflow's own setting, else ``make run``'s SQLite file under ``$PIPELINE_HOME``."""
    return (
        os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
        or f"sqlite:///{pipeline_home() / 'airflow' / 'airflow.db'}"
    )


def airflow_source(cfg: PipelineConfig, api: tuple[AirflowAPI, str] | None = None) -> AirflowSource:
    """The REST API (see :func:`airflow_api`) when there is one, else the metadata DB."""
    found = airflow_api(cfg, api)
    if found is not None:
        return AirflowSource(api=found[0], label=found[1])
    url = airflow_db_url()
    return AirflowSource(db_url=url, label=f"Airflow metadata DB {_hide_password(url)}")


def _hide_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _iso(value: Any) -> str | None:
    """A timestamp from the API (ISO text) or the DB (datetime, or text in SQLite) as ISO 8601 UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="seconds")


def _duration(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)


def _run_row(
    run_id: str, run_type: Any, state: Any, logical: Any, start: Any, end: Any, note: Any
) -> dict[str, Any]:
    started, ended = _iso(start), _iso(end)
    return {
        "date": (_iso(logical) or "")[:10] or None,
        "run_id": run_id,
        "run_type": str(run_type or ""),
        "state": str(state or ""),
        "start": started,
        "end": ended,
        "duration_s": _duration(started, ended),
        "note": (str(note).splitlines() or [""])[0] if note else "",  # the decision line of the summary note
    }


def dag_runs(source: AirflowSource, dag_id: str, limit: int) -> list[dict[str, Any]]:
    """The last ``limit`` runs of ``dag_id``, newest logical date first."""
    if source.api is not None:
        found = source.api.get(f"/dags/{quote(dag_id)}/dagRuns", order_by="-logical_date", limit=limit)
        return [
            _run_row(
                r["dag_run_id"],
                r.get("run_type"),
                r.get("state"),
                r.get("logical_date"),
                r.get("start_date"),
                r.get("end_date"),
                r.get("note"),
            )  # fmt: skip
            for r in found["dag_runs"]
        ]
    assert source.db_url is not None
    return _dag_runs_from_db(source.db_url, dag_id, limit)


def _dag_runs_from_db(url: str, dag_id: str, limit: int) -> list[dict[str, Any]]:
    import sqlalchemy as sa  # only when there is no REST API to ask (a slow import for a status screen)

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise FileNotFoundError(
            f"no Airflow metadata DB at {url} (run `make run`, or set AIRFLOW_CONN_AIRFLOW_API)"
        )
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            # The note lives in its own table (dag_run_note) since Airflow 2.5.
            rows = conn.execute(
                sa.text(
                    # dag.test() (make run) records the logical date as the run's start: its first task's
                    # start is when it really began (and equals a scheduled run's start to the second).
                    "SELECT r.run_id, r.run_type, r.state, r.logical_date, "
                    "COALESCE((SELECT MIN(t.start_date) FROM task_instance t WHERE t.dag_id = r.dag_id "
                    "AND t.run_id = r.run_id), r.start_date), r.end_date, n.content "
                    "FROM dag_run r LEFT JOIN dag_run_note n ON n.dag_run_id = r.id "
                    "WHERE r.dag_id = :dag_id ORDER BY r.logical_date DESC LIMIT :limit"
                ),
                {"dag_id": dag_id, "limit": limit},
            ).all()
    finally:
        engine.dispose()
    return [_run_row(*row) for row in rows]
