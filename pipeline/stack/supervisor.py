"""Starting, stopping and waiting for the stack's services, one process each, by the pid in ``stack.json``.

Each service runs in a session of its own (a Ctrl-C in the caller's shell does not reach it) with its output
appended to ``logs/<service>.log``. Ready means: HTTP health for the servers, a healthy job heartbeat in the
API server's ``/api/v2/monitor/health`` for the Airflow jobs, Celery's ready line for the workers.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path

from pipeline.stack.environment import resolve, service_env
from pipeline.stack.processes import alive, stop_trees
from pipeline.stack.services import HEARTBEAT_JOBS, SERVICE_NAMES, SERVICES, Service
from pipeline.stack.state import StackError, StackState
from pipeline.waiting import WaitTimeout, wait_until


def service(name: str) -> Service:
    for s in SERVICES:
        if s.name == name:
            return s
    raise StackError(f"unknown service {name!r}; services: {', '.join(SERVICE_NAMES)}")


def _spawn(state: StackState, service: Service) -> int:
    state.logs.mkdir(parents=True, exist_ok=True)
    with open(state.logs / f"{service.name}.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(service.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            resolve(service.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=service_env(state, service),
            cwd=state.root,
            start_new_session=True,  # its own process group: a Ctrl-C in the caller's shell does not reach it
        )
    return proc.pid


def start_service(state: StackState, name: str) -> int:
    """(Re)start one service; its pid goes to stack.json."""
    pid = _spawn(state, service(name))
    state.pids[name] = pid
    state.save()
    return pid


def stop_service(state: StackState, name: str, *, crash: bool = False) -> None:
    """Stop one service by its pid: SIGTERM with a grace period, or SIGKILL at once (``crash``)."""
    pid = state.pids.get(name)
    if pid:
        stop_trees([pid], signal.SIGKILL if crash else signal.SIGTERM, grace=0 if crash else 15)


# ---------------------------------------------------------------------------------------------
# Readiness


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.HTTPError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(state: StackState, name: str, check: Callable[[], bool], timeout: float) -> None:
    """Wait for one service's ``check``; a service that exits meanwhile fails at once, with its log's tail."""
    log = state.logs / f"{name}.log"

    def ready() -> bool:
        if check():
            return True
        pid = state.pids.get(name)
        if pid and not alive(pid):
            raise StackError(f"{name} exited during start-up; see {log}:\n{tail(log)}")
        return False

    try:
        wait_until(ready, timeout, 1.0, f"{name} ready")
    except WaitTimeout:
        raise StackError(f"{name} not ready within {timeout:.0f}s; see {log}:\n{tail(log)}") from None


def _worker_ready(state: StackState, name: str, since: int) -> bool:
    """Celery prints '<node> ready.' once it consumes its queues; look only past this start's offset."""
    try:
        with open(state.logs / f"{name}.log", "rb") as f:
            f.seek(since)
            return b" ready." in f.read()
    except OSError:
        return False


def airflow_health(state: StackState) -> dict[str, str]:
    """Component -> status from the API server's /api/v2/monitor/health ({} when it does not answer)."""
    return state.api().health()


def _api_answers(state: StackState) -> bool:
    return bool(airflow_health(state))


def _job_healthy(state: StackState, component: str) -> bool:
    return airflow_health(state).get(component) == "healthy"


def wait_ready(
    state: StackState, names: Iterable[str], timeout: float = 240.0, offsets: Mapping[str, int] | None = None
) -> None:
    """Wait until the named services answer: HTTP health for servers, heartbeats for Airflow jobs,
    Celery's ready line for workers (looked for past ``offsets[name]`` bytes of its log)."""
    deadline = time.monotonic() + timeout
    offsets = offsets or {}

    def left() -> float:  # one budget for all, each service still gets a few seconds
        return max(5.0, deadline - time.monotonic())

    for name in names:
        if name == "mlflow":
            check = partial(http_ok, f"{state.mlflow_url}/health")
        elif name == "airflow-api-server":
            check = partial(_api_answers, state)
        elif name in HEARTBEAT_JOBS:
            check = partial(_job_healthy, state, HEARTBEAT_JOBS[name])
        else:
            check = partial(_worker_ready, state, name, offsets.get(name, 0))
        _wait(state, name, check, left())
