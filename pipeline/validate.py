"""Validate click-log batches with the Great Expectations suite; route rows to clean / quarantine.

``validate(inputs, out_dir)`` writes, all-or-nothing (``report.json`` last)::

    DIR/report.json                 success, counts, per-batch and per-expectation results
    DIR/clean/part-NNNNN.parquet    rows that passed, canonical schema, input order (one file per batch)
    DIR/quarantine/part-NNNNN.parquet  rows that failed a row rule: canonical columns + reason, source, source_row
    DIR/data_docs/index.html        GX Data Docs for every batch

A batch is one ``dt=YYYY-MM-DD`` folder or one other file. Row-level failures are quarantined and the clean
rows go on. A table-level failure (unreadable file, missing column, wrong type, empty batch, stale partition,
quarantined share above ``max_quarantine_share``) fails the batch: its rows that passed are not written to
``clean/`` and are counted as ``rows_rejected`` (the raw input is untouched and can be re-run). Every run
asserts ``rows_in == rows_valid + rows_quarantined + rows_rejected``; a passing run has no rejected rows.
:class:`~pipeline.errors.ValidationFailed` is raised after the report is written.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import expectations as ex
from pipeline import ingest as ingest_mod
from pipeline import storage
from pipeline.config import IngestConfig, ValidationConfig, to_dict
from pipeline.errors import ConfigError, InputError, PipelineError, ValidationFailed
from pipeline.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA, REQUIRED_COLUMNS

log = logging.getLogger(__name__)

REPORT = "report.json"
CLEAN = "clean"
QUARANTINE = "quarantine"
DATA_DOCS = "data_docs"
PARQUET_OPTIONS = {"compression": "zstd", "row_group_size": 1 << 20}
RESULT_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": 10, "return_unexpected_index_query": False}
REPORT_PARTIAL = 10


# ---------------------------------------------------------------------------------------------
# One Great Expectations context per process (creating contexts and importing GX is slow)

_GX: dict[str, Any] = {}


def gx_context() -> tuple[Any, Any]:
    """``(context, batch_definition)`` of the process-wide ephemeral GX context (quiet, no progress bars)."""
    if not _GX:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in list(logging.root.manager.loggerDict):  # some GX modules pin their own logger to INFO
            if name.startswith("great_expectations"):
                logging.getLogger(name).setLevel(logging.WARNING)
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas("click_events")
        asset = source.add_dataframe_asset("batch")
        _GX["context"] = context
        _GX["batch_definition"] = asset.add_batch_definition_whole_dataframe("whole_batch")
    return _GX["context"], _GX["batch_definition"]


def _run_suite(suite: Any, frame: Any, run_name: str) -> Any:
    """Run the suite on a pandas frame through a Checkpoint (its result is kept for the Data Docs)."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context, batch_definition = gx_context()
    suite = context.suites.add_or_update(suite)
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=ex.SUITE_NAME, data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(name="validate_click_events", validation_definitions=[definition], result_format=RESULT_FORMAT)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=RunIdentifier(run_name=run_name))
    return next(iter(result.run_results.values()))


def _clear_results() -> None:
    """Forget earlier validation results of this process, so Data Docs show only the current run."""
    context, _ = gx_context()
    store = context.validation_results_store
    for key in store.list_keys():
        store.remove_key(key)


def _build_data_docs(directory: str) -> None:
    """Render the Data Docs of this run's results into ``directory`` (once per run: rendering is slow)."""
    context, _ = gx_context()
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
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column")}
    res = result.result or {}
    info = result.exception_info or {}
    exception = info.get("exception_message") if info.get("raised_exception") else None
    return _jsonable(
        {
            "rule": config.meta.get("rule"),
            "level": config.meta.get("level"),
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "kwargs": kwargs,
            "success": bool(result.success),
            "unexpected_count": res.get("unexpected_count"),
            "unexpected_percent": res.get("unexpected_percent"),
            "observed_value": res.get("observed_value"),
            "partial_unexpected_list": (res.get("partial_unexpected_list") or [])[:REPORT_PARTIAL],
            "exception": exception,
        }
    )


