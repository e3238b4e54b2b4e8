"""GRU4Rec training losses over a sampled score matrix.

Every loss takes ``scores`` of shape (B, B + n_sample): column j < B is the target of row j (in-batch
negatives for the other rows), the remaining columns are the shared popularity samples. The target of
row i is therefore the diagonal entry (i, i). Each returns the SUM over rows; the caller divides by the
batch size (the original's loss scaling). The softmax is applied exactly once, here, after sampling.
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


def compute(name: str, scores: Tensor, *, log_q: Tensor | None, logq: float, bpreg: float, elu_param: float) -> Tensor:
    """The configured loss (row sum). ``name`` is one of ``LOSSES``."""
    if name == "cross-entropy":
        return cross_entropy(scores, log_q, logq)
    if name == "bpr-max":
        return bpr_max(scores, bpreg, elu_param)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
