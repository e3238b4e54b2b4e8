"""The promotion guards: why a training run (or the version registered from it) may never be champion.

A run must be a finished training run with a logged model, trained on data that passed validation (or, with
``tracking.require_validation=false``, was not validated), and its primary metric must beat the POP and S-POP
baselines it logged. Rules and operator levers apply the same guards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.tracking.decision import Metric
from pipeline.tracking.runs import TAG_KIND, TAG_MODEL_URI, TAG_VALIDATION

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion


def check_guards(run: Run, metric: Metric, require_validation: bool) -> str | None:
    """Why this run may not be promoted, or None when it passes every guard."""
    tags, metrics = run.data.tags, run.data.metrics
    if run.info.status != "FINISHED":
        return f"run status is {run.info.status}, not FINISHED"
    if tags.get(TAG_KIND) != "training":
        return f"not a training run ({TAG_KIND}={tags.get(TAG_KIND)!r})"
    if not tags.get(TAG_MODEL_URI):
        return "the run logged no model"
    validation = tags.get(TAG_VALIDATION, "missing")
    if validation == "failed":
        return "its training data failed validation (data.validation=failed)"
    if validation != "passed" and require_validation:
        return f"its training data has no passing validation report (data.validation={validation}); set tracking.require_validation=false to allow it"
    value = metrics.get(metric.name)
    if value is None:
        return f"metric {metric.name} was not logged"
    for baseline in ("spop", "pop"):
        key = f"baseline_{baseline}_{metric.name}"
        if key not in metrics:
            return f"baseline metric {key} was not logged"
        if not value > metrics[key]:
            label = "S-POP" if baseline == "spop" else "POP"
            return f"{metric.name}={value:.4f} does not beat the {label} baseline ({metrics[key]:.4f})"
    return None


def version_ineligible(
    client: MlflowClient, version: ModelVersion, metric: Metric, require_validation: bool
) -> str | None:
    """Why a registered version may never be champion, or None: its source run must pass the guards."""
    if not version.run_id:
        return "it was not registered from a training run"
    try:
        run = client.get_run(version.run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException or a deleted run: either way no evidence
        return f"its source run {version.run_id} cannot be read ({exc})"
    return check_guards(run, metric, require_validation)
