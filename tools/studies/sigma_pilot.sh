#!/bin/sh
# The sigma-MoE pilot's one command for a lent GPU machine (docs/gpu_runs.md, call 2 of the queue), from the
# repository root:  sh tools/studies/sigma_pilot.sh
# with carry: ["data/datasets/proxy_sp1024", ".wheels"] (copied from ../shared, both git-ignored).
# Installs the carried wheels (zstandard: train_gpt.py imports it), unpacks the proxy corpus to /tmp/proxy,
# then runs tools/studies/sigma_pilot.py inside its budget; results go to $OUT (sigma_pilot.json and .md).
set -eu
out=${OUT:-/tmp/sigma_pilot_out}
if ls .wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f data/datasets/proxy_sp1024/prepare.sh ]; then
  sh data/datasets/proxy_sp1024/prepare.sh /tmp/proxy
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m tools.studies.sigma_pilot --out "$out" --data-path /tmp/proxy "$@"
