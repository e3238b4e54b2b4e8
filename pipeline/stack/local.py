"""The deployment's topology as plain processes on one machine: ``python -m pipeline.stack.local up|down|status``.

The same services the images run (``docker/``, ``infra/compose``, ``infra/k8s``), started from the venv
and bound to 127.0.0.1:

    seaweedfs              S3 (pipeline.stack.s3server), one bucket for datasets and MLflow artifacts
    mlflow                 ``mlflow server``: PostgreSQL backend, ``--artifacts-destination s3://...``
    airflow-init           one shot (``python -m pipeline.stack.local init``): migrate, ``gpu`` pool, bucket
    airflow-api-server     REST API /api/v2, UI, and the execution API the workers report to
    airflow-scheduler      CeleryExecutor: broker Redis, result backend PostgreSQL
    airflow-dag-processor  parses dags/ (and any extra DAG bundle)
    airflow-triggerer      deferred tasks
    airflow-worker         Celery worker on the ``default`` queue (no GPU visible)
    airflow-worker-gpu     Celery worker on the ``gpu`` queue only

PostgreSQL and Redis are the machine's own (127.0.0.1:5432 user postgres, 127.0.0.1:6379): ``up`` creates
two databases of its own (Airflow metadata, MLflow backend) and claims an empty Redis database number;
``down`` stops every process by its pid (and its whole process tree), then drops and releases them.
Everything a stack writes lives under one folder (default ``$PIPELINE_HOME/stack``): ``stack.json`` (ports,
pids, generated credentials; mode 0600), ``logs/<service>.log``, ``logs/tasks/`` (Airflow task logs).

This module owns the commands (``init``, ``up``, ``down``, ``status``, ``trigger``, ``env``) and Airflow's
``hostname_callable``; what runs is pipeline.stack.services (the single source of truth for the images),
the state file pipeline.stack.state, environments pipeline.stack.environment, PostgreSQL and Redis
pipeline.stack.databases, starting and waiting for services pipeline.stack.supervisor.

Only the standard library is imported at top level, here and in every module this one imports: Airflow
imports it as the workers' ``hostname_callable``.
"""


from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.stack import s3server
from pipeline.stack.databases import claim_redis_db, create_databases, drop_databases, release_redis_db
from pipeline.stack.environment import airflow_env, base_env, resolve
from pipeline.stack.processes import alive, stop_trees
from pipeline.stack.services import (
    ADMIN_USER,
    BUCKET,
    GPU_POOL,
    GPU_POOL_DESCRIPTION,
    HEARTBEAT_JOBS,
    INIT_ARGV,
    SERVICE_NAMES,
    SERVICES,
)
from pipeline.stack.state import STATE_FILE, StackError, StackState, default_home
from pipeline.stack.supervisor import airflow_health, http_ok, start_service, tail, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_hostname() -> str:
    """Airflow's ``[core] hostname_callable``: the worker's service name when set, else the machine's FQDN.

    Workers of one machine (this stack) or of one compose project are told apart by name, and the name
    resolves wherever the deployment gives services DNS names (compose service names).
    """
    return os.environ.get("PIPELINE_WORKER_HOSTNAME") or socket.getfqdn()


# ---------------------------------------------------------------------------------------------
# init (also the compose `airflow-init` service and the Helm migration hook)


def ensure_bucket(bucket: str) -> None:
    """Create the S3 bucket unless it exists (endpoint and credentials from the AWS_* environment)."""
    import boto3  # only the init job needs it (this module is Airflow's hostname_callable)
    from botocore.exceptions import ClientError

    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise StackError(f"S3 bucket {bucket}: {exc}") from None
        client.create_bucket(Bucket=bucket)


def init() -> None:
    """The one-shot init job (compose ``airflow-init``, the local stack): migrate the metadata database,
    create the ``gpu`` pool and the S3 bucket, and write the admin password for the simple auth manager."""
    slots = os.environ.get("GPU_POOL_SLOTS", "1")
    for argv in (("airflow", "db", "migrate"), ("airflow", "pools", "set", GPU_POOL, slots, GPU_POOL_DESCRIPTION)):
        subprocess.run(resolve(argv), check=True)
    if os.environ.get("PIPELINE_S3_BUCKET"):
        ensure_bucket(os.environ["PIPELINE_S3_BUCKET"])
    password = os.environ.get("PIPELINE_AIRFLOW_ADMIN_PASSWORD")
    passwords_file = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    if password and passwords_file:
        path = Path(passwords_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps({ADMIN_USER: password}))


# ---------------------------------------------------------------------------------------------
# up, down, status


def _free_port_block(size: int, start: int = 21000, stop: int = 40000) -> int:
    for base in range(start + (os.getpid() % 50) * 13, stop - size, 31):
        if all(s3server.port_free(base + i) for i in range(size)):
            return base
    raise StackError("no free block of ports on 127.0.0.1")


