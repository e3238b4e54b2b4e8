"""Accuracy on real data (../shared/data/yoochoose-100k): train on train_tr.tsv, evaluate on train_valid.tsv.

The slow tests are the issue's target: 10 epochs with the published RSC15 (cross-entropy) and RetailRocket
(BPR-max) parameter rows must reach the reference implementation's Recall@20 and MRR@20 (gru4rec.md,
conservative ties) within 2% relative, or better. The smoke test in the default suite trains 3 epochs and
must already be far above S-POP.
"""

from __future__ import annotations

import pytest

from pipeline.config import GRU4RecConfig
from pipeline.model.evaluate import evaluate_model
from pipeline.model.train import train

# Published rows (gru4rec.md): shared embedding, n_sample 2048, 10 epochs.
RSC15 = dict(loss="cross-entropy", elu_param=0.0, layers=(100,), batch_size=32, dropout_p_embed=0.0,
             dropout_p_hidden=0.4, learning_rate=0.2, momentum=0.2, sample_alpha=0.5, bpreg=0.0, logq=1.0)
RETAILROCKET = dict(loss="bpr-max", elu_param=0.5, layers=(224,), batch_size=80, dropout_p_embed=0.5,
                    dropout_p_hidden=0.05, learning_rate=0.05, momentum=0.4, sample_alpha=0.4, bpreg=1.95, logq=0.0)
# The reference implementation on this data, 10 epochs, conservative ties: (Recall@20, MRR@20).
REFERENCE = {"rsc15": (0.6298, 0.3395), "retailrocket": (0.6482, 0.3446)}
ROWS = {"rsc15": RSC15, "retailrocket": RETAILROCKET}


def _train_and_evaluate(yoochoose, tmp_path, row: dict, n_epochs: int) -> dict:
    config = GRU4RecConfig(**row, n_sample=2048, n_epochs=n_epochs, constrained_embedding=True)
    train(yoochoose["train"], config, tmp_path / "model", device="cpu")
    return evaluate_model(tmp_path / "model", yoochoose["valid"], device="cpu").metrics


def test_smoke_three_epochs_far_above_spop(yoochoose, tmp_path):
    m = _train_and_evaluate(yoochoose, tmp_path, RSC15, n_epochs=3)
    spop = m["baselines"]["spop"]
    print(f"3 epochs: recall@20 {m['recall@20']:.4f} mrr@20 {m['mrr@20']:.4f}; S-POP {spop['recall@20']:.4f} {spop['mrr@20']:.4f}")
    assert m["n_predictions"] == 12455 and m["n_dropped_unknown"] == 0
    assert m["recall@20"] >= 0.57 and m["mrr@20"] >= 0.30, m
    assert m["recall@20"] >= spop["recall@20"] + 0.15 and m["mrr@20"] >= spop["mrr@20"] + 0.03, (m, spop)


@pytest.mark.slow
@pytest.mark.parametrize("row", ["rsc15", "retailrocket"])
def test_ten_epochs_match_the_reference_within_two_percent(yoochoose, tmp_path, row):
    m = _train_and_evaluate(yoochoose, tmp_path, ROWS[row], n_epochs=10)
    print(f"{row}: recall@20 {m['recall@20']:.4f} mrr@20 {m['mrr@20']:.4f} (reference {REFERENCE[row]})")
    ref_recall, ref_mrr = REFERENCE[row]
    assert m["recall@20"] >= 0.98 * ref_recall, (row, m["recall@20"], ref_recall)
    assert m["mrr@20"] >= 0.98 * ref_mrr, (row, m["mrr@20"], ref_mrr)
