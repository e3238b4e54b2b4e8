"""Unit tests of pipeline.stack.local's own logic: process-tree stops (pipeline.stack.processes), environments, state,
Redis claims. The services themselves run in tests/stack/test_stack.py. About 5 seconds."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.stack import databases as stack_db
from pipeline.stack import environment as stack_env
from pipeline.stack import local as stack_cli
from pipeline.stack import processes, s3server
from pipeline.stack import services as stack_services
from pipeline.stack import state as stack_state
from pipeline.stack import supervisor as stack_supervisor


def _state(tmp_path: Path) -> stack_state.StackState:
    return stack_state.StackState(
        home=str(tmp_path),
        api_port=28080,
        mlflow_port=28081,
        s3_endpoint="http://127.0.0.1:28103",
        airflow_db="pipeline_stack_x_airflow",
        mlflow_db="pipeline_stack_x_mlflow",
        redis_db=7,
        secrets={
            "fernet_key": "f", "api_secret_key": "a", "jwt_secret": "j", "admin_password": "p",
            "s3_access_key": "ak", "s3_secret_key": "sk",
        },  # fmt: skip
        dags_folder=str(tmp_path / "dags"),
        dag_bundles={"extra": str(tmp_path / "more")},
        extra_env={"PIPELINE_CONFIG": "/etc/pipeline.yaml"},
    )


def test_stop_trees_reaches_descendants_in_their_own_process_groups(tmp_path: Path) -> None:
    """Airflow puts each task process in a process group of its own: a process-group kill would miss it."""
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    assert os.getpgid(grandchild) != os.getpgid(child.pid)
    processes.stop_trees([child.pid], signal.SIGKILL, grace=0)
    # stop_trees returns only once every process of the tree is gone.
    assert not processes.alive(child.pid) and not processes.alive(grandchild)
    child.wait(timeout=5)  # already reaped by stop_trees: returns at once


def _orphan(tmp_path: Path, code: str) -> int:
    """Start ``code`` in a process whose parent exits at once, as ``stack.sh up`` does: we are not its parent."""
    pid_file = tmp_path / "orphan.pid"
    launcher = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {code!r}], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
    )
    subprocess.run([sys.executable, "-c", launcher], check=True, timeout=30)
    pid = int(pid_file.read_text())
    assert os.getppid() != pid and psutil.Process(pid).ppid() != os.getpid()
    return pid


def test_a_server_ignoring_sigterm_is_killed_and_waited_for_by_a_process_that_is_not_its_parent(
    tmp_path: Path,
) -> None:
    """`weed` does not always exit on SIGTERM, and `stack.sh down` is not its parent: the stop must poll it
    until it is gone and SIGKILL it after the grace period (it used to return at once, leaving it running)."""
    ready = tmp_path / "ready"
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(300)\n"
    )
    pid = _orphan(tmp_path, code)
    deadline = time.monotonic() + 20
    while not ready.exists():  # SIGTERM is ignored from here on
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    s3server.stop(pid, timeout=1.0)  # what `down` calls for SeaweedFS
    took = time.monotonic() - started
    assert not processes.alive(pid)
    assert took >= 1.0  # it waited the grace period for SIGTERM before SIGKILL (not "not our child: done")


def test_worker_hostname_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_WORKER_HOSTNAME", "airflow-worker-gpu")
    assert stack_cli.worker_hostname() == "airflow-worker-gpu"
    monkeypatch.delenv("PIPELINE_WORKER_HOSTNAME")
    assert stack_cli.worker_hostname() and stack_cli.worker_hostname() != "airflow-worker-gpu"


def test_service_env_has_policy_wiring_and_no_leaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings of another deployment in the caller's environment must not reach the stack's processes.
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-elses")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    state = _state(tmp_path)
    env = stack_env.service_env(state, stack_supervisor.service("airflow-worker-gpu"))
    assert {k: env[k] for k in stack_services.AIRFLOW_POLICY} == stack_services.AIRFLOW_POLICY
    assert set(stack_services.AIRFLOW_WIRING) <= set(env)
    assert env["AWS_ACCESS_KEY_ID"] == "ak" and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:28081"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:28080/execution/"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/7"
    assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1" and env["PIPELINE_WORKER_HOSTNAME"] == "airflow-worker-gpu"
    assert env["PIPELINE_CONFIG"] == "/etc/pipeline.yaml"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    conn = json.loads(env["AIRFLOW_CONN_AIRFLOW_API"])
    assert (conn["host"], conn["port"], conn["login"], conn["password"]) == ("127.0.0.1", 28080, "admin", "p")
    bundles = {b["name"]: b["kwargs"] for b in json.loads(env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"])}
    assert bundles == {"dags-folder": {}, "extra": {"path": str(tmp_path / "more")}}
    mlflow = stack_env.service_env(state, stack_supervisor.service("mlflow"))
    assert set(stack_services.MLFLOW_WIRING) <= set(mlflow) and "AIRFLOW__CORE__EXECUTOR" not in mlflow
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].endswith("/pipeline_stack_x_mlflow")


def test_state_file_is_private_and_round_trips(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.pids = {"mlflow": 123}
    state.save()
    path = tmp_path / stack_state.STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stack_state.StackState.load(tmp_path) == state
    with pytest.raises(stack_state.StackError, match="no stack at"):
        stack_state.StackState.load(tmp_path / "elsewhere")


def test_redis_databases_are_claimed_once_and_released_by_their_owner() -> None:
    first = stack_db.claim_redis_db("test-owner-a")
    try:
        second = stack_db.claim_redis_db("test-owner-b")
        try:
            assert first != second
            stack_db.release_redis_db(first, "someone-else")  # not the owner: nothing happens
            assert stack_db.redis_client(first).get(stack_db.REDIS_CLAIM_KEY) == b"test-owner-a"
        finally:
            stack_db.release_redis_db(second, "test-owner-b")
    finally:
        stack_db.release_redis_db(first, "test-owner-a")
    assert stack_db.redis_client(first).dbsize() == 0


def test_unknown_service_is_named() -> None:
    with pytest.raises(stack_state.StackError, match="unknown service 'worker'.*airflow-worker-gpu"):
        stack_supervisor.service("worker")
