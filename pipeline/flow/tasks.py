"""The DAG's task bodies (``dags/gru4rec_daily.py``): one function per task.

Every function takes and returns small JSON-ready dicts (URIs, MLflow run ids, metrics), never data,
and is idempotent for a run date: outputs are addressed by the date and committed atomically by the
stage modules, MLflow trial runs are keyed by (date, trial), registry versions by their source run.
The functions run and are tested without a scheduler. The DAG file imports this module while it is
parsed, so only the standard library and the config are imported here; GX, torch and MLflow are
imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    GRU4RecConfig,
    PipelineConfig,
    from_mapping,
    load_config,
    pipeline_home,
    to_dict,
)
from pipeline.errors import ConfigError, InputError, PipelineError, TrainingError, ValidationFailed
from pipeline.flow.airflow_api import AirflowAPI

log = logging.getLogger(__name__)

CONFIG_ENV = "PIPELINE_CONFIG"  # path of the YAML/JSON pipeline config every task reads
DATA_ENV = "PIPELINE_DATA_URI"
OUTPUT_ENV = "PIPELINE_OUTPUT_URI"
NOTE_LIMIT = 1000  # Airflow rejects longer DAG run notes


# ---------------------------------------------------------------------------------------------
# Settings read while the DAG file is parsed


def load_pipeline_config() -> PipelineConfig:
    """The deployment's config: defaults < the file named by ``$PIPELINE_CONFIG``."""
    return load_config(os.environ.get(CONFIG_ENV) or None)


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
        or os.environ.get(DATA_ENV)
        or str(pipeline_home() / "data" / "clicks")
    )
    return _as_uri_root(chosen)


def output_root(cfg: PipelineConfig, override: str = "") -> str:
    """Where outputs go: Param > config file > ``$PIPELINE_OUTPUT_URI`` > ``$PIPELINE_HOME/output``."""
    chosen = (
        override or cfg.airflow.output_uri or os.environ.get(OUTPUT_ENV) or str(pipeline_home() / "output")
    )
    return _as_uri_root(chosen)


def join(root: str, *parts: str) -> str:
    """Join URI/path segments with '/', which both local paths and ``s3://`` keys use."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


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
        from airflow.sdk import CronDataIntervalTimetable

        return CronDataIntervalTimetable(self.schedule, timezone="UTC")

    def retry_policy(self) -> Any:
        """Retry transient failures (network, worker loss); fail at once on errors a retry cannot fix."""
        from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

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
    from pipeline.data.partitions import WaitPolicy

    cfg = load_pipeline_config()
    af = cfg.airflow
    wait = WaitPolicy.from_config(af)
    try:
        start = dt.datetime.fromisoformat(af.start_date)
    except ValueError:
        raise ConfigError(f"airflow.start_date: expected YYYY-MM-DD, got {af.start_date!r}") from None
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


# ---------------------------------------------------------------------------------------------
# plan: the run's date, partitions, trials and config, fixed once for all its tasks


def _parse_day(value: Any, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ConfigError(f"{what}: expected a date YYYY-MM-DD, got {value!r}") from None


def expand_grid(grid: Any, base: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The trials of a grid, each a full GRU4Rec config dict, in a stable order without duplicates.

    ``grid`` is a mapping ``{param: [values]}`` (cartesian product) or a list of ``{param: value}``;
    ``base`` is applied first. Unknown names or bad values raise ConfigError now, not mid-training.
    """
    if grid is None or grid == {} or grid == []:
        points: list[dict[str, Any]] = [{}]
    elif isinstance(grid, Mapping):
        names = list(grid)
        values = [v if isinstance(v, list | tuple) else [v] for v in grid.values()]
        if any(not v for v in values):
            raise ConfigError(f"grid: every parameter needs at least one value, got {dict(grid)!r}")
        points = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]
    elif isinstance(grid, list | tuple) and all(isinstance(p, Mapping) for p in grid):
        points = [dict(p) for p in grid]
    else:
        raise ConfigError(f"grid: expected {{param: [values]}} or a list of {{param: value}}, got {grid!r}")

    trials: list[dict[str, Any]] = []
    seen: set[str] = set()
    for point in points:
        merged = {**(base or {}), **point}
        params = to_dict(from_mapping(GRU4RecConfig, merged, "gru4rec."))
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        if key in seen:
            continue
        seen.add(key)
        label = ", ".join(f"{k}={point[k]}" for k in point) or "base"
        trials.append({"name": f"t{len(trials):02d}", "key": key, "label": label, "params": params})
    return trials


