"""Alerts that reach people: which there are, and the ones the DAG raises from Airflow's callbacks.

Five kinds (docs/runbook.md has one section per kind: what it means, what to run):

- ``task_failed``: a task failed after its last retry (the DAG's ``on_failure_callback``);
- ``validation_failed``: a partition failed a table-level rule; names the report and the top quarantine
  reasons with their counts (the same callback, for a ``ValidationFailed`` of the ``validate`` task);
- ``deadline_missed``: a DAG run not finished ``alerts.deadline_hours`` after it was queued (Airflow's
  deadline alerts: the scheduler notices, the triggerer runs :func:`deadline_missed`);
- ``champion_stale`` and ``quarantine_warning``: raised by the ``watch`` task (:mod:`pipeline.flow.watch`).

This module builds the first three and hands the DAG its failure callbacks and deadline; the message and its
channels (e-mail, webhook) are :mod:`pipeline.flow.notify`'s. The deadline callback's path,
``pipeline.flow.alerts.deadline_missed``, is stored by the scheduler: keep it here.

The DAG file imports this module while it is parsed: besides the standard library only Airflow's SDK (already
loaded there) and the config are imported at module level.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseNotifier

from pipeline.config import PipelineConfig
from pipeline.flow.failures import failure_message
from pipeline.flow.notify import (
    DEADLINE_MISSED,
    TASK_FAILED,
    VALIDATION_FAILED,
    Alert,
    Channels,
    send,
    send_async,
)

log = logging.getLogger(__name__)

TOP_REASONS = 5  # quarantine reasons named in an alert

# ---------------------------------------------------------------------------------------------
# Task failures (on_failure_callback) and validation failures


class FailureNotifier(BaseNotifier):
    """The DAG's ``on_failure_callback``: Airflow calls it when a task failed after its last retry."""

    def __init__(self, channels: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channels = channels

    def notify(self, context: Any) -> None:
        send(alert_for_failure(context), Channels.from_dict(self.channels), context)


def failure_callbacks(cfg: PipelineConfig) -> list[Any]:
    """The notifiers for the DAG's ``on_failure_callback`` list: none when no channel is configured."""
    channels = Channels.from_config(cfg.alerts)
    return [FailureNotifier(channels.to_dict())] if channels.any else []


def _where(ti: Any) -> str:
    task_id = getattr(ti, "task_id", "?")
    map_index = getattr(ti, "map_index", -1)
    return f"{task_id}[{map_index}]" if map_index is not None and map_index >= 0 else task_id


def alert_for_failure(context: Mapping[str, Any]) -> Alert:
    """The alert for a failed task: a validation alert for a ValidationFailed, else a task-failure alert."""
    from pipeline.errors import ValidationFailed

    ti = context.get("ti") or context.get("task_instance")
    exc = context.get("exception")
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "") or ""
    run_id = getattr(ti, "run_id", None) or str(context.get("run_id", ""))
    message = failure_message(context)
    details = {
        "task": _where(ti),
        "try_number": getattr(ti, "try_number", None),
        "exception": type(exc).__name__ if exc is not None else None,
        "error": str(exc) if exc is not None else None,
        "log_url": getattr(ti, "log_url", None),
    }
    if isinstance(exc, ValidationFailed):
        report_uri = _report_uri(ti, str(exc))
        return validation_alert(dag_id, run_id, message, report_uri, details)
    return Alert(
        TASK_FAILED, "critical", f"{dag_id}: task {_where(ti)} failed", message, dag_id, run_id, details
    )


_REPORT_IN_MESSAGE = re.compile(r"report: (\S+?report\.json)")


def _report_uri(ti: Any, message: str) -> str | None:
    """Where the failed partition's report is: from the ``partitions`` task's result, else the message."""
    try:
        partitions = ti.xcom_pull(task_ids="partitions")
        if partitions and getattr(ti, "map_index", -1) is not None and ti.map_index >= 0:
            return f"{partitions[ti.map_index]['out_uri'].rstrip('/')}/report.json"
    except Exception:  # noqa: BLE001 - no XCom (a test context, another DAG): fall back on the message
        log.debug("no partitions XCom for the failed validation", exc_info=True)
    found = _REPORT_IN_MESSAGE.search(message)
    return found.group(1) if found else None


