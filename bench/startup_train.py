"""Start-up of ``python -m pipeline train``: seconds from launching the process to its first training step.

    .venv/bin/python bench/startup_train.py --old /tmp/main-before --runs 3
    .venv/bin/python bench/startup_train.py --old /tmp/main-before --runs 3 --whole 1 3   # and whole commands

Each run launches ``python -m pipeline train`` (RSC15 row, ../shared/data/yoochoose-100k/train_tr.tsv) in a fresh
process of one checkout, with a small wrapper that notes the time when ``Trainer._step`` is first called and
ends the process there. Checkouts alternate. Also times ``python -m pipeline --help`` and, with ``--whole``,
complete ``train`` commands (start-up, the epochs, the checkpoint and metrics written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data")) / "yoochoose-100k"
# Runs the CLI; the first call of Trainer._step prints the seconds since launch and exits.
WRAPPER = """
import importlib, os, sys, time
for name in ("pipeline.model.step", "pipeline.model.train", "pipeline.train"):  # this layout, then older ones
    try:
        T = importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    if hasattr(T, "Trainer"):
        break
first = T.Trainer._step
def _step(self, *a, **k):
    print(f"FIRST_STEP {time.time() - float(os.environ['LAUNCHED_AT']):.3f}", flush=True)
    os._exit(0)
T.Trainer._step = _step
try:
    from pipeline.cli.main import main
except ModuleNotFoundError:  # before the layout of issue 13
    from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""
RSC15 = ["loss=cross-entropy", "layers=[100]", "batch_size=32", "dropout_p_hidden=0.4", "learning_rate=0.2",
         "momentum=0.2", "sample_alpha=0.5", "logq=1.0"]


def _train_argv(out: str, epochs: int) -> list[str]:
    settings = [*RSC15, f"n_epochs={epochs}"]
    return ["train", "--train", str(DATA / "train_tr.tsv"), "--out", out, "--device", "cpu"] + [
        a for s in settings for a in ("--set", f"gru4rec.{s}")]  # old and new CLIs take it


def whole_seconds(checkout: Path, epochs: int) -> float:
    """Seconds of a whole ``python -m pipeline train`` of ``epochs`` epochs, launch to exit."""
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", *_train_argv(out, epochs)], cwd=checkout,
                       env=os.environ | {"PYTHONPATH": str(checkout)}, check=True, capture_output=True)
        return time.perf_counter() - began


def first_step_seconds(checkout: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", WRAPPER, *_train_argv(out, 1)]
        env = os.environ | {"PYTHONPATH": str(checkout), "LAUNCHED_AT": repr(time.time())}
        res = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in res.stdout.splitlines() if line.startswith("FIRST_STEP")]
    if not lines:
        raise RuntimeError(f"{checkout}: no training step reached\n{res.stderr[-2000:]}")
    return float(lines[0].split()[1])


def help_seconds(checkout: Path) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=checkout, env=os.environ | {"PYTHONPATH": str(checkout)},
                   check=True, capture_output=True)
    return time.perf_counter() - began


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--new", type=Path, default=REPO)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--whole", type=int, nargs="*", default=[], metavar="EPOCHS",
                   help="also time whole train commands of these many epochs, launch to exit (e.g. --whole 1 3)")
    args = p.parse_args()
    times: dict[str, list[float]] = {"old": [], "new": []}
    helps: dict[str, list[float]] = {"old": [], "new": []}
    wholes: dict[tuple[str, int], list[float]] = {(side, e): [] for side in ("old", "new") for e in args.whole}
    for i in range(args.runs):
        sides = [("old", args.old), ("new", args.new)]
        for side, checkout in sides if i % 2 == 0 else sides[::-1]:
            times[side].append(first_step_seconds(checkout.resolve()))
            helps[side].append(help_seconds(checkout.resolve()))
            for e in args.whole:
                wholes[side, e].append(whole_seconds(checkout.resolve(), e))
            print(f"round {i + 1} {side}: first step at {times[side][-1]:.2f} s, --help {helps[side][-1]:.2f} s"
                  + "".join(f", {e}-epoch train {wholes[side, e][-1]:.2f} s" for e in args.whole)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    for side in ("old", "new"):
        print(f"{side}: first step median {statistics.median(times[side]):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in times[side])}); --help median {statistics.median(helps[side]):.2f} s"
              + "".join(f"; {e}-epoch train median {statistics.median(wholes[side, e]):.2f} s" for e in args.whole))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
