"""The versioned Great Expectations suite for click-event batches, defined in code.

Rules and their levels (the rule name is what the report and the quarantine ``reason`` column use):

========================  =======  ===============================================================
rule                      level    expectation
========================  =======  ===============================================================
required_column           schema   session_id, item_id and timestamp exist
column_type               schema   ids are strings, timestamp is ``datetime64[us, UTC]``
min_rows                  table    the batch has at least ``min_rows`` rows (an empty batch fails)
freshness                 table    the newest event is at most ``max_partition_age_days`` before the
                                   partition's end (only when the end is known)
null_session_id / ...     row      ids and timestamp are not null
timestamp_window          row      ``timestamp_floor <= timestamp < partition end``
duplicate_event           row      no exact copy of an earlier event (derived ``duplicate_of_row``)
session_order             row      no event earlier than an earlier event of its session (derived
                                   ``seconds_before_session_max``; skipped for unordered formats)
session_length            row      sessions of at most ``max_session_length`` events (bot-like
                                   sessions are quarantined whole; derived ``session_length``)
========================  =======  ===============================================================

GX's pandas engine checks whole columns; rules about groups of rows (duplicates, per-session order, session
length) are turned into per-row derived columns first by :func:`derive_columns` (vectorized, in numpy),
and the suite checks those. Bump :data:`SUITE_VERSION` whenever a rule changes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.schema import EVENT_SCHEMA, ITEM_ID, SESSION_ID, TIMESTAMP

if TYPE_CHECKING:
    import great_expectations as gx

SUITE_NAME = "click_events"
SUITE_VERSION = "1.0.0"

DUPLICATE_OF = "duplicate_of_row"
BEHIND_SESSION = "seconds_before_session_max"
SESSION_LENGTH = "session_length"
DERIVED_COLUMNS = (DUPLICATE_OF, BEHIND_SESSION, SESSION_LENGTH)

# Column types as pandas (>= 3) holds the canonical Arrow columns: "str" is pandas' default string dtype.
PANDAS_TYPES = {SESSION_ID: "str", ITEM_ID: "str", TIMESTAMP: "datetime64[us, UTC]"}

# Row-level rules in the order their names appear in a quarantined row's ``reason``.
ROW_RULES = (
    "null_session_id",
    "null_item_id",
    "null_timestamp",
    "timestamp_window",
    "duplicate_event",
    "session_order",
    "session_length",
)


@dataclass(frozen=True)
class SuiteParams:
    """The per-batch thresholds the suite is built with."""

    timestamp_floor: dt.datetime
    partition_end: dt.datetime  # exclusive upper bound for event times
    min_rows: int
    max_session_length: int
    freshness_floor: dt.datetime | None  # the newest event must not be older; None = not checked
    check_order: bool


def suite_parameters(params: SuiteParams) -> dict[str, Any]:
    """The run-time values of the suite's ``$PARAMETER`` thresholds (they differ from batch to batch)."""
    values: dict[str, Any] = {"timestamp_floor": params.timestamp_floor, "partition_end": params.partition_end}
    if params.freshness_floor is not None:
        values["freshness_floor"] = params.freshness_floor
    return values


