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
import threading
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
from pipeline.data.schema import (
    EVENT_SCHEMA,
    EVENT_TYPE,
    ITEM_ID,
    SESSION_ID,
    TIMESTAMP,
    TIMESTAMP_TYPE,
    USER_ID,
)
from pipeline.errors import ConfigError, InputError

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
# In folders only files with these names are read (compressed or not); others are skipped and reported.
DATA_SUFFIXES = (".tsv", ".tab", ".csv", ".dat") + PARQUET_SUFFIXES
# Why a line was taken out while reading (the quarantine ``reason``), in the order a line's first reason is picked.
LINE_REASONS = ("malformed_row", "repeated_header", "bad_encoding", "bad_timestamp")
REJECT_SCHEMA = pa.schema(
    [("row", pa.int64()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)
MAX_RAW_CHARS = 500  # raw text kept per rejected line
# Parquet key-value metadata that carries what a source format implies (written by imports and validation).
ORDERED_KEY = b"pipeline.ordered"
FORMAT_KEY = b"pipeline.format"
SNIFF_BYTES = 1 << 16
READ_THREADS = 4
_MAX_SECONDS = 9.0e12  # beyond this a unix-seconds value overflows int64 microseconds: clipped to it
_IMPLAUSIBLE_SECONDS = 1.0e11  # after year 5138: a file mostly beyond this is in a finer unit than configured
NUMBER_TEXT = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
ISO_TEXT = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"


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
    # Lines taken out while reading (malformed, repeated header, not UTF-8, unparseable time): REJECT_SCHEMA.
    rejected: pa.Table = field(default_factory=lambda: REJECT_SCHEMA.empty_table())
    # Each table row's data-row number in the file (0-based, rejected lines counted); None: 0, 1, 2, ...
    source_rows: np.ndarray | None = None
    first_line: int | None = None  # text files: the line number (1-based) of data row 0

    def row_numbers(self) -> np.ndarray:
        return self.source_rows if self.source_rows is not None else np.arange(self.table.num_rows, dtype=np.int64)

    @property
    def rows_in(self) -> int:
        """Every data row of the file: the ones read and the ones rejected."""
        return self.table.num_rows + self.rejected.num_rows


@dataclass(frozen=True)
class Batch:
    """A unit of validation: one ``dt=`` partition folder (all its files) or one stand-alone file."""

    name: str
    files: tuple[str, ...]
    partition_end: dt.datetime | None  # exclusive end of a dt= partition (its day + 1), else None
    skipped: tuple[str, ...] = ()  # files of the folder that are not data (README.txt, .crc, _SUCCESS, ...)


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


def is_data_file(name: str) -> bool:
    """A file a folder's listing reads: a known data extension (README.txt, .crc, .json, ... are not)."""
    return _base_name(name).endswith(DATA_SUFFIXES)


def list_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(data files, skipped files)`` of the inputs: folders give their data files (see :func:`is_data_file`;
    hidden and ``_`` names are skipped too), a file named directly is always read."""
    skipped: list[str] = []
    files = storage.expand(inputs, accept=is_data_file, skipped=skipped)
    if skipped:
        log.info("skipped %d file(s) that are not data: %s", len(skipped), ", ".join(skipped[:5]))
    return files, skipped


def plan_batches(inputs: Sequence[str]) -> list[Batch]:
    """Group input files into validation batches: one per ``dt=`` folder, one per other file."""
    files, skipped = list_inputs(inputs)
    groups: dict[str, list[str]] = {}
    for uri in files:
        groups.setdefault(_partition_dir(uri) or uri, []).append(uri)
    # A skipped file is reported with the batch of its dt= folder, else with the first batch of its folder.
    owner = {key: key for key in groups}
    for key in groups:
        owner.setdefault(storage.parent(key), key)
    passed_over: dict[str, list[str]] = {}
    first = next(iter(groups), None)
    for uri in skipped:
        key = owner.get(_partition_dir(uri) or storage.parent(uri), first)
        if key is not None:
            passed_over.setdefault(key, []).append(uri)
    return [
        Batch(
            name=storage.basename(key),
            files=tuple(files),
            partition_end=partition_end(files[0]),
            skipped=tuple(passed_over.get(key, ())),
        )
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
        if b"\n" in head[: exc.start]:  # a bad byte in a data line: that line is quarantined (bad_encoding)
            return head.decode("utf-8", "replace")
        raise InputError(
            f"{uri}: not UTF-8 text (invalid byte 0x{head[exc.start]:02x} at offset {exc.start} of the first "
            f"line); re-encode it as UTF-8"
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
        return _blank_entries_to_null(_chunked(arr).cast(ID_DICTIONARY))
    if pa.types.is_dictionary(typ):
        arr = arr.cast(typ.value_type)
        typ = arr.type
    if pa.types.is_string(typ):
        return _blanks_to_null(_chunked(arr))
    if pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return _blanks_to_null(_chunked(arr).cast(pa.string()))
    if pa.types.is_integer(typ) or pa.types.is_null(typ):
        return _chunked(arr).cast(pa.string())
    return None


def _numbers_to_timestamp(arr: pa.ChunkedArray, factor: int) -> pa.ChunkedArray:
    """Unix times in units of ``factor`` microseconds; NaN becomes null.

    Values beyond what microseconds can hold (a year past ~285,000) are clipped to that bound, so the
    validation's ``timestamp_window`` rule quarantines them like any other time outside the window.
    """
    limit = _MAX_SECONDS * 1e6 / factor
    chunks = []
    for chunk in arr.chunks:
        valid = np.asarray(chunk.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_integer(chunk.type):
            ints = chunk.fill_null(0).to_numpy().astype(np.int64, copy=False)
            micros = np.clip(ints, -limit, limit).astype(np.int64) * factor
        else:
            values = chunk.fill_null(0.0).to_numpy().astype(np.float64, copy=False)
            valid &= ~np.isnan(values)
            # round(), not truncation: 1396437466.94 s must become ...466940000 us, not ...466939999.
            micros = np.round(np.clip(np.where(valid, values, 0.0), -limit, limit) * factor).astype(np.int64)
        chunks.append(pa.array(micros, type=pa.int64(), mask=~valid).cast(TIMESTAMP_TYPE))
    return pa.chunked_array(chunks, type=TIMESTAMP_TYPE)


def check_timestamp_unit(
    uri: str, source: str, times: pa.ChunkedArray, unit: str, numbers: Callable[[], pa.ChunkedArray]
) -> None:
    """A clear error when most numeric times of a file lie after year 5000: they are in a finer unit than
    ``ingest.timestamp_unit`` (milliseconds read as seconds, ...). A few such rows are left to the window rule.
    ``numbers``: the source numbers (asked for only then: ``times`` are clipped at the int64 range)."""
    micros = times.cast(pa.int64()).drop_null().to_numpy()
    if micros.size == 0:
        return
    share = float(np.mean(np.abs(micros.astype(np.float64)) / 1e6 > _IMPLAUSIBLE_SECONDS))
    if share <= 0.5:
        return
    factor = TIMESTAMP_UNITS[unit]
    values = numbers().cast(pa.float64()).drop_null().to_numpy()
    typical = float(np.median(np.abs(values))) * factor / 1e6  # in seconds, as read
    finer = [u for u, f in TIMESTAMP_UNITS.items() if f < factor and typical * f / factor < _IMPLAUSIBLE_SECONDS]
    guess = finer[0] if finer else None
    hint = f"they look like {guess!r}: set ingest.timestamp_unit={guess}" if guess else (
        "no supported unit (s, ms, us) makes them plausible: convert them to one of those")
    raise InputError(
        f"{uri}: column {source!r}: {share:.0%} of the timestamps are after year 5000 when read as "
        f"ingest.timestamp_unit={unit!r}; {hint}"
        + (f" (e.g. --set ingest.timestamp_unit={guess})" if guess else "")
    )


_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError)


def _failing(arr: pa.Array, convert: Callable[[pa.Array], Any], offset: int = 0) -> list[int]:
    """Positions of the values that make ``convert`` fail, found by halving (cheap for a few bad values)."""
    try:
        convert(arr)
        return []
    except _CONVERSION_ERRORS:
        if len(arr) <= 1:
            return [offset] if len(arr) else []
    mid = len(arr) // 2
    return _failing(arr.slice(0, mid), convert, offset) + _failing(arr.slice(mid), convert, offset + mid)


def convert_values(
    arr: pa.ChunkedArray, convert: Callable[[pa.Array], Any], pattern: str | None = None
) -> tuple[pa.Array, np.ndarray]:
    """``convert`` a text column with the values it cannot convert set to null: ``(converted, bad mask)``.

    The whole column is tried first; when that fails, values not matching ``pattern`` are set aside, and the
    few that still fail are found by halving. Arrow does every conversion; this only isolates bad values.
    """
    whole = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    bad = np.zeros(len(whole), dtype=bool)
    try:
        return convert(whole), bad
    except _CONVERSION_ERRORS:
        pass
    if pattern is not None:
        ok = pc.fill_null(pc.match_substring_regex(whole, pattern), True)
        bad |= ~np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        whole = pc.if_else(pa.array(bad), pa.scalar(None, whole.type), whole)
    for i in _failing(whole, convert):
        bad[i] = True
    if bad.any():
        whole = pc.if_else(pa.array(bad), pa.scalar(None, whole.type), whole)
    return convert(whole), bad


def _decode(arr: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Binary cells as UTF-8 text: ``(strings, bad mask)``; a value that is not UTF-8 becomes null."""
    try:
        return arr.cast(pa.string()), np.zeros(len(arr), dtype=bool)
    except pa.ArrowInvalid:
        pass
    values = arr.to_pylist()  # rare path (a file with bad bytes): one Python pass finds them
    bad = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
                values[i] = None
    return pa.chunked_array([pa.array(values, type=pa.binary()).cast(pa.string())]), bad


def _blanks_to_null(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """Empty and whitespace-only strings as null: an id made of nothing is a missing id."""
    if len(arr) == 0:
        return arr
    blank = pc.or_(pc.utf8_is_space(arr), pc.equal(pc.binary_length(arr), 0))
    if not pc.any(blank).as_py():
        return arr
    return pc.if_else(blank, pa.scalar(None, arr.type), arr)


def _blank_entries_to_null(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """:func:`_blanks_to_null` for dictionary-encoded ids: only the (small) dictionaries are looked at."""
    chunks = []
    for chunk in arr.chunks:
        blank = _blanks_to_null(pa.chunked_array([chunk.dictionary])).is_null().to_numpy(zero_copy_only=False)
        if blank.any():
            codes = pa.array(np.flatnonzero(blank), type=chunk.indices.type)
            gone = pc.is_in(chunk.indices, value_set=codes)
            indices = pc.if_else(gone, pa.scalar(None, chunk.indices.type), chunk.indices)
            chunk = pa.DictionaryArray.from_arrays(indices, chunk.dictionary)
        chunks.append(chunk)
    return pa.chunked_array(chunks, type=arr.type)


def _strings_to_timestamp(arr: pa.Array) -> pa.Array | None:
    """ISO-8601 text as timestamps: with a zone (Z, +02:00), without (taken as UTC), or a mix; None if any
    value does not parse (see :func:`convert_values` for picking those out)."""
    try:
        return _iso_times(arr)
    except pa.ArrowInvalid:
        return None


def _iso_times(arr: pa.Array) -> pa.Array:
    try:
        return arr.cast(TIMESTAMP_TYPE)  # ISO 8601 with a zone (Z, +02:00)
    except pa.ArrowInvalid:
        pass
    try:
        return arr.cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE)  # no zone: taken as UTC
    except pa.ArrowInvalid:
        pass
    zoned = pc.match_substring_regex(arr, r"(Z|[+-]\d\d:?\d\d)$")  # a mix of both
    none = pa.scalar(None, arr.type)
    with_zone = pc.if_else(zoned, arr, none).cast(TIMESTAMP_TYPE)
    without = pc.if_else(zoned, none, arr).cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE)
    return pc.coalesce(with_zone, without)


def text_times(
    arr: pa.ChunkedArray, unit: str, iso: bool | None
) -> tuple[pa.ChunkedArray, np.ndarray, bool] | None:
    """Timestamps from text, per value: ``(times, bad mask, whether ISO-8601)``; None when no value parses.

    ``iso``: True for ISO-8601 text, False for numbers in ``unit`` (``s``, ``ms``, ``us``), None for whichever
    most values are (guessed from the first values, checked on all). A value of the other kind, or one that
    does not parse, is null and flagged bad.
    """
    def numbers(a: pa.Array) -> pa.ChunkedArray:
        return _numbers_to_timestamp(pa.chunked_array([a.cast(pa.float64())]), TIMESTAMP_UNITS[unit])

    def parse(as_iso: bool) -> tuple[pa.Array, np.ndarray]:
        return convert_values(whole, _iso_times if as_iso else numbers, ISO_TEXT if as_iso else NUMBER_TEXT)

    whole = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    present = len(whole) - whole.null_count
    guessed = iso is None
    if guessed:  # a failing cast of a whole column costs as much as a good one: guess the kind first
        head = whole.drop_null().slice(0, 1000)
        iso = 2 * (pc.sum(pc.match_substring_regex(head, NUMBER_TEXT)).as_py() or 0) <= len(head)
    times, bad = parse(iso)
    if guessed and 2 * int(bad.sum()) > present:  # the first values were not typical: try the other kind
        other, other_bad = parse(not iso)
        if other_bad.sum() < bad.sum():
            times, bad, iso = other, other_bad, not iso
    if present and int(bad.sum()) == present:
        return None
    return _chunked(times).cast(TIMESTAMP_TYPE), bad, iso


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
# Delimited text, line by line: a bad line is set aside with its reason, the good lines go on


class _MalformedLines:
    """Arrow's invalid-row handler: keeps the lines that do not split into the expected columns (it may be
    called from Arrow's reader threads, hence the lock)."""

    def __init__(self) -> None:
        self.lines: list[tuple[int | None, str]] = []
        self._lock = threading.Lock()

    def __call__(self, row: Any) -> str:
        with self._lock:
            self.lines.append((row.number, row.text[:MAX_RAW_CHARS]))
        return "skip"


@dataclass
class _Lines:
    """A delimited file read as text: the rows that split into the expected columns, and what was set aside."""

    uri: str
    table: pa.Table  # the included columns as UTF-8 strings (a cell that is not UTF-8: null, flagged)
    cells: pa.Table  # the same cells as read (bytes), for the raw text of a rejected row
    delimiter: str
    first_line: int | None  # physical line number (1-based) of the first data row; None: not a text file
    rows: np.ndarray  # each table row's data-row number (0-based, malformed lines counted)
    malformed: list[tuple[int, int, str]]  # (data row, line, raw text)
    flags: dict[str, np.ndarray] = field(default_factory=dict)  # reason -> mask over the table's rows

    def flag(self, reason: str, mask: np.ndarray) -> None:
        if mask.any():
            self.flags[reason] = self.flags.get(reason, np.zeros(len(mask), dtype=bool)) | mask


def _csv_error(uri: str, fmt: str, exc: Exception) -> InputError:
    return InputError(f"{uri}: malformed {fmt} file ({exc}); check the delimiter and the column count")


def _parse_csv(uri: str, fmt: str, read: Any, parse: Any, convert: Any) -> pa.Table:
    try:
        with _open_text(uri) as stream:
            return pacsv.read_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise _csv_error(uri, fmt, exc) from None
    except OSError as exc:
        raise InputError(f"{uri}: cannot read ({exc})") from None


def _read_csv(
    uri: str,
    fmt: str,
    *,
    delimiter: str,
    header: list[str],
    has_header: bool,
    include: list[str],
    null_values: Sequence[str] = ("",),
) -> _Lines:
    """Read the ``include`` columns of a delimited file as text, setting bad lines aside.

    A line with too few or too many columns is ``malformed_row`` (Arrow's invalid-row handler); a line that
    repeats the header is ``repeated_header``; a cell that is not UTF-8 makes its line ``bad_encoding``.
    Converting values (times, numbers) is the caller's, per value, with :func:`convert_values`.
    """
    include = include or header[:1]  # [] would mean "all columns"
    # Cells stay exactly as written (a rejected line's raw text is rebuilt from them); null_values apply after.
    convert = pacsv.ConvertOptions(
        column_types={name: pa.binary() for name in include}, include_columns=include, null_values=[]
    )
    first_line = 2 if has_header else 1
    for threads in (True, False):
        bad = _MalformedLines()
        read = pacsv.ReadOptions(column_names=None if has_header else header, block_size=16 << 20, use_threads=threads)
        parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=bad)
        cells = _parse_csv(uri, fmt, read, parse, convert)
        if all(number is not None for number, _ in bad.lines):
            break  # Arrow's threaded reader does not number bad lines: read again in one thread to number them
    if cells.num_rows == 0 and bad.lines:
        raise InputError(
            f"{uri}: malformed {fmt} file: no line has the {len(header)} columns of "
            f"{'the header' if has_header else 'the format'} (first line {bad.lines[0][1][:120]!r}); "
            f"check the delimiter and the format"
        )
    # Arrow numbers lines without the blank ones it skips: a malformed line's data-row number is its number
    # less the header's, and line numbers here (``source_line``) count non-blank lines.
    numbered = sorted((int(number), text) for number, text in bad.lines)  # type: ignore[arg-type]
    n = cells.num_rows + len(numbered)
    malformed = [(line - first_line, line, text) for line, text in numbered]
    rows = np.delete(np.arange(n, dtype=np.int64), [m[0] for m in malformed]) if malformed else np.arange(n)
    table, decode_bad = {}, np.zeros(cells.num_rows, dtype=bool)
    for name in cells.column_names:
        text, bad_cells = _decode(cells.column(name))
        decode_bad |= bad_cells
        table[name] = _as_null(text, null_values)
    lines = _Lines(uri, pa.table(table), cells, delimiter, first_line, rows, malformed)
    if has_header and cells.num_rows:
        repeated = np.ones(cells.num_rows, dtype=bool)
        for name in cells.column_names:
            same = pc.fill_null(pc.equal(cells.column(name), pa.scalar(name.encode(), pa.binary())), False)
            repeated &= np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
        lines.flag("repeated_header", repeated)
    lines.flag("bad_encoding", decode_bad)
    return lines


def _as_null(arr: pa.ChunkedArray, null_values: Sequence[str]) -> pa.ChunkedArray:
    """Cells spelled as one of ``null_values`` become null."""
    if list(null_values) == [""]:
        missing = pc.equal(pc.binary_length(arr), 0)  # the common case, cheaper than a set lookup
    else:
        missing = pc.is_in(arr, value_set=pa.array(list(null_values), pa.string()))
    if not pc.any(missing).as_py():
        return arr
    return pc.if_else(missing, pa.scalar(None, arr.type), arr)


def _text_time_column(
    lines: _Lines, uri: str, source: str, unit: str, iso: bool | None, problems: list[SchemaProblem]
) -> pa.ChunkedArray | None:
    """The timestamp column of a text file, per value (bad ones flagged ``bad_timestamp``); a column where no
    value is a time is a whole-file ``column_type`` problem (it is not this format's time column at all)."""
    arr = lines.table.column(source)
    parsed = text_times(arr, unit, iso)
    if parsed is None:
        kind = "ISO-8601 times" if iso else f"numbers (unix time in {unit!r})" if iso is False else "times"
        sample = arr.drop_null()[0].as_py() if arr.null_count < len(arr) else None
        problems.append(
            SchemaProblem(uri, TIMESTAMP, "column_type", f"{source!r} holds no {kind}, e.g. {sample!r}")
        )
        return arr
    times, bad, as_iso = parsed
    if not as_iso:  # numbers: a file of milliseconds read as seconds is an error
        check_timestamp_unit(uri, source, times, unit, lambda: pc.if_else(pa.array(bad), None, arr))
    lines.flag("bad_timestamp", bad & ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool))
    return times


