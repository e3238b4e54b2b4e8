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
"""

from __future__ import annotations

import codecs
import datetime as dt
import logging
import posixpath
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import IngestConfig
from pipeline.errors import ConfigError, InputError
from pipeline.schema import EVENT_SCHEMA, EVENT_TYPE, ITEM_ID, SESSION_ID, TIMESTAMP, TIMESTAMP_TYPE, USER_ID

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    delimiter: str | None  # None: Parquet, or the generic CSV's configured/extension delimiter
    ordered: bool  # a session's rows appear in time order in the file, so the per-session order rule applies


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("gru4rec", "GRU4Rec TSV (SessionId, ItemId, Time in unix seconds)", "\t", True),
        Format("rsc15", "RecSys 2015 yoochoose-clicks.dat (session, ISO time, item, category; no header)", ",", True),
        # The Diginetica log lists a session's views in no particular order; its timestamps are authoritative.
        Format("diginetica", "Diginetica train-item-views.csv (session, user, item, timeframe, eventdate)", ";", False),
        Format("csv", "delimited text with a header; columns named by column_map", None, True),
        Format("parquet", "Parquet; columns named by column_map", None, True),
    )
}

CANONICAL_COLUMNS = tuple(EVENT_SCHEMA.names)
# Source names accepted for generic inputs when no column_map is given (first match wins).
ALIASES: dict[str, tuple[str, ...]] = {
    SESSION_ID: (SESSION_ID, "sessionId", "SessionId", "session"),
    ITEM_ID: (ITEM_ID, "itemId", "ItemId", "item"),
    TIMESTAMP: (TIMESTAMP, "Time", "time", "ts", "event_time", "eventTime"),
    USER_ID: (USER_ID, "userId", "UserId", "user", "visitorid"),
    EVENT_TYPE: (EVENT_TYPE, "eventType", "event"),
}
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
TIMESTAMP_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1}
DIGINETICA_COLUMNS = {
    "session": ("session_id", "sessionId"),
    "user": ("user_id", "userId"),
    "item": ("item_id", "itemId"),
    "timeframe": ("timeframe",),
    "eventdate": ("eventdate", "eventDate"),
}
RSC15_LINE = re.compile(r"^[^,]+,\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?,[^,]+")
PARTITION_DIR = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})(?=/)")
SNIFF_BYTES = 1 << 16
READ_THREADS = 4
_MAX_SECONDS = 9.0e12  # beyond this a unix-seconds value overflows int64 microseconds


@dataclass(frozen=True)
class SchemaProblem:
    """A column that is missing or of the wrong type in one file."""

    uri: str
    column: str  # canonical name
    rule: str  # "required_column" | "column_type"
    detail: str

    def message(self) -> str:
        return f"{self.uri}: column {self.column}: rule {self.rule}: {self.detail}"


@dataclass
class FileRead:
    """One file in canonical form (strict) or as close to it as its content allows (lenient)."""

    uri: str
    format: str
    table: pa.Table
    ordered: bool
    needs_sessions: bool = False  # user-only log: session ids still to be derived
    problems: list[SchemaProblem] = field(default_factory=list)


@dataclass(frozen=True)
class Batch:
    """A unit of validation: one ``dt=`` partition folder (all its files) or one stand-alone file."""

    name: str
    files: tuple[str, ...]
    partition_end: dt.datetime | None  # exclusive end of a dt= partition (its day + 1), else None


# ---------------------------------------------------------------------------------------------
# Progress: tqdm on a terminal, log lines otherwise


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on a TTY, or with one log line per item otherwise."""
    items = list(items) if total is None else items
    total = len(items) if total is None else total  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    for i, item in enumerate(items, 1):
        log.info("%s %d/%d", desc, i, total)
        yield item


# ---------------------------------------------------------------------------------------------
# Inputs, batches and format detection


