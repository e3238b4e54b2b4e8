"""Alerts that reach people, sent through Airflow's notifier interface.

Five kinds (docs/runbook.md has one section per kind: what it means, what to run):

- ``task_failed``: a task failed after its last retry (the DAG's ``on_failure_callback``);
- ``validation_failed``: a partition failed a table-level rule; names the report and the top quarantine
  reasons with their counts (the same callback, for a ``ValidationFailed`` of the ``validate`` task);
- ``deadline_missed``: a DAG run not finished ``alerts.deadline_hours`` after it was queued (Airflow's
  deadline alerts: the scheduler notices, the triggerer runs :func:`deadline_missed`);
- ``champion_stale``: ``alerts.champion_stale_runs`` decisions in a row left the champion in place
  (candidates refused or not better), read from the MLflow decision records;
- ``quarantine_warning``: a day's quarantined share above ``alerts.quarantine_warn_share``, below the
  ``validation.max_quarantine_share`` that fails the run.

Two channels, both Airflow notifiers on Airflow connections: e-mail through the SMTP provider's
``SmtpNotifier`` (connection ``alerts.smtp_conn_id``, recipients ``alerts.email_to``) and a JSON webhook,
:class:`WebhookNotifier` (HTTP connection ``alerts.webhook_conn_id``). With neither configured (the default)
alerts are only logged. A channel that cannot deliver is logged, never raised: it must not hide the task's
own error or fail a run whose work is done.

The DAG file imports this module while it is parsed: besides the standard library only Airflow's SDK (already
loaded there) and the config are imported at module level; MLflow, httpx and the SMTP provider where used.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow.sdk import BaseNotifier

from pipeline.config import AlertsConfig, PipelineConfig, ValidationConfig

log = logging.getLogger(__name__)

TASK_FAILED = "task_failed"
VALIDATION_FAILED = "validation_failed"
DEADLINE_MISSED = "deadline_missed"
CHAMPION_STALE = "champion_stale"
QUARANTINE_WARNING = "quarantine_warning"
KINDS = (TASK_FAILED, VALIDATION_FAILED, DEADLINE_MISSED, CHAMPION_STALE, QUARANTINE_WARNING)
SOURCE = "gru4rec-pipeline"
TOP_REASONS = 5  # quarantine reasons named in an alert
# Decision actions (pipeline.tracking.registry) as the champion's record reads them: a candidate refused or not
# better counts; a new champion or an operator's lever (rollback, move, pin: the champion is then frozen on
# purpose) ends the count; anything else (a re-run's "unchanged", an unpin) is skipped.
KEPT_ACTIONS = frozenset({"challenger", "refused"})
ENDING_ACTIONS = frozenset({"promoted", "rolled_back", "moved", "pin", "pinned"})
WEBHOOK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Alert:
    """One message for people: a kind, a one-line title, a few lines of text and the facts as JSON."""

    kind: str
    severity: str  # critical: someone must act now | warning: look at it today
    title: str
    text: str
    dag_id: str = ""
    run_id: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body. ``text`` is what Slack / Teams incoming webhooks display."""
        body = asdict(self)
        body["text"] = f"[{self.severity}] {self.title}\n{self.text}"
        body["summary"] = self.title
        body["source"] = SOURCE
        return json.loads(json.dumps(body, default=str))

    def subject(self) -> str:
        return f"[{SOURCE}] {self.severity.upper()}: {self.title}"[:250]

    def html(self) -> str:
        """The e-mail body: the text, then the details as a preformatted JSON block."""
        details = html.escape(json.dumps(self.details, indent=2, sort_keys=True, default=str))
        lines = "<br>".join(html.escape(line) for line in self.text.splitlines())
        return (
            f"<p><b>{html.escape(self.title)}</b></p><p>{lines}</p>"
            f"<p>kind: {self.kind} | DAG {html.escape(self.dag_id)} | run {html.escape(self.run_id)}</p>"
            f"<pre>{details}</pre><p>What to do: docs/runbook.md, section {self.kind}.</p>"
        )