def build_suite(params: SuiteParams, *, row_rules: bool = True) -> gx.ExpectationSuite:
    """The suite for batches like this one; every expectation carries its rule name and level in ``meta``.

    Times are ``$PARAMETER``s (see :func:`suite_parameters`), so consecutive batches share one suite.
    ``row_rules=False`` leaves out the row-level rules (for a batch whose columns are already known bad).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    def meta(rule: str, level: str) -> dict[str, str]:
        return {"rule": rule, "level": level}

    expectations: list[Any] = []
    for column, pandas_type in PANDAS_TYPES.items():
        expectations.append(gxe.ExpectColumnToExist(column=column, meta=meta("required_column", "schema")))
        expectations.append(gxe.ExpectColumnTypeToBe(column=column, type_=pandas_type, meta=meta("column_type", "schema")))
    expectations.append(gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows, meta=meta("min_rows", "table")))
    if params.freshness_floor is not None:
        expectations.append(
            gxe.ExpectColumnMaxToBeBetween(
                column=TIMESTAMP, min_value={"$PARAMETER": "freshness_floor"}, meta=meta("freshness", "table")
            )
        )
    if not row_rules:
        return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations, meta={"version": SUITE_VERSION})
    for column in (SESSION_ID, ITEM_ID, TIMESTAMP):
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column, meta=meta(f"null_{column}", "row")))
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=TIMESTAMP,
            min_value={"$PARAMETER": "timestamp_floor"},
            max_value={"$PARAMETER": "partition_end"},
            strict_max=True,
            meta=meta("timestamp_window", "row"),
        )
    )
    expectations.append(gxe.ExpectColumnValuesToBeNull(column=DUPLICATE_OF, meta=meta("duplicate_event", "row")))
    if params.check_order:
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(column=BEHIND_SESSION, max_value=0, meta=meta("session_order", "row"))
        )
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=SESSION_LENGTH, min_value=1, max_value=params.max_session_length, meta=meta("session_length", "row")
        )
    )
    # Passing the list at construction: add_expectation() would re-save the whole suite once per call.
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations, meta={"version": SUITE_VERSION})


# ---------------------------------------------------------------------------------------------
# Derived per-row columns for the group rules, and the row masks the suite's row rules describe

_MIX = np.uint64(0x9E3779B97F4A7C15)
_NULL_TIME = np.iinfo(np.int64).min


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    """Integer codes of a string column (equal strings, equal codes; null = -1)."""
    encoded = pc.dictionary_encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    return encoded.indices.fill_null(-1).to_numpy().astype(np.int64, copy=False)


def duplicate_of(keys: list[np.ndarray]) -> np.ndarray:
    """For each row, the index of the first earlier row with the same keys, else -1.

    A 64-bit hash of the key columns finds the few candidate rows cheaply; the candidates are then
    compared exactly, so a hash collision can never mark two different events as duplicates.
    """
    n = len(keys[0]) if keys else 0
    out = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return out
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = (h ^ k.astype(np.uint64)) * _MIX
            h ^= h >> np.uint64(29)
    # Rows whose hash occurs more than once: neighbours in hash order (numpy's SIMD sort beats a hash table).
    order = np.argsort(h)
    sorted_h = h[order]
    same = sorted_h[1:] == sorted_h[:-1]
    repeated = np.zeros(n, dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    rows = np.sort(order[repeated])
    if rows.size == 0:
        return out
    exact = np.stack([k[rows] for k in keys], axis=1)
    _, group = np.unique(exact, axis=0, return_inverse=True)
    group = group.reshape(-1)
    first = np.full(int(group.max()) + 1, n, dtype=np.int64)
    np.minimum.at(first, group, rows)
    firsts = first[group]
    out[rows] = np.where(firsts < rows, firsts, -1)
    return out


def seconds_before_session_max(session_codes: np.ndarray, ts: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """How many seconds each event lies before the latest earlier event of its session (file order).

    0 for events in order; NaN where not checked (no session, or a timestamp already failing another rule:
    a wild timestamp must not make every later event of its session look out of order).
    """
    import pandas as pd

    masked = np.where(eligible, ts, _NULL_TIME)
    running = pd.Series(masked).groupby(session_codes, sort=False).cummax().to_numpy()
    return np.where(eligible, (running - masked) / 1e6, np.nan)


@dataclass
class Derived:
    """The derived columns (for the suite) and the row masks of each row rule (for routing)."""

    columns: dict[str, pa.Array]
    masks: dict[str, np.ndarray]


def derive(table: pa.Table, params: SuiteParams) -> Derived:
    """Derived columns and row-rule masks of a batch with the canonical column types.

    The masks are the same predicates the suite's row expectations check; the validation cross-checks
    each mask's count against the expectation's unexpected count.
    """
    n = table.num_rows
    session = _codes(table.column(SESSION_ID))
    item = _codes(table.column(ITEM_ID))
    ts_col = table.column(TIMESTAMP).combine_chunks().cast(pa.int64())
    ts_valid = np.asarray(ts_col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    ts = ts_col.fill_null(_NULL_TIME).to_numpy()
    floor_us = int(round(params.timestamp_floor.timestamp() * 1e6))
    end_us = int(round(params.partition_end.timestamp() * 1e6))
    in_window = ts_valid & (ts >= floor_us) & (ts < end_us)
    has_session = session >= 0

    counts = np.bincount(session[has_session], minlength=int(session.max(initial=-1)) + 1)
    # float64 with NaN for "no session": GX checks plain numpy numbers vectorized, nullable ints row by row.
    lengths = np.where(has_session, counts[np.maximum(session, 0)], np.nan).astype(np.float64)

    dups = duplicate_of([session, item, ts])
    extra = [name for name in EVENT_SCHEMA.names[3:] if name in table.column_names and table.column(name).null_count < n]
    if extra and (dups >= 0).any():
        # "Exact" includes user_id and event_type: re-check the few candidates with them (cheaper than
        # encoding those columns for every row).
        rows = np.flatnonzero(dups >= 0)
        rows = np.union1d(rows, dups[rows])
        sub = table.take(pa.array(rows))
        keys = [session[rows], item[rows], ts[rows]] + [_codes(sub.column(name)) for name in extra]
        local = duplicate_of(keys)
        dups = np.full(n, -1, dtype=np.int64)
        dups[rows] = np.where(local >= 0, rows[np.maximum(local, 0)], -1)

    if params.check_order:
        behind = seconds_before_session_max(session, ts, has_session & in_window)
    else:
        behind = np.full(n, np.nan)

    masks = {
        "null_session_id": ~has_session,
        "null_item_id": item < 0,
        "null_timestamp": ~ts_valid,
        "timestamp_window": ts_valid & ~in_window,
        "duplicate_event": dups >= 0,
        "session_length": has_session & ((lengths < 1) | (lengths > params.max_session_length)),
    }
    if params.check_order:
        masks["session_order"] = behind > 0
    columns = {
        DUPLICATE_OF: pa.array(dups, mask=dups < 0, type=pa.int64()),
        BEHIND_SESSION: pa.array(behind),
        SESSION_LENGTH: pa.array(lengths),
    }
    return Derived(columns, masks)
