"""``python -m pipeline <command>``: the operator's entry point.

Each area registers its own sub-commands (``data``, ``model``, ``mlflow``, ``dag``, ``ops``); those modules
import only argparse and ``pipeline.cli.settings`` (the one ``--config`` / ``--set`` convention) at module
level so ``--help`` stays fast, and each handler imports its heavy dependencies when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from pipeline import __version__
from pipeline.config import env
from pipeline.errors import PipelineError

AREAS = ("pipeline.cli.data", "pipeline.cli.model", "pipeline.cli.mlflow", "pipeline.cli.dag", "pipeline.cli.ops")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="GRU4Rec session-recommendation pipeline (validate, build, train, evaluate, promote).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for area in AREAS:
        try:
            module = importlib.import_module(area)
        except ModuleNotFoundError as exc:
            if exc.name != area:
                raise
            continue  # an area not built yet
        module.register(sub)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Great Expectations and friends are chatty at INFO.
    for noisy in ("great_expectations", "urllib3", "botocore", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose or env().debug)
    # SIGTERM (a timeout, `kill`, a stopping worker) becomes an exit, so cleanups run: work folders, staging.
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        result = args.handler(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
