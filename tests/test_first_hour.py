"""A newcomer's first hour: competitors' knob names, inputs that used to slip through (RUN_ID paths,
LOG_DIR, Ctrl-C, torchrun errors, the tokenizer's identity, EVAL_ONLY knobs), progress lines on long
phases, the sample script's arguments and pip check, and runlog's table."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt as tg
from conftest import REPO, SAMPLE, TINY_ENV, TOKENIZER, run_train
from data import build_shards as bs
from tools import runlog

STEP_LINE = re.compile(r"^step:\d+/\d+ train_loss", re.M)


def refused(result, needle: str) -> None:
    """Exit 2 with exactly one stderr line, containing `needle`, no traceback and no training step."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr[-2000:]
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not STEP_LINE.search(result.stdout)


# --- competitors' knob names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,ours",
    [
        ("WARMDOWN_ITERS", "use WARMDOWN_FRAC"),
        ("VAL_BATCH_SIZE", "use EVAL_BATCH_SEQS"),
        ("MUON_MOMENTUM_WARMUP_STEPS", "use MUON_MOMENTUM_WARMUP_FRAC"),
        ("TTT_EPOCHS", "use GLOBAL_TTT_EPOCHS"),
        ("SWA_ENABLED", "no equivalent"),
    ],
)
def test_a_competitors_knob_is_an_error_naming_ours(name, ours):
    with pytest.raises(tg.ConfigError, match=f"^{name} is another script's knob.*{ours}"):
        tg.load_config({**TINY_ENV, name: "1"})


def record_knob_names() -> set[str]:
    """Every os.environ.get name in the readable record scripts (two are lzma-wrapped)."""
    names = set()
    for script in (REPO / "tests" / "fixtures" / "real_records").glob("*/train_gpt.py"):
        names |= set(re.findall(r"environ\.get\(\s*[\"']([A-Z0-9_]+)", script.read_text(encoding="utf-8")))
    return names


