"""Validate click-log batches with the Great Expectations suite; route rows to clean / quarantine.

``validate(inputs, out_dir)`` writes, all-or-nothing (``report.json`` last)::

    DIR/report.json                         success, counts, per-batch and per-expectation results
    DIR/clean/part-NNNNN-HASH.parquet       rows that passed, canonical schema, input order (one per batch)
    DIR/quarantine/part-NNNNN-HASH.parquet  rows that failed a row rule: canonical columns + reason, source,
                                            source_row
    DIR/data_docs/index.html                GX Data Docs of every batch

``NNNNN`` is the batch index (listing order = batch order) and ``HASH`` the first 16 hex digits of the
file's sha256 (:func:`pipeline.publish.content_name`): a name never changes its bytes, so a reader that
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

Where: this module plans the batches and runs them on helper processes; :mod:`~pipeline.data.batch` is one
batch start to end, :mod:`~pipeline.data.gx_runner` the Great Expectations context, :mod:`~pipeline.data.quarantine`
the quarantined rows, :mod:`~pipeline.data.report` the report, :mod:`~pipeline.data.validation_output` the
output's file names and how ``build`` reads it.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from pipeline import publish, storage
from pipeline.config import IngestConfig, ValidationConfig, env
from pipeline.data import expectations as ex
from pipeline.data import ingest as ingest_mod
from pipeline.data.batch import BatchOutcome, BatchTask, run_batch, suite_params, worker_init
from pipeline.data.gx_runner import build_data_docs, clear_results, gx_context, import_results
from pipeline.data.inputs import Batch
from pipeline.data.progress import progress
from pipeline.data.report import build_report
from pipeline.data.validation_output import CLEAN, DATA_DOCS, REPORT
from pipeline.errors import InputError, ValidationFailed

# What other modules read through here (the output's names live in pipeline.data.validation_output).
__all__ = ["CLEAN", "REPORT", "validate"]

log = logging.getLogger(__name__)

MAX_WORKERS = 4
AUTO_PARALLEL_BYTES = 64 << 20  # below this much input, helper processes cost more than they save
WORK_IN_PARENT = True  # the calling process validates batches too (tests turn it off to exercise the helpers)
# Helpers are forked on Linux (Arrow, NumPy and logging re-initialize their threads and locks after a fork):
# no main-module re-import, and they are forked after this process has imported GX (seconds of CPU each),
# so they inherit it. Spawned helpers start first and import GX alongside this process.
START_METHOD = env().validate_start_method or ("fork" if sys.platform == "linux" else "spawn")


def _can_start_helpers() -> bool:
    """Spawned workers re-import the main module: that needs one (not an interactive or ``-c`` session)."""
    if START_METHOD == "fork":
        return True
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.exists(path)


def _workers(validation: ValidationConfig, batches: Sequence[Batch]) -> int:
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
    pool = ProcessPoolExecutor(workers - 1, mp_context=context, initializer=worker_init)
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
        return [run_batch(t) for t in progress(tasks, "validating")]
    done: dict[int, BatchOutcome] = {}
    pending = list(tasks)
    futures: dict[Any, BatchTask] = {}
    try:
        while pending or futures:
            for future in [f for f in futures if f.done()]:
                outcome = future.result()
                import_results(outcome.gx_results)
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
    clear_results()
    outcomes: list[BatchOutcome] = []
    with publish.staged_dir(out_dir, REPORT) as tmp, tempfile.TemporaryDirectory(prefix="gx-docs-") as docs_dir:
        tasks = [BatchTask(i, b, ingest_config, validation, now, tmp) for i, b in enumerate(batches)]
        outcomes = _run_batches(tasks, pool, workers - 1)
        for o in outcomes:
            o.report["failures"] = o.failures
            log.info(
                "batch %s: %s (%d rows in, %d valid, %d quarantined)",
                o.report["name"], o.report["status"], o.report["rows_in"], o.report["rows_valid"], o.report["rows_quarantined"],
            )  # fmt: skip
        last = tasks[-1]
        build_data_docs(docs_dir, ex.build_suite(suite_params(last.batch, validation, True, now)))
        clear_results()
        storage.upload_dir(docs_dir, storage.join(tmp, DATA_DOCS))
        entries, failures = [o.report for o in outcomes], [f for o in outcomes for f in o.failures]
        report = build_report(inputs, entries, failures, ingest_config, validation, workers)
        storage.write_json(storage.join(tmp, REPORT), report)
    if not report["success"]:
        raise ValidationFailed(
            f"validation failed ({len(report['failures'])} problem(s); report: {storage.join(out_dir, REPORT)}):\n  "
            + "\n  ".join(report["failures"])
        )
    return report
