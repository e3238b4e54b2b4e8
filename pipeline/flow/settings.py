"""Where a DAG run's inputs and outputs are, and the settings the DAG file reads while it is parsed.

The deployment's pipeline config (``$PIPELINE_CONFIG``), the data and output roots (Param > config file >
environment > ``$PIPELINE_HOME``), the layout of outputs by run date, and :class:`DagSettings` (schedule,
routing, retries, Param defaults). Only the standard library and the config are imported at module level:
the DAG file imports this module while it is parsed.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig, env, from_mapping, load_config, pipeline_home
from pipeline.data.partitions import WaitPolicy  # standard library and config only
from pipeline.errors import ConfigError, InputError, TrainingError, ValidationFailed
from pipeline.flow.contracts import RunPlan, Trial

CONFIG_ENV = "PIPELINE_CONFIG"  # set by the demo; read through pipeline.config.env() (the environment layer)


def load_pipeline_config() -> PipelineConfig:
    """The deployment's config: defaults < the file named by ``$PIPELINE_CONFIG``."""
    return load_config(env().config or None)


def config_of(run: RunPlan | Trial | Mapping[str, Any]) -> PipelineConfig:
    """The run's config snapshot (the plan task's), identical for every task of the run.

    Also takes the plan as its XCom dict (``pipeline.flow.retention`` gets it so).
    """
    snapshot = run["config"] if isinstance(run, Mapping) else run.config
    return from_mapping(PipelineConfig, dict(snapshot))


def _as_uri_root(value: str) -> str:
    """URIs stay as given; a relative local path is taken under ``$PIPELINE_HOME`` (absolute, so every
    worker resolves it the same way)."""
    if "://" in value:
        return value.rstrip("/")
    return str(pipeline_home().joinpath(value) if not os.path.isabs(value) else value).rstrip("/")


def data_root(cfg: PipelineConfig, override: str = "") -> str:
    """Where the click-log partitions live: Param > config file > ``$PIPELINE_DATA_URI`` > ``$PIPELINE_HOME``."""
    chosen = (
        override
        or cfg.airflow.data_uri
        or env().data_uri
        or str(pipeline_home() / "data" / "clicks")
    )
    return _as_uri_root(chosen)


def output_root(cfg: PipelineConfig, override: str = "") -> str:
    """Where outputs go: Param > config file > ``$PIPELINE_OUTPUT_URI`` > ``$PIPELINE_HOME/output``."""
    chosen = (
        override or cfg.airflow.output_uri or env().output_uri or str(pipeline_home() / "output")
    )
    return _as_uri_root(chosen)


def join(root: str, *parts: str) -> str:
    """Join URI/path segments with '/', which both local paths and ``s3://`` keys use."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def summary_uri(output_uri: str, day: str) -> str:
    """Where the summary task writes the run's decision, metrics and note (read by the demo and people)."""
    return join(output_uri, "runs", f"dt={day}", "summary.json")


def work_dir(models_uri: str) -> str:
    """Where a trial's checkpoints live: a retry on the same worker resumes from the last epoch.

    Checkpoints need a local directory; with an ``s3://`` output root they stay on the worker's disk.
    """
    if "://" not in models_uri:
        return models_uri
    return str(pipeline_home() / "work" / models_uri.split("://", 1)[1])


@dataclass(frozen=True)
class DagSettings:
    """What the DAG file needs at parse time (schedule, routing, retries, Param defaults)."""

    dag_id: str
    schedule: str | None
    start_date: dt.datetime
    retries: int
    retry_delay: dt.timedelta
    max_retry_delay: dt.timedelta
    queue: str
    pool: str
    train_days: int
    grid: Any
    promotion_margin: float
    partition_poke_interval: dt.timedelta  # the late-data sensor's look interval
    partition_sensor_timeout: dt.timedelta  # Airflow's own bound, past the timeout our pokes enforce

    @property
    def dataset_asset(self) -> tuple[str, str]:
        """(name, uri) of the Asset ``build`` emits. Stable across deployments: an Asset's URI may not
        change under its name, so the dataset's real location travels in each event's ``extra``."""
        return f"{self.dag_id}_session_dataset", f"gru4rec://{self.dag_id}/session_dataset"

    def timetable(self) -> Any:
        """Daily data intervals: a run with logical date D covers [D, D+1) and starts after D+1 00:00."""
        if self.schedule is None:
            return None
        from airflow.sdk import CronDataIntervalTimetable  # loaded by the DAG file already

        return CronDataIntervalTimetable(self.schedule, timezone="UTC")

    def retry_policy(self) -> Any:
        """Retry transient failures (network, worker loss); fail at once on errors a retry cannot fix."""
        from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule  # loaded by the DAG file already

        return ExceptionRetryPolicy(
            rules=[
                RetryRule(
                    exception=[ValidationFailed, ConfigError, InputError, TrainingError],
                    action=RetryAction.FAIL,
                    reason="bad data, settings or a diverging loss: retrying would fail the same way",
                )
            ]
        )


def dag_settings() -> DagSettings:
    """The DAG's settings from the deployment's pipeline config (``airflow:`` section)."""
    cfg = load_pipeline_config()
    af = cfg.airflow
    wait = WaitPolicy.from_config(af)
    start = dt.datetime.fromisoformat(af.start_date)  # checked when the config was loaded (AirflowConfig)
    return DagSettings(
        dag_id=af.dag_id,
        schedule=af.schedule,
        start_date=start if start.tzinfo else start.replace(tzinfo=dt.UTC),
        retries=af.retries,
        retry_delay=dt.timedelta(minutes=af.retry_delay_minutes),
        max_retry_delay=dt.timedelta(minutes=af.max_retry_delay_minutes),
        queue=af.queue,
        pool=af.pool,
        train_days=af.train_days,
        grid=af.grid,
        promotion_margin=cfg.tracking.promotion_margin,
        partition_poke_interval=dt.timedelta(seconds=wait.poke_interval_s),
        partition_sensor_timeout=dt.timedelta(seconds=wait.sensor_timeout_s),
    )
