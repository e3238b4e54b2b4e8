"""Recommender: loads a model directory, scores like evaluation does, handles unknown items."""

from __future__ import annotations

import pytest
import torch
from gru4rec_testdata import tiny_config

from pipeline.errors import ConfigError, InputError
from pipeline.model.predict import Recommender, resolve_device
from pipeline.model.train import train


@pytest.fixture
def model_dir(synth, tmp_path):
    train(synth["train"], tiny_config(n_epochs=3), tmp_path / "m", device="cpu")
    return tmp_path / "m"


def test_recommend_follows_the_learned_pattern_and_matches_the_model(model_dir):
    rec = Recommender.load(model_dir)
    out = rec.recommend(["i5", "i6", "i7"], k=5)
    assert set(out) == {"items", "scores", "unknown_items"}
    assert len(out["items"]) == 5 and out["unknown_items"] == []
    assert out["items"][0] in {"i8", "i9"}  # the ring: next is +1 (or +2)
    assert out["scores"] == sorted(out["scores"], reverse=True)
    # the same numbers as running the module by hand
    model, ids = rec.model, rec.item_map.item_ids.to_pylist()
    with torch.no_grad():
        hidden = model.init_hidden(1)
        for item in ("i5", "i6", "i7"):
            scores, hidden = model(torch.tensor([ids.index(item)]), hidden)
    top = torch.topk(scores[0], 5)
    assert out["items"] == [ids[i] for i in top.indices.tolist()]
    assert out["scores"] == pytest.approx(top.values.tolist())


def test_unknown_items_are_skipped_and_reported(model_dir):
    rec = Recommender.load(model_dir)
    with_unknown = rec.recommend(["nope", "i5", "i6", "also-nope", "i7"], k=3)
    assert with_unknown["unknown_items"] == ["nope", "also-nope"]
    assert with_unknown["items"] == rec.recommend(["i5", "i6", "i7"], k=3)["items"]
    cold = rec.recommend(["nope"], k=4)  # nothing known: most popular training items
    counts = dict(zip(rec.item_map.item_ids.to_pylist(), rec.item_map.counts.tolist(), strict=True))
    assert [counts[i] for i in cold["items"]] == sorted(counts.values(), reverse=True)[:4]
    assert len(rec.recommend(["i1"], k=10_000)["items"]) == len(counts)  # k is capped at the catalogue
    with pytest.raises(ConfigError):
        rec.recommend(["i1"], k=0)


def test_load_errors_and_devices(tmp_path):
    with pytest.raises(InputError, match="not a trained model directory"):
        Recommender.load(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        Recommender.load(tmp_path)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA"):
            resolve_device("cuda:0")
