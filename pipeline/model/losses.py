"""GRU4Rec training losses over a sampled score matrix.

The definitions (``cross_entropy``, ``bpr_max``) take ``scores`` of shape (B, B + n_sample): column j < B is
the target of row j (in-batch negatives for the other rows), the remaining columns are the shared popularity
samples. The target of row i is therefore the diagonal entry (i, i). Each returns the SUM over rows; the
caller divides by the batch size (the original's loss scaling). The softmax is applied exactly once, after
sampling.

Training uses the grouped forms (``*_grouped``): the same losses over a (B, distinct rows) score matrix,
where each distinct item row carries the log of the total weight of the columns it stands for (see
``pipeline.model.sampling.RowPlan``), returning the loss and its gradient in closed form. Columns of one item have
equal scores, so a softmax over columns equals a softmax over distinct rows with those log weights added;
the matrix is about half as wide and no autograd graph is built. Tests check both forms agree.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from pipeline.config import LOSSES  # the allowed values of gru4rec.loss

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
    col = y_col.unsqueeze(1)
    z = scores + log_weight
    top = z.amax(1, keepdim=True)
    p = torch.softmax(z, dim=1)
    # Each row's log-sum-exp from its largest probability: lse = top - log(max p); max p >= 1/U never
    # underflows, so this is as accurate as log_softmax, and softmax alone is ~2x faster on CPU than the
    # log_softmax + exp it replaces.
    lse = top - p.amax(1, keepdim=True).log_()
    # A row's loss is lse less its target's own score (the target row's log weight cancels), plus the logQ shift
    loss_sum = (lse - scores.gather(1, col)).sum() + target_shift.sum()
    grad = p.mul_(scale)
    grad.scatter_add_(1, col, torch.full_like(top, -scale))
    return loss_sum, grad


def _elu(x: Tensor, alpha: float) -> Tensor:
    """ELU as alpha * (exp(min(x, 0)) - 1) + max(x, 0): on CPU about twice as fast as ``F.elu`` (whose
    ``expm1`` is not vectorised there; measured on a step's 80 x 1,300 scores), equal to ~1e-7."""
    return x.clamp(max=0.0).exp_().sub_(1.0).mul_(alpha).add_(x.clamp(min=0.0))


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
    With w the softmax weights of the negatives, sig_u = sigmoid(s_target - s_u), R = sum_u w_u sig_u and
    G = sum_u w_u s_u**2: loss = -log(R) + bpreg * G, and
    d loss / d s_v = w_v ((sig_v**2 - R) / -R + bpreg (s_v**2 + 2 s_v - G)) + [v = target] (sum_u w_u sig_u**2 - R) / R.
    Written to pass over the (B, U) matrix as few times as possible (~15).
    """
    s = _elu(scores, elu_param) if elu_param > 0 else scores
    col = y_col.unsqueeze(1)
    target = s.gather(1, col)
    z = s + log_weight
    z.scatter_(1, col, target + own_log_weight.unsqueeze(1))  # the target row without its own column
    # Row sums of w * x below: a multiply and a sum are ~5x faster on CPU than bmm of (B,1,U) x (B,U,1)
    w = torch.softmax(z, dim=1)
    sig = torch.sigmoid_(target - s)
    ranking = (w * sig).sum(1, keepdim=True).add_(EPS)
    sig_sq = sig.mul_(sig)
    inv = -scale / ranking
    target_grad = (w * sig_sq).sum(1, keepdim=True).sub_(ranking).mul_(-inv)  # d/dt: (sum w sig^2 - R) / R
    grad = sig_sq.sub_(ranking).mul_(inv)
    loss = -torch.log(ranking)
    if bpreg:
        square = s * s
        reg = (w * square).sum(1, keepdim=True)
        loss = loss + bpreg * reg
        grad.add_(square.add_(s, alpha=2.0).sub_(reg), alpha=bpreg * scale)
    grad.mul_(w)
    grad.scatter_add_(1, col, target_grad)
    if elu_param > 0:
        grad = torch.ops.aten.elu_backward(grad, elu_param, 1, 1, True, s)
    return loss.sum(), grad


def compute(name: str, scores: Tensor, *, log_q: Tensor | None, logq: float, bpreg: float, elu_param: float) -> Tensor:
    """The configured loss (row sum). ``name`` is one of ``LOSSES``."""
    if name == "cross-entropy":
        return cross_entropy(scores, log_q, logq)
    if name == "bpr-max":
        return bpr_max(scores, bpreg, elu_param)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
