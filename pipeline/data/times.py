"""Timestamps from what logs hold: unix numbers in a configured unit, ISO-8601 text (with or without a zone),
Arrow timestamps and dates; and the check that catches a whole file read in the wrong unit."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.columns import chunked, convert_values
from pipeline.data.schema import TIMESTAMP_TYPE
from pipeline.errors import InputError

TIMESTAMP_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1}
_MAX_SECONDS = 9.0e12  # beyond this a unix-seconds value overflows int64 microseconds: clipped to it
_IMPLAUSIBLE_SECONDS = 1.0e11  # after year 5138: a file mostly beyond this is in a finer unit than configured
NUMBER_TEXT = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
ISO_TEXT = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"


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
    if iso is None:  # a failing cast of a whole column costs as much as a good one: guess the kind first
        head = whole.drop_null().slice(0, 1000)
        iso = 2 * (pc.sum(pc.match_substring_regex(head, NUMBER_TEXT)).as_py() or 0) <= len(head)
    times, bad = parse(iso)
    if guessed and 2 * int(bad.sum()) > present:  # the first values were not typical: try the other kind
        other, other_bad = parse(not iso)
        if other_bad.sum() < bad.sum():
            times, bad, iso = other, other_bad, not iso
    if present and int(bad.sum()) == present:
        return None
    return chunked(times).cast(TIMESTAMP_TYPE), bad, iso


def as_timestamp(arr: pa.ChunkedArray, unit: str) -> pa.ChunkedArray | None:
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