# ---------------------------------------------------------------------------------------------
# Channels: the notifiers


@dataclass(frozen=True)
class Channels:
    """Where alerts go; JSON-ready, because the deadline callback's kwargs are stored by the scheduler."""

    email_to: tuple[str, ...] = ()
    email_from: str = ""
    smtp_conn_id: str = "smtp_default"
    webhook_conn_id: str = ""

    @classmethod
    def from_config(cls, cfg: AlertsConfig) -> Channels:
        return cls(tuple(cfg.email_to), cfg.email_from, cfg.smtp_conn_id, cfg.webhook_conn_id)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Channels:
        return cls(tuple(data.get("email_to") or ()), data.get("email_from", ""),
                   data.get("smtp_conn_id", "smtp_default"), data.get("webhook_conn_id", ""))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "email_to": list(self.email_to)}

    @property
    def any(self) -> bool:
        return bool(self.email_to or self.webhook_conn_id)


def webhook_target(conn_id: str) -> tuple[str, dict[str, str]]:
    """(URL, headers) of the webhook from its Airflow HTTP connection.

    The URL is the connection's extra ``url`` when set, else ``schema://host[:port]`` + extra ``endpoint``;
    extra ``headers`` are sent as they are, and a password becomes ``Authorization: Bearer <password>``.
    """
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extra = conn.extra_dejson or {}
    url = extra.get("url")
    if not url:
        if not conn.host:
            raise ValueError(f"webhook connection {conn_id!r} has neither a host nor an extra 'url'")
        port = f":{conn.port}" if conn.port else ""
        url = f"{conn.schema or 'https'}://{conn.host}{port}{extra.get('endpoint', '')}"
    headers = {
        "Content-Type": "application/json",
        **{str(k): str(v) for k, v in (extra.get("headers") or {}).items()},
    }
    if conn.password:
        headers.setdefault("Authorization", f"Bearer {conn.password}")
    return url, headers


