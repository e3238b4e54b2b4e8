#!/usr/bin/env bash
# GPU checks of GRU4Rec training and evaluation, in one command, under 5 minutes (docs/benchmarks.md, "GPU"):
# no host sync in the training step (set_sync_debug_mode("error")) nor in evaluation's loop over steps,
# events/s for batch sizes 32..512 on the RSC15 and RetailRocket rows, evaluation against 1M items, peak
# GPU memory. On a machine without CUDA it exits with status 2 and says so.
#   bench/gpu_check.sh                        # from the repository root, .venv installed
#   PYTHON=python3 bench/gpu_check.sh --eval-predictions 50000
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec timeout 300 "$PYTHON" bench/gpu_check.py "$@"
