"""One small storage interface over local paths and ``s3://`` URIs (pyarrow.fs underneath).

Every function takes a URI: a local path (``file://`` accepted) or ``s3://bucket/key``. The S3 endpoint comes
from ``PIPELINE_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``); pyarrow ignores the
AWS variables for the endpoint, so it is passed explicitly. Credentials and region come from the usual
``AWS_*`` variables.

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
import json
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
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.errors import InputError, PipelineError

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
ENDPOINT_VARS = ("PIPELINE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# A staging folder nothing has written to for this long belongs to a run that died (a writer of the same
# output that is still running has written to its own more recently).
STALE_STAGING_SECONDS = 6 * 3600
CONTENT_HASH_CHARS = 16  # sha256 hex digits in a content-addressed name (64 bits: no collisions in practice)
_CONTENT_NAME = re.compile(r".-[0-9a-f]{16,64}(\.[A-Za-z0-9]+)*$")
COPY_THREADS = 8  # S3 copies are server-side requests: a few in flight at once
READ_ATTEMPTS = 5  # read_committed: versions to try when each is replaced while being read

T = TypeVar("T")


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def _local_path(uri: str) -> str:
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return os.path.abspath(os.path.expanduser(text))


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (None = AWS itself)."""
    for var in ENDPOINT_VARS:
        value = os.environ.get(var)
        if value:
            return value
    return None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str, key: str | None, secret: str | None, token: str | None):
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the current environment (cached per configuration)."""
    env = os.environ
    return _s3_filesystem(
        s3_endpoint(),
        env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
        env.get("AWS_SESSION_TOKEN"),
    )


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or an ``s3://`` URI."""
    if is_s3(uri):
        path = str(uri)[len(S3_PREFIX) :].rstrip("/")
        if not path or path.startswith("/"):
            raise InputError(f"not a valid S3 URI: {uri!r} (expected s3://bucket/key)")
        return s3_filesystem(), path
    return pafs.LocalFileSystem(), _local_path(uri)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI of ``path`` on ``fs`` (the inverse of :func:`resolve`)."""
    return f"{S3_PREFIX}{path}" if isinstance(fs, pafs.S3FileSystem) else path


def normalize(uri: str) -> str:
    """A canonical spelling of ``uri``: absolute local paths, no trailing slash."""
    return f"{S3_PREFIX}{resolve(uri)[1]}" if is_s3(uri) else _local_path(uri)


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(str(uri).rstrip("/"))
    return os.path.dirname(_local_path(uri))


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/")) if is_s3(uri) else os.path.basename(_local_path(uri))


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise InputError(f"cannot access {uri}: {exc}") from None


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def size(uri: str) -> int:
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise InputError(f"{uri} is not a file")
    return int(info.size or 0)


def _hidden(relative: str) -> bool:
    # Hidden and underscore names (".x.tmp-...", "_SUCCESS", "_generated.json") are bookkeeping, not data.
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def list_files(
    uri: str, accept: Callable[[str], bool] | None = None, skipped: list[str] | None = None
) -> list[str]:
    """All data files under a directory or prefix (recursive, sorted), skipping hidden and ``_`` names and,
    with ``accept``, names it rejects; the URIs of skipped files are appended to ``skipped`` when given."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise InputError(f"input not found: {uri}") from None
    except OSError as exc:
        raise InputError(f"cannot list {uri}: {exc}") from None
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(path) :].lstrip("/")
        if not _hidden(relative) and (accept is None or accept(relative)):
            out.append(to_uri(fs, info.path))
        elif skipped is not None:
            skipped.append(to_uri(fs, info.path))
    if skipped is not None:
        skipped.sort()
    return sorted(out)


def expand(
    inputs: Sequence[str], accept: Callable[[str], bool] | None = None, skipped: list[str] | None = None
) -> list[str]:
    """Input URIs (files or folders) to the sorted list of files they name; an error names a missing input.

    In folders, hidden and ``_`` names and, with ``accept``, names it rejects are skipped (and appended to
    ``skipped`` when given); a file named directly is always taken.
    """
    files: list[str] = []
    for uri in inputs:
        info = _info(uri)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input not found: {uri}")
        if info.type == pafs.FileType.Directory:
            passed_over: list[str] = []
            found = list_files(uri, accept, passed_over)
            if skipped is not None:
                skipped.extend(passed_over)
            if not found:
                extra = f" (skipped as not data: {', '.join(basename(f) for f in passed_over[:5])})" if passed_over else ""
                raise InputError(f"input folder {uri} holds no data files{extra}")
            files.extend(found)
        else:
            files.append(normalize(uri))
    return files


