"""``python -m pipeline status``: how the pipeline is doing, on one screen.

Six sections, each read from the place that owns the fact and each independent of the others: a source
that cannot be reached (no Airflow, no MLflow store, an S3 prefix without credentials) makes its section
say so (``error``) while the rest still shows.

==============  ===============================================================================
section         source
==============  ===============================================================================
``runs``        the last DAG runs: Airflow's REST API (``AIRFLOW_CONN_<airflow.api_conn_id>``, or the
                process stack's, which the CLI passes), else its metadata DB
                (``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``, else ``make run``'s SQLite under
                ``$PIPELINE_HOME/airflow``)
``models``      ``@champion`` / ``@challenger``: version, primary metric vs S-POP / POP, since when
                (pipeline.tracking.views)
``decisions``   the last promotion decisions and operator levers (pipeline.tracking.views)
``days``        rows in / quarantined / share per day: ``OUT/validated/dt=D/report.json``
``waits``       partitions the runs waited for: ``OUT/runs/dt=D/partition_wait.json``
``usage``       bytes and files under each output folder (local or ``s3://``)
==============  ===============================================================================

This module reads the sections; pipeline.flow.dag_runs finds Airflow and reads its runs,
pipeline.flow.status_screen holds the screen's data and draws it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.data import partitions
from pipeline.flow.airflow_api import AirflowAPI
from pipeline.flow.dag_runs import airflow_api, airflow_source, dag_runs
from pipeline.flow.outputs import OUTPUT_FOLDERS, day_folders
from pipeline.flow.outputs import usage as folder_usage
from pipeline.flow.status_screen import Section, Status, format_status

__all__ = ["Section", "Status", "airflow_api", "collect", "format_status", "models", "partition_waits", "quarantine_days", "usage"]

ALIAS_MOVES = {"promoted", "rolled_back", "moved"}  # decision.Decision.alias_moved


# ---------------------------------------------------------------------------------------------
# Sections


def _since(entries: list[Any], version: str, actions: set[str]) -> str | None:
    """When ``version`` got its alias: the newest decision of one of ``actions`` about it."""
    return next(
        (e.decided_at for e in entries if e.candidate_version == version and e.action in actions), None
    )


def models(cfg: PipelineConfig, entries: list[Any]) -> list[dict[str, Any]]:
    """@champion and @challenger with the primary metric vs S-POP / POP on their own test split."""
    from pipeline.tracking import views as registry_views  # MLflow: imported only when its sections are read

    view = registry_views.models(cfg)
    tcfg = cfg.tracking
    wanted = {tcfg.champion_alias: ALIAS_MOVES, tcfg.challenger_alias: {"challenger", "pinned"}}
    rows: list[dict[str, Any]] = []
    for alias, actions in wanted.items():
        v = next((v for v in view.versions if alias in v.aliases), None)
        if v is None:
            rows.append({"alias": alias, "version": None})
            continue
        rows.append(
            {
                "alias": alias,
                "version": v.version,
                "metric": v.metric,
                "value": v.value,
                "spop": v.spop_value,
                "pop": v.pop_value,
                "vs_spop": None if v.value is None or v.spop_value is None else v.value - v.spop_value,
                "since": _since(entries, v.version, actions),
                "trained_on": str(v.training_window) if v.training_window else None,
                "pinned": alias == tcfg.champion_alias and view.pinned is not None,
                "operator_action": v.operator_action,
            }
        )
    return rows


def _day_reports(output_uri: str, days: int) -> list[tuple[str, str]]:
    """(day, report URI) of the newest ``days`` validated partitions."""
    folders = day_folders(storage.join(output_uri, "validated"))
    return [(day, storage.join(uri, "report.json")) for day, uri in folders[-days:]][::-1]


def quarantine_days(output_uri: str, days: int) -> list[dict[str, Any]]:
    """Rows in / valid / quarantined / rejected and the quarantined share per day, newest first."""
    rows: list[dict[str, Any]] = []
    for day, uri in _day_reports(output_uri, days):
        if not storage.exists(uri):  # a validation still running, or one killed before it published
            rows.append({"date": day, "report": uri, "success": None})
            continue
        report = storage.read_json(uri)
        rows_in = int(report.get("rows_in", 0))
        quarantined = int(report.get("rows_quarantined", 0))
        rows.append(
            {
                "date": day,
                "rows_in": rows_in,
                "rows_valid": int(report.get("rows_valid", 0)),
                "rows_quarantined": quarantined,
                "rows_rejected": int(report.get("rows_rejected", 0)),
                "share": quarantined / rows_in if rows_in else 0.0,
                "success": bool(report.get("success")),
                "top_reason": max(
                    (report.get("quarantine_reasons") or {"": 0}).items(), key=lambda kv: kv[1]
                )[0]
                or None,
                "report": uri,
            }
        )
    return rows


def partition_waits(output_uri: str, days: int) -> list[dict[str, Any]]:
    """The sensor's wait record of each of the newest ``days`` runs: state, how long, for which partitions."""
    rows: list[dict[str, Any]] = []
    for day, folder in day_folders(storage.join(output_uri, "runs"))[-days:][::-1]:
        uri = storage.join(folder, partitions.RECORD_NAME)
        if not storage.exists(uri):
            continue
        record = storage.read_json(uri)
        waited = partitions.waited_for(record)
        rows.append(
            {
                "date": day,
                "state": record.get("state"),
                "waited_s": record.get("waited_s"),
                "waited_for": [w["date"] for w in waited],
                "since": record.get("since"),
                "checked_at": record.get("checked_at"),
                "run_id": record.get("run_id"),
            }
        )
    return rows


