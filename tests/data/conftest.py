"""Fixtures for the data-layer tests: tiny hand-written click logs and a generated one with known corruption."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import EVENT_SCHEMA

DAY = dt.date(2024, 3, 10)


def utc(day: dt.date, hh: int = 0, mm: int = 0, ss: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hh, mm, ss, tzinfo=dt.UTC)


@pytest.fixture
def events() -> Callable[..., pa.Table]:
    """Build a canonical events table from ``(session, item, datetime[, user, event_type])`` tuples."""

    def make(rows: list[tuple]) -> pa.Table:
        cols = list(zip(*rows, strict=True)) if rows else [[], [], []]
        n = len(rows)
        user = list(cols[3]) if len(cols) > 3 else [None] * n
        etype = list(cols[4]) if len(cols) > 4 else [None] * n
        return pa.table(
            [pa.array(cols[0], pa.string()), pa.array(cols[1], pa.string()),
             pa.array(cols[2], pa.timestamp("us", tz="UTC")), pa.array(user, pa.string()), pa.array(etype, pa.string())],
            schema=EVENT_SCHEMA,
        )  # fmt: skip

    return make


@pytest.fixture
def write_partition(tmp_path: Path, events) -> Callable[..., Path]:
    """Write rows as ``<root>/dt=YYYY-MM-DD/events.parquet``; returns the partition folder."""

    def write(rows: list[tuple], day: dt.date = DAY, root: Path | None = None) -> Path:
        folder = (root or tmp_path / "clicks") / f"dt={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(events(rows), folder / "events.parquet")
        return folder

    return write


@pytest.fixture
def good_day() -> Callable[..., list[tuple]]:
    """Rows of a clean day: sessions of ``length`` events one minute apart, the last ones late in the day."""

    def rows(day: dt.date = DAY, sessions: int = 40, length: int = 4, prefix: str = "s") -> list[tuple]:
        out = []
        for s in range(sessions):
            start = utc(day, 1 + (s * 22) // sessions, (s * 7) % 60)
            for k in range(length):
                out.append((f"{prefix}{s}", f"i{(s + k) % 9}", start + dt.timedelta(minutes=k)))
        return out

    return rows


@pytest.fixture
def tree_digest() -> Callable[[Path], dict[str, str]]:
    """sha256 of every file under a folder (to prove inputs were not modified and re-runs are identical)."""

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    return digest
