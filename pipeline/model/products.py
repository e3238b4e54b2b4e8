"""The matrix products of a training step: in float32, or with bfloat16 operands and results.

On a CPU with native bfloat16 instructions (AVX512-BF16), oneDNN multiplies bfloat16 matrices about twice as
fast as MKL multiplies float32 ones, and the products are ~45% of a step. torch offers no CPU product of
bfloat16 operands into a float32 result, so ``BFLOAT16`` rounds the operands, multiplies (float32
accumulation inside the kernel) and widens the result back; everything else in the step stays float32 (the
GRU gates, the loss, the optimizer and its state). That is ``gru4rec.matmul_precision: medium`` on such a CPU
(torch's own meaning of "medium": products may compute in bfloat16); docs/benchmarks.md has its speed and
accuracy. ``cast`` lets a caller round an operand used by two products once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Products(NamedTuple):
    dtype: torch.dtype | None  # the operands' dtype; None: float32 products as they come

    def cast(self, t: Tensor) -> Tensor:
        """``t`` as this policy's operand (the same tensor when it already is one)."""
        return t if self.dtype is None else t.to(self.dtype)

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.dtype is None:
            return a.mm(b)
        return a.to(self.dtype).mm(b.to(self.dtype)).float()

    def addmm(self, bias: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``bias + a @ b`` (bias broadcast over rows), the bias added in float32."""
        if self.dtype is None:
            return torch.addmm(bias, a, b)
        return torch.add(bias, a.to(self.dtype).mm(b.to(self.dtype)))  # widened to float32 by the addition


FLOAT32 = Products(None)
BFLOAT16 = Products(torch.bfloat16)
