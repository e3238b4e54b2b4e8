"""``python -m pipeline status``: how the pipeline is doing, on one screen.

Six sections, each read from the place that owns the fact and each independent of the others: a source
that cannot be reached (no Airflow, no MLflow store, an S3 prefix without credentials) makes its section
say so (``error``) while the rest still shows.

==============  ===============================================================================
section         source
==============  ===============================================================================
``runs``        the last DAG runs: Airflow's REST API (``AIRFLOW_CONN_<airflow.api_conn_id>`` or the
                process stack's ``stack.json``), else its metadata DB
                (``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``, else ``make run``'s SQLite under
                ``$PIPELINE_HOME/airflow``)
``models``      ``@champion`` / ``@challenger``: version, primary metric vs S-POP / POP, since when
                (pipeline.tracking.views)
``decisions``   the last promotion decisions and operator levers (pipeline.tracking.views)
``days``        rows in / quarantined / share per day: ``OUT/validated/dt=D/report.json``
``waits``       partitions the runs waited for: ``OUT/runs/dt=D/partition_wait.json``
``usage``       bytes and files under each output folder (local or ``s3://``)
==============  ===============================================================================
"""

from __future__ import annotations

import datetime as dt
import json
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import PipelineConfig, pipeline_home

if TYPE_CHECKING:
    from pipeline.stack.local import AirflowAPI

OUTPUT_FOLDERS = (
    "validated",
    "datasets",
    "models",
    "runs",
)  # what pipeline.flow.tasks writes under the output root
ALIAS_MOVES = {"promoted", "rolled_back", "moved"}  # decision.Decision.alias_moved


@dataclass
class Section:
    """One part of the screen: where it was read from, its rows, or why it could not be read."""

    source: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Status:
    generated_at: str
    output_uri: str
    sections: dict[str, Section]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Where Airflow is


@dataclass(frozen=True)
class AirflowSource:
    """How to read DAG runs: the REST API (``api``) or the metadata database (``db_url``)."""

    api: AirflowAPI | None = None
    db_url: str | None = None
    label: str = ""


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


def airflow_api(cfg: PipelineConfig, stack_home: str | None = None) -> tuple[AirflowAPI, str] | None:
    """The REST API client (pipeline.stack.local.AirflowAPI) and where its address came from, or None.

    ``stack_home``: the process stack (``stack.sh up``) whose ``stack.json`` holds the API port and the admin
    password; else the connection ``airflow.api_conn_id`` from ``AIRFLOW_CONN_<ID>`` (set on every Airflow
    component of the stack, compose and Kubernetes, where the DAG's summary task uses it too).
    """
    from pipeline.stack import local as localstack

    if stack_home:
        state = localstack.StackState.load(stack_home)
        return state.api(), f"Airflow REST API {state.api_url} (stack {state.home})"
    var = f"AIRFLOW_CONN_{cfg.airflow.api_conn_id.upper()}"
    if os.environ.get(var):
        base, login, password = api_from_connection(os.environ[var])
        return localstack.AirflowAPI(base, login, password), f"Airflow REST API {base} (${var})"
    return None


def airflow_db_url() -> str:
    """The metadata DB: Airflow's own setting, else ``make run``'s SQLite file under ``$PIPELINE_HOME``."""
    return (
        os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
        or f"sqlite:///{pipeline_home() / 'airflow' / 'airflow.db'}"
    )


def airflow_source(cfg: PipelineConfig, stack_home: str | None = None) -> AirflowSource:
    found = airflow_api(cfg, stack_home)
    if found is not None:
        return AirflowSource(api=found[0], label=found[1])
    url = airflow_db_url()
    return AirflowSource(db_url=url, label=f"Airflow metadata DB {_hide_password(url)}")


def _hide_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


# ---------------------------------------------------------------------------------------------
# Sections


