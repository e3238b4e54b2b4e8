"""``python -m pipeline backfill``: retrain over a range of past dates with Airflow 3's backfill.

A thin wrapper over the REST API's ``/api/v2/backfills`` (the same as ``airflow backfill create``): Airflow
creates one run per date of the DAG's schedule, ``max_active_runs`` at a time (default 1, so each date
meets the champion as the dates before it left it). Which dates get a run is Airflow's reprocess behaviour:

- ``none`` (default): only dates without a run; a second backfill of the same dates creates nothing;
- ``failed`` (``--rerun-failed``): also dates whose run failed;
- ``completed`` (``--rerun``): every date again. Safe: the tasks are keyed by date, so a re-run finds its
  MLflow runs and its recorded decision again and never registers, compares or moves an alias twice.

Each run is an ordinary DAG run: a date whose test window the current champion trained on is refused by
the promotion's leakage guard ("champion has seen this test window"), and the alias stays.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.flow.airflow_api import AirflowAPI, quote
from pipeline.waiting import WaitTimeout, wait_until

REPROCESS = ("none", "failed", "completed")


@dataclass(frozen=True)
class Request:
    """What to backfill (dates inclusive, UTC days)."""

    dag_id: str
    start: dt.date
    end: dt.date
    reprocess: str = "none"
    max_active_runs: int = 1
    run_backwards: bool = False
    conf: dict[str, Any] = field(default_factory=dict)  # DAG Params for every run, e.g. a smaller grid

    def __post_init__(self) -> None:
        if self.start > self.end:
            raise ConfigError(f"backfill: --from {self.start} is after --to {self.end}")
        if self.end >= dt.datetime.now(dt.UTC).date():
            raise ConfigError(
                f"backfill: --to {self.end} is not a past day (a day's run starts once the day is over)"
            )
        if self.reprocess not in REPROCESS:
            raise ConfigError(f"backfill: reprocess must be one of {REPROCESS}, got {self.reprocess!r}")
        if self.max_active_runs < 1:
            raise ConfigError(f"backfill: --max-active-runs must be >= 1, got {self.max_active_runs}")

    def body(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "from_date": f"{self.start.isoformat()}T00:00:00+00:00",
            "to_date": f"{self.end.isoformat()}T00:00:00+00:00",
            "reprocess_behavior": self.reprocess,
            "max_active_runs": self.max_active_runs,
            "run_backwards": self.run_backwards,
            "dag_run_conf": self.conf,
        }


@dataclass(frozen=True)
class RunState:
    date: str
    run_id: str
    run_type: str
    state: str
    note: str  # the summary's first line: the promotion decision


@dataclass
class Outcome:
    """A created backfill (or, for a dry run, the dates it would run) and the runs of its dates."""

    backfill_id: int | None
    dates: list[str]  # the dates Airflow created (or would create) a run for
    completed: bool
    runs: list[RunState] = field(default_factory=list)
    warning: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paused_warning(api: AirflowAPI, dag_id: str) -> str:
    """Backfill runs of a paused DAG wait: say so (unpausing also starts its schedule, so that is the operator's call)."""
    if api.get(f"/dags/{quote(dag_id)}").get("is_paused"):
        return (
            f"DAG {dag_id} is paused: Airflow starts the backfill's runs once it is unpaused "
            f"(airflow dags unpause {dag_id})"
        )
    return ""


def _post(api: AirflowAPI, path: str, request: Request) -> Any:
    try:
        return api.post(path, request.body())
    except PipelineError as exc:
        if "non-periodic schedule" in str(exc):
            raise ConfigError(
                f"backfill: DAG {request.dag_id} has no schedule (airflow.schedule is null) and Airflow backfills only "
                "scheduled DAGs: set airflow.schedule (e.g. '@daily') in the config, or trigger each date "
                f"(airflow dags trigger {request.dag_id} --logical-date DT00:00:00+00:00)"
            ) from None
        raise


def dry_run(api: AirflowAPI, request: Request) -> Outcome:
    """The dates a backfill would create a run for now (Airflow's dry run)."""
    warning = _paused_warning(api, request.dag_id)
    found = _post(api, "/backfills/dry_run", request)
    dates = sorted(str(b["logical_date"])[:10] for b in found["backfills"] if b.get("logical_date"))
    return Outcome(None, dates, completed=False, warning=warning)


def create(api: AirflowAPI, request: Request) -> Outcome:
    """Create the backfill; which dates get a run is Airflow's dry run taken just before."""
    planned = dry_run(api, request)
    created = _post(api, "/backfills", request)
    return Outcome(
        int(created["id"]),
        planned.dates,
        completed=bool(created.get("completed_at")),
        warning=planned.warning,
    )


def runs_between(api: AirflowAPI, dag_id: str, start: dt.date, end: dt.date) -> list[RunState]:
    """Every run of the dates ``start`` .. ``end`` (backfilled or not), oldest first."""
    found = api.get(
        f"/dags/{quote(dag_id)}/dagRuns",
        logical_date_gte=f"{start.isoformat()}T00:00:00+00:00",
        logical_date_lte=f"{end.isoformat()}T00:00:00+00:00",
        order_by="logical_date",
        limit=1000,
    )
    return [
        RunState(
            str(r["logical_date"])[:10],
            r["dag_run_id"],
            str(r.get("run_type") or ""),
            str(r.get("state") or ""),
            ((r.get("note") or "").splitlines() or [""])[0],
        )
        for r in found["dag_runs"]
    ]


def wait(api: AirflowAPI, outcome: Outcome, request: Request, timeout: float, poll: float = 5.0) -> Outcome:
    """Wait until Airflow marks the backfill completed (every run ended), then read the runs' states."""
    backfill_id = outcome.backfill_id
    assert backfill_id is not None

    def completed() -> bool:
        if not outcome.completed:
            outcome.completed = bool(api.get(f"/backfills/{backfill_id}").get("completed_at"))
        return outcome.completed

    try:
        wait_until(completed, timeout, poll, f"backfill {backfill_id}")
    except WaitTimeout:
        states = ", ".join(f"{r.date} {r.state}" for r in runs_between(api, request.dag_id, request.start, request.end))
        raise PipelineError(
            f"backfill {backfill_id} of {request.dag_id} not completed after {timeout:.0f} s ({states}); "
            "it goes on in Airflow: python -m pipeline status shows its runs"
        ) from None
    outcome.runs = runs_between(api, request.dag_id, request.start, request.end)
    return outcome


def format_outcome(outcome: Outcome, request: Request, dry: bool) -> str:
    span = f"{request.dag_id} {request.start} .. {request.end} (reprocess {request.reprocess})"
    lines = [f"WARNING: {outcome.warning}"] if outcome.warning else []
    if dry:
        lines.append(
            f"dry run: a backfill of {span} would run {len(outcome.dates)} date(s): {', '.join(outcome.dates) or '-'}"
        )
        return "\n".join(lines)
    lines.append(
        f"backfill {outcome.backfill_id}: {span}: {len(outcome.dates)} date(s) to run: {', '.join(outcome.dates) or 'none'}"
        + ("" if outcome.dates else " (every date already has a run; --rerun runs them again)")
    )
    if outcome.runs:
        lines.append("completed:" if outcome.completed else "runs so far:")
        width = max(len(r.run_id) for r in outcome.runs)
        lines += [f"  {r.date}  {r.state:<8} {r.run_id:<{width}}  {r.note}" for r in outcome.runs]
    elif not outcome.completed:
        lines.append(f"runs: python -m pipeline status (or the Airflow UI: Dag {request.dag_id}, Backfills)")
    return "\n".join(lines)
