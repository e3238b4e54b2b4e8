"""The model registry: registered versions of the model, their aliases, lineage tags and the pin.

A version is registered once per training run (:func:`register_candidate`) and carries its lineage (source run,
dataset fingerprint and URI, item space, validation outcome), its training and test windows and its headline
metrics. ``@champion`` moves only through :func:`set_champion`, which records the version it replaced (what a
rollback returns to). An operator's pin lives as tags on the registered model (:func:`pin_state`).

Who decides is elsewhere: :mod:`pipeline.tracking.promotion` (the rules), :mod:`pipeline.tracking.levers`
(an operator), both under :mod:`pipeline.tracking.lock` and recorded by :mod:`pipeline.tracking.records`;
this module owns the tag names they write and :mod:`pipeline.tracking.views` reads.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import metric_names
from pipeline.config import env as pipeline_env  # `env` names a variable here
from pipeline.errors import PromotionError
from pipeline.tracking.decision import TimeWindow
from pipeline.tracking.lineage import test_window, training_window
from pipeline.tracking.runs import (
    TAG_DATA_URI,
    TAG_FINGERPRINT,
    TAG_ITEM_SPACE,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_VALIDATION,
    configure,
    quote,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from pipeline.config import PipelineConfig, TrackingConfig

log = logging.getLogger(__name__)

# Tags written on model versions.
TAG_PREVIOUS_CHAMPION = "pipeline.previous_champion"
TAG_DECISION = "promotion.decision"  # the decision that registered the version
TAG_REASON = "promotion.reason"
TAG_RECORD_RUN = "promotion.record_run_id"
TAG_SOURCE_RUN = "source_run_id"
TAG_ROLLED_BACK = "pipeline.rolled_back"
TAG_TRAIN_START = "data.train_start"  # the training window: first train event ..
TAG_TRAIN_END = "data.train_end"  # .. last train or valid event (what the model has seen)
TAG_TEST_START = "data.test_start"  # the test window: sessions ending from here ..
TAG_TEST_END = "data.test_end"  # .. to the dataset's last event
TAG_OPERATOR_ACTION = "operator.action"  # the last lever that moved @champion to this version
TAG_OPERATOR_ACTOR = "operator.actor"
TAG_OPERATOR_REASON = "operator.reason"
TAG_OPERATOR_RECORD = "operator.record_run_id"
# Tags written on the registered model while @champion is pinned.
TAG_PINNED_BY = "pipeline.pinned_by"
TAG_PINNED_REASON = "pipeline.pinned_reason"
TAG_PINNED_AT = "pipeline.pinned_at"
TAG_PINNED_VERSION = "pipeline.pinned_version"
# Tags and params of decision records (read back by pipeline.tracking.views).
TAG_RECORD_MODEL = "registered_model"
TAG_ACTOR = "promotion.actor"
TAG_SELECTED_ON = "promotion.selected_on"
TAG_DATE = "pipeline.date"
LEVERS = ("rolled_back", "moved", "pin", "unpin")  # decisions made by an operator, not by the rules


def default_actor() -> str:
    """Who is acting: ``$PIPELINE_ACTOR``, else ``user@host``."""
    env = pipeline_env().actor  # $PIPELINE_ACTOR: the person, when the OS user is a shared account
    if env:
        return env
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def decisions_query(model_name: str) -> str:
    """The MLflow search filter for the decision records of ``model_name`` (what :func:`pipeline.tracking.records.record_decision` writes)."""
    return f"tags.`{TAG_KIND}` = 'promotion' and tags.`{TAG_RECORD_MODEL}` = {quote(model_name)}"


def mlflow_client(cfg: PipelineConfig) -> MlflowClient:
    """A client of the configured tracking store (the registry follows the tracking URI)."""
    configure(cfg.tracking)
    return MlflowClient()


def get_run(client: MlflowClient, run_id: str) -> Run:
    """The run, or a PromotionError naming it."""
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise PromotionError(f"run {run_id!r} not found in the tracking store: {exc.message}") from None


def champion_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``name@alias``, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # No such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE (SQL stores, server).
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def headline_metrics(run: Run) -> list[str]:
    """The run's test metrics a person compares (``recall_at_K``, ``mrr_at_K``, the baselines'), sorted."""
    return sorted(k for k in run.data.metrics if metric_names.is_ranking_key(k))


# ---------------------------------------------------------------------------------------------
# Registration


def find_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The oldest version of ``name`` registered from ``run_id``, if any."""
    versions = client.search_model_versions(f"name = {quote(name)} and run_id = {quote(run_id)}")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def register_candidate(
    client: MlflowClient, name: str, run: Run, metric_names: Sequence[str] = ()
) -> ModelVersion:
    """Register the model of a training run as a version of ``name``; a run is never registered twice.

    The version carries its lineage (source run, dataset fingerprint and URI, item space, validation
    outcome), its training and test windows and its headline metrics. Call it inside
    :func:`promotion_lock` when promotions may run concurrently (``promote`` does).
    """
    existing = find_version(client, name, run.info.run_id)
    if existing is not None:
        return existing
    source = run.data.tags.get(TAG_MODEL_URI)
    if not source:
        raise PromotionError(f"run {run.info.run_id} has no logged model (tag {TAG_MODEL_URI} missing)")
    try:
        client.create_registered_model(
            name, description="GRU4Rec session-based recommender (pipeline.tracking.registry)"
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        TAG_SOURCE_RUN: run.info.run_id,
        TAG_FINGERPRINT: run.data.tags.get(TAG_FINGERPRINT, ""),
        TAG_DATA_URI: run.data.tags.get(TAG_DATA_URI, ""),
        TAG_ITEM_SPACE: run.data.tags.get(TAG_ITEM_SPACE, ""),
        TAG_VALIDATION: run.data.tags.get(TAG_VALIDATION, "missing"),
    }
    trained, tested = training_window(run), test_window(run)
    if trained is not None:
        tags |= {TAG_TRAIN_START: trained.start, TAG_TRAIN_END: trained.end}
    if tested is not None:
        tags |= {TAG_TEST_START: tested.start, TAG_TEST_END: tested.end}
    for key in metric_names:
        if key in run.data.metrics:
            tags[f"metric.{key}"] = f"{run.data.metrics[key]:.6f}"
    # A logged model (models:/m-<id>): the server needs its id to resolve the source's artifacts.
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    version = client.create_model_version(name, source, run_id=run.info.run_id, tags=tags, model_id=model_id)
    log.info("registered %s version %s from run %s", name, version.version, run.info.run_id)
    return version


