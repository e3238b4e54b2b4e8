"""MLflow tracking: one run per trained candidate, with everything needed to compare and trace it.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (e.g. an ``mlflow server`` with PostgreSQL and S3 artifacts),
otherwise an embedded SQLite store ``$PIPELINE_HOME/mlflow.db`` with artifacts under
``$PIPELINE_HOME/mlartifacts`` (no server needed).

A training run logs, under names that stay the same from run to run (so ``mlflow.search_runs`` and the UI's
run comparison line runs up without renaming):

* params: every GRU4Rec hyperparameter under its published name (``loss``, ``layers``, ``batch_size``,
  ``learning_rate`` ...), the evaluation settings (``eval.*``) and the dataset manifest (``data.*``);
* the train / valid / test splits as dataset inputs (``mlflow.log_input``, digest = dataset fingerprint);
* step metrics per epoch (``train_loss``, ``valid_recall_at_20``, ``valid_mrr_at_20`` ...), system metrics;
* final test metrics ``recall_at_K`` / ``mrr_at_K`` and the baselines ``baseline_pop_*`` / ``baseline_spop_*``,
  training throughput ``train_events_per_second``;
* tags: git commit, Airflow dag/run/task ids (from ``AIRFLOW_CTX_*``), dataset fingerprint and item space,
  GX validation outcome;
* artifacts: the pyfunc model (``pipeline.tracking.pyfunc``), the item map, the GX report and Data Docs of the
  training data, per-prediction test ranks (for the paired promotion test) and PNG plots.

Idempotency: a run started with ``run_key`` (e.g. ``"2024-05-01/trial-3"``) is looked up first; a finished
run with that key is reused, so a retried Airflow task never logs a duplicate.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import PipelineConfig, TrackingConfig, pipeline_home, to_dict
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
PLOT_CUTOFFS = 20  # Recall@K / MRR@K curves for K = 1..20


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
    import mlflow
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


def metric_key(name: str) -> str:
    """A stable MLflow metric name: ``recall@20`` -> ``recall_at_20``; other odd characters become ``_``."""
    key = name.strip().replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", key)


def hyperparameters(cfg: PipelineConfig) -> dict[str, str]:
    """GRU4Rec settings under their published names plus ``eval.*``, as MLflow params (strings)."""
    params: dict[str, Any] = dict(to_dict(cfg.gru4rec))
    params |= {f"eval.{k}": v for k, v in to_dict(cfg.eval).items()}
    return {k: _param_value(v) for k, v in params.items()}


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)  # layers=100,100 reads better than "[100, 100]"
    return str(value)


def git_commit() -> tuple[str | None, bool | None]:
    """The code version: ``PIPELINE_GIT_COMMIT`` (set in images without .git) or ``git rev-parse HEAD``."""
    env = os.environ.get("PIPELINE_GIT_COMMIT")
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
    from pipeline import __version__

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
    dataset_uri: str | None = None,
) -> str:
    """Create (or find again, for a retried task) the parent run that groups one DAG run's trials; with
    ``dataset_uri``, the validation reports and Data Docs of its data are logged on it (once)."""
    import mlflow

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
    if dataset_uri is not None:
        from pipeline.data import sessions

        log_validation(client, run_id, sessions.read_manifest(dataset_uri))
    return run_id


def log_validation(client: Any, run_id: str, manifest: Mapping[str, Any]) -> str:
    """Log the GX reports and Data Docs of the dataset's validated inputs on ``run_id`` unless it already holds
    those of this dataset (a DAG run's trials share them: ~17 MB a copy); tags the outcome. Returns it."""
    from pipeline import storage

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
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status)


# ---------------------------------------------------------------------------------------------
# Training runs


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


