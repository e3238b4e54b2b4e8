"""Helpers for the MLflow tests: child processes (servers), small configs, racing promotions.

A plain module with a unique name (not ``conftest``) so test modules can import it unambiguously.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the venv's bin first (mlflow, uvicorn), plus ``extra``."""
    env = os.environ | (extra or {})
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    return env


def wait_http(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200; fail with the process log when it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log_file.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_process(proc)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s:\n{log_file.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@contextmanager
def background(args: list[str], log_file: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process(proc)


def quick_config(*overrides: str):
    """Small, fast GRU4Rec settings for tests (1-3 epochs on ~3k events), plus ``overrides``."""
    from pipeline.config import load_config

    return load_config(
        None,
        [
            "gru4rec.layers=[32]",
            "gru4rec.n_sample=128",
            "gru4rec.batch_size=32",
            "gru4rec.n_epochs=1",
            "tracking.system_metrics=false",
            "tracking.bootstrap_samples=500",
            *overrides,
        ],
    )


def race(cfg, run_ids: list[str], delays: dict[str, float] | None = None) -> dict:
    """Run one ``promote`` per run id in its own thread; all compare against the same champion first.

    A barrier in ``on_compared`` holds each one after its first comparison until all have compared, so
    they then race for the alias with a stale view of the champion: the case the lock and the
    re-verification exist for. ``delays`` holds some back a little longer after the barrier (to force an
    order). Returns {run_id: Decision}.
    """
    from pipeline.tracking import promotion
    from pipeline.tracking.decision import Decision

    barrier = threading.Barrier(len(run_ids), timeout=300)
    decisions: dict[str, Decision] = {}
    errors: list[BaseException] = []

    def contender(run_id: str) -> None:
        waited = False

        def line_up(decision: Decision) -> None:
            nonlocal waited
            if not waited:
                waited = True
                barrier.wait()
                time.sleep((delays or {}).get(run_id, 0.0))

        try:
            decisions[run_id] = promotion.promote(cfg, [run_id], on_compared=line_up)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=contender, args=(r,)) for r in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return decisions
