"""Adagrad with momentum, with sparse (row-wise) updates for the item tables.

    acc += g * g;   v = momentum * v - lr * g / sqrt(acc + eps);   w += v

No learning-rate decay and a zero initial accumulator, as in GRU4Rec. Dense parameters (the GRU weights)
are updated from their ``.grad`` with multi-tensor ops; an item table is updated only on the rows a step
touched, from the gradient of those gathered rows (duplicated rows have their gradients summed first, so
a row seen twice in a step gets one update with the summed gradient, like a coalesced sparse gradient).
Rows a step did not touch keep their weights, accumulator AND momentum unchanged. The accumulators are
stored with eps already added (they start at eps), which saves one pass over the state per step; checkpoints
say so (``acc_includes_eps``), and older checkpoints without it are read as plain sums.

Row gathers and scatters go through ``RowTable``: on CPU they use NumPy on the tensors' shared memory, which moves a step's ~1,500 rows 5-10x faster than ``index_select`` / ``index_copy_``
(measured on torch 2.13, one thread); on other devices they are the torch ops. On CPU the row update itself
runs in place on the tables (``pipeline.model.inplace``, compiled with Numba) instead of gather, update and
scatter back, and the same kernel updates each dense float32 parameter as a single row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

HOST_ROW_OPS = True  # CPU tables: gather/scatter rows with NumPy (tests switch it off to see the device path)
INPLACE_ROWS = True  # CPU tables: update rows in place with the compiled kernel (tests switch it off to compare)

Gathered = tuple[Tensor, "np.ndarray | None"]  # gathered rows, and the same memory as NumPy on the host path


class RowIndex(NamedTuple):
    """Distinct rows of an item table: on the device, and as a NumPy array where row ops use NumPy."""

    device: Tensor
    host: np.ndarray | None = None


class RowTable:
    """Gathers and scatters of distinct rows of one table. On CPU the table's NumPy view is made once
    (``Tensor.numpy()`` costs four dispatches per call, and a step moves rows ~15 times)."""

    def __init__(self, table: Tensor) -> None:
        self.tensor = table.detach().view(table.shape[0], -1)
        self.host = self.tensor.numpy() if HOST_ROW_OPS and table.device.type == "cpu" else None

    def index(self, rows: Tensor) -> RowIndex:
        return RowIndex(rows, rows.numpy() if self.host is not None else None)

    def take(self, rows: RowIndex) -> Gathered:
        """A copy of the rows (2-D: rows x row width)."""
        if self.host is not None and rows.host is not None:
            values = self.host.take(rows.host, axis=0)
            return torch.from_numpy(values), values
        return self.tensor.index_select(0, rows.device), None

    def put(self, rows: RowIndex, values: Gathered) -> None:
        if self.host is not None and rows.host is not None and values[1] is not None:
            self.host[rows.host] = values[1]
        else:
            self.tensor.index_copy_(0, rows.device, values[0])


def load_row_kernel() -> Callable[..., None]:
    """The in-place row kernel (``pipeline.model.inplace.adagrad_rows``), compiled or loaded from its cache:
    ~0.5 s once per process. Numba is imported here, when an optimizer with CPU tables or dense float32 CPU
    parameters is built, not at CLI start-up."""
    from pipeline.model import inplace

    inplace.load()
    return inplace.adagrad_rows


FUSED_ADAGRAD = hasattr(torch, "_fused_adagrad_")  # torch's fused CPU kernel (what Adagrad(fused=True) runs)
_NO_STEP = torch.zeros(())  # the fused kernel's step count, only read for learning-rate decay (none here)


def adagrad_(targets: list[Tensor], grads: list[Tensor], accs: list[Tensor], lr: float) -> None:
    """In place: ``acc += g * g; target -= lr * g / sqrt(acc)`` (``acc`` stores the sum plus eps).

    On CPU this is torch's fused Adagrad kernel with eps 0 (it adds eps outside the square root, and ours
    is already inside ``acc``): one pass instead of three, ~2x faster on a step's rows. Elsewhere (the
    fused kernel is CPU-only) multi-tensor ops.
    """
    if FUSED_ADAGRAD and targets[0].device.type == "cpu":
        torch._fused_adagrad_(targets, grads, accs, [_NO_STEP] * len(targets), lr=lr, lr_decay=0.0,
                              weight_decay=0.0, eps=0.0, maximize=False)
        return
    torch._foreach_addcmul_(accs, grads, grads)
    torch._foreach_addcdiv_(targets, grads, torch._foreach_sqrt(accs), value=-lr)


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
        self._acc = [torch.full_like(p, self.eps) for p in self.dense]
        self._vel = [torch.zeros_like(p) for p in self.dense] if self.momentum else []
        # Per item table: accumulator and velocity rows, each contiguous so the row update runs on
        # contiguous blocks (strided views of one side-by-side table made the element-wise ops slower).
        self._acc_rows = {id(p): torch.full((p.shape[0], _width(p)), self.eps, dtype=p.dtype, device=p.device) for p in self.sparse}
        self._vel_rows = {id(p): torch.zeros(p.shape[0], _width(p), dtype=p.dtype, device=p.device) for p in self.sparse}
        self._tables = {id(p): (RowTable(p), RowTable(self._acc_rows[id(p)]), RowTable(self._vel_rows[id(p)])) for p in self.sparse}
        host = INPLACE_ROWS and any(t[0].host is not None for t in self._tables.values())
        # Dense float32 CPU parameters take the same kernel, each as one row: one call per parameter instead of
        # three multi-tensor passes (mul, fused Adagrad, add) over all of them
        dense_host = HOST_ROW_OPS and INPLACE_ROWS and bool(self.dense) and all(_host_float32(p) for p in self.dense)
        self._row_kernel = load_row_kernel() if host or dense_host else None
        self._dense_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        if dense_host:
            vels = self._vel or self._acc  # without momentum the kernel never reads the velocity
            self._dense_rows = [(_one_row(p.detach()), _one_row(a), _one_row(v))
                                for p, a, v in zip(self.dense, self._acc, vels, strict=True)]

    def rows_of(self, param: nn.Parameter) -> RowTable:
        """Row gathers/scatters of one of the item tables."""
        return self._tables[id(param)][0]

    # -- dense ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def step_dense(self, grads: list[Tensor] | None = None) -> None:
        """Update the dense parameters from ``grads`` (in ``dense`` order) or else their ``.grad`` (those
        without a gradient are skipped)."""
        if grads is not None and INPLACE_ROWS and self._row_kernel is not None and self._dense_rows is not None:
            for (w, acc, vel), grad in zip(self._dense_rows, grads, strict=True):
                self._row_kernel(w, acc, vel, _ROW_ZERO, _one_row(grad.contiguous()), self.lr, self.momentum)
            return
        if grads is not None:
            have = list(range(len(self.dense)))
        else:
            have = [i for i, p in enumerate(self.dense) if p.grad is not None]
            if not have:
                return
            grads = [g for i in have if (g := self.dense[i].grad) is not None]
        params: list[Tensor] = [self.dense[i] for i in have]
        accs = [self._acc[i] for i in have]
        if self.momentum:
            vels = [self._vel[i] for i in have]
            torch._foreach_mul_(vels, self.momentum)
            adagrad_(vels, grads, accs, self.lr)
            torch._foreach_add_(params, vels)
        else:
            adagrad_(params, grads, accs, self.lr)

    def zero_grad(self) -> None:
        for p in self.dense:
            p.grad = None

    # -- sparse rows ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step_rows(
        self,
        param: nn.Parameter,
        index: Tensor | RowIndex,
        grad_rows: Tensor,
        *,
        unique: bool = False,
        current: Gathered | None = None,
    ) -> None:
        """Update rows ``index`` of ``param`` given the gradient of ``param[index]``.

        With ``unique=True`` the caller promises ``index`` has no repeats (the training step plans each
        step's distinct rows ahead) and may pass ``current``, its gathered copy of those rows (overwritten);
        otherwise gradients of repeated rows are summed first (``unique``: a host sync on a GPU).
        """
        table, acc_table, vel_table = self._tables[id(param)]
        rows = index if isinstance(index, RowIndex) else table.index(index)
        grad = grad_rows.reshape(rows.device.shape[0], -1)
        if not unique:
            distinct, inverse = torch.unique(rows.device, return_inverse=True)
            grad = grad.new_zeros(distinct.shape[0], grad.shape[1]).index_add_(0, inverse, grad)
            rows, current = table.index(distinct), None
        if INPLACE_ROWS and self._row_kernel is not None and rows.host is not None and table.host is not None:
            assert acc_table.host is not None and vel_table.host is not None
            self._row_kernel(table.host, acc_table.host, vel_table.host, rows.host, grad.contiguous().numpy(),
                             self.lr, self.momentum)
            return
        weights = table.take(rows) if current is None else (current[0].view(grad.shape), current[1])
        acc = acc_table.take(rows)
        if self.momentum:
            vel = vel_table.take(rows)
            vel[0].mul_(self.momentum)
            adagrad_([vel[0]], [grad], [acc[0]], self.lr)
            vel_table.put(rows, vel)
            weights[0].add_(vel[0])
        else:
            adagrad_([weights[0]], [grad], [acc[0]], self.lr)
        acc_table.put(rows, acc)
        table.put(rows, weights)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "eps": self.eps,
            "acc_includes_eps": True,
            "dense_acc": [t.detach().cpu() for t in self._acc],
            "dense_vel": [t.detach().cpu() for t in self._vel],
            # (rows, 2, width): accumulator and velocity side by side, the format of earlier checkpoints
            "rows": [torch.stack([self._acc_rows[id(p)], self._vel_rows[id(p)]], 1).cpu() for p in self.sparse],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["dense_acc"]) != len(self._acc) or len(state["rows"]) != len(self.sparse):
            raise ValueError("optimizer state does not match the model's parameters")
        shift = 0.0 if state.get("acc_includes_eps") else self.eps
        for dst, src in zip(self._acc, state["dense_acc"], strict=True):
            dst.copy_(src).add_(shift)
        for dst, src in zip(self._vel, state["dense_vel"], strict=False):
            dst.copy_(src)
        for p, src in zip(self.sparse, state["rows"], strict=True):
            self._acc_rows[id(p)].copy_(src[:, 0]).add_(shift)
            self._vel_rows[id(p)].copy_(src[:, 1])


_ROW_ZERO = np.zeros(1, np.int64)  # the row index of a dense parameter seen as one row


def _host_float32(p: Tensor) -> bool:
    return p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()


def _one_row(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a NumPy array of one row (shared, not copied)."""
    return t.view(1, -1).numpy()


def _width(p: Tensor) -> int:
    return int(p[0].numel()) if p.dim() > 1 else 1
