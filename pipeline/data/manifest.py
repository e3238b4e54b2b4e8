"""Publishing a session dataset: split files written in fixed row groups, named by their content, and the
manifest written last (the single atomic switch a reader follows; see :mod:`pipeline.storage`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import __version__, publish, storage
from pipeline.data.schema import DATASET_SCHEMA_VERSION, ITEMS_SCHEMA, SPLIT_SCHEMA, SPLITS

MANIFEST = "manifest.json"
ROW_GROUP = 1 << 20


# Dictionary pages where values repeat (items); session ids are nearly unique, dictionary encoding them
# costs time and saves nothing.
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": ["item_id", "item_idx"]}


class ParquetSink:
    """Split files written as the rows come, in row groups of exactly ``ROW_GROUP`` rows (so the bytes do not
    depend on how the rows arrived), into a local folder. Encoding runs on a second thread (it releases the
    GIL) while the next rows are assembled; one row group in flight bounds the memory it holds."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.pending: dict[str, list[pa.Table]] = {}
        self.groups: dict[str, int] = {}
        self._encoder = ThreadPoolExecutor(max_workers=1)
        self._in_flight: Future[None] | None = None

    def _encode(self, name: str, table: pa.Table) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # in order, and re-raises an encoding error here
        self._in_flight = self._encoder.submit(
            self.writers[name].write_table, table, row_group_size=ROW_GROUP
        )
        self.groups[name] += 1

    def write(self, name: str, table: pa.Table) -> None:
        if name not in self.writers:
            path = os.path.join(self.folder, f"{name}.parquet")
            self.writers[name] = pq.ParquetWriter(path, table.schema, **PARQUET_OPTIONS)
            self.pending[name] = []
            self.groups[name] = 0
        pending = self.pending[name]
        pending.append(table)
        rows = sum(t.num_rows for t in pending)
        while rows >= ROW_GROUP:
            joined = pa.concat_tables(pending)
            self._encode(name, joined.slice(0, ROW_GROUP))
            pending[:] = [joined.slice(ROW_GROUP)]
            rows -= ROW_GROUP

    def close(self) -> dict[str, str]:
        """Flush and close every file; their local paths by name (every split, empty ones too)."""
        for name in (*SPLITS, "items"):
            if name not in self.writers:
                self.write(name, (ITEMS_SCHEMA if name == "items" else SPLIT_SCHEMA).empty_table())
        for name in self.writers:
            rest = pa.concat_tables(self.pending[name])
            if rest.num_rows or self.groups[name] == 0:
                self._encode(name, rest)
        if self._in_flight is not None:
            self._in_flight.result()
        self._encoder.shutdown()
        for writer in self.writers.values():
            writer.close()
        return {name: os.path.join(self.folder, f"{name}.parquet") for name in self.writers}


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _put_file(local: str, uri: str) -> None:
    """Move a finished local file to ``uri`` (a rename when local, a streamed upload to S3)."""
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        os.remove(local)
    else:
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        shutil.move(local, uri)


def commit(
    out_dir: str, paths: dict[str, str], stats: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """Publish the finished local files (named by content) and the manifest as the dataset ``out_dir``."""
    files: dict[str, dict[str, Any]] = {}
    with publish.staged_dir(out_dir, MANIFEST) as tmp:
        for name, path in sorted(paths.items()):
            sha = _sha256_file(path)
            relative = f"{name}/part-{sha[:16]}.parquet"
            rows = pq.ParquetFile(path).metadata.num_rows
            files[name] = {"path": relative, "rows": rows, "bytes": os.path.getsize(path), "sha256": sha}
            _put_file(path, storage.join(tmp, *relative.split("/")))
        fingerprint = hashlib.sha256(
            "".join(f"{k}:{v['sha256']}\n" for k, v in sorted(files.items())).encode()
        )
        manifest = {
            "kind": "gru4rec-pipeline/session-dataset",
            "schema_version": DATASET_SCHEMA_VERSION,
            "fingerprint": f"sha256:{fingerprint.hexdigest()}",
            "files": files,
            "columns": {"splits": SPLIT_SCHEMA.names, "items": ITEMS_SCHEMA.names},
            "counts": {k: stats[k] for k in ("input", "after_filtering", *SPLITS)}
            | {"dropped": stats["dropped"], "filter_iterations": stats["filter_iterations"]}
            | ({"quarantined": stats["quarantined"]} if "quarantined" in stats else {}),
            "time_ranges": {k: {"start": stats[k]["start"], "end": stats[k]["end"]} for k in SPLITS},
            "split_times": stats["split_times"],
            "pipeline_version": __version__,
            "created_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            **extra,
        }
        storage.write_json(storage.join(tmp, MANIFEST), manifest)
    return manifest
