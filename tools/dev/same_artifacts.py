"""Checks that a refactor changed no behaviour: trains the same tiny runs with the trainer of a git
revision and with the working tree's, and compares the model files byte for byte and the logged scores
(pre-quant and every final evaluation) digit for digit.

    python3 -m tools.dev.same_artifacts REV               # dense, soft and topk, one seed each
    python3 -m tools.dev.same_artifacts REV --modes none,soft --steps 12
    python3 -m tools.dev.same_artifacts REV --env QUANT_METHOD=rtn LQER_ENABLED=0   # the weights, not GPTQ
    python3 -m tools.dev.same_artifacts REV --env EVAL_STRIDE=64 TTT_ENABLED=1      # sliding, TTT scores too

Each run is a short fixed-step CPU run on the shipped sample (no wall clock, so machine load cannot
change it). The model file holds the weights and the stored model knobs, not the script, so a pure
refactor leaves it identical; its sha256 is printed per mode. Exit 1 when any pair differs.
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.common import REPO

SAMPLE = REPO / "data" / "sample"
TINY_RUN = {
    "DATA_PATH": str(SAMPLE),
    "TOKENIZER_PATH": str(SAMPLE / "tokenizer.model"),
    "VOCAB_SIZE": "1024",
    "NUM_LAYERS": "4",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "128",
    "TRAIN_BATCH_TOKENS": "2048",
    "MICRO_BATCH_TOKENS": "1024",
    "MAX_WALLCLOCK_SECONDS": "0",
    "WARMUP_STEPS": "0",
    "VAL_TOKEN_LIMIT": "4096",
    "EVAL_STRIDE": "0",
    "COMPILE": "0",
    "PARALLEL_START_LAYER": "3",
    "NUM_LOOPS": "1",
    "LOOP_START": "1",
    "LOOP_END": "2",
    "XSA_LAST_N": "4",
}
MODE_KNOBS = {"none": {}, "soft": {"NUM_EXPERTS": "4"}, "topk": {"NUM_EXPERTS": "4", "TOP_K": "1"}}


SCORE_LINE = re.compile(r"^(pre_quant_ema|final_\S+) val_loss:(\S+) val_bpb:(\S+)", re.M)


def train(script: Path, mode: str, steps: int, seed: int, log_dir: Path, extra: dict) -> tuple[str, list]:
    """Runs `script` once; -> sha256 of the model file it wrote, and its score lines' (name, loss, bpb)."""
    run_id = f"same_{mode}"
    env = {**os.environ, **TINY_RUN, **MODE_KNOBS[mode], "MOE_MODE": mode, "ITERATIONS": str(steps), **extra}
    env.update(SEED=str(seed), RUN_ID=run_id, LOG_DIR=str(log_dir))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-5:])
        raise SystemExit(f"error: {script} failed for MOE_MODE={mode} (exit {result.returncode}):\n{tail}")
    digest = hashlib.sha256((log_dir / f"{run_id}_model.ptz").read_bytes()).hexdigest()
    return digest, SCORE_LINE.findall((log_dir / f"{run_id}.txt").read_text())


def verdict(same: bool) -> str:
    return "identical" if same else "DIFFERENT"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rev", help="the git revision to compare against (e.g. HEAD~3)")
    parser.add_argument("--modes", default="none,soft,topk")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra knobs for both runs")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.env):
        parser.error("--env: expected KEY=VALUE items")
    extra = dict(item.split("=", 1) for item in args.env)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODE_KNOBS]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODE_KNOBS)}")
    with tempfile.TemporaryDirectory() as tmp:
        old_script = Path(tmp) / "train_gpt_old.py"
        shown = subprocess.run(["git", "show", f"{args.rev}:train_gpt.py"], cwd=REPO, capture_output=True)
        if shown.returncode != 0:
            parser.error(f"REV {args.rev}: {shown.stderr.decode().strip()}")
        old_script.write_bytes(shown.stdout)
        differ = 0
        for mode in modes:
            hashes, scores = [], []
            for name, script in (("old", old_script), ("new", REPO / "train_gpt.py")):
                log_dir = Path(tmp) / name
                log_dir.mkdir(exist_ok=True)
                digest, lines = train(script, mode, args.steps, args.seed, log_dir, extra)
                hashes.append(digest)
                scores.append(lines)
            same_model, same_scores = hashes[0] == hashes[1], scores[0] == scores[1]
            differ += not (same_model and same_scores)
            print(
                f"MOE_MODE={mode}: model {verdict(same_model)} {hashes[0][:16]} {hashes[1][:16]}; "
                f"{len(scores[1])} score lines {verdict(same_scores)}"
            )
            for old, new in zip(scores[0], scores[1]):
                if old != new:
                    print(f"  old {' '.join(old)}\n  new {' '.join(new)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
