"""The GRU4Rec module: initialisation, embedding modes, dropout semantics, GRU arithmetic, scoring."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.network import GRU4Rec, GRULayer, dropout


def test_glorot_uniform_bounds_per_table_and_gate():
    torch.manual_seed(0)
    model = GRU4Rec(500, (64,), constrained_embedding=True)
    bound_wy = math.sqrt(6 / (500 + 64))
    assert model.Wy.abs().max() <= bound_wy
    assert model.Wy.abs().max() > 0.9 * bound_wy  # uniform over the whole range, not a narrower init
    gate_bound = math.sqrt(6 / (64 + 64))  # each gate block of W_hh is (64 x 64)
    assert model.gru[0].w_hh.abs().max() <= gate_bound
    assert model.gru[0].w_hh.abs().max() > 0.9 * gate_bound
    assert torch.count_nonzero(model.By) == 0 and torch.count_nonzero(model.gru[0].bias) == 0
    assert torch.count_nonzero(model.gru[0].bias_hh) == 0


def test_embedding_modes_share_or_separate_tables():
    shared = GRU4Rec(50, (8,), constrained_embedding=True)
    assert shared.input_table is shared.Wy and shared.E is None and shared.Wx0 is None
    assert shared.gru[0].w_ih.shape == (8, 24)  # the input is a row of Wy (size layers[-1])

    separate = GRU4Rec(50, (8,), constrained_embedding=False, embedding=5)
    assert separate.input_table is separate.E and separate.E.shape == (50, 5)
    assert separate.gru[0].w_ih.shape == (5, 24)

    onehot = GRU4Rec(50, (8, 6), constrained_embedding=False, embedding=0)
    assert onehot.input_table is onehot.Wx0 and onehot.Wx0.shape == (50, 24)
    assert onehot.gru[0].w_ih is None and onehot.gru[1].w_ih.shape == (8, 18)
    for m in (shared, separate, onehot):
        assert m.By.shape == (50,)  # every item has an output bias


@pytest.mark.parametrize("kwargs", [{"constrained_embedding": True}, {"constrained_embedding": False, "embedding": 7}, {"constrained_embedding": False}])
def test_step_and_forward_agree_in_every_mode(kwargs):
    torch.manual_seed(1)
    model = GRU4Rec(30, (12, 10), **kwargs).eval()
    items = torch.tensor([3, 7, 7])
    hidden = model.init_hidden(3)
    scores, new_hidden = model(items, hidden)
    out, again = model.step(model.input_table[items], hidden)
    assert scores.shape == (3, 30)
    torch.testing.assert_close(scores, out @ model.Wy.T + model.By)
    assert [h.shape for h in new_hidden] == [(3, 12), (3, 10)]
    for a, b in zip(new_hidden, again, strict=True):
        torch.testing.assert_close(a, b)
    # scoring a subset of items gives exactly those columns of the full scores
    subset = torch.tensor([5, 0, 29, 5])
    part, _ = model(items, hidden, targets=subset)
    torch.testing.assert_close(part, scores[:, subset])


def test_gru_cell_matches_the_gru_equations():
    torch.manual_seed(2)
    layer = GRULayer(4, 3)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
        layer.bias_hh.uniform_(-1, 1)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    gx = x @ layer.w_ih + layer.bias
    gh = h @ layer.w_hh + layer.bias_hh
    r = torch.sigmoid(gx[:, :3] + gh[:, :3])
    z = torch.sigmoid(gx[:, 3:6] + gh[:, 3:6])
    n = torch.tanh(gx[:, 6:] + r * gh[:, 6:])
    torch.testing.assert_close(layer.cell(layer.input_projection(x), h), (1 - z) * h + z * n)


def test_dropout_p_is_the_drop_probability():
    torch.manual_seed(3)
    x = torch.ones(200_000)
    dropped = dropout(x, 0.9, training=True)
    kept = (dropped != 0).float().mean().item()
    assert kept == pytest.approx(0.1, abs=0.01)  # a keep-probability bug would keep 90%
    assert dropped[dropped != 0].unique().tolist() == pytest.approx([10.0])  # inverted scaling 1/(1-p)
    assert torch.equal(dropout(x, 0.9, training=False), x)
    assert torch.equal(dropout(x, 0.0, training=True), x)


def test_model_dropout_hits_embedding_and_every_layer_separately():
    torch.manual_seed(4)
    n = 4000
    items = torch.arange(n) % 20
    # hidden dropout only: every layer's output (and so the carried state) has ~p zeros
    model = GRU4Rec(20, (16, 16), dropout_p_embed=0.0, dropout_p_hidden=0.75).train()
    out, hidden = model.step(model.input_table[items], model.init_hidden(n))
    for h in hidden:
        assert (h == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert out is hidden[-1]
    # embedding dropout only: the GRU sees a dropped-out input, its output is not dropped out
    model = GRU4Rec(20, (16,), dropout_p_embed=0.75, dropout_p_hidden=0.0).train()
    seen = {}
    original = model.gru[0].input_projection

    def probe(x):
        seen["x"] = x
        return original(x)

    model.gru[0].input_projection = probe
    out, _ = model.step(model.input_table[items], model.init_hidden(n))
    assert (seen["x"] == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert (out == 0).float().mean().item() < 0.05  # only rows whose whole input was dropped
    model.eval()
    model.step(model.input_table[items], model.init_hidden(n))
    assert (seen["x"] == 0).float().mean().item() < 0.01  # no dropout at evaluation


def test_invalid_dropout_is_refused():
    with pytest.raises(ValueError, match="drop probability"):
        GRU4Rec(10, (4,), dropout_p_hidden=1.0)
