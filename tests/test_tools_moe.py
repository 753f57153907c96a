"""Tests for tools/routing/routing_report.py, tools/studies/proxy_study.py and tools/gpu/bench_moe.py, on CPU.

One tiny top-k MoE training (module fixture) feeds the routing report and the log parser."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import REPO, SAMPLE, TOKENIZER, run_train
from tools import runlog
from tools.gpu import bench_moe, calibrate_budget
from tools.routing import routing_analysis, routing_report
from tools.studies import proxy_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOAT = r"([\d.]+)"


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """(log text path, routing JSON path) of one tiny top-k training with a log line every 2 steps."""
    tmp = tmp_path_factory.mktemp("moe_run")
    result = run_train(tmp, MOE_MODE="topk", NUM_EXPERTS=4, ITERATIONS=6, TRAIN_LOG_EVERY=2)
    assert result.returncode == 0, result.stderr[-3000:]
    routing_json = tmp / "logs" / "test_routing.json"
    assert (
        routing_analysis.main(
            [
                str(tmp / "logs" / "test_model.ptz"),
                "--data",
                str(SAMPLE),
                "--tokenizer",
                str(TOKENIZER),
                "--token-limit",
                "8192",
                "--seq-len",
                "128",
            ]
        )
        == 0
    )
    return tmp / "logs" / "test.txt", routing_json


def last_value(pattern: str, text: str) -> str:
    matches = re.findall(pattern, text, flags=re.MULTILINE)
    assert matches, pattern
    return matches[-1]


# ---------------------------------------------------------------------------- routing_report


@pytest.mark.slow
def test_routing_report_writes_valid_pngs(moe_run, tmp_path, capsys):
    log, routing_json = moe_run
    assert routing_report.main([str(routing_json), "--log", str(log), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["load.png", "entropy.png", "class_load.png", "training_load.png", "training_entropy.png"]
    assert printed == [str(tmp_path / n) for n in names]
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5000, f"{name} is only {len(data)} bytes"


@pytest.mark.slow
def test_routing_history_follows_the_log(moe_run):
    log, _ = moe_run
    text = log.read_text()
    history = routing_report.load_history(log)
    assert sorted(history) == [0, 1]
    for layer, records in history.items():
        lines = re.findall(rf"^moe layer:{layer} load:([\d.,]+) .* entropy:{FLOAT}", text, flags=re.MULTILINE)
        assert len(records) == len(lines)
        assert [r["step"] for r in records] == [1, 2, 4, 6]
        # The history comes from the JSONL beside the log (exact); the text line rounds to 3-4 places.
        assert records[-1]["load"] == pytest.approx([float(v) for v in lines[-1][0].split(",")], abs=1e-3)
        assert records[-1]["entropy"] == pytest.approx(float(lines[-1][1]), abs=1e-3)
        assert "bias_min" in records[-1]  # a field only the JSONL events carry


@pytest.mark.slow
def test_routing_history_reads_the_last_run_and_says_so(moe_run, tmp_path, capsys):
    log, _ = moe_run
    text = log.read_text()
    twice = tmp_path / "twice.txt"
    twice.write_text(text[: text.index("step:2/")] + text)  # a crashed run, then a full one
    once = tmp_path / "once.txt"  # the same text log, without the JSONL beside it
    once.write_text(text)
    assert routing_report.load_history(twice) == routing_report.load_history(once)
    assert f"{twice}: holds 2 runs; read the last one" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "malformed JSON"),
        ('{"layers": []}', "no MoE layers"),
        ('{"layers": [{"layer": 0}]}', "lacks 'layer' or a 'load' list"),
    ],
)
def test_routing_report_rejects_bad_json(tmp_path, capsys, content, message):
    bad = tmp_path / "bad_routing.json"
    bad.write_text(content)
    assert routing_report.main([str(bad), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_routing_report_rejects_log_without_moe_lines(moe_run, tmp_path, capsys):
    _, routing_json = moe_run
    log = tmp_path / "dense.txt"
    log.write_text("step:1/10 train_loss:6.9 train_time:1ms step_avg:1.00ms tok/s:1\n")
    assert routing_report.main([str(routing_json), "--log", str(log), "--out", str(tmp_path / "plots")]) == 2
    assert str(log) in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


# ---------------------------------------------------------------------------- proxy_study: the log parser


@pytest.mark.slow
def test_parse_log_reads_the_numbers_of_a_real_run(moe_run):
    log, _ = moe_run
    text = log.read_text()
    parsed = proxy_study.parse_log(runlog.parse(text))
    assert parsed["val_bpb_roundtrip"] == float(
        last_value(rf"^final_quant_zstd_roundtrip_exact val_loss:\S+ val_bpb:{FLOAT}", text)
    )
    assert parsed["val_bpb_sliding"] == float(
        last_value(rf"^final_quant_zstd_sliding_window_exact val_loss:\S+ val_bpb:{FLOAT}", text)
    )
    assert parsed["score"] == parsed["val_bpb_sliding"]
    assert parsed["val_bpb_prequant"] == float(
        last_value(rf"^pre_quant_ema val_loss:\S+ val_bpb:{FLOAT}", text)
    )
    step, step_avg, tok_s = re.findall(
        r"^step:(\d+)/\d+ train_loss:.* step_avg:([\d.]+)ms tok/s:(\d+)", text, re.M
    )[-1]
    assert (parsed["steps"], parsed["ms_per_step"], parsed["tok_per_s"]) == (
        int(step),
        float(step_avg),
        int(tok_s),
    )
    assert parsed["steps"] == 6
    assert parsed["artifact_bytes"] == int(last_value(r"^Serialized model quant\+zstd: (\d+) bytes", text))
    assert parsed["total_bytes"] == int(last_value(r"^Total submission size quant\+zstd: (\d+) bytes", text))
    assert parsed["total_bytes"] > parsed["artifact_bytes"] > 0
    assert parsed["params"] == int(last_value(r"^params total:(\d+)", text))
    assert "peak_mib" not in parsed  # CUDA only
    assert parsed["partial_val"] is True  # TINY_ENV validates on a token subset
    finals = {
        layer: (load, dead, float(entropy))
        for layer, load, dead, entropy in re.findall(
            rf"^moe layer:(\d) load:([\d.,]+) max_mean:\S+ dead:(\d+) entropy:{FLOAT}", text, re.M
        )
    }
    assert [r["layer"] for r in parsed["routing"]] == [0, 1]
    for r in parsed["routing"]:
        load, dead, entropy = finals[str(r["layer"])]
        assert r["max_load"] == max(float(v) for v in load.split(","))
        assert (r["dead"], r["entropy"]) == (int(dead), entropy)
    assert parsed["entropy"] == pytest.approx((finals["0"][2] + finals["1"][2]) / 2)


@pytest.mark.slow
def test_parse_log_reads_only_the_last_run_of_an_appended_log(moe_run):
    """train_gpt.py appends to the log of a reused RUN_ID: a rerun that crashed keeps no earlier score."""
    text = moe_run[0].read_text()
    crashed = text[: text.index("pre_quant_ema")]
    parsed = proxy_study.parse_log(runlog.parse(text + crashed))
    assert parsed["val_bpb_roundtrip"] is None and parsed["val_bpb_sliding"] is None
    assert "total_bytes" not in parsed and parsed["runs_in_log"] == 2
    assert "runs_in_log" not in proxy_study.parse_log(runlog.parse(text))
    assert proxy_study.parse_log(runlog.parse(crashed + text)) == dict(
        proxy_study.parse_log(runlog.parse(text)), runs_in_log=2
    )


def run_of(name: str) -> proxy_study.Run:
    return proxy_study.Run(name, 1, f"t_{name}_s1", {})


@pytest.mark.slow
def test_collect_marks_an_unfinished_log_failed(moe_run, tmp_path):
    text = moe_run[0].read_text()
    cut = text[: text.index("final_quant_zstd_roundtrip_exact")]  # killed during the final evaluation
    (tmp_path / "t_cut_s1.txt").write_text(cut)
    shutil.copy(moe_run[0], tmp_path / "t_good_s1.txt")
    assert proxy_study.collect(run_of("good"), tmp_path)["status"] == "ok"
    row = proxy_study.collect(run_of("cut"), tmp_path)
    assert row["status"] == "failed" and "no final evaluation" in row["reason"]
    assert row["tail"] and row["tail"][-1] == cut.splitlines()[-1]
    assert proxy_study.collect(run_of("absent"), tmp_path)["status"] == "missing"


@pytest.mark.slow
def test_study_records_a_crashing_run_as_failed(tmp_path, capsys):
    """A real torchrun launch of a configuration train_gpt.py rejects: failed, with its error in the tail."""
    config = tmp_path / "study.json"
    config.write_text(
        json.dumps({"broken": {"MOE_MODE": "topk", "NUM_EXPERTS": "3", "MODEL_DIM": "64", "MLP_MULT": "2"}})
    )
    out = tmp_path / "results.json"
    argv = [
        "--config",
        str(config),
        "--data-path",
        str(SAMPLE),
        "--tokenizer-path",
        str(TOKENIZER),
        "--wallclock",
        "0",
        "--log-dir",
        str(tmp_path / "logs"),
        "--tag",
        "t",
        "--json",
        str(out),
        "--timeout",
        "120",
    ]
    assert proxy_study.main(argv) == 1
    (row,) = json.loads(out.read_text())["runs"]
    assert row["status"] == "failed" and row["reason"].startswith("exit status")
    assert any("NUM_EXPERTS=3" in line for line in row["tail"]), row["tail"]
    assert "NUM_EXPERTS=3" in capsys.readouterr().out  # the tail is printed too


def processes_with_env(needle: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_study_timeout_ends_torchrun_and_its_workers(tmp_path):
    """A run past --timeout is recorded as timed out and leaves no worker behind."""
    config = tmp_path / "study.json"
    config.write_text(
        json.dumps({"endless": {"MOE_MODE": "none", "ITERATIONS": "100000", "MODEL_DIM": "64"}})
    )
    out = tmp_path / "results.json"
    tag = f"timeout{tmp_path.name}"
    argv = [
        "--config",
        str(config),
        "--data-path",
        str(SAMPLE),
        "--tokenizer-path",
        str(TOKENIZER),
        "--wallclock",
        "0",
        "--log-dir",
        str(tmp_path / "logs"),
        "--tag",
        tag,
        "--json",
        str(out),
        "--timeout",
        "20",
    ]
    assert proxy_study.main(argv) == 1
    (row,) = json.loads(out.read_text())["runs"]
    assert row["status"] == "failed" and "timed out" in row["reason"]
    assert not processes_with_env(f"RUN_ID={tag}_endless")


# ---------------------------------------------------------------------------- proxy_study: planning


def test_dry_run_prints_the_expected_commands(tmp_path, capsys):
    argv = [
        "--only",
        "dense,topk4_nobalance",
        "--seeds",
        "1,2",
        "--dry-run",
        "--data-path",
        "/d",
        "--wallclock",
        "123",
        "--log-dir",
        str(tmp_path / "logs"),
        "--python",
        "py",
        "--nproc",
        "2",
        "--env",
        "ZSTD_LEVEL=3",
    ]
    assert proxy_study.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    expected_command = [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train_gpt.py"),
    ]
    for line, (name, seed) in zip(
        lines, [("dense", 1), ("dense", 2), ("topk4_nobalance", 1), ("topk4_nobalance", 2)]
    ):
        words = shlex.split(line)
        assert words[-len(expected_command) :] == expected_command
        env = dict(w.split("=", 1) for w in words[: -len(expected_command)])
        assert env == {
            "DATA_PATH": "/d",
            "TOKENIZER_PATH": "/d/proxy_1024_bpe.model",
            "VOCAB_SIZE": "1024",
            "MAX_WALLCLOCK_SECONDS": "123",
            "VAL_LOSS_EVERY": "0",
            "ZSTD_LEVEL": "3",
            **proxy_study.PRESETS[name],
            "SEED": str(seed),
            "RUN_ID": f"proxy_{name}_s{seed}",
            "LOG_DIR": str(tmp_path / "logs"),
        }
    assert "MOE_MODE=none" in lines[0]
    assert all(
        f"{k}=0" in lines[2]
        for k in ("MOE_AUX_LOSS_COEF", "ROUTER_Z_COEF", "ROUTER_BIAS_RATE", "ROUTER_NOISE")
    )
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_configurations_may_not_change_the_study_settings(tmp_path, capsys):
    config = tmp_path / "study.json"
    config.write_text(json.dumps({"sneaky": {"MOE_MODE": "none", "MAX_WALLCLOCK_SECONDS": "999"}}))
    assert proxy_study.main(["--config", str(config), "--dry-run"]) == 2
    assert "MAX_WALLCLOCK_SECONDS" in capsys.readouterr().err
    assert proxy_study.main(["--only", "nonexistent", "--dry-run"]) == 2


# ---------------------------------------------------------------------------- bench_moe


@pytest.mark.slow
def test_bench_cpu_smoke_compiles_once_per_mode(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.gpu.bench_moe",
            "--modes",
            "dense,topk4",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "CPU smoke test" in result.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["dense", "topk4"]
    for r in results:
        assert (r["graphs"], r["recompiles"], r["graph_breaks"]) == (1, 0, 0), r
        assert r["ms"] > 0
    assert results[1]["params"] == results[0]["params"] + 4 * 64  # parameter-matched, plus the router


def test_bench_compile_counts_catch_a_recompile():
    torch._dynamo.reset()
    counters.clear()
    double = torch.compile(lambda x: x * 2, fullgraph=True, dynamic=False, backend="eager")
    double(torch.ones(3))
    assert bench_moe.compile_counts()["recompiles"] == 0
    double(torch.ones(4))  # a new static shape: a second graph
    counts = bench_moe.compile_counts()
    assert counts["recompiles"] == 1
    assert bench_moe.problems(dict(mode="m", **counts)) == [
        "m: 1 recompiles",
        "m: 2 graphs (expected exactly 1)",
    ]


# ---------------------------------------------------------------------------- calibrate_budget


@pytest.mark.slow
def test_calibrate_budget_reads_every_stored_parameter(moe_run):
    """Through the trainer's reader: every parameter of the artifact is counted once, in its bit width."""
    import train_gpt

    artifact = moe_run[0].parent / "test_model.ptz"
    results = calibrate_budget.measure([str(artifact)], "zstd", 3)
    _, state = train_gpt.read_artifact(str(artifact))
    assert sum(n for key, (n, _) in results.items() if key != "scales") == sum(
        t.numel() for t in state.values()
    )
    assert {"16", "scales"} <= set(results) and len(results) >= 3  # fp16, at least one integer width, scales
    for key, (n, bits_per_param) in results.items():
        assert n > 0 and 0 < bits_per_param < (17 if key in ("16", "scales") else 9)
