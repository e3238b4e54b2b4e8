"""The validation report: GX results as JSON, one line per failure, and the run's totals, which must reconcile
(``rows_in == rows_valid + rows_quarantined + rows_rejected`` for the run, every batch and every file)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import IngestConfig, ValidationConfig, to_dict
from pipeline.data import expectations as ex
from pipeline.data.validation_output import CLEAN, DATA_DOCS, QUARANTINE
from pipeline.errors import PipelineError


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
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


def expectation_entry(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    res = result.result or {}
    info = result.exception_info or {}
    return jsonable(
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


def describe_failure(where: str, result: Any) -> str:
    config = result.expectation_config
    column = config.kwargs.get("column")
    bounds = {k: v for k, v in config.kwargs.items() if k.endswith("_value")}
    observed = (result.result or {}).get("observed_value")
    return (
        f"{where}: {'column ' + column + ': ' if column else ''}rule {config.meta.get('rule')} ({config.type}) "
        f"failed: observed {jsonable(observed)}, expected {jsonable(bounds) or config.kwargs.get('type_', '')}"
    )


def build_report(
    inputs: Sequence[str],
    batches: list[dict[str, Any]],
    failures: list[str],
    ingest_config: IngestConfig,
    validation: ValidationConfig,
    workers: int,
) -> dict[str, Any]:
    """The run's report from its batches' entries (in batch order) and every failure they found."""
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
    return jsonable(
        {
            "success": bool(batches) and not failures,
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
