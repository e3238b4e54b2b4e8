"""Tracking on the embedded store: what a training run logs, under which names, and idempotency."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow_testkit import quick_config

from pipeline.config import GRU4RecConfig, to_dict
from pipeline.flow.trial import run_trial
from pipeline.tracking import runs as tracking

AIRFLOW_ENV = {
    "AIRFLOW_CTX_DAG_ID": "gru4rec_daily",
    "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2024-01-04T00:00:00+00:00",
    "AIRFLOW_CTX_TASK_ID": "train",
    "AIRFLOW_CTX_TRY_NUMBER": "1",
}


@pytest.fixture(scope="module")
def tracked(module_store: str, mlflow_datasets) -> SimpleNamespace:
    """One 2-epoch run, nested under a DAG-run parent, as if an Airflow task had started it."""
    import mlflow

    cfg = quick_config(
        "gru4rec.n_epochs=2", "tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.2"
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AIRFLOW_ENV.items():
            mp.setenv(key, value)
        parent = tracking.start_parent_run(cfg, "2024-01-04")
        result = run_trial(mlflow_datasets.a, cfg, run_key="2024-01-04/t00", parent_run_id=parent)
    client = mlflow.MlflowClient()
    return SimpleNamespace(cfg=cfg, parent=parent, result=result, run=client.get_run(result.run_id), client=client)


def test_embedded_default_is_sqlite_and_local_artifacts(tracked: SimpleNamespace, module_store: str) -> None:
    assert tracking.tracking_uri() == module_store
    home = Path(module_store.removeprefix("sqlite:///")).parent
    assert (home / "mlflow.db").is_file()
    experiment = tracked.client.get_experiment(tracked.run.info.experiment_id)
    assert experiment.name == "gru4rec-pipeline"
    # A model-training experiment: MLflow's UI opens it on its runs, not on the GenAI trace overview.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run_dir = home / "mlartifacts" / "gru4rec-pipeline" / tracked.result.run_id / "artifacts"
    assert (run_dir / "plots" / "recall_mrr_at_k.png").is_file()


def test_hyperparameters_and_manifest_are_params(tracked: SimpleNamespace, mlflow_datasets) -> None:
    from pipeline.data.sessions import read_manifest

    params = tracked.run.data.params
    for name, value in to_dict(tracked.cfg.gru4rec).items():
        expected = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        assert params[name] == expected, name
    assert set(to_dict(GRU4RecConfig())) <= set(params)  # every published name, none renamed
    manifest = read_manifest(mlflow_datasets.a)
    assert params["data.fingerprint"] == manifest["fingerprint"] == tracked.run.data.tags["data.fingerprint"]
    assert params["data.counts.train.events"] == str(manifest["counts"]["train"]["events"])
    assert params["data.time_ranges.test.end"] == manifest["time_ranges"]["test"]["end"]
    assert params["eval.ties"] == "conservative"


def test_test_metrics_have_stable_names_and_match_the_evaluator(tracked: SimpleNamespace, mlflow_datasets) -> None:
    import mlflow

    from pipeline.data.sessions import read_split
    from pipeline.model.evaluate import evaluate_model

    metrics = tracked.run.data.metrics
    for k in (1, 5, 10, 20):
        for name in (f"recall_at_{k}", f"mrr_at_{k}", f"baseline_pop_mrr_at_{k}", f"baseline_spop_recall_at_{k}"):
            assert name in metrics, name
    assert metrics["train_events_per_second"] > 0 and metrics["train_seconds"] > 0
    # The logged numbers are the evaluator's, on the dataset's test split, for the logged model.
    local = Path(mlflow.artifacts.download_artifacts(tracked.result.model_uri))
    again = evaluate_model(local / "artifacts" / "model", read_split(mlflow_datasets.a, "test"), cutoffs=(20,))
    assert metrics["mrr_at_20"] == pytest.approx(again.metrics["mrr@20"])
    assert metrics["baseline_spop_mrr_at_20"] == pytest.approx(again.metrics["baselines"]["spop"]["mrr@20"])
    # search_runs lines runs up side by side under these names, no renaming needed.
    frame = mlflow.search_runs([tracked.run.info.experiment_id], filter_string="tags.`pipeline.kind` = 'training'")
    assert {"metrics.mrr_at_20", "metrics.baseline_spop_mrr_at_20", "params.learning_rate", "params.layers"} <= set(
        frame.columns
    )


def test_per_epoch_step_metrics_and_system_metrics(tracked: SimpleNamespace) -> None:
    for key in ("train_loss", "valid_recall_at_20", "valid_mrr_at_20"):
        history = tracked.client.get_metric_history(tracked.result.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2], key
    assert any(k.startswith("system/") for k in tracked.run.data.metrics), "no system metrics recorded"


def test_lineage_tags_and_dataset_inputs(tracked: SimpleNamespace) -> None:
    tags = tracked.run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["airflow.dag_id"] == "gru4rec_daily"
    assert tags["airflow.dag_run_id"] == AIRFLOW_ENV["AIRFLOW_CTX_DAG_RUN_ID"]
    assert tags["airflow.task_id"] == "train"
    assert tags["data.validation"] == "passed"
    assert tags["mlflow.parentRunId"] == tracked.parent
    assert tags["pipeline.run_key"] == "2024-01-04/t00"
    inputs = {i.tags[0].value: i.dataset for i in tracked.run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}
    fingerprint = tags["data.fingerprint"].split(":")[-1]
    assert inputs["training"].digest.startswith(fingerprint[:16])
    assert json.loads(inputs["testing"].source)["uri"].endswith("/test")


def test_artifacts_a_person_can_use(tracked: SimpleNamespace) -> None:
    import mlflow
    import pyarrow.parquet as pq

    from pipeline.data.sessions import read_split

    run_id = tracked.result.run_id
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=""))
    items = pq.read_table(local / "item_map" / "items.parquet")
    assert items.equals(read_split(tracked.run.data.tags["data.uri"], "items"))
    # The validation reports and Data Docs are on the DAG run's parent run, once for all its trials.
    assert not (local / "validation").exists()
    assert tracked.run.data.tags["data.validation.artifacts"] == f"runs:/{tracked.parent}/validation"
    on_parent = Path(mlflow.artifacts.download_artifacts(run_id=tracked.parent, artifact_path="validation"))
    report = json.loads((on_parent / "report.json").read_text())
    assert report["success"] is True
    assert (on_parent / "data_docs" / "index.html").is_file()
    parent_tags = tracked.client.get_run(tracked.parent).data.tags
    assert parent_tags["pipeline.validation_logged"] == tracked.run.data.tags["data.fingerprint"]
    assert parent_tags["data.validation"] == "passed"
    for png in ("plots/training_curves.png", "plots/recall_mrr_at_k.png"):
        assert (local / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((local / "evaluation" / "cutoff_curves.json").read_text())
    assert set(curves) == {"GRU4Rec", "POP", "S-POP"} and len(curves["GRU4Rec"]["mrr"]) == 20
    assert curves["GRU4Rec"]["mrr"][19] == pytest.approx(tracked.run.data.metrics["mrr_at_20"])
    with np.load(local / "evaluation" / "ranks.npz") as ranks:
        assert len(ranks["ranks"]) == tracked.run.data.metrics["test_n_predictions"]
    # The model is a logged pyfunc model of this run, with the trained weights and the item map.
    model = mlflow.get_logged_model(tracked.result.model_uri.split("/")[-1])
    assert model.source_run_id == run_id
    model_dir = Path(mlflow.artifacts.download_artifacts(tracked.result.model_uri))
    assert (model_dir / "artifacts" / "model" / "checkpoint.pt").is_file()
    assert (model_dir / "artifacts" / "items.parquet").is_file()


def test_same_run_key_reuses_the_finished_run(tracked: SimpleNamespace, mlflow_datasets) -> None:
    again = run_trial(mlflow_datasets.a, tracked.cfg, run_key="2024-01-04/t00", parent_run_id=tracked.parent)
    assert again.reused and again.run_id == tracked.result.run_id
    assert again.metrics["mrr_at_20"] == tracked.run.data.metrics["mrr_at_20"]
    runs = tracked.client.search_runs(
        [tracked.run.info.experiment_id], "tags.`pipeline.run_key` = '2024-01-04/t00'"
    )
    assert len(runs) == 1
    assert tracking.start_parent_run(tracked.cfg, "2024-01-04") == tracked.parent


def test_unfinished_run_with_the_same_key_is_continued_not_duplicated(tracked: SimpleNamespace, mlflow_datasets) -> None:
    """A worker killed mid-training leaves its run RUNNING; the retry must finish that run, not add a second."""
    key = "2024-01-04/t-killed"
    experiment_id = tracked.run.info.experiment_id
    orphan = tracked.client.create_run(
        experiment_id, tags={tracking.TAG_RUN_KEY: key, tracking.TAG_KIND: "training"}, run_name="train-killed"
    )
    assert tracked.client.get_run(orphan.info.run_id).info.status == "RUNNING"
    retried = run_trial(mlflow_datasets.a, tracked.cfg, run_key=key, parent_run_id=tracked.parent)
    assert retried.run_id == orphan.info.run_id and not retried.reused
    run = tracked.client.get_run(retried.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_RESUMED] == "true"
    assert "mrr_at_20" in run.data.metrics
    assert len(tracked.client.search_runs([experiment_id], f"tags.`pipeline.run_key` = '{key}'")) == 1


def test_cli_track_prints_the_run_and_errors_cleanly(
    module_store: str, mlflow_datasets, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from pipeline.cli.main import main

    code = main(
        ["track", "--dataset", mlflow_datasets.b, "--run-key", "cli/t0", "--out", str(tmp_path / "model"),
         "--set", "gru4rec.layers=[16]", "--set", "gru4rec.n_epochs=1", "--set", "tracking.system_metrics=false"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reused"] is False and out["metrics"]["mrr_at_20"] > 0
    assert (tmp_path / "model" / "checkpoint.pt").is_file()
    assert main(["track", "--dataset", str(tmp_path / "nothing-here")]) == 2
    assert "not a session dataset" in capsys.readouterr().err


def test_run_keys_with_quotes_find_the_same_parent_run(module_store: str) -> None:
    cfg = quick_config()
    keys = ["it's/a key", 'say "hi"/2024']
    first = [tracking.start_parent_run(cfg, key) for key in keys]
    assert len(set(first)) == 2
    assert [tracking.start_parent_run(cfg, key) for key in keys] == first
