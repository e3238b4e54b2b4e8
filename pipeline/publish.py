"""Publishing output folders all or nothing, over :mod:`pipeline.storage` (local paths and ``s3://``).

Outputs that must never look complete while half-written (session datasets, validation results) are written
with :func:`staged_dir`: everything goes to a hidden temporary sibling ``.NAME.tmp-<id>`` first and is then
published, with a marker file (``manifest.json``, ``report.json``) that lists the output's data files.

- Locally the publish is a directory rename swap (for an instant there is no output at all, never a partial
  one).
- On S3 the data files are copied into place first, the marker is copied last, and only then are the
  previous version's files deleted. Data files have content-addressed names (see :func:`content_name`), so
  a name never changes its bytes; the marker is one object, replaced in one atomic step, so there is always
  a marker and it always lists a complete version. A reader that follows the marker (reads it, then the
  files it lists) sees one complete version; a listed file that has vanished means a newer version was
  published meanwhile: re-read the marker (:func:`read_committed` does this). A plain listing of the
  folder (e.g. ``pyarrow.dataset`` on ``DIR/train``) may see the old and the new files together while a
  publish is in progress: readers must follow the marker instead.

A run killed before its publish (SIGKILL, a lost machine) leaves its ``.NAME.tmp-<id>`` (locally perhaps a
``.NAME.old-<id>``) behind; the next :func:`staged_dir` of the same output removes those that nothing has
written to for :data:`STALE_STAGING_SECONDS` (see :func:`sweep_stale_staging`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import InputError, PipelineError

log = logging.getLogger(__name__)

# A staging folder nothing has written to for this long belongs to a run that died (a writer of the same
# output that is still running has written to its own more recently).
STALE_STAGING_SECONDS = 6 * 3600
CONTENT_HASH_CHARS = 16  # sha256 hex digits in a content-addressed name (64 bits: no collisions in practice)
_CONTENT_NAME = re.compile(r".-[0-9a-f]{16,64}(\.[A-Za-z0-9]+)*$")
COPY_THREADS = 8  # S3 copies are server-side requests: a few in flight at once
READ_ATTEMPTS = 5  # read_committed: versions to try when each is replaced while being read

T = TypeVar("T")


def content_name(stem: str, data: bytes, suffix: str) -> str:
    """``STEM-<first 16 hex digits of sha256(data)>SUFFIX``: a name that only ever holds these bytes."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:CONTENT_HASH_CHARS]}{suffix}"


def is_content_addressed(name: str) -> bool:
    """Whether a file name ends in a 16 to 64 hex digit hash (``part-00003-0f1e2d3c4b5a6978.parquet``)."""
    return bool(_CONTENT_NAME.search(posixpath.basename(name)))


# ---------------------------------------------------------------------------------------------
# Staged (all-or-nothing) directory outputs


@dataclass(frozen=True)
class Published:
    """What :func:`publish` did, as paths relative to the output folder."""

    # Written into the output, the marker last (locally: every file, moved in by the rename).
    copied: tuple[str, ...]
    # S3: already there under the same content-addressed name and size, so not copied again.
    reused: tuple[str, ...]
    # Files of the previous version (or of a killed publish), deleted after the switch.
    removed: tuple[str, ...]


def _temp_sibling(uri: str, tag: str) -> str:
    return storage.join(storage.parent(uri), f".{storage.basename(uri)}.{tag}-{uuid.uuid4().hex[:12]}")


def _staging_pattern(name: str) -> re.Pattern[str]:
    # This output's leftovers only: ".ds.tmp-<id>", neither ".ds2.tmp-<id>" nor ".ds.tmp-a.tmp-<id>"
    # (which belongs to an output named "ds.tmp-a").
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[0-9a-f]{{12}}")


def _check_publishable(final_uri: str) -> None:
    root = not storage.basename(final_uri) or (storage.is_s3(final_uri) and "/" not in storage.resolve(final_uri)[1])
    if root:
        raise PipelineError(f"cannot write a dataset at the root of a store: {final_uri!r}")


