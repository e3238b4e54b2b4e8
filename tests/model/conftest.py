"""Fixtures of the GRU4Rec tests (helpers live in gru4rec_testdata.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gru4rec_testdata import synthetic_table, write_tsv


@pytest.fixture
def synth(tmp_path: Path) -> dict[str, Path]:
    """Train and test files of the synthetic pattern (TSV) plus the same train events as Parquet."""
    import pyarrow.parquet as pq

    train = synthetic_table(300, seed=0)
    test = synthetic_table(80, seed=1)
    pq.write_table(train, tmp_path / "train.parquet")
    return {
        "train": write_tsv(train, tmp_path / "train.tsv"),
        "test": write_tsv(test, tmp_path / "test.tsv"),
        "train_parquet": tmp_path / "train.parquet",
    }