def search_points(search: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``n_trials`` points drawn up front from a search space (pipeline.model.tune's default one unless
    ``space`` is given): a random search the DAG maps in parallel like a grid. Seeded, so a re-run of
    the date draws the same points and finds its MLflow runs again."""
    import optuna

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
) -> dict[str, Any]:
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
        end, start, end, train_days, len(trials), "; ".join(f"{t['name']} {t['label']}" for t in trials),
    )  # fmt: skip
    margin = params.get("promotion_margin")
    tracking = dataclasses.replace(
        cfg.tracking, promotion_margin=float(margin) if margin is not None else cfg.tracking.promotion_margin
    )
    config = dataclasses.replace(cfg, tracking=tracking)
    out = output_root(cfg, params.get("output_uri", ""))
    day = end.isoformat()
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "date": day,
        "window_start": start.isoformat(),
        "train_start": min(start, end - dt.timedelta(days=train_days - 1)).isoformat(),
        "data_uri": data_root(cfg, params.get("data_uri", "")),
        "output_uri": out,
        "dataset_uri": join(out, "datasets", f"dt={day}"),
        "models_uri": join(out, "models", f"dt={day}"),
        "summary_uri": summary_uri(out, day),
        "trials": trials,
        "config": to_dict(config),
    }


def wait_for_partitions(run: Mapping[str, Any], first_poke: dt.datetime | None) -> dict[str, Any] | None:
    """One look of the late-data sensor: the wait record once the run's partitions are ready, else None.

    Raises InputError ("no partition dt=X after N h") when ``airflow.partition_timeout_hours`` have passed
    since ``first_poke`` (see pipeline.data.partitions).
    """
    from pipeline.data import partitions

    policy = partitions.WaitPolicy.from_config(config_of(run).airflow)
    record = partitions.poke(run, policy, first_poke=first_poke)
    if record["state"] != "ready":
        missing = ", ".join(p["uri"] for p in record["partitions"] if not p["ready"])
        log.info("waiting for %s: next look in %s", missing, partitions.duration_text(policy.poke_interval_s))
        return None
    log.info("ready: %s", ", ".join(f"dt={p['date']} (waited {p['waited_s']:.0f} s)" for p in record["partitions"]))
    return record


def list_partitions(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The click-log partitions to validate: every day of the training window present in the data root.

    Days from ``window_start`` to the run's date must exist (InputError otherwise); older days of the
    training window may be missing (the window is then shorter) and reuse the validation of their
    own run when it passed.
    """
    from pipeline import storage

    first = dt.date.fromisoformat(run["train_start"])
    start = dt.date.fromisoformat(run["window_start"])
    end = dt.date.fromisoformat(run["date"])
    partitions = []
    for offset in range((end - first).days + 1):
        day = first + dt.timedelta(days=offset)
        uri = join(run["data_uri"], f"dt={day.isoformat()}")
        required = day >= start
        if not storage.exists(uri):
            if required:
                raise InputError(f"no click-log partition for {day}: {uri} does not exist")
            log.warning("training window: no partition %s, training without that day", uri)
            continue
        partitions.append(
            {
                "date": day.isoformat(),
                "input_uri": uri,
                "out_uri": join(run["output_uri"], "validated", f"dt={day.isoformat()}"),
                "reuse": not required,
            }
        )
    return partitions


def summary_uri(output_uri: str, day: str) -> str:
    """Where the summary task writes the run's decision, metrics and note (read by the demo and people)."""
    return join(output_uri, "runs", f"dt={day}", "summary.json")


def config_of(run: Mapping[str, Any]) -> PipelineConfig:
    """The run's config snapshot (the plan task's), identical for every task of the run."""
    return from_mapping(PipelineConfig, dict(run["config"]))


# ---------------------------------------------------------------------------------------------
# Failure callbacks and the DAG run note


def failure_message(context: Mapping[str, Any]) -> str:
    """One line an on-call person can act on: which task of which run, which try, why, where the log is."""
    ti = context.get("ti") or context.get("task_instance")
    exc = context.get("exception")
    task_id = getattr(ti, "task_id", "?")
    map_index = getattr(ti, "map_index", -1)
    where = f"{task_id}[{map_index}]" if map_index is not None and map_index >= 0 else task_id
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    run_id = getattr(ti, "run_id", None) or context.get("run_id", "?")
    tries = f"try {getattr(ti, 'try_number', '?')}/{(getattr(ti, 'max_tries', 0) or 0) + 1}"
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception recorded"
    msg = f"{dag_id} run {run_id}: task {where} failed ({tries}): {reason}"
    log_url = getattr(ti, "log_url", None)
    return f"{msg} | log: {log_url}" if log_url else msg


def on_task_failure(context: Mapping[str, Any]) -> None:
    """Airflow ``on_failure_callback``: log the failure clearly; a failure after the MLflow parent run
    opened also closes that run as FAILED. People are told by the notifiers of ``pipeline.flow.alerts`` (the
    DAG's other failure callbacks: e-mail, webhook)."""
    log.error("task failed: %s", failure_message(context))
    try:
        _fail_parent_run(context)
    except Exception:  # noqa: BLE001
        log.exception("could not mark the MLflow parent run as failed")


TRACKED_TASKS = {"train", "promote", "summary"}  # the tasks that run after the MLflow parent run opened


def _fail_parent_run(context: Mapping[str, Any]) -> None:
    """Close the DAG run's MLflow parent run as FAILED, so the MLflow UI does not show it running forever.

    A later re-run of the date finds the same parent run again and closes it as FINISHED.
    """
    ti = context.get("ti")
    if getattr(ti, "task_id", None) not in TRACKED_TASKS:
        return
    trials = ti.xcom_pull(task_ids="prepare_trials")
    if not trials:
        return
    from pipeline.tracking import runs as tracking

    tracking.configure(from_mapping(PipelineConfig, dict(trials[0]["config"])).tracking)
    tracking.end_run(trials[0]["parent_run_id"], "FAILED")


def set_run_note(dag_id: str, run_id: str, note: str, conn_id: str) -> bool:
    """Set the DAG run note through Airflow's REST API (tasks have no database access in Airflow 3).

    Uses the HTTP connection ``conn_id`` (host/port/schema of the api-server; login/password for
    ``/auth/token``, or ``{"token": ...}`` in extra, or neither when the auth manager hands out tokens
    freely). Without that connection the note stays in the task log and the summary file; returns
    whether the note was set. A failure to set it is logged, never raised: the run's work is done.
    """
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - AirflowNotFoundException or no Airflow context at all
        log.info("run note not set: no Airflow connection %r to the REST API", conn_id)
        return False
    api = AirflowAPI.from_connection(conn)
    base = api.base_url
    try:
        api.set_note(dag_id, run_id, note[:NOTE_LIMIT])
    except (PipelineError, OSError, KeyError, ValueError) as exc:  # HTTP errors; refused, DNS, timeouts
        log.warning("run note not set: Airflow REST API at %s answered %s", base, exc)
        return False
    return True


# ---------------------------------------------------------------------------------------------
# validate -> build


def validate_partition(partition: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """Run the GX suite on one day's partition; bad rows go to quarantine, a table-level failure raises.

    A day before the run's window whose own run already validated it (a passing report) is reused.
    """
    from pipeline import storage
    from pipeline.data.validate import validate

    cfg = config_of(run)
    out = partition["out_uri"]
    report_uri = join(out, "report.json")
    if partition.get("reuse") and storage.exists(report_uri):
        report = storage.read_json(report_uri)
        if report.get("success"):
            log.info("partition %s: reusing the passing validation report %s", partition["date"], report_uri)
            return _partition_result(partition, report, reused=True)
    log.info("validating %s -> %s", partition["input_uri"], out)
    try:
        report = validate([partition["input_uri"]], out, cfg.ingest, cfg.validation)
    except ValidationFailed as exc:  # the message names the file, column, rule and the report
        raise ValidationFailed(f"partition {partition['date']} ({partition['input_uri']}): {exc}") from exc
    result = _partition_result(partition, report, reused=False)
    log.info(
        "partition %s: %d rows in, %d valid, %d quarantined (report: %s)",
        partition["date"],
        result["rows_in"],
        result["rows_valid"],
        result["rows_quarantined"],
        report_uri,
    )
    return result


def _partition_result(
    partition: Mapping[str, Any], report: Mapping[str, Any], *, reused: bool
) -> dict[str, Any]:
    out = partition["out_uri"]
    return {
        "date": partition["date"],
        "input_uri": partition["input_uri"],
        "out_uri": out,
        "report_uri": join(out, "report.json"),
        "data_docs_uri": join(out, str(report.get("data_docs") or "data_docs/index.html")),
        "rows_in": int(report.get("rows_in", 0)),
        "rows_valid": int(report.get("rows_valid", 0)),
        "rows_quarantined": int(report.get("rows_quarantined", 0)),
        "reused": reused,
    }


def build_dataset(run: Mapping[str, Any], reports: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Build the session dataset of the training window from the validated partitions."""
    from pipeline.data.sessions import build_dataset as build

    cfg = config_of(run)
    ordered = sorted(reports, key=lambda r: r["date"])
    inputs = [r["out_uri"] for r in ordered]  # validation outputs: build reads their clean rows
    log.info(
        "building %s from %d validated partitions (%s .. %s)",
        run["dataset_uri"],
        len(inputs),
        ordered[0]["date"],
        ordered[-1]["date"],
    )
    manifest = build(inputs, run["dataset_uri"], cfg.ingest, cfg.build)
    return {
        "uri": run["dataset_uri"],
        "fingerprint": str(manifest.get("fingerprint", "")),
        "counts": manifest.get("counts", {}),
        "partitions": [r["date"] for r in ordered],
        # Partition by partition in validation, then whole sessions over the window in the build.
        "rows_quarantined": sum(r["rows_quarantined"] for r in ordered)
        + int(manifest.get("counts", {}).get("quarantined", {}).get("events", 0)),
        "reports": [r["report_uri"] for r in ordered],
    }


def asset_extra(run: Mapping[str, Any], dataset: Mapping[str, Any]) -> dict[str, Any]:
    """What the Asset event tells downstream DAGs: which dataset, for which date, from which run."""
    return {
        "uri": dataset["uri"],
        "date": run["date"],
        "fingerprint": dataset["fingerprint"],
        "dag_run_id": run["run_id"],
    }


# ---------------------------------------------------------------------------------------------
# train (one mapped task per trial) -> promote -> summary


def parent_run_key(run: Mapping[str, Any]) -> str:
    return f"{run['dag_id']}/{run['date']}"


def prepare_trials(run: Mapping[str, Any], dataset: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Open (or find again) the DAG run's MLflow parent run and describe each trial for a mapped train task."""
    from pipeline.tracking import runs as tracking

    cfg = config_of(run)
    parent = tracking.start_parent_run(
        cfg,
        parent_run_key(run),
        run_name=f"{run['dag_id']} {run['date']}",
        tags={
            "data.uri": dataset["uri"],
            "data.fingerprint": dataset["fingerprint"],
            "pipeline.date": run["date"],
        },
        dataset_uri=dataset["uri"],  # the day's validation reports and Data Docs, once for all trials
    )
    fingerprint = dataset["fingerprint"][:12] or "nofp"
    return [
        {
            "name": trial["name"],
            "label": trial["label"],
            "params": trial["params"],
            # (date, data, trial): a retry or a re-run finds the finished run instead of logging a duplicate.
            "run_key": f"{run['dag_id']}/{run['date']}/{fingerprint}/{trial['key']}",
            "parent_run_id": parent,
            "dataset_uri": dataset["uri"],
            "models_uri": join(run["models_uri"], fingerprint, trial["key"]),
            "date": run["date"],
            "config": run["config"],
        }
        for trial in run["trials"]
    ]


def _work_dir(trial: Mapping[str, Any]) -> str:
    """Where the trial's checkpoints live: a retry on the same worker resumes from the last epoch.

    Checkpoints need a local directory; with an ``s3://`` output root they stay on the worker's disk.
    """
    uri = trial["models_uri"]
    if "://" not in uri:
        return uri
    return str(pipeline_home() / "work" / uri.split("://", 1)[1])


def train_trial(trial: Mapping[str, Any]) -> dict[str, Any]:
    """Train, evaluate and log one trial as an MLflow run nested under the DAG run's parent run."""
    from pipeline.tracking import runs as tracking

    cfg = from_mapping(PipelineConfig, {**trial["config"], "gru4rec": trial["params"]})
    device = os.environ.get("PIPELINE_DEVICE", "auto")
    log.info("trial %s (%s) on %s: run key %s", trial["name"], trial["label"], device, trial["run_key"])
    tracked = tracking.track_training(
        trial["dataset_uri"],
        cfg,
        run_key=trial["run_key"],
        parent_run_id=trial["parent_run_id"],
        run_name=f"{trial['date']} {trial['name']} ({trial['label']})",
        device=device,
        work_dir=_work_dir(trial),
    )
    primary = cfg.tracking.primary_metric
    log.info(
        "trial %s: MLflow run %s%s, %s=%s",
        trial["name"],
        tracked.run_id,
        " (reused)" if tracked.reused else "",
        primary,
        tracked.metrics.get(primary),
    )
    return {
        "name": trial["name"],
        "label": trial["label"],
        "run_id": tracked.run_id,
        "experiment_id": tracked.experiment_id,
        "parent_run_id": trial["parent_run_id"],
        "model_uri": tracked.model_uri,
        "metrics": _headline_metrics(tracked.metrics),
        "reused": tracked.reused,
    }


def _headline_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a person compares: Recall/MRR at every cutoff and the baselines' (not the per-epoch ones)."""
    keep = ("recall_at_", "mrr_at_", "baseline_pop_", "baseline_spop_")
    return {k: float(v) for k, v in sorted(metrics.items()) if k.startswith(keep)}


def evaluate_and_promote(
    run: Mapping[str, Any], dataset: Mapping[str, Any], results: list[Mapping[str, Any]]
) -> dict[str, Any]:
    """Select a trial on validation, confirm it against the champion on test and register it
    (pipeline.tracking.registry's rules), once per date.

    A decision already recorded under this date's parent run for the same candidates is returned as it
    is: re-running a date never registers, compares or moves an alias again.
    """
    from pipeline.tracking import history as champion_history
    from pipeline.tracking import registry

    cfg = config_of(run)
    parent = results[0]["parent_run_id"]
    run_ids = sorted({r["run_id"] for r in results})
    decision = _recorded_decision(cfg, parent, run_ids)
    if decision is not None:
        log.info(
            "decision for %s already recorded (run %s): %s",
            run["date"],
            decision.get("record_run_id"),
            decision["action"],
        )
    else:
        device = os.environ.get("PIPELINE_DEVICE", "auto")
        actor = f"airflow {run['dag_id']} run {run['run_id']}"
        decision = registry.promote(
            cfg, run_ids, parent_run_id=parent, device=device, date=run["date"], actor=actor
        ).to_dict()
        champion_history.log_for_decision(cfg, decision)  # the picture of every champion so far, on the record
    log.info("promotion decision: %s: %s", decision["action"], decision["reason"])
    return {
        "decision": decision,
        "champion": _champion(cfg),
        "trials": [dict(r) for r in sorted(results, key=lambda r: r["name"])],
        "parent_run_id": parent,
        "experiment_id": results[0]["experiment_id"],
        "dataset": {
            k: dataset[k] for k in ("uri", "fingerprint", "counts", "partitions", "rows_quarantined")
        },
    }


def _recorded_decision(cfg: PipelineConfig, parent_run_id: str, run_ids: list[str]) -> dict[str, Any] | None:
    import mlflow

    from pipeline.tracking import registry
    from pipeline.tracking import runs as tracking

    experiment_id = tracking.configure(cfg.tracking)
    client = mlflow.MlflowClient()
    query = (
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{registry.TAG_KIND}` = 'promotion' "
        "and attributes.status = 'FINISHED'"
    )
    for record in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        try:
            decision = mlflow.artifacts.load_dict(f"{record.info.artifact_uri}/decision.json")
        except Exception:  # noqa: BLE001 - a record without its file is not a usable decision
            continue
        if sorted(c["run_id"] for c in decision.get("candidates", [])) == run_ids:
            return decision
    return None


def _champion(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The registry's champion after the decision, with the metrics of the run it came from, whether it
    is pinned and the operator action (``promote --to-version`` / ``--rollback``) that put it there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registry
    from pipeline.tracking import runs as tracking

    tracking.configure(cfg.tracking)
    client = mlflow.MlflowClient()
    tcfg = cfg.tracking
    version = registry.champion_version(client, tcfg.registered_model, tcfg.champion_alias)
    if version is None:
        return None
    champion: dict[str, Any] = {
        "name": tcfg.registered_model,
        "alias": tcfg.champion_alias,
        "version": str(version.version),
        "run_id": version.run_id,
        "experiment_id": None,
        "metrics": {},
        "pinned": None,
        "operator_action": None,
    }
    pin = registry.pin_state(client, tcfg.registered_model)
    if pin is not None:
        champion["pinned"] = {"by": pin.actor, "reason": pin.reason, "at": pin.at}
    if version.tags.get(registry.TAG_OPERATOR_ACTION):
        champion["operator_action"] = {
            "action": version.tags[registry.TAG_OPERATOR_ACTION],
            "by": version.tags.get(registry.TAG_OPERATOR_ACTOR, ""),
            "reason": version.tags.get(registry.TAG_OPERATOR_REASON, ""),
        }
    try:
        source = client.get_run(version.run_id)
    except MlflowException as exc:  # a version registered from a since-deleted run still serves
        log.warning("champion v%s: source run %s not readable: %s", version.version, version.run_id, exc)
        return champion
    champion["experiment_id"] = source.info.experiment_id
    champion["metrics"] = _headline_metrics(source.data.metrics)
    return champion


def mlflow_run_link(experiment_id: str | None, run_id: str) -> str:
    """A link to the run in the MLflow UI (``$PIPELINE_MLFLOW_UI_URL`` or an http tracking URI), else ``runs:/``."""
    base = os.environ.get("PIPELINE_MLFLOW_UI_URL", "").strip()
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not base and tracking.startswith(("http://", "https://")):
        base = tracking
    if base and experiment_id:
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def format_note(run: Mapping[str, Any], promoted: Mapping[str, Any]) -> str:
    """The run's summary in a few Markdown lines: decision, metrics vs champion and baselines, links."""
    decision = promoted["decision"]
    metric = decision["metric"]
    recall = metric.replace("mrr_at_", "recall_at_")
    best = next((t for t in promoted["trials"] if t["run_id"] == decision.get("candidate_run_id")), None)
    best_metrics = best["metrics"] if best else {}
    valid = {c["run_id"]: c.get("valid_value") for c in decision.get("candidates") or []}  # what selected
    version = decision.get("candidate_version")
    head = {
        "promoted": f"**promoted**: {decision['model_name']} v{version} is now @champion",
        "challenger": f"**not promoted**: {decision['model_name']} v{version} tagged @challenger",
        "unchanged": f"**unchanged**: the candidate is already the champion (v{version})",
        "refused": "**refused**: the alias did not move",
        "pinned": f"**pinned**: @champion is frozen; {decision['model_name']} v{version} compared and tagged @challenger",
    }.get(decision["action"], f"**{decision['action']}**")
    if decision.get("champion_version") and decision.get("champion_value") is None:
        versus = f" vs champion v{decision['champion_version']} (not compared)"
    elif decision.get("champion_version"):
        versus = f" vs champion v{decision['champion_version']} {_fmt(decision.get('champion_value'))} (same test data)"
    else:
        versus = " (no champion before)"
    lines = [
        f"{head} ({run['date']})",
        f"{metric}: candidate {_fmt(decision.get('candidate_value'))}{versus}"
        f" | S-POP {_fmt(best_metrics.get('baseline_spop_' + metric))} | POP {_fmt(best_metrics.get('baseline_pop_' + metric))}",
        f"{recall}: candidate {_fmt(best_metrics.get(recall))} | S-POP {_fmt(best_metrics.get('baseline_spop_' + recall))}"
        f" | POP {_fmt(best_metrics.get('baseline_pop_' + recall))}",
        "trials: "
        + "; ".join(
            f"{t['name']} ({t['label']}) valid {_fmt(valid.get(t['run_id']))} test {_fmt(t['metrics'].get(metric))}"
            for t in promoted["trials"]
        ),
        f"selected on {decision.get('selected_on', '-')} among {decision.get('n_trials', len(promoted['trials']))} trial(s)",
        f"reason: {decision['reason']}",
    ]
    champion = promoted.get("champion") or {}
    if champion.get("pinned"):
        pin = champion["pinned"]
        lines.append(f"@champion v{champion['version']} pinned by {pin['by']} since {pin['at']}: {pin['reason']}")
    if champion.get("operator_action"):
        op = champion["operator_action"]
        lines.append(f"@champion v{champion['version']} set by operator ({op['action']}, {op['by']}): {op['reason']}")
    links = [f"parent run {mlflow_run_link(promoted['experiment_id'], promoted['parent_run_id'])}"]
    if best:
        links.append(f"best trial {mlflow_run_link(promoted['experiment_id'], best['run_id'])}")
    tail = "MLflow: " + ", ".join(links)
    note = "\n".join(lines)
    # Keep the links even when a long reason would push the note past Airflow's limit.
    room = NOTE_LIMIT - len(tail) - 1
    return (note if len(note) <= room else note[: room - 1] + "…") + "\n" + tail


def _partitions_waited(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The late partitions this run waited for, and how long (from its sensor's wait record)."""
    from pipeline.data import partitions

    return partitions.waited_for(partitions.read_record(run))


def summarize(run: Mapping[str, Any], promoted: Mapping[str, Any]) -> str:
    """Log the summary, write it next to the outputs, close the parent run and set the DAG run note."""
    from pipeline import storage
    from pipeline.tracking import runs as tracking

    cfg = config_of(run)
    note = format_note(run, promoted)
    log.info("run summary:\n%s", note)
    storage.write_json(
        run["summary_uri"],
        {
            "dag_id": run["dag_id"],
            "run_id": run["run_id"],
            "date": run["date"],
            "note": note,
            **{
                k: promoted[k]
                for k in ("decision", "champion", "trials", "parent_run_id", "experiment_id", "dataset")
            },
            "partitions_waited": _partitions_waited(run),
        },
    )
    tracking.configure(cfg.tracking)
    tracking.end_run(promoted["parent_run_id"])
    set_run_note(run["dag_id"], run["run_id"], note, cfg.airflow.api_conn_id)
    return note
