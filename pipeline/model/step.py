"""One training epoch: the row plan of each block of steps and the training step itself.

Before each block of steps, the host draws the block's negative samples and plans every step's distinct item
rows (``pipeline.model.sampling.plan_rows``), on a helper thread while the previous block trains. The hot loop
then only slices those arrays, so each step costs a few dozen tensor ops: gather the distinct rows of the item
tables (inputs, in-batch targets, one shared block of popularity samples), one GRU step, scores for those rows
only, the loss and its gradient in closed form (no autograd graph), and Adagrad updates of the touched rows.
No step reads anything back from the device; the loop does so only for a finite-loss check every
``CHECK_EVERY`` steps. On CPU the two halves of a batch can run on two threads (``pipeline.model.lanes``).

Every epoch re-seeds dropout and the sampler from (seed, epoch), so training resumed after epoch k continues
exactly like an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.config import GRU4RecConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.model import losses
from pipeline.model.lanes import Lanes
from pipeline.model.network import GRU4Rec, StepMasks
from pipeline.model.optim import AdagradM, RowIndex
from pipeline.model.products import BFLOAT16, FLOAT32
from pipeline.model.sampling import PopularitySampler, RowPlan, plan_rows
from pipeline.model.schedule import DeviceSchedule, Schedule

CHECK_EVERY = 64  # steps between finite-loss checks (the only device syncs of the loop)
FIRST_BLOCK_STEPS = 16  # steps planned before the first one runs
SPLIT_MIN_BATCH = 16  # smaller batches (the end of an epoch) run on one thread: halves would cost more than they save


@dataclass
class Block:
    """The row plan of steps ``first``..``first + n - 1`` on the training device, sliced per step with
    host-side bounds (so a step never reads a size from the device)."""

    first: int  # first step of the block
    entry0: int  # schedule entry where the block starts
    rows: Tensor
    row_bounds: list[int]
    y_col: Tensor
    x_col: Tensor
    log_weight: Tensor
    target_shift: Tensor
    x_rows: Tensor | None
    x_row_bounds: list[int] | None
    rows_host: np.ndarray | None  # the row indices on the host too, for CPU tables gathered with NumPy
    x_rows_host: np.ndarray | None

    @classmethod
    def of(cls, plan: RowPlan, first: int, entry0: int, device: torch.device) -> Block:
        def move(a: np.ndarray) -> Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            if device.type == "cpu":
                return t
            return t.pin_memory().to(device, non_blocking=True)  # queued behind the running steps, no wait

        return cls(
            first=first,
            entry0=entry0,
            rows=move(plan.rows),
            row_bounds=plan.row_bounds.tolist(),
            y_col=move(plan.y_col),
            x_col=move(plan.x_col),
            log_weight=move(plan.log_weight),
            target_shift=move(plan.target_shift),
            x_rows=None if plan.x_rows is None else move(plan.x_rows),
            x_row_bounds=None if plan.x_row_bounds is None else plan.x_row_bounds.tolist(),
            rows_host=plan.rows if device.type == "cpu" else None,
            x_rows_host=plan.x_rows if device.type == "cpu" else None,
        )


class StepRows(NamedTuple):
    """The item rows of one step (device tensors): see ``pipeline.model.sampling.RowPlan``."""

    rows: RowIndex
    y_col: Tensor
    x_col: Tensor
    log_weight: Tensor
    target_shift: Tensor
    x_rows: RowIndex | None


def step_rows(block: Block, t: int, lo: int, hi: int) -> StepRows:
    k = t - block.first
    r0, r1 = block.row_bounds[k], block.row_bounds[k + 1]
    e0, e1 = lo - block.entry0, hi - block.entry0
    x_rows = None
    if block.x_rows is not None:
        assert block.x_row_bounds is not None
        x0, x1 = block.x_row_bounds[k], block.x_row_bounds[k + 1]
        x_rows = RowIndex(block.x_rows[x0:x1], None if block.x_rows_host is None else block.x_rows_host[x0:x1])
    rows = RowIndex(block.rows[r0:r1], None if block.rows_host is None else block.rows_host[r0:r1])
    return StepRows(rows, block.y_col[e0:e1], block.x_col[e0:e1], block.log_weight[r0:r1], block.target_shift[e0:e1], x_rows)


class _Part(NamedTuple):
    """What forward + backward of some batch rows give: their loss sum, new hidden rows and gradients."""

    loss_sum: Tensor
    hidden: list[Tensor]
    dense_grads: list[Tensor]
    d_w: Tensor  # of the step's distinct output rows (Wy)
    d_b: Tensor  # of their biases (By)
    d_x: Tensor  # of the gathered input rows


class Trainer:
    """The model, optimizer, sampler and loss settings of one training run; ``run_epoch`` does the work."""

    def __init__(self, model: GRU4Rec, config: GRU4RecConfig, item_counts: np.ndarray, device: torch.device):
        self.model = model
        self.config = config
        self.device = device
        self.tables = [model.Wy, model.By] + [t for t in (model.E, model.Wx0) if t is not None]
        self.optimizer = AdagradM(model.dense_parameters(), self.tables, lr=config.learning_rate, momentum=config.momentum)
        counts = np.asarray(item_counts)
        self.sampler = PopularitySampler(counts, config.n_sample, config.sample_alpha) if config.n_sample > 0 else None
        self.log_count = np.log(np.maximum(counts, 1)).astype(np.float64)
        # Steps planned at once: the plan takes ~40 bytes per sample, so blocks stay near 2^20 samples.
        per_step = max(config.n_sample, 1)
        self.block_steps = max(1, min(config.sample_cache_size, 1 << 20) // per_step)
        self.lanes: Lanes | None = None  # set by run_epoch when the step is shared between two threads
        self.products = BFLOAT16 if matmul_math(config.matmul_precision, device) == "bfloat16" else FLOAT32

    def plan(self, schedule: Schedule, first: int, last: int, rng: np.random.Generator) -> Block:
        """The row plan of steps first..last-1 (their samples drawn from ``rng``), on the device."""
        cfg = self.config
        lo, hi = int(schedule.bounds[first]), int(schedule.bounds[last])
        samples = self.sampler.draw(rng, last - first) if self.sampler is not None else None
        plan = plan_rows(
            schedule.inputs[lo:hi],
            schedule.targets[lo:hi],
            schedule.bounds[first : last + 1] - lo,
            samples,
            self.model.n_items,
            shared=self.model.constrained_embedding,
            log_count=self.log_count,
            loss=cfg.loss,
            logq=cfg.logq,
            sample_alpha=cfg.sample_alpha,
        )
        return Block.of(plan, first, lo, self.device)

    def _blocks(self, schedule: Schedule, n_steps: int, rng: np.random.Generator) -> Iterator[Block]:
        """The epoch's blocks in order, each planned on a helper thread while the previous one trains (NumPy
        releases the GIL in its array work, so on a machine with a spare core planning costs no step time).
        Blocks are planned one after another from one generator, so the samples do not depend on timing."""
        # Blocks start small and double, so the first step does not wait for a full block (~0.1-0.3 s).
        # The generator hands out the same stream of samples whatever the block sizes.
        firsts, size = [0], min(FIRST_BLOCK_STEPS, self.block_steps)
        while firsts[-1] + size < n_steps:
            firsts.append(firsts[-1] + size)
            size = min(2 * size, self.block_steps)
        firsts.append(n_steps)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan") as pool:
            pending = pool.submit(self.plan, schedule, firsts[0], firsts[1], rng)
            for i in range(1, len(firsts)):
                block = pending.result()
                if i + 1 < len(firsts):
                    pending = pool.submit(self.plan, schedule, firsts[i], firsts[i + 1], rng)
                yield block

    def step_at(
        self,
        schedule: DeviceSchedule,
        block: Block,
        t: int,
        hidden: list[Tensor],
        step_hook: Callable[[int, Tensor, list[Tensor]], None] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Step ``t`` of the epoch (its block planned): carry/reset the hidden rows, then train on them."""
        lo, hi = schedule.bounds[t], schedule.bounds[t + 1]
        carry = schedule.carry.get(t)
        if carry is not None:
            hidden = [h.index_select(0, carry) for h in hidden]
        keep = schedule.keep[lo:hi]
        hidden = [h * keep for h in hidden]
        if step_hook is not None:
            step_hook(t, torch.as_tensor(schedule.schedule.inputs[lo:hi]), hidden)
        return self._step(step_rows(block, t, lo, hi), hidden)

    @torch.no_grad()
    def _step(self, step: StepRows, hidden: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One mini-batch: forward on the gathered rows, loss and gradients in closed form, Adagrad.

        Returns (row-sum loss, new hidden state). Every size comes from the plan: no sync with the device.
        With ``lanes`` set (CPU), the two halves of the batch run forward, loss and backward on two threads
        (every row's work is independent up to the weight gradients, which are summed); the updates follow.
        """
        model, opt = self.model, self.optimizer
        b = step.y_col.shape[0]
        w_rows = opt.rows_of(model.Wy).take(step.rows)
        b_rows = opt.rows_of(model.By).take(step.rows)
        if model.constrained_embedding:
            x_table_rows = None
            x_in = w_rows[0].index_select(0, step.x_col)
        else:
            assert step.x_rows is not None
            x_table_rows = opt.rows_of(model.input_table).take(step.x_rows)
            x_in = x_table_rows[0].index_select(0, step.x_col)
        masks = model.draw_masks(x_in)  # drawn for the whole batch here: the halves do not touch the generator

        def part(span: tuple[int, int]) -> _Part:
            lo, hi = span
            return self._forward_backward(step, x_in[lo:hi], [h[lo:hi] for h in hidden], masks.rows(lo, hi),
                                          w_rows[0], b_rows[0], lo, hi, b)

        if self.lanes is not None and b >= SPLIT_MIN_BATCH:
            first, second = self.lanes.map(part, [(0, b // 2), (b // 2, b)])
            loss_sum = first.loss_sum + second.loss_sum
            hidden = [torch.cat([h0, h1]) for h0, h1 in zip(first.hidden, second.hidden, strict=True)]
            dense_grads, d_w, d_b = first.dense_grads, first.d_w.add_(second.d_w), first.d_b.add_(second.d_b)
            torch._foreach_add_(dense_grads, second.dense_grads)
            d_x = torch.cat([first.d_x, second.d_x])
        else:
            whole = part((0, b))
            loss_sum, hidden, dense_grads, d_w, d_b, d_x = whole

        opt.step_dense(dense_grads)
        if x_table_rows is None:
            d_w.index_add_(0, step.x_col, d_x)
        else:
            assert step.x_rows is not None
            d_x_rows = d_x.new_zeros(x_table_rows[0].shape).index_add_(0, step.x_col, d_x)
            opt.step_rows(model.input_table, step.x_rows, d_x_rows, unique=True, current=x_table_rows)
        opt.step_rows(model.Wy, step.rows, d_w, unique=True, current=w_rows)
        opt.step_rows(model.By, step.rows, d_b, unique=True, current=b_rows)
        return loss_sum, hidden

    @torch.no_grad()  # grad mode is per thread: the helper lane needs its own (else it builds autograd graphs)
    def _forward_backward(
        self, step: StepRows, x_in: Tensor, hidden: list[Tensor], masks: StepMasks, w_rows: Tensor, b_rows: Tensor,
        lo: int, hi: int, b: int,
    ) -> _Part:
        """Forward, loss and gradients of batch rows lo..hi-1 (of ``b``): no update, no shared state written."""
        cfg, model = self.config, self.model
        prod = self.products
        out, new_hidden, cache = model.train_forward(x_in, hidden, masks, prod)
        u = w_rows.shape[0]
        out_op, w_op = prod.cast(out), prod.cast_padded(w_rows, 0)  # each is an operand of two products
        scores = prod.addmm(b_rows.view(-1), out_op, w_op.t(), cols=u)
        y_col, shift = step.y_col[lo:hi], step.target_shift[lo:hi]
        if cfg.loss == "cross-entropy":
            loss_sum, d_scores = losses.cross_entropy_grouped(scores, step.log_weight, y_col, shift, 1.0 / b)
        elif cfg.loss == "bpr-max":
            loss_sum, d_scores = losses.bpr_max_grouped(
                scores, step.log_weight, y_col, shift, 1.0 / b, cfg.bpreg, cfg.elu_param
            )
        else:
            raise ConfigError(f"unknown loss {cfg.loss!r}; expected one of {', '.join(losses.LOSSES)}")
        d_op = prod.cast_padded(d_scores, 1)
        d_w = prod.mm(d_op.t(), out_op, rows=u)
        d_b = d_scores.sum(0)
        dense_grads, d_x = model.train_backward(cache, prod.mm(d_op, w_op), prod)
        return _Part(loss_sum, new_hidden, dense_grads, d_w, d_b, d_x)

    def run_epoch(
        self,
        schedule: DeviceSchedule,
        epoch: int,
        progress: Callable[[int, float], None] | None = None,
        step_hook: Callable[[int, Tensor, list[Tensor]], None] | None = None,
    ) -> float:
        """Train one epoch over ``schedule``; returns the mean loss per prediction.

        ``progress(steps_done, mean_loss)`` is called at each finite-loss check; ``step_hook(step, inputs,
        hidden)`` sees the hidden state every step receives (tests use it to check the resets).
        """
        with matmul_precision(self.config.matmul_precision):
            return self._run_epoch(schedule, epoch, progress, step_hook)

    def _run_epoch(
        self,
        schedule: DeviceSchedule,
        epoch: int,
        progress: Callable[[int, float], None] | None,
        step_hook: Callable[[int, Tensor, list[Tensor]], None] | None,
    ) -> float:
        self.model.train()
        seed = epoch_seed(self.config.seed, epoch)
        torch.manual_seed(seed[0])  # dropout
        rng = np.random.default_rng(seed[1])  # negative samples
        bounds = schedule.bounds
        n_steps = len(bounds) - 1
        width = bounds[1] - bounds[0]
        hidden = self.model.init_hidden(width, self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        blocks = self._blocks(schedule.schedule, n_steps, rng)
        block = next(blocks)
        for t in range(n_steps):
            if t - block.first >= len(block.row_bounds) - 1:
                block = next(blocks)
            loss_sum, hidden = self.step_at(schedule, block, t, hidden, step_hook)
            total += loss_sum
            hi = bounds[t + 1]
            if (t + 1) % CHECK_EVERY == 0 or t + 1 == n_steps:
                value = float(total) / hi
                if not math.isfinite(value):
                    raise TrainingError(
                        f"loss became {value} in epoch {epoch + 1} by step {t + 1}/{n_steps} "
                        f"(learning_rate={self.config.learning_rate}, loss={self.config.loss}); "
                        "training stopped, no checkpoint written for this epoch"
                    )
                if progress is not None:
                    progress(t + 1, value)
        return float(total) / bounds[-1]


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch's float32 matmul precision (a process-wide setting) for the duration, restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def matmul_math(precision: str, device: torch.device) -> str:
    """How the training step's matrix products compute under ``precision`` on ``device``: "bfloat16" (medium
    on a CPU with native bfloat16: operands and results rounded to bfloat16, ``pipeline.model.products``),
    "tf32" (high or medium on a CUDA GPU with tensor cores) or "float32"."""
    if precision == "highest":
        return "float32"
    if device.type == "cpu":
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "bfloat16" if precision == "medium" and native else "float32"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32"
    return "float32"


def epoch_seed(seed: int, epoch: int) -> tuple[int, int]:
    """Independent (dropout, sampler) seeds for an epoch, derived from the run seed."""
    a, b = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)
    return int(a >> np.uint64(1)), int(b >> np.uint64(1))
