"""Typed contracts between the DAG's tasks, and their one conversion to and from XCom JSON.

Each task of ``dags/gru4rec_daily.py`` hands the next ones one of these frozen dataclasses (a run plan,
partitions, validation reports, the dataset, trials, trial results, the promotion). Airflow stores XCom
values as JSON, so :func:`to_xcom` (dataclass -> dict, field order kept) and each class's ``from_xcom``
(dict -> dataclass) are the only places where a contract meets string keys; :mod:`pipeline.flow.tasks`
calls them, the task bodies work on the typed values. The dicts are exactly what the tasks returned
before the contracts existed, so XCom, the summary file and the MLflow notes read the same.

Standard library only: the DAG file imports this module while it is parsed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_xcom(contract: Any) -> Json:
    """A contract as its XCom value: a dict in field order, nested contracts as dicts, lists as lists.

    Unlike ``dataclasses.asdict`` tuples become lists, so Airflow's XCom serialiser sees plain JSON.
    """
    if not dataclasses.is_dataclass(contract) or isinstance(contract, type):
        raise TypeError(f"not a contract: {contract!r}")
    return dict(_plain(contract))


def to_xcom_list(contracts: Sequence[Any]) -> list[Json]:
    """A mapped task's list of contracts as its XCom value."""
    return [to_xcom(c) for c in contracts]


# ---------------------------------------------------------------------------------------------
# plan -> partitions -> validate -> build


@dataclass(frozen=True)
class TrialSpec:
    """One point of the run's grid or search: a full GRU4Rec config and the key its MLflow run is found by."""

    name: str  # t00, t01, ... in grid order
    key: str  # hash of the params: the same settings find the same MLflow run on a re-run
    label: str  # "learning_rate=0.1, layers=[64]" (the grid point), or "base"
    params: Json  # the GRU4Rec config as a dict (pipeline.config.GRU4RecConfig)

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> TrialSpec:
        return cls(str(data["name"]), str(data["key"]), str(data["label"]), dict(data["params"]))


@dataclass(frozen=True)
class RunPlan:
    """What every task of one DAG run shares, fixed once by ``plan``: dates, roots, trials, config."""

    dag_id: str
    run_id: str
    date: str  # the run's date (YYYY-MM-DD): the last day of data, addresses every output
    window_start: str  # the first day this run validates
    train_start: str  # the first day of the training window
    data_uri: str  # click-log root of the dt=YYYY-MM-DD partitions
    output_uri: str
    dataset_uri: str
    models_uri: str
    summary_uri: str
    trials: list[TrialSpec]
    config: Json  # the pipeline config snapshot (pipeline.config.to_dict), identical for every task

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> RunPlan:
        return cls(
            dag_id=str(data["dag_id"]),
            run_id=str(data["run_id"]),
            date=str(data["date"]),
            window_start=str(data["window_start"]),
            train_start=str(data["train_start"]),
            data_uri=str(data["data_uri"]),
            output_uri=str(data["output_uri"]),
            dataset_uri=str(data["dataset_uri"]),
            models_uri=str(data["models_uri"]),
            summary_uri=str(data["summary_uri"]),
            trials=[TrialSpec.from_xcom(t) for t in data["trials"]],
            config=dict(data["config"]),
        )


@dataclass(frozen=True)
class Partition:
    """One day of click logs to validate, and where its validated rows and report go."""

    date: str
    input_uri: str
    out_uri: str
    reuse: bool  # a day before window_start: its own run's passing report is reused

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> Partition:
        return cls(str(data["date"]), str(data["input_uri"]), str(data["out_uri"]), bool(data["reuse"]))


@dataclass(frozen=True)
class PartitionReport:
    """The outcome of validating one partition (the GX report's counts and where it is)."""

    date: str
    input_uri: str
    out_uri: str
    report_uri: str
    data_docs_uri: str
    rows_in: int
    rows_valid: int
    rows_quarantined: int
    reused: bool

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> PartitionReport:
        return cls(
            date=str(data["date"]),
            input_uri=str(data["input_uri"]),
            out_uri=str(data["out_uri"]),
            report_uri=str(data["report_uri"]),
            data_docs_uri=str(data["data_docs_uri"]),
            rows_in=int(data["rows_in"]),
            rows_valid=int(data["rows_valid"]),
            rows_quarantined=int(data["rows_quarantined"]),
            reused=bool(data["reused"]),
        )


@dataclass(frozen=True)
class DatasetSummary:
    """The session dataset as the promotion and the summary describe it."""

    uri: str
    fingerprint: str
    counts: Json  # the build manifest's counts (split -> sessions/events, quarantined)
    partitions: list[str]  # the days it was built from
    rows_quarantined: int  # in validation plus in the build

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> DatasetSummary:
        return cls(str(data["uri"]), str(data["fingerprint"]), dict(data["counts"]),
                   [str(d) for d in data["partitions"]], int(data["rows_quarantined"]))  # fmt: skip


@dataclass(frozen=True)
class Dataset(DatasetSummary):
    """The ``build`` task's session dataset: its summary plus the validation reports of its days."""

    reports: list[str]

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> Dataset:
        base = DatasetSummary.from_xcom(data)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                   reports=[str(r) for r in data["reports"]])  # fmt: skip

    def summary(self) -> DatasetSummary:
        return DatasetSummary(self.uri, self.fingerprint, self.counts, self.partitions, self.rows_quarantined)


