"""MLflow sub-commands: ``track`` (train a candidate and log it), ``promote`` (decide, or an operator lever:
``--history``, ``--to-version``, ``--rollback``, ``--pin`` / ``--unpin``) and ``models`` (registered versions).

Only argparse is imported here; each handler imports MLflow, torch and the pipeline modules when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.cli.settings import add_config_args, load_settings


def register(subparsers: Any) -> None:
    _register_track(subparsers)
    _register_promote(subparsers)
    _register_models(subparsers)


def _register_track(subparsers: Any) -> None:
    track = subparsers.add_parser(
        "track",
        help="train GRU4Rec on a session dataset and log the run (params, metrics, model, plots) to MLflow",
        description="Train a candidate on a session dataset (output of `build`), evaluate it on the test split and log "
        "it to MLflow (MLFLOW_TRACKING_URI, default: SQLite under $PIPELINE_HOME). Prints the run as JSON.",
    )
    track.add_argument("--dataset", required=True, help="session dataset directory or s3:// prefix")
    add_config_args(track, example="gru4rec.n_epochs=2 --set tracking.experiment=dev", gru4rec=True)
    track.add_argument(
        "--run-key", help="idempotency key, e.g. 2024-05-01/trial-0: a finished run with it is reused"
    )
    track.add_argument("--parent-run-id", help="nest the run under this MLflow run (one parent per DAG run)")
    track.add_argument("--run-name", help="MLflow run name")
    track.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    track.add_argument("--out", help="also keep the trained model directory here")
    track.set_defaults(handler=_track)


def _register_promote(subparsers: Any) -> None:
    promote = subparsers.add_parser(
        "promote",
        help="compare candidates with @champion in the MLflow registry and move the alias when one is better; "
        "or an operator lever (history, move, rollback, pin)",
        description="Without a lever: select the best trial on validation among the candidates that pass the guards, "
        "and promote it to @champion when it beats the current champion on its test split by the configured "
        "margin with significance (paired bootstrap; without a validation split Holm-corrected over the trials); "
        "otherwise tag it @challenger. Candidates: --run-id (repeatable), the training runs under --parent-run-id, "
        "or else the newest finished training run. Prints the decision as JSON. Levers (--history, --to-version, "
        "--rollback, --pin, --unpin) are recorded with who ($PIPELINE_ACTOR or user@host) and why (--reason).",
    )
    promote.add_argument("--run-id", action="append", default=[], help="candidate training run (repeatable)")
    promote.add_argument("--parent-run-id", help="candidates = finished training runs nested under this run")
    levers = promote.add_mutually_exclusive_group()
    levers.add_argument("--history", action="store_true", help="list every recorded decision, newest first")
    levers.add_argument(
        "--to-version", metavar="N", help="move @champion to version N (roll back or forward; needs --reason)"
    )
    levers.add_argument("--rollback", action="store_true", help="return @champion to the previous champion")
    levers.add_argument(
        "--pin",
        action="store_true",
        help="freeze @champion: decisions are recorded, the alias never moves (needs --reason)",
    )
    levers.add_argument("--unpin", action="store_true", help="let decisions move @champion again")
    promote.add_argument(
        "--reason", default="", help="why (recorded with the lever; required by --to-version and --pin)"
    )
    promote.add_argument("--json", action="store_true", help="--history: print JSON instead of text")
    promote.add_argument("--limit", type=int, default=20, help="--history: how many decisions (default 20)")
    promote.add_argument(
        "--device", default="auto", help="device for re-evaluating the champion (default: auto)"
    )
    add_config_args(promote, example="tracking.promotion_margin=0.01")
    promote.set_defaults(handler=_promote)


def _register_models(subparsers: Any) -> None:
    models = subparsers.add_parser(
        "models",
        help="list the registered model's versions: aliases, training window, metrics vs S-POP, origin",
        description="Every version of the registered model (tracking.registered_model), newest first: its aliases, "
        "the time range it trained on, its headline metric vs S-POP and POP, the decision that registered it "
        "and the last operator action that moved @champion to it; and whether @champion is pinned.",
    )
    models.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_config_args(models, example="tracking.registered_model=gru4rec")
    models.set_defaults(handler=_models)


def _track(args: argparse.Namespace) -> int:
    from pipeline.flow.trial import run_trial

    cfg = load_settings(args)
    result = run_trial(
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
    from pipeline.errors import ConfigError
    from pipeline.tracking import levers, promotion

    cfg = load_settings(args)
    lever = next(
        (flag for flag in ("history", "to_version", "rollback", "pin", "unpin") if getattr(args, flag)), None
    )
    if lever is not None and (args.run_id or args.parent_run_id):
        raise ConfigError(f"--{lever.replace('_', '-')} takes no --run-id / --parent-run-id")
    if lever != "history" and (args.json or args.limit != 20):
        raise ConfigError("--json and --limit go with --history (decisions always print as JSON)")
    if lever == "history":
        from pipeline.tracking import views as registry_views

        entries = registry_views.history(cfg, args.limit)
        if args.json:
            json.dump([e.to_dict() for e in entries], sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            print(registry_views.format_history(entries))
        return 0
    if lever == "to_version":
        decision = levers.move_champion(cfg, args.to_version, args.reason)
    elif lever == "rollback":
        decision = levers.rollback(cfg, reason=args.reason)
    elif lever == "pin":
        decision = levers.pin(cfg, args.reason)
    elif lever == "unpin":
        decision = levers.unpin(cfg, args.reason)
    else:
        run_ids = args.run_id or promotion.candidate_runs(cfg, args.parent_run_id)
        decision = promotion.promote(cfg, run_ids, parent_run_id=args.parent_run_id, device=args.device)
        from pipeline.tracking import history as champion_history

        champion_history.log_for_decision(cfg, decision.to_dict())
    _print(decision.to_dict())
    return 0


def _models(args: argparse.Namespace) -> int:
    from pipeline.tracking import views as registry_views

    view = registry_views.models(load_settings(args))
    if args.json:
        _print(view.to_dict())
    else:
        print(registry_views.format_models(view))
    return 0


def _print(payload: dict[str, Any]) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
