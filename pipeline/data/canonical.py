"""One file's events in the canonical schema (:class:`FileRead`), with what kept them from it: schema problems
(a missing column, a wrong type) and the lines set aside while reading (:data:`REJECT_SCHEMA`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.data.columns import ID_DICTIONARY, as_id, chunked
from pipeline.data.formats import CANONICAL_COLUMNS
from pipeline.data.schema import EVENT_SCHEMA, EVENT_TYPE, ITEM_ID, SESSION_ID, TIMESTAMP, USER_ID
from pipeline.data.times import as_timestamp

REJECT_SCHEMA = pa.schema(
    [("row", pa.int64()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)


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


def _nulls(n: int) -> pa.ChunkedArray:
    return pa.chunked_array([pa.nulls(n, pa.string())], type=pa.string())


def assemble(
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
        arrays.append(chunked(value))
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


def convert_id(
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
    out = as_id(arr, keep_dictionary)
    if out is None:
        problems.append(SchemaProblem(uri, name, "column_type", f"{source!r} is {arr.type}, expected string or integer ids"))
        return arr  # left as found: the suite's type expectation reports it
    return out


def convert_time(uri, source, arr, unit, problems: list[SchemaProblem]):
    if arr is None:
        problems.append(SchemaProblem(uri, TIMESTAMP, "required_column", f"source column {source!r} is missing"))
        return None
    out = as_timestamp(arr, unit)
    if out is None:
        problems.append(
            SchemaProblem(uri, TIMESTAMP, "column_type", f"{source!r} is {arr.type} and does not parse as timestamps")
        )
        return arr
    return out


def empty_read(uri: str, fmt: str, ordered: bool) -> FileRead:
    return FileRead(uri, fmt, EVENT_SCHEMA.empty_table(), ordered)
