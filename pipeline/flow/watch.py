"""The ``watch`` task: warnings after the decision, when nothing failed but someone should look today.

- ``quarantine_warning``: a day's quarantined share above ``alerts.quarantine_warn_share``, below the
  ``validation.max_quarantine_share`` that fails the run (read from the day's GX report);
- ``champion_stale``: ``alerts.champion_stale_runs`` decisions in a row left the champion in place
  (candidates refused or not better), read from the MLflow decision records.

Sent through :mod:`pipeline.flow.notify`'s channels; docs/runbook.md says what each means and what to run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import AlertsConfig, PipelineConfig, ValidationConfig
from pipeline.flow.alerts import reasons_line, top_reasons
from pipeline.flow.contracts import Dataset, RunPlan
from pipeline.flow.notify import CHAMPION_STALE, QUARANTINE_WARNING, Alert, Channels, send
from pipeline.flow.settings import config_of

log = logging.getLogger(__name__)

# Decision actions (pipeline.tracking.registry) as the champion's record reads them: a candidate refused or not
# better counts; a new champion or an operator's lever (rollback, move, pin: the champion is then frozen on
# purpose) ends the count; anything else (a re-run's "unchanged", an unpin) is skipped.
KEPT_ACTIONS = frozenset({"challenger", "refused"})
ENDING_ACTIONS = frozenset({"promoted", "rolled_back", "moved", "pin", "pinned"})


@dataclass(frozen=True)
class DecisionRecord:
    """One promotion decision as recorded in MLflow (pipeline.tracking.registry writes them)."""

    record_run_id: str
    action: str
    reason: str
    start_time_ms: int


def recent_decisions(cfg: PipelineConfig, limit: int) -> list[DecisionRecord]:
    """The last ``limit`` decision records of the registered model, newest first (its promotion runs)."""
    import mlflow  # not at DAG parse time

    from pipeline.tracking import registry
    from pipeline.tracking import runs as tracking

    experiment_id = tracking.configure(cfg.tracking)
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        registry.decisions_query(cfg.tracking.registered_model),
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    return [
        DecisionRecord(
            r.info.run_id,
            r.data.tags.get(registry.TAG_DECISION, ""),
            r.data.tags.get(registry.TAG_REASON, ""),
            int(r.info.start_time or 0),
        )
        for r in runs
    ]


def unchanged_streak(decisions: Sequence[DecisionRecord]) -> int:
    """How many of the newest decisions in a row kept the champion because candidates were refused or not better."""
    streak = 0
    for record in decisions:
        if record.action in ENDING_ACTIONS:
            break
        streak += record.action in KEPT_ACTIONS
    return streak


def champion_stale_alert(
    cfg: PipelineConfig, run: RunPlan, decisions: Sequence[DecisionRecord]
) -> Alert | None:
    """An alert when the newest ``alerts.champion_stale_runs`` decisions all kept the champion (else None).

    Repeats on every later run until a candidate is promoted: a daily reminder, not a one-off.
    """
    needed = cfg.alerts.champion_stale_runs
    streak = unchanged_streak(decisions)
    if not needed or streak < needed:
        return None
    recent = []
    for record in decisions:
        if record.action in ENDING_ACTIONS:
            break
        if record.action in KEPT_ACTIONS:
            recent.append(record)
    counts: dict[str, int] = {}
    for record in recent:
        counts[record.action] = counts.get(record.action, 0) + 1
    text = (
        f"the champion of {cfg.tracking.registered_model} was not replaced in the last {streak} decisions "
        f"(threshold {needed}): {', '.join(f'{a} {n}' for a, n in sorted(counts.items()))}.\n"
        f"latest reason: {recent[0].reason}"
    )
    return Alert(CHAMPION_STALE, "warning", f"{run.dag_id}: champion unchanged for {streak} decisions", text,
                 run.dag_id, run.run_id,
                 {"streak": streak, "threshold": needed, "actions": counts,
                  "decisions": [asdict(r) for r in recent]})  # fmt: skip


def quarantine_alerts(
    run: RunPlan, reports: Sequence[str], alerts_cfg: AlertsConfig, validation: ValidationConfig
) -> list[Alert]:
    """A warning per day of the run's window whose quarantined share is above the warning threshold.

    Days before the run's ``window_start`` were validated (and warned about) by their own run.
    """
    from pipeline import storage  # pyarrow: not at DAG parse time

    threshold = alerts_cfg.quarantine_warn_share
    if not threshold:
        return []
    out = []
    for uri in reports:
        day = re.search(r"dt=(\d{4}-\d{2}-\d{2})", uri)
        if day and day.group(1) < run.window_start:
            continue
        report = storage.read_json(uri)
        share = float(report.get("quarantine_share", 0.0))
        if share <= threshold:
            continue
        reasons = top_reasons(report.get("quarantine_reasons") or {})
        text = (
            f"{day.group(1) if day else uri}: {report.get('rows_quarantined', 0)} of {report.get('rows_in', 0)} rows "
            f"quarantined ({share:.2%}), above the warning threshold {threshold:.2%} "
            f"(the run fails above {validation.max_quarantine_share:.2%}).\n"
            f"top quarantine reasons: {reasons_line(reasons)}\nreport: {uri}"
        )
        out.append(Alert(QUARANTINE_WARNING, "warning",
                         f"{run.dag_id}: quarantined share {share:.2%} on {day.group(1) if day else '?'}",
                         text, run.dag_id, run.run_id,
                         {"report": uri, "quarantine_share": share, "threshold": threshold,
                          "rows_in": report.get("rows_in"), "rows_quarantined": report.get("rows_quarantined"),
                          "top_reasons": reasons}))  # fmt: skip
    return out


def check_run(run: RunPlan, dataset: Dataset) -> list[dict[str, Any]]:
    """The DAG's ``watch`` task: quarantine warnings for the run's days, then the champion's streak.

    Returns the alerts raised (kind, title), sent to the configured channels.
    """
    cfg = config_of(run)
    raised = quarantine_alerts(run, dataset.reports, cfg.alerts, cfg.validation)
    if cfg.alerts.champion_stale_runs:
        stale = champion_stale_alert(cfg, run, recent_decisions(cfg, 3 * cfg.alerts.champion_stale_runs + 10))
        if stale is not None:
            raised.append(stale)
    channels = Channels.from_config(cfg.alerts)
    for alert in raised:
        send(alert, channels)
    if not raised:
        log.info("no alert: quarantine shares and the champion's record are within their thresholds")
    return [{"kind": a.kind, "title": a.title} for a in raised]
