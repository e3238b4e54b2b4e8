"""Promotion: a decision with evidence that never ships a worse model.

``promote`` takes the training runs of one decision (a DAG run's trials), drops the ones that fail a guard
(:mod:`pipeline.tracking.guards`: data that failed validation, a model that does not beat the POP and S-POP
baselines), and applies the rules of :mod:`pipeline.tracking.decision`:

* **select on validation, confirm on test**: the trial with the best validation metric is the candidate;
  only it meets the ``@champion`` on the test split (without a validation split: every trial meets the
  champion and the p-values are Holm-corrected, or the decision is refused, ``tracking.no_valid_split``);
* **same data, checked**: the champion is re-evaluated on exactly the candidate's test split, read from
  the dataset and checked against the fingerprint the candidate trained with (a rebuilt dataset fails);
  the two models are paired prediction by prediction and a paired bootstrap decides
  (:mod:`pipeline.tracking.compare`);
* **leakage guard**: each registered version records the time range it trained on (train + valid); a
  comparison whose test window overlaps the champion's training window is refused, the alias stays;
* **pinned**: while an operator has pinned ``@champion`` the comparison is still made and recorded, but
  the alias does not move (action ``pinned``).

The alias moves only when the candidate is better by the configured margin with significance; otherwise
the candidate gets the ``@challenger`` alias and the reason is recorded (:mod:`pipeline.tracking.records`).

Race safety: the alias is moved inside the registry-wide lock (:mod:`pipeline.tracking.lock`), and only if
the champion is still the one the candidate was compared with (and no pin appeared); otherwise the
comparison is redone against the new champion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mlflow import MlflowClient

from pipeline.errors import PromotionError
from pipeline.tracking.compare import Comparison, compare
from pipeline.tracking.decision import (
    SELECTED_ON_TEST_NO_CHAMPION,
    Decision,
    Metric,
    Rules,
    Selection,
    Trial,
    holm_winner,
    judge,
    leakage,
    parse_metric,
    select,
)
from pipeline.tracking.guards import check_guards
from pipeline.tracking.lineage import test_window
from pipeline.tracking.lock import promotion_lock
from pipeline.tracking.records import record_decision
from pipeline.tracking.registry import (
    TAG_ROLLED_BACK,
    champion_version,
    default_actor,
    find_version,
    get_run,
    headline_metrics,
    mlflow_client,
    pin_state,
    register_candidate,
    set_champion,
    version_training_window,
)
from pipeline.tracking.runs import TAG_FINGERPRINT, TAG_KIND, configure, quote

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from pipeline.config import PipelineConfig, TrackingConfig

log = logging.getLogger(__name__)

_MAX_ATTEMPTS = 5  # comparisons redone because another promotion moved the champion meanwhile


def candidate_runs(cfg: PipelineConfig, parent_run_id: str | None = None) -> list[str]:
    """Finished training runs under ``parent_run_id``, or else the newest finished training run."""
    experiment_id = configure(cfg.tracking)
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
        where = f"under parent run {parent_run_id}" if parent_run_id else f"in experiment {cfg.tracking.experiment!r}"
        raise PromotionError(f"no finished training run {where}; train one with `python -m pipeline track`")
    return [r.info.run_id for r in runs]


def rules_of(tcfg: TrackingConfig) -> Rules:
    """The decision rules' settings from the tracking config."""
    return Rules(tcfg.promotion_margin, tcfg.significance, tcfg.no_valid_split)


# ---------------------------------------------------------------------------------------------
# The decision


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
    runs, trials = _trials(client, tcfg, metric, run_ids)
    selection = select(trials, tcfg.no_valid_split)

    def new_decision(action: str, reason: str, champion: str | None = None) -> Decision:
        return Decision(
            action,
            reason,
            name,
            metric.name,
            champion_version=champion,
            selected_on=selection.selected_on,
            n_trials=len(trials),
            candidates=trials,
            date=date,
            actor=actor,
        )

    if selection.refused is not None:
        refused = [t for t in trials if not t.eligible]
        details = "; ".join(f"{t.run_id}: {t.verdict}" for t in refused)
        decision = new_decision(
            "refused", selection.refused + (f" ({details})" if details and len(refused) == len(trials) else "")
        )
        decision.candidate_run_id = trials[0].run_id if len(trials) == 1 else None
        return record_decision(client, cfg, decision, parent_run_id)
    eligible = [runs[t.run_id] for t in trials if t.eligible]
    _check_one_dataset(eligible)

    for _attempt in range(_MAX_ATTEMPTS):
        champion = champion_version(client, name, tcfg.champion_alias)
        decision = new_decision("challenger", "", str(champion.version) if champion else None)
        chosen = _decide(client, cfg, metric, eligible, selection, champion, decision, device)
        if on_compared is not None:
            on_compared(decision)
        done = _apply_under_lock(client, cfg, decision, chosen, parent_run_id)
        if done is not None:
            return done
    raise PromotionError(f"the champion of {name!r} kept moving during {_MAX_ATTEMPTS} comparisons; try again")


