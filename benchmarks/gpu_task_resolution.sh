#!/usr/bin/env bash
# Task resolution (issue 6) at several seeds side by side on one GPU, longer than gpu_session.sh's 280 steps:
#
#   bash benchmarks/gpu_task_resolution.sh [OUT_DIR]     # on a GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_task_resolution.sh       # the same on a CPU with tiny settings, before GPU time
#
# Generates the default synthetic benchmark (seed 0; the system's DejaVu fonts, else matplotlib's bundled copy),
# then runs benchmarks/task_resolution.py for each seed in SEEDS at once, each inside BUDGET seconds with at most
# STEPS optimiser steps per unified run (the script fits one step count for its three runs to its budget).
# OUT_DIR/summary.md holds each seed's tables; OUT_DIR/results.tgz the results.json files and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_tr_out}}
WORK=runs/gpu_tr
mkdir -p "$OUT_DIR" $WORK/logs
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a $WORK/logs/session.log; }

source benchmarks/gpu_env.sh
SEEDS=${SEEDS:-1 2 3}
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY_SMOKE:-.venv/bin/python}; DATA=data/gpu_tr_smoke; rm -rf $DATA
  SYNTH_N="--train 60 --val 20 --test 20"; SYNTH_WORKERS=2
  TR="--accelerator cpu --time-budget ${BUDGET:-150} --steps ${STEPS:-20} --num-workers 1 --threads 1"
else
  PY=python3; DATA=data/synthetic_gpu; SYNTH_N="--train 2000 --val 300 --test 300"; SYNTH_WORKERS=14
  TR="--accelerator gpu --precision bf16-mixed --time-budget ${BUDGET:-430} --steps ${STEPS:-1500}
    --num-workers ${WORKERS:-4} --threads 1"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $WORK/logs/session.log
$PY -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" | tee -a $WORK/logs/session.log

say "synth"
timeout 240 $PY -m idrecog.cli synth --out $DATA $SYNTH_N --seed 0 --workers $SYNTH_WORKERS --no-progress \
  >$WORK/logs/synth.log 2>&1
say "synth rc=$?"
cat $DATA/*.jsonl | sha256sum | sed 's/^/manifest sha256 /' | tee -a $WORK/logs/session.log

say "task resolution, seeds $SEEDS, settings: $(echo $TR)"
for S in $SEEDS; do
  # shellcheck disable=SC2086
  timeout $((${BUDGET:-430} + 60)) $PY -m benchmarks.task_resolution --source $DATA $TR \
    --classifier-share 0.12 --classifier-max-epochs 30 --seed $S --work /tmp/gpu_tr_s$S --out $WORK/s$S \
    >$WORK/logs/task_resolution_s$S.log 2>&1 &
done
wait
say "done"
{
  echo "# task resolution on $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader), $(date -u +%FT%TZ)"
  cat $WORK/logs/session.log
  for S in $SEEDS; do echo "## seed $S"; cat $WORK/s$S/results.md 2>/dev/null || tail -30 $WORK/logs/task_resolution_s$S.log; done
} >"$OUT_DIR/summary.md" 2>&1
tar czf "$OUT_DIR/results.tgz" --exclude='*.ckpt' -C runs gpu_tr
