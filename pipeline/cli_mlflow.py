"""MLflow sub-commands: ``track`` (train a candidate and log it) and ``promote`` (decide, or ``--rollback``).

Only argparse is imported here; each handler imports MLflow, torch and the pipeline modules when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    track = subparsers.add_parser(
        "track",
        help="train GRU4Rec on a session dataset and log the run (params, metrics, model, plots) to MLflow",
        description="Train a candidate on a session dataset (output of `build`), evaluate it on the test split and log "
        "it to MLflow (MLFLOW_TRACKING_URI, default: SQLite under $PIPELINE_HOME). Prints the run as JSON.",
    )
    track.add_argument("--dataset", required=True, help="session dataset directory or s3:// prefix")
    _config_args(track)
    track.add_argument("--run-key", help="idempotency key, e.g. 2024-05-01/trial-0: a finished run with it is reused")
    track.add_argument("--parent-run-id", help="nest the run under this MLflow run (one parent per DAG run)")
    track.add_argument("--run-name", help="MLflow run name")
    track.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    track.add_argument("--out", help="also keep the trained model directory here")
    track.set_defaults(handler=_track)

    promote = subparsers.add_parser(
        "promote",
        help="compare candidates with @champion in the MLflow registry and move the alias when one is better",
        description="Register the best candidate that passes the guards and promote it to @champion when it beats the "
        "current champion on the candidate's test split by the configured margin with significance (paired "
        "bootstrap); otherwise tag it @challenger. Candidates: --run-id (repeatable), the training runs under "
        "--parent-run-id, or else the newest finished training run. Prints the decision as JSON.",
    )
    promote.add_argument("--run-id", action="append", default=[], help="candidate training run (repeatable)")
    promote.add_argument("--parent-run-id", help="candidates = finished training runs nested under this run")
    promote.add_argument("--rollback", action="store_true", help="return @champion to the previous champion instead")
    promote.add_argument("--device", default="auto", help="device for re-evaluating the champion (default: auto)")
    _config_args(promote)
    promote.set_defaults(handler=_promote)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON pipeline config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.NAME=VALUE",
        help="override one setting, e.g. --set gru4rec.n_epochs=2 --set tracking.experiment=dev (repeatable)",
    )


def _track(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.tracking import track_training

    cfg = load_config(args.config, args.overrides)
    result = track_training(
        args.dataset,
        cfg,
        run_key=args.run_key,
        parent_run_id=args.parent_run_id,
        run_name=args.run_name,
        device=args.device,
        work_dir=args.out,
    )
    _print(result.to_dict())
    return 0


def _promote(args: argparse.Namespace) -> int:
    from pipeline import registry
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    if args.rollback:
        if args.run_id or args.parent_run_id:
            raise ConfigError("--rollback takes no --run-id / --parent-run-id")
        decision = registry.rollback(cfg)
    else:
        run_ids = args.run_id or registry.candidate_runs(cfg, args.parent_run_id)
        decision = registry.promote(cfg, run_ids, parent_run_id=args.parent_run_id, device=args.device)
    _print(decision.to_dict())
    return 0


def _print(payload: dict[str, Any]) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
