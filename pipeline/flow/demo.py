"""``python -m pipeline demo``: the whole daily DAG end to end on one machine, with embedded defaults.

What it does, all under ``$PIPELINE_HOME`` (default ``./.local``):

1. click logs: generates a few days of realistic click logs (``data/clicks/dt=YYYY-MM-DD/``) or uses
   ``--data``: a local folder or ``s3://`` prefix of ``dt=YYYY-MM-DD/`` partitions, used in place, or
   any click log ``pipeline.data.ingest`` reads (e.g. a GRU4Rec TSV), split into daily Parquet partitions first
   (their metadata keeps what the source format implies, see :func:`import_by_day`);
2. Airflow on SQLite (``airflow/``, the ``gpu`` pool created) and MLflow on SQLite (``mlflow.db``);
3. runs the real DAG (``dags/gru4rec_daily.py``) with ``dag.test()`` for the last ``--runs`` days, one
   logical date after the other: the first run promotes a champion, the next ones compete with it;
4. prints the champion, its metrics, and the commands that open the Airflow and MLflow UIs on this data.

Airflow's own output goes to ``logs/demo-<date>.log``; the terminal shows one line per task.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.errors import InputError, PipelineError

REPO = Path(__file__).resolve().parents[1]
DAGS_DIR = REPO / "dags"
DAG_ID = "gru4rec_daily"
MLFLOW_UI_PORT = 5000
AIRFLOW_UI_PORT = 8080


# ---------------------------------------------------------------------------------------------
# Embedded Airflow


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
    from pipeline import storage
    from pipeline.flow import tasks

    uri = tasks.summary_uri(
        tasks.output_root(tasks.load_pipeline_config(), conf.get("output_uri", "")), day.isoformat()
    )
    return storage.read_json(uri) if storage.exists(uri) else None


def set_note(dag_id: str, run_id: str, note: str) -> None:
    """Write the DAG run note straight into the metadata DB (this process owns it; tasks use the REST API)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from pipeline.flow.tasks import NOTE_LIMIT

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


# ---------------------------------------------------------------------------------------------
# The demo


@dataclass(frozen=True)
class DemoOptions:
    data: str | None = None  # None = generate
    days: int = 5
    runs: int = 2  # consecutive logical dates, the last days of the data
    sessions_per_day: int = 1500
    n_items: int = 500
    seed: int = 7
    epochs: int = 3
    end_date: dt.date | None = None  # last generated day; None = yesterday (UTC)
    train_days: int | None = None  # days in the first run's training window; None = every day before it


def demo_config(
    opts: DemoOptions, data_uri: str, output_uri: str, first_day: dt.date, train_days: int
) -> dict[str, Any]:
    """The embedded defaults: a small network and a 2-trial grid so the whole demo takes minutes on 2 cores."""
    return {
        "airflow": {
            "start_date": first_day.isoformat(),  # Airflow runs no task for a date before the DAG's start
            "data_uri": data_uri,
            "output_uri": output_uri,
            "train_days": train_days,
            "retries": 1,
            "retry_delay_minutes": 0.05,
            "grid": {"learning_rate": [0.1, 0.2]},
        },
        "gru4rec": {"layers": [64], "n_epochs": opts.epochs, "n_sample": 256, "batch_size": 32},
        "build": {"min_item_support": 3},
        "tracking": {"bootstrap_samples": 1000, "system_metrics": False},
    }


def generate_demo_data(opts: DemoOptions, out_dir: Path, say: Callable[[str], None]) -> str:
    """Generate the click logs once; a later demo with the same options reuses them."""
    from pipeline.data.generate import generate_clicks

    end = opts.end_date or (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))
    start = end - dt.timedelta(days=opts.days - 1)
    wanted = {"days": opts.days, "start_date": start.isoformat(), "sessions_per_day": opts.sessions_per_day,
              "n_items": opts.n_items, "seed": opts.seed}  # fmt: skip
    summary = out_dir / "_generated.json"
    if summary.exists():
        import json

        previous = json.loads(summary.read_text())
        if {k: previous.get(k) for k in wanted} == wanted:
            say(f"  reusing the click logs generated in {out_dir} ({start} .. {end})")
            return str(out_dir)
        import shutil

        shutil.rmtree(out_dir)
    say(
        f"  generating {opts.days} days ({start} .. {end}), {opts.sessions_per_day} sessions/day, {opts.n_items} items"
    )
    generate_clicks(str(out_dir), days=opts.days, start_date=start, sessions_per_day=opts.sessions_per_day,
                    n_items=opts.n_items, seed=opts.seed)  # fmt: skip
    return str(out_dir)