# ---------------------------------------------------------------------------------------------
# prepare_trials -> train -> promote


@dataclass(frozen=True)
class Trial:
    """One mapped ``train`` task's input: the trial's settings and where it logs and checkpoints."""

    name: str
    label: str
    params: Json  # the GRU4Rec config
    run_key: str  # (date, data, trial): a retry or re-run finds its finished MLflow run
    parent_run_id: str
    dataset_uri: str
    models_uri: str
    date: str
    config: Json  # the run's pipeline config snapshot

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> Trial:
        return cls(
            name=str(data["name"]),
            label=str(data["label"]),
            params=dict(data["params"]),
            run_key=str(data["run_key"]),
            parent_run_id=str(data["parent_run_id"]),
            dataset_uri=str(data["dataset_uri"]),
            models_uri=str(data["models_uri"]),
            date=str(data["date"]),
            config=dict(data["config"]),
        )


@dataclass(frozen=True)
class TrialResult:
    """A trained trial: its MLflow run, logged model and headline metrics."""

    name: str
    label: str
    run_id: str
    experiment_id: str
    parent_run_id: str
    model_uri: str
    metrics: dict[str, float]  # recall_at_K / mrr_at_K and the baselines' (pipeline.flow.training)
    reused: bool  # the run had finished before (a retry or re-run of the date)

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> TrialResult:
        return cls(
            name=str(data["name"]),
            label=str(data["label"]),
            run_id=str(data["run_id"]),
            experiment_id=str(data["experiment_id"]),
            parent_run_id=str(data["parent_run_id"]),
            model_uri=str(data["model_uri"]),
            metrics={str(k): float(v) for k, v in data["metrics"].items()},
            reused=bool(data["reused"]),
        )


# ---------------------------------------------------------------------------------------------
# promote -> summary


@dataclass(frozen=True)
class PinInfo:
    """Who froze the champion, when and why (``promote --pin``)."""

    by: str
    reason: str
    at: str


@dataclass(frozen=True)
class OperatorAction:
    """The operator lever (``promote --to-version`` / ``--rollback``) that set the champion."""

    action: str
    by: str
    reason: str


@dataclass(frozen=True)
class Champion:
    """The registry's champion after the decision, with the metrics of the run it came from."""

    name: str
    alias: str
    version: str
    run_id: str
    experiment_id: str | None
    metrics: dict[str, float]
    pinned: PinInfo | None
    operator_action: OperatorAction | None

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> Champion:
        pinned, op = data.get("pinned"), data.get("operator_action")
        return cls(
            name=str(data["name"]),
            alias=str(data["alias"]),
            version=str(data["version"]),
            run_id=str(data["run_id"]),
            experiment_id=data.get("experiment_id"),
            metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
            pinned=PinInfo(str(pinned["by"]), str(pinned["reason"]), str(pinned["at"])) if pinned else None,
            operator_action=OperatorAction(str(op["action"]), str(op["by"]), str(op["reason"]))
            if op
            else None,
        )


@dataclass(frozen=True)
class Decision:
    """The fields of the registry's decision record (``pipeline.tracking.decision.Decision``) the DAG reads.

    The record itself travels verbatim in :attr:`Promotion.decision` (it is the audit trail); this is its
    typed view.
    """

    action: str
    reason: str
    model_name: str
    metric: str
    candidate_run_id: str | None
    candidate_version: str | None
    champion_version: str | None
    candidate_value: float | None
    champion_value: float | None
    selected_on: str  # validation | ... | "-" when the record does not say
    n_trials: int | None
    valid_values: dict[str, float | None]  # candidate run id -> value it was selected on (validation)
    record_run_id: str | None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Decision:
        return cls(
            action=str(record["action"]),
            reason=str(record["reason"]),
            model_name=str(record.get("model_name", "")),
            metric=str(record["metric"]),
            candidate_run_id=record.get("candidate_run_id"),
            candidate_version=record.get("candidate_version"),
            champion_version=record.get("champion_version"),
            candidate_value=record.get("candidate_value"),
            champion_value=record.get("champion_value"),
            selected_on=str(record.get("selected_on", "-")),
            n_trials=record.get("n_trials"),
            valid_values={c["run_id"]: c.get("valid_value") for c in record.get("candidates") or []},
            record_run_id=record.get("record_run_id"),
        )


@dataclass(frozen=True)
class Promotion:
    """The ``promote`` task's outcome: the decision record, the champion after it, the trials, the data."""

    decision: Json  # the registry's decision record, verbatim (see :class:`Decision` for the typed view)
    champion: Champion | None
    trials: list[TrialResult]  # by trial name
    parent_run_id: str
    experiment_id: str
    dataset: DatasetSummary

    @property
    def verdict(self) -> Decision:
        return Decision.from_record(self.decision)

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> Promotion:
        champion = data.get("champion")
        return cls(
            decision=dict(data["decision"]),
            champion=Champion.from_xcom(champion) if champion else None,
            trials=[TrialResult.from_xcom(t) for t in data["trials"]],
            parent_run_id=str(data["parent_run_id"]),
            experiment_id=str(data["experiment_id"]),
            dataset=DatasetSummary.from_xcom(data["dataset"]),
        )
