"""The break-even study (CPU, proxy corpus, not FineWeb): top-1-of-4 MoE (topk4) trained for 1.25x, 1.44x and
1.6x dense's steps on the regime study's design-stage script, shape, corpus and seeds, to find the step-time
ratio (topk4 ms/step over dense ms/step) below which topk4 beats dense at equal wall clock.

    sh ../shared/data/proxy_sp1024/prepare.sh /tmp/proxy          # the corpus, outside the repository
    python3 -m tools.studies.moe_breakeven run --data /tmp/proxy \\
        --out records/track_non_record_16mb/2026-12-07_MoE_BreakEven_Study
    python3 -m tools.studies.moe_breakeven run ... --dry-run      # the runs it would start
    python3 -m tools.studies.moe_breakeven collect --data /tmp/proxy --out FOLDER  # manifest, results, plot

The plan (plan.md in the folder, committed before the first run) fixes the arms, seeds and rules. Dense and
topk4 at 1.0848x (the regime study's `topk4_equal_time`) are not rerun: their logs are read from the regime
study's design stage (--regime), whose script this folder's copy must equal byte for byte. Resumable like
the regime study: a finished run is skipped, an interrupted one set aside in runs/failed/ and run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from tools.common import MOE_PRESETS, REPO, StudyError, sha256_file
from tools.stats import holm, inverse_prediction, line_fit, mean_difference, mean_std
from tools.studies import moe_regime, proxy_study, runner
from tools.studies.runner import SCRIPT, pval, runs_dir, say, signed

TAG = "breakeven"
REGIME = REPO / "records/track_non_record_16mb/2026-12-03_MoE_Regime_Study"
REGIME_STAGE = (
    "designs"  # the regime study's stage whose script, dense and topk4_equal_time this study reuses
)
DENSE_RUN = "regime_dense_tpp100_s{seed}"
EQUAL_TIME_RUN = "regime_topk4_equal_time_tpp100_s{seed}"
DENSE_STEPS = 2464  # 100 tokens per dense parameter at the regime shape (the design stage's budget.json)
MULTIPLES = {"topk4_m125": 1.25, "topk4_m144": 1.44, "topk4_m160": 1.6}
# the step multiples at which a kernel that turned the whole FLOP saving into steps would run topk4
FLOP_CEILINGS = {"3 x 64": 1 / 0.69, "11 x 512": 1 / 0.63}
STUDY_SHAPE = "3 x 64"
ALPHA = 0.05
PLOT = "gap-vs-step-multiple.png"


def steps_for(multiple: float) -> int:
    return round(DENSE_STEPS * multiple)


# ---------------------------------------------------------------------------- planning and running


def common_env(args) -> dict[str, str]:
    return {**runner.corpus_env(args), **moe_regime.REGIME_SHAPE, "OMP_NUM_THREADS": "1"}


def regime_script(args) -> Path:
    """The regime design stage's script: this study's runs must be byte-identical to its dense runs'."""
    script = args.regime / REGIME_STAGE / SCRIPT
    budget = args.regime / REGIME_STAGE / moe_regime.BUDGET_JSON
    if not script.is_file() or not budget.is_file():
        raise StudyError(f"--regime {args.regime}: no {REGIME_STAGE}/{SCRIPT} and budget.json there")
    info = json.loads(budget.read_text())
    if info["iterations"]["100"] != DENSE_STEPS or info["script_sha256"] != sha256_file(script):
        raise StudyError(f"{budget}: not the budget this plan was written for ({DENSE_STEPS} dense steps)")
    return script


def planned_runs(args, common: dict[str, str]) -> list[proxy_study.Run]:
    """Seed by seed, the multiples ascending within a seed (plan.md's order)."""
    seeds = runner.parse_seeds("--seeds", args.seeds)
    configs = {arm: {**MOE_PRESETS["topk4"], "ITERATIONS": str(steps_for(m))} for arm, m in MULTIPLES.items()}
    runs = proxy_study.plan_runs(configs, seeds, common, TAG, runs_dir(args.out))
    order = list(MULTIPLES)
    return sorted(runs, key=lambda r: (seeds.index(r.seed), order.index(r.name)))


