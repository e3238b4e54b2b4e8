"""The session-parallel mini-batch schedule of an epoch, worked out once before training.

``build_schedule`` lays the sessions (in log order) over ``batch_size`` parallel rows as flat index arrays
(``Schedule``): which item each batch row reads at each step, which item it must predict and which rows start a
new session (their hidden state is zeroed). ``DeviceSchedule`` holds the per-step state handling of a schedule
on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class Schedule:
    """Every mini-batch step of one epoch, as flat arrays over all (step, batch row) pairs.

    Step t covers entries ``bounds[t]:bounds[t+1]``: row r feeds ``inputs[i]`` and must predict
    ``targets[i]``; ``fresh[i]`` is True when the row's session starts at this step (its hidden state must
    be zero). While sessions remain, an ended session's row is taken by the next session in order; once
    none remain the batch shrinks, and ``carry[t]`` lists, for such a step, which rows of the previous
    step go on (None when the rows are unchanged).
    """

    inputs: np.ndarray
    targets: np.ndarray
    fresh: np.ndarray
    bounds: np.ndarray
    carry: dict[int, np.ndarray]
    session_of: np.ndarray  # session (index into the log) of each entry, for tests and diagnostics

    @property
    def n_steps(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_predictions(self) -> int:
        return len(self.inputs)


def build_schedule(items: np.ndarray, offsets: np.ndarray, batch_size: int) -> Schedule:
    """Lay out the sessions (in log order) over ``batch_size`` parallel rows, one next-item step at a time.

    Sessions with a single event carry no training signal and are skipped. Every other session is consumed
    in full: the epoch does not stop when the remaining sessions no longer fill a batch.
    """
    import heapq

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.diff(offsets)
    usable = np.flatnonzero(lengths >= 2)
    n_pred = lengths[usable] - 1  # predictions (= steps) per session
    slots = min(batch_size, len(usable))
    if slots == 0:
        raise TrainingError("no session has 2 or more events: nothing to train on")
    # Assign each session to the slot that frees first (ties: lowest slot), at the step it frees.
    free = [(0, s) for s in range(slots)]
    slot = np.empty(len(usable), np.int64)
    start = np.empty(len(usable), np.int64)
    for j, steps in enumerate(n_pred.tolist()):
        t, s = heapq.heappop(free)
        slot[j], start[j] = s, t
        heapq.heappush(free, (t + steps, s))
    # One entry per prediction: step = session start step + k, input = event k, target = event k + 1.
    sess = np.repeat(np.arange(len(usable)), n_pred)
    k = np.arange(len(sess)) - np.repeat(np.cumsum(n_pred) - n_pred, n_pred)
    step = start[sess] + k
    order = np.lexsort((slot[sess], step))
    step, sess, k = step[order], sess[order], k[order]
    event = offsets[usable][sess] + k
    bounds = np.concatenate([[0], np.cumsum(np.bincount(step))]).astype(np.int64)
    # When the batch shrinks, map each remaining row to its row in the previous step.
    slot_of = slot[sess]
    carry: dict[int, np.ndarray] = {}
    sizes = np.diff(bounds)
    for shrink in (np.flatnonzero(sizes[1:] < sizes[:-1]) + 1).tolist():
        prev = slot_of[bounds[shrink - 1] : bounds[shrink]]
        carry[shrink] = np.searchsorted(prev, slot_of[bounds[shrink] : bounds[shrink + 1]])
    return Schedule(
        inputs=items[event],
        targets=items[event + 1],
        fresh=k == 0,
        bounds=bounds,
        carry=carry,
        session_of=usable[sess],
    )


# ---------------------------------------------------------------------------------------------------
# One epoch


@dataclass
class DeviceSchedule:
    """A schedule with its per-step state handling on the training device (the host keeps the items:
    the block planner reads them there)."""

    schedule: Schedule
    keep: Tensor  # float (n, 1): 0 where a session starts (its hidden row is zeroed), else 1
    bounds: list[int]
    carry: dict[int, Tensor]

    @classmethod
    def of(cls, schedule: Schedule, device: torch.device) -> DeviceSchedule:
        return cls(
            schedule=schedule,
            keep=torch.as_tensor(~schedule.fresh, dtype=torch.float32, device=device).unsqueeze(1),
            bounds=schedule.bounds.tolist(),
            carry={t: torch.as_tensor(c, device=device) for t, c in schedule.carry.items()},
        )
