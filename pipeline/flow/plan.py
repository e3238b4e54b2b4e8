"""The ``plan``, ``wait_for_partition`` and ``partitions`` tasks: what a DAG run covers, fixed once.

:func:`plan_run` turns the run's Params and logical date into a :class:`RunPlan` (date, window, output
URIs, the trials of the grid or random search, the config snapshot); the sensor's look and the listing of
the window's click-log partitions read that plan. Pure apart from the config and a listing of the data
root: a bad Param fails here, before any work, with a clear message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from pipeline.config import GRU4RecConfig, from_mapping, grid_points, to_dict
from pipeline.errors import ConfigError, InputError
from pipeline.flow.contracts import Partition, RunPlan, TrialSpec, to_xcom
from pipeline.flow.settings import config_of, data_root, join, load_pipeline_config, output_root, summary_uri

log = logging.getLogger(__name__)


def _parse_day(value: Any, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ConfigError(f"{what}: expected a date YYYY-MM-DD, got {value!r}") from None


def expand_grid(grid: Any, base: Mapping[str, Any] | None = None) -> list[TrialSpec]:
    """The trials of a grid, each with a full GRU4Rec config dict, in a stable order without duplicates.

    ``grid`` is a mapping ``{param: [values]}`` (cartesian product) or a list of ``{param: value}``;
    ``base`` is applied first. Unknown names or bad values raise ConfigError now, not mid-training.
    """
    trials: list[TrialSpec] = []
    seen: set[str] = set()
    for point in grid_points(grid):
        merged = {**(base or {}), **point}
        params = to_dict(from_mapping(GRU4RecConfig, merged, "gru4rec."))
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        if key in seen:
            continue
        seen.add(key)
        label = ", ".join(f"{k}={point[k]}" for k in point) or "base"
        trials.append(TrialSpec(name=f"t{len(trials):02d}", key=key, label=label, params=params))
    return trials


def search_points(search: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``n_trials`` points drawn up front from a search space (pipeline.model.tune's default one unless
    ``space`` is given): a random search the DAG maps in parallel like a grid. Seeded, so a re-run of
    the date draws the same points and finds its MLflow runs again."""
    import optuna  # heavy: only a run with a search loads it

    from pipeline.model.tune import SearchSpace

    unknown = sorted(set(search) - {"n_trials", "seed", "space"})
    if unknown:
        raise ConfigError(f"search: unknown key(s) {unknown}; known: n_trials, seed, space")
    if int(search.get("n_trials", 0)) < 1:
        raise ConfigError(
            f"search: n_trials must be >= 1 (or leave search empty to use the grid), got {search}"
        )
    space = SearchSpace(search["space"]) if search.get("space") else SearchSpace.load(None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=int(search.get("seed", 0)))
    )
    return [space.suggest(study.ask()) for _ in range(int(search["n_trials"]))]


def run_date(params: Mapping[str, Any], logical_date: dt.datetime | None) -> dt.date:
    """The last day of data a run covers: the ``window_end`` Param, else the logical date (UTC)."""
    if params.get("window_end"):
        return _parse_day(params["window_end"], "window_end")
    if logical_date is None:
        raise ConfigError("this run has no logical date: set the window_end Param (YYYY-MM-DD)")
    return logical_date.astimezone(dt.UTC).date()


def plan_run(
    params: Mapping[str, Any], *, logical_date: dt.datetime | None, dag_id: str, run_id: str
) -> RunPlan:
    """Fix what the run's tasks share: its date and window, output URIs, trials and config snapshot.

    Pure: reads only the config, so a bad Param fails here, before any work, with a clear message.
    """
    cfg = load_pipeline_config()
    end = run_date(params, logical_date)
    start = _parse_day(params["window_start"], "window_start") if params.get("window_start") else end
    if start > end:
        raise ConfigError(f"window_start {start} is after window_end {end}")
    train_days = int(params.get("train_days") or cfg.airflow.train_days)
    if train_days < 1:
        raise ConfigError(f"train_days must be >= 1, got {train_days}")

    overrides = dict(params.get("gru4rec") or {})
    search = dict(params.get("search") or {})
    grid = search_points(search) if search else params.get("grid", cfg.airflow.grid)
    trials = expand_grid(grid, {**to_dict(cfg.gru4rec), **overrides})
    log.info(
        "run date %s: validate %s .. %s, train on %d day(s), %d trial(s): %s",
        end, start, end, train_days, len(trials), "; ".join(f"{t.name} {t.label}" for t in trials),
    )  # fmt: skip
    margin = params.get("promotion_margin")
    tracking = dataclasses.replace(
        cfg.tracking, promotion_margin=float(margin) if margin is not None else cfg.tracking.promotion_margin
    )
    config = dataclasses.replace(cfg, tracking=tracking)
    out = output_root(cfg, params.get("output_uri", ""))
    day = end.isoformat()
    return RunPlan(
        dag_id=dag_id,
        run_id=run_id,
        date=day,
        window_start=start.isoformat(),
        train_start=min(start, end - dt.timedelta(days=train_days - 1)).isoformat(),
        data_uri=data_root(cfg, params.get("data_uri", "")),
        output_uri=out,
        dataset_uri=join(out, "datasets", f"dt={day}"),
        models_uri=join(out, "models", f"dt={day}"),
        summary_uri=summary_uri(out, day),
        trials=trials,
        config=to_dict(config),
    )


def wait_for_partitions(run: RunPlan, first_poke: dt.datetime | None) -> dict[str, Any] | None:
    """One look of the late-data sensor: the wait record once the run's partitions are ready, else None.

    Raises InputError ("no partition dt=X after N h") when ``airflow.partition_timeout_hours`` have passed
    since ``first_poke`` (see pipeline.data.partitions, which owns the record's format).
    """
    from pipeline.data import partitions  # its look imports pyarrow: not at DAG parse time

    policy = partitions.WaitPolicy.from_config(config_of(run).airflow)
    record = partitions.poke(to_xcom(run), policy, first_poke=first_poke)
    if record["state"] != "ready":
        missing = ", ".join(p["uri"] for p in record["partitions"] if not p["ready"])
        log.info("waiting for %s: next look in %s", missing, partitions.duration_text(policy.poke_interval_s))
        return None
    log.info(
        "ready: %s", ", ".join(f"dt={p['date']} (waited {p['waited_s']:.0f} s)" for p in record["partitions"])
    )
    return record


def list_partitions(run: RunPlan) -> list[Partition]:
    """The click-log partitions to validate: every day of the training window present in the data root.

    Days from ``window_start`` to the run's date must exist (InputError otherwise); older days of the
    training window may be missing (the window is then shorter) and reuse the validation of their
    own run when it passed.
    """
    from pipeline import storage  # pyarrow: not at DAG parse time

    first = dt.date.fromisoformat(run.train_start)
    start = dt.date.fromisoformat(run.window_start)
    end = dt.date.fromisoformat(run.date)
    found = []
    for offset in range((end - first).days + 1):
        day = first + dt.timedelta(days=offset)
        uri = join(run.data_uri, f"dt={day.isoformat()}")
        required = day >= start
        if not storage.exists(uri):
            if required:
                raise InputError(f"no click-log partition for {day}: {uri} does not exist")
            log.warning("training window: no partition %s, training without that day", uri)
            continue
        found.append(
            Partition(
                date=day.isoformat(),
                input_uri=uri,
                out_uri=join(run.output_uri, "validated", f"dt={day.isoformat()}"),
                reuse=not required,
            )
        )
    return found
