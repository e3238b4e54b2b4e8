"""Validate click-log batches with the Great Expectations suite; route rows to clean / quarantine.

``validate(inputs, out_dir)`` writes, all-or-nothing (``report.json`` last)::

    DIR/report.json                         success, counts, per-batch and per-expectation results
    DIR/clean/part-NNNNN-HASH.parquet       rows that passed, canonical schema, input order (one per batch)
    DIR/quarantine/part-NNNNN-HASH.parquet  rows that failed a row rule: canonical columns + reason, source,
                                            source_row
    DIR/data_docs/index.html                GX Data Docs of every batch

``NNNNN`` is the batch index (listing order = batch order) and ``HASH`` the first 16 hex digits of the
file's sha256 (:func:`pipeline.storage.content_name`): a name never changes its bytes, so a reader that
follows ``report.json`` (see :func:`clean_files`) reads one complete version even while a new one is being
published on S3. Each batch entry of the report names its files (``clean``, ``quarantine``); those are the
only data files of the output.

A batch is one ``dt=YYYY-MM-DD`` folder or one other file; batches are validated in worker processes (one
partition in memory per worker), results are gathered here. Row-level failures are quarantined and the clean
rows go on. A table-level failure (unreadable file, missing column, wrong type, empty batch, stale partition,
quarantined share above ``max_quarantine_share``) fails the batch: its rows that passed are not written to
``clean/`` and are counted as ``rows_rejected`` (the raw input is untouched and can be re-run). Every run
asserts ``rows_in == rows_valid + rows_quarantined + rows_rejected``; a passing run has no rejected rows.
:class:`~pipeline.errors.ValidationFailed` is raised after the report is written.

The suite decides: every rule's verdict and counts come from its Great Expectations result. The rows of a
failed row rule are picked with the same predicate the expectation checks (numpy, vectorized), and the
number of rows picked must equal the expectation's unexpected count, or the run stops with an internal error.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import IngestConfig, ValidationConfig, to_dict
from pipeline.data import expectations as ex
from pipeline.data import ingest as ingest_mod
from pipeline.data.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA, REQUIRED_COLUMNS, TIMESTAMP, TIMESTAMP_TYPE
from pipeline.errors import ConfigError, InputError, PipelineError, ValidationFailed

log = logging.getLogger(__name__)

REPORT = "report.json"
CLEAN = "clean"
QUARANTINE = "quarantine"
DATA_DOCS = "data_docs"
# Dictionary pages for the id columns: a session has several events, and `build` reads session and item ids
# straight from the dictionary pages instead of hashing every row's string again (a larger dictionary page
# limit keeps a day's session ids in the dictionary instead of falling back to plain pages).
PARQUET_OPTIONS = {
    "compression": "zstd",
    "row_group_size": 1 << 20,
    "use_dictionary": ["session_id", "item_id", "user_id", "event_type"],
    "dictionary_pagesize_limit": 64 << 20,
}
# BASIC: counts and a few example values per expectation (COMPLETE would also list every failing row,
# and every extra metric makes GX copy the batch once more).
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 10}
MAX_WORKERS = 4
AUTO_PARALLEL_BYTES = 64 << 20  # below this much input, helper processes cost more than they save
WORK_IN_PARENT = True  # the calling process validates batches too (tests turn it off to exercise the helpers)
# Helpers are forked on Linux (Arrow, NumPy and logging re-initialize their threads and locks after a fork):
# no main-module re-import, and they are forked after this process has imported GX (seconds of CPU each),
# so they inherit it. Spawned helpers start first and import GX alongside this process.
START_METHOD = os.environ.get("PIPELINE_VALIDATE_START_METHOD") or ("fork" if sys.platform == "linux" else "spawn")


# ---------------------------------------------------------------------------------------------
# One Great Expectations context per process (importing GX and creating contexts is slow)

_GX: dict[str, Any] = {}
# Great Expectations imports these at module level for expectations this suite never uses (the KL divergence
# chart, the KS tests): about 1 s of every validation's start-up, on one core while the other waits for the
# fork. Each stands in as an empty module until something reads an attribute of it, which imports the real one.
DEFERRED_GX_IMPORTS = ("altair", "scipy.stats")
_DEFER_LOCK = threading.RLock()


class _DeferredModule(types.ModuleType):
    """Placeholder in ``sys.modules``: the first attribute read imports the real module and takes its place."""

    def __getattr__(self, attr: str) -> Any:  # only called for attributes the placeholder lacks
        with _DEFER_LOCK:
            first = sys.modules.get(self.__name__) is self
            if first:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)  # a broken install raises its ImportError here, each time
            if first:
                self.__dict__.update(real.__dict__)  # later reads through the placeholder find them directly
        return getattr(real, attr)


def _defer_gx_imports() -> None:
    if "great_expectations" in sys.modules:
        return
    for name in DEFERRED_GX_IMPORTS:
        spec = None if name in sys.modules else importlib.util.find_spec(name)
        if spec is not None:
            placeholder = _DeferredModule(name)
            placeholder.__spec__ = spec  # what find_spec() and the import system read, without loading it
            sys.modules[name] = placeholder


def gx_context() -> tuple[Any, Any]:
    """``(context, batch_definition)`` of the process-wide ephemeral GX context (quiet, no progress bars)."""
    if not _GX:
        # Importing GX and making a context leave ~350,000 long-lived objects: without this the cyclic GC walks
        # them again and again (~0.35 s of the start-up) and in every full collection after. Frozen, they stay
        # out of collections, and forked helpers leave the memory pages holding them shared.
        enabled = gc.isenabled()
        gc.disable()
        try:
            _GX.update(_new_gx_context())
            gc.freeze()
        finally:
            if enabled:
                gc.enable()
    return _GX["context"], _GX["batch_definition"]


def _new_gx_context() -> dict[str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    _defer_gx_imports()
    import great_expectations as gx
    import great_expectations.execution_engine.pandas_execution_engine as pandas_engine
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in list(logging.root.manager.loggerDict):  # some GX modules pin their own logger to INFO
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # GX hashes every in-memory batch for a "fingerprint" batch marker (~0.4 s per million rows);
    # our batches are identified by their files in the report instead.
    pandas_engine.HASH_THRESHOLD = 0
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("click_events").add_dataframe_asset("batch")
    return {"context": context, "batch_definition": asset.add_batch_definition_whole_dataframe("whole_batch")}


def _register(suite: Any) -> Any:
    """The validation definition of ``suite``, registered in the context unless it is already the current one.

    Consecutive batches share one suite (times are parameters): registering it again would cost ~0.1 s of GX
    bookkeeping per batch. The context holds one suite of this name, so only the latest is remembered.
    """
    import great_expectations as gx

    context, batch_definition = gx_context()
    key = json.dumps(suite.to_json_dict(), sort_keys=True, default=str)
    current = _GX.get("registered")
    if current is None or current[0] != key:
        suite = context.suites.add_or_update(suite)
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=ex.SUITE_NAME, data=batch_definition, suite=suite)
        )
        current = _GX["registered"] = (key, definition)
    return current[1]


def _run_suite(suite: Any, frame: Any, run_name: str, parameters: dict[str, Any]) -> Any:
    """Run the suite on a pandas frame; the result stays in the context's store for the Data Docs."""
    from great_expectations.core.run_identifier import RunIdentifier

    definition = _register(suite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            result_format=RESULT_FORMAT,
            run_id=RunIdentifier(run_name=run_name),
        )


