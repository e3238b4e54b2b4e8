"""The ``validate`` (one mapped task per partition) and ``build`` tasks: from click logs to a session dataset.

Validation runs the Great Expectations suite on one day (bad rows go to quarantine, a table-level failure
raises ValidationFailed naming the partition); the build turns the window's validated days into the
Parquet session dataset (train / valid / test) and says what the Asset event carries. GX and pyarrow are
imported inside the functions: the DAG file imports this module while it is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.errors import ValidationFailed
from pipeline.flow.contracts import Dataset, Partition, PartitionReport, RunPlan
from pipeline.flow.settings import config_of, join

log = logging.getLogger(__name__)


def validate_partition(partition: Partition, run: RunPlan) -> PartitionReport:
    """Run the GX suite on one day's partition; bad rows go to quarantine, a table-level failure raises.

    A day before the run's window whose own run already validated it (a passing report) is reused.
    """
    from pipeline import storage  # pyarrow and GX: not at DAG parse time
    from pipeline.data.validate import validate

    cfg = config_of(run)
    out = partition.out_uri
    report_uri = join(out, "report.json")
    if partition.reuse and storage.exists(report_uri):
        report = storage.read_json(report_uri)
        if report.get("success"):
            log.info("partition %s: reusing the passing validation report %s", partition.date, report_uri)
            return _partition_report(partition, report, reused=True)
    log.info("validating %s -> %s", partition.input_uri, out)
    try:
        report = validate([partition.input_uri], out, cfg.ingest, cfg.validation)
    except ValidationFailed as exc:  # the message names the file, column, rule and the report
        raise ValidationFailed(f"partition {partition.date} ({partition.input_uri}): {exc}") from exc
    result = _partition_report(partition, report, reused=False)
    log.info(
        "partition %s: %d rows in, %d valid, %d quarantined (report: %s)",
        partition.date,
        result.rows_in,
        result.rows_valid,
        result.rows_quarantined,
        report_uri,
    )
    return result


def _partition_report(partition: Partition, report: Mapping[str, Any], *, reused: bool) -> PartitionReport:
    out = partition.out_uri
    return PartitionReport(
        date=partition.date,
        input_uri=partition.input_uri,
        out_uri=out,
        report_uri=join(out, "report.json"),
        data_docs_uri=join(out, str(report.get("data_docs") or "data_docs/index.html")),
        rows_in=int(report.get("rows_in", 0)),
        rows_valid=int(report.get("rows_valid", 0)),
        rows_quarantined=int(report.get("rows_quarantined", 0)),
        reused=reused,
    )


def build_dataset(run: RunPlan, reports: Sequence[PartitionReport]) -> Dataset:
    """Build the session dataset of the training window from the validated partitions."""
    from pipeline.data.sessions import build_dataset as build  # pyarrow: not at DAG parse time

    cfg = config_of(run)
    ordered = sorted(reports, key=lambda r: r.date)
    inputs = [r.out_uri for r in ordered]  # validation outputs: build reads their clean rows
    log.info(
        "building %s from %d validated partitions (%s .. %s)",
        run.dataset_uri,
        len(inputs),
        ordered[0].date,
        ordered[-1].date,
    )
    manifest = build(inputs, run.dataset_uri, cfg.ingest, cfg.build)
    counts = manifest.get("counts", {})
    return Dataset(
        uri=run.dataset_uri,
        fingerprint=str(manifest.get("fingerprint", "")),
        counts=counts,
        partitions=[r.date for r in ordered],
        # Partition by partition in validation, then whole sessions over the window in the build.
        rows_quarantined=sum(r.rows_quarantined for r in ordered)
        + int(counts.get("quarantined", {}).get("events", 0)),
        reports=[r.report_uri for r in ordered],
    )


def asset_extra(run: RunPlan, dataset: Dataset) -> dict[str, Any]:
    """What the Asset event tells downstream DAGs: which dataset, for which date, from which run."""
    return {
        "uri": dataset.uri,
        "date": run.date,
        "fingerprint": dataset.fingerprint,
        "dag_run_id": run.run_id,
    }
