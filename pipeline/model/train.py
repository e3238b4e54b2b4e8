"""Session-parallel GRU4Rec training with per-epoch checkpoints, resume and validation.

The whole mini-batch schedule of an epoch is worked out once, before training, as flat index arrays
(``Schedule``): which item each batch row reads, which item it must predict and which rows start a new
session (their hidden state is zeroed). Before each block of steps, the host draws the block's negative
samples and plans every step's distinct item rows (``pipeline.model.sampling.plan_rows``). The hot loop then only
slices those arrays, so each step costs a few dozen tensor ops: gather the distinct rows of the item tables
(inputs, in-batch targets, one shared block of popularity samples), one GRU step, scores for those rows
only, the loss and its gradient in closed form (no autograd graph), and Adagrad updates of the touched rows.
No step reads anything back from the device; the loop does so only for a finite-loss check every
``CHECK_EVERY`` steps.

Reproducibility: the model is initialised from ``config.seed``, and every epoch re-seeds dropout and the
sampler from (seed, epoch), so training resumed from the checkpoint of epoch k continues exactly like an
uninterrupted run (bit-identical on CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.config import GRU4RecConfig, to_dict
from pipeline.errors import ConfigError, TrainingError
from pipeline.model import losses
from pipeline.model.evaluate import ClickLog, ItemMap, build_item_map, evaluate, index_sessions, read_log
from pipeline.model.network import GRU4Rec
from pipeline.model.optim import AdagradM, RowIndex
from pipeline.model.predict import CHECKPOINT, build_model, resolve_device
from pipeline.model.sampling import PopularitySampler, RowPlan, plan_rows

log = logging.getLogger(__name__)

CHECK_EVERY = 64  # steps between finite-loss checks (the only device syncs of the loop)
FIRST_BLOCK_STEPS = 16  # steps planned before the first one runs
METRICS_FILE = "train_metrics.json"
EpochCallback = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------------------
# The session-parallel schedule


@dataclass(frozen=True)
class Schedule:
    """Every mini-batch step of one epoch, as flat arrays over all (step, batch row) pairs.

    Step t covers entries ``bounds[t]:bounds[t+1]``: row r feeds ``inputs[i]`` and must predict
    ``targets[i]``; ``fresh[i]`` is True when the row's session starts at this step (its hidden state must
    be zero). While sessions remain, an ended session's row is taken by the next session in order; once
    none remain the batch shrinks, and ``carry[t]`` lists, for such a step, which rows of the previous
    step go on (None when the rows are unchanged).
    """

    inputs: np.ndarray
    targets: np.ndarray
    fresh: np.ndarray
    bounds: np.ndarray
    carry: dict[int, np.ndarray]
    session_of: np.ndarray  # session (index into the log) of each entry, for tests and diagnostics

    @property
    def n_steps(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_predictions(self) -> int:
        return len(self.inputs)


def build_schedule(items: np.ndarray, offsets: np.ndarray, batch_size: int) -> Schedule:
    """Lay out the sessions (in log order) over ``batch_size`` parallel rows, one next-item step at a time.

    Sessions with a single event carry no training signal and are skipped. Every other session is consumed
    in full: the epoch does not stop when the remaining sessions no longer fill a batch.
    """
    import heapq

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.diff(offsets)
    usable = np.flatnonzero(lengths >= 2)
    n_pred = lengths[usable] - 1  # predictions (= steps) per session
    slots = min(batch_size, len(usable))
    if slots == 0:
        raise TrainingError("no session has 2 or more events: nothing to train on")
    # Assign each session to the slot that frees first (ties: lowest slot), at the step it frees.
    free = [(0, s) for s in range(slots)]
    slot = np.empty(len(usable), np.int64)
    start = np.empty(len(usable), np.int64)
    for j, steps in enumerate(n_pred.tolist()):
        t, s = heapq.heappop(free)
        slot[j], start[j] = s, t
        heapq.heappush(free, (t + steps, s))
    # One entry per prediction: step = session start step + k, input = event k, target = event k + 1.
    sess = np.repeat(np.arange(len(usable)), n_pred)
    k = np.arange(len(sess)) - np.repeat(np.cumsum(n_pred) - n_pred, n_pred)
    step = start[sess] + k
    order = np.lexsort((slot[sess], step))
    step, sess, k = step[order], sess[order], k[order]
    event = offsets[usable][sess] + k
    bounds = np.concatenate([[0], np.cumsum(np.bincount(step))]).astype(np.int64)
    # When the batch shrinks, map each remaining row to its row in the previous step.
    slot_of = slot[sess]
    carry: dict[int, np.ndarray] = {}
    sizes = np.diff(bounds)
    for t in np.flatnonzero(sizes[1:] < sizes[:-1]) + 1:
        prev = slot_of[bounds[t - 1] : bounds[t]]
        carry[int(t)] = np.searchsorted(prev, slot_of[bounds[t] : bounds[t + 1]])
    return Schedule(
        inputs=items[event],
        targets=items[event + 1],
        fresh=k == 0,
        bounds=bounds,
        carry=carry,
        session_of=usable[sess],
    )


# ---------------------------------------------------------------------------------------------------
# One epoch


@dataclass
class _DeviceSchedule:
    """A schedule with its per-step state handling on the training device (the host keeps the items:
    the block planner reads them there)."""

    schedule: Schedule
    keep: Tensor  # float (n, 1): 0 where a session starts (its hidden row is zeroed), else 1
    bounds: list[int]
    carry: dict[int, Tensor]

    @classmethod
    def of(cls, schedule: Schedule, device: torch.device) -> _DeviceSchedule:
        return cls(
            schedule=schedule,
            keep=torch.as_tensor(~schedule.fresh, dtype=torch.float32, device=device).unsqueeze(1),
            bounds=schedule.bounds.tolist(),
            carry={t: torch.as_tensor(c, device=device) for t, c in schedule.carry.items()},
        )


@dataclass
class _Block:
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
    def of(cls, plan: RowPlan, first: int, entry0: int, device: torch.device) -> _Block:
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


def _step_rows(block: _Block, t: int, lo: int, hi: int) -> StepRows:
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

    def plan(self, schedule: Schedule, first: int, last: int, rng: np.random.Generator) -> _Block:
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
        return _Block.of(plan, first, lo, self.device)

    def _blocks(self, schedule: Schedule, n_steps: int, rng: np.random.Generator) -> Iterator[_Block]:
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
        schedule: _DeviceSchedule,
        block: _Block,
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
        return self._step(_step_rows(block, t, lo, hi), hidden)

    @torch.no_grad()
    def _step(self, step: StepRows, hidden: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One mini-batch: forward on the gathered rows, loss and gradients in closed form, Adagrad.

        Returns (row-sum loss, new hidden state). Every size comes from the plan: no sync with the device.
        """
        cfg, model, opt = self.config, self.model, self.optimizer
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

        out, hidden, cache = model.train_forward(x_in, hidden)
        scores = torch.addmm(b_rows[0].view(-1), out, w_rows[0].t())
        if cfg.loss == "cross-entropy":
            loss_sum, d_scores = losses.cross_entropy_grouped(scores, step.log_weight, step.y_col, step.target_shift, 1.0 / b)
        elif cfg.loss == "bpr-max":
            loss_sum, d_scores = losses.bpr_max_grouped(
                scores, step.log_weight, step.y_col, step.target_shift, 1.0 / b, cfg.bpreg, cfg.elu_param
            )
        else:
            raise ConfigError(f"unknown loss {cfg.loss!r}; expected one of {', '.join(losses.LOSSES)}")
        d_w = d_scores.t().mm(out)
        d_b = d_scores.sum(0)
        dense_grads, d_x = model.train_backward(cache, d_scores.mm(w_rows[0]))

        opt.step_dense(dense_grads)
        if x_table_rows is None:
            d_w.index_add_(0, step.x_col, d_x)
        else:
            d_x_rows = d_x.new_zeros(x_table_rows[0].shape).index_add_(0, step.x_col, d_x)
            opt.step_rows(model.input_table, step.x_rows, d_x_rows, unique=True, current=x_table_rows)
        opt.step_rows(model.Wy, step.rows, d_w, unique=True, current=w_rows)
        opt.step_rows(model.By, step.rows, d_b, unique=True, current=b_rows)
        return loss_sum, hidden

    def run_epoch(
        self,
        schedule: _DeviceSchedule,
        epoch: int,
        progress: Callable[[int, float], None] | None = None,
        step_hook: Callable[[int, Tensor, list[Tensor]], None] | None = None,
    ) -> float:
        """Train one epoch over ``schedule``; returns the mean loss per prediction.

        ``progress(steps_done, mean_loss)`` is called at each finite-loss check; ``step_hook(step, inputs,
        hidden)`` sees the hidden state every step receives (tests use it to check the resets).
        """
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


