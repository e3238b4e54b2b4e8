"""Negative samples and the item rows each training step touches, worked out ahead of the steps.

Samples are drawn i.i.d. with probability proportional to ``popularity ** sample_alpha`` (with replacement)
by Walker's alias method: one uniform number per sample, two table reads, no binary search.

Everything a step needs to know about item rows is known before the step runs: its inputs and targets come
from the epoch schedule and its samples are drawn for a block of steps at once. ``plan_rows`` therefore
computes, for a whole block on the host, each step's distinct item rows, where every input and target sits
among them, and how many output columns (targets + samples) each distinct row stands for. The training step
only slices these arrays: it never runs ``unique``, never waits for the device, and its score matrix has
one column per distinct row instead of one per (target + sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PopularitySampler:
    """Draws item indices i.i.d. from popularity**alpha (items without training events are never drawn)."""

    def __init__(self, counts: np.ndarray, n_sample: int, alpha: float) -> None:
        if n_sample < 1:
            raise ValueError(f"n_sample must be >= 1 to sample, got {n_sample}")
        counts = np.asarray(counts, dtype=np.float64)
        weights = np.where(counts > 0, np.maximum(counts, 1e-300) ** alpha, 0.0)  # 0**0 would be 1
        if not (weights > 0).any():
            raise ValueError("cannot sample: every item has zero popularity")
        self.prob = weights / weights.sum()
        self.n_sample = n_sample
        self._accept, self._alias = _alias_table(self.prob)

    def draw(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``rows`` x ``n_sample`` item indices (int64)."""
        n = len(self._accept)
        u = rng.random((rows, self.n_sample)) * n
        pick = u.astype(np.int64)
        np.minimum(pick, n - 1, out=pick)  # u < 1 always, but guard the float rounding of u * n
        u -= pick  # the fraction left decides between the bucket's item and its alias
        return np.where(u < self._accept[pick], pick, self._alias[pick])


