"""Work sharing between the training thread and one helper thread (the second "lane" of a CPU step).

A CPU training step is a handful of matrix products over the batch, each too small to split well across
torch's intra-op (OpenMP) threads on a shared 2-core machine: every op then waits for both cores, and when
another process holds one of them a step takes several times longer (docs/benchmarks.md). ``Lanes`` splits
coarser work instead (the two halves of a batch, each a whole forward + loss + backward) and shares it: the
calling thread and a helper thread both take the next piece from one counter, so when the helper gets no core
the caller simply does every piece itself, and a waiting caller blocks instead of spinning. Torch ops release
the GIL, so the two lanes run in parallel; each keeps torch at one intra-op thread.

Which lane runs a piece never changes its result: each piece is a pure function of its input, and results
come back in input order.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Job(Generic[T, R]):
    """One ``map`` call: the pieces, a shared claim counter and where the results go."""

    def __init__(self, fn: Callable[[T], R], items: Sequence[T]) -> None:
        self.fn = fn
        self.items = items
        self.results: list[R | None] = [None] * len(items)
        self.claim = itertools.count()  # next() is atomic under the GIL: each piece is claimed once
        self.error: BaseException | None = None
        self.helper_done = threading.Event()

    def drain(self) -> None:
        """Run pieces until none is left (called by both lanes)."""
        while (i := next(self.claim)) < len(self.items):
            try:
                self.results[i] = self.fn(self.items[i])
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which re-raises it
                self.error = e
                return


class Lanes:
    """The calling thread plus one helper thread; ``map`` runs a function over a few pieces on both."""

    def __init__(self, threads: int = 1) -> None:
        self._threads = threads
        self._cv = threading.Condition()
        self._job: _Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="step-lane", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        import torch  # here, not at the top: the pieces are torch work, the sharing itself is not

        # A thread not started by OpenMP starts with the default thread count (every core), not the
        # caller's: keep the helper at the caller's (one, for a CPU step) or both lanes fight for the cores.
        torch.set_num_threads(self._threads)
        while True:
            with self._cv:
                while self._job is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job, self._job = self._job, None
            assert job is not None
            job.drain()
            job.helper_done.set()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, the pieces shared between this thread and the helper."""
        if len(items) < 2 or self._closed:
            return [fn(x) for x in items]
        job: _Job[T, R] = _Job(fn, items)
        with self._cv:
            self._job = job
            self._cv.notify()
        job.drain()
        with self._cv:
            taken = self._job is not job  # the helper took the job (it may still run a piece)
            self._job = None
        if taken:
            job.helper_done.wait()
        if job.error is not None:
            raise job.error
        return job.results  # type: ignore[return-value]  # every piece ran

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def __enter__(self) -> Lanes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
