"""Shared negative samples drawn with probability proportional to ``popularity ** sample_alpha``.

Drawing one small sample per step costs more in call overhead than in work, so samples are pre-drawn in a
large buffer (``sample_cache_size`` items) on the training device and handed out one row per step.
The generator is explicit, so a sampler seeded the same way hands out the same samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PopularitySampler:
    """Hands out ``n_sample`` item indices per call, i.i.d. from popularity**alpha (with replacement)."""

    def __init__(
        self,
        counts: Tensor,
        n_sample: int,
        alpha: float,
        *,
        cache_size: int = 10_000_000,
        generator: torch.Generator | None = None,
    ) -> None:
        if n_sample < 1:
            raise ValueError(f"n_sample must be >= 1 to sample, got {n_sample}")
        counts = counts.to(torch.float64)
        weights = torch.where(counts > 0, counts.clamp_min(1e-300) ** alpha, 0.0)  # 0**0 would be 1
        if not bool((weights > 0).any()):
            raise ValueError("cannot sample: every item has zero popularity")
        self.prob = weights / weights.sum()
        self.device = counts.device
        self.n_sample = n_sample
        self.rows = max(1, cache_size // n_sample)
        self.generator = generator
        self._cdf = torch.cumsum(self.prob, 0).to(self.device)
        self._cdf[-1] = 1.0 + 1e-12  # a uniform draw always lands inside the table
        self._buffer: Tensor | None = None
        self._next = 0

    def reset(self, generator: torch.Generator | None = None, rows: int | None = None) -> None:
        """Drop the buffer (optionally switching generator or buffer height); the next call refills it."""
        if generator is not None:
            self.generator = generator
        if rows is not None:
            self.rows = max(1, min(rows, self.rows))
        self._buffer = None
        self._next = 0

    def _refill(self) -> None:
        uniform = torch.rand(
            self.rows * self.n_sample, dtype=torch.float64, device=self.device, generator=self.generator
        )
        self._buffer = torch.searchsorted(self._cdf, uniform).view(self.rows, self.n_sample)
        self._next = 0

    def draw(self) -> Tensor:
        """The next ``n_sample`` indices (a view into the buffer: do not modify it)."""
        if self._buffer is None or self._next >= self.rows:
            self._refill()
        assert self._buffer is not None
        sample = self._buffer[self._next]
        self._next += 1
        return sample
