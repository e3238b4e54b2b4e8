"""The popularity sampler: distribution popularity**alpha, buffer refills, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.sampling import PopularitySampler


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_samples_follow_popularity_to_the_alpha(alpha):
    counts = torch.tensor([1, 4, 9, 16, 0, 70])
    gen = torch.Generator().manual_seed(0)
    sampler = PopularitySampler(counts, 1000, alpha, cache_size=50_000, generator=gen)
    drawn = torch.cat([sampler.draw() for _ in range(200)])  # spans several buffer refills
    freq = np.bincount(drawn.numpy(), minlength=6) / len(drawn)
    w = counts.double().numpy() ** alpha
    w[counts.numpy() == 0] = 0  # never an item without training events, whatever alpha
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.006)
    torch.testing.assert_close(sampler.prob, torch.tensor(w / w.sum()))


def test_same_generator_seed_same_samples_and_refill_continues_the_stream():
    counts = torch.arange(1, 101)
    a = PopularitySampler(counts, 64, 0.5, cache_size=64 * 3, generator=torch.Generator().manual_seed(7))
    b = PopularitySampler(counts, 64, 0.5, cache_size=64 * 3, generator=torch.Generator().manual_seed(7))
    first = [a.draw().clone() for _ in range(7)]  # 3 rows per buffer: two refills
    second = [b.draw().clone() for _ in range(7)]
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], first[3])  # a refill draws new samples, it does not replay the buffer


def test_sampler_refuses_nonsense():
    with pytest.raises(ValueError):
        PopularitySampler(torch.tensor([0, 0]), 4, 0.5)
    with pytest.raises(ValueError):
        PopularitySampler(torch.tensor([1, 2]), 0, 0.5)
