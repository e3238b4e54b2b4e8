"""The session build over one scan, one bucket of whole sessions at a time (see :mod:`pipeline.data.sessions`
for the rules). Each step of :class:`Build` is a pass over the buckets, several at once on threads."""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from pipeline.config import BuildConfig
from pipeline.data.arrays import (
    MAX_I64,
    MIN_I64,
    block_order,
    bucket_bounds,
    bucket_of,
    by_start_then_id,
    run_ends,
    run_starts,
    stable_argsort,
)
from pipeline.data.buckets import Rows, Scan, distribute, gather
from pipeline.data.manifest import ROW_GROUP
from pipeline.data.schema import ITEMS_SCHEMA, SPLIT_SCHEMA, SPLITS, TIMESTAMP_TYPE
from pipeline.data.session_rules import SESSION_RULES, SessionRules, quarantine_table, rule_bits, rule_counts
from pipeline.data.spill import ArrayStore
from pipeline.errors import InputError

DAY_US = 86_400 * 1_000_000
TRAIN, VALID, TEST = 0, 1, 2  # split codes of rows (-1: dropped)
T = TypeVar("T")


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")


class Build:
    """The build over one scan. Each step is a pass over the buckets; buckets hold whole sessions and are
    independent, so a pass works on ``threads`` of them at once (numpy and Arrow release the GIL) and the
    main thread combines their results in bucket order."""

    def __init__(
        self,
        scan: Scan,
        store: ArrayStore,
        config: BuildConfig,
        max_rows: int,
        threads: int,
        rules: SessionRules | None = None,
    ) -> None:
        self.scan, self.store, self.config, self.threads = scan, store, config, threads
        self.rules = rules or SessionRules()
        present = np.flatnonzero(scan.lengths > 0)
        # Sessions by rank: everything per session below is indexed by rank in (start, id) order.
        self.code_of_rank = present[by_start_then_id(scan.starts[present], present, scan.s_dict)].astype(
            np.int32
        )
        rank_of_code = np.full(len(scan.s_dict), -1, dtype=np.int32)
        rank_of_code[self.code_of_rank] = np.arange(len(present), dtype=np.int32)
        self.lengths = scan.lengths[self.code_of_rank]
        self.multi_part = scan.parts[self.code_of_rank] > 1
        self.supports = scan.supports.copy()
        self.n_sessions, self.n_items = len(present), len(scan.i_dict)
        self.stats: dict[str, Any] = {
            "input": {"events": scan.rows, "sessions": len(present), "items": int(np.count_nonzero(scan.supports))},
            "dropped": {"repeats": 0, "short_sessions": 0, "rare_items": 0},
            "quarantined": {"events": 0, **{rule: 0 for rule in SESSION_RULES}},
        }  # fmt: skip
        # The threads share the budget, and there are at least as many buckets as threads.
        per_thread = -(-scan.rows // threads)
        self.budget_limited = max_rows // threads < per_thread  # buckets smaller than the work per thread
        self.bucket_rows = max(1, min(max_rows // threads, per_thread))
        self.bounds = bucket_bounds(self.lengths, self.bucket_rows)
        self.n_buckets, self.n_parts = len(self.bounds) - 1, len(scan.s_luts)

        def part_rows(k: int) -> Callable[[Rows], Rows]:
            def rows(p: Rows) -> Rows:
                return {"r": rank_of_code[scan.s_luts[k][p["s"]]], "i": scan.i_luts[k][p["i"]], "t": p["t"]}

            return rows

        # Each part's rows go to their sessions' buckets, in input order.
        distribute(
            store, [(f"p{k}", part_rows(k)) for k in range(self.n_parts)], bucket_of(self.bounds), "b"
        )

    def _map(self, fn: Callable[[int], T], n: int | None = None) -> Iterator[T]:
        """``fn(b)`` for buckets 0..n-1 (default: all), ``threads`` at a time; results in bucket order."""
        n = self.n_buckets if n is None else n
        if self.threads == 1 or n == 1:
            yield from map(fn, range(n))
            return
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending: deque[Future[T]] = deque()
            for b in range(n):
                pending.append(pool.submit(fn, b))
                if len(pending) == self.threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _rows(self, b: int) -> Rows:
        return self.store.get(f"o{b}")

    def _kept(self, rows: Rows) -> np.ndarray:
        return ~self.session_out[rows["r"]] & ~self.item_out[rows["i"]]

    def order(self) -> None:
        """Quarantine rows breaking the whole-session rules; sort each bucket into (rank, time, input order);
        drop consecutive repeats if asked."""
        rules = self.rules
        too_long = None
        if rules.max_session_length is not None:
            too_long = self.lengths > rules.max_session_length  # every event of the session, over the window

        def one(b: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
            rows = gather(self.store, f"b{b}", self.n_parts)
            r, i, t = rows["r"], rows["i"], rows["t"]
            del rows
            in_time_order = len(t) < 2 or bool((t[1:] >= t[:-1]).all())
            quarantined = (r[:0], i[:0])
            if rules.active:
                why = rule_bits(rules, self.multi_part, r, t, too_long, in_time_order)
                if why.any():
                    out = why > 0
                    self.store.put(f"q{b}", r=r[out], i=i[out], t=t[out], why=why[out])
                    quarantined = (r[out], i[out])
                    r, i, t = r[~out], i[~out], t[~out]
            if in_time_order:
                # Time-ordered input: one stable sort by session keeps each session's rows in time order.
                perm = stable_argsort(r - int(self.bounds[b]))
            else:
                perm = np.lexsort((t, r))  # lexsort is stable: equal times keep input order
            r, i, t = r[perm], i[perm], t[perm]
            del perm
            dropped = (r[:0], i[:0])
            if self.config.drop_repeats and len(r) > 1:
                repeat = np.zeros(len(r), dtype=bool)
                repeat[1:] = (r[1:] == r[:-1]) & (i[1:] == i[:-1])
                if repeat.any():
                    dropped = (r[repeat], i[repeat])
                    r, i, t = r[~repeat], i[~repeat], t[~repeat]
            self.store.put(f"o{b}", r=r, i=i, t=t)
            return dropped, quarantined

        repeats = 0
        for (r, i), (qr, qi) in self._map(one):
            for rs, items in ((r, i), (qr, qi)):
                self.lengths -= np.bincount(rs, minlength=self.n_sessions)
                self.supports -= np.bincount(items, minlength=self.n_items)
            repeats += len(r)
            self.stats["quarantined"]["events"] += len(qr)
        self.stats["dropped"]["repeats"] = repeats

    def quarantine(self) -> pa.Table | None:
        """The quarantined rows (bucket by bucket, input order within each) with their rules, counted in the
        statistics; None when there are none."""
        pieces = [q for b in range(self.n_buckets) if (q := self.store.pop(f"q{b}")) is not None]
        if not pieces:
            return None
        r, i, t, why = (np.concatenate([p[k] for p in pieces]) for k in ("r", "i", "t", "why"))
        self.stats["quarantined"].update(rule_counts(why))
        session_ids = self.scan.s_dict.take(pa.array(self.code_of_rank[r]))
        return quarantine_table(session_ids, self.scan.i_dict.take(pa.array(i)), t, why)

    def _count(self, session_sel: np.ndarray, item_sel: np.ndarray, by: str) -> np.ndarray:
        """Rows whose session and item are selected, counted per session (``by="r"``) or item (``"i"``)."""
        size = self.n_sessions if by == "r" else self.n_items

        def one(b: int) -> np.ndarray:
            rows = self._rows(b)
            return rows[by][session_sel[rows["r"]] & item_sel[rows["i"]]]

        counts = np.zeros(size, dtype=np.int64)
        for hits in self._map(one):
            counts += np.bincount(hits, minlength=size)
        return counts

    def filter(self) -> None:
        """Drop short sessions and rare items until stable. A row is kept while neither its session nor its
        item is dropped, so only these two flags (and the counts) are state; a pass counts what a step drops."""
        config, dropped = self.config, self.stats["dropped"]
        self.session_out = np.zeros(self.n_sessions, dtype=bool)
        self.item_out = np.zeros(self.n_items, dtype=bool)
        iterations = 0
        while config.min_session_length or config.min_item_support:
            iterations += 1
            changed = False
            if config.min_session_length:
                short = (self.lengths > 0) & (self.lengths < config.min_session_length)
                if short.any():
                    dropped["short_sessions"] += int(self.lengths[short].sum())
                    self.lengths[short] = 0
                    self.session_out |= short
                    self.supports -= self._count(short, ~self.item_out, "i")
                    changed = True
            if config.min_item_support:
                rare = (self.supports > 0) & (self.supports < config.min_item_support)
                if rare.any():
                    dropped["rare_items"] += int(self.supports[rare].sum())
                    self.supports[rare] = 0
                    self.item_out |= rare
                    self.lengths -= self._count(~self.session_out, rare, "r")
                    changed = True
            if not changed:
                break
        self.stats["filter_iterations"] = iterations
        if not self.lengths.any():
            raise InputError(
                f"no events left after filtering (min_session_length={config.min_session_length}, "
                f"min_item_support={config.min_item_support}); lower the thresholds or give more data"
            )
        self.stats["after_filtering"] = {
            "events": int(self.lengths.sum()),
            "sessions": int(np.count_nonzero(self.lengths)),
            "items": int(np.count_nonzero(self.supports)),
        }

    def split(self) -> None:
        """Test / valid / train by each session's last kept event."""
        config = self.config
        ends = np.full(self.n_sessions, MIN_I64, dtype=np.int64)

        def one(b: int) -> None:
            rows = self._rows(b)
            keep = self._kept(rows)
            r, t = rows["r"][keep], rows["t"][keep]
            last = run_ends(r)  # rows are in (session, time) order: a session's last row is its end
            ends[r[last]] = t[last]  # buckets write disjoint sessions

        for _ in self._map(one):
            pass
        alive = self.lengths > 0
        tmax = int(ends[alive].max())
        test_start = tmax - int(round(config.test_days * DAY_US)) if config.test_days > 0 else None
        test = (
            alive & (ends >= test_start) if test_start is not None else np.zeros(self.n_sessions, dtype=bool)
        )
        valid_start = None
        valid = np.zeros(self.n_sessions, dtype=bool)
        if config.valid_days > 0 and (alive & ~test).any():
            valid_start = int(ends[alive & ~test].max()) - int(round(config.valid_days * DAY_US))
            valid = alive & ~test & (ends >= valid_start)
        if not (alive & ~test & ~valid).any():
            raise InputError(
                f"the train split is empty: every session ends within the last {config.test_days} + "
                f"{config.valid_days} days; use shorter windows or more days of data"
            )
        self.split_of = np.where(test, TEST, np.where(valid, VALID, TRAIN)).astype(np.int8)
        self.stats["split_times"] = {
            "latest_event": _iso(tmax), "test_start": _iso(test_start), "valid_start": _iso(valid_start)
        }  # fmt: skip

    def index_items(self) -> None:
        """Dense item index in order of first appearance in train; popularity counts."""
        first_seen = np.full(self.n_items, MAX_I64, dtype=np.int64)
        counts = np.zeros(self.n_items, dtype=np.int64)
        offset = 0

        def one(b: int) -> np.ndarray:
            rows = self._rows(b)
            return rows["i"][self._kept(rows) & (self.split_of[rows["r"]] == TRAIN)]

        for items in self._map(one):
            np.minimum.at(first_seen, items, np.arange(offset, offset + len(items), dtype=np.int64))
            counts += np.bincount(items, minlength=self.n_items)
            offset += len(items)
        seen = np.flatnonzero(first_seen < MAX_I64)
        self.by_appearance = seen[np.argsort(first_seen[seen], kind="stable")]
        self.item_idx = np.full(self.n_items, -1, dtype=np.int32)
        self.item_idx[self.by_appearance] = np.arange(len(self.by_appearance), dtype=np.int32)
        self.item_counts = counts[self.by_appearance]

    def finalize(self) -> None:
        """Each row's final split (held-out rows: train items only, sessions of >= 2 of them) and the output
        order of the sessions (by the start of their final rows, then id)."""
        final_start = np.full(self.n_sessions, MAX_I64, dtype=np.int64)
        final_length = np.zeros(self.n_sessions, dtype=np.int64)

        def one(b: int) -> dict[str, int]:
            rows = self._rows(b)
            r, i = rows["r"], rows["i"]
            split = np.where(self._kept(rows), self.split_of[r], np.int8(-1))
            held = split > TRAIN
            known = held & (self.item_idx[i] >= 0)
            lo, hi = int(self.bounds[b]), int(self.bounds[b + 1])
            known_len = np.bincount(r[known] - lo, minlength=hi - lo)
            final = known & (known_len[r - lo] >= 2)
            counts = {}
            for code, name in ((VALID, "valid"), (TEST, "test")):
                in_split = split == code
                counts[f"{name}_unknown_items"] = int((in_split & ~known).sum())
                counts[f"{name}_short_sessions"] = int((in_split & known & ~final).sum())
            split[held & ~final] = -1
            out = split >= 0
            rs, ts = r[out], rows["t"][out]
            first = run_starts(rs)  # rows are in (session, time) order; buckets write disjoint sessions
            final_start[rs[first]] = ts[first]
            final_length[lo:hi] = np.bincount(rs - lo, minlength=hi - lo)
            self.store.put(f"o{b}", r=rs, i=i[out], t=ts)
            return counts

        dropped = self.stats["dropped"]
        for name in ("valid", "test"):
            dropped[f"{name}_unknown_items"] = dropped[f"{name}_short_sessions"] = 0
        for counts in self._map(one):
            for key, value in counts.items():
                dropped[key] += value
        # Output rank: train sessions, then valid, then test, each by (final start, id).
        self.out_rank = np.full(self.n_sessions, -1, dtype=np.int32)
        self.split_bounds = [0]
        for code in (TRAIN, VALID, TEST):
            members = np.flatnonzero((self.split_of == code) & (final_length > 0))
            order = members[
                by_start_then_id(final_start[members], self.code_of_rank[members], self.scan.s_dict)
            ]
            base = self.split_bounds[-1]
            self.out_rank[order] = np.arange(base, base + len(order), dtype=np.int32)
            self.split_bounds.append(base + len(order))
        self.out_lengths = np.zeros(self.split_bounds[-1], dtype=np.int64)
        alive = self.out_rank >= 0
        self.out_lengths[self.out_rank[alive]] = final_length[alive]

    def output(self) -> Iterator[tuple[str, pa.Table]]:
        """The final rows as ``(split, table)`` chunks of at most ``ROW_GROUP`` rows, in split order and, within
        a split, in output order; fills the per-split statistics on the way."""
        bounds = bucket_bounds(self.out_lengths, self.bucket_rows)
        # finalize() left only rows of output sessions, so every r here has an output rank.
        bucket_of_r = bucket_of(bounds)[np.maximum(self.out_rank, 0)]
        distribute(
            self.store, [(f"o{b}", lambda rows: rows) for b in range(self.n_buckets)], bucket_of_r, "w"
        )
        split_bounds = np.array(self.split_bounds[1:-1])
        items_seen = np.zeros((len(SPLITS), self.n_items), dtype=bool)
        times = np.array([[MAX_I64, MIN_I64]] * len(SPLITS), dtype=np.int64)

        def one(w: int) -> tuple[Rows, list[int]]:
            rows = gather(self.store, f"w{w}", self.n_buckets)
            key = self.out_rank[rows["r"]]
            perm = block_order(key)  # a session whose first rows were dropped may start later: move it
            if perm is not None:
                rows, key = {name: a[perm] for name, a in rows.items()}, key[perm]
            return rows, [0, *np.searchsorted(key, split_bounds).tolist(), len(key)]

        # Buckets are ordered on the threads; their rows become Arrow tables one row group at a time here.
        for rows, cuts in self._map(one, len(bounds) - 1):
            r, i, t = rows["r"], rows["i"], rows["t"]
            for code in range(len(SPLITS)):
                for lo in range(cuts[code], cuts[code + 1], ROW_GROUP):
                    chunk = slice(lo, min(lo + ROW_GROUP, cuts[code + 1]))
                    items_seen[code, i[chunk]] = True
                    times[code] = (
                        min(times[code, 0], int(t[chunk][0])),
                        max(times[code, 1], int(t[chunk].max())),
                    )
                    yield (
                        SPLITS[code],
                        pa.table(
                            [
                                self.scan.s_dict.take(pa.array(self.code_of_rank[r[chunk]])),
                                self.scan.i_dict.take(pa.array(i[chunk])),
                                pa.array(t[chunk]).cast(TIMESTAMP_TYPE),
                                pa.array(self.item_idx[i[chunk]]),
                            ],
                            schema=SPLIT_SCHEMA,
                        ),
                    )
            del rows, r, i, t
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise
        for code, name in enumerate(SPLITS):
            lo, hi = self.split_bounds[code], self.split_bounds[code + 1]
            self.stats[name] = {
                "events": int(self.out_lengths[lo:hi].sum()),
                "sessions": hi - lo,
                "items": int(items_seen[code].sum()),
                "start": None if lo == hi else _iso(int(times[code, 0])),
                "end": None if lo == hi else _iso(int(times[code, 1])),
            }

    def items(self) -> pa.Table:
        return pa.table(
            [
                pa.array(np.arange(len(self.by_appearance), dtype=np.int32)),
                self.scan.i_dict.take(pa.array(self.by_appearance)),
                pa.array(self.item_counts),
            ],
            schema=ITEMS_SCHEMA,
        )
