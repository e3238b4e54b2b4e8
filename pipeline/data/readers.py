"""One reader per format: each turns one file into a :class:`~pipeline.data.canonical.FileRead`.

Text formats go through :mod:`pipeline.data.text` (bad lines set aside), Parquet is read column by column
(ids straight from its dictionary pages when asked). Generic inputs find their columns through
``column_map`` or the common aliases (:data:`~pipeline.data.formats.ALIASES`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import IngestConfig
from pipeline.data.canonical import FileRead, SchemaProblem, convert_id, convert_time
from pipeline.data.columns import as_id, chunked, convert_values
from pipeline.data.formats import (
    ALIASES,
    CANONICAL_COLUMNS,
    DIGINETICA_COLUMNS,
    FORMATS,
    ORDERED_KEY,
    RSC15_LINE,
    base_name,
    first_line,
)
from pipeline.data.schema import EVENT_TYPE, ITEM_ID, SESSION_ID, TIMESTAMP, TIMESTAMP_TYPE, USER_ID
from pipeline.data.text import Lines, finish_text, header_cells, read_csv, text_time_column
from pipeline.data.times import check_timestamp_unit
from pipeline.errors import InputError


def _read_gru4rec(uri: str, head: str, config: IngestConfig) -> FileRead:
    fmt = FORMATS["gru4rec"]
    problems: list[SchemaProblem] = []
    cells = header_cells(uri, fmt.name, first_line(head), "\t", [["SessionId"], ["ItemId"], ["Time"]])
    include = [c for c in ("SessionId", "ItemId", "Time") if c in cells]
    lines = read_csv(uri, fmt.name, delimiter="\t", header=cells, has_header=True, include=include)

    def get(name: str) -> pa.ChunkedArray | None:
        return lines.table.column(name) if name in lines.table.column_names else None

    columns = {
        SESSION_ID: convert_id(uri, SESSION_ID, "SessionId", get("SessionId"), problems),
        ITEM_ID: convert_id(uri, ITEM_ID, "ItemId", get("ItemId"), problems),
        TIMESTAMP: text_time_column(lines, uri, "Time", "s", False, problems) if get("Time") is not None
        else convert_time(uri, "Time", None, "s", problems),
    }
    return finish_text(lines, fmt.name, columns, problems, fmt.ordered)


def _read_rsc15(uri: str, head: str, config: IngestConfig) -> FileRead:
    fmt = FORMATS["rsc15"]
    line = first_line(head)
    width = len(line.split(","))
    if width < 3 or not RSC15_LINE.match(line):
        alt = max(("\t", ";", "|"), key=lambda d: len(line.split(d)))
        hint = f" (it looks {alt!r}-separated)" if len(line.split(alt)) >= 3 else ""
        raise InputError(
            f"{uri}: wrong delimiter or layout for the rsc15 format: expected comma-separated "
            f"session,ISO-8601 time,item[,category] without a header; first line {line[:120]!r}{hint}"
        )
    names = ["session", "time", "item"] + [f"extra{i}" for i in range(width - 3)]
    problems: list[SchemaProblem] = []
    lines = read_csv(
        uri, fmt.name, delimiter=",", header=names, has_header=False, include=["session", "time", "item"]
    )
    columns = {
        SESSION_ID: convert_id(uri, SESSION_ID, "session", lines.table.column("session"), problems),
        ITEM_ID: convert_id(uri, ITEM_ID, "item", lines.table.column("item"), problems),
        TIMESTAMP: text_time_column(lines, uri, "time", "s", True, problems),
    }
    return finish_text(lines, fmt.name, columns, problems, fmt.ordered)


def _diginetica_times(lines: Lines, uri: str, frame_col: str, date_col: str, problems: list[SchemaProblem]):
    """time = eventdate (UTC midnight) + timeframe (ms); a row whose date or frame does not parse is flagged."""
    frame, bad_frame = convert_values(lines.table.column(frame_col), lambda a: a.cast(pa.int64()), r"^-?\d+$")
    date, bad_date = convert_values(lines.table.column(date_col), lambda a: a.cast(pa.date32()), r"^\d{4}-\d{2}-\d{2}$")
    present = len(frame) - frame.null_count
    if present == 0 and (bad_frame.any() or bad_date.any()):
        problems.append(SchemaProblem(uri, TIMESTAMP, "column_type", f"{frame_col!r} / {date_col!r} hold no times"))
        return lines.table.column(frame_col)
    lines.flag("bad_timestamp", bad_frame | bad_date)
    midnight = date.cast(pa.timestamp("us")).cast(pa.int64())
    micros = pc.add(midnight, pc.multiply(frame, 1000))
    return chunked(micros.cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE))


def _read_diginetica(uri: str, head: str, config: IngestConfig) -> FileRead:
    fmt = FORMATS["diginetica"]
    cells = header_cells(uri, fmt.name, first_line(head), ";", list(DIGINETICA_COLUMNS.values()))
    src = {key: next((n for n in names if n in cells), None) for key, names in DIGINETICA_COLUMNS.items()}
    problems: list[SchemaProblem] = []
    include = [name for name in src.values() if name is not None]
    lines = read_csv(
        uri, fmt.name, delimiter=";", header=cells, has_header=True, include=include, null_values=("", "NA")
    )

    def get(key: str) -> pa.ChunkedArray | None:
        return lines.table.column(src[key]) if src[key] is not None else None

    columns: dict[str, Any] = {
        SESSION_ID: convert_id(uri, SESSION_ID, "session_id", get("session"), problems),
        ITEM_ID: convert_id(uri, ITEM_ID, "item_id", get("item"), problems),
        USER_ID: as_id(get("user")) if get("user") is not None else None,
    }
    if src["timeframe"] is None or src["eventdate"] is None:
        missing = "timeframe" if src["timeframe"] is None else "eventdate"
        problems.append(SchemaProblem(uri, TIMESTAMP, "required_column", f"source column {missing!r} is missing"))
        columns[TIMESTAMP] = None
    else:
        columns[TIMESTAMP] = _diginetica_times(lines, uri, src["timeframe"], src["eventdate"], problems)
    return finish_text(lines, fmt.name, columns, problems, fmt.ordered)


def _source_names(config: IngestConfig, available: Sequence[str]) -> dict[str, str | None]:
    """canonical name -> source column (``column_map`` first, then the aliases)."""
    out: dict[str, str | None] = {}
    for name in CANONICAL_COLUMNS:
        if name in config.column_map:
            out[name] = config.column_map[name]
        else:
            out[name] = next((a for a in ALIASES[name] if a in available), None)
    return out


def _generic(
    uri: str,
    fmt: str,
    lines: Lines,
    config: IngestConfig,
    problems: list[SchemaProblem],
    keep_dictionary: bool = False,
    ordered: bool | None = None,
) -> FileRead:
    table = lines.table
    src = _source_names(config, table.column_names)

    def get(name: str) -> pa.ChunkedArray | None:
        source = src[name]
        return table.column(source) if source is not None and source in table.column_names else None

    has_users = get(USER_ID) is not None
    columns: dict[str, Any] = {}
    for name in (SESSION_ID, ITEM_ID):
        if name == SESSION_ID and get(name) is None and has_users:
            columns[name] = None  # sessionized from user ids
            continue
        keep = keep_dictionary
        columns[name] = convert_id(uri, name, src[name] or ALIASES[name][0], get(name), problems, keep)
    time_source, times = src[TIMESTAMP] or TIMESTAMP, get(TIMESTAMP)
    if times is not None and (pa.types.is_string(times.type) or pa.types.is_large_string(times.type)):
        columns[TIMESTAMP] = text_time_column(lines, uri, time_source, config.timestamp_unit, None, problems)
    else:
        columns[TIMESTAMP] = convert_time(uri, time_source, times, config.timestamp_unit, problems)
        if times is not None and (pa.types.is_integer(times.type) or pa.types.is_floating(times.type)):
            check_timestamp_unit(uri, time_source, columns[TIMESTAMP], config.timestamp_unit, lambda: times)
    for name in (USER_ID, EVENT_TYPE):
        arr = get(name)
        if arr is not None:
            converted = as_id(arr)
            if converted is None:
                problems.append(SchemaProblem(uri, name, "column_type", f"{src[name]!r} is {arr.type}, expected text"))
            columns[name] = converted if converted is not None else arr
    return finish_text(lines, fmt, columns, problems, FORMATS[fmt].ordered if ordered is None else ordered)


def _read_csv_generic(uri: str, head: str, config: IngestConfig) -> FileRead:
    name = base_name(uri)
    delimiter = config.delimiter or ("\t" if name.endswith((".tsv", ".tab")) else ",")
    line = first_line(head)
    mapped = [config.column_map[c] for c in (ITEM_ID, TIMESTAMP) if c in config.column_map]
    required = [[m] for m in mapped] or [list(ALIASES[ITEM_ID]), list(ALIASES[TIMESTAMP])]
    cells = header_cells(uri, "csv", line, delimiter, required)
    src = _source_names(config, cells)
    include = [s for s in src.values() if s is not None and s in cells]
    # Everything is read as text (ids keep leading zeros); times are parsed per value, numbers or ISO-8601.
    lines = read_csv(uri, "csv", delimiter=delimiter, header=cells, has_header=True, include=include)
    return _generic(uri, "csv", lines, config, [])


def read_parquet(uri: str, config: IngestConfig, columns: Sequence[str] | None, dictionary_ids: bool) -> FileRead:
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            available = parquet.schema_arrow.names
            src = _source_names(config, available)
            wanted = [name for name in (columns or CANONICAL_COLUMNS)]
            if SESSION_ID in wanted and src[SESSION_ID] not in available and USER_ID not in wanted:
                wanted.append(USER_ID)  # a user-only log needs its users to be sessionized
            read = [src[n] for n in wanted if src[n] is not None and src[n] in available]
            schema = parquet.schema_arrow
            # Ids straight from the Parquet dictionary pages: no string materialization, no re-hashing.
            as_dictionary = [
                c
                for c in (src[SESSION_ID], src[ITEM_ID])
                if dictionary_ids and c in read and pa.types.is_string(schema.field(c).type)
            ]
            if as_dictionary:
                handle.seek(0)
                parquet = pq.ParquetFile(handle, read_dictionary=as_dictionary)
            table = parquet.read(columns=read, use_threads=True)
    except FileNotFoundError:
        raise InputError(f"file not found: {uri}") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{uri}: not a readable Parquet file (truncated or corrupt?): {exc}") from None
    # What the source format implies travels with imported data (e.g. Diginetica rows are not time-ordered).
    flag = (schema.metadata or {}).get(ORDERED_KEY)
    ordered = None if flag is None else flag == b"true"
    lines = Lines(uri, table, table, ",", None, np.arange(table.num_rows), [])
    return _generic(uri, "parquet", lines, config, [], keep_dictionary=dictionary_ids, ordered=ordered)


READERS: dict[str, Callable[[str, str, IngestConfig], FileRead]] = {
    "gru4rec": _read_gru4rec,
    "rsc15": _read_rsc15,
    "diginetica": _read_diginetica,
    "csv": _read_csv_generic,
}
