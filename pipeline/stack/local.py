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

Commands and setting names are the single source of truth for the images: ``SERVICES`` here is what the
compose services and the Helm values run, and tests/infra checks that they agree. Values that differ per
deployment (addresses, secrets) travel in environment variables with the same names everywhere.

This module imports only the standard library at top level: Airflow imports it as the workers'
``hostname_callable``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.stack.processes import alive, stop_trees

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "stack.json"
BUCKET = "pipeline"
GPU_POOL = "gpu"
GPU_POOL_DESCRIPTION = "GPU slots: how many training trials may share the GPU workers at once"
ADMIN_USER = "admin"
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS = ("127.0.0.1", 6379)
REDIS_CLAIM_KEY = "pipeline-localstack:owner"


class StackError(PipelineError):
    """The local stack cannot start, or a service in it misbehaves (names the service and its log)."""


# ---------------------------------------------------------------------------------------------
# What runs: shared with docker/ and infra/ (tests/infra/test_deploy_files.py compares them)


@dataclass(frozen=True)
class Service:
    """One long-running process of the deployment."""

    name: str  # also the compose service name and the log file name
    argv: tuple[str, ...]  # exactly the command the images run
    env: Mapping[str, str] = field(default_factory=dict)  # settings only this service gets


SERVICES: tuple[Service, ...] = (
    Service("mlflow", ("mlflow", "server")),
    Service("airflow-api-server", ("airflow", "api-server")),
    Service("airflow-scheduler", ("airflow", "scheduler")),
    Service("airflow-dag-processor", ("airflow", "dag-processor")),
    # Task logs go to a folder every component reads (one machine / a shared volume / S3 on Kubernetes),
    # so no component runs the log-serving side process that would listen on all interfaces.
    Service("airflow-triggerer", ("airflow", "triggerer", "--skip-serve-logs")),
    Service(
        "airflow-worker",
        ("airflow", "celery", "worker", "--queues", "default", "--celery-hostname", "default@%h", "--skip-serve-logs"),
        # CPU tasks never grab a GPU even on a GPU machine.
        {"PIPELINE_WORKER_HOSTNAME": "airflow-worker", "CUDA_VISIBLE_DEVICES": ""},
    ),
    Service(
        "airflow-worker-gpu",
        ("airflow", "celery", "worker", "--queues", "gpu", "--celery-hostname", "gpu@%h", "--skip-serve-logs"),
        # One task at a time per GPU worker; the `gpu` pool bounds trials across all GPU workers.
        {"PIPELINE_WORKER_HOSTNAME": "airflow-worker-gpu", "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1"},
    ),
)
SERVICE_NAMES = tuple(s.name for s in SERVICES)
# Services whose health is their job heartbeat, as the API server's /api/v2/monitor/health names them.
HEARTBEAT_JOBS = {"airflow-scheduler": "scheduler", "airflow-dag-processor": "dag_processor", "airflow-triggerer": "triggerer"}
INIT_ARGV = ("python", "-m", "pipeline.stack.local", "init")  # the compose `airflow-init` command too

# Policy: identical in every deployment (compose and Helm values set the same names to the same values).
AIRFLOW_POLICY: dict[str, str] = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
    # Task instances record which worker ran them (PIPELINE_WORKER_HOSTNAME, else the machine's name).
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipeline.stack.local.worker_hostname",
    # A task whose worker dies is failed by the scheduler's heartbeat check and retried by Airflow; the
    # broker redelivers its unacknowledged message only after this long (longer than any training run).
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
}

MLFLOW_POLICY: dict[str, str] = {
    # The server's job runner serves GenAI evaluation jobs; this pipeline has none (saves ~10 processes).
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}

# Wiring: every deployment sets these names, each to its own addresses and secrets.
AIRFLOW_WIRING: tuple[str, ...] = (
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__BASE_URL",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
    "AIRFLOW_CONN_AIRFLOW_API",  # the REST API connection the DAG's summary task sets the run note with
    "MLFLOW_TRACKING_URI",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "PIPELINE_S3_ENDPOINT_URL",
    "PIPELINE_S3_BUCKET",  # created by the init job when missing
    "PIPELINE_DATA_URI",  # click-log partitions dt=YYYY-MM-DD/
    "PIPELINE_OUTPUT_URI",  # validated partitions, datasets, models, run summaries
    "PIPELINE_HOME",  # worker scratch: training checkpoints a retried trial resumes from
)
MLFLOW_WIRING: tuple[str, ...] = (
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_HOST",
    "MLFLOW_PORT",
    "MLFLOW_WORKERS",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)