def track_training(
    dataset_uri: str,
    cfg: PipelineConfig,
    *,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    device: str = "auto",
    work_dir: str | Path | None = None,
) -> TrackedRun:
    """Train GRU4Rec on a session dataset, evaluate it on its test split and log everything to MLflow."""
    import mlflow

    experiment_id = configure(cfg.tracking)
    client = mlflow.MlflowClient()
    resume_run_id: str | None = None
    if run_key:
        existing = find_run(client, experiment_id, run_key, kind="training", finished_only=False)
        if existing is not None and existing.info.status == "FINISHED":
            log.info("run key %s already has finished run %s: reusing it", run_key, existing.info.run_id)
            return _tracked(existing, reused=True)
        if existing is not None:
            # A worker died (or the task failed) mid-run: continue that run instead of adding a duplicate;
            # training itself resumes from the checkpoint in work_dir when one survived.
            resume_run_id = existing.info.run_id
            log.info("run key %s has unfinished run %s (%s): resuming it", run_key, resume_run_id, existing.info.status)

    from pipeline.data import sessions

    manifest = sessions.read_manifest(dataset_uri)
    fingerprint = str(manifest.get("fingerprint", ""))
    tags = {
        TAG_KIND: "training",
        TAG_DATA_URI: dataset_uri,
        TAG_FINGERPRINT: fingerprint,
        **environment_tags(),
    }
    if run_key:
        tags[TAG_RUN_KEY] = run_key
    if cfg.tracking.system_metrics:
        mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval_s)
        mlflow.set_system_metrics_samples_before_logging(1)

    with tempfile.TemporaryDirectory(prefix="track-") as tmp:
        out_dir = Path(work_dir) if work_dir else Path(tmp) / "model"
        if resume_run_id is not None:
            started = mlflow.start_run(run_id=resume_run_id, log_system_metrics=cfg.tracking.system_metrics)
        else:
            started = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=run_name or (f"train-{run_key}" if run_key else None),
                parent_run_id=parent_run_id,
                nested=parent_run_id is not None,
                tags=tags,
                log_system_metrics=cfg.tracking.system_metrics,
            )
        with started as run:
            run_id = run.info.run_id
            if resume_run_id is not None:
                mlflow.set_tags(tags | {TAG_RESUMED: "true"})
            log.info("MLflow run %s in experiment %s (%s)", run_id, cfg.tracking.experiment, tracking_uri())
            _log_config(cfg, manifest)
            splits = {name: sessions.read_split(dataset_uri, name) for name in ("train", "valid", "test")}
            _log_inputs(splits, dataset_uri, fingerprint)
            item_map = _log_data_artifacts(dataset_uri, manifest, Path(tmp), run_id, parent_run_id)
            history = _train(splits, _catalogue(item_map), dataset_uri, cfg, out_dir, device)
            _evaluate(out_dir, splits["test"], cfg, device, Path(tmp), history)
            model_uri = _log_model(out_dir, item_map, Path(tmp))
            mlflow.set_tag(TAG_MODEL_URI, model_uri)
    final = client.get_run(run_id)
    return TrackedRun(run_id, experiment_id, model_uri, metrics=dict(final.data.metrics))


def _tracked(run: Run, reused: bool) -> TrackedRun:
    return TrackedRun(
        run.info.run_id,
        run.info.experiment_id,
        run.data.tags.get(TAG_MODEL_URI, ""),
        metrics=dict(run.data.metrics),
        reused=reused,
    )


# ---------------------------------------------------------------------------------------------
# The pieces of a training run (each called inside the active run)


def _log_config(cfg: PipelineConfig, manifest: Mapping[str, Any]) -> None:
    import mlflow

    params = hyperparameters(cfg) | manifest_params(manifest)
    mlflow.log_params(params)
    mlflow.log_dict(to_dict(cfg), "config.json")
    mlflow.log_dict(dict(manifest), "data/manifest.json")


