"""The pyfunc model as a product: batch scoring with ``mlflow.pyfunc.load_model`` and a real
``mlflow models serve -m models:/<name>@champion`` answering ``/invocations`` on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow_testkit import background, free_port, quick_config, tool_env, wait_http

from pipeline.flow.trial import run_trial
from pipeline.tracking import promotion

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def champion(module_store: str, mlflow_datasets) -> SimpleNamespace:
    import mlflow

    from pipeline.data.sessions import read_split

    cfg = quick_config("gru4rec.n_epochs=2", f"tracking.registered_model=served-{uuid.uuid4().hex[:6]}")
    run = run_trial(mlflow_datasets.a, cfg)
    decision = promotion.promote(cfg, [run.run_id])
    assert decision.action == "promoted", decision.reason
    uri = f"models:/{cfg.tracking.registered_model}@champion"
    test = read_split(mlflow_datasets.a, "test").to_pandas()
    sessions = [list(g["item_id"])[:4] for _, g in test.groupby("session_id", sort=True)][:3]
    requests = [*sessions, [sessions[0][0], "no-such-item"], ["no-such-item"]]
    model_dir = Path(mlflow.artifacts.download_artifacts(uri)) / "artifacts" / "model"
    return SimpleNamespace(uri=uri, requests=requests, model_dir=model_dir, store=module_store)


def test_batch_scoring_with_pyfunc_load_model(champion: SimpleNamespace) -> None:
    import mlflow

    from pipeline.model.predict import Recommender

    model = mlflow.pyfunc.load_model(champion.uri)
    assert model.metadata.get_input_schema().input_names() == ["item_ids"]
    out = model.predict(pd.DataFrame({"item_ids": champion.requests}), params={"k": 5})
    assert list(out.columns) == ["items", "scores", "unknown_items"] and len(out) == len(champion.requests)
    direct = Recommender.load(champion.model_dir)
    for request, row in zip(champion.requests, out.itertuples(), strict=True):
        expected = direct.recommend(request, k=5)
        assert list(row.items) == expected["items"]
        assert list(row.scores) == pytest.approx(expected["scores"], rel=1e-5)
        assert list(row.unknown_items) == [i for i in request if i == "no-such-item"]
        assert list(row.scores) == sorted(row.scores, reverse=True)
    # Default K is 20.
    assert len(model.predict(pd.DataFrame({"item_ids": champion.requests[:1]}))["items"][0]) == 20


def test_mlflow_models_serve_answers_invocations(champion: SimpleNamespace, tmp_path: Path) -> None:
    import mlflow

    port = free_port()
    args = ["mlflow", "models", "serve", "-m", champion.uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = tool_env({"MLFLOW_TRACKING_URI": champion.store})
    log_file = tmp_path / "serve.log"
    with background(args, log_file, env) as proc:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log_file)
        status, body = _post(port, {"dataframe_records": [{"item_ids": r} for r in champion.requests], "params": {"k": 5}})
        assert status == 200, body
        predictions = body["predictions"]
        batch = mlflow.pyfunc.load_model(champion.uri).predict(pd.DataFrame({"item_ids": champion.requests}), params={"k": 5})
        assert [p["items"] for p in predictions] == [list(i) for i in batch["items"]]
        assert predictions[-1]["unknown_items"] == ["no-such-item"]
        assert all(len(p["items"]) == 5 for p in predictions)
        status, body = _post(port, {"dataframe_records": [{"session": ["x"]}]})
        assert status == 400 and "item_ids" in body["message"]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