def test_every_knob_of_the_baseline_and_the_records_is_ours_or_in_the_foreign_table():
    names = record_knob_names()
    assert {"WARMDOWN_ITERS", "VAL_BATCH_SIZE", "SWA_ENABLED"} <= names  # the scan reads the scripts
    unknown = sorted(
        n for n in names if n not in tg.KNOBS and n not in tg.LAUNCHER_VARS | tg.FOREIGN_KNOBS.keys()
    )
    assert unknown == []
    assert not set(tg.FOREIGN_KNOBS) & set(tg.KNOBS)
    for name, ours in tg.FOREIGN_KNOBS.items():  # every equivalent named is a real knob
        assert all(word in tg.KNOBS for word in re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", ours)), name


def test_a_lowercase_knob_is_an_error_naming_the_real_one():
    with pytest.raises(tg.ConfigError, match="^seed: knob names are upper case; use SEED"):
        tg.load_config({**TINY_ENV, "seed": "7"})
    with pytest.raises(tg.ConfigError, match="Num_Layers: .*use NUM_LAYERS"):
        tg.load_config({**TINY_ENV, "Num_Layers": "3"})


def test_xsa_last_n_over_the_layer_count_is_allowed_and_the_config_shows_the_effective_value(capsys):
    h = tg.load_config({**TINY_ENV, "XSA_LAST_N": "50"})
    assert h.model.num_layers == 2 and tg.knob_values(h)["XSA_LAST_N"] == 2
    with torch.device("meta"):
        tg.log_model(tg.GPT(h.model), tg.knob_values(h), tg.Logger(None, console=True))
    assert '"XSA_LAST_N": 2' in capsys.readouterr().out.splitlines()[0]


# --- inputs refused before anything is written ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("run_id", ["../escaped", "a/b"])
def test_a_run_id_with_a_path_is_refused_before_anything_is_written(tmp_path, run_id):
    result = run_train(tmp_path / "cwd", RUN_ID=run_id)
    refused(result, f"error: RUN_ID={run_id!r}: must be a file name in LOG_DIR")
    assert [p.name for p in tmp_path.rglob("*")] == ["cwd"]  # no logs folder, nothing beside it


@pytest.mark.slow
def test_a_log_dir_that_is_a_file_is_one_error_line_naming_log_dir(tmp_path):
    (tmp_path / "logs").write_text("not a folder")
    result = run_train(tmp_path)
    refused(result, f"error: LOG_DIR={tmp_path / 'logs'}: cannot write the logs there")
    assert (tmp_path / "logs").read_text() == "not a folder"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_log_dir_is_one_error_line_naming_log_dir(tmp_path):
    (tmp_path / "logs").mkdir(mode=0o555)
    result = run_train(tmp_path)
    refused(result, f"error: LOG_DIR={tmp_path / 'logs'}: cannot write the logs there")


def test_a_missing_tokenizer_names_the_download_command(tmp_path):
    with pytest.raises(tg.DataError, match=r"missing.model: no such file .*data/cached_challenge_fineweb.py"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 1024)


# --- the tokenizer's identity ---------------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_shards_and_the_shipped_sample_record_the_tokenizer_sha256(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(6)))
    manifest = bs.build([source], tmp_path / "out", val_docs=1, vocab_size=1024, tokenizer=TOKENIZER)
    assert manifest["tokenizer_sha256"] == sha256(TOKENIZER) == sha256(tmp_path / "out" / "tokenizer.model")
    shipped = json.loads((SAMPLE / "manifest.json").read_text(encoding="utf-8"))
    assert shipped["tokenizer_sha256"] == sha256(TOKENIZER)
    assert tg.check_tokenizer_identity(str(SAMPLE), str(TOKENIZER)) is None


def test_data_without_a_tokenizer_identity_gives_a_warning(tmp_path):
    warning = tg.check_tokenizer_identity(str(tmp_path), str(TOKENIZER))
    assert warning.startswith("warning: no tokenizer_sha256 in") and "TOKENIZER_PATH" in warning


@pytest.mark.slow
def test_another_tokenizer_than_the_one_that_made_the_shards_is_refused(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    manifest["tokenizer_sha256"] = "0" * 64  # the shards say another tokenizer made them
    (data / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = run_train(tmp_path, DATA_PATH=data)
    refused(result, f"error: TOKENIZER_PATH={TOKENIZER} is not the tokenizer that made DATA_PATH={data}")


# --- runs: Ctrl-C, torchrun, EVAL_ONLY, step lines, progress -----------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line_and_the_run_is_marked_failed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    env.update(TINY_ENV, RUN_ID="test", LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    env.update(ITERATIONS="100000", TRAIN_LOG_EVERY="1")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_gpt.py")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    for line in proc.stdout:  # wait for a few training steps
        if line.startswith("step:3/"):
            break
        assert time.time() < deadline, "no step line"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
    step = int(re.match(r"interrupted at step (\d+); run marked failed, logs kept: .*test\.txt$", stderr)[1])
    assert step >= 3
    events = [json.loads(line) for line in (tmp_path / "logs" / "test.jsonl").read_text().splitlines()]
    assert events[-1] == {**events[-1], "event": "end", "status": "failed"}
    assert f"error: interrupted at step {step}" in (tmp_path / "logs" / "test.txt").read_text()


@pytest.mark.slow
def test_a_config_error_under_torchrun_is_printed_once_and_every_rank_exits_2(tmp_path):
    result = run_train(tmp_path, nproc=2, ZSTD_LEVEL=99)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("ZSTD_LEVEL=99: expected 1..22") == 1, output[-3000:]
    # torchrun's report names each failed rank with its exit code (and may log the first one again)
    reported = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", output)
    # A rank exits 2, unless torchrun's SIGTERM (-15) after the other rank's exit reaches it first.
    assert {rank for rank, _ in reported} == {"0", "1"}, output[-3000:]
    codes = {code for _, code in reported}
    assert "2" in codes and codes <= {"2", "-15"}, output[-3000:]


@pytest.mark.slow
def test_eval_only_names_each_ignored_model_knob_and_step_lines_show_the_clock(tmp_path):
    # a reserve given by hand (unset, it is measured): the stop shown is exact
    trained = run_train(
        tmp_path, ITERATIONS=3, MAX_WALLCLOCK_SECONDS=300, GPTQ_RESERVE_SECONDS=5, TRAIN_LOG_EVERY=1
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    steps = re.findall(
        r"^step:(\d+)/3 train_loss.* \(stops at 295s or step 3, whichever first\)$", trained.stdout, re.M
    )
    assert steps == ["1", "2", "3"]
    assert runlog.parse(trained.stdout).steps == 3  # the reader still reads the step lines
    for phase in ("validation", "gptq calibration", "quantization (gptq)", "final sliding_window evaluation"):
        assert re.search(rf"^{re.escape(phase)}: started \(\d+ ", trained.stdout, re.M), phase
    result = run_train(
        tmp_path,
        RUN_ID="again",
        EVAL_ONLY=1,
        ARTIFACT_PATH=tmp_path / "logs" / "test_model.ptz",
        NUM_LAYERS=3,
        MODEL_DIM=64,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ignored = [line for line in result.stdout.splitlines() if line.startswith("eval_only: ignoring")]
    assert ignored == ["eval_only: ignoring NUM_LAYERS=3: the artifact's network has NUM_LAYERS=2"]


def test_progress_lines_give_the_share_done_and_an_eta(monkeypatch):
    monkeypatch.setattr(tg, "PROGRESS_QUIET_SECONDS", 0.0)
    lines = []
    progress = tg.Progress(lines.append, "gptq calibration", 20, "micro-batches")
    for done in range(1, 21):
        progress(done)
    assert lines[0] == "gptq calibration: started (20 micro-batches)"
    assert len(lines) == 10  # the start, then each tenth until the last (the phase's own line follows)
    assert re.fullmatch(r"gptq calibration: 10% \(2/20 micro-batches\) \d+s elapsed, ~\d+s left", lines[1])
    monkeypatch.setattr(tg, "PROGRESS_QUIET_SECONDS", 5.0)
    quiet = []
    progress = tg.Progress(quiet.append, "validation", 20, "batches")  # fast phases: one line
    for done in range(1, 21):
        progress(done)
    assert quiet == ["validation: started (20 batches)"]


def test_a_budget_preview_over_the_cap_but_within_the_margin_says_what_will_happen(tiny_config, capsys):
    h = tiny_config()
    model = tg.GPT(h.model)
    estimate, _ = tg.estimate_artifact_bytes(model, h.quant)
    quant = dataclasses.replace(
        h.quant, size_cap_bytes=estimate + tg.code_bytes() - 1000
    )  # 1,000 over, within 2%
    tg.log_budget_preview(model, quant, tg.Logger(None, console=True))
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"budget: ~100\d bytes over the cap, allowed by BUDGET_MARGIN=0.02: the run starts; if the written "
        r"artifact is over, the export shrinks it \(more pruning, then fewer bits\) until it fits",
        lines[-1],
    )


# --- run_sample.sh and runlog.py -----------------------------------------------------------------


def run_sample(*args, cwd=REPO, env=None):
    return subprocess.run(
        ["bash", str(cwd / "run_sample.sh"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_run_sample_help_prints_usage_and_a_stray_argument_is_an_error():
    usage = run_sample("--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: bash run_sample.sh [KEY=VALUE ...]")
    stray = run_sample("SEED=7", "--fast")
    assert stray.returncode == 2
    assert (
        stray.stderr.strip() == "error: '--fast' is not a KEY=VALUE knob setting (bash run_sample.sh --help)"
    )


@pytest.mark.slow
def test_run_sample_runs_pip_only_when_a_requirement_is_not_met(tmp_path):
    for name in ("run_sample.sh", "train_gpt.py", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "data" / "sample.env", tmp_path / "data" / "sample.env")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(  # records pip calls instead of installing anything
        f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then echo PIP "$@" >> {tmp_path}/pip.log; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    met = run_sample("DRY_RUN=1", cwd=tmp_path, env=env)
    assert met.returncode == 0 and "installing" not in met.stdout and not (tmp_path / "pip.log").exists()
    with open(tmp_path / "requirements.txt", "a") as f:
        f.write("numpy>=999\n")  # an installed version that does not meet it
    unmet = run_sample("DRY_RUN=1", cwd=tmp_path, env=env)
    assert unmet.returncode == 0 and "installing requirements.txt with pip" in unmet.stdout
    assert (tmp_path / "pip.log").read_text().startswith("PIP -m pip install")


def test_runlog_prints_a_table_without_json_and_json_with_it(capsys):
    log = REPO / "tests/fixtures/real_records/2026-03-17_NaiveBaseline/train.log"
    assert runlog.main([str(log)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^score\s+val_bpb 1\.2\d{7} \(val_loss", table, re.M) and not table.startswith("{")
    assert runlog.main([str(log), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["final_val_bpb"] == runlog.read(log).score.val_bpb


# --- missing data: the command for the export asked for ---------------------------------------------


@pytest.mark.parametrize("size", [1024, 4096, 8192])
def test_missing_data_or_tokenizer_names_the_command_for_the_variant_asked_for(tmp_path, size):
    from data import cached_challenge_fineweb as ccf

    variant = f"sp{size}"
    data = tmp_path / "datasets" / f"fineweb10B_{variant}"
    tokenizer = tmp_path / "tokenizers" / f"fineweb_{size}_bpe.model"
    with pytest.raises(tg.DataError) as missing_data:
        tg.shard_files(str(data), "val")
    with pytest.raises(tg.DataError) as missing_tokenizer:
        tg.load_tokenizer(str(tmp_path / "other.model"), size)  # a path naming no export: VOCAB_SIZE's
    with pytest.raises(tg.DataError) as named_tokenizer:
        tg.load_tokenizer(str(tokenizer), 8192 if size != 8192 else 1024)  # the path's export wins
    repo = None if variant not in ccf.COMMUNITY_VARIANTS else ccf.COMMUNITY_REPO_ID
    env = f"{ccf.REPO_ENV}={repo} " if repo else ""
    command = f"{env}python3 data/cached_challenge_fineweb.py --variant {variant}"
    for err in (missing_data, missing_tokenizer, named_tokenizer):
        assert str(err.value).endswith(f"(download the {variant} export with: {command})"), err.value
    # the downloader resolves that variant from exactly that environment
    source = ccf.resolve_source(variant, None, None, {ccf.REPO_ENV: repo} if repo else {})
    assert source.repo_id == (repo or ccf.OFFICIAL_REPO_ID)
    with pytest.raises(tg.DataError, match=r"no such directory \(build shards with data/build_shards.py"):
        tg.shard_files(str(tmp_path / "mine"), "train")
