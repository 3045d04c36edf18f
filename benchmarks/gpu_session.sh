#!/usr/bin/env bash
# The project's one prepared GPU session (about 8 minutes on one H100; see docs/benchmarks.md "GPU").
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # on a GPU machine, from the repository root
#
# Phase 0 (CPU, in the background): generate the default synthetic benchmark (data/synthetic, seed 0; the same
#   bytes as on any machine with the system's DejaVu fonts, other glyph pixels with matplotlib's bundled copy).
# Phase A (GPU alone, timings): benchmarks/gpu_check.py (MFU of MAE and unified ViT-B/16 compiled, with a kernel
#   profile, the GPU-busy share and the FLOPs by module). CUDA_GRAPHS=1 adds MAE compiled with CUDA graphs
#   (reduce-overhead); MAE_SPEED=1 adds benchmarks/mae_speed.py (visible-only vs all-patches encoder).
# Phase B (GPU shared by four small jobs, quality; throughput figures here are not timings):
#   the default config trained for longer (#3), MAE transfer with 3 seeds (#4), task resolution seeds 1 and 2
#   (#6). QUERY_DESIGNS=1 adds the query designs (#5).
# Every job runs under its own `timeout`, so one failure or overrun cannot take the others' results with it.
# Logs and result files are packed into OUT_DIR/results.tgz; OUT_DIR/summary.md holds the tables.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_session_out}}
LOGS=runs/gpu_session/logs
DATA=data/synthetic
if [ "${SMOKE:-0}" = 1 ]; then DATA=data/gpu_smoke; rm -rf data/gpu_smoke runs/gpu_session runs/gpu_unified; fi
mkdir -p "$OUT_DIR" $LOGS
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
say() { echo "[$(elapsed)s] $*" | tee -a $LOGS/session.log; }

source benchmarks/gpu_env.sh
PY=python3
# SMOKE=1: the same script on a CPU with tiny settings, to check it before spending GPU time
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY_SMOKE:-.venv/bin/python}; ACC=cpu; PREC=32-true; B=150; N=${N_SMOKE:-120}; FIT_TIME=00:00:00:40
  GPU_CHECK="--tiny --mae-batch 4 --unified-batch 2 --warmup 1 --steps 1 --repeats 1 --modes eager --profile 5"
  GPU_CHECK_RO="--tiny --jobs mae --mae-batch 4 --warmup 1 --steps 1 --repeats 1 --modes eager"
  MAE_SPEED="--device cpu --batch_size 4 --repeats 1 --warmup 1 --models tiny --decoder_depths 1"
  SYNTH_N="--train $N --val 40 --test 40"; WORKERS=1
else
  ACC=gpu; PREC=bf16-mixed; B=300; FIT_TIME=00:00:03:15
  GPU_CHECK="--modes compile --sdpa default --mae-batch 768 --mae-decoder-heads 8 --unified-batch 192 --warmup 3
    --steps 10 --repeats 3 --profile 25"
  GPU_CHECK_RO="--jobs mae --modes compile:reduce-overhead --sdpa default --mae-batch 768 --mae-decoder-heads 8
    --warmup 3 --steps 10 --repeats 3"
  MAE_SPEED="--device cuda --amp --batch_size 256 --repeats 5 --warmup 2 --models tiny,small,base --decoder_depths 1,4,8"
  SYNTH_N="--train 2000 --val 300 --test 300"; WORKERS=5
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $LOGS/session.log
$PY -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" | tee -a $LOGS/session.log

# ---------------------------------------------------------------- phase 0: data (CPU)
say "phase 0: synth"
( timeout 240 $PY -m idrecog.cli synth --out $DATA $SYNTH_N --seed 0 --workers ${SYNTH_WORKERS:-8} --no-progress >$LOGS/synth.log 2>&1; echo "synth rc=$?" >>$LOGS/synth.log ) &
SYNTH=$!

# ---------------------------------------------------------------- phase A: timings, GPU alone
# PHASES=B skips the timings (a second call after phase A already ran)
if [ "${PHASES:-AB}" != B ]; then
say "phase A: gpu_check"
# MAE and unified compiles take ~90 s and ~70 s on one H200 (2026-11-27): 160 s cut the unified job off
timeout 230 $PY -m benchmarks.gpu_check $GPU_CHECK >$LOGS/gpu_check.log 2>&1
say "gpu_check rc=$?"
if [ "${CUDA_GRAPHS:-0}" = 1 ] || [ "${SMOKE:-0}" = 1 ]; then  # measured 2026-11-27: no gain for MAE
  timeout 80 $PY -m benchmarks.gpu_check $GPU_CHECK_RO >$LOGS/gpu_check_ro.log 2>&1
  say "gpu_check reduce-overhead rc=$?"
