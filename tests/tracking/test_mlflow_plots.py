"""PNG plots: curves computed from ranks, files that are real PNG images of the expected size."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.tracking import plots


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_cutoff_curves_from_ranks() -> None:
    curves = plots.cutoff_curves_from_ranks([1, 2, 4, 30], max_k=5)
    assert curves["recall"] == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75])
    assert curves["mrr"] == pytest.approx([0.25, 0.375, 0.375, 0.4375, 0.4375])
    # Recall@K never decreases with K; MRR@K <= Recall@K.
    long = plots.cutoff_curves_from_ranks(np.random.default_rng(0).integers(1, 40, 200), 20)
    assert np.all(np.diff(long["recall"]) >= 0)
    assert all(m <= r for m, r in zip(long["mrr"], long["recall"], strict=True))


def test_plots_are_pngs(tmp_path: Path) -> None:
    history = [
        {"train_loss": 5.0, "valid_recall_at_20": 0.2, "valid_mrr_at_20": 0.05},
        {"train_loss": 4.1, "valid_recall_at_20": 0.3, "valid_mrr_at_20": 0.09},
    ]
    training = plots.training_curves(history, tmp_path / "a" / "training.png")
    assert png_size(training) == (1200, 400)  # two panels of 6x4 inches at 100 dpi
    loss_only = plots.training_curves([{"train_loss": 3.0}], tmp_path / "loss.png")
    assert png_size(loss_only) == (600, 400)
    curves = {
        "GRU4Rec": plots.cutoff_curves_from_ranks([1, 3, 8, 50], 20),
        "S-POP": plots.cutoff_curves_from_ranks([2, 9, 40, 60], 20),
        "POP": plots.cutoff_curves_from_ranks([15, 30, 40, 60], 20),
    }
    assert png_size(plots.cutoff_curves(curves, tmp_path / "k.png")) == (1200, 400)
