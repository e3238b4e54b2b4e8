"""Operations sub-commands: ``retention`` (delete aged outputs, never the current models' lineage).

Only argparse is imported here; the handler imports the pipeline modules (and MLflow) when it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from typing import Any


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
    retention.add_argument("--config", help="YAML/JSON pipeline config file (default: $PIPELINE_CONFIG)")
    retention.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.NAME=VALUE",
        help="override one setting, e.g. --set retention.datasets_days=7 (repeatable)",
    )
    retention.set_defaults(handler=_retention)


def _retention(args: argparse.Namespace) -> int:
    from pipeline import retention
    from pipeline.config import load_config
    from pipeline.tasks import CONFIG_ENV, output_root

    cfg = load_config(args.config or os.environ.get(CONFIG_ENV) or None, args.overrides)
    today = args.today or dt.datetime.now(dt.UTC).date()
    result = retention.run(cfg, output_root(cfg, args.output or ""), today, dry_run=args.dry_run)
    print(json.dumps(result.to_dict(), indent=2) if args.json else retention.format_table(result))
    return 0
