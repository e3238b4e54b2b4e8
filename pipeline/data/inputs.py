"""Which files an input names (folders give their data files) and how they group into validation batches.

A batch is one ``dt=YYYY-MM-DD`` partition folder (all its files) or one stand-alone file; a partition's end
(its day + 1, UTC) is what the freshness rule and the late-data sensor measure against.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline import storage
from pipeline.data.formats import PARQUET_SUFFIXES, base_name

log = logging.getLogger(__name__)


PARTITION_DIR = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})(?=/)")
# In folders only files with these names are read (compressed or not); others are skipped and reported.
DATA_SUFFIXES = (".tsv", ".tab", ".csv", ".dat") + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Batch:
    """A unit of validation: one ``dt=`` partition folder (all its files) or one stand-alone file."""

    name: str
    files: tuple[str, ...]
    partition_end: dt.datetime | None  # exclusive end of a dt= partition (its day + 1), else None
    skipped: tuple[str, ...] = ()  # files of the folder that are not data (README.txt, .crc, _SUCCESS, ...)


def partition_end(uri: str) -> dt.datetime | None:
    """The exclusive end of the ``dt=YYYY-MM-DD`` partition holding ``uri`` (the next midnight, UTC)."""
    matches = list(PARTITION_DIR.finditer(str(uri)))
    if not matches:
        return None
    match = matches[-1]  # the innermost dt= folder wins
    try:
        day = dt.date.fromisoformat(match.group(1))
    except ValueError:
        return None
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def _partition_dir(uri: str) -> str | None:
    """The innermost ``dt=YYYY-MM-DD`` folder holding ``uri``, if any."""
    matches = list(PARTITION_DIR.finditer(str(uri)))
    return str(uri)[: matches[-1].end()] if matches else None


def is_data_file(name: str) -> bool:
    """A file a folder's listing reads: a known data extension (README.txt, .crc, .json, ... are not)."""
    return base_name(name).endswith(DATA_SUFFIXES)


def list_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(data files, skipped files)`` of the inputs: folders give their data files (see :func:`is_data_file`;
    hidden and ``_`` names are skipped too), a file named directly is always read."""
    skipped: list[str] = []
    files = storage.expand(inputs, accept=is_data_file, skipped=skipped)
    if skipped:
        log.info("skipped %d file(s) that are not data: %s", len(skipped), ", ".join(skipped[:5]))
    return files, skipped


def plan_batches(inputs: Sequence[str]) -> list[Batch]:
    """Group input files into validation batches: one per ``dt=`` folder, one per other file."""
    files, skipped = list_inputs(inputs)
    groups: dict[str, list[str]] = {}
    for uri in files:
        groups.setdefault(_partition_dir(uri) or uri, []).append(uri)
    # A skipped file is reported with the batch of its dt= folder, else with the first batch of its folder.
    owner = {key: key for key in groups}
    for key in groups:
        owner.setdefault(storage.parent(key), key)
    passed_over: dict[str, list[str]] = {}
    first = next(iter(groups), None)
    for uri in skipped:
        batch_key = owner.get(_partition_dir(uri) or storage.parent(uri), first)
        if batch_key is not None:
            passed_over.setdefault(batch_key, []).append(uri)
    return [
        Batch(
            name=storage.basename(key),
            files=tuple(files),
            partition_end=partition_end(files[0]),
            skipped=tuple(passed_over.get(key, ())),
        )
        for key, files in groups.items()
    ]
