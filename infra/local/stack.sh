#!/usr/bin/env bash
# The deployment's topology as local processes (see pipeline/stack/local.py and infra/README.md):
#   infra/local/stack.sh [--home DIR] up [--bundle NAME=DIR] [--env KEY=VALUE] [--gpu-pool-slots N]
#   infra/local/stack.sh [--home DIR] status | env | down
# Uses the repo's venv (make install); PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 must run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PIPELINE_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "error: $PY not found; run \`make install\` first (or set PIPELINE_PYTHON)" >&2
  exit 2
fi
cd "$ROOT"
exec "$PY" -m pipeline.stack.local "$@"
