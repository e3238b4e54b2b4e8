"""Reading the output root's dated folders: which ``dt=YYYY-MM-DD`` folders exist and how much they hold.

The DAG's tasks write every output under a folder of its day (``OUT/<kind>/dt=D/...``, local or ``s3://``);
retention decides from these listings what ages out, and ``status`` shows them per day and per folder.
"""

from __future__ import annotations

import re

import pyarrow.fs as pafs

from pipeline import storage

DAY_FOLDER = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
OUTPUT_FOLDERS = ("validated", "datasets", "models", "runs")  # what pipeline.flow.tasks writes under the output root


def subfolders(uri: str) -> list[tuple[str, str]]:
    """(name, uri) of the sub-folders of ``uri``, sorted by name (none when it does not exist)."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted((i.base_name, storage.to_uri(fs, i.path)) for i in infos if i.type == pafs.FileType.Directory)


def day_folders(uri: str) -> list[tuple[str, str]]:
    """(YYYY-MM-DD, uri) of the ``dt=`` folders directly under ``uri``, oldest first."""
    out = []
    for name, sub in subfolders(uri):
        found = DAY_FOLDER.match(name)
        if found:
            out.append((found.group(1), sub))
    return out


def usage(uri: str, skip: str | None = None) -> tuple[int, int]:
    """(bytes, files) under ``uri``, leaving out the sub-folder named ``skip``."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    total = count = 0
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if skip and info.path[len(path) :].lstrip("/").split("/", 1)[0] == skip:
            continue
        total += int(info.size or 0)
        count += 1
    return total, count


def children_except(uri: str, skip: str) -> list[str]:
    """Files and folders directly under ``uri`` other than ``skip`` (what deleting 'all but skip' removes)."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(storage.to_uri(fs, i.path) for i in infos if i.base_name != skip)
