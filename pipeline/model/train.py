"""Session-parallel GRU4Rec training with per-epoch checkpoints, resume and validation: the entry point.

``train`` reads the training (and validation) clicks, fits the item map, lays out the epoch's schedule
(``pipeline.model.schedule``), then runs the epochs (``pipeline.model.step``), writing a checkpoint after each
(``pipeline.model.checkpoint``) and ``train_metrics.json`` at the end.

Reproducibility: the model is initialised from ``config.seed``, and every epoch re-seeds dropout and the
sampler from (seed, epoch), so training resumed from the checkpoint of epoch k continues exactly like an
uninterrupted run (bit-identical on CPU with the same thread setting).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pipeline.config import GRU4RecConfig, to_dict
from pipeline.errors import ConfigError
from pipeline.model.checkpoint import data_fingerprint, resume_from, save_checkpoint
from pipeline.model.clicks import ClickLog, IndexedSessions, ItemMap, build_item_map, index_sessions, read_log
from pipeline.model.evaluate import evaluate
from pipeline.model.lanes import Lanes
from pipeline.model.predict import CHECKPOINT, build_model, resolve_device
from pipeline.model.schedule import DeviceSchedule, Schedule, build_schedule
from pipeline.model.step import Trainer, matmul_math

log = logging.getLogger(__name__)

METRICS_FILE = "train_metrics.json"
EpochCallback = Callable[[int, dict[str, float]], None]


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
    lanes: int = 1,
) -> TrainResult:
    """Train GRU4Rec on ``train`` and write ``out_dir/checkpoint.pt`` (every epoch) and ``train_metrics.json``.

    ``train``/``valid``: a GRU4Rec TSV file, a Parquet file of events or a session dataset directory (its
    train / valid split). With ``resume`` (default), a checkpoint already in ``out_dir`` from the same
    settings and data is continued from its last completed epoch; a finished one is returned as is.
    ``on_epoch_end(epoch, metrics)`` gets the epoch number (1-based) and its loss / speed / valid metrics.
    ``lanes=2`` shares each CPU step between two threads (``pipeline.model.lanes``): faster when a core is
    free, slower when other processes hold the cores (docs/benchmarks.md), so not the default.
    """
    if lanes not in (1, 2):
        raise ConfigError(f"lanes must be 1 or 2, got {lanes}")
    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    try:
        n_threads = set_threads(threads, dev)
        run = _prepare(train, valid, config, dev, n_threads)
        if lanes == 1 or dev.type != "cpu":
            return _train(run, config, Path(out_dir), on_epoch_end, resume, valid_cutoffs, None)
        with Lanes(threads=n_threads) as shared:
            return _train(run, config, Path(out_dir), on_epoch_end, resume, valid_cutoffs, shared)
    finally:
        torch.set_num_threads(previous_threads)  # leave the process as we found it


@dataclass
class _Run:
    """What training needs from its inputs, worked out before the first epoch."""

    train_log: ClickLog
    item_map: ItemMap
    schedule: Schedule
    fingerprint: str
    valid_data: IndexedSessions | None
    device: torch.device
    n_threads: int
    matmul_math: str  # what config.matmul_precision gives on this device (see pipeline.model.step.matmul_math)


def _prepare(
    train: str | Path | ClickLog | pa.Table,
    valid: str | Path | ClickLog | pa.Table | None,
    config: GRU4RecConfig,
    dev: torch.device,
    n_threads: int,
) -> _Run:
    train_log = read_log(train, split="train")
    valid_log = read_log(valid, split="valid") if valid is not None else None
    item_map = build_item_map(train_log)
    data = index_sessions(train_log, item_map)
    schedule = build_schedule(data.items, data.offsets, config.batch_size)
    math = matmul_math(config.matmul_precision, dev)
    log.info(
        "training on %s: %d events, %d sessions, %d items, %d steps/epoch, device %s, %d CPU threads, "
        "matmul %s", train_log.source, train_log.n_events, train_log.n_sessions, len(item_map),
        schedule.n_steps, dev, n_threads, math,
    )
    return _Run(
        train_log=train_log,
        item_map=item_map,
        schedule=schedule,
        fingerprint=data_fingerprint(data.items, data.offsets, item_map),
        valid_data=index_sessions(valid_log, item_map) if valid_log is not None else None,
        device=dev,
        n_threads=n_threads,
        matmul_math=math,
    )


def _train(
    run: _Run,
    config: GRU4RecConfig,
    out: Path,
    on_epoch_end: EpochCallback | None,
    resume: bool,
    valid_cutoffs: tuple[int, ...],
    lanes: Lanes | None,
) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    dev = run.device
    torch.manual_seed(config.seed)
    trainer = Trainer(build_model(config, len(run.item_map)).to(dev), config, run.item_map.counts, dev)
    trainer.lanes = lanes
    history: dict[str, list] = {"epoch_loss": [], "epoch_seconds": [], "valid": []}
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and resume:
        start_epoch, history = resume_from(ckpt_path, config, run.fingerprint, trainer.model, trainer.optimizer)
        log.info("resuming %s after epoch %d of %d", ckpt_path, start_epoch, config.n_epochs)

    dev_schedule = DeviceSchedule.of(run.schedule, dev)
    for epoch in range(start_epoch, config.n_epochs):
        epoch_metrics = _epoch(run, trainer, dev_schedule, epoch, history, valid_cutoffs)
        save_checkpoint(ckpt_path, _checkpoint(run, trainer, epoch, history))
        log.info(
            "epoch %d/%d: loss %.4f, %.1f s, %.0f events/s%s",
            epoch + 1, config.n_epochs, epoch_metrics["loss"], epoch_metrics["epoch_seconds"],
            epoch_metrics["train_events_per_second"],
            "".join(f", {k} {v:.4f}" for k, v in epoch_metrics.items() if k.startswith("valid_")),
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, epoch_metrics)
    return _finish(run, config, out, history, start_epoch)


def _epoch(
    run: _Run, trainer: Trainer, dev_schedule: DeviceSchedule, epoch: int, history: dict[str, list],
    valid_cutoffs: tuple[int, ...],
) -> dict[str, float]:
    """Train epoch ``epoch`` (0-based), validate, add both to ``history``; returns the epoch's metrics."""
    schedule, dev = run.schedule, run.device
    bar = _Progress(epoch, trainer.config.n_epochs, schedule.n_steps, schedule.n_predictions)
    began = time.perf_counter()
    loss = trainer.run_epoch(dev_schedule, epoch, progress=bar.update)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - began
    bar.close()
    history["epoch_loss"].append(loss)
    history["epoch_seconds"].append(seconds)
    metrics: dict[str, float] = {
        "loss": loss,
        "epoch_seconds": seconds,
        "train_events_per_second": run.train_log.n_events / seconds,
    }
    if run.valid_data is not None:
        res = evaluate(trainer.model, run.item_map, run.valid_data, cutoffs=valid_cutoffs, baselines=False)
        scores = {k: v for k, v in res.metrics.items() if "@" in k}
        history["valid"].append({"epoch": epoch + 1} | scores)
        metrics |= {f"valid_{k}": v for k, v in scores.items()}
    return metrics


