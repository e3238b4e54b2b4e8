"""Full-ranking next-item evaluation of GRU4Rec, with POP and S-POP baselines from the same pass.

Protocol (../shared/reference/gru4rec.md): the item map comes from training data only; test events whose
item is unknown to it are dropped and counted, then sessions left with fewer than 2 events are dropped.
Every remaining event but the first of its session is one prediction, ranked against ALL training items.
Each test session starts from a zero hidden state: sessions are laid out one per row, sorted by length,
so at step t the sessions still running are a prefix of the rows and no state ever crosses sessions.
The loop over steps never reads a value back from the device (sizes come from the host-side lengths),
so on a GPU it only queues work. Ties are explicit: ``standard`` rank = 1 + #(scores > target), ``conservative`` = #(scores >= target)
(the target counts itself, so a constant-score model gets rank = catalogue size), ``median`` = their mean.

The click inputs and the item map are read by ``pipeline.model.clicks``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import metric_names
from pipeline.config import TIES  # the allowed values of eval.ties
from pipeline.errors import ConfigError
from pipeline.model.clicks import ClickLog, IndexedSessions, ItemMap, index_sessions, read_log

if TYPE_CHECKING:
    import torch

    from pipeline.model.network import GRU4Rec

log = logging.getLogger(__name__)

DEFAULT_CUTOFFS = (1, 5, 10, 20)
SCORE_BUDGET = 1 << 24  # score-matrix entries held at once (64 MB of float32): bounds memory for huge catalogues

# ---------------------------------------------------------------------------------------------------
# Ranking and metrics


def tie_rank(greater: Any, greater_equal: Any, ties: str) -> Any:
    """Combine #(scores > target) and #(scores >= target) into the rank of the target."""
    if ties == "conservative":
        return greater_equal
    if ties == "standard":
        return greater + 1
    if ties == "median":
        return (greater + 1 + greater_equal) / 2
    raise ConfigError(f"unknown ties mode {ties!r}; expected one of {', '.join(TIES)}")


def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor, ties: str) -> torch.Tensor:
    """Rank of each row's target among all columns.

    Counted from the "<" / "<=" side, so NaN works against the model: a NaN target ranks last and a NaN
    item counts as scoring above the target.
    """
    import torch

    n = scores.shape[1]
    target = scores.gather(1, targets.unsqueeze(1))
    greater = n - (scores <= target).sum(1) if ties != "conservative" else None
    greater_equal = n - (scores < target).sum(1) if ties != "standard" else None
    return tie_rank(greater, greater_equal, ties).to(torch.float64).clamp_(max=n)


class _SessionPopularity:
    """S-POP ranks computed from each session's own prefix, never from a catalogue-wide matrix.

    S-POP scores an item by its count in the session so far, ties broken by training popularity: as one
    integer, count * (max popularity + 1) + popularity. Items not in the session score below every session
    item, so the rank of a target splits into the session's distinct items that beat it plus, for a target
    not yet in the session, the catalogue items at least as popular (from a sorted popularity table).
    """

    def __init__(self, items: torch.Tensor, counts: torch.Tensor, ties: str, max_count: int) -> None:
        import torch

        self.items, self.pop, self.ties = items, counts, ties
        self.weight = max_count + 1  # from the host: reading counts.max() would wait for the device
        self.sorted_pop = torch.sort(counts).values
        self.count = torch.zeros_like(items)  # per prefix position: occurrences of its item in the prefix
        self.first = torch.zeros_like(items, dtype=torch.bool)  # first occurrence of its item in the session

    def ranks(self, t: int, n: int) -> torch.Tensor:
        """Ranks of the targets at position t + 1 of the first n sessions, after their items 0..t."""
        import torch

        prefix = self.items[:n, : t + 1]
        repeat = prefix[:, :t] == prefix[:, t : t + 1]
        self.count[:n, :t] += repeat.long()
        self.count[:n, t] = repeat.sum(1) + 1
        self.first[:n, t] = ~repeat.any(1)
        first = self.first[:n, : t + 1]
        y = self.items[:n, t + 1]
        pop_prefix, pop_y = self.pop[prefix], self.pop[y]
        score_prefix = self.count[:n, : t + 1] * self.weight + pop_prefix
        score_y = ((prefix == y[:, None]).sum(1) * self.weight + pop_y).unsqueeze(1)
        in_session = score_y[:, 0] >= self.weight
        n_session = first.sum(1)
        n_items = len(self.pop)
        greater = greater_equal = None
        if self.ties != "conservative":
            outside = n_items - torch.searchsorted(self.sorted_pop, pop_y, right=True)
            beyond = n_session + outside - (first & (pop_prefix > pop_y[:, None])).sum(1)
            greater = torch.where(in_session, (first & (score_prefix > score_y)).sum(1), beyond)
        if self.ties != "standard":
            outside = n_items - torch.searchsorted(self.sorted_pop, pop_y, right=False)
            beyond = n_session + outside - (first & (pop_prefix >= pop_y[:, None])).sum(1)
            greater_equal = torch.where(in_session, (first & (score_prefix >= score_y)).sum(1), beyond)
        return tie_rank(greater, greater_equal, self.ties).to(torch.float64)


