"""Tests for tools/studies/moe_study.py: the MoE-versus-dense study harness, on CPU.

One tiny study (module fixture: dense and topk4 x 2 seeds x 8 steps on data/sample, 2 at a time)
feeds the checks of the folder, the manifest, resuming and records.py verify."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SAMPLE, TOKENIZER, TINY_ENV

import train_gpt
from tools import records
from tools.common import MOE_PRESETS, context_arm
from tools.stats import welch_both_ways
from tools.studies import moe_study, proxy_study, runner

# The tiny shape of conftest.py, over the study's shape; the study sets its own run length and evaluation.
TINY = {
    k: v
    for k, v in TINY_ENV.items()
    if k not in ("DATA_PATH", "TOKENIZER_PATH", "EVAL_STRIDE", "MAX_WALLCLOCK_SECONDS")
}
TINY.update(ITERATIONS="8", TRAIN_LOG_EVERY="4", MICRO_BATCH_TOKENS="2048")
SEEDS = "1,2"
ARMS = "dense,topk4"


def study(out, *extra, env=TINY, arms=ARMS, seeds=SEEDS, command="run"):
    argv = [
        sys.executable,
        "-m",
        "tools.studies.moe_study",
        command,
        "--data",
        str(SAMPLE),
        "--tokenizer",
        str(TOKENIZER),
        "--out",
        str(out),
        "--seeds",
        seeds,
        "--arms",
        arms,
        "--jobs",
        "2",
    ]
    argv += [f"--env={k}={v}" for k, v in env.items()] + list(extra)
    return subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "2026-11-25_MoE_vs_Dense_Study"
    result = study(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "records.py verify" in result.stdout and "PASSED" in result.stdout
    return out


def copy_of(folder, tmp_path):
    dest = tmp_path / folder.name
    shutil.copytree(folder, dest)
    return dest


@pytest.mark.slow
def test_folder_holds_every_output(folder):
    for name in (
        "train_gpt.py",
        "manifest.json",
        "submission.json",
        "README.md",
        "findings_data.md",
        "routing-analysis.png",
        "expert-by-class.png",
        ".gitignore",
    ):
        assert (folder / name).is_file(), name
    assert (folder / "train_gpt.py").read_bytes() == (REPO / "train_gpt.py").read_bytes()
    for arm in ARMS.split(","):
        for seed in SEEDS.split(","):
            assert (folder / "runs" / f"study_{arm}_s{seed}.txt").is_file()
            assert (folder / "runs" / f"study_{arm}_s{seed}.jsonl").is_file()
    assert (folder / "expert-by-class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (folder / "README.md").read_text()
    assert "Not FineWeb" in readme and "python3 -m tools.studies.moe_study run --data" in readme
    assert "VAL_TOKEN_LIMIT" in readme and f"{int(TINY['VAL_TOKEN_LIMIT']):,}" in readme


@pytest.mark.slow
def test_manifest_has_the_issue_keys(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["arms"]) == {"dense", "topk4"}
    assert manifest["verdict"] in ("adopt", "defer", "never at this scale")
    for name, arm in manifest["arms"].items():
        assert arm["seeds"] == [1, 2]
        for key in (
            "val_bpb",
            "pre_quant_val_bpb",
            "ms_per_step",
            "artifact_bytes",
            "params",
            "dead_experts",
            "router_entropy",
            "load_std",
            "ms_per_step_ratio_to_dense",
        ):
            assert len(arm[key]) == 2, (name, key)
        assert all(0 < v < 10 for v in arm["val_bpb"])
        assert arm["env"]["MOE_MODE"] == ("none" if name == "dense" else "topk")
        assert arm["env"]["ITERATIONS"] == "8" and "SEED" not in arm["env"]
    assert manifest["arms"]["dense"]["ms_per_step_ratio_to_dense"] == [1.0, 1.0]
    topk = manifest["arms"]["topk4"]
    assert all(len(layers) == int(TINY["NUM_LAYERS"]) for layers in topk["load_std_per_layer"])
    p = manifest["p_values"]["topk4"]
    assert isinstance(p, float) and 0.0 < p < 1.0
    assert manifest["welch"]["topk4"]["p_worse"] == pytest.approx(1.0 - p)
    assert manifest["data"]["val_token_limit"] == int(TINY["VAL_TOKEN_LIMIT"])
    assert manifest["missing_runs"] == [] and manifest["finished_runs"] == 4


@pytest.mark.slow
def test_submission_is_the_best_arm_and_verifies(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    sub = json.loads((folder / "submission.json").read_text())
    means = {n: a["val_bpb_mean"] for n, a in manifest["arms"].items()}
    assert sub["arm"] == min(means, key=means.get) == manifest["best_arm"]
    arm = manifest["arms"][sub["arm"]]
    smallest = min(zip(arm["artifact_bytes"], arm["seeds"]))[1]
    assert sub["best_seed"] == smallest and (folder / f"model_seed{smallest}.ptz").is_file()
    assert sub["track"] == "track_non_record_16mb" and sub["partial_eval"]
    assert records.main(["verify", str(folder)]) == 0


@pytest.mark.slow
def test_resume_skips_finished_runs(folder):
    logs = sorted((folder / "runs").glob("*.txt"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    result = study(folder, "--no-plots")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 runs planned, 4 finished, 0 to run" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == before


@pytest.mark.slow
def test_resume_reruns_an_interrupted_run(folder, tmp_path):
    out = copy_of(folder, tmp_path)
    for suffix in (".txt", ".jsonl"):  # cut the run off before its final evaluation
        path = out / "runs" / f"study_topk4_s2{suffix}"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[: len(lines) // 2]))
    result = study(out, "--no-plots")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "3 finished, 1 to run" in result.stdout
    reason = json.loads((out / "runs" / "failed" / "study_topk4_s2-1" / "reason.json").read_text())
    assert reason["run_id"] == "study_topk4_s2" and "incomplete" in reason["reason"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arms"]["topk4"]["seeds"] == [1, 2]
    assert [f["run_id"] for f in manifest["failed_attempts"]] == ["study_topk4_s2"]


@pytest.mark.slow
def test_refuses_a_finished_run_of_another_recipe(folder, tmp_path):
    out = copy_of(folder, tmp_path)
    result = study(out, "--dry-run", env={**TINY, "ITERATIONS": "9"})
    assert result.returncode == 2 and "ITERATIONS" in result.stderr and "another recipe" in result.stderr


@pytest.mark.slow
def test_refuses_to_mix_scripts(folder, tmp_path):
    out = copy_of(folder, tmp_path)
    other = tmp_path / "train_gpt.py"
    other.write_bytes((REPO / "train_gpt.py").read_bytes() + b"\n# edited\n")
    result = study(out, "--script", str(other), arms="dense", seeds="3")
    assert result.returncode == 2 and "must share one script" in result.stderr
    assert not (out / "runs" / "study_dense_s3.txt").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(arms="dense,topk9"), "unknown arm(s) topk9"),
        pytest.param(dict(arms="topk4"), "must include dense", marks=pytest.mark.slow),
        pytest.param(dict(seeds="1,1"), "distinct seeds", marks=pytest.mark.slow),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, extra, message):
    result = study(tmp_path / "s", **extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--more-seeds", "2"], "seeds already in --seeds", marks=pytest.mark.slow),
        pytest.param(
            ["--more-seeds", "3", "--more-arms", "topk4"], "must name dense", marks=pytest.mark.slow
        ),
        pytest.param(
            ["--more-seeds", "3", "--more-arms", "dense,soft4"],
            "must name dense (the per-seed baseline) and arms of --arms",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_extra_seeds_are_one_clear_error(tmp_path, extra, message):
    result = study(tmp_path / "s", *extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_more_seeds_run_only_the_named_arms(folder, tmp_path):
    """Where the spread hides a difference: more seeds for dense (and the arms named), the rest untouched."""
    out = copy_of(folder, tmp_path)
    result = study(out, "--more-seeds", "3", "--more-arms", "dense", "--no-plots")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "5 runs planned, 4 finished, 1 to run" in result.stdout
    assert (out / "runs" / "study_dense_s3.txt").is_file() and not (
        out / "runs" / "study_topk4_s3.txt"
    ).exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arms"]["dense"]["seeds"] == [1, 2, 3] and manifest["arms"]["topk4"]["seeds"] == [1, 2]
    assert len(manifest["arms"]["dense"]["val_bpb"]) == 3 and manifest["seeds"] == [1, 2, 3]
    assert manifest["command"].endswith(f"--more-seeds 3 --more-arms dense --script {out}/train_gpt.py")


@pytest.mark.slow
def test_speed_measures_each_arm_alone_in_rotated_rounds(folder, tmp_path):
    out = copy_of(folder, tmp_path)
    result = study(out, "--speed-steps", "4", "--repeats", "2", "--no-plots", command="speed")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    started = [line.split()[2].rstrip(":") for line in result.stdout.splitlines() if line.endswith("started")]
    assert started == [
        "speed_r1_dense_s1337",
        "speed_r1_topk4_s1337",
        "speed_r2_topk4_s1337",
        "speed_r2_dense_s1337",
    ]
    speed = json.loads((out / "speed.json").read_text())
    dense, topk = speed["arms"]["dense"], speed["arms"]["topk4"]
    assert dense["ratio_to_dense"] == [1.0, 1.0] and len(topk["ms_per_step"]) == 2
    assert topk["ratio_to_dense"] == pytest.approx(
        [t / d for t, d in zip(topk["ms_per_step"], dense["ms_per_step"])]
    )
    assert speed["command"].startswith("python3 -m tools.studies.moe_study speed ") and speed[
        "command"
    ].endswith("--repeats 2")
    assert "## Speed, measured alone (CPU)" in (out / "README.md").read_text()
    assert not list((out / "runs").glob("speed_*"))  # the study's runs stay as they were
    again = study(out, "--repeats", "1", command="speed")
    assert again.returncode == 2 and "exists: move it away" in again.stderr


@pytest.mark.slow
def test_missing_data_folder_is_named(tmp_path):
    argv = [
        sys.executable,
        "-m",
        "tools.studies.moe_study",
        "run",
        "--data",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "s"),
    ]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nope" in result.stderr and "prepare.sh" in result.stderr


def test_study_shape_and_arms_are_valid_train_gpt_configs():
    tokens = int(moe_study.STUDY_SHAPE["ITERATIONS"]) * int(moe_study.STUDY_SHAPE["TRAIN_BATCH_TOKENS"])
    assert tokens >= 2_000_000 and moe_study.STUDY_SHAPE["MAX_WALLCLOCK_SECONDS"] == "0"
    arms = moe_study.arm_configs(list(moe_study.ARM_NAMES), moe_study.STUDY_SHAPE)
    configs = {n: train_gpt.load_config({**moe_study.STUDY_SHAPE, **env}) for n, env in arms.items()}
    dense_hidden = configs["dense"].model.mlp_hidden
    for name in ("soft4", "topk4", "topk4_nobalance"):
        assert configs[name].model.expert_mlp_hidden * 4 == dense_hidden, name
    assert configs["topk4_4xbytes"].model.expert_mlp_hidden == dense_hidden
    assert (
        configs["topk4_nobalance"].model.moe_aux_loss_coef
        == configs["topk4_nobalance"].optim.router_bias_rate
        == 0
    )


def test_context_preset_is_4x_bytes_at_the_default_shape():
    h = train_gpt.load_config({})
    assert MOE_PRESETS["topk4_4xbytes"]["EXPERT_HIDDEN"] == str(h.model.mlp_hidden)
    assert context_arm(128, 4)["EXPERT_HIDDEN"] == "512"


def test_welch_directions():
    better = welch_both_ways([1.00, 1.01, 1.02], [0.90, 0.91, 0.92])
    worse = welch_both_ways([1.00, 1.01, 1.02], [1.10, 1.11, 1.12])
    assert better["p_better"] < 0.01 and worse["p_worse"] < 0.01
    assert better["p_better"] == pytest.approx(worse["p_worse"])  # mirror images
    assert welch_both_ways([1.0], [0.9, 0.8])["p_better"] is None  # one dense seed: no variance


def arm(bpb, size=1000, params=500):
    return dict(val_bpb=bpb, artifact_bytes=[size] * len(bpb), params=[params] * len(bpb))


@pytest.mark.parametrize(
    "arms, verdict",
    [
        ({"dense": arm([1.00, 1.01, 1.02]), "topk4": arm([0.90, 0.91, 0.92])}, "adopt"),
        (
            {"dense": arm([1.00, 1.01, 1.02]), "topk4": arm([0.90, 0.91, 0.92], size=1040)},
            "adopt",
        ),  # 4% more bytes
        (
            {"dense": arm([1.00, 1.01, 1.02]), "topk4": arm([0.90, 0.91, 0.92], size=1100)},
            "defer",
        ),  # 10% more bytes
        (
            {"dense": arm([1.00, 1.01, 1.02]), "topk4": arm([0.90, 0.91, 0.92], params=520)},
            "defer",
        ),  # 4% more params
        ({"dense": arm([1.00, 1.01, 1.02]), "topk4": arm([0.95, 1.05, 1.00])}, "defer"),  # within noise
        (
            {"dense": arm([1.00, 1.01, 1.02]), "topk4_4xbytes": arm([0.90, 0.91, 0.92])},
            "defer",
        ),  # context arm only
        (
            {
                "dense": arm([1.00, 1.01, 1.02]),
                "topk4": arm([1.10, 1.11, 1.12]),
                "soft4": arm([1.2, 1.21, 1.22]),
            },
            "never at this scale",
        ),
        (
            {
                "dense": arm([1.00, 1.01, 1.02]),
                "topk4": arm([1.10, 1.11, 1.12]),
                "soft4": arm([0.99, 1.02, 1.01]),
            },
            "defer",
        ),
    ],
)
def test_verdict_rule(arms, verdict):
    tests = {
        n: welch_both_ways(arms["dense"]["val_bpb"], a["val_bpb"]) for n, a in arms.items() if n != "dense"
    }
    assert moe_study.decide(arms, tests)[0] == verdict


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused(folder, tmp_path):
    out = copy_of(folder, tmp_path)
    (out / "runs" / ".lock").write_text(str(os.getpid()))  # this process is alive: the folder is in use
    result = study(out, "--no-plots", seeds="1,2,3")
    assert result.returncode == 2 and "another study run" in result.stderr
    assert not (out / "runs" / "study_dense_s3.txt").exists()
    (out / "runs" / ".lock").write_text("999999999")  # a process that is gone: the lock is taken over
    with runner.folder_lock(out / "runs"):
        assert (out / "runs" / ".lock").read_text() == str(os.getpid())
    assert not (out / "runs" / ".lock").exists()


@pytest.mark.slow
def test_a_stopped_study_stops_its_runs(tmp_path):
    out = tmp_path / "s"
    argv = [
        sys.executable,
        "-m",
        "tools.studies.moe_study",
        "run",
        "--data",
        str(SAMPLE),
        "--tokenizer",
        str(TOKENIZER),
        "--out",
        str(out),
        "--seeds",
        "1",
        "--arms",
        "dense",
        "--no-plots",
    ]
    argv += [f"--env={k}={v}" for k, v in {**TINY, "ITERATIONS": "5000"}.items()]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = out / "runs" / "study_dense_s1.txt"
    deadline = time.time() + 120
    while not (log.is_file() and "step:" in log.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    children = proxy_study.descendants(proc.pid)
    assert children, "the training never started"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "interrupted" in stderr
    time.sleep(0.5)
    assert not [
        pid
        for pid in children
        if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    ], "a training outlived the study"
    assert (out / "runs" / "failed" / "study_dense_s1-1" / "study_dense_s1.txt").is_file()
    assert not (out / "runs" / ".lock").exists()


def test_first_study_states_its_regime():
    """The committed study's verdict is conditional on its regime: 2.1M tokens for 855K parameters."""
    folder = REPO / "records" / "track_non_record_16mb" / "2026-11-25_MoE_vs_Dense_Study"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert moe_study.regime_text(manifest).startswith("in this regime: 2.5 tokens per parameter")
    assert manifest["verdict"] == moe_study.NEVER == "never at this scale"
    for name in ("README.md", "findings_data.md"):
        assert moe_study.regime_text(manifest) in (folder / name).read_text()


