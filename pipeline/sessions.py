"""Build Parquet session datasets: order, filter, split in time, index items, commit atomically.

``build_dataset(inputs, out_dir)`` writes (see docs/architecture.md)::

    DIR/train/part-0.parquet   session_id, item_id, timestamp, item_idx
    DIR/valid/part-0.parquet   same columns; only train items; sessions of >= 2 events
    DIR/test/part-0.parquet    same columns; only train items; sessions of >= 2 events
    DIR/items/part-0.parquet   item_idx, item_id, count (train popularity)
    DIR/manifest.json          written last: counts, time ranges, config, schema version, fingerprint

The steps, all on integer codes of the ids (numpy), so memory stays a few bytes per event:

1. order rows by (session start, session id, event time), keeping input order for ties;
2. optionally drop consecutive repeats of an item within a session (RSC15 keeps them);
3. filter iteratively until stable: sessions shorter than ``min_session_length``, items with fewer than
   ``min_item_support`` events (0 = off);
4. test = sessions whose last event is within ``test_days`` * 86400 s of the latest event; valid = the same
   rule inside the rest with ``valid_days``; train = what remains;
5. item index on train only (dense, in order of first appearance); valid and test keep only train items,
   then only sessions of >= 2 events.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__, storage
from pipeline import ingest as ingest_mod
from pipeline.config import BuildConfig, IngestConfig, to_dict
from pipeline.errors import ConfigError, InputError
from pipeline.schema import (
    DATASET_SCHEMA_VERSION,
    ITEM_ID,
    ITEMS_SCHEMA,
    SESSION_ID,
    SPLIT_SCHEMA,
    SPLITS,
    TIMESTAMP,
    TIMESTAMP_TYPE,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PART = "part-0.parquet"
DAY_US = 86_400 * 1_000_000
# Dictionary pages where values repeat (items); session ids are nearly unique, dictionary encoding them
# costs time and saves nothing.
PARQUET_OPTIONS = {"compression": "zstd", "row_group_size": 1 << 20, "use_dictionary": ["item_id", "item_idx"]}
VALIDATION_REPORT = "report.json"  # a validate output folder: its clean/ rows are the input


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


# ---------------------------------------------------------------------------------------------
# Pure computation (no I/O)


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


def _session_order(codes: np.ndarray, ts: np.ndarray, s_dict: pa.Array) -> np.ndarray:
    """Row permutation into (session start, session id, event time) order; ties keep their input order."""
    start = np.full(len(s_dict), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(start, codes, ts)
    present = np.flatnonzero(start < np.iinfo(np.int64).max)
    rank = np.empty(len(s_dict), dtype=np.int64)
    rank[present[_by_start_then_id(start[present], present, s_dict)]] = np.arange(len(present))
    if len(ts) < 2 or bool((ts[1:] >= ts[:-1]).all()):
        # A time-ordered log (the usual case for validated event streams): one stable sort by session.
        return _stable_argsort(rank[codes])
    return np.lexsort((ts, rank[codes]))  # lexsort is stable: equal times keep input order


def _reorder_blocks(codes: np.ndarray, ts: np.ndarray, s_dict: pa.Array) -> np.ndarray | None:
    """For rows already grouped by session and time-ordered within each, the permutation that puts the
    sessions back in (start, id) order; None when they already are. O(rows) plus a sort of the sessions.
    """
    if len(codes) < 2:
        return None
    first = np.ones(len(codes), dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    block_start = np.flatnonzero(first)
    order = _by_start_then_id(ts[block_start], codes[block_start], s_dict)
    if bool((order == np.arange(len(order))).all()):
        return None
    lengths = np.diff(np.append(block_start, len(codes)))
    starts, lengths = block_start[order], lengths[order]
    # The permutation is the blocks' row ranges end to end: a running sum of +1 steps that jumps to the
    # next block's first row where a block begins (one cumsum instead of materializing per-row offsets).
    steps = np.ones(len(codes), dtype=np.int64)
    steps[0] = starts[0]
    steps[np.cumsum(lengths[:-1])] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps, out=steps)


def _drop_rows(keep: np.ndarray, codes: np.ndarray, bad_codes: np.ndarray) -> np.ndarray | None:
    """Unset ``keep`` for kept rows whose code is flagged in ``bad_codes``; the dropped rows (None if none)."""
    if not bad_codes.any():
        return None
    rows = np.flatnonzero(keep & bad_codes[codes])
    keep[rows] = False
    return rows


def _count_distinct(codes: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(codes))) if len(codes) else 0


def _summary(codes_s: np.ndarray, codes_i: np.ndarray) -> dict[str, int]:
    return {"events": int(len(codes_s)), "sessions": _count_distinct(codes_s), "items": _count_distinct(codes_i)}


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")


def build_splits(events: pa.Table, build: BuildConfig | None = None) -> Splits:
    """Order, filter and split canonical events (only session_id, item_id and timestamp are used)."""
    build = build or BuildConfig()
    check_config(build)
    for name in (SESSION_ID, ITEM_ID, TIMESTAMP):
        if name not in events.column_names:
            raise InputError(f"events have no {name} column")
        nulls = events.column(name).null_count
        if nulls:
            raise InputError(f"{nulls} events have a null {name}; run `validate` first and build from its clean rows")
    if events.num_rows == 0:
        raise InputError("no events to build a dataset from")
    s_codes, s_dict = _encode(events.column(SESSION_ID))
    i_codes, i_dict = _encode(events.column(ITEM_ID))
    ts = events.column(TIMESTAMP).cast(TIMESTAMP_TYPE).cast(pa.int64()).to_numpy()
    n_sessions, n_items = len(s_dict), len(i_dict)
    sessions_in = np.bincount(s_codes, minlength=n_sessions)
    items_in = np.bincount(i_codes, minlength=n_items)
    stats: dict[str, Any] = {
        "input": {
            "events": len(s_codes),
            "sessions": int(np.count_nonzero(sessions_in)),
            "items": int(np.count_nonzero(items_in)),
        }
    }

    # 1. GRU4Rec order.
    order = _session_order(s_codes, ts, s_dict)
    s_codes, i_codes, ts = s_codes[order], i_codes[order], ts[order]
    del order

    # 2. Consecutive repeats (same item again, same session).
    keep = np.ones(len(ts), dtype=bool)
    if build.drop_repeats:
        repeat = np.zeros(len(ts), dtype=bool)
        repeat[1:] = (s_codes[1:] == s_codes[:-1]) & (i_codes[1:] == i_codes[:-1])
        keep &= ~repeat
    stats["dropped"] = {"repeats": int((~keep).sum()), "short_sessions": 0, "rare_items": 0}

    # 3. Iterative filtering until nothing changes. Session lengths and item supports are counted once and
    #    then kept up to date by subtracting the (few) rows each step drops; a step reads every row only
    #    when some session or item is below its threshold.
    lengths = np.bincount(s_codes[keep], minlength=n_sessions) if build.drop_repeats else sessions_in
    supports = np.bincount(i_codes[keep], minlength=n_items) if build.drop_repeats else items_in
    iterations = 0
    while build.min_session_length or build.min_item_support:
        iterations += 1
        changed = False
        if build.min_session_length:
            bad = _drop_rows(keep, s_codes, (lengths > 0) & (lengths < build.min_session_length))
            if bad is not None:
                stats["dropped"]["short_sessions"] += len(bad)
                lengths[s_codes[bad]] = 0
                supports -= np.bincount(i_codes[bad], minlength=n_items)
                changed = True
        if build.min_item_support:
            bad = _drop_rows(keep, i_codes, (supports > 0) & (supports < build.min_item_support))
            if bad is not None:
                stats["dropped"]["rare_items"] += len(bad)
                supports[i_codes[bad]] = 0
                lengths -= np.bincount(s_codes[bad], minlength=n_sessions)
                changed = True
        if not changed:
            break
    stats["filter_iterations"] = iterations
    if not keep.any():
        raise InputError(
            f"no events left after filtering (min_session_length={build.min_session_length}, "
            f"min_item_support={build.min_item_support}); lower the thresholds or give more data"
        )
    stats["after_filtering"] = {
        "events": int(np.count_nonzero(keep)),
        "sessions": int(np.count_nonzero(lengths)),
        "items": int(np.count_nonzero(supports)),
    }

    # 4. Temporal split on each session's last event.
    tmax = int(ts[keep].max())
    session_end = np.full(n_sessions, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(session_end, s_codes[keep], ts[keep])
    test_start = tmax - int(round(build.test_days * DAY_US)) if build.test_days > 0 else None
    test_session = session_end >= test_start if test_start is not None else np.zeros(n_sessions, dtype=bool)
    train_full = keep & ~test_session[s_codes]
    valid_start = None
    valid_session = np.zeros(n_sessions, dtype=bool)
    if build.valid_days > 0 and train_full.any():
        valid_start = int(ts[train_full].max()) - int(round(build.valid_days * DAY_US))
        valid_session = (session_end >= valid_start) & ~test_session
    train_rows = train_full & ~valid_session[s_codes]
    if not train_rows.any():
        raise InputError(
            f"the train split is empty: every session ends within the last {build.test_days} + {build.valid_days} days; "
            "use shorter windows or more days of data"
        )
    stats["split_times"] = {"latest_event": _iso(tmax), "test_start": _iso(test_start), "valid_start": _iso(valid_start)}

    # 5. Item index on train (order of first appearance), popularity counts.
    train_items = i_codes[train_rows]
    first_seen = np.full(n_items, len(train_items), dtype=np.int64)
    np.minimum.at(first_seen, train_items, np.arange(len(train_items), dtype=np.int64))
    seen = np.flatnonzero(first_seen < len(train_items))
    by_appearance = seen[np.argsort(first_seen[seen], kind="stable")]
    item_idx = np.full(n_items, -1, dtype=np.int32)
    item_idx[by_appearance] = np.arange(len(by_appearance), dtype=np.int32)
    counts = np.bincount(item_idx[train_items], minlength=len(by_appearance)).astype(np.int64)

    def held_out(session_mask: np.ndarray, name: str) -> np.ndarray:
        rows = keep & session_mask[s_codes]
        known = rows & (item_idx[i_codes] >= 0)
        lengths = np.bincount(s_codes[known], minlength=n_sessions)
        final = known & (lengths[s_codes] >= 2)
        stats["dropped"][f"{name}_unknown_items"] = int((rows & ~known).sum())
        stats["dropped"][f"{name}_short_sessions"] = int((known & ~final).sum())
        return final

    masks = {"train": train_rows, "valid": held_out(valid_session, "valid"), "test": held_out(test_session, "test")}
    tables: dict[str, pa.Table] = {}
    for split, mask in masks.items():
        rows = np.flatnonzero(mask)
        s, i, t = s_codes[rows], i_codes[rows], ts[rows]
        resort = _reorder_blocks(s, t, s_dict)
        if resort is not None:
            # Filtering moved some session starts: restore (session start, session id, time) order.
            s, i, t = s[resort], i[resort], t[resort]
        tables[split] = pa.table(
            [s_dict.take(pa.array(s)), i_dict.take(pa.array(i)), pa.array(t).cast(TIMESTAMP_TYPE), pa.array(item_idx[i])],
            schema=SPLIT_SCHEMA,
        )
        stats[split] = {**_summary(s, i), "start": _iso(int(t.min()) if len(t) else None), "end": _iso(int(t.max()) if len(t) else None)}
    items = pa.table(
        [pa.array(np.arange(len(by_appearance), dtype=np.int32)), i_dict.take(pa.array(by_appearance)), pa.array(counts)],
        schema=ITEMS_SCHEMA,
    )
    return Splits(tables["train"], tables["valid"], tables["test"], items, stats)


# ---------------------------------------------------------------------------------------------
# I/O


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def _resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Validation output folders stand for their clean rows; a failed validation is refused."""
    out = []
    for uri in inputs:
        report_uri = storage.join(uri, VALIDATION_REPORT)
        if storage.is_dir(uri) and storage.exists(report_uri):
            report = storage.read_json(report_uri)
            if not report.get("success"):
                raise InputError(f"{uri} holds a failed validation (see {report_uri}); fix the input and re-validate")
            out.append(storage.join(uri, "clean"))
        else:
            out.append(uri)
    return out