def _parse_time(value: str, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"validation.{name}: not an ISO-8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _us(moment: dt.datetime) -> int:
    return int(round(moment.timestamp() * 1_000_000))


def check_config(validation: ValidationConfig) -> None:
    _parse_time(validation.timestamp_floor, "timestamp_floor")
    if validation.partition_end:
        _parse_time(validation.partition_end, "partition_end")
    if not 0 <= validation.max_quarantine_share <= 1:
        raise ConfigError("validation.max_quarantine_share must be in [0, 1]")
    if validation.min_rows < 0 or validation.max_session_length < 1:
        raise ConfigError("validation.min_rows must be >= 0 and validation.max_session_length >= 1")


# ---------------------------------------------------------------------------------------------
# One batch


@dataclass
class BatchOutcome:
    report: dict[str, Any]
    clean: pa.Table | None = None
    quarantine: pa.Table | None = None
    failures: list[str] = field(default_factory=list)


def _suite_params(batch: ingest_mod.Batch, validation: ValidationConfig, formats: Sequence[str], now: dt.datetime) -> ex.SuiteParams:
    # An explicit partition_end (e.g. the DAG's data interval end) wins over the dt= folder's day end.
    configured_end = _parse_time(validation.partition_end, "partition_end") if validation.partition_end else None
    end = configured_end or batch.partition_end
    freshness = None
    if end is not None and validation.max_partition_age_days is not None:
        freshness = end - dt.timedelta(days=validation.max_partition_age_days)
    check_order = validation.check_session_order
    if check_order is None:
        check_order = all(ingest_mod.FORMATS[f].ordered for f in formats)
    return ex.SuiteParams(
        timestamp_floor=_parse_time(validation.timestamp_floor, "timestamp_floor"),
        partition_end=end or now,
        min_rows=validation.min_rows,
        max_session_length=validation.max_session_length,
        freshness_floor=freshness,
        check_order=check_order,
    )


def _reasons(masks: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, pa.Array]:
    """Rows failing any row rule and, for each, its failed rule names joined by ``;``."""
    bits = np.zeros(n, dtype=np.int64)
    for i, rule in enumerate(ex.ROW_RULES):
        if rule in masks:
            bits |= masks[rule].astype(np.int64) << i
    bad = bits != 0
    codes, inverse = np.unique(bits[bad], return_inverse=True)
    labels = [";".join(r for i, r in enumerate(ex.ROW_RULES) if int(c) >> i & 1) for c in codes]
    return bad, pa.array(labels, type=pa.string()).take(pa.array(inverse.astype(np.int64)))


def _validate_batch(
    index: int, batch: ingest_mod.Batch, ingest_cfg: IngestConfig, validation: ValidationConfig, now: dt.datetime
) -> BatchOutcome:
    label = batch.name if len(batch.files) > 1 else batch.files[0]
    entry: dict[str, Any] = {
        "index": index,
        "name": batch.name,
        "files": list(batch.files),
        "partition_end": batch.partition_end,
        "rows_in": 0,
        "rows_valid": 0,
        "rows_quarantined": 0,
        "rows_rejected": 0,
    }
    outcome = BatchOutcome(entry)

    def fail(message: str) -> None:
        outcome.failures.append(message)

    # 1. Read (lenient: a missing column or a wrong type is for the suite to report).
    reads: list[ingest_mod.FileRead] = []
    try:
        for uri in batch.files:
            reads.append(ingest_mod.read_file(uri, ingest_cfg, strict=False))
    except InputError as exc:
        entry.update(status="unreadable", expectations=[], failures=[f"rule readable: {exc}"])
        entry["rows_in"] = sum(r.table.num_rows for r in reads)
        entry["rows_rejected"] = entry["rows_in"]
        fail(f"{exc} (rule: readable)")
        return outcome
    formats = sorted({r.format for r in reads})
    entry["format"] = formats[0] if len(formats) == 1 else formats
    problems = [p for r in reads for p in r.problems]
    if problems:
        # Show the suite the first offending file as read; the batch is rejected whatever the rest holds.
        table = next(r.table for r in reads if r.problems)
        sources = None
    else:
        table = pa.concat_tables([r.table for r in reads])
        sources = (
            np.concatenate([np.full(r.table.num_rows, i, dtype=np.int32) for i, r in enumerate(reads)]),
            np.concatenate([np.arange(r.table.num_rows, dtype=np.int64) for r in reads]),
        )
        if any(r.needs_sessions for r in reads):
            table = ingest_mod.sessionize(table, ingest_cfg.session_gap_minutes)
    n = sum(r.table.num_rows for r in reads)
    entry["rows_in"] = n

    # 2. Derived columns and the suite.
    params = _suite_params(batch, validation, formats, now)
    entry["suite"] = {"name": ex.SUITE_NAME, "version": ex.SUITE_VERSION}
    entry["parameters"] = _jsonable(params.__dict__)
    entry["skipped"] = []
    if params.freshness_floor is None:
        entry["skipped"].append({"rule": "freshness", "why": "the partition end is unknown (no dt= folder, no partition_end)"})
    if not params.check_order:
        entry["skipped"].append({"rule": "session_order", "why": f"rows of format {entry['format']} are not in time order"})
    frame_columns = {name: table.column(name) for name in REQUIRED_COLUMNS if name in table.column_names}
    if not problems:
        derived = ex.derive_columns(
            table, floor_us=_us(params.timestamp_floor), end_us=_us(params.partition_end), check_order=params.check_order
        )
        frame_columns.update(derived)
    frame = _to_pandas(pa.table(frame_columns)) if frame_columns else _empty_frame(n)
    # Row rules need canonical columns: with a known schema problem, the schema rules are what this batch is about.
    suite = ex.build_suite(params, row_rules=not problems)
    result = _run_suite(suite, frame, run_name=f"{index:05d}-{batch.name}")
    del frame
    results = list(result.results)
    entry["expectations"] = [_expectation_entry(r) for r in results]

    # 3. Table-level verdicts.
    where = f"{label}"
    for p in problems:
        fail(p.message())
    for r in results:
        level, rule = r.expectation_config.meta.get("level"), r.expectation_config.meta.get("rule")
        column = r.expectation_config.kwargs.get("column")
        if r.success:
            continue
        if level == "schema" and not problems:
            fail(f"{where}: column {column}: rule {rule} ({r.expectation_config.type}) failed")
        elif level == "table":
            observed = (r.result or {}).get("observed_value")
            fail(f"{where}: {'column ' + column + ': ' if column else ''}rule {rule} ({r.expectation_config.type}) "
                 f"failed: observed {_jsonable(observed)}, expected {_jsonable({k: v for k, v in r.expectation_config.kwargs.items() if k.endswith('value')})}")  # fmt: skip
        elif level == "row" and (r.exception_info or {}).get("raised_exception"):
            fail(f"{where}: rule {rule} could not be evaluated: {r.exception_info.get('exception_message')}")
    if problems:
        entry.update(status="rejected", rows_rejected=n)
        return outcome

    # 4. Route rows: GX's unexpected indices of each row rule are the quarantine.
    masks: dict[str, np.ndarray] = {}
    for r in results:
        if r.expectation_config.meta.get("level") != "row" or r.success:
            continue
        rule = r.expectation_config.meta["rule"]
        idx = np.asarray((r.result or {}).get("unexpected_index_list") or [], dtype=np.int64)
        if len(idx) != (r.result or {}).get("unexpected_count", len(idx)):
            raise PipelineError(f"internal error: GX returned {len(idx)} row indices for {r.result.get('unexpected_count')} failures of {rule}")
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        masks[rule] = mask
    bad, reasons = _reasons(masks, n)
    n_bad = int(bad.sum())
    entry["quarantine_reasons"] = {rule: int(m.sum()) for rule, m in masks.items()}
    share = n_bad / n if n else 0.0
    entry["quarantine_share"] = share
    if share > validation.max_quarantine_share:
        fail(f"{where}: rule quarantine_share failed: {n_bad} of {n} rows ({share:.2%}) failed row rules "
             f"{entry['quarantine_reasons']}, above max_quarantine_share {validation.max_quarantine_share:.2%}")  # fmt: skip
    canonical = table.select(EVENT_SCHEMA.names)
    if n_bad:
        file_idx, rows = sources
        bad_idx = pa.array(np.flatnonzero(bad))
        quarantined = canonical.take(bad_idx)
        source_names = pa.array(list(batch.files), type=pa.string()).take(pa.array(file_idx[bad]))
        for name, values in (("reason", reasons), ("source", source_names), ("source_row", pa.array(rows[bad]))):
            quarantined = quarantined.append_column(name, values)
        outcome.quarantine = quarantined.cast(QUARANTINE_SCHEMA)
        entry["rows_quarantined"] = n_bad
    if outcome.failures:
        entry.update(status="failed", rows_rejected=n - n_bad)
        return outcome
    outcome.clean = canonical.filter(pa.array(~bad)) if n_bad else canonical
    entry.update(status="passed", rows_valid=n - n_bad)
    return outcome


def _to_pandas(table: pa.Table) -> Any:
    import pandas as pd

    # Nullable integers stay integers (not float64 with NaN), so reports show row numbers as ints.
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def _empty_frame(n: int) -> Any:
    import pandas as pd

    return pd.DataFrame(index=pd.RangeIndex(n))


def _write_parquet(table: pa.Table, uri: str) -> None:
    fs, path = storage.resolve(uri)
    storage.makedirs(storage.parent(uri))
    pq.write_table(table, path, filesystem=fs, **PARQUET_OPTIONS)


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
    now = dt.datetime.now(dt.UTC)
    gx_context()
    _clear_results()
    outcomes: list[BatchOutcome] = []
    with storage.staged_dir(out_dir, REPORT) as tmp, tempfile.TemporaryDirectory(prefix="gx-docs-") as docs_dir:
        for i, batch in enumerate(ingest_mod.progress(batches, "validating")):
            outcome = _validate_batch(i, batch, ingest_config, validation, now)
            part = f"part-{i:05d}.parquet"
            if outcome.clean is not None:
                _write_parquet(outcome.clean, storage.join(tmp, CLEAN, part))
                outcome.report["clean"] = f"{CLEAN}/{part}"
            if outcome.quarantine is not None:
                _write_parquet(outcome.quarantine, storage.join(tmp, QUARANTINE, part))
                outcome.report["quarantine"] = f"{QUARANTINE}/{part}"
            outcome.report["failures"] = outcome.failures
            outcome.clean = outcome.quarantine = None  # free the batch before the next one
            outcomes.append(outcome)
            log.info(
                "batch %s: %s (%d rows in, %d valid, %d quarantined)",
                batch.name, outcome.report["status"], outcome.report["rows_in"],
                outcome.report["rows_valid"], outcome.report["rows_quarantined"],
            )  # fmt: skip
        _build_data_docs(docs_dir)
        _clear_results()
        storage.upload_dir(docs_dir, storage.join(tmp, DATA_DOCS))
        report = _report(inputs, outcomes, ingest_config, validation)
        storage.write_json(storage.join(tmp, REPORT), report)
    if not report["success"]:
        raise ValidationFailed(
            f"validation failed ({len(report['failures'])} problem(s); report: {storage.join(out_dir, REPORT)}):\n  "
            + "\n  ".join(report["failures"])
        )
    return report


def _report(
    inputs: Sequence[str], outcomes: list[BatchOutcome], ingest_config: IngestConfig, validation: ValidationConfig
) -> dict[str, Any]:
    batches = [o.report for o in outcomes]
    totals = {key: sum(b[key] for b in batches) for key in ("rows_in", "rows_valid", "rows_quarantined", "rows_rejected")}
    reconciled = totals["rows_in"] == totals["rows_valid"] + totals["rows_quarantined"] + totals["rows_rejected"]
    if not reconciled:
        raise PipelineError(f"internal error: rows do not reconcile: {totals}")
    reasons: dict[str, int] = {}
    summary: dict[str, dict[str, Any]] = {}
    for b in batches:
        for rule, count in b.get("quarantine_reasons", {}).items():
            reasons[rule] = reasons.get(rule, 0) + count
        for e in b.get("expectations", []):
            key = f"{e['rule']}:{e['column'] or ''}"
            s = summary.setdefault(
                key, {"rule": e["rule"], "level": e["level"], "expectation": e["expectation"], "column": e["column"],
                      "batches": 0, "failed_batches": 0, "unexpected_count": 0},
            )  # fmt: skip
            s["batches"] += 1
            s["failed_batches"] += 0 if e["success"] else 1
            s["unexpected_count"] += e["unexpected_count"] or 0
    failures = [f for o in outcomes for f in o.failures]
    success = bool(outcomes) and not failures
    return _jsonable(
        {
            "success": success,
            **totals,
            "reconciled": reconciled,
            "quarantine_share": totals["rows_quarantined"] / totals["rows_in"] if totals["rows_in"] else 0.0,
            "quarantine_reasons": reasons,
            "failures": failures,
            "expectations": list(summary.values()),
            "suite": {"name": ex.SUITE_NAME, "version": ex.SUITE_VERSION},
            "inputs": [storage.normalize(i) for i in inputs],
            "config": {"ingest": to_dict(ingest_config), "validation": to_dict(validation)},
            "clean": CLEAN if totals["rows_valid"] else None,
            "quarantine": QUARANTINE if totals["rows_quarantined"] else None,
            "data_docs": f"{DATA_DOCS}/index.html",
            "batches": batches,
            "created_at": dt.datetime.now(dt.UTC),
        }
    )


def clean_uri(out_dir: str) -> str:
    """Where the clean rows of a validation output live (the input of ``build``)."""
    return storage.join(out_dir, CLEAN)


