"""Training and evaluation at the size of a real day (figures in docs/benchmarks.md, "Scale").

    .venv/bin/python bench/bench_scale.py                      # all cases, each in its own process
    .venv/bin/python bench/bench_scale.py --case train --events 30000000 --steps 3000

Cases (each a fresh process, so its peak RSS is its own):
- ``train``: a synthetic session log of ``--events`` events (Zipf popularity over ``--items`` items, geometric
  session lengths with mean ~5 as in RSC15), the RSC15 row on CPU with one thread. Times the epoch's
  preparation (item counts, schedule, first block) in full and the first ``--steps`` steps of the epoch,
  and extrapolates the epoch from the measured seconds per step (an epoch of 30M events is ~900,000 steps).
- ``eval``: ``--predictions`` predictions against ``--items`` items (model + POP + S-POP), 100 units.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def synthetic_sessions(n_events: int, n_items: int, seed: int = 0):
    """(items, offsets): sessions of geometric length >= 2 (mean ~5), items Zipf-like (exponent 1.1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = 2 + rng.geometric(1 / 3.5, size=n_events // 4)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_events) + 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.1
    items = rng.choice(n_items, size=int(offsets[-1]), p=weights / weights.sum())
    return items.astype(np.int64), offsets


def case_train(n_events: int, n_items: int, steps: int) -> dict:
    import numpy as np
    import torch
    from bench_train import ROWS

    from pipeline.config import GRU4RecConfig
    from pipeline.model.predict import build_model
    from pipeline.model.schedule import DeviceSchedule, build_schedule
    from pipeline.model.step import Trainer

    torch.set_num_threads(1)
    items, offsets = synthetic_sessions(n_events, n_items)
    config = GRU4RecConfig(**ROWS["rsc15"])
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    counts = np.bincount(items, minlength=n_items)
    schedule = build_schedule(items, offsets, config.batch_size)
    t1 = time.perf_counter()
    trainer = Trainer(build_model(config, n_items), config, counts, cpu)
    device_schedule = DeviceSchedule.of(schedule, cpu)
    t2 = time.perf_counter()
    # the first `steps` steps of the real epoch: the same loop body, blocks planned as run_epoch plans them
    trainer.model.train()
    blocks = trainer._blocks(schedule, schedule.n_steps, np.random.default_rng(0))
    block = next(blocks)
    hidden = trainer.model.init_hidden(schedule.bounds[1] - schedule.bounds[0])
    total = torch.zeros((), dtype=torch.float64)
    t3 = time.perf_counter()
    for t in range(steps):
        if t - block.first >= len(block.row_bounds) - 1:
            block = next(blocks)
        loss, hidden = trainer.step_at(device_schedule, block, t, hidden)
        total += loss
    t4 = time.perf_counter()
    blocks.close()
    per_step = (t4 - t3) / steps
    return {"case": "train", "events": int(offsets[-1]), "sessions": len(offsets) - 1, "items": n_items,
            "steps_per_epoch": schedule.n_steps, "schedule_seconds": round(t1 - t0, 2),
            "trainer_seconds": round(t2 - t1, 2), "measured_steps": steps, "ms_per_step": round(per_step * 1e3, 3),
            "epoch_seconds_extrapolated": round(t2 - t0 + per_step * schedule.n_steps),
            "events_per_s": round(int(offsets[-1]) / (per_step * schedule.n_steps)),
            "mean_loss": float(total) / schedule.bounds[steps], "peak_rss_mb": _peak_rss_mb(),
            "load_avg_1m": os.getloadavg()[0]}


def case_eval(n_predictions: int, n_items: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.model.clicks import ItemMap, index_sessions, read_log
    from pipeline.model.evaluate import evaluate
    from pipeline.model.network import GRU4Rec

    torch.set_num_threads(1)
    length = 6  # 5 predictions per session
    n_sessions = n_predictions // (length - 1)
    rng = np.random.default_rng(0)
    item_map = ItemMap(pa.array(np.arange(n_items).astype(str)), rng.integers(1, 1000, n_items))
    table = pa.table({"session_id": np.repeat(np.arange(n_sessions), length).astype(str),
                      "item_id": rng.integers(0, n_items, n_sessions * length).astype(str),
                      "timestamp": np.tile(np.arange(length), n_sessions).astype(np.float64)})
    data = index_sessions(read_log(table, split="test"), item_map)
    torch.manual_seed(0)
    model = GRU4Rec(n_items, (100,))
    began = time.perf_counter()
    res = evaluate(model, item_map, data, baselines=True)
    seconds = time.perf_counter() - began
    return {"case": "eval", "items": n_items, "predictions": res.metrics["n_predictions"], "seconds": round(seconds, 1),
            "predictions_per_s": round(res.metrics["n_predictions"] / seconds), "threads": 1,
            "peak_rss_mb": _peak_rss_mb(), "load_avg_1m": os.getloadavg()[0]}


def _peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["train", "eval"])
    p.add_argument("--events", type=int, default=30_000_000)
    p.add_argument("--items", type=int, default=40_000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--predictions", type=int, default=100_000)
    args = p.parse_args()
    if args.case == "train":
        print(json.dumps(case_train(args.events, args.items, args.steps)), flush=True)
    elif args.case == "eval":
        print(json.dumps(case_eval(args.predictions, args.items)), flush=True)
    else:  # every case, each in a fresh process
        me = [sys.executable, str(Path(__file__).resolve())]
        for extra in (["--case", "train"], ["--case", "eval", "--items", "100000"],
                      ["--case", "eval", "--items", "1000000", "--predictions", "10000"]):
            subprocess.run(me + extra, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
