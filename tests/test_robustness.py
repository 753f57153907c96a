"""Bad input fails before training, naming what is wrong; failed runs leave
nothing burned or overwritten; invalid results exit non-zero; ranks stay in sync; the GPU-path fixes."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO, SAMPLE, TINY_ENV, run_train

STEP_LINE = re.compile(r"^step:\d+/\d+ train_loss", re.M)


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_refused_before_training(result, needle: str) -> None:
    """Exit 2, one clear stderr line containing `needle`, no traceback, not a single training step."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and needle in result.stderr
    assert "Traceback" not in result.stderr and not STEP_LINE.search(result.stdout)


def sample_copy(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    return data


# --- knob ranges -------------------------------------------------------------------------------


def test_every_numeric_knob_has_limits_that_hold_its_default():
    numeric = [name for name, (kind, _) in tg.KNOBS.items() if kind in (int, float)]
    assert [name for name in numeric if name not in tg.KNOB_LIMITS] == []
    for name in numeric:
        low, high = tg.KNOB_LIMITS[name]
        default = tg.KNOBS[name][1]
        assert default is None or low <= default <= high, name


@pytest.mark.parametrize(
    "name,value,needle",
    [
        ("ZSTD_LEVEL", "99", "ZSTD_LEVEL=99: expected 1..22"),
        ("TRAIN_LOG_EVERY", "0", "TRAIN_LOG_EVERY=0: expected >= 1"),
        ("BIGRAM_VOCAB_SIZE", "1", "BIGRAM_VOCAB_SIZE=1: expected 0 (off) or >= 2"),
        ("MICRO_BATCH_TOKENS", "-512", "MICRO_BATCH_TOKENS=-512: expected >= 0"),
        ("VAL_TOKEN_LIMIT", "-5", "VAL_TOKEN_LIMIT=-5: expected >= 0"),
        ("SCALAR_LR", "-0.1", "SCALAR_LR=-0.1: expected >= 0"),
        ("MATRIX_LR", "-1", "MATRIX_LR=-1.0: expected >= 0"),
        ("ROUTER_LR", "-1", "ROUTER_LR=-1.0: expected >= 0"),
        ("BETA2", "1.5", "BETA2=1.5: expected 0..0.99999"),
        ("EMA_DECAY", "1", "EMA_DECAY=1.0: expected 0..0.99999"),
        ("LOGIT_SOFTCAP", "0", "LOGIT_SOFTCAP=0.0: expected >= 1"),
        ("EVAL_STRIDE", "-64", "EVAL_STRIDE=-64: expected >= 0"),
        ("WARMUP_STEPS", "-1", "WARMUP_STEPS=-1: expected >= 0"),
        ("CAPACITY_FACTOR", "0", "CAPACITY_FACTOR=0.0: expected >= 0.1"),
    ],
)
def test_out_of_range_knobs_fail_naming_the_knob(name, value, needle):
    with pytest.raises(tg.ConfigError) as err:
        tg.load_config({name: value})
    assert needle in str(err.value)


def test_a_batch_that_does_not_divide_names_the_knob_the_user_set():
    with pytest.raises(
        tg.ConfigError
    ) as err:  # MICRO_BATCH_TOKENS was not set: it came from TRAIN_BATCH_TOKENS
        tg.load_config({"TRAIN_BATCH_TOKENS": "1000", "TRAIN_SEQ_LEN": "128"})
    assert "MICRO_BATCH_TOKENS=125 (unset: TRAIN_BATCH_TOKENS=1000 / 8)" in str(err.value)
    h = tg.load_config({"TRAIN_BATCH_TOKENS": "3072", "TRAIN_SEQ_LEN": "128"})
    with pytest.raises(
        tg.ConfigError, match=r"MICRO_BATCH_TOKENS=384 \(unset: TRAIN_BATCH_TOKENS=3072 / 8\)"
    ):
        tg.grad_accum_steps(h, 5)
    h = tg.load_config({"TRAIN_BATCH_TOKENS": "3072", "TRAIN_SEQ_LEN": "128", "MICRO_BATCH_TOKENS": "384"})
    with pytest.raises(tg.ConfigError) as err:
        tg.grad_accum_steps(h, 5)
    assert str(err.value).endswith("x MICRO_BATCH_TOKENS=384")


def test_grouped_dispatch_refuses_widths_not_multiple_of_8():
    with pytest.raises(
        tg.ConfigError, match="MOE_DISPATCH=grouped needs MODEL_DIM=64 and the expert width 20"
    ):
        tg.load_config({**TINY_ENV, "MOE_MODE": "topk", "EXPERT_HIDDEN": "20"})
    with pytest.raises(tg.ConfigError, match="MOE_DISPATCH=grouped needs MODEL_DIM=68"):
        tg.load_config(
            {
                **TINY_ENV,
                "MOE_MODE": "shared_routed",
                "MODEL_DIM": "68",
                "NUM_HEADS": "2",
                "NUM_KV_HEADS": "2",
                "EXPERT_HIDDEN": "32",
                "SHARED_HIDDEN": "32",
            }
        )
    assert tg.load_config({**TINY_ENV, "MOE_MODE": "topk", "EXPERT_HIDDEN": "20", "MOE_DISPATCH": "capacity"})
    assert tg.load_config(
        {**TINY_ENV, "MOE_MODE": "soft", "EXPERT_HIDDEN": "20"}
    )  # no grouped_mm in soft MoE


@pytest.mark.slow
def test_bad_knob_fails_before_training_and_leaves_no_log(tmp_path):
    result = run_train(tmp_path, ZSTD_LEVEL=99)
    assert_refused_before_training(result, "error: ZSTD_LEVEL=99: expected 1..22")
    assert not (tmp_path / "logs").exists()


# --- shards ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_corrupt_train_shard_1_is_named_at_startup_in_the_log_and_the_run_id_stays_free(tmp_path):
    data = sample_copy(tmp_path)
    shard = data / "fineweb_train_000001.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    result = run_train(tmp_path, DATA_PATH=data)
    assert_refused_before_training(result, f"{shard}: file is")
    logs = tmp_path / "logs"
    assert not (logs / "test.txt").exists() and not (logs / "test.jsonl").exists()
    assert f"error: {shard}: file is" in (logs / "test.failed1.txt").read_text().splitlines()[-1]
    error, end = events(logs / "test.failed1.jsonl")[-2:]
    assert error["event"] == "error" and str(shard) in error["message"] and end == {**end, "status": "failed"}
    again = run_train(
        tmp_path, DATA_PATH=data, TOKENIZER_PATH=tmp_path / "missing.model"
    )  # a second failed start
    assert again.returncode == 2 and "missing.model: no such file" in (logs / "test.failed2.txt").read_text()
    assert (
        "fineweb_train_000001.bin" in (logs / "test.failed1.txt").read_text()
    )  # the first is kept as it was
    shard.write_bytes((SAMPLE / shard.name).read_bytes())
    ok = run_train(tmp_path, DATA_PATH=data, ITERATIONS=2)  # the same RUN_ID, now with good data
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert events(logs / "test.jsonl")[-1] == {**events(logs / "test.jsonl")[-1], "status": "ok"}


@pytest.mark.slow
def test_out_of_range_token_in_a_train_shard_is_named_when_first_loaded(tmp_path):
    data = sample_copy(tmp_path)
    for name, position in (("fineweb_train_000000.bin", 7), ("fineweb_train_000002.bin", 5000)):
        tokens = np.memmap(data / name, dtype="<u2", mode="r+", offset=tg.SHARD_HEADER_BYTES)
        tokens[position] = 1500
        tokens.flush()
        del tokens
    files = tg.shard_files(str(data), "train")
    assert tg.check_shards(files, 1024) == files  # start-up checks read headers and sizes only
    stream = tg.TokenStream(files[1:], 1024)  # shard 1 is good; shard 2 is checked when the stream reaches it
    with pytest.raises(
        tg.DataError, match=re.escape(f"{files[2]}: token id 1500 is outside VOCAB_SIZE=1024")
    ):
        stream.take(tg.shard_token_count(files[1]) + 1)
    # the first shard loads before training, so a run names it and refuses to start
    assert_refused_before_training(
        run_train(tmp_path, DATA_PATH=data), f"{files[0]}: token id 1500 is outside VOCAB_SIZE=1024"
    )


def test_train_shards_are_memory_mapped_not_read_whole(tiny_config):
    h = tiny_config()
    loader = tg.TrainLoader(
        tg.shard_files(str(SAMPLE), "train"),
        0,
        1,
        h.train_seq_len,
        h.micro_batch_tokens,
        2,
        torch.device("cpu"),
    )
    assert isinstance(loader.stream.tokens, np.memmap)
    for _ in range(400):  # past the end of shard 0: the next shard is mapped too
        loader.next_step()
    assert loader.stream.file_idx > 0 and isinstance(loader.stream.tokens, np.memmap)


# --- nothing overwritten, invalid results fail ------------------------------------------------


@pytest.mark.slow
def test_existing_artifact_path_is_refused_before_training_and_untouched(tmp_path):
    artifact = tmp_path / "precious.ptz"
    artifact.write_bytes(b"another run's artifact")
    result = run_train(tmp_path, ARTIFACT_PATH=artifact)
    assert_refused_before_training(result, f"ARTIFACT_PATH={artifact} already exists")
    assert artifact.read_bytes() == b"another run's artifact"
    assert (
        "already exists" in (tmp_path / "logs" / "test.failed1.txt").read_text()
    )  # logged; RUN_ID stays free


@pytest.mark.slow
def test_non_finite_stored_tensors_and_score_exit_non_zero_with_marked_score_lines(tmp_path):
    result = run_train(tmp_path, SCALAR_LR="1e9", ITERATIONS=2, MOE_MODE="none")
    assert result.returncode == 2, result.stderr[-2000:]
    finals = [line for line in result.stdout.splitlines() if line.startswith("final_")]
    assert finals and all(
        re.search(r"INVALID\(\d+ stored tensors not finite .*val_bpb is not finite\)$", f) for f in finals
    )
    assert "not a valid result" in result.stderr and "Traceback" not in result.stderr
    log = events(tmp_path / "logs" / "test.jsonl")  # the run trained: its RUN_ID stays used, its log says why
    assert all(e["invalid"] for e in log if e["event"] == "final")
    assert [e["event"] for e in log[-2:]] == ["error", "end"] and log[-1]["status"] == "failed"


@pytest.mark.slow
def test_artifact_over_the_cap_fails_even_when_over_budget_is_allowed(tmp_path):
    result = run_train(tmp_path, SIZE_CAP_BYTES=100000, BUDGET_MARGIN=-1, ITERATIONS=2, MOE_MODE="none")
    assert result.returncode == 2
    finals = [line for line in result.stdout.splitlines() if line.startswith("final_")]
    assert finals and all("INVALID(code + artifact" in f and "> SIZE_CAP_BYTES=100000)" in f for f in finals)
    assert "not a valid result: code + artifact" in result.stderr


# --- the GPU path, checked on CPU ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_router_logits_are_fp32_under_bf16_autocast(tiny_config, mode):
    torch.manual_seed(0)
    moe = tg.make_mlp(tg.model_config(tiny_config(MOE_MODE=mode)), 0)
    with torch.no_grad():
        moe.router_weight.normal_(0, 0.5)
    x = torch.randn(512, moe.router_weight.size(1))
    reference = x.double() @ moe.router_weight.double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.router_logits(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_untied_input_embedding_is_a_lookup_not_matmul_flops(tiny_config):
    tied, untied = (
        tg.GPT(tg.model_config(tiny_config(TIE_EMBEDDINGS=tie, MOE_MODE="none"))) for tie in (1, 0)
    )
    # the tied table is the output head (counted once); untied, the head counts and the input table does not
    assert tg.matmul_params_per_token(untied) == tg.matmul_params_per_token(tied)


class Recorder:
    def __init__(self, trace):
        self.trace = trace

    def __call__(self, msg):
        self.trace.append("log " + msg.split()[0])

    def event(self, *args, **kwargs):
        pass


def test_one_host_wait_per_step_reads_the_previous_steps_flags(tiny_config, monkeypatch):
    trace: list[str] = []
    h = tiny_config(MOE_MODE="none", ITERATIONS=4, TRAIN_LOG_EVERY=1, DATA_PATH=str(SAMPLE))
    trainer = tg.Trainer(h, tg.Runtime(0, 1, torch.device("cpu"), Recorder(trace)))
    step, tolist = trainer.train_step, torch.Tensor.tolist
    monkeypatch.setattr(trainer, "train_step", lambda: (trace.append("launch"), step())[1])
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (trace.append("wait"), tolist(t))[1])
    trainer.run(lambda step: trace.append(f"validate {step}"))
    # step N's flags are read (the host's one wait) after step N+1 is launched, and its line logged then
    assert trace == [
        "launch",
        "launch",
        "wait",
        "log step:1/4",
        "launch",
        "wait",
        "log step:2/4",
        "launch",
        "wait",
        "log step:3/4",
        "wait",
        "log step:4/4",
        "validate 4",
    ]


CHECK_SYNC = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train_gpt as tg
dist.init_process_group("gloo")
h = tg.load_config({env!r})
torch.manual_seed(0)
model = tg.GPT(tg.model_config(h))
rt = tg.Runtime(dist.get_rank(), 2, torch.device("cpu"), print)
tg.check_ranks_in_sync(model, rt)
if dist.get_rank() == 1:
    with torch.no_grad():
        model.blocks[1].attn_scale[3] += 1e-6
try:
    tg.check_ranks_in_sync(model, rt)
except tg.TrainingDiverged as err:
    print("diverged:", err)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_checksum_names_the_tensor_that_drifted(tmp_path):
    script = tmp_path / "check_sync.py"
    script.write_text(CHECK_SYNC.format(repo=str(REPO), env={**TINY_ENV, "MOE_MODE": "none"}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # (the two ranks print at once, so their lines may interleave: count phrases, not lines)
    assert result.stdout.count("ranks_in_sync:yes ranks:2") == 2  # equal weights: every rank agrees
    assert result.stdout.count("ranks out of sync after training: 1 of") == 2  # one weight moved by 1e-6
    assert "tensors differ, first blocks.1.attn_scale (sums by rank:" in result.stdout


@pytest.mark.slow
def test_two_rank_run_on_a_wall_clock_schedule_ends_in_sync(tmp_path):
    # LR warm-down, momentum warm-up and the EMA decay all follow the clock here: ranks must agree on it.
    result = run_train(
        tmp_path,
        nproc=2,
        ITERATIONS=100000,
        MAX_WALLCLOCK_SECONDS=20,  # the calibration reserve, measured (the slowest rank's), comes out of it
        GPTQ_CALIBRATION_BATCHES=1,
        TRAIN_LOG_EVERY=10,
        MOE_MODE="topk",
        VAL_TOKEN_LIMIT=2048,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("gptq_reserve: ") == 1  # rank 0 logs the agreed reserve
    assert re.search(r"^ranks_in_sync:yes ranks:2 tensors:\d+$", result.stdout, re.M)
    steps = [int(s) for s in re.findall(r"^step:(\d+)/100000 train_loss", result.stdout, re.M)]
    assert 1 < steps[-1] < 100000  # stopped by the clock, not the step count
