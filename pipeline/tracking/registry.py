"""Model registry and promotion: a decision with evidence that never ships a worse model.

``promote`` takes the training runs of one decision (a DAG run's trials), drops the ones that fail a guard
(data that failed validation, a model that does not beat the POP and S-POP baselines), and applies the
rules of :mod:`pipeline.tracking.decision`:

* **select on validation, confirm on test**: the trial with the best validation metric is the candidate;
  only it meets the ``@champion`` on the test split (without a validation split: every trial meets the
  champion and the p-values are Holm-corrected, or the decision is refused, ``tracking.no_valid_split``);
* **same data, checked**: the champion is re-evaluated on exactly the candidate's test split, read from
  the dataset and checked against the fingerprint the candidate trained with (a rebuilt dataset fails);
  the two models are paired prediction by prediction and a paired bootstrap decides;
* **leakage guard**: each registered version records the time range it trained on (train + valid); a
  comparison whose test window overlaps the champion's training window is refused, the alias stays;
* **pinned**: while an operator has pinned ``@champion`` the comparison is still made and recorded, but
  the alias does not move (action ``pinned``).

The alias moves only when the candidate is better by the configured margin with significance; otherwise
the candidate gets the ``@challenger`` alias and the reason is recorded. The operator levers
(:func:`rollback`, :func:`move_champion`, :func:`pin`, :func:`unpin`) run under the same lock.

Every decision and every lever is logged as an MLflow run (``pipeline.kind = promotion``, with who and
why) and copied onto the version's tags; :mod:`pipeline.tracking.views` reads them back (history, models).

Race safety: the alias is moved inside a registry-wide lock, and only if the champion is still the one
the candidate was compared with (and no pin appeared); otherwise the comparison is redone against the
new champion. The lock is a registered model named ``<model>.promotion-lock``: creating a registered
model is atomic in every MLflow backend (a unique name), so it works the same on SQLite, PostgreSQL and
through a tracking server.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import logging
import os
import random
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import PromotionError
from pipeline.tracking.decision import (
    SELECTED_ON_OPERATOR,
    SELECTED_ON_TEST_NO_CHAMPION,
    Decision,
    Metric,
    PairedTest,
    Rules,
    Selection,
    TimeWindow,
    Trial,
    holm_winner,
    judge,
    leakage,
    pair_by_target_rows,
    paired_bootstrap,
    parse_metric,
    select,
)
from pipeline.tracking.runs import (
    RANKS_ARTIFACT,
    TAG_DATA_URI,
    TAG_FINGERPRINT,
    TAG_ITEM_SPACE,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_VALIDATION,
    quote,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from mlflow import MlflowClient
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
ACTOR_ENV = "PIPELINE_ACTOR"  # who runs the CLI, when the OS user is not the person (shared accounts)
LEVERS = ("rolled_back", "moved", "pin", "unpin")  # decisions made by an operator, not by the rules

_MAX_ATTEMPTS = 5  # comparisons redone because another promotion moved the champion meanwhile


def default_actor() -> str:
    """Who is acting: ``$PIPELINE_ACTOR``, else ``user@host``."""
    env = os.environ.get(ACTOR_ENV, "").strip()
    if env:
        return env
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def decisions_query(model_name: str) -> str:
    """The MLflow search filter for the decision records of ``model_name`` (what :func:`_record` writes)."""
    return f"tags.`{TAG_KIND}` = 'promotion' and tags.`{TAG_RECORD_MODEL}` = {quote(model_name)}"


def mlflow_client(cfg: PipelineConfig) -> MlflowClient:
    from pipeline.tracking import runs as tracking

    tracking.configure(cfg.tracking)
    from mlflow import MlflowClient

    return MlflowClient()


def champion_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``name@alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # No such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE (SQL stores, server).
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


# ---------------------------------------------------------------------------------------------
# The promotion lock


def lock_name(model_name: str) -> str:
    return f"{model_name}.promotion-lock"


@contextmanager
def promotion_lock(
    client: MlflowClient,
    model_name: str,
    *,
    timeout_s: float = 900.0,
    stale_s: float = 3600.0,
    poll_s: float = 0.2,
) -> Iterator[str]:
    """Hold the registry-wide promotion lock of ``model_name`` (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"pipeline.lock_owner": owner},
                description=f"Lock held while a promotion of {model_name!r} moves its aliases; deleted when it ends.",
            )
            break
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: the SQL store looks the existing lock up after its insert
            # collides, and the holder may release it in between. Both mean "contended, retry".
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _break_if_stale(client, name, stale_s)
        if time.monotonic() > deadline:
            raise PromotionError(
                f"timed out after {timeout_s:.0f}s waiting for the promotion lock {name!r} (held by {holder}); "
                f"if no promotion is running, delete that registered model"
            )
        time.sleep(poll_s * (0.5 + random.random()))
    log.debug("promotion lock %s acquired by %s", name, owner)
    try:
        yield owner
    finally:
        _release(client, name, owner)