def usage(output_uri: str) -> list[dict[str, Any]]:
    """Bytes and files under each output folder (and the total), local or ``s3://``."""
    rows: list[dict[str, Any]] = []
    for name in OUTPUT_FOLDERS:
        uri = storage.join(output_uri, name)
        size, files = folder_usage(uri)
        rows.append({"folder": name, "uri": uri, "bytes": size, "files": files})
    rows.append({"folder": "total", "uri": output_uri, "bytes": sum(r["bytes"] for r in rows),
                 "files": sum(r["files"] for r in rows)})  # fmt: skip
    return rows


def _mlflow_reachable() -> str:
    """The tracking URI; raises when it is a SQLite file that does not exist (reading would create it)."""
    from pipeline.tracking.runs import tracking_uri  # MLflow: imported only when its sections are read

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise FileNotFoundError(f"no MLflow store at {uri} (run `make run`, or set MLFLOW_TRACKING_URI)")
    return uri


def _section(source: str, read: Callable[[], list[dict[str, Any]]]) -> Section:
    """Read one section; any failure of its source becomes the section's error, never the command's."""
    try:
        return Section(source, read())
    except Exception as exc:  # noqa: BLE001 - every source fails in its own way; the others must still show
        return Section(source, error=f"{type(exc).__name__}: {exc}".strip()[:500])


def collect(
    cfg: PipelineConfig,
    output_uri: str,
    *,
    runs: int = 10,
    days: int = 7,
    api: tuple[AirflowAPI, str] | None = None,
) -> Status:
    """Every section of the status screen (each one independent of the others).

    ``api``: Airflow's REST API client and where it points (the CLI's ``--stack``), else as
    :func:`pipeline.flow.dag_runs.airflow_api` finds it.
    """
    from pipeline.tracking import views as registry_views  # MLflow: imported only when its sections are read

    sections: dict[str, Section] = {}
    try:
        airflow = airflow_source(cfg, api)
        sections["runs"] = _section(airflow.label, lambda: dag_runs(airflow, cfg.airflow.dag_id, runs))
    except Exception as exc:  # noqa: BLE001 - e.g. a connection that is not JSON
        sections["runs"] = Section("Airflow", error=f"{type(exc).__name__}: {exc}")

    history: list[Any] = []
    try:
        mlflow_uri = _mlflow_reachable()
        history = registry_views.history(cfg, limit=max(runs, 50))  # enough to find when the aliases moved
        sections["decisions"] = Section(f"MLflow {mlflow_uri}", [e.to_dict() for e in history[:runs]])
        sections["models"] = _section(f"MLflow {mlflow_uri}", lambda: models(cfg, history))
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}".strip()[:500]
        sections["models"] = Section("MLflow", error=error)
        sections["decisions"] = Section("MLflow", error=error)

    sections["days"] = _section(
        f"{output_uri}/validated/dt=*/report.json", lambda: quarantine_days(output_uri, days)
    )
    sections["waits"] = _section(
        f"{output_uri}/runs/dt=*/partition_wait.json", lambda: partition_waits(output_uri, days)
    )
    sections["usage"] = _section(output_uri, lambda: usage(output_uri))
    order = ("runs", "models", "decisions", "days", "waits", "usage")
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return Status(now, output_uri, {name: sections[name] for name in order})
