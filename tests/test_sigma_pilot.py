"""The sigma-MoE GPU pilot's tool (tools/studies/sigma_pilot.py): its plan, its equal-tokens rule, its
verdicts, and a rehearsal of the whole call at a tiny shape on the CPU."""

import json

import pytest

from tools.studies import sigma_pilot


def test_plan_runs_both_arms_at_the_real_width_for_equal_time(capsys):
    assert sigma_pilot.main(["--dry"]) == 0
    lines = capsys.readouterr().out.splitlines()
    dense = next(line for line in lines if line.startswith("dense_time:"))
    sigma = next(line for line in lines if line.startswith("sigma_time:"))
    for line in (dense, sigma):  # the default width (512, MLP 2048) is not overridden
        assert "NUM_LAYERS=2" in line and "MODEL_DIM" not in line and "MLP_MULT" not in line
        assert "MAX_WALLCLOCK_SECONDS=65" in line and "TRAIN_BATCH_TOKENS=98304" in line
    assert "MOE_MODE=none" in dense
    for knob in (
        "NUM_EXPERTS=16",
        "TOP_K=4",
        "ROUTER_SCORE=sigmoid",
        "ROUTER_ENTROPY_COEF=",
        "EXPERT_DROPOUT=",
    ):
        assert knob in sigma


def rows(dense_steps, sigma_steps):
    return {
        "dense": dict(steps=dense_steps, seconds=100.0, train_time_ms=60_000.0),
        "sigma": dict(steps=sigma_steps, seconds=130.0, train_time_ms=60_000.0),
    }


def test_equal_tokens_reruns_the_slower_arm_to_the_other_arms_steps():
    budget = sigma_pilot.Budget(300.0)
    arm, spec = sigma_pilot.equal_tokens_run(rows(1000, 700), budget)
    assert arm == "sigma" and spec["target"] == 1000 and spec["extra"] == {"ITERATIONS": "1000"}
    assert 300 - 70 - 10 - 1 < spec["seconds"] <= 300 - 70 - 10  # budget left minus the worst overhead
    arm, spec = sigma_pilot.equal_tokens_run(rows(600, 900), budget)
    assert arm == "dense" and spec["target"] == 900
    assert sigma_pilot.equal_tokens_run(rows(800, 800), budget) is None


def test_comparisons_pair_the_right_runs_and_apply_the_decision_rule():
    def run(name, bpb, ms):
        return dict(name=name, ok=True, val_bpb=bpb, step_avg_ms=ms)

    result = dict(
        runs=[
            run("dense_time", 1.500, 50.0),
            run("sigma_time", 1.515, 75.0),
            run("sigma_tokens", 1.488, 75.0),
        ]
    )
    c = sigma_pilot.compare(result)
    assert c["equal_wall_clock"]["delta_bpb"] == pytest.approx(0.015)
    assert c["equal_wall_clock"]["verdict"] == "sigma-MoE behind"
    assert (c["equal_tokens"]["sigma"], c["equal_tokens"]["dense"]) == ("sigma_tokens", "dense_time")
    assert c["equal_tokens"]["verdict"] == "sigma-MoE ahead"
    assert c["step_time_ratio"] == pytest.approx(1.5)
    assert sigma_pilot.verdict(0.0099) == sigma_pilot.verdict(-0.0099) == "within one seed's noise"
    result["runs"][1]["ok"] = False
    assert sigma_pilot.compare(result)["equal_wall_clock"]["verdict"] == "not measured"


def test_a_missing_corpus_is_named_before_any_run(tmp_path, capsys):
    assert sigma_pilot.main(["--data-path", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "proxy_1024_bpe.model" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cpu_rehearsal_of_the_whole_call(tmp_path):
    out = tmp_path / "out"
    rc = sigma_pilot.main(["--cpu", "--out", str(out)])
    result = json.loads((out / "sigma_pilot.json").read_text())
    assert rc == 0, result
    runs = {r["name"]: r for r in result["runs"]}
    assert {"dense_time", "sigma_time"} <= set(runs)
    for r in runs.values():
        assert r["ok"] and 0 < r["val_bpb"] < 10 and r["steps"] > 0 and r["artifact_bytes"] > 0
    assert runs["sigma_time"]["knobs"]["EXPERT_DROPOUT"] == "0.05"
    assert all(
        len(line.split(" load:")[1].split(" ")[0].split(",")) == 16 for line in runs["sigma_time"]["routing"]
    )
    assert runs["sigma_time"]["routing"] and not runs["dense_time"]["routing"]
    if len(runs) == 3:  # the slower arm ran again to the other's step count
        third = result["runs"][2]
        other = runs["sigma_time" if third["arm"] == "dense" else "dense_time"]
        assert third["knobs"]["ITERATIONS"] == str(other["steps"])
    table = (out / "sigma_pilot.md").read_text()
    assert "| dense_time | dense | yes |" in table and "equal_wall_clock: sigma_time - dense_time" in table