def _break_if_stale(client: MlflowClient, name: str, stale_s: float) -> str:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(name)
    except MlflowException:
        return "nobody (just released)"
    holder = lock.tags.get("pipeline.lock_owner", "unknown")
    age_s = time.time() - lock.creation_timestamp / 1000.0
    if age_s > stale_s:
        log.warning(
            "breaking promotion lock %s held by %s for %.0fs (stale after %.0fs)",
            name,
            holder,
            age_s,
            stale_s,
        )
        _release(client, name, holder)
    return holder


def _release(client: MlflowClient, name: str, owner: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(name)
        if lock.tags.get("pipeline.lock_owner") == owner:
            client.delete_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


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
    from mlflow.exceptions import MlflowException

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


# ---------------------------------------------------------------------------------------------
# Time windows (from the dataset manifest the training run logged as data.* params)


def _param_time(params: Mapping[str, str], key: str) -> str | None:
    value = params.get(key)
    return value if value and value != "None" else None


def training_window(run: Run) -> TimeWindow | None:
    """First train event .. last train or valid event of the run's dataset: everything the model has seen."""
    p = run.data.params
    start = _param_time(p, "data.time_ranges.train.start")
    ends = [
        t
        for t in (_param_time(p, "data.time_ranges.train.end"), _param_time(p, "data.time_ranges.valid.end"))
        if t
    ]
    if start is None or not ends:
        return None
    return TimeWindow(start, max(ends, key=lambda t: TimeWindow(t, t).bounds()[0]))


def test_window(run: Run) -> TimeWindow | None:
    """The period the run's test sessions end in: the split's cut .. the dataset's last event.

    Sessions are split by their end, so a test session may start before the cut; the cut, not its first
    event, is what separates it from data another model trained on.
    """
    p = run.data.params
    start = _param_time(p, "data.split_times.test_start") or _param_time(p, "data.time_ranges.test.start")
    end = _param_time(p, "data.split_times.latest_event") or _param_time(p, "data.time_ranges.test.end")
    return TimeWindow(start, end) if start and end else None


def version_training_window(client: MlflowClient, version: ModelVersion) -> TimeWindow | None:
    """The version's recorded training window; for a version registered before windows were recorded,
    the one its source run logged."""
    start, end = version.tags.get(TAG_TRAIN_START), version.tags.get(TAG_TRAIN_END)
    if start and end:
        return TimeWindow(start, end)
    if not version.run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return training_window(client.get_run(version.run_id))
    except MlflowException:
        return None


# ---------------------------------------------------------------------------------------------
# Guards


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


# ---------------------------------------------------------------------------------------------
# Promotion


def candidate_runs(cfg: PipelineConfig, parent_run_id: str | None = None) -> list[str]:
    """Finished training runs under ``parent_run_id``, or else the newest finished training run."""
    from mlflow import MlflowClient

    from pipeline.tracking import runs as tracking

    experiment_id = tracking.configure(cfg.tracking)
    client = MlflowClient()
    query = f"tags.`{TAG_KIND}` = 'training' and attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = {quote(parent_run_id)}"
    runs = client.search_runs(
        [experiment_id],
        query,
        order_by=["attributes.start_time DESC"],
        max_results=1000 if parent_run_id else 1,
    )
    if not runs:
        where = (
            f"under parent run {parent_run_id}"
            if parent_run_id
            else f"in experiment {cfg.tracking.experiment!r}"
        )
        raise PromotionError(f"no finished training run {where}; train one with `python -m pipeline track`")
    return [r.info.run_id for r in runs]


# ---------------------------------------------------------------------------------------------
# Promotion


def rules_of(tcfg: TrackingConfig) -> Rules:
    return Rules(tcfg.promotion_margin, tcfg.significance, tcfg.no_valid_split)


def promote(
    cfg: PipelineConfig,
    run_ids: Sequence[str],
    *,
    parent_run_id: str | None = None,
    device: str = "auto",
    on_compared: Callable[[Decision], None] | None = None,
    date: str | None = None,
    actor: str | None = None,
) -> Decision:
    """Decide whether a trial of ``run_ids`` becomes champion; log and return the decision.

    ``parent_run_id`` nests the decision record under a run (the DAG run's parent run); ``date`` and
    ``actor`` say which DAG run (or person) decided. ``on_compared`` is called after each comparison,
    before the alias is moved (used by tests to line two promotions up against the same champion).
    """
    if not run_ids:
        raise PromotionError("no candidate runs given")
    client = mlflow_client(cfg)
    tcfg = cfg.tracking
    metric = parse_metric(tcfg.primary_metric)
    name = tcfg.registered_model
    actor = actor or default_actor()

    runs: dict[str, Run] = {}
    trials: list[Trial] = []
    for run_id in dict.fromkeys(run_ids):
        run = _get_run(client, run_id)
        why = check_guards(run, metric, tcfg.require_validation)
        if why is None:
            registered = find_version(client, name, run_id)
            if registered is not None and registered.tags.get(TAG_ROLLED_BACK) == "true":
                why = f"its version {registered.version} was rolled back from @{tcfg.champion_alias}; train a new run"
        metrics = run.data.metrics
        trials.append(
            Trial(
                run_id,
                test_value=metrics.get(metric.name),
                valid_value=metrics.get(metric.valid_name),
                spop_value=metrics.get(f"baseline_spop_{metric.name}"),
                data_fingerprint=run.data.tags.get(TAG_FINGERPRINT),
                verdict=f"refused: {why}" if why else "eligible",
            )
        )
        runs[run_id] = run
        if why is not None:
            log.info("candidate %s refused: %s", run_id, why)

    selection = select(trials, tcfg.no_valid_split)
    common = {
        "selected_on": selection.selected_on,
        "n_trials": len(trials),
        "candidates": trials,
        "date": date,
        "actor": actor,
    }
    if selection.refused is not None:
        refused = [t for t in trials if not t.eligible]
        details = "; ".join(f"{t.run_id}: {t.verdict}" for t in refused)
        reason = selection.refused + (f" ({details})" if details and len(refused) == len(trials) else "")
        decision = Decision("refused", reason, name, metric.name, **common)  # type: ignore[arg-type]
        decision.candidate_run_id = trials[0].run_id if len(trials) == 1 else None
        return _record(client, cfg, decision, parent_run_id)
    eligible = [runs[t.run_id] for t in trials if t.eligible]
    _check_one_dataset(eligible)

    for _attempt in range(_MAX_ATTEMPTS):
        champion = champion_version(client, name, tcfg.champion_alias)
        decision = Decision(
            "challenger",
            "",
            name,
            metric.name,
            champion_version=str(champion.version) if champion else None,
            **common,  # type: ignore[arg-type]
        )
        chosen = _decide(client, cfg, metric, eligible, selection, champion, decision, device)
        if on_compared is not None:
            on_compared(decision)
        with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
            now = champion_version(client, name, tcfg.champion_alias)
            if (str(now.version) if now else None) != decision.champion_version:
                log.info(
                    "champion moved from %s to %s during the comparison; comparing again",
                    decision.champion_version,
                    now.version if now else None,
                )
                continue
            if chosen is None:  # refused: the comparison may not be used, nothing to register
                return _record(client, cfg, decision, parent_run_id)
            version = register_candidate(client, name, chosen, _metric_names(chosen))
            decision.candidate_version = str(version.version)
            pinned = pin_state(client, name)  # read under the lock: a pin set during the comparison holds
            if pinned is not None and decision.action in ("promoted", "challenger"):
                decision.rules_action = decision.action
                decision.action = "pinned"
                decision.reason = (
                    f"@{tcfg.champion_alias} is pinned by {pinned.actor} since {pinned.at} ({pinned.reason}); "
                    f"the rules said {decision.rules_action}: {decision.reason}"
                )
            _commit(client, tcfg, decision, version)
            return _record(client, cfg, decision, parent_run_id, version)
    raise PromotionError(
        f"the champion of {name!r} kept moving during {_MAX_ATTEMPTS} comparisons; try again"
    )


def _check_one_dataset(runs: Sequence[Run]) -> None:
    """The trials of one decision must share their dataset: valid values and test splits are only
    comparable on the same data."""
    fingerprints = {r.data.tags.get(TAG_FINGERPRINT) or "" for r in runs}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{r.info.run_id}: {r.data.tags.get(TAG_FINGERPRINT) or 'none'}" for r in runs)
        raise PromotionError(
            f"the trials of one decision were trained on different datasets ({listing}); promote each dataset's "
            "trials separately"
        )


def _decide(
    client: MlflowClient,
    cfg: PipelineConfig,
    metric: Metric,
    eligible: Sequence[Run],
    selection: Selection,
    champion: ModelVersion | None,
    decision: Decision,
    device: str,
) -> Run | None:
    """Fill ``decision`` for this champion; return the run to register, or None when refused."""
    by_id = {r.info.run_id: r for r in eligible}
    trials = {t.run_id: t for t in decision.candidates if t.eligible}
    for trial in trials.values():
        trial.verdict, trial.p_value, trial.p_adjusted, trial.mean_diff = "eligible", None, None, None
    if selection.run_id is not None:
        for trial in trials.values():
            trial.verdict = (
                f"selected: best {metric.valid_name}"
                if trial.run_id == selection.run_id
                else f"not selected: {metric.valid_name} {trial.valid_value:.4f} is not the best"
                if trial.valid_value is not None
                else "not selected"
            )
        if len(trials) == 1:
            trials[selection.run_id].verdict = "selected: the only eligible trial"

    if champion is None:
        if selection.run_id is not None:
            chosen = by_id[selection.run_id]
        else:  # Holm mode, nothing to compare with: the baselines guard is the only test
            chosen = max(eligible, key=lambda r: r.data.metrics[metric.name])
            decision.selected_on = SELECTED_ON_TEST_NO_CHAMPION
            for trial in trials.values():
                trial.verdict = (
                    "selected: best on test" if trial.run_id == chosen.info.run_id else "not selected"
                )
        _describe_candidate(decision, chosen, metric)
        decision.action = "promoted"
        decision.reason = (
            f"no champion yet; candidate selected on {decision.selected_on} with {metric.name}="
            f"{decision.candidate_value:.4f} beats the POP and S-POP baselines"
        )
        return chosen

    contenders = (
        [by_id[selection.run_id]]
        if selection.run_id is not None
        else [r for r in eligible if r.info.run_id != champion.run_id]
    )
    if not contenders or contenders[0].info.run_id == champion.run_id:
        chosen = by_id[champion.run_id]
        _describe_candidate(decision, chosen, metric)
        decision.action = "unchanged"
        decision.reason = f"the candidate is already the champion (version {champion.version})"
        return chosen

    first = contenders[0]
    decision.test_window = test_window(first)
    decision.champion_training_window = version_training_window(client, champion)
    decision.test_fingerprint = first.data.tags.get(TAG_FINGERPRINT)
    why = leakage(decision.test_window, decision.champion_training_window)
    if why is not None:
        if selection.run_id is not None:
            _describe_candidate(decision, first, metric)
        decision.action = "refused"
        decision.reason = f"{why}; the comparison is not used and @{cfg.tracking.champion_alias} stays on v{champion.version}"
        return None

    rules = rules_of(cfg.tracking)
    comparisons = _compare(client, cfg, metric, contenders, champion, decision, device)
    if selection.run_id is not None:
        chosen_id = selection.run_id
        p_value = comparisons[chosen_id].test.p_value
        better, why = judge(comparisons[chosen_id].test, p_value, rules)
    else:
        tests = {run_id: c.test for run_id, c in comparisons.items()}
        winner, adjusted = holm_winner(tests, rules)
        # Not better after the correction: the trial closest to it is the challenger (no alias moves).
        chosen_id = winner or max(tests, key=lambda r: tests[r].mean_diff)
        for run_id, test in tests.items():
            trial = trials[run_id]
            trial.p_value, trial.p_adjusted, trial.mean_diff = test.p_value, adjusted[run_id], test.mean_diff
            trial.verdict = (
                "selected" + (": better after Holm" if winner else ": largest difference, not better")
                if run_id == chosen_id
                else "not selected"
            )
        p_value = decision.p_adjusted = adjusted[chosen_id]
        better, why = judge(tests[chosen_id], p_value, rules, f"Holm-corrected over {len(tests)} trials")
    chosen = by_id[chosen_id]
    _describe_candidate(decision, chosen, metric)
    _apply_comparison(decision, comparisons[chosen_id], champion, metric)
    decision.action = "promoted" if better else "challenger"
    decision.reason = f"{why}: {_summary(decision, champion)}"
    return chosen


def _describe_candidate(decision: Decision, run: Run, metric: Metric) -> None:
    decision.candidate_run_id = run.info.run_id
    decision.candidate_value = run.data.metrics.get(metric.name)
    decision.candidate_metrics = {k: run.data.metrics[k] for k in _metric_names(run)}
    if decision.test_fingerprint is None:
        decision.test_fingerprint = run.data.tags.get(TAG_FINGERPRINT)
    if decision.test_window is None:
        decision.test_window = test_window(run)


@dataclass(frozen=True)
class Comparison:
    """One candidate against the champion on the candidate's test split."""

    test: PairedTest
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    champion_missed: int


def _apply_comparison(
    decision: Decision, comparison: Comparison, champion: ModelVersion, metric: Metric
) -> None:
    decision.test = comparison.test
    decision.candidate_value = comparison.test.candidate_mean
    decision.champion_value = comparison.test.champion_mean
    decision.candidate_metrics = comparison.candidate_metrics
    decision.champion_metrics = comparison.champion_metrics
    decision.champion_missed_predictions = comparison.champion_missed


def _summary(decision: Decision, champion: ModelVersion) -> str:
    t = decision.test
    assert t is not None
    space = "same item space" if decision.same_item_space else "different item space, champion re-evaluated"
    return (
        f"{decision.metric} candidate {t.candidate_mean:.4f} vs champion v{champion.version} {t.champion_mean:.4f} "
        f"(diff {t.mean_diff:+.4f}, 95% CI [{t.ci_low:+.4f}, {t.ci_high:+.4f}], p={t.p_value:.4f}, "
        f"n={t.n}, {space}, selected on {decision.selected_on} among {decision.n_trials} trial(s))"
    )


def _compare(
    client: MlflowClient,
    cfg: PipelineConfig,
    metric: Metric,
    runs: Sequence[Run],
    champion: ModelVersion,
    decision: Decision,
    device: str,
) -> dict[str, Comparison]:
    """Re-evaluate the champion once on the candidates' (shared, fingerprint-checked) test split and run
    the paired test for each candidate."""
    from pipeline.model.evaluate import evaluate_model

    tcfg = cfg.tracking
    first = runs[0]
    champion_run = _get_run(client, champion.run_id) if champion.run_id else None
    champion_space = champion.tags.get(TAG_ITEM_SPACE) or (
        champion_run.data.tags.get(TAG_ITEM_SPACE) if champion_run else None
    )
    decision.same_item_space = bool(champion_space) and champion_space == first.data.tags.get(TAG_ITEM_SPACE)
    if champion_run is not None:
        decision.champion_logged_value = champion_run.data.metrics.get(metric.name)

    test = read_test_split(first)
    cutoffs = tuple(sorted({metric.cutoff, *cfg.eval.cutoffs}))
    out: dict[str, Comparison] = {}
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        champion_dir = _download_model_dir(
            f"models:/{champion.name}/{champion.version}", Path(tmp) / "champion"
        )
        log.info(
            "re-evaluating champion %s v%s on the test split of %s",
            champion.name,
            champion.version,
            first.data.tags[TAG_DATA_URI],
        )
        champ_eval = evaluate_model(champion_dir, test, cutoffs=cutoffs, ties=cfg.eval.ties, device=device)
        for run in runs:
            rows, ranks = _candidate_ranks(
                run, Path(tmp) / run.info.run_id, test, cutoffs, cfg.eval.ties, device
            )
            cand_ranks, champ_ranks, missed = pair_by_target_rows(
                rows, ranks, np.asarray(champ_eval.target_rows), np.asarray(champ_eval.ranks), missing=np.inf
            )
            result = paired_bootstrap(
                metric.per_prediction(cand_ranks),
                metric.per_prediction(champ_ranks),
                margin=tcfg.promotion_margin,
                samples=tcfg.bootstrap_samples,
                seed=tcfg.bootstrap_seed,
            )
            out[run.info.run_id] = Comparison(
                result,
                _metrics_from_ranks(cand_ranks, cutoffs),
                _metrics_from_ranks(champ_ranks, cutoffs),
                missed,
            )
    decision.champion_reevaluated = True
    return out


def read_test_split(run: Run) -> pa.Table:
    """The candidate's test split, exactly as it was when the candidate was tested.

    The dataset's manifest must still carry the fingerprint the run recorded, and the test file's bytes
    must hash to the manifest's SHA-256; otherwise the dataset was rebuilt (or is being republished) and
    the champion would be re-evaluated on other data than the candidate's logged ranks: fail clearly.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.data.sessions import read_manifest
    from pipeline.errors import InputError

    run_id = run.info.run_id
    data_uri = run.data.tags.get(TAG_DATA_URI)
    expected = run.data.tags.get(TAG_FINGERPRINT)
    if not data_uri or not expected:
        raise PromotionError(
            f"candidate run {run_id} does not record its dataset ({TAG_DATA_URI}, {TAG_FINGERPRINT}): cannot check "
            "that the champion is evaluated on the same test split"
        )
    try:
        manifest = read_manifest(data_uri)
        found = manifest.get("fingerprint")
        if found != expected:
            raise PromotionError(
                f"dataset {data_uri} changed since candidate run {run_id} was tested on it: its fingerprint is "
                f"{found}, the run recorded {expected}; the champion would be evaluated on other test data. "
                "Train the candidate again on this dataset, or restore the dataset it was tested on"
            )
        entry = manifest["files"]["test"]
        uri = storage.join(data_uri, *str(entry["path"]).split("/"))
        data = storage.read_bytes(uri)
    except InputError as exc:
        raise PromotionError(f"cannot read the test split of candidate run {run_id}: {exc}") from None
    except (KeyError, TypeError):
        raise PromotionError(
            f"the manifest of {data_uri} lists no test file with a sha256 (files.test)"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise PromotionError(
            f"test split {uri} has SHA-256 {digest[:16]}..., its manifest says {str(entry.get('sha256'))[:16]}...: "
            "the file was changed after the dataset was published; rebuild the dataset"
        )
    return pq.read_table(pa.BufferReader(data))


def _metrics_from_ranks(ranks: np.ndarray, cutoffs: Sequence[int]) -> dict[str, float]:
    from pipeline.model.evaluate import metrics_from_ranks
    from pipeline.tracking.runs import metric_key

    return {metric_key(k): v for k, v in metrics_from_ranks(ranks, cutoffs).items()}


def _candidate_ranks(run: Run, tmp: Path, test: Any, cutoffs: tuple[int, ...], ties: str, device: str):
    """The candidate's per-prediction ranks on its own test split: logged at training, else re-computed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tmp.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=RANKS_ARTIFACT, dst_path=str(tmp)
        )
        with np.load(local) as data:
            return data["target_rows"], data["ranks"]
    except (MlflowException, OSError, KeyError):
        log.info("run %s has no %s; evaluating the candidate again", run.info.run_id, RANKS_ARTIFACT)
    from pipeline.model.evaluate import evaluate_model

    model_dir = _download_model_dir(run.data.tags[TAG_MODEL_URI], tmp / "candidate")
    result = evaluate_model(model_dir, test, cutoffs=cutoffs, ties=ties, device=device)
    return np.asarray(result.target_rows), np.asarray(result.ranks)


