"""Adagrad with momentum: dense and row-wise updates against the formula, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.model.optim import AdagradM

LR, MOM, EPS = 0.2, 0.4, 1e-6


def _reference(w, grads, lr=LR, mom=MOM):
    """acc += g*g; v = mom*v - lr*g/sqrt(acc+eps); w += v (float64 NumPy)."""
    w = w.astype(np.float64).copy()
    acc, v = np.zeros_like(w), np.zeros_like(w)
    for g in grads:
        acc += g * g
        v = mom * v - lr * g / np.sqrt(acc + EPS)
        w += v
    return w


@pytest.mark.parametrize("momentum", [0.0, MOM])
def test_dense_update_follows_the_formula(momentum):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    start = p.detach().numpy().copy()
    opt = AdagradM([p], [], lr=LR, momentum=momentum)
    grads = [np.random.default_rng(i).normal(size=(5, 3)) for i in range(4)]
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step_dense()
        opt.zero_grad()
    np.testing.assert_allclose(p.detach().numpy(), _reference(start, grads, mom=momentum), rtol=1e-6)


def test_row_update_sums_duplicates_and_leaves_other_rows_alone():
    table = nn.Parameter(torch.randn(6, 2, dtype=torch.float64))
    start = table.detach().numpy().copy()
    opt = AdagradM([], [table], lr=LR, momentum=MOM)
    steps = [
        (torch.tensor([1, 3, 1]), np.array([[1.0, 2.0], [0.5, -1.0], [3.0, -2.0]])),
        (torch.tensor([3, 4]), np.array([[-1.0, 1.0], [0.2, 0.2]])),
        (torch.tensor([1]), np.array([[0.1, 0.3]])),
    ]
    dense_grads = []
    for idx, g in steps:
        opt.step_rows(table, idx, torch.tensor(g))
        full = np.zeros_like(start)
        np.add.at(full, idx.numpy(), g)  # a row seen twice gets its gradients summed (coalesced)
        dense_grads.append(full)
    # Row-wise semantics: a row's acc/velocity only move on the steps that touch it.
    expected = start.copy()
    for row in range(6):
        touched = [g[row] for g in dense_grads if np.any(g[row] != 0)]
        expected[row] = _reference(start[row], touched)
    np.testing.assert_allclose(table.detach().numpy(), expected, rtol=1e-6)
    for row in (0, 2, 5):
        np.testing.assert_array_equal(table.detach().numpy()[row], start[row])


def test_row_update_with_unique_index_equals_summed_path():
    torch.manual_seed(1)
    a = nn.Parameter(torch.randn(10, 4))
    b = nn.Parameter(a.detach().clone())
    opt_a, opt_b = AdagradM([], [a], lr=LR, momentum=MOM), AdagradM([], [b], lr=LR, momentum=MOM)
    idx = torch.tensor([7, 2, 7, 0, 2, 2])
    g = torch.randn(6, 4)
    opt_a.step_rows(a, idx, g)
    rows, inv = torch.unique(idx, return_inverse=True)
    opt_b.step_rows(b, rows, torch.zeros(len(rows), 4).index_add_(0, inv, g), unique=True)
    torch.testing.assert_close(a, b)


def test_one_dimensional_tables_and_state_round_trip():
    bias = nn.Parameter(torch.zeros(5))
    opt = AdagradM([], [bias], lr=LR, momentum=MOM)
    opt.step_rows(bias, torch.tensor([4, 0]), torch.tensor([1.0, -1.0]))
    assert bias[4].item() == pytest.approx(-LR / np.sqrt(1 + EPS), rel=1e-6)
    state = opt.state_dict()
    clone = nn.Parameter(bias.detach().clone())
    opt2 = AdagradM([], [clone], lr=LR, momentum=MOM)
    opt2.load_state_dict(state)
    opt.step_rows(bias, torch.tensor([4]), torch.tensor([0.5]))
    opt2.step_rows(clone, torch.tensor([4]), torch.tensor([0.5]))
    torch.testing.assert_close(bias, clone)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_multi_tensor_updates_agree_with_the_formula(monkeypatch, fused):
    """The CPU path runs torch's fused Adagrad kernel; other devices the multi-tensor ops: same numbers."""
    from pipeline.model import optim

    monkeypatch.setattr(optim, "FUSED_ADAGRAD", fused and optim.FUSED_ADAGRAD)
    torch.manual_seed(3)
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    table = nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
    start, start_table = p.detach().numpy().copy(), table.detach().numpy().copy()
    opt = AdagradM([p], [table], lr=LR, momentum=MOM)
    grads = [np.random.default_rng(i).normal(size=(4, 3)) for i in range(3)]
    for g in grads:
        opt.step_dense([torch.tensor(g)])
        opt.step_rows(table, torch.tensor([0, 1, 2, 3]), torch.tensor(g), unique=True)
    np.testing.assert_allclose(p.detach().numpy(), _reference(start, grads), rtol=1e-6)
    np.testing.assert_allclose(table.detach().numpy()[:4], _reference(start_table[:4], grads), rtol=1e-6)
    np.testing.assert_array_equal(table.detach().numpy()[4:], start_table[4:])