def metrics_from_ranks(ranks: np.ndarray, cutoffs: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    n = max(len(ranks), 1)
    for k in cutoffs:
        hit = ranks <= k
        out[metric_names.at_name("recall", k)] = float(hit.sum() / n)
        out[metric_names.at_name("mrr", k)] = float(np.where(hit, 1.0 / np.maximum(ranks, 1.0), 0.0).sum() / n)
    return out


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # exactly the JSON of ``python -m pipeline evaluate``
    ranks: np.ndarray  # float64, the model's rank of each prediction, ordered by target_rows
    target_rows: np.ndarray  # int64, row (in the test table as read) of each predicted event
    baseline_ranks: dict[str, np.ndarray]  # "pop" / "spop" -> ranks aligned with target_rows


def _check(cutoffs: Sequence[int], ties: str) -> tuple[int, ...]:
    if ties not in TIES:
        raise ConfigError(f"unknown ties mode {ties!r}; expected one of {', '.join(TIES)}")
    cut = tuple(int(k) for k in cutoffs)
    if not cut or min(cut) < 1:
        raise ConfigError(f"cutoffs must be positive integers, got {list(cutoffs)}")
    return cut


def evaluate(
    model: GRU4Rec,
    item_map: ItemMap,
    test: ClickLog | IndexedSessions,
    *,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    ties: str = "conservative",
    baselines: bool = True,
    score_budget: int = SCORE_BUDGET,
) -> EvalResult:
    """Evaluate an in-memory model on its own device (used per epoch for validation, and by evaluate_model)."""
    import torch

    cutoffs = _check(cutoffs, ties)
    data = test if isinstance(test, IndexedSessions) else index_sessions(test, item_map)
    device = model.Wy.device
    n_items = len(item_map)
    if model.n_items != n_items:
        raise ConfigError(f"model has {model.n_items} items but the item map has {n_items}")
    counts = torch.as_tensor(item_map.counts, dtype=torch.int64, device=device)
    max_count = int(item_map.counts.max()) if n_items else 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model_ranks, spop_ranks, targets_all, rows_all = _rank_sessions(
            model, data, counts, max_count, ties, baselines, max(1, score_budget // n_items)
        )
    model.train(was_training)

    def cat(parts: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(parts).cpu().numpy() if parts else np.zeros(0)

    target_rows = np.concatenate(rows_all).astype(np.int64) if rows_all else np.zeros(0, np.int64)
    by_row = np.argsort(target_rows, kind="stable")
    ranks = cat(model_ranks)[by_row]
    target_rows = target_rows[by_row]
    common = {"n_predictions": int(len(ranks)), "n_dropped_unknown": data.n_dropped_unknown}
    metrics: dict[str, Any] = metrics_from_ranks(ranks, cutoffs) | common
    metrics |= {"n_items": n_items, "n_dropped_sessions": data.n_dropped_sessions, "ties": ties}
    baseline_ranks: dict[str, np.ndarray] = {}
    if baselines:
        targets = cat(targets_all).astype(np.int64)[by_row]
        baseline_ranks["pop"] = _pop_ranks(item_map.counts, targets, ties)
        baseline_ranks["spop"] = cat(spop_ranks)[by_row]
        metrics["baselines"] = {
            name: metrics_from_ranks(r, cutoffs) | common for name, r in baseline_ranks.items()
        }
    return EvalResult(metrics, ranks, target_rows, baseline_ranks)


def _rank_sessions(
    model: GRU4Rec, data: IndexedSessions, counts: torch.Tensor, max_count: int, ties: str, baselines: bool, chunk: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[np.ndarray]]:
    """Every prediction's rank (model and S-POP), target and row, chunk by chunk of sessions (longest first:
    the sessions running at step t are a prefix of the rows); the tensors stay on the model's device."""
    import torch

    device = model.Wy.device
    lengths = np.diff(data.offsets)
    order = np.argsort(-lengths, kind="stable")
    model_ranks: list[torch.Tensor] = []
    spop_ranks: list[torch.Tensor] = []
    targets_all: list[torch.Tensor] = []
    rows_all: list[np.ndarray] = []
    for lo in range(0, len(order), chunk):
        sess = order[lo : lo + chunk]
        lens = lengths[sess]
        width = int(lens[0])
        col = np.arange(width)
        valid = col[None, :] < lens[:, None]
        pos = np.where(valid, data.offsets[sess][:, None] + col[None, :], 0)
        items = torch.as_tensor(np.where(valid, data.items[pos], 0), device=device)
        rows = np.where(valid, data.rows[pos], -1)
        running = (lens[:, None] > col[None, 1:]).sum(0)  # sessions with a target at step t
        hidden = model.init_hidden(len(sess), device)
        spop = _SessionPopularity(items, counts, ties, max_count) if baselines else None
        for t in range(width - 1):
            n = int(running[t])
            x, y = items[:n, t], items[:n, t + 1]
            out, hidden = model.step(model.input_table[x], [h[:n] for h in hidden])
            model_ranks.append(rank_of_targets(model.score(out, model.Wy, model.By), y, ties))
            if spop is not None:
                spop_ranks.append(spop.ranks(t, n))
            targets_all.append(y)
            rows_all.append(rows[:n, t + 1])
    return model_ranks, spop_ranks, targets_all, rows_all


def _pop_ranks(counts: np.ndarray, targets: np.ndarray, ties: str) -> np.ndarray:
    """POP baseline: every prediction ranks the catalogue by training popularity."""
    ordered = np.sort(counts)
    n = len(counts)
    target_counts = counts[targets]
    greater = n - np.searchsorted(ordered, target_counts, side="right")
    greater_equal = n - np.searchsorted(ordered, target_counts, side="left")
    return np.asarray(tie_rank(greater, greater_equal, ties), dtype=np.float64)


def evaluate_model(
    model_dir: str | Path,
    test: str | Path | ClickLog | pa.Table,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    ties: str = "conservative",
    device: str = "auto",
    *,
    baselines: bool = True,
) -> EvalResult:
    """Evaluate the trained model in ``model_dir`` on ``test`` (a path as for training, its ``test`` split
    when it is a session dataset directory)."""
    from pipeline.model.predict import load_model

    cutoffs = _check(cutoffs, ties)
    loaded = load_model(model_dir, device=device)
    result = evaluate(
        loaded.model, loaded.item_map, read_log(test, split="test"), cutoffs=cutoffs, ties=ties, baselines=baselines
    )
    log.info(
        "evaluated %s on %s: %d predictions, %d unknown events dropped",
        model_dir,
        test if not isinstance(test, ClickLog | pa.Table) else "<in memory>",
        result.metrics["n_predictions"],
        result.metrics["n_dropped_unknown"],
    )
    return result


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as an aligned text table: one row per model (GRU4Rec, POP, S-POP)."""
    keys = [k for k in metrics if "@" in k]
    rows = [("GRU4Rec", metrics)] + [(n.upper() if n == "pop" else "S-POP", m) for n, m in metrics.get("baselines", {}).items()]
    header = f"{'model':<8}" + "".join(f"{k:>11}" for k in keys)
    lines = [header, "-" * len(header)]
    lines += [f"{name:<8}" + "".join(f"{m[k]:>11.4f}" for k in keys) for name, m in rows]
    lines.append(
        f"{metrics['n_predictions']} predictions, {metrics['n_dropped_unknown']} unknown test events dropped, "
        f"ties={metrics.get('ties', '?')}, {metrics.get('n_items', '?')} items"
    )
    return "\n".join(lines)
