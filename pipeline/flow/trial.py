"""One trial, one way through: read the dataset -> train -> evaluate -> log, as one MLflow training run.

This is the only place that composes the stages for a trial (the DAG's ``train_trial`` task and
``python -m pipeline track`` both call :func:`run_trial`): :mod:`pipeline.data.sessions` reads the dataset,
:mod:`pipeline.model.train` and :mod:`pipeline.model.evaluate` compute, and :mod:`pipeline.tracking.training`
records what they return. Data flows down into the stages and back up here; no stage calls another.

Idempotency: a trial started with ``run_key`` (e.g. ``"2024-05-01/trial-3"``) is looked up first; a finished
run with that key is reused, so a retried Airflow task never logs a duplicate, and an unfinished one is
continued (training resumes from the checkpoint in ``work_dir`` when one survived).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.data import sessions
from pipeline.model.clicks import log_from_table
from pipeline.model.evaluate import evaluate_model
from pipeline.model.train import train
from pipeline.tracking import runs, training
from pipeline.tracking.decision import parse_metric
from pipeline.tracking.runs import TrackedRun

SPLITS = ("train", "valid", "test")


def run_trial(
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
    experiment_id = runs.configure(cfg.tracking)
    reusable, resume_run_id = training.previous_run(experiment_id, run_key)
    if reusable is not None:
        return runs.tracked(reusable, reused=True)

    manifest = sessions.read_manifest(dataset_uri)
    fingerprint = str(manifest.get("fingerprint", ""))
    with tempfile.TemporaryDirectory(prefix="track-") as tmp_dir:
        tmp = Path(tmp_dir)
        model_dir = Path(work_dir) if work_dir else tmp / "model"
        with training.start_training_run(
            cfg,
            experiment_id,
            dataset_uri=dataset_uri,
            fingerprint=fingerprint,
            run_key=run_key,
            parent_run_id=parent_run_id,
            run_name=run_name,
            resume_run_id=resume_run_id,
        ) as run_id:
            training.log_config(cfg, manifest)
            splits = {name: sessions.read_split(dataset_uri, name) for name in SPLITS}
            training.log_inputs(splits, dataset_uri, fingerprint)
            items = sessions.read_split(dataset_uri, "items")
            item_map = training.log_item_map(items, tmp)
            training.link_validation(run_id, parent_run_id, manifest)
            history = _train(splits, _catalogue(items), dataset_uri, cfg, model_dir, device)
            _evaluate(model_dir, splits["test"], cfg, device, tmp, history)
            training.log_model(model_dir, item_map, tmp)
    return training.finished(run_id)


def _catalogue(items: pa.Table) -> pa.Array:
    """Item ids in item_idx order (the dataset's item index)."""
    table = items.select(["item_idx", "item_id"]).sort_by("item_idx")
    return table.column("item_id").cast(pa.string()).combine_chunks()


def _train(
    splits: Mapping[str, pa.Table],
    catalogue: pa.Array,
    dataset_uri: str,
    cfg: PipelineConfig,
    model_dir: Path,
    device: str,
) -> list[dict[str, float]]:
    """Train with per-epoch step metrics; returns the per-epoch history (for the curves plot)."""
    history: list[dict[str, float]] = []

    def on_epoch_end(epoch: int, metrics: Mapping[str, float]) -> None:
        history.append(training.log_epoch(epoch, metrics))

    base = dataset_uri.rstrip("/")
    # The dataset's item table fixes the item index, so the weights line up with the logged item map.
    train_log = log_from_table(splits["train"], f"{base}/train", catalogue, split="train")
    valid = splits["valid"]
    valid_log = log_from_table(valid, f"{base}/valid", split="valid") if valid.num_rows else None
    # The primary metric on valid (valid_mrr_at_20 ...) is what promotion selects trials on.
    valid_cutoffs = tuple(sorted({5, 20, parse_metric(cfg.tracking.primary_metric).cutoff}))
    result = train(
        train_log,
        cfg.gru4rec,
        model_dir,
        valid=valid_log,
        device=device,
        on_epoch_end=on_epoch_end,
        valid_cutoffs=valid_cutoffs,
    )
    training.log_training(result.metrics, device)
    return history


def _evaluate(
    model_dir: Path, test: pa.Table, cfg: PipelineConfig, device: str, tmp: Path, history: list[dict[str, float]]
) -> dict[str, float]:
    """Evaluate on the test split at the configured cutoffs (and the primary metric's) and log the result."""
    cutoffs = tuple(sorted({*cfg.eval.cutoffs, parse_metric(cfg.tracking.primary_metric).cutoff}))
    result = evaluate_model(model_dir, test, cutoffs=cutoffs, ties=cfg.eval.ties, device=device)
    return training.log_evaluation(
        result.metrics, result.target_rows, result.ranks, result.baseline_ranks, history, tmp
    )
