"""
### GRU4Rec daily training

Every day this DAG turns the day's click logs into a new candidate recommender and promotes it only
when it is better than the model in production.

1. **plan** / **partitions**: the run's date (the logical date, or the `window_end` Param), the
   trials of the grid, where every output goes (all addressed by the date, so a re-run overwrites
   instead of duplicating) and the click-log partitions `dt=YYYY-MM-DD/` of the training window.
   **wait_for_partition** first waits for the run's own partition (every day from `window_start`
   when that Param is set) when it is late (a sensor in
   reschedule mode: no worker slot is held between looks every `airflow.partition_poke_minutes`; with
   `airflow.partition_marker` set, e.g. `_SUCCESS`, also for that marker) and fails the run with
   "no partition dt=X after N h" after `airflow.partition_timeout_hours`.
2. **validate** (one mapped task per partition): the Great Expectations suite; bad rows go to
   quarantine, a table-level failure (missing column, empty day, too many bad rows) fails the run
   here, before any training, with the path of the report in the log.
3. **build**: the Parquet session dataset (train / valid / test) of the window; emits the Asset
   `gru4rec_daily_session_dataset` (event extra: the dataset's URI, date and fingerprint) so other
   DAGs can react to a new dataset.
4. **prepare_trials** / **train** (one mapped task per grid point): GRU4Rec training on the `gpu`
   queue and in the `gpu` pool (how many trials share the GPUs); each trial is an MLflow run nested
   under one parent run per DAG run, keyed by (date, trial) so retries resume instead of duplicating.
5. **promote**: registers the best trial and compares it with the `@champion` on the same test data
   (paired bootstrap on MRR@20 plus the promotion margin); the alias moves only when it is better.
6. **summary**: the decision, metrics vs champion and baselines and links to the MLflow runs, in the
   task log and as this DAG run's note.
7. **watch**: warns when a day's quarantined share is above `alerts.quarantine_warn_share` or the
   champion stayed in place for `alerts.champion_stale_runs` decisions in a row (pipeline/flow/watch.py).
8. **retention**: deletes outputs older than the `retention.*_days` ages, never what `@champion` /
   `@challenger` were built from (pipeline/flow/retention.py; `python -m pipeline retention --dry-run`).

**Alerts** (e-mail and/or a JSON webhook, `alerts:` in the config; none by default): a task failed after
its last retry, a validation failure (report + top quarantine reasons), a run not finished
`alerts.deadline_hours` after it was queued, and the two warnings of **watch**. docs/runbook.md says
what each means and what to run.

**Trigger with config** to override the date window, the grid (a mapping of GRU4Rec parameter ->
list of values, or a list of per-trial mappings) or a random search (`search.n_trials` points drawn
from a search space, trained in parallel), the training window and the promotion margin. A day
validated by an earlier run is reused; to pick up late data for day X, clear that day's run (or
set `window_start` to X). Runs for dates before `airflow.start_date` do nothing.
Deployment settings (data/output roots, queue, pool, retries, schedule) come from the pipeline
config file named by `PIPELINE_CONFIG` (section `airflow:`) and `PIPELINE_DATA_URI` /
`PIPELINE_OUTPUT_URI` / `MLFLOW_TRACKING_URI`. The `gpu` pool must exist
(`airflow pools set gpu 1 "GPU trainers"`) and a Celery worker must listen on the queue
(`airflow celery worker -q gpu`). Each task makes one call into `pipeline/flow/tasks.py`, where its XCom
values become the typed contracts of `pipeline/flow/contracts.py`; all logic lives under `pipeline/flow/`.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset, Param, PokeReturnValue, dag, get_current_context, task

from pipeline.flow import alerts, failures, settings, tasks

SETTINGS = settings.dag_settings()
CONFIG = settings.load_pipeline_config()  # alert channels and the deadline (pipeline.flow.alerts)
SESSION_DATASET = Asset(name=SETTINGS.dataset_asset[0], uri=SETTINGS.dataset_asset[1])


def _as_list(mapped_results: Any) -> list[Any]:
    # Indexing a mapped task's lazy results by length reads each XCom once; plain iteration probes one
    # past the end and logs an "XCom not found" error on every run.
    return [mapped_results[i] for i in range(len(mapped_results))]


@dag(
    dag_id=SETTINGS.dag_id,
    schedule=SETTINGS.timetable(),
    start_date=SETTINGS.start_date,
    catchup=False,
    max_active_runs=1,
    deadline=alerts.deadline(CONFIG),  # a run still going alerts.deadline_hours after it was queued
    default_args={
        "owner": "ml-platform",
        "retries": SETTINGS.retries,
        "retry_delay": SETTINGS.retry_delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": SETTINGS.max_retry_delay,
        # Bad data, bad settings and NaN losses fail at once: retrying cannot fix them.
        "retry_policy": SETTINGS.retry_policy(),
        # Called once a task failed for good (after its last retry): log + close the MLflow run, then tell people.
        "on_failure_callback": [failures.on_task_failure, *alerts.failure_callbacks(CONFIG)],
    },
    params={
        "window_start": Param(
            None,
            type=["null", "string"],
            format="date",
            description="First day to validate (YYYY-MM-DD); empty = the run's date.",
        ),
        "window_end": Param(
            None,
            type=["null", "string"],
            format="date",
            description="The run's date: last day of data (YYYY-MM-DD); empty = the logical date.",
        ),
        "train_days": Param(
            SETTINGS.train_days,
            type="integer",
            minimum=1,
            description="Days of data in the training window, ending at the run's date (valid/test included).",
        ),
        "grid": Param(
            SETTINGS.grid,
            type=["object", "array"],
            description="Hyperparameter grid: {param: [values]} (cartesian product) or [{param: value}, ...].",
        ),
        "search": Param(
            {},
            type="object",
            description='Random search instead of the grid: {"n_trials": 4, "seed": 0, "space": {...}} '
            "(space: pipeline.model.tune's format; default: its built-in space). Empty = use the grid.",
        ),
        "gru4rec": Param(
            {},
            type="object",
            description='GRU4Rec settings applied to every trial before the grid, e.g. {"n_epochs": 5}.',
        ),
        "promotion_margin": Param(
            SETTINGS.promotion_margin,
            type="number",
            minimum=0,
            description="How much better (absolute, primary metric) a candidate must be than the champion.",
        ),
        "data_uri": Param(
            "", type="string", description="Click-log root (local or s3://); empty = deployment default."
        ),
        "output_uri": Param(
            "", type="string", description="Output root (local or s3://); empty = deployment default."
        ),
    },
    doc_md=__doc__,
    tags=["gru4rec", "training", "mlflow"],
)
def gru4rec_daily() -> None:
    @task
    def plan(params: dict[str, Any] | None = None, logical_date=None, dag_run=None) -> dict[str, Any]:
        return tasks.plan(
            params or {}, logical_date=logical_date, dag_id=dag_run.dag_id, run_id=dag_run.run_id
        )

    @task.sensor(
        mode="reschedule",  # the worker slot is free between looks
        poke_interval=SETTINGS.partition_poke_interval,
        timeout=SETTINGS.partition_sensor_timeout,
    )
    def wait_for_partition(run: dict[str, Any]) -> PokeReturnValue:
        context = get_current_context()
        first_poke = context["ti"].get_first_reschedule_date(context)
        record = tasks.wait_for_partition(run, first_poke)
        return PokeReturnValue(is_done=record is not None, xcom_value=record)

    @task
    def partitions(run: dict[str, Any]) -> list[dict[str, Any]]:
        return tasks.partitions(run)

    @task(map_index_template="{{ partition_date }}")
    def validate(partition: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
        get_current_context()["partition_date"] = partition["date"]  # type: ignore[typeddict-unknown-key]
        return tasks.validate(partition, run)

    @task(outlets=[SESSION_DATASET])
    def build(run: dict[str, Any], reports: list[dict[str, Any]], outlet_events=None) -> dict[str, Any]:
        dataset = tasks.build(run, _as_list(reports))
        outlet_events[SESSION_DATASET].extra = tasks.asset_extra(run, dataset)
        return dataset

    @task
    def prepare_trials(run: dict[str, Any], dataset: dict[str, Any]) -> list[dict[str, Any]]:
        return tasks.prepare_trials(run, dataset)

    @task(queue=SETTINGS.queue, pool=SETTINGS.pool, map_index_template="{{ trial_name }}")
    def train(trial: dict[str, Any]) -> dict[str, Any]:
        get_current_context()["trial_name"] = f"{trial['name']} {trial['label']}"  # type: ignore[typeddict-unknown-key]
        return tasks.train(trial)

    @task
    def promote(
        run: dict[str, Any], dataset: dict[str, Any], results: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return tasks.promote(run, dataset, _as_list(results))

    @task
    def summary(run: dict[str, Any], decision: dict[str, Any]) -> str:
        return tasks.summary(run, decision)

    @task
    def watch(run: dict[str, Any], dataset: dict[str, Any], decision: dict[str, Any]) -> list[dict[str, Any]]:
        # `decision` only orders it after promote: the champion's record then includes today's decision.
        return tasks.watch(run, dataset)

    @task
    def retention(run: dict[str, Any]) -> dict[str, Any]:
        return tasks.retention(run)

    run = plan()
    partition_list = partitions(run)
    wait_for_partition(run) >> partition_list
    reports = validate.partial(run=run).expand(partition=partition_list)
    dataset = build(run, reports)
    results = train.expand(trial=prepare_trials(run, dataset))
    promoted = promote(run, dataset, results)
    done = [summary(run, promoted), watch(run, dataset, promoted)]
    done >> retention(run)


gru4rec_daily()
