"""The ``promote`` task: select a trial, compare it with the champion, register it, once per date.

The rules (selection on validation, paired test against ``@champion`` on the candidate's test data, margin,
pin) are :mod:`pipeline.tracking.registry`'s; this module finds a decision already recorded for the date,
asks the registry for a new one otherwise, and reads the champion after it. MLflow is imported inside the
functions: the DAG file imports this module while it is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pipeline.config import PipelineConfig, env
from pipeline.flow.contracts import (
    Champion,
    Dataset,
    OperatorAction,
    PinInfo,
    Promotion,
    RunPlan,
    TrialResult,
)
from pipeline.flow.settings import config_of
from pipeline.flow.training import headline_metrics

log = logging.getLogger(__name__)


def evaluate_and_promote(run: RunPlan, dataset: Dataset, results: Sequence[TrialResult]) -> Promotion:
    """Select a trial on validation, confirm it against the champion on test and register it
    (pipeline.tracking.registry's rules), once per date.

    A decision already recorded under this date's parent run for the same candidates is returned as it
    is: re-running a date never registers, compares or moves an alias again.
    """
    from pipeline.tracking import history as champion_history  # MLflow: not at DAG parse time
    from pipeline.tracking.promotion import promote

    cfg = config_of(run)
    parent = results[0].parent_run_id
    run_ids = sorted({r.run_id for r in results})
    decision = recorded_decision(cfg, parent, run_ids)
    if decision is not None:
        log.info(
            "decision for %s already recorded (run %s): %s",
            run.date,
            decision.get("record_run_id"),
            decision["action"],
        )
    else:
        device = env().device
        actor = f"airflow {run.dag_id} run {run.run_id}"
        decision = promote(
            cfg, run_ids, parent_run_id=parent, device=device, date=run.date, actor=actor
        ).to_dict()
        # The picture of every champion so far, on the record.
        champion_history.log_for_decision(cfg, decision)
    log.info("promotion decision: %s: %s", decision["action"], decision["reason"])
    return Promotion(
        decision=decision,
        champion=current_champion(cfg),
        trials=sorted(results, key=lambda r: r.name),
        parent_run_id=parent,
        experiment_id=results[0].experiment_id,
        dataset=dataset.summary(),
    )


def recorded_decision(cfg: PipelineConfig, parent_run_id: str, run_ids: list[str]) -> dict[str, Any] | None:
    """The decision record under ``parent_run_id`` for exactly these candidate runs, if one finished."""
    import mlflow  # not at DAG parse time

    from pipeline.tracking import registry
    from pipeline.tracking import runs as tracking

    experiment_id = tracking.configure(cfg.tracking)
    client = mlflow.MlflowClient()
    query = (
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{registry.TAG_KIND}` = 'promotion' "
        "and attributes.status = 'FINISHED'"
    )
    for record in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        try:
            decision: dict[str, Any] = mlflow.artifacts.load_dict(f"{record.info.artifact_uri}/decision.json")
        except Exception:  # noqa: BLE001 - a record without its file is not a usable decision
            continue
        if sorted(c["run_id"] for c in decision.get("candidates", [])) == run_ids:
            return decision
    return None


def current_champion(cfg: PipelineConfig) -> Champion | None:
    """The registry's champion after the decision, with the metrics of the run it came from, whether it
    is pinned and the operator action (``promote --to-version`` / ``--rollback``) that put it there."""
    import mlflow  # not at DAG parse time
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registry
    from pipeline.tracking import runs as tracking

    tracking.configure(cfg.tracking)
    client = mlflow.MlflowClient()
    tcfg = cfg.tracking
    version = registry.champion_version(client, tcfg.registered_model, tcfg.champion_alias)
    if version is None:
        return None
    pin = registry.pin_state(client, tcfg.registered_model)
    operator = version.tags.get(registry.TAG_OPERATOR_ACTION)
    run_id = str(version.run_id)
    experiment_id: str | None = None
    metrics: dict[str, float] = {}
    try:
        source = client.get_run(run_id)
    except MlflowException as exc:  # a version registered from a since-deleted run still serves
        log.warning("champion v%s: source run %s not readable: %s", version.version, run_id, exc)
    else:
        experiment_id = source.info.experiment_id
        metrics = headline_metrics(source.data.metrics)
    return Champion(
        name=tcfg.registered_model,
        alias=tcfg.champion_alias,
        version=str(version.version),
        run_id=run_id,
        experiment_id=experiment_id,
        metrics=metrics,
        pinned=PinInfo(pin.actor, pin.reason, pin.at) if pin is not None else None,
        operator_action=OperatorAction(
            operator,
            version.tags.get(registry.TAG_OPERATOR_ACTOR, ""),
            version.tags.get(registry.TAG_OPERATOR_REASON, ""),
        )
        if operator
        else None,
    )