def check_config(config: IngestConfig) -> None:
    if config.format is not None and config.format not in FORMATS:
        raise ConfigError(f"unknown input format {config.format!r}; known: {', '.join(FORMATS)}")
    unknown = sorted(set(config.column_map) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ConfigError(f"ingest.column_map: unknown canonical column(s) {unknown}; known: {list(CANONICAL_COLUMNS)}")
    if config.timestamp_unit not in TIMESTAMP_UNITS:
        raise ConfigError(f"ingest.timestamp_unit must be one of {list(TIMESTAMP_UNITS)}, got {config.timestamp_unit!r}")
    if config.session_gap_minutes <= 0:
        raise ConfigError("ingest.session_gap_minutes must be > 0")


def partition_end(uri: str) -> dt.datetime | None:
    """The exclusive end of the ``dt=YYYY-MM-DD`` partition holding ``uri`` (the next midnight, UTC)."""
    matches = list(PARTITION_DIR.finditer(str(uri)))
    if not matches:
        return None
    match = matches[-1]  # the innermost dt= folder wins
    try:
        day = dt.date.fromisoformat(match.group(1))
    except ValueError:
        return None
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def _partition_dir(uri: str) -> str | None:
    """The innermost ``dt=YYYY-MM-DD`` folder holding ``uri``, if any."""
    matches = list(PARTITION_DIR.finditer(str(uri)))
    return str(uri)[: matches[-1].end()] if matches else None


def plan_batches(inputs: Sequence[str]) -> list[Batch]:
    """Group input files into validation batches: one per ``dt=`` folder, one per other file."""
    groups: dict[str, list[str]] = {}
    for uri in storage.expand(inputs):
        groups.setdefault(_partition_dir(uri) or uri, []).append(uri)
    return [
        Batch(name=storage.basename(key), files=tuple(files), partition_end=partition_end(files[0]))
        for key, files in groups.items()
    ]


def _base_name(uri: str) -> str:
    name = posixpath.basename(str(uri).rstrip("/")).lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _open_text(uri: str):
    fs, path = storage.resolve(uri)
    return fs.open_input_stream(path, compression="detect")


def _sniff(uri: str) -> bytes:
    try:
        with _open_text(uri) as stream:
            return stream.read(SNIFF_BYTES)
    except FileNotFoundError:
        raise InputError(f"file not found: {uri}") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{uri}: cannot read ({exc})") from None


def _check_text(uri: str, head: bytes) -> str:
    """Decode the head of a text log, turning binary or non-UTF-8 content into a clear error."""
    if b"\x00" in head:
        raise InputError(f"{uri}: binary data (NUL bytes), not a text click log; is this the right file or format?")
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{uri}: not UTF-8 text (invalid byte 0x{head[exc.start]:02x} at offset {exc.start}); re-encode it as UTF-8"
        ) from None


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip("\r").lstrip("\ufeff")


def _diginetica_header(cells: Sequence[str]) -> bool:
    return all(any(name in cells for name in names) for names in DIGINETICA_COLUMNS.values())


def detect_format(uri: str, head: bytes) -> str:
    """The format of a file from its name and first bytes (see the module docstring)."""
    if head.startswith(b"PAR1") or _base_name(uri).endswith(PARQUET_SUFFIXES):
        return "parquet"
    line = _first_line(_check_text(uri, head))
    for delimiter in ("\t", ";", ","):
        cells = [c.strip() for c in line.split(delimiter)]
        if {"SessionId", "ItemId", "Time"} <= set(cells):
            return "gru4rec"
        if _diginetica_header(cells):
            return "diginetica"
    if RSC15_LINE.match(line) or _base_name(uri).endswith(".dat"):
        return "rsc15"
    return "csv"


# ---------------------------------------------------------------------------------------------
# Column conversions (lenient: None when a column cannot be converted)


ID_DICTIONARY = pa.dictionary(pa.int32(), pa.string())


def _as_id(arr: pa.ChunkedArray | pa.Array, keep_dictionary: bool = False) -> pa.ChunkedArray | None:
    """Ids as strings: strings and integers convert, anything else (floats, nested, ...) is a wrong type."""
    typ = arr.type
    if pa.types.is_dictionary(typ) and keep_dictionary and pa.types.is_string(typ.value_type):
        return arr.cast(ID_DICTIONARY)
    if pa.types.is_dictionary(typ):
        arr = arr.cast(typ.value_type)
        typ = arr.type
    if pa.types.is_string(typ):
        return arr
    if pa.types.is_large_string(typ) or pa.types.is_string_view(typ) or pa.types.is_integer(typ):
        return arr.cast(pa.string())
    if pa.types.is_null(typ):
        return arr.cast(pa.string())
    return None


