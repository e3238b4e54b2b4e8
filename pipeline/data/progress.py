"""Progress over long loops: a tqdm bar on a terminal, one log line per item otherwise (Airflow task logs)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on a TTY, or with one log line per item otherwise."""
    items = list(items) if total is None else items
    total = len(items) if total is None else total  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    for i, item in enumerate(items, 1):
        log.info("%s %d/%d", desc, i, total)
        yield item
