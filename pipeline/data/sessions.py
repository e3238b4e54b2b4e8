"""Build Parquet session datasets: order, filter, split in time, index items, commit atomically.

``build_dataset(inputs, out_dir)`` writes (see docs/architecture.md)::

    DIR/train/part-<hash>.parquet   session_id, item_id, timestamp, item_idx
    DIR/valid/part-<hash>.parquet   same columns; only train items; sessions of >= 2 events
    DIR/test/part-<hash>.parquet    same columns; only train items; sessions of >= 2 events
    DIR/items/part-<hash>.parquet   item_idx, item_id, count (train popularity)
    DIR/manifest.json               written last: files, counts, time ranges, config, schema version, fingerprint

Data files are named by their content (the first 16 hex digits of their SHA-256), so a published file never
changes: a reader that follows the manifest sees one complete version even while a newer one is published
(on S3 the manifest is the single atomic switch, see :mod:`pipeline.storage`).

The rules:

1. order rows by (session start, session id, event time), keeping input order for ties;
2. optionally drop consecutive repeats of an item within a session (RSC15 keeps them);
3. filter iteratively until stable: sessions shorter than ``min_session_length``, items with fewer than
   ``min_item_support`` events (0 = off);
4. test = sessions whose last event is within ``test_days`` * 86400 s of the latest event; valid = the same
   rule inside the rest with ``valid_days``; train = what remains;
5. item index on train only (dense, in order of first appearance); valid and test keep only train items,
   then only sessions of >= 2 events; each split is in (session start, session id, time) order, the start
   being that of the session's rows in the split.

How, in bounded memory: the input is read one file at a time into integer codes (:func:`_scan`); sessions
are ranked by (start, id) and cut into buckets of whole sessions that fit ``build.memory_budget_mb``; the
per-event codes are kept in an :class:`~pipeline.data.spill.ArrayStore` (in memory below the budget, spilled to
local disk above it) and every later step is a pass over the buckets, a few at a time on threads
(:class:`_Build`). What stays in memory throughout is per-session and per-item state (about 100 bytes per
session, plus each distinct id once) and the file being read. The output is the same bytes whatever the
budget and the number of threads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import __version__, storage
from pipeline.config import BuildConfig, IngestConfig, to_dict
from pipeline.data import ingest as ingest_mod
from pipeline.data.expectations import seconds_before_session_max
from pipeline.data.schema import (
    DATASET_SCHEMA_VERSION,
    ITEM_ID,
    ITEMS_SCHEMA,
    SESSION_ID,
    SPLIT_SCHEMA,
    SPLITS,
    TIMESTAMP,
    TIMESTAMP_TYPE,
)
from pipeline.data.spill import ArrayStore
from pipeline.errors import ConfigError, InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DAY_US = 86_400 * 1_000_000
ROW_GROUP = 1 << 20
# Dictionary pages where values repeat (items); session ids are nearly unique, dictionary encoding them
# costs time and saves nothing.
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": ["item_id", "item_idx"]}
VALIDATION_REPORT = "report.json"  # a validate output folder: its clean/ rows are the input
WORK_PREFIXES = ("pipeline-build-", "pipeline-spill-")  # local work folders of a build (its files, its spill)
# Working memory per event while a bucket is ordered (its codes in, 16 bytes; sort keys, 8; the sorted copies,
# 16; shifted ranks and masks): the budget divided by this, shared by the threads, is the bucket size.
BYTES_PER_ROW = 56
READ_AHEAD = 1  # input files decoded while the previous one is scanned
MAX_I64 = np.iinfo(np.int64).max
MIN_I64 = np.iinfo(np.int64).min
TRAIN, VALID, TEST = 0, 1, 2  # split codes of rows (-1: dropped)
THREADS = min(4, os.cpu_count() or 1)  # buckets worked on at once (they share the memory budget)
T = TypeVar("T")


@dataclass
class SessionRules:
    """The validation's whole-session rules, applied here over the build's whole window: validation sees one
    partition at a time, so a session crossing midnight is only whole here. Rows that break them are
    quarantined (``quarantine/`` of the dataset, with their rule as ``reason``), like validation's."""

    max_session_length: int | None = None  # sessions with more events are quarantined whole; None: off
    check_order: bool = False  # an event earlier than an earlier event (input order) of its session is quarantined

    @property
    def active(self) -> bool:
        return self.max_session_length is not None or self.check_order


# Their names (as in the validation suite), in the order a row's reasons are joined.
SESSION_RULES = ("session_order", "session_length")
QUARANTINE_COLUMNS = pa.schema(list(SPLIT_SCHEMA)[:3] + [pa.field("reason", pa.string(), nullable=False)])


@dataclass
class Splits:
    """A built dataset in memory: the three splits, the item map and the statistics for the manifest."""

    train: pa.Table
    valid: pa.Table
    test: pa.Table
    items: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> dict[str, pa.Table]:
        return {"train": self.train, "valid": self.valid, "test": self.test, "items": self.items}


def check_config(build: BuildConfig) -> None:
    if build.test_days < 0 or build.valid_days < 0:
        raise ConfigError("build.test_days and build.valid_days must be >= 0 (0 = no such split)")
    if build.min_session_length < 0 or build.min_item_support < 0:
        raise ConfigError("build.min_session_length and build.min_item_support must be >= 0 (0 = off)")
    if build.memory_budget_mb < 1:
        raise ConfigError("build.memory_budget_mb must be >= 1 (megabytes of working memory for the build)")


# ---------------------------------------------------------------------------------------------
# Small array helpers (no I/O)


