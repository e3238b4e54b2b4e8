"""DAG integrity: the file imports cleanly and cheaply, and has the tasks, routing and retries we rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
DAG_ID = "gru4rec_daily"

HEAVY = ("torch", "mlflow", "great_expectations", "pandas", "pyarrow", "sklearn", "optuna", "matplotlib")


def _dagbag(dag_folder: Path = DAGS):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(dag_folder))


@pytest.fixture
def dag(airflow_home: Path, pipeline_home: Path):
    bag = _dagbag()
    assert bag.import_errors == {}, bag.import_errors
    return bag.get_dag(DAG_ID)


def test_dagbag_imports_without_errors(airflow_home: Path, pipeline_home: Path) -> None:
    bag = _dagbag()
    assert bag.import_errors == {}
    assert bag.dag_ids == [DAG_ID]  # AIRFLOW__CORE__LOAD_EXAMPLES=False: only our DAG


def test_dag_file_has_no_heavy_imports_at_top_level(
    airflow_home: Path, pipeline_home: Path, run_python
) -> None:
    """Parsing must stay cheap: the dag-processor re-parses the file every 30 s by default."""
    code = f"""
import json, sys, time
import airflow.sdk  # the DAG's own dependency, not what we measure
start = time.perf_counter()
import runpy
runpy.run_path({str(DAGS / "gru4rec_daily.py")!r})
print(json.dumps({{"seconds": time.perf_counter() - start,
                   "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    proc = run_python(code, env={"AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"DAG file parse time (fresh interpreter, Airflow already imported): {result['seconds']:.3f}s")
    assert result["heavy"] == [], f"heavy modules imported at DAG parse time: {result['heavy']}"
    # A functional bound, not a benchmark: the dag-processor kills parses slower than this.
    from airflow.configuration import conf

    assert result["seconds"] < conf.getfloat("core", "dagbag_import_timeout")


def test_structure_and_dependencies(dag) -> None:
    assert set(dag.task_ids) == {
        "plan",
        "wait_for_partition",
        "partitions",
        "validate",
        "build",
        "prepare_trials",
        "train",
        "promote",
        "summary",
        "watch",
        "retention",
    }
    downstream = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert downstream["plan"] == [
        "build", "partitions", "prepare_trials", "promote", "retention", "summary", "validate",
        "wait_for_partition", "watch"
    ]  # fmt: skip
    assert downstream["wait_for_partition"] == ["partitions"]
    assert downstream["partitions"] == ["validate"]
    assert downstream["validate"] == ["build"]
    assert downstream["build"] == ["prepare_trials", "promote", "watch"]
    assert downstream["prepare_trials"] == ["train"]
    assert downstream["train"] == ["promote"]
    assert downstream["promote"] == ["summary", "watch"]
    # Retention comes last, after the summary and the alert checks.
    assert downstream["summary"] == downstream["watch"] == ["retention"]
    assert downstream["retention"] == []
    # Partitions validate in parallel and trials train in parallel: both are mapped.
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    mapped = sorted(t.task_id for t in dag.tasks if isinstance(t, MappedOperator))
    assert mapped == ["train", "validate"]


def test_late_data_sensor_gives_its_worker_slot_back_between_looks(dag) -> None:
    sensor = dag.get_task("wait_for_partition")
    assert sensor.mode == "reschedule"
    assert sensor.poke_interval == 5 * 60  # airflow.partition_poke_minutes
    # Airflow's own timeout comes after airflow.partition_timeout_hours: the pokes fail first, more clearly.
    assert sensor.timeout > 6 * 3600


def test_schedule_and_run_settings(dag) -> None:
    from airflow.sdk import CronDataIntervalTimetable

    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.expression == "0 0 * * *"  # @daily
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert "validate" in dag.doc_md and "promote" in dag.doc_md


def test_training_runs_on_the_gpu_queue_and_pool_everything_retries(dag) -> None:
    for t in dag.tasks:
        if t.task_id == "train":
            assert (t.queue, t.pool) == ("gpu", "gpu")
        else:
            assert (t.queue, t.pool) == ("default", "default_pool"), t.task_id
        assert t.retries == 2, t.task_id
        assert t.retry_exponential_backoff, t.task_id
        assert t.max_retry_delay is not None and t.max_retry_delay.total_seconds() == 30 * 60
        assert t.on_failure_callback, t.task_id
        assert t.retry_policy is not None, t.task_id


def test_bad_data_fails_without_retry_transient_errors_retry(dag) -> None:
    from airflow.sdk import RetryAction

    from pipeline.errors import ConfigError, TrainingError, ValidationFailed

    policy = dag.get_task("validate").retry_policy
    for exc in (ValidationFailed("bad"), ConfigError("bad"), TrainingError("nan")):
        assert policy.evaluate(exc, try_number=1, max_tries=3).action == RetryAction.FAIL
    assert policy.evaluate(ConnectionError("reset"), try_number=1, max_tries=3).action == RetryAction.DEFAULT


def test_build_emits_the_session_dataset_asset(dag) -> None:
    outlets = dag.get_task("build").outlets
    assert [(a.name, a.uri) for a in outlets] == [
        ("gru4rec_daily_session_dataset", "gru4rec://gru4rec_daily/session_dataset")
    ]


def test_params_defaults_and_trigger_form_validation(dag) -> None:
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    defaults = dag.params.validate()
    assert defaults["window_end"] is None and defaults["promotion_margin"] == 0.0
    assert defaults["grid"] == {"learning_rate": [0.1, 0.2], "dropout_p_hidden": [0.2, 0.4]}

    def with_conf(**conf):
        params = ParamsDict(dag.params)
        for key, value in conf.items():
            params[key] = value
        return params.validate()

    assert (
        with_conf(window_end="2026-03-02", grid=[{"layers": [64]}], promotion_margin=0.01)["promotion_margin"]
        == 0.01
    )
    with pytest.raises(ParamValidationError):
        with_conf(promotion_margin=-0.5)
    with pytest.raises(ParamValidationError):
        with_conf(train_days=0)
    with pytest.raises(ParamValidationError):
        with_conf(grid="learning_rate=0.1")


def test_deployment_config_moves_queue_pool_retries_and_schedule(
    airflow_home: Path, pipeline_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = pipeline_home / "pipeline.yaml"
    config.write_text(
        "airflow:\n"
        "  queue: trainers\n"
        "  pool: a100\n"
        "  retries: 4\n"
        "  schedule: '0 3 * * *'\n"
        "  output_uri: s3://bucket/gru4rec\n"
        "  grid: [{layers: [64]}]\n"
        "tracking:\n"
        "  promotion_margin: 0.002\n"
    )
    monkeypatch.setenv("PIPELINE_CONFIG", str(config))
    bag = _dagbag()
    assert bag.import_errors == {}
    dag = bag.get_dag(DAG_ID)
    train = dag.get_task("train")
    assert (train.queue, train.pool, train.retries) == ("trainers", "a100", 4)
    assert dag.timetable.expression == "0 3 * * *"
    assert dag.params["grid"] == [{"layers": [64]}]
    assert dag.params["promotion_margin"] == 0.002


def test_ruff_airflow_rules_clean() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run(
        [str(ruff), "check", "--select", "AIR", "--output-format", "concise", "dags", "pipeline/flow"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
