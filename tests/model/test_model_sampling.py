"""The popularity sampler (distribution popularity**alpha, reproducible) and the per-step row plan."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model.sampling import PopularitySampler, distinct_per_step, plan_rows


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_samples_follow_popularity_to_the_alpha(alpha):
    counts = np.array([1, 4, 9, 16, 0, 70])
    sampler = PopularitySampler(counts, 1000, alpha)
    drawn = sampler.draw(np.random.default_rng(0), 200).ravel()
    freq = np.bincount(drawn, minlength=6) / len(drawn)
    w = counts.astype(np.float64) ** alpha
    w[counts == 0] = 0  # never an item without training events, whatever alpha
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.006)
    np.testing.assert_allclose(sampler.prob, w / w.sum())
    assert freq[4] == 0


def test_alias_table_on_a_skewed_catalogue_with_many_unpopular_and_empty_items():
    rng = np.random.default_rng(3)
    counts = np.where(rng.random(3000) < 0.3, 0, rng.zipf(1.3, 3000).clip(max=10**6))
    sampler = PopularitySampler(counts, 4096, 0.5)
    drawn = sampler.draw(np.random.default_rng(1), 500).ravel()
    assert not np.isin(drawn, np.flatnonzero(counts == 0)).any()
    freq = np.bincount(drawn, minlength=3000) / len(drawn)
    np.testing.assert_allclose(freq, sampler.prob, atol=0.002)


def test_same_seed_same_samples():
    counts = np.arange(1, 101)
    a = PopularitySampler(counts, 64, 0.5).draw(np.random.default_rng(7), 5)
    b = PopularitySampler(counts, 64, 0.5).draw(np.random.default_rng(7), 5)
    assert a.shape == (5, 64) and np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])


def test_sampler_refuses_nonsense():
    with pytest.raises(ValueError):
        PopularitySampler(np.array([0, 0]), 4, 0.5)
    with pytest.raises(ValueError):
        PopularitySampler(np.array([1, 2]), 0, 0.5)


def test_distinct_per_step_matches_a_loop():
    rng = np.random.default_rng(0)
    step_of = np.sort(rng.integers(0, 5, 60))
    values = rng.integers(0, 7, 60)
    rows, bounds, local = distinct_per_step(values, step_of, 5, 7)
    for k in range(5):
        mine = rows[bounds[k] : bounds[k + 1]]
        assert np.array_equal(mine, np.unique(values[step_of == k]))
        assert np.array_equal(mine[local[step_of == k]], values[step_of == k])


def _block(rng, steps=6, batch=5, n_items=30, n_sample=12, shrink=True):
    sizes = np.full(steps, batch)
    if shrink:
        sizes[-2:] = [3, 1]  # the batch shrinks at the end of an epoch
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    n = bounds[-1]
    return (rng.integers(0, n_items, n), rng.integers(0, n_items, n), bounds,
            rng.integers(0, n_items, (steps, n_sample)), n_items)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("loss,logq", [("cross-entropy", 1.0), ("cross-entropy", 0.0), ("bpr-max", 0.0)])
def test_row_plan_matches_the_columns_of_each_step(shared, loss, logq):
    """Per step, recomputed column by column: the distinct rows, where each target/input sits, and the
    total weight of the (targets + samples) columns each row stands for."""
    rng = np.random.default_rng(1)
    inputs, targets, bounds, samples, n_items = _block(rng)
    log_count = np.log(rng.integers(1, 50, n_items).astype(np.float64))
    alpha = 0.4
    plan = plan_rows(inputs, targets, bounds, samples, n_items, shared=shared, log_count=log_count,
                     loss=loss, logq=logq, sample_alpha=alpha)
    for k in range(len(bounds) - 1):
        x, y = inputs[bounds[k] : bounds[k + 1]], targets[bounds[k] : bounds[k + 1]]
        columns = np.concatenate([y, samples[k]])
        rows = plan.rows[plan.row_bounds[k] : plan.row_bounds[k + 1]]
        assert np.array_equal(rows, np.unique(np.concatenate([columns, x]) if shared else columns))
        y_col = plan.y_col[bounds[k] : bounds[k + 1]]
        assert np.array_equal(rows[y_col], y)
        x_col = plan.x_col[bounds[k] : bounds[k + 1]]
        if shared:
            assert np.array_equal(rows[x_col], x)
        else:
            x_rows = plan.x_rows[plan.x_row_bounds[k] : plan.x_row_bounds[k + 1]]
            assert np.array_equal(x_rows, np.unique(x)) and np.array_equal(x_rows[x_col], x)
        if loss == "cross-entropy" and logq:
            shift = np.concatenate([log_count[y], alpha * log_count[samples[k]]])
            col_weight = np.exp(-logq * shift)
        else:
            col_weight = np.ones(len(columns))
        expected = np.array([col_weight[columns == r].sum() for r in rows])
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose(plan.log_weight[plan.row_bounds[k] : plan.row_bounds[k + 1]], np.log(expected), rtol=1e-5)
            shift = plan.target_shift[bounds[k] : bounds[k + 1]]
            if loss == "bpr-max":
                own = np.array([(columns == t).sum() - 1 for t in y], dtype=np.float64)
                np.testing.assert_allclose(shift, np.log(own), rtol=1e-6)
            elif logq:
                np.testing.assert_allclose(shift, logq * log_count[y], rtol=1e-6)
            else:
                assert not shift.any()


def test_samples_do_not_depend_on_how_steps_are_split_into_blocks():
    """Training plans blocks of growing size; the samples of step k must be the same either way."""
    sampler = PopularitySampler(np.arange(1, 60), 32, 0.5)
    whole = sampler.draw(np.random.default_rng(4), 7)
    rng = np.random.default_rng(4)
    parts = np.concatenate([sampler.draw(rng, 1), sampler.draw(rng, 2), sampler.draw(rng, 4)])
    assert np.array_equal(whole, parts)