def _clear_results() -> None:
    """Forget earlier validation results of this process, so Data Docs show only the current run."""
    store = gx_context()[0].validation_results_store
    for key in store.list_keys():
        store.remove_key(key)


def _export_results() -> list[tuple[tuple[str, ...], Any]]:
    """This process's stored results, serialized (to hand them from a worker to the Data Docs builder)."""
    store = gx_context()[0].validation_results_store
    return [(store.key_to_tuple(k), store.serialize(store.get(k))) for k in store.list_keys()]


def _import_results(results: list[tuple[tuple[str, ...], Any]]) -> None:
    store = gx_context()[0].validation_results_store
    for key, value in results:
        store.set(store.tuple_to_key(key), store.deserialize(value))


def _build_data_docs(directory: str, suite: Any) -> None:
    """Render the Data Docs of this run's results into ``directory`` (once per run: rendering is slow)."""
    context, _ = gx_context()
    _register(suite)
    site = f"pipeline-{os.getpid()}"
    context.add_data_docs_site(
        site_name=site,
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": directory},
        },
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            context.build_data_docs(site_names=[site])
    finally:
        context.delete_data_docs_site(site)


# ---------------------------------------------------------------------------------------------
# Report helpers


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _expectation_entry(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    res = result.result or {}
    info = result.exception_info or {}
    return _jsonable(
        {
            "rule": config.meta.get("rule"),
            "level": config.meta.get("level"),
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "kwargs": {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column")},
            "success": bool(result.success),
            "unexpected_count": res.get("unexpected_count"),
            "unexpected_percent": res.get("unexpected_percent"),
            "observed_value": res.get("observed_value"),
            "partial_unexpected_list": res.get("partial_unexpected_list") or [],
            "exception": info.get("exception_message") if info.get("raised_exception") else None,
        }
    )


def _parse_time(value: str, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"validation.{name}: not an ISO-8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def check_config(validation: ValidationConfig) -> None:
    _parse_time(validation.timestamp_floor, "timestamp_floor")
    if validation.partition_end:
        _parse_time(validation.partition_end, "partition_end")
    if not 0 <= validation.max_quarantine_share <= 1:
        raise ConfigError("validation.max_quarantine_share must be in [0, 1]")
    if validation.min_rows < 0 or validation.max_session_length < 1:
        raise ConfigError("validation.min_rows must be >= 0 and validation.max_session_length >= 1")
    if validation.workers < 0:
        raise ConfigError("validation.workers must be >= 0 (0 = one per CPU, at most one per batch)")


def suite_params(
    batch: ingest_mod.Batch, validation: ValidationConfig, ordered: bool, now: dt.datetime
) -> ex.SuiteParams:
    """The suite's thresholds for one batch."""
    # An explicit partition_end (e.g. the DAG's data interval end) wins over the dt= folder's day end.
    configured_end = _parse_time(validation.partition_end, "partition_end") if validation.partition_end else None
    end = configured_end or batch.partition_end
    freshness = None
    if end is not None and validation.max_partition_age_days is not None:
        freshness = end - dt.timedelta(days=validation.max_partition_age_days)
    check_order = validation.check_session_order
    if check_order is None:
        check_order = ordered  # the rows of every file keep each session's events in time order
    return ex.SuiteParams(
        timestamp_floor=_parse_time(validation.timestamp_floor, "timestamp_floor"),
        partition_end=end or now,
        min_rows=validation.min_rows,
        max_session_length=validation.max_session_length,
        freshness_floor=freshness,
        check_order=check_order,
    )


# ---------------------------------------------------------------------------------------------
# One batch (runs in a worker process)


@dataclass(frozen=True)
class BatchTask:
    index: int
    batch: ingest_mod.Batch
    ingest: IngestConfig
    validation: ValidationConfig
    now: dt.datetime
    out_dir: str  # the staging folder: clean/ and quarantine/ files go under it


@dataclass
class BatchOutcome:
    report: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    gx_results: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)


def _reasons(masks: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, pa.Array]:
    """Rows failing any row rule and, for each, its failed rule names joined by ``;``."""
    bits = np.zeros(n, dtype=np.int64)
    for i, rule in enumerate(ex.ROW_RULES):
        if rule in masks:
            bits |= masks[rule].astype(np.int64) << i
    bad = bits != 0
    codes, inverse = np.unique(bits[bad], return_inverse=True)
    labels = [";".join(r for i, r in enumerate(ex.ROW_RULES) if int(c) >> i & 1) for c in codes]
    return bad, pa.array(labels, type=pa.string()).take(pa.array(inverse.reshape(-1).astype(np.int64)))


def _to_pandas(table: pa.Table) -> Any:
    import pandas as pd

    # Nullable integers stay integers (not float64 with NaN), so reports show row numbers as ints.
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def _empty_frame(n: int) -> Any:
    import pandas as pd

    return pd.DataFrame(index=pd.RangeIndex(n))


def _write_part(table: pa.Table, out_dir: str, folder: str, index: int) -> str:
    """Write a batch's rows to ``FOLDER/part-<index>-<hash>.parquet`` under ``out_dir``; returns that path."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **PARQUET_OPTIONS)  # encoded first: the name carries the hash of the bytes
    data = sink.getvalue().to_pybytes()
    relative = f"{folder}/{storage.content_name(f'part-{index:05d}', data, '.parquet')}"
    storage.write_bytes(storage.join(out_dir, relative), data)
    return relative


def _describe_failure(where: str, result: Any) -> str:
    config = result.expectation_config
    column = config.kwargs.get("column")
    bounds = {k: v for k, v in config.kwargs.items() if k.endswith("_value")}
    observed = (result.result or {}).get("observed_value")
    return (
        f"{where}: {'column ' + column + ': ' if column else ''}rule {config.meta.get('rule')} ({config.type}) "
        f"failed: observed {_jsonable(observed)}, expected {_jsonable(bounds) or config.kwargs.get('type_', '')}"
    )


def run_batch(task: BatchTask) -> BatchOutcome:
    """Validate one batch, write its clean and quarantined rows, and return its report entry."""
    try:
        if not _IN_WORKER:
            return _validate_batch(task)
        _clear_results()  # a worker hands each batch's GX result back to the parent for the Data Docs
        outcome = _validate_batch(task)
        outcome.gx_results = _export_results()
        return outcome
    finally:
        # Some of a batch's big buffers end up in reference cycles that only a full collection frees, and
        # those come rarely when the work is in NumPy: without this a process sometimes held two partitions
        # (peak 0.65 to 1.2 GB run to run, now ~0.65 GB). Cheap, as GX's own objects are frozen.
        gc.collect()


def _validate_batch(task: BatchTask) -> BatchOutcome:
    batch = task.batch
    where = storage.parent(batch.files[0]) if len(batch.files) > 1 else batch.files[0]
    entry: dict[str, Any] = {
        "index": task.index,
        "name": batch.name,
        "files": list(batch.files),
        "partition_end": batch.partition_end,
        "rows_in": 0,
        "rows_valid": 0,
        "rows_quarantined": 0,
        "rows_rejected": 0,
        "expectations": [],
        "skipped": [],
    }
    outcome = BatchOutcome(entry)
    fail = outcome.failures.append

    # 1. Read leniently: a missing column or a wrong type is for the suite to report.
    reads: list[ingest_mod.FileRead] = []
    try:
        for uri in batch.files:
            reads.append(ingest_mod.read_file(uri, task.ingest, strict=False))
    except InputError as exc:
        entry.update(status="unreadable", rows_in=sum(r.rows_in for r in reads))
        entry["rows_rejected"] = entry["rows_in"]
        fail(f"{exc} (rule: readable)")
        return outcome
    formats = sorted({r.format for r in reads})
    entry["format"] = formats[0] if len(formats) == 1 else formats
    ordered = all(r.ordered for r in reads)
    problems = [p for r in reads for p in r.problems]
    n = sum(r.table.num_rows for r in reads)  # rows read into columns; rejected lines come on top
    n_lines_bad = sum(r.rejected.num_rows for r in reads)
    entry["rows_in"] = n + n_lines_bad
    if problems:
        table = next(r.table for r in reads if r.problems)  # the suite sees the first offending file as read
    else:
        table = pa.concat_tables([r.table for r in reads]) if len(reads) > 1 else reads[0].table
        if any(r.needs_sessions for r in reads):
            table = ingest_mod.sessionize(table, task.ingest.session_gap_minutes)

    # 2. Derived columns, then the suite. Row rules need canonical columns: with a schema problem the
    #    schema rules are what this batch is about.
    params = suite_params(batch, task.validation, ordered, task.now)
    entry["suite"] = {"name": ex.SUITE_NAME, "version": ex.SUITE_VERSION}
    entry["parameters"] = _jsonable(params.__dict__)
    if params.freshness_floor is None:
        entry["skipped"].append({"rule": "freshness", "why": "partition end unknown (no dt= folder, no partition_end)"})
    if not params.check_order:
        entry["skipped"].append({"rule": "session_order", "why": f"rows of format {entry['format']} are not time-ordered"})
    if batch.skipped:
        entry["skipped_files"] = list(batch.skipped)
    columns = {name: table.column(name) for name in REQUIRED_COLUMNS if name in table.column_names}
    if not problems:
        columns[TIMESTAMP] = _clip_for_gx(columns[TIMESTAMP])
    derived = None
    if not problems:
        derived = ex.derive(table, params)
        columns.update(derived.columns)
    frame = _to_pandas(pa.table(columns)) if columns else _empty_frame(n)
    suite = ex.build_suite(params, row_rules=not problems)
    result = _run_suite(suite, frame, f"{task.index:05d}-{batch.name}", ex.suite_parameters(params))
    del frame
    results = list(result.results)
    entry["expectations"] = [_expectation_entry(r) for r in results]

    # 3. Table-level verdicts (schema problems are named by the reader, which knows the source column).
    for p in problems:
        fail(p.message())
    for r in results:
        level = r.expectation_config.meta.get("level")
        if r.success or (level == "schema" and problems):
            continue
        if level in ("schema", "table"):
            fail(_describe_failure(where, r))
        elif (r.exception_info or {}).get("raised_exception"):
            fail(f"{where}: rule {r.expectation_config.meta.get('rule')} could not be evaluated: "
                 f"{r.exception_info.get('exception_message')}")  # fmt: skip
    if problems or derived is None:
        entry.update(status="rejected", rows_rejected=entry["rows_in"])
        entry["file_counts"] = _file_counts(reads, None, "rejected")
        return outcome

    # 4. Route rows. Each failed row rule's rows are picked by the predicate its expectation checks, and
    #    must number exactly what the expectation reported.
    masks: dict[str, np.ndarray] = {}
    for r in results:
        config = r.expectation_config
        if config.meta.get("level") != "row":
            continue
        if (r.exception_info or {}).get("raised_exception"):
            continue  # already a failure of the batch (step 3)
        rule = config.meta["rule"]
        expected = int((r.result or {}).get("unexpected_count") or 0)
        picked = int(derived.masks[rule].sum())
        if picked != expected:
            raise PipelineError(f"internal error: rule {rule} picked {picked} rows but GX counted {expected} in {where}")
        if not r.success:
            masks[rule] = derived.masks[rule]
    bad, reasons = _reasons(masks, n)
    n_bad = int(bad.sum())
    line_reasons = pc.value_counts(pa.concat_arrays([r.rejected.column("reason").combine_chunks() for r in reads]))
    entry["quarantine_reasons"] = {rule: int(m.sum()) for rule, m in masks.items()} | {
        v["values"]: v["counts"] for v in line_reasons.to_pylist()
    }
    quarantined_rows = n_bad + n_lines_bad
    share = quarantined_rows / entry["rows_in"] if entry["rows_in"] else 0.0
    entry["quarantine_share"] = share
    if share > task.validation.max_quarantine_share:
        fail(f"{where}: rule quarantine_share failed: {quarantined_rows} of {entry['rows_in']} rows ({share:.2%}) "
             f"failed row rules {entry['quarantine_reasons']}, above max_quarantine_share "
             f"{task.validation.max_quarantine_share:.2%}")  # fmt: skip
    canonical = table.select(EVENT_SCHEMA.names)
    if quarantined_rows:
        quarantined = _quarantine_table(canonical, bad, reasons, reads, batch.files)
        entry["quarantine"] = _write_part(quarantined, task.out_dir, QUARANTINE, task.index)
        entry["rows_quarantined"] = quarantined_rows
    if outcome.failures:
        entry.update(status="failed", rows_rejected=entry["rows_in"] - quarantined_rows)
        entry["file_counts"] = _file_counts(reads, bad, "failed")
        return outcome
    passed = canonical.filter(pa.array(~bad)) if n_bad else canonical
    passed = passed.replace_schema_metadata({ingest_mod.ORDERED_KEY: b"true" if ordered else b"false"})
    clean = _write_part(passed, task.out_dir, CLEAN, task.index)
    entry.update(status="passed", rows_valid=n - n_bad, clean=clean)
    entry["file_counts"] = _file_counts(reads, bad, "passed")
    return outcome


# GX turns times into Python datetimes (years 1 to 9999): times outside are clipped for the suite only. The
# window is inside those years, so the timestamp_window rule flags exactly the same rows either way.
_GX_TIME_RANGE = (
    int(dt.datetime(1, 1, 1, tzinfo=dt.UTC).timestamp() * 1e6),
    int(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp() * 1e6),
)


def _clip_for_gx(times: pa.ChunkedArray) -> pa.ChunkedArray:
    micros = times.cast(pa.int64())
    low, high = pc.min_max(micros).values()
    if low.as_py() is None or (low.as_py() >= _GX_TIME_RANGE[0] and high.as_py() <= _GX_TIME_RANGE[1]):
        return times
    return pc.min_element_wise(pc.max_element_wise(micros, _GX_TIME_RANGE[0]), _GX_TIME_RANGE[1]).cast(TIMESTAMP_TYPE)


def _quarantine_table(
    canonical: pa.Table, bad: np.ndarray, reasons: pa.Array, reads: list[ingest_mod.FileRead], files: Sequence[str]
) -> pa.Table:
    """Quarantined rows of a batch: the rows failing row rules, then the lines set aside while reading, each
    with its reason, file, data row, line (text files) and raw text (for lines)."""
    file_of_row = np.concatenate([np.full(r.table.num_rows, i, dtype=np.int32) for i, r in enumerate(reads)])
    rows = np.concatenate([r.row_numbers() for r in reads])[bad]
    first_lines = np.array([-1 if r.first_line is None else r.first_line for r in reads], dtype=np.int64)[file_of_row[bad]]
    by_rule = canonical.filter(pa.array(bad)).append_column("reason", reasons)
    by_rule = by_rule.append_column("source", pa.array(list(files)).take(pa.array(file_of_row[bad])))
    by_rule = by_rule.append_column("source_row", pa.array(rows))
    by_rule = by_rule.append_column("source_line", pa.array(rows + first_lines, mask=first_lines < 0))
    by_rule = by_rule.append_column("raw", pa.nulls(len(rows), pa.string()))
    parts = [by_rule.cast(QUARANTINE_SCHEMA)]
    for uri, r in zip(files, reads, strict=True):
        lines = r.rejected
        if lines.num_rows:
            nulls = {name: pa.nulls(lines.num_rows, f.type) for name, f in zip(EVENT_SCHEMA.names, EVENT_SCHEMA, strict=True)}
            extra = {"reason": lines.column("reason"), "source": pa.array([uri] * lines.num_rows),
                     "source_row": lines.column("row"), "source_line": lines.column("line"), "raw": lines.column("raw")}  # fmt: skip
            parts.append(pa.table(nulls | extra).cast(QUARANTINE_SCHEMA))
    table = pa.concat_tables(parts)
    return table.sort_by([("source", "ascending"), ("source_row", "ascending")]) if len(parts) > 1 else table


def _file_counts(reads: list[ingest_mod.FileRead], bad: np.ndarray | None, status: str) -> list[dict[str, Any]]:
    """Per input file: rows in, valid, quarantined and rejected (they reconcile file by file)."""
    out, start = [], 0
    for r in reads:
        rows = r.table.num_rows
        if bad is None:  # the batch was rejected before routing: nothing of it was quarantined
            quarantined, valid = 0, 0
        else:
            quarantined = int(bad[start : start + rows].sum()) + r.rejected.num_rows
            valid = rows - int(bad[start : start + rows].sum()) if status == "passed" else 0
        start += rows
        out.append({"uri": r.uri, "format": r.format, "rows_in": r.rows_in, "rows_valid": valid,
                    "rows_quarantined": quarantined, "rows_rejected": r.rows_in - valid - quarantined})  # fmt: skip
    return out


_IN_WORKER = False


def _worker_init() -> None:
    global _IN_WORKER
    _IN_WORKER = True
    logging.basicConfig(level=logging.WARNING)
    gx_context()


def _can_start_helpers() -> bool:
    """Spawned workers re-import the main module: that needs one (not an interactive or ``-c`` session)."""
    if START_METHOD == "fork":
        return True
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return bool(path) and os.path.exists(path)


def _workers(validation: ValidationConfig, batches: Sequence[ingest_mod.Batch]) -> int:
    """How many processes validate: as configured, else one per CPU when the input is big enough to pay
    for starting them (each helper imports Great Expectations: seconds)."""
    if validation.workers:
        wanted = validation.workers
    elif sum(storage.size(f) for b in batches for f in b.files) < AUTO_PARALLEL_BYTES:
        wanted = 1
    else:
        wanted = min(os.cpu_count() or 1, MAX_WORKERS)
    workers = max(1, min(wanted, len(batches)))
    return workers if workers == 1 or _can_start_helpers() else 1


def _start_helpers(workers: int, n_batches: int) -> ProcessPoolExecutor | None:
    """Helper processes for ``workers > 1``, asked to start at once (spawned ones take seconds to import GX)."""
    if workers <= 1 or n_batches <= 2:
        return None
    context = multiprocessing.get_context(START_METHOD)
    pool = ProcessPoolExecutor(workers - 1, mp_context=context, initializer=_worker_init)
    for _ in range(workers - 1):
        pool.submit(int)  # processes start on demand: ask now, so they boot while this one does too
    return pool


def _run_batches(tasks: list[BatchTask], pool: ProcessPoolExecutor | None, helpers: int) -> list[BatchOutcome]:
    """Run every batch: here, and in the helper processes when there are some.

    This process works through the queue from the front and keeps each helper process fed with one batch,
    so helpers that are still starting (importing GX takes seconds) never hold up a short run: a batch a
    helper has not started yet is taken back. One partition per process at a time bounds the memory.
    """
    if pool is None:
        return [run_batch(t) for t in ingest_mod.progress(tasks, "validating")]
    done: dict[int, BatchOutcome] = {}
    pending = list(tasks)
    futures: dict[Any, BatchTask] = {}
    try:
        while pending or futures:
            for future in [f for f in futures if f.done()]:
                outcome = future.result()
                _import_results(outcome.gx_results)
                outcome.gx_results = []
                done[futures.pop(future).index] = outcome
            while pending and len(futures) < helpers:
                task = pending.pop()  # helpers take from the back, this process from the front
                futures[pool.submit(run_batch, task)] = task
            if pending and WORK_IN_PARENT:
                task = pending.pop(0)
            else:
                idle = [f for f in futures if WORK_IN_PARENT and f.cancel()]  # not started yet: do it here
                if not idle:
                    if futures:
                        next(iter(futures)).exception()  # wait for a helper to finish a batch
                    continue
                task = futures.pop(idle[0])
            done[task.index] = run_batch(task)
            log.info("validated %d/%d batches", len(done), len(tasks))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)  # every batch is done: this only waits for helpers to exit
    return [done[t.index] for t in tasks]


# ---------------------------------------------------------------------------------------------
# The public entry point


def validate(
    inputs: Sequence[str],
    out_dir: str,
    ingest: IngestConfig | None = None,
    validation: ValidationConfig | None = None,
) -> dict[str, Any]:
    """Validate every batch of ``inputs`` and write clean rows, quarantine, ``report.json`` and Data Docs.

    Returns the report. Raises :class:`ValidationFailed` (after writing everything) when a batch fails a
    table-level rule, naming the file, the column and the rule.
    """
    ingest_config = ingest or IngestConfig()
    validation = validation or ValidationConfig()
    ingest_mod.check_config(ingest_config)
    check_config(validation)
    storage.check_disjoint(inputs, out_dir)
    batches = ingest_mod.plan_batches(inputs)
    if not batches:
        raise InputError("nothing to validate: no input files given")
    now = dt.datetime.now(dt.UTC)
    workers = _workers(validation, batches)
    if START_METHOD == "fork":
        gx_context()  # before forking: the helpers inherit the imported GX instead of importing it again
    pool = _start_helpers(workers, len(batches))  # spawned helpers import GX while this process does
    try:
        gx_context()
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    _clear_results()
    outcomes: list[BatchOutcome] = []
    with storage.staged_dir(out_dir, REPORT) as tmp, tempfile.TemporaryDirectory(prefix="gx-docs-") as docs_dir:
        tasks = [BatchTask(i, b, ingest_config, validation, now, tmp) for i, b in enumerate(batches)]
        outcomes = _run_batches(tasks, pool, workers - 1)
        for o in outcomes:
            o.report["failures"] = o.failures
            log.info(
                "batch %s: %s (%d rows in, %d valid, %d quarantined)",
                o.report["name"], o.report["status"], o.report["rows_in"], o.report["rows_valid"], o.report["rows_quarantined"],
            )  # fmt: skip
        last = tasks[-1]
        _build_data_docs(docs_dir, ex.build_suite(suite_params(last.batch, validation, True, now)))
        _clear_results()
        storage.upload_dir(docs_dir, storage.join(tmp, DATA_DOCS))
        report = _report(inputs, outcomes, ingest_config, validation, workers)
        storage.write_json(storage.join(tmp, REPORT), report)
    if not report["success"]:
        raise ValidationFailed(
            f"validation failed ({len(report['failures'])} problem(s); report: {storage.join(out_dir, REPORT)}):\n  "
            + "\n  ".join(report["failures"])
        )
    return report


def _report(
    inputs: Sequence[str],
    outcomes: list[BatchOutcome],
    ingest_config: IngestConfig,
    validation: ValidationConfig,
    workers: int,
) -> dict[str, Any]:
    batches = [o.report for o in outcomes]
    keys = ("rows_in", "rows_valid", "rows_quarantined", "rows_rejected")
    totals = {key: sum(b[key] for b in batches) for key in keys}
    reconciled = totals["rows_in"] == totals["rows_valid"] + totals["rows_quarantined"] + totals["rows_rejected"]
    for part in batches + [f for b in batches for f in b.get("file_counts", [])]:  # every batch and every file too
        reconciled &= part["rows_in"] == part["rows_valid"] + part["rows_quarantined"] + part["rows_rejected"]
    if not reconciled:
        raise PipelineError(f"internal error: rows do not reconcile: {totals}")
    reasons: dict[str, int] = {}
    summary: dict[str, dict[str, Any]] = {}
    for b in batches:
        for rule, count in b.get("quarantine_reasons", {}).items():
            reasons[rule] = reasons.get(rule, 0) + count
        for e in b["expectations"]:
            s = summary.setdefault(
                f"{e['rule']}:{e['column'] or ''}",
                {"rule": e["rule"], "level": e["level"], "expectation": e["expectation"], "column": e["column"],
                 "batches": 0, "failed_batches": 0, "unexpected_count": 0},
            )  # fmt: skip
            s["batches"] += 1
            s["failed_batches"] += 0 if e["success"] else 1
            s["unexpected_count"] += e["unexpected_count"] or 0
    failures = [f for o in outcomes for f in o.failures]
    return _jsonable(
        {
            "success": bool(outcomes) and not failures,
            **totals,
            "reconciled": reconciled,
            "quarantine_share": totals["rows_quarantined"] / totals["rows_in"] if totals["rows_in"] else 0.0,
            "quarantine_reasons": reasons,
            "failures": failures,
            "expectations": list(summary.values()),
            "suite": {"name": ex.SUITE_NAME, "version": ex.SUITE_VERSION},
            "inputs": [storage.normalize(i) for i in inputs],
            "skipped_files": [f for b in batches for f in b.get("skipped_files", [])],
            "config": {"ingest": to_dict(ingest_config), "validation": to_dict(validation)},
            "clean": CLEAN if totals["rows_valid"] else None,
            "quarantine": QUARANTINE if totals["rows_quarantined"] else None,
            "data_docs": f"{DATA_DOCS}/index.html",
            "workers": workers,
            "batches": batches,
            "created_at": dt.datetime.now(dt.UTC),
        }
    )


def clean_uri(out_dir: str) -> str:
    """Where the clean rows of a validation output live (the input of ``build``)."""
    return storage.join(out_dir, CLEAN)


def clean_files(validation_dir: str) -> list[str]:
    """The clean files of a committed, successful validation output, in batch order (the input of ``build``).

    Follows ``report.json`` rather than listing ``clean/``: on S3 a listing taken while a new version is
    being published may hold both versions' files. Batches without clean rows are skipped, so the list may
    be empty. A missing report or a failed validation is an :class:`InputError` naming the report.
    """
    report_uri = storage.join(validation_dir, REPORT)
    if not storage.exists(report_uri):
        raise InputError(f"{validation_dir} is not a validation output: no {REPORT} (missing or uncommitted)")
    report = storage.read_json(report_uri)
    if not report.get("success"):
        raise InputError(
            f"{validation_dir} holds a failed validation (see {report_uri}); fix the input and re-validate"
        )
    batches = sorted(report.get("batches") or [], key=lambda b: b["index"])
    return [storage.join(validation_dir, b[CLEAN]) for b in batches if b.get(CLEAN) and b.get("rows_valid")]
