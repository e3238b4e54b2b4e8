"""GRU4Rec training losses over a sampled score matrix.

The definitions (``cross_entropy``, ``bpr_max``) take ``scores`` of shape (B, B + n_sample): column j < B is
the target of row j (in-batch negatives for the other rows), the remaining columns are the shared popularity
samples. The target of row i is therefore the diagonal entry (i, i). Each returns the SUM over rows; the
caller divides by the batch size (the original's loss scaling). The softmax is applied exactly once, after
sampling.

Training uses the grouped forms (``*_grouped``): the same losses over a (B, distinct rows) score matrix,
where each distinct item row carries the log of the total weight of the columns it stands for (see
``pipeline.sampling.RowPlan``), returning the loss and its gradient in closed form. Columns of one item have
equal scores, so a softmax over columns equals a softmax over distinct rows with those log weights added;
the matrix is about half as wide and no autograd graph is built. Tests check both forms agree.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

LOSSES = ("cross-entropy", "bpr-max")
EPS = 1e-24  # guards the log of a probability that underflowed to zero


def _diagonal(x: Tensor) -> Tensor:
    return torch.diagonal(x[:, : x.shape[0]])


def cross_entropy(scores: Tensor, log_q: Tensor | None = None, logq: float = 0.0) -> Tensor:
    """Sampled softmax cross-entropy, with the optional logQ correction ``scores - logq * log q(item)``.

    ``log_q`` holds log q for each column (targets: log popularity share; samples: log sampling
    probability). log_softmax never takes the log of a zero probability, so no extra guard is needed.
    """
    if log_q is not None and logq:
        scores = scores - logq * log_q
    return -_diagonal(F.log_softmax(scores, dim=1)).sum()


def bpr_max(scores: Tensor, bpreg: float = 0.0, elu_param: float = 0.0) -> Tensor:
    """BPR-max (Hidasi & Karatzoglou 2018) with an optional ELU output activation.

    Per row: -log(sum_j w_j * sigmoid(s_target - s_j)) + bpreg * sum_j w_j * s_j**2, where w is the
    softmax over the negatives' scores (every column but the row's own target).
    """
    if elu_param > 0:
        scores = F.elu(scores, alpha=elu_param)
    n = scores.shape[0]
    target = _diagonal(scores).unsqueeze(1)
    own = torch.eye(n, scores.shape[1], dtype=torch.bool, device=scores.device)
    weights = torch.softmax(scores.masked_fill(own, float("-inf")), dim=1)  # 0 on the target itself
    ranking = (weights * torch.sigmoid(target - scores)).sum(dim=1)
    loss = -torch.log(ranking + EPS)
    if bpreg:
        loss = loss + bpreg * (weights * scores.square()).sum(dim=1)
    return loss.sum()


def cross_entropy_grouped(
    scores: Tensor, log_weight: Tensor, y_col: Tensor, target_shift: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Sampled softmax cross-entropy over distinct rows: (row-sum loss, d(scale * loss) / d scores).

    ``log_weight`` (U,) per distinct row (logQ weights included), ``y_col`` (B,) each row's target column,
    ``target_shift`` (B,) the logQ correction of each target's own column (zeros without logQ).
    """
    z = scores + log_weight
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    target = scores.gather(1, y_col.unsqueeze(1))
    loss_sum = (lse - target).sum() + target_shift.sum()
    grad = z.sub_(lse).exp_()  # softmax over the (weighted) columns
    grad.scatter_add_(1, y_col.unsqueeze(1), torch.full_like(target, -1.0))
    return loss_sum, grad.mul_(scale)


def bpr_max_grouped(
    scores: Tensor,
    log_weight: Tensor,
    y_col: Tensor,
    own_log_weight: Tensor,
    scale: float,
    bpreg: float = 0.0,
    elu_param: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """BPR-max over distinct rows: (row-sum loss, d(scale * loss) / d scores).

    ``log_weight`` (U,) is log #columns per distinct row; a row's negatives are every column but its own
    target, so its target row's weight is one less: ``own_log_weight`` (B,) = log(weight - 1) there.
    With w the softmax weights of the negatives and sig_u = sigmoid(s_target - s_u):
    loss = -log(sum_u w_u sig_u) + bpreg * sum_u w_u s_u**2, and
    d/ds_v = -(w_v (sig_v - R - sig_v (1 - sig_v)) + [v = target] sum_u w_u sig_u (1 - sig_u)) / R
             + bpreg * w_v (s_v**2 - G + 2 s_v), with R, G the two sums.
    """
    s = F.elu(scores, alpha=elu_param) if elu_param > 0 else scores
    col = y_col.unsqueeze(1)
    negatives = log_weight.expand_as(s).scatter(1, col, own_log_weight.unsqueeze(1))
    w = torch.softmax(s + negatives, dim=1)
    target = s.gather(1, col)
    sig = torch.sigmoid(target - s)
    w_sig = w * sig
    ranking = w_sig.sum(1, keepdim=True)
    loss = -torch.log(ranking + EPS)
    # -1/R * dR/ds: the negatives' part, then the target's part added on its own column
    inv = -1.0 / (ranking + EPS)
    w_sig_slope = w_sig * (1.0 - sig)
    grad = (w_sig - w_sig_slope).sub_(w * ranking).mul_(inv)
    grad.scatter_add_(1, col, w_sig_slope.sum(1, keepdim=True).mul_(inv))
    if bpreg:
        square = s * s
        reg = (w * square).sum(1, keepdim=True)
        loss = loss + bpreg * reg
        grad.add_(w.mul_(square.sub_(reg).add_(s, alpha=2.0)), alpha=bpreg)
    if elu_param > 0:  # d elu(x) / dx = 1 for x > 0, elu(x) + alpha otherwise
        grad.mul_(torch.where(scores > 0, 1.0, s + elu_param))
    return loss.sum(), grad.mul_(scale)


def compute(name: str, scores: Tensor, *, log_q: Tensor | None, logq: float, bpreg: float, elu_param: float) -> Tensor:
    """The configured loss (row sum). ``name`` is one of ``LOSSES``."""
    if name == "cross-entropy":
        return cross_entropy(scores, log_q, logq)
    if name == "bpr-max":
        return bpr_max(scores, bpreg, elu_param)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
