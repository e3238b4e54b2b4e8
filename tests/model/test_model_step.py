"""The training step without autograd: its closed-form losses, gradients and updates against autograd on the
per-column definitions, and a profile of its operations (no unique, no read-back, no sync)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gru4rec_testdata import tiny_config
from torch.profiler import ProfilerActivity, profile

from pipeline.model import losses, optim
from pipeline.model.predict import build_model
from pipeline.model.sampling import plan_rows
from pipeline.model.step import Block, Trainer, step_rows

CPU = torch.device("cpu")
# Operations that read a device value back to the host or wait for the device: item()/float()/bool()
# (_local_scalar_dense), unique, nonzero and ops whose output size depends on the data. None may run in a step.
SYNCING_OPS = {
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::unique", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
    "aten::repeat_interleave",
}
# Called from Python (not inside another op, where e.g. a Python scalar is wrapped with aten::to): .cpu(),
# .to(...), .numpy() and .tolist() (resolve_conj) copy to the host or between devices/dtypes.
COPY_OPS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::resolve_conj", "aten::cpu"}


def _grouped_inputs(seed: int, b: int = 5, n_sample: int = 9, n_items: int = 12, logq: float = 0.0, loss: str = "cross-entropy"):
    """Scores per (target + sample) column and the same scores per distinct row, with the row plan."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_items, b)
    sample = rng.integers(0, n_items, (1, n_sample))
    log_count = np.log(rng.integers(1, 30, n_items).astype(np.float64))
    plan = plan_rows(y, y, np.array([0, b]), sample, n_items, shared=False, log_count=log_count, loss=loss,
                     logq=logq, sample_alpha=0.5)
    item_scores = torch.tensor(rng.normal(size=(b, n_items)) * 3, dtype=torch.float64)
    rows = torch.as_tensor(plan.rows)
    grouped = item_scores[:, rows].clone().requires_grad_()
    columns = torch.as_tensor(np.concatenate([y, sample[0]]))
    col_of = torch.searchsorted(rows, columns)  # each column's distinct row
    log_q = torch.as_tensor(np.concatenate([log_count[y], 0.5 * log_count[sample[0]]]))
    return plan, grouped, col_of, log_q


@pytest.mark.parametrize("logq", [0.0, 1.0, 0.6])
def test_grouped_cross_entropy_equals_the_column_definition_and_its_gradient(logq):
    plan, grouped, col_of, log_q = _grouped_inputs(0, logq=logq)
    b = len(plan.y_col)
    expanded = grouped[:, col_of]  # the (B, B + n_sample) matrix of the definition
    reference = losses.cross_entropy(expanded, log_q, logq)
    reference.backward()
    with torch.no_grad():
        loss, grad = losses.cross_entropy_grouped(
            grouped.detach().clone(), torch.as_tensor(plan.log_weight).double(), torch.as_tensor(plan.y_col),
            torch.as_tensor(plan.target_shift).double(), 1.0 / b,
        )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad, grouped.grad / b, rtol=1e-5, atol=1e-9)


def test_grouped_cross_entropy_in_float32_stays_exact_where_probabilities_underflow():
    """Scores far apart (target probabilities below float32's smallest value): the float32 loss still equals the
    float64 definition; nothing takes the log of an underflowed probability."""
    plan, grouped, col_of, log_q = _grouped_inputs(1, logq=1.0)
    spread = grouped.detach() * 60  # gaps of hundreds between scores of a row
    reference = losses.cross_entropy(spread[:, col_of], log_q, 1.0)
    log_weight, y_col = torch.as_tensor(plan.log_weight).float(), torch.as_tensor(plan.y_col)
    loss, grad = losses.cross_entropy_grouped(spread.float(), log_weight, y_col, torch.as_tensor(plan.target_shift).float(), 1.0)
    target_p = torch.softmax(spread.float() + log_weight, 1).gather(1, y_col.unsqueeze(1))
    assert (target_p == 0).any()  # some targets' probabilities do underflow here
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("bpreg,elu", [(0.0, 0.0), (1.95, 0.0), (1.95, 0.5), (0.9, 1.0)])
def test_grouped_bpr_max_equals_the_column_definition_and_its_gradient(bpreg, elu):
    for seed in range(3):
        plan, grouped, col_of, _ = _grouped_inputs(seed, loss="bpr-max")
        b = len(plan.y_col)
        reference = losses.bpr_max(grouped[:, col_of], bpreg, elu)
        reference.backward()
        with torch.no_grad():
            loss, grad = losses.bpr_max_grouped(
                grouped.detach().clone(), torch.as_tensor(plan.log_weight).double(), torch.as_tensor(plan.y_col),
                torch.as_tensor(plan.target_shift).double(), 1.0 / b, bpreg, elu,
            )
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
        torch.testing.assert_close(grad, grouped.grad / b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["shared", "embedding", "one-hot"])
