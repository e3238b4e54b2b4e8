"""MLflow runs: where they go, the tags that name and find them, and the parent run of a DAG run.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (e.g. an ``mlflow server`` with PostgreSQL and S3 artifacts),
otherwise an embedded SQLite store ``$PIPELINE_HOME/mlflow.db`` with artifacts under
``$PIPELINE_HOME/mlartifacts`` (no server needed).

This module owns the tag names every other tracking module (and retention, alerts, the DAG tasks) reads, the
lookup of a run by its idempotency key (``pipeline.run_key``: a retried Airflow task finds its run again
instead of logging a duplicate), and the GX validation reports of a run's data, logged once per dataset.
What a training run records is :mod:`pipeline.tracking.training`; what composes a trial is
:mod:`pipeline.flow.trial`.

``mlflow`` is imported inside the functions that use it: it takes ~3 s to import, and the names and
``tracking_uri`` here are read by light commands (``pipeline status``) that may never touch MLflow.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__, storage
from pipeline.config import PipelineConfig, TrackingConfig, pipeline_home, to_dict
from pipeline.config import env as pipeline_env  # `env` names a variable here
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

# Tags and artifact paths other modules (registry, DAG tasks) rely on.
TAG_RUN_KEY = "pipeline.run_key"
TAG_RESUMED = "pipeline.resumed"  # set on a run continued after its worker died
TAG_KIND = "pipeline.kind"  # training | parent | promotion
TAG_MODEL_URI = "pipeline.model_uri"  # the run's logged pyfunc model (models:/m-...)
TAG_DATA_URI = "data.uri"
TAG_FINGERPRINT = "data.fingerprint"
TAG_VALIDATION = "data.validation"  # passed | failed | missing
# Where the validation reports and Data Docs of a run's data are: ``runs:/<parent>/validation`` for a trial (logged
# once per DAG run on its parent run), the run's own ``validation/`` otherwise.
TAG_VALIDATION_ARTIFACTS = "data.validation.artifacts"
TAG_VALIDATION_LOGGED = "pipeline.validation_logged"  # on a run holding them: the dataset fingerprint they are of
# MLflow's UI opens an experiment of this kind on its runs (not on the GenAI trace overview).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TAG_ITEM_SPACE = "model.item_space"  # fingerprint of the item index the model scores
RANKS_ARTIFACT = "evaluation/ranks.npz"  # per-prediction ranks on the test split (paired promotion test)
AIRFLOW_TAGS = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.dag_run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
    "AIRFLOW_CTX_LOGICAL_DATE": "airflow.logical_date",
}


# ---------------------------------------------------------------------------------------------
# Where runs go


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or the embedded SQLite store under ``$PIPELINE_HOME``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    home = pipeline_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact root for a new experiment: local for a local store; a tracking server decides on its own."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # the server's --artifacts-destination (proxied) or --default-artifact-root
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (pipeline_home() / "mlartifacts" / safe).as_uri()


def configure(tcfg: TrackingConfig) -> str:
    """Point MLflow at the tracking store and return the id of the pipeline's experiment (created if needed)."""
    import mlflow  # lazy: see the module docstring
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    # MLflow also exports the URI as MLFLOW_TRACKING_URI, so child processes (``mlflow models serve``)
    # use the same store. The registry follows the tracking URI unless MLFLOW_REGISTRY_URI is set.
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(tcfg.experiment)
    if exp is None:
        try:
            return client.create_experiment(
                tcfg.experiment,
                artifact_location=default_artifact_location(uri, tcfg.experiment),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException as exc:  # created by a concurrent task in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(tcfg.experiment)
            assert exp is not None
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(
            f"MLflow experiment {tcfg.experiment!r} is deleted in {uri}: restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or set tracking.experiment"
        )
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an earlier version: the UI would guess its kind
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# Names and tags


def git_commit() -> tuple[str | None, bool | None]:
    """The code version: ``PIPELINE_GIT_COMMIT`` (set in images without .git) or ``git rev-parse HEAD``."""
    env = pipeline_env().git_commit
    if env:
        return env, None
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(dirty)


def environment_tags() -> dict[str, str]:
    """Code version and, when running inside an Airflow task, the dag / run / task ids."""
    tags = {"pipeline.version": __version__}
    commit, dirty = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if dirty is not None:
        tags["pipeline.git_dirty"] = str(dirty).lower()
    for env, tag in AIRFLOW_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter (which has no escape sequences)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{value!r}: a value with both quote characters cannot be searched for in MLflow")


def find_run(
    client: MlflowClient, experiment_id: str, run_key: str, *, kind: str, finished_only: bool = True
) -> Run | None:
    """The newest run of the experiment of this ``kind`` tagged with ``run_key`` (only FINISHED ones by default)."""
    query = f"tags.`{TAG_RUN_KEY}` = {quote(run_key)} and tags.`{TAG_KIND}` = {quote(kind)}"
    if finished_only:
        query += " and attributes.status = 'FINISHED'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


# ---------------------------------------------------------------------------------------------
# Parent runs (one per DAG run)


def start_parent_run(
    cfg: PipelineConfig,
    run_key: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> str:
    """Create (or find again, for a retried task) the parent run that groups one DAG run's trials; with the
    dataset's ``manifest``, the validation reports and Data Docs of its data are logged on it (once)."""
    import mlflow  # lazy: see the module docstring

    experiment_id = configure(cfg.tracking)
    client = mlflow.MlflowClient()
    existing = find_run(client, experiment_id, run_key, kind="parent", finished_only=False)
    if existing is not None:
        run_id = existing.info.run_id
    else:
        run = client.create_run(
            experiment_id,
            run_name=run_name or f"pipeline-{run_key}",
            tags={TAG_KIND: "parent", TAG_RUN_KEY: run_key, **environment_tags(), **(tags or {})},
        )
        run_id = run.info.run_id
        client.log_dict(run_id, to_dict(cfg), "config.json")
    if manifest is not None:
        log_validation(client, run_id, manifest)
    return run_id


def log_validation(client: Any, run_id: str, manifest: Mapping[str, Any]) -> str:
    """Log the GX reports and Data Docs of the dataset's validated inputs on ``run_id`` unless it already holds
    those of this dataset (a DAG run's trials share them: ~17 MB a copy); tags the outcome. Returns it."""
    outcome, reports = _validation_reports(manifest)
    fingerprint = str(manifest.get("fingerprint", ""))
    run = client.get_run(run_id)
    if run.data.tags.get(TAG_VALIDATION_LOGGED) == fingerprint:
        return outcome
    with tempfile.TemporaryDirectory(prefix="validation-") as tmp:
        for i, (report_uri, docs_uri) in enumerate(reports):
            # One folder per validated partition (e.g. validation/dt=2024-05-01) when there are several.
            label = re.sub(r"[^A-Za-z0-9=._-]+", "_", storage.basename(storage.parent(report_uri))) or str(i)
            dest = f"validation/{label}" if len(reports) > 1 else "validation"
            local = Path(tmp) / f"{i}-{label}"
            local.mkdir(parents=True, exist_ok=True)
            (local / "report.json").write_bytes(storage.read_bytes(report_uri))
            client.log_artifact(run_id, str(local / "report.json"), dest)
            if docs_uri and storage.exists(docs_uri):
                _fetch_dir(docs_uri, local / "data_docs")
                client.log_artifacts(run_id, str(local / "data_docs"), f"{dest}/data_docs")
    client.set_tag(run_id, TAG_VALIDATION, outcome)
    client.set_tag(run_id, TAG_VALIDATION_LOGGED, fingerprint)
    return outcome


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark a run (e.g. a parent run) as ended."""
    import mlflow  # lazy: see the module docstring

    mlflow.MlflowClient().set_terminated(run_id, status)


# ---------------------------------------------------------------------------------------------
# A training run, as the flow hands it on


@dataclass
class TrackedRun:
    """A training run in MLflow: its id, the logged model and its final test metrics."""

    run_id: str
    experiment_id: str
    model_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    reused: bool = False  # True when an existing finished run with the same run key was returned

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "model_uri": self.model_uri,
            "metrics": self.metrics,
            "reused": self.reused,
        }


def tracked(run: Run, reused: bool) -> TrackedRun:
    """The :class:`TrackedRun` of a logged training run."""
    return TrackedRun(
        run.info.run_id,
        run.info.experiment_id,
        run.data.tags.get(TAG_MODEL_URI, ""),
        metrics=dict(run.data.metrics),
        reused=reused,
    )


def _validation_reports(manifest: Mapping[str, Any]) -> tuple[str, list[tuple[str, str | None]]]:
    """(passed | failed | missing, [(report uri, Data Docs folder uri)]) for the dataset's inputs.

    ``build`` records each input; a validated input is the ``clean/`` folder of a ``validate`` output,
    whose ``report.json`` and Data Docs sit beside it. An input without a report makes the outcome
    ``missing`` (raw data built without validation); any failing report makes it ``failed``.
    """
    # Lazy: the validation runner module is heavy (numpy, multiprocessing) and only needed when logging reports.
    from pipeline.data.validate import CLEAN, REPORT

    inputs = list(manifest.get("inputs") or [])
    outcome = "passed" if inputs else "missing"
    found: list[tuple[str, str | None]] = []
    for uri in inputs:
        folder = storage.parent(uri) if storage.basename(uri.rstrip("/")) == CLEAN else uri
        report_uri = storage.join(folder, REPORT)
        if not storage.exists(report_uri):
            outcome = "failed" if outcome == "failed" else "missing"
            continue
        report = storage.read_json(report_uri)
        if not report.get("success"):
            outcome = "failed"
        docs = report.get("data_docs")
        found.append((report_uri, storage.join(folder, docs.rsplit("/", 1)[0]) if docs else None))
    return outcome, found


def _fetch_dir(uri: str, local: Path) -> None:
    base = uri.rstrip("/")
    for file_uri in storage.list_files(uri):
        rel = file_uri[len(base) :].lstrip("/")
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(file_uri))
