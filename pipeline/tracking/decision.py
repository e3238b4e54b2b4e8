"""The promotion decision rules, as pure functions: no MLflow, no I/O, testable on a handful of numbers.

:mod:`pipeline.tracking.promotion` gathers the evidence (runs, metrics, per-prediction ranks, training windows) and
applies these rules:

* **Select on validation, confirm on test.** Trials compete on their validation metric (``valid_<metric>``);
  only the selected trial meets the champion on the test split, so its test p-value is not inflated by
  choosing the maximum of N test scores (the winner's curse).
* **No validation split**: the trials cannot be told apart without using test. Either every eligible trial
  is tested against the champion and the p-values are Holm-corrected for the number of trials
  (``tracking.no_valid_split = holm``), or the decision is refused (``refuse``).
* **Leakage guard**: a comparison whose test window overlaps the champion's training window is never used.
* **The paired test**: a paired bootstrap over per-prediction values; promote only when the mean difference
  exceeds the margin and the (corrected) one-sided p-value is below the significance level.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline import metric_names
from pipeline.config import NO_VALID_SPLIT_MODES  # the allowed values of tracking.no_valid_split
from pipeline.errors import PromotionError

# selected_on values
SELECTED_ON_VALID = "valid"
SELECTED_ON_HOLM = "test, Holm-corrected"
SELECTED_ON_TEST_NO_CHAMPION = "test (no champion to compare with)"
SELECTED_ON_NONE = "none"
SELECTED_ON_OPERATOR = "operator"
LEAKAGE_REASON = "champion has seen this test window"


# ---------------------------------------------------------------------------------------------
# The primary metric


@dataclass(frozen=True)
class Metric:
    """``mrr_at_K`` or ``recall_at_K``: the per-prediction value whose mean is the metric."""

    kind: str
    cutoff: int

    @property
    def name(self) -> str:
        return metric_names.key(self.kind, self.cutoff)

    @property
    def valid_name(self) -> str:
        """The name each trial logs it under on the validation split (per epoch; the last is the model's)."""
        return f"valid_{self.name}"

    def per_prediction(self, ranks: np.ndarray) -> np.ndarray:
        r = np.asarray(ranks, dtype=np.float64)
        hit = r <= self.cutoff
        if self.kind == "recall":
            return hit.astype(np.float64)
        return np.where(hit, 1.0 / np.maximum(r, 1.0), 0.0)


def parse_metric(name: str) -> Metric:
    """Accept ``mrr_at_20``, ``mrr@20``, ``MRR@20``, ``recall_at_10`` ..."""
    parsed = metric_names.parse(name)
    if parsed is None:
        raise PromotionError(
            f"tracking.primary_metric {name!r} is not one of mrr_at_K / recall_at_K (K >= 1)"
        )
    return Metric(*parsed)


# ---------------------------------------------------------------------------------------------
# The paired test


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
    method: str = (
        "paired bootstrap over per-prediction values, one-sided, H0: mean(candidate - champion) <= margin"
    )


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


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): reject H0_i when adjusted p_i < alpha.

    Controls the family-wise error rate over the m tests: the chance that any trial no better than the
    champion is declared better stays below alpha however many trials were run.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Rules:
    margin: float  # the candidate must beat the champion by more than this (absolute)
    significance: float  # one-sided p-value threshold
    no_valid_split: str = "holm"  # holm | refuse


def judge(test: PairedTest, p_value: float, rules: Rules, correction: str = "") -> tuple[bool, str]:
    """(better, why) for one paired test; ``p_value`` is the test's own or its corrected p-value."""
    p = f"p={p_value:.4f}{' ' + correction if correction else ''}"
    if test.mean_diff <= rules.margin:
        return False, f"not better by the margin {rules.margin} ({p})"
    if p_value >= rules.significance:
        return False, f"better but not significant at {rules.significance} ({p})"
    return True, f"better by more than {rules.margin} with {p} < {rules.significance}"


# ---------------------------------------------------------------------------------------------
# Trials and selection


@dataclass
class Trial:
    """One candidate run as the decision saw it."""

    run_id: str
    test_value: float | None  # the primary metric on its test split (as logged at training)
    valid_value: float | None  # the primary metric on its validation split (None: no valid split)
    spop_value: float | None = None  # the S-POP baseline on the same test split
    data_fingerprint: str | None = None
    verdict: str = "eligible"  # eligible | refused: why | selected | not selected: why
    p_value: float | None = None  # Holm mode: its own paired test against the champion
    p_adjusted: float | None = None  # Holm mode: after the correction
    mean_diff: float | None = None  # Holm mode: its mean difference to the champion on test

    @property
    def eligible(self) -> bool:
        return not self.verdict.startswith("refused")