def manifest_params(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The dataset manifest's identity, counts and time ranges as ``data.*`` params (nested keys dotted)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif not isinstance(value, list | tuple):
            out[prefix] = str(value)[:500]

    for key in ("fingerprint", "schema_version", "counts", "time_ranges", "split_times", "pipeline_version"):
        if key in manifest:
            walk(f"data.{key}", manifest[key])
    return out


def _log_inputs(splits: Mapping[str, Any], dataset_uri: str, fingerprint: str) -> None:
    """Record the three splits as dataset inputs (lineage in the run's Datasets panel).

    Metadata only (source, digest = dataset fingerprint, schema): the data is not copied into pandas, so a
    big training split costs nothing here; row counts are in the ``data.counts.*`` params.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.models import infer_signature

    contexts = {"train": "training", "valid": "validation", "test": "testing"}
    digest = fingerprint.split(":")[-1][:16]
    for split, table in splits.items():
        with warnings.catch_warnings():
            # Known MLflow noise: local paths match two identical source classes; int columns have no NaN here.
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            warnings.filterwarnings("ignore", message=".*Integer columns in Python cannot represent missing.*")
            dataset = MetaDataset(
                resolve_dataset_source(f"{dataset_uri.rstrip('/')}/{split}"),
                name=f"sessions-{split}",
                digest=f"{digest}-{split}" if digest else None,
                schema=infer_signature(table.slice(0, 10).to_pandas()).inputs,
            )
            mlflow.log_input(dataset, context=contexts[split])


def _log_data_artifacts(
    dataset_uri: str, manifest: Mapping[str, Any], tmp: Path, run_id: str, parent_run_id: str | None
) -> Path:
    """Log the item map; link the GX reports + Data Docs of the training data (on the parent run when there is
    one, logged there once for every trial; else on this run) and tag the validation outcome.

    Returns the local copy of the item map (it also travels with the pyfunc model).
    """
    import mlflow
    import pyarrow.parquet as pq

    from pipeline.data.sessions import read_split

    item_map = tmp / "item_map" / "items.parquet"
    item_map.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(read_split(dataset_uri, "items"), item_map)
    mlflow.log_artifact(str(item_map), "item_map")
    mlflow.set_tag(TAG_ITEM_SPACE, item_space(item_map))
    holder = parent_run_id or run_id
    outcome = log_validation(mlflow.MlflowClient(), holder, manifest)
    mlflow.set_tags({TAG_VALIDATION: outcome, TAG_VALIDATION_ARTIFACTS: f"runs:/{holder}/validation"})
    return item_map


def _catalogue(item_map: Path) -> Any:
    """Item ids in item_idx order (the dataset's item index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(item_map, columns=["item_idx", "item_id"]).sort_by("item_idx")
    return table.column("item_id").cast(pa.string()).combine_chunks()


def item_space(item_map: Path) -> str:
    """Fingerprint of the item index (ids in item_idx order): equal only for models scoring the same items."""
    import hashlib

    import pyarrow.parquet as pq

    ids = pq.read_table(item_map, columns=["item_idx", "item_id"]).sort_by("item_idx").column("item_id")
    digest = hashlib.sha256()
    for item in ids.to_pylist():
        digest.update(str(item).encode())
        digest.update(b"\0")
    return f"{len(ids)}-{digest.hexdigest()[:16]}"


def _validation_reports(manifest: Mapping[str, Any]) -> tuple[str, list[tuple[str, str | None]]]:
    """(passed | failed | missing, [(report uri, Data Docs folder uri)]) for the dataset's inputs.

    ``build`` records each input; a validated input is the ``clean/`` folder of a ``validate`` output,
    whose ``report.json`` and Data Docs sit beside it. An input without a report makes the outcome
    ``missing`` (raw data built without validation); any failing report makes it ``failed``.
    """
    from pipeline import storage
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
    from pipeline import storage

    base = uri.rstrip("/")
    for file_uri in storage.list_files(uri):
        rel = file_uri[len(base) :].lstrip("/")
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(file_uri))


def _train(
    splits: Mapping[str, Any], catalogue: Any, dataset_uri: str, cfg: PipelineConfig, out_dir: Path, device: str
) -> list[dict[str, float]]:
    """Train with per-epoch step metrics; returns the per-epoch history (for the curves plot)."""
    import mlflow

    from pipeline.model.evaluate import log_from_table
    from pipeline.model.train import train
    from pipeline.tracking.decision import parse_metric

    history: list[dict[str, float]] = []

    def on_epoch_end(epoch: int, metrics: Mapping[str, float]) -> None:
        row = epoch_metrics(metrics)
        history.append(row)
        mlflow.log_metrics(row, step=epoch)

    base = dataset_uri.rstrip("/")
    # The dataset's item table fixes the item index, so the weights line up with the logged item map.
    train_log = log_from_table(splits["train"], f"{base}/train", catalogue, split="train")
    valid = splits["valid"]
    valid_log = log_from_table(valid, f"{base}/valid", split="valid") if valid.num_rows else None
    # The primary metric on valid (valid_mrr_at_20 ...) is what promotion selects trials on.
    valid_cutoffs = tuple(sorted({5, 20, parse_metric(cfg.tracking.primary_metric).cutoff}))
    result = train(
        train_log, cfg.gru4rec, out_dir, valid=valid_log, device=device, on_epoch_end=on_epoch_end, valid_cutoffs=valid_cutoffs
    )
    mlflow.log_metrics(throughput_metrics(result.metrics))
    mlflow.set_tag("train.device", str(result.metrics.get("device", device)))
    return history


def epoch_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per-epoch metrics under stable names: ``train_loss``, ``valid_recall_at_20``, ``epoch_seconds`` ..."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out["train_loss" if key == "loss" else metric_key(key)] = float(value)
    return out


def throughput_metrics(train_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Training time and speed from ``train_metrics.json``."""
    keys = ("train_seconds", "train_events_per_second", "train_predictions_per_second", "epochs")
    return {k: float(train_metrics[k]) for k in keys if isinstance(train_metrics.get(k), int | float)}


def flatten_eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``evaluate`` JSON -> ``recall_at_20``, ``mrr_at_20``, ``baseline_spop_mrr_at_20``, ``test_n_predictions`` ..."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if "@" in key and isinstance(value, int | float):
            out[metric_key(key)] = float(value)
        elif key.startswith("n_") and isinstance(value, int | float):
            out[f"test_{key}"] = float(value)
    for name, values in (metrics.get("baselines") or {}).items():
        for key, value in values.items():
            if "@" in key:
                out[f"baseline_{name}_{metric_key(key)}"] = float(value)
    return out


def _evaluate(
    out_dir: Path, test: Any, cfg: PipelineConfig, device: str, tmp: Path, history: list[dict[str, float]]
) -> dict[str, float]:
    """Test metrics, per-prediction ranks (for promotion) and the two plots."""
    import mlflow
    import numpy as np

    from pipeline.model.evaluate import evaluate_model
    from pipeline.tracking import plots
    from pipeline.tracking.decision import parse_metric

    cutoffs = tuple(sorted({*cfg.eval.cutoffs, parse_metric(cfg.tracking.primary_metric).cutoff}))
    result = evaluate_model(out_dir, test, cutoffs=cutoffs, ties=cfg.eval.ties, device=device)
    metrics = flatten_eval_metrics(result.metrics)
    mlflow.log_metrics(metrics)
    mlflow.log_dict(result.metrics, "evaluation/metrics.json")

    ranks_file = tmp / RANKS_ARTIFACT
    ranks_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ranks_file, target_rows=np.asarray(result.target_rows), ranks=np.asarray(result.ranks))
    mlflow.log_artifact(str(ranks_file), str(Path(RANKS_ARTIFACT).parent))

    curves = {"GRU4Rec": plots.cutoff_curves_from_ranks(result.ranks, PLOT_CUTOFFS)}
    labels = {"spop": "S-POP", "pop": "POP"}
    for name, ranks in (getattr(result, "baseline_ranks", None) or {}).items():
        curves[labels.get(name, name)] = plots.cutoff_curves_from_ranks(ranks, PLOT_CUTOFFS)
    mlflow.log_dict(curves, "evaluation/cutoff_curves.json")
    mlflow.log_artifact(str(plots.cutoff_curves(curves, tmp / "plots" / "recall_mrr_at_k.png")), "plots")
    if history:
        mlflow.log_artifact(str(plots.training_curves(history, tmp / "plots" / "training_curves.png")), "plots")
    return metrics


def _log_model(out_dir: Path, item_map: Path, tmp: Path) -> str:
    """Log the pyfunc model (models-from-code) with the trained-model dir and item map as artifacts."""
    import shutil

    import mlflow
    import pyarrow.parquet as pq

    import pipeline
    from pipeline.tracking import pyfunc as mlflow_model

    # Ship the pipeline package with the model so serving needs only the pinned requirements.
    code = tmp / "code" / "pipeline"
    shutil.copytree(Path(pipeline.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    items = pq.read_table(item_map, columns=["item_id", "count"]).sort_by([("count", "descending")])
    example_ids = [str(i) for i in items.column("item_id").to_pylist()[:2]]
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(mlflow_model.__file__)),
        artifacts={"model_dir": str(out_dir), "item_map": str(item_map)},
        code_paths=[str(code)],
        signature=mlflow_model.signature(),
        input_example=mlflow_model.input_example(example_ids),
        pip_requirements=model_requirements(),
    )
    return info.model_uri


def model_requirements() -> list[str]:
    """Pinned runtime requirements of the served model (no slow inference of imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "torch", "numpy", "pandas", "pyarrow", "PyYAML"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out
