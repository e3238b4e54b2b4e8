"""The one client of Airflow's REST API (``/api/v2``): the stack, ``status``, ``backfill`` and the run note use it.

Authentication as Airflow 3's auth managers hand it out: a bearer token from ``/auth/token`` (POST with
login and password; GET when the auth manager gives tokens without credentials, as the simple one with
all-admins does), or a token given up front. Where the API is comes from an Airflow HTTP connection in its
environment form (``AIRFLOW_CONN_<ID>``: JSON as our deployments write it, or a URI), or from the caller
(the local stack passes its own address and admin password).

Standard library only (``urllib``): the local stack's Airflow ``hostname_callable`` module imports it, and
a failure to connect is an ``OSError`` like any other network error; an HTTP error is an
:class:`AirflowAPIError` naming the method, the path, the status and Airflow's answer.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from pipeline.errors import PipelineError
from pipeline.waiting import WaitTimeout, wait_until

TIMEOUT_S = 30.0
TERMINAL = ("success", "failed")


class AirflowAPIError(PipelineError):
    """Airflow's REST API answered with an HTTP error (the message holds the status and Airflow's detail)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def quote(part: str) -> str:
    """A DAG or run id as one URL path segment (run ids hold ':' and '+')."""
    return urllib.parse.quote(part, safe="")


def api_from_connection(value: str) -> tuple[str, str, str]:
    """(base URL, login, password) of an Airflow HTTP connection in its env form: JSON (as our deployments
    write ``AIRFLOW_CONN_AIRFLOW_API``) or URI (``http://login:password@host:port``)."""
    if value.lstrip().startswith("{"):
        conn = json.loads(value)
        scheme = conn.get("schema") or "http"
        port = f":{conn['port']}" if conn.get("port") else ""
        return f"{scheme}://{conn['host']}{port}", conn.get("login") or "", conn.get("password") or ""
    url = urllib.parse.urlsplit(value)
    scheme = url.path.strip("/") or ("https" if url.scheme == "https" else "http")
    port = f":{url.port}" if url.port else ""
    login = urllib.parse.unquote(url.username or "")
    return f"{scheme}://{url.hostname}{port}", login, urllib.parse.unquote(url.password or "")


