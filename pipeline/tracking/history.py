"""The champion's history as a picture, logged with each promotion decision.

Reads the decision records :mod:`pipeline.tracking.records` writes (runs with ``pipeline.kind = promotion``): for each
DAG decision, its date, what was decided, the candidate's and the champion's primary metric on the candidate's
test split and the candidate's S-POP baseline. Operator levers (rollback, move, pin) carry no new comparison
and are not points of their own.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking import plots, registry
from pipeline.tracking.runs import configure

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

PLOT = "plots/champion_history.png"


@dataclass(frozen=True)
class HistoryPoint:
    """One decision of a DAG run, as the picture shows it."""

    date: str
    action: str
    candidate: float | None  # the candidate's primary metric on its test split
    champion_after: float | None  # the champion's after the decision (the candidate's when promoted)
    spop: float | None  # S-POP on the same test split


def history_points(client: MlflowClient, experiment_id: str, model_name: str, metric: str) -> list[HistoryPoint]:
    """The DAG decisions of ``model_name`` in date order (a date decided twice: its latest record)."""
    query = registry.decisions_query(model_name)
    latest: dict[str, HistoryPoint] = {}
    for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=5000):
        tags, values = run.data.tags, run.data.metrics
        action, date = tags.get(registry.TAG_DECISION, ""), tags.get(registry.TAG_DATE)
        if not date or action in registry.LEVERS:
            continue
        candidate, champion = values.get(f"candidate_{metric}"), values.get(f"champion_{metric}")
        latest[date] = HistoryPoint(
            date=date,
            action=action,
            candidate=candidate,
            champion_after=candidate if action == "promoted" else champion,
            spop=values.get(f"candidate_baseline_spop_{metric}"),
        )
    return [latest[d] for d in sorted(latest)]


def log_history_plot(client: MlflowClient, experiment_id: str, model_name: str, metric: str, record_run_id: str) -> Path | None:
    """Draw the history up to now and log it on the decision's record run; None when nothing to draw yet."""
    points = history_points(client, experiment_id, model_name, metric)
    if not points:
        return None
    with tempfile.TemporaryDirectory(prefix="history-") as tmp:
        path = plots.champion_history(
            [p.date for p in points],
            [p.champion_after for p in points],
            [(p.date, p.candidate, p.action) for p in points if p.candidate is not None],
            [p.spop for p in points],
            metric,
            Path(tmp) / Path(PLOT).name,
        )
        client.log_artifact(record_run_id, str(path), str(Path(PLOT).parent))
    return Path(PLOT)


def log_for_decision(cfg: PipelineConfig, decision: Mapping[str, Any]) -> Path | None:
    """:func:`log_history_plot` for a decision as :func:`pipeline.tracking.promotion.promote` returns it (``to_dict()``).

    The decision is already recorded and acted on: a picture that cannot be drawn is a warning, not a failure.
    """
    record, metric = decision.get("record_run_id"), decision.get("metric")
    if not record or not metric:
        return None
    try:
        experiment_id = configure(cfg.tracking)
        return log_history_plot(registry.mlflow_client(cfg), experiment_id, decision["model_name"], metric, record)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("could not draw the champion history for decision run %s: %s", record, exc)
        return None
