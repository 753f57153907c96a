"""Tests for tools/studies/moe_regime.py: budgets from parameter counts, the plan's arms and order, bad input,
and the statistics of the gap against tokens per parameter. CPU only; one slow test counts parameters
with the real script."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

from tools import records, runlog
from tools.common import sha256_file
from tools.stats import holm
from tools.studies import moe_regime, proxy_study, runner


def test_iterations_from_parameter_count():
    # 10 tokens per parameter for 201,826 parameters at 8,192 tokens a step: 2,018,260 tokens = 246.4 steps
    assert moe_regime.iterations_for(10, 201_826, 8192) == 246
    assert moe_regime.iterations_for(100, 201_826, 8192) == 2464
    assert moe_regime.iterations_for(30, 1000, 10) == 3000


@pytest.mark.parametrize(
    "budget, params, batch, names",
    [
        (0, 1000, 10, "budget"),
        (-10, 1000, 10, "budget"),
        (math.nan, 1000, 10, "budget"),
        (10, 0, 10, "parameter count"),
        (10, 12.5, 10, "parameter count"),
        (10, 1000, 0, "TRAIN_BATCH_TOKENS"),
        (1, 10, 8192, "under one step"),
    ],
)
def test_iterations_bad_input(budget, params, batch, names):
    with pytest.raises(moe_regime.StudyError, match=names):
        moe_regime.iterations_for(budget, params, batch)


def test_parse_params():
    text = "config ...\nparams total:201826 active_matmul_per_token:200704 router:0\n"
    assert moe_regime.parse_params(text) == 201826
    with pytest.raises(moe_regime.StudyError, match="params total"):
        moe_regime.parse_params("Traceback: no model\n")


def test_budgets_and_stages_parse_in_plan_order():
    assert moe_regime.parse_budgets("30,10") == [30, 10]
    assert moe_regime.parse_stages("qat,sweep") == ["sweep", "qat"]  # always the pre-registered order
    for bad in ("", "20", "10,x"):
        with pytest.raises(moe_regime.StudyError, match="--budgets"):
            moe_regime.parse_budgets(bad)
    with pytest.raises(moe_regime.StudyError, match="--stages"):
        moe_regime.parse_stages("sweep,extra")


def test_declared_arms_match_the_plan():
    arms = moe_regime.ARMS
    assert arms["perpass"].env["ROUTER_PER_PASS"] == "1"
    assert arms["perpass"].env["MOE_LAYERS"] == moe_regime.REGIME_SHAPE["LOOP_START"]  # the looped layer
    assert "ROUTER_PER_PASS" not in arms["perpass_control"].env  # the control: one shared router
    assert {k: v for k, v in arms["perpass"].env.items() if k != "ROUTER_PER_PASS"} == arms[
        "perpass_control"
    ].env
    for name in ("dense_qat", "soft4_qat", "perpass_qat"):
        assert arms[name].env["QAT_START_FRAC"] == "0.75" and "QAT_START_FRAC" in arms[name].needs
    assert arms["soft4_qat"].controls == ("dense_qat",)
    assert moe_regime.STAGES["sweep"][:2] == [("dense", 10), ("soft4", 10)]  # the 10s run first
    assert 100 < moe_regime.REAL_RUN_TOKENS_PER_PARAM < 110


def args_for(tmp_path, *extra):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "proxy_1024_bpe.model").write_bytes(b"")
    argv = ["run", "--data", str(data), "--out", str(tmp_path / "study"), "--dry-run", *extra]
    return moe_regime.parse_args(argv)


def test_budgets_come_from_the_counted_parameters(tmp_path, capsys):
    """ITERATIONS per budget follow the parameter count in budget.json (counted once by DRY_RUN=1)."""
    folder = tmp_path / "study"
    folder.mkdir()
    script = folder / "train_gpt.py"
    script.write_text((REPO / "train_gpt.py").read_text())
    counted = {"10": 50, "30": 150, "100": 500}
    (folder / moe_regime.BUDGET_JSON).write_text(
        json.dumps(
            dict(
                dense_params=40960,
                train_batch_tokens=8192,
                iterations=counted,
                script_sha256=sha256_file(script),
            )
        )
    )
    stages, _ = moe_regime.plan(args_for(tmp_path, "--stages", "sweep", "--budgets", "10,100"))
    (sweep,) = stages
    assert {(r.name, r.env["ITERATIONS"]) for r in sweep.runs} == {
        ("dense_tpp10", "50"),
        ("soft4_tpp10", "50"),
        ("dense_tpp100", "500"),
        ("soft4_tpp100", "500"),
    }
    assert [r.run_id for r in sweep.runs[:2]] == ["regime_dense_tpp10_s1337", "regime_soft4_tpp10_s1337"]
    # a budget.json of another script is a refusal, not a silent reuse
    script.write_text(script.read_text() + "\n# changed\n")
    with pytest.raises(moe_regime.StudyError, match="another script"):
        moe_regime.plan(args_for(tmp_path, "--stages", "sweep"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "20"], "--budgets '20'"),
        (["--stages", "designs", "--design-script", "SCRIPT"], "lacks ROUTER_PER_PASS"),
        (["--stages", "designs"], "no script: pass --design-script"),
        (["--seeds", "1,1"], "--seeds"),
        (["--jobs", "0"], "--jobs 0"),
        (["--stages", "sweep", "--topk-time-ratio", "9"], "--topk-time-ratio 9"),
    ],
)
def test_bad_input_is_an_error_before_any_run(tmp_path, capsys, extra, message):
    script = tmp_path / "old_train_gpt.py"
    script.write_text('KNOBS = {\n    "MOE_MODE": (str, "none"),\n    "QAT_START_FRAC": (float, 1.0),\n}\n')
    extra = [str(script) if e == "SCRIPT" else e for e in extra]
    args = args_for(tmp_path, *extra)
    argv = [
        "run",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(args.out),
        "--dry-run",
        "--script",
        str(script),
        *extra,
    ]
    assert moe_regime.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "study" / "runs").exists()


def test_missing_data_folder(tmp_path, capsys):
    argv = ["run", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s"), "--dry-run"]
    assert moe_regime.main(argv) == 2
    assert "--data" in capsys.readouterr().err


def test_script_knobs_reads_the_knob_table():
    knobs = moe_regime.script_knobs(REPO / "train_gpt.py")
    assert {"MOE_MODE", "NUM_LOOPS", "MOE_LAYERS"} <= knobs


def test_holm():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adjusted["a"] == pytest.approx(0.03)
    assert adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06)  # monotone: never below the step before
    assert adjusted["d"] is None


def test_trend_readings():
    toward_moe = moe_regime.trend([(10, 0.02, 0.002), (100, 0.0, 0.002), (1000, -0.02, 0.002)])
    assert toward_moe["slope"] == pytest.approx(-0.02) and "toward the MoE arm" in toward_moe["reading"]
    toward_dense = moe_regime.trend([(10, -0.01, 0.002), (100, 0.01, 0.002)])
    assert "toward dense" in toward_dense["reading"]
    noisy = moe_regime.trend([(10, 0.01, 0.02), (100, 0.012, 0.02)])
    assert "holds" in noisy["reading"]
    assert moe_regime.trend([(10, 0.01, 0.002), (30, None, None)])["slope"] is None


def test_gap_and_welch_direction():
    arm = dict(val_bpb=[1.10, 1.11, 1.12])
    control = dict(val_bpb=[1.00, 1.01, 1.02])
    result = moe_regime.gap(arm, control, "val_bpb")
    assert result["gap"] == pytest.approx(0.10)
    assert result["p_worse"] < 0.01 < 0.99 < result["p_better"]
    assert moe_regime.gap(dict(val_bpb=[1.0]), control, "val_bpb")["gap"] is None


@pytest.mark.slow
def test_dense_parameter_count_from_the_script():
    """The budget's parameter count is the script's own (DRY_RUN=1, meta device): all parameters."""
    env = {**moe_regime.REGIME_SHAPE, "MOE_MODE": "none"}
    params = moe_regime.count_params(REPO / "train_gpt.py", env, sys.executable)
    # tied 1024 x 64 embedding + 3 blocks of attention (64x64 q, o; 64x32 k, v) and a 64 -> 256 -> 64 MLP
    matrices = 1024 * 64 + 3 * (2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 256)
    assert matrices < params < matrices * 1.05


def test_holm_family_is_the_plans_six_design_comparisons():
    assert len(moe_regime.HOLM_FAMILY) == 6
    assert "soft4_qat_tpp100 vs dense_qat" in moe_regime.HOLM_FAMILY
    assert "perpass_tpp100 vs perpass_control" not in moe_regime.HOLM_FAMILY  # attribution, reported apart
    for key in moe_regime.HOLM_FAMILY:  # every member is a declared control of a declared arm
        config, control = key.split(" vs ")
        assert control in moe_regime.ARMS[moe_regime.arm_of(config)].controls


def test_manifest_from_the_committed_logs_at_10_tokens_per_param(tmp_path):
    """tokens_per_param per arm uses that arm's own logged parameter count; the gap is the arms' means."""
    folder = REPO / "records" / "track_non_record_16mb" / "2026-12-03_MoE_Regime_Study"
    data = tmp_path / "data"
    data.mkdir()
    (data / "proxy_1024_bpe.model").write_bytes(b"")
    argv = ["collect", "--data", str(data), "--out", str(folder), "--stages", "sweep", "--budgets", "10"]
    args = moe_regime.parse_args(argv)
    stages, common = moe_regime.plan(args)
    sweep = moe_regime.build_manifest(args, stages, common)["stages"]["sweep"]
    dense, soft = sweep["entries"]["dense_tpp10"], sweep["entries"]["soft4_tpp10"]
    assert dense["seeds"] == soft["seeds"] == [1337, 1338, 1339]
    assert dense["tokens_per_param"] == pytest.approx(246 * 8192 / 201_826)
    assert soft["params"][0] > dense["params"][0]  # the routers
    assert soft["tokens_per_param"] == pytest.approx(246 * 8192 / soft["params"][0])
    scores = {
        name: [runlog.read(folder / log).score.val_bpb for log in entry["logs"]]
        for name, entry in (("dense", dense), ("soft4", soft))
    }
    expected = sum(scores["soft4"]) / 3 - sum(scores["dense"]) / 3
    assert sweep["comparisons"]["soft4_tpp10 vs dense"]["round_trip"]["gap"] == pytest.approx(expected)
    assert sweep["comparisons"]["soft4_tpp10 vs dense"]["round_trip"]["p_better_holm"] is None


def write_events(path, rows):
    """A run's JSONL events: one routing event per (layer, pass, load) row, in order."""
    lines = [json.dumps({"event": "config", "knobs": {}})]
    lines += [
        json.dumps({"event": "routing", "step": 64, "layer": lay, "pass": p, "load": load})
        for lay, p, load in rows
    ]
    path.write_text("\n".join(lines) + "\n")


