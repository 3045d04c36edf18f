#!/usr/bin/env bash
# One short GPU check (< 5 min on one H100): MAE ViT-B/16 and unified ViT-B/16 training steps, eager and compiled.
# Run from a checkout set up with `make install` (benchmarks/gpu_env.sh puts its .venv first).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 290 python3 -m benchmarks.gpu_check "$@"
