"""The one typed config: defaults, files, --set overrides and clear errors."""

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.config import (
    EVENT_COLUMNS,
    INPUT_FORMATS,
    LOSSES,
    TIES,
    TIMESTAMP_UNITS,
    VARIABLES,
    Environment,
    GRU4RecConfig,
    PipelineConfig,
    env,
    load_config,
    pipeline_home,
    to_dict,
)
from pipeline.errors import ConfigError


def test_defaults_are_the_rsc15_row():
    cfg = GRU4RecConfig()
    assert (cfg.loss, cfg.layers, cfg.batch_size, cfg.learning_rate, cfg.momentum) == ("cross-entropy", (100,), 32, 0.2, 0.2)
    assert (cfg.dropout_p_embed, cfg.dropout_p_hidden, cfg.sample_alpha, cfg.logq, cfg.n_sample) == (0.0, 0.4, 0.5, 1.0, 2048)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "retailrocket.yaml"
    path.write_text("loss: bpr-max\nlayers: [224]\nbatch_size: 80\nelu_param: 0.5\nbpreg: 1.95\nlogq: 0\n")
    cfg = load_config(None, ["gru4rec.n_epochs=3", "gru4rec.layers=[64, 32]"], gru4rec_file=path).gru4rec
    assert cfg.loss == "bpr-max" and cfg.layers == (64, 32) and cfg.n_epochs == 3 and cfg.bpreg == 1.95