def _newest_mtime(fs: pafs.FileSystem, info: pafs.FileInfo) -> float | None:
    """The newest modification time (epoch seconds) of a file or of anything in a folder; None if unknown."""
    infos = [info]
    if info.type == pafs.FileType.Directory:
        infos += fs.get_file_info(pafs.FileSelector(info.path, recursive=True, allow_not_found=True))
    times = [i.mtime.replace(tzinfo=i.mtime.tzinfo or dt.UTC) for i in infos if i.mtime is not None]
    return max(times).timestamp() if times else None


def sweep_stale_staging(final_uri: str, older_than_s: float = STALE_STAGING_SECONDS) -> list[str]:
    """Remove what killed runs left beside ``final_uri``: its ``.NAME.tmp-<id>`` and ``.NAME.old-<id>``.

    Only leftovers of this very output, and only those nothing was written to for ``older_than_s`` seconds
    (a writer of the same output that is still running is younger); one whose age is unknown (an S3 prefix
    without objects) is kept. Returns the removed URIs. This is housekeeping: a leftover that cannot be
    inspected or removed is logged and skipped, never an error.
    """
    name = storage.basename(final_uri)
    fs, parent_path = storage.resolve(storage.parent(final_uri))
    try:
        siblings = fs.get_file_info(pafs.FileSelector(parent_path, allow_not_found=True))
    except OSError as exc:
        log.warning("cannot look for stale staging folders beside %s: %s", final_uri, exc)
        return []
    pattern = _staging_pattern(name)
    now = time.time()
    removed = []
    final_missing = not storage.exists(final_uri)
    for info in siblings:
        if not pattern.fullmatch(posixpath.basename(info.path)):
            continue
        uri = storage.to_uri(fs, info.path)
        if final_missing and ".old-" in posixpath.basename(info.path):
            # A local publish killed between its two renames: this is the last published version. Keep it.
            log.warning("%s is missing but %s holds its previous version: rename it back to restore it", final_uri, uri)
            continue
        try:
            newest = _newest_mtime(fs, info)
            if newest is None or now - newest < older_than_s:
                continue
            storage.remove(uri)
        except OSError as exc:
            log.warning("cannot remove stale staging %s: %s", uri, exc)
            continue
        log.warning("removed %s: left by a killed run (untouched for %.1f h)", uri, (now - newest) / 3600)
        removed.append(uri)
    return removed


@contextmanager
def staged_dir(final_uri: str, marker: str) -> Iterator[str]:
    """Write a directory under a temporary name, then publish it as ``final_uri`` (see :func:`publish`).

    Yields the temporary URI to write into. On a normal exit the temporary directory (which must contain
    ``marker``) replaces ``final_uri``; on an exception it is deleted and ``final_uri`` is left as it was.
    Leftovers of killed runs of the same output are swept first (:func:`sweep_stale_staging`).
    """
    _check_publishable(final_uri)
    sweep_stale_staging(final_uri)
    tmp = _temp_sibling(final_uri, "tmp")
    storage.makedirs(tmp)
    try:
        yield tmp
        if not storage.exists(storage.join(tmp, marker)):
            raise PipelineError(f"internal error: {marker} missing from {tmp} before publishing")
        publish(tmp, final_uri, marker)
    except BaseException:
        storage.remove(tmp)
        raise


