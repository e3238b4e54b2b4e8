"""Build Parquet session datasets: order, filter, split in time, index items, commit atomically.

``build_dataset(inputs, out_dir)`` writes (see docs/architecture.md)::

    DIR/train/part-<hash>.parquet   session_id, item_id, timestamp, item_idx
    DIR/valid/part-<hash>.parquet   same columns; only train items; sessions of >= 2 events
    DIR/test/part-<hash>.parquet    same columns; only train items; sessions of >= 2 events
    DIR/items/part-<hash>.parquet   item_idx, item_id, count (train popularity)
    DIR/manifest.json               written last: files, counts, time ranges, config, schema version, fingerprint

Data files are named by their content (the first 16 hex digits of their SHA-256), so a published file never
changes: a reader that follows the manifest sees one complete version even while a newer one is published
(on S3 the manifest is the single atomic switch, see :mod:`pipeline.storage`).

The rules:

1. order rows by (session start, session id, event time), keeping input order for ties;
2. optionally drop consecutive repeats of an item within a session (RSC15 keeps them);
3. filter iteratively until stable: sessions shorter than ``min_session_length``, items with fewer than
   ``min_item_support`` events (0 = off);
4. test = sessions whose last event is within ``test_days`` * 86400 s of the latest event; valid = the same
   rule inside the rest with ``valid_days``; train = what remains;
5. item index on train only (dense, in order of first appearance); valid and test keep only train items,
   then only sessions of >= 2 events; each split is in (session start, session id, time) order, the start
   being that of the session's rows in the split.

How, in bounded memory: the input is read one file at a time into integer codes (:func:`~pipeline.data.buckets.scan`); sessions
are ranked by (start, id) and cut into buckets of whole sessions that fit ``build.memory_budget_mb``; the
per-event codes are kept in an :class:`~pipeline.data.spill.ArrayStore` (in memory below the budget, spilled to
local disk above it) and every later step is a pass over the buckets, a few at a time on threads
(:class:`~pipeline.data.build.Build`). What stays in memory throughout is per-session and per-item state (about 100 bytes per
session, plus each distinct id once) and the file being read. The output is the same bytes whatever the
budget and the number of threads.

Where: this module reads the inputs and runs the steps; :mod:`~pipeline.data.build` holds the steps,
:mod:`~pipeline.data.buckets` the first pass and the bucket plumbing, :mod:`~pipeline.data.arrays` the array
helpers, :mod:`~pipeline.data.session_rules` the whole-session rules, :mod:`~pipeline.data.manifest` the
writing and publishing of the files.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import publish, storage
from pipeline.config import BuildConfig, IngestConfig, to_dict
from pipeline.data import ingest as ingest_mod
from pipeline.data.buckets import scan
from pipeline.data.build import Build
from pipeline.data.manifest import MANIFEST, ParquetSink, commit
from pipeline.data.progress import progress
from pipeline.data.schema import ITEM_ID, SESSION_ID, SPLIT_SCHEMA, SPLITS, TIMESTAMP
from pipeline.data.session_rules import SessionRules
from pipeline.data.spill import ArrayStore
from pipeline.data.validation_output import CLEAN, REPORT, clean_files
from pipeline.data.workdirs import WORK_PREFIXES, sweep_stale_work_dirs
from pipeline.errors import InputError

log = logging.getLogger(__name__)

# Working memory per event while a bucket is ordered (its codes in, 16 bytes; sort keys, 8; the sorted copies,
# 16; shifted ranks and masks): the budget divided by this, shared by the threads, is the bucket size.
BYTES_PER_ROW = 56
READ_AHEAD = 1  # input files decoded while the previous one is scanned
THREADS = min(4, os.cpu_count() or 1)  # buckets worked on at once (they share the memory budget)


@dataclass
class Splits:
    """A built dataset in memory: the three splits, the item map and the statistics for the manifest."""

    train: pa.Table
    valid: pa.Table
    test: pa.Table
    items: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> dict[str, pa.Table]:
        return {"train": self.train, "valid": self.valid, "test": self.test, "items": self.items}


def _run_build(
    parts: Iterable[tuple[str, pa.Table]],
    build: BuildConfig,
    emit: Callable[[str, pa.Table], None],
    rules: SessionRules | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """The whole build over ``parts`` (``(where, events)`` pairs, in input order). Split rows (and quarantined
    rows, as ``"quarantine"``) go to ``emit`` in order; returns the item map and the statistics.
    ``rules`` is read after the parts are (so a reader may switch its order rule off on the way)."""
    budget = build.memory_budget_mb << 20
    max_rows = max(1, budget // BYTES_PER_ROW)
    # The stored codes take 16 of BYTES_PER_ROW bytes per event: over a third of the budget, spill them.
    with ArrayStore(budget // 3, build.spill_dir or None) as store:
        t0 = time.perf_counter()
        scanned = scan(parts, store)
        pa.default_memory_pool().release_unused()  # the input files' buffers: Arrow's allocator keeps them otherwise
        job = Build(scanned, store, build, max_rows, THREADS, rules)
        if store.spilled or job.budget_limited:
            log.info(
                "building %d events in %d buckets of up to ~%d events (memory_budget_mb=%d, %.0f MB spilled to %s)",
                scanned.rows, job.n_buckets, job.bucket_rows, build.memory_budget_mb, store.spilled_bytes / 2**20,
                build.spill_dir or tempfile.gettempdir(),
            )  # fmt: skip
        job.order()
        quarantined = job.quarantine()
        if quarantined is not None:
            log.warning(
                "quarantined %d events breaking whole-session rules over the window: %s", quarantined.num_rows,
                {k: v for k, v in job.stats["quarantined"].items() if k != "events" and v},
            )  # fmt: skip
            emit("quarantine", quarantined)
        job.filter()
        job.split()
        job.index_items()
        job.finalize()
        for name, table in job.output():
            emit(name, table)
        log.debug("build computed in %.1f s", time.perf_counter() - t0)
        return job.items(), job.stats


def build_splits(events: pa.Table, build: BuildConfig | None = None) -> Splits:
    """Order, filter and split canonical events in memory (only session_id, item_id and timestamp are used)."""
    build = build or BuildConfig()
    chunks: dict[str, list[pa.Table]] = {name: [] for name in SPLITS}
    items, stats = _run_build([("events", events)], build, lambda name, table: chunks[name].append(table))
    tables = {
        name: pa.concat_tables(c).combine_chunks() if c else SPLIT_SCHEMA.empty_table()
        for name, c in chunks.items()
    }
    return Splits(tables["train"], tables["valid"], tables["test"], items, stats)


def _resolve_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str], SessionRules]:
    """``(recorded inputs, files to read, whole-session rules)``: a validation output folder stands for the
    clean files its report lists (recorded as its ``clean/`` folder, beside the report); a failed validation is
    refused. Validated inputs bring the validation's session rules, to be applied over the whole window."""
    recorded, files = [], []
    rules = SessionRules()
    for uri in inputs:
        if storage.is_dir(uri) and storage.exists(storage.join(uri, REPORT)):
            clean = clean_files(uri)
            if not clean:
                raise InputError(f"{uri}: the validation kept no clean rows; nothing to build from")
            recorded.append(storage.join(uri, CLEAN))
            files.extend(clean)
            rules.tighten(storage.read_json(storage.join(uri, REPORT)).get("config", {}).get("validation", {}))
        else:
            recorded.append(uri)
            files.extend(ingest_mod.list_inputs([uri])[0])
    return [storage.normalize(u) for u in recorded], files, rules


