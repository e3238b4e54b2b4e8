"""The click inputs training and evaluation share, and the item map fitted on training data.

Reads GRU4Rec TSV, Parquet files of canonical events and session dataset directories into a ``ClickLog``
(events in GRU4Rec order), builds the ``ItemMap`` of a training log and maps a log onto it
(``index_sessions``: unknown items dropped and counted, then sessions left with fewer than 2 events).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError


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
