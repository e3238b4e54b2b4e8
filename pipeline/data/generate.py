"""Synthetic click logs for demos, tests and benchmarks: no download needed.

``generate_clicks(out_dir, days=..., ...)`` writes one partition per day, by event time::

    OUT/dt=YYYY-MM-DD/events.parquet   (or events.csv / events.tsv with ``fmt``)
    OUT/_generated.json                parameters, per-partition row counts and injected corruption

Each partition is an event stream sorted by time (sessions interleave), with the canonical columns
``session_id, item_id, timestamp, user_id, event_type``. Parquet is the default: typed, compressed and what
an event pipeline lands in a lake; the text formats use ISO-8601 UTC timestamps.

What a sequence model can learn: item popularity is Zipf-like, and each item has a few "successor" items
that usually come next (a sparse Markov chain), with random jumps to popular items and some consecutive
repeats (RSC15 has ~19%). Session lengths are geometric; clicks are seconds to minutes apart; session starts
follow a daily cycle. Sessions that run past midnight continue in the next day's partition.

Corruption (``corruption={kind: amount}``) is injected into each partition in exactly known amounts, one
corrupted row per distinct session, so a validation must quarantine exactly those rows:
``null_session_id``, ``null_item_id``, ``null_timestamp``, ``out_of_window`` (a timestamp before 2000 or after
the partition's end), ``duplicate`` (an exact copy right after the original), ``out_of_order`` (an event
earlier than the start of its session) as fractions of the partition's rows, and ``bot_sessions`` (sessions
of ``bot_session_length`` events, quarantined whole) as a count per partition.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.progress import progress
from pipeline.data.schema import EVENT_SCHEMA, EVENT_TYPE, ITEM_ID, SESSION_ID, TIMESTAMP, USER_ID
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

ROW_KINDS = ("null_session_id", "null_item_id", "null_timestamp", "out_of_window", "duplicate", "out_of_order")
KINDS = (*ROW_KINDS, "bot_sessions")
FORMATS = {"parquet": "events.parquet", "csv": "events.csv", "tsv": "events.tsv"}
SUMMARY = "_generated.json"
DAY_US = 86_400 * 1_000_000
# Relative session-start intensity per hour of the day (UTC): quiet nights, busy evenings.
HOURLY = np.array([2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 6, 7, 7, 6, 6, 6, 7, 8, 9, 10, 9, 6, 4], dtype=float)


@dataclass(frozen=True)
class Catalogue:
    """The item world shared by all days: ids, popularity and successor lists."""

    ids: np.ndarray  # item id strings, by item index
    popularity: np.ndarray  # sampling probabilities (Zipf-like)
    successors: np.ndarray  # (n_items, k) item indices that tend to follow each item
    successor_p: np.ndarray  # (k,) probabilities of picking each successor


def make_catalogue(n_items: int, seed: int, zipf: float = 1.1, k: int = 4) -> Catalogue:
    rng = np.random.default_rng([seed, 0])
    ranks = rng.permutation(n_items)  # item index -> popularity rank
    weights = 1.0 / (ranks + 1.0) ** zipf
    popularity = weights / weights.sum()
    ids = np.array([str(200_000_000 + 7 * i) for i in rng.permutation(n_items)], dtype=object)
    # Successors lean to popular items (sqrt-flattened) so the chain mixes but stays sparse.
    flat = np.sqrt(popularity)
    successors = rng.choice(n_items, size=(n_items, k), p=flat / flat.sum())
    successor_p = np.array([0.5, 0.25, 0.15, 0.1][:k])
    return Catalogue(ids, popularity, successors, successor_p / successor_p.sum())


def _sessions(
    rng: np.random.Generator, cat: Catalogue, n: int, day_start_us: int, mean_length: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(session index, item index, timestamp us)`` per event for ``n`` sessions starting on one day."""
    lengths = np.minimum(rng.geometric(1.0 / mean_length, size=n), 60)
    hours = rng.choice(24, size=n, p=HOURLY / HOURLY.sum())
    starts = day_start_us + (hours * 3600 + rng.random(n) * 3600) * 1_000_000
    max_len = int(lengths.max(initial=0))
    items = np.empty((n, max_len), dtype=np.int64)
    items[:, 0] = rng.choice(len(cat.popularity), size=n, p=cat.popularity)
    for t in range(1, max_len):
        prev = items[:, t - 1]
        u = rng.random(n)
        follow = cat.successors[prev, rng.choice(len(cat.successor_p), size=n, p=cat.successor_p)]
        jump = rng.choice(len(cat.popularity), size=n, p=cat.popularity)
        items[:, t] = np.where(u < 0.15, prev, np.where(u < 0.75, follow, jump))
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    # Gaps between clicks: log-normal, median ~40 s; the first event sits at the session start.
    gaps = np.exp(rng.normal(np.log(40.0), 1.0, size=(n, max_len))) * 1_000_000
    gaps[:, 0] = 0
    times = starts[:, None] + np.cumsum(gaps, axis=1)
    session = np.broadcast_to(np.arange(n)[:, None], (n, max_len))[mask]
    return session, items[mask], times[mask].astype(np.int64)