@dataclass(frozen=True)
class Selection:
    """Which trial meets the champion, how it was chosen, or why none may."""

    selected_on: str  # valid | test, Holm-corrected | none
    run_id: str | None = None  # the trial selected on valid (Holm mode: decided after the paired tests)
    refused: str | None = None  # why no trial may be compared (Holm mode refused, no eligible trial)


def select(trials: Sequence[Trial], no_valid_split: str) -> Selection:
    """Select among the eligible trials on their validation value, never on test.

    Without a validation value for every eligible trial the choice would need the test split: Holm mode
    leaves the choice to the corrected paired tests; ``refuse`` refuses when there is more than one trial.
    Ties on valid go to the first trial in the order given (the caller passes a stable order).
    """
    if no_valid_split not in NO_VALID_SPLIT_MODES:
        raise PromotionError(
            f"tracking.no_valid_split must be one of {NO_VALID_SPLIT_MODES}, got {no_valid_split!r}"
        )
    eligible = [t for t in trials if t.eligible]
    if not eligible:
        return Selection(SELECTED_ON_NONE, refused="no candidate passes the guards")
    if all(t.valid_value is not None for t in eligible):
        best = max(eligible, key=lambda t: t.valid_value)  # type: ignore[arg-type, return-value]
        return Selection(SELECTED_ON_VALID, run_id=best.run_id)
    if len(eligible) == 1:
        return Selection(SELECTED_ON_HOLM, run_id=eligible[0].run_id)  # one test: Holm is the plain test
    if no_valid_split == "refuse":
        return Selection(
            SELECTED_ON_NONE,
            refused=f"no validation split to select among {len(eligible)} eligible trials on, and "
            "tracking.no_valid_split=refuse (choosing on test would inflate the winner's test score); "
            "build with build.valid_days > 0 or set tracking.no_valid_split=holm",
        )
    return Selection(SELECTED_ON_HOLM)


def holm_winner(tests: Mapping[str, PairedTest], rules: Rules) -> tuple[str | None, dict[str, float]]:
    """Holm over the trials' paired tests: the best (largest mean difference) trial that is still better
    after the correction, or None; and every trial's adjusted p-value."""
    ids = list(tests)
    adjusted = dict(zip(ids, holm([tests[i].p_value for i in ids]), strict=True))
    better = [i for i in ids if judge(tests[i], adjusted[i], rules)[0]]
    winner = max(better, key=lambda i: tests[i].mean_diff) if better else None
    return winner, adjusted


# ---------------------------------------------------------------------------------------------
# Time windows (the leakage guard)


@dataclass(frozen=True)
class TimeWindow:
    """A closed UTC time interval, ISO 8601 strings as the dataset manifest writes them."""

    start: str
    end: str

    def bounds(self) -> tuple[dt.datetime, dt.datetime]:
        return _parse_time(self.start), _parse_time(self.end)

    def overlaps(self, other: TimeWindow) -> bool:
        a0, a1 = self.bounds()
        b0, b1 = other.bounds()
        return a0 <= b1 and b0 <= a1

    def __str__(self) -> str:
        return f"{self.start} .. {self.end}"


def _parse_time(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PromotionError(f"time window bound {value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def leakage(test_window: TimeWindow | None, champion_training: TimeWindow | None) -> str | None:
    """Why this comparison may not be used, or None when the champion never trained on the test window."""
    if test_window is None:
        return "the candidate's test window is not recorded, so leakage into the champion cannot be ruled out"
    if champion_training is None:
        return "the champion's training window is not recorded, so it may have seen this test window"
    if test_window.overlaps(champion_training):
        return (
            f"{LEAKAGE_REASON} (test {test_window} overlaps the champion's training data {champion_training})"
        )
    return None


# ---------------------------------------------------------------------------------------------
# The decision record


@dataclass
class Decision:
    """What ``promote`` or an operator lever decided, and why. Logged as a run and returned to the caller."""

    # promoted | challenger | refused | unchanged | pinned (comparison recorded, alias frozen)
    # | rolled_back | moved | pin | unpin (operator levers)
    action: str
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
    selected_on: str = SELECTED_ON_NONE
    n_trials: int = 0  # candidate runs considered (eligible or not)
    candidates: list[Trial] = field(default_factory=list)  # every trial: valid and test value, verdict
    p_adjusted: float | None = None  # Holm mode: the selected trial's corrected p-value
    test_window: TimeWindow | None = None  # the candidate's test data
    champion_training_window: TimeWindow | None = None  # what the champion trained on (train + valid)
    test_fingerprint: str | None = None  # the dataset both models were evaluated on
    rules_action: str | None = None  # what the rules decided when the champion is pinned
    date: str | None = None  # the DAG run's date (the data's last day), when a DAG run decided
    actor: str = ""  # who: an Airflow DAG run, or user@host for the CLI
    record_run_id: str | None = None

    @property
    def alias_moved(self) -> bool:
        return self.action in {"promoted", "rolled_back", "moved"}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["alias_moved"] = self.alias_moved
        return out
