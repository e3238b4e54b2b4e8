"""Column conversions with no I/O: ids as text (or dictionary-encoded text), blanks as nulls, and picking out
the few values of a text column that a conversion rejects (:func:`convert_values`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.schema import ITEM_ID, SESSION_ID

ID_DICTIONARY = pa.dictionary(pa.int32(), pa.string())


def as_id(arr: pa.ChunkedArray | pa.Array, keep_dictionary: bool = False) -> pa.ChunkedArray | None:
    """Ids as strings: strings and integers convert, anything else (floats, nested, ...) is a wrong type."""
    typ = arr.type
    if pa.types.is_dictionary(typ) and keep_dictionary and pa.types.is_string(typ.value_type):
        return _blank_entries_to_null(chunked(arr).cast(ID_DICTIONARY))
    if pa.types.is_dictionary(typ):
        arr = arr.cast(typ.value_type)
        typ = arr.type
    if pa.types.is_string(typ):
        return _blanks_to_null(chunked(arr))
    if pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return _blanks_to_null(chunked(arr).cast(pa.string()))
    if pa.types.is_integer(typ) or pa.types.is_null(typ):
        return chunked(arr).cast(pa.string())
    return None


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


def decode_text(arr: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
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


def chunked(arr: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])


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
