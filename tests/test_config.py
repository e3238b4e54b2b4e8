"""The one typed config: defaults, files, --set overrides and clear errors."""

import json

import pytest

from pipeline.config import GRU4RecConfig, PipelineConfig, load_config, load_gru4rec_config, to_dict
from pipeline.errors import ConfigError


def test_defaults_are_the_rsc15_row():
    cfg = GRU4RecConfig()
    assert (cfg.loss, cfg.layers, cfg.batch_size, cfg.learning_rate, cfg.momentum) == ("cross-entropy", (100,), 32, 0.2, 0.2)
    assert (cfg.dropout_p_embed, cfg.dropout_p_hidden, cfg.sample_alpha, cfg.logq, cfg.n_sample) == (0.0, 0.4, 0.5, 1.0, 2048)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "retailrocket.yaml"
    path.write_text("loss: bpr-max\nlayers: [224]\nbatch_size: 80\nelu_param: 0.5\nbpreg: 1.95\nlogq: 0\n")
    cfg = load_gru4rec_config(path, ["n_epochs=3", "layers=[64, 32]"])
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
        load_gru4rec_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_gru4rec_config(tmp_path / "missing.yaml")
