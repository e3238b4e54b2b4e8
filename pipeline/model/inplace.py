"""Adagrad (with momentum) applied in place on the touched rows of a CPU item table, compiled with Numba.

NumPy and torch have no "update these rows in place" operation, so the plain path gathers the rows of the
table, its accumulator and its velocity, updates the copies and scatters all three back: six passes of
row traffic. This kernel reads and writes each row once, where it lies. One RetailRocket step moves
~1,400 rows of 224 floats per table; docs/benchmarks.md has the figures. ``pipeline.model.optim`` also passes
each dense parameter (a GRU weight or bias) as a table of one row: one call instead of three multi-tensor passes.

The arithmetic is ``pipeline.model.optim``'s, element by element and in float32:
``acc += g * g; v = momentum * v - lr * g / sqrt(acc); w += v`` (``acc`` holds the sum plus eps), or
``w -= lr * g / sqrt(acc)`` without momentum. Compiled on first use; the machine code is cached in
``__pycache__`` (or Numba's user cache, ``NUMBA_CACHE_DIR``) so later processes load it instead of compiling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit


def _adagrad_rows(
    table: np.ndarray, acc: np.ndarray, vel: np.ndarray, rows: np.ndarray, grad: np.ndarray, lr: float, momentum: float
) -> None:
    """Update rows ``rows`` (distinct) of the 2-D float32 arrays in place from ``grad`` (one row per index);
    ``vel`` is read and written only when ``momentum`` is non-zero."""
    lr32, m32 = np.float32(lr), np.float32(momentum)
    width = table.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        w, a, g = table[r], acc[r], grad[i]
        if m32 != 0:
            v = vel[r]
            for j in range(width):
                s = a[j] + g[j] * g[j]
                a[j] = s
                step = m32 * v[j] - lr32 * g[j] / np.sqrt(s)
                v[j] = step
                w[j] += step
        else:
            for j in range(width):
                s = a[j] + g[j] * g[j]
                a[j] = s
                w[j] -= lr32 * g[j] / np.sqrt(s)


def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    # The numpy error model drops the zero-division checks, so the inner loops vectorise.
    options: dict[str, Any] = {"nogil": True, "error_model": "numpy"}
    try:
        return njit(cache=True, **options)(fn)
    except RuntimeError:  # nowhere to write the cache (read-only install, no writable home): compile per process
        return njit(**options)(fn)


adagrad_rows = _compiled(_adagrad_rows)


def load() -> None:
    """Compile ``adagrad_rows`` for the types training passes (float32 tables, int64 rows), or load it from the
    cache: ~0.5 s cached, ~1 s cold, spent at start-up rather than in the first training step."""
    t = np.zeros((1, 1), np.float32)
    adagrad_rows(t, np.ones_like(t), np.zeros_like(t), np.zeros(1, np.int64), np.zeros_like(t), 0.0, 0.0)
