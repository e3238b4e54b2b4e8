"""The settings: one frozen dataclass per section, each checking its own values when it is built.

A section that is built is valid: ``__post_init__`` raises :class:`SettingError` naming every bad setting,
so a bad value fails when the config is loaded (``pipeline.config.load_config`` adds the file or ``--set``
it came from), not mid-run. The allowed values of a setting (input formats, tie modes ...) live here.
GRU4Rec parameters keep their published names so published settings carry over unchanged.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# The one metric-name scheme: pure, imports nothing of the pipeline (pyproject: the one allowed upward import).
from pipeline import metric_names
from pipeline.errors import ConfigError

# Allowed values, checked here and used by the stages (pipeline.data.ingest keeps the readers of each format).
INPUT_FORMATS = ("gru4rec", "rsc15", "diginetica", "csv", "parquet")
EVENT_COLUMNS = ("session_id", "item_id", "timestamp", "user_id", "event_type")  # pipeline.data.schema.EVENT_SCHEMA
TIMESTAMP_UNITS = ("s", "ms", "us")
LOSSES = ("cross-entropy", "bpr-max")
TIES = ("conservative", "standard", "median")
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision
NO_VALID_SPLIT_MODES = ("holm", "refuse")


class SettingError(ConfigError):
    """A bad value of one or more settings (``settings``: their names inside the section)."""

    def __init__(self, message: str, settings: tuple[str, ...]) -> None:
        super().__init__(message)
        self.settings = settings


def _fail(message: str, *settings: str) -> None:
    raise SettingError(message, settings)


def _iso_time(value: str, name: str) -> None:
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"validation.{name}: not an ISO-8601 time: {value!r}", name)


@dataclass(frozen=True)
class IngestConfig:
    """How raw click logs are read."""

    format: str | None = None  # None = detect; one of INPUT_FORMATS (see pipeline.data.ingest.FORMATS)
    session_gap_minutes: float = 30.0  # inactivity gap used to sessionize user-only logs
    column_map: dict[str, str] = field(default_factory=dict)  # canonical name -> source column (generic CSV/Parquet)
    delimiter: str | None = None  # generic CSV only; None = detect from the extension
    timestamp_unit: str = "s"  # numeric timestamps in generic CSV/Parquet: s | ms | us (since the unix epoch)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in INPUT_FORMATS:
            _fail(f"unknown input format {self.format!r}; known: {', '.join(INPUT_FORMATS)}", "format")
        unknown = sorted(set(self.column_map) - set(EVENT_COLUMNS))
        if unknown:
            _fail(f"ingest.column_map: unknown canonical column(s) {unknown}; known: {list(EVENT_COLUMNS)}", "column_map")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            _fail(
                f"ingest.timestamp_unit must be one of {list(TIMESTAMP_UNITS)}, got {self.timestamp_unit!r}",
                "timestamp_unit",
            )
        if not self.session_gap_minutes > 0:
            _fail("ingest.session_gap_minutes must be > 0", "session_gap_minutes")


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the Great Expectations suite."""

    timestamp_floor: str = "2000-01-01T00:00:00Z"  # no event may be older than this
    partition_end: str | None = None  # no event may be newer than this (the data interval end)
    max_quarantine_share: float = 0.01  # table-level failure above this share of bad rows
    min_rows: int = 1
    max_session_length: int = 200  # longer sessions are flagged as bot-like and quarantined
    # freshness: the newest event is at most this old at the partition's end (checked when the end is known:
    # a dt=YYYY-MM-DD folder or partition_end); None = off
    max_partition_age_days: float | None = 1.0
    check_session_order: bool | None = None  # None = the input format decides (Diginetica rows are unordered)
    workers: int = 0  # processes validating partitions in parallel; 0 = one per CPU (at most one per batch)

    def __post_init__(self) -> None:
        _iso_time(self.timestamp_floor, "timestamp_floor")
        if self.partition_end:
            _iso_time(self.partition_end, "partition_end")
        if not 0 <= self.max_quarantine_share <= 1:
            _fail("validation.max_quarantine_share must be in [0, 1]", "max_quarantine_share")
        if self.min_rows < 0 or self.max_session_length < 1:
            _fail(
                "validation.min_rows must be >= 0 and validation.max_session_length >= 1",
                "min_rows", "max_session_length",
            )  # fmt: skip
        if self.workers < 0:
            _fail("validation.workers must be >= 0 (0 = one per CPU, at most one per batch)", "workers")