# Tuning for one small machine and a test that must notice a dead worker within a minute.
# Not policy: real deployments keep Airflow's defaults (300 s heartbeat timeout, ...).
LOCAL_TUNING: dict[str, str] = {
    "AIRFLOW__API__WORKERS": "1",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "20",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
}


def worker_hostname() -> str:
    """Airflow's ``[core] hostname_callable``: the worker's service name when set, else the machine's FQDN.

    Workers of one machine (this stack) or of one compose project are told apart by name, and the name
    resolves wherever the deployment gives services DNS names (compose service names).
    """
    return os.environ.get("PIPELINE_WORKER_HOSTNAME") or socket.getfqdn()


# ---------------------------------------------------------------------------------------------
# The stack's state (stack.json)


@dataclass
class StackState:
    home: str
    api_port: int
    mlflow_port: int
    s3_endpoint: str
    airflow_db: str
    mlflow_db: str
    redis_db: int
    secrets: dict[str, str]
    dags_folder: str
    dag_bundles: dict[str, str] = field(default_factory=dict)  # extra LocalDagBundles: name -> folder
    extra_env: dict[str, str] = field(default_factory=dict)  # passed to every Airflow process (e.g. PIPELINE_*)
    pids: dict[str, int] = field(default_factory=dict)
    s3_pid: int = 0
    gpu_pool_slots: int = 1

    @property
    def root(self) -> Path:
        return Path(self.home)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def save(self) -> None:
        path = self.root / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.chmod(0o600)  # holds generated credentials
        tmp.replace(path)

    @classmethod
    def load(cls, home: str | Path) -> StackState:
        path = Path(home).resolve() / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise StackError(f"no stack at {path.parent} (no {STATE_FILE}); start one with `stack.sh up`") from None

    def client_env(self) -> dict[str, str]:
        """What a client on this machine needs to reach MLflow and S3 (tests, notebooks)."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "PIPELINE_S3_ENDPOINT_URL": self.s3_endpoint,
        }

    def api(self) -> AirflowAPI:
        return AirflowAPI(self.api_url, ADMIN_USER, self.secrets["admin_password"])


def default_home() -> Path:
    return Path(os.environ.get("PIPELINE_HOME", ".local")).resolve() / "stack"


# ---------------------------------------------------------------------------------------------
# Environments


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _postgres_url(db: str, driver: str = "postgresql") -> str:
    return f"{driver}://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{db}"


def _base_env() -> dict[str, str]:
    """The caller's environment minus anything that would point a service at another deployment."""
    leaky = ("AIRFLOW", "MLFLOW_", "AWS_", "PIPELINE_", "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaky)}
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", "")])
    return env


def airflow_env(state: StackState) -> dict[str, str]:
    """Settings every Airflow process of this stack gets (policy + wiring + local tuning)."""
    bundles = [{"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}}]
    bundles += [
        {"name": name, "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {"path": path}}
        for name, path in state.dag_bundles.items()
    ]
    s = state.secrets
    env = {
        **AIRFLOW_POLICY,
        **LOCAL_TUNING,
        "AIRFLOW_HOME": str(state.root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": state.dags_folder,
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(state.logs / "tasks"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _postgres_url(state.airflow_db, "postgresql+psycopg2"),
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS[0]}:{REDIS[1]}/{state.redis_db}",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + _postgres_url(state.airflow_db, "postgresql+psycopg2"),
        "AIRFLOW__CORE__FERNET_KEY": s["fernet_key"],
        "AIRFLOW__API__SECRET_KEY": s["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt_secret"],
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(state.api_port),
        "AIRFLOW__API__BASE_URL": state.api_url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{state.api_url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(state.root / "secrets" / "passwords.json"),
        "GPU_POOL_SLOTS": str(state.gpu_pool_slots),
        "PIPELINE_AIRFLOW_ADMIN_PASSWORD": s["admin_password"],
        "AIRFLOW_CONN_AIRFLOW_API": json.dumps(
            {"conn_type": "http", "schema": "http", "host": "127.0.0.1", "port": state.api_port,
             "login": ADMIN_USER, "password": s["admin_password"]}
        ),  # fmt: skip
        # The pipeline's data lives in the stack's bucket; workers keep checkpoints under the stack folder.
        "PIPELINE_S3_BUCKET": BUCKET,
        "PIPELINE_DATA_URI": f"s3://{BUCKET}/clicks",
        "PIPELINE_OUTPUT_URI": f"s3://{BUCKET}/output",
        "PIPELINE_HOME": str(state.root / "pipeline"),
        "PIPELINE_MLFLOW_UI_URL": state.mlflow_url,
    }
    return env | state.client_env() | state.extra_env


def mlflow_env(state: StackState) -> dict[str, str]:
    return {
        **MLFLOW_POLICY,
        "MLFLOW_BACKEND_STORE_URI": _postgres_url(state.mlflow_db, "postgresql+psycopg2"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(state.mlflow_port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_S3_ENDPOINT_URL": state.s3_endpoint,
        "AWS_ACCESS_KEY_ID": state.secrets["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": state.secrets["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def service_env(state: StackState, service: Service) -> dict[str, str]:
    own = mlflow_env(state) if service.name == "mlflow" else airflow_env(state)
    return _base_env() | own | dict(service.env)


def _resolve(argv: Iterable[str]) -> list[str]:
    """Run the venv's own ``airflow``/``mlflow``/``python``, whatever PATH says."""
    argv = list(argv)
    if argv[0] == "python":
        argv[0] = sys.executable
    else:
        candidate = _venv_bin() / argv[0]
        argv[0] = str(candidate) if candidate.exists() else (shutil.which(argv[0]) or argv[0])
    return argv


# ---------------------------------------------------------------------------------------------
# Processes


def _spawn(state: StackState, service: Service) -> int:
    state.logs.mkdir(parents=True, exist_ok=True)
    with open(state.logs / f"{service.name}.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(service.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            _resolve(service.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=service_env(state, service),
            cwd=state.root,
            start_new_session=True,  # its own process group: a Ctrl-C in the caller's shell does not reach it
        )
    return proc.pid


def service(name: str) -> Service:
    for s in SERVICES:
        if s.name == name:
            return s
    raise StackError(f"unknown service {name!r}; services: {', '.join(SERVICE_NAMES)}")


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


def _http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.HTTPError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(state: StackState, name: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        pid = state.pids.get(name)
        if pid and not alive(pid):
            log = state.logs / f"{name}.log"
            raise StackError(f"{name} exited during start-up; see {log}:\n{_tail(log)}")
        time.sleep(1.0)
    log = state.logs / f"{name}.log"
    raise StackError(f"{name} not ready within {timeout:.0f}s; see {log}:\n{_tail(log)}")


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
    try:
        with urllib.request.urlopen(f"{state.api_url}/api/v2/monitor/health", timeout=3) as resp:
            data = json.load(resp)
    except (OSError, ValueError):
        return {}
    return {k: v.get("status", "?") for k, v in data.items() if isinstance(v, dict)}


def wait_ready(
    state: StackState, names: Iterable[str], timeout: float = 240.0, offsets: Mapping[str, int] | None = None
) -> None:
    """Wait until the named services answer: HTTP health for servers, heartbeats for Airflow jobs,
    Celery's ready line for workers (looked for past ``offsets[name]`` bytes of its log)."""
    deadline = time.monotonic() + timeout
    names = list(names)
    offsets = offsets or {}

    def left() -> float:
        return max(5.0, deadline - time.monotonic())

    for name in names:
        if name == "mlflow":
            _wait(state, name, lambda: _http_ok(f"{state.mlflow_url}/health"), left())
        elif name == "airflow-api-server":
            _wait(state, name, lambda: _http_ok(f"{state.api_url}/api/v2/monitor/health"), left())
        elif name in HEARTBEAT_JOBS:
            component = HEARTBEAT_JOBS[name]
            _wait(state, name, lambda c=component: airflow_health(state).get(c) == "healthy", left())
        else:
            _wait(state, name, lambda n=name: _worker_ready(state, n, offsets.get(n, 0)), left())


# ---------------------------------------------------------------------------------------------
# PostgreSQL databases and the Redis database number


def _pg_admin():
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
    conn.autocommit = True
    return conn


def _admin_execute(statements: Iterable[str]) -> None:
    """Run statements on the ``postgres`` maintenance database (an unreachable server is a clear StackError)."""
    try:
        conn = _pg_admin()
    except Exception as exc:
        raise StackError(f"cannot reach PostgreSQL at {POSTGRES['host']}:{POSTGRES['port']} as {POSTGRES['user']}: {exc}") from None
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def create_databases(names: Iterable[str]) -> None:
    _admin_execute(f'CREATE DATABASE "{name}"' for name in names)


def drop_databases(names: Iterable[str]) -> None:
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names)


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, uniquely named PostgreSQL database for the duration of the block (tests, throwaway stacks)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    create_databases([name])
    try:
        yield f"postgresql://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}"
    finally:
        drop_databases([name])


def _redis(db: int):
    import redis

    return redis.Redis(host=REDIS[0], port=REDIS[1], db=db, socket_timeout=5)


def _claim_redis_db(owner: str) -> int:
    """An empty Redis database number (1..15), claimed with a marker key so two stacks never share a broker."""
    try:
        count = int(_redis(0).config_get("databases").get("databases", 16))
    except Exception as exc:
        raise StackError(f"cannot reach Redis at {REDIS[0]}:{REDIS[1]}: {exc}") from None
    for db in range(1, count):
        r = _redis(db)
        if r.dbsize() == 0 and r.set(REDIS_CLAIM_KEY, owner, nx=True):
            return db
    raise StackError(f"no empty Redis database left on {REDIS[0]}:{REDIS[1]} (1..{count - 1} all in use)")


def _release_redis_db(db: int, owner: str) -> None:
    r = _redis(db)
    claimed = r.get(REDIS_CLAIM_KEY)
    if claimed is not None and claimed.decode() == owner:
        r.flushdb()  # only our own database: broker queues and the claim


# ---------------------------------------------------------------------------------------------
# init, up, down, status


def ensure_bucket(bucket: str) -> None:
    """Create the S3 bucket unless it exists (endpoint and credentials from the AWS_* environment)."""
    import boto3
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
        subprocess.run(_resolve(argv), check=True)
    if os.environ.get("PIPELINE_S3_BUCKET"):
        ensure_bucket(os.environ["PIPELINE_S3_BUCKET"])
    password = os.environ.get("PIPELINE_AIRFLOW_ADMIN_PASSWORD")
    passwords_file = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    if password and passwords_file:
        path = Path(passwords_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps({ADMIN_USER: password}))


def _free_port_block(size: int, start: int = 21000, stop: int = 40000) -> int:
    from pipeline.stack.s3server import _port_free

    for base in range(start + (os.getpid() % 50) * 13, stop - size, 31):
        if all(_port_free(base + i) for i in range(size)):
            return base
    raise StackError("no free block of ports on 127.0.0.1")


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
    from pipeline.stack import s3server

    root = Path(home).resolve() if home else default_home()
    if (root / STATE_FILE).exists():
        old = StackState.load(root)
        if any(alive(p) for p in [*old.pids.values(), old.s3_pid] if p):
            raise StackError(f"a stack is already running from {root}; run `stack.sh down` first")
        down(root)
    (root / "secrets").mkdir(parents=True, exist_ok=True)
    stack_id = uuid.uuid4().hex[:8]
    port = _free_port_block(2)
    state = StackState(
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
    state.save()
    try:
        create_databases([state.airflow_db, state.mlflow_db])
        state.redis_db = _claim_redis_db(str(root))
        state.save()
        s3 = s3server.start(
            root / "s3", access_key=state.secrets["s3_access_key"], secret_key=state.secrets["s3_secret_key"]
        )
        state.s3_pid, state.s3_endpoint = s3.pid, s3.endpoint_url
        state.save()
        # MLflow migrates its own database while Airflow's init runs.
        start_service(state, "mlflow")
        init_log = state.logs / "airflow-init.log"
        with open(init_log, "ab") as log:
            done = subprocess.run(
                _resolve(INIT_ARGV), stdout=log, stderr=subprocess.STDOUT, env=_base_env() | airflow_env(state), cwd=root
            )
        if done.returncode != 0:
            raise StackError(f"airflow-init failed (exit {done.returncode}); see {init_log}:\n{_tail(init_log)}")
        offsets = {}
        for s in SERVICES[1:]:
            log = state.logs / f"{s.name}.log"
            offsets[s.name] = log.stat().st_size if log.exists() else 0
            start_service(state, s.name)
        wait_ready(state, SERVICE_NAMES, timeout=timeout, offsets=offsets)
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
    from pipeline.stack import s3server

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
            _release_redis_db(state.redis_db, str(root))
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
            entry["health"] = "healthy" if _http_ok(f"{state.mlflow_url}/health") else "unreachable"
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------
# A small client for the Airflow REST API (/api/v2) with the simple auth manager's token


def _q(run_id: str) -> str:
    """Run ids hold ':' and '+': quote them for a URL path."""
    return urllib.parse.quote(run_id, safe="")


class AirflowAPI:
    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._token: str | None = None

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token()}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise StackError(f"Airflow API {method} {path}: HTTP {exc.code}: {detail}") from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            self._token = self._request("POST", "/auth/token", self._credentials, auth=False)["access_token"]
        return self._token

    def get(self, path: str, **params: Any) -> Any:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return self._request("GET", "/api/v2" + path + query)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", "/api/v2" + path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self._request("PATCH", "/api/v2" + path, body)

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict:
        """Wait until the dag processor has parsed ``dag_id`` (raises with its import errors if any)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.get(f"/dags/{dag_id}")
            except StackError as exc:
                if "HTTP 404" not in str(exc):
                    raise
            time.sleep(2)
        errors = self.get("/importErrors").get("import_errors", [])
        detail = "; ".join(f"{e['filename']}: {e['stack_trace'][-300:]}" for e in errors) or "no import errors recorded"
        raise StackError(f"DAG {dag_id} not parsed within {timeout:.0f}s ({detail})")

    def trigger(
        self, dag_id: str, logical_date: str | None, conf: Mapping[str, Any] | None = None, run_id: str | None = None
    ) -> dict:
        """Unpause ``dag_id`` and trigger a run for ``logical_date`` (ISO 8601 with a zone)."""
        self.patch(f"/dags/{dag_id}", {"is_paused": False})
        body: dict[str, Any] = {"logical_date": logical_date, "conf": dict(conf or {})}
        if run_id:
            body["dag_run_id"] = run_id
        return self.post(f"/dags/{dag_id}/dagRuns", body)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, poll: float = 3.0) -> dict:
        """Wait for a terminal state; raises with the failed task instances when it did not succeed in time."""
        deadline = time.monotonic() + timeout
        run: dict = {}
        while time.monotonic() < deadline:
            run = self.get(f"/dags/{dag_id}/dagRuns/{_q(run_id)}")
            if run["state"] in ("success", "failed"):
                break
            time.sleep(poll)
        if run.get("state") != "success":
            tis = self.task_instances(dag_id, run_id)
            summary = ", ".join(f"{t['task_id']}[{t['map_index']}]={t['state']}" for t in tis)
            raise StackError(
                f"run {run_id} of {dag_id} ended as {run.get('state')!r} after waiting up to {timeout:.0f}s: {summary}"
            )
        return run

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances", limit=1000)["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """One try's log as text (one event per line), as the UI shows it."""
        path = f"/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/logs/{try_number}"
        content = self.get(path, map_index=map_index, full_content="true")["content"]
        return "\n".join(line if isinstance(line, str) else str(line.get("event", "")) for line in content)

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict]:
        """Every try of one task instance (hostname, state, try_number of each)."""
        path = f"/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances/{task_id}"
        path += f"/{map_index}/tries" if map_index >= 0 else "/tries"
        return self.get(path)["task_instances"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local/stack.sh", description=__doc__.split("\n\n")[0])
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
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            init()
        elif args.command == "up":
            pairs = [kv.split("=", 1) for kv in args.bundle + args.env]
            if any(len(p) != 2 for p in pairs):
                parser.error("--bundle and --env take NAME=VALUE")
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
        elif args.command == "down":
            down(args.home)
        elif args.command == "status":
            return 0 if _print_status(status(args.home)) else 3
        elif args.command == "trigger":
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
        elif args.command == "env":
            state = StackState.load(args.home or default_home())
            for key, value in state.client_env().items():
                print(f"export {key}={value}")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
