"""The matched MoE-versus-dense study on CPU: every arm x seed run of train_gpt.py at one
small shape on the proxy corpus (not FineWeb), then one record folder with every log, the statistics,
a verdict, plots and a submission that `python3 -m tools.records verify` checks.

    sh ../shared/data/proxy_sp1024/prepare.sh /work/proxy          # the corpus, outside the repository
    python3 -m tools.studies.moe_study run --data /work/proxy \\
        --out records/track_non_record_16mb/2026-11-25_MoE_vs_Dense_Study --seeds 1337,1338,1339 --jobs 2
    python3 -m tools.studies.moe_study run ... --dry-run     # the runs it would start and skip
    python3 -m tools.studies.moe_study collect --data /work/proxy --out FOLDER   # the outputs, no run
    python3 -m tools.studies.moe_study speed ... --repeats 3  # ms/step of every arm alone -> speed.json

Resumable, one `run` at a time per folder, one script per folder: tools/studies/runner.py. Runs go seed by
seed, so an unfinished study has whole seeds. Each run is STUDY_SHAPE plus the arm's knobs. Outputs, written
from the logs at the end of `run` and by `collect` at any time (also while a `run` goes on):
manifest.json, README.md, findings_data.md, submission.json + the smallest artifact of the best
byte-matched arm, routing-analysis.png and expert-by-class.png (tools/routing/routing_analysis.py and
tools/routing/routing_report.py on the artifact of --plot-arm), routing/*.json and plots/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from tools import records, runlog
from tools.common import (
    MOE_PRESETS,
    NOT_BYTE_MATCHED,
    REPO,
    StudyError,
    cell,
    context_arm,
    format_table,
)
from tools.stats import mean_std, welch_both_ways
from tools.studies import proxy_study, runner
from tools.studies.runner import SCRIPT, pm, runs_dir, say

TAG = "study"


# ==== THE STUDY'S SHAPE: the one place to adjust (the coordinator sets it to the merged stack) ====
# The default stack scaled down until a run takes minutes on 2 CPU cores: ITERATIONS x TRAIN_BATCH_TOKENS
# = 256 x 8192 = 2.1M training tokens, one micro-batch per step, the wall clock off (equal optimizer
# steps for every arm, and every schedule the same fraction of the run), no periodic validation, the
# same first VAL_TOKEN_LIMIT validation tokens for every arm, plain round-trip windows (EVAL_STRIDE=0:
# sliding windows cost 4x on CPU), eager mode.
STUDY_SHAPE: dict[str, str] = {
    "VOCAB_SIZE": "1024",
    "NUM_LAYERS": "4",
    "MODEL_DIM": "128",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "4",
    "TRAIN_SEQ_LEN": "256",
    "TRAIN_BATCH_TOKENS": "8192",
    "MICRO_BATCH_TOKENS": "8192",
    "ITERATIONS": "256",
    "MAX_WALLCLOCK_SECONDS": "0",
    "WARMUP_STEPS": "0",
    "TRAIN_LOG_EVERY": "16",
    "VAL_LOSS_EVERY": "0",
    "VAL_TOKEN_LIMIT": "262144",
    "EVAL_STRIDE": "0",
    "COMPILE": "0",
    # The record stack scaled to 4 layers: XSA everywhere (11 of 11), parallel lanes in the last layer
    # (8.. of 11), the middle layers looped once more after 35% of the run (the record loops 3-5 twice
    # more; one extra pass keeps a CPU run within minutes). BigramHash stays off, as in the default.
    "XSA_LAST_N": "4",
    "PARALLEL_START_LAYER": "3",
    "NUM_LOOPS": "1",
    "LOOP_START": "1",
    "LOOP_END": "2",
    # Quantization (GPTQ int6 / int7 embedding + LQER + brotli) and evaluation (no test-time training)
    # are the defaults: the study measures what a user runs.
}
# The arms, in table order: tools/common.py's presets, the context arm at this shape.
ARM_NAMES = ("dense", "soft4", "topk4", "shared_routed", "topk4_nobalance", "topk4_4xbytes")
PLOT_ARM = "topk4"
ALPHA = 0.05  # one-sided Welch test level for "beats dense" and "worse than dense"
# "Equal bytes": parameter-matched by design (the routers add a little), and the mean artifact within 5% of
# dense's: the same parameters compress differently (a 16-step probe measured +2.5% to +6.9%); beyond 5%
# a win at the small scale may not survive the 16 MB cap, so it is not adopted.
PARAMS_TOLERANCE = 0.01
BYTES_TOLERANCE = 0.05
VERDICT_RULE = (
    f"adopt: a byte-matched MoE arm (soft4, topk4, shared_routed, topk4_nobalance; mean parameters "
    f"within {PARAMS_TOLERANCE:.0%} and mean artifact bytes within {BYTES_TOLERANCE:.0%} of dense's) "
    f"has a lower mean round-trip val_bpb than dense with "
    f"one-sided Welch p < {ALPHA}; never at this scale: every byte-matched MoE arm is worse than dense "
    f"with one-sided Welch p < {ALPHA}; defer: anything else (within noise, or too few seeds). A verdict "
    "holds only for the study's regime (its tokens per parameter, equal steps), not for longer runs. "
    f"The context arm ({', '.join(NOT_BYTE_MATCHED)}) is never a candidate: it breaks the byte cap's parity."
)
# The verdict when every MoE arm loses: a fact about the study's regime, not about MoE at any length.
NEVER = "never at this scale"
# The owner mark of the files collect writes (the name the tool had when the committed study was written:
# collect refuses to overwrite a file without it).
MARKER = "<!-- written by tools/moe_study.py from the logs in runs/; rerun `collect` to refresh -->"

# ---------------------------------------------------------------------------- planning


def shape_env(overrides: list[str]) -> dict[str, str]:
    env = dict(STUDY_SHAPE)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudyError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def arm_configs(names: list[str], shape: dict[str, str]) -> dict[str, dict[str, str]]:
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise StudyError(f"--arms: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARM_NAMES)}")
    if "dense" not in names:
        raise StudyError("--arms: the study compares against dense, so it must include dense")
    try:
        width, mult = int(shape["MODEL_DIM"]), float(shape["MLP_MULT"])
    except (KeyError, ValueError):
        raise StudyError("MODEL_DIM and MLP_MULT must be numbers (the context arm's expert size)") from None
    return {n: context_arm(width, mult) if n == "topk4_4xbytes" else dict(MOE_PRESETS[n]) for n in names}


def plan(args) -> tuple[list[proxy_study.Run], dict[str, dict[str, str]], dict[str, str]]:
    """The runs, seed by seed (so an interrupted study holds whole seeds), the arms and the common env."""
    corpus = runner.corpus_env(args)
    seeds = runner.parse_seeds("--seeds", args.seeds)
    more_seeds = runner.parse_seeds("--more-seeds", args.more_seeds) if args.more_seeds else []
    if set(seeds) & set(more_seeds):
        raise StudyError(f"--more-seeds {args.more_seeds!r}: seeds already in --seeds {args.seeds!r}")
    shape = shape_env(args.env)
    arms = arm_configs([a for a in args.arms.split(",") if a], shape)
    more_arms = [a for a in args.more_arms.split(",") if a] if more_seeds else []
    if more_seeds and ("dense" not in more_arms or not set(more_arms) <= set(arms)):
        raise StudyError(
            f"--more-arms {args.more_arms!r}: must name dense (the per-seed baseline) and arms of --arms"
        )
    common = {**corpus, **shape, "OMP_NUM_THREADS": "1"}
    runs = proxy_study.plan_runs(arms, seeds, common, TAG, runs_dir(args.out))
    runs += proxy_study.plan_runs(
        {a: arms[a] for a in more_arms}, more_seeds, common, TAG, runs_dir(args.out)
    )
    order = seeds + more_seeds
    runs.sort(key=lambda r: order.index(r.seed))  # stable: arms keep their order within a seed
    return runs, arms, common


# ---------------------------------------------------------------------------- running


def run_study(args, runs: list[proxy_study.Run]) -> int:
    """The plan's runs as one stage in the folder: finished ones skipped, the rest --jobs at a time."""
    return runner.run_stages(args, [runner.Stage("study", args.out, args.script, runs)])


