"""The layout of a validation output folder (see :mod:`pipeline.data.validate`): its file names, how a batch's
rows are written there, and how ``build`` finds the clean rows (through ``report.json``). No GX import."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import publish, storage
from pipeline.errors import InputError

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


def write_part(table: pa.Table, out_dir: str, folder: str, index: int) -> str:
    """Write a batch's rows to ``FOLDER/part-<index>-<hash>.parquet`` under ``out_dir``; returns that path."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **PARQUET_OPTIONS)  # encoded first: the name carries the hash of the bytes
    data = sink.getvalue().to_pybytes()
    relative = f"{folder}/{publish.content_name(f'part-{index:05d}', data, '.parquet')}"
    storage.write_bytes(storage.join(out_dir, relative), data)
    return relative


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