def epoch_seed(seed: int, epoch: int) -> tuple[int, int]:
    """Independent (dropout, sampler) seeds for an epoch, derived from the run seed."""
    a, b = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)
    return int(a >> np.uint64(1)), int(b >> np.uint64(1))


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def data_fingerprint(items: np.ndarray, offsets: np.ndarray, item_map: ItemMap) -> str:
    """Identifies the training data a checkpoint was trained on (a resume on other data is refused)."""
    h = hashlib.sha256()
    for arr in (items.astype(np.int64), offsets.astype(np.int64), item_map.counts):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\x1f".join(item_map.item_ids.to_pylist()).encode())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _changed_settings(saved: dict[str, Any], config: GRU4RecConfig) -> list[str]:
    """Settings that differ between a checkpoint and this run (n_epochs may grow: training continues)."""
    now = to_dict(config)
    return sorted(k for k in now if k != "n_epochs" and saved.get(k) != now[k])


# ---------------------------------------------------------------------------------------------------
# The public entry point


@dataclass
class TrainResult:
    model_dir: Path
    epochs: int
    epoch_loss: list[float]
    train_seconds: float
    train_events_per_second: float
    valid_metrics: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # the train_metrics.json written


def set_threads(threads: int, device: torch.device) -> int:
    """Use ``threads`` CPU threads; 0 = automatic: one thread for CPU training.

    A training step is ~50 small ops, each too small to split well: with 2 threads on a 2-core machine the
    gain was small when idle and the loss huge when other processes compete for the cores (each op waits for
    its slowest thread; measured up to 15x slower). See docs/benchmarks.md.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    return torch.get_num_threads()


def train(
    train: str | Path | ClickLog | pa.Table,
    config: GRU4RecConfig,
    out_dir: str | Path,
    valid: str | Path | ClickLog | pa.Table | None = None,
    device: str = "auto",
    on_epoch_end: EpochCallback | None = None,
    *,
    resume: bool = True,
    threads: int = 0,
    valid_cutoffs: tuple[int, ...] = (5, 20),
) -> TrainResult:
    """Train GRU4Rec on ``train`` and write ``out_dir/checkpoint.pt`` (every epoch) and ``train_metrics.json``.

    ``train``/``valid``: a GRU4Rec TSV file, a Parquet file of events or a session dataset directory (its
    train / valid split). With ``resume`` (default), a checkpoint already in ``out_dir`` from the same
    settings and data is continued from its last completed epoch; a finished one is returned as is.
    ``on_epoch_end(epoch, metrics)`` gets the epoch number (1-based) and its loss / speed / valid metrics.
    """
    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    try:
        return _train(train, config, Path(out_dir), valid, dev, on_epoch_end, resume, set_threads(threads, dev), valid_cutoffs)
    finally:
        torch.set_num_threads(previous_threads)  # leave the process as we found it


def _train(
    train: str | Path | ClickLog | pa.Table,
    config: GRU4RecConfig,
    out: Path,
    valid: str | Path | ClickLog | pa.Table | None,
    dev: torch.device,
    on_epoch_end: EpochCallback | None,
    resume: bool,
    n_threads: int,
    valid_cutoffs: tuple[int, ...],
) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    train_log = read_log(train, split="train")
    valid_log = read_log(valid, split="valid") if valid is not None else None
    item_map = build_item_map(train_log)
    data = index_sessions(train_log, item_map)
    schedule = build_schedule(data.items, data.offsets, config.batch_size)
    fingerprint = data_fingerprint(data.items, data.offsets, item_map)
    valid_data = index_sessions(valid_log, item_map) if valid_log is not None else None
    log.info(
        "training on %s: %d events, %d sessions, %d items, %d steps/epoch, device %s, %d CPU threads",
        train_log.source, train_log.n_events, train_log.n_sessions, len(item_map), schedule.n_steps, dev, n_threads,
    )

    torch.manual_seed(config.seed)
    model = build_model(config, len(item_map)).to(dev)
    trainer = Trainer(model, config, item_map.counts, dev)
    history: dict[str, list] = {"epoch_loss": [], "epoch_seconds": [], "valid": []}
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and resume:
        start_epoch, history = _resume(ckpt_path, config, fingerprint, model, trainer.optimizer)
        log.info("resuming %s after epoch %d of %d", ckpt_path, start_epoch, config.n_epochs)

    dev_schedule = _DeviceSchedule.of(schedule, dev)
    for epoch in range(start_epoch, config.n_epochs):
        bar = _Progress(epoch, config.n_epochs, schedule.n_steps, schedule.n_predictions)
        began = time.perf_counter()
        loss = trainer.run_epoch(dev_schedule, epoch, progress=bar.update)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - began
        bar.close()
        history["epoch_loss"].append(loss)
        history["epoch_seconds"].append(seconds)
        epoch_metrics: dict[str, float] = {
            "loss": loss,
            "epoch_seconds": seconds,
            "train_events_per_second": train_log.n_events / seconds,
        }
        if valid_data is not None:
            res = evaluate(model, item_map, valid_data, cutoffs=valid_cutoffs, baselines=False)
            scores = {k: v for k, v in res.metrics.items() if "@" in k}
            history["valid"].append({"epoch": epoch + 1} | scores)
            epoch_metrics |= {f"valid_{k}": v for k, v in scores.items()}
        save_checkpoint(
            ckpt_path,
            {
                "format_version": 1,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": to_dict(config),
                "item_ids": item_map.item_ids.to_pylist(),
                "item_counts": item_map.counts.tolist(),
                "optimizer": trainer.optimizer.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "data_fingerprint": fingerprint,
                "torch_version": str(torch.__version__),
            },
        )
        log.info(
            "epoch %d/%d: loss %.4f, %.1f s, %.0f events/s%s",
            epoch + 1, config.n_epochs, loss, seconds, train_log.n_events / seconds,
            "".join(f", {k} {v:.4f}" for k, v in epoch_metrics.items() if k.startswith("valid_")),
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, epoch_metrics)

    train_seconds = float(sum(history["epoch_seconds"]))
    epochs = len(history["epoch_loss"])
    metrics = {
        "train_seconds": train_seconds,
        "train_events_per_second": train_log.n_events * epochs / train_seconds if train_seconds else 0.0,
        "train_predictions_per_second": schedule.n_predictions * epochs / train_seconds if train_seconds else 0.0,
        "epochs": epochs,
        "epoch_loss": history["epoch_loss"],
        "epoch_seconds": history["epoch_seconds"],
        "valid": history["valid"],
        "n_events": train_log.n_events,
        "n_sessions": train_log.n_sessions,
        "n_items": len(item_map),
        "n_predictions_per_epoch": schedule.n_predictions,
        "device": str(dev),
        "cpu_threads": n_threads,
        "resumed_from_epoch": start_epoch,
        "config": to_dict(config),
    }
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / METRICS_FILE)
    return TrainResult(
        model_dir=out,
        epochs=epochs,
        epoch_loss=history["epoch_loss"],
        train_seconds=train_seconds,
        train_events_per_second=metrics["train_events_per_second"],
        valid_metrics=history["valid"],
        resumed_from_epoch=start_epoch,
        metrics=metrics,
    )



def _resume(
    path: Path, config: GRU4RecConfig, fingerprint: str, model: GRU4Rec, optimizer: AdagradM
) -> tuple[int, dict[str, list]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    differ = _changed_settings(ckpt.get("config", {}), config)
    if differ:
        raise TrainingError(
            f"{path} was trained with other settings ({', '.join(differ)}); "
            "use another output directory or pass --no-resume to start over"
        )
    if ckpt.get("data_fingerprint") != fingerprint:
        raise TrainingError(
            f"{path} was trained on other data; use another output directory or --no-resume to start over"
        )
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["epoch"]), ckpt["history"]


class _Progress:
    """A tqdm bar per epoch on a terminal; plain log lines (every ~10% of the epoch) otherwise."""

    def __init__(self, epoch: int, n_epochs: int, n_steps: int, n_predictions: int) -> None:
        self.n_steps = n_steps
        self.epoch = epoch
        self.began = time.perf_counter()
        self.per_step = n_predictions / max(n_steps, 1)
        self.bar = None
        self.next_log = 0.1
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{n_epochs}", unit="step", leave=False)

    def update(self, steps: int, loss: float) -> None:
        rate = steps * self.per_step / max(time.perf_counter() - self.began, 1e-9)
        if self.bar is not None:
            self.bar.n = steps
            self.bar.set_postfix(loss=f"{loss:.4f}", pred_per_s=f"{rate:.0f}", refresh=True)
        elif steps / self.n_steps >= self.next_log and steps < self.n_steps:
            log.debug("epoch %d: %d/%d steps, loss %.4f, %.0f predictions/s", self.epoch + 1, steps, self.n_steps, loss, rate)
            self.next_log += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

