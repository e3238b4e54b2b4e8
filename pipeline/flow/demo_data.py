"""The demo's click logs: generated once, or a local / ``s3://`` folder of ``dt=YYYY-MM-DD/`` partitions used in
place, or any click log ``pipeline.data.ingest`` reads, split into daily Parquet partitions (:func:`import_by_day`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline import storage
from pipeline.config import IngestConfig
from pipeline.data import ingest
from pipeline.data.generate import generate_clicks
from pipeline.data.schema import EVENT_SCHEMA
from pipeline.errors import InputError


def generate_demo_data(
    out_dir: Path,
    say: Callable[[str], None],
    *,
    days: int,
    sessions_per_day: int,
    n_items: int,
    seed: int,
    end_date: dt.date | None,
) -> str:
    """Generate the click logs once (``end_date`` None: up to yesterday, UTC); a later demo with the same
    options reuses them."""
    end = end_date or (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))
    start = end - dt.timedelta(days=days - 1)
    wanted = {"days": days, "start_date": start.isoformat(), "sessions_per_day": sessions_per_day,
              "n_items": n_items, "seed": seed}  # fmt: skip
    summary = out_dir / "_generated.json"
    if summary.exists():
        previous = json.loads(summary.read_text())
        if {k: previous.get(k) for k in wanted} == wanted:
            say(f"  reusing the click logs generated in {out_dir} ({start} .. {end})")
            return str(out_dir)
        shutil.rmtree(out_dir)
    say(f"  generating {days} days ({start} .. {end}), {sessions_per_day} sessions/day, {n_items} items")
    generate_clicks(str(out_dir), days=days, start_date=start, sessions_per_day=sessions_per_day,
                    n_items=n_items, seed=seed)  # fmt: skip
    return str(out_dir)


def partition_days(data_uri: str) -> list[dt.date]:
    """The days of the ``dt=YYYY-MM-DD`` folders directly under a local folder or ``s3://`` prefix."""
    fs, path = storage.resolve(data_uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except OSError as exc:
        raise InputError(f"cannot list {data_uri}: {exc}") from None
    days = []
    for entry in entries:
        name = entry.path.rstrip("/").rsplit("/", 1)[-1]
        if entry.type == pafs.FileType.Directory and name.startswith("dt="):
            with contextlib.suppress(ValueError):
                days.append(dt.date.fromisoformat(name[3:]))
    return sorted(days)


IMPORT_VERSION = 3  # bumped when the import writes something new: older imports are redone


@dataclass(frozen=True)
class Source:
    """A click log read for the import: canonical events, what its format implies, and the lines set aside."""

    events: Any  # pa.Table of canonical events
    format: str  # one name per distinct format of its files, joined by "+"
    ordered: bool  # every file's rows are time-ordered within a session
    rejected: Any  # pa.Table: file, line, reason, raw of each malformed line (not imported)


def read_source(source: str) -> Source:
    """Read a click log as ``pipeline.data.ingest`` does, setting malformed lines aside instead of failing on the
    first one; a file that is not its format at all (missing column, wrong type) is still an error."""
    files, _ = ingest.list_inputs([source])
    reads = [ingest.read_file(uri, strict=False) for uri in files]
    for read in reads:
        if read.problems:
            raise InputError(read.problems[0].message())
    table = pa.concat_tables([r.table for r in reads]) if reads else EVENT_SCHEMA.empty_table()
    if any(r.needs_sessions for r in reads):  # user-only log: sessions over everything read
        table = ingest.sessionize(ingest.decode_ids(table), IngestConfig().session_gap_minutes)
    rejected = pa.concat_tables(
        [ingest.REJECT_SCHEMA.empty_table().add_column(0, "file", pa.array([], pa.string()))]
        + [
            r.rejected.add_column(0, "file", pa.array([r.uri] * r.rejected.num_rows, pa.string()))
            for r in reads
        ]
    )
    fmt = "+".join(sorted({r.format for r in reads}))
    return Source(table, fmt, all(r.ordered for r in reads), rejected)


def import_by_day(source: str, out_dir: Path, say: Callable[[str], None]) -> str:
    """Split a click log that is not partitioned by day (e.g. one GRU4Rec TSV) into ``dt=YYYY-MM-DD/``
    Parquet partitions of canonical events (UTC days), which is what the DAG reads.

    What the source format implies travels in each file's Parquet metadata (``pipeline.format``,
    ``pipeline.ordered``): validation then applies the session-order rule only where the source's rows
    are time-ordered within a session (not Diginetica's), as it does on the source itself. Malformed lines
    are set aside in ``_rejected.parquet`` (file, line, reason, raw text) and the rest is imported.
    """
    marker = out_dir / "_imported.json"
    wanted = {"source": storage.normalize(source), "version": IMPORT_VERSION}
    if marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in wanted} == wanted:
        say(f"  reusing {out_dir} (daily partitions of {source})")
        return str(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    read = read_source(source)
    out_dir.mkdir(parents=True)
    fmt = read.format
    events = read.events.replace_schema_metadata(
        {
            **(read.events.schema.metadata or {}),
            ingest.FORMAT_KEY: fmt.encode(),
            ingest.ORDERED_KEY: str(read.ordered).lower().encode(),
        }
    )
    counts = _write_days(events, out_dir)
    undated = events.num_rows - sum(counts.values())
    rejected = out_dir / "_rejected.parquet"  # a "_" name: the DAG's listing skips it
    if read.rejected.num_rows:
        pq.write_table(read.rejected, rejected)
    marker.write_text(
        json.dumps(
            {
                **wanted,
                "format": fmt,
                "ordered": read.ordered,
                "rows": counts,
                "undated": undated,
                "rejected_lines": read.rejected.num_rows,
            },
            indent=2,
        )
    )
    say(f"  split {source} ({fmt} format) into {len(counts)} daily partitions under {out_dir}")
    if read.rejected.num_rows:
        reasons = pc.value_counts(read.rejected.column("reason")).to_pylist()
        summary = ", ".join(f"{r['values']} {r['counts']}" for r in reasons)
        say(
            f"  {read.rejected.num_rows} malformed line(s) set aside ({summary}), the rest imported: see {rejected}"
        )
    if undated:
        say(f"  {undated} events have no timestamp and belong to no day: left out (see {marker})")
    return str(out_dir)


def _write_days(events: pa.Table, out_dir: Path) -> dict[str, int]:
    """One ``dt=YYYY-MM-DD/events.parquet`` per UTC day of the events; rows per day (undated rows: none)."""
    days = pc.strftime(events.column("timestamp"), format="%Y-%m-%d")
    counts = {}
    for day in sorted(d for d in pc.unique(days).to_pylist() if d is not None):
        part = events.filter(pc.equal(days, day))
        (out_dir / f"dt={day}").mkdir()
        pq.write_table(part, out_dir / f"dt={day}" / "events.parquet")
        counts[day] = part.num_rows
    return counts
