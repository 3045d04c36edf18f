#!/usr/bin/env bash
# One short GPU check (< 5 min on one H100): MAE ViT-B/16 and unified ViT-B/16 training steps, eager and compiled.
# Missing pure-Python packages can be carried as wheels in .whl/ (see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 290 python3 benchmarks/gpu_check.py "$@"