def _finish_text(
    lines: _Lines, fmt: str, columns: dict[str, Any], problems: list[SchemaProblem], ordered: bool
) -> FileRead:
    """Take the flagged rows out of ``columns`` into the rejected lines, then assemble the canonical table."""
    n = lines.table.num_rows
    reason = np.full(n, -1, dtype=np.int8)
    for code, name in reversed(list(enumerate(LINE_REASONS))):  # the first reason in LINE_REASONS wins
        if name in lines.flags:
            reason[lines.flags[name]] = code
    bad = reason >= 0
    rejected_rows = [(row, line, LINE_REASONS[0], text) for row, line, text in lines.malformed]
    if bad.any():
        picked = np.flatnonzero(bad)
        raw = _raw_lines(lines.cells.take(pa.array(picked)), lines.delimiter)
        for row, code, text in zip(lines.rows[picked], reason[picked], raw, strict=True):
            line = None if lines.first_line is None else int(row) + lines.first_line
            rejected_rows.append((int(row), line, LINE_REASONS[code], text))
        keep = pa.array(~bad)
        columns = {k: (v.filter(keep) if v is not None else None) for k, v in columns.items()}
        n -= len(picked)
    result = _assemble(lines.uri, fmt, n, columns, problems, ordered)
    result.source_rows = lines.rows[~bad] if (bad.any() or lines.malformed) else None
    result.first_line = lines.first_line
    if rejected_rows:
        rejected_rows.sort()
        result.rejected = pa.table(list(zip(*rejected_rows, strict=True)), schema=REJECT_SCHEMA)
    return result