def run(args, runs: list[proxy_study.Run], script: Path) -> int:
    """The plan's runs as one stage in the folder, on its copy of the regime design stage's script."""
    stage = runner.Stage("breakeven", args.out, script, runs)
    return runner.run_stages(args, [stage], moe_regime.GITIGNORE)


# ---------------------------------------------------------------------------- the runs' results


def arm_runs(name: str, run_id: str, seeds: list[int]) -> list[proxy_study.Run]:
    return [proxy_study.Run(name, seed, run_id.format(seed=seed), {}) for seed in seeds]


def arm_rows(runs: list[proxy_study.Run], logs: Path, steps: int) -> dict:
    """One arm's finished runs: scores, quant gaps, bytes, and the step multiple."""
    rows = [proxy_study.collect(r, logs) for r in runs]
    ok = [r for r in rows if r["status"] == "ok"]
    wrong = [r["run_id"] for r in ok if r.get("steps") != steps]
    if wrong:
        raise StudyError(f"{', '.join(wrong)}: not {steps} steps, as the plan says")
    return dict(
        steps=steps,
        multiple=steps / DENSE_STEPS,
        seeds=[r["seed"] for r in ok],
        logs=[str((logs / f"{r['run_id']}.txt").relative_to(REPO)) for r in ok],
        val_bpb=[r["score"] for r in ok],
        pre_quant_val_bpb=[r["val_bpb_prequant"] for r in ok],
        quant_gap=[r["score"] - r["val_bpb_prequant"] for r in ok],
        artifact_bytes=[r["artifact_bytes"] for r in ok],
        missing=[r["run_id"] for r in rows if r["status"] != "ok"],
    )


def all_arms(args, seeds: list[int]) -> dict[str, dict]:
    regime_logs = runs_dir(args.regime / REGIME_STAGE)
    equal_time_steps = round(DENSE_STEPS * 1.085)  # the regime study's measured CPU time ratio
    arms = {
        "dense": arm_rows(arm_runs("dense_tpp100", DENSE_RUN, seeds), regime_logs, DENSE_STEPS),
        "topk4_equal_time": arm_rows(
            arm_runs("topk4_equal_time_tpp100", EQUAL_TIME_RUN, seeds), regime_logs, equal_time_steps
        ),
    }
    logs = runs_dir(args.out)
    for arm, multiple in MULTIPLES.items():
        arms[arm] = arm_rows(arm_runs(arm, f"{TAG}_{arm}_s{{seed}}", seeds), logs, steps_for(multiple))
    return arms


# ---------------------------------------------------------------------------- statistics


def slope_interval(x: list[float], y: list[float]) -> dict:
    """The slope of y on x with its 95% t interval (n - 2 degrees of freedom), and its sign's reading."""
    if len(x) < 3 or len(set(x)) < 2:
        return dict(slope=None, ci=None, reading="too few runs")
    fit = line_fit(x, y)
    ci = fit.slope_interval(ALPHA)
    reading = "shrinks" if ci[1] < 0 else "grows" if ci[0] > 0 else "holds"
    return dict(slope=fit.slope, ci=ci, reading=reading, df=fit.df)


