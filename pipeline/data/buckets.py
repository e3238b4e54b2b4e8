"""The session build's first pass and its bucket plumbing.

:func:`scan` reads every input part once into per-event integer codes (kept in an
:class:`~pipeline.data.spill.ArrayStore`) and per-session / per-item counts (kept in memory);
:func:`distribute` routes groups of rows to buckets of whole sessions and :func:`gather` puts a bucket's
pieces back together in source order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.data.arrays import MAX_I64, dictionary_codes, stable_argsort
from pipeline.data.schema import ITEM_ID, SESSION_ID, TIMESTAMP, TIMESTAMP_TYPE
from pipeline.data.spill import ArrayStore
from pipeline.errors import InputError


@dataclass
class Scan:
    """What one pass over the input leaves in memory: ids, per-session and per-item counts."""

    rows: int
    s_dict: pa.Array  # global session code -> session id
    i_dict: pa.Array  # global item code -> item id
    s_luts: list[np.ndarray]  # per input part: local session code -> global code
    i_luts: list[np.ndarray]
    starts: np.ndarray  # per global session: first event time (us)
    lengths: np.ndarray  # per global session: events
    supports: np.ndarray  # per global item: events
    parts: np.ndarray  # per global session: how many input parts (files) hold its events


def _check_events(table: pa.Table, where: str) -> None:
    for name in (SESSION_ID, ITEM_ID, TIMESTAMP):
        if name not in table.column_names:
            raise InputError(f"{where}: events have no {name} column")
        nulls = table.column(name).null_count
        if nulls:
            raise InputError(
                f"{where}: {nulls} events have a null {name}; run `validate` first and build from its clean rows"
            )


def scan(parts: Iterable[tuple[str, pa.Table]], store: ArrayStore) -> Scan:
    """Read every part once: per-event codes into ``store`` (``p<k>``), ids and counts into memory."""
    s_dicts, i_dicts, local_stats = [], [], []
    rows = 0
    for k, (where, table) in enumerate(parts):
        _check_events(table, where)
        s, s_dict = dictionary_codes(table.column(SESSION_ID))
        i, i_dict = dictionary_codes(table.column(ITEM_ID))
        t = table.column(TIMESTAMP).cast(TIMESTAMP_TYPE).cast(pa.int64()).to_numpy()
        del table
        start = np.full(len(s_dict), MAX_I64, dtype=np.int64)
        np.minimum.at(start, s, t)
        local_stats.append(
            (start, np.bincount(s, minlength=len(s_dict)), np.bincount(i, minlength=len(i_dict)))
        )
        s_dicts.append(s_dict)
        i_dicts.append(i_dict)
        store.put(f"p{k}", s=s, i=i, t=t)
        rows += len(t)
    if rows == 0:
        raise InputError("no events to build a dataset from")
    # One dictionary over the parts' distinct ids (each id hashed once per part it appears in).
    s_codes, s_dict = dictionary_codes(pa.chunked_array(s_dicts, type=pa.string()))
    i_codes, i_dict = dictionary_codes(pa.chunked_array(i_dicts, type=pa.string()))
    s_luts = np.split(s_codes, np.cumsum([len(d) for d in s_dicts])[:-1])
    i_luts = np.split(i_codes, np.cumsum([len(d) for d in i_dicts])[:-1])
    starts = np.full(len(s_dict), MAX_I64, dtype=np.int64)
    lengths = np.zeros(len(s_dict), dtype=np.int64)
    supports = np.zeros(len(i_dict), dtype=np.int64)
    parts = np.zeros(len(s_dict), dtype=np.int32)
    for (start, length, support), s_lut, i_lut in zip(local_stats, s_luts, i_luts, strict=True):
        np.minimum.at(starts, s_lut, start)
        np.add.at(lengths, s_lut, length)
        np.add.at(supports, i_lut, support)
        parts[s_lut] += 1  # a part's local codes are distinct
    return Scan(rows, s_dict, i_dict, s_luts, i_luts, starts, lengths, supports, parts)


Rows = dict[str, np.ndarray]  # a group of rows: "r" (session rank), "i" (item code), "t" (time, us)


def distribute(
    store: ArrayStore,
    sources: Sequence[tuple[str, Callable[[Rows], Rows]]],
    bucket_of_r: np.ndarray,
    prefix: str,
) -> None:
    """Route each source group's rows (``rows_of(group)``, in order) to the buckets ``bucket_of_r[r]``: bucket b
    receives the piece ``<prefix><b>.<n>`` from source n, so :func:`gather` puts them back in source order."""
    n_buckets = int(bucket_of_r.max()) + 1 if len(bucket_of_r) else 1
    for n, (key, rows_of) in enumerate(sources):
        rows = rows_of(store.pop(key) or _no_rows())
        if n_buckets == 1:
            store.put(f"{prefix}0.{n}", **rows)
            continue
        b = bucket_of_r[rows["r"]]
        pieces: Iterator[np.ndarray]
        if n_buckets <= 8:  # a few buckets: one mask each is cheaper than sorting by bucket
            pieces = (np.flatnonzero(b == bucket) for bucket in range(n_buckets))
        else:
            order = stable_argsort(b)
            pieces = iter(np.split(order, np.searchsorted(b[order], np.arange(1, n_buckets))))
        for bucket, piece in enumerate(pieces):
            if len(piece):
                store.put(f"{prefix}{bucket}.{n}", **{name: a[piece] for name, a in rows.items()})


def _no_rows() -> Rows:
    return {"r": np.zeros(0, np.int32), "i": np.zeros(0, np.int32), "t": np.zeros(0, np.int64)}


def gather(store: ArrayStore, prefix: str, n_sources: int) -> Rows:
    """A bucket's pieces, concatenated in source order (and removed from the store)."""
    pieces = [p for n in range(n_sources) if (p := store.pop(f"{prefix}.{n}")) is not None] or [_no_rows()]
    if len(pieces) == 1:
        return pieces[0]
    return {name: np.concatenate([p[name] for p in pieces]) for name in ("r", "i", "t")}