def _raw_lines(cells: pa.Table, delimiter: str) -> list[str]:
    """The cells of a few rows joined back into text (bytes that are not UTF-8 shown as ``\\xNN``)."""

    def text(value: Any) -> str:
        if value is None:
            return ""
        return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)

    columns = [cells.column(i).to_pylist() for i in range(cells.num_columns)]
    return [delimiter.join(map(text, values))[:MAX_RAW_CHARS] for values in zip(*columns, strict=True)]


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
    lines = _read_csv(uri, fmt.name, delimiter="\t", header=cells, has_header=True, include=include)

    def get(name: str) -> pa.ChunkedArray | None:
        return lines.table.column(name) if name in lines.table.column_names else None

    columns = {
        SESSION_ID: _convert_id(uri, SESSION_ID, "SessionId", get("SessionId"), problems),
        ITEM_ID: _convert_id(uri, ITEM_ID, "ItemId", get("ItemId"), problems),
        TIMESTAMP: _text_time_column(lines, uri, "Time", "s", False, problems) if get("Time") is not None
        else _convert_time(uri, "Time", None, "s", problems),
    }
    return _finish_text(lines, fmt.name, columns, problems, fmt.ordered)


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
    lines = _read_csv(
        uri, fmt.name, delimiter=",", header=names, has_header=False, include=["session", "time", "item"]
    )
    columns = {
        SESSION_ID: _convert_id(uri, SESSION_ID, "session", lines.table.column("session"), problems),
        ITEM_ID: _convert_id(uri, ITEM_ID, "item", lines.table.column("item"), problems),
        TIMESTAMP: _text_time_column(lines, uri, "time", "s", True, problems),
    }
    return _finish_text(lines, fmt.name, columns, problems, fmt.ordered)


