"""Training checkpoints: what identifies the data and settings of a run, atomic writes, and resuming.

A checkpoint is data (state_dict, optimizer state, config, item map, epoch, history), loaded with
``weights_only=True``; a resume with other settings or on other data is refused with the way out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import GRU4RecConfig, to_dict
from pipeline.errors import TrainingError
from pipeline.model.clicks import ItemMap
from pipeline.model.network import GRU4Rec
from pipeline.model.optim import AdagradM


def data_fingerprint(items: np.ndarray, offsets: np.ndarray, item_map: ItemMap) -> str:
    """Identifies the training data a checkpoint was trained on (a resume on other data is refused)."""
    h = hashlib.sha256()
    for arr in (items.astype(np.int64), offsets.astype(np.int64), item_map.counts):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\x1f".join(item_map.item_ids.to_pylist()).encode())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def changed_settings(saved: dict[str, Any], config: GRU4RecConfig) -> list[str]:
    """Settings that differ between a checkpoint and this run (n_epochs may grow: training continues)."""
    now = to_dict(config)
    return sorted(k for k in now if k != "n_epochs" and saved.get(k) != now[k])


def resume_from(
    path: Path, config: GRU4RecConfig, fingerprint: str, model: GRU4Rec, optimizer: AdagradM
) -> tuple[int, dict[str, list]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    differ = changed_settings(ckpt.get("config", {}), config)
    if differ:
        raise TrainingError(
            f"{path} was trained with other settings ({', '.join(differ)}); "
            "use another output directory or pass --no-resume to start over"
        )
    if ckpt.get("data_fingerprint") != fingerprint:
        raise TrainingError(
            f"{path} was trained on other data; use another output directory or --no-resume to start over"
        )
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["epoch"]), ckpt["history"]
