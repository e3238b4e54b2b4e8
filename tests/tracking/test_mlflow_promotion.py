"""Every promotion rule on the embedded store, with real (small) models: guards, selection on validation
and the Holm correction, the paired test, the leakage guard on a backfill, the dataset fingerprint check,
the race and the operator levers. Each test uses its own registered model, so the rules are checked in
isolation."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow_testkit import quick_config, race

from pipeline.errors import PromotionError
from pipeline.flow.trial import run_trial
from pipeline.tracking import levers, lock, promotion, registry
from pipeline.tracking import runs as tracking
from pipeline.tracking.decision import Decision, parse_metric


@pytest.fixture(scope="module")
def runs(module_store: str, mlflow_datasets) -> SimpleNamespace:
    """Training runs of known relative quality (calibrated: each step up is significant at p < 0.01)."""

    def track(dataset: str, *overrides: str) -> str:
        return run_trial(dataset, quick_config(*overrides)).run_id

    ds = mlflow_datasets
    return SimpleNamespace(
        weak=track(ds.a, "gru4rec.n_epochs=1"),
        medium=track(ds.a, "gru4rec.n_epochs=2"),
        strong=track(ds.a, "gru4rec.n_epochs=3"),
        medium_again=track(ds.a, "gru4rec.n_epochs=2"),  # the same config and seed as medium
        tiny=track(ds.a, "gru4rec.n_epochs=1", "gru4rec.layers=[16]"),  # clearly worse than medium
        broken=track(ds.a, "gru4rec.learning_rate=0.0001"),  # barely trained: worse than POP and S-POP
        other_items=track(ds.b, "gru4rec.n_epochs=2"),
        unvalidated=track(ds.raw),
        failed_data=track(ds.failed),
        novalid_weak=track(ds.novalid, "gru4rec.n_epochs=1"),
        novalid_medium=track(ds.novalid, "gru4rec.n_epochs=2"),
        novalid_strong=track(ds.novalid, "gru4rec.n_epochs=3"),
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


def test_no_champion_promotes_the_best_candidate_on_valid_that_beats_spop(runs: SimpleNamespace) -> None:
    cfg = config()
    decision = promotion.promote(cfg, [runs.broken, runs.weak, runs.medium])
    assert decision.action == "promoted" and decision.alias_moved
    best_on_valid = max([runs.weak, runs.medium], key=lambda r: metric(r, "valid_mrr_at_20"))
    assert decision.candidate_run_id == best_on_valid == champion_run(cfg)
    assert decision.selected_on == "valid" and decision.n_trials == 3
    verdicts = {c.run_id: c.verdict for c in decision.candidates}
    assert verdicts[runs.broken].startswith("refused") and "S-POP" in verdicts[runs.broken]
    other = runs.weak if best_on_valid == runs.medium else runs.medium
    assert verdicts[other].startswith("not selected: valid_mrr_at_20")
    # Each trial's validation and test value is on record, as logged by its training run.
    for trial in decision.candidates:
        assert trial.valid_value == pytest.approx(metric(trial.run_id, "valid_mrr_at_20"))
        assert trial.test_value == pytest.approx(metric(trial.run_id))
    # Registered with lineage tags; the decision is a logged run with its evidence.
    version = client().get_model_version(cfg.tracking.registered_model, decision.candidate_version)
    assert version.tags["source_run_id"] == best_on_valid
    source = client().get_run(best_on_valid)
    assert version.tags["data.fingerprint"] == source.data.tags["data.fingerprint"]
    assert float(version.tags["metric.mrr_at_20"]) == pytest.approx(metric(best_on_valid), abs=1e-6)
    # The training window (train + valid) and the test window, from the dataset's manifest.
    assert version.tags["data.train_start"] == source.data.params["data.time_ranges.train.start"]
    assert version.tags["data.train_end"] == source.data.params["data.time_ranges.valid.end"]
    assert version.tags["data.test_start"] == source.data.params["data.split_times.test_start"]
    assert version.tags["data.train_end"] < version.tags["data.test_start"]
    assert version.tags["promotion.decision"] == "promoted"
    record = client().get_run(decision.record_run_id)
    assert record.data.tags["pipeline.kind"] == "promotion"
    assert record.data.tags["promotion.decision"] == "promoted"
    assert record.data.metrics["candidate_mrr_at_20"] == pytest.approx(metric(best_on_valid))
    assert record.data.params["selected_on"] == "valid" and record.data.params["n_trials"] == "3"
    assert client().get_run(runs.broken).data.tags["promotion.decision"] == "refused"


def test_only_candidates_worse_than_the_baselines_are_refused_and_not_registered(
    runs: SimpleNamespace,
) -> None:
    cfg = config()
    decision = promotion.promote(cfg, [runs.broken])
    assert decision.action == "refused" and not decision.alias_moved
    assert "does not beat the" in decision.reason and "baseline" in decision.reason
    assert champion_run(cfg) is None
    assert client().search_model_versions(f"name = '{cfg.tracking.registered_model}'") == []
    record = client().get_run(decision.record_run_id)
    assert record.data.tags["promotion.decision"] == "refused"
    assert (
        json.loads(Path(_download(decision.record_run_id, "decision.json")).read_text())["action"]
        == "refused"
    )


def test_significantly_better_candidate_replaces_the_champion(runs: SimpleNamespace) -> None:
    cfg = config()
    first = promotion.promote(cfg, [runs.weak])
    decision = promotion.promote(cfg, [runs.strong])
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
    champion = promotion.promote(cfg, [runs.weak])
    decision = promotion.promote(cfg, [runs.strong])
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
    promotion.promote(cfg, [runs.weak])
    decision = promotion.promote(cfg, [runs.strong])
    assert decision.action == "challenger"
    assert decision.reason.startswith("not better by the margin 0.5")
    assert champion_run(cfg) == runs.weak


def test_data_that_failed_or_skipped_validation_is_never_promoted(runs: SimpleNamespace) -> None:
    tags = {r: client().get_run(r).data.tags["data.validation"] for r in (runs.failed_data, runs.unvalidated)}
    assert tags == {runs.failed_data: "failed", runs.unvalidated: "missing"}
    cfg = config()
    decision = promotion.promote(cfg, [runs.failed_data, runs.unvalidated])
    assert decision.action == "refused"
    verdicts = {c.run_id: c.verdict for c in decision.candidates}
    assert "failed validation" in verdicts[runs.failed_data]
    assert "no passing validation report" in verdicts[runs.unvalidated]
    assert champion_run(cfg) is None
    # Data built without validation may be allowed explicitly; failed data never.
    lenient = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, require_validation=False))
    decision = promotion.promote(lenient, [runs.failed_data, runs.unvalidated])
    assert decision.action == "promoted" and champion_run(cfg) == runs.unvalidated


def test_a_champion_from_another_item_space_is_re_evaluated_on_the_candidate_test_split(
    runs: SimpleNamespace, mlflow_datasets
) -> None:
    from pipeline.data.sessions import read_split
    from pipeline.model.evaluate import evaluate_model

    cfg = config()
    champion = promotion.promote(cfg, [runs.weak])
    decision = promotion.promote(cfg, [runs.other_items])
    assert decision.same_item_space is False and decision.champion_reevaluated
    assert decision.action in {"promoted", "challenger"}
    assert decision.champion_version == champion.candidate_version
    # Independently: the champion evaluated on the candidate's (dataset b's) test split; predictions it
    # cannot make (targets it does not know) count as misses over the candidate's predictions.
    model_dir = Path(_download_model(cfg, champion.candidate_version)) / "artifacts" / "model"
    champ = evaluate_model(model_dir, read_split(mlflow_datasets.b, "test"), cutoffs=(20,))
    expected = parse_metric("mrr_at_20").per_prediction(champ.ranks).sum() / decision.test.n
    assert decision.champion_value == pytest.approx(expected)
    assert decision.champion_value != pytest.approx(
        metric(runs.weak)
    )  # not the number it logged on its own data
    assert decision.test.n == metric(runs.other_items, "test_n_predictions")


@pytest.mark.parametrize("late", ["medium", "strong"])
def test_two_promotions_racing_never_leave_the_alias_on_the_worse_model(
    runs: SimpleNamespace, late: str
) -> None:
    """Both compare against the same champion (a barrier lines them up), then race to move the alias.

    ``late`` reaches the alias a moment after the other: with the worse one late, only the re-verification
    under the lock stops it from overwriting the better one with its stale comparison.
    """
    cfg = config()
    promotion.promote(cfg, [runs.weak])
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


def test_rollback_returns_to_the_previous_champion(
    runs: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli.main import main

    cfg = config()
    name = cfg.tracking.registered_model
    first = promotion.promote(cfg, [runs.weak])
    second = promotion.promote(cfg, [runs.strong])
    assert second.action == "promoted"
    assert main(["promote", "--rollback", "--set", f"tracking.registered_model={name}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "rolled_back" and out["candidate_version"] == first.candidate_version
    assert champion_run(cfg) == runs.weak
    rolled = client().get_model_version(name, second.candidate_version)
    assert rolled.tags["pipeline.rolled_back"] == "true"
    assert client().get_run(out["record_run_id"]).data.tags["promotion.decision"] == "rolled_back"
    # The rolled-back model does not come back by itself, and there is nothing before the first champion.
    again = promotion.promote(cfg, [runs.strong])
    assert again.action == "refused" and "rolled back" in again.reason
    with pytest.raises(PromotionError, match="no previous champion"):
        levers.rollback(cfg)
    assert main(["promote", "--rollback", "--set", f"tracking.registered_model={name}"]) == 2
    assert "no previous champion" in capsys.readouterr().err


def test_cli_promote_is_idempotent_and_takes_a_parent_run(
    runs: SimpleNamespace, capsys, mlflow_datasets
) -> None:
    from pipeline.cli.main import main

    cfg = config()
    name = cfg.tracking.registered_model
    settings = ["--set", f"tracking.registered_model={name}", "--set", "tracking.bootstrap_samples=200"]
    parent = tracking.start_parent_run(cfg, f"cli-{name}")
    child = run_trial(
        mlflow_datasets.a, quick_config("gru4rec.n_epochs=2"), parent_run_id=parent
    )
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


def test_worse_equal_and_better_challengers_only_the_better_one_moves_the_alias(
    runs: SimpleNamespace,
) -> None:
    """Real trained models against a 2-epoch champion: 1 epoch on a 16-unit layer, the champion's config and
    seed trained again, and 3 epochs."""
    cfg = config()
    champion = promotion.promote(cfg, [runs.medium])
    assert champion.action == "promoted"

    worse = promotion.promote(cfg, [runs.tiny])
    assert worse.action == "challenger" and not worse.alias_moved, worse.reason
    assert worse.test.mean_diff < 0 and worse.reason.startswith("not better by the margin")
    assert champion_run(cfg) == runs.medium

    equal = promotion.promote(cfg, [runs.medium_again])
    assert equal.action == "challenger" and not equal.alias_moved, equal.reason
    assert equal.test.ci_low <= 0.0 <= equal.test.ci_high  # no difference the data can show
    assert champion_run(cfg) == runs.medium

    better = promotion.promote(cfg, [runs.strong])
    assert better.action == "promoted" and better.alias_moved, better.reason
    assert better.test.ci_low > 0 and better.test.p_value < cfg.tracking.significance
    assert champion_run(cfg) == runs.strong
    for d in (worse, equal, better):
        assert d.selected_on == "valid" and d.champion_version == champion.candidate_version


def test_without_a_valid_split_every_trial_meets_the_champion_with_holm_corrected_p_values(
    runs: SimpleNamespace,
) -> None:
    from pipeline.tracking.decision import holm

    assert "valid_mrr_at_20" not in client().get_run(runs.novalid_weak).data.metrics
    cfg = config()
    assert promotion.promote(cfg, [runs.novalid_weak]).action == "promoted"
    decision = promotion.promote(cfg, [runs.novalid_medium, runs.novalid_strong])
    assert decision.selected_on == "test, Holm-corrected" and decision.n_trials == 2
    ids = [runs.novalid_medium, runs.novalid_strong]
    trials = {t.run_id: t for t in decision.candidates}
    raw = [trials[r].p_value for r in ids]
    assert all(p is not None for p in raw)
    assert [trials[r].p_adjusted for r in ids] == pytest.approx(holm(raw))
    assert decision.p_adjusted == pytest.approx(trials[decision.candidate_run_id].p_adjusted)
    assert decision.test.p_value == pytest.approx(trials[decision.candidate_run_id].p_value)
    # The alias moves exactly when the selected trial is better after the correction.
    better = decision.test.mean_diff > 0 and decision.p_adjusted < cfg.tracking.significance
    assert decision.alias_moved == better and decision.action == ("promoted" if better else "challenger")
    assert ("Holm-corrected over 2 trials" in decision.reason) and decision.reason
    record = client().get_run(decision.record_run_id)
    assert record.data.params["selected_on"] == "test, Holm-corrected"
    assert record.data.metrics["p_adjusted"] == pytest.approx(decision.p_adjusted)

    strict = config("tracking.no_valid_split=refuse")
    assert promotion.promote(strict, [runs.novalid_weak]).action == "promoted"  # one trial: nothing to select
    refused = promotion.promote(strict, [runs.novalid_medium, runs.novalid_strong])
    assert refused.action == "refused" and "no validation split to select among 2" in refused.reason
    assert champion_run(strict) == runs.novalid_weak


def test_a_backfill_never_uses_a_test_window_the_champion_trained_on(daily_datasets) -> None:
    """A later date makes the champion, then two earlier dates are backfilled: both are refused, the alias
    stays; the next date after the champion's is compared as usual. Each date is one DAG-like decision:
    a parent run, a trial trained on that date's 4-day dataset, and promote with the date."""
    from pipeline.tracking import views as registry_views

    cfg = config()

    def run_date(date: str) -> Decision:
        parent = tracking.start_parent_run(
            cfg, f"{cfg.tracking.registered_model}/{date}", tags={"pipeline.date": date}
        )
        trial = run_trial(
            daily_datasets.by_date[date], quick_config("gru4rec.n_epochs=2"), parent_run_id=parent
        )
        return promotion.promote(
            cfg, [trial.run_id], parent_run_id=parent, date=date, actor=f"test backfill {date}"
        )

    latest = run_date("2024-03-06")
    assert latest.action == "promoted"
    for date in ("2024-03-04", "2024-03-05"):
        backfill = run_date(date)
        assert backfill.action == "refused" and not backfill.alias_moved
        assert backfill.reason.startswith("champion has seen this test window"), backfill.reason
        assert backfill.test_window.overlaps(backfill.champion_training_window)
        assert backfill.champion_version == latest.candidate_version and not backfill.champion_reevaluated
        assert champion_run(cfg) == latest.candidate_run_id
        assert (
            registry.find_version(client(), cfg.tracking.registered_model, backfill.candidate_run_id) is None
        )
    later = run_date("2024-03-07")
    assert later.action in {"promoted", "challenger"} and later.champion_reevaluated, later.reason
    assert not later.test_window.overlaps(later.champion_training_window)
    dates = [(e.date, e.action) for e in registry_views.history(cfg)]
    assert dates == [
        ("2024-03-07", later.action),
        ("2024-03-05", "refused"),
        ("2024-03-04", "refused"),
        ("2024-03-06", "promoted"),
    ]
    _check_champion_history_picture(cfg, latest, later)