class _NeedsSessions(Exception):
    """A user-only log: sessions must be derived over all files at once."""


def _read_parts(
    files: Sequence[str], ingest: IngestConfig, rules: SessionRules | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """One file at a time (the next one decoded meanwhile): memory holds at most two files' events. A file
    whose rows are not time-ordered per session (e.g. from Diginetica) turns ``rules``' order rule off."""
    columns = [SESSION_ID, ITEM_ID, TIMESTAMP]

    def read(uri: str) -> ingest_mod.FileRead:
        return ingest_mod.read_file(uri, ingest, strict=True, columns=columns, dictionary_ids=True)

    with ThreadPoolExecutor(max_workers=READ_AHEAD + 1) as pool:
        pending = [pool.submit(read, uri) for uri in files[: READ_AHEAD + 1]]
        for n, uri in enumerate(progress(files, "building", total=len(files))):
            result = pending.pop(0).result()
            if n + READ_AHEAD + 1 < len(files):
                pending.append(pool.submit(read, files[n + READ_AHEAD + 1]))
            if result.needs_sessions:
                for future in pending:
                    future.cancel()
                raise _NeedsSessions
            if rules is not None and not result.ordered:
                rules.check_order = False
            yield uri, result.table.select(columns)


def build_dataset(
    inputs: Sequence[str],
    out_dir: str,
    ingest: IngestConfig | None = None,
    build: BuildConfig | None = None,
) -> dict[str, Any]:
    """Read click logs (raw, or the clean rows of ``validate``), build the splits and commit the dataset.

    Returns the manifest. Re-running on the same input writes byte-identical data files.
    """
    ingest = ingest or IngestConfig()
    build = build or BuildConfig()  # settings were checked when their section was built (pipeline.config)
    storage.check_disjoint(inputs, out_dir)
    recorded, files, rules = _resolve_inputs(inputs)
    sweep_stale_work_dirs(build.spill_dir or None)
    # Parquet goes to a local folder first (written in row groups, hashed), then into place by its hash.
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIXES[0], dir=build.spill_dir or None) as local:
        try:
            sink = ParquetSink(local)
            items, stats = _run_build(_read_parts(files, ingest, rules), build, sink.write, rules)
        except _NeedsSessions:
            log.info(
                "user-only log: deriving sessions over all %d files at once (validate does it per day)",
                len(files),
            )
            events = ingest_mod.read_events(
                files, ingest, columns=[SESSION_ID, ITEM_ID, TIMESTAMP], dictionary_ids=True
            )
            sink = ParquetSink(local)
            items, stats = _run_build([("events", events)], build, sink.write, rules)
            del events
        sink.write("items", items)
        extra = {
            "inputs": recorded,
            "config": {"ingest": to_dict(ingest), "build": to_dict(build), "session_rules": to_dict(rules)},
        }
        manifest = commit(out_dir, sink.close(), stats, extra)
    log.info(
        "dataset %s: train %d / valid %d / test %d events, %d items",
        out_dir, stats["train"]["events"], stats["valid"]["events"], stats["test"]["events"], items.num_rows,
    )  # fmt: skip
    return manifest


