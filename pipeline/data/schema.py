"""The canonical click-event schema and the session-dataset schemas (see docs/architecture.md).

Every reader in :mod:`pipeline.data.ingest` produces :data:`EVENT_SCHEMA`; every session dataset written by
:mod:`pipeline.data.sessions` has :data:`SPLIT_SCHEMA` splits and an :data:`ITEMS_SCHEMA` item map. Ids stay
strings (the original ids, never re-numbered) and timestamps are UTC microseconds.
"""

from __future__ import annotations

import pyarrow as pa

SESSION_ID = "session_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
USER_ID = "user_id"
EVENT_TYPE = "event_type"
ITEM_IDX = "item_idx"
COUNT = "count"

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

EVENT_SCHEMA = pa.schema(
    [
        pa.field(SESSION_ID, pa.string()),
        pa.field(ITEM_ID, pa.string()),
        pa.field(TIMESTAMP, TIMESTAMP_TYPE),
        pa.field(USER_ID, pa.string(), nullable=True),
        pa.field(EVENT_TYPE, pa.string(), nullable=True),
    ]
)
"""Canonical click events: original ids as strings, UTC timestamps; user id and event type optional."""

REQUIRED_COLUMNS = (SESSION_ID, ITEM_ID, TIMESTAMP)

SPLIT_SCHEMA = pa.schema(
    [
        pa.field(SESSION_ID, pa.string(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(TIMESTAMP, TIMESTAMP_TYPE, nullable=False),
        pa.field(ITEM_IDX, pa.int32(), nullable=False),
    ]
)
"""Rows of a train / valid / test split, in GRU4Rec order (session start, session id, event time)."""

ITEMS_SCHEMA = pa.schema(
    [
        pa.field(ITEM_IDX, pa.int32(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(COUNT, pa.int64(), nullable=False),
    ]
)
"""The dense item index, fitted on train only, with each item's train popularity."""

QUARANTINE_EXTRA = pa.schema(
    [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("source_line", pa.int64(), nullable=True),
        pa.field("raw", pa.string(), nullable=True),
    ]
)
"""Columns the quarantine adds to the canonical ones: the failed rule(s), the input file, its data row (0-based,
bad lines counted), its line in a text file (1-based, blank lines not counted; null for Parquet) and, for a line that could not be read
into the canonical columns, its text (bounded): the line itself when it is malformed, else the cells read from it."""

QUARANTINE_SCHEMA = pa.schema(list(EVENT_SCHEMA) + list(QUARANTINE_EXTRA))

DATASET_SCHEMA_VERSION = 1
"""Bumped whenever the layout or the columns of a session dataset change."""

SPLITS = ("train", "valid", "test")


def empty_events() -> pa.Table:
    return EVENT_SCHEMA.empty_table()
