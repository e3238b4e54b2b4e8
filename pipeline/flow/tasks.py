"""The DAG's tasks at the Airflow boundary: one function per task of ``dags/gru4rec_daily.py``, named as the task.

Each takes and returns the task's XCom values (JSON: Airflow serialises XCom), turns them into the typed
contracts of :mod:`pipeline.flow.contracts` and calls the task's body, which works on those types only:

- ``plan``: :func:`pipeline.flow.plan.plan_run` -> RunPlan
- ``wait_for_partition``: :func:`pipeline.flow.plan.wait_for_partitions` -> the sensor's wait record
- ``partitions``: :func:`pipeline.flow.plan.list_partitions` -> [Partition]
- ``validate``: :func:`pipeline.flow.dataset.validate_partition` -> PartitionReport
- ``build``: :func:`pipeline.flow.dataset.build_dataset` -> Dataset (and the Asset event's extra)
- ``prepare_trials``: :func:`pipeline.flow.training.prepare_trials` -> [Trial]
- ``train``: :func:`pipeline.flow.training.train_trial` -> TrialResult
- ``promote``: :func:`pipeline.flow.promotion.evaluate_and_promote` -> Promotion
- ``summary``: :func:`pipeline.flow.summary.summarize` -> the note
- ``watch``: :func:`pipeline.flow.watch.check_run` -> the alerts raised ([{kind, title}])
- ``retention``: :func:`pipeline.flow.retention.retention_task` -> what was deleted

Every body is idempotent for a run date (outputs addressed by the date and committed atomically, MLflow
trial runs keyed by (date, trial), registry versions by their source run) and runs without a scheduler.
The DAG file imports this module while it is parsed: the modules imported here load only the standard
library and the config; GX, torch and MLflow are imported inside the bodies that use them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.flow import dataset as datasets
from pipeline.flow import plan as planning
from pipeline.flow import promotion, training
from pipeline.flow import summary as summaries
from pipeline.flow.contracts import (
    Dataset,
    Partition,
    PartitionReport,
    Promotion,
    RunPlan,
    Trial,
    TrialResult,
    to_xcom,
    to_xcom_list,
)

Json = dict[str, Any]


# The tasks, in DAG order


def plan(params: Mapping[str, Any], *, logical_date: dt.datetime | None, dag_id: str, run_id: str) -> Json:
    return to_xcom(planning.plan_run(params, logical_date=logical_date, dag_id=dag_id, run_id=run_id))


def wait_for_partition(run: Mapping[str, Any], first_poke: dt.datetime | None) -> Json | None:
    return planning.wait_for_partitions(RunPlan.from_xcom(run), first_poke)


def partitions(run: Mapping[str, Any]) -> list[Json]:
    return to_xcom_list(planning.list_partitions(RunPlan.from_xcom(run)))


def validate(partition: Mapping[str, Any], run: Mapping[str, Any]) -> Json:
    return to_xcom(datasets.validate_partition(Partition.from_xcom(partition), RunPlan.from_xcom(run)))


def build(run: Mapping[str, Any], reports: Sequence[Mapping[str, Any]]) -> Json:
    parts = [PartitionReport.from_xcom(r) for r in reports]
    return to_xcom(datasets.build_dataset(RunPlan.from_xcom(run), parts))


def asset_extra(run: Mapping[str, Any], dataset: Mapping[str, Any]) -> Json:
    """The ``extra`` of the Asset event ``build`` emits."""
    return datasets.asset_extra(RunPlan.from_xcom(run), Dataset.from_xcom(dataset))


def prepare_trials(run: Mapping[str, Any], dataset: Mapping[str, Any]) -> list[Json]:
    trials = training.prepare_trials(RunPlan.from_xcom(run), Dataset.from_xcom(dataset))
    return to_xcom_list(trials)


def train(trial: Mapping[str, Any]) -> Json:
    return to_xcom(training.train_trial(Trial.from_xcom(trial)))


def promote(run: Mapping[str, Any], dataset: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> Json:
    trials = [TrialResult.from_xcom(r) for r in results]
    return to_xcom(promotion.evaluate_and_promote(RunPlan.from_xcom(run), Dataset.from_xcom(dataset), trials))


def summary(run: Mapping[str, Any], promoted: Mapping[str, Any]) -> str:
    return summaries.summarize(RunPlan.from_xcom(run), Promotion.from_xcom(promoted))


def watch(run: Mapping[str, Any], dataset: Mapping[str, Any]) -> list[Json]:
    from pipeline.flow import watch as watching  # MLflow and storage lookups: not at DAG parse time

    return watching.check_run(RunPlan.from_xcom(run), Dataset.from_xcom(dataset))


def retention(run: Mapping[str, Any]) -> Json:
    from pipeline.flow.retention import retention_task  # pyarrow: not at DAG parse time

    return retention_task(run)
