"""What the deployment runs: the services, their commands, and the settings every deployment shares.

The single source of truth for the images: ``SERVICES`` is what the compose services and the Helm values run,
``*_POLICY`` the values every deployment sets alike, ``*_WIRING`` the names each deployment sets to its own
addresses and secrets (tests/stack/test_deploy_files.py compares them with ``docker/`` and ``infra/``).
``LOCAL_TUNING`` is for the process stack on one small machine only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

BUCKET = "pipeline"
GPU_POOL = "gpu"
GPU_POOL_DESCRIPTION = "GPU slots: how many training trials may share the GPU workers at once"
ADMIN_USER = "admin"


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