def _table(session_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray, users: np.ndarray) -> pa.Table:
    n = len(ts)
    return pa.table(
        {
            SESSION_ID: pa.array(session_ids, type=pa.string()),
            ITEM_ID: pa.array(item_ids, type=pa.string()),
            TIMESTAMP: pa.array(ts, type=pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            USER_ID: pa.array(users, type=pa.string()),
            EVENT_TYPE: pa.array(np.full(n, "view", dtype=object), type=pa.string()),
        },
        schema=EVENT_SCHEMA,
    )


def _pick_sessions(rng: np.random.Generator, pool: np.ndarray, k: int, kind: str, day: str) -> np.ndarray:
    if k > len(pool):
        raise ConfigError(f"corruption {kind}: {k} rows asked for on {day} but only {len(pool)} sessions can take one")
    chosen = rng.choice(len(pool), size=k, replace=False)
    return pool[chosen]


def _corrupt(
    rng: np.random.Generator,
    table: pa.Table,
    corruption: Mapping[str, float],
    day: str,
    day_end_us: int,
    bot_length: int,
    item_ids: np.ndarray,
) -> tuple[pa.Table, dict[str, int]]:
    """Inject corruption into one partition (one row per distinct session); returns the table and counts."""
    # ~60 lines: every kind of corruption draws from one RNG in a fixed order (the bytes depend on it).
    n = table.num_rows
    s_codes = pc.dictionary_encode(table.column(SESSION_ID)).combine_chunks().indices.to_numpy()
    ts = table.column(TIMESTAMP).cast(pa.int64()).to_numpy().copy()
    rows = np.arange(n)
    # One candidate row per session (its last row in the file; for out_of_order it must not be the first).
    last_row = np.full(s_codes.max(initial=-1) + 1, -1)
    last_row[s_codes] = rows  # later rows overwrite earlier ones
    first_row = np.full(len(last_row), n)
    np.minimum.at(first_row, s_codes, rows)
    sessions = np.arange(len(last_row))  # not yet corrupted: each kind takes its rows from other sessions
    injected: dict[str, int] = {}
    chosen: dict[str, np.ndarray] = {}
    for kind in ROW_KINDS:
        k = int(round(corruption.get(kind, 0.0) * n))
        if k <= 0:
            continue
        pool = sessions
        if kind == "out_of_order":
            pool = pool[last_row[pool] > first_row[pool]]
        picked = _pick_sessions(rng, pool, k, kind, day)
        sessions = np.setdiff1d(sessions, picked, assume_unique=True)
        chosen[kind] = last_row[picked]
        injected[kind] = k
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    for kind, name in (("null_session_id", SESSION_ID), ("null_item_id", ITEM_ID)):
        if kind in chosen:
            mask = np.zeros(n, dtype=bool)
            mask[chosen[kind]] = True
            columns[name] = pc.if_else(pa.array(mask), pa.nulls(n, pa.string()), columns[name])
    ts_null = np.zeros(n, dtype=bool)
    if "null_timestamp" in chosen:
        ts_null[chosen["null_timestamp"]] = True
    if "out_of_window" in chosen:
        r = chosen["out_of_window"]
        before = rng.random(len(r)) < 0.5
        ts[r[before]] = int(dt.datetime(1999, 12, 31, tzinfo=dt.UTC).timestamp() * 1e6)
        ts[r[~before]] = day_end_us + 3 * DAY_US
    if "out_of_order" in chosen:
        r = chosen["out_of_order"]
        ts[r] = ts[first_row[s_codes[r]]] - 60 * 1_000_000  # a minute before its session started
    columns[TIMESTAMP] = pa.array(ts, mask=ts_null, type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    out = pa.table(columns, schema=EVENT_SCHEMA)
    if "duplicate" in chosen:
        # Each copy goes right after its original.
        order = np.concatenate([rows, chosen["duplicate"]])
        position = np.concatenate([rows * 2, chosen["duplicate"] * 2 + 1])
        out = out.take(pa.array(order[np.argsort(position, kind="stable")]))
    bots = int(corruption.get("bot_sessions", 0))
    if bots > 0:
        out = _add_bots(rng, out, bots, day, day_end_us, bot_length, item_ids)
        injected["bot_sessions"] = bots
        injected["bot_session_rows"] = bots * bot_length
    return out, injected


def _add_bots(
    rng: np.random.Generator, out: pa.Table, bots: int, day: str, day_end_us: int, bot_length: int, item_ids: np.ndarray
) -> pa.Table:
    """``bots`` sessions of ``bot_length`` events two seconds apart, merged into the day's stream by time."""
    parts = [out]
    for b in range(bots):
        start = day_end_us - DAY_US + int(rng.integers(0, DAY_US // 2))
        times = start + np.arange(bot_length) * 2_000_000
        parts.append(
            _table(
                np.full(bot_length, f"bot-{day}-{b}", dtype=object),
                item_ids[rng.integers(0, len(item_ids), size=bot_length)],
                times,
                np.full(bot_length, f"bot-{b}", dtype=object),
            )
        )
    merged = pa.concat_tables(parts)
    # Keep the stream time-ordered by merging the bot rows in by time (stable for the rest).
    is_bot = np.concatenate([np.zeros(out.num_rows, dtype=bool), np.ones(bots * bot_length, dtype=bool)])
    bot_ts = [p.column(TIMESTAMP).cast(pa.int64()).to_numpy() for p in parts[1:]]
    merged_ts = np.concatenate([_stream_key(out), *bot_ts])
    return merged.take(pa.array(np.lexsort((is_bot, merged_ts))))


def _stream_key(table: pa.Table) -> np.ndarray:
    """The position key of existing rows when merging new rows in by time: their running max time."""
    ts = table.column(TIMESTAMP).cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy()
    return np.maximum.accumulate(ts)


def _write(table: pa.Table, uri: str, fmt: str) -> None:
    fs, path = storage.resolve(uri)
    storage.makedirs(storage.parent(uri))
    if fmt == "parquet":
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        return
    text = table.set_column(
        table.schema.get_field_index(TIMESTAMP),
        TIMESTAMP,
        pc.strftime(table.column(TIMESTAMP), format="%Y-%m-%dT%H:%M:%SZ"),  # ISO 8601; %S carries the microseconds
    )
    with fs.open_output_stream(path) as out:
        pacsv.write_csv(
            text, out, write_options=pacsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ",", quoting_style="needed")
        )


def _check_args(corruption: Mapping[str, float], fmt: str, days: int, sessions_per_day: int, n_items: int) -> None:
    unknown = sorted(set(corruption) - set(KINDS))
    if unknown:
        raise ConfigError(f"unknown corruption kind(s) {unknown}; known: {', '.join(KINDS)}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}; one of {', '.join(FORMATS)}")
    if days < 1 or sessions_per_day < 1 or n_items < 10:
        raise ConfigError("generate needs days >= 1, sessions_per_day >= 1 and n_items >= 10")


def generate_clicks(
    out_dir: str,
    *,
    days: int = 7,
    start_date: str | dt.date = "2024-01-01",
    sessions_per_day: int = 2000,
    n_items: int = 2000,
    seed: int = 0,
    corruption: Mapping[str, float] | None = None,
    fmt: str = "parquet",
    mean_session_length: float = 5.0,
    n_users: int | None = None,
    bot_session_length: int = 300,
) -> list[str]:
    """Write ``days`` daily partitions of synthetic clicks under ``out_dir``; returns the partition URIs.

    The same arguments always give the same bytes.
    """
    # ~60 lines: one day's stream, corruption and file in one loop, as the RNG draws them in this order.
    corruption = dict(corruption or {})
    _check_args(corruption, fmt, days, sessions_per_day, n_items)
    first_day = start_date if isinstance(start_date, dt.date) else dt.date.fromisoformat(str(start_date))
    cat = make_catalogue(n_items, seed)
    n_users = n_users or max(1, sessions_per_day * days // 3)
    uris: list[str] = []
    partitions: list[dict[str, Any]] = []
    carry: pa.Table | None = None
    for d in progress(range(days), "generating", total=days):
        day = first_day + dt.timedelta(days=d)
        day_start = int(dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp() * 1_000_000)
        day_end = day_start + DAY_US
        rng = np.random.default_rng([seed, 1, d])
        sess, items, ts = _sessions(rng, cat, sessions_per_day, day_start, mean_session_length)
        session_ids = np.array([str(d * 10_000_000 + k + 1) for k in range(sessions_per_day)], dtype=object)
        user_of = rng.zipf(1.5, size=sessions_per_day) % n_users
        users = np.array([f"u{u}" for u in range(n_users)], dtype=object)
        table = _table(session_ids[sess], cat.ids[items], ts, users[user_of][sess])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        all_ts = table.column(TIMESTAMP).cast(pa.int64()).to_numpy()
        order = np.argsort(all_ts, kind="stable")  # an event stream: sorted by time, sessions interleave
        table = table.take(pa.array(order))
        spill = int(np.searchsorted(all_ts[order], day_end))
        carry = table.slice(spill) if d + 1 < days else None  # events after midnight: next partition
        table = table.slice(0, spill)
        clean_rows = table.num_rows
        table, injected = _corrupt(rng, table, corruption, day.isoformat(), day_end, bot_session_length, cat.ids)
        # Rows a validation must quarantine: every corrupted row, each duplicate copy, every bot row.
        expected = sum(v for k, v in injected.items() if k in ROW_KINDS) + injected.get("bot_session_rows", 0)
        uri = storage.join(out_dir, f"dt={day.isoformat()}")
        _write(table, storage.join(uri, FORMATS[fmt]), fmt)
        uris.append(uri)
        partitions.append(
            {"uri": uri, "date": day.isoformat(), "rows": table.num_rows, "generated_rows": clean_rows,
             "injected": injected, "expected_quarantined": expected}
        )  # fmt: skip
    settings = {
        "days": days, "start_date": first_day.isoformat(), "sessions_per_day": sessions_per_day, "n_items": n_items,
        "seed": seed, "corruption": corruption, "format": fmt, "mean_session_length": mean_session_length,
    }  # fmt: skip
    storage.write_json(
        storage.join(out_dir, SUMMARY), settings | {"partitions": partitions, "rows": sum(p["rows"] for p in partitions)}
    )
    log.info("generated %d partitions, %d events under %s", days, sum(p["rows"] for p in partitions), out_dir)
    return uris
