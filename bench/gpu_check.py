"""GPU checks of GRU4Rec training and evaluation (run through bench/gpu_check.sh; figures in docs/benchmarks.md).

1. Host syncs: the training loop's per-step body (hidden-state carry/reset and the step itself) runs for a
   few dozen steps of both published rows under ``torch.cuda.set_sync_debug_mode("error")``, so any
   synchronising call fails the check. For evaluation, sessions of 3 and of 12 events must cause the same
   number of sync warnings (setup and the final copy only: none inside the loop over steps).
2. Training speed: events/s of one epoch on ../shared/data/yoochoose-100k for batch sizes 32 to 512, both rows.
3. Evaluation against a 1M-item catalogue (synthetic sessions, 100 units): time and predictions/s.
4. Peak GPU memory of each part.

Exits with status 2 and a message on a machine without a usable CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
DATA = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data")) / "yoochoose-100k"
BATCHES = (32, 64, 128, 256, 512)


def _trainer(row: str, batch_size: int, device):
    from bench_train import ROWS

    from pipeline.config import GRU4RecConfig
    from pipeline.model.clicks import build_item_map, index_sessions, read_log
    from pipeline.model.predict import build_model
    from pipeline.model.schedule import DeviceSchedule, build_schedule
    from pipeline.model.step import Trainer

    config = GRU4RecConfig(**(ROWS[row] | {"batch_size": batch_size}))
    log = read_log(DATA / "train_tr.tsv")
    item_map = build_item_map(log)
    data = index_sessions(log, item_map)
    schedule = build_schedule(data.items, data.offsets, config.batch_size)
    model = build_model(config, len(item_map)).to(device)
    return Trainer(model, config, item_map.counts, device), DeviceSchedule.of(schedule, device), log.n_events


def check_training_syncs(row: str, device, steps: int = 48) -> str:
    import numpy as np
    import torch

    from pipeline.model.step import matmul_precision

    trainer, schedule, _ = _trainer(row, 32, device)
    block = trainer.plan(schedule.schedule, 0, steps, np.random.default_rng(0))
    hidden = trainer.model.init_hidden(schedule.bounds[1], device)
    trainer.model.train()
    loss, hidden = trainer.step_at(schedule, block, 0, hidden)  # warm-up: allocations, kernels loaded
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with matmul_precision(trainer.config.matmul_precision):  # as run_epoch runs the steps
            for t in range(1, steps):
                loss, hidden = trainer.step_at(schedule, block, t, hidden)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return f"{row}: {steps - 1} training steps under set_sync_debug_mode('error'): no host sync"


def check_evaluation_syncs(device) -> str:
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.model.clicks import ItemMap, index_sessions, read_log
    from pipeline.model.evaluate import evaluate
    from pipeline.model.network import GRU4Rec

    n_items = 5000
    item_map = ItemMap.from_ids([str(i) for i in range(n_items)], np.arange(1, n_items + 1))
    model = GRU4Rec(n_items, (100,)).to(device)
    counts = []
    for length in (3, 12):
        rng = np.random.default_rng(length)
        table = pa.table({"session_id": np.repeat(np.arange(200), length).astype(str),
                          "item_id": rng.integers(0, n_items, 200 * length).astype(str),
                          "timestamp": np.tile(np.arange(length), 200).astype(np.float64)})
        data = index_sessions(read_log(table, split="test"), item_map)
        evaluate(model, item_map, data)  # warm-up
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                evaluate(model, item_map, data)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    if counts[0] != counts[1]:
        raise SystemExit(f"evaluation: {counts[0]} sync warnings with 2 steps per session, {counts[1]} with 11: "
                         "something in the loop over steps synchronises")
    return f"evaluation: {counts[0]} sync warnings per call for 2 and for 11 steps per session (setup/copy-out only)"


def training_speed(row: str, batch_size: int, device) -> dict:
    import torch

    from pipeline.model.step import matmul_math

    trainer, schedule, n_events = _trainer(row, batch_size, device)
    trainer.run_epoch(schedule, 0)  # warm-up epoch
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    trainer.run_epoch(schedule, 1)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return {"row": row, "batch_size": batch_size, "epoch_seconds": round(seconds, 3),
            "events_per_s": round(n_events / seconds), "steps": len(schedule.bounds) - 1,
            "matmul": matmul_math(trainer.config.matmul_precision, device),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)}


def evaluation_speed(device, n_items: int, n_predictions: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.model.clicks import ItemMap, index_sessions, read_log
    from pipeline.model.evaluate import evaluate
    from pipeline.model.network import GRU4Rec

    length = 6  # 5 predictions per session
    n_sessions = n_predictions // (length - 1)
    rng = np.random.default_rng(0)
    item_map = ItemMap(pa.array(np.arange(n_items).astype(str)), rng.integers(1, 1000, n_items))
    table = pa.table({"session_id": np.repeat(np.arange(n_sessions), length).astype(str),
                      "item_id": rng.integers(0, n_items, n_sessions * length).astype(str),
                      "timestamp": np.tile(np.arange(length), n_sessions).astype(np.float64)})
    data = index_sessions(read_log(table, split="test"), item_map)
    model = GRU4Rec(n_items, (100,)).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    res = evaluate(model, item_map, data, baselines=True)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return {"items": n_items, "predictions": res.metrics["n_predictions"], "seconds": round(seconds, 2),
            "predictions_per_s": round(res.metrics["n_predictions"] / seconds),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--eval-predictions", type=int, default=20_000, help="predictions ranked against 1M items")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no usable CUDA GPU on this machine (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}); run it on a GPU worker.", file=sys.stderr)
        return 2
    if not DATA.exists():
        print(f"gpu_check: data not found: {DATA} (set PIPELINE_SHARED_DATA)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    began = time.perf_counter()
    for row in ("rsc15", "retailrocket"):
        print(check_training_syncs(row, device), flush=True)
    print(check_evaluation_syncs(device), flush=True)
    print("training, one epoch of yoochoose-100k train_tr.tsv (53,254 events):", flush=True)
    for row in ("rsc15", "retailrocket"):
        for batch in BATCHES:
            print(" ", training_speed(row, batch, device), flush=True)
    print("evaluation (model + POP + S-POP baselines, 100 units, synthetic sessions):", flush=True)
    print(" ", evaluation_speed(device, 1_000_000, args.eval_predictions), flush=True)
    print(f"gpu_check done in {time.perf_counter() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
