"""Bounded hyperparameter search for GRU4Rec (Optuna TPE), optimising a validation metric (mrr@20 default).

One trial is one call of ``run_trial(train, valid, config, out_dir)``: it trains with ``config`` (seed
included) and returns the validation metrics, so the same config gives the same numbers on CPU and a
scheduler can run trials on parallel workers. ``search`` drives Optuna over a declared ``SearchSpace``;
with an Optuna ``storage`` URL (e.g. PostgreSQL) several processes can share one study.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import GRU4RecConfig, from_mapping, read_config_file, to_dict
from pipeline.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

# The default space: the ranges the published best settings (gru4rec.md) fall in, one GRU layer.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "loss": {"type": "categorical", "choices": ["cross-entropy", "bpr-max"]},
    "layers": {"type": "categorical", "choices": [64, 100, 128, 224]},
    "batch_size": {"type": "categorical", "choices": [32, 48, 64, 80, 128]},
    "learning_rate": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
    "momentum": {"type": "float", "low": 0.0, "high": 0.6, "step": 0.05},
    "dropout_p_embed": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
    "dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.6, "step": 0.05},
    "sample_alpha": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.1},
    "bpreg": {"type": "float", "low": 0.0, "high": 2.0, "step": 0.05, "when": {"loss": "bpr-max"}},
    "elu_param": {"type": "categorical", "choices": [0.0, 0.5, 1.0], "when": {"loss": "bpr-max"}},
    "logq": {"type": "categorical", "choices": [0.0, 1.0], "when": {"loss": "cross-entropy"}},
}
KINDS = ("categorical", "float", "int")


@dataclass(frozen=True)
class SearchSpace:
    """GRU4Rec parameter name -> distribution. ``when: {param: value}`` makes a parameter conditional.

    ``layers`` choices may be sizes (one layer) or lists of sizes.
    """

    params: Mapping[str, Mapping[str, Any]]

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(GRU4RecConfig)}
        for name, spec in self.params.items():
            if name not in known:
                raise ConfigError(f"search space: {name} is not a GRU4Rec parameter")
            kind = spec.get("type")
            if kind not in KINDS:
                raise ConfigError(f"search space: {name}.type must be one of {', '.join(KINDS)}, got {kind!r}")
            if kind == "categorical" and not spec.get("choices"):
                raise ConfigError(f"search space: {name} needs a non-empty 'choices' list")
            if kind in ("float", "int") and not ("low" in spec and "high" in spec and spec["low"] <= spec["high"]):
                raise ConfigError(f"search space: {name} needs 'low' <= 'high'")
            for cond in spec.get("when", {}):
                if cond not in self.params:
                    raise ConfigError(f"search space: {name} depends on {cond}, which is not searched")

    @classmethod
    def load(cls, path: str | Path | None) -> SearchSpace:
        """The space in a YAML/JSON file (a mapping of parameter -> spec), or the default one."""
        return cls(read_config_file(path) if path else DEFAULT_SPACE)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw one set of parameters from an Optuna trial (conditional parameters after their conditions)."""
        chosen: dict[str, Any] = {}
        pending = dict(self.params)
        while pending:
            ready = [n for n, s in pending.items() if all(c in chosen for c in s.get("when", {}))]
            if not ready:
                raise ConfigError(f"search space: circular 'when' conditions among {', '.join(pending)}")
            for name in ready:
                spec = pending.pop(name)
                if any(chosen[c] != v for c, v in spec.get("when", {}).items()):
                    continue
                chosen[name] = _suggest_one(trial, name, spec)
        return chosen


def _suggest_one(trial: Any, name: str, spec: Mapping[str, Any]) -> Any:
    kind = spec["type"]
    if kind == "categorical":
        choices = [json.dumps(c) if isinstance(c, list) else c for c in spec["choices"]]
        value = trial.suggest_categorical(name, choices)
        return json.loads(value) if isinstance(value, str) and value.startswith("[") else value
    if kind == "int":
        return trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)), log=bool(spec.get("log", False)))
    step = spec.get("step")
    return trial.suggest_float(
        name, float(spec["low"]), float(spec["high"]), step=float(step) if step else None, log=bool(spec.get("log", False))
    )


def apply_params(base: GRU4RecConfig, params: Mapping[str, Any]) -> GRU4RecConfig:
    """``base`` with the trial's parameters (validated through the config's own rules)."""
    merged = to_dict(base) | {k: ([v] if k == "layers" and isinstance(v, int) else v) for k, v in params.items()}
    return from_mapping(GRU4RecConfig, merged, "gru4rec.")


