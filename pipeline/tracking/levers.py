"""Operator levers on ``@champion``: roll back, move to a version, pin and unpin.

Each runs under the promotion lock (:mod:`pipeline.tracking.lock`) and is recorded like a decision, with who and
why (:mod:`pipeline.tracking.records`). A pin stops the rules (:mod:`pipeline.tracking.promotion` still compares
and records, action ``pinned``), not the operator: :func:`move_champion` works while pinned.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from pipeline.errors import PromotionError
from pipeline.tracking.decision import SELECTED_ON_OPERATOR, Decision, parse_metric
from pipeline.tracking.guards import version_ineligible
from pipeline.tracking.lock import promotion_lock
from pipeline.tracking.records import record_decision
from pipeline.tracking.registry import (
    TAG_PINNED_AT,
    TAG_PINNED_BY,
    TAG_PINNED_REASON,
    TAG_PINNED_VERSION,
    TAG_PREVIOUS_CHAMPION,
    TAG_ROLLED_BACK,
    champion_version,
    default_actor,
    mlflow_client,
    pin_state,
    set_champion,
)

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


def rollback(
    cfg: PipelineConfig, *, reason: str = "", actor: str | None = None, parent_run_id: str | None = None
) -> Decision:
    """Return ``@champion`` to the version it replaced (recorded when it became champion); log the decision.

    The version rolled back from is marked and never promoted again by the rules (train a new run).
    """
    client = mlflow_client(cfg)
    tcfg = cfg.tracking
    name = tcfg.registered_model
    with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
        current = champion_version(client, name, tcfg.champion_alias)
        if current is None:
            raise PromotionError(
                f"registered model {name!r} has no @{tcfg.champion_alias}: nothing to roll back"
            )
        previous = current.tags.get(TAG_PREVIOUS_CHAMPION)
        if not previous:
            raise PromotionError(
                f"{name} version {current.version} (@{tcfg.champion_alias}) records no previous champion to return to"
            )
        try:
            target = client.get_model_version(name, previous)
        except MlflowException as exc:
            raise PromotionError(
                f"previous champion {name} version {previous} is gone: {exc.message}"
            ) from None
        client.set_registered_model_alias(name, tcfg.champion_alias, target.version)
        client.set_model_version_tag(name, current.version, TAG_ROLLED_BACK, "true")
        text = f"rolled back {name}@{tcfg.champion_alias} from version {current.version} to version {target.version}"
        decision = _lever_decision(
            "rolled_back",
            text + (f"; why: {reason.strip()}" if reason and reason.strip() else ""),
            cfg,
            actor or default_actor(),
            candidate_run_id=target.run_id,
            candidate_version=str(target.version),
            champion_version=str(current.version),
        )
        log.info(decision.reason)
        return record_decision(client, cfg, decision, parent_run_id, target)


def move_champion(
    cfg: PipelineConfig, version: str | int, reason: str, *, actor: str | None = None
) -> Decision:
    """Move ``@champion`` to any earlier or later version (roll back or forward).

    Refuses a version that was never eligible: its source run must still pass the promotion guards
    (finished training run, validated data, beats POP and S-POP). Works while pinned (the pin then
    holds the new version): the pin stops the rules, not the operator.
    """
    why = _require_reason(reason, "promote --to-version")
    client = mlflow_client(cfg)
    tcfg = cfg.tracking
    name = tcfg.registered_model
    metric = parse_metric(tcfg.primary_metric)
    with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
        try:
            target = client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise PromotionError(
                f"registered model {name!r} has no version {version}: {exc.message}"
            ) from None
        ineligible = version_ineligible(client, target, metric, tcfg.require_validation)
        if ineligible is not None:
            raise PromotionError(
                f"{name} version {target.version} was never eligible for @{tcfg.champion_alias}: {ineligible}"
            )
        current = champion_version(client, name, tcfg.champion_alias)
        fields = {
            "candidate_run_id": target.run_id,
            "candidate_version": str(target.version),
            "champion_version": str(current.version) if current else None,
        }
        if current is not None and str(current.version) == str(target.version):
            text = f"{name}@{tcfg.champion_alias} is already version {target.version}; why: {why}"
            return record_decision(
                client, cfg, _lever_decision("unchanged", text, cfg, actor or default_actor(), **fields), None
            )
        set_champion(client, tcfg, target, str(current.version) if current else None)
        if target.tags.get(TAG_ROLLED_BACK):
            client.delete_model_version_tag(name, target.version, TAG_ROLLED_BACK)  # an operator restored it
        if pin_state(client, name) is not None:
            client.set_registered_model_tag(name, TAG_PINNED_VERSION, str(target.version))
        direction = (
            "roll forward" if current is None or int(target.version) > int(current.version) else "roll back"
        )
        text = (
            f"moved {name}@{tcfg.champion_alias} from version {current.version if current else 'none'} to version "
            f"{target.version} ({direction}); why: {why}"
        )
        decision = _lever_decision("moved", text, cfg, actor or default_actor(), **fields)
        log.info(decision.reason)
        return record_decision(client, cfg, decision, None, target)


def pin(cfg: PipelineConfig, reason: str, *, actor: str | None = None) -> Decision:
    """Freeze ``@champion``: until :func:`unpin`, promotions compare and record but never move it."""
    why = _require_reason(reason, "promote --pin")
    client = mlflow_client(cfg)
    tcfg = cfg.tracking
    name = tcfg.registered_model
    actor = actor or default_actor()
    with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
        current = champion_version(client, name, tcfg.champion_alias)
        if current is None:
            raise PromotionError(f"registered model {name!r} has no @{tcfg.champion_alias} to pin")
        fields = {
            "candidate_version": str(current.version),
            "champion_version": str(current.version),
            "candidate_run_id": current.run_id,
        }
        held = pin_state(client, name)
        if held is not None:
            text = (
                f"already pinned by {held.actor} since {held.at} ({held.reason}); not re-pinned; why: {why}"
            )
            return record_decision(client, cfg, _lever_decision("unchanged", text, cfg, actor, **fields), None)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        for key, value in {
            TAG_PINNED_REASON: why,
            TAG_PINNED_AT: now,
            TAG_PINNED_VERSION: str(current.version),
            TAG_PINNED_BY: actor,  # last: its presence is what makes the model pinned
        }.items():
            client.set_registered_model_tag(name, key, value)
        text = f"pinned {name}@{tcfg.champion_alias} at version {current.version}; why: {why}"
        decision = _lever_decision("pin", text, cfg, actor, **fields)
        log.info(decision.reason)
        return record_decision(client, cfg, decision, None)  # the pin lives on the registered model


def unpin(cfg: PipelineConfig, reason: str = "", *, actor: str | None = None) -> Decision:
    """Let promotions move ``@champion`` again."""
    client = mlflow_client(cfg)
    tcfg = cfg.tracking
    name = tcfg.registered_model
    actor = actor or default_actor()
    why = f"; why: {reason.strip()}" if reason and reason.strip() else ""
    with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
        current = champion_version(client, name, tcfg.champion_alias)
        fields = {"champion_version": str(current.version) if current else None}
        held = pin_state(client, name)
        if held is None:
            text = f"{name}@{tcfg.champion_alias} is not pinned{why}"
            return record_decision(client, cfg, _lever_decision("unchanged", text, cfg, actor, **fields), None)
        client.delete_registered_model_tag(name, TAG_PINNED_BY)  # first: unpinned from here on
        for key in (TAG_PINNED_REASON, TAG_PINNED_AT, TAG_PINNED_VERSION):
            client.delete_registered_model_tag(name, key)
        text = f"unpinned {name}@{tcfg.champion_alias} (pinned by {held.actor} since {held.at}: {held.reason}){why}"
        decision = _lever_decision("unpin", text, cfg, actor, **fields)
        log.info(decision.reason)
        return record_decision(client, cfg, decision, None)


def _lever_decision(action: str, reason: str, cfg: PipelineConfig, actor: str, **fields: Any) -> Decision:
    metric = parse_metric(cfg.tracking.primary_metric)
    return Decision(
        action,
        reason,
        cfg.tracking.registered_model,
        metric.name,
        selected_on=SELECTED_ON_OPERATOR,
        actor=actor,
        **fields,
    )


def _require_reason(reason: str, lever: str) -> str:
    text = (reason or "").strip()
    if not text:
        raise PromotionError(
            f"{lever} needs a reason (--reason TEXT): it is recorded with who moved the champion and why"
        )
    return text
