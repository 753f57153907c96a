#!/bin/sh
# The one prepared command for a lent GPU machine (docs/gpu_runs.md), run from the repository root:
#     sh tools/gpu_check.sh [gpu_check.py options]
# with carry: ["data/datasets/proxy_sp1024", ".wheels"] (copied from ../shared, both git-ignored).
# Installs the carried wheels (zstandard: train_gpt.py imports it), unpacks the proxy corpus to /tmp/proxy,
# then runs tools/gpu_check.py inside its time budget; results go to $OUT (gpu_check.json, gpu_check.md).
set -eu
out=${OUT:-/tmp/gpu_check_out}
if ls .wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f data/datasets/proxy_sp1024/prepare.sh ]; then
  sh data/datasets/proxy_sp1024/prepare.sh /tmp/proxy
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 tools/gpu_check.py --out "$out" --data-path /tmp/proxy "$@"