def _iso(value: Any) -> str | None:
    """A timestamp from the API (ISO text) or the DB (datetime, or text in SQLite) as ISO 8601 UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="seconds")


def _duration(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)


def _run_row(
    run_id: str, run_type: Any, state: Any, logical: Any, start: Any, end: Any, note: Any
) -> dict[str, Any]:
    started, ended = _iso(start), _iso(end)
    return {
        "date": (_iso(logical) or "")[:10] or None,
        "run_id": run_id,
        "run_type": str(run_type or ""),
        "state": str(state or ""),
        "start": started,
        "end": ended,
        "duration_s": _duration(started, ended),
        "note": (str(note).splitlines() or [""])[0] if note else "",  # the decision line of the summary note
    }


def dag_runs(source: AirflowSource, dag_id: str, limit: int) -> list[dict[str, Any]]:
    """The last ``limit`` runs of ``dag_id``, newest logical date first."""
    if source.api is not None:
        dag = urllib.parse.quote(dag_id, safe="")
        found = source.api.get(f"/dags/{dag}/dagRuns", order_by="-logical_date", limit=limit)
        return [
            _run_row(
                r["dag_run_id"],
                r.get("run_type"),
                r.get("state"),
                r.get("logical_date"),
                r.get("start_date"),
                r.get("end_date"),
                r.get("note"),
            )  # fmt: skip
            for r in found["dag_runs"]
        ]
    assert source.db_url is not None
    return _dag_runs_from_db(source.db_url, dag_id, limit)


def _dag_runs_from_db(url: str, dag_id: str, limit: int) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise FileNotFoundError(
            f"no Airflow metadata DB at {url} (run `make run`, or set AIRFLOW_CONN_AIRFLOW_API)"
        )
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            # The note lives in its own table (dag_run_note) since Airflow 2.5.
            rows = conn.execute(
                sa.text(
                    # dag.test() (make run) records the logical date as the run's start: its first task's
                    # start is when it really began (and equals a scheduled run's start to the second).
                    "SELECT r.run_id, r.run_type, r.state, r.logical_date, "
                    "COALESCE((SELECT MIN(t.start_date) FROM task_instance t WHERE t.dag_id = r.dag_id "
                    "AND t.run_id = r.run_id), r.start_date), r.end_date, n.content "
                    "FROM dag_run r LEFT JOIN dag_run_note n ON n.dag_run_id = r.id "
                    "WHERE r.dag_id = :dag_id ORDER BY r.logical_date DESC LIMIT :limit"
                ),
                {"dag_id": dag_id, "limit": limit},
            ).all()
    finally:
        engine.dispose()
    return [_run_row(*row) for row in rows]


def _since(entries: list[Any], version: str, actions: set[str]) -> str | None:
    """When ``version`` got its alias: the newest decision of one of ``actions`` about it."""
    return next(
        (e.decided_at for e in entries if e.candidate_version == version and e.action in actions), None
    )


def models(cfg: PipelineConfig, entries: list[Any]) -> list[dict[str, Any]]:
    """@champion and @challenger with the primary metric vs S-POP / POP on their own test split."""
    from pipeline.tracking import views as registry_views

    view = registry_views.models(cfg)
    tcfg = cfg.tracking
    wanted = {tcfg.champion_alias: ALIAS_MOVES, tcfg.challenger_alias: {"challenger", "pinned"}}
    rows = []
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
    from pipeline import storage
    from pipeline.flow.retention import _day_folders

    folders = _day_folders(storage.join(output_uri, "validated"))
    return [(day, storage.join(uri, "report.json")) for day, uri in folders[-days:]][::-1]


def quarantine_days(output_uri: str, days: int) -> list[dict[str, Any]]:
    """Rows in / valid / quarantined / rejected and the quarantined share per day, newest first."""
    from pipeline import storage

    rows = []
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
    from pipeline import storage
    from pipeline.data import partitions
    from pipeline.flow.retention import _day_folders

    rows = []
    for day, folder in _day_folders(storage.join(output_uri, "runs"))[-days:][::-1]:
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
    from pipeline import storage
    from pipeline.flow.retention import _usage

    rows = []
    for name in OUTPUT_FOLDERS:
        uri = storage.join(output_uri, name)
        size, files = _usage(uri)
        rows.append({"folder": name, "uri": uri, "bytes": size, "files": files})
    rows.append({"folder": "total", "uri": output_uri, "bytes": sum(r["bytes"] for r in rows),
                 "files": sum(r["files"] for r in rows)})  # fmt: skip
    return rows


def _mlflow_reachable() -> str:
    """The tracking URI; raises when it is a SQLite file that does not exist (reading would create it)."""
    from pipeline.tracking.runs import tracking_uri

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
    cfg: PipelineConfig, output_uri: str, *, runs: int = 10, days: int = 7, stack_home: str | None = None
) -> Status:
    """Every section of the status screen (each one independent of the others)."""
    from pipeline.tracking import views as registry_views

    sections: dict[str, Section] = {}
    try:
        airflow = airflow_source(cfg, stack_home)
        sections["runs"] = _section(airflow.label, lambda: dag_runs(airflow, cfg.airflow.dag_id, runs))
    except Exception as exc:  # noqa: BLE001 - e.g. a stack.json that is not there
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


# ---------------------------------------------------------------------------------------------
# The terminal view


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def table(rows: list[Mapping[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> list[str]:
    """Rows as aligned text columns: (key, header, format) per column; numbers right-aligned."""
    cells = [[fmt(r.get(key)) for key, _, fmt in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [
        all(_is_number(r.get(k)) or r.get(k) is None for r in rows) and bool(rows) for k, _, _ in columns
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return [line(headers), *(line(c) for c in cells)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _secs(value: Any) -> str:
    if value is None:
        return "-"
    from pipeline.data.partitions import duration_text

    return duration_text(float(value))


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _window(value: Any) -> str:
    """'2026-11-29T00:00:16.36Z .. 2026-12-01T23:57:18.46Z' -> '2026-11-29 00:00 .. 2026-12-01 23:57'."""
    if not value:
        return "-"
    return " .. ".join(part.strip().replace("T", " ")[:16] for part in str(value).split(".."))


def _short(width: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        text = _cell(value)
        return text if len(text) <= width else text[: width - 1] + "…"

    return fmt


COLUMNS: dict[str, list[tuple[str, str, Callable[[Any], str]]]] = {
    "runs": [("date", "date", _cell), ("state", "state", _cell), ("run_type", "type", _cell),
             ("duration_s", "duration", _secs), ("start", "started", _cell), ("run_id", "run id", _short(40)),
             ("note", "note", _short(60))],
    "models": [("alias", "alias", _cell), ("version", "version", _cell), ("metric", "metric", _cell),
               ("value", "value", _cell), ("spop", "S-POP", _cell), ("vs_spop", "vs S-POP", _signed),
               ("pop", "POP", _cell), ("since", "since", _cell), ("trained_on", "trained on", _window)],
    "decisions": [("decided_at", "decided at", _cell), ("date", "date", _cell), ("action", "action", _cell),
                  ("candidate_version", "cand.", _cell), ("champion_version", "champ.", _cell),
                  ("mean_diff", "diff", _signed), ("p_value", "p", _cell), ("actor", "by", _short(30)),
                  ("reason", "reason", _short(70))],
    "days": [("date", "date", _cell), ("rows_in", "rows in", _cell), ("rows_valid", "valid", _cell),
             ("rows_quarantined", "quarantined", _cell), ("share", "share", _pct), ("success", "passed", _cell),
             ("top_reason", "top reason", _cell)],
    "waits": [("date", "date", _cell), ("state", "state", _cell), ("waited_s", "waited", _secs),
              ("waited_for", "waited for", _cell), ("since", "since", _cell)],
    "usage": [("folder", "folder", _cell), ("bytes", "size", _bytes), ("files", "files", _cell), ("uri", "uri", _cell)],
}  # fmt: skip

TITLES = {
    "runs": "DAG runs",
    "models": "models",
    "decisions": "decisions",
    "days": "validation per day",
    "waits": "partitions waited for",
    "usage": "output usage",
}


def format_status(status: Status) -> str:
    """The terminal view: one titled, aligned table per section; an unreadable source says why."""
    out = [f"pipeline status at {status.generated_at}  (outputs: {status.output_uri})"]
    for name, section in status.sections.items():
        out += ["", f"== {TITLES[name]}  [{section.source}]"]
        if section.error:
            out.append(f"   UNAVAILABLE: {section.error}")
        elif not section.rows:
            out.append("   (none)")
        else:
            rows = section.rows
            if name == "models":
                present = [r for r in rows if r.get("version")]
                out += [f"   no @{r['alias']}" for r in rows if not r.get("version")]
                rows = present
                if not rows:
                    continue
            out += ["   " + line for line in table(rows, COLUMNS[name])]
    return "\n".join(out)
