"""A running stack's state: ``stack.json`` in the stack folder (ports, pids, databases, generated credentials).

Written by ``up`` after every step (so ``down`` can clean up a half-started stack), read by every other command
and by the tests; mode 0600 because it holds the generated secrets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import env
from pipeline.errors import PipelineError
from pipeline.flow.airflow_api import AirflowAPI
from pipeline.stack.services import ADMIN_USER

STATE_FILE = "stack.json"


class StackError(PipelineError):
    """The local stack cannot start, or a service in it misbehaves (names the service and its log)."""


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
        """The REST API client of this stack's API server, as its admin."""
        return AirflowAPI(self.api_url, ADMIN_USER, self.secrets["admin_password"])

    def api_label(self) -> str:
        """Where the API client points, for status screens and errors."""
        return f"Airflow REST API {self.api_url} (stack {self.home})"


def default_home() -> Path:
    return env().home / "stack"
