#!/usr/bin/env bash
# The anti-fraud evidence of the benchmark v2 at 320 x 512 on one GPU, runs side by side, then `idrecog test`:
#
#   bash benchmarks/gpu_antifraud.sh [OUT_DIR]     # on a GPU machine with idrecog installed, from the repository root
#   SMOKE=1 bash benchmarks/gpu_antifraud.sh       # the same on a CPU with tiny settings, before GPU time
#
# Runs (each fit bounded by FIT_MINUTES of training, default 5):
#   control_s0       the tampering positive control: a full-resolution CNN alone (benchmarks.tampering_control)
#   mm_detail_s0/s1  the unified model: multimodal queries (frames, user info) + the detail branch, seeds 0 and 1
#   learned_detail_s0  learned queries + the detail branch: no frames, no user info (the hologram must fail)
#   mm_nobeh_s0      multimodal queries without the behaviour (user_parts [attributes]): what behaviour brings
# OUT_DIR/summary.md: one row per unified run (test metrics) and the control's table; OUT_DIR/results.tgz: logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_af_out}}
WORK=runs/gpu_af
rm -rf $WORK && mkdir -p "$OUT_DIR" $WORK/logs
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a $WORK/logs/session.log; }
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

MINUTES=${FIT_MINUTES:-5}
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY_SMOKE:-.venv/bin/python}; DATA=data/gpu_af_smoke; rm -rf $DATA
  SYNTH="--train 48 --val 16 --test 16 --height 64 --width 96 --workers 2"; SIZE="[64, 96]"; MINUTES=1
  TRAINER="--trainer.accelerator cpu --trainer.precision 32-true --trainer.max_epochs 1 --trainer.limit_train_batches 2
    --trainer.limit_val_batches 1 --trainer.limit_test_batches 1 --data.batch_size 4 --data.num_workers 1
    --data.synth.height 64 --data.synth.width 96"
  CONTROL="--img-size 64 96 --seconds 10 --evals 1 --batch-size 8 --num-workers 0"
else
  PY=python3; DATA=data/synthetic_hires_af
  SYNTH="--train ${TRAIN:-6000} --val 600 --test 600 --height 320 --width 512 --workers ${SYNTH_WORKERS:-14}"
  SIZE="[320, 512]"
  TRAINER="--trainer.enable_progress_bar false --data.num_workers ${WORKERS:-2}"
  CONTROL="--img-size 320 512 --seconds $((MINUTES * 60)) --evals 5 --batch-size 64 --num-workers 2 --threads 4 --device cuda"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $WORK/logs/session.log
say "synth"
[ -f $DATA/test.jsonl ] || timeout 300 $PY -m idrecog.cli synth --out $DATA $SYNTH --seed 0 --no-progress \
  >$WORK/logs/synth.log 2>&1
say "synth done"

(timeout $((MINUTES * 60 + 240)) $PY -m benchmarks.tampering_control --root $DATA --models cnn $CONTROL \
  --out $WORK/control.json) >$WORK/logs/control.log 2>&1 &

run() {  # NAME SEED QUERY_OVERLAY [EXTRA ARGS...]
  local NAME=$1 S=$2 Q=$3; shift 3
  local RUN=$WORK/$NAME
  mkdir -p $RUN
  sed "s#runs/unified#$RUN#g" lightning_configs/unified.yaml >$RUN/config.yaml
  sed "s#runs/unified_hires#$RUN#g" lightning_configs/antifraud/hires.yaml >$RUN/hires.yaml
  local CFG="--config $RUN/config.yaml"
  [ "$Q" = learned ] || CFG="$CFG --config lightning_configs/queries/$Q.yaml"
  CFG="$CFG --config lightning_configs/antifraud/detail.yaml --config $RUN/hires.yaml"
  (
    F0=$(date +%s)
    # shellcheck disable=SC2086
    timeout $((MINUTES * 60 + 300)) $PY -m idrecog.cli fit $CFG --seed_everything $S --data.root $DATA \
      --data.img_size "$SIZE" --model.init_args.encoder.init_args.img_size "$SIZE" \
      --trainer.max_time "00:00:$(printf %02d $MINUTES):00" $TRAINER "$@"
    echo "fit rc=$? fit wall $(($(date +%s) - F0))"
    # shellcheck disable=SC2086
    timeout 180 $PY -m idrecog.cli test $CFG --data.root $DATA --data.img_size "$SIZE" \
      --model.init_args.encoder.init_args.img_size "$SIZE" $TRAINER "$@" --ckpt_path $RUN/checkpoints/best.ckpt
    echo "test rc=$?"
  ) >$WORK/logs/${NAME}.log 2>&1 &
}
run mm_detail_s0 0 multimodal
run mm_detail_s1 1 multimodal
run learned_detail_s0 0 learned
run mm_nobeh_s0 0 multimodal "--model.init_args.queries.init_args.user_parts=[attributes]"
wait
say "done"
{
  echo "# anti-fraud at $SIZE on $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader), $(date -u +%FT%TZ)"
  cat $WORK/logs/session.log
  echo
  $PY -m benchmarks.config_seeds_table $WORK
  echo
  echo "## tampering positive control"
  grep -A4 "^| model" $WORK/logs/control.log
  for f in $WORK/logs/*.log; do echo "## tail $f"; tail -4 "$f"; done
} >"$OUT_DIR/summary.md" 2>&1
tar czf "$OUT_DIR/results.tgz" --exclude='*.ckpt' -C runs gpu_af
