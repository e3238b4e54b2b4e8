"""The champion against candidates, prediction by prediction, on the candidates' own test split.

The champion is re-evaluated once on the (shared, fingerprint-checked) test split; each candidate's per-prediction
ranks come from its training run (``evaluation/ranks.npz``, else it is evaluated again). The two are paired by
test row and a paired bootstrap (:mod:`pipeline.tracking.decision`) gives the evidence for the decision.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pyarrow as pa
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from pipeline import metric_names
from pipeline.errors import PromotionError
from pipeline.model.evaluate import evaluate_model, metrics_from_ranks
from pipeline.tracking.decision import Decision, Metric, PairedTest, pair_by_target_rows, paired_bootstrap
from pipeline.tracking.lineage import read_test_split
from pipeline.tracking.registry import get_run
from pipeline.tracking.runs import RANKS_ARTIFACT, TAG_DATA_URI, TAG_ITEM_SPACE, TAG_MODEL_URI

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """One candidate against the champion on the candidate's test split."""

    test: PairedTest
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    champion_missed: int


def compare(
    client: MlflowClient,
    cfg: PipelineConfig,
    metric: Metric,
    runs: Sequence[Run],
    champion: ModelVersion,
    decision: Decision,
    device: str,
) -> dict[str, Comparison]:
    """Re-evaluate the champion once on the candidates' (shared, fingerprint-checked) test split and run
    the paired test for each candidate."""
    tcfg = cfg.tracking
    first = runs[0]
    champion_run = get_run(client, champion.run_id) if champion.run_id else None
    champion_space = champion.tags.get(TAG_ITEM_SPACE) or (
        champion_run.data.tags.get(TAG_ITEM_SPACE) if champion_run else None
    )
    decision.same_item_space = bool(champion_space) and champion_space == first.data.tags.get(TAG_ITEM_SPACE)
    if champion_run is not None:
        decision.champion_logged_value = champion_run.data.metrics.get(metric.name)

    test = read_test_split(first)
    cutoffs = tuple(sorted({metric.cutoff, *cfg.eval.cutoffs}))
    out: dict[str, Comparison] = {}
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        champion_dir = _download_model_dir(
            f"models:/{champion.name}/{champion.version}", Path(tmp) / "champion"
        )
        log.info(
            "re-evaluating champion %s v%s on the test split of %s",
            champion.name,
            champion.version,
            first.data.tags[TAG_DATA_URI],
        )
        champ_eval = evaluate_model(champion_dir, test, cutoffs=cutoffs, ties=cfg.eval.ties, device=device)
        for run in runs:
            rows, ranks = _candidate_ranks(
                run, Path(tmp) / run.info.run_id, test, cutoffs, cfg.eval.ties, device
            )
            cand_ranks, champ_ranks, missed = pair_by_target_rows(
                rows, ranks, np.asarray(champ_eval.target_rows), np.asarray(champ_eval.ranks), missing=np.inf
            )
            result = paired_bootstrap(
                metric.per_prediction(cand_ranks),
                metric.per_prediction(champ_ranks),
                margin=tcfg.promotion_margin,
                samples=tcfg.bootstrap_samples,
                seed=tcfg.bootstrap_seed,
            )
            out[run.info.run_id] = Comparison(
                result,
                _metrics_from_ranks(cand_ranks, cutoffs),
                _metrics_from_ranks(champ_ranks, cutoffs),
                missed,
            )
    decision.champion_reevaluated = True
    return out


def _metrics_from_ranks(ranks: np.ndarray, cutoffs: Sequence[int]) -> dict[str, float]:
    return {metric_names.to_key(k): v for k, v in metrics_from_ranks(ranks, cutoffs).items()}


def _candidate_ranks(
    run: Run, tmp: Path, test: pa.Table, cutoffs: tuple[int, ...], ties: str, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate's per-prediction ranks on its own test split: logged at training, else re-computed."""
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=RANKS_ARTIFACT, dst_path=str(tmp)
        )
        with np.load(local) as data:
            return data["target_rows"], data["ranks"]
    except (MlflowException, OSError, KeyError):
        log.info("run %s has no %s; evaluating the candidate again", run.info.run_id, RANKS_ARTIFACT)
    model_dir = _download_model_dir(run.data.tags[TAG_MODEL_URI], tmp / "candidate")
    result = evaluate_model(model_dir, test, cutoffs=cutoffs, ties=ties, device=device)
    return np.asarray(result.target_rows), np.asarray(result.ranks)


def _download_model_dir(model_uri: str, dst: Path) -> Path:
    """Download a logged pyfunc model and return the trained-model directory it carries as an artifact."""
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    if "model_dir" not in artifacts:
        raise PromotionError(f"{model_uri} is not a pipeline model (no 'model_dir' artifact)")
    return local / artifacts["model_dir"]["path"]