def test_closed_form_gru_gradients_equal_autograd(mode):
    cfg = tiny_config(layers=(6, 5), dropout_p_embed=0.3, dropout_p_hidden=0.25, constrained_embedding=mode == "shared",
                      embedding=4 if mode == "embedding" else 0)
    torch.manual_seed(0)
    model = build_model(cfg, 9).double().train()
    b = 4
    x_rows = model.input_table.detach()[torch.tensor([1, 3, 3, 7])].clone().requires_grad_()
    hidden = [torch.randn(b, n, dtype=torch.float64) for n in model.layers]
    d_out = torch.randn(b, model.layers[-1], dtype=torch.float64)
    torch.manual_seed(5)
    out, new_hidden = model.step(x_rows, hidden)
    (out * d_out).sum().backward()
    torch.manual_seed(5)  # same dropout masks
    with torch.no_grad():
        out2, hidden2, cache = model.train_forward(x_rows.detach(), hidden)
        grads, d_x = model.train_backward(cache, d_out)
    torch.testing.assert_close(out2, out.detach())
    for h1, h2 in zip(new_hidden, hidden2, strict=True):
        torch.testing.assert_close(h2, h1.detach())
    params = model.dense_parameters()
    assert len(grads) == len(params)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(d_x, x_rows.grad)


def _reference_step(model, opt, cfg, x, y, sample, hidden, log_count):
    """One step as before this change: columns = targets + samples, the loss definitions, autograd, and
    row updates over the distinct touched rows (gradients of repeated rows summed)."""
    out_items = torch.cat([y, sample])
    with torch.enable_grad():
        out, hidden = model.step(model.input_table[x], hidden)
        scores = model.score(out, model.Wy[out_items], model.By[out_items])
        log_q = torch.cat([log_count[y], cfg.sample_alpha * log_count[sample]]).float()
        loss = losses.compute(cfg.loss, scores, log_q=log_q, logq=cfg.logq, bpreg=cfg.bpreg, elu_param=cfg.elu_param)
        (loss / len(x)).backward()
    opt.step_dense()
    opt.zero_grad()
    shared = model.constrained_embedding
    rows = torch.unique(torch.cat([x, out_items]) if shared else out_items)
    for table in (model.Wy, model.By):
        opt.step_rows(table, rows, table.grad[rows], unique=True)
        table.grad = None
    if not shared:
        x_rows = torch.unique(x)
        opt.step_rows(model.input_table, x_rows, model.input_table.grad[x_rows], unique=True)
        model.input_table.grad = None
    return loss.detach(), [h.detach() for h in hidden]


