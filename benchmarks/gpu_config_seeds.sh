#!/usr/bin/env bash
# The default job (lightning_configs/unified.yaml, its 3 epochs) with and without a config overlay, several seeds
# side by side on one GPU, then `idrecog test` of each best checkpoint:
#
#   bash benchmarks/gpu_config_seeds.sh [OUT_DIR]     # on a GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_config_seeds.sh       # the same on a CPU with tiny settings, before GPU time
#
# OVERLAYS (default "none encoders/hybrid.yaml": the plain config and the hybrid-ViT overlay) x SEEDS (default
# "0 1 2"). Data: the default synthetic benchmark, generated there (the system's DejaVu fonts, else matplotlib's
# bundled copy). OUT_DIR/summary.md: one row per run (test metrics); OUT_DIR/results.tgz: the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_cs_out}}
WORK=runs/gpu_cs
rm -rf $WORK && mkdir -p "$OUT_DIR" $WORK/logs
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a $WORK/logs/session.log; }

source benchmarks/gpu_env.sh
OVERLAYS=${OVERLAYS:-none encoders/hybrid.yaml}
SEEDS=${SEEDS:-0 1 2}
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY_SMOKE:-.venv/bin/python}; DATA=data/gpu_cs_smoke; rm -rf $DATA
  SYNTH_N="--train 64 --val 16 --test 16"; SYNTH_WORKERS=2
  TRAINER="--trainer.accelerator cpu --trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1
    --trainer.limit_test_batches 1 --data.batch_size 4 --data.num_workers 1"
else
  PY=python3; DATA=data/synthetic_gpu; SYNTH_N="--train 2000 --val 300 --test 300"; SYNTH_WORKERS=14
  TRAINER="--trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.enable_progress_bar false
    --data.num_workers ${WORKERS:-2}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $WORK/logs/session.log
say "synth"
[ -f $DATA/test.jsonl ] || timeout 240 $PY -m idrecog.cli synth --out $DATA $SYNTH_N --seed 0 \
  --workers $SYNTH_WORKERS --no-progress >$WORK/logs/synth.log 2>&1
say "synth done; runs: overlays [$OVERLAYS] x seeds [$SEEDS]"

for O in $OVERLAYS; do
  for S in $SEEDS; do
    NAME=$( [ "$O" = none ] && echo default || basename "$O" .yaml )_s$S
    RUN=$WORK/$NAME
    mkdir -p $RUN
    sed "s#runs/unified#$RUN#g" lightning_configs/unified.yaml >$RUN/config.yaml
    CFG="--config $RUN/config.yaml"
    [ "$O" = none ] || CFG="$CFG --config lightning_configs/$O"
    (
      F0=$(date +%s)
      # shellcheck disable=SC2086
      timeout ${FIT_TIMEOUT:-420} $PY -m idrecog.cli fit $CFG --seed_everything $S --data.root $DATA $TRAINER
      echo "fit rc=$? fit wall $(($(date +%s) - F0))"
      # shellcheck disable=SC2086
      timeout ${TEST_TIMEOUT:-120} $PY -m idrecog.cli test $CFG --data.root $DATA $TRAINER --ckpt_path $RUN/checkpoints/best.ckpt
      echo "test rc=$?"
    ) >$WORK/logs/$NAME.log 2>&1 &
  done
done
wait
say "done"
{
  echo "# config seeds on $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader), $(date -u +%FT%TZ)"
  cat $WORK/logs/session.log
  echo
  $PY -m benchmarks.config_seeds_table $WORK
  for f in $WORK/logs/*.log; do echo "## tail $f"; tail -4 "$f"; done
} >"$OUT_DIR/summary.md" 2>&1
tar czf "$OUT_DIR/results.tgz" --exclude='*.ckpt' -C runs gpu_cs
