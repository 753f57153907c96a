"""Bad input fails before training, naming what is wrong; failed runs leave
nothing burned or overwritten; invalid results exit non-zero; ranks stay in sync; the GPU-path fixes."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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
        tg.grad_accum_steps(h.data, 5)
    h = tg.load_config({"TRAIN_BATCH_TOKENS": "3072", "TRAIN_SEQ_LEN": "128", "MICRO_BATCH_TOKENS": "384"})
    with pytest.raises(tg.ConfigError) as err:
        tg.grad_accum_steps(h.data, 5)
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
        h.data.train_seq_len,
        h.data.micro_batch_tokens,
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
    moe = tg.make_mlp(tiny_config(MOE_MODE=mode).model, 0)
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
    tied, untied = (tg.GPT(tiny_config(TIE_EMBEDDINGS=tie, MOE_MODE="none").model) for tie in (1, 0))
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
import torch, torch.distributed as dist
import train_gpt as tg
dist.init_process_group("gloo")
h = tg.load_config({env!r})
torch.manual_seed(0)
model = tg.GPT(h.model)
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


def importable_repo() -> str:
    """PYTHONPATH for a script run outside the repository that imports train_gpt."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


@pytest.mark.slow
def test_ranks_checksum_names_the_tensor_that_drifted(tmp_path):
    script = tmp_path / "check_sync.py"
    script.write_text(CHECK_SYNC.format(env={**TINY_ENV, "MOE_MODE": "none"}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": importable_repo()},
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


# --- stopped and raced runs: SIGTERM / SIGHUP, two runs on one artifact path ----------------------------


def start_run(tmp_path, **env) -> subprocess.Popen:
    """train_gpt.py with TINY_ENV plus env, in the background, its output piped."""
    full = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    full.update(TINY_ENV, RUN_ID="test", LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.Popen(
        [sys.executable, str(REPO / "train_gpt.py")],
        cwd=tmp_path,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_during_training_is_one_line_exit_143_and_the_logs_end_in_an_error(tmp_path):
    proc = start_run(tmp_path, ITERATIONS=100000, TRAIN_LOG_EVERY=1)
    for line in proc.stdout:  # a few training steps
        if line.startswith("step:3/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
    m = re.fullmatch(
        r"stopped by SIGTERM at step (\d+); run marked failed, logs kept: (.*test\.txt)\n", stderr
    )
    assert m and int(m[1]) >= 3, stderr
    logged = events(tmp_path / "logs" / "test.jsonl")
    assert logged[-2]["event"] == "error" and f"stopped by SIGTERM at step {m[1]}" in logged[-2]["message"]
    assert logged[-1] == {**logged[-1], "event": "end", "status": "failed"}
    assert (
        (tmp_path / "logs" / "test.txt").read_text().endswith(f"error: stopped by SIGTERM at step {m[1]}\n")
    )
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["test.jsonl", "test.txt"]  # no artifact


def test_sigterm_and_sighup_raise_in_the_main_thread_once(monkeypatch):
    saved = {s: signal.getsignal(s) for s in tg.STOP_SIGNALS}
    monkeypatch.setattr(tg, "stop_signals_received", [])
    try:
        for signum in tg.STOP_SIGNALS:
            tg.stop_on_signals()
            with pytest.raises(tg.Stopped) as err:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises at the next bytecode
            assert isinstance(err.value, KeyboardInterrupt)  # every Ctrl-C path handles it
            assert signal.getsignal(signum) == signal.SIG_IGN  # a repeat cannot cut the failure's logging
        assert tg.stop_signals_received == list(tg.STOP_SIGNALS)
        assert tg.stop_signal(RuntimeError("a peer left the collective")) == signal.SIGTERM
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert tg.stopped_where(signal.SIGINT, "at step 3") == "interrupted at step 3"
    assert tg.stopped_where(signal.SIGHUP, "during export") == "stopped by SIGHUP during export"


def test_a_written_file_never_replaces_another_and_a_failed_write_leaves_nothing(tmp_path):
    path, said = tmp_path / "m.ptz", []
    path.write_bytes(b"another run's model")

    def write(name):
        with open(name, "wb") as f:
            f.write(b"this run's model")

    assert tg.write_new_file(str(path), write, said.append) == str(tmp_path / "m.2.ptz")
    assert tg.write_new_file(str(path), write, said.append) == str(tmp_path / "m.3.ptz")
    assert path.read_bytes() == b"another run's model"
    assert (tmp_path / "m.2.ptz").read_bytes() == b"this run's model"
    assert said[
        0
    ] == f"warning: {path} was created by another process during this run; this run's file is " + str(
        tmp_path / "m.2.ptz"
    )

    def stopped(name):
        with open(name, "wb") as f:
            f.write(b"half a mod")
        raise tg.Stopped("SIGTERM")

    with pytest.raises(tg.Stopped):
        tg.write_new_file(str(tmp_path / "new.ptz"), stopped, said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.2.ptz", "m.3.ptz", "m.ptz"]


@pytest.mark.slow
def test_two_runs_on_one_artifact_path_keep_both_models(tmp_path):
    """Another run writes ARTIFACT_PATH while this one calibrates (both passed the start-up check)."""
    artifact = tmp_path / "shared.ptz"
    racer = (
        "import train_gpt as tg\n"
        "calibrate = tg.calibrate\n"
        "def other_run_finishes_first(trainer):\n"
        f"    open({str(artifact)!r}, 'xb').write(b\"the other run's model\")\n"
        "    return calibrate(trainer)\n"
        "tg.calibrate = other_run_finishes_first\n"
        "tg.main()\n"
    )
    full = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    full.update(TINY_ENV, RUN_ID="test", LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    full.update(ITERATIONS="2", ARTIFACT_PATH=str(artifact), PYTHONPATH=importable_repo())
    result = subprocess.run(
        [sys.executable, "-c", racer], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert artifact.read_bytes() == b"the other run's model"
    ours = tmp_path / "shared.2.ptz"
    assert f"this run's file is {ours}" in result.stdout
    size_check = next(e for e in events(tmp_path / "logs" / "test.jsonl") if e["event"] == "size_check")
    assert size_check["artifact"] == str(ours)
    assert size_check["sha256"] == hashlib.sha256(ours.read_bytes()).hexdigest()
    assert re.search(r"^final_quant_zstd_sliding_window_exact .*val_bpb:\d", result.stdout, re.M)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow
def test_a_run_whose_budget_preview_fits_never_ends_invalid_for_the_codes_size(tmp_path):
    """The preview, the fit and the final check count the same code bytes: the script as a record ships
    it. The cap leaves room for the compressed script, not the readable one (162 kB on its own)."""
    cap = tg.code_bytes() + 150_000
    assert cap < tg.script_bytes() + 100_000
    result = run_train(tmp_path, ITERATIONS=2, SIZE_CAP_BYTES=cap)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "INVALID" not in result.stdout
    logged = events(tmp_path / "logs" / "test.jsonl")
    preview = next(e for e in logged if e["event"] == "budget_preview")
    size_check = next(e for e in logged if e["event"] == "size_check")
    assert preview["code_bytes"] == size_check["code_bytes"] == tg.code_bytes()
    assert preview["total_bytes"] <= cap and size_check["total_bytes"] <= cap
    assert size_check["script_bytes"] == tg.script_bytes()
    counted = f"({tg.CODE_COUNTED_AS})"
    assert f"+ code {tg.code_bytes()} {counted}" in result.stdout
    assert f"Code size (counted: {tg.CODE_COUNTED_AS}): {tg.code_bytes()} bytes" in result.stdout


def test_an_empty_value_is_an_error_naming_the_knob_unless_its_default_is_empty():
    with pytest.raises(tg.ConfigError, match=r"^NUM_LAYERS=: set but empty \(an unset shell variable\?\)"):
        tg.load_config({**TINY_ENV, "NUM_LAYERS": ""})
    with pytest.raises(tg.ConfigError, match=r"^SEED=, MATRIX_LR=: set but empty"):
        tg.load_config({**TINY_ENV, "SEED": "", "MATRIX_LR": ""})
    unset = {"RUN_ID": "", "ARTIFACT_PATH": "", "EMA_DECAY": "", "MOE_LAYERS": "", "EVAL_TOKEN_LOSSES": ""}
    h = tg.load_config({**TINY_ENV, **unset})  # empty defaults: empty is unset
    assert (h.run.run_id, h.optim.ema_decay, h.model.moe_layers) == ("", None, [])


# --- a full disk at start ------------------------------------------------------------------------------

FULL_DISK = """
import builtins, errno, os, runpy, sys
real_open, log_dir = builtins.open, os.environ["LOG_DIR"]

class FullDisk:  # the file is created, every write fails: a disk with inodes left but no blocks
    def __init__(self, f):
        self.f = f
    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def flush(self):
        pass
    def __getattr__(self, name):
        return getattr(self.f, name)

def full_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    writes = any(c in mode for c in "wxa")
    return FullDisk(f) if writes and os.path.abspath(str(path)).startswith(log_dir) else f

builtins.open = full_open
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_at_start_is_one_error_line_and_leaves_the_run_id_free(tmp_path):
    full = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    logs = tmp_path / "logs"
    full.update(TINY_ENV, RUN_ID="test", LOG_DIR=str(logs), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(REPO / "train_gpt.py")],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_refused_before_training(result, f"error: cannot write under LOG_DIR={logs} or ARTIFACT_PATH=")
    assert "No space left on device (free space there" in result.stderr
    assert list(logs.iterdir()) == []  # no 0-byte logs to block RUN_ID=test


def test_a_log_pair_that_cannot_be_completed_is_not_left_half_made(tmp_path):
    (tmp_path / "test.jsonl").symlink_to(tmp_path / "gone")  # not there, yet the name cannot be created
    with pytest.raises(FileExistsError):
        tg.Logger(str(tmp_path / "test"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl"]  # no test.txt left behind


# --- errors that name the knob that is wrong; no-op values refused ---------------------------------------


@pytest.mark.parametrize(
    "env,message",
    [
        ({"RUN_ID": "r" * 201}, "RUN_ID: 201 bytes, at most 200 (it names files"),
        (
            {"PARALLEL_START_LAYER": "2"},
            "PARALLEL_START_LAYER=2: past the last layer (NUM_LAYERS=2: layers 0..1)",
        ),
        ({"MOE_MODE": "soft", "NUM_EXPERTS": "1"}, "NUM_EXPERTS=1: a mixture needs at least 2 experts"),
    ],
)
def test_a_no_op_or_impossible_value_names_its_knob(env, message):
    with pytest.raises(tg.ConfigError) as err:
        tg.load_config({**TINY_ENV, **env})
    assert str(err.value).startswith(message), err.value


def test_a_long_eval_seq_len_is_blamed_on_itself_not_on_ttt(tiny_config):
    h = tiny_config(EVAL_SEQ_LEN=50000)  # TTT off: its chunk size is not the problem
    assert not h.evaluation.ttt_enabled and h.evaluation.eval_seq_len == 50000
    with pytest.raises(
        tg.ConfigError, match=r"^GLOBAL_TTT_CHUNK_TOKENS=\d+: must hold at least one EVAL_SEQ"
    ):
        tiny_config(EVAL_SEQ_LEN=50000, TTT_ENABLED=1)
    with pytest.raises(tg.ConfigError) as err:  # longer than the split: one window, not a sliding evaluation
        tg.load_validation(h.data, h.evaluation, lambda msg: None)
    assert str(err.value) == (
        f"EVAL_SEQ_LEN=50000: not shorter than the validation split, 8193 tokens (VAL_TOKEN_LIMIT=8192) in "
        f"DATA_PATH={SAMPLE}"
    )


def test_dry_run_refuses_a_batch_the_run_refuses_and_warns_for_8_ranks(tiny_config, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(tg.ConfigError, match=r"^TRAIN_BATCH_TOKENS=3072 is not divisible by WORLD_SIZE=1"):
        tg.dry_run(tiny_config(TRAIN_BATCH_TOKENS=3072, MICRO_BATCH_TOKENS=2048))
    tg.dry_run(tiny_config())  # 2048 tokens = 2 micro-batches on one rank, a fraction of one on 8
    out = capsys.readouterr().out
    assert "warning: torchrun --nproc_per_node=8 would refuse this batch: TRAIN_BATCH_TOKENS=2048" in out


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_stops_every_rank_and_rank_0_says_it_once(tmp_path):
    full = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    full.update(TINY_ENV, RUN_ID="test", LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    full.update(ALLOW_CPU_DISTRIBUTED="1", ITERATIONS="100000", TRAIN_LOG_EVERY="1")
    script = str(REPO / "train_gpt.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    proc = subprocess.Popen(
        launch,
        cwd=tmp_path,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if line.startswith("step:3/"):
            break
    os.killpg(proc.pid, signal.SIGTERM)  # as a job scheduler stops a job: every process of it
    _, stderr = proc.communicate(timeout=120)
    assert len(re.findall(r"^stopped by SIGTERM at step \d+; run marked failed", stderr, re.M)) == 1, stderr
    assert f'File "{script}"' not in stderr  # no rank's traceback (torchrun may print its own)
    logged = events(tmp_path / "logs" / "test.jsonl")
    assert logged[-2]["event"] == "error" and "stopped by SIGTERM at step" in logged[-2]["message"]
    assert logged[-1] == {**logged[-1], "event": "end", "status": "failed"}