# ---------------------------------------------------------------------------- statistics


def within(values: list, reference: list, tolerance: float) -> bool:
    """Whether the mean of values is within a relative tolerance of the mean of reference."""
    mean, ref = (
        mean_std([v for v in values if v is not None])[0],
        mean_std([v for v in reference if v is not None])[0],
    )
    return mean is not None and bool(ref) and abs(mean - ref) <= tolerance * ref


def decide(arms: dict[str, dict], tests: dict[str, dict]) -> tuple[str, str]:
    """The verdict by VERDICT_RULE, and why."""
    candidates = [a for a in arms if a != "dense" and a not in NOT_BYTE_MATCHED]
    if not candidates or "dense" not in arms or not arms["dense"]["val_bpb"]:
        return "defer", "no byte-matched MoE arm and dense both finished"

    def matched(arm: str) -> bool:
        return all(
            within(arms[arm][key], arms["dense"][key], tol)
            for key, tol in (("params", PARAMS_TOLERANCE), ("artifact_bytes", BYTES_TOLERANCE))
        )

    beat = [a for a in candidates if tests[a]["p_better"] is not None and tests[a]["p_better"] < ALPHA]
    wins = [a for a in beat if matched(a)]
    if wins:
        return "adopt", f"{', '.join(wins)} beat(s) dense at p < {ALPHA} with equal bytes"
    if beat:
        return (
            "defer",
            f"{', '.join(beat)} beat(s) dense at p < {ALPHA} but not at equal bytes (see the rule)",
        )
    if all(tests[a]["p_worse"] is not None and tests[a]["p_worse"] < ALPHA for a in candidates):
        return (
            NEVER,
            f"every byte-matched MoE arm ({', '.join(candidates)}) is worse than dense at p < {ALPHA}",
        )
    return (
        "defer",
        "no byte-matched MoE arm beats dense beyond noise, and not every one is worse beyond noise",
    )


# ---------------------------------------------------------------------------- collecting


METRICS = (
    ("val_bpb", "score"),
    ("pre_quant_val_bpb", "val_bpb_prequant"),
    ("ms_per_step", "ms_per_step"),
    ("artifact_bytes", "artifact_bytes"),
    ("total_bytes", "total_bytes"),
    ("params", "params"),
    ("active_params", "active_params"),
    ("steps", "steps"),
    ("dead_experts", "dead"),
    ("router_entropy", "entropy"),
    ("max_load", "max_load"),
)


