"""Load a trained model directory and recommend next items for a session of original item ids.

``DIR/checkpoint.pt`` is plain data (state_dict, config dict, item map, optimizer state, epoch, history),
read with ``torch.load(weights_only=True)``: loading never runs pickled code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import GRU4RecConfig, from_mapping
from pipeline.errors import ConfigError, InputError
from pipeline.model.clicks import ItemMap
from pipeline.model.network import GRU4Rec

CHECKPOINT = "checkpoint.pt"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU; ``cuda[:N]`` fails clearly where there is no such GPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but this machine has no usable CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) present")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}; expected auto, cpu or cuda[:N]")
    return dev


def build_model(config: GRU4RecConfig, n_items: int) -> GRU4Rec:
    return GRU4Rec(
        n_items,
        config.layers,
        constrained_embedding=config.constrained_embedding,
        embedding=config.embedding,
        dropout_p_embed=config.dropout_p_embed,
        dropout_p_hidden=config.dropout_p_hidden,
    )


def read_checkpoint(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CHECKPOINT
    if not path.exists():
        raise InputError(f"{model_dir} is not a trained model directory (no {CHECKPOINT})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise InputError(f"cannot read checkpoint {path}: {exc}") from None


@dataclass
class LoadedModel:
    model: GRU4Rec
    item_map: ItemMap
    config: GRU4RecConfig
    checkpoint: dict[str, Any]


def load_model(model_dir: str | Path, device: str | torch.device = "auto") -> LoadedModel:
    ckpt = read_checkpoint(model_dir)
    config = from_mapping(GRU4RecConfig, ckpt["config"], "checkpoint config: ")
    item_map = ItemMap.from_ids(ckpt["item_ids"], ckpt.get("item_counts"))
    model = build_model(config, len(item_map))
    model.load_state_dict(ckpt["state_dict"])
    model.to(resolve_device(device)).eval()
    return LoadedModel(model, item_map, config, ckpt)


class Recommender:
    """Next-item recommendations from a trained model (what the MLflow pyfunc model wraps)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.item_map = loaded.item_map
        self.config = loaded.config
        self._ids = loaded.item_map.item_ids.to_pylist()
        self._index = {item: i for i, item in enumerate(self._ids)}
        self._popularity = torch.as_tensor(loaded.item_map.counts, dtype=torch.float32)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> Recommender:
        return cls(load_model(model_dir, device))

    @torch.inference_mode()
    def recommend(self, item_ids: list[str], k: int = 20) -> dict[str, list]:
        """Top-k next items after the session ``item_ids`` (oldest first), with their scores.

        Items unknown to the model are skipped and listed in ``unknown_items``. With no known item at all
        there is no session state to score from: the most popular training items come back, scored by
        their share of training events.
        """
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        ids = [str(i) for i in item_ids]
        known = [self._index[i] for i in ids if i in self._index]
        unknown = [i for i in ids if i not in self._index]
        k = min(k, len(self._ids))
        if not known:
            scores = self._popularity / max(float(self._popularity.sum()), 1.0)
        else:
            device = self.model.Wy.device
            hidden = self.model.init_hidden(1, device)
            items = torch.as_tensor(known, device=device)
            for t in range(len(known)):
                out, hidden = self.model.step(self.model.input_table[items[t : t + 1]], hidden)
            scores = self.model.score(out, self.model.Wy, self.model.By)[0].float().cpu()
        top = torch.topk(scores, k)
        return {
            "items": [self._ids[i] for i in top.indices.tolist()],
            "scores": [float(s) for s in top.values.tolist()],
            "unknown_items": unknown,
        }