class WebhookNotifier(BaseNotifier):
    """POST a JSON payload to the endpoint of an Airflow HTTP connection (sync, and async in the triggerer)."""

    template_fields = ("payload",)

    def __init__(self, webhook_conn_id: str, payload: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.webhook_conn_id = webhook_conn_id
        self.payload = payload

    def notify(self, context: Any) -> None:
        import httpx

        url, headers = webhook_target(self.webhook_conn_id)
        httpx.post(url, json=self.payload, headers=headers, timeout=WEBHOOK_TIMEOUT_S).raise_for_status()

    async def async_notify(self, context: Any) -> None:
        import httpx

        url, headers = await asyncio.to_thread(webhook_target, self.webhook_conn_id)
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as client:
            (await client.post(url, json=self.payload, headers=headers)).raise_for_status()


def notifiers(alert: Alert, channels: Channels) -> list[tuple[str, Any]]:
    """One Airflow notifier per configured channel, carrying this alert: [(channel name, notifier)]."""
    out: list[tuple[str, Any]] = []
    if channels.email_to:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        out.append((
            f"e-mail {','.join(channels.email_to)}",
            SmtpNotifier(
                to=list(channels.email_to),
                from_email=channels.email_from or None,
                subject=alert.subject(),
                html_content=alert.html(),
                smtp_conn_id=channels.smtp_conn_id,
            ),
        ))  # fmt: skip
    if channels.webhook_conn_id:
        out.append(
            (
                f"webhook {channels.webhook_conn_id}",
                WebhookNotifier(channels.webhook_conn_id, alert.payload()),
            )
        )
    return out


def send(alert: Alert, channels: Channels, context: Any = None) -> list[str]:
    """Log the alert and deliver it through every configured channel; returns the channels that failed.

    ``notify`` is called directly (not through ``__call__``): the alert's text is final and must not be
    rendered as a Jinja template (a quarantine reason may contain braces).
    """
    log.error("ALERT %s: %s\n%s", alert.kind, alert.title, alert.text)
    failed = []
    for name, notifier in notifiers(alert, channels):
        try:
            notifier.notify(context or {})
        except Exception:  # noqa: BLE001 - a broken channel must not hide the alert or fail the caller
            log.exception("alert %s not delivered by %s", alert.kind, name)
            failed.append(name)
    return failed


async def send_async(alert: Alert, channels: Channels, context: Any = None) -> list[str]:
    """:func:`send` for the triggerer: each notifier's ``async_notify``."""
    log.error("ALERT %s: %s\n%s", alert.kind, alert.title, alert.text)
    failed = []
    for name, notifier in notifiers(alert, channels):
        try:
            await notifier.async_notify(context or {})
        except Exception:  # noqa: BLE001
            log.exception("alert %s not delivered by %s", alert.kind, name)
            failed.append(name)
    return failed


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
    from pipeline.flow.tasks import failure_message

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


def _reasons_line(reasons: Sequence[tuple[str, int]]) -> str:
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
            f"({facts['quarantine_share']:.2%}); top quarantine reasons: {_reasons_line(facts['top_reasons'])}"
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
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

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


# ---------------------------------------------------------------------------------------------
# After the decision: quarantine share and a champion that stays in place


@dataclass(frozen=True)
class DecisionRecord:
    """One promotion decision as recorded in MLflow (pipeline.tracking.registry writes them)."""

    record_run_id: str
    action: str
    reason: str
    start_time_ms: int


def recent_decisions(cfg: PipelineConfig, limit: int) -> list[DecisionRecord]:
    """The last ``limit`` decision records of the registered model, newest first (its promotion runs)."""
    import mlflow

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
    cfg: PipelineConfig, run: Mapping[str, Any], decisions: Sequence[DecisionRecord]
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
    return Alert(CHAMPION_STALE, "warning", f"{run['dag_id']}: champion unchanged for {streak} decisions", text,
                 run["dag_id"], run["run_id"],
                 {"streak": streak, "threshold": needed, "actions": counts,
                  "decisions": [asdict(r) for r in recent]})  # fmt: skip


def quarantine_alerts(
    run: Mapping[str, Any], reports: Sequence[str], alerts_cfg: AlertsConfig, validation: ValidationConfig
) -> list[Alert]:
    """A warning per day of the run's window whose quarantined share is above the warning threshold.

    Days before the run's ``window_start`` were validated (and warned about) by their own run.
    """
    from pipeline import storage

    threshold = alerts_cfg.quarantine_warn_share
    if not threshold:
        return []
    out = []
    for uri in reports:
        day = re.search(r"dt=(\d{4}-\d{2}-\d{2})", uri)
        if day and day.group(1) < run["window_start"]:
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
            f"top quarantine reasons: {_reasons_line(reasons)}\nreport: {uri}"
        )
        out.append(Alert(QUARANTINE_WARNING, "warning",
                         f"{run['dag_id']}: quarantined share {share:.2%} on {day.group(1) if day else '?'}",
                         text, run["dag_id"], run["run_id"],
                         {"report": uri, "quarantine_share": share, "threshold": threshold,
                          "rows_in": report.get("rows_in"), "rows_quarantined": report.get("rows_quarantined"),
                          "top_reasons": reasons}))  # fmt: skip
    return out


def check_run(run: Mapping[str, Any], dataset: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The DAG's ``watch`` task: quarantine warnings for the run's days, then the champion's streak.

    Returns the alerts raised (kind, title), sent to the configured channels.
    """
    from pipeline.flow.tasks import config_of

    cfg = config_of(run)
    raised = quarantine_alerts(run, list(dataset.get("reports") or []), cfg.alerts, cfg.validation)
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
