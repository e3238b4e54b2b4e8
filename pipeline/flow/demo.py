"""``python -m pipeline demo``: the whole daily DAG end to end on one machine, with embedded defaults.

What it does, all under ``$PIPELINE_HOME`` (default ``./.local``):

1. click logs: generates a few days of realistic click logs (``data/clicks/dt=YYYY-MM-DD/``) or uses
   ``--data``: a local folder or ``s3://`` prefix of ``dt=YYYY-MM-DD/`` partitions, used in place, or
   any click log ``pipeline.data.ingest`` reads (e.g. a GRU4Rec TSV), split into daily Parquet partitions first
   (their metadata keeps what the source format implies: :mod:`pipeline.flow.demo_data`);
2. Airflow on SQLite (``airflow/``, the ``gpu`` pool created; :mod:`pipeline.flow.embedded`) and MLflow on
   SQLite (``mlflow.db``);
3. runs the real DAG (``dags/gru4rec_daily.py``) with ``dag.test()`` for the last ``--runs`` days, one
   logical date after the other: the first run promotes a champion, the next ones compete with it;
4. prints the champion, its metrics, and the commands that open the Airflow and MLflow UIs on this data.

Airflow's own output goes to ``logs/demo.log``; the terminal shows one line per task.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import env as pipeline_env  # `env` is a services' environment here
from pipeline.errors import InputError
from pipeline.flow.demo_data import generate_demo_data, import_by_day, partition_days
from pipeline.flow.embedded import (
    DAG_ID,
    RunOutcome,
    airflow_env,
    ensure_pool,
    load_dag,
    migrate_airflow_db,
    output_to_file,
    progress_listener,
    run_dag,
)
from pipeline.flow.settings import CONFIG_ENV, dag_settings

MLFLOW_UI_PORT = 5000
AIRFLOW_UI_PORT = 8080


@dataclass(frozen=True)
class DemoOptions:
    """What ``python -m pipeline demo`` was asked for (its command-line options)."""

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


def run_demo(opts: DemoOptions) -> int:
    """The demo end to end (see the module docstring); 0 when every run succeeded, 1 when one failed."""
    from pipeline.config import pipeline_home

    t0 = time.monotonic()
    home = pipeline_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "logs" / "demo.log"
    print(f"GRU4Rec pipeline demo  (PIPELINE_HOME={home}; detailed log: {log_path})", flush=True)
    with output_to_file(log_path) as terminal:

        def say(msg: str) -> None:
            terminal.write(msg + "\n")

        say("[1/4] click logs")
        data_uri, days = _click_logs(opts, home, say)
        run_days = days[-opts.runs :]
        train_days = (run_days[0] - days[0]).days + 1  # the first run trains on every day up to it...
        if opts.train_days:  # ...or on fewer: each day of the window is one validation task
            train_days = min(train_days, opts.train_days)

        say("[2/4] embedded Airflow (SQLite) and MLflow (SQLite)")
        output_uri = pipeline_env().output_uri or str(home / "output")
        config_path = home / "demo-config.yaml"
        _write_yaml(config_path, demo_config(opts, data_uri, output_uri, days[0], train_days))
        env = _embedded_services(home, config_path, output_uri, say)
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


def _click_logs(opts: DemoOptions, home: Path, say: Callable[[str], None]) -> tuple[str, list[dt.date]]:
    """(data root, its days): generated, used in place, or imported; enough days for ``opts.runs`` runs."""
    if opts.data is None:
        data_uri = generate_demo_data(
            home / "data" / "clicks", say, days=opts.days, sessions_per_day=opts.sessions_per_day,
            n_items=opts.n_items, seed=opts.seed, end_date=opts.end_date,
        )  # fmt: skip
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
    say(f"  data: {data_uri} ({len(days)} days: {days[0]} .. {days[-1]})")
    return data_uri, days


def _embedded_services(
    home: Path, config_path: Path, output_uri: str, say: Callable[[str], None]
) -> dict[str, str]:
    """Point this process at the demo's config, migrate the embedded Airflow DB, create the pool; its env."""
    os.environ[CONFIG_ENV] = str(config_path)
    os.environ.setdefault("PIPELINE_MLFLOW_UI_URL", f"http://127.0.0.1:{MLFLOW_UI_PORT}")
    env = airflow_env(home / "airflow")
    os.environ.update(env)
    migrate_airflow_db(env)
    from pipeline.tracking.runs import tracking_uri  # MLflow: after the environment above is set

    say(f"  Airflow metadata: {env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}")
    say(f"  MLflow tracking:  {tracking_uri()}")
    say(f"  pipeline config:  {config_path}")
    say(f"  outputs:          {output_uri}/{{validated,datasets,models,runs}}/dt=YYYY-MM-DD")
    ensure_pool(dag_settings().pool, 1, "GPU trainers: how many training trials run at once")
    return env


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
