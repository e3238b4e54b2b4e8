"""The ``prepare_trials`` and ``train`` (one mapped task per trial) tasks.

``prepare_trials`` opens (or finds again) the DAG run's MLflow parent run and turns the plan's trials into
:class:`Trial` inputs keyed by (date, data, trial); ``train`` trains, evaluates and logs one of them as a run
nested under the parent. torch and MLflow are imported inside the functions: the DAG file imports this
module while it is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pipeline import metric_names
from pipeline.config import PipelineConfig, env, from_mapping
from pipeline.flow.contracts import Dataset, RunPlan, Trial, TrialResult
from pipeline.flow.settings import config_of, join, work_dir

log = logging.getLogger(__name__)


def headline_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a person compares: Recall/MRR at every cutoff and the baselines' (not the per-epoch ones)."""
    return {k: float(v) for k, v in sorted(metrics.items()) if metric_names.is_ranking_key(k)}


def parent_run_key(run: RunPlan) -> str:
    """The MLflow parent run of a DAG run is keyed by (DAG, date): a re-run of the date finds it again."""
    return f"{run.dag_id}/{run.date}"


def prepare_trials(run: RunPlan, dataset: Dataset) -> list[Trial]:
    """Open (or find again) the DAG run's MLflow parent run and describe each trial for a mapped train task."""
    from pipeline.data import sessions  # pyarrow: not at DAG parse time
    from pipeline.tracking import runs as tracking  # MLflow: not at DAG parse time

    cfg = config_of(run)
    parent = tracking.start_parent_run(
        cfg,
        parent_run_key(run),
        run_name=f"{run.dag_id} {run.date}",
        tags={
            "data.uri": dataset.uri,
            "data.fingerprint": dataset.fingerprint,
            "pipeline.date": run.date,
        },
        # The day's validation reports and Data Docs, once for all trials.
        manifest=sessions.read_manifest(dataset.uri),
    )
    fingerprint = dataset.fingerprint[:12] or "nofp"
    return [
        Trial(
            name=trial.name,
            label=trial.label,
            params=trial.params,
            # (date, data, trial): a retry or a re-run finds the finished run instead of logging a duplicate.
            run_key=f"{run.dag_id}/{run.date}/{fingerprint}/{trial.key}",
            parent_run_id=parent,
            dataset_uri=dataset.uri,
            models_uri=join(run.models_uri, fingerprint, trial.key),
            date=run.date,
            config=run.config,
        )
        for trial in run.trials
    ]


def train_trial(trial: Trial) -> TrialResult:
    """Train, evaluate and log one trial as an MLflow run nested under the DAG run's parent run."""
    from pipeline.flow.trial import run_trial  # torch, pyarrow and MLflow: not at DAG parse time

    cfg = from_mapping(PipelineConfig, {**trial.config, "gru4rec": trial.params})
    device = env().device
    log.info("trial %s (%s) on %s: run key %s", trial.name, trial.label, device, trial.run_key)
    tracked = run_trial(
        trial.dataset_uri,
        cfg,
        run_key=trial.run_key,
        parent_run_id=trial.parent_run_id,
        run_name=f"{trial.date} {trial.name} ({trial.label})",
        device=device,
        work_dir=work_dir(trial.models_uri),
    )
    primary = cfg.tracking.primary_metric
    log.info(
        "trial %s: MLflow run %s%s, %s=%s",
        trial.name,
        tracked.run_id,
        " (reused)" if tracked.reused else "",
        primary,
        tracked.metrics.get(primary),
    )
    return TrialResult(
        name=trial.name,
        label=trial.label,
        run_id=tracked.run_id,
        experiment_id=tracked.experiment_id,
        parent_run_id=trial.parent_run_id,
        model_uri=tracked.model_uri,
        metrics=headline_metrics(tracked.metrics),
        reused=tracked.reused,
    )
