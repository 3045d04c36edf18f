# Sourced by the GPU scripts (gpu_check.sh, gpu_session.sh, gpu_task_resolution.sh, gpu_config_seeds.sh) from the
# repository root of a checkout set up with `make install`: its .venv goes first on PATH (python3 and idrecog are
# the project's), the repository on PYTHONPATH. Synthetic documents use the system's DejaVu fonts, else the copy
# bundled with matplotlib (idrecog.synth.fonts), which renders other glyph pixels.
if [ -x .venv/bin/python3 ]; then
  export PATH=$PWD/.venv/bin:$PATH
else
  echo "benchmarks/gpu_env.sh: no .venv here; run \`make install\` first (or install idrecog into this python3)" >&2
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
