# Sourced by the GPU scripts (gpu_check.sh, gpu_session.sh, gpu_task_resolution.sh, gpu_config_seeds.sh) from the
# repository root: packages the lent GPU machine lacks travel as wheels in .whl/ (installed to /tmp/site), the
# repository goes on PYTHONPATH, DejaVu fonts (for `idrecog synth`) come from .gpufonts/ when the system has none.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if [ -d .gpufonts ] && [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  mkdir -p /usr/share/fonts/truetype/dejavu && cp .gpufonts/*.ttf /usr/share/fonts/truetype/dejavu/
fi
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
