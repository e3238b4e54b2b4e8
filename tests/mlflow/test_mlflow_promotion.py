"""Every promotion rule on the embedded store, with real (small) models: guards, the paired test, the race
and the rollback. Each test uses its own registered model, so the rules are checked in isolation."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow_testkit import quick_config, race

from pipeline import registry, tracking
from pipeline.errors import PromotionError


@pytest.fixture(scope="module")
def runs(module_store: str, mlflow_datasets) -> SimpleNamespace:
    """Training runs of known relative quality (calibrated: each step up is significant at p < 0.01)."""

    def track(dataset: str, *overrides: str) -> str:
        return tracking.track_training(dataset, quick_config(*overrides)).run_id

    ds = mlflow_datasets
    return SimpleNamespace(
        weak=track(ds.a, "gru4rec.n_epochs=1"),
        medium=track(ds.a, "gru4rec.n_epochs=2"),
        strong=track(ds.a, "gru4rec.n_epochs=3"),
        broken=track(ds.a, "gru4rec.learning_rate=0.0001"),  # barely trained: worse than POP and S-POP
        other_items=track(ds.b, "gru4rec.n_epochs=2"),
        unvalidated=track(ds.raw),
        failed_data=track(ds.failed),
    )


def config(*overrides: str):
    """A config with a registered model of its own."""
    return quick_config(f"tracking.registered_model=test-{uuid.uuid4().hex[:8]}", *overrides)


def client():
    import mlflow

    return mlflow.MlflowClient()


def champion_run(cfg) -> str | None:
    version = registry.champion_version(client(), cfg.tracking.registered_model, cfg.tracking.champion_alias)
    return version.run_id if version else None


def metric(run_id: str, name: str = "mrr_at_20") -> float:
    return client().get_run(run_id).data.metrics[name]


def test_no_champion_promotes_the_best_candidate_that_beats_spop(runs: SimpleNamespace) -> None:
    cfg = config()
    decision = registry.promote(cfg, [runs.broken, runs.weak, runs.medium])
    assert decision.action == "promoted" and decision.alias_moved
    assert decision.candidate_run_id == runs.medium == champion_run(cfg)
    verdicts = {c["run_id"]: c["verdict"] for c in decision.candidates}
    assert verdicts[runs.broken].startswith("refused") and "S-POP" in verdicts[runs.broken]
    assert verdicts[runs.weak].startswith("eligible, not the best")
    # Registered with lineage tags; the decision is a logged run with its evidence.
    version = client().get_model_version(cfg.tracking.registered_model, decision.candidate_version)
    assert version.tags["source_run_id"] == runs.medium
    assert version.tags["data.fingerprint"] == client().get_run(runs.medium).data.tags["data.fingerprint"]
    assert float(version.tags["metric.mrr_at_20"]) == pytest.approx(metric(runs.medium), abs=1e-6)
    assert version.tags["promotion.decision"] == "promoted"
    record = client().get_run(decision.record_run_id)
    assert record.data.tags["pipeline.kind"] == "promotion"
    assert record.data.tags["promotion.decision"] == "promoted"
    assert record.data.metrics["candidate_mrr_at_20"] == pytest.approx(metric(runs.medium))
    assert client().get_run(runs.broken).data.tags["promotion.decision"] == "refused"


def test_only_candidates_worse_than_the_baselines_are_refused_and_not_registered(runs: SimpleNamespace) -> None:
    cfg = config()
    decision = registry.promote(cfg, [runs.broken])
    assert decision.action == "refused" and not decision.alias_moved
    assert "does not beat the" in decision.reason and "baseline" in decision.reason
    assert champion_run(cfg) is None
    assert client().search_model_versions(f"name = '{cfg.tracking.registered_model}'") == []
    record = client().get_run(decision.record_run_id)
    assert record.data.tags["promotion.decision"] == "refused"
    assert json.loads(Path(_download(decision.record_run_id, "decision.json")).read_text())["action"] == "refused"


def test_significantly_better_candidate_replaces_the_champion(runs: SimpleNamespace) -> None:
    cfg = config()
    first = registry.promote(cfg, [runs.weak])
    decision = registry.promote(cfg, [runs.strong])
    assert decision.action == "promoted", decision.reason
    assert champion_run(cfg) == runs.strong
    assert decision.champion_version == first.candidate_version
    assert decision.test.p_value < cfg.tracking.significance and decision.test.mean_diff > 0
    # Same data, same evaluator: the re-evaluated champion scores what it logged on this test split.
    assert decision.same_item_space is True and decision.champion_reevaluated
    assert decision.champion_value == pytest.approx(metric(runs.weak))
    assert decision.candidate_value == pytest.approx(metric(runs.strong))
    version = client().get_model_version(cfg.tracking.registered_model, decision.candidate_version)
    assert version.tags["pipeline.previous_champion"] == first.candidate_version
    record = client().get_run(decision.record_run_id).data.metrics
    assert record["p_value"] == pytest.approx(decision.test.p_value)
    assert record["champion_mrr_at_20"] == pytest.approx(decision.champion_value)
    # Both models' metrics at every cutoff, side by side in the decision record.
    for k in (1, 5, 10, 20):
        assert record[f"champion_recall_at_{k}"] == pytest.approx(metric(runs.weak, f"recall_at_{k}"))
        assert record[f"candidate_recall_at_{k}"] == pytest.approx(metric(runs.strong, f"recall_at_{k}"))


def test_better_but_not_significant_becomes_challenger_with_the_reason(runs: SimpleNamespace) -> None:
    # With 500 bootstrap samples the smallest possible p-value is 1/501 > 0.001: never significant.
    cfg = config("tracking.significance=0.001")
    champion = registry.promote(cfg, [runs.weak])
    decision = registry.promote(cfg, [runs.strong])
    assert decision.action == "challenger" and not decision.alias_moved
    assert decision.reason.startswith("better but not significant at 0.001")
    assert decision.test.mean_diff > 0
    assert champion_run(cfg) == runs.weak
    name = cfg.tracking.registered_model
    challenger = client().get_model_version_by_alias(name, "challenger")
    assert challenger.run_id == runs.strong and str(challenger.version) == decision.candidate_version
    assert challenger.tags["promotion.reason"] == decision.reason
    assert decision.champion_version == champion.candidate_version


def test_a_gain_below_the_margin_is_not_enough(runs: SimpleNamespace) -> None:
    cfg = config("tracking.promotion_margin=0.5")
    registry.promote(cfg, [runs.weak])
    decision = registry.promote(cfg, [runs.strong])
    assert decision.action == "challenger"
    assert decision.reason.startswith("not better by the margin 0.5")
    assert champion_run(cfg) == runs.weak


def test_data_that_failed_or_skipped_validation_is_never_promoted(runs: SimpleNamespace) -> None:
    tags = {r: client().get_run(r).data.tags["data.validation"] for r in (runs.failed_data, runs.unvalidated)}
    assert tags == {runs.failed_data: "failed", runs.unvalidated: "missing"}
    cfg = config()
    decision = registry.promote(cfg, [runs.failed_data, runs.unvalidated])
    assert decision.action == "refused"
    verdicts = {c["run_id"]: c["verdict"] for c in decision.candidates}
    assert "failed validation" in verdicts[runs.failed_data]
    assert "no passing validation report" in verdicts[runs.unvalidated]
    assert champion_run(cfg) is None
    # Data built without validation may be allowed explicitly; failed data never.
    lenient = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, require_validation=False))
    decision = registry.promote(lenient, [runs.failed_data, runs.unvalidated])
    assert decision.action == "promoted" and champion_run(cfg) == runs.unvalidated


def test_a_champion_from_another_item_space_is_re_evaluated_on_the_candidate_test_split(
    runs: SimpleNamespace, mlflow_datasets
) -> None:
    from pipeline.evaluate import evaluate_model
    from pipeline.sessions import read_split

    cfg = config()
    champion = registry.promote(cfg, [runs.weak])
    decision = registry.promote(cfg, [runs.other_items])
    assert decision.same_item_space is False and decision.champion_reevaluated
    assert decision.action in {"promoted", "challenger"}
    assert decision.champion_version == champion.candidate_version
    # Independently: the champion evaluated on the candidate's (dataset b's) test split; predictions it
    # cannot make (targets it does not know) count as misses over the candidate's predictions.
    model_dir = Path(_download_model(cfg, champion.candidate_version)) / "artifacts" / "model"
    champ = evaluate_model(model_dir, read_split(mlflow_datasets.b, "test"), cutoffs=(20,))
    expected = registry.parse_metric("mrr_at_20").per_prediction(champ.ranks).sum() / decision.test.n
    assert decision.champion_value == pytest.approx(expected)
    assert decision.champion_value != pytest.approx(metric(runs.weak))  # not the number it logged on its own data
    assert decision.test.n == metric(runs.other_items, "test_n_predictions")


@pytest.mark.parametrize("late", ["medium", "strong"])
def test_two_promotions_racing_never_leave_the_alias_on_the_worse_model(runs: SimpleNamespace, late: str) -> None:
    """Both compare against the same champion (a barrier lines them up), then race to move the alias.

    ``late`` reaches the alias a moment after the other: with the worse one late, only the re-verification
    under the lock stops it from overwriting the better one with its stale comparison.
    """
    cfg = config()
    registry.promote(cfg, [runs.weak])
    decisions = race(cfg, [runs.medium, runs.strong], delays={getattr(runs, late): 1.0})
    assert champion_run(cfg) == runs.strong
    strong, medium = decisions[runs.strong], decisions[runs.medium]
    assert strong.action == "promoted"
    # The delay makes one order all but certain; either way the second comparison was redone.
    if medium.action == "challenger":  # strong moved the alias first; medium compared again, with strong
        assert medium.champion_version == strong.candidate_version and "not better" in medium.reason
    else:  # medium moved first; strong saw the move, compared again with medium and won
        assert medium.action == "promoted" and strong.champion_version == medium.candidate_version
    versions = client().search_model_versions(f"name = '{cfg.tracking.registered_model}'")
    assert len({v.run_id for v in versions}) == len(versions) == 3  # no duplicate registrations


def test_rollback_returns_to_the_previous_champion(runs: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    cfg = config()
    name = cfg.tracking.registered_model
    first = registry.promote(cfg, [runs.weak])
    second = registry.promote(cfg, [runs.strong])
    assert second.action == "promoted"
    assert main(["promote", "--rollback", "--set", f"tracking.registered_model={name}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "rolled_back" and out["candidate_version"] == first.candidate_version
    assert champion_run(cfg) == runs.weak
    rolled = client().get_model_version(name, second.candidate_version)
    assert rolled.tags["pipeline.rolled_back"] == "true"
    assert client().get_run(out["record_run_id"]).data.tags["promotion.decision"] == "rolled_back"
    # The rolled-back model does not come back by itself, and there is nothing before the first champion.
    again = registry.promote(cfg, [runs.strong])
    assert again.action == "refused" and "rolled back" in again.reason
    with pytest.raises(PromotionError, match="no previous champion"):
        registry.rollback(cfg)
    assert main(["promote", "--rollback", "--set", f"tracking.registered_model={name}"]) == 2
    assert "no previous champion" in capsys.readouterr().err


def test_cli_promote_is_idempotent_and_takes_a_parent_run(runs: SimpleNamespace, capsys, mlflow_datasets) -> None:
    from pipeline.cli import main

    cfg = config()
    name = cfg.tracking.registered_model
    settings = ["--set", f"tracking.registered_model={name}", "--set", "tracking.bootstrap_samples=200"]
    parent = tracking.start_parent_run(cfg, f"cli-{name}")
    child = tracking.track_training(mlflow_datasets.a, quick_config("gru4rec.n_epochs=2"), parent_run_id=parent)
    assert main(["promote", "--parent-run-id", parent, *settings]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["action"] == "promoted" and first["candidate_run_id"] == child.run_id
    assert client().get_run(first["record_run_id"]).data.tags["mlflow.parentRunId"] == parent
    assert main(["promote", "--run-id", child.run_id, *settings]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["action"] == "unchanged" and second["candidate_version"] == first["candidate_version"]
    # Without --run-id / --parent-run-id the candidate is the newest finished training run.
    assert main(["promote", *settings]) == 0
    assert json.loads(capsys.readouterr().out)["candidate_run_id"] == child.run_id
    assert len(client().search_model_versions(f"name = '{name}'")) == 1


def _download(run_id: str, path: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)


def _download_model(cfg, version: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(f"models:/{cfg.tracking.registered_model}/{version}")