def _new_state(
    root: Path,
    dags_folder: str | Path | None,
    dag_bundles: Mapping[str, str | Path] | None,
    extra_env: Mapping[str, str] | None,
    gpu_pool_slots: int,
) -> StackState:
    """A fresh stack's state: free ports, its own database names and newly generated secrets."""
    stack_id = uuid.uuid4().hex[:8]
    port = _free_port_block(2)
    return StackState(
        home=str(root),
        api_port=port,
        mlflow_port=port + 1,
        s3_endpoint="",
        airflow_db=f"pipeline_stack_{stack_id}_airflow",
        mlflow_db=f"pipeline_stack_{stack_id}_mlflow",
        redis_db=-1,
        secrets={
            "fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "api_secret_key": secrets.token_urlsafe(32),
            "jwt_secret": secrets.token_urlsafe(48),
            "admin_password": secrets.token_urlsafe(12),
            "s3_access_key": f"stack-{stack_id}",
            "s3_secret_key": secrets.token_urlsafe(24),
        },
        dags_folder=str(Path(dags_folder or REPO_ROOT / "dags").resolve()),
        dag_bundles={k: str(Path(v).resolve()) for k, v in (dag_bundles or {}).items()},
        extra_env=dict(extra_env or {}),
        gpu_pool_slots=gpu_pool_slots,
    )


def _start_all(state: StackState, timeout: float) -> None:
    """Databases, Redis, S3, MLflow, the init job, then every Airflow service; saved to stack.json step by step."""
    root = state.root
    create_databases([state.airflow_db, state.mlflow_db])
    state.redis_db = claim_redis_db(str(root))
    state.save()
    s3 = s3server.start(root / "s3", access_key=state.secrets["s3_access_key"], secret_key=state.secrets["s3_secret_key"])
    state.s3_pid, state.s3_endpoint = s3.pid, s3.endpoint_url
    state.save()
    # MLflow migrates its own database while Airflow's init runs.
    start_service(state, "mlflow")
    init_log = state.logs / "airflow-init.log"
    with open(init_log, "ab") as log:
        done = subprocess.run(
            resolve(INIT_ARGV), stdout=log, stderr=subprocess.STDOUT, env=base_env() | airflow_env(state), cwd=root
        )
    if done.returncode != 0:
        raise StackError(f"airflow-init failed (exit {done.returncode}); see {init_log}:\n{tail(init_log)}")
    offsets = {}
    for s in SERVICES[1:]:
        log_file = state.logs / f"{s.name}.log"
        offsets[s.name] = log_file.stat().st_size if log_file.exists() else 0
        start_service(state, s.name)
    wait_ready(state, SERVICE_NAMES, timeout=timeout, offsets=offsets)


def up(
    home: str | Path | None = None,
    *,
    dags_folder: str | Path | None = None,
    dag_bundles: Mapping[str, str | Path] | None = None,
    extra_env: Mapping[str, str] | None = None,
    gpu_pool_slots: int = 1,
    timeout: float = 300.0,
) -> StackState:
    """Start the whole stack and wait until every service is ready; on any failure, tear it down again."""
    root = Path(home).resolve() if home else default_home()
    if (root / STATE_FILE).exists():
        old = StackState.load(root)
        if any(alive(p) for p in [*old.pids.values(), old.s3_pid] if p):
            raise StackError(f"a stack is already running from {root}; run `stack.sh down` first")
        down(root)
    (root / "secrets").mkdir(parents=True, exist_ok=True)
    state = _new_state(root, dags_folder, dag_bundles, extra_env, gpu_pool_slots)
    state.save()
    try:
        _start_all(state, timeout)
    except BaseException as exc:
        try:
            down(root)
        except Exception as cleanup:  # the start-up failure is the one to report
            exc.add_note(f"(tearing the half-started stack down also failed: {cleanup})")
        raise
    return state


def down(home: str | Path | None = None) -> None:
    """Stop every process of the stack by its pid, then drop its databases and release its Redis database.
    Logs stay (for a post-mortem); ``up`` in the same folder starts afresh."""
    root = Path(home).resolve() if home else default_home()
    state = StackState.load(root)
    errors: list[str] = []
    try:
        stop_trees([state.pids[name] for name in SERVICE_NAMES if state.pids.get(name)], signal.SIGTERM, grace=10)
    except Exception as exc:  # keep going: the databases must still be dropped
        errors.append(f"stopping services {state.pids}: {exc}")
    s3_stopped = True
    if state.s3_pid:  # after the services, which write to it until they stop
        try:
            s3server.stop(state.s3_pid, timeout=10)
        except Exception as exc:
            s3_stopped = False
            errors.append(f"stopping SeaweedFS (pid {state.s3_pid}): {exc}")
    try:
        drop_databases([state.airflow_db, state.mlflow_db])
    except Exception as exc:
        errors.append(f"dropping databases: {exc}")
    if state.redis_db > 0:
        try:
            release_redis_db(state.redis_db, str(root))
        except Exception as exc:
            errors.append(f"releasing Redis db {state.redis_db}: {exc}")
    if s3_stopped:  # never delete the data folder under a server that still runs
        shutil.rmtree(root / "s3", ignore_errors=True)
    if not errors:
        (root / STATE_FILE).unlink(missing_ok=True)
    if errors:
        raise StackError("stack stopped with errors: " + "; ".join(errors))


