"""tools/runlog.py: the one parser of train_gpt.py's logs, on a real tiny run and on a hand-written log.

The real run is a top-k MoE with periodic validation and a size cap far below the artifact, so its log
holds every kind of line a CPU run writes: telemetry, validation steps, the whole fit ladder and an
over-the-cap size check. Numbers are checked against the text with regular expressions written here."""
import hashlib
import json
import math
import re

import pytest

from conftest import REPO, TINY_ENV, run_train
from tools import runlog

ITERATIONS, LOG_EVERY, VAL_EVERY = 10, 5, 5
FLOAT = r"([-+\w.]+)"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(folder, log path, log text, parsed log, size cap) of one tiny top-k run."""
    tmp = tmp_path_factory.mktemp("runlog")
    cap = (REPO / "train_gpt.py").stat().st_size + 1000  # nothing fits: every fit step is tried
    result = run_train(tmp, MOE_MODE="topk", NUM_EXPERTS=4, ITERATIONS=ITERATIONS, TRAIN_LOG_EVERY=LOG_EVERY,
                       VAL_LOSS_EVERY=VAL_EVERY, SIZE_CAP_BYTES=cap, ALLOW_OVER_BUDGET=1)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp / "logs" / "test.txt"
    text = path.read_text()
    return dict(dir=tmp, path=path, text=text, log=runlog.read(path), cap=cap)


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def one(pattern: str, text: str) -> tuple[str, ...]:
    """The groups of the only line matching `pattern` (a search from line start)."""
    matches = re.findall(pattern, text, flags=re.MULTILINE)
    assert len(matches) == 1, (pattern, matches)
    return matches[0] if isinstance(matches[0], tuple) else (matches[0],)


# ---------------------------------------------------------------------------- a real run


def test_every_line_of_a_real_log_is_known(real):
    log = real["log"]
    assert log.unknown == []
    assert sum(log.counts.values()) == len([line for line in real["text"].splitlines() if line.strip()])
    assert (log.runs_in_file, log.first_line, log.notes, log.path) == (1, 1, [], real["path"])


def test_real_header_section(real):
    log, text = real["log"], real["text"]
    first = text.splitlines()[0].split()
    assert (log.header.python, log.header.torch, log.header.device) == (first[1], first[3], "cpu")
    assert (log.header.device_name, log.header.world_size, log.header.grad_accum) == ("", 1, 2)  # 2048 / 1024
    sha, size = one(r"^code_sha256:(\w+) code_bytes:(\d+)$", text)
    assert (log.code_sha256, log.header_code_bytes) == (sha, int(size)) and len(sha) == 64
    config = json.loads(lines_starting(text, "config ")[0][len("config "):])
    assert log.config == config and config["MOE_MODE"] == "topk" and config["SIZE_CAP_BYTES"] == real["cap"]
    limit = int(TINY_ENV["VAL_TOKEN_LIMIT"])
    assert (log.val_tokens, log.token_limit, log.data_path) == (limit + 1, limit, TINY_ENV["DATA_PATH"])
    total, active, router = map(int, one(r"^params total:(\d+) active_matmul_per_token:(\d+) router:(\d+) ", text))
    assert (log.params.total, log.params.active_matmul_per_token, log.params.router) == (total, active, router)
    assert (log.params.moe_mode, log.params.moe_layers) == ("topk", [0, 1]) and router == 2 * 4 * 64
    budget = log.budget
    assert budget.total_bytes == budget.artifact_bytes + budget.code_bytes
    assert (budget.cap, budget.slack) == (real["cap"], real["cap"] - budget.total_bytes)
    assert sum(budget.per_class.values()) <= budget.artifact_bytes and "embed" in budget.per_class
    assert log.warmup_steps == int(TINY_ENV["WARMUP_STEPS"])


def test_real_training_lines(real):
    log, text = real["log"], real["text"]
    train = re.findall(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms tok/s:(\d+)$",
                       text, re.M)
    assert [s.step for s in log.train_steps] == [int(t[0]) for t in train] == [1, 5, 10]
    for step, t in zip(log.train_steps, train):
        assert (step.iterations, step.train_loss, step.train_time_ms) == (ITERATIONS, float(t[2]), int(t[3]))
        assert (step.step_avg_ms, step.tok_per_s, step.mfu_pct) == (float(t[4]), int(t[5]), None)  # no MFU on CPU
    val = re.findall(rf"^step:(\d+)/\d+ val_loss:{FLOAT} val_bpb:{FLOAT} train_time:(\d+)ms", text, re.M)
    assert [(v.step, v.val_loss, v.val_bpb, v.train_time_ms) for v in log.val_steps] == \
        [(int(s), float(loss), float(bpb), int(ms)) for s, loss, bpb, ms in val]
    assert [v.step for v in log.val_steps] == [5, 10]
    assert all(v.token_limit == int(TINY_ENV["VAL_TOKEN_LIMIT"]) for v in log.val_steps)
    assert log.last_train.step == log.last_val.step == ITERATIONS


def test_real_routing_telemetry(real):
    log, text = real["log"], real["text"]
    moe = re.findall(r"^moe layer:(\d) load:([\d.,]+) max_mean:\S+ dead:(\d+) entropy:([\d.]+)", text, re.M)
    assert len(log.moe) == len(moe) == 2 * 3  # two MoE layers, three log steps
    for record, (layer, load, dead, entropy) in zip(log.moe, moe):
        assert (record["layer"], record["dead"], record["entropy"]) == (int(layer), int(dead), float(entropy))
        assert record["load"] == [float(v) for v in load.split(",")] and len(record["load"]) == 4
        assert math.fsum(record["load"]) == pytest.approx(1.0, abs=0.005)  # shares of the tokens
    history = log.moe_history()
    assert sorted(history) == [0, 1]
    assert all([r["step"] for r in records] == [1, 5, 10] for records in history.values())
    warnings = re.findall(r"^WARNING moe layer:(\d) routing collapse: one expert takes ([\d.]+)%", text, re.M)
    assert [(c.layer, c.share_pct) for c in log.collapses] == [(int(a), float(b)) for a, b in warnings]


def test_real_export_lines(real):
    import train_gpt

    log, text, cap = real["log"], real["text"], real["cap"]
    artifact = real["dir"] / "logs" / "test_model.ptz"
    (size,) = one(r"^Serialized model quant\+zstd: (\d+) bytes$", text)
    (code,) = one(r"^Code size: (\d+) bytes$", text)
    assert log.artifact_bytes == int(size) == artifact.stat().st_size and log.code_bytes == int(code)
    assert log.total_bytes == log.artifact_bytes + log.code_bytes
    assert (log.quant.artifact_bytes, log.quant.code_bytes) == (int(size), int(code))  # no fit step wrote another
    assert log.quant.rel_error == float(one(r"^quant: relative squared error (\S+),", text)[0]) > 0
    # The whole ladder was tried, each step predicted over the cap.
    assert len(log.fit_steps) == len(lines_starting(text, "fit: ")) == len(list(train_gpt.fit_ladder()))
    assert [(f.bits_lowered, f.extra_pruning) for f in log.fit_steps] == list(train_gpt.fit_ladder())
    predicted = [int(p) for p in re.findall(r"^fit: .* predicted (\d+) bytes, over the cap$", text, re.M)]
    assert [f.predicted_bytes for f in log.fit_steps] == predicted
    assert all(p > cap - log.code_bytes for p in predicted) and not any(f.artifact_bytes for f in log.fit_steps)
    assert log.fit_failed == (log.total_bytes, cap)
    check = log.size_check
    assert (check.total, check.cap, check.slack, check.ok) == (log.total_bytes, cap, cap - log.total_bytes, False)
    assert check.artifact_path == str(artifact)
    assert check.sha256 == hashlib.sha256(artifact.read_bytes()).hexdigest()


def test_real_final_lines(real):
    log, text = real["log"], real["text"]
    limit = int(TINY_ENV["VAL_TOKEN_LIMIT"])
    for label, stride in (("roundtrip", 128), ("sliding_window", 64)):
        loss, bpb, ms = one(rf"^final_quant_zstd_{label}_exact val_loss:{FLOAT} val_bpb:{FLOAT} "
                            rf"stride:{stride} seq_len:128 eval_time:(\d+)ms \(first {limit} tokens only", text)
        final = log.finals[label]
        assert (final.val_loss, final.val_bpb, final.eval_time_ms) == (float(loss), float(bpb), int(ms))
        assert (final.stride, final.seq_len, final.token_limit) == (stride, 128, limit)
    assert log.score is log.finals["sliding_window"] and log.partial_eval
    loss, bpb = one(rf"^pre_quant_ema val_loss:{FLOAT} val_bpb:{FLOAT} ", text)
    pre_quant = log.pre_quant
    assert (pre_quant.val_loss, pre_quant.val_bpb, pre_quant.token_limit) == (float(loss), float(bpb), limit)
    assert log.routing_json == str(real["dir"] / "logs" / "test_routing.json")
    assert json.loads((real["dir"] / "logs" / "test_routing.json").read_text())["moe_mode"] == "topk"


def comparable(log: runlog.RunLog) -> dict:
    return {k: v for k, v in log.to_dict().items() if k not in ("path", "runs_in_file", "first_line", "notes")}


def test_a_log_with_two_runs_yields_the_last(real):
    text = real["text"]
    crashed = text[:text.index("pre_quant_ema")]  # an earlier run that died before the export
    both = runlog.parse(crashed + text, "two.txt")
    assert comparable(both) == comparable(real["log"])
    assert (both.runs_in_file, both.first_line) == (2, len(crashed.splitlines()) + 1)
    assert both.notes == [f"two.txt: holds 2 runs; read the last one (from line {both.first_line})"]
    # The other way round: the last run crashed, so no final result of the earlier run leaks in.
    last_crashed = runlog.parse(text + crashed)
    assert last_crashed.runs_in_file == 2 and last_crashed.finals == {} and last_crashed.score is None
    assert last_crashed.artifact_bytes is None and last_crashed.size_check is None
    assert [s.step for s in last_crashed.train_steps] == [1, 5, 10]  # the crashed run's own lines


# ---------------------------------------------------------------------------- a hand-written log

SHA = "5e" * 32
HAND_LOG = f"""python 3.12.1 torch 2.14.1+cu130 device cuda:0 (NVIDIA H100 80GB HBM3) world_size 8 grad_accum 1
code_sha256:{SHA} code_bytes:71124
config {{"EVAL_STRIDE": 64, "SEED": 7, "TRAIN_SEQ_LEN": 2048}}
val_tokens:62021633 token_limit:0 data:/data/fineweb10B_sp1024
params total:25987592 active_matmul_per_token:20971520 router:20480 moe_mode:shared_routed moe_layers:[5, 6, 7, 8, 9]
budget_preview: artifact ~15312345 bytes (attn:3000000, bigram:900000, embed:400000, fp16:12345, mlp:11000000) + code 71124 = ~15383469 of 16000000 (slack ~616531)
compile_warmup: 20 steps in 41.3s (not timed, undone)
step:100/20000 train_loss:nan train_time:8123ms step_avg:81.23ms tok/s:9681723 mfu:41.7%
moe layer:5 load:0.850,0.050,0.050,0.050 max_mean:3.40 dead:0 entropy:0.412 aux:2.5000 z:0.1234 bias:-0.0500..0.0150 drop:0.0125
WARNING moe layer:5 routing collapse: one expert takes 85.0% of the tokens
step:200/20000 val_loss:2.0500 val_bpb:1.2141 train_time:16246ms step_avg:81.23ms
this line is not one of train_gpt.py's
step:7400/20000 train_loss:1.9876 train_time:600012ms step_avg:81.08ms tok/s:9699000 mfu:41.8%
step:7400/20000 val_loss:1.9530 val_bpb:1.1567 train_time:600012ms step_avg:81.08ms
peak memory allocated: 41234 MiB
quant: relative squared error 1.234e-03, artifact 16100000 bytes + code 71124
fit: bits lowered none, pruning +0.02, relative squared error 1.300e-03: predicted 16050000 bytes, over the cap
fit: bits lowered {{'mlp': 1}}, pruning +0.00, relative squared error 4.500e-03: artifact 15800000 bytes
Serialized model quant+zstd: 15800000 bytes
Code size: 71124 bytes
Total submission size quant+zstd: 15871124 bytes
size_check total:15871124 cap:16000000 slack:128876 OK artifact:/runs/x/model.ptz
final_quant_zstd_roundtrip_exact val_loss:1.96000000 val_bpb:1.16080000 stride:2048 seq_len:2048 eval_time:9000ms
"""


def test_hand_written_log():
    log = runlog.parse(HAND_LOG)
    assert log.header == runlog.Header("3.12.1", "2.14.1+cu130", "cuda:0", "NVIDIA H100 80GB HBM3", 8, 1)
    assert log.header.device_label == "cuda:0 (NVIDIA H100 80GB HBM3)"
    assert (log.code_sha256, log.header_code_bytes, log.config["SEED"]) == (SHA, 71124, 7)
    assert (log.val_tokens, log.token_limit, log.data_path) == (62021633, 0, "/data/fineweb10B_sp1024")
    assert log.params == runlog.Params(25987592, 20971520, 20480, "shared_routed", [5, 6, 7, 8, 9])
    assert log.budget.per_class == dict(attn=3000000, bigram=900000, embed=400000, fp16=12345, mlp=11000000)
    assert (log.budget.artifact_bytes, log.budget.total_bytes, log.budget.slack) == (15312345, 15383469, 616531)
    assert (log.warmup_steps, log.warmup_s) == (20, 41.3)
    first, last = log.train_steps
    assert math.isnan(first.train_loss) and (first.tok_per_s, first.mfu_pct) == (9681723, 41.7)
    assert (last.step, last.iterations, last.train_time_ms, last.step_avg_ms) == (7400, 20000, 600012, 81.08)
    assert [(v.step, v.val_bpb, v.token_limit) for v in log.val_steps] == [(200, 1.2141, 0), (7400, 1.1567, 0)]
    (moe,) = log.moe
    assert moe == dict(layer=5, load=[0.85, 0.05, 0.05, 0.05], max_over_mean=3.4, dead=0, entropy=0.412, aux=2.5,
                       z=0.1234, bias_min=-0.05, bias_max=0.015, drop_rate=0.0125, step=100)
    assert log.collapses == [runlog.Collapse(step=100, layer=5, share_pct=85.0)]
    assert log.unknown == ["this line is not one of train_gpt.py's"]
    assert log.peak_mib == 41234 and log.pre_quant is None
    assert log.quant == runlog.Quant(1.234e-3, 16100000, 71124)
    assert log.fit_steps == [runlog.FitStep({}, 0.02, 1.3e-3, 16050000, None),
                             runlog.FitStep({"mlp": 1}, 0.0, 4.5e-3, None, 15800000)]
    assert log.fit_failed is None
    assert (log.artifact_bytes, log.code_bytes, log.total_bytes) == (15800000, 71124, 15871124)
    # An older size_check line, without the sha256.
    assert log.size_check == runlog.SizeCheck(15871124, 16000000, 128876, True, "/runs/x/model.ptz", None)
    assert log.finals == {"roundtrip": runlog.FinalEval(1.96, 1.1608, 2048, 2048, 9000, 0)}
    assert log.score.val_bpb == 1.1608 and not log.partial_eval and log.routing_json is None


def test_hand_written_log_variants():
    with_sha = runlog.parse(HAND_LOG.replace("artifact:/runs/x/model.ptz", f"artifact:/runs/x/model.ptz sha256:{SHA}"))
    assert (with_sha.size_check.artifact_path, with_sha.size_check.sha256) == ("/runs/x/model.ptz", SHA)
    over = runlog.parse(HAND_LOG.replace("slack:128876 OK", "slack:-5 OVER THE CAP"))
    assert (over.size_check.slack, over.size_check.ok) == (-5, False)
    bad_config = runlog.parse(HAND_LOG.replace('"SEED": 7,', '"SEED": 7,,'))
    assert bad_config.config is None and bad_config.config_text.startswith('{"EVAL_STRIDE"')
    # A fragment without its header (a log cut at the start) still gives what it holds.
    fragment = runlog.parse(HAND_LOG.split("quant: ", 1)[1])
    assert fragment.header is None and fragment.runs_in_file == 0 and fragment.code_bytes == 71124
    assert runlog.parse("").to_dict()["finals"] == {}


def test_cli_prints_the_parse_as_json(real, capsys):
    assert runlog.main([str(real["path"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finals"]["sliding_window"]["val_bpb"] == real["log"].finals["sliding_window"].val_bpb
    assert out["code_sha256"] == real["log"].code_sha256 and out["notes"] == []
    assert runlog.main([str(real["path"].with_name("absent.txt"))]) == 2
    assert "cannot read the log" in capsys.readouterr().err