def _checkpoint(run: _Run, trainer: Trainer, epoch: int, history: dict[str, list]) -> dict[str, Any]:
    """The checkpoint after epoch ``epoch`` (0-based): tensors, settings and item map as plain data."""
    return {
        "format_version": 1,
        "state_dict": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "config": to_dict(trainer.config),
        "item_ids": run.item_map.item_ids.to_pylist(),
        "item_counts": run.item_map.counts.tolist(),
        "optimizer": trainer.optimizer.state_dict(),
        "epoch": epoch + 1,
        "history": history,
        "data_fingerprint": run.fingerprint,
        "torch_version": str(torch.__version__),
    }


def _finish(run: _Run, config: GRU4RecConfig, out: Path, history: dict[str, list], start_epoch: int) -> TrainResult:
    """Write ``train_metrics.json`` (atomically) and return the result."""
    train_seconds = float(sum(history["epoch_seconds"]))
    epochs = len(history["epoch_loss"])
    n_events = run.train_log.n_events
    events_per_second = n_events * epochs / train_seconds if train_seconds else 0.0
    metrics = {
        "train_seconds": train_seconds,
        "train_events_per_second": events_per_second,
        "train_predictions_per_second": run.schedule.n_predictions * epochs / train_seconds if train_seconds else 0.0,
        "epochs": epochs,
        "epoch_loss": history["epoch_loss"],
        "epoch_seconds": history["epoch_seconds"],
        "valid": history["valid"],
        "n_events": n_events,
        "n_sessions": run.train_log.n_sessions,
        "n_items": len(run.item_map),
        "n_predictions_per_epoch": run.schedule.n_predictions,
        "device": str(run.device),
        "cpu_threads": run.n_threads,
        "matmul_math": run.matmul_math,
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
        train_events_per_second=events_per_second,
        valid_metrics=history["valid"],
        resumed_from_epoch=start_epoch,
        metrics=metrics,
    )


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
