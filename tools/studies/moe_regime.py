"""The MoE study in the real run's regime, on CPU (proxy corpus, not FineWeb): dense and soft MoE trained
at 10, 30 and 100 tokens per parameter, then the new designs at 100. The real 16 MB record trains at
about 108 tokens per parameter; the first study (2026-11-25_MoE_vs_Dense_Study) at 2.5.

    sh ../shared/data/proxy_sp1024/prepare.sh /tmp/proxy          # the corpus, outside the repository
    python3 -m tools.studies.moe_regime run --data /tmp/proxy \\
        --out records/track_non_record_16mb/2026-12-03_MoE_Regime_Study
    python3 -m tools.studies.moe_regime run ... --stages sweep --budgets 10   # part of the plan, in order
    python3 -m tools.studies.moe_regime run ... --dry-run                     # the runs it would start
    python3 -m tools.studies.moe_regime collect --data /tmp/proxy --out FOLDER  # manifest, results, plots

The plan (plan.md in the folder, committed before the first run) fixes the stages, in this order:
sweep (dense and soft4 at every budget), designs (per-pass routing and its control at 100), qat (the
QAT arms at 100) and topk_time (topk4 at dense's CPU time at 100). A budget is a number of tokens per
parameter: ITERATIONS = round(budget x dense parameters / TRAIN_BATCH_TOKENS), dense's parameters counted
by the script itself (DRY_RUN=1: all parameters, embedding included), the same ITERATIONS for every arm
of a budget (equal tokens and steps), except topk4_equal_time, whose steps are scaled by the measured
step-time ratio (--topk-time-ratio). Every schedule of train_gpt.py is a fraction of the run.

The sweep runs the folder's train_gpt.py (copied at the first run). The other stages need knobs the
sweep's script may lack (ROUTER_PER_PASS, QAT_START_FRAC); they run in FOLDER/designs/ on their own copy
(--design-script), with their own dense and soft4 controls, so no comparison mixes two scripts.
Resumable (tools/studies/runner.py): a run whose log is complete is skipped, a failed or interrupted one is
set aside in runs/failed/ and tried again. Consecutive stages in one folder share one queue (the plan's
order, --jobs at a time), so no core idles at a stage's end.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools import records
from tools.common import MOE_PRESETS, REPO, StudyError, cell, sha256_file
from tools.stats import holm, line_fit, mean_difference, mean_std
from tools.studies import proxy_study, runner
from tools.studies.runner import (
    NON_RECORD_TRACK,
    SCRIPT,
    Stage,
    pm,
    pval,
    runs_dir,
    say,
    shown_folder,
    signed,
)

TAG = "regime"

# The record stack scaled to 3 layers x 64 (201,826 parameters with the dense MLP): XSA in every layer,
# parallel lanes in the last, the middle layer looped once more after 35% of the run (so per-pass routing
# has two passes to route), BigramHash off. One thread per run (two threads were 4.7x slower on the shared
# 2-core machine), eager (compiling took 306 s before the first step, more than a 10-tokens-per-parameter
# run's training), one micro-batch of 8,192 tokens (tokens per step per parameter 0.04, near the record's
# 0.02). Quantization and evaluation are the defaults; plain round-trip windows on the first 262,144
# validation tokens, as in the first study.
REGIME_SHAPE: dict[str, str] = {
    "VOCAB_SIZE": "1024",
    "NUM_LAYERS": "3",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "4",
    "ROPE_DIMS": "8",
    "TRAIN_SEQ_LEN": "256",
    "TRAIN_BATCH_TOKENS": "8192",
    "MICRO_BATCH_TOKENS": "8192",
    "MAX_WALLCLOCK_SECONDS": "0",
    "WARMUP_STEPS": "0",
    "TRAIN_LOG_EVERY": "64",
    "VAL_LOSS_EVERY": "0",
    "VAL_TOKEN_LIMIT": "262144",
    "EVAL_STRIDE": "0",
    "COMPILE": "0",
    "XSA_LAST_N": "3",
    "PARALLEL_START_LAYER": "2",
    "NUM_LOOPS": "1",
    "LOOP_START": "1",
    "LOOP_END": "1",
}
BUDGETS = (10, 30, 100)  # tokens per parameter
DESIGN_BUDGET = 100
# The 1.0611 record: 4,931 steps x 786,432 tokens over 35.9M parameters.
REAL_RUN_TOKENS_PER_PARAM = 4931 * 786432 / 35.9e6
ALPHA = 0.05
BYTES_TOLERANCE = 0.02  # "byte-matched": mean artifact bytes within 2% of the control's
LOOPED_LAYER = REGIME_SHAPE["LOOP_START"]
QAT = {"QAT_START_FRAC": "0.75"}  # fake quantization for the last quarter of the run
SOFT_LOOPED = {**MOE_PRESETS["soft4"], "MOE_LAYERS": LOOPED_LAYER}


@dataclass(frozen=True)
class Arm:
    name: str
    env: dict
    controls: tuple = ()  # the arms it is tested against (one-sided Welch, "the arm is better")
    needs: tuple = ()  # knobs the script must have
    time_matched: bool = False  # steps scaled by dense's step time over its own


ARMS = {
    a.name: a
    for a in (
        Arm("dense", dict(MOE_PRESETS["dense"])),
        Arm("soft4", dict(MOE_PRESETS["soft4"]), ("dense",)),
        Arm(
            "perpass",
            {**SOFT_LOOPED, "ROUTER_PER_PASS": "1"},
            ("dense", "perpass_control"),
            ("ROUTER_PER_PASS",),
        ),
        Arm("perpass_control", dict(SOFT_LOOPED), ("dense",)),
        Arm("dense_qat", {**MOE_PRESETS["dense"], **QAT}, ("dense",), ("QAT_START_FRAC",)),
        Arm("soft4_qat", {**MOE_PRESETS["soft4"], **QAT}, ("dense_qat",), ("QAT_START_FRAC",)),
        Arm(
            "perpass_qat",
            {**SOFT_LOOPED, "ROUTER_PER_PASS": "1", **QAT},
            ("dense_qat",),
            ("ROUTER_PER_PASS", "QAT_START_FRAC"),
        ),
        Arm("topk4_equal_time", dict(MOE_PRESETS["topk4"]), ("dense",), time_matched=True),
    )
}
# The pre-registered order (plan.md): stage -> (arm, budget) in run order within a seed.
STAGES: dict[str, list[tuple[str, int]]] = {
    "sweep": [(arm, b) for b in BUDGETS for arm in ("dense", "soft4")],
    "designs": [(arm, DESIGN_BUDGET) for arm in ("dense", "soft4", "perpass", "perpass_control")],
    "qat": [(arm, DESIGN_BUDGET) for arm in ("dense_qat", "soft4_qat", "perpass_qat")],
    "topk_time": [("topk4_equal_time", DESIGN_BUDGET)],
}
# The family of plan.md's design decision, Holm-adjusted together (the attribution test perpass vs
# perpass_control and the QAT evidence dense_qat vs dense are reported apart).
HOLM_FAMILY = {
    f"{arm}_tpp{DESIGN_BUDGET} vs {control}"
    for arm, control in (
        ("soft4", "dense"),
        ("perpass", "dense"),
        ("perpass_control", "dense"),
        ("topk4_equal_time", "dense"),
        ("soft4_qat", "dense_qat"),
        ("perpass_qat", "dense_qat"),
    )
}
DESIGN_FOLDER = "designs"  # the stages after the sweep, on their own script
BUDGET_JSON = "budget.json"
PLOT = "gap-vs-tokens-per-param.png"
# results.md's first line: the owner mark (the tool's name when the committed study was written; collect
# refuses to overwrite a results.md without it)
MARKER = "<!-- written by tools/moe_regime.py from the logs in runs/; rerun `collect` to refresh -->"
PER_PASS_PLOT = "per-pass-routing.png"
PER_PASS_CONFIG = "perpass_tpp100"  # the designs stage's arm with one router per pass of the looped layer
# a set-aside run keeps only its reason.json, which holds the tail of its log
GITIGNORE = (
    "# artifacts and partial logs stay out of git\n"
    "runs/*.ptz\nruns/.lock\nruns/failed/*/*\n!runs/failed/*/reason.json\n"
)


# ---------------------------------------------------------------------------- budgets


def iterations_for(tokens_per_param: float, params: int, batch_tokens: int) -> int:
    """Optimizer steps that give `tokens_per_param` training tokens per parameter (rounded to a step)."""
    if not (isinstance(params, int) and params > 0):
        raise StudyError(f"parameter count {params!r}: must be a positive integer")
    if not (isinstance(batch_tokens, int) and batch_tokens > 0):
        raise StudyError(f"TRAIN_BATCH_TOKENS={batch_tokens!r}: must be a positive integer")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise StudyError(f"budget {tokens_per_param!r} tokens per parameter: must be a positive number")
    steps = round(tokens_per_param * params / batch_tokens)
    if steps < 1:
        raise StudyError(
            f"budget {tokens_per_param} tokens per parameter is under one step of {batch_tokens}"
        )
    return steps


def parse_params(text: str) -> int:
    """The total parameter count from train_gpt.py's `params total:N` line."""
    found = re.findall(r"^params total:(\d+)", text, flags=re.M)
    if not found:
        raise StudyError("the script printed no `params total:N` line (DRY_RUN=1 failed?)")
    return int(found[-1])