def _trials(
    client: MlflowClient, tcfg: TrackingConfig, metric: Metric, run_ids: Sequence[str]
) -> tuple[dict[str, Run], list[Trial]]:
    """Each candidate run (once, in the order given) and its trial: eligible, or refused with the guard's reason."""
    runs: dict[str, Run] = {}
    trials: list[Trial] = []
    for run_id in dict.fromkeys(run_ids):
        run = get_run(client, run_id)
        why = check_guards(run, metric, tcfg.require_validation)
        if why is None:
            registered = find_version(client, tcfg.registered_model, run_id)
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
    return runs, trials


def _apply_under_lock(
    client: MlflowClient, cfg: PipelineConfig, decision: Decision, chosen: Run | None, parent_run_id: str | None
) -> Decision | None:
    """Register the chosen run, move the aliases and record the decision, all under the promotion lock; None
    (nothing done) when the champion moved since the comparison."""
    tcfg = cfg.tracking
    name = tcfg.registered_model
    with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
        now = champion_version(client, name, tcfg.champion_alias)
        if (str(now.version) if now else None) != decision.champion_version:
            log.info(
                "champion moved from %s to %s during the comparison; comparing again",
                decision.champion_version,
                now.version if now else None,
            )
            return None
        if chosen is None:  # refused: the comparison may not be used, nothing to register
            return record_decision(client, cfg, decision, parent_run_id)
        version = register_candidate(client, name, chosen, headline_metrics(chosen))
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
        return record_decision(client, cfg, decision, parent_run_id, version)


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


# ---------------------------------------------------------------------------------------------
# Deciding against one champion


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
    _mark_selection(trials, selection, metric)
    if champion is None:
        return _first_champion(decision, metric, eligible, selection, trials)

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
        decision.reason = (
            f"{why}; the comparison is not used and @{cfg.tracking.champion_alias} stays on v{champion.version}"
        )
        return None

    comparisons = compare(client, cfg, metric, contenders, champion, decision, device)
    chosen_id, better, why = _judge(comparisons, selection, trials, rules_of(cfg.tracking), decision)
    chosen = by_id[chosen_id]
    _describe_candidate(decision, chosen, metric)
    _apply_comparison(decision, comparisons[chosen_id])
    decision.action = "promoted" if better else "challenger"
    decision.reason = f"{why}: {_summary(decision, champion)}"
    return chosen


def _mark_selection(trials: dict[str, Trial], selection: Selection, metric: Metric) -> None:
    """Reset the eligible trials' verdicts for this attempt and say which one validation selected."""
    for trial in trials.values():
        trial.verdict, trial.p_value, trial.p_adjusted, trial.mean_diff = "eligible", None, None, None
    if selection.run_id is None:
        return
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


def _first_champion(
    decision: Decision, metric: Metric, eligible: Sequence[Run], selection: Selection, trials: dict[str, Trial]
) -> Run:
    """No champion yet: the selected trial (Holm mode: the best on test) is promoted on the baselines guard."""
    if selection.run_id is not None:
        chosen = next(r for r in eligible if r.info.run_id == selection.run_id)
    else:  # Holm mode, nothing to compare with: the baselines guard is the only test
        chosen = max(eligible, key=lambda r: r.data.metrics[metric.name])
        decision.selected_on = SELECTED_ON_TEST_NO_CHAMPION
        for trial in trials.values():
            trial.verdict = "selected: best on test" if trial.run_id == chosen.info.run_id else "not selected"
    _describe_candidate(decision, chosen, metric)
    decision.action = "promoted"
    decision.reason = (
        f"no champion yet; candidate selected on {decision.selected_on} with {metric.name}="
        f"{decision.candidate_value:.4f} beats the POP and S-POP baselines"
    )
    return chosen


def _judge(
    comparisons: dict[str, Comparison],
    selection: Selection,
    trials: dict[str, Trial],
    rules: Rules,
    decision: Decision,
) -> tuple[str, bool, str]:
    """(chosen run id, better than the champion, why): the selected trial's test, or Holm over all of them."""
    if selection.run_id is not None:
        test = comparisons[selection.run_id].test
        better, why = judge(test, test.p_value, rules)
        return selection.run_id, better, why
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
    return chosen_id, better, why


def _describe_candidate(decision: Decision, run: Run, metric: Metric) -> None:
    decision.candidate_run_id = run.info.run_id
    decision.candidate_value = run.data.metrics.get(metric.name)
    decision.candidate_metrics = {k: run.data.metrics[k] for k in headline_metrics(run)}
    if decision.test_fingerprint is None:
        decision.test_fingerprint = run.data.tags.get(TAG_FINGERPRINT)
    if decision.test_window is None:
        decision.test_window = test_window(run)


def _apply_comparison(decision: Decision, comparison: Comparison) -> None:
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


def _commit(client: MlflowClient, tcfg: TrackingConfig, decision: Decision, version: ModelVersion) -> None:
    """Move the aliases for a decision (inside the promotion lock)."""
    name = tcfg.registered_model
    if decision.action == "promoted":
        set_champion(client, tcfg, version, decision.champion_version)
        log.info("%s@%s -> version %s (was %s)", name, tcfg.champion_alias, version.version, decision.champion_version)
    elif decision.action in ("challenger", "pinned"):
        client.set_registered_model_alias(name, tcfg.challenger_alias, version.version)
        log.info("%s@%s -> version %s: %s", name, tcfg.challenger_alias, version.version, decision.reason)
