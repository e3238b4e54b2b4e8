"""Airflow embedded in this process, for the demo and the DAG tests: a SQLite metadata DB, the real DAG run
with ``dag.test()`` one logical date at a time, one terminal line per finished task.

Airflow is imported inside the functions: its configuration is read when it is first imported, so the caller
sets the environment (:func:`airflow_env`) first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipelineError
from pipeline.flow.settings import load_pipeline_config, output_root, summary_uri
from pipeline.flow.summary import NOTE_LIMIT

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "dags"
DAG_ID = "gru4rec_daily"


def airflow_env(home: Path, dags_folder: Path = DAGS_DIR) -> dict[str, str]:
    """Settings of an embedded Airflow: SQLite metadata DB under ``home``, our dags folder, no examples."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        # The UI shows the demo's runs; the scheduler must not start its own until someone unpauses.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
    }


def migrate_airflow_db(env: dict[str, str]) -> None:
    """``airflow db migrate`` (idempotent: creates or upgrades the metadata DB)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PipelineError(
            f"airflow db migrate failed (AIRFLOW_HOME={env['AIRFLOW_HOME']}):\n{proc.stderr[-3000:]}"
        )


def ensure_pool(name: str, slots: int, description: str) -> None:
    """Create the pool the training tasks run in (a scheduler leaves tasks of a missing pool queued)."""
    from airflow.models.pool import Pool

    Pool.create_or_update_pool(name=name, slots=slots, description=description, include_deferred=False)


def load_dag(dag_id: str = DAG_ID, dags_folder: Path = DAGS_DIR) -> Any:
    """Parse the dags folder the way the dag-processor does; an import error is shown, not hidden."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder))
    if bag.import_errors:
        raise PipelineError(
            "the DAG does not import:\n" + "\n".join(f"{k}: {v}" for k, v in bag.import_errors.items())
        )
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise PipelineError(f"no DAG {dag_id!r} in {dags_folder}")
    return dag


@dataclass
class RunOutcome:
    """How one ``dag.test()`` run ended."""

    date: str
    run_id: str
    state: str
    task_states: dict[str, str]
    summary: dict[str, Any] | None = None  # the summary task's file (decision, metrics, note)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "success"


def run_dag(dag: Any, day: dt.date, conf: dict[str, Any] | None = None) -> RunOutcome:
    """Run the whole DAG in-process for one logical date and set its note from the summary.

    ``dag.test()`` replaces an earlier run of the same date (Airflow keeps one run per logical date);
    our tasks are idempotent, so a repeated date reuses what the first run produced.
    """
    from airflow.utils.state import TaskInstanceState

    logical_date = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    dr = dag.test(logical_date=logical_date, run_conf=conf or {})
    tis = dr.get_task_instances()
    if not tis:
        raise PipelineError(
            f"the run for {day} has no task instances: is {day} before the DAG's start_date "
            "(airflow.start_date in the pipeline config)?"
        )
    states = {_ti_label(ti): _state(ti.state) for ti in tis}
    failed = sorted(_ti_label(ti) for ti in tis if ti.state == TaskInstanceState.FAILED)
    outcome = RunOutcome(day.isoformat(), dr.run_id, _state(dr.state), states, failed=failed)
    outcome.summary = _read_summary(day, conf or {})
    if outcome.summary and outcome.summary.get("note"):
        set_note(dag.dag_id, dr.run_id, outcome.summary["note"])
    return outcome


def _state(state: Any) -> str:
    return str(getattr(state, "value", state))


def _ti_label(ti: Any) -> str:
    return f"{ti.task_id}[{ti.map_index}]" if ti.map_index is not None and ti.map_index >= 0 else ti.task_id


def _read_summary(day: dt.date, conf: dict[str, Any]) -> dict[str, Any] | None:
    from pipeline import storage  # pyarrow: only once a run finished

    uri = summary_uri(output_root(load_pipeline_config(), conf.get("output_uri", "")), day.isoformat())
    return storage.read_json(uri) if storage.exists(uri) else None


def set_note(dag_id: str, run_id: str, note: str) -> None:
    """Write the DAG run note straight into the metadata DB (this process owns it; tasks use the REST API)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if run is not None:
            run.note = note[:NOTE_LIMIT]


class ProgressListener:
    """An Airflow listener that prints one line per finished task instance to the terminal."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.started: dict[tuple[str, int], float] = {}

    def _line(self, ti: Any, status: str, extra: str = "") -> None:
        began = self.started.pop((ti.task_id, ti.map_index), None)
        took = f"{time.monotonic() - began:6.1f}s" if began else ""
        label = ti.task_id
        if ti.map_index is not None and ti.map_index >= 0:
            label += f"[{getattr(ti, 'rendered_map_index', None) or ti.map_index}]"
        self.out.write(f"    {status:<6} {label:<44} {took}{extra}\n")
        self.out.flush()

    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        self.started[(task_instance.task_id, task_instance.map_index)] = time.monotonic()

    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        self._line(task_instance, "ok")

    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
        self._line(task_instance, "FAILED", f"  {str(error).splitlines()[0] if error else ''}")


@contextlib.contextmanager
def progress_listener(out: IO[str]) -> Iterator[ProgressListener]:
    """Print task progress while ``dag.test()`` runs (listeners are called in the task's process)."""
    from airflow.sdk._shared.listeners import hookimpl
    from airflow.sdk.listener import get_listener_manager

    for name in ("on_task_instance_running", "on_task_instance_success", "on_task_instance_failed"):
        hookimpl(getattr(ProgressListener, name))  # marks the function once; bound methods inherit it
    listener = ProgressListener(out)
    manager = get_listener_manager()
    manager.add_listener(listener)
    try:
        yield listener
    finally:
        manager.pm.unregister(listener)


@contextlib.contextmanager
def output_to_file(path: Path) -> Iterator[IO[str]]:
    """Send everything written to stdout/stderr (Airflow's and our logs, tqdm) to ``path``; yield the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(path, "a", buffering=1) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()
