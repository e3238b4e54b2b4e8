"""What happens when a task fails for good: one clear log line, and the MLflow parent run closed as FAILED.

:func:`on_task_failure` is the DAG's first ``on_failure_callback`` (Airflow calls it after the last retry);
people are told by the notifiers of :mod:`pipeline.flow.alerts`, the DAG's other failure callbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipeline.flow.contracts import Trial
from pipeline.flow.settings import config_of

log = logging.getLogger(__name__)

TRACKED_TASKS = {"train", "promote", "summary"}  # the tasks that run after the MLflow parent run opened


def failure_message(context: Mapping[str, Any]) -> str:
    """One line an on-call person can act on: which task of which run, which try, why, where the log is."""
    ti = context.get("ti") or context.get("task_instance")
    exc = context.get("exception")
    task_id = getattr(ti, "task_id", "?")
    map_index = getattr(ti, "map_index", -1)
    where = f"{task_id}[{map_index}]" if map_index is not None and map_index >= 0 else task_id
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    run_id = getattr(ti, "run_id", None) or context.get("run_id", "?")
    tries = f"try {getattr(ti, 'try_number', '?')}/{(getattr(ti, 'max_tries', 0) or 0) + 1}"
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception recorded"
    msg = f"{dag_id} run {run_id}: task {where} failed ({tries}): {reason}"
    log_url = getattr(ti, "log_url", None)
    return f"{msg} | log: {log_url}" if log_url else msg


def on_task_failure(context: Mapping[str, Any]) -> None:
    """Airflow ``on_failure_callback``: log the failure clearly; a failure after the MLflow parent run
    opened also closes that run as FAILED. People are told by the notifiers of ``pipeline.flow.alerts`` (the
    DAG's other failure callbacks: e-mail, webhook)."""
    log.error("task failed: %s", failure_message(context))
    try:
        fail_parent_run(context)
    except Exception:  # noqa: BLE001
        log.exception("could not mark the MLflow parent run as failed")


def fail_parent_run(context: Mapping[str, Any]) -> None:
    """Close the DAG run's MLflow parent run as FAILED, so the MLflow UI does not show it running forever.

    A later re-run of the date finds the same parent run again and closes it as FINISHED.
    """
    ti = context.get("ti")
    if getattr(ti, "task_id", None) not in TRACKED_TASKS:
        return
    trials = ti.xcom_pull(task_ids="prepare_trials")  # type: ignore[union-attr]  # set: task_id matched
    if not trials:
        return
    from pipeline.tracking import runs as tracking  # MLflow: only once a tracked task failed

    first = Trial.from_xcom(trials[0])
    tracking.configure(config_of(first).tracking)
    tracking.end_run(first.parent_run_id, "FAILED")