def _numbers_to_timestamp(arr: pa.ChunkedArray, factor: int) -> pa.ChunkedArray:
    """Unix times in units of ``factor`` microseconds; non-finite or out-of-range values become null."""
    limit = _MAX_SECONDS * 1e6 / factor
    chunks = []
    for chunk in arr.chunks:
        valid = np.asarray(chunk.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_integer(chunk.type):
            ints = chunk.fill_null(0).to_numpy().astype(np.int64, copy=False)
            valid &= np.abs(ints) < limit
            micros = np.where(valid, ints, 0) * factor
        else:
            values = chunk.fill_null(0.0).to_numpy().astype(np.float64, copy=False)
            valid &= np.isfinite(values) & (np.abs(values) < limit)
            # round(), not truncation: 1396437466.94 s must become ...466940000 us, not ...466939999.
            micros = np.round(np.where(valid, values, 0.0) * factor).astype(np.int64)
        chunks.append(pa.array(micros, type=pa.int64(), mask=~valid).cast(TIMESTAMP_TYPE))
    return pa.chunked_array(chunks, type=TIMESTAMP_TYPE)


def _strings_to_timestamp(arr: pa.ChunkedArray) -> pa.ChunkedArray | None:
    try:
        return arr.cast(TIMESTAMP_TYPE)  # ISO 8601 with a zone (Z, +02:00)
    except pa.ArrowInvalid:
        pass
    try:
        return arr.cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE)  # no zone: taken as UTC
    except pa.ArrowInvalid:
        pass
    try:  # a mix of both
        zoned = pc.match_substring_regex(arr, r"(Z|[+-]\d\d:?\d\d)$")
        none = pa.scalar(None, pa.string())
        with_zone = pc.if_else(zoned, arr, none).cast(TIMESTAMP_TYPE)
        without = pc.if_else(zoned, none, arr).cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE)
        return pc.coalesce(with_zone, without)
    except pa.ArrowInvalid:
        return None


def _as_timestamp(arr: pa.ChunkedArray, unit: str) -> pa.ChunkedArray | None:
    typ = arr.type
    if pa.types.is_dictionary(typ):
        arr = arr.cast(typ.value_type)
        typ = arr.type
    if pa.types.is_timestamp(typ):
        # A zone is metadata on UTC values; a naive timestamp is taken as UTC. Sub-microseconds are cut.
        return arr.cast(pa.timestamp("us", tz=typ.tz), safe=False).cast(TIMESTAMP_TYPE)
    if pa.types.is_date(typ):
        return arr.cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE)
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        return _numbers_to_timestamp(arr, TIMESTAMP_UNITS[unit])
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return _strings_to_timestamp(arr)
    if pa.types.is_null(typ):
        return arr.cast(TIMESTAMP_TYPE)
    return None


def _nulls(n: int) -> pa.ChunkedArray:
    return pa.chunked_array([pa.nulls(n, pa.string())], type=pa.string())


def _chunked(arr: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])


def _assemble(
    uri: str,
    fmt: str,
    n: int,
    columns: dict[str, pa.ChunkedArray | None],
    problems: list[SchemaProblem],
    ordered: bool,
) -> FileRead:
    """Build the canonical table; a None column was missing or unconvertible (already in ``problems``)."""
    arrays, names = [], []
    needs_sessions = False
    if columns.get(SESSION_ID) is None and columns.get(USER_ID) is not None:
        # A user-only log: sessions are derived later (over all the rows read together).
        columns[SESSION_ID] = _nulls(n)
        needs_sessions = True
        problems[:] = [p for p in problems if p.column != SESSION_ID]
    for name in CANONICAL_COLUMNS:
        value = columns.get(name)
        if value is None:
            if name in (USER_ID, EVENT_TYPE) and not any(p.column == name for p in problems):
                value = _nulls(n)
            else:
                continue
        arrays.append(_chunked(value))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    target = _schema_like(table)
    if not problems and table.schema != target:
        table = table.cast(target)
    return FileRead(uri, fmt, table, ordered, needs_sessions, problems)


def _schema_like(table: pa.Table) -> pa.Schema:
    """The canonical schema, keeping dictionary-encoded id columns dictionary-encoded."""
    fields = []
    for f in EVENT_SCHEMA:
        if f.name in (SESSION_ID, ITEM_ID) and f.name in table.column_names:
            if pa.types.is_dictionary(table.schema.field(f.name).type):
                f = f.with_type(ID_DICTIONARY)
        fields.append(f)
    return pa.schema(fields)