def arm_results(name: str, env: dict[str, str], rows: list[dict], dense_ms: dict[int, float]) -> dict:
    """One arm of manifest.json: per-seed lists over its finished runs (seed order), means and stds."""
    ok = [r for r in rows if r["name"] == name and r["status"] == "ok"]
    result = dict(
        env=env,
        seeds=[r["seed"] for r in ok],
        runs=[r["run_id"] for r in ok],
        logs=[f"runs/{r['run_id']}.txt" for r in ok],
    )
    for key, source in METRICS:
        result[key] = [r.get(source) for r in ok]
    result["ms_per_step_ratio_to_dense"] = [
        r["ms_per_step"] / dense_ms[r["seed"]] if r.get("ms_per_step") and dense_ms.get(r["seed"]) else None
        for r in ok
    ]
    result["load_std_per_layer"] = [[layer["load_std"] for layer in r.get("routing", [])] for r in ok]
    result["load_std"] = [mean_std(v)[0] for v in result["load_std_per_layer"]]
    result["quant_gap"] = [
        None if a is None or b is None else a - b
        for a, b in zip(result["val_bpb"], result["pre_quant_val_bpb"])
    ]
    for key in (
        "val_bpb",
        "pre_quant_val_bpb",
        "quant_gap",
        "ms_per_step",
        "ms_per_step_ratio_to_dense",
        "artifact_bytes",
        "params",
        "load_std",
        "dead_experts",
        "router_entropy",
        "max_load",
    ):
        values = [v for v in result[key] if v is not None]
        result[f"{key}_mean"], result[f"{key}_std"] = mean_std(values)
    result["byte_matched"] = name not in NOT_BYTE_MATCHED
    return result


def failures(logs: Path) -> list[dict]:
    found = []
    for reason in sorted((logs / "failed").glob("*/reason.json")):
        try:
            entry = json.loads(reason.read_text())
        except (OSError, ValueError):
            entry = dict(reason="reason.json unreadable")
        found.append(dict(entry, files=f"runs/failed/{reason.parent.name}/"))
    return found


def build_manifest(args, runs, arms, common) -> dict:
    logs = runs_dir(args.out)
    rows = [proxy_study.collect(run, logs) for run in runs]
    dense_ms = {
        r["seed"]: r["ms_per_step"]
        for r in rows
        if r["name"] == "dense" and r["status"] == "ok" and r.get("ms_per_step")
    }
    first = {run.name: run for run in reversed(runs)}
    results = {name: arm_results(name, runner.arm_env(first[name]), rows, dense_ms) for name in arms}
    tests = {
        name: welch_both_ways(results["dense"]["val_bpb"], results[name]["val_bpb"])
        for name in arms
        if name != "dense"
    }
    verdict, why = decide(results, tests)
    dense_params = results["dense"]["params_mean"]
    shape = {k: v for k, v in common.items() if k not in ("DATA_PATH", "TOKENIZER_PATH", "OMP_NUM_THREADS")}
    tokens = int(shape["ITERATIONS"]) * int(shape["TRAIN_BATCH_TOKENS"])
    return dict(
        study="matched MoE vs dense MLP, CPU, proxy corpus (NOT FineWeb: val_bpb here is not comparable with "
        "challenge scores)",
        data=dict(
            path=common["DATA_PATH"],
            tokenizer=common["TOKENIZER_PATH"],
            corpus="proxy_sp1024",
            val_token_limit=int(shape.get("VAL_TOKEN_LIMIT", 0)),
            train_tokens_per_run=tokens,
            # every verdict holds for this regime only (the 16 MB record trains at about 108)
            tokens_per_param=tokens / dense_params if dense_params else None,
        ),
        shape=shape,
        seeds=sorted({r.seed for r in runs}),
        arms=results,
        p_values={name: t["p_better"] for name, t in tests.items()},
        welch=tests,
        verdict=verdict,
        verdict_reason=why,
        verdict_rule=VERDICT_RULE,
        alpha=ALPHA,
        planned_runs=len(runs),
        finished_runs=sum(r["status"] == "ok" for r in rows),
        missing_runs=[r["run_id"] for r in rows if r["status"] != "ok"],
        failed_attempts=runner.failures(logs),
        command=reproduce_command(args),
    )


def reproduce_command(args) -> str:
    seeds = args.seeds
    extra = "".join(f" --env {e}" for e in args.env) + (
        "" if args.arms == ",".join(ARM_NAMES) else f" --arms {args.arms}"
    )
    extra += f" --more-seeds {args.more_seeds} --more-arms {args.more_arms}" if args.more_seeds else ""
    out = os.path.relpath(args.out, REPO) if args.out.is_relative_to(REPO) else str(args.out)
    # The folder's own copy: the exact script of its logs, whatever train_gpt.py has become since.
    return (
        f"python3 -m tools.studies.moe_study run --data {args.data} --out {out} --seeds {seeds} --jobs "
        f"{args.jobs}{extra}"
        f" --script {out}/{SCRIPT}"
    )


# ---------------------------------------------------------------------------- the submission


