"""Retention on a real output tree (local folder and SeaweedFS S3) with a real MLflow registry (SQLite):
old outputs go, the lineage of @champion and @challenger stays, --dry-run deletes nothing and counts bytes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import storage
from pipeline.config import PipelineConfig, from_mapping
from pipeline.flow import retention

REPO = Path(__file__).resolve().parents[2]
TODAY = dt.date(2026, 3, 30)
# Ages: datasets/models 14 days (cut-off 2026-03-16), validated 30 (2026-02-28), quarantine 90 (2025-12-30),
# scratch 3 (2026-03-27).
CONFIG = {"retention": {"datasets_days": 14, "models_days": 14, "validated_days": 30, "quarantine_days": 90,
                        "scratch_days": 3}}  # fmt: skip
CHAMPION_DAY, CHALLENGER_DAY, OLD_DAY, YOUNG_DAY = "2026-03-01", "2026-03-10", "2026-03-02", "2026-03-25"
CHAMPION_INPUTS = ["2026-01-15", "2026-01-16"]  # validated days the champion's dataset was built from


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("PIPELINE_HOME", str(home))
    for var in ("PIPELINE_CONFIG", "MLFLOW_TRACKING_URI", "PIPELINE_OUTPUT_URI"):
        monkeypatch.delenv(var, raising=False)
    return home


def _write(uri: str, data: bytes) -> int:
    storage.write_bytes(uri, data)
    return len(data)


def _dataset(out: str, day: str, inputs: list[str]) -> str:
    uri = storage.join(out, "datasets", f"dt={day}")
    _write(storage.join(uri, "train", "part-0123456789abcdef.parquet"), os.urandom(3000))
    _write(
        storage.join(uri, "manifest.json"),
        json.dumps({"inputs": inputs, "fingerprint": f"fp-{day}"}).encode(),
    )
    return uri


def _validated(out: str, day: str) -> str:
    uri = storage.join(out, "validated", f"dt={day}")
    _write(storage.join(uri, "clean", "part-00000-0123456789abcdef.parquet"), os.urandom(2000))
    _write(storage.join(uri, "quarantine", "part-00000-fedcba9876543210.parquet"), os.urandom(500))
    _write(storage.join(uri, "data_docs", "index.html"), b"<html>docs</html>")
    _write(storage.join(uri, "report.json"), json.dumps({"success": True}).encode())
    return uri


def _model(root: str, day: str, data: str, trial: str) -> str:
    uri = storage.join(root, f"dt={day}", data, trial)
    _write(storage.join(uri, "checkpoint.pt"), os.urandom(1500))
    return uri


def _register(cfg: PipelineConfig, alias: str, dataset_uri: str, run_key: str) -> str:
    """A registered version behind ``alias`` whose training run records dataset and run key (as tracking does)."""
    import mlflow

    from pipeline.tracking import runs as tracking

    experiment = tracking.configure(cfg.tracking)
    client = mlflow.MlflowClient()
    run = client.create_run(experiment, tags={tracking.TAG_KIND: "training", tracking.TAG_DATA_URI: dataset_uri,
                                              tracking.TAG_RUN_KEY: run_key})  # fmt: skip
    client.set_terminated(run.info.run_id, "FINISHED")
    name = cfg.tracking.registered_model
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # the second alias
    version = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
        tags={tracking.TAG_DATA_URI: dataset_uri},
    )  # fmt: skip
    client.set_registered_model_alias(name, alias, version.version)
    return version.version


def build_tree(out: str, cfg: PipelineConfig, scratch: Path | None) -> dict[str, Any]:
    """Outputs of several days; the champion and challenger registered on two old datasets."""
    validated = {
        day: _validated(out, day) for day in [*CHAMPION_INPUTS, "2026-02-01", "2025-12-01", "2026-03-20"]
    }
    champion_ds = _dataset(out, CHAMPION_DAY, [storage.join(validated[d], "clean") for d in CHAMPION_INPUTS])
    challenger_ds = _dataset(out, CHALLENGER_DAY, [])
    old_ds = _dataset(out, OLD_DAY, [validated["2026-02-01"]])
    young_ds = _dataset(out, YOUNG_DAY, [validated["2026-03-20"]])
    models = storage.join(out, "models")
    tree = {
        "validated": validated,
        "datasets": {"champion": champion_ds, "challenger": challenger_ds, "old": old_ds, "young": young_ds},
        "models": {
            "champion": _model(models, CHAMPION_DAY, "fpchampion00", "aaaa"),
            "champion_sibling": _model(models, CHAMPION_DAY, "fpchampion00", "bbbb"),
            "old": _model(models, OLD_DAY, "fpold0000000", "cccc"),
            "young": _model(models, YOUNG_DAY, "fpyoung00000", "dddd"),
        },
        "scratch": {},
    }
    if scratch is not None:
        tree["scratch"] = {
            "champion": _model(str(scratch), CHAMPION_DAY, "fpchampion00", "aaaa"),
            "old": _model(str(scratch), "2026-03-20", "fpold0000000", "cccc"),
            "young": _model(str(scratch), "2026-03-28", "fpyoung00000", "dddd"),
        }
    _register(cfg, "champion", champion_ds, f"gru4rec_daily/{CHAMPION_DAY}/fpchampion00/aaaa")
    _register(cfg, "challenger", challenger_ds, f"gru4rec_daily/{CHALLENGER_DAY}/fpchall00000/eeee")
    return tree


def _bytes(uri: str, skip: str | None = None) -> int:
    return sum(
        storage.size(f) for f in storage.list_files(uri) if not (skip and f"/{skip}/" in f[len(uri) :] + "/")
    )


def _exists(uri: str) -> bool:
    return storage.exists(uri) and bool(storage.list_files(uri))


def check_plan_and_apply(out: str, tree: dict[str, Any], cfg: PipelineConfig) -> None:
    v, d, m, s = tree["validated"], tree["datasets"], tree["models"], tree["scratch"]
    expected = {
        ("dataset", d["old"]),
        ("validated", v["2026-02-01"]),  # all but its quarantine (90 days)
        ("validated", v["2025-12-01"]),
        ("quarantine", storage.join(v["2025-12-01"], "quarantine")),
        ("model", m["champion_sibling"]),  # the champion's day, another trial
        ("model", m["old"]),
    }
    if s:
        expected.add(("scratch", s["old"]))
    kept = {("dataset", d["champion"]), ("dataset", d["challenger"]), ("model", m["champion"])}
    kept |= {("validated", v[day]) for day in CHAMPION_INPUTS}
    if s:
        kept.add(("scratch", s["champion"]))

    plan = retention.plan(cfg, out, TODAY)
    assert {(i.kind, i.uri) for i in plan.delete} == expected
    assert {(i.kind, i.uri) for i in plan.kept} == kept
    assert {i.protected_by for i in plan.kept} == {"champion v1", "challenger v2"}
    # Bytes as the store reports them, counted independently of the plan.
    expected_bytes = sum(
        _bytes(uri, skip="quarantine" if kind == "validated" else None) for kind, uri in expected
    )
    assert plan.bytes == expected_bytes > 0
    before = {uri: _exists(uri) for _, uri in expected | kept}
    assert all(before.values())

    # --dry-run (the plan) deleted nothing; apply deletes exactly the plan.
    retention.apply(plan)
    for kind, uri in expected:
        if kind == "validated":
            assert not storage.exists(storage.join(uri, "report.json")) and not _exists(
                storage.join(uri, "clean")
            )
        else:
            assert not _exists(uri), uri
    assert _exists(storage.join(v["2026-02-01"], "quarantine"))  # quarantine outlives its partition
    for _, uri in kept:
        assert _exists(uri), uri
    for uri in (d["young"], m["young"], v["2026-03-20"], *([s["young"]] if s else [])):
        assert _exists(uri), uri
    # The champion's lineage still reads end to end: manifest -> validated reports.
    manifest = storage.read_json(storage.join(d["champion"], "manifest.json"))
    for clean in manifest["inputs"]:
        assert storage.read_json(storage.join(storage.parent(clean), "report.json"))["success"] is True
    # A second run finds nothing more to delete (idempotent).
    assert retention.plan(cfg, out, TODAY).delete == []


def test_retention_on_local_outputs(home: Path) -> None:
    cfg = from_mapping(PipelineConfig, CONFIG)
    out = str(home / "output")
    tree = build_tree(out, cfg, scratch=None)
    check_plan_and_apply(out, tree, cfg)
    # Local folders left empty by deleted trials go too; the champion's day keeps its trial.
    assert not (home / "output" / "models" / f"dt={OLD_DAY}").exists()
    assert sorted(
        p.name for p in (home / "output" / "models" / f"dt={CHAMPION_DAY}" / "fpchampion00").iterdir()
    ) == ["aaaa"]


@pytest.mark.integration
def test_retention_on_s3_outputs_and_worker_scratch(home: Path, s3_env: str) -> None:
    cfg = from_mapping(PipelineConfig, CONFIG)
    scratch = retention.scratch_root(s3_env)
    assert scratch == home / "work" / s3_env.split("://", 1)[1] / "models"
    tree = build_tree(s3_env, cfg, scratch=scratch)
    check_plan_and_apply(s3_env, tree, cfg)


def test_cli_dry_run_lists_then_retention_deletes(home: Path) -> None:
    cfg = from_mapping(PipelineConfig, CONFIG)
    out = str(home / "output")
    tree = build_tree(out, cfg, scratch=None)
    config = home / "pipeline.yaml"
    config.write_text(json.dumps(CONFIG))
    env = {**os.environ, "PIPELINE_HOME": str(home), "PIPELINE_CONFIG": str(config)}
    base = [sys.executable, "-m", "pipeline", "retention", "--today", TODAY.isoformat(), "--output", out]

    dry = subprocess.run(
        [*base, "--dry-run", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    listed = json.loads(dry.stdout)
    assert listed["deleted"] is False and listed["bytes"] > 0
    assert {i["uri"] for i in listed["delete"]} >= {tree["datasets"]["old"], tree["models"]["old"]}
    assert _exists(tree["datasets"]["old"])  # a dry run deletes nothing

    table = subprocess.run(
        [*base, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert (
        table.returncode == 0
        and f"would delete {len(listed['delete'])} folder(s), {listed['bytes']} bytes" in table.stdout
    )

    real = subprocess.run([*base, "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert real.returncode == 0, real.stderr[-3000:]
    done = json.loads(real.stdout)
    assert done["deleted"] is True and done["bytes"] == listed["bytes"]
    assert not _exists(tree["datasets"]["old"]) and _exists(tree["datasets"]["champion"])


def test_model_dir_of_reads_the_dags_run_key() -> None:
    assert (
        retention.model_dir_of("gru4rec_daily/2026-03-01/0123456789ab/k3y")
        == "dt=2026-03-01/0123456789ab/k3y"
    )
    assert retention.model_dir_of("adhoc-key") is None


def test_retention_config_rejects_negative_ages() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="retention: datasets_days must be >= 0"):
        from_mapping(PipelineConfig, {"retention": {"datasets_days": -1}})


def test_validated_days_of_the_next_training_window_are_kept(home: Path) -> None:
    """validated_days shorter than the training window: the days the next run reads again stay."""
    cfg = from_mapping(PipelineConfig, {"retention": {"validated_days": 3}, "airflow": {"train_days": 10}})
    out = str(home / "output")
    days = [(TODAY - dt.timedelta(days=k)).isoformat() for k in (2, 9, 10, 11)]
    for day in days:
        _validated(out, day)
    plan = retention.plan(cfg, out, TODAY, lineage=[])
    assert sorted(i.day for i in plan.delete if i.kind == "validated") == [days[3]]  # 11 days old: outside
