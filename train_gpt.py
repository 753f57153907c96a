"""Parameter Golf trainer: a dense or Mixture-of-Experts GPT packed into a 16,000,000-byte artifact.

    torchrun --standalone --nproc_per_node=8 train_gpt.py      # knobs are environment variables

Sections follow the data flow: the knobs, the runtime every later part uses, data, model, MoE, network,
optimizer, quantization, evaluation, the preflight projections, the training loop, main(). Each
definition comes before its first user, but for two knob checks that read a rule where it lives (the
shards' vocabulary limit, the compressors). Importing this file does no work, so tools and tests reuse it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import difflib
import errno
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import lzma
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field, fields, make_dataclass, replace
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

# ---- 1. Hyperparameters: every knob is an environment variable, declared once as a row below --------
# A row holds what the trainer checks (type, range, choices), what it stores (model knobs go into the
# artifact), what it means (docs/knobs.md is generated from the rows by tools/dev/knob_docs.py) and which
# group of the run's Config holds it. load_config reads the environment once, derives the implied values and
# freezes them in groups, so each function receives the groups it reads and no knob changes mid-run.


@dataclass(frozen=True)
class Knob:
    """One environment variable. `low`/`high`: the inclusive range of a numeric knob, checked before
    anything else (None: unchecked); 0 is the "unset, derived from other knobs" value where the meaning
    says so. `model`: it shapes the network, so the artifact stores it and a reload rebuilds from it.
    `moe_only`: it means something only with a Mixture of Experts; set with MOE_MODE=none, it is an error.
    `group`: data, optim, quant, evaluation, run or model (see Config)."""

    name: str
    kind: type
    default: object
    meaning: str
    group: str  # the frozen config group that holds it (CONFIG_GROUPS): what reads it receives that group
    low: float | None = None
    high: float = math.inf
    choices: tuple[str, ...] = ()
    model: bool = False
    moe_only: bool = False


# The sections are docs/knobs.md's; the model knobs' order is the order the artifact stores them in.
KNOB_SECTIONS: dict[str, tuple[Knob, ...]] = {
    "data and run": (
        Knob(
            "DATA_PATH",
            str,
            "./data/datasets/fineweb10B_sp8192",
            "folder with `fineweb_train_*.bin` and `fineweb_val_*.bin` shards",
            group="data",
        ),
        Knob(
            "TOKENIZER_PATH",
            str,
            "./data/tokenizers/fineweb_8192_bpe.model",
            "SentencePiece model; its vocabulary must have `VOCAB_SIZE` pieces",
            group="data",
        ),
        Knob("VOCAB_SIZE", int, 8192, "vocabulary size", low=2, model=True, group="data"),
        Knob(
            "RUN_ID",
            str,
            "",
            "empty = `run_<date>_<time>`; names the logs and the artifact (a plain file name of at most 200 "
            "bytes: no `/`, `\\`, spaces or leading `.`); an existing log is never overwritten",
            group="run",
        ),
        Knob(
            "SEED",
            int,
            1337,
            "initialisation and router-noise seed (the data order is fixed)",
            low=0,
            group="run",
        ),
        Knob("LOG_DIR", str, "logs", "where logs and artifacts go", group="run"),
        Knob(
            "ARTIFACT_PATH",
            str,
            "",
            "empty = `LOG_DIR/RUN_ID_model.ptz`; where the compressed model is written (an existing file is "
            "refused before training); with `EVAL_ONLY=1`: read",
            group="run",
        ),
        Knob(
            "TRAIN_LOG_EVERY", int, 100, "steps between step lines and routing telemetry", low=1, group="run"
        ),
        Knob(
            "VAL_LOSS_EVERY",
            int,
            0,
            "steps between validations during training (clock paused); 0 = only at the end",
            low=0,
            group="run",
        ),
        Knob(
            "VAL_TOKEN_LIMIT",
            int,
            0,
            "evaluate only the first N validation tokens (quick checks; flagged as not a score); 0 = all",
            low=0,
            group="data",
        ),
        Knob(
            "COMPILE",
            str,
            "auto",
            "`torch.compile(fullgraph=True)`: `auto` = on CUDA only, `1` on, `0` off. `0` on a GPU saves "
            "every eager intermediate: the run logs `eager_memory: ~N GiB` (a fake-tensor trace) and warns, "
            "naming `MICRO_BATCH_TOKENS`, when that exceeds the GPU (the default 98,304 tokens need ~83 GiB "
            "eager, ~55 GiB compiled)",
            choices=("auto", "0", "1"),
            group="run",
        ),
        Knob(
            "ALLOW_CPU_DISTRIBUTED",
            bool,
            False,
            "`1`: let a multi-rank launch (`WORLD_SIZE` > 1) train on the CPU over gloo when CUDA is not "
            "usable; otherwise such a launch stops with an error",
            group="run",
        ),
        Knob(
            "DRY_RUN",
            bool,
            False,
            "`1`: build the model on the meta device, print the config, `params total`, the budget preview "
            "and the projected FLOPs per token, ms/step and tokens/s on 8xH100 (at 30% MFU, what the "
            "record's step times imply), then exit 0; needs no data, tokenizer or GPU and writes nothing",
            group="run",
        ),
    ),
    "run length and schedules": (
        Knob("ITERATIONS", int, 20000, "maximum optimizer steps", low=1, group="optim"),
        Knob(
            "MAX_WALLCLOCK_SECONDS",
            float,
            600.0,
            "training time cap, agreed across ranks (compile warm-up and validation excluded); 0 = none",
            low=0,
            group="optim",
        ),
        Knob(
            "TRAIN_BATCH_TOKENS", int, 786432, "tokens per optimizer step, over all GPUs", low=1, group="data"
        ),
        Knob(
            "MICRO_BATCH_TOKENS",
            int,
            0,
            "0 = `TRAIN_BATCH_TOKENS / 8`; tokens per GPU per forward/backward",
            low=0,
            group="data",
        ),
        Knob("TRAIN_SEQ_LEN", int, 2048, "training sequence length", low=1, group="data"),
        Knob(
            "WARMUP_STEPS",
            int,
            20,
            "compile warm-up steps, run before the clock starts and then undone (weights, optimizer state, "
            "data position); with a loop switch ahead, as many again with the loops on, so the switch "
            "compiles nothing in the timed run",
            low=0,
            group="optim",
        ),
        Knob(
            "WARMDOWN_FRAC",
            float,
            0.85,
            "linear learning-rate decay to `MIN_LR` over the last fraction of the run",
            low=0,
            high=1,
            group="optim",
        ),
        Knob(
            "MIN_LR",
            float,
            0.1,
            "floor of the warm-down, as a fraction of each peak learning rate",
            low=0,
            high=1,
            group="optim",
        ),
    ),
    "model": (
        Knob(
            "NUM_LAYERS",
            int,
            11,
            "transformer blocks (the first half of the layer order feeds U-Net skips to the second half)",
            low=1,
            model=True,
            group="model",
        ),
        Knob("MODEL_DIM", int, 512, "width", low=1, model=True, group="model"),
        Knob("NUM_HEADS", int, 8, "query heads (head dim = width / heads)", low=1, model=True, group="model"),
        Knob(
            "NUM_KV_HEADS",
            int,
            4,
            "key/value heads (grouped-query attention)",
            low=1,
            model=True,
            group="model",
        ),
        Knob("MLP_MULT", float, 4.0, "MLP hidden = `MLP_MULT` x width", low=0.25, model=True, group="model"),
        Knob(
            "MLP_ACT",
            str,
            "leaky_relu2",
            "`relu2` (relu squared) or `leaky_relu2` (leaky relu, slope 0.5, squared)",
            choices=("relu2", "leaky_relu2"),
            model=True,
            group="model",
        ),
        Knob(
            "ROPE_DIMS",
            int,
            16,
            "channels of each head that RoPE rotates (0, or more than the head dim = all)",
            low=0,
            model=True,
            group="model",
        ),
        Knob("ROPE_BASE", float, 10000.0, "RoPE base", low=1, model=True, group="model"),
        Knob(
            "QK_GAIN_INIT",
            float,
            5.0,
            "initial per-head query gain after QK RMS-norm (learned)",
            low=0,
            model=True,
            group="model",
        ),
        Knob(
            "LOGIT_SOFTCAP",
            float,
            30.0,
            "logits = cap x tanh(logits / cap)",
            low=1,
            model=True,
            group="model",
        ),
        Knob(
            "TIE_EMBEDDINGS", bool, True, "output head shares the token embedding", model=True, group="model"
        ),
        Knob("TIED_EMBED_INIT_STD", float, 0.005, "embedding init std", low=0, group="model"),
        Knob(
            "BIGRAM_VOCAB_SIZE",
            int,
            0,
            "BigramHash table rows (the challenge scripts' name), indexed by a hash of (previous token, "
            "token); 0 = off; a BOS position gets a reserved row, never the previous document's token",
            low=0,
            model=True,
            group="model",
        ),
        Knob(
            "BIGRAM_DIM",
            int,
            128,
            "BigramHash vector size, projected to the width",
            low=1,
            model=True,
            group="model",
        ),
        Knob(
            "SMEAR_GATE",
            bool,
            True,
            "adds to each raw embedding the previous position's, times a learned amount (zero at start) and "
            "a gate read from its first `GATE_WINDOW` channels, before the embedding's norm (never across a "
            "BOS)",
            model=True,
            group="model",
        ),
        Knob(
            "SKIP_GATES_ENABLED",
            bool,
            True,
            "each U-Net skip joins the decoder stream through a learned per-channel gate, `lerp(skip, "
            "stream, sigmoid(gate))` (an even mix at start); 0 = the skip is added",
            model=True,
            group="model",
        ),
    ),
    "mixture of experts": (
        Knob(
            "MOE_MODE",
            str,
            "none",
            "`none` (dense MLP), `soft`, `topk`, `shared_routed`; the knobs below need one of the MoE modes "
            "(set with `none`, they are an error)",
            choices=("none", "soft", "topk", "shared_routed"),
            model=True,
            group="model",
        ),
        Knob(
            "NUM_EXPERTS",
            int,
            4,
            "experts per MoE layer (at least 2 when MOE_MODE is on)",
            low=1,
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "TOP_K",
            int,
            1,
            "experts per token (`topk`, `shared_routed`)",
            low=1,
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "MOE_LAYERS",
            list,
            [],
            "comma-separated layer indices that get MoE, e.g. `5,6,7,8,9`; empty = every layer",
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "EXPERT_HIDDEN",
            int,
            0,
            "0 = parameter-matched; hidden size of one expert",
            low=0,
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "SHARED_HIDDEN",
            int,
            0,
            "0 = dense hidden / 2; hidden size of the shared MLP (`shared_routed`)",
            low=0,
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "ROUTER_SCORE",
            str,
            "softmax",
            "`softmax` or `sigmoid` router scores (routed modes)",
            choices=("softmax", "sigmoid"),
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "ROUTER_LR",
            float,
            0.01,
            "Adam learning rate of the routers (no weight decay)",
            low=0,
            moe_only=True,
            group="optim",
        ),
        Knob(
            "MOE_AUX_LOSS_COEF",
            float,
            0.01,
            "Switch load-balance loss weight (routed modes)",
            low=0,
            moe_only=True,
            group="model",
        ),
        Knob(
            "ROUTER_Z_COEF",
            float,
            0.001,
            "router z-loss weight, mean logsumexp(logits)²",
            low=0,
            moe_only=True,
            group="model",
        ),
        Knob(
            "ROUTER_BIAS_RATE",
            float,
            0.001,
            "auxiliary-loss-free balancing bias step per optimizer step; 0 = off",
            low=0,
            moe_only=True,
            group="optim",
        ),
        Knob(
            "ROUTER_NOISE",
            float,
            0.0,
            "std of Gaussian noise added to router logits in training",
            low=0,
            moe_only=True,
            group="model",
        ),
        Knob(
            "ROUTER_ENTROPY_COEF",
            float,
            0.0,
            "routed modes: weight of the entropy of the batch-mean softmax of the router logits, per MoE "
            "layer (and pass), maximised in training (sigma-MoE); 0 = off",
            low=0,
            moe_only=True,
            group="model",
        ),
        Knob(
            "EXPERT_DROPOUT",
            float,
            0.0,
            "routed modes: probability that a whole expert is left out of one training forward's selection "
            "(drawn per layer and pass, per micro-batch and rank; the `TOP_K` highest draws always stay); no "
            "effect in evaluation; 0 = off",
            low=0,
            high=0.9,
            moe_only=True,
            group="model",
        ),
        Knob(
            "MOE_DISPATCH",
            str,
            "grouped",
            "`grouped` (sort + grouped_mm; `MODEL_DIM` and the expert width must be multiples of 8) or "
            "`capacity` (fixed buffers, overflow dropped). grouped_mm is fast only on compute capability "
            "9.x/10.x (H100, H200, B200): on another GPU the default switches to `capacity` with a log line, "
            "and `MOE_DISPATCH=grouped` given by name stops before training",
            choices=("grouped", "capacity"),
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "CAPACITY_FACTOR",
            float,
            1.25,
            "capacity per expert = factor x tokens x k / E (`capacity` dispatch)",
            low=0.1,
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "ROUTER_PER_PASS",
            bool,
            False,
            "`1`: each MoE layer inside the loop gets one router per pass (1 + `NUM_LOOPS`), experts shared; "
            "needs the loop and a looped MoE layer; costs `NUM_LOOPS x NUM_EXPERTS x MODEL_DIM` fp16 "
            "parameters per such layer",
            model=True,
            moe_only=True,
            group="model",
        ),
        Knob(
            "EXPERT_BITS",
            int,
            0,
            "0 = `MATRIX_BITS`; bits of the MoE expert stacks; counted by the budget preview and lowered by "
            "the fit ladder's MLP step",
            low=0,
            high=8,
            moe_only=True,
            group="quant",
        ),
    ),
    "the record stack: attention variants, parallel lanes, depth recurrence": (
        Knob(
            "XSA_LAST_N",
            int,
            11,
            "exclusive self-attention in the last N layers: each head's output loses its component along the "
            "token's own value vector (more than `NUM_LAYERS` = every layer; the config line shows the "
            "effective value)",
            low=0,
            model=True,
            group="model",
        ),
        Knob(
            "LN_SCALE",
            bool,
            True,
            "scale each block's normed attention and MLP inputs by 1/sqrt(layer + 1)",
            model=True,
            group="model",
        ),
        Knob(
            "PARALLEL_START_LAYER",
            int,
            8,
            "from this layer on, attention reads lane 0 and the MLP (dense or MoE) lane 1, both write both "
            "lanes with learned weights, the U-Net skip joins lane 0, and the final state is the mean of the "
            "lanes; 0 = off; a decoder layer after the loop, before NUM_LAYERS",
            low=0,
            model=True,
            group="model",
        ),
        Knob(
            "NUM_LOOPS",
            int,
            2,
            "depth recurrence: extra passes of layers `LOOP_START`..`LOOP_END` with the same weights (an MoE "
            "there is the same module on every pass); 0 = off",
            low=0,
            model=True,
            group="model",
        ),
        Knob("LOOP_START", int, 3, "first looped layer", low=0, model=True, group="model"),
        Knob("LOOP_END", int, 5, "last looped layer (inclusive)", low=0, model=True, group="model"),
        Knob(
            "ENABLE_LOOPING_AT",
            float,
            0.35,
            "fraction of the run after which the loops run (1 = never); the artifact keeps the state, so it "
            "is evaluated as trained",
            low=0,
            high=1,
            group="optim",
        ),
        Knob(
            "SPARSE_ATTN_GATE_ENABLED",
            bool,
            True,
            "per-head attention output gate sigmoid(`SPARSE_ATTN_GATE_SCALE` x w . x[:`GATE_WINDOW`]), "
            "zero-initialised (0.5)",
            model=True,
            group="model",
        ),
        Knob(
            "SPARSE_ATTN_GATE_SCALE",
            float,
            0.5,
            "scale of the gate's logit (the record's run)",
            low=0,
            model=True,
            group="model",
        ),
        Knob(
            "GATE_WINDOW",
            int,
            12,
            "leading channels of the block input the attention gate reads",
            low=1,
            model=True,
            group="model",
        ),
        Knob(
            "RESPECT_DOC_BOUNDARIES",
            bool,
            True,
            "document-isolated attention, as the 1.0611 record trains: a token attends only to its own "
            "document (a BOS starts one); training packs each micro-batch in one row and cuts a document "
            "longer than `TRAIN_SEQ_LEN` every `TRAIN_SEQ_LEN` tokens from its start; evaluation windows and "
            "global TTT stop at a BOS too (docs/scoring.md). flex_attention on GPUs, SDPA on CPUs; 0 = plain "
            "causal rows of `TRAIN_SEQ_LEN`",
            group="data",
        ),
    ),
    "optimizer": (
        Knob(
            "MATRIX_LR",
            float,
            0.026,
            "Muon learning rate for block matrices and experts",
            low=0,
            group="optim",
        ),
        Knob(
            "SCALAR_LR",
            float,
            0.02,
            "Adam learning rate for gains, scales, mixes and other control tensors",
            low=0,
            group="optim",
        ),
        Knob(
            "TIED_EMBED_LR",
            float,
            0.03,
            "Adam learning rate of the tied embedding and the BigramHash table",
            low=0,
            group="optim",
        ),
        Knob("EMBED_LR", float, 0.6, "Adam learning rate of the embedding when untied", low=0, group="optim"),
        Knob("HEAD_LR", float, 0.008, "Adam learning rate of the untied output head", low=0, group="optim"),
        Knob("MUON_MOMENTUM", float, 0.97, "Muon momentum after warm-up", low=0, high=0.99999, group="optim"),
        Knob(
            "MUON_MOMENTUM_WARMUP_START",
            float,
            0.92,
            "Muon momentum at the start",
            low=0,
            high=0.99999,
            group="optim",
        ),
        Knob(
            "MUON_MOMENTUM_WARMUP_FRAC",
            float,
            0.3,
            "fraction of the run over which momentum rises (the record's 1,500 of ~4,930 steps)",
            low=0,
            high=1,
            group="optim",
        ),
        Knob(
            "MUON_BACKEND_STEPS",
            int,
            5,
            "Newton-Schulz iterations, with the Polar-Express coefficients (one tuple per step; later steps "
            "repeat the last)",
            low=1,
            group="optim",
        ),
        Knob(
            "MUON_ROW_NORMALIZE",
            bool,
            True,
            "give every row of the momentum update unit norm before orthogonalising (MuonEq-R)",
            group="optim",
        ),
        Knob("MUON_WD", float, 0.095, "decoupled weight decay of Muon matrices", low=0, group="optim"),
        Knob("BETA1", float, 0.9, "Adam beta1", low=0, high=0.99999, group="optim"),
        Knob("BETA2", float, 0.99, "Adam beta2", low=0, high=0.99999, group="optim"),
        Knob("ADAM_EPS", float, 1e-08, "Adam epsilon", low=0, group="optim"),
        Knob(
            "ADAM_WD",
            float,
            0.02,
            "decoupled weight decay of the control tensors (gains, scales, mixes, gates, lane weights; not "
            "routers)",
            low=0,
            group="optim",
        ),
        Knob(
            "EMBED_WD",
            float,
            0.085,
            "decoupled weight decay of the embedding, the BigramHash table and the untied head",
            low=0,
            group="optim",
        ),
        Knob("GRAD_CLIP_NORM", float, 0.3, "global gradient-norm clip; 0 = off", low=0, group="optim"),
    ),
    "weight averaging": (
        Knob(
            "EMA_DECAY",
            float,
            None,
            "unset: an EMA whose horizon is 5.8% of the run (per-step decay exp(-step share / 0.058): the "
            "record's 0.9965 at its ~4,930 steps), so short runs average like long ones; a number: a fixed "
            "per-step decay as in the records (e.g. 0.9965), the same whatever the run length; 0 = off",
            low=0,
            high=0.99999,
            group="optim",
        ),
    ),
    "quantization and the artifact": (
        Knob(
            "QUANT_METHOD",
            str,
            "gptq",
            "`gptq` (Hessian-aware, calibrated on training batches) or `rtn` (round-to-nearest) on the same "
            "grid",
            choices=("gptq", "rtn"),
            group="quant",
        ),
        Knob(
            "GPTQ_RESERVE_SECONDS",
            float,
            None,
            "the training loop stops this much before `MAX_WALLCLOCK_SECONDS` to collect the Hessians (used "
            "when GPTQ or LQER is on); unset: measured before training (one micro-batch's Hessians timed, x "
            "`GPTQ_CALIBRATION_BATCHES`, x 1.25, + 1 s; the `gptq_reserve:` line)",
            low=0,
            group="quant",
        ),
        Knob(
            "GPTQ_CALIBRATION_BATCHES",
            int,
            16,
            "training micro-batches (of `MICRO_BATCH_TOKENS`, per rank) for the Hessians",
            low=1,
            group="quant",
        ),
        Knob(
            "MATRIX_BITS",
            int,
            6,
            "bits of attention, MLP and BigramHash matrices (and of experts, unless `EXPERT_BITS`)",
            low=2,
            high=8,
            group="quant",
        ),
        Knob("EMBED_BITS", int, 7, "bits of the embedding and untied head", low=2, high=8, group="quant"),
        Knob(
            "QAT_START_FRAC",
            float,
            1.0,
            "quantization-aware training from this fraction of the run on: forward and backward on the "
            "export grid's round-to-nearest weights, gradient applied to the float weights "
            "(straight-through); routers and fp16-kept tensors exempt; 1 = never (the default: `0.75` left "
            "dense 0.010 worse at 100 tokens per parameter on CPU, "
            "`records/track_non_record_16mb/2026-12-03_MoE_Regime_Study/`; unmeasured on a GPU)",
            low=0,
            high=1,
            group="optim",
        ),
        Knob(
            "MATRIX_CLIP_SIGMAS",
            float,
            12.85,
            "SDClip range, in row standard deviations, of matrices that are neither MLP nor attention "
            "(BigramHash)",
            low=0.01,
            group="quant",
        ),
        Knob(
            "MLP_CLIP_SIGMAS", float, 11.5, "SDClip range of MLP and expert matrices", low=0.01, group="quant"
        ),
        Knob("ATTN_CLIP_SIGMAS", float, 13.0, "SDClip range of attention matrices", low=0.01, group="quant"),
        Knob(
            "EMBED_CLIP_SIGMAS",
            float,
            14.0,
            "SDClip range of the embedding and untied head",
            low=0.01,
            group="quant",
        ),
        Knob(
            "LQER_ENABLED",
            bool,
            True,
            "low-rank correction of the largest quantization errors",
            group="quant",
        ),
        Knob("LQER_RANK", int, 4, "rank of each correction", low=1, group="quant"),
        Knob("LQER_TOP_K", int, 3, "tensors corrected (largest output error first)", low=0, group="quant"),
        Knob(
            "LQER_FACTOR_BITS",
            int,
            4,
            "bits of the correction's factors (per-row scales)",
            low=2,
            high=8,
            group="quant",
        ),
        Knob(
            "COMPRESSOR",
            str,
            "brotli",
            "`zstd` (at `ZSTD_LEVEL`), `brotli` (quality 11), `lzma` (preset 9e) or `lrzip` (ZPAQ; needs the "
            "`lrzip` binary, checked before training)",
            choices=("zstd", "brotli", "lzma", "lrzip"),
            group="quant",
        ),
        Knob(
            "SAVE_CHECKPOINT",
            bool,
            False,
            "also write the pre-quantization (EMA) weights to `LOG_DIR/RUN_ID_fp.pt`",
            group="run",
        ),
        Knob(
            "FP16_KEEP_NAME_PATTERNS",
            str,
            "",
            "extra comma-separated name substrings kept fp16 (routers, gates and control tensors always are)",
            group="quant",
        ),
        Knob("FP16_KEEP_MAX_NUMEL", int, 4096, "tensors this small are kept fp16", low=0, group="quant"),
        Knob(
            "PRUNE_FRAC",
            float,
            0.0,
            "zero this fraction of the smallest weights of each quantized tensor before quantizing",
            low=0,
            high=0.99,
            group="quant",
        ),
        Knob("ZSTD_LEVEL", int, 22, "zstd level (`COMPRESSOR=zstd`)", low=1, high=22, group="quant"),
        Knob("SIZE_CAP_BYTES", int, 16000000, "cap on code + artifact", low=1, group="quant"),
        Knob(
            "BUDGET_MARGIN",
            float,
            0.02,
            "refuse to start when the budget preview exceeds the cap by more than this fraction; negative = "
            "never refuse",
            low=-1,
            high=1,
            group="quant",
        ),
    ),
    "evaluation": (
        Knob(
            "EVAL_STRIDE",
            int,
            64,
            "sliding-window stride; 0 = plain non-overlapping windows",
            low=0,
            group="evaluation",
        ),
        Knob(
            "EVAL_SEQ_LEN",
            int,
            0,
            "0 = `TRAIN_SEQ_LEN`; evaluation window length, shorter than the validation split",
            low=0,
            group="evaluation",
        ),
        Knob("EVAL_BATCH_SEQS", int, 32, "windows per forward pass per GPU", low=1, group="evaluation"),
    ),
    "test-time training and evaluation-only runs — defaults: the 1.0611 record's run": (
        Knob(
            "TTT_ENABLED",
            bool,
            False,
            "score-first LoRA test-time training as the last final evaluation (off until measured on a GPU)",
            group="evaluation",
        ),
        Knob("TTT_LORA_RANK", int, 80, "rank of every adapter", low=1, group="evaluation"),
        Knob("TTT_LORA_LR", float, 0.0001, "AdamW learning rate of the adapters", low=0, group="evaluation"),
        Knob(
            "TTT_CHUNK_SIZE", int, 48, "targets per chunk: scored, then trained on", low=1, group="evaluation"
        ),
        Knob(
            "TTT_BATCH_SIZE",
            int,
            64,
            "documents adapted side by side (one row each)",
            low=1,
            group="evaluation",
        ),
        Knob("TTT_GRAD_STEPS", int, 1, "adapter steps per chunk", low=1, group="evaluation"),
        Knob("TTT_WEIGHT_DECAY", float, 0.5, "AdamW weight decay of the adapters", low=0, group="evaluation"),
        Knob("TTT_BETA1", float, 0.0, "AdamW beta1 of the adapters", low=0, high=0.99999, group="evaluation"),
        Knob(
            "TTT_BETA2", float, 0.99, "AdamW beta2 of the adapters", low=0, high=0.99999, group="evaluation"
        ),
        Knob(
            "PHASED_TTT_PREFIX_DOCS",
            int,
            2500,
            "documents (from the start) after which the base weights adapt; 0 = never",
            low=0,
            group="evaluation",
        ),
        Knob(
            "PHASED_TTT_NUM_PHASES",
            int,
            3,
            "groups the prefix is split into, each followed by global SGD",
            low=0,
            group="evaluation",
        ),
        Knob(
            "GLOBAL_TTT_LR",
            float,
            0.001,
            "SGD learning rate of the base weights between phases (cosine decay)",
            low=0,
            group="evaluation",
        ),
        Knob("GLOBAL_TTT_MOMENTUM", float, 0.9, "its momentum", low=0, high=0.99999, group="evaluation"),
        Knob(
            "GLOBAL_TTT_EPOCHS", int, 1, "passes over the scored tokens per phase", low=0, group="evaluation"
        ),
        Knob(
            "GLOBAL_TTT_CHUNK_TOKENS",
            int,
            32768,
            "tokens per global SGD step, over all GPUs (at least `EVAL_SEQ_LEN`)",
            low=0,
            group="evaluation",
        ),
        Knob(
            "GLOBAL_TTT_GRAD_CLIP",
            float,
            1.0,
            "gradient-norm clip of the global SGD; 0 = off",
            low=0,
            group="evaluation",
        ),
        Knob(
            "EVAL_TIME_LIMIT",
            float,
            600.0,
            "refuse to start when the final evaluations (plain, sliding, TTT and their compile warm-ups) are "
            "projected over this many seconds on 8xH100; 0 = no check",
            low=0,
            group="evaluation",
        ),
        Knob("EVAL_ONLY", bool, False, "no training: evaluate the artifact at `ARTIFACT_PATH`", group="run"),
        Knob(
            "EVAL_TOKEN_LOSSES",
            str,
            "",
            "write the last final evaluation's per-token losses to this `.npy` (never overwritten)",
            group="evaluation",
        ),
    ),
}
KNOB_ROWS: dict[str, Knob] = {knob.name: knob for rows in KNOB_SECTIONS.values() for knob in rows}
# Views of the rows, for the code that checks and stores knobs.
KNOBS: dict[str, tuple[type, object]] = {name: (knob.kind, knob.default) for name, knob in KNOB_ROWS.items()}
CHOICES = {name: knob.choices for name, knob in KNOB_ROWS.items() if knob.choices}
KNOB_LIMITS: dict[str, tuple[float, float]] = {
    name: (knob.low, knob.high) for name, knob in KNOB_ROWS.items() if knob.low is not None
}
MODEL_KNOBS = tuple(name for name, knob in KNOB_ROWS.items() if knob.model)
MOE_ONLY_KNOBS = tuple(name for name, knob in KNOB_ROWS.items() if knob.moe_only)
# Knobs merged or renamed by an earlier restructure: a clear error instead of a silently ignored variable.
REPLACED_KNOBS = {
    "BIGRAM_BUCKETS": "BIGRAM_VOCAB_SIZE",
    "MOE_START_LAYER": "MOE_LAYERS (a list of layers)",
    "EMA_HORIZON": "EMA_DECAY (unset = 5.8% of the run, 0 = off)",
    "EMA_START": "EMA_DECAY",
    "ALLOW_OVER_BUDGET": "BUDGET_MARGIN=-1",
    "LR_WARMUP_FRAC": "nothing (no LR warm-up)",
    **{f"QUANT_BITS_{c}": "MATRIX_BITS / EMBED_BITS" for c in ("MLP", "ATTN", "EMBED", "BIGRAM")},
}
# Knob names of the challenge baseline and the records that this trainer reads under another name ("" = has
# no equivalent): setting one is an error naming ours, never a silently ignored variable.
FOREIGN_KNOBS = {
    "WARMDOWN_ITERS": "WARMDOWN_FRAC (a fraction of the run)",
    "MUON_MOMENTUM_WARMUP_STEPS": "MUON_MOMENTUM_WARMUP_FRAC (a fraction of the run)",
    **dict.fromkeys(("VAL_BATCH_SIZE", "VAL_BATCH_TOKENS", "SW_EVAL_BATCH"), "EVAL_BATCH_SEQS"),
    "SLIDING_WINDOW_ENABLED": "EVAL_STRIDE (0 = plain windows)",
    "VAL_DOC_FRACTION": "VAL_TOKEN_LIMIT",
    "DATA_DIR": "DATA_PATH and TOKENIZER_PATH",
    "ARTIFACT_DIR": "LOG_DIR or ARTIFACT_PATH",
    "EVAL_ONLY_PATH": "EVAL_ONLY=1 ARTIFACT_PATH=...",
    "TTT_EVAL_ONLY": "EVAL_ONLY=1",
    "EMBEDDING_DIM": "MODEL_DIM",
    "SMEAR_GATE_ENABLED": "SMEAR_GATE",
    **dict.fromkeys(
        ("GATED_ATTENTION", "GATED_ATTN_ENABLED", "ATTN_OUT_GATE_ENABLED"), "SPARSE_ATTN_GATE_ENABLED"
    ),
    "ATTN_OUT_GATE_SRC": "GATE_WINDOW",
    "EMA_ENABLED": "EMA_DECAY (0 = off)",
    "WEIGHT_DECAY": "MUON_WD, ADAM_WD, EMBED_WD",
    **dict.fromkeys(
        ("CONTROL_TENSOR_NAME_PATTERNS", "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS"), "FP16_KEEP_NAME_PATTERNS"
    ),
    "PHASED_TTT_ENABLED": "TTT_ENABLED",
    "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": (
        "RESPECT_DOC_BOUNDARIES (training, evaluation and global test-time training alike)"
    ),
    "TTT_EVAL_SEQ_LEN": "EVAL_SEQ_LEN",
    "TTT_LR": "TTT_LORA_LR or GLOBAL_TTT_LR",
    "TTT_CHUNK_TOKENS": "TTT_CHUNK_SIZE or GLOBAL_TTT_CHUNK_TOKENS",
    "TTT_BATCH_SEQS": "TTT_BATCH_SIZE",
    "GLOBAL_TTT_BATCH_SEQS": "GLOBAL_TTT_CHUNK_TOKENS",
    **{f"TTT_{k}": f"GLOBAL_TTT_{k}" for k in ("MOMENTUM", "EPOCHS", "GRAD_CLIP")},
    **dict.fromkeys(
        (
            "PREQUANT_ONLY GATED_ATTN_INIT_STD SPARSE_ATTN_GATE_INIT_STD GATED_ATTN_QUANT_GATE "
            "TTT_LORA_ALPHA TTT_K_LORA TTT_O_LORA TTT_MLP_LORA TTT_OPTIMIZER "
            "TTT_FREEZE_BLOCKS TTT_WARM_START_A TTT_EVAL_BATCHES TTT_OUTPUT_DIR TTT_DEBUG_BYPASS "
            "GLOBAL_TTT_WARMUP_START_LR GLOBAL_TTT_WARMUP_CHUNKS "
            "ROPE_YARN ROPE_TRAIN_SEQ_LEN PARALLEL_FINAL_LANE SWA_ENABLED SWA_EVERY SWA_START_FRAC "
            "LAWA_ENABLED LAWA_K LAWA_FREQ MUON_BETA2 QAT_ENABLED LATE_QAT_THRESHOLD MTP_NUM_HEADS "
            "MTP_LOSS_WEIGHT LQER_ASYM_ENABLED LQER_ASYM_GROUP FUSED_CE_ENABLED CASEOPS_ENABLED "
            "VE_ENABLED VE_DIM VE_LAYERS VALUE_RESIDUAL DTG_ENABLED INT8_FULL_RANGE_PATTERNS"
        ).split(),
        "",
    ),
}
# Launcher variables that are not knobs but look like them.
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


class ConfigError(ValueError):
    """A knob with a bad value or a bad combination of knobs; the message names the knob."""


def parse_knob(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            if raw.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return raw.strip().lower() in ("1", "true")
        if kind is list:
            return [int(part) for part in raw.split(",") if part.strip()]
        value = kind(raw)
    except ValueError:
        what = {bool: "0 or 1", list: "a comma-separated list of integers"}.get(kind, kind.__name__)
        raise ConfigError(f"{name}={raw!r}: expected {what}") from None
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r}: expected a finite number")
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(CHOICES[name])}")
    return value


MAX_RUN_ID_BYTES = 200  # RUN_ID + the longest suffix a run adds stays within a file name's 255 bytes


def derive_stack(knobs: SimpleNamespace, require) -> None:
    """Checks of the record-stack knobs that KNOB_LIMITS cannot express."""
    knobs.xsa_last_n = min(
        knobs.xsa_last_n, knobs.num_layers
    )  # the config line shows the layers XSA really runs in
    require(
        knobs.gate_window <= knobs.model_dim,
        f"GATE_WINDOW={knobs.gate_window}: must be in 1..MODEL_DIM={knobs.model_dim}",
    )
    if knobs.num_loops:
        require(
            knobs.loop_start <= knobs.loop_end < knobs.num_layers,
            f"LOOP_START={knobs.loop_start}, LOOP_END={knobs.loop_end}: need 0 <= LOOP_START <= LOOP_END < "
            f"NUM_LAYERS={knobs.num_layers}",
        )
    # Lanes run in decoder layers after the loop only, so a looped layer runs alike on every pass.
    first = max(knobs.num_layers // 2, knobs.loop_end + 1 if knobs.num_loops else 0)
    require(
        knobs.parallel_start_layer < knobs.num_layers,
        f"PARALLEL_START_LAYER={knobs.parallel_start_layer}: past the last layer "
        f"(NUM_LAYERS={knobs.num_layers}: "
        f"layers 0..{knobs.num_layers - 1}); 0 turns the parallel lanes off",
    )
    require(
        knobs.parallel_start_layer == 0 or knobs.parallel_start_layer >= first,
        f"PARALLEL_START_LAYER={knobs.parallel_start_layer}: must be 0 (off) or at least {first} (decoder "
        "layers after the loop)",
    )


def derive_router_passes(knobs: SimpleNamespace, require) -> None:
    """ROUTER_PER_PASS: the MoE layers inside the loop get one router per pass (1 + NUM_LOOPS)."""
    knobs.router_passes = 1 + knobs.num_loops if knobs.router_per_pass else 1
    if not knobs.router_per_pass:
        return
    require(
        knobs.moe_mode != "none",
        "ROUTER_PER_PASS=1 needs MoE layers: MOE_MODE=none (the dense MLP) has no router; "
        "set MOE_MODE=soft, topk or shared_routed",
    )
    require(
        knobs.num_loops > 0,
        "ROUTER_PER_PASS=1 needs the layer loop: with NUM_LOOPS=0 every layer runs once (one pass)",
    )
    looped = [layer for layer in knobs.moe_layer_ids if knobs.loop_start <= layer <= knobs.loop_end]
    require(
        bool(looped),
        f"ROUTER_PER_PASS=1: no MoE layer is looped (MOE_LAYERS={','.join(map(str, knobs.moe_layer_ids))}, "
        f"looped layers LOOP_START={knobs.loop_start}..LOOP_END={knobs.loop_end}); put MOE_LAYERS "
        "inside the loop",
    )


def derive_routed_regularisers(knobs: SimpleNamespace, require) -> None:
    """ROUTER_ENTROPY_COEF and EXPERT_DROPOUT shape a top-k selection, which only the routed modes make.
    (With MOE_MODE=none, load_config's check of MoE-only knobs names them instead.)"""
    for name in ("ROUTER_ENTROPY_COEF", "EXPERT_DROPOUT"):
        value = getattr(knobs, name.lower())
        require(
            not value or knobs.moe_mode in ("none", "topk", "shared_routed"),
            f"{name}={value}: needs a top-k selection (MOE_MODE=topk or shared_routed); "
            f"MOE_MODE={knobs.moe_mode} blends every expert",
        )
    require(
        not knobs.expert_dropout or knobs.top_k < knobs.num_experts,
        f"EXPERT_DROPOUT={knobs.expert_dropout}: TOP_K={knobs.top_k} of NUM_EXPERTS={knobs.num_experts} "
        "leaves no expert "
        "to drop (each step keeps at least TOP_K); lower TOP_K or set EXPERT_DROPOUT=0",
    )


def derive_quant_config(knobs: SimpleNamespace, require) -> None:
    """Quantization knobs KNOB_LIMITS cannot check; the GPTQ reserve shortens the training wall clock."""
    missing = compressor_missing(knobs.compressor)
    require(
        not missing,
        f"COMPRESSOR={knobs.compressor} needs {missing}, which is not installed; install it or choose zstd",
    )
    require(knobs.expert_bits != 1, "EXPERT_BITS=1: expected 0 (= MATRIX_BITS) or 2..8")
    knobs.calibrate = knobs.quant_method == "gptq" or knobs.lqer_enabled  # Hessians are needed
    # unset: measured before training (Trainer.reserve_calibration), which sets the training wall clock again
    given = knobs.gptq_reserve_seconds or 0.0
    reserve = given if knobs.calibrate and knobs.max_wallclock_seconds > 0 else 0.0
    require(
        reserve < knobs.max_wallclock_seconds or not reserve,
        f"GPTQ_RESERVE_SECONDS={knobs.gptq_reserve_seconds}: must be in [0, "
        f"MAX_WALLCLOCK_SECONDS={knobs.max_wallclock_seconds})",
    )
    knobs.calibration_reserve_seconds = reserve
    knobs.train_wallclock_seconds = (
        knobs.max_wallclock_seconds - reserve
    )  # training stops early to calibrate in time


def derive_config(knobs: SimpleNamespace) -> SimpleNamespace:
    """Check knob combinations and fill in the values other knobs imply."""

    def require(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    for name, (low, high) in KNOB_LIMITS.items():
        value = getattr(knobs, name.lower(), None)
        require(
            value is None or low <= value <= high,
            f"{name}={value}: expected {low}..{high}"
            if high < math.inf
            else f"{name}={value}: expected >= {low}",
        )
    require(
        knobs.bigram_vocab_size != 1, "BIGRAM_VOCAB_SIZE=1: expected 0 (off) or >= 2 (one bucket is reserved)"
    )
    require(
        knobs.model_dim % knobs.num_heads == 0,
        f"MODEL_DIM={knobs.model_dim} is not divisible by NUM_HEADS={knobs.num_heads}",
    )
    require(
        knobs.num_heads % knobs.num_kv_heads == 0,
        f"NUM_HEADS={knobs.num_heads} is not divisible by NUM_KV_HEADS={knobs.num_kv_heads}",
    )
    knobs.head_dim = knobs.model_dim // knobs.num_heads
    knobs.rope_dims = min(
        knobs.rope_dims or knobs.head_dim, knobs.head_dim
    )  # 16 of 64 by default; small heads rotate all
    require(knobs.rope_dims % 2 == 0, f"ROPE_DIMS={knobs.rope_dims}: must be even")
    require(
        knobs.vocab_size <= MAX_VOCAB_SIZE,
        f"VOCAB_SIZE={knobs.vocab_size}: shards hold uint16 token ids (at most {MAX_VOCAB_SIZE})",
    )
    require(
        knobs.top_k <= knobs.num_experts,
        f"TOP_K={knobs.top_k}: must be between 1 and NUM_EXPERTS={knobs.num_experts}",
    )
    require(
        knobs.moe_mode == "none" or knobs.num_experts >= 2,
        f"NUM_EXPERTS={knobs.num_experts}: a mixture needs at least 2 experts (one expert is the dense MLP: "
        "MOE_MODE=none)",
    )
    for layer in knobs.moe_layers:
        require(
            0 <= layer < knobs.num_layers, f"MOE_LAYERS: layer {layer} is outside 0..{knobs.num_layers - 1}"
        )
    knobs.moe_layer_ids = (
        [] if knobs.moe_mode == "none" else sorted(set(knobs.moe_layers or range(knobs.num_layers)))
    )
    knobs.mlp_hidden = int(knobs.mlp_mult * knobs.model_dim)
    knobs.shared_mlp_hidden = (
        (knobs.shared_hidden or knobs.mlp_hidden // 2) if knobs.moe_mode == "shared_routed" else 0
    )
    free_hidden = knobs.mlp_hidden - knobs.shared_mlp_hidden
    if knobs.moe_mode != "none" and not knobs.expert_hidden:
        require(
            free_hidden > 0 and free_hidden % knobs.num_experts == 0,
            f"NUM_EXPERTS={knobs.num_experts}: the parameter-matched expert size "
            f"{free_hidden}/{knobs.num_experts} "
            "is not whole; set EXPERT_HIDDEN",
        )
    knobs.expert_mlp_hidden = knobs.expert_hidden or max(free_hidden // knobs.num_experts, 0)
    require(
        knobs.moe_mode in ("none", "soft")
        or knobs.moe_dispatch != "grouped"
        or knobs.model_dim % 8 == knobs.expert_mlp_hidden % 8 == 0,
        f"MOE_DISPATCH=grouped needs MODEL_DIM={knobs.model_dim} and the expert width "
        f"{knobs.expert_mlp_hidden} "
        "(EXPERT_HIDDEN) "
        "to be multiples of 8 (16-byte aligned rows); change them or use MOE_DISPATCH=capacity",
    )
    derive_quant_config(knobs, require)
    knobs.micro_batch_source = (
        "" if knobs.micro_batch_tokens else f" (unset: TRAIN_BATCH_TOKENS={knobs.train_batch_tokens} / 8)"
    )
    knobs.micro_batch_tokens = knobs.micro_batch_tokens or knobs.train_batch_tokens // 8
    require(
        knobs.micro_batch_tokens % knobs.train_seq_len == 0 and knobs.micro_batch_tokens > 0,
        f"MICRO_BATCH_TOKENS="
        f"{knobs.micro_batch_tokens}{knobs.micro_batch_source} is not a positive multiple of "
        f"TRAIN_SEQ_LEN={knobs.train_seq_len}",
    )
    knobs.eval_seq_len = knobs.eval_seq_len or knobs.train_seq_len
    require(
        knobs.eval_stride <= knobs.eval_seq_len,
        f"EVAL_STRIDE={knobs.eval_stride}: must be in 0..EVAL_SEQ_LEN={knobs.eval_seq_len}",
    )
    derive_stack(knobs, require)
    derive_router_passes(knobs, require)
    derive_routed_regularisers(knobs, require)
    require(
        not knobs.ttt_enabled or knobs.global_ttt_chunk_tokens >= knobs.eval_seq_len,
        f"GLOBAL_TTT_CHUNK_TOKENS={knobs.global_ttt_chunk_tokens}: must hold at least one "
        f"EVAL_SEQ_LEN={knobs.eval_seq_len} sequence",
    )
    require(
        len(knobs.run_id.encode()) <= MAX_RUN_ID_BYTES,
        f"RUN_ID: {len(knobs.run_id.encode())} bytes, at most {MAX_RUN_ID_BYTES} (it names files, as "
        "RUN_ID.failedN.jsonl and RUN_ID_model.ptz, and a file name holds 255 bytes)",
    )
    require(
        not re.search(r"[/\\\s]", knobs.run_id) and not knobs.run_id.startswith("."),
        f"RUN_ID={knobs.run_id!r}: must be a file name in LOG_DIR (no '/', '\\', spaces or leading '.')",
    )
    require(
        not knobs.eval_only or os.path.isfile(knobs.artifact_path),
        "EVAL_ONLY=1 needs ARTIFACT_PATH to name an existing artifact "
        f"(ARTIFACT_PATH={knobs.artifact_path!r})",
    )
    require(
        not knobs.eval_token_losses
        or (
            not os.path.exists(knobs.eval_token_losses)
            and os.path.isdir(os.path.dirname(os.path.abspath(knobs.eval_token_losses)))
        ),
        f"EVAL_TOKEN_LOSSES={knobs.eval_token_losses}: exists "
        "(files are never overwritten) or its folder does not",
    )
    return knobs


def derived_from(*knobs: str) -> dict:
    """A ModelConfig field computed from these knobs rather than read as one (a test holds every field to
    being a knob or derived from knobs)."""
    return {"derived_from": knobs}


@dataclass(frozen=True)
class ModelConfig:
    """The network's contract: what the model classes receive, and all they receive. Built from the
    knobs an artifact stores plus the values derived from them, so a reloaded model is rebuilt alike."""

    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = field(metadata=derived_from("MODEL_DIM", "NUM_HEADS"))
    mlp_mult: float
    mlp_hidden: int = field(metadata=derived_from("MLP_MULT", "MODEL_DIM"))  # the dense MLP's hidden width
    mlp_act: str
    rope_dims: int
    rope_base: float
    qk_gain_init: float
    logit_softcap: float
    tie_embeddings: bool
    tied_embed_init_std: float
    bigram_vocab_size: int
    bigram_dim: int
    smear_gate: bool
    skip_gates_enabled: bool
    xsa_last_n: int
    ln_scale: bool
    sparse_attn_gate_enabled: bool
    sparse_attn_gate_scale: float
    gate_window: int
    # Whether attention stops at a BOS; not in the artifact (the knob of the run reading it applies).
    respect_doc_boundaries: bool
    parallel_start_layer: int
    num_loops: int
    loop_start: int
    loop_end: int
    moe_mode: str
    moe_layers: list[int]  # as given (empty = every layer); moe_layer_ids is what the network builds
    # the layers whose MLP is an MoE (empty with MOE_MODE=none)
    moe_layer_ids: tuple[int, ...] = field(metadata=derived_from("MOE_MODE", "MOE_LAYERS", "NUM_LAYERS"))
    router_per_pass: bool
    # routers per looped MoE layer: 1 + NUM_LOOPS with ROUTER_PER_PASS, else 1
    router_passes: int = field(metadata=derived_from("ROUTER_PER_PASS", "NUM_LOOPS"))
    num_experts: int
    top_k: int
    expert_hidden: int
    shared_hidden: int
    expert_mlp_hidden: int = field(
        metadata=derived_from("EXPERT_HIDDEN", "MLP_MULT", "MODEL_DIM", "SHARED_HIDDEN", "NUM_EXPERTS")
    )
    shared_mlp_hidden: int = field(
        metadata=derived_from("SHARED_HIDDEN", "MOE_MODE", "MLP_MULT", "MODEL_DIM")
    )
    router_score: str
    moe_dispatch: str
    capacity_factor: float
    # The routers' training terms: applied inside the MoE layers, where the routing they shape lives.
    router_noise: float
    router_z_coef: float
    moe_aux_loss_coef: float
    router_entropy_coef: float
    expert_dropout: float


# The groups a run's configuration is read into; each function receives the groups it reads. A knob's row
# names its group; the values derive_config computes beside the knobs are declared here, per group. The model
# group is ModelConfig, which also copies the knobs of other groups that the network reads (VOCAB_SIZE,
# RESPECT_DOC_BOUNDARIES).
CONFIG_GROUPS = {
    "data": "the shards, the tokenizer and the shape of a batch",
    "optim": "the optimizer and its schedule: learning rates, momentum, run length, warm-down, EMA, QAT",
    "quant": "quantization and the artifact: bits, clipping, GPTQ calibration, LQER, compressor, size cap",
    "evaluation": "the final evaluations and test-time training",
    "run": "the run and its paths: names, logs, seed, compile, what this launch does",
}
CALIBRATION_KNOBS = ("QUANT_METHOD", "LQER_ENABLED", "GPTQ_RESERVE_SECONDS", "MAX_WALLCLOCK_SECONDS")
DERIVED_FIELDS: dict[str, dict[str, tuple[type, tuple[str, ...]]]] = {
    # how MICRO_BATCH_TOKENS was set, for its error messages ("" when given)
    "data": {"micro_batch_source": (str, ("MICRO_BATCH_TOKENS", "TRAIN_BATCH_TOKENS"))},
    # the GPTQ reserve and the training wall clock it leaves (an unset reserve is measured by the Trainer,
    # which then holds a new optim group with both)
    "optim": {
        "calibration_reserve_seconds": (float, CALIBRATION_KNOBS),
        "train_wallclock_seconds": (float, CALIBRATION_KNOBS),
    },
    "quant": {"calibrate": (bool, ("QUANT_METHOD", "LQER_ENABLED"))},  # Hessians are needed
    # MOE_DISPATCH asked for by name, not defaulted: a GPU without grouped_mm's fast kernel then stops
    "run": {"moe_dispatch_given": (bool, ("MOE_DISPATCH",))},
}


def config_group(group: str) -> type:
    """A frozen dataclass of the knobs whose row names `group`, then the group's derived values."""
    specs: list = [(knob.name.lower(), knob.kind) for knob in KNOB_ROWS.values() if knob.group == group]
    for name, (kind, sources) in DERIVED_FIELDS.get(group, {}).items():
        specs.append((name, kind, field(metadata=derived_from(*sources))))
    cls = make_dataclass(f"{group.title()}Config", specs, frozen=True)
    cls.__doc__ = f"The knobs and derived values of {CONFIG_GROUPS[group]} (frozen: change with replace)."
    return cls


DataConfig = config_group("data")
OptimConfig = config_group("optim")
QuantConfig = config_group("quant")
EvaluationConfig = config_group("evaluation")
RunConfig = config_group("run")
GROUP_CLASSES = {
    "data": DataConfig,
    "optim": OptimConfig,
    "quant": QuantConfig,
    "evaluation": EvaluationConfig,
    "run": RunConfig,
}

# The only functions that receive a whole Config (a test reads train_gpt.py's syntax tree and holds every
# other function to its groups): the entry points, which hand each callee the groups it reads.
WHOLE_CONFIG_READERS = (
    "main",
    "dry_run",
    "train_and_evaluate",
    "evaluate_artifact",
    "Trainer.__init__",
    "knob_values",
)


@dataclass(frozen=True)
class Config:
    """A run's configuration, read once from the knobs by load_config and frozen: a change is a new Config
    (dataclasses.replace), as for the run id main() picks. Only WHOLE_CONFIG_READERS receive it whole."""

    data: DataConfig
    optim: OptimConfig
    quant: QuantConfig
    evaluation: EvaluationConfig
    run: RunConfig
    model: ModelConfig


def freeze_config(knobs: SimpleNamespace) -> Config:
    """Splits the checked and derived knobs into the frozen groups."""
    values = vars(knobs)
    groups = {
        name: cls(**{f.name: values[f.name] for f in fields(cls)}) for name, cls in GROUP_CLASSES.items()
    }
    network = {f.name: values[f.name] for f in fields(ModelConfig)}
    model = ModelConfig(**{**network, "moe_layer_ids": tuple(knobs.moe_layer_ids)})
    return Config(**groups, model=model)


def load_config(environ=None, **overrides) -> Config:
    """Read every knob from `environ` (default os.environ), apply keyword overrides, validate, derive, and
    freeze the result into a Config."""
    env = os.environ if environ is None else environ
    for key in [*env, *(k.upper() for k in overrides)]:  # overrides: e.g. the knobs an artifact stores
        if key in REPLACED_KNOBS and (env.get(key, "") != "" or key in overrides or key.lower() in overrides):
            raise ConfigError(f"{key} is no longer a knob: use {REPLACED_KNOBS[key]}")
        if key in FOREIGN_KNOBS and env.get(key, "") != "":
            use = f"use {FOREIGN_KNOBS[key]}" if FOREIGN_KNOBS[key] else "it has no equivalent here"
            raise ConfigError(f"{key} is another script's knob, not this trainer's: {use}")
        if key != key.upper() and key.upper() in KNOBS and env.get(key, "") != "":
            raise ConfigError(f"{key}: knob names are upper case; use {key.upper()}")
        if key not in KNOBS and key not in LAUNCHER_VARS:
            close = difflib.get_close_matches(key, list(KNOBS), n=1, cutoff=0.9)
            if close:
                raise ConfigError(f"unknown variable {key}: did you mean {close[0]}?")
    # An empty value is most often a shell variable that was never set: refused, not read as the default,
    # except where the default is itself empty (unset: no run id, no layer list, ...).
    empty = [
        name
        for name, (_, default) in KNOBS.items()
        if env.get(name) == "" and not (default is None or (isinstance(default, (str, list)) and not default))
    ]
    if empty:
        raise ConfigError(
            f"{', '.join(f'{name}=' for name in empty)}: set but empty (an unset shell variable?); give a "
            "value, or unset the variable for the default"
        )
    values = {
        name.lower(): parse_knob(name, env[name], kind) if env.get(name, "") != "" else copy.copy(default)
        for name, (kind, default) in KNOBS.items()
    }
    values.update({k.lower(): v for k, v in overrides.items()})
    knobs = derive_config(SimpleNamespace(**values))
    # asked for by name (not the default): a GPU without the fast grouped kernel then stops instead
    knobs.moe_dispatch_given = env.get("MOE_DISPATCH", "") != "" or "moe_dispatch" in overrides
    moe_only = [f"{k}={env[k]}" for k in MOE_ONLY_KNOBS if env.get(k, "") != ""]
    if moe_only and knobs.moe_mode == "none":  # the dense default would silently ignore them
        raise ConfigError(
            f"{', '.join(moe_only)}: no effect with MOE_MODE=none (the dense MLP, the default); "
            "set MOE_MODE=soft, topk or shared_routed"
        )
    return freeze_config(knobs)


def grad_accum_steps(data: DataConfig, world_size: int) -> int:
    per_step = world_size * data.micro_batch_tokens
    if data.train_batch_tokens % per_step:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={data.train_batch_tokens} is not divisible by WORLD_SIZE={world_size} "
            f"x MICRO_BATCH_TOKENS={data.micro_batch_tokens}{data.micro_batch_source}"
        )
    return data.train_batch_tokens // per_step


def loop_switch_planned(cfg: ModelConfig, optim: OptimConfig) -> bool:
    return cfg.num_loops > 0 and optim.enable_looping_at < 1


def knob_values(h: Config, names=KNOBS) -> dict:
    """{KNOB: value} as the run reads it (derived where a knob's 0 means "derive"), from each knob's group."""
    return {name: getattr(getattr(h, KNOB_ROWS[name].group), name.lower()) for name in names}


def stored_knobs(cfg: ModelConfig) -> dict:
    """{KNOB: value} of the model knobs, which the artifact stores (every one is a ModelConfig field)."""
    return {name: getattr(cfg, name.lower()) for name in MODEL_KNOBS}


# ---- 2. Runtime: processes and devices, signals, the log, matmul precision, code size ----
# What touches processes, devices and files, first because every later section uses it: the process
# group and its one-hour timeout, the stop signals (each ends a run as Ctrl-C does), the log with its
# JSONL events, the matmul precision of each phase, and the code size the artifact's cap counts.
class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or the ranks' weights drifted apart."""


class DiskError(RuntimeError):
    """A file could not be written: its disk is full, over quota or read-only."""


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, with where the run stopped; the process exits 128 + the signal's number."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


# What `kill`, torchrun (stopping the other ranks when one fails) and job schedulers send, and a closed
# terminal: each stops the run as Ctrl-C does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
stop_signals_received: list[int] = []


class Stopped(KeyboardInterrupt):
    """A SIGTERM or SIGHUP arrived; a KeyboardInterrupt, so every Ctrl-C path handles it."""


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Stopped in the main thread. A repeat while the run writes its failure is
    ignored, so the logs are finished (SIGKILL still ends the process at once)."""

    def stop(signum: int, frame) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        stop_signals_received.append(signum)
        raise Stopped(signal.Signals(signum).name)

    for s in STOP_SIGNALS:
        signal.signal(s, stop)


def stopped_where(signum: int, phase: str) -> str:
    """'interrupted at step 12' (Ctrl-C), 'stopped by SIGTERM during gptq calibration'."""
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return f"{how} {phase}"


def stop_signal(err: BaseException) -> int | None:
    """The signal that stopped the run: a SIGTERM or SIGHUP received (whatever error it then raised, e.g.
    in a collective a stopped peer left), Ctrl-C's SIGINT for a KeyboardInterrupt; None for any other
    error."""
    if stop_signals_received:
        return stop_signals_received[0]
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else None


class Logger:
    """Rank 0 prints and appends to LOG_DIR/RUN_ID.txt and writes events to RUN_ID.jsonl (one JSON object
    per line, fields in README.md); other ranks log nothing. A run never writes into another run's log.
    Logger(None, console=True) is DRY_RUN's: it prints and writes no file."""

    def __init__(self, stem: str | None, console: bool = False):
        self.text = self.events = None
        self.stem = stem
        self.training_started = False
        self.console = console or bool(stem)
        self.phase = "before training"  # where the run is, for the line a stopped run ends with
        if stem:
            for path in (stem + ".txt", stem + ".jsonl"):
                if os.path.exists(path):
                    raise ConfigError(
                        f"RUN_ID: {path} already exists; choose a new RUN_ID (runs never overwrite each "
                        "other)"
                    )
            os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
            self.text = open(stem + ".txt", "x", encoding="utf-8")
            try:
                self.events = open(stem + ".jsonl", "x", encoding="utf-8")
            except OSError:  # leave no half of a log pair behind to block the RUN_ID
                self.text.close()
                os.remove(stem + ".txt")
                raise

    def __call__(self, msg: str) -> None:
        if self.console:
            print(msg, flush=True)
        if self.text is not None:
            self.text.write(msg + "\n")
            self.text.flush()

    def event(self, kind: str, **fields) -> None:
        if self.events is not None:
            self.events.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
            self.events.flush()

    def fail(self, err: BaseException) -> str | None:
        """Writes the error into both logs; a failed start frees its RUN_ID (its logs become
        RUN_ID.failedN.*)."""
        if self.text is not None:
            try:  # into the text log only: stderr has it already
                print(f"error: {str(err) or type(err).__name__}", file=self.text, flush=True)
                self.event("error", message=f"{type(err).__name__}: {err}")
                self.event("end", status="failed")
            except OSError:  # the full or read-only disk that failed the run cannot take its error either
                pass
            if self.training_started:
                return self.stem + ".txt"
            paths = [self.stem + ".txt", self.stem + ".jsonl"]
            if not any(os.path.getsize(p) for p in paths):  # nothing written: nothing to keep
                for f, path in zip((self.text, self.events), paths):
                    with contextlib.suppress(OSError):
                        f.close()
                    os.remove(path)
                return None
            n = 1
            while glob.glob(glob.escape(f"{self.stem}.failed{n}") + ".*"):
                n += 1
            for ext in (".txt", ".jsonl"):
                os.rename(self.stem + ext, f"{self.stem}.failed{n}{ext}")
            return f"{self.stem}.failed{n}.txt"
        return None


PROGRESS_QUIET_SECONDS = 5.0  # a phase shorter than this prints only its start line


class Progress:
    """A long phase's start line, then its ETA at each tenth done, at most once per PROGRESS_QUIET_SECONDS."""

    def __init__(self, log, name: str, total: int, unit: str):
        self.log = log
        self.name = name
        self.total = max(total, 1)
        self.unit = unit
        self.t0 = self.last = time.perf_counter()
        self.tenths = 0
        log(f"{name}: started ({total} {unit})")
        if isinstance(log, Logger):
            log.phase = f"during {name}"

    def __call__(self, done: int) -> None:
        now, tenths = time.perf_counter(), 10 * done // self.total
        if tenths > self.tenths and now - self.last >= PROGRESS_QUIET_SECONDS and done < self.total:
            self.tenths = tenths
            self.last = now
            elapsed = now - self.t0
            self.log(
                f"{self.name}: {100 * done // self.total}% ({done}/{self.total} {self.unit}) {elapsed:.0f}s "
                f"elapsed, ~{elapsed * (self.total - done) / done:.0f}s left"
            )


# Rank 0 alone runs GPTQ, LQER, the compressor and any shrink steps while the other ranks wait in a barrier:
# NCCL's default 10-minute timeout would kill a slow export, so the collectives wait an hour before failing.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run, for the distributed and evaluation code: its rank of world_size
    processes, its device, and the log (rank 0's files; the other ranks' log writes nothing)."""

    rank: int
    world_size: int
    device: torch.device
    log: Logger


def setup_distributed(run: RunConfig) -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device) from torchrun's environment; joins the process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and device.type == "cpu" and not run.allow_cpu_distributed:
        raise ConfigError(
            f"WORLD_SIZE={world_size} but CUDA is not usable here (no GPU, or a driver too old for torch "
            f"{torch.__version__}): the ranks would train on the CPU over gloo. Fix the GPU setup, or set "
            "ALLOW_CPU_DISTRIBUTED=1 to run on the CPU on purpose"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for fp32 matmuls in training, as the records (the routers); exact_fp32_matmuls() turns it off.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if world_size > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    return rank, world_size, device


@contextlib.contextmanager
def fp32_matmuls(tf32: bool):
    """fp32 matmuls with TF32 (inputs rounded to 10 mantissa bits, fp32 sums) on or off, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def exact_fp32_matmuls():
    """TF32 off while GPTQ/LQER feed rounding errors forward: these fp32 products must be fp32."""
    return fp32_matmuls(tf32=False)


def hessian_matmuls():
    """TF32 on while the Hessians are summed: X^T X at about 8x an H100's fp32 rate, inside the 600 s that
    count calibration. tools/quant/hessian_precision.py on a proxy checkpoint: the Hessians move by 1.5e-5
    (relative), 0.5% of GPTQ's integers change, the round-trip val_bpb by 0.00001."""
    return fp32_matmuls(tf32=True)


def use_compile(run: RunConfig, device: torch.device) -> bool:
    return run.compile == "1" or (run.compile == "auto" and device.type == "cuda")


def maybe_compile(fn, run: RunConfig, device: torch.device):
    """One static graph of fn when COMPILE (auto: on a GPU) asks for it; else fn itself."""
    return torch.compile(fn, fullgraph=True, dynamic=False) if use_compile(run, device) else fn


def script_bytes() -> int:
    """Bytes of this script as it runs: with its sha256, what identifies it in the log."""
    return os.path.getsize(os.path.abspath(__file__))


# Records ship the script as a self-extracting wrapper (lzma 9e, base85: no quotes or backslashes to
# escape) that runs the exact bytes in its own module; `python3 -m tools.records pack --compress-code`
# writes it.
WRAPPER_PREFIX = b'import lzma as L,base64 as B\nexec(compile(L.decompress(B.b85decode("'
WRAPPER_SUFFIX = b'")),__file__,"exec"))\n'


def self_extracting(source: bytes) -> bytes:
    return (
        WRAPPER_PREFIX
        + base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME))
        + WRAPPER_SUFFIX
    )


CODE_COUNTED_AS = "train_gpt.py as records.py pack ships it: its lzma self-extracting wrapper"


@functools.cache
def code_bytes() -> int:
    """The code's bytes, the one definition the budget preview, the fit and the final size check count:
    this script as a record ships it, the file itself when it is a wrapper, else its wrapper."""
    with open(os.path.abspath(__file__), "rb") as f:
        source = f.read()
    return len(source) if source.startswith(WRAPPER_PREFIX) else len(self_extracting(source))


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ---- 3. Data: challenge shards (256 x int32 header, then uint16 tokens), loaders, tokenizer bytes ----
# Shards are read in the challenge's own format and checked (header, size, token range) before training,
# so a bad file stops the run by name. The data order is fixed and resumable (TokenStream.state/restore):
# every rank reads its piece of the same span, and the compile warm-up rewinds it. The tokenizer's byte
# tables turn token losses into the challenge's score, bits per byte.
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024
MAX_VOCAB_SIZE = 65536  # token ids are stored as uint16
BOS_ID = 1


class DataError(ValueError):
    """A missing or malformed data file; the message names the file."""


def shard_token_count(path: str) -> int:
    """Checks a shard's magic, version and exact size without reading its tokens; -> token count."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such shard file")
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=3)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a challenge shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    expected = SHARD_HEADER_BYTES + 2 * int(header[2])
    if header[2] < 0 or size != expected:
        raise DataError(
            f"{path}: file is {size} bytes but its header promises {header[2]} tokens "
            f"({expected} bytes); truncated or corrupt"
        )
    return int(header[2])


def read_shard(path: str) -> np.ndarray:
    n = shard_token_count(path)  # memory-mapped: the training loop pages in what it reads, never whole files
    return (
        np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))
        if n
        else np.zeros(0, "<u2")
    )


def check_token_range(path: str, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    if (top := int(tokens.max(initial=0))) >= vocab_size:
        raise DataError(f"{path}: token id {top} is outside VOCAB_SIZE={vocab_size}")
    return tokens


def check_shards(files: list[str], vocab_size: int) -> list[str]:
    """Every shard's header and size at start-up, without reading tokens: the token ids of a shard are
    checked when it is first loaded (check_token_range)."""
    for path in files:
        shard_token_count(path)
    return files


# The challenge's FineWeb exports: sp1024 in the official dataset repository (the downloader's default),
# sp4096 and sp8192 (the April-2026 records') in the community one, which must be named.
EXPORT_REPOSITORY = {"sp1024": None, "sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf"}


def download_hint(path: str, vocab_size: int | None = None) -> str:
    """The command that produces a missing data folder or tokenizer: for the export its name says
    (fineweb10B_sp1024, fineweb_1024_bpe.model), else for VOCAB_SIZE's; else how to build shards."""
    named = re.search(r"fineweb10B_(sp\d+)|fineweb_(\d+)_bpe", path)
    variant = (named[1] or f"sp{named[2]}") if named else f"sp{vocab_size}"
    if variant not in EXPORT_REPOSITORY:
        return "build shards with data/build_shards.py, or use DATA_PATH=data/sample"
    repo = EXPORT_REPOSITORY[variant]
    env = f"MATCHED_FINEWEB_REPO_ID={repo} " if repo else ""
    command = f"{env}python3 data/cached_challenge_fineweb.py --variant {variant}"
    return f"download the {variant} export with: {command}"


def shard_files(data_path: str, split: str) -> list[str]:
    if not os.path.isdir(data_path):
        raise DataError(f"DATA_PATH={data_path}: no such directory ({download_hint(data_path)})")
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise DataError(
            f"DATA_PATH={data_path}: no fineweb_{split}_*.bin shards ({download_hint(data_path)})"
        )
    return files


class TokenStream:
    """The training shards read in sorted order, wrapping around; its position can be saved."""

    def __init__(self, files: list[str], vocab_size: int = MAX_VOCAB_SIZE):
        bad = [f for f in files if "_val_" in os.path.basename(f)]
        if bad:
            raise DataError(f"{bad[0]}: a validation shard must never feed training")
        self.files, self.file_idx, self.pos = files, 0, 0
        self.vocab_size, self.checked = vocab_size, set()
        self.tokens = self.load(0)

    def load(self, idx: int) -> np.ndarray:
        """Shard idx, memory-mapped; its token ids are checked the first time it is loaded."""
        tokens = read_shard(self.files[idx])
        if idx not in self.checked:
            check_token_range(self.files[idx], tokens, self.vocab_size)
            self.checked.add(idx)
        return tokens

    def state(self) -> tuple[int, int]:
        return self.file_idx, self.pos

    def restore(self, state: tuple[int, int]) -> None:
        if state[0] != self.file_idx:
            self.tokens = self.load(state[0])
        self.file_idx, self.pos = state

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = self.load(self.file_idx), 0
            part = self.tokens[self.pos : self.pos + n]
            parts.append(part)
            self.pos += len(part)
            n -= len(part)
        return np.concatenate(parts)


def train_rows(data: DataConfig) -> tuple[int, int]:
    """(rows, tokens per row) of a training micro-batch: with RESPECT_DOC_BOUNDARIES one packed row (its
    documents cut every TRAIN_SEQ_LEN tokens, not at row ends), else rows of TRAIN_SEQ_LEN."""
    if data.respect_doc_boundaries:
        return 1, data.micro_batch_tokens
    return data.micro_batch_tokens // data.train_seq_len, data.train_seq_len


class TrainLoader:
    """Each optimizer step reads one global span; rank r's micro-step m gets piece m*world_size + r, as rows
    of `seq_len` tokens (one row of all its tokens when seq_len = micro_tokens)."""

    def __init__(
        self, files, rank, world_size, seq_len, micro_tokens, accum, device, vocab_size=MAX_VOCAB_SIZE
    ):
        self.stream = TokenStream(files, vocab_size)
        self.rank = rank
        self.world_size = world_size
        self.seq_len = seq_len
        self.span = micro_tokens + 1
        self.accum = accum
        self.device = device

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        chunk = self.stream.take(self.span * self.world_size * self.accum)
        batches = []
        for micro in range(self.accum):
            start = (micro * self.world_size + self.rank) * self.span
            piece = torch.from_numpy(chunk[start : start + self.span].astype(np.int64))
            if self.device.type == "cuda":
                piece = piece.pin_memory().to(self.device, non_blocking=True)
            # (micro_tokens + 1,) -> inputs and targets, each (micro_tokens / seq_len, seq_len)
            batches.append((piece[:-1].view(-1, self.seq_len), piece[1:].view(-1, self.seq_len)))
        return batches


def load_val_tokens(data_path: str, vocab_size: int, limit: int = 0) -> Tensor:
    files = check_shards(shard_files(data_path, "val"), vocab_size)
    tokens = np.concatenate([check_token_range(f, read_shard(f), vocab_size) for f in files])
    if limit:
        tokens = tokens[: limit + 1]
    if len(tokens) < 2:
        raise DataError(f"{files[0]}: validation split has fewer than 2 tokens")
    return torch.from_numpy(tokens.astype(np.int32))


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise DataError(f"TOKENIZER_PATH={path}: no such file ({download_hint(path, vocab_size)})")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as err:
        raise DataError(f"{path}: not a SentencePiece model ({err})") from None
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{path}: tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    return sp


def check_tokenizer_identity(data_path: str, tokenizer_path: str) -> str | None:
    """Another tokenizer of the same size scores silently wrong: its sha256 must match DATA_PATH's."""
    manifest_path = os.path.join(data_path, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            expected = json.load(f).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        expected = None
    if not expected:
        return (
            f"warning: no tokenizer_sha256 in {manifest_path}: cannot check TOKENIZER_PATH against the shards"
        )
    if (actual := sha256_file(tokenizer_path)) != expected:
        raise DataError(
            f"TOKENIZER_PATH={tokenizer_path} is not the tokenizer that made DATA_PATH={data_path} (sha256 "
            f"{actual[:12]}..., {manifest_path} says {expected[:12]}...): the scores would be wrong"
        )
    return None


def byte_tables(sp: spm.SentencePieceProcessor) -> tuple[Tensor, Tensor, Tensor]:
    """Per token id: UTF-8 bytes without a leading space, starts-with-space, is-control (challenge.md)."""
    n = sp.vocab_size()
    base = np.zeros(n, np.int16)
    space = np.zeros(n, np.bool_)
    control = np.zeros(n, np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            control[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = piece.startswith("\u2581")
            base[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(control)


def target_bytes(prev: Tensor, tgt: Tensor, tables: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    base, space, control = tables
    return base[tgt].to(torch.int32) + (space[tgt] & ~control[prev]).to(torch.int32)


# ---- 4. Model parts: GQA attention with QK-norm and partial RoPE, MLP, BigramHash, SmearGate -----
# Every part is built from ModelConfig alone, so a model rebuilt from an artifact's stored knobs is the
# model that was trained. Each mechanism of the records' stack has its own knob and can be switched off,
# for ablations and for the tests' plain tiny models.
def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def mlp_act(x: Tensor, kind: str) -> Tensor:
    return (F.relu(x) if kind == "relu2" else F.leaky_relu(x, 0.5)).square()


def zero_init(module: nn.Module) -> nn.Module:
    module.zero_init = True  # output projections start at zero, so every block starts as identity
    return module


class Rotary(nn.Module):
    def __init__(self, rope_dims: int, base: float):
        super().__init__()
        self.register_buffer(
            # 1 / base^(i/d), not base^(-i/d): the same fp32 rounding as the record, bit for bit
            "inv_freq",
            1.0 / base ** (torch.arange(0, rope_dims, 2).float() / rope_dims),
            persistent=False,
        )

    def forward(self, x: Tensor) -> Tensor:  # x: (B, H, T, D); rotates the first rope_dims channels
        freqs = torch.outer(torch.arange(x.size(-2), device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        half = self.inv_freq.numel()
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: removes from each head's output (B, H, T, D) its component along the token's own value
    vector (B, H_kv, T, D), so attention carries only what the token does not already hold."""
    B, H, T, D = y.shape
    unit = F.normalize(v, dim=-1).unsqueeze(2)  # (B, H_kv, 1, T, D)
    grouped = y.view(B, v.size(1), H // v.size(1), T, D)  # the query heads that share each value head
    return (grouped - (grouped * unit).sum(-1, keepdim=True) * unit).view(B, H, T, D)


# Document isolation (RESPECT_DOC_BOUNDARIES): a row packs several documents, and each token attends only to
# the earlier tokens of its own segment: a document, or a piece of one cut every `span` tokens from its start.
ATTN_BLOCK = 128  # flex_attention's block size (tokens)


def document_segments(idx: Tensor, span: int) -> Tensor:
    """Token ids (B, T) -> segment ids (B, T), non-decreasing along a row: a segment starts at the row's
    start, at every BOS, and every `span` tokens after a document's start (as the 1.0611 record's loader
    cuts)."""
    pos = torch.arange(idx.size(1), device=idx.device)
    starts = (idx == BOS_ID) | (pos == 0)
    doc_start = torch.where(starts, pos, 0).cummax(dim=1).values  # (B, T): each token's document start
    return ((pos - doc_start) % span == 0).cumsum(dim=1)


class DocumentMask(NamedTuple):
    """What attention needs to stay inside segments; built once per forward, shared by every layer."""

    segments: Tensor  # (B, T) from document_segments
    span: int  # no segment is longer
    block_mask: BlockMask | None  # the flex_attention path (GPUs); None: the SDPA path


def block_indices(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, nq, nkv) bool -> per query block the count (B, 1, nq) and the indices (B, 1, nq, nkv) of its
    true kv blocks, those first (BlockMask's layout)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def document_block_mask(segments: Tensor) -> BlockMask:
    """flex_attention's block mask of causal attention within segments (B, T), from block-level tensor ops
    (nothing of size T x T), so it traces on any device and under torch.compile."""
    B, T = segments.shape
    n = -(-T // ATTN_BLOCK)
    # (B, n * ATTN_BLOCK): the padding past T is a segment of its own
    seg = torch.cat((segments, (segments[:, -1:] + 1).expand(B, n * ATTN_BLOCK - T)), dim=1)
    blocks = seg.view(B, n, ATTN_BLOCK)  # segment ids rise along a row: a block spans [first, last]
    q_lo, q_hi = blocks[:, :, None, 0], blocks[:, :, None, -1]  # (B, n, 1): query block i
    kv_lo, kv_hi = blocks[:, None, :, 0], blocks[:, None, :, -1]  # (B, 1, n): kv block j
    j_le_i = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    # a key of block j <= i shares a query's segment: j's last segment reaches i's first
    touches = j_le_i & (kv_hi >= q_lo)
    # every key of j < i is visible to every query of i: one segment throughout both blocks
    full = j_le_i.tril(-1) & (kv_lo == kv_hi) & (q_lo == q_hi) & (kv_hi == q_lo)

    def same_segment_causal(b, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (seg[b, q_idx] == seg[b, kv_idx])

    return BlockMask.from_kv_blocks(
        *block_indices(touches & ~full),
        *block_indices(full),
        BLOCK_SIZE=ATTN_BLOCK,
        mask_mod=same_segment_causal,
        seq_lengths=(T, T),
    )


def document_mask(idx: Tensor, span: int, flex: bool) -> DocumentMask:
    segments = document_segments(idx, span)
    return DocumentMask(segments, span, document_block_mask(segments) if flex else None)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: Tensor, span: int) -> Tensor:
    """The SDPA path (CPUs; the reference the flex path is tested against): causal attention within
    segments (B, T) of at most `span` tokens. Queries go in chunks of `span`, each over its own chunk and the
    one before (a segment that reaches a query starts in one of them): two chunks' scores per chunk, never
    T x T."""
    B, H, T, D = q.shape
    if k.size(1) != H:  # grouped-query attention: each key/value head serves H / kv_heads query heads
        k, v = (t.repeat_interleave(H // k.size(1), dim=1) for t in (k, v))
    span = min(span, T)
    if T % span:
        raise ValueError(f"segment_attention: row length {T} is not a multiple of the segment span {span}")
    n = T // span

    def chunks(t: Tensor) -> Tensor:  # (B, H, T, D) -> (B, n, H, span, D)
        return t.view(B, H, n, span, D).transpose(1, 2)

    seg = segments.view(B, n, span)
    keys = chunks(k)
    values = chunks(v)
    key_seg = seg
    if n > 1:  # the previous chunk's keys in front: (B, n, H, 2 * span, D); no chunk before the first
        keys = torch.cat((F.pad(keys[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0)), keys), dim=3)
        values = torch.cat((F.pad(values[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0)), values), dim=3)
        key_seg = torch.cat((F.pad(seg[:, :-1], (0, 0, 1, 0), value=-1), seg), dim=2)
    width = key_seg.size(-1)
    # (span, width): key j sits at chunk offset j - (width - span), so causal is j <= i + width - span
    causal = torch.arange(width, device=q.device)[None, :] <= torch.arange(span, device=q.device)[:, None] + (
        width - span
    )
    allowed = (seg[..., :, None] == key_seg[..., None, :]) & causal  # (B, n, span, width)
    y = F.scaled_dot_product_attention(
        chunks(q).reshape(B * n, H, span, D),
        keys.reshape(B * n, H, width, D),
        values.reshape(B * n, H, width, D),
        attn_mask=allowed.view(B * n, 1, span, width),
    )
    return y.view(B, n, H, span, D).transpose(1, 2).reshape(B, H, T, D)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled on first use: its eager form materialises every score (T x T)."""
    return torch.compile(flex_attention, fullgraph=True, dynamic=False)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocumentMask | None) -> Tensor:
    """(B, heads, T, head_dim) causal attention; with `docs`, within each token's segment only."""
    gqa = k.size(1) != q.size(1)
    if docs is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if docs.block_mask is None:
        return segment_attention(q=q, k=k, v=v, segments=docs.segments, span=docs.span)
    # Inside a compiled model flex_attention is compiled with it; a shape trace (fake tensors) or a CPU runs
    # it eagerly.
    eager = torch.compiler.is_compiling() or not q.is_cuda or isinstance(q, FakeTensor)
    kernel = flex_attention if eager else compiled_flex_attention()
    return kernel(q, k, v, block_mask=docs.block_mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.c_q = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = nn.Linear(cfg.model_dim, kv_dim, bias=False)
        self.c_v = nn.Linear(cfg.model_dim, kv_dim, bias=False)
        self.proj = zero_init(nn.Linear(cfg.model_dim, cfg.model_dim, bias=False))
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base)
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        # Sparse output gate: head j's output x sigmoid(scale * w_j . x[:GATE_WINDOW]); zero init = 0.5.
        self.gate_window, self.gate_scale = cfg.gate_window, cfg.sparse_attn_gate_scale
        self.attn_gate = (
            nn.Parameter(torch.zeros(cfg.num_heads, cfg.gate_window))
            if cfg.sparse_attn_gate_enabled
            else None
        )

    def forward(self, x: Tensor, docs: DocumentMask | None = None) -> Tensor:
        B, T, D = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): one attention per head
        q = self.c_q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q = rms_norm(q) * self.q_gain.to(q.dtype)[:, None, None]
        q, k = self.rotary(q), self.rotary(rms_norm(k))
        # (B, heads, T, head_dim); each group of heads / kv_heads query heads reads one key/value head
        y = causal_attention(q, k, v, docs)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.attn_gate is not None:
            gate = torch.sigmoid(
                self.gate_scale * F.linear(x[..., : self.gate_window], self.attn_gate.to(x.dtype))
            )  # (B, T, heads)
            y = y * gate.transpose(1, 2).unsqueeze(-1)  # gate as (B, heads, T, 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # heads side by side again: (B, T, D)


class DenseMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = zero_init(nn.Linear(hidden, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(mlp_act(self.fc(x), self.act))


class BigramHash(nn.Module):
    """A learned vector per hashed (previous token, token) pair, projected to the model width."""

    def __init__(self, buckets: int, bigram_dim: int, dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, bigram_dim)
        self.proj = zero_init(nn.Linear(bigram_dim, dim, bias=False))
        # Starts as a small correction to the token embedding, so hash collisions cannot dominate early.
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx: Tensor) -> Tensor:
        # Two large odd multipliers (1,000,003 is prime) spread (previous, current) pairs over the buckets.
        pair = (idx[:, :-1] * 92821) ^ (idx[:, 1:] * 1_000_003)
        # The first position (no previous token) and a BOS (whose previous is another document's) get the last
        # bucket.
        first = torch.full_like(idx[:, :1], self.buckets - 1)
        bucket = torch.cat((first, pair % (self.buckets - 1)), dim=1).masked_fill(
            idx == BOS_ID, self.buckets - 1
        )
        return self.scale * self.proj(self.table(bucket))


class SmearGate(nn.Module):
    """Adds to each position's raw embedding the previous position's, scaled by a learned amount times a
    gate read from its first GATE_WINDOW channels; never across a BOS. Zero init: the identity."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.zeros(1, window))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        gate = torch.sigmoid(F.linear(x[:, 1:, : self.window], self.weight.to(x.dtype)))  # (B, T-1, 1)
        # A BOS starts a new document: nothing of the previous one flows into it.
        mixes = (idx[:, 1:] != BOS_ID).to(x.dtype).unsqueeze(-1)
        smeared = x[:, 1:] + self.lam.to(x.dtype) * gate * x[:, :-1] * mixes
        return torch.cat((x[:, :1], smeared), dim=1)


# ---- 5. Mixture of Experts: soft (every expert, softmax-blended), top-k and shared+routed --------
# The modes share MoEBase (router, expert stacks, telemetry) and differ only in how tokens reach experts.
# Experts are 3-D weight stacks, multiplied in batched products (no per-expert loop) and quantized as one
# tensor; each layer's telemetry sits in a buffer, so one all_reduce per step line carries every layer's.
class RoutingStats(NamedTuple):
    """One MoE layer's telemetry since the last step line. Stored flat ([load..., tokens, ...]) in the
    layer's `stats` buffer so that one all_reduce carries every layer; unpack() names the parts."""

    load: Tensor  # tokens (routed: assignments) per expert
    tokens: float
    entropy: float  # summed over tokens, each as a fraction of ln E
    aux: float  # Switch aux loss, summed over forward calls
    z: float  # router z-loss, summed over forward calls
    dropped: float  # assignments over capacity (MOE_DISPATCH=capacity)
    calls: float

    @classmethod
    def unpack(cls, row: Tensor, num_experts: int) -> RoutingStats:
        """Reads the scalars on the host (a sync on a GPU): for logging steps only."""
        return cls(row[:num_experts], *row[num_experts:].tolist())

    @staticmethod
    def load_of(row: Tensor, num_experts: int) -> Tensor:
        """The per-expert load alone, left on the row's device: what a training step may read."""
        return row[:num_experts]


DEAD_LOAD_SHARE = 0.1  # an expert is "dead" when its load is under 10% of the uniform share
COLLAPSE_SHARE = 0.8  # warn when one expert takes more than this share of a layer's tokens
ROUTED_INIT_STD = 0.02  # router init of routed modes: logits of std ~0.45 on RMS-normed inputs


def grouped_matmul(x: Tensor, weight_t: Tensor, offsets: Tensor) -> Tensor:
    """Rows of x in expert order times weight_t[e] (in, out) for the rows of expert e."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, weight_t, offs=offsets)


class MoEBase(nn.Module):
    """Router (fp32 logic, zero-initialised) and routing telemetry shared by all MoE modes. With passes > 1
    (ROUTER_PER_PASS in a looped layer) the router weights, balancing bias and telemetry are stacked, one per
    pass of the loop, while the experts are shared; forward's pass_index picks the pass."""

    def __init__(
        self,
        cfg: ModelConfig,
        dim: int,
        num_experts: int,
        expert_hidden: int,
        router_init_std: float,
        passes: int = 1,
    ):
        super().__init__()
        self.E = num_experts
        self.act = cfg.mlp_act
        self.router_init_std = router_init_std
        self.passes = passes
        per_pass = (passes,) if passes > 1 else ()
        self.router_weight = nn.Parameter(torch.empty(*per_pass, num_experts, dim))
        self.up = nn.Parameter(torch.empty(num_experts, expert_hidden, dim))
        self.down = nn.Parameter(torch.empty(num_experts, dim, expert_hidden))
        self.z_coef, self.aux_coef = cfg.router_z_coef, cfg.moe_aux_loss_coef
        self.aux_terms: list[Tensor] = []  # this forward's weighted router losses; GPT.forward adds them
        self.register_buffer(
            "stats", torch.zeros(*per_pass, len(RoutingStats._fields) - 1 + num_experts), persistent=False
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for matrix in self.up:  # Muon and the init treat every expert as its own matrix
            nn.init.orthogonal_(matrix)
        self.down.zero_()
        # A zero router makes soft MoE start as the dense MLP; routed modes need distinct scores or every
        # token ties.
        self.router_weight.normal_(0.0, self.router_init_std)
        if self.passes > 1:  # every pass starts with the same router (zero for soft MoE): passes start alike
            self.router_weight[1:] = self.router_weight[0]

    def pass_slice(self, t: Tensor, pass_index: int) -> Tensor:
        """This pass's part of a per-pass stacked tensor (router weight, bias, stats)."""
        return t[pass_index] if self.passes > 1 else t

    def router_logits(self, x: Tensor, pass_index: int = 0) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this matmul in bf16
            return F.linear(x.float(), self.pass_slice(self.router_weight, pass_index).float())

    def account(
        self, logits: Tensor, probs: Tensor, load: Tensor, aux_loss=None, dropped=None, pass_index: int = 0
    ):
        """Sets aux_terms (z-loss, Switch aux loss) and accumulates telemetry, while training only."""
        self.aux_terms = []
        if not self.training:
            return
        z = torch.logsumexp(logits, dim=-1).square().mean()
        if self.z_coef:
            self.aux_terms.append(self.z_coef * z)
        if aux_loss is not None and self.aux_coef:
            self.aux_terms.append(self.aux_coef * aux_loss)
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).sum() / max(math.log(self.E), 1e-12)
            zero = torch.zeros((), device=z.device)
            aux_value = zero if aux_loss is None else aux_loss.detach()
            dropped_value = zero if dropped is None else dropped.float()  # extra: in RoutingStats order
            extra = torch.stack(
                (zero + probs.size(0), entropy, aux_value, z.detach(), dropped_value, zero + 1)
            )
            self.pass_slice(self.stats, pass_index).add_(torch.cat((load.float(), extra)))


class SoftMoE(MoEBase):
    """One MLP whose hidden units form E groups, each scaled per token by E * softmax(router(x)).
    One fused up and one fused down matmul; with a zero router (the init) or E = 1 it is the dense MLP."""

    def forward(self, x: Tensor, pass_index: int = 0) -> Tensor:
        logits = self.router_logits(x, pass_index)  # (B, T, E)
        probs = torch.softmax(logits, dim=-1)
        # up (E, hidden, dim) -> one (E * hidden, dim) matrix; hidden: (B, T, E * hidden)
        hidden = mlp_act(F.linear(x, self.up.flatten(0, 1).to(x.dtype)), self.act)
        expert_scale = (self.E * probs).to(hidden.dtype).unsqueeze(-1)  # (B, T, E, 1)
        # (B, T, E * hidden) -> (B, T, E, hidden), each expert's group scaled, -> (B, T, E * hidden)
        hidden = (hidden.unflatten(-1, (self.E, -1)) * expert_scale).flatten(-2)
        # down (E, dim, hidden) -> (dim, E * hidden): one matmul sums the groups' outputs -> (B, T, dim)
        out = F.linear(hidden, self.down.transpose(0, 1).flatten(1).to(hidden.dtype))
        flat_probs = probs.reshape(-1, self.E)  # (B * T, E)
        self.account(logits.reshape(-1, self.E), flat_probs, flat_probs.sum(0), pass_index=pass_index)
        return out


def batch_mean_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the token-mean of softmax(logits) (N, E): ln E when the batch spreads evenly over
    the experts, 0 when it all prefers one. Tokens may each stay confident; only the mean is pushed flat."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, E)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(logits.size(0))  # (E,) log of the token mean
    return -(log_mean.exp() * log_mean).sum()


def switch_aux_loss(counts: Tensor, probs: Tensor, k: int) -> Tensor:
    """E * sum_e (share of assignments to e) * (mean router probability of e): 1 uniform, E collapsed."""
    return probs.size(-1) * ((counts.float() / (probs.size(0) * k)) * probs.mean(0)).sum()


class RoutedMoE(MoEBase):
    """Top-k routing with static-shape dispatch: sort by expert + grouped_mm, or fixed capacity + bmm.
    Selection may add the balancing bias; gates are unbiased scores, not renormalised (top-1 still trains
    the router). shared_routed adds a dense MLP that every token uses."""

    def __init__(self, cfg: ModelConfig, dim: int, passes: int = 1):
        super().__init__(
            cfg=cfg,
            dim=dim,
            num_experts=cfg.num_experts,
            expert_hidden=cfg.expert_mlp_hidden,
            router_init_std=ROUTED_INIT_STD,
            passes=passes,
        )
        self.k = cfg.top_k
        self.score = cfg.router_score
        self.noise = cfg.router_noise
        self.dispatch_mode, self.capacity_factor = cfg.moe_dispatch, cfg.capacity_factor
        self.entropy_coef, self.expert_dropout = cfg.router_entropy_coef, cfg.expert_dropout
        # An untrained router scores ~1/E (softmax) or ~1/2 (sigmoid): this makes the k gates sum to ~1.
        self.gate_scale = (self.E if self.score == "softmax" else 2.0) / self.k
        self.register_buffer("router_bias", torch.zeros(*((passes,) if passes > 1 else ()), self.E))
        self.shared = DenseMLP(dim, cfg.shared_mlp_hidden, cfg.mlp_act) if cfg.shared_mlp_hidden else None

    def route(self, tokens: Tensor, pass_index: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (router logits, scores, chosen experts (T, k), gates (T, k)) for tokens (T, dim)."""
        logits = self.router_logits(tokens, pass_index)
        if self.training and self.noise > 0:
            logits = logits + self.noise * torch.randn_like(logits)
        scores = torch.softmax(logits, -1) if self.score == "softmax" else torch.sigmoid(logits)
        selection = scores + self.pass_slice(self.router_bias, pass_index)  # (T, E)
        if self.training and self.expert_dropout > 0:
            selection = selection.masked_fill(self.draw_dropped_experts(selection.device), -math.inf)
        choice = selection.topk(self.k, dim=-1).indices
        return logits, scores, choice, scores.gather(-1, choice) * self.gate_scale

    def draw_dropped_experts(self, device: torch.device) -> Tensor:
        """(E,) bool: the experts out of this forward's selection, each with probability EXPERT_DROPOUT.
        The k highest draws always stay, so every token still finds k experts; drawn on the device with
        static shapes (no host sync, no recompile)."""
        draws = torch.rand(self.E, device=device)
        kth_highest = draws.topk(self.k).values[-1]
        return (draws < self.expert_dropout) & (draws < kth_highest)

    def forward(self, x: Tensor, pass_index: int = 0) -> Tensor:
        tokens = x.reshape(-1, x.size(-1))  # (B, T, dim) -> (N, dim), N = B * T
        logits, scores, choice, gate = self.route(tokens, pass_index)  # choice, gate: (N, k)
        flat = choice.reshape(-1)  # (N * k,): the k choices of token t sit at t*k .. t*k+k-1
        counts = torch.zeros(self.E, dtype=torch.long, device=x.device)  # (E,) rows per expert
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        order = torch.argsort(flat, stable=True)  # (N * k,) assignment slots grouped by expert
        dispatch = self.dispatch_grouped if self.dispatch_mode == "grouped" else self.dispatch_capacity
        # grouped_mm is fast only in bf16 (and compiles only in bf16); eager CPU keeps fp32 for exact tests.
        autocast_on = torch.is_autocast_enabled(tokens.device.type)
        bf16 = tokens.is_cuda or torch.compiler.is_compiling() or autocast_on
        sorted_tokens = tokens.to(torch.bfloat16 if bf16 else tokens.dtype)[order // self.k]  # (N * k, dim)
        rows, dropped = dispatch(sorted_tokens, flat[order], counts)  # (N * k, dim), in expert order
        slots = torch.empty_like(rows).index_copy(0, order, rows)  # (N * k, dim), back in token order
        weighted = slots.view(tokens.size(0), self.k, -1) * gate.to(rows.dtype).unsqueeze(-1)  # (N, k, dim)
        out = weighted.sum(1).view(x.shape)  # (N, dim) -> (B, T, dim)
        if self.shared is not None:
            out = out + self.shared(x)
        probs = scores / scores.sum(-1, keepdim=True)
        self.account(
            logits=logits,
            probs=probs,
            load=counts,
            aux_loss=switch_aux_loss(counts, probs, self.k),
            dropped=dropped,
            pass_index=pass_index,
        )
        if self.training and self.entropy_coef:  # maximised: its negative joins the loss
            self.aux_terms.append(-self.entropy_coef * batch_mean_entropy(logits))
        return out

    def expert_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """up (E, hidden, dim) -> (E, dim, hidden), down (E, dim, hidden) -> (E, hidden, dim): x @ w."""
        return self.up.transpose(1, 2).to(dtype), self.down.transpose(1, 2).to(dtype)

    def dispatch_grouped(self, xs: Tensor, experts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        up, down = self.expert_weights(xs.dtype)
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group in xs (rows, dim)
        # Autocast runs square() (aten::pow) in fp32 and grouped_mm has no autocast kernel: cast back by hand.
        hidden = mlp_act(grouped_matmul(xs, up, offsets), self.act).to(xs.dtype)
        return grouped_matmul(hidden, down, offsets), torch.zeros((), device=xs.device)

    def dispatch_capacity(self, xs: Tensor, experts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Fixed buffers of C rows per expert; rows past C are dropped (output 0) and counted."""
        E, (rows, dim) = self.E, xs.shape
        cap = math.ceil(self.capacity_factor * rows / E)
        slot = torch.arange(rows, device=xs.device) - (counts.cumsum(0) - counts)[experts]
        keep = slot < cap
        dest = torch.where(keep, experts * cap + slot, E * cap)  # dropped rows land in a spare row
        # rows -> (E * cap + 1, dim) with the spare row, dropped -> (E, cap, dim): one buffer per expert
        buf = xs.new_zeros(E * cap + 1, dim).index_copy(0, dest, xs)[:-1].view(E, cap, dim)
        up, down = self.expert_weights(xs.dtype)
        out = torch.bmm(mlp_act(torch.bmm(buf, up), self.act), down).reshape(E * cap, dim)
        # a zero spare row appended, then each input row reads its output back: (rows, dim)
        return torch.cat((out, out.new_zeros(1, dim)))[dest], (~keep).sum()


def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    if layer not in cfg.moe_layer_ids:
        return DenseMLP(cfg.model_dim, cfg.mlp_hidden, cfg.mlp_act)
    looped = cfg.num_loops > 0 and cfg.loop_start <= layer <= cfg.loop_end
    passes = cfg.router_passes if looped else 1
    if cfg.moe_mode == "soft":
        return SoftMoE(
            cfg, cfg.model_dim, cfg.num_experts, cfg.expert_mlp_hidden, router_init_std=0.0, passes=passes
        )
    return RoutedMoE(cfg, cfg.model_dim, passes)


def moe_layers(model: nn.Module) -> list[tuple[int, MoEBase]]:
    return [(i, b.mlp) for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEBase)]


def routing_rows(model: nn.Module) -> list[tuple[int, int | None, MoEBase]]:
    """(layer, pass or None for a single router, module): one telemetry row each, in stats order."""
    return [
        (layer, p if m.passes > 1 else None, m) for layer, m in moe_layers(model) for p in range(m.passes)
    ]


@torch.no_grad()
def collect_routing_stats(model: nn.Module, bias_rate: float, world_size: int) -> Tensor | None:
    """Sums this step's routing buffers over ranks, resets them and nudges the balancing bias, all on the
    device: nothing here waits for the GPU (the totals are read at logging steps).
    Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load), re-centred."""
    layers = moe_layers(model)
    if not layers:
        return None
    stats = torch.cat([m.stats.view(-1, m.stats.size(-1)) for _, m in layers])  # a row per layer and pass
    if world_size > 1:
        dist.all_reduce(stats)
    for (_, p, m), row in zip(routing_rows(model), stats):
        m.stats.zero_()
        if bias_rate > 0 and isinstance(m, RoutedMoE):
            load, bias = RoutingStats.load_of(row, m.E), m.pass_slice(m.router_bias, p or 0)
            bias.add_(bias_rate * torch.sign(load.mean() - load))
            bias.sub_(bias.mean())
    return stats


def routing_log_lines(summary: list[dict]) -> list[str]:
    lines = []
    for r in summary:
        where = f"layer:{r['layer']}" + ("" if r["pass"] is None else f" pass:{r['pass']}")
        lines.append(
            f"moe {where} load:{','.join(f'{v:.3f}' for v in r['load'])} "
            f"max_mean:{r['max_over_mean']:.2f} dead:{r['dead']} entropy:{r['entropy']:.3f} "
            f"aux:{r['aux']:.4f} z:{r['z']:.4f} bias:{r['bias_min']:.4f}..{r['bias_max']:.4f} "
            f"drop:{r['drop_rate']:.4f}"
        )
        if max(r["load"]) > COLLAPSE_SHARE:
            lines.append(
                f"WARNING moe {where} routing collapse: one expert takes "
                f"{100 * max(r['load']):.1f}% of the tokens"
            )
    return lines


def routing_summary(model: nn.Module, stats: Tensor) -> list[dict]:
    """Per MoE layer (and pass, with per-pass routers): load shares, max/mean, dead experts, entropy / ln E,
    aux, z, bias, drop rate. `pass` is None for a layer with one router."""
    out = []
    for (layer, p, m), row in zip(routing_rows(model), stats.double().cpu()):
        totals = RoutingStats.unpack(row, m.E)
        calls, tokens = max(totals.calls, 1), max(totals.tokens, 1)
        load = (totals.load / max(totals.load.sum().item(), 1e-12)).tolist()
        bias = m.pass_slice(m.router_bias, p or 0).tolist() if isinstance(m, RoutedMoE) else [0.0]
        out.append(
            dict(
                layer=layer,
                **{"pass": p},  # a Python keyword, so not pass=p
                load=load,
                load_std=float(np.std(load)),
                max_over_mean=max(load) * m.E,
                dead=sum(share < DEAD_LOAD_SHARE / m.E for share in load),
                entropy=totals.entropy / tokens,
                aux=totals.aux / calls,
                z=totals.z / calls,
                bias_min=min(bias),
                bias_max=max(bias),
                drop_rate=totals.dropped / (tokens * getattr(m, "k", 1)),
            )
        )
    return out


# ---- 6. The network: blocks with an MLP or MoE, U-Net skips, the loss ----------------------------
# GPT fixes its layer order per loop state (plain, looped) at construction, so torch.compile sees one static
# graph per state; the state is mirrored in a buffer the artifact keeps, so a reloaded model is evaluated
# as it was trained.
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = make_mlp(cfg, layer)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        self.ln_scale = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0  # deeper blocks read smaller inputs
        self.parallel = 0 < cfg.parallel_start_layer <= layer
        if self.parallel:
            # Lane j keeps lane_resid[j] x itself + lane_post[j] . (attention, MLP); the record's init.
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def forward(self, x: Tensor, x0: Tensor, pass_index: int = 0, docs: DocumentMask | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln_scale, docs)
        per_pass = {"pass_index": pass_index} if isinstance(self.mlp, MoEBase) else {}
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_scale, **per_pass)

    def forward_lanes(
        self, lanes: tuple[Tensor, Tensor], x0: Tensor, docs: DocumentMask | None = None
    ) -> tuple[Tensor, Tensor]:
        """Parallel residual: attention reads lane 0 (mixed with x0), the MLP lane 1; both write both."""
        dtype = x0.dtype
        mix, resid, post = self.resid_mix.to(dtype), self.lane_resid.to(dtype), self.lane_post.to(dtype)
        attn = self.attn_scale.to(dtype) * self.attn(
            rms_norm(mix[0] * lanes[0] + mix[1] * x0) * self.ln_scale, docs
        )
        mlp = self.mlp_scale.to(dtype) * self.mlp(rms_norm(lanes[1]) * self.ln_scale)
        return tuple(resid[j] * lanes[j] + post[j, 0] * attn + post[j, 1] * mlp for j in range(2))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        if not isinstance(cfg, ModelConfig):  # a run configuration carries training knobs too
            raise TypeError(f"GPT takes a ModelConfig, not {type(cfg).__name__}: use GPT(h.model)")
        super().__init__()
        self.cfg = cfg  # the contract it was built from: the artifact stores its knobs
        self.softcap, self.vocab_size = cfg.logit_softcap, cfg.vocab_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = (
            BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, cfg.model_dim)
            if cfg.bigram_vocab_size > 0
            else None
        )
        self.smear = SmearGate(cfg.gate_window) if cfg.smear_gate else None
        self.respect_doc_boundaries = cfg.respect_doc_boundaries
        self.flex_attention: bool | None = None  # None: flex_attention on a GPU, the SDPA path elsewhere
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        # Depth recurrence: once on, layers LOOP_START..LOOP_END run NUM_LOOPS more times. A Python bool (one
        # compiled graph per state), mirrored in a buffer the artifact keeps, so a reloaded model runs alike.
        plain = list(range(cfg.num_layers))
        repeats = plain[cfg.loop_start : cfg.loop_end + 1] * cfg.num_loops
        self.orders = (plain, plain[: cfg.loop_end + 1] + repeats + plain[cfg.loop_end + 1 :])
        # Each position's pass: 0 on a layer's first visit, then 1, 2, ... (for per-pass routers).
        self.pass_indices = tuple(
            [order[:pos].count(layer) for pos, layer in enumerate(order)] for order in self.orders
        )
        self.looping = False
        self.register_buffer("loop_state", torch.zeros(()))
        self.skip_weights = nn.Parameter(torch.ones(len(self.orders[1]) // 2, cfg.model_dim))
        # Gated skips: the decoder input becomes lerp(skip, stream, sigmoid(gate)); zero init = an even mix.
        self.skip_gates = (
            nn.Parameter(torch.zeros(len(self.orders[1]) // 2, cfg.model_dim))
            if cfg.skip_gates_enabled
            else None
        )
        self.lm_head = (
            None if cfg.tie_embeddings else zero_init(nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False))
        )
        self.reset_parameters(cfg.tied_embed_init_std)

    @torch.no_grad()
    def reset_parameters(self, embed_std: float) -> None:
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        if self.bigram is not None:
            nn.init.normal_(self.bigram.table.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, MoEBase):
                module.reset_parameters()
            elif isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight)

    def set_looping(self, on: bool) -> None:
        self.looping = bool(on)
        self.loop_state.fill_(float(self.looping))

    def load_state_dict(self, state, *args, **kwargs):
        result = super().load_state_dict(state, *args, **kwargs)
        self.looping = bool(self.loop_state.item())
        return result

    def embed(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx)
        if self.smear is not None:  # on the raw embedding, before its norm, as the record
            x = self.smear(x, idx)
        return rms_norm(x)

    def document_mask(self, idx: Tensor, doc_span: int | None) -> DocumentMask | None:
        if not self.respect_doc_boundaries or doc_span is None:
            return None
        flex = idx.is_cuda if self.flex_attention is None else self.flex_attention
        return document_mask(idx, doc_span or idx.size(1), flex)

    def hidden(self, idx: Tensor, doc_span: int | None = 0) -> Tensor:
        """Final hidden states of idx (B, T). With RESPECT_DOC_BOUNDARIES, doc_span says what a row holds:
        packed documents cut every doc_span tokens (training); 0: a window, its documents cut by the row's
        ends (evaluation); None: one document from its start (TTT), where plain causal attention is the
        same."""
        x = self.embed(idx)
        docs = self.document_mask(idx, doc_span)
        x0 = x
        skips = []
        lanes = None
        routing_aux = []
        order, pass_indices = self.orders[self.looping], self.pass_indices[self.looping]
        n_encoder = len(order) // 2
        for pos, layer in enumerate(order):
            block = self.blocks[layer]
            if block.parallel and lanes is None:
                lanes = (x, x)
            if pos >= n_encoder and skips:  # U-Net: decoder position j joins encoder output n_enc-1-j
                skip = self.skip_weights[pos - n_encoder].to(x.dtype) * skips.pop()
                if lanes is None:
                    x = self.join_skip(x, skip, pos - n_encoder)
                else:
                    lanes = (self.join_skip(lanes[0], skip, pos - n_encoder), lanes[1])
            if lanes is None:
                x = block(x, x0, pass_indices[pos], docs)
            else:
                lanes = block.forward_lanes(lanes, x0, docs)
            routing_aux += getattr(block.mlp, "aux_terms", [])  # a looped MoE layer adds its losses per pass
            if pos < n_encoder:
                skips.append(x)
        self.routing_aux = routing_aux
        # The record's final lane mix: the mean of the two lanes.
        return rms_norm(x if lanes is None else 0.5 * (lanes[0] + lanes[1]))

    def join_skip(self, stream: Tensor, skip: Tensor, j: int) -> Tensor:
        if self.skip_gates is None:
            return stream + skip
        return torch.lerp(skip, stream, torch.sigmoid(self.skip_gates[j].to(stream.dtype)))

    def logits(self, idx: Tensor, doc_span: int = 0) -> Tensor:
        return self.head(self.hidden(idx, doc_span))

    def head(self, hidden: Tensor, delta: Tensor | None = None) -> Tensor:
        """Softcapped logits of final hidden states, plus a TTT adapter's `delta` when given."""
        logits = F.linear(hidden, self.tok_emb.weight if self.lm_head is None else self.lm_head.weight)
        logits = (logits if delta is None else logits + delta).float()
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward(self, idx: Tensor, targets: Tensor, doc_span: int = 0) -> tuple[Tensor, Tensor]:
        """Returns (loss to minimise = cross-entropy + auxiliary routing losses, cross-entropy)."""
        ce = F.cross_entropy(self.logits(idx, doc_span).view(-1, self.vocab_size), targets.reshape(-1))
        aux = self.routing_aux  # set by this forward
        return (ce + torch.stack(aux).sum() if aux else ce), ce.detach()


# ---- 7. Optimizer: Muon (orthogonalised momentum) for block matrices, Adam for the rest ----------
# A tensor's class comes from its name (param_class), one rule that the optimizer groups, weight decay and
# the quantizer's grid all read, so a tensor is treated alike everywhere. Muon takes block matrices and
# experts; Adam the embeddings, the head, control tensors and the routers (without weight decay).
CONTROL_PATTERNS = (
    "resid_mix",
    "skip_weights",
    "skip_gates",
    "q_gain",
    "attn_scale",
    "mlp_scale",
    "smear",
    "bigram.scale",
    "attn_gate",
    "lane_",
)
MATRIX_CLASSES = ("attn", "mlp", "bigram_proj", "other")  # trained by Muon
# Which bits, clip sigmas and shrink step a class of weights follows (quantization section).
QUANT_GROUP = {
    "embed": "embed",
    "head": "embed",
    "bigram_table": "bigram",
    "bigram_proj": "bigram",
    "mlp": "mlp",
    "attn": "attn",
}


def param_class(name: str, t: Tensor) -> str:
    """The one sorting of parameter names, used by the optimizer groups, quantization and FLOP counts."""
    if name.startswith("tok_emb."):
        return "embed"
    if name.startswith("lm_head."):
        return "head"
    if name.startswith("bigram.table"):
        return "bigram_table"
    if "router" in name:
        return "router"
    if t.ndim < 2 or any(s in name for s in CONTROL_PATTERNS):
        return "control"
    if name.startswith("bigram."):
        return "bigram_proj"
    return "mlp" if ".mlp." in name else "attn" if ".attn." in name else "other"


def muon_dtype(t: Tensor) -> torch.dtype:
    return torch.bfloat16 if t.is_cuda else torch.float32  # CPUs without bf16 units are slow in bf16


# Polar Express (Amsel et al., 2025), as the 1.0611 record: a minimax-optimal quintic per step; later steps
# repeat the last.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz(G: Tensor, steps: int, eps: float = 1e-7, row_normalize: bool = False) -> Tensor:
    """Approximately orthogonalise each matrix in G (2-D, or a stack of experts in 3-D). row_normalize
    (MuonEq-R) first gives every row unit norm, so no row's scale dominates the update."""
    X = G.to(muon_dtype(G))
    if row_normalize:
        X = X / X.norm(dim=-1, keepdim=True).clamp_min(eps)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for step in range(steps):
        a, b, c = POLAR_EXPRESS[min(step, len(POLAR_EXPRESS) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised; each rank orthogonalises every world_size-th matrix."""

    def __init__(
        self, params, lr, momentum, backend_steps, weight_decay, rank=0, world_size=1, row_normalize=False
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay)
        )
        self.rank = rank
        self.world_size = world_size
        self.row_normalize = row_normalize

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(
                sum(p.numel() for p in params), device=params[0].device, dtype=muon_dtype(params[0])
            )
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = newton_schulz(
                        p.grad.add(buf, alpha=group["momentum"]),
                        group["backend_steps"],
                        row_normalize=self.row_normalize,
                    )
                    update *= max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    flat[offset : offset + p.numel()] = update.flatten()
                offset += p.numel()
            if self.world_size > 1:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(
    model: nn.Module, optim: OptimConfig, rank: int = 0, world_size: int = 1
) -> list[torch.optim.Optimizer]:
    groups: dict[str, list] = {
        "matrix": [],
        "embed": [],
        "bigram_table": [],
        "head": [],
        "control": [],
        "router": [],
    }
    for name, p in model.named_parameters():
        cls = param_class(name, p)
        groups["matrix" if cls in MATRIX_CLASSES else cls].append(p)
    tied = not groups["head"]  # an untied output head is the only "head" tensor
    adam_groups = [
        dict(
            params=groups["embed"],
            lr=optim.tied_embed_lr if tied else optim.embed_lr,
            weight_decay=optim.embed_wd,
        ),
        dict(params=groups["bigram_table"], lr=optim.tied_embed_lr, weight_decay=optim.embed_wd),
        dict(params=groups["head"], lr=optim.head_lr, weight_decay=optim.embed_wd),
        dict(params=groups["control"], lr=optim.scalar_lr, weight_decay=optim.adam_wd),
        dict(params=groups["router"], lr=optim.router_lr, weight_decay=0.0),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    fused = next(model.parameters()).is_cuda
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adam_groups, betas=(optim.beta1, optim.beta2), eps=optim.adam_eps, fused=fused)
    ]
    if groups["matrix"]:
        optimizers.append(
            Muon(
                params=groups["matrix"],
                lr=optim.matrix_lr,
                momentum=optim.muon_momentum,
                backend_steps=optim.muon_backend_steps,
                weight_decay=optim.muon_wd,
                rank=rank,
                world_size=world_size,
                row_normalize=optim.muon_row_normalize,
            )
        )
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return optimizers


def lr_scale(progress: float, warmdown_frac: float, min_lr: float = 0.0) -> float:
    """Flat, then a linear warm-down over the last WARMDOWN_FRAC of the run to the floor MIN_LR."""
    if warmdown_frac > 0 and progress > 1 - warmdown_frac:
        return max(min_lr, (1 - progress) / warmdown_frac)
    return 1.0


# Without EMA_DECAY the average spans the last ~5.8% of the run: the record's 0.9965 at its ~4,930 steps.
EMA_RUN_HORIZON = 0.058


class EMA:
    """Exponential moving average of the parameters, in fp32."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


# ---- 8. Quantization and the artifact: SDClip grid, GPTQ or round-to-nearest, LQER, compressors ----
# The artifact holds integers on an SDClip grid with per-row scales, LQER factors, fp16 control tensors and
# the model knobs, so the network is rebuilt from the file alone. The export shrinks the model step by step
# only when code + artifact would pass SIZE_CAP_BYTES, and predicts each step cheaply first.
ARTIFACT_MAGIC, ARTIFACT_FORMAT, ARTIFACT_VERSION = b"PGMOE\x00", "pgolf-moe-artifact", 2


def lrzip(data: bytes, *args: str) -> bytes:  # through stdin and stdout
    return subprocess.run(["lrzip", "-q", *args], input=data, capture_output=True, check=True).stdout


# name -> (what it needs: a python module or a system binary, compress(data, zstd level), decompress)
COMPRESSORS = {
    "zstd": (
        "zstandard",
        lambda d, level: zstandard.ZstdCompressor(level=level, write_checksum=True).compress(d),
        lambda b: zstandard.ZstdDecompressor().decompress(b),
    ),
    "brotli": (
        "brotli",
        lambda d, level: importlib.import_module("brotli").compress(d, quality=11),
        lambda b: importlib.import_module("brotli").decompress(b),
    ),
    "lzma": (
        "lzma",
        lambda d, level: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
        lambda b: lzma.decompress(b),
    ),
    "lrzip": ("lrzip binary", lambda d, level: lrzip(d, "-z", "-L", "9"), lambda b: lrzip(b, "-d")),
}
# Compressed bits of a row's fp16 scale and of an fp16 parameter, measured on the sample model.
SCALE_BITS, FP16_BITS = 13.0, 14.7


class ArtifactError(ValueError):
    """An artifact that cannot be read back; the message names the file."""


def compressor_missing(name: str) -> str | None:
    """What COMPRESSOR=name needs that is not installed, or None."""
    need = COMPRESSORS[name][0]
    found = shutil.which(need.split()[0]) if need.endswith(" binary") else importlib.util.find_spec(need)
    return None if found else f"the {need} (python module or binary on PATH)"


def storage_grid(name: str, t: Tensor, quant: QuantConfig) -> tuple[int, float]:
    """(bits, clip sigmas) a tensor is stored with; 16 bits = fp16 (routers, controls, small tensors)."""
    keep = tuple(p for p in quant.fp16_keep_name_patterns.split(",") if p)
    cls = param_class(name, t)
    if cls in ("router", "control") or t.numel() <= quant.fp16_keep_max_numel or any(p in name for p in keep):
        return 16, 0.0
    group = QUANT_GROUP.get(cls, "other")
    sigmas = {"embed": quant.embed_clip_sigmas, "mlp": quant.mlp_clip_sigmas, "attn": quant.attn_clip_sigmas}
    expert = cls == "mlp" and name.endswith((".mlp.up", ".mlp.down"))  # an MoE layer's 3-D expert stacks
    # EXPERT_BITS stays 0 in the run's record when unset, so a dense run's config holds no MoE knob.
    bits = (
        quant.embed_bits
        if group == "embed"
        else (quant.expert_bits or quant.matrix_bits)
        if expert
        else quant.matrix_bits
    )
    return bits, sigmas.get(group, quant.matrix_clip_sigmas)


def sdclip_scale(w: Tensor, bits: int, sigmas: float) -> Tensor:
    """SDClip: each row's step is sigmas x its std / qmax, so the grid spans +-sigmas standard deviations."""
    return (sigmas * w.float().std(dim=-1) / (2 ** (bits - 1) - 1)).clamp_min(6e-8).half()


def round_to_grid(w: Tensor, scale: Tensor, bits: int, zero: Tensor | None = None) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(w.float() / scale.float()[:, None]), -qmax, qmax)
    return q if zero is None else q.masked_fill(zero, 0)


def fake_quantize(w: Tensor, bits: int, sigmas: float) -> Tensor:
    """w on its round-to-nearest export grid, dequantized as the reader does: the QAT forward weights."""
    rows = w.detach().reshape(-1, w.size(-1))
    scale = sdclip_scale(rows, bits, sigmas)
    return (round_to_grid(rows, scale, bits) * scale.float()[:, None]).reshape(w.shape).to(w.dtype)


def gptq(
    w: Tensor, H: Tensor, scale: Tensor, bits: int, zero: Tensor | None = None, block: int = 128
) -> Tensor:
    """GPTQ: column by column, each column's error fed into later columns through the inverse Hessian."""
    W, H = w.float().clone(), H.float().clone()
    H.diagonal().add_(0.01 * H.diagonal().mean() + 1e-6)  # damping; inputs that never fire stay invertible
    perm = torch.argsort(H.diagonal(), descending=True)
    W = W[:, perm]
    H = H[perm][:, perm]
    s = scale.float()[:, None]
    zero = None if zero is None else zero[:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(0, W.size(1), block):
        end = min(i + block, W.size(1))
        Wb = W[:, i:end].clone()
        Ub = U[i:end, i:end]
        err = torch.zeros_like(W[:, i:end])
        for j in range(end - i):
            Q[:, i + j : i + j + 1] = q = round_to_grid(
                Wb[:, j : j + 1], scale, bits, None if zero is None else zero[:, i + j : i + j + 1]
            )
            err[:, j : j + 1] = (Wb[:, j : j + 1] - q * s) / Ub[j, j]
            Wb[:, j:] -= err[:, j : j + 1] * Ub[j : j + 1, j:]
        W[:, end:] -= err @ U[i:end, end:]
    return Q[:, torch.argsort(perm)]


def packed_bits(q: Tensor) -> int:
    return 8 * len(zstandard.ZstdCompressor(level=3).compress(q.to(torch.int8).cpu().numpy().tobytes()))


def quantize_matrix(w: Tensor, H: Tensor | None, bits: int, sigmas: float, zero: Tensor | None = None):
    """-> (integers, fp16 row scales) of a 2-D matrix on its SDClip grid. With a Hessian, GPTQ: its step is
    widened until it costs no more bytes than round-to-nearest, and the one with less output error is
    kept."""
    scale = sdclip_scale(w, bits, sigmas)
    q = round_to_grid(w, scale, bits, zero)
    if H is None:
        return q, scale

    def out_err(q, s):  # tr(E H E^T): the squared error of the layer's outputs on the calibration inputs
        delta = q * s.float()[:, None] - w.float()
        return (delta @ H.float() * delta).sum()

    scale_g, budget = scale, packed_bits(q)
    # The byte count is noisy (about 0.005 bits per weight on a small matrix), so the widening gets five
    # tries to land within the budget; three gave up on a 4-bit matrix a fourth try fitted.
    for _ in range(5):
        q_g = gptq(w=w, H=H, scale=scale_g, bits=bits, zero=zero)
        added = (packed_bits(q_g) - budget) / q.numel()  # bits per weight over round-to-nearest
        if added <= 0.001:  # compressor noise
            return min((q, scale), (q_g, scale_g), key=lambda c: out_err(*c))
        scale_g = (scale_g.float() * 2 ** (1.25 * added)).half()  # a step twice as wide saves ~1 bit
    return q, scale


def quantize_tensor(
    name: str, t: Tensor, quant: QuantConfig, hessian: Tensor | None, drop: int, prune: float
) -> tuple[int, list[Tensor]]:
    """-> (bits, [fp16 tensor]) or (bits, [integers, row scales]); 3-D experts one matrix at a time.
    `h` is the run's knobs; `hessian` the tensor's GPTQ Hessian (one per expert for 3-D experts)."""
    bits, sigmas = storage_grid(name, t, quant)
    if bits == 16:
        return 16, [t.half()]
    bits, parts = max(2, bits - drop), []
    for i, w in enumerate(t.reshape(-1, *t.shape[-2:])):
        use_gptq = hessian is not None and quant.quant_method == "gptq"
        H = hessian.reshape(-1, *hessian.shape[-2:])[i] if use_gptq else None  # this matrix's (in, in)
        if H is not None and not (w.isfinite().all() and H.isfinite().all()):
            H = None  # a non-finite tensor is rounded, not GPTQ'd; the run is INVALID
        w = w if H is None else w.to(H.device)  # GPTQ runs where the Hessian is: the GPU in a real run
        zero = (
            w.abs() <= w.abs().flatten().kthvalue(max(1, int(prune * w.numel()))).values
            if prune > 0
            else None
        )
        parts.append(quantize_matrix(w=w, H=H, bits=bits, sigmas=sigmas, zero=zero))
    return bits, [
        torch.cat([q for q, _ in parts]).to(torch.int8).cpu(),
        torch.cat([s for _, s in parts]).cpu(),
    ]


def lqer_factors(err: Tensor, H: Tensor | None, rank: int, bits: int) -> list[Tensor]:
    """LQER: rank-r A @ B ~ the error with input columns scaled by activation RMS; A^T, B as per-row intN."""
    d = (
        H.reshape(-1, *H.shape[-2:]).sum(0).diagonal().clamp_min(0).sqrt() + 1e-8
        if H is not None
        else torch.ones(err.size(1))
    )
    U, S, Vh = torch.linalg.svd(err * d, full_matrices=False)
    factors = []
    for m in ((U[:, :rank] * S[:rank]).T, Vh[:rank] / d):
        scale = (m.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).clamp_min(6e-8).half()
        factors += [round_to_grid(m, scale, bits).to(torch.int8), scale]
    return factors


def dequantize_entry(bits: int, tensors: list[Tensor], shape) -> Tensor:
    if bits == 16:
        return tensors[0].float().reshape(shape)
    w = tensors[0].float() * tensors[1].float()[:, None]
    if len(tensors) == 6:  # with LQER factors
        w = w + (tensors[2].float() * tensors[3].float()[:, None]).T @ (
            tensors[4].float() * tensors[5].float()[:, None]
        )
    return w.reshape(shape)


def quantize_state(
    state: dict[str, Tensor],
    quant: QuantConfig,
    hessians: dict | None = None,
    bits_drop: dict | None = None,
    extra_prune: float = 0.0,
    progress=None,
):
    """-> (entries, relative squared error of the quantized tensors). entries: name -> (bits, tensors)."""
    entries = {}
    scores = {}
    err = 0.0
    total = 0.0
    hessians = hessians or {}
    for done, (name, t) in enumerate(state.items(), 1):
        if progress is not None:
            progress(done - 1)
        t, H = t.detach().float().cpu(), None if hessians.get(name) is None else hessians[name].float()
        drop = (bits_drop or {}).get(QUANT_GROUP.get(param_class(name, t), "other"), 0)
        entries[name] = quantize_tensor(
            name=name, t=t, quant=quant, hessian=H, drop=drop, prune=quant.prune_frac + extra_prune
        )
        if entries[name][0] == 16:
            continue
        delta = t - dequantize_entry(*entries[name], t.shape)
        err, total = err + delta.square().sum().item(), total + t.square().sum().item()
        if H is not None or not hessians:  # LQER ranks by output error tr(E H E^T), or |E|^2 without Hessians
            d = delta.reshape(-1, *t.shape[-2:])
            score = (
                (d @ H.cpu().reshape(-1, *H.shape[-2:]) * d).sum().item()
                if H is not None
                else d.square().sum().item()
            )
            if math.isfinite(score):  # a non-finite tensor gets no correction
                scores[name] = score
    for name in sorted(scores, key=scores.get, reverse=True)[: quant.lqer_top_k if quant.lqer_enabled else 0]:
        t = state[name].detach().float().cpu().reshape(-1, state[name].size(-1))
        before = t - dequantize_entry(*entries[name], t.shape)
        H = None if hessians.get(name) is None else hessians[name].float().cpu()
        entries[name][1].extend(lqer_factors(before, H, quant.lqer_rank, quant.lqer_factor_bits))
        err += (
            t - dequantize_entry(*entries[name], t.shape)
        ).square().sum().item() - before.square().sum().item()
    return entries, err / max(total, 1e-30)


def serialize_artifact(
    entries: dict, config: dict, shapes: dict, compressor: str = "", level: int = 3
) -> bytes:
    """Compressor name, header length, CRC32, then compressed apart (a text header in front costs zstd ~10%)
    the header (magic, JSON: format, config, tensor table) and the data: the integers of one role (every
    layer's attn.c_q, ...) side by side, then scales and LQER factors, then fp16. No compressor: quick
    zstd."""
    role = lambda name: ".".join(p for p in name.split(".") if not p.isdigit())  # noqa: E731
    parts = sorted(
        (2 if bits == 16 else min(j, 1), role(name), name, j, t.contiguous())
        for name, (bits, ts) in entries.items()
        for j, t in enumerate(ts)
    )
    table = {name: dict(name=name, bits=bits, parts=[None] * len(ts)) for name, (bits, ts) in entries.items()}
    blobs, offset = [], 0
    for *_, name, j, t in parts:
        blobs.append(t.numpy().tobytes())
        table[name]["parts"][j] = [offset, list(t.shape), str(t.dtype).removeprefix("torch.")]
        offset += len(blobs[-1])
    header = (
        ARTIFACT_MAGIC
        + json.dumps(
            dict(
                format=ARTIFACT_FORMAT,
                version=ARTIFACT_VERSION,
                config=config,
                shapes=shapes,
                tensors=list(table.values()),
            )
        ).encode()
    )
    compress = (
        COMPRESSORS[compressor][1]
        if compressor
        else lambda d, lvl: zstandard.ZstdCompressor(level=lvl).compress(d)
    )
    head, data = compress(header, level), b"".join(blobs)
    checksum = zlib.crc32(data, zlib.crc32(header))  # brotli and lzma frames carry none
    return (
        compressor.encode().ljust(8, b"\0")
        + struct.pack("<II", len(head), checksum)
        + head
        + compress(data, level)
    )


def unpack_artifact(path: str) -> tuple[dict, dict]:
    """-> (JSON header, entries) of an artifact file; errors name the file and the problem."""
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: no such artifact")
    with open(path, "rb") as f:
        blob = f.read()
    compressor = blob[:8].rstrip(b"\0").decode("ascii", "replace")
    if compressor not in COMPRESSORS or len(blob) < 16:
        raise ArtifactError(
            f"{path}: corrupt or truncated artifact, or not a {ARTIFACT_FORMAT} v{ARTIFACT_VERSION} file "
            f"(unknown compressor tag {blob[:8]!r})"
        )
    hlen, checksum = struct.unpack_from("<II", blob, 8)
    try:
        header, data = (COMPRESSORS[compressor][2](b) for b in (blob[16 : 16 + hlen], blob[16 + hlen :]))
    except Exception as err:  # each compressor raises its own error types
        raise ArtifactError(f"{path}: corrupt or truncated artifact ({compressor}: {err})") from None
    if zlib.crc32(data, zlib.crc32(header)) != checksum:
        raise ArtifactError(f"{path}: corrupt or truncated artifact (checksum mismatch)")
    try:
        header = json.loads(header.removeprefix(ARTIFACT_MAGIC)) if header.startswith(ARTIFACT_MAGIC) else {}
    except ValueError:
        header = {}
    if header.get("format") != ARTIFACT_FORMAT or header.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{path}: not a {ARTIFACT_FORMAT} v{ARTIFACT_VERSION} artifact (bad magic or header)"
        )
    entries = {}
    for e in header["tensors"]:
        tensors = []
        for offset, shape, dtype in e["parts"]:
            end = offset + math.prod(shape) * getattr(torch, dtype).itemsize
            if end > len(data):
                raise ArtifactError(f"{path}: tensor {e['name']} runs past the end of the data")
            tensors.append(
                torch.frombuffer(bytearray(data[offset:end]), dtype=getattr(torch, dtype)).reshape(shape)
            )
        entries[e["name"]] = (e["bits"], tensors)
    return header, entries


def read_artifact(path: str) -> tuple[dict, dict[str, Tensor]]:
    """-> (model knobs, dequantized float state dict)."""
    header, entries = unpack_artifact(path)
    return header["config"], {
        n: dequantize_entry(bits, ts, header["shapes"][n]) for n, (bits, ts) in entries.items()
    }


def artifact_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def shrink_steps():
    """Deterministic shrink steps, in order of growing reconstruction error: (bits lowered, extra pruning)."""
    every = {"mlp": 1, "attn": 1, "embed": 1, "bigram": 1}
    for drops in ({}, {"mlp": 1}, {"mlp": 1, "attn": 1}, every, dict(every, mlp=2)):
        for extra in (0.0, 0.02, 0.05, 0.1):
            if drops or extra:
                yield drops, extra


def export_artifact(
    model: GPT, quant: QuantConfig, path: str, code_bytes: int, log, hessians: dict | None = None
) -> int:
    """Quantize, compress and write; shrink step by step until code + artifact fits SIZE_CAP_BYTES. Each
    step's size is first predicted from round-to-nearest integers and a fast zstd level, times the real /
    predicted ratio of the first attempt; only steps predicted to fit pay for GPTQ and the full compressor."""
    config, state = stored_knobs(model.cfg), artifact_state(model)
    shapes, limit = {n: list(t.shape) for n, t in state.items()}, quant.size_cap_bytes - code_bytes
    rtn = replace(quant, quant_method="rtn", lqer_enabled=False)
    entries, err = quantize_state(
        state,
        quant,
        hessians,
        progress=Progress(log, f"quantization ({quant.quant_method})", len(state), "tensors"),
    )
    blob = serialize_artifact(
        entries=entries, config=config, shapes=shapes, compressor=quant.compressor, level=quant.zstd_level
    )
    log(
        f"quant: {quant.quant_method}{'+lqer' if quant.lqer_enabled else ''}, relative squared error "
        f"{err:.3e}, "
        f"artifact {len(blob)} bytes ({quant.compressor}) + code {code_bytes}"
    )
    if len(blob) > limit:
        ratio = len(blob) / len(serialize_artifact(quantize_state(state, rtn)[0], config, shapes))
        for drops, extra in shrink_steps():
            predicted = ratio * len(
                serialize_artifact(
                    quantize_state(state=state, quant=rtn, hessians=None, bits_drop=drops, extra_prune=extra)[
                        0
                    ],
                    config,
                    shapes,
                )
            )
            step = f"fit: bits lowered {drops or 'none'}, pruning +{extra:.2f}:"
            if predicted > limit:
                log(f"{step} predicted {predicted:.0f} bytes, over the cap")
                continue
            entries, err = quantize_state(
                state=state, quant=quant, hessians=hessians, bits_drop=drops, extra_prune=extra
            )
            blob = serialize_artifact(
                entries=entries,
                config=config,
                shapes=shapes,
                compressor=quant.compressor,
                level=quant.zstd_level,
            )
            log(f"{step} relative squared error {err:.3e}, artifact {len(blob)} bytes")
            if len(blob) <= limit:
                break
    if len(blob) > limit:
        log(
            f"!!! ARTIFACT OVER THE CAP: {len(blob) + code_bytes} > {quant.size_cap_bytes} bytes even after "
            "every fit step !!!"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def damp_sparse_experts(hess: dict, counts: dict, world_size: int) -> tuple[dict[str, Tensor], list[str]]:
    warnings, experts = [], {n for n, _ in hess.items() if n.endswith((".up", ".down"))}
    for name in hess:  # the same order on every rank: the forward order
        if world_size > 1:
            dist.all_reduce(hess[name])
            dist.all_reduce(counts[name])
        for e, (H, n) in enumerate(zip(hess[name], counts[name].tolist())):
            if name in experts and n < H.size(0):
                H.diagonal().add_(0.1 * H.diagonal().mean() if n else 1.0)
                warnings.append(
                    f"WARNING gptq: expert {e} of {name} saw {n:.0f} calibration tokens "
                    f"(fewer than its {H.size(0)} inputs): damped Hessian"
                )
    return {n: H if n in experts else H[0] for n, H in hess.items()}, warnings


@torch.no_grad()
def collect_hessians(
    model: nn.Module, batches, world_size: int, progress=None, doc_span: int = 0
) -> tuple[dict[str, Tensor], list[str]]:
    """-> ({matrix: X^T X of its inputs}, warnings), summed over ranks. A routed expert sees only its routed
    tokens, a soft expert every token, each scaled by its gate; a starved expert gets a damped Hessian.
    Matrices fed the same input tensor (c_q, c_k and c_v) share one Hessian, computed once. doc_span: as
    GPT.hidden's (training batches: TRAIN_SEQ_LEN)."""
    hess = {}
    counts = {}
    hooks = []
    shares: dict[str, str] = {}  # matrix -> the matrix before it that saw the same input tensor
    previous: list = [None, ""]  # the last Linear's input (kept alive, so `is` cannot match a new tensor)

    def add_linear(name: str, x: Tensor):
        if previous[0] is x:
            shares.setdefault(name, shares.get(previous[1], previous[1]))
            return
        previous[:] = [x, name]
        add(name, x)

    def add(name: str, x: Tensor, expert: int = 0, n_experts: int = 1):
        x = x.reshape(-1, x.size(-1)).float()
        if name not in hess:
            hess[name] = torch.zeros(n_experts, x.size(1), x.size(1), device=x.device)
            counts[name] = torch.zeros(n_experts, device=x.device)
        hess[name][expert].addmm_(x.T, x)
        counts[name][expert] += x.size(0)

    def add_experts(name: str, m: MoEBase, x: Tensor, pass_index: int):
        """Each pass (per-pass routers) adds its tokens, weighted by its own gates, to the shared experts."""
        x = x.reshape(-1, x.size(-1)).float()
        if isinstance(m, SoftMoE):
            gates = m.E * torch.softmax(m.router_logits(x, pass_index), -1)
        else:
            _, _, choice, gate = m.route(x, pass_index)
            gates = torch.zeros(x.size(0), m.E, device=x.device).scatter_add_(1, choice, gate.float())
        for e in range(m.E):
            rows = gates[:, e] > 0
            g, xe = gates[rows, e : e + 1], x[rows]
            add(f"{name}.up", xe * g, e, m.E)
            add(f"{name}.down", mlp_act(xe @ m.up[e].float().T, m.act) * g, e, m.E)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(
                mod.register_forward_pre_hook(lambda m, args, n=f"{name}.weight": add_linear(n, args[0]))
            )
        elif isinstance(mod, MoEBase):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda m, args, kwargs, n=name: add_experts(n, m, args[0], kwargs.get("pass_index", 0)),
                    with_kwargs=True,
                )
            )
    try:
        for done, (x, _) in enumerate(batches, 1):
            with autocast(x.device):  # the head's input is the final hidden state
                add(
                    "tok_emb.weight" if model.lm_head is None else "lm_head.weight", model.hidden(x, doc_span)
                )
            if progress is not None:
                progress(done)
    finally:
        for hook in hooks:
            hook.remove()
    hessians, warnings = damp_sparse_experts(hess, counts, world_size)
    return {**hessians, **{name: hessians[first] for name, first in shares.items()}}, warnings


# ---- 9. Evaluation: exact val_loss / val_bpb, plain or sliding window, spread over ranks ---------
# Every validation target is scored exactly once, whatever the stride, batch and number of ranks, and the
# ranks add up float64 sums of loss, tokens and bytes: the score is one exact mean, not a mean of means.
# TTT scores each chunk before it trains on it: no score depends on a token after it.
def eval_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, scored) per window of seq_len inputs, every target scored once: the first window scores all its
    positions, later ones their last `scored` (= stride); the last ends at the final token."""
    n_targets = n_tokens - 1
    seq_len = min(seq_len, n_targets)
    stride = stride or seq_len
    windows, end = [(0, seq_len)], seq_len
    while end < n_targets:
        start = min(end + stride, n_targets) - seq_len
        windows.append((start, start + seq_len - end))
        end = start + seq_len
    return windows


class WindowSpec(NamedTuple):
    """How an evaluation cuts the tokens: windows of seq_len inputs, a new window every `stride` targets (0:
    seq_len, plain windows), batch_seqs windows per forward."""

    seq_len: int
    stride: int
    batch_seqs: int


class Scores:
    """One evaluation's float64 (loss, tokens, bytes) sums on this rank, and with `token_losses` every
    scored target's loss at token_losses[target position - 1]."""

    def __init__(self, tables, device: torch.device, token_losses: Tensor | None = None):
        self.tables = tuple(t.to(device) for t in tables)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.token_losses = token_losses

    def add(self, losses: Tensor, scored: Tensor, x: Tensor, y: Tensor, target_index: Tensor) -> None:
        """losses, scored, x, y, target_index: (rows, T); only the `scored` targets count."""
        mask = scored.double()
        target_bytes_sum = (target_bytes(x, y, self.tables) * mask).sum()
        self.sums += torch.stack(((losses.double() * mask).sum(), mask.sum(), target_bytes_sum))
        if self.token_losses is not None:
            self.token_losses[target_index[scored]] = losses[scored].float()

    def result(self, world_size: int) -> tuple[float, float]:
        """Every rank's sums (and per-token losses) summed -> (val_loss, val_bpb)."""
        if world_size > 1:
            dist.all_reduce(self.sums)
            if self.token_losses is not None:
                dist.all_reduce(self.token_losses)  # each target was scored on one rank, zeros elsewhere
        loss, tokens, nbytes = self.sums
        return (loss / tokens).item(), (loss / math.log(2) / nbytes).item()


@torch.no_grad()
def evaluate(
    logits_fn,
    tokens: Tensor,
    tables,
    spec: WindowSpec,
    rt: Runtime,
    token_losses: Tensor | None = None,
    phase: str = "evaluation",
) -> tuple[float, float]:
    """-> (val_loss, val_bpb) of every target of `tokens`, each window on one rank; `phase` names the
    progress lines in rt.log."""
    device, batch_seqs = rt.device, spec.batch_seqs
    windows = eval_windows(tokens.numel(), spec.seq_len, spec.stride)
    seq_len = min(spec.seq_len, tokens.numel() - 1)
    share = len(windows) * rt.rank // rt.world_size, len(windows) * (rt.rank + 1) // rt.world_size
    mine = windows[share[0] : share[1]]
    progress = Progress(rt.log, phase, -(-len(mine) // batch_seqs), "batches")
    scores, tokens = Scores(tables, device, token_losses), tokens.to(device)
    positions = torch.arange(seq_len, device=device)
    offsets = torch.arange(seq_len + 1, device=device)
    # Every window's (start, scored) copied to the device once, padded with (0, 0) to whole batches (one
    # static shape for compile): (batches * batch_seqs, 2). No host-to-device copy per batch.
    padded = mine + [(0, 0)] * (-len(mine) % batch_seqs)
    table = torch.tensor(padded, dtype=torch.long).reshape(-1, 2).to(device)
    for i in range(0, len(mine), batch_seqs):
        starts, scored = table[i : i + batch_seqs].unbind(1)  # each (batch_seqs,)
        idx = starts[:, None] + offsets  # (batch_seqs, seq_len + 1)
        window = tokens[idx].long()
        x, y = window[:, :-1], window[:, 1:]  # each (batch_seqs, seq_len)
        mask = positions[None, :] >= seq_len - scored[:, None]  # (batch_seqs, seq_len): the last `scored`
        with autocast(device):
            logits = logits_fn(x)  # (batch_seqs, seq_len, vocab)
        # (batch_seqs * seq_len, vocab) vs (batch_seqs * seq_len,) -> per-token losses, viewed as mask
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        scores.add(losses=loss.view_as(mask), scored=mask, x=x, y=y, target_index=idx[:, :-1])
        progress(i // batch_seqs + 1)
    return scores.result(rt.world_size)


# Test-time training (TTT): every chunk of a document is scored before any update that has seen it.
# Adapter output scale alpha / rank (the 1.0611 record's): the step size does not follow the rank.
LORA_ALPHA = 144.0
# Module names under blocks.N that get adapters; "mlp" is the whole sub-layer (dense or MoE).
TTT_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp")


class TTTAdapters(nn.Module):
    """LoRA, one per document row, on the attention projections, around every MLP sub-layer (dense or any
    MoE mode) and on the head. Forward hooks add a module's delta of its input to its output: the model has
    no TTT path."""

    def __init__(self, model: nn.Module, docs: int, rank: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        dim = model.tok_emb.embedding_dim
        self.enabled, self.scale = True, LORA_ALPHA / rank
        targets = [
            m
            for n, m in model.named_modules()
            if n.startswith("blocks.") and n.split(".", 2)[-1] in TTT_TARGETS
        ]
        shapes = [(getattr(m, "in_features", dim), getattr(m, "out_features", dim)) for m in targets] + [
            (dim, model.vocab_size)
        ]
        # Every row starts from the same A (and B = 0, no change), so no document depends on its row, batch or
        # rank.
        self.a = nn.ParameterList(
            ((2 * torch.rand(rank, n, generator=gen) - 1) / math.sqrt(n)).repeat(docs, 1, 1)
            for n, _ in shapes
        )
        self.b = nn.ParameterList(torch.zeros(docs, n, rank) for _, n in shapes)
        # Every batch starts from here.
        self.initial = copy.deepcopy(self.to(model.tok_emb.weight).state_dict())
        for i, m in enumerate(targets):
            m.register_forward_hook(
                lambda _m, args, out, i=i: out + self.delta(i, args[0]) if self.enabled else out
            )

    def delta(self, i: int, x: Tensor) -> Tensor:  # a last batch may have fewer rows
        return (
            (x @ self.a[i][: x.size(0)].to(x.dtype).mT) @ self.b[i][: x.size(0)].to(x.dtype).mT * self.scale
        )

    def token_losses(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Per-token cross-entropy (docs, T) with the adapters on, the head's included."""
        hidden = model.hidden(x, doc_span=None)  # a row holds one document (then padding)
        logits = model.head(hidden, self.delta(-1, hidden))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def ttt_schedule(
    tokens: Tensor, evaluation: EvaluationConfig
) -> tuple[list[tuple[int, int]], list[tuple[list[list[int]], int]]]:
    """-> documents (start, targets: to the next BOS, so TTT scores what plain evaluation scores) and phases
    in stream order (batches, then SGD on the first N tokens), so no score at p depends on a token after p.
    A batch: similar lengths, rows in stream order (capacity dispatch favours earlier rows, i.e. earlier
    documents)."""
    starts = (tokens == BOS_ID).nonzero().flatten().tolist()
    starts = starts if starts and starts[0] == 0 else [0] + starts
    docs = [(s, e - s) for s, e in zip(starts, starts[1:] + [tokens.numel() - 1])]
    n_prefix = min(evaluation.phased_ttt_prefix_docs, len(docs)) if evaluation.phased_ttt_num_phases else 0
    bounds = [0] + [
        n_prefix * (i + 1) // evaluation.phased_ttt_num_phases
        for i in range(evaluation.phased_ttt_num_phases if n_prefix else 0)
    ]
    phases = []
    for lo, hi in zip(bounds, bounds[1:] + [len(docs)]):
        by_len = sorted(range(lo, hi), key=lambda d: docs[d][1])
        batches = [
            sorted(by_len[i : i + evaluation.ttt_batch_size])
            for i in range(0, hi - lo, evaluation.ttt_batch_size)
        ]
        phases.append((batches, sum(docs[hi - 1]) if lo < hi <= n_prefix and hi < len(docs) else 0))
    return docs, phases


def chunk_widths(longest: int, evaluation: EvaluationConfig) -> list[int]:
    """Window width per chunk: up to EVAL_SEQ_LEN, rounded up to whole chunks (fewer shapes to compile)."""
    C = evaluation.ttt_chunk_size
    return [
        math.ceil(min((ci + 1) * C, longest, evaluation.eval_seq_len) / C) * C
        for ci in range(math.ceil(longest / C))
    ]


def chunk_windows(
    tokens: Tensor, starts: Tensor, lens: Tensor, ci: int, width: int, evaluation: EvaluationConfig
):
    """Chunk ci of each row, in a window of up to EVAL_SEQ_LEN tokens ending at the chunk's end -> inputs,
    targets, target index (position - 1; -1 = padding) and the targets it scores, each (rows, width)."""
    end = lens.clamp(max=(ci + 1) * evaluation.ttt_chunk_size)  # (rows,) the chunk's end in each document
    ctx_start, j = (end - evaluation.eval_seq_len).clamp(min=0), torch.arange(width)  # (rows,), (width,)
    valid = j < (end - ctx_start)[:, None]  # (rows, width): inside the window
    pos = torch.where(valid, starts[:, None] + ctx_start[:, None] + j, -1).to(tokens.device)
    scored = (valid & (j >= (ci * evaluation.ttt_chunk_size - ctx_start)[:, None])).to(tokens.device)
    return tokens[pos.clamp(min=0)].long(), tokens[pos + 1].long(), pos, scored


def ttt_batch(
    loss_fn, adapters, rows: list[int], docs, tokens: Tensor, evaluation: EvaluationConfig, scores: Scores
) -> None:
    """Adapters reset; chunk ci of every document scored, then (if the document goes on) trained on."""
    adapters.load_state_dict(adapters.initial)
    opt = torch.optim.AdamW(
        adapters.parameters(),
        lr=evaluation.ttt_lora_lr,
        betas=(evaluation.ttt_beta1, evaluation.ttt_beta2),
        eps=1e-10,
        weight_decay=evaluation.ttt_weight_decay,
    )
    starts, lens = torch.tensor([docs[d][0] for d in rows]), torch.tensor([docs[d][1] for d in rows])
    for ci, width in enumerate(chunk_widths(int(lens.max()), evaluation)):
        x, y, pos, scored = chunk_windows(
            tokens=tokens, starts=starts, lens=lens, ci=ci, width=width, evaluation=evaluation
        )
        with autocast(tokens.device):
            loss = loss_fn(adapters, x, y)  # (rows, width)
        scores.add(
            losses=loss.detach(), scored=scored, x=x, y=y, target_index=pos
        )  # final before any step below
        # (rows, width): the scored targets of documents with chunks still to come
        train = scored & (lens > (ci + 1) * evaluation.ttt_chunk_size).to(tokens.device)[:, None]
        for step in range(evaluation.ttt_grad_steps if train.any() else 0):
            if step:
                with autocast(tokens.device):
                    loss = loss_fn(adapters, x, y)
            opt.zero_grad(set_to_none=True)  # each document's mean loss over targets it has scored
            (torch.where(train, loss, 0.0).sum(-1) / train.sum(-1).clamp_min(1)).sum().backward()
            opt.step()


def global_sgd(model: nn.Module, tokens: Tensor, end: int, evaluation: EvaluationConfig, rt: Runtime) -> None:
    """SGD (cosine decay) on the base weights over tokens[:end + 1], all scored; gradients summed over
    ranks."""
    S, chunk = evaluation.eval_seq_len, evaluation.global_ttt_chunk_tokens
    model.requires_grad_(True)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)  # every rank reduces every gradient, used or not
    opt = torch.optim.SGD(params, lr=evaluation.global_ttt_lr, momentum=evaluation.global_ttt_momentum)
    steps = [lo for _ in range(evaluation.global_ttt_epochs) for lo in range(0, end, chunk) if end - lo >= S]
    for i, lo in enumerate(steps):
        seqs = min(chunk, end - lo) // S
        first, last = seqs * rt.rank // rt.world_size, seqs * (rt.rank + 1) // rt.world_size
        opt.zero_grad(set_to_none=False)
        if last > first:  # this rank's sequences; the loss is the mean over every rank's
            starts = lo + S * torch.arange(first, last)[:, None]  # (last - first, 1)
            window = tokens[(starts + torch.arange(S + 1)).to(tokens.device)].long()  # (last - first, S + 1)
            x, y = window[:, :-1], window[:, 1:]
            if model.respect_doc_boundaries:  # consecutive rows as one packed row, cut as in training
                x, y = x.reshape(1, -1), y.reshape(1, -1)
            with autocast(rt.device):
                (model(x, y, doc_span=S)[0] * (last - first) / seqs).backward()  # eval mode: no aux
        for p in params if rt.world_size > 1 else []:
            dist.all_reduce(p.grad)
        if evaluation.global_ttt_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, evaluation.global_ttt_grad_clip)
        opt.param_groups[0]["lr"] = evaluation.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * i / len(steps)))
        opt.step()
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)


def ttt_evaluate(
    model: nn.Module,
    evaluation: EvaluationConfig,
    run: RunConfig,
    tokens: Tensor,
    tables,
    rt: Runtime,
    token_losses: Tensor | None = None,
) -> tuple[float, float]:
    """Phased score-first TTT of `model` (its weights change; disabled adapter hooks stay) -> (val_loss,
    val_bpb)."""
    model.eval().requires_grad_(False)
    docs, phases = ttt_schedule(tokens, evaluation)
    tokens = tokens.to(rt.device)
    adapters = TTTAdapters(model, evaluation.ttt_batch_size, evaluation.ttt_lora_rank)
    loss_fn = lambda a, x, y: a.token_losses(model, x, y)
    if use_compile(run, rt.device):
        # compile warm-up: one batch of every window width on random tokens, never validation ones
        loss_fn, n = torch.compile(loss_fn, dynamic=True), evaluation.eval_seq_len + evaluation.ttt_chunk_size
        noise = torch.randint(
            model.vocab_size, (evaluation.ttt_batch_size * n + 1,), generator=torch.Generator().manual_seed(0)
        )
        noise_docs = [(i * n, n) for i in range(evaluation.ttt_batch_size)]
        rows = list(range(evaluation.ttt_batch_size))
        ttt_batch(
            loss_fn=loss_fn,
            adapters=adapters,
            rows=rows,
            docs=noise_docs,
            tokens=noise.to(rt.device),
            evaluation=evaluation,
            scores=Scores(tables, rt.device),
        )
    scores = Scores(tables, rt.device, token_losses)
    my_batches = sum(len(b[rt.rank :: rt.world_size]) for b, _ in phases)
    progress, done = Progress(rt.log, "ttt", my_batches, "batches"), 0
    for batches, sgd_end in phases:
        adapters.enabled = True
        for rows in batches[rt.rank :: rt.world_size]:
            ttt_batch(
                loss_fn=loss_fn,
                adapters=adapters,
                rows=rows,
                docs=docs,
                tokens=tokens,
                evaluation=evaluation,
                scores=scores,
            )
            done += 1
            progress(done)
        adapters.enabled = False
        if sgd_end:
            rt.log(f"ttt_phase: global SGD on the first {sgd_end + 1} validation tokens, all scored")
            global_sgd(model=model, tokens=tokens, end=sgd_end, evaluation=evaluation, rt=rt)
    return scores.result(rt.world_size)


# ---- 10. Preflight: what a run will cost, projected before it trains -------------------------------
# The projections a run checks before its first step, in one place: FLOPs per token and MFU, one rank's
# memory (eager and compiled), the artifact's bytes from the grid, the final evaluations' seconds. Each
# is an estimate with its assumptions stated, so a configuration is refused up front, not minutes in.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


def matmul_params_per_token(model: nn.Module, looping: bool | None = None) -> int:
    """Weights a token multiplies by: every matrix except lookups (an untied input embedding; the tied head
    counts), a looped layer's once per pass (looping: that loop state; None: the model's current one)."""
    order = model.orders[model.looping if looping is None else looping]
    lookups = ("control", "bigram_table") + (
        ("embed",) if getattr(model, "lm_head", None) is not None else ()
    )
    n = 0
    for name, p in model.named_parameters():
        if param_class(name, p) not in lookups:
            n += p.numel() * (order.count(int(name.split(".")[1])) if name.startswith("blocks.") else 1)
    for layer, m in moe_layers(model):
        if isinstance(m, RoutedMoE):  # only k of E experts run per token
            n -= (m.up.numel() + m.down.numel()) * (m.E - m.k) // m.E * order.count(layer)
        if m.passes > 1:  # each pass multiplies by its own router only
            n -= m.router_weight[1:].numel() * order.count(layer)
    return n


def mean_context(tokens: np.ndarray, span: int) -> float:
    """Mean keys a token of `tokens` attends to (itself included) when segments start at every BOS and every
    `span` tokens into a document: a segment of m tokens costs m(m+1)/2 query-key pairs."""
    bounds = np.unique(np.concatenate(([0], np.flatnonzero(tokens == BOS_ID), [len(tokens)])))
    lengths = np.diff(bounds).astype(np.float64)
    full, rest = lengths // span, lengths % span
    pairs = full * span * (span + 1) / 2 + rest * (rest + 1) / 2
    return float(pairs.sum() / max(len(tokens), 1))


def training_context(data: DataConfig, tokens: np.ndarray | None) -> tuple[float | None, str]:
    """-> (mean keys per training token for FLOP counts, how it was counted): measured on `tokens` (training
    tokens) with RESPECT_DOC_BOUNDARIES; None (plain causal, TRAIN_SEQ_LEN / 2) without, or without tokens."""
    if not data.respect_doc_boundaries:
        return None, "plain causal: TRAIN_SEQ_LEN/2 keys per token"
    if tokens is None or not len(tokens):
        return None, "plain causal, an upper bound: no training shard to measure documents on"
    context = mean_context(tokens, data.train_seq_len)
    return (
        context,
        f"within documents: {context:.0f} keys per token, measured on {len(tokens)} training tokens",
    )


def flops_per_token(
    model: GPT, data: DataConfig, looping: bool | None = None, context: float | None = None
) -> float:
    """Training FLOPs per token: 6 x matmul weights + causal QK^T and AV (fwd + bwd: 12 x model_dim per key
    attended), with `context` keys per token on average (None: plain causal rows, TRAIN_SEQ_LEN / 2)."""
    layers = len(model.orders[model.looping if looping is None else looping])
    context = data.train_seq_len / 2 if context is None else context
    return 6 * matmul_params_per_token(model, looping) + 12 * layers * context * model.cfg.model_dim


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class FlashLikeAttention(torch.autograd.Function):
    """Causal attention's output for fake tensors, saving what flash attention (and flex_attention, the
    document-isolated path) saves for its backward (q, k, v, the output, an fp32 log-sum-exp per row): which
    backend a GPU picks cannot be traced without one."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors[:3])


def fake_model(cfg: ModelConfig, device) -> GPT:
    """GPT(cfg) whose parameters and buffers are fake tensors on `device` (call inside a
    FakeTensorMode): shapes and dtypes only, so any shape can be traced on any machine."""
    with torch.device("meta"):
        model = GPT(cfg)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:  # a Linear without bias holds None
                fake = torch.empty(p.shape, dtype=p.dtype, device=device)
                module._parameters[name] = nn.Parameter(fake, p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    return model


def saved_activations(cfg: ModelConfig, data: DataConfig, device, looping: bool) -> dict[str, int]:
    """Bytes by dtype that autograd keeps for backward from one eager training micro-batch (once per storage,
    parameters excluded), traced with fake tensors: nothing is allocated or run on the device."""
    saved: dict[int, tuple[int, str]] = {}
    global causal_attention
    attention = causal_attention
    causal_attention = lambda q, k, v, docs: FlashLikeAttention.apply(q, k, v)  # noqa: E731
    try:
        with FakeTensorMode():
            model = fake_model(cfg, device).train()
            model.set_looping(looping)
            params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}

            def pack(t: Tensor) -> Tensor:
                key = StorageWeakRef(t.untyped_storage()).cdata
                if key not in params:
                    saved[key] = (t.untyped_storage().nbytes(), str(t.dtype).removeprefix("torch."))
                return t

            x = torch.zeros(train_rows(data), dtype=torch.long).to(device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device(device)):
                model(x, x, doc_span=data.train_seq_len)
    finally:
        causal_attention = attention
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return by_dtype


def static_training_bytes(cfg: ModelConfig, optim: OptimConfig, world_size: int) -> int:
    """fp32 weights, gradients, optimizer state (Muon momentum; Adam moments), EMA copy, DDP buckets."""
    with torch.device("meta"):
        model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    muon = sum(p.numel() for name, p in model.named_parameters() if param_class(name, p) in MATRIX_CLASSES)
    return 4 * (2 * n + muon + 2 * (n - muon) + n * (optim.ema_decay != 0) + n * (world_size > 1))


def eager_peak_bytes(cfg: ModelConfig, data: DataConfig, optim: OptimConfig, device, world_size: int) -> int:
    """One rank's peak without torch.compile: static bytes + the larger loop state's saved activations + the
    loss's backward working set (two fp32 tokens x vocab gradients of the logits)."""
    saved = max(sum(saved_activations(cfg, data, device, on).values()) for on in {False, cfg.num_loops > 0})
    return (
        static_training_bytes(cfg, optim, world_size) + saved + 8 * data.micro_batch_tokens * cfg.vocab_size
    )


# What torch.compile saves for backward, as a share of what eager saves: inductor's min-cut partition
# recomputes cheap elementwise ops instead of saving them. tools/gpu/gpu_memory.py traces that partition:
# 49,432 of 78,092 MiB (0.633) for the default dense run, loops on; rounded up, so the check refuses no fit.
COMPILED_SAVED_SHARE = 0.65


def compiled_peak_bytes(
    cfg: ModelConfig,
    data: DataConfig,
    optim: OptimConfig,
    device,
    world_size: int,
    looping: bool | None = None,
) -> int:
    """One rank's peak under torch.compile: as eager_peak_bytes, its saved activations scaled by
    COMPILED_SAVED_SHARE; of one loop state, or (None) the larger."""
    states = {False, cfg.num_loops > 0} if looping is None else {looping}
    saved = max(sum(saved_activations(cfg, data, device, on).values()) for on in states)
    loss_grads = 8 * data.micro_batch_tokens * cfg.vocab_size
    return static_training_bytes(cfg, optim, world_size) + int(COMPILED_SAVED_SHARE * saved) + loss_grads


# torch._grouped_mm has its fast kernel only on these compute capabilities' major versions (H100/H200: 9,
# B200: 10); elsewhere it loops over the experts with a device-to-host copy per grouped product.
GROUPED_MM_MAJORS = (9, 10)


def check_dispatch(cfg: ModelConfig, given: bool, rt: Runtime) -> ModelConfig:
    """Grouped dispatch only where its fast kernel exists: elsewhere capacity dispatch (one log line), or a
    stop when MOE_DISPATCH=grouped was asked for by name (`given`). -> the contract the model is built
    from."""
    device = rt.device
    if (
        device.type != "cuda"
        or cfg.moe_mode not in ("topk", "shared_routed")
        or cfg.moe_dispatch != "grouped"
    ):
        return cfg
    major, minor = torch.cuda.get_device_capability(device)
    if major in GROUPED_MM_MAJORS:
        return cfg
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if given:
        raise ConfigError(
            f"MOE_DISPATCH=grouped: torch._grouped_mm is fast only on compute capability 9.x/10.x (H100, "
            f"H200, B200); on this {gpu} it loops over the experts with a host sync per product: use "
            "MOE_DISPATCH=capacity"
        )
    rt.log(
        f"moe_dispatch: capacity, not grouped: {gpu} lacks grouped_mm's fast kernel (9.x/10.x); "
        f"tokens over CAPACITY_FACTOR={cfg.capacity_factor} are dropped"
    )
    return replace(cfg, moe_dispatch="capacity")


def check_compiled_memory(
    cfg: ModelConfig, data: DataConfig, optim: OptimConfig, run: RunConfig, rt: Runtime
) -> None:
    """Under torch.compile, stop before training when the estimated peak is over the device's memory (an
    out-of-memory error would come minutes later, mid-run)."""
    device, log = rt.device, rt.log
    if device.type != "cuda" or not use_compile(run, device):
        return
    peak = compiled_peak_bytes(cfg=cfg, data=data, optim=optim, device=device, world_size=rt.world_size)
    total = torch.cuda.get_device_properties(device).total_memory
    log(f"compiled_memory: ~{peak / 2**30:.1f} GiB per rank estimated of {total / 2**30:.1f} GiB")
    if peak > total:
        rows = max(1, int(data.micro_batch_tokens / data.train_seq_len * total / peak))
        raise ConfigError(
            f"MICRO_BATCH_TOKENS={data.micro_batch_tokens}{data.micro_batch_source}: estimated peak "
            f"{peak / 2**30:.1f} GiB per rank compiled, over this GPU's {total / 2**30:.1f} GiB; set "
            f"MICRO_BATCH_TOKENS to at most ~{rows * data.train_seq_len} (TRAIN_BATCH_TOKENS is kept through "
            "gradient accumulation)"
        )


def check_eager_memory(
    cfg: ModelConfig, data: DataConfig, optim: OptimConfig, run: RunConfig, rt: Runtime
) -> None:
    """COMPILE=0 on a GPU saves every intermediate for backward: warn when the micro-batch cannot fit."""
    device, log = rt.device, rt.log
    if device.type != "cuda" or use_compile(run, device):
        return
    peak = eager_peak_bytes(cfg=cfg, data=data, optim=optim, device=device, world_size=rt.world_size)
    total = torch.cuda.get_device_properties(device).total_memory
    log(f"eager_memory: ~{peak / 2**30:.1f} GiB per rank estimated (COMPILE=0) of {total / 2**30:.1f} GiB")
    if peak > total:
        rows = max(1, int(data.micro_batch_tokens / data.train_seq_len * total / peak))
        log(
            f"WARNING eager_memory: MICRO_BATCH_TOKENS={data.micro_batch_tokens} is estimated not to fit "
            "without "
            f"torch.compile; use COMPILE=1 or MICRO_BATCH_TOKENS of at most ~{rows * data.train_seq_len}"
        )


@functools.cache
def grid_bits_per_param(bits: int, sigmas: float, compressor: str, level: int) -> float:
    """Compressed bits/parameter of a seeded Gaussian matrix on this grid (SDClip rows are near-Gaussian)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    q = round_to_grid(w, sdclip_scale(w, bits, sigmas), bits).to(torch.int8)
    return 8 * len(COMPRESSORS[compressor][1](q.numpy().tobytes(), level)) / q.numel()


def estimate_artifact_bytes(model: nn.Module, quant: QuantConfig) -> tuple[int, dict[str, int]]:
    """Budget preview: parameter counts x the measured bits per parameter of each tensor's grid."""
    per_class, lqer = {}, []
    for name, t in artifact_state(model).items():
        bits, sigmas = storage_grid(name, t, quant)
        if bits == 16:
            per_class["fp16"] = per_class.get("fp16", 0.0) + t.numel() * FP16_BITS / 8
            continue
        rows, key = t.numel() // t.size(-1), QUANT_GROUP.get(param_class(name, t), "other")
        size = (
            t.numel() * grid_bits_per_param(bits, sigmas, quant.compressor, quant.zstd_level)
            + rows * SCALE_BITS
        ) / 8
        per_class[key] = per_class.get(key, 0.0) + size
        lqer.append(quant.lqer_rank * ((rows + t.size(-1)) * quant.lqer_factor_bits + 32) / 8)
    # LQER corrects the LQER_TOP_K tensors of largest error: counted as the largest corrections, at most
    per_class["lqer"] = sum(sorted(lqer)[::-1][: quant.lqer_top_k]) if quant.lqer_enabled else 0
    # The JSON header: ~150 bytes per tensor-table entry plus ~1.5 kB of config and framing.
    header = 150 * len(artifact_state(model)) + 1500
    return int(sum(per_class.values()) + header), {k: int(v) for k, v in per_class.items()}


def log_budget_preview(model: GPT, quant: QuantConfig, log) -> None:
    estimate, per_class = estimate_artifact_bytes(model, quant)
    code = code_bytes()
    total = estimate + code
    log.event(
        "budget_preview",
        estimate_bytes=estimate,
        per_class=per_class,
        cap=quant.size_cap_bytes,
        code_bytes=code,
        total_bytes=total,
    )
    classes = ", ".join(f"{k}:{v}" for k, v in sorted(per_class.items()))
    log(
        f"budget_preview: artifact ~{estimate} bytes ({classes}) + code {code} ({CODE_COUNTED_AS}) "
        f"= ~{total} of {quant.size_cap_bytes} (slack ~{quant.size_cap_bytes - total})"
    )
    refused = quant.budget_margin >= 0 and total > quant.size_cap_bytes * (1 + quant.budget_margin)
    if total > quant.size_cap_bytes and not refused:
        log(
            f"budget: ~{total - quant.size_cap_bytes} bytes over the cap, allowed by BUDGET_MARGIN="
            f"{quant.budget_margin:g}: the run starts; if the written artifact is over, the export "
            "shrinks it "
            "(more pruning, then fewer bits) until it fits"
        )
    if refused:
        raise ConfigError(
            f"estimated artifact + code ~{total} bytes exceeds SIZE_CAP_BYTES={quant.size_cap_bytes} by more "
            f"than BUDGET_MARGIN={quant.budget_margin}; shrink the model or lower MATRIX_BITS / "
            "EMBED_BITS, or "
            "set BUDGET_MARGIN=-1"
        )


# The 1.0611 record's TTT logs imply ~12% MFU for the FLOPs ttt_seconds counts (~3.8e17 for its document
# scoring and adapter training, ~380 s on 8xH100) and ~0.15 s per global SGD step (overhead-bound, not FLOPs).
TTT_ASSUMED_MFU, GLOBAL_SGD_STEP_SECONDS = 0.12, 0.15
# Its plain evaluation of 40,540,160 tokens took 6.7 s once compiled: ~11% MFU by this file's forward FLOPs;
# the read-back model's first evaluation took ~5 s longer (its compilation) and the TTT warm-up 88.8 s. The
# 2026-04-06 record (same shape) scored 633,409 sliding windows of 2048 in 83.6 s: ~25% MFU.
EVAL_ASSUMED_MFU, SLIDING_ASSUMED_MFU = 0.11, 0.25
EVAL_COMPILE_SECONDS, TTT_COMPILE_SECONDS = 5.0, 89.0


def final_looping(model: GPT, optim: OptimConfig, run: RunConfig) -> bool:
    """The loop state the final evaluations run in: a training run switches the loops on as planned."""
    return model.looping or (not run.eval_only and loop_switch_planned(model.cfg, optim))


def final_forward_flops(model: GPT, data: DataConfig, optim: OptimConfig, run: RunConfig) -> float:
    """FLOPs per token of one forward pass (a third of training's) in the final evaluations' loop state."""
    return flops_per_token(model, data, final_looping(model, optim, run)) / 3


def ttt_seconds(forward_flops: float, evaluation: EvaluationConfig, val_tokens: Tensor) -> float:
    """TTT's seconds on 8xH100: counted FLOPs at TTT_ASSUMED_MFU + the global SGD steps."""
    docs, phases = ttt_schedule(val_tokens, evaluation)
    window_tokens = sgd_tokens = steps = 0
    for batches, sgd_end in phases:
        for rows in batches:  # per step of a trained chunk: a forward, then input gradients of about as much
            widths = chunk_widths(max(docs[d][1] for d in rows), evaluation)
            window_tokens += len(rows) * (
                sum(widths) * 2 * evaluation.ttt_grad_steps - (2 * evaluation.ttt_grad_steps - 1) * widths[-1]
            )
        sgd_tokens += 3 * sgd_end
        steps += math.ceil(sgd_end / evaluation.global_ttt_chunk_tokens)
    flops = forward_flops * (window_tokens + sgd_tokens * evaluation.global_ttt_epochs)
    return (
        flops / (8 * PEAK_BF16_FLOPS["H100"] * TTT_ASSUMED_MFU)
        + steps * evaluation.global_ttt_epochs * GLOBAL_SGD_STEP_SECONDS
    )


def eval_seconds(
    forward_flops: float, evaluation: EvaluationConfig, run: RunConfig, val_tokens: Tensor
) -> dict[str, float]:
    """Seconds on 8xH100 of every final evaluation the run performs (plain, sliding, TTT) and of their
    compile warm-ups (COMPILE is on by default on GPUs). `forward_flops`: per token, one forward pass in the
    final evaluations' loop state."""
    rate = 8 * PEAK_BF16_FLOPS["H100"] / forward_flops  # tokens per second at 100% MFU
    windows = eval_windows(val_tokens.numel(), evaluation.eval_seq_len, evaluation.eval_stride)
    sliding = evaluation.eval_stride not in (0, evaluation.eval_seq_len)
    parts = {"plain": (val_tokens.numel() - 1) / (rate * EVAL_ASSUMED_MFU)}
    if sliding:
        window_tokens = len(windows) * min(evaluation.eval_seq_len, val_tokens.numel() - 1)
        parts["sliding"] = window_tokens / (rate * SLIDING_ASSUMED_MFU)
    if evaluation.ttt_enabled:
        parts["ttt"] = ttt_seconds(forward_flops, evaluation, val_tokens)
    if run.compile != "0":
        parts["compile"] = EVAL_COMPILE_SECONDS * (1 + sliding) + TTT_COMPILE_SECONDS * evaluation.ttt_enabled
    return parts


def check_eval_time(
    forward_flops: float, evaluation: EvaluationConfig, run: RunConfig, val_tokens: Tensor, log
) -> None:
    """Logs the final evaluations' projected seconds on 8xH100; refuses a total over EVAL_TIME_LIMIT."""
    parts = eval_seconds(forward_flops, evaluation, run, val_tokens)
    seconds = sum(parts.values())
    if evaluation.ttt_enabled:
        log(
            f"ttt_projection: ~{parts['ttt']:.1f}s on 8xH100 for these {val_tokens.numel()} validation "
            "tokens "
            f"(counted FLOPs at an assumed {100 * TTT_ASSUMED_MFU:.0f}% MFU "
            f"+ {GLOBAL_SGD_STEP_SECONDS}s per global SGD step)"
        )
        log.event(
            "ttt_projection", seconds=parts["ttt"], assumed_mfu=TTT_ASSUMED_MFU, val_tokens=val_tokens.numel()
        )
    log(
        f"eval_projection: ~{seconds:.1f}s on 8xH100 for every final evaluation "
        f"({', '.join(f'{k} ~{v:.1f}s' for k, v in parts.items())}; forward FLOPs at the records' "
        f"{100 * EVAL_ASSUMED_MFU:.0f}% MFU, sliding {100 * SLIDING_ASSUMED_MFU:.0f}%)"
    )
    log.event("eval_projection", seconds=seconds, parts=parts, val_tokens=val_tokens.numel())
    if evaluation.eval_time_limit and seconds > evaluation.eval_time_limit:
        raise ConfigError(
            f"the final evaluations are projected at ~{seconds:.0f}s on 8xH100 "
            f"({', '.join(f'{k} ~{v:.0f}s' for k, v in parts.items())}), over EVAL_TIME_LIMIT="
            f"{evaluation.eval_time_limit:g}: raise EVAL_STRIDE or TTT_CHUNK_SIZE, lower "
            "PHASED_TTT_PREFIX_DOCS or "
            "TTT_GRAD_STEPS, or set EVAL_TIME_LIMIT=0"
        )


# ---- 11. Training loop: schedules, steps, compile warm-up, EMA, step lines -----------------------
# Every stage (warm-down, momentum, loop switch, QAT, EMA) follows one clock, the run's progress, in one
# table (schedule). Ranks decide on flags of the previous step, read after the next is launched, so they
# agree without the loop waiting on the device.
class Schedule(NamedTuple):
    """Everything that follows the run's progress (a fraction of steps or of the wall clock)."""

    lr_scale: float  # of every group's peak learning rate
    muon_momentum: float
    looping: bool  # depth recurrence on (it never switches off)
    qat: bool  # quantization-aware training on (it never switches off)


def schedule(progress: float, cfg: ModelConfig, optim: OptimConfig) -> Schedule:
    """The one table of the run's stages, as a function of progress in [0, 1]."""
    warmup = optim.muon_momentum_warmup_frac
    ramp = min(1.0, progress / warmup) if warmup > 0 else 1.0
    start = optim.muon_momentum_warmup_start
    return Schedule(
        lr_scale=lr_scale(progress, optim.warmdown_frac, optim.min_lr),
        muon_momentum=start + ramp * (optim.muon_momentum - start),
        looping=loop_switch_planned(cfg, optim) and progress >= optim.enable_looping_at,
        qat=optim.qat_start_frac < 1 and progress >= optim.qat_start_frac,
    )


def ema_decay(step_share: float, optim: OptimConfig) -> float:
    """The EMA's decay for a step that took `step_share` of the run: EMA_DECAY when given (per step, as
    the records), else one that follows the step's share, so short runs average like long ones."""
    return optim.ema_decay if optim.ema_decay is not None else math.exp(-step_share / EMA_RUN_HORIZON)


CALIBRATION_MARGIN = 1.25  # the reserve over the measured pace: the Hessians' all-reduce, clock noise
CALIBRATION_FIXED_SECONDS = 1.0  # and the loader's batches, the damping and the log lines


def calibration_reserve(
    model: GPT, data: DataConfig, quant: QuantConfig, device: torch.device, batch: tuple[Tensor, Tensor]
) -> float:
    """Seconds calibrate() will take, measured: one micro-batch's Hessians timed (after an untimed one that
    loads the kernels), times GPTQ_CALIBRATION_BATCHES, with a margin."""
    was_training = model.training
    model.eval()
    seconds = 0.0
    with hessian_matmuls():
        for timed in (False, True):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            collect_hessians(model, [batch], 1, doc_span=data.train_seq_len)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0 if timed else seconds
    model.train(was_training)
    return CALIBRATION_MARGIN * quant.gptq_calibration_batches * seconds + CALIBRATION_FIXED_SECONDS


class Trainer:
    """One training run: data, model, optimizers, compile warm-up and the timed loop."""

    def __init__(self, h: Config, rt: Runtime):
        self.data = h.data
        self.optim = h.optim
        self.quant = h.quant
        self.run_cfg = h.run
        self.rt = rt
        self.cfg, device = h.model, rt.device
        self.accum = grad_accum_steps(self.data, rt.world_size)
        self.loader = TrainLoader(
            files=check_shards(shard_files(self.data.data_path, "train"), self.data.vocab_size),
            rank=rt.rank,
            world_size=rt.world_size,
            seq_len=train_rows(self.data)[1],
            micro_tokens=self.data.micro_batch_tokens,
            accum=self.accum,
            device=device,
            vocab_size=self.data.vocab_size,
        )
        # mean keys per token for the FLOP count (mfu), from the first training shard's documents
        self.context = training_context(self.data, self.loader.stream.tokens[: 1 << 24])[0]
        self.model = GPT(self.cfg).to(device)
        self.compiled = maybe_compile(self.model, self.run_cfg, device)
        self.ddp = (
            DDP(
                self.compiled,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
            if rt.world_size > 1
            else self.compiled
        )
        self.optimizers = build_optimizers(self.model, self.optim, rt.rank, rt.world_size)
        # QAT: each tensor stored as integers, with its export grid; copies of the float weights.
        self.qat = False
        grids = ((p, *storage_grid(name, p, self.quant)) for name, p in self.model.named_parameters())
        self.qat_grids = [(p, bits, sigmas) for p, bits, sigmas in grids if bits < 16]
        self.qat_masters: list[Tensor] = []
        self.ema: EMA | None = None
        self.step, self.train_ms = 0, 0.0
        self.routing_totals: Tensor | None = None
        self.set_stop_rule()

    def set_stop_rule(self) -> None:
        """What step lines show of the wall-clock stop."""
        self.stop_rule = (
            f" (stops at {self.optim.train_wallclock_seconds:g}s or step {self.optim.iterations}, "
            "whichever first)"
            if self.optim.max_wallclock_seconds > 0
            else ""
        )

    def reserve_calibration(self) -> None:
        """Unless GPTQ_RESERVE_SECONDS is given: the time calibration will take, measured on one training
        micro-batch (the data position restored), the slowest rank's, is cut from the training wall clock."""
        rt = self.rt
        if (
            not self.quant.calibrate
            or self.optim.max_wallclock_seconds <= 0
            or self.quant.gptq_reserve_seconds is not None
        ):
            return
        position = self.loader.stream.state()
        batch = self.loader.next_step()[0]
        self.loader.stream.restore(position)
        seconds = torch.tensor(
            calibration_reserve(
                model=self.model, data=self.data, quant=self.quant, device=rt.device, batch=batch
            ),
            device=rt.device,
        )
        if rt.world_size > 1:
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        reserve = seconds.item()
        if reserve >= self.optim.max_wallclock_seconds:
            raise ConfigError(
                f"GPTQ calibration is measured at {reserve:.1f}s, not within MAX_WALLCLOCK_SECONDS="
                f"{self.optim.max_wallclock_seconds:g}: lower "
                f"GPTQ_CALIBRATION_BATCHES={self.quant.gptq_calibration_batches}"
            )
        self.optim = replace(
            self.optim,
            calibration_reserve_seconds=reserve,
            train_wallclock_seconds=self.optim.max_wallclock_seconds - reserve,
        )
        self.set_stop_rule()
        rt.log(
            f"gptq_reserve: {reserve:.1f}s measured ({self.quant.gptq_calibration_batches} calibration "
            "batches at one "
            f"timed batch's pace x {CALIBRATION_MARGIN} + {CALIBRATION_FIXED_SECONDS:g}s): training stops at "
            f"{self.optim.train_wallclock_seconds:.1f}s"
        )
        rt.log.event(
            "gptq_reserve", seconds=reserve, train_wallclock_seconds=self.optim.train_wallclock_seconds
        )

    def progress(self, elapsed_ms: float) -> float:
        """Fraction of the run done: the larger of steps / ITERATIONS and time / (MAX_WALLCLOCK_SECONDS - GPTQ
        reserve)."""
        by_time = (
            elapsed_ms / (1000 * self.optim.train_wallclock_seconds)
            if self.optim.max_wallclock_seconds > 0
            else 0.0
        )
        return min(1.0, max(self.step / self.optim.iterations, by_time))

    def apply_schedule(self, progress: float) -> None:
        """Sets learning rates and Muon momentum, and switches the loop and QAT on when their time comes."""
        stage = schedule(progress, self.cfg, self.optim)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * stage.lr_scale
                if isinstance(opt, Muon):
                    g["momentum"] = stage.muon_momentum
        if stage.looping and not self.model.looping:
            self.start_looping(progress)
        if stage.qat and not self.qat:
            self.start_qat(progress)

    def train_step(self) -> Tensor:
        """Forward/backward over the micro-batches, clip, step; returns the mean cross-entropy."""
        ce_sum = torch.zeros((), device=self.rt.device)
        batches = self.loader.next_step()
        if self.qat:
            self.fake_quantize_weights()
        for micro, (x, y) in enumerate(batches):
            sync = self.rt.world_size == 1 or micro == len(batches) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync(), autocast(self.rt.device):
                loss, ce = self.ddp(x, y, doc_span=self.data.train_seq_len)
            (loss / self.accum).backward()
            ce_sum += ce
        if self.qat:
            self.restore_float_weights()
        if self.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        stats = collect_routing_stats(self.model, self.optim.router_bias_rate, self.rt.world_size)
        if stats is not None:
            self.routing_totals = stats if self.routing_totals is None else self.routing_totals + stats
        return ce_sum / len(batches)

    @torch.no_grad()
    def fake_quantize_weights(self) -> None:
        """QAT forward: the weights become their dequantized export integers in place (same tensors, so no
        graph changes); the gradient they receive is applied to the float weights restored before the step:
        a straight-through estimator."""
        if not self.qat_masters:
            self.qat_masters = [torch.empty_like(p) for p, _, _ in self.qat_grids]
        for (p, bits, sigmas), master in zip(self.qat_grids, self.qat_masters):
            master.copy_(p)
            p.copy_(fake_quantize(p, bits, sigmas))

    @torch.no_grad()
    def restore_float_weights(self) -> None:
        for (p, _, _), master in zip(self.qat_grids, self.qat_masters):
            p.copy_(master)

    def start_qat(self, progress: float) -> None:
        self.qat = True
        self.rt.log(f"qat:enabled step:{self.step} progress:{progress:.3f} tensors:{len(self.qat_grids)}")
        self.rt.log.event("qat", step=self.step, progress=progress, tensors=len(self.qat_grids))

    def compile_warmup(self) -> None:
        """Run WARMUP_STEPS steps to compile, then restore weights, optimizer state and data position."""
        if self.optim.warmup_steps <= 0:
            return
        saved = (
            copy.deepcopy(self.model.state_dict()),
            [copy.deepcopy(o.state_dict()) for o in self.optimizers],
            self.loader.stream.state(),
        )
        for looping in (False, True) if loop_switch_planned(self.cfg, self.optim) else (self.model.looping,):
            self.model.set_looping(looping)  # compile both layer orders now: the timed switch then costs none
            for _ in range(self.optim.warmup_steps):
                self.train_step()
        self.model.load_state_dict(saved[0])
        for opt, state in zip(self.optimizers, saved[1]):
            opt.load_state_dict(state)
        self.loader.stream.restore(saved[2])
        self.routing_totals = None

    def start_looping(self, progress: float) -> None:
        self.model.set_looping(True)
        order = self.model.orders[1]
        self.rt.log(f"layer_loop:enabled step:{self.step} progress:{progress:.3f} order:{order}")
        self.rt.log.event("layer_loop", step=self.step, progress=progress, order=order)

    def update_ema(self, step_progress: float) -> None:
        if self.optim.ema_decay == 0:
            return
        if self.ema is None:
            self.ema = EMA(self.model)
            return
        self.ema.update(ema_decay(step_progress, self.optim))

    def log_step(self, step: int, ce: float, elapsed_ms: float, peak: float | None) -> None:
        tokens_per_s = step * self.data.train_batch_tokens / max(elapsed_ms / 1000, 1e-9)
        flops = flops_per_token(self.model, self.data, context=self.context)  # of the current loop state
        mfu_pct = 100 * tokens_per_s * flops / (peak * self.rt.world_size) if peak else None
        self.rt.log(
            f"step:{step}/{self.optim.iterations} train_loss:{ce:.4f} train_time:{elapsed_ms:.0f}ms "
            f"step_avg:{elapsed_ms / step:.2f}ms tok/s:{tokens_per_s:.0f}"
            + (f" mfu:{mfu_pct:.1f}%" if peak else "")
            + self.stop_rule
        )
        self.rt.log.event(
            "step",
            step=step,
            iterations=self.optim.iterations,
            train_loss=ce,
            train_time_ms=elapsed_ms,
            step_avg_ms=elapsed_ms / step,
            tok_s=tokens_per_s,
            mfu=mfu_pct,
        )
        if self.routing_totals is not None:
            summary = routing_summary(self.model, self.routing_totals)
            for line in routing_log_lines(summary):
                self.rt.log(line)
            for r in summary:
                self.rt.log.event(
                    "routing",
                    step=step,
                    dropped=r["drop_rate"],
                    **{k: v for k, v in r.items() if k != "drop_rate"},
                )
            self.routing_totals = None

    def step_flags(self, ce: Tensor, elapsed_ms: float) -> tuple[Tensor, object]:
        """(elapsed ms, loss not finite, loss) over ranks: slowest clock, any, mean; queued, not waited
        for."""
        flags = torch.stack((torch.full_like(ce, elapsed_ms), (~torch.isfinite(ce)).float(), ce))
        if self.rt.world_size > 1:
            ranks = [torch.empty_like(flags) for _ in range(self.rt.world_size)]
            dist.all_gather(ranks, flags)
            table = torch.stack(ranks)
            flags = torch.cat((table[:, :2].amax(0), table[:, 2].mean(0, keepdim=True)))
        done = torch.cuda.Event() if flags.is_cuda else None
        flags = flags.to("cpu", non_blocking=True)  # pinned; `done` marks when it has arrived
        if done is not None:
            done.record()
        return flags, done

    def read_flags(self, pending: tuple[Tensor, object], step: int, t0: float, peak, final: bool) -> float:
        """The one wait per step, for step `step` (then complete on every rank): logs its line;
        -> agreed ms."""
        flags, done = pending
        if done is not None:
            done.synchronize()
        elapsed_ms, nonfinite, ce = flags.tolist()
        if nonfinite:
            raise TrainingDiverged(f"non-finite training loss at step {step}: stopping the run")
        if step % self.run_cfg.train_log_every == 0 or step == 1 or final:
            self.log_step(step, ce, self.train_ms + 1000 * (time.perf_counter() - t0), peak)
        return elapsed_ms

    def run(self, validate) -> None:
        """The timed loop (`validate()` runs with the clock paused). Schedules, EMA and the stop follow the
        agreed time of step N-1's flags, read after step N is launched, so every rank decides alike without
        waiting."""
        peak = peak_flops(self.rt.device)
        stop = False
        last_progress = 0.0
        agreed_ms = 0.0
        pending = None
        torch.manual_seed(self.run_cfg.seed + self.rt.rank)  # router noise differs per rank; the init did not
        self.sync()
        t0 = time.perf_counter()
        while True:
            last = stop or self.step >= self.optim.iterations
            if last or (
                self.run_cfg.val_loss_every and self.step and self.step % self.run_cfg.val_loss_every == 0
            ):
                if pending is not None:
                    agreed_ms = self.read_flags(pending=pending, step=self.step, t0=t0, peak=peak, final=last)
                    pending = None
                self.sync()
                self.train_ms += 1000 * (time.perf_counter() - t0)
                validate(self.step)
                t0 = time.perf_counter()
            if last:
                break
            progress = self.progress(agreed_ms)
            self.apply_schedule(progress)
            ce = self.train_step()
            self.step += 1
            if pending is not None:
                agreed_ms = self.read_flags(
                    pending=pending, step=self.step - 1, t0=t0, peak=peak, final=False
                )
                # Two more steps run after this is read: stop when their predicted time would reach the cap.
                stop = 0 < self.optim.max_wallclock_seconds and (  # the GPTQ reserve is not training time
                    self.optim.train_wallclock_seconds * 1000 <= agreed_ms * (1 + 2 / max(self.step - 2, 1))
                )
            pending = self.step_flags(ce, self.train_ms + 1000 * (time.perf_counter() - t0))
            progress = self.progress(agreed_ms)
            self.update_ema(progress - last_progress)
            last_progress = progress

    def sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()


# ---- 12. main(): train, export, read back, evaluate ----------------------------------------------
# The entry points: main loads the Config once and names the run; train_and_evaluate and evaluate_artifact
# hand each callee the groups it reads. Every final score is of the artifact read back from disk, never of
# the model in memory.
def load_artifact_model(path: str, device: torch.device, **overrides) -> tuple[GPT, Config]:
    """Rebuild the model from an artifact alone (its stored knobs) and load the dequantized weights."""
    config, state = read_artifact(path)
    h = load_config({}, **config, **overrides)
    model = GPT(h.model).to(device)
    missing = set(artifact_state(model)) - set(state)
    if missing:
        raise ArtifactError(f"{path}: artifact lacks tensors {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model, h


def log_model(model: GPT, knobs: dict, log) -> None:
    log("config " + json.dumps(knobs, sort_keys=True))
    n_params = sum(p.numel() for p in model.parameters())
    n_router = sum(p.numel() for n, p in model.named_parameters() if "router" in n)
    log.event(
        "params", total=n_params, active_matmul_per_token=matmul_params_per_token(model), router=n_router
    )
    log(
        f"params total:{n_params} active_matmul_per_token:{matmul_params_per_token(model)} router:{n_router} "
        f"moe_mode:{model.cfg.moe_mode} moe_layers:{list(model.cfg.moe_layer_ids)}"
    )


def log_header(
    model: GPT, knobs: dict, data: DataConfig, rt: Runtime, accum: int, val_tokens: Tensor
) -> None:
    device, log = rt.device, rt.log
    device_name = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    code_sha = sha256_file(os.path.abspath(__file__))
    log.event(
        "config",
        knobs=knobs,
        code_sha256=code_sha,
        code_bytes=script_bytes(),
        torch=torch.__version__,
        python=sys.version.split()[0],
        device=device_name,
        world_size=rt.world_size,
        grad_accum=accum,
    )
    log(
        f"python {sys.version.split()[0]} torch {torch.__version__} device {device_name} world_size "
        f"{rt.world_size} grad_accum {accum}"
    )
    log(f"code_sha256:{code_sha} code_bytes:{script_bytes()}")
    log(
        f"val_tokens:{val_tokens.numel()} token_limit:{data.val_token_limit} "
        f"data:{os.path.abspath(data.data_path)}"
    )
    log_model(model, knobs, log)


# What the 1.0611 record's own step times imply (96 ms before its loop switch, 138 after).
PROJECTED_MFU = 0.30


def first_train_tokens(data: DataConfig, limit: int = 1 << 24) -> np.ndarray | None:
    """Up to `limit` tokens of DATA_PATH's first training shard; None without one (DRY_RUN needs no data)."""
    try:
        return np.asarray(read_shard(shard_files(data.data_path, "train")[0])[:limit])
    except DataError:
        return None


def dry_run(h: Config) -> None:
    """DRY_RUN=1: the model on the meta device (no tokenizer or GPU; DATA_PATH's first training shard, when
    there is one, for document lengths): the config, parameter count, budget preview and the projected speed
    on 8xH100."""
    log = Logger(None, console=True)
    peak = PEAK_BF16_FLOPS["H100"]
    rates = []
    grad_accum_steps(
        h.data, int(os.environ.get("WORLD_SIZE", 1))
    )  # a batch this launch would refuse: refused
    try:
        grad_accum_steps(h.data, 8)
    except ConfigError as err:  # the 8-GPU run the projection is of
        log(f"warning: torchrun --nproc_per_node=8 would refuse this batch: {err}")
    with torch.device("meta"):
        model = GPT(h.model)
    log_model(model, knob_values(h), log)
    try:
        log_budget_preview(model, h.quant, log)
    except ConfigError as err:
        log(f"budget: a real run would refuse to start: {err}")
    tokens = first_train_tokens(h.data) if h.data.respect_doc_boundaries else None
    context, counted = training_context(h.data, tokens)
    log(f"projection attention_flops: {counted}")
    for looping in sorted({False, h.model.num_loops > 0}):
        flops = flops_per_token(model, h.data, looping, context)
        rates.append(PROJECTED_MFU * peak / flops)  # tokens/s per GPU
        log(
            f"projection loops:{'on' if looping else 'off'} flops_per_token:{flops:.4g} "
            f"ms_per_step:{1000 * h.data.train_batch_tokens / (8 * rates[-1]):.1f} "
            f"tok/s_per_gpu:{rates[-1]:.0f}"
        )
    off_share = h.optim.enable_looping_at if loop_switch_planned(h.model, h.optim) else 1.0
    average = off_share * rates[0] + (1 - off_share) * rates[-1]  # the switch: at a share of the wall clock
    steps = average * 8 * h.optim.max_wallclock_seconds / h.data.train_batch_tokens
    log(
        f"projection run_average tok/s_per_gpu:{average:.0f} "
        f"steps_in_{h.optim.max_wallclock_seconds:.0f}s:{steps:.0f} "
        f"(8xH100 at MFU {PROJECTED_MFU:.0%}, loops from {off_share:.0%} of the run; 1.0M tok/s needs MFU "
        f"{PROJECTED_MFU * 1e6 / average:.0%})"
    )


def write_new_file(path: str, write, log) -> str:
    """write(name) fills a temporary name beside path, which is then linked to path only if path is still
    free (another run may have taken it since start-up); else to the first free `root.N.ext`, which the log
    names. Nothing is overwritten, and a stopped or failed write leaves no file a later step could take for
    a finished one. -> the name the file has."""
    partial = f"{path}.{os.getpid()}.partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    try:
        write(partial)
        for n in itertools.count(1):
            name = path if n == 1 else f"{root}.{n}{ext}"
            try:
                os.link(partial, name)
            except FileExistsError:
                continue
            if name != path:
                log(
                    f"warning: {path} was created by another process during this run; this run's file is "
                    f"{name}"
                )
            return name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def save_array(values: np.ndarray, name: str) -> None:
    with open(name, "xb") as f:
        np.save(f, values)


def export_and_report(model: GPT, quant: QuantConfig, path: str, log, hessians: dict | None) -> str:
    """Writes the artifact (never over another file) and logs its size check -> the artifact's path."""

    code = code_bytes()

    def export(partial: str) -> None:
        with exact_fp32_matmuls():
            export_artifact(
                model=model, quant=quant, path=partial, code_bytes=code, log=log, hessians=hessians
            )

    path = write_new_file(path, export, log)
    size = os.path.getsize(path)
    total = size + code
    slack = quant.size_cap_bytes - size - code
    digest = sha256_file(path)
    log(f"Serialized model quant+zstd: {size} bytes")
    log(f"Code size (counted: {CODE_COUNTED_AS}): {code} bytes")
    log(f"Code size (uncompressed, the script as run): {script_bytes()} bytes")
    log(f"Total submission size quant+zstd: {total} bytes")
    log(
        f"size_check total:{total} cap:{quant.size_cap_bytes} slack:{slack} "
        f"{'OK' if slack >= 0 else 'OVER THE CAP'} "
        f"artifact:{os.path.abspath(path)} sha256:{digest}"
    )
    log.event(
        "size_check",
        code_bytes=code,
        code_counted_as=CODE_COUNTED_AS,
        script_bytes=script_bytes(),
        artifact_bytes=size,
        total_bytes=total,
        cap=quant.size_cap_bytes,
        slack=slack,
        artifact=os.path.abspath(path),
        sha256=digest,
    )
    return path


def check_ranks_in_sync(model: nn.Module, rt: Runtime) -> None:
    """Every rank must end with the same weights: float64 sums of every tensor, compared bit for bit."""
    names, tensors = zip(*artifact_state(model).items())
    mine = torch.stack([t.detach().double().sum() for t in tensors])
    ranks = [torch.empty_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(ranks, mine)
    sums = torch.stack(ranks).cpu()  # (world_size, tensors)
    bits_differ = (sums.view(torch.int64) != sums[:1].view(torch.int64)).any(0)
    differ = bits_differ.nonzero().flatten().tolist()
    if differ:
        by_rank = ", ".join(f"{v:.10g}" for v in sums[:, differ[0]].tolist())
        raise TrainingDiverged(
            f"ranks out of sync after training: {len(differ)} of {len(names)} tensors differ, first "
            f"{names[differ[0]]} (sums by rank: {by_rank})"
        )
    rt.log(f"ranks_in_sync:yes ranks:{rt.world_size} tensors:{len(names)}")


class Validation(NamedTuple):
    """What every evaluation scores: the validation tokens, the tokenizer's byte tables, and the note every
    score line carries when VAL_TOKEN_LIMIT cuts the split."""

    tokens: Tensor
    tables: tuple[Tensor, Tensor, Tensor]
    note: str


def load_validation(data: DataConfig, evaluation: EvaluationConfig, log) -> Validation:
    tables = byte_tables(load_tokenizer(data.tokenizer_path, data.vocab_size))
    tokens = load_val_tokens(data.data_path, data.vocab_size, data.val_token_limit)
    if (
        evaluation.eval_seq_len >= tokens.numel()
    ):  # one window holding everything: not the sliding evaluation asked for
        limit = f" (VAL_TOKEN_LIMIT={data.val_token_limit})" if data.val_token_limit else ""
        raise ConfigError(
            f"EVAL_SEQ_LEN={evaluation.eval_seq_len}: not shorter than the validation split, "
            f"{tokens.numel()} tokens"
            f"{limit} in DATA_PATH={data.data_path}"
        )
    warning = check_tokenizer_identity(data.data_path, data.tokenizer_path)
    if warning:
        log(warning)
    note = f" (first {data.val_token_limit} tokens only: not a score)" if data.val_token_limit else ""
    return Validation(tokens, tables, note)


def final_evaluation(
    qmodel: GPT,
    evaluation: EvaluationConfig,
    quant: QuantConfig,
    run: RunConfig,
    val: Validation,
    rt: Runtime,
) -> None:
    """Plain, sliding-window and TTT evaluation of the read-back model of ARTIFACT_PATH; the last is the
    score. An invalid result (over the cap, non-finite stored tensors or score) marks its lines
    INVALID(...), then the run fails."""
    path = run.artifact_path
    device = rt.device
    log = rt.log
    total = os.path.getsize(path) + code_bytes()
    bad = [n for n, t in artifact_state(qmodel).items() if not t.isfinite().all()]
    problems = []
    if total > quant.size_cap_bytes:
        problems.append(f"code + artifact {total} bytes > SIZE_CAP_BYTES={quant.size_cap_bytes}")
    if bad:
        problems.append(f"{len(bad)} stored tensors not finite ({', '.join(bad[:3])})")
    q_fn = maybe_compile(qmodel.logits, run, device)
    modes = [("roundtrip", "plain", evaluation.eval_seq_len)]  # (line label, mode, stride)
    if evaluation.eval_stride not in (0, evaluation.eval_seq_len):
        modes.append(("sliding_window", "sliding", evaluation.eval_stride))
    if evaluation.ttt_enabled:
        modes.append(("ttt", "ttt", evaluation.ttt_chunk_size))
    for label, mode, stride in modes:  # per-token losses of the last, score-defining evaluation
        keep_losses = evaluation.eval_token_losses and label == modes[-1][0]
        losses = torch.zeros(val.tokens.numel() - 1, device=device) if keep_losses else None
        t0 = time.perf_counter()
        if mode == "ttt":  # on a copy: TTT changes the weights
            loss, bpb = ttt_evaluate(
                model=copy.deepcopy(qmodel),
                evaluation=evaluation,
                run=run,
                tokens=val.tokens,
                tables=val.tables,
                rt=rt,
                token_losses=losses,
            )
        else:
            spec = WindowSpec(evaluation.eval_seq_len, stride, evaluation.eval_batch_seqs)
            loss, bpb = evaluate(
                logits_fn=q_fn,
                tokens=val.tokens,
                tables=val.tables,
                spec=spec,
                rt=rt,
                token_losses=losses,
                phase=f"final {label} evaluation",
            )
        seconds = time.perf_counter() - t0
        if not math.isfinite(bpb) and "val_bpb is not finite" not in problems:
            problems.append("val_bpb is not finite")
        mark = f" INVALID({'; '.join(problems)})" if problems else ""
        log(
            f"final_quant_zstd_{label}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f} stride:{stride} "
            f"seq_len:{evaluation.eval_seq_len} eval_time:{1000 * seconds:.0f}ms{val.note}{mark}"
        )
        log.event(
            "final",
            name=f"final_quant_zstd_{label}_exact",
            mode=mode,
            val_loss=loss,
            val_bpb=bpb,
            eval_time_s=seconds,
            stride=stride,
            seq_len=evaluation.eval_seq_len,
            invalid=problems,
        )
        if losses is not None and rt.rank == 0:  # whole, and never over another file
            written = write_new_file(
                evaluation.eval_token_losses, functools.partial(save_array, losses.cpu().numpy()), log
            )
            log(f"token_losses: {losses.numel()} float32 nats ({mode}) in {written}")
    if problems:
        raise ArtifactError(f"{path}: not a valid result: {'; '.join(problems)}")


def evaluate_artifact(h: Config, rt: Runtime) -> None:
    """EVAL_ONLY=1: no training; the artifact's model gets the final evaluations a run would give it."""
    log = rt.log
    # the attention pattern is this run's knob, not the artifact's
    qmodel, stored = load_artifact_model(
        h.run.artifact_path, rt.device, respect_doc_boundaries=h.data.respect_doc_boundaries
    )
    ours, theirs = knob_values(h, MODEL_KNOBS), stored_knobs(stored.model)
    for name in MODEL_KNOBS:  # the artifact defines the network: a differing model knob is said, not used
        if os.environ.get(name, "") != "" and ours[name] != theirs[name]:
            log(
                f"eval_only: ignoring {name}={os.environ[name]}: the artifact's network has "
                f"{name}={theirs[name]}"
            )
    network = {  # the artifact's model knobs, in whichever group each is read
        group: replace(
            getattr(h, group), **{n.lower(): theirs[n] for n in MODEL_KNOBS if KNOB_ROWS[n].group == group}
        )
        for group in GROUP_CLASSES
    }
    h = replace(h, model=stored.model, **network)
    val = load_validation(h.data, h.evaluation, log)
    log_header(model=qmodel, knobs=knob_values(h), data=h.data, rt=rt, accum=0, val_tokens=val.tokens)
    log(
        f"eval_only artifact:{os.path.abspath(h.run.artifact_path)} sha256:{sha256_file(h.run.artifact_path)}"
    )
    forward_flops = final_forward_flops(qmodel, h.data, h.optim, h.run)
    check_eval_time(
        forward_flops=forward_flops, evaluation=h.evaluation, run=h.run, val_tokens=val.tokens, log=log
    )
    final_evaluation(qmodel=qmodel.eval(), evaluation=h.evaluation, quant=h.quant, run=h.run, val=val, rt=rt)


def calibrate(trainer: Trainer) -> dict | None:
    """GPTQ/LQER Hessians from the next training micro-batches (never validation) in the reserved time."""
    data = trainer.data
    optim = trainer.optim
    quant = trainer.quant
    log = trainer.rt.log
    t0 = time.perf_counter()
    n = quant.gptq_calibration_batches
    if not quant.calibrate:
        return None
    batches = (b for _ in range(-(-n // trainer.accum)) for b in trainer.loader.next_step())
    with hessian_matmuls():
        hessians, warnings = collect_hessians(
            trainer.model.eval(),
            (b for _, b in zip(range(n), batches)),
            trainer.rt.world_size,
            Progress(log, "gptq calibration", n, "micro-batches"),
            doc_span=data.train_seq_len,
        )
    if trainer.rt.device.type == "cuda":
        torch.cuda.synchronize(trainer.rt.device)
    seconds = time.perf_counter() - t0
    reserve = optim.calibration_reserve_seconds
    late = optim.max_wallclock_seconds and seconds > reserve
    over_reserve = "; WARNING: over the reserve" if late else ""
    for line in warnings + [
        f"gptq: Hessians of {len(hessians)} matrices from {n} x {data.micro_batch_tokens} training tokens x "
        f"{trainer.rt.world_size} ranks in {seconds:.1f}s (reserve {reserve:.1f}s{over_reserve})"
    ]:
        log(line)
    # The challenge counts calibration that reads training data inside the training minutes.
    ended = trainer.train_ms / 1000 + seconds
    over = optim.max_wallclock_seconds and ended > optim.max_wallclock_seconds
    log(
        f"training_and_calibration: ended at {ended:.1f}s (training {trainer.train_ms / 1000:.1f}s + "
        f"calibration {seconds:.1f}s) of MAX_WALLCLOCK_SECONDS={optim.max_wallclock_seconds:g}"
        + ("; WARNING: over the limit" if over else "")
    )
    log.event("calibration", seconds=seconds, reserve_seconds=reserve, training_and_calibration_s=ended)
    return hessians


def train_and_evaluate(h: Config, rt: Runtime) -> None:
    torch.manual_seed(h.run.seed)
    log, device = rt.log, rt.device
    val = load_validation(h.data, h.evaluation, log)
    # before the model is built: it picks the dispatch the model keeps
    h = replace(h, model=check_dispatch(h.model, h.run.moe_dispatch_given, rt))
    trainer = Trainer(h, rt)
    model = trainer.model
    log_header(
        model=model, knobs=knob_values(h), data=h.data, rt=rt, accum=trainer.accum, val_tokens=val.tokens
    )
    log_budget_preview(model, h.quant, log)
    forward_flops = final_forward_flops(model, h.data, h.optim, h.run)
    check_eval_time(
        forward_flops=forward_flops, evaluation=h.evaluation, run=h.run, val_tokens=val.tokens, log=log
    )
    check_eager_memory(cfg=h.model, data=h.data, optim=h.optim, run=h.run, rt=rt)
    check_compiled_memory(cfg=h.model, data=h.data, optim=h.optim, run=h.run, rt=rt)
    eval_fn = maybe_compile(model.logits, h.run, device)
    plain_windows = WindowSpec(h.evaluation.eval_seq_len, 0, h.evaluation.eval_batch_seqs)
    last_val: list[float] = []  # loss, bpb, seconds of the newest pre-quant evaluation

    def validate(step: int | None = None) -> tuple[float, float, float]:
        """Plain-window validation; with a step: a periodic (or last) val line and event."""
        model.eval()
        t0 = time.perf_counter()
        phase = "validation" if step is not None else "pre_quant_ema evaluation"
        loss, bpb = evaluate(
            logits_fn=eval_fn, tokens=val.tokens, tables=val.tables, spec=plain_windows, rt=rt, phase=phase
        )
        model.train()
        if step is not None:
            log(
                f"step:{step}/{h.optim.iterations} val_loss:{loss:.4f} val_bpb:{bpb:.4f} "
                f"train_time:{trainer.train_ms:.0f}ms "
                f"step_avg:{trainer.train_ms / max(step, 1):.2f}ms{val.note}"
            )
            log.event("val", step=step, val_loss=loss, val_bpb=bpb, train_time_ms=trainer.train_ms)
            last_val[:] = [loss, bpb, time.perf_counter() - t0]
        return loss, bpb, time.perf_counter() - t0

    t_warm = time.perf_counter()
    trainer.compile_warmup()
    log(
        f"compile_warmup: {h.optim.warmup_steps} steps in {time.perf_counter() - t_warm:.1f}s (not "
        "timed, undone)"
    )
    trainer.reserve_calibration()
    # From here a failure keeps its RUN_ID: its log is the record of spent compute.
    log.training_started = True
    try:
        trainer.run(validate)
    except KeyboardInterrupt:
        log.phase = f"at step {trainer.step}"
        raise
    log.phase = "after training"
    if device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB")
    if trainer.ema is not None:
        trainer.ema.copy_to_model()
    hessians = calibrate(trainer)
    if h.run.save_checkpoint and rt.rank == 0:
        checkpoint = dict(config=stored_knobs(model.cfg), state=model.state_dict())
        write_new_file(
            os.path.join(h.run.log_dir, f"{h.run.run_id}_fp.pt"), lambda f: torch.save(checkpoint, f), log
        )
    if trainer.ema is not None:
        last_val[:] = validate()
        log(f"pre_quant_ema val_loss:{last_val[0]:.8f} val_bpb:{last_val[1]:.8f}{val.note}")
    if rt.world_size > 1:
        check_ranks_in_sync(model, rt)
    log.event(
        "pre_quant",
        val_loss=last_val[0],
        val_bpb=last_val[1],
        eval_time_s=last_val[2],
        ema=trainer.ema is not None,
    )
    written = [
        export_and_report(model=model, quant=h.quant, path=h.run.artifact_path, log=log, hessians=hessians)
        if rt.rank == 0
        else None
    ]
    if rt.world_size > 1:
        dist.broadcast_object_list(written)  # waits for rank 0's export; every rank reads the file it wrote
    h = replace(h, run=replace(h.run, artifact_path=written[0]))
    qmodel = load_artifact_model(
        h.run.artifact_path, device, respect_doc_boundaries=h.data.respect_doc_boundaries
    )[0]
    qmodel.eval()
    final_evaluation(qmodel=qmodel, evaluation=h.evaluation, quant=h.quant, run=h.run, val=val, rt=rt)


def main() -> None:
    stop_on_signals()
    h = load_config()
    if h.run.dry_run:
        return dry_run(h)
    rank, world_size, device = setup_distributed(h.run)
    run_id = [h.run.run_id or time.strftime("run_%Y%m%d_%H%M%S")]
    if world_size > 1:
        dist.broadcast_object_list(run_id)  # every rank must agree on the artifact path
    artifact_path = h.run.artifact_path or os.path.join(h.run.log_dir, f"{run_id[0]}_model.ptz")
    h = replace(h, run=replace(h.run, run_id=run_id[0], artifact_path=artifact_path))
    try:
        log = Logger(os.path.join(h.run.log_dir, h.run.run_id) if rank == 0 else None)
    except OSError as err:  # a file in the way, no permission, a read-only disk
        raise ConfigError(
            f"LOG_DIR={h.run.log_dir}: cannot write the logs there ({err.strerror or err})"
        ) from None
    try:
        if os.path.exists(h.run.artifact_path) and not h.run.eval_only:
            raise ConfigError(
                f"ARTIFACT_PATH={h.run.artifact_path} already exists; an artifact is never overwritten"
            )
        rt = Runtime(rank, world_size, device, log)
        (evaluate_artifact if h.run.eval_only else train_and_evaluate)(h, rt)
    except BaseException as err:
        signum = stop_signal(err)
        if signum is None:
            log.fail(err)
            if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
                where = (
                    err.filename or f"under LOG_DIR={h.run.log_dir} or ARTIFACT_PATH={h.run.artifact_path}"
                )
                raise DiskError(
                    f"cannot write {where}: {err.strerror} (free space there, or point LOG_DIR and "
                    "ARTIFACT_PATH at another disk)"
                ) from None
            raise
        # Ctrl-C, SIGTERM, SIGHUP: one line, no traceback; the logs say the run failed, and where
        where = stopped_where(signum, log.phase)
        kept = log.fail(RunInterrupted(where, signum))
        raise RunInterrupted(
            f"{where}; run marked failed" + (f", logs kept: {kept}" if kept else ""), signum
        ) from None
    log.event("end", status="ok")
    for s in STOP_SIGNALS:  # the run is complete and logged: a stop from here on only ends the process
        signal.signal(s, signal.SIG_DFL)
    if world_size > 1:
        dist.barrier()  # rank 0 has written its last line before any rank leaves
        dist.destroy_process_group()


if __name__ == "__main__":
    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        main()
    except RunInterrupted as err:  # every rank stops alike: rank 0 says it once
        if first_rank:
            print(str(err), file=sys.stderr)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt as err:  # stopped while reading the knobs or joining the ranks: no logs yet
        signum = stop_signal(err)
        if first_rank:
            print(stopped_where(signum, "before training"), file=sys.stderr)
        sys.exit(128 + signum)
    except (ConfigError, DataError) as err:  # the same inputs fail alike on every rank: rank 0 says it once
        if first_rank:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (ArtifactError, TrainingDiverged, DiskError) as err:
        print(f"error: {err}" if first_rank else f"error (rank {os.environ['RANK']}): {err}", file=sys.stderr)
        sys.exit(2)
