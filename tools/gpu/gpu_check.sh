#!/bin/sh
# The one prepared command for a lent GPU machine (docs/gpu_runs.md), run from the repository root:
#     sh tools/gpu/gpu_check.sh [gpu_check.py options]
# with the git-ignored data/datasets/proxy_sp1024 (the proxy corpus) and .wheels (zstandard) beside it.
# First one line naming whatever of them is missing (without the wheel and without zstandard nothing can
# run: it stops there; without the corpus only the score step is skipped), then the wheel installed, the
# corpus unpacked to /tmp/proxy, and tools/gpu/gpu_check.py inside its budget; results go to $OUT.
set -eu
out=${OUT:-/tmp/gpu_check_out}
missing=""
ls .wheels/*.whl >/dev/null 2>&1 || missing="$missing .wheels/*.whl"
[ -f data/datasets/proxy_sp1024/prepare.sh ] || missing="$missing data/datasets/proxy_sp1024/prepare.sh"
if [ -n "$missing" ]; then
  echo "missing carried files:$missing"
else
  echo "carried files: all present"
fi
if ls .wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif ! python3 -c "import zstandard" 2>/dev/null; then
  echo "error: no .wheels/*.whl and no zstandard installed: train_gpt.py cannot import" >&2
  exit 2
fi
if [ -f data/datasets/proxy_sp1024/prepare.sh ]; then
  sh data/datasets/proxy_sp1024/prepare.sh /tmp/proxy
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m tools.gpu.gpu_check --out "$out" --data-path /tmp/proxy "$@"