def makedirs(uri: str) -> None:
    if not is_s3(uri):  # S3 has no directories; objects create their prefixes
        os.makedirs(_local_path(uri), exist_ok=True)


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The bytes of a file (the first ``limit`` bytes when given)."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path, compression=None) as stream:
            return stream.read(limit) if limit is not None else stream.read()
    except FileNotFoundError:
        raise InputError(f"file not found: {uri}") from None
    except OSError as exc:
        raise InputError(f"cannot read {uri}: {exc}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go through a temporary name and a rename (never a torn file)."""
    if is_s3(uri):
        fs, path = resolve(uri)
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    local = Path(_local_path(uri))
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, local)


def dumps_json(obj: Any) -> bytes:
    """Stable JSON: sorted keys, 2-space indent, trailing newline; non-JSON scalars via ``str``."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n").encode()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, dumps_json(obj))


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{uri} is not valid JSON: {exc}") from None


def remove(uri: str) -> None:
    """Delete a file or a whole directory/prefix; a missing path is not an error."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (a local folder or an S3 prefix)."""
    local_dir = Path(local_dir)
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        write_bytes(join(uri, *file.relative_to(local_dir).parts), file.read_bytes())


def check_disjoint(inputs: Sequence[str], out: str) -> None:
    """Refuse an output that is, contains or lies inside an input: publishing it must never touch raw data."""
    target = normalize(out).rstrip("/") + "/"
    for uri in inputs:
        src = normalize(uri).rstrip("/") + "/"
        if src.startswith(target) or target.startswith(src):
            raise PipelineError(f"output {out} overlaps input {uri}: write outputs outside the raw data")


# ---------------------------------------------------------------------------------------------
# Content-addressed names


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
    return join(parent(uri), f".{basename(uri)}.{tag}-{uuid.uuid4().hex[:12]}")


def _staging_pattern(name: str) -> re.Pattern[str]:
    # This output's leftovers only: ".ds.tmp-<id>", neither ".ds2.tmp-<id>" nor ".ds.tmp-a.tmp-<id>"
    # (which belongs to an output named "ds.tmp-a").
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[0-9a-f]{{12}}")


def _check_publishable(final_uri: str) -> None:
    root = not basename(final_uri) or (is_s3(final_uri) and "/" not in resolve(final_uri)[1])
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
    name = basename(final_uri)
    fs, parent_path = resolve(parent(final_uri))
    try:
        siblings = fs.get_file_info(pafs.FileSelector(parent_path, allow_not_found=True))
    except OSError as exc:
        log.warning("cannot look for stale staging folders beside %s: %s", final_uri, exc)
        return []
    pattern = _staging_pattern(name)
    now = time.time()
    removed = []
    final_missing = not exists(final_uri)
    for info in siblings:
        if not pattern.fullmatch(posixpath.basename(info.path)):
            continue
        uri = to_uri(fs, info.path)
        if final_missing and ".old-" in posixpath.basename(info.path):
            # A local publish killed between its two renames: this is the last published version. Keep it.
            log.warning("%s is missing but %s holds its previous version: rename it back to restore it", final_uri, uri)
            continue
        try:
            newest = _newest_mtime(fs, info)
            if newest is None or now - newest < older_than_s:
                continue
            remove(uri)
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
    makedirs(tmp)
    try:
        yield tmp
        if not exists(join(tmp, marker)):
            raise PipelineError(f"internal error: {marker} missing from {tmp} before publishing")
        publish(tmp, final_uri, marker)
    except BaseException:
        remove(tmp)
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
    fs, tmp_path = resolve(tmp_uri)
    if fs.get_file_info(f"{tmp_path}/{marker}").type != pafs.FileType.File:
        raise PipelineError(f"internal error: {marker} missing from {tmp_uri} before publishing")
    if is_s3(final_uri):
        return _publish_s3(tmp_uri, final_uri, marker)
    return _publish_local(tmp_uri, final_uri)


def _publish_local(tmp_uri: str, final_uri: str) -> Published:
    fs = pafs.LocalFileSystem()
    tmp, final = Path(_local_path(tmp_uri)), Path(_local_path(final_uri))
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
    fs, tmp_path = resolve(tmp_uri)
    _, final_path = resolve(final_uri)
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
    marker_uri = join(final_uri, marker)
    try:
        return read_json(marker_uri)
    except InputError:
        if not exists(marker_uri):
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