def write_dataset(splits: Splits, out_dir: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write in-memory splits (from :func:`build_splits`) as a dataset at ``out_dir`` (tests, notebooks)."""
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIXES[0]) as local:
        sink = ParquetSink(local)
        for name, table in splits.tables().items():
            sink.write(name, table)
        return commit(out_dir, sink.close(), splits.stats, extra or {})


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    """The manifest of a committed dataset (an error when there is none: not a dataset, or not committed)."""
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise InputError(
            f"{dataset_uri} is not a session dataset: no {MANIFEST} (missing, or never committed)"
        )
    return storage.read_json(uri)


def read_split(dataset_uri: str, split: str) -> pa.Table:
    """One split (``train``, ``valid``, ``test``) or the ``items`` map of a committed dataset.

    Follows the manifest (:func:`pipeline.publish.read_committed`): should a newer version be published while
    the file is read, the new manifest is read and its file instead.
    """
    if split not in (*SPLITS, "items"):
        raise InputError(f"unknown split {split!r}; one of {', '.join((*SPLITS, 'items'))}")
    read_manifest(dataset_uri)  # the "not a session dataset" error first

    def read(manifest: dict[str, Any]) -> pa.Table:
        try:
            relative = manifest["files"][split]["path"]
        except (KeyError, TypeError):
            raise InputError(
                f"{storage.join(dataset_uri, MANIFEST)} lists no file for split {split!r} (files.{split}.path): "
                "written by another tool or version? Rebuild the dataset with `python -m pipeline build`"
            ) from None
        fs, path = storage.resolve(storage.join(dataset_uri, relative))
        return pq.read_table(path, filesystem=fs)

    try:
        return publish.read_committed(dataset_uri, MANIFEST, read)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read split {split} of {dataset_uri}: {exc}") from None
