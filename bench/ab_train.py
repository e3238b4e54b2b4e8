"""Side-by-side training speed of two checkouts, whole processes alternating (figures in docs/benchmarks.md).

    git worktree add /tmp/main-before <commit>        # the code to compare against
    .venv/bin/python bench/ab_train.py --old /tmp/main-before --runs 3 --epochs 3

Each run starts ``bench/bench_train.py`` of one checkout in a fresh process (so imports, reading and the
schedule count as they do for a user, though only the training epochs are timed), alternating which
checkout goes first in each round, so both see the same load on this shared machine. Prints every run and,
per row, the median training time of each side and the median of the per-round ratios old / new.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_once(checkout: Path, row: str, epochs: int, threads: int, extra: list[str]) -> dict:
    """One training benchmark in a fresh interpreter of this venv, with ``checkout`` first on the path."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(checkout / "bench" / "bench_train.py"), "--rows", row, "--epochs", str(epochs),
               "--threads", str(threads), "--skip-eval", "--json", out.name, *extra]
        env = os.environ | {"PIPELINE_SHARED_DATA": str(DATA_ROOT), "PYTHONPATH": str(checkout)}
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())["training"][0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="checkout to compare against (e.g. a git worktree)")
    p.add_argument("--new", type=Path, default=REPO, help="checkout under test (default: this one)")
    p.add_argument("--rows", nargs="+", default=["rsc15", "retailrocket"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="rounds; each round runs old and new once per row")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-args", default="", help='extra bench_train.py options for the new side only, e.g. '
                   '"--matmul-precision highest" (what the new code gives without bfloat16 math)')
    p.add_argument("--json", type=Path, help="write every run to this file")
    args = p.parse_args()
    runs: list[dict] = []
    for i in range(args.runs):
        for row in args.rows:
            sides = [("old", args.old), ("new", args.new)]
            for side, checkout in sides if i % 2 == 0 else sides[::-1]:
                extra = shlex.split(args.new_args) if side == "new" else []
                r = run_once(checkout.resolve(), row, args.epochs, args.threads, extra)
                r |= {"side": side, "round": i + 1, "load_avg_1m": os.getloadavg()[0]}
                runs.append(r)
                print(json.dumps({k: r[k] for k in ("round", "row", "side", "train_seconds", "events_per_s", "events_per_cpu_s", "epoch_seconds", "load_avg_1m")}), flush=True)
    for row in args.rows:
        old = {r["round"]: r["train_seconds"] for r in runs if r["row"] == row and r["side"] == "old"}
        new = {r["round"]: r["train_seconds"] for r in runs if r["row"] == row and r["side"] == "new"}
        ratios = sorted(old[k] / new[k] for k in old)
        # events per CPU-second of the train() call (all threads): less sensitive to other processes
        cpu_old = {r["round"]: r["events_per_cpu_s"] for r in runs if r["row"] == row and r["side"] == "old"}
        cpu_new = {r["round"]: r["events_per_cpu_s"] for r in runs if r["row"] == row and r["side"] == "new"}
        cpu_ratios = sorted(cpu_new[k] / cpu_old[k] for k in cpu_old)
        print(f"{row}: old {statistics.median(old.values()):.2f} s, new {statistics.median(new.values()):.2f} s "
              f"(median of {len(ratios)}); per-round speed-up {', '.join(f'{x:.2f}x' for x in ratios)}, "
              f"median {statistics.median(ratios):.2f}x; CPU time per event old/new "
              f"{', '.join(f'{x:.2f}x' for x in cpu_ratios)}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
