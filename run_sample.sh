#!/usr/bin/env bash
# Install the requirements, then train, quantize, compress and evaluate a small model on the sample
# corpus shipped in data/sample (CPU is fine: about 5 minutes on 2 cores). Extra KEY=VALUE
# arguments override data/sample.env, e.g.  bash run_sample.sh SEED=7 MOE_MODE=topk
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
exec env $(grep -v '^#' data/sample.env) "$@" python3 train_gpt.py
