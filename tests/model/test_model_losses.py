"""The losses against their formulas, computed independently in NumPy (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import losses


def _scores(b: int = 4, extra: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, b + extra, generator=g, dtype=torch.float64) * 3


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def test_cross_entropy_is_softmax_applied_once_on_raw_scores():
    s = _scores()
    a = s.numpy()
    expected = -(np.diag(a[:, :4]) - _logsumexp(a)).sum()
    assert losses.cross_entropy(s).item() == pytest.approx(expected, rel=1e-12)
    # a double softmax (softmax of the softmax) gives a visibly different, much flatter loss
    p = np.exp(a - _logsumexp(a)[:, None])
    double = -(np.diag(p[:, :4]) - _logsumexp(p)).sum()
    assert abs(double - expected) > 1.0


def test_logq_correction_subtracts_logq_times_log_q():
    s = _scores()
    log_q = torch.log(torch.linspace(0.01, 0.5, s.shape[1], dtype=torch.float64))
    a = s.numpy() - 0.7 * log_q.numpy()
    expected = -(np.diag(a[:, :4]) - _logsumexp(a)).sum()
    assert losses.cross_entropy(s, log_q, 0.7).item() == pytest.approx(expected, rel=1e-12)
    assert losses.cross_entropy(s, log_q, 0.0).item() == pytest.approx(losses.cross_entropy(s).item())


@pytest.mark.parametrize("bpreg,elu", [(0.0, 0.0), (1.95, 0.0), (1.95, 0.5), (0.9, 1.0)])
def test_bpr_max_formula(bpreg, elu):
    s = _scores(seed=1)
    a = s.numpy()
    if elu:
        a = np.where(a > 0, a, elu * (np.exp(a) - 1))
    b = a.shape[0]
    total = 0.0
    for i in range(b):
        neg = np.array([j for j in range(a.shape[1]) if j != i])  # every column but the row's own target
        w = np.exp(a[i, neg] - a[i, neg].max())
        w /= w.sum()
        sig = 1 / (1 + np.exp(-(a[i, i] - a[i, neg])))
        total += -np.log((w * sig).sum() + 1e-24) + bpreg * (w * a[i, neg] ** 2).sum()
    assert losses.bpr_max(s, bpreg, elu).item() == pytest.approx(total, rel=1e-10)


def test_losses_stay_finite_on_extreme_scores():
    s = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 0.0]])
    s[0, 0], s[0, 1] = -1e4, 1e4  # target hopelessly below a negative: probability underflows
    for value in (losses.cross_entropy(s), losses.bpr_max(s, 1.0, 0.0), losses.bpr_max(s, 0.0, 0.5)):
        assert torch.isfinite(value)


def test_compute_dispatches_and_rejects_unknown_loss():
    s = _scores()
    assert losses.compute("bpr-max", s, log_q=None, logq=0, bpreg=0.5, elu_param=0).item() == pytest.approx(
        losses.bpr_max(s, 0.5).item()
    )
    with pytest.raises(ValueError, match="unknown loss"):
        losses.compute("top1", s, log_q=None, logq=0, bpreg=0, elu_param=0)