def encode_ids(table: pa.Table) -> pa.Table:
    """The table with session_id and item_id dictionary-encoded (``dictionary<int32, string>``)."""
    for name in (SESSION_ID, ITEM_ID):
        if name in table.column_names and not pa.types.is_dictionary(table.schema.field(name).type):
            encoded = pc.dictionary_encode(table.column(name)).cast(ID_DICTIONARY)
            table = table.set_column(table.schema.get_field_index(name), name, encoded)
    return table


def decode_ids(table: pa.Table) -> pa.Table:
    """The table with dictionary-encoded id columns turned back into plain strings."""
    for name in (SESSION_ID, ITEM_ID):
        if name in table.column_names and pa.types.is_dictionary(table.schema.field(name).type):
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(pa.string()))
    return table


def _convert_id(
    uri: str,
    name: str,
    source: str,
    arr: pa.ChunkedArray | None,
    problems: list[SchemaProblem],
    keep_dictionary: bool = False,
):
    if arr is None:
        problems.append(SchemaProblem(uri, name, "required_column", f"source column {source!r} is missing"))
        return None
    out = _as_id(arr, keep_dictionary)
    if out is None:
        problems.append(SchemaProblem(uri, name, "column_type", f"{source!r} is {arr.type}, expected string or integer ids"))
        return arr  # left as found: the suite's type expectation reports it
    return out


def _convert_time(uri, source, arr, unit, problems: list[SchemaProblem]):
    if arr is None:
        problems.append(SchemaProblem(uri, TIMESTAMP, "required_column", f"source column {source!r} is missing"))
        return None
    out = _as_timestamp(arr, unit)
    if out is None:
        problems.append(
            SchemaProblem(uri, TIMESTAMP, "column_type", f"{source!r} is {arr.type} and does not parse as timestamps")
        )
        return arr
    return out


# ---------------------------------------------------------------------------------------------
# CSV reading with clear errors


def _csv_error(uri: str, fmt: str, exc: Exception) -> InputError:
    text = str(exc)
    if "UTF8" in text or "UTF-8" in text:
        return InputError(f"{uri}: not UTF-8 text ({text}); re-encode it as UTF-8")
    return InputError(f"{uri}: malformed {fmt} file ({text}); check the delimiter and the column count")


_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+)")


