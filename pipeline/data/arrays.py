"""Integer-array helpers of the session build, with no I/O: dictionary codes of id columns, stable orderings
that are faster than ``np.argsort(kind="stable")`` where the keys allow it, runs and buckets of sessions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_I64 = np.iinfo(np.int64).max
MIN_I64 = np.iinfo(np.int64).min


def dictionary_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes of a string (or dictionary-encoded string) column and the dictionary they index."""
    if pa.types.is_dictionary(column.type):
        # Chunks read from different files carry different dictionaries: unify them (hashes only the
        # distinct values) and remap the indices.
        encoded = pa.table({"c": column}).unify_dictionaries().column("c")
    else:
        encoded = pc.dictionary_encode(column)  # chunks share one growing dictionary
    if encoded.num_chunks == 0:
        return np.zeros(0, dtype=np.int32), pa.array([], type=pa.string())
    dictionary = encoded.chunks[-1].dictionary.cast(pa.string())
    codes = np.concatenate([c.indices.to_numpy() for c in encoded.chunks]).astype(np.int32, copy=False)
    return codes, dictionary


def by_start_then_id(starts: np.ndarray, codes: np.ndarray, s_dict: pa.Array) -> np.ndarray:
    """The permutation ordering sessions by (start, session id). Ids (strings) are compared only where
    starts tie, which is rare: sorting every id would cost more than the rest of the ordering."""
    order = np.argsort(starts, kind="stable")
    s = starts[order]
    tie = np.zeros(len(s), dtype=bool)
    same = s[1:] == s[:-1]
    tie[1:] |= same
    tie[:-1] |= same
    if not tie.any():
        return order
    tied = order[tie]
    rank = np.zeros(len(starts), dtype=np.int64)
    rank[tied[pc.sort_indices(s_dict.take(pa.array(codes[tied]))).to_numpy()]] = np.arange(len(tied))
    return np.lexsort((rank, starts))


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative integer keys, several times faster: (key, row) pairs
    packed into one int64 are unique, so numpy's SIMD quicksort orders them as a stable sort would."""
    n = len(keys)
    shift = max(1, (n - 1).bit_length())
    if n == 0 or int(keys.max()) >= 1 << (63 - shift):
        return np.argsort(keys, kind="stable")
    packed = keys.astype(np.int64) << shift
    packed |= np.arange(n, dtype=np.int64)
    packed.sort()
    packed &= (1 << shift) - 1
    return packed


def block_order(keys: np.ndarray) -> np.ndarray | None:
    """For rows in blocks of equal ``keys`` (one block per key), the permutation that sorts the blocks by key,
    keeping each block's rows in order; None when they already are. O(rows) plus a sort of the blocks."""
    if len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()):
        return None
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    block_start = np.flatnonzero(first)
    order = np.argsort(keys[block_start], kind="stable")
    lengths = np.diff(np.append(block_start, len(keys)))
    starts, lengths = block_start[order], lengths[order]
    # The permutation is the blocks' row ranges end to end: a running sum of +1 steps that jumps to the
    # next block's first row where a block begins (one cumsum instead of materializing per-row offsets).
    steps = np.ones(len(keys), dtype=np.int64)
    steps[0] = starts[0]
    steps[np.cumsum(lengths[:-1])] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps, out=steps)


def run_ends(keys: np.ndarray) -> np.ndarray:
    """Indices of the last row of each run of equal consecutive keys."""
    return (
        np.flatnonzero(np.append(keys[1:] != keys[:-1], True)) if len(keys) else np.zeros(0, dtype=np.int64)
    )


def run_starts(keys: np.ndarray) -> np.ndarray:
    return (
        np.flatnonzero(np.insert(keys[1:] != keys[:-1], 0, True))
        if len(keys)
        else np.zeros(0, dtype=np.int64)
    )


def bucket_bounds(lengths: np.ndarray, max_rows: int) -> np.ndarray:
    """Cut consecutive sessions (their row counts in order) into buckets of about ``max_rows`` rows, never
    splitting a session: the first session index of each bucket plus the end (``len(lengths)``)."""
    before = np.cumsum(lengths) - lengths
    first = run_starts(before // max(1, max_rows)) if len(lengths) else np.zeros(1, dtype=np.int64)
    return np.append(first, len(lengths))


def bucket_of(bounds: np.ndarray) -> np.ndarray:
    """Bucket number of each session position, from the bounds of :func:`bucket_bounds`."""
    return (np.searchsorted(bounds, np.arange(int(bounds[-1])), side="right") - 1).astype(np.int32)
