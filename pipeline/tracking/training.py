"""What a training run records in MLflow: the pieces :mod:`pipeline.flow.trial` hands over, logged as given.

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

Nothing here reads a dataset, trains or evaluates: every function records what it is given, inside the run
:func:`start_training_run` opened.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.models import infer_signature

import pipeline
from pipeline import metric_names
from pipeline.config import PipelineConfig, to_dict
from pipeline.tracking import plots
from pipeline.tracking import pyfunc as mlflow_model
from pipeline.tracking.runs import (
    RANKS_ARTIFACT,
    TAG_DATA_URI,
    TAG_FINGERPRINT,
    TAG_ITEM_SPACE,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_RESUMED,
    TAG_RUN_KEY,
    TAG_VALIDATION,
    TAG_VALIDATION_ARTIFACTS,
    TrackedRun,
    environment_tags,
    find_run,
    log_validation,
    tracked,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger(__name__)

PLOT_CUTOFFS = 20  # Recall@K / MRR@K curves for K = 1..20
_BASELINE_LABELS = {"spop": "S-POP", "pop": "POP"}


# ---------------------------------------------------------------------------------------------
# Opening the run (idempotent on the run key)


def previous_run(experiment_id: str, run_key: str | None) -> tuple[Run | None, str | None]:
    """(a finished run with this key to reuse, or the id of an unfinished one to resume); (None, None) if new."""
    if not run_key:
        return None, None
    existing = find_run(mlflow.MlflowClient(), experiment_id, run_key, kind="training", finished_only=False)
    if existing is None:
        return None, None
    if existing.info.status == "FINISHED":
        log.info("run key %s already has finished run %s: reusing it", run_key, existing.info.run_id)
        return existing, None
    # A worker died (or the task failed) mid-run: continue that run instead of adding a duplicate;
    # training itself resumes from the checkpoint in work_dir when one survived.
    log.info("run key %s has unfinished run %s (%s): resuming it", run_key, existing.info.run_id, existing.info.status)
    return None, existing.info.run_id


@contextmanager
def start_training_run(
    cfg: PipelineConfig,
    experiment_id: str,
    *,
    dataset_uri: str,
    fingerprint: str,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """The active training run (new, or ``resume_run_id`` continued); yields its id and ends it on exit."""
    tags = {TAG_KIND: "training", TAG_DATA_URI: dataset_uri, TAG_FINGERPRINT: fingerprint, **environment_tags()}
    if run_key:
        tags[TAG_RUN_KEY] = run_key
    if cfg.tracking.system_metrics:
        mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval_s)
        mlflow.set_system_metrics_samples_before_logging(1)
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
        if resume_run_id is not None:
            mlflow.set_tags(tags | {TAG_RESUMED: "true"})
        log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, cfg.tracking.experiment, tracking_uri())
        yield run.info.run_id


def finished(run_id: str) -> TrackedRun:
    """The ended run with its final metrics."""
    return tracked(mlflow.MlflowClient().get_run(run_id), reused=False)


# ---------------------------------------------------------------------------------------------
# Configuration and data


def log_config(cfg: PipelineConfig, manifest: Mapping[str, Any]) -> None:
    """Hyperparameters and ``data.*`` as params; the whole config and the manifest as JSON artifacts."""
    mlflow.log_params(hyperparameters(cfg) | manifest_params(manifest))
    mlflow.log_dict(to_dict(cfg), "config.json")
    mlflow.log_dict(dict(manifest), "data/manifest.json")


def hyperparameters(cfg: PipelineConfig) -> dict[str, str]:
    """GRU4Rec settings under their published names plus ``eval.*``, as MLflow params (strings)."""
    params: dict[str, Any] = dict(to_dict(cfg.gru4rec))
    params |= {f"eval.{k}": v for k, v in to_dict(cfg.eval).items()}
    return {k: _param_value(v) for k, v in params.items()}


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)  # layers=100,100 reads better than "[100, 100]"
    return str(value)


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


def log_inputs(splits: Mapping[str, pa.Table], dataset_uri: str, fingerprint: str) -> None:
    """Record the three splits as dataset inputs (lineage in the run's Datasets panel).

    Metadata only (source, digest = dataset fingerprint, schema): the data is not copied into pandas, so a
    big training split costs nothing here; row counts are in the ``data.counts.*`` params.
    """
    contexts = {"train": "training", "valid": "validation", "test": "testing"}
    digest = fingerprint.split(":")[-1][:16]
    for split, table in splits.items():
        with warnings.catch_warnings():
            # Known MLflow noise: local paths match two identical source classes; int columns have no NaN here.
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            warnings.filterwarnings("ignore", message=".*Integer columns in Python cannot represent missing.*")
            # MLflow's MetaDataset leaves ``profile`` abstract in its stubs but is the documented metadata-only dataset.
            dataset = MetaDataset(  # type: ignore[abstract]
                resolve_dataset_source(f"{dataset_uri.rstrip('/')}/{split}"),
                name=f"sessions-{split}",
                digest=f"{digest}-{split}" if digest else None,
                schema=infer_signature(table.slice(0, 10).to_pandas()).inputs,
            )
            mlflow.log_input(dataset, context=contexts[split])


def log_item_map(items: pa.Table, tmp: Path) -> Path:
    """Log the dataset's item table as ``item_map/items.parquet`` and tag the item space; returns the local
    copy (it also travels with the pyfunc model)."""
    item_map = tmp / "item_map" / "items.parquet"
    item_map.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(items, item_map)
    mlflow.log_artifact(str(item_map), "item_map")
    mlflow.set_tag(TAG_ITEM_SPACE, item_space(item_map))
    return item_map


def item_space(item_map: Path) -> str:
    """Fingerprint of the item index (ids in item_idx order): equal only for models scoring the same items."""
    ids = pq.read_table(item_map, columns=["item_idx", "item_id"]).sort_by("item_idx").column("item_id")
    digest = hashlib.sha256()
    for item in ids.to_pylist():
        digest.update(str(item).encode())
        digest.update(b"\0")
    return f"{len(ids)}-{digest.hexdigest()[:16]}"


def link_validation(run_id: str, parent_run_id: str | None, manifest: Mapping[str, Any]) -> None:
    """Link the GX reports + Data Docs of the training data (logged once on the parent run when there is one,
    for every trial; else on this run) and tag the validation outcome."""
    holder = parent_run_id or run_id
    outcome = log_validation(mlflow.MlflowClient(), holder, manifest)
    mlflow.set_tags({TAG_VALIDATION: outcome, TAG_VALIDATION_ARTIFACTS: f"runs:/{holder}/validation"})


# ---------------------------------------------------------------------------------------------
# Training and test metrics


def log_epoch(epoch: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Log one epoch's metrics as step metrics; returns them under their logged names (for the curves plot)."""
    row = epoch_metrics(metrics)
    mlflow.log_metrics(row, step=epoch)
    return row


def epoch_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per-epoch metrics under stable names: ``train_loss``, ``valid_recall_at_20``, ``epoch_seconds`` ..."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out["train_loss" if key == "loss" else metric_names.to_key(key)] = float(value)
    return out


def log_training(train_metrics: Mapping[str, Any], device: str) -> None:
    """Training time and speed, the device it ran on and how its matrix products were computed."""
    mlflow.log_metrics(throughput_metrics(train_metrics))
    mlflow.set_tag("train.device", str(train_metrics.get("device", device)))
    if "matmul_math" in train_metrics:  # bfloat16 / tf32 / float32 (pipeline.model.step.matmul_math)
        mlflow.set_tag("train.matmul_math", str(train_metrics["matmul_math"]))


def throughput_metrics(train_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Training time and speed from ``train_metrics.json``."""
    keys = ("train_seconds", "train_events_per_second", "train_predictions_per_second", "epochs")
    return {k: float(train_metrics[k]) for k in keys if isinstance(train_metrics.get(k), int | float)}


def flatten_eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``evaluate`` JSON -> ``recall_at_20``, ``mrr_at_20``, ``baseline_spop_mrr_at_20``, ``test_n_predictions`` ..."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if metric_names.is_at_name(key) and isinstance(value, int | float):
            out[metric_names.to_key(key)] = float(value)
        elif key.startswith("n_") and isinstance(value, int | float):
            out[f"test_{key}"] = float(value)
    for name, values in (metrics.get("baselines") or {}).items():
        for key, value in values.items():
            if metric_names.is_at_name(key):
                out[f"baseline_{name}_{metric_names.to_key(key)}"] = float(value)
    return out


def log_evaluation(
    metrics: Mapping[str, Any],
    target_rows: Sequence[int] | np.ndarray,
    ranks: np.ndarray,
    baseline_ranks: Mapping[str, np.ndarray],
    history: Sequence[Mapping[str, float]],
    tmp: Path,
) -> dict[str, float]:
    """Test metrics (``evaluate``'s JSON as given), per-prediction ranks (for promotion) and the two plots."""
    flat = flatten_eval_metrics(metrics)
    mlflow.log_metrics(flat)
    mlflow.log_dict(dict(metrics), "evaluation/metrics.json")

    ranks_file = tmp / RANKS_ARTIFACT
    ranks_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ranks_file, target_rows=np.asarray(target_rows), ranks=np.asarray(ranks))
    mlflow.log_artifact(str(ranks_file), str(Path(RANKS_ARTIFACT).parent))

    curves = {"GRU4Rec": plots.cutoff_curves_from_ranks(ranks, PLOT_CUTOFFS)}
    for name, base in baseline_ranks.items():
        curves[_BASELINE_LABELS.get(name, name)] = plots.cutoff_curves_from_ranks(base, PLOT_CUTOFFS)
    mlflow.log_dict(curves, "evaluation/cutoff_curves.json")
    mlflow.log_artifact(str(plots.cutoff_curves(curves, tmp / "plots" / "recall_mrr_at_k.png")), "plots")
    if history:
        mlflow.log_artifact(str(plots.training_curves(list(history), tmp / "plots" / "training_curves.png")), "plots")
    return flat


# ---------------------------------------------------------------------------------------------
# The model


def log_model(model_dir: Path, item_map: Path, tmp: Path) -> str:
    """Log the pyfunc model (models-from-code) with the trained-model dir and item map as artifacts; tags the
    run with its URI and returns it."""
    # Ship the pipeline package with the model so serving needs only the pinned requirements.
    code = tmp / "code" / "pipeline"
    shutil.copytree(Path(pipeline.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    items = pq.read_table(item_map, columns=["item_id", "count"]).sort_by([("count", "descending")])
    example_ids = [str(i) for i in items.column("item_id").to_pylist()[:2]]
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(mlflow_model.__file__)),
        artifacts={"model_dir": str(model_dir), "item_map": str(item_map)},
        code_paths=[str(code)],
        signature=mlflow_model.signature(),
        input_example=mlflow_model.input_example(example_ids),
        pip_requirements=model_requirements(),
    )
    mlflow.set_tag(TAG_MODEL_URI, info.model_uri)
    return info.model_uri


def model_requirements() -> list[str]:
    """Pinned runtime requirements of the served model (no slow inference of imports)."""
    out = []
    for dist in ("mlflow", "torch", "numpy", "pandas", "pyarrow", "PyYAML"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out
