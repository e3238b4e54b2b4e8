"""The one wait/poll helper: call a check until it holds or a time limit passes.

Every wait in the pipeline (a server answering, a DAG run ending, a process gone, a lock free) is this loop:
check first, sleep ``interval`` between checks, and on time-out raise :class:`WaitTimeout` naming what was
waited for. A check that finds a condition that will never hold (a service that exited) raises itself; a
caller with more to say on time-out (the failed tasks of a run) catches ``WaitTimeout`` and says it.
Standard library only: the local stack's Airflow ``hostname_callable`` module imports it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")


class WaitTimeout(PipelineError):
    """What was waited for did not happen within the time limit (the message names it and the limit)."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what} not done within {timeout:.0f}s")
        self.what = what
        self.timeout = timeout


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    interval: float = 1.0,
    what: str = "condition",
    *,
    jitter: float = 0.0,
) -> T:
    """Call ``check`` until it returns something truthy, and return that; at least once, however short ``timeout``.

    ``interval`` seconds pass between checks, each spread by +-``jitter`` of it (contended locks: waiters
    that started together do not retry together). Raises :class:`WaitTimeout` naming ``what`` when
    ``timeout`` seconds passed without success; exceptions of ``check`` propagate at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(what, timeout)
        pause = interval * (1.0 - jitter + 2.0 * jitter * random.random()) if jitter else interval
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