def _download_model_dir(model_uri: str, dst: Path) -> Path:
    """Download a logged pyfunc model and return the trained-model directory it carries as an artifact."""
    import mlflow
    from mlflow.models import Model

    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    if "model_dir" not in artifacts:
        raise PromotionError(f"{model_uri} is not a pipeline model (no 'model_dir' artifact)")
    return local / artifacts["model_dir"]["path"]


def _commit(client: MlflowClient, tcfg: TrackingConfig, decision: Decision, version: ModelVersion) -> None:
    """Move the aliases for a decision (inside the promotion lock)."""
    name = tcfg.registered_model
    if decision.action == "promoted":
        _set_champion(client, tcfg, version, decision.champion_version)
        log.info(
            "%s@%s -> version %s (was %s)",
            name,
            tcfg.champion_alias,
            version.version,
            decision.champion_version,
        )
    elif decision.action in ("challenger", "pinned"):
        client.set_registered_model_alias(name, tcfg.challenger_alias, version.version)
        log.info("%s@%s -> version %s: %s", name, tcfg.challenger_alias, version.version, decision.reason)


def _set_champion(
    client: MlflowClient, tcfg: TrackingConfig, version: ModelVersion, previous: str | None
) -> None:
    name = tcfg.registered_model
    if previous is not None:
        client.set_model_version_tag(name, version.version, TAG_PREVIOUS_CHAMPION, previous)
    client.set_registered_model_alias(name, tcfg.champion_alias, version.version)
    challenger = champion_version(client, name, tcfg.challenger_alias)
    if challenger is not None and str(challenger.version) == str(version.version):
        client.delete_registered_model_alias(name, tcfg.challenger_alias)


