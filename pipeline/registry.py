"""Model registry and promotion: a decision with evidence that never ships a worse model.

``promote`` takes training runs logged by :mod:`pipeline.tracking`, drops the ones that fail a guard
(data that failed validation, a model that does not beat the POP and S-POP baselines), registers the
best one as a version of the registered model and compares it with the current ``@champion``:

* no champion yet: the best candidate that beats the baselines becomes champion;
* otherwise the champion is re-evaluated on the candidate's test split (same data, same evaluator, so a
  champion trained on another item space is never compared on its own, different numbers), the two
  models are paired prediction by prediction and a paired bootstrap over the per-prediction reciprocal
  ranks (or hits, for Recall@K) decides: the alias moves only when the candidate is better by the
  configured margin with significance; otherwise the candidate gets the ``@challenger`` alias and the
  reason is recorded.

Every decision is logged as an MLflow run (``pipeline.kind = promotion``) holding both models' metrics,
the test statistic, the decision and the reason, and is copied onto the version's tags.

Race safety: the alias is moved inside a registry-wide lock, and only if the champion is still the one
the candidate was compared with; otherwise the comparison is redone against the new champion. The lock
is a registered model named ``<model>.promotion-lock``: creating a registered model is atomic in every
MLflow backend (a unique name), so it works the same on SQLite, PostgreSQL and through a tracking server.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import PromotionError
from pipeline.tracking import (
    RANKS_ARTIFACT,
    TAG_DATA_URI,
    TAG_FINGERPRINT,
    TAG_ITEM_SPACE,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_VALIDATION,
    quote,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

# Tags written on model versions.
TAG_PREVIOUS_CHAMPION = "pipeline.previous_champion"
TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_RECORD_RUN = "promotion.record_run_id"
TAG_SOURCE_RUN = "source_run_id"
TAG_ROLLED_BACK = "pipeline.rolled_back"

_MAX_ATTEMPTS = 5  # comparisons redone because another promotion moved the champion meanwhile


# ---------------------------------------------------------------------------------------------
# The primary metric and the paired test


@dataclass(frozen=True)
class Metric:
    """``mrr_at_K`` or ``recall_at_K``: the per-prediction value whose mean is the metric."""

    kind: str
    cutoff: int

    @property
    def name(self) -> str:
        return f"{self.kind}_at_{self.cutoff}"

    def per_prediction(self, ranks: np.ndarray) -> np.ndarray:
        r = np.asarray(ranks, dtype=np.float64)
        hit = r <= self.cutoff
        if self.kind == "recall":
            return hit.astype(np.float64)
        return np.where(hit, 1.0 / np.maximum(r, 1.0), 0.0)


def parse_metric(name: str) -> Metric:
    """Accept ``mrr_at_20``, ``mrr@20``, ``MRR@20``, ``recall_at_10`` ..."""
    m = re.fullmatch(r"\s*(mrr|recall)\s*(?:@|_at_)\s*(\d+)\s*", name, flags=re.IGNORECASE)
    if not m or int(m.group(2)) < 1:
        raise PromotionError(f"tracking.primary_metric {name!r} is not one of mrr_at_K / recall_at_K (K >= 1)")
    return Metric(m.group(1).lower(), int(m.group(2)))


@dataclass(frozen=True)
class PairedTest:
    """Paired bootstrap of mean(candidate - champion) over the same predictions."""

    n: int
    candidate_mean: float
    champion_mean: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # one-sided, H0: mean diff <= margin
    margin: float
    samples: int
    method: str = "paired bootstrap over per-prediction values, one-sided, H0: mean(candidate - champion) <= margin"


def paired_bootstrap(
    candidate: np.ndarray,
    champion: np.ndarray,
    *,
    margin: float = 0.0,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedTest:
    """Resample predictions with replacement, keeping each candidate/champion pair together.

    The p-value is the share of resampled mean differences that do not exceed ``margin`` (with the usual
    +1 correction so it is never exactly 0).
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise PromotionError(f"paired test needs two equal-length vectors, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise PromotionError("paired test: no predictions in common between candidate and champion")
    if samples < 1:
        raise PromotionError(f"tracking.bootstrap_samples must be >= 1, got {samples}")
    diff = a - b
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    rows_per_chunk = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
    for start in range(0, samples, rows_per_chunk):
        stop = min(samples, start + rows_per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    p_value = (1.0 + np.count_nonzero(means <= margin)) / (samples + 1.0)
    return PairedTest(
        n=n,
        candidate_mean=float(a.mean()),
        champion_mean=float(b.mean()),
        mean_diff=float(diff.mean()),
        ci_low=float(low),
        ci_high=float(high),
        p_value=float(p_value),
        margin=float(margin),
        samples=samples,
    )


def pair_by_target_rows(
    candidate_rows: np.ndarray,
    candidate_values: np.ndarray,
    champion_rows: np.ndarray,
    champion_values: np.ndarray,
    missing: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Align two models' per-prediction values on the candidate's predictions (test-table row of the target).

    A prediction the champion did not make (its item map lacks the target or the whole session) gets
    ``missing`` for the champion (a miss: 0 for a reciprocal rank, inf for a rank): a model cannot recommend
    an item it does not know. Returns the two aligned vectors and how many predictions the champion missed.
    """
    c_rows = np.asarray(candidate_rows, dtype=np.int64)
    h_rows = np.asarray(champion_rows, dtype=np.int64)
    if np.unique(c_rows).size != c_rows.size or np.unique(h_rows).size != h_rows.size:
        raise PromotionError("evaluation returned the same target row twice; cannot pair predictions")
    order = np.argsort(h_rows)
    sorted_rows = h_rows[order]
    pos = np.searchsorted(sorted_rows, c_rows)
    matched = np.zeros(c_rows.size, dtype=bool)
    inside = pos < sorted_rows.size
    matched[inside] = sorted_rows[pos[inside]] == c_rows[inside]
    champion_on_candidate = np.full(c_rows.size, missing, dtype=np.float64)
    champion_on_candidate[matched] = np.asarray(champion_values, dtype=np.float64)[order][pos[matched]]
    return np.asarray(candidate_values, dtype=np.float64), champion_on_candidate, int((~matched).sum())


# ---------------------------------------------------------------------------------------------
# Decisions


@dataclass
class Decision:
    """What ``promote`` / ``rollback`` decided, and why. Logged as a run and returned to the caller."""

    action: str  # promoted | challenger | refused | unchanged | rolled_back
    reason: str
    model_name: str
    metric: str
    candidate_run_id: str | None = None
    candidate_version: str | None = None
    champion_version: str | None = None  # the champion it was compared with (before the decision)
    candidate_value: float | None = None  # on the candidate's test split
    champion_value: float | None = None  # champion re-evaluated on the candidate's test split
    champion_logged_value: float | None = None  # what the champion reported on its own test split
    candidate_metrics: dict[str, float] = field(default_factory=dict)  # recall_at_K / mrr_at_K ...
    champion_metrics: dict[str, float] = field(default_factory=dict)  # ... on the same predictions
    same_item_space: bool | None = None
    champion_reevaluated: bool = False
    champion_missed_predictions: int = 0
    test: PairedTest | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate considered, with verdict
    record_run_id: str | None = None

    @property
    def alias_moved(self) -> bool:
        return self.action in {"promoted", "rolled_back"}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["alias_moved"] = self.alias_moved
        return out


def _client(cfg: PipelineConfig) -> MlflowClient:
    from pipeline import tracking

    tracking.configure(cfg.tracking)
    from mlflow import MlflowClient

    return MlflowClient()


def champion_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``name@alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # No such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE (SQL stores, server).
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


# ---------------------------------------------------------------------------------------------
# The promotion lock


def lock_name(model_name: str) -> str:
    return f"{model_name}.promotion-lock"


@contextmanager
def promotion_lock(
    client: MlflowClient, model_name: str, *, timeout_s: float = 900.0, stale_s: float = 3600.0, poll_s: float = 0.2
) -> Iterator[str]:
    """Hold the registry-wide promotion lock of ``model_name`` (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"pipeline.lock_owner": owner},
                description=f"Lock held while a promotion of {model_name!r} moves its aliases; deleted when it ends.",
            )
            break
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: the SQL store looks the existing lock up after its insert
            # collides, and the holder may release it in between. Both mean "contended, retry".
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _break_if_stale(client, name, stale_s)
        if time.monotonic() > deadline:
            raise PromotionError(
                f"timed out after {timeout_s:.0f}s waiting for the promotion lock {name!r} (held by {holder}); "
                f"if no promotion is running, delete that registered model"
            )
        time.sleep(poll_s * (0.5 + random.random()))
    log.debug("promotion lock %s acquired by %s", name, owner)
    try:
        yield owner
    finally:
        _release(client, name, owner)


def _break_if_stale(client: MlflowClient, name: str, stale_s: float) -> str:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(name)
    except MlflowException:
        return "nobody (just released)"
    holder = lock.tags.get("pipeline.lock_owner", "unknown")
    age_s = time.time() - lock.creation_timestamp / 1000.0
    if age_s > stale_s:
        log.warning("breaking promotion lock %s held by %s for %.0fs (stale after %.0fs)", name, holder, age_s, stale_s)
        _release(client, name, holder)
    return holder


def _release(client: MlflowClient, name: str, owner: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(name)
        if lock.tags.get("pipeline.lock_owner") == owner:
            client.delete_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


# ---------------------------------------------------------------------------------------------
# Registration


def find_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The oldest version of ``name`` registered from ``run_id``, if any."""
    versions = client.search_model_versions(f"name = {quote(name)} and run_id = {quote(run_id)}")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def register_candidate(client: MlflowClient, name: str, run: Run, metric_names: Sequence[str] = ()) -> ModelVersion:
    """Register the model of a training run as a version of ``name``; a run is never registered twice.

    Call it inside :func:`promotion_lock` when promotions may run concurrently (``promote`` does).
    """
    from mlflow.exceptions import MlflowException

    existing = find_version(client, name, run.info.run_id)
    if existing is not None:
        return existing
    source = run.data.tags.get(TAG_MODEL_URI)
    if not source:
        raise PromotionError(f"run {run.info.run_id} has no logged model (tag {TAG_MODEL_URI} missing)")
    try:
        client.create_registered_model(name, description="GRU4Rec session-based recommender (pipeline.registry)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        TAG_SOURCE_RUN: run.info.run_id,
        TAG_FINGERPRINT: run.data.tags.get(TAG_FINGERPRINT, ""),
        TAG_DATA_URI: run.data.tags.get(TAG_DATA_URI, ""),
        TAG_ITEM_SPACE: run.data.tags.get(TAG_ITEM_SPACE, ""),
        TAG_VALIDATION: run.data.tags.get(TAG_VALIDATION, "missing"),
    }
    for key in metric_names:
        if key in run.data.metrics:
            tags[f"metric.{key}"] = f"{run.data.metrics[key]:.6f}"
    # A logged model (models:/m-<id>): the server needs its id to resolve the source's artifacts.
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    version = client.create_model_version(name, source, run_id=run.info.run_id, tags=tags, model_id=model_id)
    log.info("registered %s version %s from run %s", name, version.version, run.info.run_id)
    return version


# ---------------------------------------------------------------------------------------------
# Guards


def check_guards(run: Run, metric: Metric, require_validation: bool) -> str | None:
    """Why this run may not be promoted, or None when it passes every guard."""
    tags, metrics = run.data.tags, run.data.metrics
    if run.info.status != "FINISHED":
        return f"run status is {run.info.status}, not FINISHED"
    if tags.get(TAG_KIND) != "training":
        return f"not a training run ({TAG_KIND}={tags.get(TAG_KIND)!r})"
    if not tags.get(TAG_MODEL_URI):
        return "the run logged no model"
    validation = tags.get(TAG_VALIDATION, "missing")
    if validation == "failed":
        return "its training data failed validation (data.validation=failed)"
    if validation != "passed" and require_validation:
        return f"its training data has no passing validation report (data.validation={validation}); set tracking.require_validation=false to allow it"
    value = metrics.get(metric.name)
    if value is None:
        return f"metric {metric.name} was not logged"
    for baseline in ("spop", "pop"):
        key = f"baseline_{baseline}_{metric.name}"
        if key not in metrics:
            return f"baseline metric {key} was not logged"
        if not value > metrics[key]:
            label = "S-POP" if baseline == "spop" else "POP"
            return f"{metric.name}={value:.4f} does not beat the {label} baseline ({metrics[key]:.4f})"
    return None


# ---------------------------------------------------------------------------------------------
# Promotion


def candidate_runs(cfg: PipelineConfig, parent_run_id: str | None = None) -> list[str]:
    """Finished training runs under ``parent_run_id``, or else the newest finished training run."""
    from mlflow import MlflowClient

    from pipeline import tracking

    experiment_id = tracking.configure(cfg.tracking)
    client = MlflowClient()
    query = f"tags.`{TAG_KIND}` = 'training' and attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = {quote(parent_run_id)}"
    runs = client.search_runs(
        [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1000 if parent_run_id else 1
    )
    if not runs:
        where = f"under parent run {parent_run_id}" if parent_run_id else f"in experiment {cfg.tracking.experiment!r}"
        raise PromotionError(f"no finished training run {where}; train one with `python -m pipeline track`")
    return [r.info.run_id for r in runs]


def promote(
    cfg: PipelineConfig,
    run_ids: Sequence[str],
    *,
    parent_run_id: str | None = None,
    device: str = "auto",
    on_compared: Callable[[Decision], None] | None = None,
) -> Decision:
    """Decide whether the best of ``run_ids`` becomes champion; log and return the decision.

    ``parent_run_id`` nests the decision record under a run (the DAG run's parent run).
    ``on_compared`` is called after each comparison, before the alias is moved (used by tests to line
    two promotions up against the same champion).
    """
    if not run_ids:
        raise PromotionError("no candidate runs given")
    client = _client(cfg)
    tcfg = cfg.tracking
    metric = parse_metric(tcfg.primary_metric)
    name = tcfg.registered_model

    candidates: list[dict[str, Any]] = []
    eligible: list[Run] = []
    for run_id in dict.fromkeys(run_ids):
        run = _get_run(client, run_id)
        why = check_guards(run, metric, tcfg.require_validation)
        if why is None:
            registered = find_version(client, name, run_id)
            if registered is not None and registered.tags.get(TAG_ROLLED_BACK) == "true":
                why = f"its version {registered.version} was rolled back from @{tcfg.champion_alias}; train a new run"
        candidates.append(
            {
                "run_id": run_id,
                metric.name: run.data.metrics.get(metric.name),
                f"baseline_spop_{metric.name}": run.data.metrics.get(f"baseline_spop_{metric.name}"),
                "data_fingerprint": run.data.tags.get(TAG_FINGERPRINT),
                "verdict": f"refused: {why}" if why else "eligible",
            }
        )
        if why is None:
            eligible.append(run)
        else:
            log.info("candidate %s refused: %s", run_id, why)

    if not eligible:
        reasons = "; ".join(f"{c['run_id']}: {c['verdict']}" for c in candidates)
        decision = Decision("refused", f"no candidate passes the guards ({reasons})", name, metric.name, candidates=candidates)
        decision.candidate_run_id = candidates[0]["run_id"] if len(candidates) == 1 else None
        return _record(client, cfg, decision, parent_run_id)

    best = max(eligible, key=lambda r: r.data.metrics[metric.name])
    for c in candidates:
        if c["run_id"] == best.info.run_id:
            c["verdict"] = "selected"
        elif c["verdict"] == "eligible":
            c["verdict"] = f"eligible, not the best on {metric.name}"

    for _attempt in range(_MAX_ATTEMPTS):
        champion = champion_version(client, name, tcfg.champion_alias)
        decision = Decision(
            "challenger",
            "",
            name,
            metric.name,
            candidate_run_id=best.info.run_id,
            champion_version=str(champion.version) if champion else None,
            candidate_value=best.data.metrics[metric.name],
            candidates=candidates,
        )
        decision.candidate_metrics = {k: best.data.metrics[k] for k in _metric_names(best)}
        if champion is None:
            decision.action = "promoted"
            decision.reason = (
                f"no champion yet; best candidate {metric.name}={decision.candidate_value:.4f} beats the POP and S-POP baselines"
            )
        elif champion.run_id == best.info.run_id:
            decision.action = "unchanged"
            decision.reason = f"the candidate is already the champion (version {champion.version})"
        else:
            _compare(client, cfg, metric, best, champion, decision, device)
        if on_compared is not None:
            on_compared(decision)
        with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
            now = champion_version(client, name, tcfg.champion_alias)
            if (str(now.version) if now else None) != decision.champion_version:
                log.info(
                    "champion moved from %s to %s during the comparison; comparing again",
                    decision.champion_version,
                    now.version if now else None,
                )
                continue
            version = register_candidate(client, name, best, _metric_names(best))
            decision.candidate_version = str(version.version)
            _commit(client, tcfg, decision, version)
            return _record(client, cfg, decision, parent_run_id, version)
    raise PromotionError(f"the champion of {name!r} kept moving during {_MAX_ATTEMPTS} comparisons; try again")


def _compare(
    client: MlflowClient, cfg: PipelineConfig, metric: Metric, run: Run, champion: ModelVersion, decision: Decision, device: str
) -> None:
    """Re-evaluate the champion on the candidate's test split and run the paired test."""
    from pipeline.evaluate import evaluate_model
    from pipeline.sessions import read_split

    tcfg = cfg.tracking
    data_uri = run.data.tags.get(TAG_DATA_URI)
    if not data_uri:
        raise PromotionError(f"candidate run {run.info.run_id} does not record its dataset ({TAG_DATA_URI})")
    champion_run = _get_run(client, champion.run_id) if champion.run_id else None
    champion_space = champion.tags.get(TAG_ITEM_SPACE) or (champion_run.data.tags.get(TAG_ITEM_SPACE) if champion_run else None)
    decision.same_item_space = bool(champion_space) and champion_space == run.data.tags.get(TAG_ITEM_SPACE)
    if champion_run is not None:
        decision.champion_logged_value = champion_run.data.metrics.get(metric.name)

    test = read_split(data_uri, "test")
    cutoffs = tuple(sorted({metric.cutoff, *cfg.eval.cutoffs}))
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        champion_dir = _download_model_dir(f"models:/{champion.name}/{champion.version}", Path(tmp) / "champion")
        log.info("re-evaluating champion %s v%s on the test split of %s", champion.name, champion.version, data_uri)
        champ_eval = evaluate_model(champion_dir, test, cutoffs=cutoffs, ties=cfg.eval.ties, device=device)
        cand_rows, cand_ranks = _candidate_ranks(run, Path(tmp), test, cutoffs, cfg.eval.ties, device)
    decision.champion_reevaluated = True
    cand_ranks, champ_ranks, missed = pair_by_target_rows(
        cand_rows, cand_ranks, np.asarray(champ_eval.target_rows), np.asarray(champ_eval.ranks), missing=np.inf
    )
    decision.champion_missed_predictions = missed
    decision.candidate_metrics = _metrics_from_ranks(cand_ranks, cutoffs)
    decision.champion_metrics = _metrics_from_ranks(champ_ranks, cutoffs)
    cand_values, champ_values = metric.per_prediction(cand_ranks), metric.per_prediction(champ_ranks)
    result = paired_bootstrap(
        cand_values, champ_values, margin=tcfg.promotion_margin, samples=tcfg.bootstrap_samples, seed=tcfg.bootstrap_seed
    )
    decision.test = result
    decision.candidate_value = result.candidate_mean
    decision.champion_value = result.champion_mean
    space = "same item space" if decision.same_item_space else "different item space, champion re-evaluated"
    summary = (
        f"{metric.name} candidate {result.candidate_mean:.4f} vs champion v{champion.version} {result.champion_mean:.4f} "
        f"(diff {result.mean_diff:+.4f}, 95% CI [{result.ci_low:+.4f}, {result.ci_high:+.4f}], p={result.p_value:.4f}, "
        f"n={result.n}, {space})"
    )
    if result.mean_diff <= tcfg.promotion_margin:
        decision.action = "challenger"
        decision.reason = f"not better by the margin {tcfg.promotion_margin}: {summary}"
    elif result.p_value >= tcfg.significance:
        decision.action = "challenger"
        decision.reason = f"better but not significant at {tcfg.significance}: {summary}"
    else:
        decision.action = "promoted"
        decision.reason = f"better by more than {tcfg.promotion_margin} with p < {tcfg.significance}: {summary}"


def _metrics_from_ranks(ranks: np.ndarray, cutoffs: Sequence[int]) -> dict[str, float]:
    from pipeline.evaluate import metrics_from_ranks
    from pipeline.tracking import metric_key

    return {metric_key(k): v for k, v in metrics_from_ranks(ranks, cutoffs).items()}


def _candidate_ranks(run: Run, tmp: Path, test: Any, cutoffs: tuple[int, ...], ties: str, device: str):
    """The candidate's per-prediction ranks on its own test split: logged at training, else re-computed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=RANKS_ARTIFACT, dst_path=str(tmp))
        with np.load(local) as data:
            return data["target_rows"], data["ranks"]
    except (MlflowException, OSError, KeyError):
        log.info("run %s has no %s; evaluating the candidate again", run.info.run_id, RANKS_ARTIFACT)
    from pipeline.evaluate import evaluate_model

    model_dir = _download_model_dir(run.data.tags[TAG_MODEL_URI], tmp / "candidate")
    result = evaluate_model(model_dir, test, cutoffs=cutoffs, ties=ties, device=device)
    return np.asarray(result.target_rows), np.asarray(result.ranks)


def _download_model_dir(model_uri: str, dst: Path) -> Path:
    """Download a logged pyfunc model and return the trained-model directory it carries as an artifact."""
    import mlflow
    from mlflow.models import Model

    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    if "model_dir" not in artifacts:
        raise PromotionError(f"{model_uri} is not a pipeline model (no 'model_dir' artifact)")
    return local / artifacts["model_dir"]["path"]


def _commit(client: MlflowClient, tcfg: Any, decision: Decision, version: ModelVersion) -> None:
    """Move the aliases for a decision (inside the promotion lock)."""
    name = tcfg.registered_model
    if decision.action == "promoted":
        if decision.champion_version is not None:
            client.set_model_version_tag(name, version.version, TAG_PREVIOUS_CHAMPION, decision.champion_version)
        client.set_registered_model_alias(name, tcfg.champion_alias, version.version)
        challenger = champion_version(client, name, tcfg.challenger_alias)
        if challenger is not None and str(challenger.version) == str(version.version):
            client.delete_registered_model_alias(name, tcfg.challenger_alias)
        log.info("%s@%s -> version %s (was %s)", name, tcfg.champion_alias, version.version, decision.champion_version)
    elif decision.action == "challenger":
        client.set_registered_model_alias(name, tcfg.challenger_alias, version.version)
        log.info("%s@%s -> version %s: %s", name, tcfg.challenger_alias, version.version, decision.reason)


# ---------------------------------------------------------------------------------------------
# Rollback


def rollback(cfg: PipelineConfig, *, parent_run_id: str | None = None) -> Decision:
    """Return ``@champion`` to the version it replaced (recorded at promotion); log the decision."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    tcfg = cfg.tracking
    name = tcfg.registered_model
    metric = parse_metric(tcfg.primary_metric)
    with promotion_lock(client, name, timeout_s=tcfg.lock_timeout_s, stale_s=tcfg.lock_stale_s):
        current = champion_version(client, name, tcfg.champion_alias)
        if current is None:
            raise PromotionError(f"registered model {name!r} has no @{tcfg.champion_alias}: nothing to roll back")
        previous = current.tags.get(TAG_PREVIOUS_CHAMPION)
        if not previous:
            raise PromotionError(
                f"{name} version {current.version} (@{tcfg.champion_alias}) records no previous champion to return to"
            )
        try:
            target = client.get_model_version(name, previous)
        except MlflowException as exc:
            raise PromotionError(f"previous champion {name} version {previous} is gone: {exc.message}") from None
        client.set_registered_model_alias(name, tcfg.champion_alias, target.version)
        client.set_model_version_tag(name, current.version, TAG_ROLLED_BACK, "true")
        decision = Decision(
            "rolled_back",
            f"rolled back {name}@{tcfg.champion_alias} from version {current.version} to version {target.version}",
            name,
            metric.name,
            candidate_run_id=target.run_id,
            candidate_version=str(target.version),
            champion_version=str(current.version),
        )
        log.info(decision.reason)
        return _record(client, cfg, decision, parent_run_id, target)


# ---------------------------------------------------------------------------------------------
# Decision records


def _record(
    client: MlflowClient, cfg: PipelineConfig, decision: Decision, parent_run_id: str | None, version: ModelVersion | None = None
) -> Decision:
    """Log the decision as an MLflow run and copy it onto the model version's tags."""
    from mlflow.entities import Metric as MlflowMetric
    from mlflow.entities import Param

    from pipeline import tracking

    experiment_id = tracking.configure(cfg.tracking)
    tags = {
        TAG_KIND: "promotion",
        "mlflow.runName": f"{decision.action}-{decision.model_name}" + (f"-v{version.version}" if version else ""),
        TAG_DECISION: decision.action,
        TAG_REASON: decision.reason[:5000],
        "registered_model": decision.model_name,
        **tracking.environment_tags(),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags)
    params = {
        "metric": decision.metric,
        "candidate_run_id": decision.candidate_run_id or "",
        "candidate_version": decision.candidate_version or "",
        "champion_version": decision.champion_version or "",
        "promotion_margin": cfg.tracking.promotion_margin,
        "significance": cfg.tracking.significance,
        "bootstrap_samples": cfg.tracking.bootstrap_samples,
        "same_item_space": decision.same_item_space,
        "champion_reevaluated": decision.champion_reevaluated,
    }
    now = int(time.time() * 1000)
    values = {
        f"candidate_{decision.metric}": decision.candidate_value,
        f"champion_{decision.metric}": decision.champion_value,
        f"champion_logged_{decision.metric}": decision.champion_logged_value,
        "alias_moved": float(decision.alias_moved),
    }
    values |= {f"candidate_{k}": v for k, v in decision.candidate_metrics.items()}
    values |= {f"champion_{k}": v for k, v in decision.champion_metrics.items()}
    if decision.test is not None:
        values |= {
            "mean_diff": decision.test.mean_diff,
            "ci_low": decision.test.ci_low,
            "ci_high": decision.test.ci_high,
            "p_value": decision.test.p_value,
            "n_predictions": float(decision.test.n),
            "champion_missed_predictions": float(decision.champion_missed_predictions),
        }
    client.log_batch(
        run.info.run_id,
        metrics=[MlflowMetric(k, float(v), now, 0) for k, v in values.items() if v is not None],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    decision.record_run_id = run.info.run_id
    client.log_dict(run.info.run_id, decision.to_dict(), "decision.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    if version is not None:
        for key, value in {
            TAG_DECISION: decision.action,
            TAG_REASON: decision.reason[:5000],
            TAG_RECORD_RUN: run.info.run_id,
        }.items():
            client.set_model_version_tag(decision.model_name, version.version, key, value)
    # Each candidate run carries its own verdict, so the runs table shows why a run was not promoted.
    for candidate in decision.candidates:
        verdict = candidate["verdict"]
        action = decision.action if verdict == "selected" else "refused" if verdict.startswith("refused") else "not_selected"
        client.set_tag(candidate["run_id"], TAG_DECISION, action)
        client.set_tag(candidate["run_id"], TAG_RECORD_RUN, run.info.run_id)
    log.info("promotion decision %s: %s (record run %s)", decision.action, decision.reason, run.info.run_id)
    return decision


# ---------------------------------------------------------------------------------------------
# Helpers


def _get_run(client: MlflowClient, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise PromotionError(f"candidate run {run_id!r} not found in the tracking store: {exc.message}") from None


def _metric_names(run: Run) -> list[str]:
    return sorted(k for k in run.data.metrics if re.fullmatch(r"(baseline_(s?pop)_)?(mrr|recall)_at_\d+", k))