def _read_csv(
    uri: str,
    fmt: str,
    *,
    delimiter: str,
    header: list[str],
    has_header: bool,
    types: dict[str, pa.DataType],
    include: list[str],
    null_values: Sequence[str] = ("",),
    problems: list[SchemaProblem],
    canonical_of: dict[str, str],
) -> pa.Table:
    """Read a delimited file; a column whose values do not convert is re-read as text and noted as a problem."""
    types = dict(types)
    while True:
        read = pacsv.ReadOptions(
            column_names=None if has_header else header, block_size=16 << 20, use_threads=True
        )
        parse = pacsv.ParseOptions(delimiter=delimiter)
        convert = pacsv.ConvertOptions(
            column_types=types,
            include_columns=include or header[:1],  # [] would mean "all columns"
            null_values=list(null_values),
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        try:
            with _open_text(uri) as stream:
                return pacsv.read_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as exc:
            match = _CONVERSION.search(str(exc))
            if match and "UTF8" not in str(exc):
                source = header[int(match.group(1))] if int(match.group(1)) < len(header) else f"#{match.group(1)}"
                if types.get(source) not in (None, pa.string()):
                    canonical = canonical_of.get(source, source)
                    problems.append(
                        SchemaProblem(uri, canonical, "column_type", f"{source!r} holds values that are not {match.group(2)}: {exc}")
                    )
                    types[source] = pa.string()
                    continue
            raise _csv_error(uri, fmt, exc) from None
        except OSError as exc:
            raise InputError(f"{uri}: cannot read ({exc})") from None


def _header_cells(uri: str, fmt: str, line: str, delimiter: str, required: Sequence[Sequence[str]]) -> list[str]:
    """The header split by ``delimiter``; a header that only splits with another delimiter is a clear error."""
    cells = [c.strip().strip('"') for c in line.split(delimiter)]
    if all(any(name in cells for name in names) for names in required):
        return cells
    for other in ("\t", ";", ",", "|"):
        if other == delimiter:
            continue
        alt = [c.strip().strip('"') for c in line.split(other)]
        if len(alt) > 1 and all(any(name in alt for name in names) for names in required):
            raise InputError(
                f"{uri}: wrong delimiter for the {fmt} format: expected {delimiter!r}-separated columns but the "
                f"header is {other!r}-separated ({line[:120]!r})"
            )
    return cells


def _empty(uri: str, fmt: str, ordered: bool) -> FileRead:
    return FileRead(uri, fmt, EVENT_SCHEMA.empty_table(), ordered)


# ---------------------------------------------------------------------------------------------
# One reader per format


def _read_gru4rec(uri: str, head: str, config: IngestConfig) -> FileRead:
    fmt = FORMATS["gru4rec"]
    problems: list[SchemaProblem] = []
    cells = _header_cells(uri, fmt.name, _first_line(head), "\t", [["SessionId"], ["ItemId"], ["Time"]])
    include = [c for c in ("SessionId", "ItemId", "Time") if c in cells]
    table = _read_csv(
        uri, fmt.name, delimiter="\t", header=cells, has_header=True, include=include, problems=problems,
        types={"SessionId": pa.string(), "ItemId": pa.string(), "Time": pa.float64()},
        canonical_of={"SessionId": SESSION_ID, "ItemId": ITEM_ID, "Time": TIMESTAMP},
    )  # fmt: skip

    def get(name: str) -> pa.ChunkedArray | None:
        return table.column(name) if name in table.column_names else None

    columns = {
        SESSION_ID: _convert_id(uri, SESSION_ID, "SessionId", get("SessionId"), problems),
        ITEM_ID: _convert_id(uri, ITEM_ID, "ItemId", get("ItemId"), problems),
        TIMESTAMP: _convert_time(uri, "Time", get("Time"), "s", problems),
    }
    return _assemble(uri, fmt.name, table.num_rows, columns, problems, fmt.ordered)


def _read_rsc15(uri: str, head: str, config: IngestConfig) -> FileRead:
    fmt = FORMATS["rsc15"]
    line = _first_line(head)
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
    table = _read_csv(
        uri, fmt.name, delimiter=",", header=names, has_header=False, include=["session", "time", "item"],
        types={"session": pa.string(), "time": TIMESTAMP_TYPE, "item": pa.string()}, problems=problems,
        canonical_of={"session": SESSION_ID, "item": ITEM_ID, "time": TIMESTAMP},
    )  # fmt: skip
    columns = {
        SESSION_ID: _convert_id(uri, SESSION_ID, "session", table.column("session"), problems),
        ITEM_ID: _convert_id(uri, ITEM_ID, "item", table.column("item"), problems),
        TIMESTAMP: _convert_time(uri, "time", table.column("time"), "s", problems),
    }
    return _assemble(uri, fmt.name, table.num_rows, columns, problems, fmt.ordered)


def _read_diginetica(uri: str, head: str, config: IngestConfig) -> FileRead:
    fmt = FORMATS["diginetica"]
    cells = _header_cells(uri, fmt.name, _first_line(head), ";", list(DIGINETICA_COLUMNS.values()))
    src = {key: next((n for n in names if n in cells), None) for key, names in DIGINETICA_COLUMNS.items()}
    problems: list[SchemaProblem] = []
    types = {src["session"]: pa.string(), src["user"]: pa.string(), src["item"]: pa.string(),
             src["timeframe"]: pa.int64(), src["eventdate"]: pa.date32()}  # fmt: skip
    types = {k: v for k, v in types.items() if k is not None}
    table = _read_csv(
        uri, fmt.name, delimiter=";", header=cells, has_header=True, include=list(types), types=types,
        null_values=("", "NA"), problems=problems,
        canonical_of={src["session"]: SESSION_ID, src["item"]: ITEM_ID, src["user"]: USER_ID,
                      src["timeframe"]: TIMESTAMP, src["eventdate"]: TIMESTAMP},
    )  # fmt: skip

    def get(key: str) -> pa.ChunkedArray | None:
        return table.column(src[key]) if src[key] is not None else None

    columns: dict[str, Any] = {
        SESSION_ID: _convert_id(uri, SESSION_ID, "session_id", get("session"), problems),
        ITEM_ID: _convert_id(uri, ITEM_ID, "item_id", get("item"), problems),
        USER_ID: _as_id(get("user")) if get("user") is not None else None,
    }
    frame, date = get("timeframe"), get("eventdate")
    if frame is None or date is None:
        missing = "timeframe" if frame is None else "eventdate"
        problems.append(SchemaProblem(uri, TIMESTAMP, "required_column", f"source column {missing!r} is missing"))
        columns[TIMESTAMP] = None
    elif not pa.types.is_integer(frame.type) or not pa.types.is_date(date.type):
        bad = frame if not pa.types.is_integer(frame.type) else date
        columns[TIMESTAMP] = bad  # already noted by _read_csv; left as text for the type expectation
    else:
        midnight = date.cast(pa.timestamp("us")).cast(pa.int64())
        micros = pc.add(midnight, pc.multiply(frame, 1000))
        columns[TIMESTAMP] = micros.cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE)
    return _assemble(uri, fmt.name, table.num_rows, columns, problems, fmt.ordered)


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
    table: pa.Table,
    config: IngestConfig,
    problems: list[SchemaProblem],
    keep_dictionary: bool = False,
) -> FileRead:
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
        columns[name] = _convert_id(uri, name, src[name] or ALIASES[name][0], get(name), problems, keep)
    columns[TIMESTAMP] = _convert_time(uri, src[TIMESTAMP] or TIMESTAMP, get(TIMESTAMP), config.timestamp_unit, problems)
    for name in (USER_ID, EVENT_TYPE):
        arr = get(name)
        if arr is not None:
            converted = _as_id(arr)
            if converted is None:
                problems.append(SchemaProblem(uri, name, "column_type", f"{src[name]!r} is {arr.type}, expected text"))
            columns[name] = converted if converted is not None else arr
    return _assemble(uri, fmt, table.num_rows, columns, problems, FORMATS[fmt].ordered)