def count_params(script: Path, env: dict[str, str], python: str) -> int:
    """All parameters of the model `env` builds, embedding included, counted by the script (meta device)."""
    run_env = {k: v for k, v in env.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    proc = subprocess.run(
        [python, str(script)],
        env={"PATH": "/usr/bin:/bin", **run_env, "DRY_RUN": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise StudyError(f"DRY_RUN=1 {script} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return parse_params(proc.stdout)


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise StudyError(f"--budgets {text!r}: expected comma-separated integers of {BUDGETS}") from None
    bad = [b for b in budgets if b not in BUDGETS]
    if not budgets or bad:
        raise StudyError(f"--budgets {text!r}: the plan's budgets are {', '.join(map(str, BUDGETS))}")
    return budgets


def parse_stages(text: str) -> list[str]:
    stages = [s for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise StudyError(f"--stages {text!r}: known stages, in the plan's order: {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]  # always the pre-registered order


def script_knobs(script: Path) -> set[str]:
    """The knob names of a train_gpt.py: its KNOBS table's keys (older scripts) or its Knob rows' names."""
    text = script.read_text(encoding="utf-8")
    table = re.findall(r'^\s+"([A-Z][A-Z0-9_]+)": \(', text, flags=re.M)
    rows = re.findall(r'\bKnob\(\s*"([A-Z][A-Z0-9_]+)"', text)
    return set(table) | set(rows)


# ---------------------------------------------------------------------------- planning


def budget_info(args, folder: Path, script: Path, common: dict[str, str]) -> dict:
    """Dense's parameter count and every budget's ITERATIONS, counted once per folder (budget.json)."""
    path = folder / BUDGET_JSON
    batch = int(common["TRAIN_BATCH_TOKENS"])
    if path.is_file():
        info = json.loads(path.read_text())
        if info.get("script_sha256") == sha256_file(script) and info.get("train_batch_tokens") == batch:
            return info
        raise StudyError(
            f"{path} was counted for another script or batch: move the folder away to start over"
        )
    params = count_params(script, {**common, **ARMS["dense"].env}, args.python)
    info = dict(
        dense_params=params,
        train_batch_tokens=batch,
        iterations={str(b): iterations_for(b, params, batch) for b in BUDGETS},
        script_sha256=sha256_file(script),
    )
    if not args.dry_run:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def plan(args) -> tuple[list[Stage], dict[str, str]]:
    corpus = runner.corpus_env(args)
    seeds = runner.parse_seeds("--seeds", args.seeds)
    budgets = parse_budgets(args.budgets)
    common = {**corpus, **REGIME_SHAPE, "OMP_NUM_THREADS": "1"}
    stages = []
    for name in parse_stages(args.stages):
        folder = args.out if name == "sweep" else args.out / DESIGN_FOLDER
        given = args.script if name == "sweep" else args.design_script
        copy = folder / SCRIPT
        script = copy if copy.is_file() else given
        entries = [(arm, b) for arm, b in STAGES[name] if b in budgets]
        if not entries:
            continue
        blocked = None
        if script is None or not script.is_file():
            blocked = (
                f"stage {name}: no script: pass --design-script, a train_gpt.py with "
                f"ROUTER_PER_PASS and QAT_START_FRAC (it is copied to {copy})"
            )
        elif lacking := sorted({k for arm, _ in entries for k in ARMS[arm].needs} - script_knobs(script)):
            blocked = (
                f"stage {name}: {script} lacks {', '.join(lacking)}; pass --design-script with a "
                "train_gpt.py that has them, or leave the stage out (--stages)"
            )
        elif any(ARMS[arm].time_matched for arm, _ in entries) and not args.topk_time_ratio:
            blocked = (
                "stage topk_time: --topk-time-ratio is required: dense's ms/step over topk4's, measured "
                "alone at this shape (tools.studies.moe_study speed with --env for the regime shape)"
            )
        if blocked and (args.stages != ",".join(STAGES) or args.command == "collect" and name == "sweep"):
            raise StudyError(blocked)  # asked for by name: a refusal, not a skip
        if blocked:
            say(f"{blocked}: not run yet (the whole plan was asked for)")
            continue
        if args.topk_time_ratio is not None and not 0.2 <= args.topk_time_ratio <= 5:
            raise StudyError(f"--topk-time-ratio {args.topk_time_ratio}: expected a measured ratio in 0.2..5")
        info = budget_info(args, folder, script, common)
        configs = {}
        for arm, budget in entries:
            steps = info["iterations"][str(budget)]
            if ARMS[arm].time_matched:
                steps = round(steps * args.topk_time_ratio)
            configs[f"{arm}_tpp{budget}"] = {**ARMS[arm].env, "ITERATIONS": str(steps)}
        runs = proxy_study.plan_runs(configs, seeds, common, TAG, runs_dir(folder))
        order = {key: i for i, key in enumerate(configs)}
        runs.sort(key=lambda r: (budget_of(r.name), seeds.index(r.seed), order[r.name]))
        stages.append(Stage(name, folder, given if given and given.is_file() else script, runs))
    return stages, common


def budget_of(config: str) -> int:
    return int(config.rsplit("_tpp", 1)[1])


def arm_of(config: str) -> str:
    return config.rsplit("_tpp", 1)[0]


# ---------------------------------------------------------------------------- running


def run_stages(args, stages: list[Stage]) -> int:
    """The plan's stages on the shared queue; each folder keeps its artifacts and partial logs out of git."""
    return runner.run_stages(args, stages, GITIGNORE)


# ---------------------------------------------------------------------------- statistics


def entry_results(runs: list, logs: Path, params_dense: int) -> dict[str, dict]:
    """Per (arm, budget): the finished runs' scores, sizes and tokens per parameter."""
    rows = [proxy_study.collect(run, logs) for run in runs]
    results = {}
    for config in dict.fromkeys(r.name for r in runs):
        ok = [r for r in rows if r["name"] == config and r["status"] == "ok"]
        run = next(r for r in runs if r.name == config)
        steps = int(run.env["ITERATIONS"])
        tokens = steps * int(run.env["TRAIN_BATCH_TOKENS"])
        entry = dict(
            arm=arm_of(config),
            budget=budget_of(config),
            env={k: v for k, v in runner.arm_env(run).items() if k not in REGIME_SHAPE},
            iterations=steps,
            train_tokens=tokens,
            seeds=[r["seed"] for r in ok],
            runs=[r["run_id"] for r in ok],
            logs=[f"runs/{r['run_id']}.txt" for r in ok],
        )
        for key, source in (
            ("val_bpb", "score"),
            ("pre_quant_val_bpb", "val_bpb_prequant"),
            ("params", "params"),
            ("artifact_bytes", "artifact_bytes"),
            ("ms_per_step", "ms_per_step"),
        ):
            entry[key] = [r.get(source) for r in ok]
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([v for v in entry[key] if v is not None])
        # what quantization costs each run: round trip minus pre-quantization val_bpb
        entry["quant_gap"] = [
            r["score"] - r["val_bpb_prequant"]
            for r in ok
            if r.get("score") is not None and r.get("val_bpb_prequant") is not None
        ]
        # every parameter of this arm, embedding included; dense's count before any run finished
        params = entry["params_mean"] or (params_dense if entry["arm"] == "dense" else None)
        entry["tokens_per_param"] = tokens / params if params else None
        entry["missing"] = [r["run_id"] for r in rows if r["name"] == config and r["status"] != "ok"]
        results[config] = entry
    return results


def gap(arm: dict, control: dict, key: str) -> dict:
    """Arm minus control (mean), its standard error, and one-sided Welch p both ways."""
    return mean_difference(arm[key], control[key])


# plan.md registers "the slope's 95% interval" of the trend; collect has read it with the normal quantile
# 1.96 (inverse-variance weights taken as known variances) since the first run, and the registered
# verdict keeps it. With three budgets the t interval on the residuals has one degree of freedom and is
# over ten times as wide: the study's README lists it as a correction.
TREND_Z = 1.96


def trend(points: list[tuple[float, float, float]]) -> dict:
    """Weighted least squares of the gap on log10(tokens per parameter), weights 1/se^2: the slope per
    decade, its 95% interval (TREND_Z), and what it says (toward the MoE arm, toward dense, or within
    noise)."""
    usable = [(math.log10(x), g, se) for x, g, se in points if g is not None and se]
    if len(usable) < 2:
        return dict(slope=None, ci=None, reading="too few budgets with 2+ seeds per arm")
    fit = line_fit([x for x, _, _ in usable], [g for _, g, _ in usable], [1 / se**2 for _, _, se in usable])
    half = TREND_Z / math.sqrt(fit.sxx)
    ci = [fit.slope - half, fit.slope + half]
    if ci[1] < 0:
        reading = "the gap moves toward the MoE arm as tokens per parameter grow"
    elif ci[0] > 0:
        reading = "the gap moves toward dense as tokens per parameter grow"
    else:
        reading = "the gap holds (its slope is within noise)"
    return dict(slope=fit.slope, ci=ci, reading=reading)


def bytes_match(ratio: float | None) -> bool:
    """plan.md's "byte-matched": the arm's mean artifact bytes within 2% of its control's."""
    return ratio is not None and abs(ratio - 1) <= BYTES_TOLERANCE


def significant(p: float | None) -> bool:
    return p is not None and p < ALPHA


def complete(comparison: dict | None, seeds: int) -> bool:
    """Both sides of a comparison have every seed (plan.md: verdicts wait for all of them)."""
    return comparison is not None and comparison["round_trip"]["n"] == [seeds, seeds]


def moe_mode_verdict(entries: dict, comparisons: dict, seeds: int) -> dict:
    """plan.md's MOE_MODE rule over the Holm family: the byte-matched arm with the lowest mean among those
    with Holm p < 0.05; else none, read as "never" if every arm is worse at raw one-sided p < 0.05, else
    "defer". Pending while any member lacks a seed."""
    members = {key: comparisons.get(key) for key in sorted(HOLM_FAMILY)}
    waiting = [key for key, c in members.items() if not complete(c, seeds)]
    if waiting:
        return dict(arm=None, env=None, reading="pending: waits for " + "; ".join(waiting))
    adoptable = [
        key.split(" vs ")[0]
        for key, c in members.items()
        if significant(c["round_trip"]["p_better_holm"]) and bytes_match(c["bytes_ratio"])
    ]
    if adoptable:
        best = min(adoptable, key=lambda config: entries[config]["val_bpb_mean"])
        arm = entries[best]["arm"]
        return dict(
            arm=arm, env=entries[best]["env"], reading=f"adopt {arm} (Holm p < {ALPHA}, byte-matched)"
        )
    if all(significant(c["round_trip"]["p_worse"]) for c in members.values()):
        reading = (
            f"none, never at {DESIGN_BUDGET} tokens per parameter: every MoE arm is worse than its control"
        )
    else:
        reading = "none for now (defer): no MoE arm beats its control after Holm, and not every one is worse"
    return dict(arm="dense", env=dict(MOE_PRESETS["dense"]), reading=reading)


def router_verdict(comparisons: dict, moe_mode: dict, seeds: int) -> dict:
    """ROUTER_PER_PASS=1 only if perpass beats perpass_control (one-sided Welch p < 0.05, outside the Holm
    family: it attributes a gain) and the adopted arm routes per pass."""
    test = comparisons.get(f"perpass_tpp{DESIGN_BUDGET} vs perpass_control")
    if not complete(test, seeds):
        return dict(default=None, reading="pending: waits for perpass vs perpass_control")
    p = test["round_trip"]["p_better"]
    beats = significant(p)
    if moe_mode["arm"] is None:
        reading = f"pending: waits for MOE_MODE (perpass vs perpass_control one-sided p = {pval(p)})"
        return dict(default=None, reading=reading)
    adopted = (moe_mode["env"] or {}).get("ROUTER_PER_PASS") == "1"
    default = 1 if beats and adopted else 0
    reading = (
        f"{default}: perpass vs perpass_control one-sided p = {pval(p)}"
        f" ({'beats' if beats else 'does not beat'} its control); the adopted arm "
        f"{'routes' if adopted else 'does not route'} per pass"
    )
    return dict(default=default, reading=reading)


def qat_evidence(entries: dict, comparisons: dict, seeds: int) -> dict:
    """Reported, not a rule: dense_qat vs dense (one-sided Welch both ways), and whether QAT closed the
    MoE quant gap (soft4_qat's quant gaps minus soft4's; negative: QAT shrank it)."""
    dense = comparisons.get(f"dense_qat_tpp{DESIGN_BUDGET} vs dense")
    if complete(dense, seeds):
        rt = dense["round_trip"]
        if significant(rt["p_better"]):
            reading = "QAT_START_FRAC=0.75 helps dense"
        elif significant(rt["p_worse"]):
            reading = "QAT_START_FRAC=0.75 hurts dense"
        else:
            reading = "QAT_START_FRAC=0.75 makes no difference to dense within noise"
    else:
        rt, reading = None, "pending: waits for dense_qat and dense"
    soft4, soft4_qat = (entries.get(f"{arm}_tpp{DESIGN_BUDGET}") for arm in ("soft4", "soft4_qat"))
    shrink = gap(soft4_qat, soft4, "quant_gap") if soft4 and soft4_qat else None
    return dict(dense_qat_vs_dense=rt, reading=reading, soft4_quant_gap_change=shrink)


def verdicts(manifest: dict) -> dict:
    """plan.md's decision rules applied to the design stages at 100 tokens per parameter."""
    entries, comparisons = {}, {}
    for name, stage in manifest["stages"].items():
        if name != "sweep":
            entries.update(stage["entries"])
            comparisons.update(stage["comparisons"])
    seeds = len(manifest["seeds"])
    moe_mode = moe_mode_verdict(entries, comparisons, seeds)
    return dict(
        moe_mode=moe_mode,
        router_per_pass=router_verdict(comparisons, moe_mode, seeds),
        qat=qat_evidence(entries, comparisons, seeds),
    )


# ---------------------------------------------------------------------------- outputs


def build_manifest(args, stages: list[Stage], common: dict[str, str]) -> dict:
    manifest = dict(
        study="MoE vs dense in the real run's regime, CPU, proxy corpus (NOT FineWeb: val_bpb here is not "
        "comparable with challenge scores)",
        data=dict(
            path=common["DATA_PATH"],
            tokenizer=common["TOKENIZER_PATH"],
            corpus="proxy_sp1024",
            val_token_limit=int(REGIME_SHAPE["VAL_TOKEN_LIMIT"]),
        ),
        shape=dict(REGIME_SHAPE),
        real_run_tokens_per_param=REAL_RUN_TOKENS_PER_PARAM,
        seeds=runner.parse_seeds("--seeds", args.seeds),
        stages={},
        command=reproduce_command(args),
    )
    folder_entries: dict[Path, dict] = {}  # a control may be an earlier stage's arm in the same folder
    for stage in stages:
        info = (
            json.loads((stage.folder / BUDGET_JSON).read_text())
            if (stage.folder / BUDGET_JSON).is_file()
            else {}
        )
        entries = entry_results(stage.runs, runs_dir(stage.folder), info.get("dense_params"))
        pool = folder_entries.setdefault(stage.folder, {})
        pool.update(entries)
        comparisons = {}
        for config, entry in entries.items():
            for control in ARMS[entry["arm"]].controls:
                ref = pool.get(f"{control}_tpp{entry['budget']}")
                if ref is not None:
                    comparisons[f"{config} vs {control}"] = dict(
                        round_trip=gap(entry, ref, "val_bpb"),
                        pre_quant=gap(entry, ref, "pre_quant_val_bpb"),
                        bytes_ratio=(entry["artifact_bytes_mean"] / ref["artifact_bytes_mean"])
                        if entry["artifact_bytes_mean"] and ref["artifact_bytes_mean"]
                        else None,
                    )
        manifest["stages"][stage.name] = dict(
            folder=str(stage.folder.relative_to(args.out)) if stage.folder != args.out else ".",
            dense_params=info.get("dense_params"),
            iterations=info.get("iterations"),
            entries=entries,
            comparisons=comparisons,
        )
    # Holm over the plan's family of design comparisons at 100 (all in designs/); None elsewhere
    family = {
        key: c
        for name, stage in manifest["stages"].items()
        if name != "sweep"
        for key, c in stage["comparisons"].items()
        if key in HOLM_FAMILY
    }
    adjusted = holm({key: c["round_trip"]["p_better"] for key, c in family.items()})
    for name, stage in manifest["stages"].items():
        for key, c in stage["comparisons"].items():
            # the sweep's soft4_tpp100 vs dense shares its name with a member, not its runs
            in_family = name != "sweep" and key in family
            c["round_trip"]["p_better_holm"] = adjusted[key] if in_family else None
    sweep = manifest["stages"].get("sweep")
    if sweep:
        for key in ("round_trip", "pre_quant"):
            points = [
                (float(b), c[key]["gap"], c[key]["se"])
                for b in BUDGETS
                if (c := sweep["comparisons"].get(f"soft4_tpp{b} vs dense")) is not None
            ]
            sweep[f"trend_{key}"] = trend(points)
    manifest["verdicts"] = verdicts(manifest)
    return manifest


def reproduce_command(args) -> str:
    shown = shown_folder(args.out)
    extra = "" if args.stages == ",".join(STAGES) else f" --stages {args.stages}"
    extra += "" if args.budgets == ",".join(map(str, BUDGETS)) else f" --budgets {args.budgets}"
    extra += f" --topk-time-ratio {args.topk_time_ratio}" if args.topk_time_ratio else ""
    return (
        f"python3 -m tools.studies.moe_regime run --data {args.data} --out {shown} --seeds {args.seeds} "
        f"--jobs {args.jobs}{extra} --script {shown}/{SCRIPT}"
    )


def results_text(manifest: dict) -> str:
    lines = [
        MARKER,
        "# Results as the logs stand (proxy corpus, not FineWeb)",
        "",
        "Round-trip val_bpb of the quantized artifact on the first 262,144 proxy validation tokens; mean ± "
        "sample std over the finished seeds. Gap = arm minus control (negative: the arm is better), ± its "
        "standard error; p = one-sided Welch that the arm is better; Holm p: adjusted over plan.md's 6 "
        "design comparisons at 100 (blank in the sweep, which is read by its trend).",
    ]
    for name, stage in manifest["stages"].items():
        lines += [
            "",
            f"## Stage {name} (folder `{stage['folder']}`, dense parameters {stage['dense_params']})",
            "",
        ]
        lines += [
            "| arm | tokens/param | steps | seeds | val_bpb | pre-quant | artifact bytes | ms/step "
            "| missing |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for entry in stage["entries"].values():
            lines.append(
                f"| {entry['arm']} | {cell(entry['tokens_per_param'], 1)} | {entry['iterations']} | "
                f"{len(entry['seeds'])} | {pm(entry, 'val_bpb')} | "
                f"{pm(entry, 'pre_quant_val_bpb')} | {cell(entry['artifact_bytes_mean'], 0)} | "
                f"{cell(entry['ms_per_step_mean'], 1)} | {len(entry['missing'])} |"
            )
        if stage["comparisons"]:
            lines += [
                "",
                "| comparison | gap (round trip) | p better | p worse | Holm p | gap (pre-quant) | bytes x |",
            ]
            lines.append("|---|---|---|---|---|---|---|")
            for key, c in stage["comparisons"].items():
                rt, pq = c["round_trip"], c["pre_quant"]
                lines.append(
                    f"| {key} | {signed(rt['gap'])} ± {cell(rt['se'])} | {pval(rt['p_better'])} | "
                    f"{pval(rt['p_worse'])} | {pval(rt['p_better_holm'])} | {signed(pq['gap'])} ± "
                    f"{cell(pq['se'])} | {cell(c['bytes_ratio'], 3)} |"
                )
        for key in ("trend_round_trip", "trend_pre_quant"):
            if key in stage:
                t = stage[key]
                slope = (
                    "-"
                    if t["slope"] is None
                    else f"{t['slope']:+.4f} per decade, 95% [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}]"
                )
                lines += [
                    "",
                    f"Soft4-minus-dense {key[6:].replace('_', ' ')} gap against log10(tokens per "
                    f"parameter): {slope}; {t['reading']}.",
                ]
    routing = manifest.get("per_pass_routing")
    if routing:
        distances = ", ".join(
            f"layer {layer} {info['tv_distance']:.3f}" for layer, info in routing["layers"].items()
        )
        lines += [
            "",
            f"Per-pass routing ({routing['runs']} perpass runs, `{routing['plot']}`): total variation "
            f"distance between the passes' final mean loads: {distances} (0: the passes route alike).",
        ]
    return "\n".join(lines + verdict_lines(manifest["verdicts"])) + "\n"


def verdict_lines(verdict: dict) -> list[str]:
    moe_mode, qat = verdict["moe_mode"], verdict["qat"]
    env = " ".join(f"{k}={v}" for k, v in (moe_mode["env"] or {}).items())
    lines = [
        "",
        f"## Verdicts at {DESIGN_BUDGET} tokens per parameter (plan.md's rules, applied by collect)",
        "",
        f"- MOE_MODE: {moe_mode['reading']}" + (f" (`{env}`)" if env else ""),
        f"- ROUTER_PER_PASS: {verdict['router_per_pass']['reading']}",
        f"- QAT (evidence, not a rule): {qat['reading']}",
    ]
    if qat["dense_qat_vs_dense"]:
        rt = qat["dense_qat_vs_dense"]
        lines.append(
            f"  dense_qat minus dense: {signed(rt['gap'])} ± {cell(rt['se'])} "
            f"(p better {pval(rt['p_better'])}, p worse {pval(rt['p_worse'])})"
        )
    change = qat["soft4_quant_gap_change"]
    if change and change["gap"] is not None:
        lines.append(
            f"  soft4's quant gap (round trip minus pre-quant), soft4_qat minus soft4: "
            f"{signed(change['gap'])} ± {cell(change['se'])} "
            f"(p that QAT shrank it {pval(change['p_better'])})"
        )
    return lines


def gap_plot(manifest: dict, path: Path) -> bool:
    """soft4 minus dense against tokens per parameter (log x), round trip and pre-quant, ± 1 s.e."""
    sweep = manifest["stages"].get("sweep")
    if not sweep:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for key, label, shift, marker in (
        ("round_trip", "round trip", 1.0, "o"),
        ("pre_quant", "pre-quant", 1.04, "s"),
    ):
        xs, ys, es = [], [], []
        for b in BUDGETS:
            c = sweep["comparisons"].get(f"soft4_tpp{b} vs dense")
            if c and c[key]["gap"] is not None:
                tpp = sweep["entries"][f"dense_tpp{b}"]["tokens_per_param"]
                xs.append(tpp * shift)
                ys.append(c[key]["gap"])
                es.append(c[key]["se"])
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=4, label=f"soft4 - dense, {label}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.axhline(0, color="gray", lw=0.8)
    ax.axvline(REAL_RUN_TOKENS_PER_PARAM, color="red", ls="--", lw=1)
    ax.text(REAL_RUN_TOKENS_PER_PARAM, ax.get_ylim()[1], " real run ~108", color="red", va="top", fontsize=8)
    ax.set_xlim(5, 200)
    ax.set_xlabel("training tokens per parameter (log)")
    ax.set_ylabel("val_bpb gap (positive: dense better)")
    ax.set_title("soft4 minus dense, mean ± 1 s.e. over seeds (proxy corpus, CPU; not FineWeb)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- per-pass routing


def last_pass_loads(events: Path) -> dict[tuple[int, int], list[float]]:
    """A run's last logged load share per expert for every (layer, pass) with its own router, from its
    JSONL events (each covers the TRAIN_LOG_EVERY steps before it; a layer with one router has no pass)."""
    loads = {}
    for line in events.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "routing" and event.get("pass") is not None:
            loads[(event["layer"], event["pass"])] = event["load"]
    return loads


def pass_routing(logs: Path, run_ids: list[str]) -> dict | None:
    """Per layer with per-pass routers: each pass's final load per expert (mean and sample std over the
    runs) and the total variation distance between the passes' mean loads (0: they route alike, 1:
    disjoint experts). None without a finished run that logged per-pass routing."""
    runs = [last_pass_loads(logs / f"{run_id}.jsonl") for run_id in run_ids]
    runs = [r for r in runs if r]
    if not runs:
        return None
    layers = {}
    for layer in sorted({layer for r in runs for layer, _ in r}):
        passes = sorted({p for r in runs for lay, p in r if lay == layer})
        per_pass = {}
        for p in passes:
            rows = [r[(layer, p)] for r in runs if (layer, p) in r]
            columns = list(zip(*rows))  # one tuple of runs per expert
            per_pass[p] = dict(
                mean=[mean_std(list(c))[0] for c in columns],
                std=[mean_std(list(c))[1] for c in columns],
                runs=len(rows),
            )
        first, last = per_pass[passes[0]]["mean"], per_pass[passes[-1]]["mean"]
        distance = 0.5 * sum(abs(a - b) for a, b in zip(first, last))
        layers[str(layer)] = dict(passes={str(p): v for p, v in per_pass.items()}, tv_distance=distance)
    return dict(runs=len(runs), layers=layers)


def pass_routing_plot(routing: dict, path: Path) -> None:
    """Grouped bars: each expert's final load share per pass, ± 1 sample std over the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = routing["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
    for ax, (layer, info) in zip(axes[0], layers.items()):
        passes = info["passes"]
        width = 0.8 / len(passes)
        for i, (p, load) in enumerate(passes.items()):
            xs = [e + (i - (len(passes) - 1) / 2) * width for e in range(len(load["mean"]))]
            errors = [0.0 if s is None else s for s in load["std"]]
            ax.bar(xs, load["mean"], width, yerr=errors, capsize=3, label=f"pass {p}")
        ax.set_xticks(range(len(next(iter(passes.values()))["mean"])))
        ax.set_xlabel("expert")
        ax.set_ylabel("share of the layer's tokens")
        ax.set_title(f"layer {layer}: passes' total variation distance {info['tv_distance']:.3f}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"per-pass routers: final load per expert per pass, mean ± std over {routing['runs']} runs\n"
        "(proxy corpus, CPU; not FineWeb)",  # two lines: one figure per layer is narrower than the title
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the shipped models
SHIPPED = "shipped"  # packed record folders: dense's and the best MoE arm's smallest artifacts at 100
DENSE_ARMS = ("dense", "dense_qat")
SHIPPED_CHECK_TOKENS = 16384  # the packed folders' quick-check reference (verify --token-limit)


def complete_entries(manifest: dict, folder: str) -> dict[str, dict]:
    """The entries at 100 tokens per parameter of one stage folder whose every seed finished."""
    found = {}
    for stage in manifest["stages"].values():
        if stage["folder"] != folder:
            continue
        for config, entry in stage["entries"].items():
            if entry["budget"] == DESIGN_BUDGET and len(entry["seeds"]) == len(manifest["seeds"]):
                found[config] = entry
    return found


def byte_matched(manifest: dict, config: str, folder: str) -> bool:
    """The arm's mean artifact bytes within 2% of its first control's in the same stage folder (plan.md;
    the sweep and the design stage both have a soft4_tpp100 vs dense)."""
    control = ARMS[arm_of(config)].controls[0]
    for stage in manifest["stages"].values():
        if stage["folder"] != folder:
            continue
        ratio = stage["comparisons"].get(f"{config} vs {control}", {}).get("bytes_ratio")
        if ratio is not None:
            return bytes_match(ratio)
    return False


def shipping_choice(manifest: dict) -> tuple[str, list[dict]] | None:
    """(stage folder, [dense, best MoE arm]) at 100 tokens per parameter: the design folder once dense and
    a byte-matched MoE arm have every seed there, else the sweep's; the MoE arm with the lowest mean
    round-trip val_bpb. None while neither folder has such a pair."""
    for folder in (DESIGN_FOLDER, "."):
        entries = complete_entries(manifest, folder)
        dense = entries.get(f"dense_tpp{DESIGN_BUDGET}")
        moe = [
            e
            for config, e in entries.items()
            if e["arm"] not in DENSE_ARMS and byte_matched(manifest, config, folder)
        ]
        if dense and moe:
            return folder, [dense, min(moe, key=lambda e: e["val_bpb_mean"])]
    return None


def shipped_about(entry: dict, folder: str, arms: int) -> str:
    """The opening of a shipped folder's README: what the model is and where its study is."""
    logs = "runs/" if folder == "." else f"{folder}/runs/"
    return (
        f"The **{entry['arm']}** arm of the MoE regime study (`../../`, whose `findings.md` holds the "
        f"verdicts), one of the {arms} arms the study ships: the record stack scaled to 3 layers x 64, "
        f"trained on CPU at {DESIGN_BUDGET} tokens per parameter ({entry['iterations']} steps) on the proxy "
        f"corpus, **not FineWeb**. This folder ships the smallest artifact of the arm's "
        f"{len(entry['seeds'])} seeds so the model can be re-scored elsewhere; its logs are copies of the "
        f"study's `{logs}`. Every score is on the first {REGIME_SHAPE['VAL_TOKEN_LIMIT']} proxy validation "
        "tokens: it compares arms of the study, it is not a challenge score.\n"
    )


def ship(args, manifest: dict) -> list[Path]:
    """Pack dense's and the best MoE arm's runs at 100 as record folders in FOLDER/shipped/<arm>/, each
    with its smallest artifact and its own script, so both can be re-scored elsewhere (records.py verify
    on the study folder verifies them). -> the packed folders."""
    choice = shipping_choice(manifest)
    if choice is None:
        say(
            "nothing shipped: no stage has dense and a byte-matched MoE arm with every seed at "
            f"{DESIGN_BUDGET} tokens per parameter"
        )
        return []
    folder, entries = choice
    shipped = args.out / SHIPPED
    keep = {e["arm"] for e in entries}
    for stale in sorted(shipped.glob("*")) if shipped.is_dir() else []:
        if stale.name not in keep:
            runner.remove_packed(stale)
    packed = []
    for entry in entries:
        target = shipped / entry["arm"]
        packed.append(target)
        if runner.packed_from(target, pack_sources(args.out / folder, entry)):
            say(f"{target}: already packed from these logs and this script; kept")
            continue
        with tempfile.TemporaryDirectory(prefix="moe_regime_") as tmp:
            about = Path(tmp) / "about.md"
            about.write_text(shipped_about(entry, folder, len(entries)))
            records.pack(**pack_options(args, manifest, entry, folder, about))
    return packed


TOP_LEVEL_ARM = "dense"  # the study's recommendation (MOE_MODE=none): its runs stand for the folder
# submission.json's written_by: the owner mark the committed folder holds (collect overwrites only its own)
TOP_LEVEL_WRITER = "tools/moe_regime.py collect"


def top_level_layout(out: Path, manifest: dict) -> list[Path]:
    """The community submission validator reads a record folder's top level only (submission.json with
    val_bpb, name and date; a train log): the study folder gets copies of dense's runs at 100 tokens per
    parameter from the stage kept at its top level (the sweep: the runs of this folder's train_gpt.py)
    and a submission.json naming the study. No verify_check, code bytes or artifact: the models are
    shipped, and verified, in shipped/. Refuses to overwrite a submission.json it did not write.
    -> the files written ([] when that stage lacks dense's runs)."""
    stage = next((st for st in manifest["stages"].values() if st["folder"] == "."), None)
    entry = stage and stage["entries"].get(f"{TOP_LEVEL_ARM}_tpp{DESIGN_BUDGET}")
    if not entry or entry["missing"]:
        return []
    blurb = (
        f"MoE regime study (CPU, proxy corpus, not FineWeb): {TOP_LEVEL_ARM} at {DESIGN_BUDGET} "
        "tokens per parameter, the runs of this folder's train_gpt.py; the study is in manifest.json "
        f"and findings.md, the models in {SHIPPED}/"
    )
    logs = [out / log for log in entry["logs"]]
    token_limit = int(REGIME_SHAPE["VAL_TOKEN_LIMIT"])
    return runner.write_top_level(out, entry["seeds"], logs, blurb, TOP_LEVEL_WRITER, token_limit)


def pack_sources(stage_folder: Path, entry: dict) -> dict[str, Path]:
    """A shipped folder's files that pack copies, by name in the folder: its stage's script and logs."""
    sources = {SCRIPT: stage_folder / SCRIPT}
    for seed, log in zip(entry["seeds"], entry["logs"]):
        sources[f"train_seed{seed}.txt"] = stage_folder / log
    return sources


def pack_options(args, manifest: dict, entry: dict, folder: str, about: Path) -> dict:
    """records.pack's arguments for one shipped arm: its stage's logs and script, its smallest artifact."""
    stage_folder = args.out / folder
    target = args.out / SHIPPED / entry["arm"]
    date = args.out.name[:10] if re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.out.name[:10]) else None
    return dict(
        logs=[stage_folder / log for log in entry["logs"]],
        name=f"{args.out.name}_{entry['arm']}",
        author="moe_regime",
        github_id="moe_regime",
        track=NON_RECORD_TRACK,
        blurb=f"{entry['arm']} at {DESIGN_BUDGET} tokens per parameter, the smallest artifact of its "
        f"{len(entry['seeds'])} seeds (MoE regime study; proxy corpus, not FineWeb)",
        script=stage_folder / SCRIPT,
        folder=target,
        ship="smallest",
        allow_partial_eval=True,
        check_data=manifest["data"]["path"],
        check_tokenizer=manifest["data"]["tokenizer"],
        check_tokens=SHIPPED_CHECK_TOKENS,
        about=about,
        date=date,
        force=target.exists(),
    )


def finalize(args, stages: list[Stage], common: dict[str, str]) -> int:
    manifest = build_manifest(args, stages, common)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest["plot"] = PLOT if gap_plot(manifest, args.out / PLOT) else None
    manifest["per_pass_routing"] = None
    for stage in stages:
        entry = manifest["stages"][stage.name]["entries"].get(PER_PASS_CONFIG)
        routing = pass_routing(runs_dir(stage.folder), entry["runs"]) if entry else None
        if routing:
            pass_routing_plot(routing, args.out / PER_PASS_PLOT)
            manifest["per_pass_routing"] = dict(routing, plot=PER_PASS_PLOT)
    manifest["shipped"] = [p.relative_to(args.out).as_posix() for p in ship(args, manifest)]
    top_level_layout(args.out, manifest)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    path = args.out / "results.md"
    text = results_text(manifest)
    if path.exists() and "moe_regime.py" not in path.read_text().split("\n", 1)[0]:
        raise StudyError(f"{path} exists and was not written by tools/moe_regime.py; move it away")
    path.write_text(text)
    print(text)
    return verify_shipped(args) if manifest["shipped"] else 0


def verify_shipped(args) -> int:
    """records.py verify's quick check (and probes) on the shipped folders. -> 1 if a check fails."""
    failed = [c for c in records.verify(args.out, token_limit=SHIPPED_CHECK_TOKENS) if c.status == "FAIL"]
    for check in failed:
        print(check, file=sys.stderr)
    say(
        f"shipped folders: {len(failed)} failed checks"
        if failed
        else f"shipped folders verified (quick check on {SHIPPED_CHECK_TOKENS} tokens, probes); the full "
        f"re-score: python3 -m tools.records verify {shown_folder(args.out)} --data {args.data}"
    )
    return 1 if failed else 0


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command", choices=("run", "collect"), help="run what is missing then collect; or collect only"
    )
    runner.add_common_arguments(parser)
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"of {', '.join(STAGES)}; run in that order"
    )
    parser.add_argument(
        "--budgets", default=",".join(map(str, BUDGETS)), help="tokens per parameter, of 10,30,100"
    )
    parser.add_argument("--script", type=Path, default=REPO / SCRIPT, help="the sweep's train_gpt.py")
    parser.add_argument("--design-script", type=Path, help="the train_gpt.py of the stages after the sweep")
    parser.add_argument(
        "--topk-time-ratio", type=float, help="dense ms/step over topk4 ms/step, measured alone"
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.script = args.script.resolve()
    args.design_script = args.design_script.resolve() if args.design_script else None
    return args


def study(args: argparse.Namespace) -> int:
    stages, common = plan(args)
    status = run_stages(args, stages) if args.command == "run" else 0
    if args.dry_run:
        return status
    return finalize(args, stages, common) or status


def main(argv: list[str] | None = None) -> int:
    return runner.main(parse_args(argv), study)


if __name__ == "__main__":
    sys.exit(main())