@dataclass(frozen=True)
class BuildConfig:
    """Sessionize, filter and split into train / valid / test."""

    test_days: float = 1.0
    valid_days: float = 1.0
    min_session_length: int = 2  # 0 = off
    min_item_support: int = 5  # 0 = off
    drop_repeats: bool = False  # RSC15 keeps consecutive repeats
    # Working memory for the per-event data; a larger log is processed a bucket of sessions at a time with
    # the rest spilled to local disk (per-session state and one input file come on top, see docs/benchmarks.md).
    memory_budget_mb: int = 2048
    spill_dir: str = ""  # where spilled buckets go; "" = the system temporary folder ($TMPDIR)

    def __post_init__(self) -> None:
        if self.test_days < 0 or self.valid_days < 0:
            _fail("build.test_days and build.valid_days must be >= 0 (0 = no such split)", "test_days", "valid_days")
        if self.min_session_length < 0 or self.min_item_support < 0:
            _fail(
                "build.min_session_length and build.min_item_support must be >= 0 (0 = off)",
                "min_session_length", "min_item_support",
            )  # fmt: skip
        if self.memory_budget_mb < 1:
            _fail("build.memory_budget_mb must be >= 1 (megabytes of working memory for the build)", "memory_budget_mb")


@dataclass(frozen=True)
class GRU4RecConfig:
    """GRU4Rec hyperparameters under their published names (defaults: the RSC15 row of the paper)."""

    loss: str = "cross-entropy"  # cross-entropy | bpr-max
    layers: tuple[int, ...] = (100,)
    batch_size: int = 32
    learning_rate: float = 0.2
    momentum: float = 0.2
    n_sample: int = 2048
    sample_alpha: float = 0.5
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.4
    constrained_embedding: bool = True
    embedding: int = 0  # size of a separate input embedding; 0 = none (ignored when constrained)
    elu_param: float = 0.0
    bpreg: float = 0.0
    logq: float = 1.0
    n_epochs: int = 10
    seed: int = 42
    sample_cache_size: int = 10_000_000  # how many negative samples are pre-drawn at once
    # How the training step's matrix products compute (evaluation keeps float32). "medium": bfloat16 operands and
    # results on a CPU with native bfloat16 (AVX512-BF16; ~2x faster products, accuracy unchanged:
    # docs/benchmarks.md, pipeline/model/products.py) and TF32 on a recent NVIDIA GPU (torch's matmul precision,
    # set while the steps run); "highest": float32 everywhere.
    matmul_precision: str = "medium"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        problems: list[tuple[str, str]] = []
        if self.loss not in LOSSES:
            problems.append(("loss", f"loss must be cross-entropy or bpr-max, got {self.loss!r}"))
        if not self.layers or min(self.layers) < 1:
            problems.append(("layers", f"layers must be a non-empty list of positive sizes, got {list(self.layers)}"))
        if self.matmul_precision not in MATMUL_PRECISIONS:
            problems.append(("matmul_precision", f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, "
                                                 f"got {self.matmul_precision!r}"))
        for name in ("batch_size", "n_epochs", "sample_cache_size"):
            if getattr(self, name) < 1:
                problems.append((name, f"{name} must be >= 1, got {getattr(self, name)}"))
        for name in ("learning_rate", "momentum", "n_sample", "sample_alpha", "embedding", "elu_param", "bpreg", "logq"):
            if not getattr(self, name) >= 0:
                problems.append((name, f"{name} must be >= 0, got {getattr(self, name)}"))
        for name in ("dropout_p_embed", "dropout_p_hidden"):
            if not 0 <= getattr(self, name) < 1:
                problems.append((name, f"{name} is a drop probability in [0, 1), got {getattr(self, name)}"))
        if problems:
            _fail("gru4rec: " + "; ".join(text for _, text in problems), *(name for name, _ in problems))


