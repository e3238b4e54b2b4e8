"""Hyperparameter search: one trial = one reproducible call; the declared space is validated."""

from __future__ import annotations

import optuna
import pytest
from gru4rec_testdata import tiny_config

from pipeline.errors import ConfigError
from pipeline.model.tune import DEFAULT_SPACE, SearchSpace, apply_params, run_trial, search


def test_a_trial_is_reproducible_from_its_config(synth, tmp_path):
    cfg = tiny_config(n_epochs=1, dropout_p_hidden=0.2)
    a = run_trial(synth["train"], synth["test"], cfg, tmp_path / "a")
    b = run_trial(synth["train"], synth["test"], cfg, tmp_path / "b")
    assert a["objective"] == b["objective"] == a["mrr@20"]
    assert {k: v for k, v in a.items() if "@" in k} == {k: v for k, v in b.items() if "@" in k}
    assert (tmp_path / "a" / "checkpoint.pt").exists() and (tmp_path / "a" / "trial.json").exists()
    with pytest.raises(ConfigError, match="not computed"):
        run_trial(synth["train"], synth["test"], cfg, tmp_path / "a", metric="ndcg@20")


def test_search_picks_the_best_trial_and_is_seeded(synth, tmp_path):
    space = SearchSpace({"learning_rate": {"type": "float", "low": 0.01, "high": 0.3, "log": True}})
    base = tiny_config(n_epochs=1)
    first = search(synth["train"], synth["test"], base, tmp_path / "one", space=space, n_trials=3, seed=5)
    second = search(synth["train"], synth["test"], base, tmp_path / "two", space=space, n_trials=3, seed=5)
    assert [t["params"] for t in first.trials] == [t["params"] for t in second.trials]
    assert first.best_value == max(t["objective"] for t in first.trials)
    best = next(t for t in first.trials if t["trial"] == first.best_trial)
    assert first.best_config.learning_rate == pytest.approx(best["params"]["learning_rate"])
    assert first.best_config.layers == base.layers  # unsearched parameters come from the base config


def test_space_validation_and_conditions():
    with pytest.raises(ConfigError, match="not a GRU4Rec parameter"):
        SearchSpace({"learning_rat": {"type": "float", "low": 0, "high": 1}})
    with pytest.raises(ConfigError, match="low"):
        SearchSpace({"momentum": {"type": "float", "low": 1, "high": 0}})
    with pytest.raises(ConfigError, match="depends on loss"):
        SearchSpace({"bpreg": {"type": "float", "low": 0, "high": 1, "when": {"loss": "bpr-max"}}})
    space = SearchSpace(DEFAULT_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_losses = set()
    for _ in range(12):
        params = space.suggest(study.ask())
        seen_losses.add(params["loss"])
        assert ("bpreg" in params) == (params["loss"] == "bpr-max")
        assert ("logq" in params) == (params["loss"] == "cross-entropy")
        config = apply_params(tiny_config(), params)  # every draw is a valid config
        assert isinstance(config.layers, tuple) and len(config.layers) == 1
    assert seen_losses == {"cross-entropy", "bpr-max"}