def test_optimizer_state_of_earlier_checkpoints_loads_as_plain_sums():
    table = nn.Parameter(torch.zeros(3, 2))
    opt = AdagradM([], [table], lr=LR, momentum=MOM)
    opt.step_rows(table, torch.tensor([1]), torch.tensor([[1.0, 2.0]]))
    state = opt.state_dict()
    old_format = dict(state, rows=[state["rows"][0].clone()])
    del old_format["acc_includes_eps"]
    old_format["rows"][0][:, 0] -= EPS  # what the earlier code stored: the sums without eps
    other = AdagradM([], [nn.Parameter(torch.zeros(3, 2))], lr=LR, momentum=MOM)
    other.load_state_dict(old_format)
    torch.testing.assert_close(other.state_dict()["rows"][0], state["rows"][0])


@pytest.mark.parametrize("momentum", [0.0, MOM])
@pytest.mark.parametrize("width", [1, 4])
def test_in_place_row_update_equals_gather_update_scatter(monkeypatch, momentum, width):
    """The compiled in-place kernel (CPU) and the gather / fused update / scatter path give the same rows,
    accumulators and velocities, step after step, including repeated indices; untouched rows stay as they were."""
    from pipeline.model import optim

    torch.manual_seed(3)
    shape = (12,) if width == 1 else (12, width)
    tables = {flag: nn.Parameter(torch.randn(shape)) for flag in (True, False)}
    tables[False].data.copy_(tables[True].data)
    opts = {flag: AdagradM([], [tables[flag]], lr=LR, momentum=momentum) for flag in (True, False)}
    start = tables[True].detach().clone()
    steps = [(torch.tensor([7, 2, 9]), True), (torch.tensor([2, 4, 2, 7]), False), (torch.tensor([9, 0]), True)]
    for idx, unique in steps:
        grad = torch.randn((len(idx),) + shape[1:])
        for flag in (True, False):
            monkeypatch.setattr(optim, "INPLACE_ROWS", flag)
            opts[flag].step_rows(tables[flag], idx, grad.clone(), unique=unique)
    torch.testing.assert_close(tables[True], tables[False], rtol=1e-6, atol=1e-7)
    for a, b in zip(opts[True].state_dict()["rows"], opts[False].state_dict()["rows"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for row in (1, 3, 5, 6, 8, 10, 11):
        assert torch.equal(tables[True][row], start[row])


@pytest.mark.parametrize("momentum", [0.0, MOM])
def test_in_place_dense_update_equals_multi_tensor_update(monkeypatch, momentum):
    """Dense float32 CPU parameters updated by the compiled kernel (each as one row) and by the multi-tensor
    path give the same parameters, accumulators and velocities, step after step."""
    from pipeline.model import optim

    torch.manual_seed(4)
    params = {flag: [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))] for flag in (True, False)}
    for a, b in zip(params[True], params[False], strict=True):
        b.data.copy_(a.data)
    opts = {}
    for flag in (True, False):
        monkeypatch.setattr(optim, "INPLACE_ROWS", flag)
        opts[flag] = AdagradM(params[flag], [], lr=LR, momentum=momentum)
    assert opts[True]._dense_rows is not None and opts[False]._dense_rows is None  # each really took its path
    for _ in range(4):
        grads = [torch.randn(5, 3), torch.randn(7)]
        for flag in (True, False):
            monkeypatch.setattr(optim, "INPLACE_ROWS", flag)
            opts[flag].step_dense([g.clone() for g in grads])
    for a, b in zip(params[True], params[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    state = {flag: opts[flag].state_dict() for flag in (True, False)}
    for key in ("dense_acc", "dense_vel"):
        for a, b in zip(state[True][key], state[False][key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_in_place_kernel_compiles_where_no_cache_can_be_written(monkeypatch):
    """A read-only install without a writable home leaves Numba nowhere to cache: the kernel then compiles in
    each process instead of failing the import."""
    import importlib.util

    from numba.core import caching

    from pipeline.model import inplace

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # what Numba finds when nothing is writable
    spec = importlib.util.spec_from_file_location("inplace_without_cache", inplace.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert type(module.adagrad_rows._cache).__name__ == "NullCache"  # compiled without a cache
    w, acc, vel = np.ones((3, 2), np.float32), np.full((3, 2), EPS, np.float32), np.zeros((3, 2), np.float32)
    module.adagrad_rows(w, acc, vel, np.array([2]), np.full((1, 2), 0.5, np.float32), LR, 0.0)
    np.testing.assert_allclose(w[2], 1 - LR * 0.5 / np.sqrt(0.25 + EPS), rtol=1e-6)
    np.testing.assert_array_equal(w[:2], 1.0)