@dataclass(frozen=True)
class EvalConfig:
    """Full-ranking evaluation (pipeline.model.evaluate); memory is bounded by ranking sessions in chunks."""

    cutoffs: tuple[int, ...] = (1, 5, 10, 20)
    ties: str = "conservative"  # conservative | standard | median

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            _fail(f"eval.ties: unknown ties mode {self.ties!r}; expected one of {', '.join(TIES)}", "ties")
        if not self.cutoffs or min(self.cutoffs) < 1:
            _fail(f"eval.cutoffs must be positive integers, got {list(self.cutoffs)}", "cutoffs")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking, registry and promotion rules.

    The tracking server comes from ``MLFLOW_TRACKING_URI``; without it runs go to an embedded SQLite store
    under ``$PIPELINE_HOME`` (see ``pipeline.tracking.runs.tracking_uri``).
    """

    experiment: str = "gru4rec-pipeline"
    registered_model: str = "gru4rec"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    primary_metric: str = "mrr_at_20"  # mrr_at_K or recall_at_K ("mrr@20" is accepted too)
    promotion_margin: float = 0.0  # candidate must beat the champion by at least this (absolute)
    significance: float = 0.05  # paired bootstrap p-value threshold
    # Without a validation split trials can only be told apart on test: "holm" tests every trial against
    # the champion with Holm-corrected p-values, "refuse" refuses decisions among several trials.
    no_valid_split: str = "holm"
    bootstrap_samples: int = 2000
    bootstrap_seed: int = 0
    require_validation: bool = True  # refuse candidates whose training data has no passing GX report
    system_metrics: bool = True  # CPU/memory (and GPU with nvidia-ml-py) sampled during training runs
    system_metrics_interval_s: float = 10.0
    lock_timeout_s: float = 900.0  # how long a promotion waits for a concurrent one to finish
    lock_stale_s: float = 3600.0  # a promotion lock older than this was left by a crashed process

    def __post_init__(self) -> None:
        if metric_names.parse(self.primary_metric) is None:
            _fail(
                f"tracking.primary_metric {self.primary_metric!r} is not one of mrr_at_K / recall_at_K (K >= 1)",
                "primary_metric",
            )
        if self.no_valid_split not in NO_VALID_SPLIT_MODES:
            _fail(
                f"tracking.no_valid_split must be one of {NO_VALID_SPLIT_MODES}, got {self.no_valid_split!r}",
                "no_valid_split",
            )
        if self.bootstrap_samples < 1:
            _fail(f"tracking.bootstrap_samples must be >= 1, got {self.bootstrap_samples}", "bootstrap_samples")


def _default_grid() -> dict[str, Any]:
    return {"learning_rate": [0.1, 0.2], "dropout_p_hidden": [0.2, 0.4]}


def grid_points(grid: Any) -> list[dict[str, Any]]:
    """The points of a grid: ``{param: [values]}`` (cartesian product) or ``[{param: value}, ...]``.

    Used for ``airflow.grid`` when the config is loaded and for a run's ``grid`` Param (pipeline.flow.plan).
    """
    if grid is None or grid == {} or grid == []:
        return [{}]
    if isinstance(grid, Mapping):
        names = list(grid)
        values = [v if isinstance(v, list | tuple) else [v] for v in grid.values()]
        if any(not v for v in values):
            raise ConfigError(f"grid: every parameter needs at least one value, got {dict(grid)!r}")
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]
    if isinstance(grid, list | tuple) and all(isinstance(p, Mapping) for p in grid):
        return [dict(p) for p in grid]
    raise ConfigError(f"grid: expected {{param: [values]}} or a list of {{param: value}}, got {grid!r}")


@dataclass(frozen=True)
class AirflowConfig:
    """The scheduled DAG (dags/gru4rec_daily.py): where data lives, GPU routing, retries, the search grid.

    Each run's Params (trigger form) can override the window, the grid and the promotion margin; those are
    checked when the run starts (pipeline.flow.tasks), as they are not known before.
    """

    dag_id: str = "gru4rec_daily"
    schedule: str | None = "@daily"  # cron expression or preset; None = manual runs only
    start_date: str = "2026-01-01"
    data_uri: str = ""  # click-log root with dt=YYYY-MM-DD/ partitions; "" = $PIPELINE_DATA_URI or $PIPELINE_HOME/data/clicks
    output_uri: str = ""  # validated partitions, datasets, models; "" = $PIPELINE_OUTPUT_URI or $PIPELINE_HOME/output
    train_days: int = 7  # rolling training window (days, ending at the run's date) incl. valid/test days
    queue: str = "gpu"  # Celery queue of the training tasks (a worker started with `-q gpu`)
    pool: str = "gpu"  # Airflow pool bounding how many trials share the GPU(s)
    retries: int = 2
    retry_delay_minutes: float = 2.0  # first retry; doubles each time up to max_retry_delay_minutes
    max_retry_delay_minutes: float = 30.0
    # Hyperparameter grid: a mapping of GRU4Rec parameter -> list of values (cartesian product), or a
    # list of mappings (one per trial). Applied on top of the gru4rec section.
    grid: Any = field(default_factory=_default_grid)
    api_conn_id: str = "airflow_api"  # Airflow connection to the REST API, used to set the DAG run note
    # Late data: the run's sensor waits for its day's partition (reschedule mode: no worker slot is held
    # between looks), then fails with "no partition dt=X after N h".
    partition_poke_minutes: float = 5.0  # how often the sensor looks for the partition
    partition_timeout_hours: float = 6.0  # how long it waits before failing the run
    partition_marker: str = ""  # completion marker that must be in the partition (e.g. "_SUCCESS"); "" = none

    def __post_init__(self) -> None:
        try:
            dt.datetime.fromisoformat(self.start_date)
        except ValueError:
            _fail(f"airflow.start_date: expected YYYY-MM-DD, got {self.start_date!r}", "start_date")
        if not self.partition_poke_minutes > 0 or not self.partition_timeout_hours > 0:
            _fail(
                "airflow.partition_poke_minutes and airflow.partition_timeout_hours must be > 0, got "
                f"{self.partition_poke_minutes} and {self.partition_timeout_hours}",
                "partition_poke_minutes", "partition_timeout_hours",
            )  # fmt: skip
        if "/" in self.partition_marker.strip().strip("/"):
            _fail(f"airflow.partition_marker must be a file name, got {self.partition_marker!r}", "partition_marker")


@dataclass(frozen=True)
class AlertsConfig:
    """Who is told, and when (pipeline/flow/alerts.py). No channel is configured by default: nothing is sent.

    Channels are Airflow connections: an SMTP connection (the SMTP provider's notifier) and an HTTP
    connection for a JSON webhook (Slack/Teams/PagerDuty-style endpoints).
    """

    email_to: tuple[str, ...] = ()  # recipients; empty = no e-mail
    email_from: str = ""  # sender; "" = the SMTP connection's from_email
    smtp_conn_id: str = "smtp_default"
    webhook_conn_id: str = ""  # Airflow HTTP connection of the JSON webhook; "" = no webhook
    deadline_hours: float = 6.0  # a DAG run not finished this long after it was queued alerts; 0 = off
    champion_stale_runs: int = 7  # alert when this many decisions in a row left the champion in place; 0 = off
    quarantine_warn_share: float = 0.005  # warn above this quarantined share of a day; 0 = off

    def __post_init__(self) -> None:
        bad = [
            name
            for name, ok in (
                ("deadline_hours", self.deadline_hours >= 0),
                ("champion_stale_runs", self.champion_stale_runs >= 0),
                ("quarantine_warn_share", 0 <= self.quarantine_warn_share <= 1),
            )
            if not ok
        ]
        if bad:
            _fail(
                "alerts: deadline_hours and champion_stale_runs must be >= 0 and quarantine_warn_share in [0, 1], "
                f"got {self.deadline_hours}, {self.champion_stale_runs}, {self.quarantine_warn_share}",
                *bad,
            )


@dataclass(frozen=True)
class RetentionConfig:
    """How long outputs are kept (pipeline/flow/retention.py), in days by the dt=YYYY-MM-DD of the output; 0 = forever.

    Whatever the current @champion / @challenger were built from is never deleted, whatever its age.
    """

    datasets_days: int = 14  # session datasets (datasets/dt=...)
    validated_days: int = 30  # validated partitions (validated/dt=...: report, clean rows, Data Docs)
    quarantine_days: int = 90  # quarantined rows (validated/dt=.../quarantine), kept longer for inspection
    models_days: int = 14  # trial model folders (models/dt=.../<data>/<trial>)
    scratch_days: int = 3  # training checkpoints on workers' local disk ($PIPELINE_HOME/work/...)

    def __post_init__(self) -> None:
        negative = [f.name for f in fields(self) if getattr(self, f.name) < 0]
        if negative:
            _fail(f"retention: {', '.join(negative)} must be >= 0 (0 = keep forever)", *negative)


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of the pipeline, one section per stage; logged whole to MLflow."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    gru4rec: GRU4RecConfig = field(default_factory=GRU4RecConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    airflow: AirflowConfig = field(default_factory=AirflowConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
