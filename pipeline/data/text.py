"""Delimited text, line by line: a bad line is set aside with its reason, the good lines go on.

Arrow's CSV reader does the splitting (its invalid-row handler catches lines with the wrong column count);
cells are read as bytes so a rejected line's raw text can be rebuilt. Reasons, in the order a line's first
reason is picked: :data:`LINE_REASONS`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.data.canonical import REJECT_SCHEMA, FileRead, SchemaProblem, assemble
from pipeline.data.columns import decode_text
from pipeline.data.formats import open_text
from pipeline.data.schema import TIMESTAMP
from pipeline.data.times import check_timestamp_unit, text_times
from pipeline.errors import InputError

# Why a line was taken out while reading (the quarantine ``reason``), in the order a line's first reason is picked.
LINE_REASONS = ("malformed_row", "repeated_header", "bad_encoding", "bad_timestamp")
MAX_RAW_CHARS = 500  # raw text kept per rejected line


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
class Lines:
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
        with open_text(uri) as stream:
            return pacsv.read_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise _csv_error(uri, fmt, exc) from None
    except OSError as exc:
        raise InputError(f"{uri}: cannot read ({exc})") from None


def read_csv(
    uri: str,
    fmt: str,
    *,
    delimiter: str,
    header: list[str],
    has_header: bool,
    include: Sequence[str],
    null_values: Sequence[str] = ("",),
) -> Lines:
    """Read the ``include`` columns of a delimited file as text, setting bad lines aside.

    A line with too few or too many columns is ``malformed_row`` (Arrow's invalid-row handler); a line that
    repeats the header is ``repeated_header``; a cell that is not UTF-8 makes its line ``bad_encoding``.
    Converting values (times, numbers) is the caller's, per value, with :func:`convert_values`.
    """
    include = list(include) or header[:1]  # [] would mean "all columns"
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
        text, bad_cells = decode_text(cells.column(name))
        decode_bad |= bad_cells
        table[name] = _as_null(text, null_values)
    lines = Lines(uri, pa.table(table), cells, delimiter, first_line, rows, malformed)
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


def text_time_column(
    lines: Lines, uri: str, source: str, unit: str, iso: bool | None, problems: list[SchemaProblem]
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


def finish_text(
    lines: Lines, fmt: str, columns: dict[str, Any], problems: list[SchemaProblem], ordered: bool
) -> FileRead:
    """Take the flagged rows out of ``columns`` into the rejected lines, then assemble the canonical table."""
    n = lines.table.num_rows
    reason = np.full(n, -1, dtype=np.int8)
    for code, name in reversed(list(enumerate(LINE_REASONS))):  # the first reason in LINE_REASONS wins
        if name in lines.flags:
            reason[lines.flags[name]] = code
    bad = reason >= 0
    rejected_rows: list[tuple[int, int | None, str, str]] = [
        (row, line, LINE_REASONS[0], text) for row, line, text in lines.malformed
    ]
    if bad.any():
        picked = np.flatnonzero(bad)
        raw = _raw_lines(lines.cells.take(pa.array(picked)), lines.delimiter)
        for row, code, text in zip(lines.rows[picked], reason[picked], raw, strict=True):
            line = None if lines.first_line is None else int(row) + lines.first_line
            rejected_rows.append((int(row), line, LINE_REASONS[code], text))
        keep = pa.array(~bad)
        columns = {k: (v.filter(keep) if v is not None else None) for k, v in columns.items()}
        n -= len(picked)
    result = assemble(lines.uri, fmt, n, columns, problems, ordered)
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


def header_cells(uri: str, fmt: str, line: str, delimiter: str, required: Sequence[Sequence[str]]) -> list[str]:
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
