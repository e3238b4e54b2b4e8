"""The one way every command takes its settings: ``--config FILE`` and repeatable ``--set section.name=value``.

``--config`` is the pipeline config (YAML/JSON, the same file the DAG reads; default ``$PIPELINE_CONFIG``),
``--set`` overrides one setting by its dotted name (``--set gru4rec.layers=[100]``). Commands that train
also take ``--gru4rec FILE``: a GRU4Rec-only file of published parameter names, applied over the config's
``gru4rec`` section and under ``--set``. A command's own flags (``build --test-days``, ``evaluate --ties``)
are applied on top by the command.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config is imported when a command runs, not while the parser is built
    from pipeline.config import PipelineConfig


def add_config_args(parser: argparse.ArgumentParser, example: str = "gru4rec.n_epochs=2", gru4rec: bool = False) -> None:
    """``--config FILE`` and ``--set SECTION.NAME=VALUE`` (and ``--gru4rec FILE`` for commands that train)."""
    parser.add_argument(
        "--config", metavar="FILE", help="pipeline config file, YAML or JSON (default: $PIPELINE_CONFIG)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.NAME=VALUE",
        help=f"override one setting, e.g. --set {example} (repeatable; wins over the files)",
    )  # fmt: skip
    if gru4rec:
        parser.add_argument(
            "--gru4rec", metavar="FILE",
            help="GRU4Rec-only file (YAML/JSON) of published parameter names (loss, layers, batch_size ...), "
            "applied over the config's gru4rec section",
        )  # fmt: skip


def load_settings(args: argparse.Namespace) -> PipelineConfig:
    """The config the command's ``--config`` / ``--gru4rec`` / ``--set`` name; every value checked here."""
    from pipeline.config import env, load_config

    return load_config(args.config or env().config or None, args.overrides, getattr(args, "gru4rec", None))