def break_even(points: list[tuple[float, float]], dense: list[float]) -> dict:
    """plan.md's estimator: the multiple m* where the OLS line of topk4's val_bpb on ln(m) meets dense's mean,
    with its 95% inverse-prediction (Fieller) interval; the residual variance pooled with dense's."""
    x = [math.log(m) for m, _ in points]
    fit = line_fit(x, [v for _, v in points])
    dense_mean = float(np.mean(dense))
    dense_ss = float(((np.asarray(dense) - dense_mean) ** 2).sum())
    df = fit.df + len(dense) - 1
    s2 = (fit.rss + dense_ss) / df
    gap_line = dataclasses.replace(fit, intercept=fit.intercept - dense_mean)  # topk4 minus dense's mean
    a, b = gap_line.intercept, gap_line.slope
    crossing, bounds = inverse_prediction(gap_line, ALPHA, s2, df, len(dense))
    point = math.exp(crossing) if b < 0 else None
    # bounded only where the slope is below 0 at the 95% level
    interval = [math.exp(v) for v in bounds] if bounds is not None and b < 0 else None
    return dict(
        multiple=point,
        interval=interval,
        step_time_ratio=1 / point if point else None,
        step_time_ratio_interval=[1 / interval[1], 1 / interval[0]] if interval else None,
        slope_per_ln_multiple=b,
        intercept_minus_dense=a,
        pooled_sd=math.sqrt(s2),
        df=df,
        tested=[min(m for m, _ in points), max(m for m, _ in points)],
    )


def break_even_reading(estimate: dict) -> str:
    ceiling = FLOP_CEILINGS[STUDY_SHAPE]
    interval = estimate["interval"]
    if interval is None:
        return "not located at 3 seeds (the interval is unbounded)"
    if interval[0] > ceiling:
        return (
            "at this shape, even a kernel that turned the whole FLOP saving into steps "
            f"(x{ceiling:.2f}) would not make topk4 beat dense at equal wall clock"
        )
    if interval[1] <= ceiling:
        return (
            f"a kernel at or below {1 / interval[1]:.3f}x dense's step time makes topk4 beat dense at equal "
            "wall clock"
        )
    return "not located at 3 seeds (the interval straddles the FLOP ceiling)"


def analyse(arms: dict[str, dict]) -> dict:
    """Every number plan.md's rules need, and the verdicts, from the arms' runs."""
    dense = arms["dense"]
    topk = {k: v for k, v in arms.items() if k != "dense"}
    gaps = {arm: mean_difference(entry["val_bpb"], dense["val_bpb"]) for arm, entry in topk.items()}
    adjusted = holm({arm: gaps[arm]["p_better"] for arm in MULTIPLES})
    for arm in MULTIPLES:
        gaps[arm]["p_better_holm"] = adjusted[arm]
    for entry in arms.values():
        entry["bytes_vs_dense"] = (
            mean_std(entry["artifact_bytes"])[0] / mean_std(dense["artifact_bytes"])[0]
            if entry["artifact_bytes"] and dense["artifact_bytes"]
            else None
        )
    x = [math.log(e["multiple"]) for e in topk.values() for _ in e["val_bpb"]]  # one per topk4 run
    complete = all(not e["missing"] for e in arms.values())
    result = dict(complete=complete, gaps=gaps, runs=len(x))
    if len(set(x)) >= 2 and len(dense["val_bpb"]) >= 2:
        points = [(e["multiple"], v) for e in topk.values() for v in e["val_bpb"]]
        result["break_even"] = break_even(points, dense["val_bpb"])
        result["break_even"]["reading"] = break_even_reading(result["break_even"])
        result["pre_quant_fit"] = slope_interval(
            x, [v for e in topk.values() for v in e["pre_quant_val_bpb"]]
        )
        result["quant_gap_fit"] = slope_interval(x, [v for e in topk.values() for v in e["quant_gap"]])
    return result


# ---------------------------------------------------------------------------- outputs


