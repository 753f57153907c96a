#!/usr/bin/env bash
# Install the requirements (when they are not met), then train, quantize, compress and evaluate a small
# model on the sample corpus shipped in data/sample (CPU is fine; README.md gives the time it takes).
# Extra KEY=VALUE arguments override data/sample.env, e.g.  bash run_sample.sh SEED=7 MOE_MODE=topk
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: bash run_sample.sh [KEY=VALUE ...]
Trains, quantizes and evaluates a small model on data/sample with the knobs in data/sample.env;
each KEY=VALUE overrides one knob (README.md lists them), e.g.  bash run_sample.sh SEED=7 MOE_MODE=topk
Installs requirements.txt first when an installed version does not meet it."
for arg in "$@"; do
    case "$arg" in
        -h | --help)
            echo "$usage"
            exit 0
            ;;
        [A-Za-z_]*=*) ;;
        *)
            echo "error: '$arg' is not a KEY=VALUE knob setting (bash run_sample.sh --help)" >&2
            exit 2
            ;;
    esac
done
# A quick check (installed versions against requirements.txt) spares the pip run when nothing is missing.
if ! python3 - requirements.txt 2>/dev/null <<'EOF'; then
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

for line in open(sys.argv[1]):
    if line.split("#")[0].strip():
        req = Requirement(line)
        try:
            ok = req.specifier.contains(version(req.name), prereleases=True)
        except PackageNotFoundError:
            ok = False
        if not ok:
            sys.exit(1)
EOF
    echo "installing requirements.txt with pip (a few minutes the first time) ..."
    python3 -m pip install -q -r requirements.txt
    echo "requirements installed"
fi
exec env $(grep -v '^#' data/sample.env) "$@" python3 train_gpt.py
