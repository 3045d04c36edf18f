# Sourced by the GPU scripts (gpu_check.sh, gpu_session.sh) from the repository root: packages the lent GPU
# machine lacks travel as wheels in .whl/ (installed to /tmp/site), the repository goes on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