@pytest.mark.parametrize("mode", ["shared", "embedding", "one-hot"])
@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max"])
def test_a_planned_step_updates_the_model_like_the_autograd_step(mode, loss):
    """Four steps (one batch shrinking) from the same weights: the closed-form step on distinct rows and the
    autograd step on (targets + samples) columns end with the same weights and optimizer state."""
    n_items, widths, n_sample = 25, [6, 6, 6, 4], 10
    cfg = tiny_config(layers=(8,), batch_size=6, n_sample=n_sample, loss=loss, logq=1.0, elu_param=0.5, bpreg=1.2,
                      momentum=0.3, learning_rate=0.2, dropout_p_embed=0.2, dropout_p_hidden=0.3,
                      constrained_embedding=mode == "shared", embedding=5 if mode == "embedding" else 0,
                      matmul_precision="highest")  # float32 products, like the autograd reference
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 40, n_items)
    bounds = np.concatenate([[0], np.cumsum(widths)])
    inputs, targets = rng.integers(0, n_items, bounds[-1]), rng.integers(0, n_items, bounds[-1])
    samples = rng.integers(0, n_items, (len(widths), n_sample))
    torch.manual_seed(0)
    new = build_model(cfg, n_items)
    old = build_model(cfg, n_items)
    old.load_state_dict(new.state_dict())
    trainer = Trainer(new, cfg, counts, CPU)
    ref_opt = optim.AdagradM(old.dense_parameters(), [old.Wy, old.By] + [t for t in (old.E, old.Wx0) if t is not None],
                             lr=cfg.learning_rate, momentum=cfg.momentum)
    plan = plan_rows(inputs, targets, bounds, samples, n_items, shared=new.constrained_embedding,
                     log_count=trainer.log_count, loss=cfg.loss, logq=cfg.logq, sample_alpha=cfg.sample_alpha)
    block = Block.of(plan, 0, 0, CPU)
    log_count = torch.as_tensor(trainer.log_count)
    h_new = new.init_hidden(widths[0])
    h_old = old.init_hidden(widths[0])
    new.train()
    old.train()
    for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        h_new, h_old = [h[: hi - lo] for h in h_new], [h[: hi - lo] for h in h_old]
        torch.manual_seed(10 + t)
        loss_new, h_new = trainer._step(step_rows(block, t, lo, hi), h_new)
        torch.manual_seed(10 + t)
        loss_old, h_old = _reference_step(old, ref_opt, cfg, torch.as_tensor(inputs[lo:hi]), torch.as_tensor(targets[lo:hi]),
                                          torch.as_tensor(samples[t]), h_old, log_count)
        assert loss_new.item() == pytest.approx(loss_old.item(), rel=1e-4)
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(trainer.optimizer.state_dict()["rows"], ref_opt.state_dict()["rows"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max"])
@pytest.mark.parametrize("mode", ["shared", "embedding"])
def test_a_step_never_reads_back_from_the_device(monkeypatch, loss, mode):
    """A profile of several steps on the code path of a GPU (not the CPU-only NumPy row gathers and fused
    Adagrad kernel, which reads its step count with item()): no unique, no item()/float()/bool(), no
    .cpu()/.numpy()/.tolist(), no dtype or device copies."""
    monkeypatch.setattr(optim, "HOST_ROW_OPS", False)
    monkeypatch.setattr(optim, "FUSED_ADAGRAD", False)
    cfg = tiny_config(layers=(8, 6), batch_size=6, n_sample=12, loss=loss, logq=1.0, elu_param=0.5, bpreg=1.0,
                      dropout_p_embed=0.2, dropout_p_hidden=0.3, constrained_embedding=mode == "shared",
                      embedding=5 if mode == "embedding" else 0,
                      matmul_precision="highest")  # a GPU's products take float32 operands (bfloat16 ones are the CPU's)
    n_items, n_steps = 40, 6
    rng = np.random.default_rng(0)
    trainer = Trainer(build_model(cfg, n_items), cfg, rng.integers(1, 20, n_items), CPU)
    bounds = np.arange(n_steps + 1) * 6
    plan = plan_rows(rng.integers(0, n_items, 36), rng.integers(0, n_items, 36), bounds,
                     rng.integers(0, n_items, (n_steps, 12)), n_items, shared=mode == "shared",
                     log_count=trainer.log_count, loss=loss, logq=1.0, sample_alpha=0.5)
    block = Block.of(plan, 0, 0, CPU)
    hidden = trainer.model.init_hidden(6)
    trainer.model.train()
    trainer._step(step_rows(block, 0, 0, 6), hidden)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(1, n_steps):
            _, hidden = trainer._step(step_rows(block, t, 6 * t, 6 * t + 6), hidden)
    events = prof.events()
    assert {"aten::addmm", "aten::index_select", "aten::index_copy_"} <= {e.name for e in events}  # it saw the step
    syncing = sorted({e.name for e in events if e.name in SYNCING_OPS})
    copies = sorted({e.name for e in events if e.name in COPY_OPS and e.cpu_parent is None})
    assert not syncing and not copies, (syncing, copies)


def _syncs(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in SYNCING_OPS]


def test_evaluation_inner_loop_never_reads_back_from_the_device():
    """Evaluating sessions of 3 or of 12 events (one chunk) runs the same few host reads (setup and the
    final copy of the ranks), however many steps the inner loop makes: none is inside the loop."""
    from gru4rec_testdata import synthetic_table

    from pipeline.model.clicks import ItemMap, index_sessions, read_log
    from pipeline.model.evaluate import evaluate

    item_map = ItemMap.from_ids([f"i{k}" for k in range(40)], np.arange(1, 41))
    model = build_model(tiny_config(), len(item_map))
    counts = []
    for length in (3, 12):
        table = synthetic_table(30, n_items=40, seed=1, max_len=length)
        data = index_sessions(read_log(table, split="test"), item_map)
        assert np.diff(data.offsets).max() == length  # the loop runs length - 1 steps
        syncs = _syncs(lambda data=data: evaluate(model, item_map, data, baselines=True))
        assert not {"aten::unique", "aten::_unique2", "aten::nonzero"} & set(syncs)
        counts.append(len(syncs))
    assert counts[0] == counts[1], counts
