"""Data sub-commands: ``validate``, ``build`` and ``generate`` (argparse only here; handlers import lazily).

Each prints a one-line JSON summary on stdout (for scripts) and logs progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from pipeline.cli.settings import add_config_args, load_settings
from pipeline.config import INPUT_FORMATS  # the allowed values of ingest.format


def _config(args: argparse.Namespace) -> Any:
    """The pipeline config from --config/--set, with the command's own flags applied on top."""
    cfg = load_settings(args)
    ingest = cfg.ingest
    if args.format:
        ingest = dataclasses.replace(ingest, format=args.format)
    return dataclasses.replace(cfg, ingest=ingest)


def _replace(section: Any, **flags: Any) -> Any:
    given = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(section, **given) if given else section


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, sort_keys=True, default=str))


def _validate(args: argparse.Namespace) -> int:
    from pipeline.data.validate import validate

    cfg = _config(args)
    validation = _replace(
        cfg.validation,
        partition_end=args.partition_end,
        max_quarantine_share=args.max_quarantine_share,
        max_session_length=args.max_session_length,
        min_rows=args.min_rows,
    )
    report = validate(args.inputs, args.out, cfg.ingest, validation)  # raises ValidationFailed -> exit 1
    keys = ("success", "rows_in", "rows_valid", "rows_quarantined", "rows_rejected", "quarantine_reasons")
    _print({k: report[k] for k in keys} | {"out": args.out})
    return 0


def _build(args: argparse.Namespace) -> int:
    from pipeline.data.sessions import build_dataset

    cfg = _config(args)
    build = _replace(
        cfg.build,
        test_days=args.test_days,
        valid_days=args.valid_days,
        min_session_length=args.min_session_length,
        min_item_support=args.min_item_support,
        drop_repeats=True if args.drop_repeats else None,
    )
    manifest = build_dataset(args.inputs, args.out, cfg.ingest, build)
    counts = manifest["counts"]
    _print(
        {"out": args.out, "fingerprint": manifest["fingerprint"]}
        | {split: {k: counts[split][k] for k in ("events", "sessions", "items")} for split in ("train", "valid", "test")}
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pipeline.data.generate import generate_clicks
    from pipeline.errors import ConfigError

    corruption: dict[str, float] = {}
    for item in args.corrupt or []:
        kind, sep, amount = item.partition("=")
        try:
            corruption[kind.strip()] = float(amount) if sep else 0.0
        except ValueError:
            raise ConfigError(f"--corrupt expects kind=amount, got {item!r}") from None
    uris = generate_clicks(
        args.out,
        days=args.days,
        start_date=args.start_date,
        sessions_per_day=args.sessions_per_day,
        n_items=args.items,
        seed=args.seed,
        corruption=corruption,
        fmt=args.output_format,
    )
    _print({"out": args.out, "partitions": len(uris), "first": uris[0], "last": uris[-1]})
    return 0


def _common(p: argparse.ArgumentParser, *, inputs: bool = True) -> None:
    if inputs:
        p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (dt=YYYY-MM-DD/ partitions); local or s3://")
        p.add_argument("--format", choices=INPUT_FORMATS, help="input format (default: detect per file)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder or s3:// prefix")
    if inputs:
        add_config_args(p, example="build.min_item_support=3")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "validate",
        help="validate click logs with the Great Expectations suite (clean / quarantine / report / Data Docs)",
        description="Exit 0 when every batch passes, 1 when a batch fails a table-level rule.",
    )
    _common(p)
    p.add_argument("--partition-end", metavar="ISO_TIME", help="no event may be at or after this time (default: dt= day end, else now)")
    p.add_argument("--max-quarantine-share", type=float, metavar="X", help="fail a batch above this share of bad rows (default 0.01)")
    p.add_argument("--max-session-length", type=int, metavar="N", help="longer sessions are bot-like (default 200)")
    p.add_argument("--min-rows", type=int, metavar="N", help="fail a batch with fewer rows (default 1)")
    p.set_defaults(handler=_validate)

    p = subparsers.add_parser(
        "build",
        help="build a Parquet session dataset (train/valid/test/items + manifest.json)",
        description="Inputs may be raw logs or validate's output folder (its clean rows are used).",
    )
    _common(p)
    p.add_argument("--test-days", type=float, metavar="N", help="test = sessions ending in the last N days (default 1)")
    p.add_argument("--valid-days", type=float, metavar="N", help="valid = the same inside train (default 1; 0 = none)")
    p.add_argument("--min-session-length", type=int, metavar="N", help="drop shorter sessions (default 2; 0 = off)")
    p.add_argument("--min-item-support", type=int, metavar="N", help="drop rarer items (default 5; 0 = off)")
    p.add_argument("--drop-repeats", action="store_true", help="drop consecutive repeats of an item within a session")
    p.set_defaults(handler=_build)

    p = subparsers.add_parser(
        "generate",
        help="write a synthetic click log (daily dt= partitions) for demos, tests and benchmarks",
    )
    _common(p, inputs=False)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--start-date", default="2024-01-01", metavar="YYYY-MM-DD")
    p.add_argument("--sessions-per-day", type=int, default=2000)
    p.add_argument("--items", type=int, default=2000, help="catalogue size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-format", choices=("parquet", "csv", "tsv"), default="parquet")
    p.add_argument(
        "--corrupt",
        action="append",
        metavar="KIND=AMOUNT",
        help="inject corruption: null_session_id, null_item_id, null_timestamp, out_of_window, duplicate, "
        "out_of_order (share of rows) or bot_sessions (count per day); repeatable",
    )
    p.set_defaults(handler=_generate)