def version_training_window(client: MlflowClient, version: ModelVersion) -> TimeWindow | None:
    """The version's recorded training window; for a version registered before windows were recorded,
    the one its source run logged."""
    start, end = version.tags.get(TAG_TRAIN_START), version.tags.get(TAG_TRAIN_END)
    if start and end:
        return TimeWindow(start, end)
    if not version.run_id:
        return None
    try:
        return training_window(client.get_run(version.run_id))
    except MlflowException:
        return None


def set_champion(
    client: MlflowClient, tcfg: TrackingConfig, version: ModelVersion, previous: str | None
) -> None:
    """Move ``@champion`` to ``version``, recording ``previous`` on it; a challenger alias on it is dropped."""
    name = tcfg.registered_model
    if previous is not None:
        client.set_model_version_tag(name, version.version, TAG_PREVIOUS_CHAMPION, previous)
    client.set_registered_model_alias(name, tcfg.champion_alias, version.version)
    challenger = champion_version(client, name, tcfg.challenger_alias)
    if challenger is not None and str(challenger.version) == str(version.version):
        client.delete_registered_model_alias(name, tcfg.challenger_alias)


# ---------------------------------------------------------------------------------------------
# The pin: @champion frozen by an operator


@dataclass(frozen=True)
class Pin:
    """@champion frozen by an operator: the DAG still compares and records, but never moves the alias."""

    actor: str
    reason: str
    at: str
    version: str


def pin_state(client: MlflowClient, name: str) -> Pin | None:
    """The pin on ``name``, or None when @champion is not pinned (or the model does not exist)."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
            return None
        raise
    if TAG_PINNED_BY not in tags:
        return None
    return Pin(
        tags[TAG_PINNED_BY],
        tags.get(TAG_PINNED_REASON, ""),
        tags.get(TAG_PINNED_AT, ""),
        tags.get(TAG_PINNED_VERSION, ""),
    )