def _file_sizes(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    """Each file under ``root`` (recursive) by relative path, with its size; empty if ``root`` is missing."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) :].lstrip("/"): int(i.size or 0) for i in infos if i.type == pafs.FileType.File}


def publish(tmp_uri: str, final_uri: str, marker: str) -> Published:
    """Replace ``final_uri`` by the finished directory ``tmp_uri``, which holds ``marker``.

    Locally: a rename swap. On S3: (1) the files other than the marker are copied into ``final_uri`` beside
    the previous version's (skipped where ``final_uri`` already holds the same content-addressed name with
    the same size: those bytes are identical); (2) the marker is copied last, one atomic replacement that
    switches readers from the old version to the new one, so there is a marker at every moment; (3) only then
    are the files the new version does not have deleted (the previous version's, a killed publish's);
    (4) ``tmp_uri`` is deleted. A reader that follows the marker always finds a complete version, and a
    listed file that has vanished means a newer version was published meanwhile (re-read the marker). Only
    content-addressed names are immutable: another name the new version also has is overwritten in place
    before the switch. A listing of the folder may see both versions' files while a publish runs.
    """
    fs, tmp_path = storage.resolve(tmp_uri)
    if fs.get_file_info(f"{tmp_path}/{marker}").type != pafs.FileType.File:
        raise PipelineError(f"internal error: {marker} missing from {tmp_uri} before publishing")
    if storage.is_s3(final_uri):
        return _publish_s3(tmp_uri, final_uri, marker)
    return _publish_local(tmp_uri, final_uri)


def _publish_local(tmp_uri: str, final_uri: str) -> Published:
    fs = pafs.LocalFileSystem()
    tmp, final = Path(storage.local_path(tmp_uri)), Path(storage.local_path(final_uri))
    new, old = _file_sizes(fs, str(tmp)), _file_sizes(fs, str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # Two renames: for a moment there is no output at all, never a half-written one.
        previous = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(final, previous)
        os.rename(tmp, final)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return Published(tuple(sorted(new)), (), tuple(sorted(set(old) - set(new))))


def _parallel(fn: Callable[[str], object], items: Sequence[str]) -> None:
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(COPY_THREADS, len(items))) as pool:
        list(pool.map(fn, items))  # list(): the first failure is raised here


def _delete_file(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass  # already gone (another publish of the same output removed it)


def _publish_s3(tmp_uri: str, final_uri: str, marker: str) -> Published:
    fs, tmp_path = storage.resolve(tmp_uri)
    _, final_path = storage.resolve(final_uri)
    new = _file_sizes(fs, tmp_path)
    # Listed before anything moves: a file that appears later belongs to a concurrent publish, not to us.
    old = _file_sizes(fs, final_path)
    data = sorted(r for r in new if r != marker)
    reused = [r for r in data if old.get(r) == new[r] and is_content_addressed(r)]
    copied = sorted(set(data) - set(reused))
    # 1. The new files beside the old ones: a reader of the old marker still finds everything it lists.
    _parallel(lambda r: fs.copy_file(f"{tmp_path}/{r}", f"{final_path}/{r}"), copied)
    # 2. The switch: one object replaced in one step; readers see the old marker or the new one, never none.
    fs.copy_file(f"{tmp_path}/{marker}", f"{final_path}/{marker}")
    # 3. Only now the files no marker lists any more (a reader still on the old marker re-reads it). One at a
    #    time: concurrent deletes in one folder stall for seconds on SeaweedFS (retries with back-off).
    removed = sorted(set(old) - set(new))
    for relative in removed:
        _delete_file(fs, f"{final_path}/{relative}")
    fs.delete_dir(tmp_path)
    return Published((*copied, marker), tuple(reused), tuple(removed))


def _read_marker(final_uri: str, marker: str) -> Any:
    marker_uri = storage.join(final_uri, marker)
    try:
        return storage.read_json(marker_uri)
    except InputError:
        if not storage.exists(marker_uri):
            raise InputError(f"{final_uri} has no {marker} (missing, or never committed)") from None
        raise


def read_committed(final_uri: str, marker: str, read: Callable[[Any], T], attempts: int = READ_ATTEMPTS) -> T:
    """Read a published output the safe way: ``read(marker_json)`` reads the files the marker lists.

    A publish may delete a listed file while it is read. That surfaces as a missing file, or, on some
    servers (SeaweedFS), as a read that breaks off with an error, so after any error the marker is read
    again: when it changed, ``read`` runs again on the new version (at most ``attempts`` times in all);
    when it did not, the error is the real one and is raised. ``read`` must not rely on partial results
    from an earlier call.
    """
    current = _read_marker(final_uri, marker)
    for _ in range(attempts - 1):
        try:
            return read(current)
        except Exception:
            latest = _read_marker(final_uri, marker)
            if latest == current:
                raise
            log.info("%s was published anew while being read: reading the new version", final_uri)
            current = latest
    return read(current)
