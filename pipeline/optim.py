"""Adagrad with momentum, with sparse (row-wise) updates for the item tables.

    acc += g * g;   v = momentum * v - lr * g / sqrt(acc + eps);   w += v

No learning-rate decay and a zero initial accumulator, as in GRU4Rec. Dense parameters (the GRU weights)
are updated from their ``.grad`` with multi-tensor ops; an item table is updated only on the rows a step
touched, from the gradient of those gathered rows (duplicated rows have their gradients summed first, so
a row seen twice in a step gets one update with the summed gradient, like a coalesced sparse gradient).
Rows a step did not touch keep their weights, accumulator AND momentum unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class AdagradM:
    def __init__(
        self,
        dense: Iterable[nn.Parameter],
        sparse: Iterable[nn.Parameter],
        *,
        lr: float,
        momentum: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        if lr < 0 or momentum < 0:
            raise ValueError(f"learning_rate and momentum must be >= 0, got {lr}, {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.dense = list(dense)
        self.sparse = list(sparse)
        self._acc = [torch.zeros_like(p) for p in self.dense]
        self._vel = [torch.zeros_like(p) for p in self.dense] if self.momentum else []
        # Per item table: accumulator and velocity side by side, so one gather/scatter moves both.
        self._rows = {id(p): torch.zeros(p.shape[0], 2, _width(p), dtype=p.dtype, device=p.device) for p in self.sparse}

    # -- dense ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def step_dense(self) -> None:
        """Update the dense parameters from their gradients (those without a gradient are skipped)."""
        have = [i for i, p in enumerate(self.dense) if p.grad is not None]
        if not have:
            return
        params = [self.dense[i] for i in have]
        grads = [self.dense[i].grad for i in have]
        accs = [self._acc[i] for i in have]
        torch._foreach_addcmul_(accs, grads, grads)
        inv_sqrt = torch._foreach_add(accs, self.eps)
        torch._foreach_rsqrt_(inv_sqrt)
        update = torch._foreach_mul(grads, inv_sqrt)
        if self.momentum:
            vels = [self._vel[i] for i in have]
            torch._foreach_mul_(vels, self.momentum)
            torch._foreach_add_(vels, update, alpha=-self.lr)
            torch._foreach_add_(params, vels)
        else:
            torch._foreach_add_(params, update, alpha=-self.lr)

    def zero_grad(self) -> None:
        for p in self.dense:
            p.grad = None

    # -- sparse rows ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step_rows(self, param: nn.Parameter, index: Tensor, grad_rows: Tensor, *, unique: bool = False) -> None:
        """Update rows ``index`` of ``param`` given the gradient of ``param[index]``.

        With ``unique=True`` the caller promises ``index`` has no repeats (the training step gathers each
        row once); otherwise gradients of repeated rows are summed first.
        """
        state = self._rows[id(param)]
        table = param.data.view(param.shape[0], -1)
        grad = grad_rows.reshape(index.shape[0], -1)
        if unique:
            rows = index
        else:
            rows, inverse = torch.unique(index, return_inverse=True)
            grad = grad.new_zeros(rows.shape[0], grad.shape[1]).index_add_(0, inverse, grad)
        st = state.index_select(0, rows)
        acc, vel = st[:, 0], st[:, 1]
        acc.addcmul_(grad, grad)
        step = grad * acc.add(self.eps).rsqrt_()
        if self.momentum:
            vel.mul_(self.momentum).sub_(step, alpha=self.lr)
            table.index_add_(0, rows, vel)
        else:
            table.index_add_(0, rows, step, alpha=-self.lr)
        state.index_copy_(0, rows, st)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "eps": self.eps,
            "dense_acc": [t.detach().cpu() for t in self._acc],
            "dense_vel": [t.detach().cpu() for t in self._vel],
            "rows": [self._rows[id(p)].cpu() for p in self.sparse],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["dense_acc"]) != len(self._acc) or len(state["rows"]) != len(self.sparse):
            raise ValueError("optimizer state does not match the model's parameters")
        for dst, src in zip(self._acc, state["dense_acc"], strict=True):
            dst.copy_(src)
        for dst, src in zip(self._vel, state["dense_vel"], strict=False):
            dst.copy_(src)
        for p, src in zip(self.sparse, state["rows"], strict=True):
            self._rows[id(p)].copy_(src)


def _width(p: Tensor) -> int:
    return int(p[0].numel()) if p.dim() > 1 else 1
