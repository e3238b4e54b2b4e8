"""The environment of each service of the local stack, and the venv's own executables.

Every Airflow process gets the shared policy (pipeline.stack.services), its wiring (this stack's databases,
broker, ports, secrets) and the local tuning; MLflow gets its own. The caller's environment is passed on
minus anything that would point a service at another deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from pipeline.stack.databases import REDIS, postgres_url
from pipeline.stack.services import ADMIN_USER, AIRFLOW_POLICY, BUCKET, LOCAL_TUNING, MLFLOW_POLICY, Service
from pipeline.stack.state import StackState


def venv_bin() -> Path:
    return Path(sys.executable).parent


def base_env() -> dict[str, str]:
    """The caller's environment minus anything that would point a service at another deployment."""
    leaky = ("AIRFLOW", "MLFLOW_", "AWS_", "PIPELINE_", "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaky)}
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
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
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_url(state.airflow_db, "postgresql+psycopg2"),
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS[0]}:{REDIS[1]}/{state.redis_db}",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres_url(state.airflow_db, "postgresql+psycopg2"),
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
        "MLFLOW_BACKEND_STORE_URI": postgres_url(state.mlflow_db, "postgresql+psycopg2"),
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
    return base_env() | own | dict(service.env)


def resolve(argv: Iterable[str]) -> list[str]:
    """Run the venv's own ``airflow``/``mlflow``/``python``, whatever PATH says."""
    argv = list(argv)
    if argv[0] == "python":
        argv[0] = sys.executable
    else:
        candidate = venv_bin() / argv[0]
        argv[0] = str(candidate) if candidate.exists() else (shutil.which(argv[0]) or argv[0])
    return argv
