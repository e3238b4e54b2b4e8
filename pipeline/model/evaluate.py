"""Full-ranking next-item evaluation of GRU4Rec, with POP and S-POP baselines from the same pass.

Protocol (../shared/reference/gru4rec.md): the item map comes from training data only; test events whose
item is unknown to it are dropped and counted, then sessions left with fewer than 2 events are dropped.
Every remaining event but the first of its session is one prediction, ranked against ALL training items.
Each test session starts from a zero hidden state: sessions are laid out one per row, sorted by length,
so at step t the sessions still running are a prefix of the rows and no state ever crosses sessions.
The loop over steps never reads a value back from the device (sizes come from the host-side lengths),
so on a GPU it only queues work. Ties are explicit: ``standard`` rank = 1 + #(scores > target), ``conservative`` = #(scores >= target)
(the target counts itself, so a constant-score model gets rank = catalogue size), ``median`` = their mean.

This module also reads the click inputs that training and evaluation share (GRU4Rec TSV, Parquet files of
canonical events, session dataset directories), because applying the train item map is an evaluation rule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

    from pipeline.model.network import GRU4Rec

log = logging.getLogger(__name__)

TIES = ("conservative", "standard", "median")
DEFAULT_CUTOFFS = (1, 5, 10, 20)
SCORE_BUDGET = 1 << 24  # score-matrix entries held at once (64 MB of float32): bounds memory for huge catalogues

# ---------------------------------------------------------------------------------------------------
# Reading click inputs


@dataclass(frozen=True)
class ClickLog:
    """Click events in GRU4Rec order: sessions by (start time, session id), events by time within a session.

    ``rows`` is each event's row index in the table as read, so predictions can be traced back (and two
    models paired) whatever the sort. ``catalogue`` (item ids by item index) comes with a session dataset's
    train split (its ``items`` table); otherwise the item map is built from the events themselves.
    """

    source: str
    item_ids: pa.Array  # string, one per event
    offsets: np.ndarray  # int64, n_sessions + 1: session s is events offsets[s]:offsets[s+1]
    rows: np.ndarray  # int64, one per event
    catalogue: pa.Array | None = None

    @property
    def n_events(self) -> int:
        return len(self.item_ids)

    @property
    def n_sessions(self) -> int:
        return len(self.offsets) - 1


@dataclass(frozen=True)
class ItemMap:
    """Training items by dense index (0..n-1) with their training popularity."""

    item_ids: pa.Array  # string
    counts: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.item_ids)

    def index(self, ids: pa.Array) -> np.ndarray:
        """Item index of each id, -1 where the id is not in the map."""
        idx = pc.index_in(ids, value_set=self.item_ids)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    @classmethod
    def from_ids(cls, item_ids: Sequence[str], counts: Sequence[int] | None = None) -> ItemMap:
        arr = pa.array(list(item_ids), type=pa.string())
        cnt = np.zeros(len(arr), np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        return cls(arr, cnt)


def _is_dataset(uri: str) -> bool:
    from pipeline import storage

    return storage.exists(storage.join(uri, "manifest.json"))


def _column(table: pa.Table, name: str, source: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise InputError(f"{source}: no {name} column (found {', '.join(table.column_names)})")
    col = table.column(name)
    if col.null_count:
        raise InputError(f"{source}: column {name} has {col.null_count} missing values")
    return col


def _seconds(col: pa.ChunkedArray, source: str) -> np.ndarray:
    if pa.types.is_timestamp(col.type):
        return col.cast(pa.timestamp("us", tz=col.type.tz)).cast(pa.int64()).to_numpy().astype(np.float64) / 1e6
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return col.to_numpy().astype(np.float64)
    raise InputError(f"{source}: time column has type {col.type}; expected a timestamp or unix seconds")


def log_from_table(table: pa.Table, source: str, catalogue: pa.Array | None = None, split: str = "train") -> ClickLog:
    """Sort a click table into GRU4Rec order: (session start time, session id, event time), stable.

    A train split that carries ``item_idx`` (a session dataset's) keeps that item index as the item map.
    """
    if catalogue is None and split == "train" and "item_idx" in table.column_names:
        catalogue = _catalogue_from_index(table, source)
    sessions = _column(table, "session_id", source).cast(pa.string())
    items = _column(table, "item_id", source).cast(pa.string()).combine_chunks()
    times = _seconds(_column(table, "timestamp", source), source)
    n = len(times)
    if n == 0:
        raise InputError(f"{source}: no events")
    # Session codes in session-id order, so the sort's tie-break is the session id itself.
    uniq = pc.unique(sessions).sort()
    code = pc.index_in(sessions, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
    start = np.full(len(uniq), np.inf)
    np.minimum.at(start, code, times)
    order = np.lexsort((np.arange(n), times, code, start[code]))
    sorted_code = code[order]
    boundaries = np.flatnonzero(np.diff(sorted_code)) + 1
    offsets = np.concatenate([[0], boundaries, [n]]).astype(np.int64)
    return ClickLog(source, items.take(pa.array(order)), offsets, order.astype(np.int64), catalogue)


def _catalogue_from_index(table: pa.Table, source: str) -> pa.Array:
    pairs = table.select(["item_idx", "item_id"]).group_by(["item_idx", "item_id"]).aggregate([]).sort_by("item_idx")
    idx = pairs.column("item_idx").to_numpy()
    if not np.array_equal(idx, np.arange(len(idx))):
        raise InputError(f"{source}: item_idx must map each item to one dense index 0..n-1")
    return pairs.column("item_id").cast(pa.string()).combine_chunks()


def read_log(path: str | Path | ClickLog | pa.Table, split: str = "train") -> ClickLog:
    """Click events from a session dataset's ``split`` (a directory or ``s3://`` prefix with a manifest), from
    any click-log file or folder ``pipeline.data.ingest`` reads (GRU4Rec TSV, Parquet, ...), or from a table
    with the canonical columns (session_id, item_id, timestamp)."""
    if isinstance(path, ClickLog):
        return path
    if isinstance(path, pa.Table):
        return log_from_table(path, f"<{split} table>", split=split)
    uri = str(path)
    if _is_dataset(uri):
        from pipeline.data import sessions

        catalogue = None
        if split == "train":
            items = sessions.read_split(uri, "items").sort_by("item_idx")
            if not np.array_equal(items.column("item_idx").to_numpy(), np.arange(items.num_rows)):
                raise InputError(f"{uri}: the items table's item_idx must be dense 0..n-1")
            catalogue = items.column("item_id").cast(pa.string()).combine_chunks()
        return log_from_table(sessions.read_split(uri, split), f"{uri} ({split} split)", catalogue, split)
    from pipeline.data import ingest

    return log_from_table(ingest.read_events([uri], columns=["session_id", "item_id", "timestamp"]), uri, split=split)


def build_item_map(train: ClickLog) -> ItemMap:
    """The item map of a training log: a dataset's own catalogue, else its distinct items in id order."""
    ids = train.catalogue if train.catalogue is not None else pc.unique(train.item_ids).sort()
    imap = ItemMap(ids, np.zeros(len(ids), np.int64))
    idx = imap.index(train.item_ids)
    if (idx < 0).any():
        bad = train.item_ids[int(np.flatnonzero(idx < 0)[0])]
        raise InputError(f"{train.source}: item {bad} is missing from the dataset's items table")
    return ItemMap(ids, np.bincount(idx, minlength=len(ids)).astype(np.int64))


@dataclass(frozen=True)
class IndexedSessions:
    """A log mapped onto an item map: unknown items dropped, then sessions of < 2 events dropped."""

    items: np.ndarray  # int64 item index per kept event
    offsets: np.ndarray  # int64 session boundaries over ``items``
    rows: np.ndarray  # int64 row (in the table as read) of each kept event
    n_dropped_unknown: int  # events whose item is not in the map
    n_dropped_sessions: int  # sessions left with fewer than 2 events
    n_dropped_short_events: int  # known events that went with those sessions


def index_sessions(log: ClickLog, item_map: ItemMap) -> IndexedSessions:
    idx = item_map.index(log.item_ids)
    known = idx >= 0
    session_of = np.repeat(np.arange(log.n_sessions), np.diff(log.offsets))
    kept_len = np.bincount(session_of[known], minlength=log.n_sessions)
    keep = known & (kept_len[session_of] >= 2)
    lengths = kept_len[kept_len >= 2]
    return IndexedSessions(
        items=idx[keep],
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        rows=log.rows[keep],
        n_dropped_unknown=int((~known).sum()),
        n_dropped_sessions=int(((kept_len < 2) & (np.diff(log.offsets) > 0)).sum()),
        n_dropped_short_events=int((known & ~keep).sum()),
    )


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
        out[f"recall@{k}"] = float(hit.sum() / n)
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / np.maximum(ranks, 1.0), 0.0).sum() / n)
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
    lengths = np.diff(data.offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first: running sessions are a row prefix
    chunk = max(1, score_budget // n_items)
    counts = torch.as_tensor(item_map.counts, dtype=torch.int64, device=device)
    max_count = int(item_map.counts.max()) if n_items else 0

    model_ranks, spop_ranks, targets_all, rows_all = [], [], [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
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