def test_per_pass_routing_takes_each_runs_last_load_and_measures_how_the_passes_differ(tmp_path):
    early = [(1, 0, [0.25, 0.25, 0.25, 0.25]), (1, 1, [0.25, 0.25, 0.25, 0.25])]
    write_events(
        tmp_path / "a.jsonl",
        early + [(1, 0, [0.5, 0.5, 0.0, 0.0]), (1, 1, [0.0, 0.0, 0.5, 0.5]), (2, None, [1.0, 0, 0, 0])],
    )
    write_events(tmp_path / "b.jsonl", [(1, 0, [0.7, 0.3, 0.0, 0.0]), (1, 1, [0.0, 0.0, 0.3, 0.7])])
    write_events(tmp_path / "single.jsonl", [(2, None, [0.25, 0.25, 0.25, 0.25])])
    routing = moe_regime.pass_routing(tmp_path, ["a", "b", "single"])
    assert routing["runs"] == 2 and list(routing["layers"]) == ["1"]  # one router per layer: no passes
    first = routing["layers"]["1"]["passes"]["0"]
    assert first["mean"] == pytest.approx([0.6, 0.4, 0.0, 0.0]) and first["runs"] == 2
    assert first["std"][0] == pytest.approx(math.sqrt(0.02))
    assert routing["layers"]["1"]["tv_distance"] == pytest.approx(1.0)  # disjoint experts
    moe_regime.pass_routing_plot(routing, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert moe_regime.pass_routing(tmp_path, ["single"]) is None


def test_passes_that_route_alike_are_at_distance_zero(tmp_path):
    same = [0.1, 0.2, 0.3, 0.4]
    write_events(tmp_path / "a.jsonl", [(1, 0, same), (1, 1, same)])
    assert moe_regime.pass_routing(tmp_path, ["a"])["layers"]["1"]["tv_distance"] == pytest.approx(0.0)


def entry(arm, bpb, seeds=3):
    return dict(arm=arm, budget=100, seeds=[1337, 1338, 1339][:seeds], val_bpb_mean=bpb)


def stage(folder, entries, ratios):
    """A manifest stage: entries by config, and each config's bytes ratio to its first control."""
    return dict(
        folder=folder,
        entries={f"{e['arm']}_tpp100": e for e in entries},
        comparisons={
            f"{arm}_tpp100 vs {moe_regime.ARMS[arm].controls[0]}": dict(bytes_ratio=r)
            for arm, r in ratios.items()
        },
    )


def test_shipping_takes_the_design_folder_once_dense_and_a_byte_matched_moe_arm_have_every_seed():
    sweep = stage(".", [entry("dense", 2.09), entry("soft4", 2.10)], {"soft4": 1.012})
    designs = stage(
        "designs",
        [entry("dense", 2.08), entry("soft4", 2.07, seeds=2), entry("perpass", 2.09)],
        {"soft4": 1.01, "perpass": 1.005},
    )
    controls = stage("designs", [entry("perpass_control", 2.05)], {"perpass_control": 1.03})
    manifest = dict(seeds=[1337, 1338, 1339], stages=dict(sweep=sweep, designs=designs, other=controls))
    folder, (dense, moe) = moe_regime.shipping_choice(manifest)
    # soft4 lacks a seed; perpass_control is the lowest but 3% larger than dense: not byte-matched
    assert folder == "designs" and dense["val_bpb_mean"] == 2.08 and moe["arm"] == "perpass"
    designs["entries"]["perpass_tpp100"]["seeds"] = [1337]
    folder, (dense, moe) = moe_regime.shipping_choice(manifest)
    assert folder == "." and (dense["val_bpb_mean"], moe["arm"]) == (2.09, "soft4")  # the sweep's pair
    sweep["comparisons"]["soft4_tpp100 vs dense"]["bytes_ratio"] = 1.05
    assert moe_regime.shipping_choice(manifest) is None
    # each folder's soft4 is judged by its own folder's bytes: designs' 1.01 does not rescue the sweep's 1.05
    assert moe_regime.byte_matched(manifest, "soft4_tpp100", "designs")
    assert not moe_regime.byte_matched(manifest, "soft4_tpp100", ".")


def test_a_stale_shipped_folder_goes_only_if_pack_wrote_every_file_in_it(tmp_path):
    folder = tmp_path / "soft4"
    folder.mkdir()
    (folder / "README.md").write_text("packed")
    packed = {"README.md": sha256_file(folder / "README.md")}
    (folder / "submission.json").write_text(json.dumps({"packed_files": packed}))
    (folder / "notes.md").write_text("mine")
    with pytest.raises(moe_regime.StudyError, match="notes.md"):
        runner.remove_packed(folder)
    assert (folder / "README.md").is_file()
    (folder / "notes.md").unlink()
    (folder / "README.md").write_text("edited")
    with pytest.raises(records.RecordError, match="edited since"):
        runner.remove_packed(folder)
    (folder / "README.md").write_text("packed")
    runner.remove_packed(folder)
    assert not folder.exists()


def test_holm_adjusts_the_design_stage_only_not_the_sweeps_comparison_of_the_same_name(tmp_path):
    folder = REPO / "records" / "track_non_record_16mb" / "2026-12-03_MoE_Regime_Study"
    data = tmp_path / "data"
    data.mkdir()
    (data / "proxy_1024_bpe.model").write_bytes(b"")
    argv = [
        "collect",
        "--data",
        str(data),
        "--out",
        str(folder),
        "--stages",
        "sweep,designs",
        "--budgets",
        "100",
    ]
    args = moe_regime.parse_args(argv)
    stages, common = moe_regime.plan(args)
    manifest = moe_regime.build_manifest(args, stages, common)
    key = "soft4_tpp100 vs dense"
    sweep = manifest["stages"]["sweep"]["comparisons"][key]["round_trip"]
    designs = manifest["stages"]["designs"]["comparisons"][key]["round_trip"]
    assert sweep["p_better"] is not None and sweep["p_better_holm"] is None
    assert designs["p_better_holm"] is not None and designs["p_better_holm"] >= designs["p_better"]


def design_manifest(p_holm: dict, p_worse: float = 0.3, ratios: dict | None = None, seeds: int = 3) -> dict:
    """Design-stage comparisons at 100: each family member's Holm p (default 0.5), the same raw p_worse
    for all, bytes ratios (default 1.0); perpass vs perpass_control and dense_qat vs dense included. Arms
    later in ARMS have lower means (perpass below soft4)."""
    keys = sorted(moe_regime.HOLM_FAMILY) + ["perpass_tpp100 vs perpass_control", "dense_qat_tpp100 vs dense"]
    comparisons = {
        key: dict(
            round_trip=dict(
                gap=0.0,
                se=0.001,
                p_better=p_holm.get(key, 0.5),
                p_worse=p_worse,
                p_better_holm=p_holm.get(key, 0.5),
                n=[3, seeds],
            ),
            bytes_ratio=(ratios or {}).get(key, 1.0),
        )
        for key in keys
    }
    entries = {
        f"{arm}_tpp100": dict(
            arm=arm, env=dict(a.env), val_bpb_mean=2.1 - i / 100, quant_gap=[0.01, 0.02, 0.03]
        )
        for i, (arm, a) in enumerate(moe_regime.ARMS.items())
    }
    entries["soft4_qat_tpp100"]["quant_gap"] = [0.0, 0.005, 0.01]
    designs = dict(folder="designs", entries=entries, comparisons=comparisons)
    return dict(seeds=[1337, 1338, 1339], stages=dict(designs=designs))


def test_verdicts_apply_the_plans_rules():
    soft4, perpass = "soft4_tpp100 vs dense", "perpass_tpp100 vs dense"
    attribution = "perpass_tpp100 vs perpass_control"
    v = moe_regime.verdicts(design_manifest({}))
    assert v["moe_mode"]["arm"] == "dense" and "defer" in v["moe_mode"]["reading"]
    assert v["router_per_pass"]["default"] == 0
    v = moe_regime.verdicts(design_manifest({}, p_worse=0.01))
    assert v["moe_mode"]["arm"] == "dense" and "never" in v["moe_mode"]["reading"]
    # perpass (lower mean) is 3% larger than dense: not byte-matched, so soft4 is adopted; p = 0 counts
    v = moe_regime.verdicts(design_manifest({soft4: 0.0, perpass: 0.01}, ratios={perpass: 1.03}))
    assert v["moe_mode"]["arm"] == "soft4" and v["moe_mode"]["env"]["MOE_MODE"] == "soft"
    assert v["router_per_pass"]["default"] == 0  # soft4 has one router
    v = moe_regime.verdicts(design_manifest({soft4: 0.01, perpass: 0.01, attribution: 0.01}))
    assert v["moe_mode"]["arm"] == "perpass" and v["router_per_pass"]["default"] == 1
    v = moe_regime.verdicts(design_manifest({soft4: 0.01, perpass: 0.01, attribution: 0.2}))
    assert v["moe_mode"]["arm"] == "perpass" and v["router_per_pass"]["default"] == 0


def test_verdicts_wait_for_every_seed_and_report_qat():
    v = moe_regime.verdicts(design_manifest({"soft4_tpp100 vs dense": 0.001}, seeds=2))
    assert v["moe_mode"]["arm"] is None and v["moe_mode"]["reading"].startswith("pending")
    assert v["router_per_pass"]["default"] is None and v["qat"]["reading"].startswith("pending")
    manifest = design_manifest({})
    manifest["stages"]["designs"]["comparisons"]["topk4_equal_time_tpp100 vs dense"]["round_trip"]["n"] = [
        1,
        3,
    ]
    v = moe_regime.verdicts(manifest)
    assert v["moe_mode"]["reading"] == "pending: waits for topk4_equal_time_tpp100 vs dense"
    assert v["router_per_pass"]["reading"].startswith(
        "pending: waits for MOE_MODE (perpass vs perpass_control"
    )
    v = moe_regime.verdicts(design_manifest({}, p_worse=0.01))
    assert v["qat"]["reading"] == "QAT_START_FRAC=0.75 hurts dense"
    change = v["qat"]["soft4_quant_gap_change"]  # soft4_qat's quant gaps are 0.015 smaller on average
    assert change["gap"] == pytest.approx(-0.015) and change["p_better"] < 0.1
    text = "\n".join(moe_regime.verdict_lines(v))
    assert "QAT_START_FRAC=0.75 hurts dense" in text and "-0.0150" in text


def test_stages_in_one_folder_share_one_queue_in_plan_order(tmp_path, monkeypatch):
    script = tmp_path / "train_gpt.py"
    script.write_text("print('train')\n")

    def stage(name, folder, arms):
        runs = [proxy_study.Run(arm, 1337, f"{name}_{arm}", {}) for arm in arms]
        return runner.Stage(name, tmp_path / folder, script, runs)

    stages = [
        stage("sweep", "study", ["dense", "soft4"]),
        stage("designs", "study/designs", ["perpass"]),
        stage("qat", "study/designs", ["dense_qat", "soft4_qat", "perpass_qat"]),
    ]
    queues = []
    monkeypatch.setattr(
        runner,
        "run_missing",
        lambda args, todo, script, logs: queues.append(([r.run_id for r in todo], script, logs)) or 0,
    )
    args = moe_regime.argparse.Namespace(dry_run=False, jobs=2)
    assert moe_regime.run_stages(args, stages) == 0
    assert [q[0] for q in queues] == [
        ["sweep_dense", "sweep_soft4"],
        ["designs_perpass", "qat_dense_qat", "qat_soft4_qat", "qat_perpass_qat"],
    ]
    assert (
        queues[1][1] == tmp_path / "study/designs/train_gpt.py"
        and queues[1][1].read_text() == script.read_text()
    )
    # a folder's stages must share the script's bytes: a second script is refused before anything runs
    other = tmp_path / "other.py"
    other.write_text("print('other')\n")
    stages[2] = runner.Stage("qat", tmp_path / "study/designs", other, stages[2].runs)
    queues.clear()
    with pytest.raises(moe_regime.StudyError, match="differs"):
        moe_regime.run_stages(args, stages)
    assert [q[0] for q in queues] == [["sweep_dense", "sweep_soft4"]]


def test_a_control_from_an_earlier_stage_in_the_same_folder_is_compared(tmp_path):
    """dense_qat's control (dense) and topk4_equal_time's are design-stage arms: the comparison must exist
    (from the committed logs), or the QAT evidence and the MOE_MODE verdict would wait forever."""
    folder = REPO / "records" / "track_non_record_16mb" / "2026-12-03_MoE_Regime_Study"
    data = tmp_path / "data"
    data.mkdir()
    (data / "proxy_1024_bpe.model").write_bytes(b"")
    args = moe_regime.parse_args(
        ["collect", "--data", str(data), "--out", str(folder), "--stages", "designs,qat", "--budgets", "100"]
    )
    stages, common = moe_regime.plan(args)
    manifest = moe_regime.build_manifest(args, stages, common)
    dense_qat = manifest["stages"]["qat"]["comparisons"]["dense_qat_tpp100 vs dense"]
    assert dense_qat["round_trip"]["n"] == [3, 3] and dense_qat["bytes_ratio"] is not None
    assert "dense_qat_tpp100 vs dense" not in manifest["stages"]["designs"]["comparisons"]


def test_a_shipped_folder_packed_from_the_same_logs_and_script_is_kept_without_the_artifacts(tmp_path):
    """Run artifacts stay out of git: collect on a fresh checkout keeps what pack wrote from these logs."""
    stage_folder = tmp_path / "designs"
    (stage_folder / "runs").mkdir(parents=True)
    (stage_folder / "train_gpt.py").write_text("script")
    entry = dict(seeds=[1337, 1338], logs=[f"runs/regime_dense_tpp100_s{s}.txt" for s in (1337, 1338)])
    target = tmp_path / "shipped" / "dense"
    target.mkdir(parents=True)
    (target / "train_gpt.py").write_text("script")
    for seed, log in zip(entry["seeds"], entry["logs"]):
        (stage_folder / log).write_text(f"log {seed}")
        (target / f"train_seed{seed}.txt").write_text(f"log {seed}")
    (target / "model_seed1337.ptz").write_bytes(b"weights")
    (target / "README.md").write_text("about")
    written = {p.name: sha256_file(p) for p in target.iterdir()}
    (target / "submission.json").write_text(json.dumps({"packed_files": written}))
    assert runner.packed_from(target, moe_regime.pack_sources(stage_folder, entry))

    (stage_folder / entry["logs"][1]).write_text("log 1338, rerun")  # a log changed: repack
    assert not runner.packed_from(target, moe_regime.pack_sources(stage_folder, entry))
    (stage_folder / entry["logs"][1]).write_text("log 1338")
    (stage_folder / "train_gpt.py").write_text("script, edited")  # the stage's script changed
    assert not runner.packed_from(target, moe_regime.pack_sources(stage_folder, entry))
    (stage_folder / "train_gpt.py").write_text("script")
    (target / "README.md").write_text("edited by hand")  # the folder was edited since pack
    assert not runner.packed_from(target, moe_regime.pack_sources(stage_folder, entry))
    (target / "README.md").write_text("about")
    three_seeds = dict(
        seeds=[*entry["seeds"], 1339], logs=[*entry["logs"], "runs/regime_dense_tpp100_s1339.txt"]
    )
    (stage_folder / three_seeds["logs"][2]).write_text("log 1339")
    assert not runner.packed_from(
        target, moe_regime.pack_sources(stage_folder, three_seeds)
    )  # a seed the folder lacks
    (target / "model_seed1337.ptz").unlink()
    assert not runner.packed_from(target, moe_regime.pack_sources(stage_folder, entry))
    (target / "submission.json").unlink()
    assert not runner.packed_from(target, moe_regime.pack_sources(stage_folder, entry))


def test_the_study_gitignore_keeps_a_set_aside_runs_reason_and_drops_its_partial_logs(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(moe_regime.GITIGNORE)
    kept = ["runs/failed/regime_dense_tpp100_s1337-1/reason.json", "runs/regime_dense_tpp100_s1337.txt"]
    dropped = [
        "runs/failed/regime_dense_tpp100_s1337-1/regime_dense_tpp100_s1337.txt",
        "runs/failed/regime_dense_tpp100_s1337-1/regime_dense_tpp100_s1337.out",
        "runs/regime_dense_tpp100_s1337_model.ptz",
    ]
    for name in kept + dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    ignored = subprocess.run(
        ["git", "-C", str(tmp_path), "check-ignore", *kept, *dropped], capture_output=True, text=True
    ).stdout.split()
    assert sorted(ignored) == sorted(dropped)


def test_top_level_layout_passes_the_community_validator_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "records" / "track_non_record_16mb" / "2026-12-03_Study"
    (out / "runs").mkdir(parents=True)
    (out / "README.md").write_text("the study")
    (out / "train_gpt.py").write_text("print('sweep script')\n")
    logs = []
    for seed, bpb in ((1337, 2.08), (1338, 2.10)):
        log = f"runs/regime_dense_tpp100_s{seed}.txt"
        step = "step:2/2 train_loss:3.0 train_time:10ms step_avg:5.00ms\n"
        (out / log).write_text(f"{step}final_exact val_loss:3.5 val_bpb:{bpb}\n")
        logs.append(log)
    entry = dict(seeds=[1337, 1338], logs=logs, missing=[])
    manifest = dict(stages=dict(sweep=dict(folder=".", entries={"dense_tpp100": entry})))
    assert records.layout_check(out, {}).ok is False  # the study folder alone fails
    written = moe_regime.top_level_layout(out, manifest)
    assert [p.name for p in written] == ["train_seed1337.txt", "train_seed1338.txt", "submission.json"]
    top = json.loads((out / "submission.json").read_text())
    assert top["name"] == "2026-12-03_Study" and top["date"] == "2026-12-03"
    assert (
        top["val_bpb"] == pytest.approx(2.09) and top["seed_results"]["1338"]["log"] == "train_seed1338.txt"
    )
    assert not {"verify_check", "bytes_code", "bytes_total"} & set(top)  # the models are checked in shipped/
    check = records.layout_check(out, top)
    assert check.ok and check.status != "WARN", check.detail
    assert moe_regime.top_level_layout(out, manifest)  # its own files: rewritten
    (out / "submission.json").write_text(json.dumps({"name": "someone else's"}))
    with pytest.raises(moe_regime.StudyError, match="not written by tools/moe_regime.py"):
        moe_regime.top_level_layout(out, manifest)