def partition_days(data_uri: str) -> list[dt.date]:
    """The days of the ``dt=YYYY-MM-DD`` folders directly under a local folder or ``s3://`` prefix."""
    from pyarrow import fs as pafs

    from pipeline import storage

    fs, path = storage.resolve(data_uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except OSError as exc:
        raise InputError(f"cannot list {data_uri}: {exc}") from None
    days = []
    for entry in entries:
        name = entry.path.rstrip("/").rsplit("/", 1)[-1]
        if entry.type == pafs.FileType.Directory and name.startswith("dt="):
            with contextlib.suppress(ValueError):
                days.append(dt.date.fromisoformat(name[3:]))
    return sorted(days)


IMPORT_VERSION = 3  # bumped when the import writes something new: older imports are redone


@dataclass(frozen=True)
class Source:
    """A click log read for the import: canonical events, what its format implies, and the lines set aside."""

    events: Any  # pa.Table of canonical events
    format: str  # one name per distinct format of its files, joined by "+"
    ordered: bool  # every file's rows are time-ordered within a session
    rejected: Any  # pa.Table: file, line, reason, raw of each malformed line (not imported)


def read_source(source: str) -> Source:
    """Read a click log as ``pipeline.data.ingest`` does, setting malformed lines aside instead of failing on the
    first one; a file that is not its format at all (missing column, wrong type) is still an error."""
    import pyarrow as pa

    from pipeline.config import IngestConfig
    from pipeline.data import ingest
    from pipeline.data.schema import EVENT_SCHEMA

    files, _ = ingest.list_inputs([source])
    reads = [ingest.read_file(uri, strict=False) for uri in files]
    for read in reads:
        if read.problems:
            raise InputError(read.problems[0].message())
    table = pa.concat_tables([r.table for r in reads]) if reads else EVENT_SCHEMA.empty_table()
    if any(r.needs_sessions for r in reads):  # user-only log: sessions over everything read
        table = ingest.sessionize(ingest.decode_ids(table), IngestConfig().session_gap_minutes)
    rejected = pa.concat_tables(
        [ingest.REJECT_SCHEMA.empty_table().add_column(0, "file", pa.array([], pa.string()))]
        + [
            r.rejected.add_column(0, "file", pa.array([r.uri] * r.rejected.num_rows, pa.string()))
            for r in reads
        ]
    )
    fmt = "+".join(sorted({r.format for r in reads}))
    return Source(table, fmt, all(r.ordered for r in reads), rejected)


def import_by_day(source: str, out_dir: Path, say: Callable[[str], None]) -> str:
    """Split a click log that is not partitioned by day (e.g. one GRU4Rec TSV) into ``dt=YYYY-MM-DD/``
    Parquet partitions of canonical events (UTC days), which is what the DAG reads.

    What the source format implies travels in each file's Parquet metadata (``pipeline.format``,
    ``pipeline.ordered``): validation then applies the session-order rule only where the source's rows
    are time-ordered within a session (not Diginetica's), as it does on the source itself. Malformed lines
    are set aside in ``_rejected.parquet`` (file, line, reason, raw text) and the rest is imported.
    """
    import json
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.data import ingest

    marker = out_dir / "_imported.json"
    wanted = {"source": storage.normalize(source), "version": IMPORT_VERSION}
    if marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in wanted} == wanted:
        say(f"  reusing {out_dir} (daily partitions of {source})")
        return str(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    read = read_source(source)
    out_dir.mkdir(parents=True)
    fmt = read.format
    events = read.events.replace_schema_metadata(
        {
            **(read.events.schema.metadata or {}),
            ingest.FORMAT_KEY: fmt.encode(),
            ingest.ORDERED_KEY: str(read.ordered).lower().encode(),
        }
    )
    days = pc.strftime(events.column("timestamp"), format="%Y-%m-%d")
    counts = {}
    for day in sorted(d for d in pc.unique(days).to_pylist() if d is not None):
        part = events.filter(pc.equal(days, day))
        (out_dir / f"dt={day}").mkdir()
        pq.write_table(part, out_dir / f"dt={day}" / "events.parquet")
        counts[day] = part.num_rows
    undated = events.num_rows - sum(counts.values())
    rejected = out_dir / "_rejected.parquet"  # a "_" name: the DAG's listing skips it
    if read.rejected.num_rows:
        pq.write_table(read.rejected, rejected)
    marker.write_text(
        json.dumps(
            {
                **wanted,
                "format": fmt,
                "ordered": read.ordered,
                "rows": counts,
                "undated": undated,
                "rejected_lines": read.rejected.num_rows,
            },
            indent=2,
        )
    )
    say(f"  split {source} ({fmt} format) into {len(counts)} daily partitions under {out_dir}")
    if read.rejected.num_rows:
        reasons = pc.value_counts(read.rejected.column("reason")).to_pylist()
        summary = ", ".join(f"{r['values']} {r['counts']}" for r in reasons)
        say(
            f"  {read.rejected.num_rows} malformed line(s) set aside ({summary}), the rest imported: see {rejected}"
        )
    if undated:
        say(f"  {undated} events have no timestamp and belong to no day: left out (see {marker})")
    return str(out_dir)


def run_demo(opts: DemoOptions) -> int:
    from pipeline.config import pipeline_home
    from pipeline.flow import tasks

    t0 = time.monotonic()
    home = pipeline_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "logs" / "demo.log"
    print(f"GRU4Rec pipeline demo  (PIPELINE_HOME={home}; detailed log: {log_path})", flush=True)
    with output_to_file(log_path) as terminal:

        def say(msg: str) -> None:
            terminal.write(msg + "\n")

        say("[1/4] click logs")
        if opts.data is None:
            data_uri = generate_demo_data(opts, home / "data" / "clicks", say)
        elif partition_days(opts.data):
            data_uri = opts.data
        else:
            data_uri = import_by_day(opts.data, home / "data" / "imported", say)
        days = partition_days(data_uri)
        if len(days) < opts.runs + 2:
            raise InputError(
                f"{data_uri} has {len(days)} daily partitions; the demo needs at least {opts.runs + 2} "
                f"(training, validation and test days before the first of {opts.runs} runs)"
            )
        run_days = days[-opts.runs :]
        train_days = (run_days[0] - days[0]).days + 1  # the first run trains on every day up to it...
        if opts.train_days:  # ...or on fewer: each day of the window is one validation task
            train_days = min(train_days, opts.train_days)
        say(f"  data: {data_uri} ({len(days)} days: {days[0]} .. {days[-1]})")

        say("[2/4] embedded Airflow (SQLite) and MLflow (SQLite)")
        output_uri = os.environ.get(tasks.OUTPUT_ENV) or str(home / "output")
        config_path = home / "demo-config.yaml"
        _write_yaml(config_path, demo_config(opts, data_uri, output_uri, days[0], train_days))
        os.environ[tasks.CONFIG_ENV] = str(config_path)
        os.environ.setdefault("PIPELINE_MLFLOW_UI_URL", f"http://127.0.0.1:{MLFLOW_UI_PORT}")
        env = airflow_env(home / "airflow")
        os.environ.update(env)
        migrate_airflow_db(env)
        from pipeline.tracking.runs import tracking_uri

        say(f"  Airflow metadata: {env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}")
        say(f"  MLflow tracking:  {tracking_uri()}")
        say(f"  pipeline config:  {config_path}")
        say(f"  outputs:          {output_uri}/{{validated,datasets,models,runs}}/dt=YYYY-MM-DD")
        ensure_pool(tasks.dag_settings().pool, 1, "GPU trainers: how many training trials run at once")
        dag = load_dag()

        say(f"[3/4] DAG {DAG_ID}: one run per logical date ({', '.join(map(str, run_days))})")
        last: RunOutcome | None = None
        with progress_listener(terminal):
            for day in run_days:
                say(f"  logical date {day}")
                last = run_dag(dag, day)
                if not last.ok:
                    say(
                        f"  run {last.run_id} {last.state}: failed {', '.join(last.failed) or '-'}; see {log_path}"
                    )
                    return 1
                say("  " + (last.summary or {}).get("note", "(no summary)").replace("\n", "\n  "))

        say("[4/4] where to look")
        assert last is not None
        _print_champion(last, say)
        _print_commands(home, env, config_path, say)
        say(f"done in {time.monotonic() - t0:.0f}s")
    return 0


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _print_champion(outcome: RunOutcome, say: Callable[[str], None]) -> None:
    champion = (outcome.summary or {}).get("champion")
    if not champion:
        say("  no champion in the registry yet (no candidate beat the baselines)")
        return
    say(f"  champion: models:/{champion['name']}@{champion['alias']} = version {champion['version']} "
        f"(MLflow run {champion['run_id']})")  # fmt: skip
    metrics = champion.get("metrics", {})
    for key in ("recall_at_20", "mrr_at_20"):
        if key in metrics:
            baselines = ", ".join(
                f"{name} {metrics[f'baseline_{b}_{key}']:.4f}"
                for b, name in (("spop", "S-POP"), ("pop", "POP"))
                if f"baseline_{b}_{key}" in metrics
            )
            say(f"    {key:<13} {metrics[key]:.4f}   (baselines: {baselines})")


def _print_commands(home: Path, env: dict[str, str], config_path: Path, say: Callable[[str], None]) -> None:
    from pipeline.tracking.runs import tracking_uri

    venv_bin = Path(sys.executable).parent
    exports = {"PIPELINE_HOME": str(home), "PIPELINE_CONFIG": str(config_path), **env}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
    say(f"  Airflow UI (runs, notes, task graph, logs of new runs) on http://127.0.0.1:{AIRFLOW_UI_PORT}:")
    say(f'    env PATH="{venv_bin}:$PATH" {assignments} {venv_bin / "airflow"} standalone')
    say(f"  MLflow UI (runs, metrics, plots, registry) on http://127.0.0.1:{MLFLOW_UI_PORT}:")
    say(
        f"    {venv_bin / 'mlflow'} ui --backend-store-uri {shlex.quote(tracking_uri())} --host 127.0.0.1 --port {MLFLOW_UI_PORT}"
    )