def top_reasons(reasons: Mapping[str, int], limit: int = TOP_REASONS) -> list[tuple[str, int]]:
    """The quarantine reasons with the most rows first (ties by name)."""
    return sorted(((str(r), int(n)) for r, n in reasons.items() if int(n) > 0), key=lambda x: (-x[1], x[0]))[
        :limit
    ]


def _report_facts(report_uri: str | None) -> dict[str, Any]:
    if not report_uri:
        return {"report": None}
    from pipeline import storage

    try:
        report = storage.read_json(report_uri)
    except Exception as exc:  # noqa: BLE001 - the alert still goes out, saying what it could not read
        return {"report": report_uri, "report_error": str(exc)}
    return {
        "report": report_uri,
        "rows_in": int(report.get("rows_in", 0)),
        "rows_quarantined": int(report.get("rows_quarantined", 0)),
        "quarantine_share": float(report.get("quarantine_share", 0.0)),
        "top_reasons": top_reasons(report.get("quarantine_reasons") or {}),
        "failures": list(report.get("failures") or [])[:5],
    }


def reasons_line(reasons: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in reasons) or "none"


def validation_alert(
    dag_id: str, run_id: str, message: str, report_uri: str | None, details: Mapping[str, Any] | None = None
) -> Alert:
    """A partition failed a table-level rule: the report's path and its top quarantine reasons."""
    facts = _report_facts(report_uri)
    lines = [message, f"report: {facts['report'] or 'unknown'}"]
    if "top_reasons" in facts:
        lines.append(
            f"rows in {facts['rows_in']}, quarantined {facts['rows_quarantined']} "
            f"({facts['quarantine_share']:.2%}); top quarantine reasons: {reasons_line(facts['top_reasons'])}"
        )
    task = (details or {}).get("task", "validate")
    return Alert(VALIDATION_FAILED, "critical", f"{dag_id}: validation failed ({task})", "\n".join(lines),
                 dag_id, run_id, {**(details or {}), **facts})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Deadline alerts (Airflow's DeadlineAlert; the callback runs in the triggerer)


def deadline(cfg: PipelineConfig) -> Any:
    """The DAG's ``deadline``: alert when a run is not finished ``alerts.deadline_hours`` after it was queued.

    None when the deadline is off or no channel is configured (nothing would be sent).
    """
    channels = Channels.from_config(cfg.alerts)
    if not cfg.alerts.deadline_hours or not channels.any:
        return None
    # Imported only when a deadline is set; the SDK exports these lazily, which mypy does not follow.
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference  # type: ignore[attr-defined]

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=dt.timedelta(hours=cfg.alerts.deadline_hours),
        callback=AsyncCallback(
            deadline_missed, kwargs={"channels": channels.to_dict(), "hours": cfg.alerts.deadline_hours}
        ),  # fmt: skip
        name="run overran",
    )


def deadline_alert(context: Mapping[str, Any] | None, hours: float) -> Alert:
    """The alert for a run past its deadline, from the scheduler's context (the DAG run and the deadline)."""
    context = context or {}
    run = dict(context.get("dag_run") or {})
    due = (context.get("deadline") or {}).get("deadline_time")
    dag_id, run_id = str(run.get("dag_id", "")), str(run.get("dag_run_id") or run.get("run_id") or "")
    after = f"{hours:g} h" if hours >= 1 else f"{hours * 60:.3g} min"
    text = (
        f"DAG run {run_id} of {dag_id} was not finished {after} after it was queued "
        f"(queued {run.get('queued_at')}, deadline {due}, state now {run.get('state')}).\n"
        "A task may hang, wait for the gpu pool or for a worker listening on its queue."
    )
    details = {k: run.get(k) for k in ("logical_date", "queued_at", "start_date", "state", "run_type")}
    return Alert(DEADLINE_MISSED, "critical", f"{dag_id}: run {run_id} past its deadline", text,
                 dag_id, run_id, {**details, "deadline": due, "hours": hours})  # fmt: skip


async def deadline_missed(
    channels: dict[str, Any], hours: float, context: dict[str, Any] | None = None
) -> list[str]:
    """The deadline callback (Airflow's triggerer awaits it with the DAG run in ``context``)."""
    return await send_async(deadline_alert(context, hours), Channels.from_dict(channels), context)
