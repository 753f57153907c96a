"""train_gpt.py as users run it: a subprocess on the sample corpus, alone or under torchrun."""

import json
import re

import pytest

import train_gpt as tg

from conftest import REPO, run_train

FINAL = re.compile(r"final_quant_zstd_(roundtrip|sliding_window)_exact val_loss:([\d.]+) val_bpb:([\d.]+)")
STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+)", re.M)


def sample_env() -> dict:
    lines = (REPO / "data" / "sample.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {k: str(REPO / v) if k in ("DATA_PATH", "TOKENIZER_PATH") else v for k, v in env.items()}


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_run")
    result = run_train(tmp, ITERATIONS=30, MOE_MODE="topk")
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp, result.stdout


@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_everything(moe_run):
    tmp, stdout = moe_run
    losses = [float(v) for _, v in STEP.findall(stdout)]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.5
    log = (tmp / "logs" / "test.txt").read_text()
    assert log.strip() == stdout.strip()  # the log holds exactly what was printed
    finals = {kind: (float(loss), float(bpb)) for kind, loss, bpb in FINAL.findall(log)}
    assert set(finals) == {"roundtrip", "sliding_window"} and all(0 < v[1] < 10 for v in finals.values())
    # More context does not hurt (within noise: after 30 steps the model barely uses context).
    assert finals["sliding_window"][0] <= finals["roundtrip"][0] + 0.005
    assert (tmp / "logs" / "test_model.ptz").stat().st_size == int(
        re.search(r"Serialized model quant\+zstd: (\d+)", log)[1]
    )
    assert re.search(r"size_check total:\d+ cap:16000000 slack:\d+ OK", log)
    assert re.search(r"^moe layer:1 load:[\d.,]+ max_mean:", log, re.M)
    assert not (tmp / "logs" / "test_routing.json").exists()  # that is tools/routing/routing_analysis.py


@pytest.mark.slow
def test_existing_run_id_is_never_overwritten(moe_run):
    tmp, _ = moe_run
    before = (tmp / "logs" / "test.txt").read_text()
    result = run_train(tmp, ITERATIONS=1)
    assert result.returncode == 2 and "already exists; choose a new RUN_ID" in result.stderr
    assert (tmp / "logs" / "test.txt").read_text() == before


def test_a_logger_refuses_a_run_id_whose_text_or_event_log_exists(tmp_path):
    """The refusal above without a training run: either file of the pair blocks the RUN_ID, untouched."""
    for existing in ("test.txt", "test.jsonl"):
        folder = tmp_path / existing
        folder.mkdir()
        (folder / existing).write_text("an earlier run\n")
        with pytest.raises(tg.ConfigError, match="already exists; choose a new RUN_ID"):
            tg.Logger(str(folder / "test"))
        assert [p.name for p in folder.iterdir()] == [existing]
        assert (folder / existing).read_text() == "an earlier run\n"


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Same global batch: 1 process x 2 micro-steps equals 2 processes x 1 micro-step (gloo, CPU)."""
    # GPTQ calibrates on GPTQ_CALIBRATION_BATCHES micro-batches per rank: the same tokens in both runs
    one = run_train(
        tmp_path / "one", ITERATIONS=6, TRAIN_LOG_EVERY=1, MOE_MODE="topk", GPTQ_CALIBRATION_BATCHES=2
    )
    two = run_train(
        tmp_path / "two",
        nproc=2,
        ITERATIONS=6,
        TRAIN_LOG_EVERY=1,
        MOE_MODE="topk",
        GPTQ_CALIBRATION_BATCHES=1,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "world_size 1 grad_accum 2" in one.stdout and "world_size 2 grad_accum 1" in two.stdout
    losses_one, losses_two = STEP.findall(one.stdout), STEP.findall(two.stdout)
    assert len(losses_one) == 6
    for (s1, l1), (s2, l2) in zip(losses_one, losses_two, strict=True):
        assert s1 == s2 and float(l1) == pytest.approx(float(l2), abs=2e-4)
    for (k1, loss1, _), (k2, loss2, _) in zip(
        FINAL.findall(one.stdout), FINAL.findall(two.stdout), strict=True
    ):
        assert k1 == k2 and float(loss1) == pytest.approx(float(loss2), abs=1e-3)


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"DATA_PATH": "/nonexistent/shards"}, "DATA_PATH=/nonexistent/shards: no such directory"),
        ({"TOKENIZER_PATH": "/nonexistent/tok.model"}, "TOKENIZER_PATH=/nonexistent/tok.model: no such file"),
        ({"VOCAB_SIZE": "2048"}, "tokenizer has 1024 pieces but VOCAB_SIZE=2048"),
        ({"NUM_LAYERS": "two"}, "NUM_LAYERS='two': expected int"),
        ({"TRAIN_BATCH_TOKENS": "3000"}, "TRAIN_BATCH_TOKENS=3000 is not divisible"),
        ({"SIZE_CAP_BYTES": "100000"}, "exceeds SIZE_CAP_BYTES=100000"),
    ],
)
@pytest.mark.slow
def test_bad_input_fails_with_a_message_naming_it(tmp_path, env, needle):
    result = run_train(tmp_path, **env)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_nan_loss_stops_the_run_with_the_step(tmp_path):
    result = run_train(tmp_path, SCALAR_LR="1e30", ITERATIONS=10)
    assert result.returncode == 2
    assert re.search(r"non-finite training loss at step \d+", result.stderr)
    assert not (tmp_path / "logs" / "test_model.ptz").exists()
    events = read_events(tmp_path / "logs" / "test.jsonl")
    assert [e["event"] for e in events[-2:]] == ["error", "end"] and events[-1]["status"] == "failed"
    assert "TrainingDiverged: non-finite training loss at step" in events[-2]["message"]


def read_events(path) -> list[dict]:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(isinstance(e["event"], str) and isinstance(e["time"], float) for e in events)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    return events


@pytest.mark.slow
def test_jsonl_event_log_matches_the_text_log(moe_run):
    tmp, stdout = moe_run
    events = read_events(tmp / "logs" / "test.jsonl")
    kinds = [e["event"] for e in events]
    assert (
        kinds[:5] == ["config", "params", "budget_preview", "eval_projection", "step"] and kinds[-1] == "end"
    )
    assert events[-1]["status"] == "ok" and "error" not in kinds
    config = events[0]
    assert config["knobs"]["MOE_MODE"] == "topk" and config["knobs"]["ITERATIONS"] == 30
    assert re.search(rf"code_sha256:{config['code_sha256']} code_bytes:{config['code_bytes']}$", stdout, re.M)
    assert config["world_size"] == 1 and config["grad_accum"] == 2
    assert f"params total:{events[1]['total']} " in stdout and events[2]["cap"] == 16_000_000
    steps = [e for e in events if e["event"] == "step"]
    assert [(str(e["step"]), f"{e['train_loss']:.4f}") for e in steps] == STEP.findall(stdout)
    routing = [e for e in events if e["event"] == "routing"]
    assert [e["layer"] for e in routing] == [0, 1] * len(steps)  # every MoE layer at every step line
    assert [e["step"] for e in routing[::2]] == [e["step"] for e in steps]
    assert all(sum(e["load"]) == pytest.approx(1.0) and e["dropped"] == 0 for e in routing)
    vals = [e for e in events if e["event"] == "val"]
    assert [e["step"] for e in vals] == [30]
    pre_quant = next(e for e in events if e["event"] == "pre_quant")
    assert f"pre_quant_ema val_loss:{pre_quant['val_loss']:.8f} val_bpb:{pre_quant['val_bpb']:.8f}" in stdout
    size = next(e for e in events if e["event"] == "size_check")
    assert size["total_bytes"] == size["code_bytes"] + size["artifact_bytes"] == size["cap"] - size["slack"]
    assert f"size_check total:{size['total_bytes']} " in stdout
    finals = [e for e in events if e["event"] == "final"]
    assert [e["mode"] for e in finals] == ["plain", "sliding"] and all(e["eval_time_s"] > 0 for e in finals)
    last_line = FINAL.findall(stdout)[-1]
    assert finals[-1]["name"] == f"final_quant_zstd_{last_line[0]}_exact"
    assert f"{finals[-1]['val_loss']:.8f}" == last_line[1] and f"{finals[-1]['val_bpb']:.8f}" == last_line[2]


@pytest.mark.slow
def test_over_budget_run_allowed_then_shrunk_to_fit(tmp_path):
    cap = tg.code_bytes() + 47_000  # ~3/4 of this model's natural artifact (~62 kB)
    result = run_train(
        tmp_path,
        SIZE_CAP_BYTES=cap,
        BUDGET_MARGIN=-1,
        ITERATIONS=2,
        MOE_MODE="none",
        FP16_KEEP_MAX_NUMEL=1024,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "predicted" in result.stdout and "fit: bits lowered" in result.stdout
    total = int(re.search(rf"size_check total:(\d+) cap:{cap} slack:\d+ OK", result.stdout)[1])
    assert total <= cap


@pytest.mark.slow
def test_budget_preview_is_within_ten_percent_on_the_sample_model(tmp_path):
    env = {
        **sample_env(),
        "MAX_WALLCLOCK_SECONDS": "0",
        "ITERATIONS": "8",
        "VAL_TOKEN_LIMIT": "4096",
        "ZSTD_LEVEL": "22",
    }
    result = run_train(tmp_path, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    estimate = int(re.search(r"budget_preview: artifact ~(\d+) bytes", result.stdout)[1])
    actual = int(re.search(r"Serialized model quant\+zstd: (\d+) bytes", result.stdout)[1])
    assert abs(estimate - actual) / actual < 0.10, (estimate, actual)
