"""One typed configuration for the whole pipeline, and the one environment layer.

- ``sections``: every setting, one frozen dataclass per stage, each checking its values when built.
- ``loading``: defaults < a YAML/JSON file < a GRU4Rec-only file < ``--set section.name=value``
  (``load_config``); errors name the setting and the file or --set it came from.
- ``environment``: the ``PIPELINE_*`` variables (``env()``), each documented.

The bottom layer: imports only ``pipeline.errors`` and the pure ``pipeline.metric_names`` scheme beside it.
The whole object is logged to MLflow as-is (``to_dict``).
"""

from pipeline.config.environment import VARIABLES, Environment, env, pipeline_home
from pipeline.config.loading import (
    deep_merge,
    from_mapping,
    load_config,
    parse_overrides,
    read_config_file,
    to_dict,
)
from pipeline.config.sections import (
    EVENT_COLUMNS,
    INPUT_FORMATS,
    LOSSES,
    NO_VALID_SPLIT_MODES,
    TIES,
    TIMESTAMP_UNITS,
    AirflowConfig,
    AlertsConfig,
    BuildConfig,
    EvalConfig,
    GRU4RecConfig,
    IngestConfig,
    PipelineConfig,
    RetentionConfig,
    SettingError,
    TrackingConfig,
    ValidationConfig,
    grid_points,
)

__all__ = [
    "EVENT_COLUMNS",
    "INPUT_FORMATS",
    "LOSSES",
    "NO_VALID_SPLIT_MODES",
    "TIES",
    "TIMESTAMP_UNITS",
    "VARIABLES",
    "AirflowConfig",
    "AlertsConfig",
    "BuildConfig",
    "Environment",
    "EvalConfig",
    "GRU4RecConfig",
    "IngestConfig",
    "PipelineConfig",
    "RetentionConfig",
    "SettingError",
    "TrackingConfig",
    "ValidationConfig",
    "deep_merge",
    "env",
    "from_mapping",
    "grid_points",
    "load_config",
    "parse_overrides",
    "pipeline_home",
    "read_config_file",
    "to_dict",
]