class AirflowAPI:
    """A client of one API server: ``get``/``post``/``patch`` under ``/api/v2`` and the waits tests and tools need."""

    def __init__(
        self, base_url: str, username: str = "", password: str = "", token: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._token = token

    @classmethod
    def from_env(cls, conn_id: str) -> tuple[AirflowAPI, str] | None:
        """The client of the connection ``conn_id`` from ``AIRFLOW_CONN_<ID>`` and where it came from, or None."""
        var = f"AIRFLOW_CONN_{conn_id.upper()}"
        if not os.environ.get(var):
            return None
        base, login, password = api_from_connection(os.environ[var])
        return cls(base, login, password), f"Airflow REST API {base} (${var})"

    @classmethod
    def from_connection(cls, conn: Any) -> AirflowAPI:
        """The client of an Airflow ``Connection`` object (host/port/schema of the api-server; login and password
        for ``/auth/token``, or ``{"token": ...}`` in extra, or neither when the auth manager gives tokens freely)."""
        base = f"{conn.schema or 'http'}://{conn.host}" + (f":{conn.port}" if conn.port else "")
        extra = conn.extra_dejson or {}
        return cls(base, conn.login or "", conn.password or "", token=extra.get("token") or None)

    def _request(
        self, method: str, path: str, body: Any = None, auth: bool = True, timeout: float = TIMEOUT_S
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token()}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise AirflowAPIError(
                f"Airflow API {method} {path}: HTTP {exc.code}: {detail}", exc.code
            ) from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            if self._credentials["username"]:
                found = self._request("POST", "/auth/token", self._credentials, auth=False)
            else:  # an auth manager that hands out tokens without credentials (simple, all admins)
                found = self._request("GET", "/auth/token", auth=False)
            self._token = str(found["access_token"])
        return self._token

    @staticmethod
    def _query(params: Mapping[str, Any]) -> str:
        return "?" + urllib.parse.urlencode(params) if params else ""

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", "/api/v2" + path + self._query(params))

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", "/api/v2" + path, body)

    def patch(self, path: str, body: Any, **params: Any) -> Any:
        return self._request("PATCH", "/api/v2" + path + self._query(params), body)

    def put(self, path: str, body: Any = None) -> Any:
        return self._request("PUT", "/api/v2" + path, body)

    def health(self, timeout: float = 3.0) -> dict[str, str]:
        """Component -> status from ``/api/v2/monitor/health`` (no token needed); {} when the server does not answer."""
        try:
            data = self._request("GET", "/api/v2/monitor/health", auth=False, timeout=timeout)
        except (OSError, ValueError, AirflowAPIError):
            return {}
        return {k: v.get("status", "?") for k, v in (data or {}).items() if isinstance(v, dict)}

    # -----------------------------------------------------------------------------------------
    # DAG runs

    def set_note(self, dag_id: str, run_id: str, note: str) -> None:
        """Set a DAG run's note (the summary line the UI shows next to the run)."""
        self.patch(f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}", {"note": note}, update_mask="note")

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the dag processor has parsed ``dag_id`` (raises with its import errors if any)."""

        def parsed() -> dict[str, Any] | None:
            try:
                return dict(self.get(f"/dags/{quote(dag_id)}"))
            except AirflowAPIError as exc:
                if exc.status != 404:
                    raise
                return None

        try:
            return wait_until(parsed, timeout, 2.0, f"DAG {dag_id} parsed")
        except WaitTimeout:
            errors = self.get("/importErrors").get("import_errors", [])
            detail = (
                "; ".join(f"{e['filename']}: {e['stack_trace'][-300:]}" for e in errors)
                or "no import errors recorded"
            )
            raise PipelineError(f"DAG {dag_id} not parsed within {timeout:.0f}s ({detail})") from None

    def trigger(
        self,
        dag_id: str,
        logical_date: str | None,
        conf: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """Unpause ``dag_id`` and trigger a run for ``logical_date`` (ISO 8601 with a zone)."""
        self.patch(f"/dags/{quote(dag_id)}", {"is_paused": False})
        body: dict[str, Any] = {"logical_date": logical_date, "conf": dict(conf or {})}
        if run_id:
            body["dag_run_id"] = run_id
        return dict(self.post(f"/dags/{quote(dag_id)}/dagRuns", body))

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, poll: float = 3.0) -> dict[str, Any]:
        """Wait for a terminal state; raises with the failed task instances when it did not succeed in time."""
        last: dict[str, Any] = {}

        def ended() -> dict[str, Any] | None:
            last.update(self.get(f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}"))
            return last if last["state"] in TERMINAL else None

        try:
            wait_until(ended, timeout, poll, f"run {run_id} of {dag_id}")
        except WaitTimeout:
            pass  # reported below with the task states
        if last.get("state") != "success":
            tis = self.task_instances(dag_id, run_id)
            summary = ", ".join(f"{t['task_id']}[{t['map_index']}]={t['state']}" for t in tis)
            raise PipelineError(
                f"run {run_id} of {dag_id} ended as {last.get('state')!r} after waiting up to {timeout:.0f}s: {summary}"
            )
        return last

    # -----------------------------------------------------------------------------------------
    # Task instances

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        found = self.get(f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances", limit=1000)
        return list(found["task_instances"])

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """One try's log as text (one event per line), as the UI shows it."""
        path = f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/logs/{try_number}"
        content = self.get(path, map_index=map_index, full_content="true")["content"]
        return "\n".join(line if isinstance(line, str) else str(line.get("event", "")) for line in content)

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        """Every try of one task instance (hostname, state, try_number of each)."""
        path = f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{task_id}"
        path += f"/{map_index}/tries" if map_index >= 0 else "/tries"
        return list(self.get(path)["task_instances"])
