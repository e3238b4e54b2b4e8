"""The rules and the lock behind promotion: metric parsing, pairing, the paired bootstrap, selection on
validation, the Holm correction, the leakage guard (pure functions, no MLflow), then the lock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline.config import PipelineConfig
from pipeline.errors import PromotionError
from pipeline.tracking import decision, lock
from pipeline.tracking.decision import PairedTest, Rules, TimeWindow, Trial


@pytest.mark.parametrize(
    ("name", "kind", "cutoff"),
    [("mrr_at_20", "mrr", 20), ("mrr@20", "mrr", 20), ("MRR@5", "mrr", 5), ("recall_at_10", "recall", 10)],
)
def test_parse_metric_accepts_both_spellings(name: str, kind: str, cutoff: int) -> None:
    metric = decision.parse_metric(name)
    assert (metric.kind, metric.cutoff) == (kind, cutoff)
    assert metric.name == f"{kind}_at_{cutoff}"


@pytest.mark.parametrize("name", ["ndcg@20", "mrr@0", "mrr", "recall_at_x"])
def test_parse_metric_rejects_unknown_metrics(name: str) -> None:
    with pytest.raises(PromotionError, match="primary_metric"):
        decision.parse_metric(name)


def test_per_prediction_values_follow_the_cutoff() -> None:
    ranks = np.array([1.0, 2.0, 4.0, 20.0, 21.0, 500.0])
    mrr = decision.parse_metric("mrr_at_20").per_prediction(ranks)
    np.testing.assert_allclose(mrr, [1.0, 0.5, 0.25, 0.05, 0.0, 0.0])
    recall5 = decision.parse_metric("recall_at_5").per_prediction(ranks)
    np.testing.assert_array_equal(recall5, [1, 1, 1, 0, 0, 0])


def test_bootstrap_finds_a_clear_improvement_significant() -> None:
    rng = np.random.default_rng(1)
    champion = rng.uniform(0, 0.5, 3000)
    candidate = champion + rng.normal(0.05, 0.05, 3000)
    result = decision.paired_bootstrap(candidate, champion, samples=500, seed=3)
    assert result.p_value < 0.01
    assert result.ci_low > 0 and result.ci_low < result.mean_diff < result.ci_high
    assert result.mean_diff == pytest.approx(float((candidate - champion).mean()))
    assert result.n == 3000


def test_bootstrap_identical_models_are_never_significant() -> None:
    values = np.random.default_rng(2).uniform(0, 1, 1000)
    result = decision.paired_bootstrap(values, values.copy(), samples=300)
    assert result.mean_diff == 0.0
    assert result.p_value == 1.0


def test_bootstrap_noise_and_margin_are_not_significant() -> None:
    rng = np.random.default_rng(4)
    champion = rng.uniform(0, 1, 2000)
    noisy = champion + rng.normal(0.0, 0.3, 2000)
    assert decision.paired_bootstrap(noisy, champion, samples=500, seed=0).p_value > 0.05
    # A real but small gain does not clear a margin larger than itself.
    better = champion + 0.01
    assert decision.paired_bootstrap(better, champion, samples=200).p_value < 0.01
    assert decision.paired_bootstrap(better, champion, margin=0.02, samples=200).p_value == 1.0


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 1, 500), rng.uniform(0, 1, 500)
    assert decision.paired_bootstrap(a, b, seed=7) == decision.paired_bootstrap(a, b, seed=7)


def test_bootstrap_refuses_unpaired_input() -> None:
    with pytest.raises(PromotionError, match="equal-length"):
        decision.paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(PromotionError, match="no predictions"):
        decision.paired_bootstrap(np.zeros(0), np.zeros(0))


def test_pairing_counts_predictions_the_champion_could_not_make_as_misses() -> None:
    cand_rows = np.array([10, 11, 12, 13])
    cand_vals = np.array([1.0, 0.5, 0.25, 0.1])
    champ_rows = np.array([13, 10, 99])  # 11 and 12 unknown to the champion; 99 not a candidate prediction
    champ_vals = np.array([0.2, 0.3, 1.0])
    a, b, missed = decision.pair_by_target_rows(cand_rows, cand_vals, champ_rows, champ_vals)
    np.testing.assert_array_equal(a, cand_vals)
    np.testing.assert_array_equal(b, [0.3, 0.0, 0.0, 0.2])
    assert missed == 2
    with pytest.raises(PromotionError, match="same target row"):
        decision.pair_by_target_rows(np.array([1, 1]), np.zeros(2), champ_rows, champ_vals)


# ---------------------------------------------------------------------------------------------
# Selection, the Holm correction and the leakage guard


def _trial(run_id: str, valid: float | None, test: float, verdict: str = "eligible") -> Trial:
    return Trial(run_id, test_value=test, valid_value=valid, verdict=verdict)


def test_selection_uses_the_validation_value_never_the_test_value() -> None:
    trials = [
        _trial("best-on-test", valid=0.20, test=0.31),
        _trial("best-on-valid", valid=0.25, test=0.29),
        _trial("refused", valid=0.40, test=0.40, verdict="refused: does not beat S-POP"),
    ]
    chosen = decision.select(trials, "holm")
    assert chosen == decision.Selection(decision.SELECTED_ON_VALID, run_id="best-on-valid")


def test_without_a_valid_split_several_trials_go_to_holm_or_are_refused() -> None:
    trials = [_trial("a", None, 0.3), _trial("b", None, 0.2)]
    holm = decision.select(trials, "holm")
    assert holm.selected_on == decision.SELECTED_ON_HOLM and holm.run_id is None and holm.refused is None
    refused = decision.select(trials, "refuse")
    assert refused.run_id is None and "no validation split to select among 2" in (refused.refused or "")
    # One trial needs no selection (Holm over one test is the plain test), whatever the mode.
    single = decision.select(trials[:1], "refuse")
    assert single.run_id == "a" and single.refused is None
    assert decision.select([_trial("x", 0.1, 0.1, "refused: no model")], "holm").refused is not None
    with pytest.raises(PromotionError, match="no_valid_split"):
        decision.select(trials, "pick-the-best")


def test_holm_adjusts_step_down_and_keeps_the_order() -> None:
    assert decision.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert decision.holm([0.5]) == [0.5]
    assert decision.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def _test(mean_diff: float, p_value: float) -> PairedTest:
    return PairedTest(
        1000, 0.2 + mean_diff, 0.2, mean_diff, mean_diff - 0.01, mean_diff + 0.01, p_value, 0.0, 500
    )


def test_holm_stops_the_best_of_many_noisy_trials_but_not_a_real_gain() -> None:
    rules = Rules(margin=0.0, significance=0.05)
    # Five trials no better than the champion; by chance one has p=0.02: alone it would promote.
    noisy = {f"t{i}": _test(0.001 * (i + 1), p) for i, p in enumerate([0.30, 0.02, 0.50, 0.12, 0.70])}
    assert decision.judge(noisy["t1"], noisy["t1"].p_value, rules)[0] is True
    winner, adjusted = decision.holm_winner(noisy, rules)
    assert winner is None and adjusted["t1"] == pytest.approx(0.10)
    # A clearly better trial among them survives the correction (0.002 x 6 = 0.012 < 0.05).
    winner, adjusted = decision.holm_winner(noisy | {"real": _test(0.02, 0.002)}, rules)
    assert winner == "real" and adjusted["real"] == pytest.approx(0.012)


def test_judge_needs_both_the_margin_and_significance() -> None:
    rules = Rules(margin=0.01, significance=0.05)
    assert decision.judge(_test(0.005, 0.001), 0.001, rules) == (
        False,
        "not better by the margin 0.01 (p=0.0010)",
    )
    better, why = decision.judge(_test(0.02, 0.2), 0.2, rules, "Holm-corrected over 3 trials")
    assert not better and why == "better but not significant at 0.05 (p=0.2000 Holm-corrected over 3 trials)"
    assert decision.judge(_test(0.02, 0.01), 0.01, rules)[0] is True


def test_leakage_guard_refuses_a_test_window_the_champion_trained_on() -> None:
    champion = TimeWindow("2024-03-03T00:00:05Z", "2024-03-05T23:59:00Z")  # trained on days 3-5
    backfill = TimeWindow("2024-03-04T00:00:00Z", "2024-03-04T23:59:59Z")  # tests on day 4
    later = TimeWindow("2024-03-05T23:59:30Z", "2024-03-06T23:59:59Z")  # tests on day 6 (cut just after)
    earlier = TimeWindow("2024-03-01T00:00:00Z", "2024-03-02T23:59:59Z")
    why = decision.leakage(backfill, champion)
    assert why is not None and why.startswith(decision.LEAKAGE_REASON)
    assert decision.leakage(later, champion) is None
    assert decision.leakage(earlier, champion) is None
    assert "not recorded" in (decision.leakage(later, None) or "")
    assert "not recorded" in (decision.leakage(None, champion) or "")
    # Touching bounds overlap (closed intervals); offsets are understood.
    assert TimeWindow("2024-03-05T23:59:00Z", "2024-03-07T00:00:00Z").overlaps(champion)
    assert TimeWindow("2024-03-06T00:59:00+01:00", "2024-03-07T00:00:00Z").overlaps(champion)
    with pytest.raises(PromotionError, match="ISO 8601"):
        TimeWindow("yesterday", "today").bounds()


def test_promotion_lock_excludes_concurrent_holders(module_store: str) -> None:
    """Real threads against the real (SQLite) store: critical sections never overlap.

    Tight polling makes contention frequent, so a release racing a colliding create (the store
    then reports the lock as missing) is exercised, not left to chance.
    """
    from pipeline.tracking import runs as tracking

    cfg = PipelineConfig()
    tracking.configure(cfg.tracking)
    import mlflow

    intervals: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            client = mlflow.MlflowClient()
            for _ in range(10):
                with lock.promotion_lock(client, "lock-test", timeout_s=120, poll_s=0.002):
                    start = time.monotonic()
                    time.sleep(0.002)
                    intervals.append((start, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(intervals) == 60
    intervals.sort()
    for (_, end), (next_start, _) in zip(intervals, intervals[1:], strict=False):
        assert next_start >= end, "two holders were inside the lock at the same time"
    names = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert lock.lock_name("lock-test") not in names  # released


def test_promotion_lock_times_out_naming_the_holder_and_breaks_stale_locks(module_store: str) -> None:
    from pipeline.tracking import runs as tracking

    tracking.configure(PipelineConfig().tracking)
    import mlflow

    client = mlflow.MlflowClient()
    client.create_registered_model(lock.lock_name("m"), tags={"pipeline.lock_owner": "crashed-host:123"})
    with pytest.raises(PromotionError, match="crashed-host:123"):
        with lock.promotion_lock(client, "m", timeout_s=0.3, poll_s=0.05):
            pass
    with lock.promotion_lock(client, "m", timeout_s=5, stale_s=0.0, poll_s=0.05) as owner:
        held = client.get_registered_model(lock.lock_name("m"))
        assert held.tags["pipeline.lock_owner"] == owner != "crashed-host:123"
