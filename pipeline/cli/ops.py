"""Operations sub-commands: ``retention`` (delete aged outputs, never the current models' lineage), ``status``
(one screen: runs, models, decisions, quarantine, waits, usage) and ``backfill`` (retrain past dates through
Airflow's backfill).

Only argparse is imported here; the handlers import the pipeline modules (and MLflow) when they run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from typing import Any

from pipeline.cli.settings import add_config_args, load_settings


def register(subparsers: Any) -> None:
    retention = subparsers.add_parser(
        "retention",
        help="delete datasets, validated partitions, trial models, checkpoints and quarantine older than their age",
        description="Delete outputs older than the ages of the config's retention section (datasets, validated "
        "partitions, quarantine, trial model folders, training checkpoints on this machine), by the dt=YYYY-MM-DD "
        "folder they are addressed by. Whatever the current @champion and @challenger were built from (dataset, "
        "validated partitions, model folder) is kept whatever its age. --dry-run lists what would go and how many "
        "bytes. The DAG runs the same as its last task.",
    )
    retention.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted; delete nothing"
    )
    retention.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    retention.add_argument(
        "--output", help="output root (local or s3://); default: airflow.output_uri, $PIPELINE_OUTPUT_URI, "
        "else $PIPELINE_HOME/output"
    )  # fmt: skip
    retention.add_argument(
        "--today",
        type=dt.date.fromisoformat,
        help="age outputs as of this day, YYYY-MM-DD (default: today, UTC)",
    )
    add_config_args(retention, example="retention.datasets_days=7")
    retention.set_defaults(handler=_retention)
    _register_status(subparsers)
    _register_backfill(subparsers)


def _common(parser: argparse.ArgumentParser) -> None:
    """--config / --set, and --stack for the process stack's Airflow/MLflow/S3."""
    add_config_args(parser, example="airflow.dag_id=gru4rec_daily")
    parser.add_argument(
        "--stack", metavar="DIR",
        help="the process stack started by `infra/local/stack.sh up` (its folder, e.g. .local/stack): its Airflow "
        "REST API, MLflow server and S3 outputs; default: this environment ($AIRFLOW_CONN_AIRFLOW_API, "
        "$MLFLOW_TRACKING_URI, $PIPELINE_OUTPUT_URI)",
    )  # fmt: skip


def _retention(args: argparse.Namespace) -> int:
    from pipeline.flow import retention
    from pipeline.flow.settings import output_root

    cfg = load_settings(args)
    today = args.today or dt.datetime.now(dt.UTC).date()
    result = retention.run(cfg, output_root(cfg, args.output or ""), today, dry_run=args.dry_run)
    print(json.dumps(result.to_dict(), indent=2) if args.json else retention.format_table(result))
    return 0


def _register_status(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status",
        help="one screen: last DAG runs, champion/challenger vs S-POP, decisions, quarantine per day, waits, disk use",
        description="How the pipeline is doing: the last DAG runs (Airflow REST API when $AIRFLOW_CONN_AIRFLOW_API or "
        "--stack is set, else the metadata DB: $AIRFLOW__DATABASE__SQL_ALCHEMY_CONN or make run's SQLite), @champion "
        "and @challenger with their metric vs S-POP and since when, the last decisions, rows in / quarantined per "
        "day, partitions waited for and the size of every output folder. A source that cannot be read is reported "
        "in its section; the others still show.",
    )
    status.add_argument("--json", action="store_true", help="print everything as JSON")
    status.add_argument(
        "--runs", type=int, default=10, metavar="N", help="DAG runs and decisions to show (10)"
    )
    status.add_argument(
        "--days", type=int, default=7, metavar="N", help="days of validation and waits to show (7)"
    )
    status.add_argument("--output", help="output root (local or s3://); default as retention")
    _common(status)
    status.set_defaults(handler=_status)


