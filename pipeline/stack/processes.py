"""Stopping local processes for good: the SeaweedFS server (pipeline.stack.s3server) and the local stack's services
(pipeline.stack.local), and every other process the tooling stops: the one process-stop helper,
:func:`stop_trees`. Tooling for local runs and tests; workers never import it.

The caller is often not the parent of what it stops (``stack.sh down`` runs in another process than
``stack.sh up``), so waiting means polling each process until it is gone, never ``waitpid``. Only the
standard library is imported at top level (pipeline.stack.local is Airflow's ``hostname_callable``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import Any

from pipeline.errors import PipelineError
from pipeline.waiting import WaitTimeout, wait_until

POLL_S = 0.1


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: it only waits for its parent to collect its status)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(pid: int) -> None:
    """Collect the exit status of a child of ours, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent (or init) collects it


def _gone(proc: Any) -> bool:
    import psutil

    _reap(proc.pid)
    try:
        # is_running() also compares the start time, so a recycled pid does not count as the same process.
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Poll until every process is gone or ``timeout`` passed; returns the ones still running."""
    left = list(procs)

    def all_gone() -> bool:
        left[:] = [p for p in left if not _gone(p)]
        return not left

    try:
        wait_until(all_gone, timeout, POLL_S, "processes gone")
    except WaitTimeout:
        pass  # the caller decides: SIGKILL what is left, or name it
    return left


def stop_trees(pids: Iterable[int], sig: int = signal.SIGTERM, grace: float = 15.0, kill_wait: float = 10.0) -> None:
    """Stop processes and every descendant of theirs, and confirm that each one is gone.

    Every process of every tree is signalled at once (task processes live in process groups of their own,
    so a process-group kill would miss them); what is still running ``grace`` seconds later gets SIGKILL.
    Raises PipelineError naming any process that survives even SIGKILL for ``kill_wait`` seconds.
    """
    import psutil

    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            _reap(pid)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    left = _wait_gone(procs, grace) if sig != signal.SIGKILL else procs
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    left = _wait_gone(left, kill_wait)
    if left:
        names = ", ".join(f"{p.pid} ({_name(p)})" for p in left)
        raise PipelineError(f"process(es) still running {kill_wait:.0f}s after SIGKILL: {names}")


def _name(proc: Any) -> str:
    try:
        return str(proc.name())
    except Exception:  # noqa: BLE001 - only for the message
        return "?"
