"""One small storage interface over local paths and ``s3://`` URIs (pyarrow.fs underneath).

Every function takes a URI: a local path (``file://`` accepted) or ``s3://bucket/key``. The S3 endpoint comes
from ``PIPELINE_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``); pyarrow ignores the
AWS variables for the endpoint, so it is passed explicitly. Credentials and region come from the usual
``AWS_*`` variables.

Atomic publishing of whole output folders is :mod:`pipeline.publish`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.errors import InputError, PipelineError

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
ENDPOINT_VARS = ("PIPELINE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

T = TypeVar("T")


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def local_path(uri: str) -> str:
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
    return pafs.LocalFileSystem(), local_path(uri)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI of ``path`` on ``fs`` (the inverse of :func:`resolve`)."""
    return f"{S3_PREFIX}{path}" if isinstance(fs, pafs.S3FileSystem) else path


def normalize(uri: str) -> str:
    """A canonical spelling of ``uri``: absolute local paths, no trailing slash."""
    return f"{S3_PREFIX}{resolve(uri)[1]}" if is_s3(uri) else local_path(uri)


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(str(uri).rstrip("/"))
    return os.path.dirname(local_path(uri))


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/")) if is_s3(uri) else os.path.basename(local_path(uri))


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
        os.makedirs(local_path(uri), exist_ok=True)


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
    local = Path(local_path(uri))
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