def test_regime_without_dense_run():
    manifest = dict(data=dict(train_tokens_per_run=1000), arms={})
    assert "unknown" in moe_study.regime_text(manifest)


@pytest.mark.slow
def test_speed_in_a_folder_without_study_runs_succeeds(tmp_path):
    # The regime study measures its ratio in a scratch folder: a complete speed.json is a success.
    out = tmp_path / "scratch"
    out.mkdir()
    shutil.copyfile(REPO / "train_gpt.py", out / "train_gpt.py")
    extra = ("--speed-steps", "2", "--repeats", "1", "--no-plots", "--script", str(out / "train_gpt.py"))
    result = study(out, *extra, command="speed")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((out / "speed.json").read_text())["arms"]["topk4"]["ms_per_step"]


def test_the_committed_studys_logs_rebuild_its_arms_and_verdict():
    """The analysis without training (the tiny study above is slow): the committed study's run logs give
    back its manifest's per-seed scores, seeds and verdict."""
    folder = REPO / "records" / "track_non_record_16mb" / "2026-11-25_MoE_vs_Dense_Study"
    committed = json.loads((folder / "manifest.json").read_text())
    argv = ["collect", "--data", str(SAMPLE), "--tokenizer", str(TOKENIZER), "--out", str(folder)]
    argv += ["--arms", ",".join(committed["arms"]), "--seeds", "1337,1338,1339", "--more-seeds", "1340,1341"]
    argv += ["--more-arms", "dense,soft4,topk4_4xbytes"]  # as in the manifest's command
    argv += [f"--env={k}={v}" for k, v in committed["shape"].items()]
    args = moe_study.parse_args(argv)
    manifest = moe_study.build_manifest(args, *moe_study.plan(args))
    assert list(manifest["arms"]) == list(committed["arms"])
    for name, arm in committed["arms"].items():
        for key in ("seeds", "val_bpb", "pre_quant_val_bpb", "artifact_bytes", "params"):
            assert manifest["arms"][name][key] == arm[key], (name, key)
    assert manifest["verdict"] == committed["verdict"] == moe_study.NEVER
    assert manifest["finished_runs"] == committed["finished_runs"] and manifest["missing_runs"] == []
