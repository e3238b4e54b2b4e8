"""pipeline.data.generate: deterministic daily partitions with learnable structure and known corruption."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ingest
from pipeline.data.generate import generate_clicks, make_catalogue
from pipeline.errors import ConfigError


def test_partitions_are_deterministic_and_readable(tmp_path: Path, tree_digest) -> None:
    uris = generate_clicks(str(tmp_path / "a"), days=3, start_date="2024-02-28", sessions_per_day=300, n_items=100, seed=1)
    generate_clicks(str(tmp_path / "b"), days=3, start_date="2024-02-28", sessions_per_day=300, n_items=100, seed=1)
    assert [Path(u).name for u in uris] == ["dt=2024-02-28", "dt=2024-02-29", "dt=2024-03-01"]
    a = {k: v for k, v in tree_digest(tmp_path / "a").items() if not k.startswith("_")}
    b = {k: v for k, v in tree_digest(tmp_path / "b").items() if not k.startswith("_")}
    assert a == b and len(a) == 3
    summary = json.loads((tmp_path / "a" / "_generated.json").read_text())
    table = ingest.read_events([str(tmp_path / "a")])
    assert table.num_rows == summary["rows"] == sum(p["rows"] for p in summary["partitions"])
    # Each partition holds its own day's events (sessions running past midnight continue in the next one).
    for uri in uris:
        day = ingest.read_events([uri]).column("timestamp").to_pandas().dt.strftime("%Y-%m-%d").unique().tolist()
        assert day == [Path(uri).name[3:]]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_text_formats_round_trip(tmp_path: Path, fmt: str) -> None:
    generate_clicks(str(tmp_path / "p"), days=1, sessions_per_day=50, n_items=30, seed=2)
    generate_clicks(str(tmp_path / "t"), days=1, sessions_per_day=50, n_items=30, seed=2, fmt=fmt)
    assert ingest.read_events([str(tmp_path / "t")]).equals(ingest.read_events([str(tmp_path / "p")]))


def test_popularity_is_skewed_and_sequences_are_learnable(tmp_path: Path) -> None:
    generate_clicks(str(tmp_path / "c"), days=2, sessions_per_day=2000, n_items=500, seed=3)
    frame = ingest.read_events([str(tmp_path / "c")]).to_pandas()
    counts = frame.item_id.value_counts()
    assert counts.iloc[:25].sum() / counts.sum() > 0.3  # the top 5% of items draw a large share of clicks
    # Next-item structure: the most frequent successor of an item predicts the next click far better than
    # global popularity does.
    frame = frame.sort_values(["session_id", "timestamp"], kind="stable")
    same = frame.session_id.values[1:] == frame.session_id.values[:-1]
    pairs = list(zip(frame.item_id.values[:-1][same], frame.item_id.values[1:][same], strict=True))
    by_item: dict[str, Counter] = {}
    for prev, nxt in pairs:
        by_item.setdefault(prev, Counter())[nxt] += 1
    hits = sum(c.most_common(1)[0][1] for c in by_item.values())
    top_item_share = counts.iloc[0] / counts.sum()
    assert hits / len(pairs) > 2 * top_item_share  # ~0.32 vs ~0.10 with these settings


def test_catalogue_and_corruption_arguments_are_checked(tmp_path: Path) -> None:
    cat = make_catalogue(50, seed=0)
    assert len(set(cat.ids)) == 50 and np.isclose(cat.popularity.sum(), 1.0)
    with pytest.raises(ConfigError, match="unknown corruption kind"):
        generate_clicks(str(tmp_path / "x"), days=1, corruption={"gremlins": 0.1})
    with pytest.raises(ConfigError, match="sessions can take one"):
        generate_clicks(str(tmp_path / "y"), days=1, sessions_per_day=5, n_items=20, corruption={"duplicate": 0.9})