def results_text(manifest: dict) -> str:
    arms, result = manifest["arms"], manifest["results"]
    dense = arms["dense"]
    lines = [
        "# Results: the break-even step multiple of topk4 against dense (CPU, proxy corpus, not FineWeb)",
        "",
        f"Written by `{manifest['command']}` from the runs' logs; the rules are plan.md's. Shape 3 x 64, 100 "
        "tokens per dense parameter for dense, equal steps' schedules as fractions of each run.",
        "",
        "Round-trip val_bpb on the first 262,144 proxy validation tokens, mean ± std over seeds; gap = arm "
        "minus dense ± s.e.; p = one-sided Welch that the arm is better (Holm over the three new multiples).",
        "",
        "| arm | steps | multiple | seeds | val_bpb | gap | p better | Holm p | quant gap | bytes vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in arms.items():
        mean, std = mean_std(entry["val_bpb"])
        gap = result["gaps"].get(name, {})
        qmean = mean_std(entry["quant_gap"])[0]
        score = "-" if mean is None else f"{mean:.4f} ± {std or 0:.4f}"
        gap_text = "-" if gap.get("gap") is None else f"{gap['gap']:+.4f} ± {gap['se']:.4f}"
        ratio = entry["bytes_vs_dense"]
        lines.append(
            f"| {name} | {entry['steps']} | {entry['multiple']:.4f} | {len(entry['seeds'])} | {score} | "
            f"{gap_text} | {pval(gap.get('p_better'))} | {pval(gap.get('p_better_holm'))} | "
            f"{signed(qmean)} | {'-' if ratio is None else f'{ratio:.3f}'} |"
        )
    missing = [run for entry in arms.values() for run in entry["missing"]]
    lines += ["", f"Dense: the regime study's design-stage runs ({len(dense['seeds'])} seeds), not rerun."]
    if missing:
        lines += [
            "",
            f"**Incomplete**: {len(missing)} planned runs missing ({', '.join(missing)}); verdicts wait.",
        ]
    estimate = result.get("break_even")
    if estimate:
        interval = estimate["interval"]
        shown = "unbounded" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
        point = "-" if estimate["multiple"] is None else f"{estimate['multiple']:.3f}"
        ratio = estimate["step_time_ratio"]
        ratio_interval = estimate["step_time_ratio_interval"]
        lines += [
            "",
            "## Break-even",
            "",
            f"- Fit over {result['runs']} topk4 runs: val_bpb = dense mean "
            f"{signed(estimate['intercept_minus_dense'])}"
            f" {signed(estimate['slope_per_ln_multiple'])} x ln(m); pooled s.d. {estimate['pooled_sd']:.4f} "
            f"({estimate['df']} d.f.).",
            f"- Break-even multiple m* = {point}, 95% interval {shown} (tested {estimate['tested'][0]:.3f}-"
            f"{estimate['tested'][1]:.3f}; outside that range an extrapolation).",
            f"- Break-even step-time ratio r* = 1/m* = {'-' if ratio is None else f'{ratio:.3f}'}"
            + ("" if ratio_interval is None else f", 95% [{ratio_interval[0]:.3f}, {ratio_interval[1]:.3f}]")
            + ": topk4 ms/step over dense ms/step must be below it.",
            "- FLOP ceilings (the multiple a kernel turning the whole FLOP saving into steps reaches): "
            + ", ".join(f"{shape} x{value:.2f}" for shape, value in FLOP_CEILINGS.items())
            + ".",
            f"- **Verdict** ({'final' if result['complete'] else 'interim, not a verdict'}): "
            f"{estimate['reading']}.",
        ]
        quant, pre = result["quant_gap_fit"], result["pre_quant_fit"]
        if quant["slope"] is not None:
            dense_q = mean_std(dense["quant_gap"])
            lines += [
                f"- Quant gap vs ln(m): slope {signed(quant['slope'])}, 95% [{signed(quant['ci'][0])}, "
                f"{signed(quant['ci'][1])}] ({quant['df']} d.f.): more training **{quant['reading']}** the "
                f"routed model's quant gap (dense's: {signed(dense_q[0])} ± {dense_q[1] or 0:.4f}).",
                f"- Pre-quant val_bpb vs ln(m) (secondary): slope {signed(pre['slope'])}, 95% "
                f"[{signed(pre['ci'][0])}, {signed(pre['ci'][1])}].",
            ]
    lines += ["", f"![gap against step multiple]({PLOT})", ""]
    return "\n".join(lines)


def gap_plot(manifest: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, result = manifest["arms"], manifest["results"]
    shown = [(e["multiple"], result["gaps"][n]) for n, e in arms.items() if n != "dense"]
    shown = [(m, g) for m, g in shown if g.get("gap") is not None]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(
        [m for m, _ in shown],
        [g["gap"] for _, g in shown],
        [g["se"] for _, g in shown],
        fmt="o",
        capsize=3,
        label="topk4 minus dense (± s.e.)",
    )
    ax.axhline(0, color="black", lw=0.8)
    estimate = result.get("break_even")
    if estimate:
        xs = np.geomspace(1.0, 2.0, 50)
        line = estimate["intercept_minus_dense"] + estimate["slope_per_ln_multiple"] * np.log(xs)
        ax.plot(xs, line, color="tab:blue", lw=1, label="fit over runs")
        if estimate["interval"]:
            ax.axvspan(*estimate["interval"], color="tab:blue", alpha=0.12, label="95% interval of m*")
    for (shape, value), style in zip(FLOP_CEILINGS.items(), ("--", ":")):
        ax.axvline(value, color="tab:red", ls=style, lw=1, label=f"FLOP ceiling {shape} (x{value:.2f})")
    ax.set_xscale("log")
    ticks = [1.0, *MULTIPLES.values(), 2.0]  # plain multiples, not a log axis's powers of ten
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("topk4 steps / dense steps (log)")
    ax.set_ylabel("round-trip val_bpb gap (proxy, CPU)")
    ax.set_title("Top-1-of-4 MoE vs dense at 3 x 64: gap against step multiple", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def collect(args) -> int:
    seeds = runner.parse_seeds("--seeds", args.seeds)
    arms = all_arms(args, seeds)
    command = "python3 -m tools.studies.moe_breakeven collect"
    if args.out.is_relative_to(REPO):
        command += f" --data {args.data} --out {args.out.relative_to(REPO)}"
    manifest = dict(
        study="break-even step multiple of topk4 vs dense",
        data="proxy corpus (not FineWeb)",
        shape=moe_regime.REGIME_SHAPE,
        seeds=seeds,
        dense_steps=DENSE_STEPS,
        command=command,
        arms=arms,
    )
    manifest["results"] = analyse(arms)
    manifest["plot"] = PLOT if gap_plot(manifest, args.out / PLOT) else None
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (args.out / "results.md").write_text(results_text(manifest))
    top_level(args.out, arms["dense"])
    say(f"wrote {args.out / 'results.md'}")
    return 0


# submission.json's written_by: the owner mark the committed folder holds (collect overwrites only its own)
TOP_LEVEL_WRITER = "tools/moe_breakeven.py collect"


def top_level(out: Path, dense: dict) -> list[Path]:
    """The validator's view of the folder: the dense control's runs (the regime study's, on this folder's
    script) and a submission.json naming the study; no claim of a new score."""
    if dense["missing"]:
        return []
    blurb = (
        "Break-even study of top-1-of-4 MoE against dense (CPU, proxy corpus, not FineWeb): the top level "
        "holds the dense control's runs (the regime study's design stage, this folder's script, 100 tokens "
        "per parameter); the study is in plan.md, results.md and manifest.json"
    )
    logs = [REPO / log for log in dense["logs"]]
    token_limit = int(moe_regime.REGIME_SHAPE["VAL_TOKEN_LIMIT"])
    return runner.write_top_level(out, dense["seeds"], logs, blurb, TOP_LEVEL_WRITER, token_limit)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("run", "collect"), help="run what is missing then collect")
    runner.add_common_arguments(parser)
    parser.add_argument(
        "--regime", type=Path, default=REGIME, help="the regime study's folder (dense's runs)"
    )
    args = parser.parse_args(argv)
    args.out, args.regime = args.out.resolve(), args.regime.resolve()
    return args


def study(args: argparse.Namespace) -> int:
    common = common_env(args)
    script = regime_script(args)
    status = run(args, planned_runs(args, common), script) if args.command == "run" else 0
    if args.dry_run:
        return status
    return collect(args) or status


def main(argv: list[str] | None = None) -> int:
    return runner.main(parse_args(argv), study)


if __name__ == "__main__":
    sys.exit(main())
