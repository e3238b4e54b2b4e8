"""Decision records: every promotion decision and operator lever, logged as an MLflow run with who and why.

A record is a run with ``pipeline.kind = promotion`` (found again with :func:`pipeline.tracking.registry.
decisions_query`): tags say the decision, reason, model, actor and DAG date; params the settings it was made
under; metrics the evidence (both models' metrics, the paired test); ``decision.json`` the whole
:class:`~pipeline.tracking.decision.Decision`. The decision is also copied onto the model version's tags and
each candidate run carries its own verdict, so the runs table shows why a run was not promoted.
:mod:`pipeline.tracking.views` and :mod:`pipeline.tracking.history` read them back.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param

from pipeline.tracking.decision import Decision
from pipeline.tracking.registry import (
    LEVERS,
    TAG_ACTOR,
    TAG_DATE,
    TAG_DECISION,
    TAG_OPERATOR_ACTION,
    TAG_OPERATOR_ACTOR,
    TAG_OPERATOR_REASON,
    TAG_OPERATOR_RECORD,
    TAG_REASON,
    TAG_RECORD_MODEL,
    TAG_RECORD_RUN,
    TAG_SELECTED_ON,
)
from pipeline.tracking.runs import TAG_KIND, configure, environment_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

_MAX_TEXT = 5000  # MLflow's tag value limit


def record_decision(
    client: MlflowClient,
    cfg: PipelineConfig,
    decision: Decision,
    parent_run_id: str | None,
    version: ModelVersion | None = None,
) -> Decision:
    """Log the decision as an MLflow run and copy it onto the model version's tags; returns it with
    ``record_run_id`` set."""
    experiment_id = configure(cfg.tracking)
    run = client.create_run(experiment_id, tags=_record_tags(decision, parent_run_id, version))
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[MlflowMetric(k, float(v), now, 0) for k, v in _evidence(decision).items() if v is not None],
        params=[Param(k, str(v)) for k, v in _settings(cfg, decision).items()],
    )
    decision.record_run_id = run_id
    client.log_dict(run_id, decision.to_dict(), "decision.json")
    client.set_terminated(run_id, "FINISHED")
    if version is not None:
        for key, value in _version_tags(decision, run_id).items():
            client.set_model_version_tag(decision.model_name, version.version, key, value)
    # Each candidate run carries its own verdict, so the runs table shows why a run was not promoted.
    for trial in decision.candidates:
        action = (
            decision.action
            if trial.verdict.startswith("selected")
            else "refused"
            if not trial.eligible
            else "not_selected"
        )
        client.set_tag(trial.run_id, TAG_DECISION, action)
        client.set_tag(trial.run_id, TAG_RECORD_RUN, run_id)
    log.info("promotion decision %s: %s (record run %s)", decision.action, decision.reason, run_id)
    return decision


def _record_tags(decision: Decision, parent_run_id: str | None, version: ModelVersion | None) -> dict[str, str]:
    tags = {
        TAG_KIND: "promotion",
        "mlflow.runName": f"{decision.action}-{decision.model_name}" + (f"-v{version.version}" if version else ""),
        TAG_DECISION: decision.action,
        TAG_REASON: decision.reason[:_MAX_TEXT],
        TAG_RECORD_MODEL: decision.model_name,
        TAG_ACTOR: decision.actor[:_MAX_TEXT],
        TAG_SELECTED_ON: decision.selected_on,
        **environment_tags(),
    }
    if decision.date:
        tags[TAG_DATE] = decision.date
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def _settings(cfg: PipelineConfig, decision: Decision) -> dict[str, Any]:
    """The record's params: what was compared and the settings the rules applied."""
    return {
        "metric": decision.metric,
        "candidate_run_id": decision.candidate_run_id or "",
        "candidate_version": decision.candidate_version or "",
        "champion_version": decision.champion_version or "",
        "promotion_margin": cfg.tracking.promotion_margin,
        "significance": cfg.tracking.significance,
        "bootstrap_samples": cfg.tracking.bootstrap_samples,
        "no_valid_split": cfg.tracking.no_valid_split,
        "selected_on": decision.selected_on,
        "n_trials": decision.n_trials,
        "same_item_space": decision.same_item_space,
        "champion_reevaluated": decision.champion_reevaluated,
        "test_fingerprint": decision.test_fingerprint or "",
        "test_window": str(decision.test_window or ""),
        "champion_training_window": str(decision.champion_training_window or ""),
    }


def _evidence(decision: Decision) -> dict[str, float | None]:
    """The record's metrics: both models' values and the paired test (None values are not logged)."""
    values: dict[str, float | None] = {
        f"candidate_{decision.metric}": decision.candidate_value,
        f"champion_{decision.metric}": decision.champion_value,
        f"champion_logged_{decision.metric}": decision.champion_logged_value,
        "alias_moved": float(decision.alias_moved),
        "p_adjusted": decision.p_adjusted,
    }
    values |= {f"candidate_{k}": v for k, v in decision.candidate_metrics.items()}
    values |= {f"champion_{k}": v for k, v in decision.champion_metrics.items()}
    if decision.test is not None:
        values |= {
            "mean_diff": decision.test.mean_diff,
            "ci_low": decision.test.ci_low,
            "ci_high": decision.test.ci_high,
            "p_value": decision.test.p_value,
            "n_predictions": float(decision.test.n),
            "champion_missed_predictions": float(decision.champion_missed_predictions),
        }
    return values


def _version_tags(decision: Decision, record_run_id: str) -> dict[str, str]:
    """What the version keeps of the decision: an operator's lever, or the decision that registered it."""
    if decision.action in LEVERS:
        return {
            TAG_OPERATOR_ACTION: decision.action,
            TAG_OPERATOR_ACTOR: decision.actor[:_MAX_TEXT],
            TAG_OPERATOR_REASON: decision.reason[:_MAX_TEXT],
            TAG_OPERATOR_RECORD: record_run_id,
        }
    if decision.action != "unchanged":  # the decision that registered the version stays on it
        return {TAG_DECISION: decision.action, TAG_REASON: decision.reason[:_MAX_TEXT], TAG_RECORD_RUN: record_run_id}
    return {}