def _diginetica_times(lines: _Lines, uri: str, frame_col: str, date_col: str, problems: list[SchemaProblem]):
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
    return _chunked(micros.cast(pa.timestamp("us")).cast(TIMESTAMP_TYPE))


def _read_diginetica(uri: str, head: str, config: IngestConfig) -> FileRead:
    fmt = FORMATS["diginetica"]
    cells = _header_cells(uri, fmt.name, _first_line(head), ";", list(DIGINETICA_COLUMNS.values()))
    src = {key: next((n for n in names if n in cells), None) for key, names in DIGINETICA_COLUMNS.items()}
    problems: list[SchemaProblem] = []
    include = [name for name in src.values() if name is not None]
    lines = _read_csv(
        uri, fmt.name, delimiter=";", header=cells, has_header=True, include=include, null_values=("", "NA")
    )

    def get(key: str) -> pa.ChunkedArray | None:
        return lines.table.column(src[key]) if src[key] is not None else None

    columns: dict[str, Any] = {
        SESSION_ID: _convert_id(uri, SESSION_ID, "session_id", get("session"), problems),
        ITEM_ID: _convert_id(uri, ITEM_ID, "item_id", get("item"), problems),
        USER_ID: _as_id(get("user")) if get("user") is not None else None,
    }
    if src["timeframe"] is None or src["eventdate"] is None:
        missing = "timeframe" if src["timeframe"] is None else "eventdate"
        problems.append(SchemaProblem(uri, TIMESTAMP, "required_column", f"source column {missing!r} is missing"))
        columns[TIMESTAMP] = None
    else:
        columns[TIMESTAMP] = _diginetica_times(lines, uri, src["timeframe"], src["eventdate"], problems)
    return _finish_text(lines, fmt.name, columns, problems, fmt.ordered)


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
    lines: _Lines,
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
        columns[name] = _convert_id(uri, name, src[name] or ALIASES[name][0], get(name), problems, keep)
    time_source, times = src[TIMESTAMP] or TIMESTAMP, get(TIMESTAMP)
    if times is not None and (pa.types.is_string(times.type) or pa.types.is_large_string(times.type)):
        columns[TIMESTAMP] = _text_time_column(lines, uri, time_source, config.timestamp_unit, None, problems)
    else:
        columns[TIMESTAMP] = _convert_time(uri, time_source, times, config.timestamp_unit, problems)
        if times is not None and (pa.types.is_integer(times.type) or pa.types.is_floating(times.type)):
            check_timestamp_unit(uri, time_source, columns[TIMESTAMP], config.timestamp_unit, lambda: times)
    for name in (USER_ID, EVENT_TYPE):
        arr = get(name)
        if arr is not None:
            converted = _as_id(arr)
            if converted is None:
                problems.append(SchemaProblem(uri, name, "column_type", f"{src[name]!r} is {arr.type}, expected text"))
            columns[name] = converted if converted is not None else arr
    return _finish_text(lines, fmt, columns, problems, FORMATS[fmt].ordered if ordered is None else ordered)


