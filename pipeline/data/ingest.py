"""Read click logs (local or ``s3://``; files or ``dt=YYYY-MM-DD/`` folders) into the canonical event schema.

Formats (``--format`` or detected from the extension and the first line):

``gru4rec``     the GRU4Rec TSV: header ``SessionId<TAB>ItemId<TAB>Time``, Time in unix seconds (float)
``rsc15``       RecSys Challenge 2015 ``yoochoose-clicks.dat``: no header; session, ISO-8601 time, item, category
``diginetica``  CIKM Cup 2016 ``train-item-views.csv``: ``;``-separated, snake_case or camelCase header;
                time = ``eventdate`` (UTC midnight) + ``timeframe`` (ms since the session started)
``csv``         any delimited text with a header; ``column_map`` names the source columns
``parquet``     any Parquet file; ``column_map`` names the source columns

Generic inputs use the canonical column names (or a few common aliases) unless ``column_map`` says otherwise;
numeric timestamps are read in ``timestamp_unit``. Logs with user ids but no session ids are sessionized by an
inactivity gap. Files may be gzip/bz2/zstd compressed (by extension).

Reading is strict by default: an unreadable file, a missing column or a column of the wrong type raises
:class:`~pipeline.errors.InputError` naming the file, the column and the rule. Validation reads leniently
(``strict=False``): readable files come back with the offending column missing or left in its source type, so
the Great Expectations suite reports the failure with everything else it checks.

Where: this module reads files and logs; :mod:`~pipeline.data.formats` tells formats apart,
:mod:`~pipeline.data.inputs` lists files and batches, :mod:`~pipeline.data.readers` has one reader per format,
:mod:`~pipeline.data.text` the line-by-line text reader, :mod:`~pipeline.data.times` and
:mod:`~pipeline.data.columns` the value conversions, :mod:`~pipeline.data.canonical` the result of a read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.config import IngestConfig
from pipeline.data.canonical import REJECT_SCHEMA, FileRead, empty_read
from pipeline.data.columns import decode_ids, encode_ids
from pipeline.data.formats import (
    CANONICAL_COLUMNS,
    FORMAT_KEY,
    FORMATS,
    ORDERED_KEY,
    PARQUET_SUFFIXES,
    base_name,
    check_text,
    detect_format,
    sniff,
)
from pipeline.data.inputs import list_inputs, plan_batches
from pipeline.data.progress import progress
from pipeline.data.readers import READERS, read_parquet
from pipeline.data.schema import EVENT_SCHEMA, SESSION_ID, TIMESTAMP, USER_ID
from pipeline.errors import ConfigError, InputError

# What other modules read through here: the entry points and the names of what they return or write.
__all__ = [
    "FORMAT_KEY",
    "ORDERED_KEY",
    "REJECT_SCHEMA",
    "FileRead",
    "decode_ids",
    "detect_format",
    "list_inputs",
    "plan_batches",
    "read_events",
    "read_file",
    "sessionize",
]

log = logging.getLogger(__name__)

READ_THREADS = 4


def read_file(
    uri: str,
    config: IngestConfig | None = None,
    *,
    strict: bool = True,
    columns: Sequence[str] | None = None,
    dictionary_ids: bool = False,
) -> FileRead:
    """Read one file into canonical events.

    ``strict``: raise :class:`InputError` for a missing column or a wrong type (naming file, column and rule);
    otherwise return them in ``problems`` with the column missing or left as found. Unreadable files
    (binary, non-UTF-8, truncated, wrong delimiter, malformed) always raise. ``columns`` limits what is read
    (Parquet only; a hint, the other formats read their few columns anyway). ``dictionary_ids`` returns
    session_id and item_id as ``dictionary<int32, string>`` (same values; straight from Parquet's dictionary
    pages where the file has them, which makes large builds cheaper).
    """
    config = config or IngestConfig()
    try:
        file_size = storage.size(uri)
    except InputError:
        raise InputError(f"file not found: {uri}") from None
    fmt_name = config.format
    if file_size == 0:
        return empty_read(uri, fmt_name or "csv", FORMATS[fmt_name or "csv"].ordered)
    head = b""
    if fmt_name is None and base_name(uri).endswith(PARQUET_SUFFIXES):
        fmt_name = "parquet"
    elif fmt_name != "parquet":
        head = sniff(uri)
        fmt_name = fmt_name or detect_format(uri, head)
    if fmt_name == "parquet":
        result = read_parquet(uri, config, columns, dictionary_ids)
    else:
        if head.startswith(b"PAR1"):
            raise InputError(f"{uri}: this is a Parquet file, not {fmt_name}; use --format parquet")
        text = check_text(uri, head)
        result = READERS[fmt_name](uri, text, config)
    if strict and result.problems:
        raise InputError(result.problems[0].message())
    if strict and result.rejected.num_rows:
        first = result.rejected.slice(0, 1).to_pylist()[0]
        where = f"line {first['line']}" if first["line"] is not None else f"row {first['row']}"
        raise InputError(
            f"{uri}: {where}: rule {first['reason']}: {first['raw']!r} ({result.rejected.num_rows} such row(s)); "
            f"`validate` quarantines bad lines and keeps the good ones: build from its output"
        )
    if dictionary_ids and not result.problems:
        result.table = encode_ids(result.table)
    log.debug("read %s (%s): %d rows", uri, fmt_name, result.table.num_rows)
    return result


def sessionize(table: pa.Table, gap_minutes: float) -> pa.Table:
    """Fill null session ids from user ids: a new session starts after ``gap_minutes`` of inactivity.

    The session id is ``"{user_id}@{start in unix microseconds}"``: unique, stable however the log is split
    into files, and readable. Rows without a user or a timestamp keep a null session id.
    """
    n = table.num_rows
    if n == 0:
        return table
    session = table.column(SESSION_ID)
    user = table.column(USER_ID)
    ts = table.column(TIMESTAMP)
    todo = pc.and_(pc.and_(pc.is_null(session), pc.is_valid(user)), pc.is_valid(ts))
    rows = np.flatnonzero(np.asarray(todo.to_numpy(zero_copy_only=False), dtype=bool))
    if rows.size == 0:
        return table
    sub = pa.table({"u": user.take(rows), "t": ts.take(rows).cast(pa.int64()), "p": pa.array(rows)})
    order = pc.sort_indices(sub, sort_keys=[("u", "ascending"), ("t", "ascending"), ("p", "ascending")])
    sub = sub.take(order)
    users = sub.column("u").combine_chunks()
    times = sub.column("t").to_numpy()
    gap = int(round(gap_minutes * 60 * 1_000_000))
    new = np.ones(len(times), dtype=bool)
    same_user = np.asarray(pc.equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False), dtype=bool)
    new[1:] = ~same_user | (np.diff(times) > gap)
    start = times[new][np.cumsum(new) - 1]
    ids = pc.binary_join_element_wise(users, pa.array(start).cast(pa.string()), "@")
    # Scatter the new ids back to their rows (index len(ids) points at a trailing null).
    where = np.full(n, len(ids), dtype=np.int64)
    where[sub.column("p").to_numpy()] = np.arange(len(ids))
    filled = pa.concat_arrays([ids, pa.nulls(1, pa.string())]).take(pa.array(where))
    merged = pc.coalesce(session.combine_chunks(), filled)
    return table.set_column(table.schema.get_field_index(SESSION_ID), SESSION_ID, merged)


def read_events(
    inputs: Sequence[str],
    config: IngestConfig | None = None,
    *,
    columns: Sequence[str] | None = None,
    dictionary_ids: bool = False,
) -> pa.Table:
    """Read click logs (files, folders, ``dt=`` partitions; local or S3) into one canonical table.

    Rows keep the order of the inputs (files sorted within a folder). User-only logs are sessionized over
    everything read. ``columns`` selects canonical columns (default: all of :data:`EVENT_SCHEMA`).
    ``dictionary_ids``: session_id and item_id as ``dictionary<int32, string>`` (chunks may carry different
    dictionaries).
    """
    config = config or IngestConfig()
    files, _ = list_inputs(inputs)
    tables, sessionize_needed = [], False

    def one(uri: str) -> FileRead:
        return read_file(uri, config, strict=True, columns=columns, dictionary_ids=dictionary_ids)

    # A few files at a time: decoding releases the GIL, and one file rarely keeps every core busy.
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(files)))) as pool:
        for result in progress(pool.map(one, files), "reading", total=len(files)):
            tables.append(result.table)
            sessionize_needed |= result.needs_sessions
    table = pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table()
    if sessionize_needed:
        table = sessionize(decode_ids(table), config.session_gap_minutes)
        if dictionary_ids:
            table = encode_ids(table)
    if columns is not None:
        unknown = [c for c in columns if c not in CANONICAL_COLUMNS]
        if unknown:
            raise ConfigError(f"unknown event column(s) {unknown}; known: {list(CANONICAL_COLUMNS)}")
        table = table.select(list(columns))
    return table
