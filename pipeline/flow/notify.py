"""How an alert reaches people: the :class:`Alert` message and its channels, sent through Airflow notifiers.

Two channels, both Airflow notifiers on Airflow connections: e-mail through the SMTP provider's
``SmtpNotifier`` (connection ``alerts.smtp_conn_id``, recipients ``alerts.email_to``) and a JSON webhook,
:class:`WebhookNotifier` (HTTP connection ``alerts.webhook_conn_id``). With neither configured (the default)
alerts are only logged. A channel that cannot deliver is logged, never raised: it must not hide the task's
own error or fail a run whose work is done. Which alerts exist is :mod:`pipeline.flow.alerts`'s business.

The DAG file imports this module while it is parsed: besides the standard library only Airflow's SDK (already
loaded there) and the config are imported at module level; httpx and the SMTP provider where used.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow.sdk import BaseNotifier

from pipeline.config import AlertsConfig

log = logging.getLogger(__name__)

TASK_FAILED = "task_failed"
VALIDATION_FAILED = "validation_failed"
DEADLINE_MISSED = "deadline_missed"
CHAMPION_STALE = "champion_stale"
QUARANTINE_WARNING = "quarantine_warning"
KINDS = (TASK_FAILED, VALIDATION_FAILED, DEADLINE_MISSED, CHAMPION_STALE, QUARANTINE_WARNING)
SOURCE = "gru4rec-pipeline"
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
        plain: dict[str, Any] = json.loads(json.dumps(body, default=str))  # datetimes etc. as strings
        return plain

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
