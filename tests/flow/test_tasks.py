"""Unit tests of the task bodies' own logic (no Airflow, no MLflow): dates, windows, grids, partitions, notes,
and the typed contracts' round trip through XCom JSON."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.flow import plan as planning
from pipeline.flow import summary, tasks
from pipeline.flow.contracts import (
    DatasetSummary,
    Partition,
    Promotion,
    RunPlan,
    TrialResult,
    to_xcom,
    to_xcom_list,
)

LOGICAL = dt.datetime(2026, 3, 5, tzinfo=dt.UTC)


def plan(**params) -> RunPlan:
    return planning.plan_run(params, logical_date=LOGICAL, dag_id="gru4rec_daily", run_id="manual__x")


def test_grid_mapping_is_a_cartesian_product_with_published_names(pipeline_home: Path) -> None:
    trials = planning.expand_grid({"learning_rate": [0.1, 0.2], "layers": [[64], [64, 64]]}, {"n_epochs": 2})
    assert [t.name for t in trials] == ["t00", "t01", "t02", "t03"]
    assert [(t.params["learning_rate"], t.params["layers"]) for t in trials] == [
        (0.1, [64]),
        (0.1, [64, 64]),
        (0.2, [64]),
        (0.2, [64, 64]),
    ]
    assert all(t.params["n_epochs"] == 2 for t in trials)
    assert trials[0].label == "learning_rate=0.1, layers=[64]"
    assert len({t.key for t in trials}) == 4


def test_grid_list_dedupes_and_keys_depend_only_on_the_parameters(pipeline_home: Path) -> None:
    a = planning.expand_grid([{"learning_rate": 0.1}, {"learning_rate": 0.1}, {"momentum": 0.0}])
    assert [t.label for t in a] == ["learning_rate=0.1", "momentum=0.0"]  # the repeated point is run once
    b = planning.expand_grid([{"learning_rate": 0.1}])
    assert a[0].key == b[0].key  # same settings -> same MLflow run key on a re-run with another grid
    assert planning.expand_grid({})[0].label == "base"


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"learning_rat": [0.1]}, "learning_rat"),
        ({"learning_rate": []}, "at least one value"),
        ({"batch_size": ["big"]}, "batch_size"),
        ("learning_rate=0.1", "expected"),
    ],
)
def test_bad_grids_fail_in_plan_with_the_name(pipeline_home: Path, grid, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(grid=grid)


def test_plan_addresses_every_output_by_the_run_date(pipeline_home: Path) -> None:
    run = plan(grid={"learning_rate": [0.1]}, gru4rec={"n_epochs": 1}, promotion_margin=0.01, train_days=3)
    out = str(pipeline_home / "output")
    assert run.date == "2026-03-05"
    assert run.window_start == "2026-03-05" and run.train_start == "2026-03-03"
    assert run.data_uri == str(pipeline_home / "data" / "clicks")
    assert run.dataset_uri == f"{out}/datasets/dt=2026-03-05"
    assert run.models_uri == f"{out}/models/dt=2026-03-05"
    assert run.summary_uri == f"{out}/runs/dt=2026-03-05/summary.json"
    assert run.config["tracking"]["promotion_margin"] == 0.01
    assert [t.params["n_epochs"] for t in run.trials] == [1]


def test_plan_window_params_and_roots(pipeline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_OUTPUT_URI", "s3://bucket/prod")
    run = plan(window_start="2026-02-27", window_end="2026-03-01", train_days=2, data_uri="s3://raw/clicks/")
    assert (run.date, run.window_start, run.train_start) == (
        "2026-03-01",
        "2026-02-27",
        "2026-02-27",
    )
    assert run.data_uri == "s3://raw/clicks"
    assert run.dataset_uri == "s3://bucket/prod/datasets/dt=2026-03-01"
    with pytest.raises(ConfigError, match="after window_end"):
        plan(window_start="2026-03-09")
    with pytest.raises(ConfigError, match="window_end"):
        plan(window_end="yesterday")
    with pytest.raises(ConfigError, match="no logical date"):
        planning.plan_run({}, logical_date=None, dag_id="d", run_id="r")


def test_partitions_of_the_window(pipeline_home: Path) -> None:
    clicks = pipeline_home / "data" / "clicks"
    for day in ("2026-03-02", "2026-03-04", "2026-03-05"):
        (clicks / f"dt={day}").mkdir(parents=True)
    run = plan(train_days=4)
    parts = planning.list_partitions(run)
    # 03-03 is missing: an older day of the window may be absent (the window is shorter).
    assert [(p.date, p.reuse) for p in parts] == [
        ("2026-03-02", True),
        ("2026-03-04", True),
        ("2026-03-05", False),
    ]
    assert parts[-1].input_uri == f"{clicks}/dt=2026-03-05"
    assert parts[-1].out_uri == f"{pipeline_home / 'output'}/validated/dt=2026-03-05"
    # A day of the run's own window must exist.
    with pytest.raises(InputError, match="dt=2026-03-03"):
        planning.list_partitions(plan(window_start="2026-03-03", train_days=1))


def test_note_fits_airflow_and_keeps_links(pipeline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_MLFLOW_UI_URL", "http://mlflow.example:5000/")
    trial = TrialResult(
        name="t00",
        label="learning_rate=0.1",
        run_id="abc",
        experiment_id="7",
        parent_run_id="par",
        model_uri="runs:/abc/model",
        metrics={
            "mrr_at_20": 0.31,
            "recall_at_20": 0.6,
            "baseline_spop_mrr_at_20": 0.2,
            "baseline_pop_mrr_at_20": 0.01,
        },
        reused=False,
    )
    promoted = Promotion(
        decision={
            "action": "challenger",
            "metric": "mrr_at_20",
            "model_name": "gru4rec",
            "candidate_run_id": "abc",
            "candidate_version": "3",
            "champion_version": "2",
            "candidate_value": 0.31,
            "champion_value": 0.30,
            "reason": "not significant " * 200,
        },
        champion=None,
        trials=[trial],
        parent_run_id="par",
        experiment_id="7",
        dataset=DatasetSummary("", "", {}, [], 0),
    )
    note = summary.format_note("2026-03-05", promoted)
    assert len(note) <= summary.NOTE_LIMIT
    assert note.startswith("**not promoted**: gru4rec v3 tagged @challenger (2026-03-05)")
    assert (
        "mrr_at_20: candidate 0.3100 vs champion v2 0.3000 (same test data) | S-POP 0.2000 | POP 0.0100"
        in note
    )
    assert note.endswith(
        "MLflow: parent run http://mlflow.example:5000/#/experiments/7/runs/par, "
        "best trial http://mlflow.example:5000/#/experiments/7/runs/abc"
    )


def test_search_draws_the_same_points_on_a_rerun_within_the_space(pipeline_home: Path) -> None:
    space = {
        "learning_rate": {"type": "float", "low": 0.05, "high": 0.2, "log": True},
        "layers": {"type": "categorical", "choices": [32, 64]},
    }
    first = plan(search={"n_trials": 3, "seed": 5, "space": space}).trials
    again = plan(search={"n_trials": 3, "seed": 5, "space": space}).trials
    assert [t.key for t in first] == [t.key for t in again]
    assert len({t.key for t in first}) == 3
    for t in first:
        assert 0.05 <= t.params["learning_rate"] <= 0.2 and t.params["layers"] in ([32], [64])
    with pytest.raises(ConfigError, match="n_trial"):
        plan(search={"n_trial": 3})


def test_contracts_round_trip_through_xcom_json(pipeline_home: Path) -> None:
    """What a task returns is plain JSON (Airflow serialises XCom) and reads back as the same contract."""
    run = plan(grid={"learning_rate": [0.1, 0.2]}, train_days=2)
    value = tasks.plan({"grid": {"learning_rate": [0.1, 0.2]}, "train_days": 2}, logical_date=LOGICAL,
                       dag_id="gru4rec_daily", run_id="manual__x")  # fmt: skip
    assert value == to_xcom(run) and json.loads(json.dumps(value)) == value
    assert RunPlan.from_xcom(value) == run
    assert list(value) == [f.name for f in dataclasses.fields(RunPlan)]  # the keys the tasks always passed
    assert value["trials"][0] == {"name": "t00", "key": run.trials[0].key, "label": "learning_rate=0.1",
                                  "params": run.trials[0].params}  # fmt: skip
    parts = [Partition("2026-03-05", "in", "out", reuse=False)]
    assert to_xcom_list(parts) == [{"date": "2026-03-05", "input_uri": "in", "out_uri": "out", "reuse": False}]
    with pytest.raises(KeyError, match="train_start"):
        RunPlan.from_xcom({k: v for k, v in value.items() if k != "train_start"})
