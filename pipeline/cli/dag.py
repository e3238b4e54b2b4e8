"""The ``demo`` sub-command: the whole Airflow DAG end to end with embedded defaults.

Only argparse is imported here; the handler imports Airflow, MLflow and torch when it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the daily Airflow DAG end to end on generated (or your) click logs, with embedded Airflow and MLflow",
        description="Generate a few days of click logs (or use --data), then run the real DAG (dags/gru4rec_daily.py) "
        "with dag.test() for the last --runs days: validate -> build -> train (grid) -> promote. Airflow and "
        "MLflow use SQLite stores under $PIPELINE_HOME (default ./.local); MLFLOW_TRACKING_URI and "
        "PIPELINE_OUTPUT_URI point them elsewhere. Ends with the champion model and the commands that open "
        "the Airflow and MLflow UIs.",
    )
    demo.add_argument(
        "--data",
        help="click-log root (local folder or s3:// prefix) with one dt=YYYY-MM-DD/ folder per day, or a click-log "
        "file in any supported format (split into daily Parquet partitions first); default: generate",
    )
    demo.add_argument("--days", type=_positive, default=5, help="days of click logs to generate (default: 5)")
    demo.add_argument(
        "--runs", type=_positive, default=2, help="consecutive daily runs, on the last days (default: 2)"
    )
    demo.add_argument(
        "--sessions-per-day", type=_positive, default=1500, help="generated sessions per day (default: 1500)"
    )
    demo.add_argument("--items", type=_positive, default=500, help="generated catalogue size (default: 500)")
    demo.add_argument("--epochs", type=_positive, default=3, help="training epochs per trial (default: 3)")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the generated data (default: 7)")
    demo.add_argument(
        "--train-days",
        type=_window,
        help="days of data the first run trains on, ending at its date (valid/test days included; "
        "default: every day of the data up to it). A long log is quicker to try with a few weeks.",
    )
    demo.add_argument(
        "--end-date",
        type=dt.date.fromisoformat,
        help="last generated day, YYYY-MM-DD (default: yesterday, UTC)",
    )
    demo.set_defaults(handler=_demo)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _window(text: str) -> int:
    value = int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"expected at least 3 days (training, validation, test), got {text}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from pipeline.flow.demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            data=args.data,
            days=args.days,
            runs=args.runs,
            sessions_per_day=args.sessions_per_day,
            n_items=args.items,
            seed=args.seed,
            epochs=args.epochs,
            end_date=args.end_date,
            train_days=args.train_days,
        )
    )