def status(home: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Service -> {pid, alive, health} (health from the API server for the Airflow jobs)."""
    state = StackState.load(home or default_home())
    health = airflow_health(state)
    out: dict[str, dict[str, Any]] = {
        "seaweedfs": {"pid": state.s3_pid, "alive": alive(state.s3_pid), "url": state.s3_endpoint}
    }
    for name in SERVICE_NAMES:
        pid = state.pids.get(name, 0)
        entry: dict[str, Any] = {"pid": pid, "alive": bool(pid) and alive(pid)}
        if name in HEARTBEAT_JOBS:
            entry["health"] = health.get(HEARTBEAT_JOBS[name], "unknown")
        elif name == "airflow-api-server":
            entry["url"] = state.api_url
            entry["health"] = health.get("metadatabase", "unreachable")
        elif name == "mlflow":
            entry["url"] = state.mlflow_url
            entry["health"] = "healthy" if http_ok(f"{state.mlflow_url}/health") else "unreachable"
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def _print_status(table: Mapping[str, Mapping[str, Any]]) -> bool:
    ok = True
    for name, entry in table.items():
        health = entry.get("health", "")
        up_ = entry["alive"] and health in ("", "healthy")
        ok &= up_
        extra = " ".join(str(entry[k]) for k in ("url",) if k in entry)
        print(f"{name:24s} {'up' if up_ else 'DOWN':5s} pid {entry['pid']:<8} {health:10s} {extra}")
    return ok


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infra/local/stack.sh", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="stack folder (default $PIPELINE_HOME/stack)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start every service and wait until it is ready")
    p_up.add_argument("--dags-folder", type=Path, default=None, help="Airflow dags folder (default: the repo's dags/)")
    p_up.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR", help="an extra DAG folder")
    p_up.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a setting for every Airflow process")
    p_up.add_argument("--gpu-pool-slots", type=int, default=1)
    sub.add_parser("down", help="stop every service by its pid, drop the stack's databases")
    sub.add_parser("status", help="pid, liveness and health of every service")
    sub.add_parser("env", help="print the client environment (MLflow, S3) as shell exports")
    p_trig = sub.add_parser("trigger", help="trigger a DAG run through the REST API (and wait for it)")
    p_trig.add_argument("dag_id")
    p_trig.add_argument("--date", required=True, metavar="YYYY-MM-DD", help="the run's logical date (UTC)")
    p_trig.add_argument("--conf", default="{}", metavar="JSON", help="run Params, e.g. '{\"grid\": {...}}'")
    p_trig.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait up to this long for the end")
    sub.add_parser("init", help="(run by `up` and by the compose airflow-init service) migrate, create the gpu pool")
    return parser


def _up(args: argparse.Namespace) -> None:
    state = up(
        args.home,
        dags_folder=args.dags_folder,
        dag_bundles=dict(kv.split("=", 1) for kv in args.bundle),
        extra_env=dict(kv.split("=", 1) for kv in args.env),
        gpu_pool_slots=args.gpu_pool_slots,
    )
    _print_status(status(state.home))
    print(f"\nAirflow UI/API: {state.api_url}  (user {ADMIN_USER}, password in {state.home}/{STATE_FILE})")
    print(f"MLflow:         {state.mlflow_url}\nS3:             {state.s3_endpoint} bucket {BUCKET}")
    print(f"logs:           {state.logs}")


def _trigger(args: argparse.Namespace) -> None:
    api = StackState.load(args.home or default_home()).api()
    api.wait_for_dag(args.dag_id)
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        raise StackError(f"--conf is not JSON: {exc}") from None
    run = api.trigger(args.dag_id, f"{args.date}T00:00:00+00:00", conf)
    print(f"triggered {args.dag_id} run {run['dag_run_id']} (logical date {args.date})")
    if args.wait:
        done = api.wait_for_run(args.dag_id, run["dag_run_id"], timeout=args.wait)
        print(f"{done['state']}: {done.get('note') or ''}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "up" and any("=" not in kv for kv in args.bundle + args.env):
        parser.error("--bundle and --env take NAME=VALUE")
    try:
        if args.command == "init":
            init()
        elif args.command == "up":
            _up(args)
        elif args.command == "down":
            down(args.home)
        elif args.command == "status":
            return 0 if _print_status(status(args.home)) else 3
        elif args.command == "trigger":
            _trigger(args)
        elif args.command == "env":
            for key, value in StackState.load(args.home or default_home()).client_env().items():
                print(f"export {key}={value}")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