def _check_champion_history_picture(cfg, latest: Decision, later: Decision) -> None:
    """The picture logged with a decision: every dated decision by run date, the champion after each."""
    import mlflow

    from pipeline.tracking import history as champion_history

    experiment = tracking.configure(cfg.tracking)
    points = champion_history.history_points(client(), experiment, cfg.tracking.registered_model, later.metric)
    assert [(p.date, p.action) for p in points] == [
        ("2024-03-04", "refused"), ("2024-03-05", "refused"), ("2024-03-06", "promoted"), ("2024-03-07", later.action)
    ]  # fmt: skip
    promoted = points[2]
    assert promoted.candidate == pytest.approx(latest.candidate_value) and promoted.champion_after == promoted.candidate
    assert promoted.spop is not None and 0 < promoted.spop < promoted.candidate
    expected_after = later.candidate_value if later.action == "promoted" else later.champion_value
    assert points[3].champion_after == pytest.approx(expected_after)
    assert champion_history.log_for_decision(cfg, later.to_dict()) == Path(champion_history.PLOT)
    png = mlflow.artifacts.download_artifacts(run_id=later.record_run_id, artifact_path=champion_history.PLOT)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_champion_is_evaluated_on_exactly_the_candidate_test_split(
    runs: SimpleNamespace, mlflow_datasets, tmp_path: Path
) -> None:
    import shutil

    from pipeline.data.sessions import read_manifest

    copy = tmp_path / "dataset"
    shutil.copytree(mlflow_datasets.a, copy)
    candidate = run_trial(str(copy), quick_config("gru4rec.n_epochs=3")).run_id
    cfg = config()
    promotion.promote(cfg, [runs.weak])

    shutil.rmtree(copy)
    shutil.copytree(mlflow_datasets.b, copy)  # another dataset published at the candidate's URI
    with pytest.raises(PromotionError, match="changed since candidate run .* was tested on it"):
        promotion.promote(cfg, [candidate])

    shutil.rmtree(copy)
    shutil.copytree(mlflow_datasets.a, copy)
    manifest = read_manifest(str(copy))
    test_file = copy / manifest["files"]["test"]["path"]
    test_file.write_bytes(test_file.read_bytes() + b"\0")  # the file changed after publishing
    with pytest.raises(PromotionError, match="SHA-256"):
        promotion.promote(cfg, [candidate])
    assert champion_run(cfg) == runs.weak
    assert len(client().search_model_versions(f"name = '{cfg.tracking.registered_model}'")) == 1

    shutil.rmtree(copy)
    shutil.copytree(mlflow_datasets.a, copy)  # the data it was tested on: the comparison runs
    decision = promotion.promote(cfg, [candidate])
    assert decision.champion_reevaluated and decision.test_fingerprint == manifest["fingerprint"]
    assert decision.champion_value == pytest.approx(metric(runs.weak))


