"""The statistics and the lock behind promotion: metric parsing, pairing, the paired bootstrap, the lock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline import registry
from pipeline.config import PipelineConfig
from pipeline.errors import PromotionError


@pytest.mark.parametrize(
    ("name", "kind", "cutoff"),
    [("mrr_at_20", "mrr", 20), ("mrr@20", "mrr", 20), ("MRR@5", "mrr", 5), ("recall_at_10", "recall", 10)],
)
def test_parse_metric_accepts_both_spellings(name: str, kind: str, cutoff: int) -> None:
    metric = registry.parse_metric(name)
    assert (metric.kind, metric.cutoff) == (kind, cutoff)
    assert metric.name == f"{kind}_at_{cutoff}"


@pytest.mark.parametrize("name", ["ndcg@20", "mrr@0", "mrr", "recall_at_x"])
def test_parse_metric_rejects_unknown_metrics(name: str) -> None:
    with pytest.raises(PromotionError, match="primary_metric"):
        registry.parse_metric(name)


def test_per_prediction_values_follow_the_cutoff() -> None:
    ranks = np.array([1.0, 2.0, 4.0, 20.0, 21.0, 500.0])
    mrr = registry.parse_metric("mrr_at_20").per_prediction(ranks)
    np.testing.assert_allclose(mrr, [1.0, 0.5, 0.25, 0.05, 0.0, 0.0])
    recall5 = registry.parse_metric("recall_at_5").per_prediction(ranks)
    np.testing.assert_array_equal(recall5, [1, 1, 1, 0, 0, 0])


def test_bootstrap_finds_a_clear_improvement_significant() -> None:
    rng = np.random.default_rng(1)
    champion = rng.uniform(0, 0.5, 3000)
    candidate = champion + rng.normal(0.05, 0.05, 3000)
    result = registry.paired_bootstrap(candidate, champion, samples=500, seed=3)
    assert result.p_value < 0.01
    assert result.ci_low > 0 and result.ci_low < result.mean_diff < result.ci_high
    assert result.mean_diff == pytest.approx(float((candidate - champion).mean()))
    assert result.n == 3000


def test_bootstrap_identical_models_are_never_significant() -> None:
    values = np.random.default_rng(2).uniform(0, 1, 1000)
    result = registry.paired_bootstrap(values, values.copy(), samples=300)
    assert result.mean_diff == 0.0
    assert result.p_value == 1.0


def test_bootstrap_noise_and_margin_are_not_significant() -> None:
    rng = np.random.default_rng(4)
    champion = rng.uniform(0, 1, 2000)
    noisy = champion + rng.normal(0.0, 0.3, 2000)
    assert registry.paired_bootstrap(noisy, champion, samples=500, seed=0).p_value > 0.05
    # A real but small gain does not clear a margin larger than itself.
    better = champion + 0.01
    assert registry.paired_bootstrap(better, champion, samples=200).p_value < 0.01
    assert registry.paired_bootstrap(better, champion, margin=0.02, samples=200).p_value == 1.0


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 1, 500), rng.uniform(0, 1, 500)
    assert registry.paired_bootstrap(a, b, seed=7) == registry.paired_bootstrap(a, b, seed=7)


def test_bootstrap_refuses_unpaired_input() -> None:
    with pytest.raises(PromotionError, match="equal-length"):
        registry.paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(PromotionError, match="no predictions"):
        registry.paired_bootstrap(np.zeros(0), np.zeros(0))


def test_pairing_counts_predictions_the_champion_could_not_make_as_misses() -> None:
    cand_rows = np.array([10, 11, 12, 13])
    cand_vals = np.array([1.0, 0.5, 0.25, 0.1])
    champ_rows = np.array([13, 10, 99])  # 11 and 12 unknown to the champion; 99 not a candidate prediction
    champ_vals = np.array([0.2, 0.3, 1.0])
    a, b, missed = registry.pair_by_target_rows(cand_rows, cand_vals, champ_rows, champ_vals)
    np.testing.assert_array_equal(a, cand_vals)
    np.testing.assert_array_equal(b, [0.3, 0.0, 0.0, 0.2])
    assert missed == 2
    with pytest.raises(PromotionError, match="same target row"):
        registry.pair_by_target_rows(np.array([1, 1]), np.zeros(2), champ_rows, champ_vals)


def test_promotion_lock_excludes_concurrent_holders(module_store: str) -> None:
    """Real threads against the real (SQLite) store: critical sections never overlap.

    Tight polling makes contention frequent, so a release racing a colliding create (the store
    then reports the lock as missing) is exercised, not left to chance.
    """
    from pipeline import tracking

    cfg = PipelineConfig()
    tracking.configure(cfg.tracking)
    import mlflow

    intervals: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            client = mlflow.MlflowClient()
            for _ in range(10):
                with registry.promotion_lock(client, "lock-test", timeout_s=120, poll_s=0.002):
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
    assert registry.lock_name("lock-test") not in names  # released


def test_promotion_lock_times_out_naming_the_holder_and_breaks_stale_locks(module_store: str) -> None:
    from pipeline import tracking

    tracking.configure(PipelineConfig().tracking)
    import mlflow

    client = mlflow.MlflowClient()
    client.create_registered_model(registry.lock_name("m"), tags={"pipeline.lock_owner": "crashed-host:123"})
    with pytest.raises(PromotionError, match="crashed-host:123"):
        with registry.promotion_lock(client, "m", timeout_s=0.3, poll_s=0.05):
            pass
    with registry.promotion_lock(client, "m", timeout_s=5, stale_s=0.0, poll_s=0.05) as owner:
        held = client.get_registered_model(registry.lock_name("m"))
        assert held.tags["pipeline.lock_owner"] == owner != "crashed-host:123"
