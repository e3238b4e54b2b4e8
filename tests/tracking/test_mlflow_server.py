"""The same code against a real ``mlflow server``: PostgreSQL backend store, artifacts proxied to S3
(SeaweedFS). Clients hold no S3 credentials; the server does."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow_testkit import quick_config, race

from pipeline.flow.trial import run_trial
from pipeline.tracking import levers, lock, promotion
from pipeline.tracking import runs as tracking

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server_runs(server_store, mlflow_datasets) -> SimpleNamespace:
    def track(*overrides: str) -> str:
        return run_trial(mlflow_datasets.a, quick_config(*overrides)).run_id

    return SimpleNamespace(
        server=server_store,
        weak=track(
            "gru4rec.n_epochs=1", "tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.2"
        ),
        medium=track("gru4rec.n_epochs=2"),
        strong=track("gru4rec.n_epochs=3"),
    )


def test_runs_go_to_postgresql_and_artifacts_to_s3(server_runs: SimpleNamespace, s3_server) -> None:
    import mlflow
    import psycopg2

    server = server_runs.server
    assert tracking.tracking_uri() == server.uri
    client = mlflow.MlflowClient()
    run = client.get_run(server_runs.weak)
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    assert {"mrr_at_20", "baseline_spop_mrr_at_20", "train_loss"} <= set(run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics)
    assert run.data.tags["data.validation"] == "passed"
    # The backend store is the PostgreSQL database the server was given.
    with psycopg2.connect(server.backend.replace("postgresql+psycopg2://", "postgresql://")) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (server_runs.weak,))
            assert cur.fetchone() == ("FINISHED",)
    # Artifacts (run files and the logged model) are objects in the S3 bucket behind the server.
    s3 = s3_server.client()
    bucket, prefix = server.artifacts.removeprefix("s3://").split("/", 1)
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys |= {obj["Key"] for obj in page.get("Contents", [])}
    run_files = {
        k.split(f"/{server_runs.weak}/artifacts/", 1)[1]
        for k in keys
        if f"/{server_runs.weak}/artifacts/" in k
    }
    assert {"plots/recall_mrr_at_k.png", "item_map/items.parquet", "validation/report.json"} <= run_files
    model_id = run.data.tags["pipeline.model_uri"].split("/")[-1]
    assert any(k.endswith(f"{model_id}/artifacts/artifacts/model/checkpoint.pt") for k in keys)


def test_promotion_race_rollback_and_scoring_through_the_server(
    server_runs: SimpleNamespace, mlflow_datasets
) -> None:
    import mlflow

    from pipeline.data.sessions import read_split

    cfg = quick_config(f"tracking.registered_model=server-{uuid.uuid4().hex[:6]}")
    name = cfg.tracking.registered_model
    client = mlflow.MlflowClient()
    first = promotion.promote(cfg, [server_runs.weak])
    assert first.action == "promoted"
    decisions = race(cfg, [server_runs.medium, server_runs.strong])
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == server_runs.strong and decisions[server_runs.strong].action == "promoted"
    assert len(client.search_model_versions(f"name = '{name}'")) == 3
    assert lock.lock_name(name) not in {m.name for m in client.search_registered_models()}

    previous = champion.tags["pipeline.previous_champion"]
    assert levers.rollback(cfg).action == "rolled_back"
    assert str(client.get_model_version_by_alias(name, "champion").version) == previous

    # The champion loads through the server (artifacts via its proxy) and scores sessions.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    test = read_split(mlflow_datasets.a, "test").to_pandas()
    session = list(test[test["session_id"] == test["session_id"].iloc[0]]["item_id"])
    out = model.predict(pd.DataFrame({"item_ids": [session]}), params={"k": 3})
    assert len(out["items"][0]) == 3 and list(out["unknown_items"][0]) == []


def test_levers_history_and_models_through_the_server(server_runs: SimpleNamespace) -> None:
    """Pin, a pinned decision, unpin, a move and the views, against PostgreSQL through the server."""
    from pipeline.tracking import views as registry_views

    cfg = quick_config(f"tracking.registered_model=levers-{uuid.uuid4().hex[:6]}")
    first = promotion.promote(cfg, [server_runs.weak], actor="dave")
    assert levers.pin(cfg, "release freeze", actor="dave").action == "pin"
    pinned = promotion.promote(cfg, [server_runs.strong], actor="airflow test")
    assert pinned.action == "pinned" and pinned.rules_action == "promoted" and pinned.test is not None
    assert levers.unpin(cfg, "freeze over", actor="dave").action == "unpin"
    assert promotion.promote(cfg, [server_runs.strong], actor="airflow test").action == "promoted"
    moved = levers.move_champion(cfg, first.candidate_version, "back to the first model", actor="erin")
    assert moved.action == "moved"

    entries = registry_views.history(cfg)
    assert [(e.action, e.actor) for e in entries] == [
        ("moved", "erin"),
        ("promoted", "airflow test"),
        ("unpin", "dave"),
        ("pinned", "airflow test"),
        ("pin", "dave"),
        ("promoted", "dave"),
    ]
    assert entries[1].selected_on == "valid" and entries[1].p_value is not None
    view = registry_views.models(cfg)
    by_version = {v.version: v for v in view.versions}
    assert by_version[first.candidate_version].aliases == ["champion"]
    assert by_version[first.candidate_version].operator_actor == "erin"
    assert by_version[pinned.candidate_version].training_window is not None
    assert view.pinned is None
