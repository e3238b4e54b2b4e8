"""The session-parallel mini-batch schedule, against a plain step-by-step simulation of the rules."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model.schedule import build_schedule


def _naive(lengths: list[int], batch: int) -> list[list[tuple[int, int, bool]]]:
    """Steps of (session, position, fresh) per active row, simulated one step at a time.

    Rules: sessions in order; B rows; when a row's session ends the next unseen session takes that row
    (fresh state); when none are left the row is dropped and the batch shrinks; 1-event sessions skipped.
    """
    queue = [s for s, n in enumerate(lengths) if n >= 2]
    rows = [[queue.pop(0), 0, True] for _ in range(min(batch, len(queue)))]
    steps = []
    while rows:
        steps.append([(s, k, fresh) for s, k, fresh in rows])
        nxt = []
        for s, k, _ in rows:
            if k + 2 < lengths[s]:
                nxt.append([s, k + 1, False])
            elif queue:
                nxt.append([queue.pop(0), 0, True])
        rows = nxt
    return steps


def _flatten(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.arange(offsets[-1]) + 1000  # item = 1000 + event position: makes positions visible
    return items, offsets


@pytest.mark.parametrize(
    "lengths,batch",
    [
        ([3, 2, 5, 2, 4, 6, 2, 3], 3),
        ([2, 2, 2, 2], 8),  # fewer sessions than rows
        ([1, 4, 1, 1, 3, 2, 1], 2),  # 1-event sessions carry no signal
        ([9, 2, 2, 2, 2, 2, 2, 2, 2, 7], 4),  # a long session keeps its row while others rotate
    ],
)
def test_schedule_matches_step_by_step_simulation(lengths, batch):
    items, offsets = _flatten(lengths)
    sched = build_schedule(items, offsets, batch)
    expected = _naive(lengths, batch)
    assert sched.n_steps == len(expected)
    for t, rows in enumerate(expected):
        lo, hi = sched.bounds[t], sched.bounds[t + 1]
        assert sched.inputs[lo:hi].tolist() == [1000 + offsets[s] + k for s, k, _ in rows]
        assert sched.targets[lo:hi].tolist() == [1000 + offsets[s] + k + 1 for s, k, _ in rows]
        # exactly the rows whose session starts here are reset, no other row
        assert sched.fresh[lo:hi].tolist() == [fresh for _, _, fresh in rows]


@pytest.mark.parametrize("seed", range(5))
def test_every_prediction_of_every_session_is_trained_once(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=int(rng.integers(5, 60))).tolist()
    items, offsets = _flatten(lengths)
    batch = int(rng.integers(1, 9))
    sched = build_schedule(items, offsets, batch)
    expected_pairs = {(1000 + offsets[s] + k, 1000 + offsets[s] + k + 1) for s, n in enumerate(lengths) for k in range(n - 1)}
    got = list(zip(sched.inputs.tolist(), sched.targets.tolist(), strict=True))
    assert len(got) == len(expected_pairs) == sum(n - 1 for n in lengths)  # the tail is not cut off
    assert set(got) == expected_pairs
    sizes = np.diff(sched.bounds)
    assert (sizes <= batch).all() and (np.diff(sizes) <= 0)[sizes[1:] < batch].all()  # shrinks only at the end
    # after a shrink, ``carry`` points each row at its own session's row in the previous step
    for t, carry in sched.carry.items():
        prev = sched.session_of[sched.bounds[t - 1] : sched.bounds[t]]
        now = sched.session_of[sched.bounds[t] : sched.bounds[t + 1]]
        cont = ~sched.fresh[sched.bounds[t] : sched.bounds[t + 1]]
        assert (prev[carry][cont] == now[cont]).all()


def test_session_order_is_the_log_order():
    items, offsets = _flatten([2, 2, 2, 2, 2])
    sched = build_schedule(items, offsets, 2)
    firsts = sched.session_of[sched.fresh]
    assert firsts.tolist() == [0, 1, 2, 3, 4]