fi
if [ "${MAE_SPEED:-0}" = 1 ]; then
  say "phase A: mae_speed"
  timeout 90 $PY -m benchmarks.mae_speed $MAE_SPEED >$LOGS/mae_speed.log 2>&1
  say "mae_speed rc=$?"
fi
fi
wait $SYNTH
say "$(tail -1 $LOGS/synth.log)"
cat $DATA/*.jsonl | sha256sum | sed 's/^/manifest sha256 /' | tee -a $LOGS/session.log

# ---------------------------------------------------------------- phase B: quality, four jobs share the GPU
say "phase B"
(
  sed 's#runs/unified#runs/gpu_unified#g' lightning_configs/unified.yaml >runs/gpu_session/unified_gpu.yaml
  timeout $((B - 70)) $PY -m idrecog.cli fit --config runs/gpu_session/unified_gpu.yaml --data.root $DATA \
    --trainer.accelerator $ACC --trainer.precision $PREC --trainer.max_time $FIT_TIME --trainer.max_epochs ${LONG_EPOCHS:-16} \
    --trainer.enable_progress_bar false --data.num_workers $WORKERS --data.pin_memory true \
    --data.persistent_workers true
  echo "fit rc=$?"
  timeout 60 $PY -m idrecog.cli test --config runs/gpu_session/unified_gpu.yaml --data.root $DATA \
    --trainer.accelerator $ACC --trainer.precision $PREC --trainer.enable_progress_bar false \
    --data.num_workers $WORKERS \
    --ckpt_path runs/gpu_unified/checkpoints/best.ckpt
  echo "test rc=$?"
) >$LOGS/unified_long.log 2>&1 &
if [ "${SMOKE:-0}" = 1 ]; then MT="--smoke"; else
  MT="--accelerator gpu --time-budget $((B - 10)) --seeds 0 1 2 --pretrain-seconds 60 --finetune-steps 90"; fi
timeout $B $PY -m benchmarks.mae_transfer $MT --data $DATA --out runs/gpu_session/mae_transfer \
  >$LOGS/mae_transfer.log 2>&1 &
if [ "${SMOKE:-0}" = 1 ]; then
  TR="--train 60 --val 20 --time-budget $((B - 10)) --num-workers 1 --threads 1"
else
  TR="--time-budget $((B - 20)) --steps 280 --accelerator gpu --precision bf16-mixed --num-workers 3 --threads 2"
fi
for S in ${TR_SEEDS:-1 2}; do
  timeout $B $PY -m benchmarks.task_resolution --source $DATA $TR --seed $S --work /tmp/task_resolution_s$S \
    --out runs/gpu_session/task_resolution_s$S >$LOGS/task_resolution_s$S.log 2>&1 &
done
if [ "${SMOKE:-0}" = 1 ]; then
  QD="--time-budget $((B - 15)) --seeds 0 --min-steps 2 --img 64 96 --threads 1 --num-workers 1"
else
  QD="--accelerator gpu --time-budget $((B - 15)) --seeds 0 1 --min-steps 300 --num-workers 4 --threads 1"
fi
if [ "${QUERY_DESIGNS:-0}" = 1 ]; then
  timeout $B $PY -m benchmarks.query_designs --data $DATA $QD --no-augment --text-model tiny \
    --out runs/gpu_session/query_designs >$LOGS/query_designs.log 2>&1 &
fi
wait
say "phase B done"

# ---------------------------------------------------------------- results
cp -r runs/gpu_unified/lightning_logs $LOGS/gpu_unified_logs 2>/dev/null
{
  echo "# GPU session $(date -u +%FT%TZ)"
  for f in session gpu_check gpu_check_ro; do [ -f $LOGS/$f.log ] || continue; echo "## $f"; grep -E '^\||rc=|attention|sdpa|FAILED|ratio|Error|FLOPs by|GPU busy' $LOGS/$f.log; done
  for f in $LOGS/*.log; do echo "## tail $f"; tail -25 "$f"; done
} >"$OUT_DIR/summary.md" 2>&1
tar czf "$OUT_DIR/results.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='tiny_bert' -C runs gpu_session
say "done"
