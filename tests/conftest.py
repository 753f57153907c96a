"""Shared helpers for the CPU test suite: paths, a tiny model configuration, a subprocess runner."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
TOKENIZER = SAMPLE / "tokenizer.model"
# Tiny tensors: one thread is fastest, and spares a busy two-core machine from thread contention.
torch.set_num_threads(1)

# A model small enough to train for a few dozen steps on two CPU cores in seconds.
TINY_ENV = {
    "DATA_PATH": str(SAMPLE),
    "TOKENIZER_PATH": str(TOKENIZER),
    "VOCAB_SIZE": "1024",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "128",
    "TRAIN_BATCH_TOKENS": "2048",
    "MICRO_BATCH_TOKENS": "1024",
    "ITERATIONS": "20",
    "MAX_WALLCLOCK_SECONDS": "0",
    "WARMUP_STEPS": "0",
    "TRAIN_LOG_EVERY": "5",
    "VAL_TOKEN_LIMIT": "8192",
    "EVAL_STRIDE": "64",
    "EVAL_BATCH_SEQS": "16",
    "BIGRAM_VOCAB_SIZE": "256",
    "BIGRAM_DIM": "16",
    "COMPILE": "0",
    "ZSTD_LEVEL": "3",
    # Structural stack mechanisms off, so other areas' tests keep a plain 2-layer model;
    # STACK_ENV below turns every mechanism of the record stack on.
    "NUM_LOOPS": "0",
    "PARALLEL_START_LAYER": "0",
}
# TINY_ENV with every mechanism of the record stack on (4 layers: layers 1-2 looped twice more,
# parallel lanes in layer 3, XSA everywhere, partial RoPE, BigramHash and SmearGate).
STACK_ENV = {
    **TINY_ENV,
    "NUM_LAYERS": "4",
    "XSA_LAST_N": "4",
    "LN_SCALE": "1",
    "QK_GAIN_INIT": "5",
    "PARALLEL_START_LAYER": "3",
    "NUM_LOOPS": "2",
    "LOOP_START": "1",
    "LOOP_END": "2",
    "ENABLE_LOOPING_AT": "0.35",
    "SPARSE_ATTN_GATE_ENABLED": "1",
    "GATE_WINDOW": "12",
    "ROPE_DIMS": "8",
    "MLP_ACT": "leaky_relu2",
    "SMEAR_GATE": "1",
    "MIN_LR": "0.1",
    "MUON_ROW_NORMALIZE": "1",
}


def run_train(tmp_path: Path, nproc: int = 1, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """Runs train_gpt.py (through torchrun when nproc > 1) in tmp_path with TINY_ENV plus `env`."""
    full = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    full.update(TINY_ENV, RUN_ID="test", LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    if nproc > 1:  # several ranks on the CPU (gloo) must be asked for: train_gpt refuses them otherwise
        full["ALLOW_CPU_DISTRIBUTED"] = "1"
    full.update({k: str(v) for k, v in env.items()})
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = str(REPO / "train_gpt.py")
    cmd = (
        [sys.executable, script]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
        ]
    )
    return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_config():
    """tiny_config(MOE_MODE="topk", ...) -> a validated tiny configuration; os.environ is not read."""
    import train_gpt

    return lambda **env: train_gpt.load_config({**TINY_ENV, **{k: str(v) for k, v in env.items()}})


def run_compiled(tmp_path: Path, env: dict) -> tuple[subprocess.CompletedProcess, list[str]]:
    """One whole run of train_gpt.py with torch.compile's backend swapped for aot_eager (the same dynamo
    guards and graphs, no inductor) and dynamo logging every recompile -> (result, recompiled functions)."""
    wrapper = (
        "import functools, runpy, sys, torch; "
        "torch.compile = functools.partial(torch.compile, backend='aot_eager'); "
        f"sys.argv = [{str(REPO / 'train_gpt.py')!r}]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    full = {**os.environ, **env, "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    full.update(COMPILE="1", TORCH_LOGS="recompiles", VAL_TOKEN_LIMIT="4096")
    result = subprocess.run(
        [sys.executable, "-c", wrapper], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=900
    )
    return result, re.findall(r"Recompiling function (\w+)", result.stderr)