def best_arm(manifest: dict) -> str | None:
    """The byte-matched arm with the lowest mean val_bpb (dense included), among arms with a finished run."""
    arms = {n: a for n, a in manifest["arms"].items() if a["byte_matched"] and a["val_bpb_mean"] is not None}
    return min(arms, key=lambda n: arms[n]["val_bpb_mean"]) if arms else None


def write_submission(args, manifest: dict) -> dict | None:
    """submission.json for the best arm, checked and built with tools.records' pack steps; its
    smallest artifact under the cap is copied in as model_seed<seed>.ptz. -> the submission, or None."""
    name = best_arm(manifest)
    if name is None:
        return None
    logs, arm = runs_dir(args.out), manifest["arms"][name]
    runs = [records.parse_log(args.out / log) for log in arm["logs"]]
    records.check_same_recipe(runs)
    records.check_scores(runs, records.TRACKS[1], allow_partial_eval=True)
    code_bytes = records.check_script(args.out / SCRIPT, runs)
    with_artifact = [(r, logs / f"{r.config['RUN_ID']}_model.ptz") for r in runs]
    with_artifact = [
        (r, a) for r, a in with_artifact if a.is_file() and r.artifact_bytes + code_bytes <= records.CAP_BYTES
    ]
    if not with_artifact:
        raise StudyError(
            f"arm {name}: no artifact under the cap in {logs} (artifacts are kept beside the logs)"
        )
    best, artifact = min(with_artifact, key=lambda ra: (ra[0].artifact_bytes, ra[0].seed))
    records.check_artifacts([best], [artifact], code_bytes, records.CAP_BYTES)
    module = records.load_script(args.out / SCRIPT)
    check = records.quick_check(
        module,
        best,
        artifact,
        check_data=manifest["data"]["path"],
        check_tokenizer=manifest["data"]["tokenizer"],
        check_tokens=min(16384, manifest["data"]["val_token_limit"] or 16384),
        batch_seqs=32,
    )
    for old in args.out.glob("model_seed*.ptz"):  # the previous best artifact, if the best arm changed
        old.unlink()
    shutil.copyfile(artifact, args.out / check["artifact"])
    results = {}
    for run, log in zip(runs, arm["logs"]):
        results[str(run.seed)] = dict(records.seed_result(run), log=log, arm=name)
        # The community's submission validator looks for the train logs at the folder's top level.
        shutil.copyfile(args.out / log, args.out / f"train_seed{run.seed}.txt")
    results[str(best.seed)]["artifact"] = check["artifact"]
    sub = records.build_submission(
        runs,
        results,
        best,
        code_bytes,
        check,
        author="moe_study",
        github_id="moe_study",
        name=args.out.name,
        blurb=f"MoE vs dense study: best byte-matched arm {name} (proxy corpus, not FineWeb)",
        date=time.strftime("%Y-%m-%d"),
        track=records.TRACKS[1],
        cap=records.CAP_BYTES,
    )
    sub.update(arm=name, study="manifest.json", not_fineweb=True)
    (args.out / records.SUBMISSION).write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    return sub


# ---------------------------------------------------------------------------- plots


def routing_plots(args, manifest: dict) -> list[dict]:
    """Routing of each routed/soft MoE arm's first finished artifact (tools/routing/routing_analysis.py),
    plotted with tools/routing/routing_report.py; --plot-arm's become routing-analysis.png and
    expert-by-class.png."""
    from tools.routing import routing_analysis, routing_report  # torch and train_gpt: loaded only here

    logs, shape, done = runs_dir(args.out), manifest["shape"], []
    (args.out / "routing").mkdir(exist_ok=True)
    (args.out / "plots").mkdir(exist_ok=True)
    for name, arm in manifest["arms"].items():
        artifacts = [logs / f"{run_id}_model.ptz" for run_id in arm["runs"]]
        artifacts = [a for a in artifacts if a.is_file()]
        if name == "dense" or not artifacts:
            continue
        run_id = artifacts[0].name.removesuffix("_model.ptz")
        report = routing_analysis.analyse_artifact(
            str(artifacts[0]),
            manifest["data"]["path"],
            manifest["data"]["tokenizer"],
            int(shape["VAL_TOKEN_LIMIT"]),
            batch_seqs=64,
            seq_len=int(shape["TRAIN_SEQ_LEN"]),
        )
        report["run_id"] = run_id
        (args.out / "routing" / f"{run_id}_routing.json").write_text(json.dumps(report, indent=1))
        routing_report.plot_load(report, args.out / "plots" / f"{name}-load.png")
        routing_report.plot_class_load(report, args.out / "plots" / f"{name}-by-class.png")
        done.append(dict(arm=name, run_id=run_id, report=report))
    chosen = next((d for d in done if d["arm"] == args.plot_arm), done[0] if done else None)
    if chosen:  # --plot-arm, else the first MoE arm that finished
        routing_report.plot_load(chosen["report"], args.out / "routing-analysis.png")
        routing_report.plot_class_load(chosen["report"], args.out / "expert-by-class.png")
        manifest["plot_arm"] = chosen["arm"]
    return done


# ---------------------------------------------------------------------------- README and findings data