def _encode(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes of a string (or dictionary-encoded string) column and the dictionary they index."""
    if pa.types.is_dictionary(column.type):
        # Chunks read from different files carry different dictionaries: unify them (hashes only the
        # distinct values) and remap the indices.
        encoded = pa.table({"c": column}).unify_dictionaries().column("c")
    else:
        encoded = pc.dictionary_encode(column)  # chunks share one growing dictionary
    if encoded.num_chunks == 0:
        return np.zeros(0, dtype=np.int32), pa.array([], type=pa.string())
    dictionary = encoded.chunks[-1].dictionary.cast(pa.string())
    codes = np.concatenate([c.indices.to_numpy() for c in encoded.chunks]).astype(np.int32, copy=False)
    return codes, dictionary


def _by_start_then_id(starts: np.ndarray, codes: np.ndarray, s_dict: pa.Array) -> np.ndarray:
    """The permutation ordering sessions by (start, session id). Ids (strings) are compared only where
    starts tie, which is rare: sorting every id would cost more than the rest of the ordering."""
    order = np.argsort(starts, kind="stable")
    s = starts[order]
    tie = np.zeros(len(s), dtype=bool)
    same = s[1:] == s[:-1]
    tie[1:] |= same
    tie[:-1] |= same
    if not tie.any():
        return order
    tied = order[tie]
    rank = np.zeros(len(starts), dtype=np.int64)
    rank[tied[pc.sort_indices(s_dict.take(pa.array(codes[tied]))).to_numpy()]] = np.arange(len(tied))
    return np.lexsort((rank, starts))


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative integer keys, several times faster: (key, row) pairs
    packed into one int64 are unique, so numpy's SIMD quicksort orders them as a stable sort would."""
    n = len(keys)
    shift = max(1, (n - 1).bit_length())
    if n == 0 or int(keys.max()) >= 1 << (63 - shift):
        return np.argsort(keys, kind="stable")
    packed = keys.astype(np.int64) << shift
    packed |= np.arange(n, dtype=np.int64)
    packed.sort()
    packed &= (1 << shift) - 1
    return packed


def _block_order(keys: np.ndarray) -> np.ndarray | None:
    """For rows in blocks of equal ``keys`` (one block per key), the permutation that sorts the blocks by key,
    keeping each block's rows in order; None when they already are. O(rows) plus a sort of the blocks."""
    if len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()):
        return None
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    block_start = np.flatnonzero(first)
    order = np.argsort(keys[block_start], kind="stable")
    lengths = np.diff(np.append(block_start, len(keys)))
    starts, lengths = block_start[order], lengths[order]
    # The permutation is the blocks' row ranges end to end: a running sum of +1 steps that jumps to the
    # next block's first row where a block begins (one cumsum instead of materializing per-row offsets).
    steps = np.ones(len(keys), dtype=np.int64)
    steps[0] = starts[0]
    steps[np.cumsum(lengths[:-1])] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps, out=steps)


def _run_ends(keys: np.ndarray) -> np.ndarray:
    """Indices of the last row of each run of equal consecutive keys."""
    return (
        np.flatnonzero(np.append(keys[1:] != keys[:-1], True)) if len(keys) else np.zeros(0, dtype=np.int64)
    )


def _run_starts(keys: np.ndarray) -> np.ndarray:
    return (
        np.flatnonzero(np.insert(keys[1:] != keys[:-1], 0, True))
        if len(keys)
        else np.zeros(0, dtype=np.int64)
    )


