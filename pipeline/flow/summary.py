"""The ``summary`` task: the run's decision in a few lines, in the task log, a file and the DAG run note.

:func:`format_note` writes the note (decision, metric vs champion and baselines, the trials, links to the
MLflow runs) within Airflow's note limit; :func:`summarize` logs it, writes ``runs/dt=<date>/summary.json``
next to the outputs, closes the MLflow parent run and sets the note through Airflow's REST API.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline import metric_names
from pipeline.config import env
from pipeline.errors import PipelineError
from pipeline.flow.airflow_api import AirflowAPI
from pipeline.flow.contracts import Promotion, RunPlan, TrialResult, to_xcom
from pipeline.flow.settings import config_of

log = logging.getLogger(__name__)

NOTE_LIMIT = 1000  # Airflow rejects longer DAG run notes
HEADLINES = {  # the note's first words per decision action ({model} and {version}: the candidate)
    "promoted": "**promoted**: {model} v{version} is now @champion",
    "challenger": "**not promoted**: {model} v{version} tagged @challenger",
    "unchanged": "**unchanged**: the candidate is already the champion (v{version})",
    "refused": "**refused**: the alias did not move",
    "pinned": "**pinned**: @champion is frozen; {model} v{version} compared and tagged @challenger",
}


def mlflow_run_link(experiment_id: str | None, run_id: str) -> str:
    """A link to the run in the MLflow UI (``$PIPELINE_MLFLOW_UI_URL`` or an http tracking URI), else ``runs:/``."""
    base = env().mlflow_ui_url
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not base and tracking.startswith(("http://", "https://")):
        base = tracking
    if base and experiment_id:
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _metric_lines(promoted: Promotion, best: TrialResult | None) -> list[str]:
    """The primary metric and its recall twin: candidate vs champion and the baselines; then the trials."""
    decision = promoted.verdict
    metric = decision.metric
    recall = metric_names.twin(metric, "recall")
    best_metrics = best.metrics if best else {}
    if decision.champion_version and decision.champion_value is None:
        versus = f" vs champion v{decision.champion_version} (not compared)"
    elif decision.champion_version:
        versus = f" vs champion v{decision.champion_version} {_fmt(decision.champion_value)} (same test data)"
    else:
        versus = " (no champion before)"
    valid = decision.valid_values  # what selected the candidate
    return [
        f"{metric}: candidate {_fmt(decision.candidate_value)}{versus}"
        f" | S-POP {_fmt(best_metrics.get('baseline_spop_' + metric))} | POP {_fmt(best_metrics.get('baseline_pop_' + metric))}",
        f"{recall}: candidate {_fmt(best_metrics.get(recall))} | S-POP {_fmt(best_metrics.get('baseline_spop_' + recall))}"
        f" | POP {_fmt(best_metrics.get('baseline_pop_' + recall))}",
        "trials: "
        + "; ".join(
            f"{t.name} ({t.label}) valid {_fmt(valid.get(t.run_id))} test {_fmt(t.metrics.get(metric))}"
            for t in promoted.trials
        ),
    ]


def format_note(date: str, promoted: Promotion) -> str:
    """The run's summary in a few Markdown lines: decision, metrics vs champion and baselines, links."""
    decision = promoted.verdict
    best = next((t for t in promoted.trials if t.run_id == decision.candidate_run_id), None)
    head = HEADLINES.get(decision.action, f"**{decision.action}**").format(
        model=decision.model_name, version=decision.candidate_version
    )
    n_trials = decision.n_trials if decision.n_trials is not None else len(promoted.trials)
    lines = [
        f"{head} ({date})",
        *_metric_lines(promoted, best),
        f"selected on {decision.selected_on} among {n_trials} trial(s)",
        f"reason: {decision.reason}",
    ]
    champion = promoted.champion
    if champion is not None and champion.pinned is not None:
        pin = champion.pinned
        lines.append(f"@champion v{champion.version} pinned by {pin.by} since {pin.at}: {pin.reason}")
    if champion is not None and champion.operator_action is not None:
        op = champion.operator_action
        lines.append(f"@champion v{champion.version} set by operator ({op.action}, {op.by}): {op.reason}")
    links = [f"parent run {mlflow_run_link(promoted.experiment_id, promoted.parent_run_id)}"]
    if best:
        links.append(f"best trial {mlflow_run_link(promoted.experiment_id, best.run_id)}")
    tail = "MLflow: " + ", ".join(links)
    note = "\n".join(lines)
    # Keep the links even when a long reason would push the note past Airflow's limit.
    room = NOTE_LIMIT - len(tail) - 1
    return (note if len(note) <= room else note[: room - 1] + "…") + "\n" + tail


def _partitions_waited(run: RunPlan) -> list[dict[str, Any]]:
    """The late partitions this run waited for, and how long (from its sensor's wait record)."""
    from pipeline.data import partitions  # pyarrow: not at DAG parse time

    return partitions.waited_for(partitions.read_record(to_xcom(run)))


def summarize(run: RunPlan, promoted: Promotion) -> str:
    """Log the summary, write it next to the outputs, close the parent run and set the DAG run note."""
    from pipeline import storage  # pyarrow and MLflow: not at DAG parse time
    from pipeline.tracking import runs as tracking

    cfg = config_of(run)
    note = format_note(run.date, promoted)
    log.info("run summary:\n%s", note)
    storage.write_json(
        run.summary_uri,
        {
            "dag_id": run.dag_id,
            "run_id": run.run_id,
            "date": run.date,
            "note": note,
            **to_xcom(promoted),
            "partitions_waited": _partitions_waited(run),
        },
    )
    tracking.configure(cfg.tracking)
    tracking.end_run(promoted.parent_run_id)
    set_run_note(run.dag_id, run.run_id, note, cfg.airflow.api_conn_id)
    return note


def set_run_note(dag_id: str, run_id: str, note: str, conn_id: str) -> bool:
    """Set the DAG run note through Airflow's REST API (tasks have no database access in Airflow 3).

    Uses the HTTP connection ``conn_id`` (host/port/schema of the api-server; login/password for
    ``/auth/token``, or ``{"token": ...}`` in extra, or neither when the auth manager hands out tokens
    freely). Without that connection the note stays in the task log and the summary file; returns
    whether the note was set. A failure to set it is logged, never raised: the run's work is done.
    """
    try:
        from airflow.sdk import BaseHook  # loaded in a task already; absent outside Airflow

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - AirflowNotFoundException or no Airflow context at all
        log.info("run note not set: no Airflow connection %r to the REST API", conn_id)
        return False
    api = AirflowAPI.from_connection(conn)
    base = api.base_url
    try:
        api.set_note(dag_id, run_id, note[:NOTE_LIMIT])
    except (PipelineError, OSError, KeyError, ValueError) as exc:  # HTTP errors; refused, DNS, timeouts
        log.warning("run note not set: Airflow REST API at %s answered %s", base, exc)
        return False
    return True
