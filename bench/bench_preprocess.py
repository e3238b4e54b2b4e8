"""Benchmark: validate + build (this pipeline) vs a straightforward pandas implementation of the same work.

    .venv/bin/python bench/bench_preprocess.py --repeat 3 --memory-scaling       # 10M events, CSV logs
    .venv/bin/python bench/bench_preprocess.py --repeat 3 --format parquet       # 10M events, Parquet logs
    .venv/bin/python bench/bench_preprocess.py --events 1000000                  # a quick run

1. Generates a click log once per size/seed/format (``pipeline.data.generate``: 10 daily partitions, a little
   injected corruption of every kind); not timed. ``--format csv`` (default) are raw text logs as the public
   GRU4Rec preprocessing scripts read them; ``--format parquet`` the same events as Parquet.
2. Runs each variant in its own child process, side by side in one run: ``pipeline`` (``python -m pipeline
   validate``, then ``python -m pipeline build`` on its output: two processes, as the DAG runs them; validate
   starts helper processes on a big input) and ``pandas`` (the per-partition rules and the GRU4Rec-style
   preprocessing written the way the public GRU4Rec preprocessing scripts are: ``pd.read_csv``, whole frames,
   groupby, ``isin``, ``sort_values``). The pandas variant applies the same rules (nulls, time window, exact
   duplicates, per-session order, bot-like sessions, quarantine share) so the outputs can be compared.
   With ``--repeat N`` the variants alternate N times and each keeps its fastest run (a shared machine).
3. Checks that both wrote the same train / valid / test / items rows (same order, same item index).
4. Reports wall time (whole child process, imports included), CPU time, events per second and peak memory:
   the polled RSS of the variant's whole process tree (the ratio uses this), the largest single process's
   ``ru_maxrss``, and for the pipeline each phase's time and polled peak (largest single process).
5. ``--memory-scaling``: peak RSS of ``validate`` on the first 2, 5 and all partitions (bounded memory: it
   does not grow with the number of partitions), and of ``build`` on each with the default memory budget and
   with ``--small-budget-mb`` (default 256: bucketed, spilled to disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORRUPTION = {
    "null_session_id": 0.0002,
    "null_item_id": 0.0002,
    "out_of_window": 0.0002,
    "duplicate": 0.0005,
    "out_of_order": 0.0002,
    "bot_sessions": 2,
}
FLOOR = "2000-01-01T00:00:00Z"
MAX_SESSION_LENGTH = 200
MAX_SHARE = 0.01
TEST_DAYS = 1.0
VALID_DAYS = 1.0
MIN_SESSION_LENGTH = 2
MIN_ITEM_SUPPORT = 5


# ---------------------------------------------------------------------------------------------
# Variant 1: this pipeline


def _peak_rss(proc: subprocess.Popen) -> tuple[float, float]:
    """Poll a running process and its children until it exits: (peak RSS of its tree, peak of one process), MB.

    Polled, not ``ru_maxrss``: a forked child's ``ru_maxrss`` starts from the RSS of the (large) process that
    forked it, which would make every figure at least this benchmark's own size."""
    import psutil

    tree_peak = one_peak = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            sizes = [p.memory_info().rss for p in (parent, *parent.children(recursive=True))]
            tree_peak, one_peak = max(tree_peak, sum(sizes)), max(one_peak, max(sizes))
        except psutil.Error:
            pass
        time.sleep(0.02)
    return tree_peak / 2**20, one_peak / 2**20