def _read_csv_generic(uri: str, head: str, config: IngestConfig) -> FileRead:
    name = _base_name(uri)
    delimiter = config.delimiter or ("\t" if name.endswith((".tsv", ".tab")) else ",")
    line = _first_line(head)
    mapped = [config.column_map[c] for c in (ITEM_ID, TIMESTAMP) if c in config.column_map]
    required = [[m] for m in mapped] or [list(ALIASES[ITEM_ID]), list(ALIASES[TIMESTAMP])]
    cells = _header_cells(uri, "csv", line, delimiter, required)
    src = _source_names(config, cells)
    include = [s for s in src.values() if s is not None and s in cells]
    # Ids are text whatever they look like (leading zeros matter); the timestamp's type is inferred.
    types = {src[n]: pa.string() for n in (SESSION_ID, ITEM_ID, USER_ID, EVENT_TYPE) if src[n] in cells}
    problems: list[SchemaProblem] = []
    table = _read_csv(
        uri, "csv", delimiter=delimiter, header=cells, has_header=True, include=include, types=types,
        problems=problems, canonical_of={v: k for k, v in src.items() if v is not None},
    )  # fmt: skip
    return _generic(uri, "csv", table, config, problems)


def _read_parquet(uri: str, config: IngestConfig, columns: Sequence[str] | None, dictionary_ids: bool) -> FileRead:
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
    return _generic(uri, "parquet", table, config, [], keep_dictionary=dictionary_ids)


READERS: dict[str, Callable[[str, str, IngestConfig], FileRead]] = {
    "gru4rec": _read_gru4rec,
    "rsc15": _read_rsc15,
    "diginetica": _read_diginetica,
    "csv": _read_csv_generic,
}


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
    check_config(config)
    try:
        file_size = storage.size(uri)
    except InputError:
        raise InputError(f"file not found: {uri}") from None
    fmt_name = config.format
    if file_size == 0:
        return _empty(uri, fmt_name or "csv", FORMATS[fmt_name or "csv"].ordered)
    head = b""
    if fmt_name is None and _base_name(uri).endswith(PARQUET_SUFFIXES):
        fmt_name = "parquet"
    elif fmt_name != "parquet":
        head = _sniff(uri)
        fmt_name = fmt_name or detect_format(uri, head)
    if fmt_name == "parquet":
        result = _read_parquet(uri, config, columns, dictionary_ids)
    else:
        if head.startswith(b"PAR1"):
            raise InputError(f"{uri}: this is a Parquet file, not {fmt_name}; use --format parquet")
        text = _check_text(uri, head)
        result = READERS[fmt_name](uri, text, config)
    if strict and result.problems:
        raise InputError(result.problems[0].message())
    if dictionary_ids and not result.problems:
        result.table = encode_ids(result.table)
    log.debug("read %s (%s): %d rows", uri, fmt_name, result.table.num_rows)
    return result


# ---------------------------------------------------------------------------------------------
# Sessionizing user-only logs


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


# ---------------------------------------------------------------------------------------------
# The public entry point


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
    check_config(config)
    files = storage.expand(inputs)
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