def test_json_pipeline_config_with_sections(tmp_path):
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"build": {"test_days": 2}, "gru4rec": {"batch_size": 64}}))
    cfg = load_config(path, ["tracking.registered_model=my-model", "build.drop_repeats=true"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.build.test_days == 2.0 and cfg.build.drop_repeats is True
    assert cfg.gru4rec.batch_size == 64 and cfg.tracking.registered_model == "my-model"
    assert to_dict(cfg)["gru4rec"]["layers"] == [100]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gru4rec.batch_sise=3"], "gru4rec.batch_sise"),
        (["gru4rec.batch_size=many"], "gru4rec.batch_size: expected an integer"),
        (["build.drop_repeats=perhaps"], "build.drop_repeats: expected true/false"),
        (["nonsense"], "--set expects name=value"),
    ],
)
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_file_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(gru4rec_file=path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(gru4rec_file=tmp_path / "missing.yaml")


def test_a_bad_value_names_the_setting_and_where_it_came_from(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("build:\n  test_days: -1\ntracking:\n  primary_metric: ndcg@20\n")
    with pytest.raises(ConfigError, match=r"build.test_days and build.valid_days must be >= 0.*\(from config file .*pipeline.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"tracking.primary_metric 'ndcg@20'.*\(from --set tracking.primary_metric=ndcg@20\)"):
        load_config(None, ["tracking.primary_metric=ndcg@20"])
    with pytest.raises(ConfigError, match=r"unknown input format 'excel'.*\(from --set ingest.format=excel\)"):
        load_config(None, ["ingest.format=excel"])
    with pytest.raises(ConfigError, match=r"airflow.start_date: expected YYYY-MM-DD.*\(from --set airflow.start_date=soon\)"):
        load_config(None, ["airflow.start_date=soon"])
    with pytest.raises(ConfigError, match=r"eval.ties: unknown ties mode 'optimistic'"):
        load_config(None, ["eval.ties=optimistic"])
    # --set wins over the file: the bad file value is replaced, nothing raised
    assert load_config(path, ["build.test_days=2", "tracking.primary_metric=recall@10"]).build.test_days == 2.0


def test_gru4rec_only_file_sits_between_the_config_and_set(tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("gru4rec:\n  layers: [50]\n  batch_size: 16\n  seed: 3\n")
    rr = tmp_path / "retailrocket.yaml"
    rr.write_text("loss: bpr-max\nlayers: [224]\nbatch_size: 80\n")
    cfg = load_config(pipeline, ["gru4rec.batch_size=4"], gru4rec_file=rr)
    assert (cfg.gru4rec.loss, cfg.gru4rec.layers, cfg.gru4rec.batch_size, cfg.gru4rec.seed) == ("bpr-max", (224,), 4, 3)
    rr.write_text("dropout_p_hidden: 2\n")
    with pytest.raises(ConfigError, match=r"drop probability.*\(from GRU4Rec file .*retailrocket.yaml\)"):
        load_config(pipeline, gru4rec_file=rr)


def test_the_environment_layer(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    e = env()
    assert (e.config, e.device, e.debug, e.actor, e.home) == ("", "auto", False, "", (Path.cwd() / ".local").resolve())
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    monkeypatch.setenv("PIPELINE_DEVICE", "cpu")
    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    assert (env().home, env().device, env().debug, pipeline_home()) == (tmp_path, "cpu", True, tmp_path)
    assert all(name.startswith("PIPELINE_") and text for name, text in VARIABLES.items())
    assert {f.name for f in dataclasses.fields(Environment)} == {n.removeprefix("PIPELINE_").lower() for n in VARIABLES}


def test_allowed_values_match_the_stages():
    from pipeline.data import formats, times
    from pipeline.model import evaluate, losses

    assert set(INPUT_FORMATS) == set(formats.FORMATS) and EVENT_COLUMNS == formats.CANONICAL_COLUMNS
    assert set(TIMESTAMP_UNITS) == set(times.TIMESTAMP_UNITS)
    assert TIES == evaluate.TIES and set(LOSSES) == set(losses.LOSSES)


SETTING_COMMANDS = ("validate", "build", "train", "evaluate", "tune", "track", "promote", "models", "retention",
                    "status", "backfill")


def test_every_command_that_reads_settings_takes_the_same_config_and_set():
    from pipeline.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    seen = set()
    for name in SETTING_COMMANDS:
        options = {o: a for a in commands[name]._actions for o in a.option_strings}
        config, overrides = options["--config"], options["--set"]
        assert "$PIPELINE_CONFIG" in config.help and config.default is None
        assert (overrides.dest, overrides.nargs, overrides.metavar) == ("overrides", None, "SECTION.NAME=VALUE")
        assert ("--gru4rec" in options) == (name in ("train", "tune", "track")), name
        seen.add((type(config), config.help, type(overrides)))
    assert len(seen) == 1  # one helper built them all
    args = build_parser().parse_args(["models", "--set", "tracking.experiment=a", "--set", "eval.ties=median"])
    assert args.overrides == ["tracking.experiment=a", "eval.ties=median"]


def test_pipeline_config_is_every_commands_default(tmp_path, monkeypatch):
    from pipeline.cli.main import build_parser
    from pipeline.cli.settings import load_settings

    path = tmp_path / "deployment.yaml"
    path.write_text("tracking:\n  experiment: from-env\n")
    monkeypatch.setenv("PIPELINE_CONFIG", str(path))
    args = build_parser().parse_args(["models", "--set", "tracking.registered_model=m"])
    cfg = load_settings(args)
    assert (cfg.tracking.experiment, cfg.tracking.registered_model) == ("from-env", "m")


def test_help_imports_no_heavy_dependency():
    """`python -m pipeline --help` stays well under a second: no yaml, torch, pyarrow, MLflow or Airflow."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"yaml", "torch", "pyarrow", "mlflow", "airflow", "numpy", "great_expectations"}


def test_the_airflow_grid_is_checked_over_the_gru4rec_section_at_load():
    assert load_config(None, ["airflow.grid={layers: [[8], [16]]}"]).airflow.grid == {"layers": [[8], [16]]}
    with pytest.raises(ConfigError, match=r"airflow.grid: unknown setting\(s\) gru4rec.learnin_rate.*\(from --set"):
        load_config(None, ["airflow.grid={learnin_rate: [0.1]}"])
    with pytest.raises(ConfigError, match=r"airflow.grid: gru4rec: dropout_p_hidden is a drop probability"):
        load_config(None, ["airflow.grid=[{dropout_p_hidden: 1.5}]"])
    with pytest.raises(ConfigError, match=r"airflow.grid: grid: every parameter needs at least one value"):
        load_config(None, ["airflow.grid={momentum: []}"])


def test_pipeline_variables_are_read_only_through_the_environment_layer():
    """Every PIPELINE_* read goes through pipeline.config.env(), except those its docstring lists as read elsewhere."""
    import re

    import pipeline.config.environment as environment

    repo = Path(__file__).resolve().parents[1]
    read = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["'](PIPELINE_\w+)""")
    elsewhere = set(re.findall(r"``(PIPELINE_\w+)``", environment.__doc__ or "")) - set(VARIABLES)
    found = {
        (name, str(path.relative_to(repo)))
        for path in [*repo.joinpath("pipeline").rglob("*.py"), *repo.joinpath("dags").rglob("*.py")]
        if "config" not in path.relative_to(repo).parts[:2]
        for name in read.findall(path.read_text(encoding="utf-8"))
    }
    assert {name for name, _ in found} <= elsewhere, sorted(found)
    assert elsewhere == {"PIPELINE_S3_ENDPOINT_URL", "PIPELINE_S3_BUCKET", "PIPELINE_AIRFLOW_ADMIN_PASSWORD",
                         "PIPELINE_WORKER_HOSTNAME"}