def _cli(args: list[str]) -> dict:
    """Run ``python -m pipeline ARGS`` as its own process (as a scheduler would); its time and peak RSS."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else b""))
    reader.start()
    tree_mb, process_mb = _peak_rss(proc)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"python -m pipeline {' '.join(args[:1])} failed with exit code {proc.returncode}")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": process_mb, "peak_rss_tree_mb": tree_mb, "summary": json.loads(out[0])}


def run_pipeline(inputs: list[str], out: Path) -> dict:
    """``python -m pipeline validate`` then ``python -m pipeline build``: two processes, as the DAG runs them."""
    validated, dataset = str(out / "validated"), str(out / "dataset")
    settings = [
        "--set", f"validation.timestamp_floor={FLOOR}", "--set", f"validation.max_session_length={MAX_SESSION_LENGTH}",
        "--set", f"validation.max_quarantine_share={MAX_SHARE}",
    ]  # fmt: skip
    validate = _cli(["validate", *inputs, "--out", validated, *settings])
    build = _cli(
        ["build", validated, "--out", dataset, "--test-days", str(TEST_DAYS), "--valid-days", str(VALID_DAYS),
         "--min-session-length", str(MIN_SESSION_LENGTH), "--min-item-support", str(MIN_ITEM_SUPPORT)]
    )  # fmt: skip
    return {
        "rows_in": validate["summary"]["rows_in"],
        "rows_valid": validate["summary"]["rows_valid"],
        "phases": {name: {k: v for k, v in r.items() if k != "summary"} for name, r in (("validate", validate), ("build", build))},
    }


# ---------------------------------------------------------------------------------------------
# Variant 2: pandas, the straightforward way


def _read_pandas(path: Path):
    """One partition file, the way the public preprocessing scripts read logs (``pd.read_csv`` for text)."""
    import pandas as pd

    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    ids = {c: str for c in ("session_id", "item_id", "user_id", "event_type")}
    df = pd.read_csv(path, dtype=ids, keep_default_na=False, na_values=[""])
    df["timestamp"] = pd.to_datetime(df.timestamp, utc=True, format="ISO8601")
    return df


def run_pandas(inputs: list[str], out: Path) -> dict:
    import numpy as np
    import pandas as pd

    floor = pd.Timestamp(FLOOR)
    clean, rows_in = [], 0
    for part in sorted(inputs):
        files = sorted(f for f in Path(part).iterdir() if not f.name.startswith(("_", ".")))
        df = pd.concat([_read_pandas(f) for f in files], ignore_index=True)
        rows_in += len(df)
        day = pd.Timestamp(Path(part).name.removeprefix("dt="), tz="UTC")
        end = day + pd.Timedelta(days=1)
        bad = df.session_id.isna() | df.item_id.isna() | df.timestamp.isna()
        in_window = (df.timestamp >= floor) & (df.timestamp < end)
        bad |= ~in_window
        bad |= df.duplicated(keep="first")
        ts = df.timestamp.where(df.session_id.notna() & in_window)
        running_max = ts.groupby(df.session_id).cummax()
        bad |= (running_max > ts).fillna(False)
        lengths = df.groupby("session_id").session_id.transform("size")
        bad |= (lengths > MAX_SESSION_LENGTH).fillna(False)
        if bad.mean() > MAX_SHARE:
            raise SystemExit(f"{part}: quarantine share {bad.mean():.2%} above {MAX_SHARE:.2%}")
        clean.append(df.loc[~bad, ["session_id", "item_id", "timestamp"]])
    data = pd.concat(clean, ignore_index=True)
    rows_valid = len(data)
    del clean
    data["pos"] = np.arange(len(data))

    def order(frame: pd.DataFrame) -> pd.DataFrame:
        start = frame.groupby("session_id").timestamp.transform("min")
        return frame.assign(start=start).sort_values(["start", "session_id", "timestamp", "pos"]).drop(columns="start")

    data = order(data)
    while True:  # iterative filtering until stable
        before = len(data)
        lengths = data.groupby("session_id").session_id.transform("size")
        data = data[lengths >= MIN_SESSION_LENGTH]
        supports = data.groupby("item_id").item_id.transform("size")
        data = data[supports >= MIN_ITEM_SUPPORT]
        if len(data) == before:
            break
    tmax = data.timestamp.max()
    session_end = data.groupby("session_id").timestamp.transform("max")
    test = data[session_end >= tmax - pd.Timedelta(days=TEST_DAYS)]
    train_full = data[session_end < tmax - pd.Timedelta(days=TEST_DAYS)]
    tmax_train = train_full.timestamp.max()
    end_train = train_full.groupby("session_id").timestamp.transform("max")
    valid = train_full[end_train >= tmax_train - pd.Timedelta(days=VALID_DAYS)]
    train = train_full[end_train < tmax_train - pd.Timedelta(days=VALID_DAYS)]
    item_ids = train.item_id.unique()
    item_map = pd.Series(np.arange(len(item_ids), dtype=np.int32), index=item_ids)

    def held_out(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[frame.item_id.isin(item_ids)]
        lengths = frame.groupby("session_id").session_id.transform("size")
        return frame[lengths >= 2]

    (out / "train").mkdir(parents=True, exist_ok=True)
    for name, frame in (("train", train), ("valid", held_out(valid)), ("test", held_out(test))):
        frame = order(frame)
        frame = frame.assign(item_idx=item_map.loc[frame.item_id].to_numpy()).drop(columns="pos")
        (out / name).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out / name / "part-0.parquet", index=False)
    counts = train.groupby("item_id").size().loc[item_ids].to_numpy()
    items = pd.DataFrame({"item_idx": np.arange(len(item_ids), dtype=np.int32), "item_id": item_ids, "count": counts})
    (out / "items").mkdir(parents=True, exist_ok=True)
    items.to_parquet(out / "items" / "part-0.parquet", index=False)
    return {"rows_in": rows_in, "rows_valid": rows_valid}


VARIANTS = {"pipeline": run_pipeline, "pandas": run_pandas}
OUTPUT_DIRS = {"pipeline": "dataset", "pandas": "."}


# ---------------------------------------------------------------------------------------------
# Driver


def _child(variant: str, inputs: list[str], out: Path, result_file: Path) -> None:
    t0 = time.perf_counter()
    stats = VARIANTS[variant](inputs, out)
    stats["work_seconds"] = time.perf_counter() - t0
    result_file.write_text(json.dumps(stats))


def _measure(variant: str, inputs: list[str], out: Path) -> dict:
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result_file = out / "_result.json"
    cmd = [sys.executable, __file__, "--child", variant, "--out", str(out), "--result", str(result_file), *inputs]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    peak_tree = 0
    parent = psutil.Process(proc.pid)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed with exit code {proc.returncode}")
    stats = json.loads(result_file.read_text())
    # ru_maxrss is in KiB on Linux; the tree figure also counts any worker processes a variant starts.
    cpu = usage.ru_utime + usage.ru_stime  # includes the child's reaped descendants (validate's helpers)
    return stats | {
        "wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_rss_tree_mb": peak_tree / 2**20
    }  # fmt: skip


def _compare(a: Path, b: Path) -> list[str]:
    import pyarrow.parquet as pq

    from pipeline.data.schema import ITEMS_SCHEMA, SPLIT_SCHEMA

    problems = []
    for name in ("train", "valid", "test", "items"):
        schema = ITEMS_SCHEMA if name == "items" else SPLIT_SCHEMA
        ta = pq.read_table(a / name).select(schema.names).cast(schema)
        tb = pq.read_table(b / name).select(schema.names).cast(schema)
        if not ta.equals(tb):
            problems.append(f"{name}: {ta.num_rows} vs {tb.num_rows} rows differ")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="approximate number of events to generate")
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--format", choices=("csv", "parquet"), default="csv",
        help="log file format: csv (raw text logs, as the public preprocessing scripts read them) or parquet",
    )  # fmt: skip
    parser.add_argument("--workdir", default=str(REPO / ".local" / "bench"))
    parser.add_argument("--variants", default="pandas,pipeline", help="comma-separated; '' = only --memory-scaling")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--memory-scaling", action="store_true",
        help="also measure validate's and build's peak RSS on 2, 5 and all partitions",
    )  # fmt: skip
    parser.add_argument("--small-budget-mb", type=int, default=256, help="the second build.memory_budget_mb of --memory-scaling")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the variants N times; keep each one's fastest run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.inputs, Path(args.out), Path(args.result))
        return 0

    from pipeline.data.generate import generate_clicks

    work = Path(args.workdir)
    data = work / f"clicks-{args.events}-{args.days}d-seed{args.seed}-{args.format}"
    sessions_per_day = max(1, round(args.events / args.days / 5.0))  # ~5 events per session
    if not (data / "_generated.json").exists():
        print(f"generating ~{args.events:,} events in {data} ...", flush=True)
        shutil.rmtree(data, ignore_errors=True)
        generate_clicks(
            str(data), days=args.days, sessions_per_day=sessions_per_day, n_items=args.items,
            seed=args.seed, corruption=CORRUPTION, fmt=args.format,
        )  # fmt: skip
    summary = json.loads((data / "_generated.json").read_text())
    inputs = [p["uri"] for p in summary["partitions"]]
    events = summary["rows"]
    for uri in inputs:  # warm the page cache so neither variant pays for the first read
        for f in Path(uri).glob("*"):
            f.read_bytes()
    # Variants alternate; with --repeat N each keeps its fastest run (the machine may be shared).
    runs: dict[str, list[dict]] = {v: [] for v in args.variants.split(",") if v}
    for rep in range(args.repeat):
        for variant in runs:
            print(f"run {rep + 1}/{args.repeat}: {variant} on {events:,} events ...", flush=True)
            r = _measure(variant, inputs, work / f"out-{variant}")
            runs[variant].append(r)
            print(f"  {variant}: {r['wall_seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, "
                  f"{events / r['wall_seconds']:,.0f} events/s, peak RSS {r['peak_rss_tree_mb']:.0f} MB", flush=True)  # fmt: skip
    results = {v: min(rs, key=lambda r: r["wall_seconds"]) for v, rs in runs.items()}
    problems = []
    if {"pandas", "pipeline"} <= results.keys():
        problems = _compare(work / "out-pipeline" / OUTPUT_DIRS["pipeline"], work / "out-pandas" / OUTPUT_DIRS["pandas"])
        if results["pandas"]["rows_valid"] != results["pipeline"]["rows_valid"]:
            problems.append(f"valid rows differ: {results['pandas']['rows_valid']} vs {results['pipeline']['rows_valid']}")
    print()
    print(f"events: {events:,} in {args.days} daily {args.format} partitions ({summary['rows'] - sum(p['expected_quarantined'] for p in summary['partitions']):,} clean)")
    print(f"{'variant':<10} {'wall s':>8} {'CPU s':>8} {'events/s':>12} {'peak RSS MB':>12} {'max proc MB':>12}")
    for variant, r in results.items():
        print(
            f"{variant:<10} {r['wall_seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {events / r['wall_seconds']:>12,.0f} "
            f"{r['peak_rss_tree_mb']:>12.0f} {r['peak_rss_mb']:>12.0f}"
        )
    phases = results.get("pipeline", {}).get("phases", {})
    for name, r in phases.items():
        print(f"  pipeline {name:<9} {r['seconds']:>6.1f} s, peak RSS {r['peak_rss_mb']:>6.0f} MB")
    if {"pandas", "pipeline"} <= results.keys():
        speed = results["pandas"]["wall_seconds"] / results["pipeline"]["wall_seconds"]
        memory = results["pipeline"]["peak_rss_tree_mb"] / results["pandas"]["peak_rss_tree_mb"]
        cpu = results["pandas"]["cpu_seconds"] / results["pipeline"]["cpu_seconds"]
        print(f"throughput ratio pipeline/pandas: {speed:.2f}x (CPU time ratio {cpu:.2f}x); "
              f"peak memory ratio pipeline/pandas: {memory:.2f}")  # fmt: skip
        print("identical output: " + ("yes" if not problems else "NO: " + "; ".join(problems)))
    scaling = {}
    if args.memory_scaling:
        budgets = [None, args.small_budget_mb]
        print("\npeak RSS by number of partitions (same partition size): validate, then build with the default "
              f"budget and with build.memory_budget_mb={args.small_budget_mb}:")  # fmt: skip
        for k in sorted({min(2, len(inputs)), min(5, len(inputs)), len(inputs)}):
            out = work / f"scaling-{k}"
            shutil.rmtree(out, ignore_errors=True)
            r = _cli(["validate", *inputs[:k], "--out", str(out / "validated"), "--set", f"validation.max_quarantine_share={MAX_SHARE}"])
            row = {"events": r["summary"]["rows_in"], "validate": {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}}
            line = f"  {k:>3} partitions, {r['summary']['rows_in']:>12,} events: validate {r['seconds']:5.1f} s / {r['peak_rss_mb']:5.0f} MB"
            for budget in budgets:
                settings = ["--set", f"build.memory_budget_mb={budget}"] if budget else []
                # Quarter-day windows, so that two partitions still leave a train split.
                b = _cli(["build", str(out / "validated"), "--out", str(out / "dataset"), "--test-days", "0.25",
                          "--valid-days", "0.25", *settings])  # fmt: skip
                row[f"build_{budget or 'default'}"] = {"seconds": b["seconds"], "peak_rss_mb": b["peak_rss_mb"]}
                line += f"; build ({budget or 'default'} MB) {b['seconds']:5.1f} s / {b['peak_rss_mb']:5.0f} MB"
            scaling[k] = row
            print(line, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"events": events, "days": args.days, "results": results, "runs": runs, "problems": problems, "scaling": scaling}, indent=2)
        )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
