"""Named groups of numpy arrays kept in memory up to a budget, then spilled to ``.npy`` files on local disk.

The session build (:mod:`pipeline.data.sessions`) keeps its per-event integer columns here, so a log larger than
the memory budget is processed a bucket at a time instead of all at once. Below the budget nothing touches
the disk. Spilled files are uncompressed ``.npy`` (written and read at disk speed) in a private temporary
folder that is removed on :meth:`ArrayStore.close` (the store is a context manager).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from types import TracebackType

import numpy as np

from pipeline.errors import PipelineError


class ArrayStore:
    """``put(key, name=array, ...)`` / ``get(key)`` / ``pop(key)``; spills everything once over budget.
    Safe to use from several threads (the build works on several buckets at once)."""

    def __init__(self, budget_bytes: int, directory: str | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.spilled = False
        self.spilled_bytes = 0
        self._directory = directory or None  # None: the system temporary folder ($TMPDIR)
        self._root: str | None = None
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self._files: dict[str, dict[str, str]] = {}
        self._bytes_in_memory = 0
        self._counter = 0
        self._lock = threading.RLock()

    def __enter__(self) -> ArrayStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def put(self, key: str, **arrays: np.ndarray) -> None:
        """Store ``arrays`` under ``key`` (replacing what was there)."""
        with self._lock:
            self.pop(key)
            if self.spilled:
                self._write(key, arrays)
                return
            self._memory[key] = arrays
            self._bytes_in_memory += sum(a.nbytes for a in arrays.values())
            if self._bytes_in_memory > self.budget_bytes:
                self.spill()

    def get(self, key: str) -> dict[str, np.ndarray]:
        with self._lock:
            if key in self._memory:
                return self._memory[key]
            paths = dict(self._files[key]) if key in self._files else None
        if paths is None:
            raise KeyError(key)
        return {name: np.load(path) for name, path in paths.items()}

    def pop(self, key: str) -> dict[str, np.ndarray] | None:
        """Remove ``key`` and return its arrays (None when absent); a spilled group's files are deleted."""
        with self._lock:
            if key in self._memory:
                arrays = self._memory.pop(key)
                self._bytes_in_memory -= sum(a.nbytes for a in arrays.values())
                return arrays
            paths = self._files.pop(key, None)
        if paths is None:
            return None
        arrays = {name: np.load(path) for name, path in paths.items()}
        for path in paths.values():
            os.remove(path)
        return arrays

    def spill(self) -> None:
        """Move every group to disk; later groups go straight to disk."""
        with self._lock:
            self.spilled = True
            for key in list(self._memory):
                self._write(key, self._memory.pop(key))
            self._bytes_in_memory = 0

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
            self._files.clear()
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None

    def _write(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self._root is None:
            try:
                self._root = tempfile.mkdtemp(prefix="pipeline-spill-", dir=self._directory)
            except OSError as exc:
                raise PipelineError(
                    f"cannot create a spill folder in {self._directory or tempfile.gettempdir()}: {exc}"
                ) from None
        paths = {}
        for name, array in arrays.items():
            self._counter += 1
            path = os.path.join(self._root, f"{self._counter:08d}.npy")
            try:
                np.save(path, np.ascontiguousarray(array), allow_pickle=False)
            except OSError as exc:
                raise PipelineError(
                    f"cannot spill to {self._root}: {exc}; free disk space there, point build.spill_dir at a larger "
                    "disk, or raise build.memory_budget_mb"
                ) from None
            self.spilled_bytes += array.nbytes
            paths[name] = path
        self._files[key] = paths
