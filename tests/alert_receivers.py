"""Real receivers for alert tests: an SMTP server (aiosmtpd) and an HTTP server taking JSON POSTs, both on
127.0.0.1 in threads of the test process, plus the Airflow connections that point at them."""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SMTP_CONN_ID = "alerts_smtp_test"
WEBHOOK_CONN_ID = "alerts_webhook_test"
SENDER = "gru4rec-pipeline@example.test"
RECIPIENTS = ("oncall@example.test", "data-team@example.test")
WEBHOOK_PATH = "/hooks/alerts"
WEBHOOK_TOKEN = "test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    subject: str
    body: str


@dataclass
class Receivers:
    smtp_port: int
    http_port: int
    mails: list[Mail] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)  # {"path", "headers", "json"}
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connections(self) -> dict[str, str]:
        """``AIRFLOW_CONN_*`` variables of the two channels."""
        smtp = {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": self.smtp_port,
            "extra": {"disable_ssl": True, "disable_tls": True, "from_email": SENDER, "timeout": 10,
                      "retry_limit": 0},
        }  # fmt: skip
        webhook = {
            "conn_type": "http",
            "host": "127.0.0.1",
            "port": self.http_port,
            "schema": "http",
            "password": WEBHOOK_TOKEN,
            "extra": {"endpoint": WEBHOOK_PATH, "headers": {"X-Alert-Source": "tests"}},
        }
        return {
            f"AIRFLOW_CONN_{SMTP_CONN_ID.upper()}": json.dumps(smtp),
            f"AIRFLOW_CONN_{WEBHOOK_CONN_ID.upper()}": json.dumps(webhook),
        }

    def alerts_config(self) -> dict[str, Any]:
        """The pipeline config's ``alerts`` section sending to both receivers."""
        return {
            "email_to": list(RECIPIENTS),
            "smtp_conn_id": SMTP_CONN_ID,
            "webhook_conn_id": WEBHOOK_CONN_ID,
        }

    def wait_for(self, predicate: Callable[[Receivers], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"alerts did not arrive in {timeout}s: mails={self.mails} posts={self.posts}"
                )
            time.sleep(0.1)

    def kinds(self) -> tuple[list[str], list[str]]:
        """(kinds by e-mail subject order, kinds by webhook order) that arrived."""
        mail_kinds = [m.body.split("kind: ", 1)[1].split(" ", 1)[0] for m in self.mails if "kind: " in m.body]
        return mail_kinds, [p["json"]["kind"] for p in self.posts]


class _SmtpHandler:
    def __init__(self, receivers: Receivers) -> None:
        self.receivers = receivers

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        parts = [p.get_content() for p in msg.walk() if p.get_content_type() in ("text/html", "text/plain")]
        with self.receivers.lock:
            self.receivers.mails.append(
                Mail(envelope.mail_from, list(envelope.rcpt_tos), str(msg["Subject"]), "\n".join(parts))
            )
        return "250 Message accepted for delivery"


def _http_handler(receivers: Receivers) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's hook name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receivers.lock:
                receivers.posts.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                )
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:  # keep the test output clean
            pass

    return Handler


@contextmanager
def running_receivers() -> Iterator[Receivers]:
    """Start both servers on free 127.0.0.1 ports; stop them (and their threads) on exit."""
    from aiosmtpd.controller import Controller

    http = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    receivers = Receivers(smtp_port=free_port(), http_port=http.server_address[1])
    http.RequestHandlerClass = _http_handler(receivers)
    smtp = Controller(_SmtpHandler(receivers), hostname="127.0.0.1", port=receivers.smtp_port)
    smtp.start()
    thread = threading.Thread(target=http.serve_forever, name="alert-webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receivers
    finally:
        http.shutdown()
        http.server_close()
        thread.join(timeout=10)
        smtp.stop()