# ---------------------------------------------------------------------------------------------
# Operator levers: rollback, move to a version, pin / unpin. Each runs under the promotion lock and
# is recorded like a decision, with who and why.


@dataclass(frozen=True)
class Pin:
    """@champion frozen by an operator: the DAG still compares and records, but never moves the alias."""

    actor: str
    reason: str
    at: str
    version: str


def pin_state(client: MlflowClient, name: str) -> Pin | None:
    from mlflow.exceptions import MlflowException

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


def rollback(
    cfg: PipelineConfig, *, reason: str = "", actor: str | None = None, parent_run_id: str | None = None
) -> Decision:
    """Return ``@champion`` to the version it replaced (recorded when it became champion); log the decision.

    The version rolled back from is marked and never promoted again by the rules (train a new run).
    """
    from mlflow.exceptions import MlflowException

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
        return _record(client, cfg, decision, parent_run_id, target)


def move_champion(
    cfg: PipelineConfig, version: str | int, reason: str, *, actor: str | None = None
) -> Decision:
    """Move ``@champion`` to any earlier or later version (roll back or forward).

    Refuses a version that was never eligible: its source run must still pass the promotion guards
    (finished training run, validated data, beats POP and S-POP). Works while pinned (the pin then
    holds the new version): the pin stops the rules, not the operator.
    """
    from mlflow.exceptions import MlflowException

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
            return _record(
                client, cfg, _lever_decision("unchanged", text, cfg, actor or default_actor(), **fields), None
            )
        _set_champion(client, tcfg, target, str(current.version) if current else None)
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
        return _record(client, cfg, decision, None, target)


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
            return _record(client, cfg, _lever_decision("unchanged", text, cfg, actor, **fields), None)
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
        return _record(client, cfg, decision, None)  # the pin lives on the registered model


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
            return _record(client, cfg, _lever_decision("unchanged", text, cfg, actor, **fields), None)
        client.delete_registered_model_tag(name, TAG_PINNED_BY)  # first: unpinned from here on
        for key in (TAG_PINNED_REASON, TAG_PINNED_AT, TAG_PINNED_VERSION):
            client.delete_registered_model_tag(name, key)
        text = f"unpinned {name}@{tcfg.champion_alias} (pinned by {held.actor} since {held.at}: {held.reason}){why}"
        decision = _lever_decision("unpin", text, cfg, actor, **fields)
        log.info(decision.reason)
        return _record(client, cfg, decision, None)


