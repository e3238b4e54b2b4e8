"""Which rows of a batch are quarantined and why, the quarantine table (failed row rules and the lines set aside
while reading, each with its file, row, line and raw text), and the per-file counts that reconcile."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data import expectations as ex
from pipeline.data.canonical import FileRead
from pipeline.data.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA


def row_reasons(masks: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, pa.Array]:
    """Rows failing any row rule and, for each, its failed rule names joined by ``;``."""
    bits = np.zeros(n, dtype=np.int64)
    for i, rule in enumerate(ex.ROW_RULES):
        if rule in masks:
            bits |= masks[rule].astype(np.int64) << i
    bad = bits != 0
    codes, inverse = np.unique(bits[bad], return_inverse=True)
    labels = [";".join(r for i, r in enumerate(ex.ROW_RULES) if int(c) >> i & 1) for c in codes]
    return bad, pa.array(labels, type=pa.string()).take(pa.array(inverse.reshape(-1).astype(np.int64)))


def quarantine_table(
    canonical: pa.Table, bad: np.ndarray, reasons: pa.Array, reads: list[FileRead], files: Sequence[str]
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


def file_counts(reads: list[FileRead], bad: np.ndarray | None, status: str) -> list[dict[str, Any]]:
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
