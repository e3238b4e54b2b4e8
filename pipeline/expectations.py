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

from pipeline.schema import EVENT_SCHEMA, ITEM_ID, SESSION_ID, TIMESTAMP

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


def build_suite(params: SuiteParams, *, row_rules: bool = True) -> gx.ExpectationSuite:
    """The suite for one batch; every expectation carries its rule name and level in ``meta``.

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
            gxe.ExpectColumnMaxToBeBetween(column=TIMESTAMP, min_value=params.freshness_floor, meta=meta("freshness", "table"))
        )
    if not row_rules:
        return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations, meta={"version": SUITE_VERSION})
    for column in (SESSION_ID, ITEM_ID, TIMESTAMP):
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column, meta=meta(f"null_{column}", "row")))
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=TIMESTAMP,
            min_value=params.timestamp_floor,
            max_value=params.partition_end,
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
# Derived per-row columns for the group rules


def _dense_codes(arr: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """Dense integer codes of a column (nulls get their own code) and the number of codes."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_timestamp(arr.type) or pa.types.is_integer(arr.type):
        values = arr.cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy()
        uniques, codes = np.unique(values, return_inverse=True)
        return codes.astype(np.int64, copy=False), len(uniques)
    encoded = pc.dictionary_encode(arr)
    k = len(encoded.dictionary)
    return encoded.indices.fill_null(k).to_numpy().astype(np.int64), k + 1


def duplicate_of(table: pa.Table) -> np.ndarray:
    """For each row, the index of the first earlier identical row (all canonical columns), else -1."""
    n = table.num_rows
    key = np.zeros(n, dtype=np.int64)
    for name in EVENT_SCHEMA.names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if column.null_count == n:
            continue  # an all-null column cannot tell rows apart
        codes, k = _dense_codes(column)
        key = np.unique(key * k + codes, return_inverse=True)[1].astype(np.int64)
    first = np.full(int(key.max(initial=-1)) + 1, n, dtype=np.int64)
    rows = np.arange(n, dtype=np.int64)
    np.minimum.at(first, key, rows)
    firsts = first[key]
    return np.where(firsts < rows, firsts, -1)


def seconds_before_session_max(session_codes: np.ndarray, ts: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """How many seconds each event lies before the latest earlier event of its session (file order).

    0 for events in order; NaN where not checked (no session, or a timestamp already failing another rule:
    a wild timestamp must not make every later event of its session look out of order).
    """
    n = len(ts)
    out = np.full(n, np.nan)
    rows = np.flatnonzero(eligible)
    if rows.size == 0:
        return out
    order = rows[np.argsort(session_codes[rows], kind="stable")]  # by session, file order within
    ts_sorted = ts[order]
    uniques, rank = np.unique(ts_sorted, return_inverse=True)
    width = len(uniques) + 1
    # Offsetting each session's ranks by session * width makes one running max restart per session.
    key = session_codes[order].astype(np.int64) * width + rank
    running = np.maximum.accumulate(key)
    behind = uniques[running - session_codes[order].astype(np.int64) * width] - ts_sorted
    out[order] = behind / 1e6
    return out


def derive_columns(table: pa.Table, *, floor_us: int, end_us: int, check_order: bool) -> dict[str, pa.Array]:
    """The derived columns the row rules check (the table must have the canonical column types)."""
    n = table.num_rows
    session = table.column(SESSION_ID).combine_chunks()
    encoded = pc.dictionary_encode(session)
    codes = encoded.indices.fill_null(-1).to_numpy().astype(np.int64)
    has_session = codes >= 0
    counts = np.bincount(codes[has_session], minlength=len(encoded.dictionary))
    # float64 with NaN for "no session": GX checks plain numpy numbers vectorized, nullable Int64 row by row.
    lengths = pa.array(np.where(has_session, counts[np.maximum(codes, 0)], np.nan).astype(np.float64))

    dups = duplicate_of(table)
    duplicates = pa.array(dups, mask=dups < 0, type=pa.int64())

    ts_col = table.column(TIMESTAMP).combine_chunks().cast(pa.int64())
    ts = ts_col.fill_null(0).to_numpy()
    in_window = np.asarray(ts_col.is_valid().to_numpy(zero_copy_only=False), dtype=bool) & (ts >= floor_us) & (ts < end_us)
    if check_order and n:
        behind = seconds_before_session_max(codes, ts, has_session & in_window)
    else:
        behind = np.full(n, np.nan)
    return {DUPLICATE_OF: duplicates, BEHIND_SESSION: pa.array(behind), SESSION_LENGTH: lengths}