def test_operator_levers_are_recorded_with_who_and_why(
    runs: SimpleNamespace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.cli.main import main
    from pipeline.flow.contracts import DatasetSummary, Promotion
    from pipeline.flow.promotion import current_champion
    from pipeline.flow.summary import format_note

    monkeypatch.setenv("PIPELINE_ACTOR", "alice")
    cfg = config()
    name = cfg.tracking.registered_model
    settings = ["--set", f"tracking.registered_model={name}", "--set", "tracking.bootstrap_samples=500"]

    def cli(*args: str) -> dict:
        assert main([*args, *settings]) == 0
        return json.loads(capsys.readouterr().out)

    v1 = promotion.promote(cfg, [runs.weak]).candidate_version
    v2 = promotion.promote(cfg, [runs.strong]).candidate_version
    moved = cli("promote", "--to-version", v1, "--reason", "v2 misbehaves in production")
    assert (moved["action"], moved["actor"], moved["champion_version"]) == ("moved", "alice", v2)
    assert "roll back" in moved["reason"] and "v2 misbehaves in production" in moved["reason"]
    assert champion_run(cfg) == runs.weak
    assert cli("promote", "--to-version", v1, "--reason", "again")["action"] == "unchanged"
    assert main(["promote", "--to-version", v2, *settings]) == 2
    assert "needs a reason" in capsys.readouterr().err
    never = registry.register_candidate(client(), name, client().get_run(runs.broken))
    assert main(["promote", "--to-version", str(never.version), "--reason", "try", *settings]) == 2
    err = capsys.readouterr().err
    assert f"version {never.version} was never eligible" in err and "baseline" in err
    assert champion_run(cfg) == runs.weak

    assert cli("promote", "--pin", "--reason", "incident 42")["action"] == "pin"
    again = cli("promote", "--pin", "--reason", "me too")
    assert again["action"] == "unchanged" and "already pinned by alice" in again["reason"]
    pinned = promotion.promote(cfg, [runs.medium], date="2024-01-04", actor="airflow gru4rec_daily run r1")
    assert pinned.action == "pinned" and pinned.rules_action == "promoted" and not pinned.alias_moved
    assert pinned.test is not None and pinned.test.p_value < cfg.tracking.significance  # still compared
    assert "incident 42" in pinned.reason and champion_run(cfg) == runs.weak
    assert client().get_model_version_by_alias(name, "challenger").run_id == runs.medium
    promoted = Promotion(
        decision=pinned.to_dict(),
        champion=current_champion(cfg),
        trials=[],
        parent_run_id="p",
        experiment_id="0",
        dataset=DatasetSummary("", "", {}, [], 0),
    )
    note = format_note("2024-01-04", promoted)
    assert "**pinned**" in note and f"@champion v{v1} pinned by alice" in note and "incident 42" in note
    assert f"@champion v{v1} set by operator (moved, alice)" in note

    assert cli("promote", "--unpin", "--reason", "incident closed")["action"] == "unpin"
    after = promotion.promote(cfg, [runs.medium])
    assert after.action == "promoted" and champion_run(cfg) == runs.medium

    history = cli("promote", "--history", "--json", "--limit", "50")
    assert [(e["action"], e["actor"]) for e in history] == [
        ("promoted", "alice"),
        ("unpin", "alice"),
        ("pinned", "airflow gru4rec_daily run r1"),
        ("unchanged", "alice"),
        ("pin", "alice"),
        ("unchanged", "alice"),
        ("moved", "alice"),
        ("promoted", "alice"),
        ("promoted", "alice"),
    ]
    assert {e["selected_on"] for e in history if e["action"] in {"pin", "unpin", "moved"}} == {"operator"}
    assert history[2]["date"] == "2024-01-04" and history[2]["p_value"] is not None
    assert cli("promote", "--history", "--json", "--limit", "2") == history[:2]
    assert main(["promote", "--history", *settings]) == 0
    text = capsys.readouterr().out
    assert "by alice: moved" in text and "selected_on=valid" in text

    models = cli("models", "--json")
    by_version = {v["version"]: v for v in models["versions"]}
    assert models["pinned"] is None and list(by_version) == sorted(by_version, key=int, reverse=True)
    assert by_version[after.candidate_version]["aliases"] == ["champion"]
    assert by_version[v1]["operator_action"] == "moved" and by_version[v1]["operator_actor"] == "alice"
    assert by_version[v1]["decision"] == "promoted" and by_version[v1]["training_window"]["start"]
    assert by_version[str(never.version)]["decision"] == "not recorded"
    assert main(["models", *settings]) == 0
    assert f"v{after.candidate_version}" in capsys.readouterr().out


def test_levers_during_a_comparison_make_the_promotion_compare_again(runs: SimpleNamespace) -> None:
    """The lock and the re-comparison cover the levers: a move or a pin between a promotion's comparison
    and its alias move is seen under the lock."""
    cfg = config()
    first = promotion.promote(cfg, [runs.weak])
    assert promotion.promote(cfg, [runs.medium]).action == "promoted"
    moves: list[Decision] = []

    def move_back(_decision: Decision) -> None:
        if not moves:
            moves.append(
                levers.move_champion(
                    cfg, first.candidate_version, "operator acts mid-comparison", actor="bob"
                )
            )

    decision = promotion.promote(cfg, [runs.strong], on_compared=move_back)
    assert moves[0].action == "moved"
    assert decision.champion_version == first.candidate_version  # compared again, with the moved-to champion
    assert decision.action == "promoted" and champion_run(cfg) == runs.strong

    frozen = config()
    promotion.promote(frozen, [runs.weak])
    pins: list[Decision] = []

    def pin_now(_decision: Decision) -> None:
        if not pins:
            pins.append(levers.pin(frozen, "freeze during the comparison", actor="carol"))

    decision = promotion.promote(frozen, [runs.strong], on_compared=pin_now)
    assert decision.action == "pinned" and decision.rules_action == "promoted"
    assert champion_run(frozen) == runs.weak
    assert lock.lock_name(frozen.tracking.registered_model) not in {
        m.name for m in client().search_registered_models()
    }


def _download(run_id: str, path: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)


def _download_model(cfg, version: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(f"models:/{cfg.tracking.registered_model}/{version}")
