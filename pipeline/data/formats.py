"""The click-log formats (see :mod:`pipeline.data.ingest`), their column names, and telling them apart.

A file's format comes from ``ingest.format`` or is detected from its name and first bytes
(:func:`detect_format`); a text file's head must be UTF-8 text, else the error says what it is instead.
"""

from __future__ import annotations

import codecs
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from pipeline import storage
from pipeline.data.schema import EVENT_SCHEMA, EVENT_TYPE, ITEM_ID, SESSION_ID, TIMESTAMP, USER_ID
from pipeline.errors import InputError


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

DIGINETICA_COLUMNS = {
    "session": ("session_id", "sessionId"),
    "user": ("user_id", "userId"),
    "item": ("item_id", "itemId"),
    "timeframe": ("timeframe",),
    "eventdate": ("eventdate", "eventDate"),
}

RSC15_LINE = re.compile(r"^[^,]+,\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?,[^,]+")

# Parquet key-value metadata that carries what a source format implies (written by imports and validation).
ORDERED_KEY = b"pipeline.ordered"

FORMAT_KEY = b"pipeline.format"

SNIFF_BYTES = 1 << 16


def base_name(uri: str) -> str:
    name = posixpath.basename(str(uri).rstrip("/")).lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_text(uri: str):
    fs, path = storage.resolve(uri)
    return fs.open_input_stream(path, compression="detect")


def sniff(uri: str) -> bytes:
    try:
        with open_text(uri) as stream:
            return stream.read(SNIFF_BYTES)
    except FileNotFoundError:
        raise InputError(f"file not found: {uri}") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{uri}: cannot read ({exc})") from None


def check_text(uri: str, head: bytes) -> str:
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


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip("\r").lstrip("\ufeff")


def _diginetica_header(cells: Sequence[str]) -> bool:
    return all(any(name in cells for name in names) for names in DIGINETICA_COLUMNS.values())


def detect_format(uri: str, head: bytes) -> str:
    """The format of a file from its name and first bytes (see the module docstring)."""
    if head.startswith(b"PAR1") or base_name(uri).endswith(PARQUET_SUFFIXES):
        return "parquet"
    line = first_line(check_text(uri, head))
    for delimiter in ("\t", ";", ","):
        cells = [c.strip() for c in line.split(delimiter)]
        if {"SessionId", "ItemId", "Time"} <= set(cells):
            return "gru4rec"
        if _diginetica_header(cells):
            return "diginetica"
    if RSC15_LINE.match(line) or base_name(uri).endswith(".dat"):
        return "rsc15"
    return "csv"
