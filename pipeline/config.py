"""One typed configuration for the whole pipeline.

Every stage reads its own frozen section; the whole object is logged to MLflow as-is.
Sources, in order of precedence: defaults here < a YAML/JSON file < ``--set section.name=value``.
GRU4Rec parameters keep their published names so published settings carry over unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class IngestConfig:
    """How raw click logs are read."""

    format: str | None = None  # None = detect; see pipeline.data.ingest.FORMATS
    session_gap_minutes: float = 30.0  # inactivity gap used to sessionize user-only logs
    column_map: dict[str, str] = field(default_factory=dict)  # canonical name -> source column (generic CSV/Parquet)
    delimiter: str | None = None  # generic CSV only; None = detect from the extension
    timestamp_unit: str = "s"  # numeric timestamps in generic CSV/Parquet: s | ms | us (since the unix epoch)


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        problems = []
        if self.loss not in ("cross-entropy", "bpr-max"):
            problems.append(f"loss must be cross-entropy or bpr-max, got {self.loss!r}")
        if not self.layers or min(self.layers) < 1:
            problems.append(f"layers must be a non-empty list of positive sizes, got {list(self.layers)}")
        for name in ("batch_size", "n_epochs", "sample_cache_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "momentum", "n_sample", "sample_alpha", "embedding", "elu_param", "bpreg", "logq"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout_p_embed", "dropout_p_hidden"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} is a drop probability in [0, 1), got {getattr(self, name)}")
        if problems:
            raise ConfigError("gru4rec: " + "; ".join(problems))


@dataclass(frozen=True)
class EvalConfig:
    """Full-ranking evaluation (pipeline.model.evaluate); memory is bounded by ranking sessions in chunks."""

    cutoffs: tuple[int, ...] = (1, 5, 10, 20)
    ties: str = "conservative"  # conservative | standard | median


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


def _default_grid() -> dict[str, Any]:
    return {"learning_rate": [0.1, 0.2], "dropout_p_hidden": [0.2, 0.4]}


@dataclass(frozen=True)
class AirflowConfig:
    """The scheduled DAG (dags/gru4rec_daily.py): where data lives, GPU routing, retries, the search grid.

    Each run's Params (trigger form) can override the window, the grid and the promotion margin.
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
        if self.deadline_hours < 0 or self.champion_stale_runs < 0 or not 0 <= self.quarantine_warn_share <= 1:
            raise ConfigError(
                "alerts: deadline_hours and champion_stale_runs must be >= 0 and quarantine_warn_share in [0, 1], "
                f"got {self.deadline_hours}, {self.champion_stale_runs}, {self.quarantine_warn_share}"
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
            raise ConfigError(f"retention: {', '.join(negative)} must be >= 0 (0 = keep forever)")


@dataclass(frozen=True)
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    gru4rec: GRU4RecConfig = field(default_factory=GRU4RecConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    airflow: AirflowConfig = field(default_factory=AirflowConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


def pipeline_home() -> Path:
    """Everything a local run writes goes under ``$PIPELINE_HOME`` (default ``./.local``)."""
    return Path(os.environ.get("PIPELINE_HOME", ".local")).resolve()


# ---------------------------------------------------------------------------------------------
# Building configs from mappings, files and --set overrides


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(v, args[0], where) for v in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            try:
                return int(str(value))
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def from_mapping(cls: type[T], mapping: dict[str, Any], where: str = "") -> T:
    """Build a (nested) config dataclass from a plain mapping, naming any unknown key or bad value."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in mapping.items():
        tp = hints[name]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a section (mapping), got {value!r}")
            kwargs[name] = from_mapping(tp, value, f"{where}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, tp, f"{where}{name}")
    return cls(**kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a mapping (an error names the file when it is not one)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of setting names to values")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "layers=[100,100]"]`` into a nested mapping; values are parsed as YAML scalars/lists."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects name=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """The pipeline config from defaults, an optional file and ``--set`` overrides."""
    mapping = read_config_file(path) if path else {}
    mapping = deep_merge(mapping, parse_overrides(overrides))
    return from_mapping(PipelineConfig, mapping)


def load_gru4rec_config(path: str | Path | None = None, overrides: list[str] | None = None) -> GRU4RecConfig:
    """GRU4Rec parameters from a flat file of published names (or a ``gru4rec:`` section) plus overrides."""
    mapping = read_config_file(path) if path else {}
    if "gru4rec" in mapping and isinstance(mapping["gru4rec"], dict):
        mapping = mapping["gru4rec"]
    flat = parse_overrides(overrides)
    flat = flat.get("gru4rec", {}) | {k: v for k, v in flat.items() if k != "gru4rec"}
    return from_mapping(GRU4RecConfig, deep_merge(mapping, flat), "gru4rec.")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of any config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