def _alias_table(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table: bucket i keeps item i with probability accept[i], else gives alias[i]."""
    n = len(prob)
    scaled = prob * n
    accept = np.ones(n)
    alias = np.arange(n, dtype=np.int64)
    small = np.flatnonzero(scaled < 1.0).tolist()
    large = np.flatnonzero(scaled >= 1.0).tolist()
    q = scaled.tolist()
    while small and large:
        s, g = small.pop(), large[-1]
        accept[s], alias[s] = q[s], g
        q[g] -= 1.0 - q[s]
        if q[g] < 1.0:
            small.append(large.pop())
    # Leftovers hold ~1 after rounding; an item of zero weight can never be among them (see tests).
    accept[prob == 0] = 0.0
    return accept, alias


@dataclass(frozen=True)
class RowPlan:
    """The item rows of a block of steps (host arrays; entries of step k are ``bounds[k]:bounds[k+1]``).

    ``rows[row_bounds[k]:row_bounds[k+1]]`` are step k's distinct rows of the output table (ascending).
    ``y_col`` / ``x_col`` give each target / input its position among them (``x_col`` only with a shared
    embedding, whose inputs are rows of the output table). ``log_weight`` is, per distinct row, the log of
    the total weight of the output columns it stands for: with the logQ correction each column weighs
    ``q ** -logq`` (targets: popularity, samples: popularity ** alpha), otherwise 1, so the sampled
    softmax over (targets + samples) equals a softmax over distinct rows with these log weights added
    (-inf for a row that is only an input). ``target_shift`` is each target column's own correction:
    ``logq * log q(target)`` for cross-entropy, ``log(weight - 1)`` of the target's row for BPR-max (its
    negatives exclude the target's own column). With a separate input table, ``x_rows`` / ``x_row_bounds``
    / ``x_col`` are the distinct input rows of each step instead.
    """

    rows: np.ndarray
    row_bounds: np.ndarray
    y_col: np.ndarray
    log_weight: np.ndarray
    target_shift: np.ndarray
    x_col: np.ndarray
    x_rows: np.ndarray | None = None
    x_row_bounds: np.ndarray | None = None


def distinct_per_step(values: np.ndarray, step_of: np.ndarray, n_steps: int, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of each step: (rows ascending within each step, row bounds per step, each entry's
    position among its step's rows). One sort of the whole block, no per-step work."""
    n = len(values)
    key = step_of.astype(np.int64) * n_items + values
    pos_bits = max(1, int(n - 1).bit_length())
    if (n_steps * n_items).bit_length() + pos_bits <= 62:
        # Pack the entry position into the key: a plain sort (much faster than argsort) then gives both.
        packed = np.sort((key << pos_bits) | np.arange(n, dtype=np.int64))
        order = packed & ((1 << pos_bits) - 1)
        sorted_key = packed >> pos_bits
    else:
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    distinct = sorted_key[first]
    local = np.empty(n, dtype=np.int64)
    local[order] = np.cumsum(first) - 1
    row_bounds = np.searchsorted(distinct, np.arange(n_steps + 1, dtype=np.int64) * n_items)
    local -= row_bounds[step_of]
    return distinct - (distinct // n_items) * n_items, row_bounds, local


def plan_rows(
    inputs: np.ndarray,
    targets: np.ndarray,
    bounds: np.ndarray,
    samples: np.ndarray | None,
    n_items: int,
    *,
    shared: bool,
    log_count: np.ndarray,
    loss: str,
    logq: float,
    sample_alpha: float,
) -> RowPlan:
    """Plan a block: ``inputs``/``targets`` are its entries, step k owning ``bounds[k]:bounds[k+1]`` (bounds
    start at 0), ``samples`` its (steps x n_sample) negative samples. ``log_count`` is log popularity.

    Each step's items are tagged with their kind (sample 0, target 1, input 2) and sorted within the step
    (a row-wise sort of small integers, far cheaper than sorting the whole block): equal items form runs,
    each run is a distinct row, and the kinds in a run give its column counts. Targets and inputs (a few
    per step, unlike the samples) then find their row by binary search.
    """
    # One function over ~60 lines: its stages (tag, sort, runs, positions, weights) share a dozen arrays.
    n_steps = len(bounds) - 1
    sizes = np.diff(bounds)
    entry_step = np.repeat(np.arange(n_steps), sizes)
    entry_pos = np.arange(len(targets)) - bounds[entry_step]
    width = int(sizes.max())
    dtype = np.int32 if 4 * n_items + 3 < 2**31 else np.int64

    def tagged(values: np.ndarray, kind: int) -> np.ndarray:
        out = np.full((n_steps, width), 4 * n_items + kind, dtype)  # padding sorts after every item
        out[entry_step, entry_pos] = values * 4 + kind
        return out

    parts = [tagged(targets, 1)]
    if samples is not None:
        parts.append((samples * 4).astype(dtype))
    if shared:  # inputs are rows of the output table too: one set of rows for both
        parts.append(tagged(inputs, 2))
    block = np.concatenate(parts, axis=1)
    block.sort(axis=1)
    item = block >> 2
    first = np.empty(block.shape, dtype=bool)
    first[:, 0] = True
    np.not_equal(item[:, 1:], item[:, :-1], out=first[:, 1:])
    first &= item < n_items
    starts = np.flatnonzero(first)  # where each distinct row's run begins (flat index into the block)
    rows = item.ravel()[starts].astype(np.int64)
    row_bounds = np.concatenate([[0], np.cumsum(first.sum(1))]).astype(np.int64)
    # A run ends where the next begins or where the step's padding starts.
    row_len = block.shape[1]
    n_valid = sizes * (2 if shared else 1) + (0 if samples is None else samples.shape[1])
    run_step = np.repeat(np.arange(n_steps, dtype=np.int64), np.diff(row_bounds))
    run_end = np.minimum(np.append(starts[1:], block.size), run_step * row_len + n_valid[run_step])
    run_len = run_end - starts
    n_rows = len(rows)

    # Each target's / input's position among its step's rows.
    keys = run_step * n_items + rows
    entry_key = entry_step.astype(np.int64) * n_items
    y_row = np.searchsorted(keys, entry_key + targets)
    y_col = y_row - row_bounds[entry_step]
    n_target = np.bincount(y_row, minlength=n_rows)
    n_sampled = run_len - n_target
    if shared:
        x_row = np.searchsorted(keys, entry_key + inputs)
        n_sampled -= np.bincount(x_row, minlength=n_rows)

    log_weight, target_shift = _column_weights(
        rows, targets, y_row, n_target, n_sampled, log_count, loss=loss, logq=logq, sample_alpha=sample_alpha
    )
    if shared:
        x_col = x_row - row_bounds[entry_step]
        return RowPlan(rows, row_bounds, y_col, log_weight, target_shift, x_col)
    x_rows, x_row_bounds, x_col = distinct_per_step(inputs, entry_step, n_steps, n_items)
    return RowPlan(rows, row_bounds, y_col, log_weight, target_shift, x_col, x_rows, x_row_bounds)


def _column_weights(
    rows: np.ndarray,
    targets: np.ndarray,
    y_row: np.ndarray,
    n_target: np.ndarray,
    n_sampled: np.ndarray,
    log_count: np.ndarray,
    *,
    loss: str,
    logq: float,
    sample_alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(log weight per distinct row, each target's own shift): see ``RowPlan``. A row stands for
    ``n_target`` target columns and ``n_sampled`` sample columns; ``y_row`` is each target's row."""
    with np.errstate(divide="ignore"):
        if loss == "cross-entropy" and logq != 0.0:
            # a column weighs q ** -logq: targets q = popularity, samples q = popularity ** alpha
            log_c = log_count[rows]
            weight = n_target * np.exp(-logq * log_c) + n_sampled * np.exp(-logq * sample_alpha * log_c)
            target_shift = (logq * log_count[targets]).astype(np.float32)
        else:
            weight = n_target + n_sampled
            if loss == "bpr-max":  # the target's negatives exclude its own column
                target_shift = np.log(weight[y_row] - 1.0).astype(np.float32)
            else:
                target_shift = np.zeros(len(targets), np.float32)
        return np.log(weight).astype(np.float32), target_shift
