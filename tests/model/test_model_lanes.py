"""The two-lane CPU step: work shared between the training thread and a helper gives the same numbers."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
from gru4rec_testdata import tiny_config

from pipeline.model.lanes import Lanes
from pipeline.model.predict import build_model
from pipeline.model.schedule import Schedule
from pipeline.model.step import Trainer, step_rows

CPU = torch.device("cpu")


def test_map_returns_results_in_order_and_uses_both_threads():
    seen: set[str] = set()

    def piece(x: int) -> int:
        seen.add(threading.current_thread().name)
        time.sleep(0.05)  # long enough for the helper to wake and take the other piece
        return x * x

    with Lanes() as lanes:
        assert lanes.map(piece, [1, 2, 3, 4]) == [1, 4, 9, 16]
        assert lanes.map(piece, [5]) == [25]
    assert "step-lane" in seen and threading.current_thread().name in seen
    assert lanes.map(piece, [2, 3]) == [4, 9]  # closed: runs inline


def test_an_error_in_a_piece_reaches_the_caller():
    def piece(x: int) -> int:
        if x == 1:
            raise ValueError("piece 1 failed")
        time.sleep(0.01)
        return x

    with Lanes() as lanes:
        for _ in range(5):  # whichever thread runs the failing piece
            with pytest.raises(ValueError, match="piece 1 failed"):
                lanes.map(piece, [0, 1])
        assert lanes.map(piece, [0, 2]) == [0, 2]  # still usable


class _Inline:
    """Lanes without a helper: the caller runs every piece."""

    def map(self, fn, items):
        return [fn(x) for x in items]


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max"])
@pytest.mark.parametrize("mode", ["shared", "embedding", "onehot"])
def test_a_step_on_two_lanes_equals_the_step_on_one(loss, mode):
    """The halves of a batch give bit-identical updates whichever thread runs them, and the same step (to
    float rounding: the weight gradients are summed in another order) as the whole batch at once."""
    n_items, batch = 60, 20
    extra = {"shared": {}, "embedding": {"constrained_embedding": False, "embedding": 6}, "onehot": {"constrained_embedding": False}}[mode]
    config = tiny_config(layers=(5,), batch_size=batch, n_sample=12, loss=loss, elu_param=0.5, bpreg=1.0,
                         dropout_p_embed=0.2, dropout_p_hidden=0.3, momentum=0.1, matmul_precision="highest", **extra)
    # float32 products: "to float rounding" is the claim (bfloat16 products round the halves' operands alike,
    # but the whole batch's sums differ by more)
    rng = np.random.default_rng(0)
    steps = 3
    inputs, targets = rng.integers(0, n_items, batch * steps), rng.integers(0, n_items, batch * steps)
    bounds = np.arange(steps + 1) * batch
    schedule = Schedule(inputs, targets, np.zeros(batch * steps, bool), bounds, {}, np.arange(batch * steps))
    torch.manual_seed(0)
    base = build_model(config, n_items)
    results = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in training (the helper lane has one thread): a product's bits depend on threads
    for lanes in (None, _Inline(), Lanes()):
        model = copy.deepcopy(base)
        trainer = Trainer(model, config, np.ones(n_items, np.int64), CPU)
        trainer.lanes = lanes  # type: ignore[assignment]
        model.train()
        block = trainer.plan(schedule, 0, steps, np.random.default_rng(1))
        torch.manual_seed(2)
        hidden = model.init_hidden(batch)
        for t in range(steps):
            loss_sum, hidden = trainer._step(step_rows(block, t, t * batch, (t + 1) * batch), hidden)
        assert all(h.grad_fn is None and not h.requires_grad for h in hidden)  # no graph, on either thread
        results.append((loss_sum, hidden, {k: v.clone() for k, v in model.state_dict().items()}))
        if isinstance(lanes, Lanes):
            lanes.close()
    torch.set_num_threads(previous_threads)
    (loss_whole, h_whole, w_whole), (loss_inline, h_inline, w_inline), (loss_two, h_two, w_two) = results
    assert torch.equal(loss_inline, loss_two)
    assert all(torch.equal(a, b) for a, b in zip(h_inline, h_two, strict=True))
    assert all(torch.equal(w_inline[k], w_two[k]) for k in w_whole)
    torch.testing.assert_close(loss_two, loss_whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(h_two, h_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k in w_whole:
        torch.testing.assert_close(w_two[k], w_whole[k], rtol=1e-4, atol=1e-5)


def test_train_with_two_lanes_trains_the_same_model_to_rounding(synth, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.model.train import train

    config = tiny_config(batch_size=16, n_epochs=1, dropout_p_hidden=0.2, matmul_precision="highest")
    one = train(synth["train"], config, tmp_path / "one", device="cpu")
    two = train(synth["train"], config, tmp_path / "two", device="cpu", lanes=2)
    assert two.epoch_loss == pytest.approx(one.epoch_loss, rel=1e-4)
    with pytest.raises(ConfigError, match="lanes must be 1 or 2"):
        train(synth["train"], config, tmp_path / "three", device="cpu", lanes=3)