def _buckets(lengths: np.ndarray, max_rows: int) -> np.ndarray:
    """Cut consecutive sessions (their row counts in order) into buckets of about ``max_rows`` rows, never
    splitting a session: the first session index of each bucket plus the end (``len(lengths)``)."""
    before = np.cumsum(lengths) - lengths
    first = _run_starts(before // max(1, max_rows)) if len(lengths) else np.zeros(1, dtype=np.int64)
    return np.append(first, len(lengths))


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# The build, one bucket of sessions at a time


@dataclass
class _Scan:
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


def _scan(parts: Iterable[tuple[str, pa.Table]], store: ArrayStore) -> _Scan:
    """Read every part once: per-event codes into ``store`` (``p<k>``), ids and counts into memory."""
    s_dicts, i_dicts, local_stats = [], [], []
    rows = 0
    for k, (where, table) in enumerate(parts):
        _check_events(table, where)
        s, s_dict = _encode(table.column(SESSION_ID))
        i, i_dict = _encode(table.column(ITEM_ID))
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
    s_codes, s_dict = _encode(pa.chunked_array(s_dicts, type=pa.string()))
    i_codes, i_dict = _encode(pa.chunked_array(i_dicts, type=pa.string()))
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
    return _Scan(rows, s_dict, i_dict, s_luts, i_luts, starts, lengths, supports, parts)


def _bucket_of(bounds: np.ndarray) -> np.ndarray:
    """Bucket number of each session position, from the bounds of :func:`_buckets`."""
    return (np.searchsorted(bounds, np.arange(int(bounds[-1])), side="right") - 1).astype(np.int32)


Rows = dict[str, np.ndarray]  # a group of rows: "r" (session rank), "i" (item code), "t" (time, us)


def _distribute(
    store: ArrayStore,
    sources: Sequence[tuple[str, Callable[[Rows], Rows]]],
    bucket_of_r: np.ndarray,
    prefix: str,
) -> None:
    """Route each source group's rows (``rows_of(group)``, in order) to the buckets ``bucket_of_r[r]``: bucket b
    receives the piece ``<prefix><b>.<n>`` from source n, so :func:`_gather` puts them back in source order."""
    n_buckets = int(bucket_of_r.max()) + 1 if len(bucket_of_r) else 1
    for n, (key, rows_of) in enumerate(sources):
        rows = rows_of(store.pop(key) or _no_rows())
        if n_buckets == 1:
            store.put(f"{prefix}0.{n}", **rows)
            continue
        b = bucket_of_r[rows["r"]]
        if n_buckets <= 8:  # a few buckets: one mask each is cheaper than sorting by bucket
            pieces = (np.flatnonzero(b == bucket) for bucket in range(n_buckets))
        else:
            order = _stable_argsort(b)
            pieces = iter(np.split(order, np.searchsorted(b[order], np.arange(1, n_buckets))))
        for bucket, piece in enumerate(pieces):
            if len(piece):
                store.put(f"{prefix}{bucket}.{n}", **{name: a[piece] for name, a in rows.items()})


def _no_rows() -> Rows:
    return {"r": np.zeros(0, np.int32), "i": np.zeros(0, np.int32), "t": np.zeros(0, np.int64)}


def _gather(store: ArrayStore, prefix: str, n_sources: int) -> Rows:
    """A bucket's pieces, concatenated in source order (and removed from the store)."""
    pieces = [p for n in range(n_sources) if (p := store.pop(f"{prefix}.{n}")) is not None] or [_no_rows()]
    if len(pieces) == 1:
        return pieces[0]
    return {name: np.concatenate([p[name] for p in pieces]) for name in ("r", "i", "t")}


class _Build:
    """The build over one scan. Each step is a pass over the buckets; buckets hold whole sessions and are
    independent, so a pass works on ``threads`` of them at once (numpy and Arrow release the GIL) and the
    main thread combines their results in bucket order."""

    def __init__(
        self,
        scan: _Scan,
        store: ArrayStore,
        config: BuildConfig,
        max_rows: int,
        threads: int,
        rules: SessionRules | None = None,
    ) -> None:
        self.scan, self.store, self.config, self.threads = scan, store, config, threads
        self.rules = rules or SessionRules()
        present = np.flatnonzero(scan.lengths > 0)
        # Sessions by rank: everything per session below is indexed by rank in (start, id) order.
        self.code_of_rank = present[_by_start_then_id(scan.starts[present], present, scan.s_dict)].astype(
            np.int32
        )
        rank_of_code = np.full(len(scan.s_dict), -1, dtype=np.int32)
        rank_of_code[self.code_of_rank] = np.arange(len(present), dtype=np.int32)
        self.lengths = scan.lengths[self.code_of_rank]
        self.multi_part = scan.parts[self.code_of_rank] > 1
        self.supports = scan.supports.copy()
        self.n_sessions, self.n_items = len(present), len(scan.i_dict)
        self.stats: dict[str, Any] = {
            "input": {"events": scan.rows, "sessions": len(present), "items": int(np.count_nonzero(scan.supports))},
            "dropped": {"repeats": 0, "short_sessions": 0, "rare_items": 0},
            "quarantined": {"events": 0, **{rule: 0 for rule in SESSION_RULES}},
        }  # fmt: skip
        # The threads share the budget, and there are at least as many buckets as threads.
        per_thread = -(-scan.rows // threads)
        self.budget_limited = max_rows // threads < per_thread  # buckets smaller than the work per thread
        self.bucket_rows = max(1, min(max_rows // threads, per_thread))
        self.bounds = _buckets(self.lengths, self.bucket_rows)
        self.n_buckets, self.n_parts = len(self.bounds) - 1, len(scan.s_luts)

        def part_rows(k: int) -> Callable[[Rows], Rows]:
            def rows(p: Rows) -> Rows:
                return {"r": rank_of_code[scan.s_luts[k][p["s"]]], "i": scan.i_luts[k][p["i"]], "t": p["t"]}

            return rows

        # Each part's rows go to their sessions' buckets, in input order.
        _distribute(
            store, [(f"p{k}", part_rows(k)) for k in range(self.n_parts)], _bucket_of(self.bounds), "b"
        )

    def _map(self, fn: Callable[[int], T], n: int | None = None) -> Iterator[T]:
        """``fn(b)`` for buckets 0..n-1 (default: all), ``threads`` at a time; results in bucket order."""
        n = self.n_buckets if n is None else n
        if self.threads == 1 or n == 1:
            yield from map(fn, range(n))
            return
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending: deque[Future[T]] = deque()
            for b in range(n):
                pending.append(pool.submit(fn, b))
                if len(pending) == self.threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _rows(self, b: int) -> Rows:
        return self.store.get(f"o{b}")

    def _kept(self, rows: Rows) -> np.ndarray:
        return ~self.session_out[rows["r"]] & ~self.item_out[rows["i"]]

    def order(self) -> None:
        """Quarantine rows breaking the whole-session rules; sort each bucket into (rank, time, input order);
        drop consecutive repeats if asked."""
        rules = self.rules
        too_long = None
        if rules.max_session_length is not None:
            too_long = self.lengths > rules.max_session_length  # every event of the session, over the window

        def one(b: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
            rows = _gather(self.store, f"b{b}", self.n_parts)
            r, i, t = rows["r"], rows["i"], rows["t"]
            del rows
            in_time_order = len(t) < 2 or bool((t[1:] >= t[:-1]).all())
            quarantined = (r[:0], i[:0])
            if rules.active:
                why = self._rule_bits(r, t, too_long, in_time_order)
                if why.any():
                    out = why > 0
                    self.store.put(f"q{b}", r=r[out], i=i[out], t=t[out], why=why[out])
                    quarantined = (r[out], i[out])
                    r, i, t = r[~out], i[~out], t[~out]
            if in_time_order:
                # Time-ordered input: one stable sort by session keeps each session's rows in time order.
                perm = _stable_argsort(r - int(self.bounds[b]))
            else:
                perm = np.lexsort((t, r))  # lexsort is stable: equal times keep input order
            r, i, t = r[perm], i[perm], t[perm]
            del perm
            dropped = (r[:0], i[:0])
            if self.config.drop_repeats and len(r) > 1:
                repeat = np.zeros(len(r), dtype=bool)
                repeat[1:] = (r[1:] == r[:-1]) & (i[1:] == i[:-1])
                if repeat.any():
                    dropped = (r[repeat], i[repeat])
                    r, i, t = r[~repeat], i[~repeat], t[~repeat]
            self.store.put(f"o{b}", r=r, i=i, t=t)
            return dropped, quarantined

        repeats = 0
        for (r, i), (qr, qi) in self._map(one):
            for rs, items in ((r, i), (qr, qi)):
                self.lengths -= np.bincount(rs, minlength=self.n_sessions)
                self.supports -= np.bincount(items, minlength=self.n_items)
            repeats += len(r)
            self.stats["quarantined"]["events"] += len(qr)
        self.stats["dropped"]["repeats"] = repeats

    def _rule_bits(
        self, r: np.ndarray, t: np.ndarray, too_long: np.ndarray | None, in_time_order: bool
    ) -> np.ndarray:
        """Per row (input order), a bit per broken rule of :data:`SESSION_RULES`."""
        why = np.zeros(len(r), dtype=np.int8)
        if self.rules.check_order and not in_time_order:
            # Rules come with validated inputs, whose files were each checked for order: only a session in
            # several files can be out of order as a whole (its rows are taken in input order).
            rows = np.flatnonzero(self.multi_part[r])
            behind = seconds_before_session_max(r[rows], t[rows], np.ones(len(rows), dtype=bool))
            why[rows] |= (behind > 0).astype(np.int8)
        if too_long is not None:
            why |= too_long[r].astype(np.int8) << 1
        return why

    def quarantine(self) -> pa.Table | None:
        """The quarantined rows (bucket by bucket, input order within each) with their rules, counted in the
        statistics; None when there are none."""
        pieces = [q for b in range(self.n_buckets) if (q := self.store.pop(f"q{b}")) is not None]
        if not pieces:
            return None
        r, i, t, why = (np.concatenate([p[k] for p in pieces]) for k in ("r", "i", "t", "why"))
        labels = [";".join(rule for k, rule in enumerate(SESSION_RULES) if code >> k & 1) for code in range(4)]
        for k, rule in enumerate(SESSION_RULES):
            self.stats["quarantined"][rule] = int(((why >> k) & 1).sum())
        return pa.table(
            [
                self.scan.s_dict.take(pa.array(self.code_of_rank[r])),
                self.scan.i_dict.take(pa.array(i)),
                pa.array(t).cast(TIMESTAMP_TYPE),
                pa.array(labels, pa.string()).take(pa.array(why.astype(np.int64))),
            ],
            schema=QUARANTINE_COLUMNS,
        )

    def _count(self, session_sel: np.ndarray, item_sel: np.ndarray, by: str) -> np.ndarray:
        """Rows whose session and item are selected, counted per session (``by="r"``) or item (``"i"``)."""
        size = self.n_sessions if by == "r" else self.n_items

        def one(b: int) -> np.ndarray:
            rows = self._rows(b)
            return rows[by][session_sel[rows["r"]] & item_sel[rows["i"]]]

        counts = np.zeros(size, dtype=np.int64)
        for hits in self._map(one):
            counts += np.bincount(hits, minlength=size)
        return counts

    def filter(self) -> None:
        """Drop short sessions and rare items until stable. A row is kept while neither its session nor its
        item is dropped, so only these two flags (and the counts) are state; a pass counts what a step drops."""
        config, dropped = self.config, self.stats["dropped"]
        self.session_out = np.zeros(self.n_sessions, dtype=bool)
        self.item_out = np.zeros(self.n_items, dtype=bool)
        iterations = 0
        while config.min_session_length or config.min_item_support:
            iterations += 1
            changed = False
            if config.min_session_length:
                short = (self.lengths > 0) & (self.lengths < config.min_session_length)
                if short.any():
                    dropped["short_sessions"] += int(self.lengths[short].sum())
                    self.lengths[short] = 0
                    self.session_out |= short
                    self.supports -= self._count(short, ~self.item_out, "i")
                    changed = True
            if config.min_item_support:
                rare = (self.supports > 0) & (self.supports < config.min_item_support)
                if rare.any():
                    dropped["rare_items"] += int(self.supports[rare].sum())
                    self.supports[rare] = 0
                    self.item_out |= rare
                    self.lengths -= self._count(~self.session_out, rare, "r")
                    changed = True
            if not changed:
                break
        self.stats["filter_iterations"] = iterations
        if not self.lengths.any():
            raise InputError(
                f"no events left after filtering (min_session_length={config.min_session_length}, "
                f"min_item_support={config.min_item_support}); lower the thresholds or give more data"
            )
        self.stats["after_filtering"] = {
            "events": int(self.lengths.sum()),
            "sessions": int(np.count_nonzero(self.lengths)),
            "items": int(np.count_nonzero(self.supports)),
        }

    def split(self) -> None:
        """Test / valid / train by each session's last kept event."""
        config = self.config
        ends = np.full(self.n_sessions, MIN_I64, dtype=np.int64)

        def one(b: int) -> None:
            rows = self._rows(b)
            keep = self._kept(rows)
            r, t = rows["r"][keep], rows["t"][keep]
            last = _run_ends(r)  # rows are in (session, time) order: a session's last row is its end
            ends[r[last]] = t[last]  # buckets write disjoint sessions

        for _ in self._map(one):
            pass
        alive = self.lengths > 0
        tmax = int(ends[alive].max())
        test_start = tmax - int(round(config.test_days * DAY_US)) if config.test_days > 0 else None
        test = (
            alive & (ends >= test_start) if test_start is not None else np.zeros(self.n_sessions, dtype=bool)
        )
        valid_start = None
        valid = np.zeros(self.n_sessions, dtype=bool)
        if config.valid_days > 0 and (alive & ~test).any():
            valid_start = int(ends[alive & ~test].max()) - int(round(config.valid_days * DAY_US))
            valid = alive & ~test & (ends >= valid_start)
        if not (alive & ~test & ~valid).any():
            raise InputError(
                f"the train split is empty: every session ends within the last {config.test_days} + "
                f"{config.valid_days} days; use shorter windows or more days of data"
            )
        self.split_of = np.where(test, TEST, np.where(valid, VALID, TRAIN)).astype(np.int8)
        self.stats["split_times"] = {
            "latest_event": _iso(tmax), "test_start": _iso(test_start), "valid_start": _iso(valid_start)
        }  # fmt: skip

    def index_items(self) -> None:
        """Dense item index in order of first appearance in train; popularity counts."""
        first_seen = np.full(self.n_items, MAX_I64, dtype=np.int64)
        counts = np.zeros(self.n_items, dtype=np.int64)
        offset = 0

        def one(b: int) -> np.ndarray:
            rows = self._rows(b)
            return rows["i"][self._kept(rows) & (self.split_of[rows["r"]] == TRAIN)]

        for items in self._map(one):
            np.minimum.at(first_seen, items, np.arange(offset, offset + len(items), dtype=np.int64))
            counts += np.bincount(items, minlength=self.n_items)
            offset += len(items)
        seen = np.flatnonzero(first_seen < MAX_I64)
        self.by_appearance = seen[np.argsort(first_seen[seen], kind="stable")]
        self.item_idx = np.full(self.n_items, -1, dtype=np.int32)
        self.item_idx[self.by_appearance] = np.arange(len(self.by_appearance), dtype=np.int32)
        self.item_counts = counts[self.by_appearance]

    def finalize(self) -> None:
        """Each row's final split (held-out rows: train items only, sessions of >= 2 of them) and the output
        order of the sessions (by the start of their final rows, then id)."""
        final_start = np.full(self.n_sessions, MAX_I64, dtype=np.int64)
        final_length = np.zeros(self.n_sessions, dtype=np.int64)

        def one(b: int) -> dict[str, int]:
            rows = self._rows(b)
            r, i = rows["r"], rows["i"]
            split = np.where(self._kept(rows), self.split_of[r], np.int8(-1))
            held = split > TRAIN
            known = held & (self.item_idx[i] >= 0)
            lo, hi = int(self.bounds[b]), int(self.bounds[b + 1])
            known_len = np.bincount(r[known] - lo, minlength=hi - lo)
            final = known & (known_len[r - lo] >= 2)
            counts = {}
            for code, name in ((VALID, "valid"), (TEST, "test")):
                in_split = split == code
                counts[f"{name}_unknown_items"] = int((in_split & ~known).sum())
                counts[f"{name}_short_sessions"] = int((in_split & known & ~final).sum())
            split[held & ~final] = -1
            out = split >= 0
            rs, ts = r[out], rows["t"][out]
            first = _run_starts(rs)  # rows are in (session, time) order; buckets write disjoint sessions
            final_start[rs[first]] = ts[first]
            final_length[lo:hi] = np.bincount(rs - lo, minlength=hi - lo)
            self.store.put(f"o{b}", r=rs, i=i[out], t=ts)
            return counts

        dropped = self.stats["dropped"]
        for name in ("valid", "test"):
            dropped[f"{name}_unknown_items"] = dropped[f"{name}_short_sessions"] = 0
        for counts in self._map(one):
            for key, value in counts.items():
                dropped[key] += value
        # Output rank: train sessions, then valid, then test, each by (final start, id).
        self.out_rank = np.full(self.n_sessions, -1, dtype=np.int32)
        self.split_bounds = [0]
        for code in (TRAIN, VALID, TEST):
            members = np.flatnonzero((self.split_of == code) & (final_length > 0))
            order = members[
                _by_start_then_id(final_start[members], self.code_of_rank[members], self.scan.s_dict)
            ]
            base = self.split_bounds[-1]
            self.out_rank[order] = np.arange(base, base + len(order), dtype=np.int32)
            self.split_bounds.append(base + len(order))
        self.out_lengths = np.zeros(self.split_bounds[-1], dtype=np.int64)
        alive = self.out_rank >= 0
        self.out_lengths[self.out_rank[alive]] = final_length[alive]

    def output(self) -> Iterator[tuple[str, pa.Table]]:
        """The final rows as ``(split, table)`` chunks of at most ``ROW_GROUP`` rows, in split order and, within
        a split, in output order; fills the per-split statistics on the way."""
        bounds = _buckets(self.out_lengths, self.bucket_rows)
        # finalize() left only rows of output sessions, so every r here has an output rank.
        bucket_of_r = _bucket_of(bounds)[np.maximum(self.out_rank, 0)]
        _distribute(
            self.store, [(f"o{b}", lambda rows: rows) for b in range(self.n_buckets)], bucket_of_r, "w"
        )
        split_bounds = np.array(self.split_bounds[1:-1])
        items_seen = np.zeros((len(SPLITS), self.n_items), dtype=bool)
        times = np.array([[MAX_I64, MIN_I64]] * len(SPLITS), dtype=np.int64)

        def one(w: int) -> tuple[Rows, list[int]]:
            rows = _gather(self.store, f"w{w}", self.n_buckets)
            key = self.out_rank[rows["r"]]
            perm = _block_order(key)  # a session whose first rows were dropped may start later: move it
            if perm is not None:
                rows, key = {name: a[perm] for name, a in rows.items()}, key[perm]
            return rows, [0, *np.searchsorted(key, split_bounds).tolist(), len(key)]

        # Buckets are ordered on the threads; their rows become Arrow tables one row group at a time here.
        for rows, cuts in self._map(one, len(bounds) - 1):
            r, i, t = rows["r"], rows["i"], rows["t"]
            for code in range(len(SPLITS)):
                for lo in range(cuts[code], cuts[code + 1], ROW_GROUP):
                    chunk = slice(lo, min(lo + ROW_GROUP, cuts[code + 1]))
                    items_seen[code, i[chunk]] = True
                    times[code] = (
                        min(times[code, 0], int(t[chunk][0])),
                        max(times[code, 1], int(t[chunk].max())),
                    )
                    yield (
                        SPLITS[code],
                        pa.table(
                            [
                                self.scan.s_dict.take(pa.array(self.code_of_rank[r[chunk]])),
                                self.scan.i_dict.take(pa.array(i[chunk])),
                                pa.array(t[chunk]).cast(TIMESTAMP_TYPE),
                                pa.array(self.item_idx[i[chunk]]),
                            ],
                            schema=SPLIT_SCHEMA,
                        ),
                    )
            del rows, r, i, t
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise
        for code, name in enumerate(SPLITS):
            lo, hi = self.split_bounds[code], self.split_bounds[code + 1]
            self.stats[name] = {
                "events": int(self.out_lengths[lo:hi].sum()),
                "sessions": hi - lo,
                "items": int(items_seen[code].sum()),
                "start": None if lo == hi else _iso(int(times[code, 0])),
                "end": None if lo == hi else _iso(int(times[code, 1])),
            }

    def items(self) -> pa.Table:
        return pa.table(
            [
                pa.array(np.arange(len(self.by_appearance), dtype=np.int32)),
                self.scan.i_dict.take(pa.array(self.by_appearance)),
                pa.array(self.item_counts),
            ],
            schema=ITEMS_SCHEMA,
        )


def _run_build(
    parts: Iterable[tuple[str, pa.Table]],
    build: BuildConfig,
    emit: Callable[[str, pa.Table], None],
    rules: SessionRules | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """The whole build over ``parts`` (``(where, events)`` pairs, in input order). Split rows (and quarantined
    rows, as ``"quarantine"``) go to ``emit`` in order; returns the item map and the statistics.
    ``rules`` is read after the parts are (so a reader may switch its order rule off on the way)."""
    check_config(build)
    budget = build.memory_budget_mb << 20
    max_rows = max(1, budget // BYTES_PER_ROW)
    # The stored codes take 16 of BYTES_PER_ROW bytes per event: over a third of the budget, spill them.
    with ArrayStore(budget // 3, build.spill_dir or None) as store:
        t0 = time.perf_counter()
        scan = _scan(parts, store)
        pa.default_memory_pool().release_unused()  # the input files' buffers: Arrow's allocator keeps them otherwise
        job = _Build(scan, store, build, max_rows, THREADS, rules)
        if store.spilled or job.budget_limited:
            log.info(
                "building %d events in %d buckets of up to ~%d events (memory_budget_mb=%d, %.0f MB spilled to %s)",
                scan.rows, job.n_buckets, job.bucket_rows, build.memory_budget_mb, store.spilled_bytes / 2**20,
                build.spill_dir or tempfile.gettempdir(),
            )  # fmt: skip
        job.order()
        quarantined = job.quarantine()
        if quarantined is not None:
            log.warning(
                "quarantined %d events breaking whole-session rules over the window: %s", quarantined.num_rows,
                {k: v for k, v in job.stats["quarantined"].items() if k != "events" and v},
            )  # fmt: skip
            emit("quarantine", quarantined)
        job.filter()
        job.split()
        job.index_items()
        job.finalize()
        for name, table in job.output():
            emit(name, table)
        log.debug("build computed in %.1f s", time.perf_counter() - t0)
        return job.items(), job.stats


def build_splits(events: pa.Table, build: BuildConfig | None = None) -> Splits:
    """Order, filter and split canonical events in memory (only session_id, item_id and timestamp are used)."""
    build = build or BuildConfig()
    chunks: dict[str, list[pa.Table]] = {name: [] for name in SPLITS}
    items, stats = _run_build([("events", events)], build, lambda name, table: chunks[name].append(table))
    tables = {
        name: pa.concat_tables(c).combine_chunks() if c else SPLIT_SCHEMA.empty_table()
        for name, c in chunks.items()
    }
    return Splits(tables["train"], tables["valid"], tables["test"], items, stats)


# ---------------------------------------------------------------------------------------------
# I/O


class _ParquetSink:
    """Split files written as the rows come, in row groups of exactly ``ROW_GROUP`` rows (so the bytes do not
    depend on how the rows arrived), into a local folder. Encoding runs on a second thread (it releases the
    GIL) while the next rows are assembled; one row group in flight bounds the memory it holds."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.pending: dict[str, list[pa.Table]] = {}
        self.groups: dict[str, int] = {}
        self._encoder = ThreadPoolExecutor(max_workers=1)
        self._in_flight: Future[None] | None = None

    def _encode(self, name: str, table: pa.Table) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # in order, and re-raises an encoding error here
        self._in_flight = self._encoder.submit(
            self.writers[name].write_table, table, row_group_size=ROW_GROUP
        )
        self.groups[name] += 1

    def write(self, name: str, table: pa.Table) -> None:
        if name not in self.writers:
            path = os.path.join(self.folder, f"{name}.parquet")
            self.writers[name] = pq.ParquetWriter(path, table.schema, **PARQUET_OPTIONS)
            self.pending[name] = []
            self.groups[name] = 0
        pending = self.pending[name]
        pending.append(table)
        rows = sum(t.num_rows for t in pending)
        while rows >= ROW_GROUP:
            joined = pa.concat_tables(pending)
            self._encode(name, joined.slice(0, ROW_GROUP))
            pending[:] = [joined.slice(ROW_GROUP)]
            rows -= ROW_GROUP

    def close(self) -> dict[str, str]:
        """Flush and close every file; their local paths by name (every split, empty ones too)."""
        for name in (*SPLITS, "items"):
            if name not in self.writers:
                self.write(name, (ITEMS_SCHEMA if name == "items" else SPLIT_SCHEMA).empty_table())
        for name in self.writers:
            rest = pa.concat_tables(self.pending[name])
            if rest.num_rows or self.groups[name] == 0:
                self._encode(name, rest)
        if self._in_flight is not None:
            self._in_flight.result()
        self._encoder.shutdown()
        for writer in self.writers.values():
            writer.close()
        return {name: os.path.join(self.folder, f"{name}.parquet") for name in self.writers}


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _put_file(local: str, uri: str) -> None:
    """Move a finished local file to ``uri`` (a rename when local, a streamed upload to S3)."""
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        os.remove(local)
    else:
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        shutil.move(local, uri)


def _resolve_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str], SessionRules]:
    """``(recorded inputs, files to read, whole-session rules)``: a validation output folder stands for the
    clean files its report lists (recorded as its ``clean/`` folder, beside the report); a failed validation is
    refused. Validated inputs bring the validation's session rules, to be applied over the whole window."""
    from pipeline.data.validate import (
        CLEAN,
        clean_files,
    )  # clean_files reads the report; no Great Expectations import

    recorded, files = [], []
    rules = SessionRules()
    for uri in inputs:
        if storage.is_dir(uri) and storage.exists(storage.join(uri, VALIDATION_REPORT)):
            clean = clean_files(uri)
            if not clean:
                raise InputError(f"{uri}: the validation kept no clean rows; nothing to build from")
            recorded.append(storage.join(uri, CLEAN))
            files.extend(clean)
            settings = storage.read_json(storage.join(uri, VALIDATION_REPORT)).get("config", {}).get("validation", {})
            if "max_session_length" in settings:  # the strictest of the inputs' settings
                limit = int(settings["max_session_length"])
                rules.max_session_length = min(limit, rules.max_session_length or limit)
            rules.check_order = rules.check_order or settings.get("check_session_order") is not False
        else:
            recorded.append(uri)
            files.extend(ingest_mod.list_inputs([uri])[0])
    return [storage.normalize(u) for u in recorded], files, rules


class _NeedsSessions(Exception):
    """A user-only log: sessions must be derived over all files at once."""


def _read_parts(
    files: Sequence[str], ingest: IngestConfig, rules: SessionRules | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """One file at a time (the next one decoded meanwhile): memory holds at most two files' events. A file
    whose rows are not time-ordered per session (e.g. from Diginetica) turns ``rules``' order rule off."""
    columns = [SESSION_ID, ITEM_ID, TIMESTAMP]

    def read(uri: str) -> ingest_mod.FileRead:
        return ingest_mod.read_file(uri, ingest, strict=True, columns=columns, dictionary_ids=True)

    with ThreadPoolExecutor(max_workers=READ_AHEAD + 1) as pool:
        pending = [pool.submit(read, uri) for uri in files[: READ_AHEAD + 1]]
        for n, uri in enumerate(ingest_mod.progress(files, "building", total=len(files))):
            result = pending.pop(0).result()
            if n + READ_AHEAD + 1 < len(files):
                pending.append(pool.submit(read, files[n + READ_AHEAD + 1]))
            if result.needs_sessions:
                for future in pending:
                    future.cancel()
                raise _NeedsSessions
            if rules is not None and not result.ordered:
                rules.check_order = False
            yield uri, result.table.select(columns)


def _commit(
    out_dir: str, paths: dict[str, str], stats: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """Publish the finished local files (named by content) and the manifest as the dataset ``out_dir``."""
    files: dict[str, dict[str, Any]] = {}
    with storage.staged_dir(out_dir, MANIFEST) as tmp:
        for name, path in sorted(paths.items()):
            sha = _sha256_file(path)
            relative = f"{name}/part-{sha[:16]}.parquet"
            rows = pq.ParquetFile(path).metadata.num_rows
            files[name] = {"path": relative, "rows": rows, "bytes": os.path.getsize(path), "sha256": sha}
            _put_file(path, storage.join(tmp, *relative.split("/")))
        fingerprint = hashlib.sha256(
            "".join(f"{k}:{v['sha256']}\n" for k, v in sorted(files.items())).encode()
        )
        manifest = {
            "kind": "gru4rec-pipeline/session-dataset",
            "schema_version": DATASET_SCHEMA_VERSION,
            "fingerprint": f"sha256:{fingerprint.hexdigest()}",
            "files": files,
            "columns": {"splits": SPLIT_SCHEMA.names, "items": ITEMS_SCHEMA.names},
            "counts": {k: stats[k] for k in ("input", "after_filtering", *SPLITS)}
            | {"dropped": stats["dropped"], "filter_iterations": stats["filter_iterations"]}
            | ({"quarantined": stats["quarantined"]} if "quarantined" in stats else {}),
            "time_ranges": {k: {"start": stats[k]["start"], "end": stats[k]["end"]} for k in SPLITS},
            "split_times": stats["split_times"],
            "pipeline_version": __version__,
            "created_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            **extra,
        }
        storage.write_json(storage.join(tmp, MANIFEST), manifest)
    return manifest


def sweep_stale_work_dirs(root: str | None = None, older_than_s: float = storage.STALE_STAGING_SECONDS) -> list[str]:
    """Remove the work folders (:data:`WORK_PREFIXES`) that killed builds left in ``root`` (default: the temp
    folder), once nothing in them changed for ``older_than_s``; returns what was removed. A build that ends,
    fails or gets SIGTERM (the CLI turns it into an exit) removes its own; only SIGKILL leaves one behind."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and e.name.startswith(WORK_PREFIXES)]
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            touched = max([entry.stat().st_mtime] + [e.stat().st_mtime for e in os.scandir(entry.path)])
        except OSError:
            continue  # removed meanwhile
        if now - touched > older_than_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        log.info("removed %d stale build work folder(s) in %s", len(removed), root)
    return removed


def build_dataset(
    inputs: Sequence[str],
    out_dir: str,
    ingest: IngestConfig | None = None,
    build: BuildConfig | None = None,
) -> dict[str, Any]:
    """Read click logs (raw, or the clean rows of ``validate``), build the splits and commit the dataset.

    Returns the manifest. Re-running on the same input writes byte-identical data files.
    """
    ingest = ingest or IngestConfig()
    build = build or BuildConfig()
    check_config(build)
    ingest_mod.check_config(ingest)
    storage.check_disjoint(inputs, out_dir)
    recorded, files, rules = _resolve_inputs(inputs)
    sweep_stale_work_dirs(build.spill_dir or None)
    # Parquet goes to a local folder first (written in row groups, hashed), then into place by its hash.
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIXES[0], dir=build.spill_dir or None) as local:
        try:
            sink = _ParquetSink(local)
            items, stats = _run_build(_read_parts(files, ingest, rules), build, sink.write, rules)
        except _NeedsSessions:
            log.info(
                "user-only log: deriving sessions over all %d files at once (validate does it per day)",
                len(files),
            )
            events = ingest_mod.read_events(
                files, ingest, columns=[SESSION_ID, ITEM_ID, TIMESTAMP], dictionary_ids=True
            )
            sink = _ParquetSink(local)
            items, stats = _run_build([("events", events)], build, sink.write, rules)
            del events
        sink.write("items", items)
        extra = {
            "inputs": recorded,
            "config": {"ingest": to_dict(ingest), "build": to_dict(build), "session_rules": to_dict(rules)},
        }
        manifest = _commit(out_dir, sink.close(), stats, extra)
    log.info(
        "dataset %s: train %d / valid %d / test %d events, %d items",
        out_dir, stats["train"]["events"], stats["valid"]["events"], stats["test"]["events"], items.num_rows,
    )  # fmt: skip
    return manifest


def write_dataset(splits: Splits, out_dir: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write in-memory splits (from :func:`build_splits`) as a dataset at ``out_dir`` (tests, notebooks)."""
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIXES[0]) as local:
        sink = _ParquetSink(local)
        for name, table in splits.tables().items():
            sink.write(name, table)
        return _commit(out_dir, sink.close(), splits.stats, extra or {})


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    """The manifest of a committed dataset (an error when there is none: not a dataset, or not committed)."""
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise InputError(
            f"{dataset_uri} is not a session dataset: no {MANIFEST} (missing, or never committed)"
        )
    return storage.read_json(uri)


def read_split(dataset_uri: str, split: str) -> pa.Table:
    """One split (``train``, ``valid``, ``test``) or the ``items`` map of a committed dataset.

    Follows the manifest (:func:`pipeline.storage.read_committed`): should a newer version be published while
    the file is read, the new manifest is read and its file instead.
    """
    if split not in (*SPLITS, "items"):
        raise InputError(f"unknown split {split!r}; one of {', '.join((*SPLITS, 'items'))}")
    read_manifest(dataset_uri)  # the "not a session dataset" error first

    def read(manifest: dict[str, Any]) -> pa.Table:
        try:
            relative = manifest["files"][split]["path"]
        except (KeyError, TypeError):
            raise InputError(
                f"{storage.join(dataset_uri, MANIFEST)} lists no file for split {split!r} (files.{split}.path): "
                "written by another tool or version? Rebuild the dataset with `python -m pipeline build`"
            ) from None
        fs, path = storage.resolve(storage.join(dataset_uri, relative))
        return pq.read_table(path, filesystem=fs)

    try:
        return storage.read_committed(dataset_uri, MANIFEST, read)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read split {split} of {dataset_uri}: {exc}") from None
