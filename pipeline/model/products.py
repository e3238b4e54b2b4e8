"""The matrix products of a training step: in float32, or with bfloat16 operands and results.

On a CPU with native bfloat16 instructions (AVX512-BF16), oneDNN multiplies bfloat16 matrices about twice as
fast as MKL multiplies float32 ones, and the products are ~45% of a step. torch offers no CPU product of
bfloat16 operands into a float32 result, so ``BFLOAT16`` rounds the operands, multiplies (float32
accumulation inside the kernel) and widens the result back; everything else in the step stays float32 (the
GRU gates, the loss, the optimizer and its state). That is ``gru4rec.matmul_precision: medium`` on such a CPU
(torch's own meaning of "medium": products may compute in bfloat16); docs/benchmarks.md has its speed and
accuracy. ``cast`` lets a caller round an operand used by two products once.

oneDNN builds (and caches) a kernel for every product shape, and the number of distinct item rows of a step
changes from step to step: ``cast_padded`` pads that dimension with zeros to a multiple of ``ROW_MULTIPLE``,
so a run needs a handful of shapes instead of hundreds (building them cost ~0.3 s of an RSC15 run's first
epoch, and more shapes than oneDNN's cache holds were rebuilt every epoch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

ROW_MULTIPLE = 64


class Products(NamedTuple):
    """How the step multiplies: ``FLOAT32`` (torch's products, unchanged) or ``BFLOAT16``."""

    dtype: torch.dtype | None  # the operands' dtype; None: float32 products as they come

    def cast(self, t: Tensor) -> Tensor:
        """``t`` as this policy's operand (the same tensor when it already is one: checked here, since even a
        no-op ``Tensor.to`` costs a few microseconds of dispatch, and a step casts ~30 times)."""
        return t if self.dtype is None or t.dtype == self.dtype else t.to(self.dtype)

    def cast_padded(self, t: Tensor, dim: int) -> Tensor:
        """``cast``, and for bfloat16 ``t``'s size along ``dim`` (0 or 1) padded with zero rows/columns to a
        multiple of ``ROW_MULTIPLE``; products with it then carry padding the caller cuts off (``rows``/``cols``)."""
        if self.dtype is None:
            return t
        n = t.shape[dim]
        extra = -n % ROW_MULTIPLE
        if not extra:
            return self.cast(t)
        out = t.new_empty(t.shape[0] + extra if dim == 0 else t.shape[0],
                          t.shape[1] + extra if dim == 1 else t.shape[1], dtype=self.dtype)
        out.narrow(dim, n, extra).zero_()
        out.narrow(dim, 0, n).copy_(t)
        return out

    def mm(self, a: Tensor, b: Tensor, rows: int | None = None) -> Tensor:
        """``a @ b``, its first ``rows`` rows only when given (the rest is padding)."""
        if self.dtype is None:
            return a.mm(b)
        r = self.cast(a).mm(self.cast(b))
        return (r if rows is None else r[:rows]).float()

    def addmm(self, bias: Tensor, a: Tensor, b: Tensor, cols: int | None = None) -> Tensor:
        """``bias + a @ b`` (bias broadcast over rows), the bias added in float32; the first ``cols`` columns
        only when given (the rest is padding)."""
        if self.dtype is None:
            return torch.addmm(bias, a, b)
        r = self.cast(a).mm(self.cast(b))
        return torch.add(bias, r if cols is None else r[:, :cols])  # widened to float32 by the addition


FLOAT32 = Products(None)
BFLOAT16 = Products(torch.bfloat16)
