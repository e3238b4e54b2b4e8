"""GRU4Rec training and evaluation speed on ../shared/data/yoochoose-100k (figures in docs/benchmarks.md).

    .venv/bin/python bench/bench_train.py                       # RSC15 row, 1 and 2 threads, + evaluation
    .venv/bin/python bench/bench_train.py --rows rsc15 retailrocket --epochs 3 --threads 1
    .venv/bin/python bench/bench_train.py --profile             # where the time of a training step goes
    .venv/bin/python bench/bench_train.py --rows rsc15 retailrocket --lanes-ab 3   # the step on one thread vs two lanes
    .venv/bin/python bench/bench_train.py --rows rsc15 retailrocket --step-ab 3    # bfloat16 / float32 products, rows in place or not
    .venv/bin/python bench/bench_train.py --device cuda         # on a GPU machine

Training speed is training events per wall-clock second (events in train_tr.tsv x epochs / training time,
validation excluded), the unit of the reference's figure (about 3,500 events/s on these 2 cores under
load, 4,300 quiet). The machine is shared, so the script also prints the load average and events per
CPU-second of this process (less sensitive to other processes than wall time), and runs the variants
it compares back to back. To compare two versions of the code, use bench/ab_train.py (whole processes,
alternating); bench/bench_scale.py gives the figures at the size of a real day, bench/gpu_check.sh the GPU ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data")) / "yoochoose-100k"
REFERENCE_EVENTS_PER_S = {"loaded": 3500, "quiet": 4300}
ROWS = {
    "rsc15": dict(loss="cross-entropy", elu_param=0.0, layers=(100,), batch_size=32, dropout_p_embed=0.0,
                  dropout_p_hidden=0.4, learning_rate=0.2, momentum=0.2, sample_alpha=0.5, bpreg=0.0, logq=1.0),
    "retailrocket": dict(loss="bpr-max", elu_param=0.5, layers=(224,), batch_size=80, dropout_p_embed=0.5,
                         dropout_p_hidden=0.05, learning_rate=0.05, momentum=0.4, sample_alpha=0.4, bpreg=1.95, logq=0.0),
}


def bench_training(row: str, epochs: int, threads: int, device: str, lanes: int = 1, matmul_precision: str | None = None) -> dict:
    from pipeline.config import GRU4RecConfig
    from pipeline.model.train import train

    precision = {} if matmul_precision is None else {"matmul_precision": matmul_precision}
    config = GRU4RecConfig(**ROWS[row], n_epochs=epochs, **precision)
    load_before = os.getloadavg()[0]
    cpu0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        res = train(DATA / "train_tr.tsv", config, tmp, device=device, threads=threads, resume=False, lanes=lanes)
    cpu = time.process_time() - cpu0
    n_events = res.metrics["n_events"]
    return {
        "row": row,
        "device": res.metrics["device"],
        "threads": res.metrics["cpu_threads"],
        "lanes": lanes,
        "matmul_math": res.metrics.get("matmul_math", "float32"),
        "epochs": epochs,
        "train_seconds": round(res.train_seconds, 2),
        "events_per_s": round(res.train_events_per_second),
        "events_per_cpu_s": round(n_events * epochs / cpu) if device == "cpu" else None,
        "x_reference_loaded": round(res.train_events_per_second / REFERENCE_EVENTS_PER_S["loaded"], 2),
        "x_reference_quiet": round(res.train_events_per_second / REFERENCE_EVENTS_PER_S["quiet"], 2),
        "epoch_seconds": [round(s, 2) for s in res.metrics["epoch_seconds"]],
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def bench_evaluation(device: str, repeats: int = 3) -> list[dict]:
    """10k predictions x 3k items (synthetic) and the real valid set, with and without baselines."""
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.model.clicks import ItemMap, index_sessions, read_log
    from pipeline.model.evaluate import evaluate
    from pipeline.model.network import GRU4Rec
    from pipeline.model.predict import resolve_device

    dev = resolve_device(device)
    out = []
    rng = np.random.default_rng(0)
    n_items, n_sessions, length = 3000, 2000, 6  # 2000 sessions x 5 predictions = 10,000 predictions
    synthetic = pa.table({
        "session_id": np.repeat(np.arange(n_sessions), length).astype(str),
        "item_id": rng.integers(0, n_items, n_sessions * length).astype(str),
        "timestamp": np.tile(np.arange(length), n_sessions).astype(np.float64),
    })
    item_map = ItemMap.from_ids([str(i) for i in range(n_items)], rng.integers(1, 1000, n_items))
    real_log = read_log(DATA / "train_valid.tsv")
    real_map = ItemMap.from_ids(sorted(set(read_log(DATA / "train_tr.tsv").item_ids.to_pylist())), None)
    real_map = ItemMap(real_map.item_ids, np.ones(len(real_map), np.int64))
    for name, imap, log in (("10k predictions x 3k items", item_map, read_log(synthetic)),
                            ("yoochoose valid (12,455 x 2,873)", real_map, real_log)):
        data = index_sessions(log, imap)
        torch.manual_seed(0)
        model = GRU4Rec(len(imap), (100,)).to(dev)
        for baselines in (False, True):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = evaluate(model, imap, data, baselines=baselines)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out.append({"case": name, "baselines": baselines, "predictions": res.metrics["n_predictions"],
                        "seconds_best": round(min(times), 3), "seconds_median": round(float(np.median(times)), 3),
                        "threads": torch.get_num_threads(), "device": str(dev)})
    return out


def _first_steps(row: str, steps: int):
    """A trainer of ``row`` and the first ``steps`` steps of its schedule (on CPU), for in-process timing."""
    import torch

    from pipeline.config import GRU4RecConfig
    from pipeline.model.clicks import build_item_map, index_sessions, read_log
    from pipeline.model.predict import build_model
    from pipeline.model.schedule import DeviceSchedule, build_schedule
    from pipeline.model.step import Trainer

    config = GRU4RecConfig(**ROWS[row])
    log = read_log(DATA / "train_tr.tsv")
    imap = build_item_map(log)
    data = index_sessions(log, imap)
    full = build_schedule(data.items, data.offsets, config.batch_size)
    cut = full.bounds[steps]
    sched = type(full)(full.inputs[:cut], full.targets[:cut], full.fresh[:cut], full.bounds[: steps + 1], {}, full.session_of[:cut])
    cpu = torch.device("cpu")
    return Trainer(build_model(config, len(imap)), config, imap.counts, cpu), DeviceSchedule.of(sched, cpu)


def profile_steps(row: str, steps: int, threads: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    trainer, ds = _first_steps(row, steps)
    trainer.run_epoch(ds, 0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.run_epoch(ds, 1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def lanes_ab(row: str, steps: int, rounds: int) -> list[dict]:
    """The same steps in one process with the step on one thread and on two lanes (``pipeline.model.lanes``,
    what ``--threads 0`` does), alternating: wall and CPU time per step, and the load average."""
    import torch

    from pipeline.model.lanes import Lanes

    torch.set_num_threads(1)
    trainer, ds = _first_steps(row, steps)
    trainer.run_epoch(ds, 0)  # warm-up
    out = []
    with Lanes() as lanes:
        for i in range(rounds):
            for mode in ("one thread", "two lanes") if i % 2 == 0 else ("two lanes", "one thread"):
                trainer.lanes = lanes if mode == "two lanes" else None
                out.append(_timed_epoch(trainer, ds, steps, row=row, round=i + 1, mode=mode))
    return out


def _timed_epoch(trainer, ds, steps: int, **labels: object) -> dict:
    """One epoch over the first ``steps`` steps: wall and CPU time per step and the load, printed as a line."""
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.run_epoch(ds, 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = labels | {"ms_per_step": round(wall / steps * 1e3, 2), "cpu_ms_per_step": round(cpu / steps * 1e3, 2),
                       "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(record), flush=True)
    return record


def step_ab(row: str, steps: int, rounds: int) -> list[dict]:
    """The same steps in one process with each variant, alternating: float32 against bfloat16 products
    (``pipeline.model.products``), and the updates without the compiled kernel (``optim.INPLACE_ROWS`` off: rows
    gathered, updated and scattered back, dense parameters by multi-tensor ops) against with it. Wall and CPU
    time per step, and the load."""
    import torch

    from pipeline.model import optim
    from pipeline.model.products import BFLOAT16, FLOAT32

    torch.set_num_threads(1)
    trainer, ds = _first_steps(row, steps)
    trainer.run_epoch(ds, 0)  # warm-up
    variants = {"bfloat16 products": (BFLOAT16, True), "float32 products": (FLOAT32, True),
                "no compiled kernel": (BFLOAT16, False)}
    out = []
    try:
        for i in range(rounds):
            for name in variants if i % 2 == 0 else list(variants)[::-1]:
                trainer.products, optim.INPLACE_ROWS = variants[name]
                out.append(_timed_epoch(trainer, ds, steps, row=row, round=i + 1, variant=name))
    finally:
        optim.INPLACE_ROWS = True
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["rsc15"], choices=sorted(ROWS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of 300 training steps and exit")
    p.add_argument("--lanes", type=int, default=1, choices=(1, 2), help="threads sharing each step (train(lanes=...))")
    p.add_argument("--lanes-ab", type=int, metavar="ROUNDS", default=0,
                   help="time 300 steps per row on one thread and on two lanes, alternating ROUNDS times, and exit")
    p.add_argument("--step-ab", type=int, metavar="ROUNDS", default=0,
                   help="time 300 steps per row with bfloat16 / float32 products and with the row update in place / "
                        "gathered and scattered back, alternating ROUNDS times, and exit")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                   help="gru4rec.matmul_precision for the training runs (default: the config's, medium)")
    p.add_argument("--json", type=Path, help="write all results to this file")
    args = p.parse_args()
    if not DATA.exists():
        print(f"data not found: {DATA}", file=sys.stderr)
        return 2
    if args.profile:
        print(profile_steps(args.rows[0], 300, args.threads[0]))
        return 0
    if args.lanes_ab:
        for row in args.rows:
            lanes_ab(row, 300, args.lanes_ab)
        return 0
    if args.step_ab:
        for row in args.rows:
            step_ab(row, 300, args.step_ab)
        return 0
    results: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "training": [], "evaluation": []}
    threads = args.threads if args.device == "cpu" else [0]
    for row in args.rows:
        for n in threads:
            r = bench_training(row, args.epochs, n, args.device, args.lanes, args.matmul_precision)
            results["training"].append(r)
            print(json.dumps(r), flush=True)
    if not args.skip_eval:
        import torch

        torch.set_num_threads(max(args.threads))
        for r in bench_evaluation(args.device):
            results["evaluation"].append(r)
            print(json.dumps(r), flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