def write_dataset(splits: Splits, out_dir: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the splits and the manifest under a temporary name, then publish them as ``out_dir``."""
    files: dict[str, dict[str, Any]] = {}
    with storage.staged_dir(out_dir, MANIFEST) as tmp:
        tables = splits.tables()
        with ThreadPoolExecutor(max_workers=len(tables)) as pool:  # encoding releases the GIL
            encoded = dict(zip(tables, pool.map(_parquet_bytes, tables.values()), strict=True))
        for name, table in tables.items():
            data = encoded.pop(name)
            path = f"{name}/{PART}"
            storage.write_bytes(storage.join(tmp, name, PART), data)
            files[name] = {"path": path, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        fingerprint = hashlib.sha256("".join(f"{k}:{v['sha256']}\n" for k, v in sorted(files.items())).encode()).hexdigest()
        manifest = {
            "kind": "gru4rec-pipeline/session-dataset",
            "schema_version": DATASET_SCHEMA_VERSION,
            "fingerprint": f"sha256:{fingerprint}",
            "files": files,
            "columns": {"splits": SPLIT_SCHEMA.names, "items": ITEMS_SCHEMA.names},
            "counts": {k: splits.stats[k] for k in ("input", "after_filtering", "train", "valid", "test")}
            | {"dropped": splits.stats["dropped"], "filter_iterations": splits.stats["filter_iterations"]},
            "time_ranges": {k: {"start": splits.stats[k]["start"], "end": splits.stats[k]["end"]} for k in SPLITS},
            "split_times": splits.stats["split_times"],
            "pipeline_version": __version__,
            "created_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            **(extra or {}),
        }
        storage.write_json(storage.join(tmp, MANIFEST), manifest)
    return manifest


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
    storage.check_disjoint(inputs, out_dir)
    resolved = _resolve_inputs(inputs)
    events = ingest_mod.read_events(resolved, ingest, columns=[SESSION_ID, ITEM_ID, TIMESTAMP], dictionary_items=True)
    log.info("building from %d events", events.num_rows)
    splits = build_splits(events, build)
    del events
    manifest = write_dataset(
        splits,
        out_dir,
        {"inputs": [storage.normalize(u) for u in resolved], "config": {"ingest": to_dict(ingest), "build": to_dict(build)}},
    )
    log.info(
        "dataset %s: train %d / valid %d / test %d events, %d items",
        out_dir, splits.train.num_rows, splits.valid.num_rows, splits.test.num_rows, splits.items.num_rows,
    )  # fmt: skip
    return manifest


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    """The manifest of a committed dataset (an error when there is none: not a dataset, or not committed)."""
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise InputError(f"{dataset_uri} is not a session dataset: no {MANIFEST} (missing, or never committed)")
    return storage.read_json(uri)


def read_split(dataset_uri: str, split: str) -> pa.Table:
    """One split (``train``, ``valid``, ``test``) or the ``items`` map of a committed dataset."""
    if split not in (*SPLITS, "items"):
        raise InputError(f"unknown split {split!r}; one of {', '.join((*SPLITS, 'items'))}")
    manifest = read_manifest(dataset_uri)
    try:
        relative = manifest["files"][split]["path"]
    except (KeyError, TypeError):
        raise InputError(
            f"{storage.join(dataset_uri, MANIFEST)} lists no file for split {split!r} (files.{split}.path): "
            "written by another tool or version? Rebuild the dataset with `python -m pipeline build`"
        ) from None
    fs, path = storage.resolve(storage.join(dataset_uri, relative))
    try:
        return pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read split {split} of {dataset_uri}: {exc}") from None