def _register_backfill(subparsers: Any) -> None:
    backfill = subparsers.add_parser(
        "backfill",
        help="retrain over a range of past dates (Airflow 3 backfill through the REST API)",
        description="Create an Airflow backfill of the DAG for the days FROM .. TO (inclusive): one run per day, "
        "--max-active-runs at a time (1: each date meets the champion its predecessors left). Days that already "
        "have a run are skipped unless --rerun (every day again; safe: tasks are keyed by date, nothing is "
        "registered, compared or promoted twice) or --rerun-failed. Each run is an ordinary run: a date whose "
        "test window the champion trained on is refused by the leakage guard. The DAG needs a schedule.",
    )
    backfill.add_argument(
        "--from", dest="start", required=True, type=dt.date.fromisoformat, metavar="YYYY-MM-DD"
    )
    backfill.add_argument("--to", dest="end", required=True, type=dt.date.fromisoformat, metavar="YYYY-MM-DD")
    again = backfill.add_mutually_exclusive_group()
    again.add_argument("--rerun", action="store_true", help="run days that already have a run again")
    again.add_argument("--rerun-failed", action="store_true", help="run days whose run failed again")
    backfill.add_argument("--max-active-runs", type=int, default=1, metavar="N", help="runs at once (1)")
    backfill.add_argument("--backwards", action="store_true", help="newest day first")
    backfill.add_argument(
        "--conf", default="{}", metavar="JSON", help="DAG Params for every run, e.g. '{\"grid\": ...}'"
    )
    backfill.add_argument(
        "--dry-run", action="store_true", help="list the days that would get a run; create nothing"
    )
    backfill.add_argument(
        "--wait", type=float, default=0, metavar="SECONDS", help="wait up to this long for the end"
    )
    backfill.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _common(backfill)
    backfill.set_defaults(handler=_backfill)


def _environment(args: argparse.Namespace) -> tuple[Any, str]:
    """The config and output root; with --stack, this process talks to the stack's MLflow and S3."""
    from pipeline.flow.settings import output_root

    cfg = load_settings(args)
    default_output = ""
    if args.stack:
        from pipeline.stack.services import BUCKET
        from pipeline.stack.state import StackState

        state = StackState.load(args.stack)
        os.environ.update(state.client_env())
        default_output = f"s3://{BUCKET}/output"
    return cfg, output_root(cfg, getattr(args, "output", None) or default_output)


def _stack_api(args: argparse.Namespace) -> tuple[Any, str] | None:
    """With --stack: the stack's Airflow REST API client (its admin) and where it points; else None."""
    if not args.stack:
        return None
    from pipeline.stack.state import StackState

    state = StackState.load(args.stack)
    return state.api(), state.api_label()


def _status(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.flow import status

    if args.runs < 1 or args.days < 1:
        raise ConfigError(f"--runs and --days must be >= 1, got {args.runs} and {args.days}")
    cfg, out = _environment(args)
    # A status screen answers in seconds: an MLflow server that is down is reported, not retried for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    result = status.collect(cfg, out, runs=args.runs, days=args.days, api=_stack_api(args))
    print(json.dumps(result.to_dict(), indent=2) if args.json else status.format_status(result))
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError, PipelineError
    from pipeline.flow import backfill, status

    cfg, _ = _environment(args)
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--conf is not JSON: {exc}") from None
    reprocess = "completed" if args.rerun else "failed" if args.rerun_failed else "none"
    request = backfill.Request(cfg.airflow.dag_id, args.start, args.end, reprocess, args.max_active_runs,
                               args.backwards, conf)  # fmt: skip
    found = status.airflow_api(cfg, _stack_api(args))
    if found is None:
        raise ConfigError(
            f"backfill needs Airflow's REST API: set AIRFLOW_CONN_{cfg.airflow.api_conn_id.upper()} (the connection "
            "the DAG uses, airflow.api_conn_id) or pass --stack DIR for the process stack"
        )
    api, where = found
    try:
        if args.dry_run:
            outcome = backfill.dry_run(api, request)
        else:
            outcome = backfill.create(api, request)
            if args.wait:
                outcome = backfill.wait(api, outcome, request, timeout=args.wait)
    except OSError as exc:  # connection refused, DNS, timeout: urllib's errors are OSErrors
        raise PipelineError(f"backfill: cannot reach {where}: {exc}") from None
    print(
        json.dumps(outcome.to_dict(), indent=2)
        if args.json
        else backfill.format_outcome(outcome, request, args.dry_run)
    )
    return 0