def _read_csv_generic(uri: str, head: str, config: IngestConfig) -> FileRead:
    name = _base_name(uri)
    delimiter = config.delimiter or ("\t" if name.endswith((".tsv", ".tab")) else ",")
    line = _first_line(head)
    mapped = [config.column_map[c] for c in (ITEM_ID, TIMESTAMP) if c in config.column_map]
    required = [[m] for m in mapped] or [list(ALIASES[ITEM_ID]), list(ALIASES[TIMESTAMP])]
    cells = _header_cells(uri, "csv", line, delimiter, required)
    src = _source_names(config, cells)
    include = [s for s in src.values() if s is not None and s in cells]
    # Everything is read as text (ids keep leading zeros); times are parsed per value, numbers or ISO-8601.
    lines = _read_csv(uri, "csv", delimiter=delimiter, header=cells, has_header=True, include=include)
    return _generic(uri, "csv", lines, config, [])


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
    # What the source format implies travels with imported data (e.g. Diginetica rows are not time-ordered).
    flag = (schema.metadata or {}).get(ORDERED_KEY)
    ordered = None if flag is None else flag == b"true"
    lines = _Lines(uri, table, table, ",", None, np.arange(table.num_rows), [])
    return _generic(uri, "parquet", lines, config, [], keep_dictionary=dictionary_ids, ordered=ordered)


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
