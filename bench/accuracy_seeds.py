"""Accuracy of the published rows over several seeds and training variants (figures in docs/benchmarks.md).

    .venv/bin/python bench/accuracy_seeds.py --rows rsc15 retailrocket --seeds 1 2 --precisions medium highest
    .venv/bin/python bench/accuracy_seeds.py --rows rsc15 --seeds 1 42 --precisions highest --rows-plain

The slow test (tests/model/test_model_accuracy.py) checks seed 42 against the reference; this runs the same
10 epochs on ../shared/data/yoochoose-100k and evaluation (Recall@20 / MRR@20, conservative ties) for every
(row, seed, matmul_precision) given, one JSON line each. ``--rows-plain`` adds, for each, a run without the
compiled kernel (``optim.INPLACE_ROWS``): rows gathered, updated and scattered back, dense parameters by
multi-tensor ops.
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
DATA = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data")) / "yoochoose-100k"
sys.path.insert(0, str(REPO / "tests" / "model"))  # the published rows, as the slow test has them


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["rsc15", "retailrocket"], choices=("rsc15", "retailrocket"))
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["medium"], choices=("highest", "high", "medium"))
    p.add_argument("--rows-plain", action="store_true", help="also run each without the compiled update kernel")
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    if not DATA.exists():
        print(f"data not found: {DATA}", file=sys.stderr)
        return 2

    from test_model_accuracy import ROWS

    from pipeline.config import GRU4RecConfig
    from pipeline.model import optim
    from pipeline.model.evaluate import evaluate_model
    from pipeline.model.train import train

    for row in args.rows:
        for seed in args.seeds:
            for precision in args.precisions:
                for in_place in (True, False) if args.rows_plain else (True,):
                    optim.INPLACE_ROWS = in_place
                    config = GRU4RecConfig(**ROWS[row], n_sample=2048, n_epochs=args.epochs, constrained_embedding=True,
                                           seed=seed, matmul_precision=precision)
                    started = time.perf_counter()
                    with tempfile.TemporaryDirectory() as tmp:
                        res = train(DATA / "train_tr.tsv", config, Path(tmp) / "m", device="cpu")
                        m = evaluate_model(Path(tmp) / "m", DATA / "train_valid.tsv", device="cpu").metrics
                    print(json.dumps({"row": row, "seed": seed, "matmul_precision": precision,
                                      "matmul_math": res.metrics["matmul_math"], "rows_in_place": in_place,
                                      "recall@20": round(m["recall@20"], 4), "mrr@20": round(m["mrr@20"], 4),
                                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    optim.INPLACE_ROWS = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
