"""The one wait helper (pipeline.waiting): returns the check's value, names what it waited for on time-out."""

from __future__ import annotations

import time

import pytest

from pipeline.errors import PipelineError
from pipeline.waiting import WaitTimeout, wait_until


def test_returns_the_first_truthy_value_of_the_check() -> None:
    answers = iter([None, 0, {"state": "success"}])
    assert wait_until(lambda: next(answers), timeout=5, interval=0.01, what="run") == {"state": "success"}


def test_checks_at_least_once_and_names_what_it_waited_for() -> None:
    calls = []
    with pytest.raises(WaitTimeout, match=r"DAG x parsed not done within 0s") as caught:
        wait_until(lambda: calls.append(1), timeout=0, interval=0.01, what="DAG x parsed")
    assert calls == [1] and isinstance(caught.value, PipelineError) and caught.value.what == "DAG x parsed"


def test_gives_up_after_the_timeout_and_a_failing_check_raises_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(WaitTimeout):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="never", jitter=0.5)
    assert 0.2 <= time.monotonic() - start < 2

    def broken() -> bool:
        raise PipelineError("service exited")

    with pytest.raises(PipelineError, match="service exited"):
        wait_until(broken, timeout=5, interval=0.01, what="service")