def run_trial(
    train: Any,
    valid: Any,
    config: GRU4RecConfig,
    out_dir: str | Path,
    *,
    metric: str = "mrr@20",
    cutoffs: tuple[int, ...] = (1, 5, 10, 20),
    device: str = "auto",
    threads: int = 0,
) -> dict[str, Any]:
    """Train ``config`` on ``train`` and evaluate it on ``valid``: one reproducible trial.

    Returns the validation metrics plus ``objective`` (the value of ``metric``), ``train_seconds`` and the
    config; the model and ``trial.json`` stay in ``out_dir``.
    """
    from pipeline.model.clicks import index_sessions, read_log
    from pipeline.model.evaluate import evaluate
    from pipeline.model.predict import load_model
    from pipeline.model.train import train as train_model

    train_log, valid_log = read_log(train, "train"), read_log(valid, "valid")
    began = time.perf_counter()
    result = train_model(train_log, config, out_dir, device=device, resume=True, threads=threads)
    loaded = load_model(out_dir, device=device)
    ev = evaluate(loaded.model, loaded.item_map, index_sessions(valid_log, loaded.item_map), cutoffs=cutoffs, baselines=False)
    if metric not in ev.metrics:
        raise ConfigError(f"metric {metric!r} is not computed; choose one of {', '.join(k for k in ev.metrics if '@' in k)}")
    out = {k: v for k, v in ev.metrics.items() if "@" in k or k.startswith("n_")}
    out |= {
        "objective": float(ev.metrics[metric]),
        "metric": metric,
        "train_seconds": result.train_seconds,
        "seconds": time.perf_counter() - began,
        "config": to_dict(config),
    }
    Path(out_dir, "trial.json").write_text(json.dumps(out, indent=2))
    return out


@dataclass
class SearchResult:
    best_value: float
    best_config: GRU4RecConfig
    best_trial: int
    trials: list[dict[str, Any]]
    out_dir: Path


def search(
    train: Any,
    valid: Any,
    base: GRU4RecConfig,
    out_dir: str | Path,
    *,
    space: SearchSpace | None = None,
    n_trials: int = 20,
    timeout_s: float | None = None,
    metric: str = "mrr@20",
    seed: int = 0,
    storage: str | None = None,
    study_name: str = "gru4rec",
    device: str = "auto",
    threads: int = 0,
) -> SearchResult:
    """Run at most ``n_trials`` trials (and stop starting new ones after ``timeout_s``), maximising ``metric``.

    Trials that fail with a ``TrainingError`` (e.g. a diverging loss) are recorded as failed, not fatal.
    Writes ``trials.jsonl`` (one line per finished trial) and ``best.json`` / ``best_config.json``.
    """
    # Over ~60 lines: the trial callbacks below are closures over the study's logs, records and output.
    import optuna

    from pipeline.model.clicks import read_log

    if n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
    space = space or SearchSpace(DEFAULT_SPACE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_log, valid_log = read_log(train, "train"), read_log(valid, "valid")  # read once, shared by trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=storage is not None,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    records: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        records.append(entry)
        with open(out / "trials.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        config = apply_params(base, params)
        trial.set_user_attr("config", to_dict(config))
        trial_dir = out / f"trial-{trial.number:04d}"
        try:
            res = run_trial(train_log, valid_log, config, trial_dir, metric=metric, device=device, threads=threads)
        except TrainingError as exc:
            log.warning("trial %d failed: %s", trial.number, exc)
            record({"trial": trial.number, "params": params, "error": str(exc)})
            raise optuna.TrialPruned(str(exc)) from None
        record({"trial": trial.number, "params": params} | res)
        log.info("trial %d: %s = %.4f (%s)", trial.number, metric, res["objective"], params)
        return res["objective"]

    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, gc_after_trial=True)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise TrainingError(f"no trial of study {study_name!r} finished; see {out / 'trials.jsonl'} and the log")
    return _write_best(study, len(done), metric, records, out)


def _write_best(study: Any, n_complete: int, metric: str, records: list[dict[str, Any]], out: Path) -> SearchResult:
    """Write ``best.json`` and ``best_config.json`` of a finished study; return its result."""
    best = study.best_trial
    best_config = from_mapping(GRU4RecConfig, best.user_attrs["config"], "gru4rec.")
    summary = {
        "metric": metric,
        "best_value": best.value,
        "best_trial": best.number,
        "best_params": best.params,
        "n_trials": len(study.trials),
        "n_complete": n_complete,
    }
    (out / "best.json").write_text(json.dumps(summary, indent=2))
    (out / "best_config.json").write_text(json.dumps(to_dict(best_config), indent=2))
    assert best.value is not None  # a completed trial has its value
    return SearchResult(best.value, best_config, best.number, records, out)
