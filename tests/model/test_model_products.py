"""The step's matrix products: float32 as they come, or bfloat16 operands with rows padded for oneDNN."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.products import BFLOAT16, FLOAT32, ROW_MULTIPLE


def test_float32_products_are_torch_products_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(7, 5, generator=g), torch.randn(5, 9, generator=g), torch.randn(9, generator=g)
    assert torch.equal(FLOAT32.mm(a, b), a.mm(b))
    assert torch.equal(FLOAT32.addmm(bias, a, b), torch.addmm(bias, a, b))
    assert FLOAT32.cast(a) is a and FLOAT32.cast_padded(a, 0) is a


@pytest.mark.parametrize("n", [ROW_MULTIPLE, ROW_MULTIPLE + 1, 3 * ROW_MULTIPLE - 5])
def test_padded_bfloat16_operands_give_the_unpadded_products(n):
    """Padding adds zero rows/columns only; cutting the padding off the products gives the products of the
    unpadded operands (to the rounding of bfloat16 results), widened to float32."""
    g = torch.Generator().manual_seed(n)
    out, rows, bias = torch.randn(6, 16, generator=g), torch.randn(n, 16, generator=g), torch.randn(n, generator=g)
    d = torch.randn(6, n, generator=g)
    w_op, d_op = BFLOAT16.cast_padded(rows, 0), BFLOAT16.cast_padded(d, 1)
    assert w_op.dtype == d_op.dtype == torch.bfloat16
    assert w_op.shape[0] % ROW_MULTIPLE == 0 and d_op.shape[1] == w_op.shape[0] >= n
    assert torch.equal(w_op[:n], rows.bfloat16()) and not w_op[n:].any() and not d_op[:, n:].any()
    out_op = BFLOAT16.cast(out)
    expect = {  # float64 products of the bfloat16-rounded operands
        "scores": bias.double() + out_op.double() @ rows.bfloat16().double().t(),
        "d_w": d.bfloat16().double().t() @ out_op.double(),
        "d_out": d.bfloat16().double() @ rows.bfloat16().double(),
    }
    got = {
        "scores": BFLOAT16.addmm(bias, out_op, w_op.t(), cols=n),
        "d_w": BFLOAT16.mm(d_op.t(), out_op, rows=n),
        "d_out": BFLOAT16.mm(d_op, w_op),
    }
    for name, value in got.items():
        assert value.dtype == torch.float32 and value.shape == expect[name].shape, name
        # the results are rounded to bfloat16 before widening: ~2**-9 of the largest product
        torch.testing.assert_close(value.double(), expect[name], rtol=0, atol=2**-6 * float(expect[name].abs().max()))
