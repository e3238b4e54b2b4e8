"""Local work folders of builds (their files, their spill) and the sweep that removes those a killed build
left behind."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from pipeline import publish

log = logging.getLogger(__name__)


WORK_PREFIXES = ("pipeline-build-", "pipeline-spill-")  # local work folders of a build (its files, its spill)


def sweep_stale_work_dirs(root: str | None = None, older_than_s: float = publish.STALE_STAGING_SECONDS) -> list[str]:
    """Remove the work folders (:data:`WORK_PREFIXES`) that killed builds left in ``root`` (default: the temp
    folder), once nothing in them changed for ``older_than_s``; returns what was removed. A build that ends,
    fails or gets SIGTERM (the CLI turns it into an exit) removes its own; only SIGKILL leaves one behind."""
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and e.name.startswith(WORK_PREFIXES)]
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            touched = max([entry.stat().st_mtime] + [e.stat().st_mtime for e in os.scandir(entry.path)])
        except OSError:
            continue  # removed meanwhile
        if now - touched > older_than_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        log.info("removed %d stale build work folder(s) in %s", len(removed), root)
    return removed