# ---------------------------------------------------------------------------------------------
# Decision records


def _record(
    client: MlflowClient,
    cfg: PipelineConfig,
    decision: Decision,
    parent_run_id: str | None,
    version: ModelVersion | None = None,
) -> Decision:
    """Log the decision as an MLflow run and copy it onto the model version's tags."""
    from mlflow.entities import Metric as MlflowMetric
    from mlflow.entities import Param

    from pipeline.tracking import runs as tracking

    experiment_id = tracking.configure(cfg.tracking)
    tags = {
        TAG_KIND: "promotion",
        "mlflow.runName": f"{decision.action}-{decision.model_name}"
        + (f"-v{version.version}" if version else ""),
        TAG_DECISION: decision.action,
        TAG_REASON: decision.reason[:5000],
        TAG_RECORD_MODEL: decision.model_name,
        TAG_ACTOR: decision.actor[:5000],
        TAG_SELECTED_ON: decision.selected_on,
        **tracking.environment_tags(),
    }
    if decision.date:
        tags[TAG_DATE] = decision.date
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags)
    params = {
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
    now = int(time.time() * 1000)
    values = {
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
    client.log_batch(
        run.info.run_id,
        metrics=[MlflowMetric(k, float(v), now, 0) for k, v in values.items() if v is not None],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    decision.record_run_id = run.info.run_id
    client.log_dict(run.info.run_id, decision.to_dict(), "decision.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    if version is not None:
        if decision.action in LEVERS:
            version_tags = {
                TAG_OPERATOR_ACTION: decision.action,
                TAG_OPERATOR_ACTOR: decision.actor[:5000],
                TAG_OPERATOR_REASON: decision.reason[:5000],
                TAG_OPERATOR_RECORD: run.info.run_id,
            }
        elif decision.action != "unchanged":  # the decision that registered the version stays on it
            version_tags = {
                TAG_DECISION: decision.action,
                TAG_REASON: decision.reason[:5000],
                TAG_RECORD_RUN: run.info.run_id,
            }
        else:
            version_tags = {}
        for key, value in version_tags.items():
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
        client.set_tag(trial.run_id, TAG_RECORD_RUN, run.info.run_id)
    log.info("promotion decision %s: %s (record run %s)", decision.action, decision.reason, run.info.run_id)
    return decision


# ---------------------------------------------------------------------------------------------
# Helpers


def _get_run(client: MlflowClient, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise PromotionError(f"run {run_id!r} not found in the tracking store: {exc.message}") from None


def _metric_names(run: Run) -> list[str]:
    return sorted(k for k in run.data.metrics if re.fullmatch(r"(baseline_(s?pop)_)?(mrr|recall)_at_\d+", k))