def arms_table(manifest: dict) -> str:
    """Markdown: per arm mean ± std over seeds, the difference to dense and the Welch p-value."""
    dense = manifest["arms"].get("dense", {})
    rows = [
        "| arm | runs | val_bpb (round trip) | vs dense | p (beats dense) | pre-quant val_bpb | quant gap | "
        "ms/step | x dense | params | artifact bytes | x dense | load std | dead | entropy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in manifest["arms"].items():
        delta = (
            None
            if arm["val_bpb_mean"] is None or dense.get("val_bpb_mean") is None
            else arm["val_bpb_mean"] - dense["val_bpb_mean"]
        )
        p = manifest["p_values"].get(name)
        size_ratio = (
            None
            if not dense.get("artifact_bytes_mean") or arm["artifact_bytes_mean"] is None
            else arm["artifact_bytes_mean"] / dense["artifact_bytes_mean"]
        )
        rows.append(
            f"| {name}{'' if arm['byte_matched'] else ' (4x bytes)'} | {len(arm['seeds'])} | "
            f"{pm(arm, 'val_bpb')} | {'-' if delta is None else f'{delta:+.4f}'} | "
            f"{'-' if p is None else f'{p:.3g}'} | {pm(arm, 'pre_quant_val_bpb')} | {pm(arm, 'quant_gap')} | "
            f"{pm(arm, 'ms_per_step', 1)} | {pm(arm, 'ms_per_step_ratio_to_dense', 2)} | "
            f"{cell(arm['params_mean'], 0)} | {cell(arm['artifact_bytes_mean'], 0)} | "
            f"{cell(size_ratio, 3)} | "
            f"{pm(arm, 'load_std', 3)} | {cell(arm['dead_experts_mean'], 1)} | "
            f"{pm(arm, 'router_entropy', 3)} |"
        )
    return "\n".join(rows)


def runs_table(manifest: dict) -> str:
    header = [
        "run",
        "val_bpb",
        "prequant",
        "ms/step",
        "x dense",
        "params",
        "artifact",
        "maxload",
        "dead",
        "entropy",
        "load std per layer",
    ]
    body = []
    for arm in manifest["arms"].values():
        for i, run_id in enumerate(arm["runs"]):
            body.append(
                [
                    run_id,
                    cell(arm["val_bpb"][i]),
                    cell(arm["pre_quant_val_bpb"][i]),
                    cell(arm["ms_per_step"][i], 1),
                    cell(arm["ms_per_step_ratio_to_dense"][i], 2),
                    cell(arm["params"][i]),
                    cell(arm["artifact_bytes"][i]),
                    cell(arm["max_load"][i], 2),
                    cell(arm["dead_experts"][i]),
                    cell(arm["router_entropy"][i], 3),
                    ",".join(f"{v:.3f}" for v in arm["load_std_per_layer"][i]) or "-",
                ]
            )
    return format_table(header, body) if body else "(no finished run)"


def class_table(analysed: list[dict]) -> str:
    """Per analysed arm, layer and expert: its load share and the token classes it over-serves most
    (lift = the expert's share of a class's tokens / its share of all tokens)."""
    lines = []
    for entry in analysed:
        report = entry["report"]
        lines.append(
            f"\n{entry['arm']} ({entry['run_id']}, {report['tokens']} validation tokens; class sizes "
            + ", ".join(f"{c} {n}" for c, n in report["classes"].items())
            + ")\n"
        )
        header = ["layer", "expert", "load", "top class (lift)", "2nd class (lift)", "frequent/rare lift"]
        body = []
        for layer in report["layers"]:
            for e, share in enumerate(layer["load"]):
                lift = {c: v[e] / share for c, v in layer["class_load"].items() if share > 0}
                kinds = sorted((c for c in lift if c not in ("frequent", "rare")), key=lambda c: -lift[c])
                top = [f"{c} ({lift[c]:.2f})" for c in kinds[:2]] + ["-", "-"]
                body.append(
                    [
                        str(layer["layer"]),
                        str(e),
                        f"{share:.3f}",
                        top[0],
                        top[1],
                        f"{lift.get('frequent', math.nan):.2f}/{lift.get('rare', math.nan):.2f}",
                    ]
                )
        lines.append("```\n" + format_table(header, body) + "\n```")
    return "\n".join(lines) if lines else "(no MoE artifact analysed)"


def write_text(path: Path, text: str) -> None:
    """Writes a file this tool owns; a file of the same name that it did not write is never replaced."""
    if path.exists() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        raise StudyError(f"{path} exists and was not written by tools/studies/moe_study.py; move it away")
    path.write_text(text, encoding="utf-8")


def environment(folder: Path, manifest: dict) -> str:
    for arm in manifest["arms"].values():
        if arm["logs"]:
            log = runlog.read(folder / arm["logs"][0])
            return f"{log.device} ({log.device_name or 'CPU'}), torch {log.torch}, python {log.python}"
    return "(no finished run)"


def render_readme(args, manifest: dict, sub: dict | None) -> str:
    return readme_head(args, manifest) + readme_results(args, manifest, sub)


def readme_head(args, manifest: dict) -> str:
    """Title, the not-FineWeb warning, the verdict, what was run and the one command."""
    shape, data = manifest["shape"], manifest["data"]
    arms = "\n".join(
        f"| `{n}` | {' '.join(f'{k}={v}' for k, v in a['env'].items() if k not in shape)} |"
        for n, a in manifest["arms"].items()
    )
    return f"""{MARKER}
# MoE vs dense MLP: a matched study on CPU (proxy corpus, not FineWeb)

> **Not FineWeb.** Every number here is on the proxy corpus (`../shared/data/proxy_sp1024`: English web
> and Wikipedia text with its own 1,024-token tokenizer), on the first {data["val_token_limit"]:,} validation
> tokens, at a small shape on CPU. They compare the arms with each other; they are not challenge scores.

Does a Mixture-of-Experts MLP beat the dense MLP at equal artifact bytes? {len(manifest["arms"])} arms x seeds
{args.seeds.replace(",", ", ")}{more_seeds_text(args)}, each run the same data, steps, schedules and
evaluation.
**Verdict: {manifest["verdict"]}** ({manifest["verdict_reason"]}), {regime_text(manifest)}.
What this shows and what it does not: `findings.md`.

Rule: {manifest["verdict_rule"]}

## What was run

- Script: `train_gpt.py` in this folder (the one every log ran; `code_sha256` in each log).
- Machine: {environment(args.out, manifest)}; runs {args.jobs} at a time, one thread each, on a shared
  2-core machine, so ms/step is noisy and CPU ratios do not carry over to GPUs.
- Data: proxy corpus at `{data["path"]}`, {data["train_tokens_per_run"]:,} training tokens per run
  (ITERATIONS x TRAIN_BATCH_TOKENS), scored on the first {data["val_token_limit"]:,} validation tokens
  (`VAL_TOKEN_LIMIT`, the same for every arm) with plain windows (`EVAL_STRIDE=0`).
- Knobs of every run (the rest: train_gpt.py's defaults): `{" ".join(f"{k}={v}" for k, v in shape.items())}`
- Arms (experts parameter-matched to the dense MLP, except the context arm's, each as wide as the
  dense MLP: the dense model's active FLOPs with 4x its MLP bytes):

| arm | knobs |
|---|---|
{arms}

## Reproduce

```sh
sh ../shared/data/proxy_sp1024/prepare.sh {data["path"]}
{manifest["command"]}
```

The command runs this folder's `train_gpt.py`, the exact script of every log, and skips runs whose
logs in `runs/` are complete, so it also resumes an unfinished study. To rerun everything, give `--out`
a new folder and keep `--script` pointing here (the script is copied there).
`python3 -m tools.studies.moe_study collect` with the same options rebuilds these files from the logs.
"""


def more_seeds_text(args) -> str:
    if not args.more_seeds:
        return ""
    return (
        f", and seeds {args.more_seeds.replace(',', ', ')} for {', '.join(args.more_arms.split(','))} only, "
        "added after the planned runs had given `defer` (the spread over the first seeds hid the "
        "difference; a p-value on all seeds is then optimistic unless corrected for the look)"
    )


def tokens_per_param(manifest: dict) -> float | None:
    """Training tokens per run over dense's parameters (all of them, embedding included)."""
    params = manifest["arms"].get("dense", {}).get("params_mean")
    return manifest["data"]["train_tokens_per_run"] / params if params else None


def regime_text(manifest: dict) -> str:
    """The regime every verdict of the study is conditional on."""
    ratio = tokens_per_param(manifest)
    shown = f"{ratio:.1f} tokens per parameter" if ratio else "tokens per parameter unknown (no dense run)"
    return f"in this regime: {shown}, equal optimizer steps for every arm"


def readme_results(args, manifest: dict, sub: dict | None) -> str:
    """The results table, the plots and the files."""
    data = manifest["data"]
    submission = (
        f"`submission.json` describes the best byte-matched arm, **{sub['arm']}** (lowest mean "
        f"val_bpb), with its smallest artifact `{sub['verify_check']['artifact']}` "
        f"({sub['bytes_total']:,} bytes with the code, under the 16,000,000-byte cap)."
        if sub
        else "No submission yet: no finished run."
    )
    missing = (
        f"\n\nNot finished yet: {', '.join(manifest['missing_runs'])}." if manifest["missing_runs"] else ""
    )
    failed = (
        "\n\nFailed attempts (kept in `runs/failed/`): "
        + ", ".join(f"{f['run_id']} ({f['reason']})" for f in manifest["failed_attempts"])
        if manifest["failed_attempts"]
        else ""
    )
    folder = os.path.relpath(args.out, REPO) if args.out.is_relative_to(REPO) else args.out
    return f"""
## Results

val_bpb is the round-trip score of the artifact (quantized, compressed, read back); p is the one-sided
Welch test (tools/stats.py) of "the arm's mean val_bpb is lower than dense's"; ms/step x dense is per
seed against the dense run of the same seed; load std is the std of the expert load shares per layer at
the end of training (uniform = 0), dead the experts under 10% of the uniform share, summed over layers;
entropy the gate entropy / ln E. Means ± sample std over seeds.

{arms_table(manifest)}{missing}{failed}

Per run and per layer: `findings_data.md`; everything as JSON: `manifest.json`.
{speed_section(args)}
## Routing

`routing-analysis.png`: load share per expert per layer of the `{manifest["plot_arm"] or "(none yet)"}`
artifact on validation text (uniform, skewed or dead experts?). `expert-by-class.png`: the share of each
token class (word start,
continuation, digit, punctuation, byte fallback; frequent and rare tokens) each expert takes. `plots/` has
the same for every MoE arm, `routing/` the statistics (tools/routing/routing_analysis.py,
tools/routing/routing_report.py).

## Files

`runs/`: every run's text log and JSONL events (and its console output where that adds to the log;
artifacts stay out of git by `.gitignore`, except the one below); `manifest.json`; `findings_data.md`;
{submission}

```sh
python3 -m tools.records verify {folder} --data {data["path"]} --tokenizer {data["tokenizer"]}
```
"""


def speed_section(args) -> str:
    """The ms/step of `speed` (speed.json), when measured: the study's own ms/step ran 2 at a time."""
    path = args.out / SPEED_JSON
    if not path.is_file():
        return ""
    speed = json.loads(path.read_text())
    return f"""
## Speed, measured alone (CPU)

The ms/step above ran two at a time on a shared machine. This measured it again: {speed["method"]};
load average {speed["load_average_before_after"][0]:.2f} before,
{speed["load_average_before_after"][1]:.2f} after
(one run alone is 1). Runs in `{SPEED_DIR}/`, numbers in `{SPEED_JSON}`:

```sh
{speed["command"]}
```

```
{speed_table(speed)}
```
"""


def render_findings_data(manifest: dict, analysed: list[dict]) -> str:
    dense = manifest["arms"].get("dense", {})
    lines = [
        MARKER,
        "# Findings data (facts for findings.md; proxy corpus, not FineWeb)",
        "",
        f"Verdict by rule: **{manifest['verdict']}** ({manifest['verdict_reason']}), "
        f"{regime_text(manifest)}.",
        "",
        "## Per arm",
        "",
        arms_table(manifest),
        "",
        "## Welch tests against dense (one-sided, val_bpb)",
        "",
        "```",
        format_table(
            ["arm", "dense - arm", "t", "df", "p (arm better)", "p (arm worse)"],
            [
                [
                    n,
                    cell(t["improvement"], 5),
                    cell(t["t"], 3),
                    cell(t["df"], 2),
                    cell(t["p_better"]),
                    cell(t["p_worse"]),
                ]
                for n, t in manifest["welch"].items()
            ],
        ),
        "```",
        "",
        "## Parameters and bytes relative to dense",
        "",
        "```",
    ]
    body = []
    for name, arm in manifest["arms"].items():
        ratio = [
            None
            if not dense.get(f"{k}_mean") or arm[f"{k}_mean"] is None
            else arm[f"{k}_mean"] / dense[f"{k}_mean"]
            for k in ("params", "artifact_bytes")
        ]
        body.append(
            [
                name,
                cell(arm["params_mean"], 0),
                cell(ratio[0], 3),
                cell(arm["artifact_bytes_mean"], 0),
                cell(ratio[1], 3),
                cell(mean_std([v for v in arm["active_params"] if v])[0], 0),
            ]
        )
    lines += [
        format_table(
            ["arm", "params", "x dense", "artifact bytes", "x dense", "active matmul params/token"], body
        ),
        "```",
        "",
        "## Every run",
        "",
        "```",
        runs_table(manifest),
        "```",
        "",
        "## Expert x token class (lift > 1: the expert takes more than its share of that class)",
        "",
        class_table(analysed),
        "",
    ]
    if manifest["failed_attempts"]:
        lines += ["## Failed attempts", ""] + [
            f"- {f['run_id']}: {f['reason']} ({f['files']})" for f in manifest["failed_attempts"]
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- speed, measured alone


SPEED_DIR, SPEED_JSON = "speed", "speed.json"
SPEED_VAL_TOKENS = 16384  # the score of a speed run means nothing; a short evaluation keeps it quick


def measure_speed(args, arms: dict[str, dict[str, str]], common: dict[str, str]) -> int:
    """ms/step of every arm with nothing else of the study running: one run at a time, --speed-steps
    steps of the study's recipe (schedules are fractions of the run, so the loop switch comes at the same
    point), --repeats rounds in rotated arm order so a drift in the machine's load spreads over the arms;
    each arm's ratio to dense is taken within a round. -> exit status."""
    folder, script = args.out / SPEED_DIR, args.out / SCRIPT
    if folder.exists():
        raise StudyError(f"{folder} exists: move it away to measure again (logs are never overwritten)")
    if not script.is_file():
        raise StudyError(f"{script}: no such file (the study's script is copied there by its first run)")
    env = {**common, "ITERATIONS": str(args.speed_steps), "VAL_TOKEN_LIMIT": str(SPEED_VAL_TOKENS)}
    names, plan, rows = list(arms), [], []
    for r in range(1, args.repeats + 1):
        k = (r - 1) % len(names)
        plan += [
            (r, proxy_study.plan_runs({n: arms[n]}, [1337], env, f"speed_r{r}", folder)[0])
            for n in names[k:] + names[:k]
        ]
    if args.dry_run:
        for _, run in plan:
            say(proxy_study.shell_line(run, [args.python, str(script)]))
        return 0
    load = [os.getloadavg()[0]]
    for r, run in plan:
        row = runner.run_one(
            run, [args.python, str(script)], folder, args.timeout, f"[round {r}/{args.repeats}]"
        )
        rows.append(
            dict(
                round=r,
                arm=run.name,
                run_id=run.run_id,
                status=row["status"],
                ms_per_step=row.get("ms_per_step"),
            )
        )
    load.append(os.getloadavg()[0])
    result = speed_summary(rows, names, load, args.speed_steps)
    result["command"] = (
        reproduce_command(args).replace(" run ", " speed ", 1)
        + f" --speed-steps {args.speed_steps} --repeats {args.repeats}"
    )
    (args.out / SPEED_JSON).write_text(json.dumps(result, indent=1) + "\n")
    print(speed_table(result))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def speed_summary(rows: list[dict], names: list[str], load: list[float], steps: int) -> dict:
    dense = {r["round"]: r["ms_per_step"] for r in rows if r["arm"] == "dense" and r["ms_per_step"]}
    arms = {}
    for name in names:
        mine = [r for r in rows if r["arm"] == name and r["ms_per_step"]]
        ms = [r["ms_per_step"] for r in mine]
        ratio = [r["ms_per_step"] / dense[r["round"]] for r in mine if r["round"] in dense]
        (ms_mean, ms_std), (ratio_mean, ratio_std) = mean_std(ms), mean_std(ratio)
        arms[name] = dict(
            ms_per_step=ms,
            ratio_to_dense=ratio,
            ms_per_step_mean=ms_mean,
            ms_per_step_std=ms_std,
            ratio_mean=ratio_mean,
            ratio_std=ratio_std,
        )
    return dict(
        method=f"one run at a time, {steps} steps each, rounds in rotated arm order, ratio to dense "
        "within a round; CPU (does not carry over to GPUs)",
        load_average_before_after=load,
        runs=rows,
        arms=arms,
    )


def speed_table(speed: dict) -> str:
    header = ["arm", "runs", "ms/step", "x dense"]
    return format_table(
        header,
        [
            [
                n,
                str(len(a["ms_per_step"])),
                f"{cell(a['ms_per_step_mean'], 1)} ± {cell(a['ms_per_step_std'], 1)}",
                f"{cell(a['ratio_mean'], 3)} ± {cell(a['ratio_std'], 3)}",
            ]
            for n, a in speed["arms"].items()
        ],
    )


# ---------------------------------------------------------------------------- entry point


def finalize(args, runs, arms, common) -> int:
    """Every output from the logs in runs/; then records.py verify on the folder. -> exit status."""
    manifest = build_manifest(args, runs, arms, common)
    folder = args.out
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text(
        "# artifacts stay out of git, except the submission's "
        "model_seed*.ptz\nruns/*.ptz\nruns/.lock\nspeed/*.ptz\n"
    )
    sub = write_submission(args, manifest) if (folder / SCRIPT).is_file() else None
    manifest["best_arm"] = sub["arm"] if sub else None
    manifest["plot_arm"] = None
    analysed = routing_plots(args, manifest) if not args.no_plots else []
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    write_text(folder / "README.md", render_readme(args, manifest, sub))
    write_text(folder / "findings_data.md", render_findings_data(manifest, analysed))
    print(arms_table(manifest))
    print(f"\nverdict: {manifest['verdict']} ({manifest['verdict_reason']})")
    if sub is None:
        return 1
    checks = records.verify(folder)
    bad = [c for c in checks if c.status == "FAIL"]
    print(
        f"records.py verify {folder}: " + ("PASSED" if not bad else "FAILED\n  " + "\n  ".join(map(str, bad)))
    )
    return 1 if bad else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=("run", "collect", "speed"),
        help="run: run what is missing, then collect; collect: only rebuild the outputs from the "
        "logs; speed: ms/step of every arm measured alone (speed.json), then collect",
    )
    runner.add_common_arguments(parser)
    parser.add_argument(
        "--arms", default=",".join(ARM_NAMES), help=f"comma-separated, of {', '.join(ARM_NAMES)}"
    )
    parser.add_argument(
        "--more-seeds",
        default="",
        help="extra seeds for --more-arms only, where the spread over --seeds hides a difference",
    )
    parser.add_argument(
        "--more-arms", default="dense,soft4", help="the arms of --more-seeds; must include dense"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a STUDY_SHAPE knob for every run (tests, what-ifs)",
    )
    parser.add_argument("--script", type=Path, default=REPO / SCRIPT, help="the train_gpt.py to copy and run")
    parser.add_argument(
        "--plot-arm", default=PLOT_ARM, help="the arm of routing-analysis.png and expert-by-class.png"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the routing analysis and plots")
    parser.add_argument("--speed-steps", type=int, default=32, help="speed: optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="speed: rounds over the arms")
    args = parser.parse_args(argv)
    args.out, args.script = args.out.resolve(), args.script.resolve()
    return args


def study(args: argparse.Namespace) -> int:
    runs, arms, common = plan(args)
    if args.command == "speed" and (args.speed_steps < 1 or args.repeats < 1):
        raise StudyError("--speed-steps and --repeats must be at least 1")
    status = 0  # collect runs nothing
    if args.command == "run":
        status = run_study(args, runs)
    elif args.command == "speed":
        status = measure_speed(args, arms, common)
    if args.dry_run:
        return status
    summary = finalize(args, runs, arms, common)
    # speed's result is speed.json: a folder without finished study runs has no summary to pass
    return status if args.command == "speed" else summary or status


def main(argv: list[str] | None = None) -> int:
    return runner.main(parse_args(argv), study)


if __name__ == "__main__":
    sys.exit(main())
