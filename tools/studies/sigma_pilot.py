"""The sigma-MoE GPU pilot: dense against the SIGMA_MOE preset at the real width, in one call of ~8 minutes.
The plan and its decision rule: records/track_non_record_16mb/2026-12-07_SigmaMoE_GPU_Pilot/plan.md.

    sh tools/studies/sigma_pilot.sh          # on the GPU machine (wheel, proxy corpus); results to $OUT
    python3 -m tools.studies.sigma_pilot --out DIR --data-path /tmp/proxy
    python3 -m tools.studies.sigma_pilot --dry             # the plan, no work
    python3 -m tools.studies.sigma_pilot --cpu --out DIR   # the whole pilot at a tiny shape on the CPU

Three runs of train_gpt.py, one after another, one seed:
 1. dense_time: dense for --seconds of training (the wall clock, after the untimed compile warm-up);
 2. sigma_time: the SIGMA_MOE preset for the same time: equal wall clock with 1;
 3. equal tokens: the arm that made fewer steps in 1-2 runs again, to the other's step count (ITERATIONS),
    its wall clock capped by what the budget has left (marked when it stopped short of the count).
Writes DIR/sigma_pilot.json (everything, with the knobs and the device) and DIR/sigma_pilot.md (the
table and the verdicts, also printed last); the runs' logs under DIR/logs/, artifacts in /tmp.
Exit status 0 only when every run gave a round-trip score.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tools import runlog
from tools.common import MOE_PRESETS, REPO, SIGMA_MOE

ARMS = {"dense": MOE_PRESETS["dense"], "sigma": SIGMA_MOE}
# Settings both arms share (the schedules are fractions of the run, so a capped run is a miniature).
COMMON = {
    "VOCAB_SIZE": "1024",
    "NUM_LOOPS": "0",
    "PARALLEL_START_LAYER": "0",
    "VAL_LOSS_EVERY": "0",
    "EVAL_STRIDE": "0",
    "COMPRESSOR": "zstd",
    "ZSTD_LEVEL": "3",
    "SEED": "1337",
    "ITERATIONS": "1000000",  # the wall clock stops the time-matched runs
}
# The real width (512, MLP 2048: sigma's 16 experts of 128) at 2 layers, one GPU's micro-batch per step.
GPU = {
    "env": {"NUM_LAYERS": "2", "TRAIN_BATCH_TOKENS": "98304", "MICRO_BATCH_TOKENS": "98304"},
    "seconds": 60.0,
    "reserve": 5.0,  # GPTQ_RESERVE_SECONDS (the default): calibration time inside MAX_WALLCLOCK_SECONDS
    "budget": 470.0,
}
# A tiny shape for the rehearsal: 16 experts of 16 (the mechanics, not the recipe's width).
CPU = {
    "env": {
        "NUM_LAYERS": "2",
        "MODEL_DIM": "64",
        "NUM_HEADS": "4",
        "NUM_KV_HEADS": "2",
        "TRAIN_SEQ_LEN": "128",
        "TRAIN_BATCH_TOKENS": "1024",
        "MICRO_BATCH_TOKENS": "1024",
        "VAL_TOKEN_LIMIT": "8192",
        "WARMUP_STEPS": "1",
        "GPTQ_CALIBRATION_BATCHES": "2",
        "TRAIN_LOG_EVERY": "5",
        "COMPILE": "0",
    },
    "seconds": 4.0,
    "reserve": 1.0,
    "budget": 600.0,
}
# One seed's difference of two runs, pre-registered in plan.md: beyond this it is called a lead or a loss.
DECISION_BPB = 0.010
PARAMS = re.compile(r"^params total:(\d+)", re.M)
MOE_LINE = re.compile(r"^moe layer:.*$", re.M)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def settings(cpu: bool) -> dict:
    return CPU if cpu else GPU


def run_env(arm: str, cpu: bool, seconds: float, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The knobs of one run: shared settings, the shape, the arm's preset, the wall clock."""
    s = settings(cpu)
    wallclock = {
        "MAX_WALLCLOCK_SECONDS": f"{seconds + s['reserve']:g}",
        "GPTQ_RESERVE_SECONDS": f"{s['reserve']:g}",
    }
    return {**COMMON, **s["env"], **ARMS[arm], **wallclock, **(extra or {})}


def train(
    name: str, arm: str, env: dict[str, str], data: str, tokenizer: str, out: Path, timeout: float
) -> dict:
    """One train_gpt.py run -> its row: the score, pre-quant score, steps, time, parameters, routing lines."""
    run_id = f"sigma_pilot_{name}"
    full = {**os.environ, **env, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "RUN_ID": run_id}
    full.update(LOG_DIR=str(out / "logs"), ARTIFACT_PATH=f"/tmp/{run_id}_{os.getpid()}.ptz")
    row = dict(name=name, arm=arm, knobs=env)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "train_gpt.py")],
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {
            **row,
            "ok": False,
            "error": f"timed out after {timeout:.0f}s",
            "seconds": time.monotonic() - t0,
        }
    row.update(returncode=proc.returncode, seconds=time.monotonic() - t0)
    log = out / "logs" / f"{run_id}.txt"
    if not log.exists():
        return {**row, "ok": False, "error": proc.stderr[-2000:]}
    summary = runlog.read(log).summary()
    text = log.read_text()
    params = PARAMS.search(text)
    row.update(
        val_bpb=summary["final_val_bpb"],
        pre_quant_val_bpb=summary["pre_quant_val_bpb"],
        steps=summary["steps"],
        step_avg_ms=summary["step_avg_ms"],
        train_time_ms=summary["train_time_ms"],
        artifact_bytes=summary["artifact_bytes"],
        params=int(params[1]) if params else None,
        routing=MOE_LINE.findall(text)[-2 * int(env["NUM_LAYERS"]) :],
    )
    row["tokens_per_param"] = (
        row["steps"] * int(env["TRAIN_BATCH_TOKENS"]) / row["params"]
        if row["steps"] and row["params"]
        else None
    )
    row["ok"] = proc.returncode == 0 and row["val_bpb"] is not None
    if not row["ok"]:
        row["error"] = proc.stderr[-2000:]
    return row


def equal_tokens_run(rows: dict[str, dict], budget: Budget) -> tuple[str, dict] | None:
    """The arm that made fewer steps at equal time, again, to the other's step count; None if they tie."""
    fewer = min(ARMS, key=lambda arm: rows[arm]["steps"])
    other = next(arm for arm in ARMS if arm != fewer)
    target = rows[other]["steps"]
    if rows[fewer]["steps"] == target:
        return None
    overhead = max(r["seconds"] - r["train_time_ms"] / 1000 for r in rows.values())
    cap = budget.left() - overhead - 10.0  # seconds of training the budget still allows
    return fewer, dict(seconds=cap, target=target, extra={"ITERATIONS": str(target)})


def verdict(delta: float | None) -> str:
    if delta is None:
        return "not measured"
    if delta <= -DECISION_BPB:
        return "sigma-MoE ahead"
    if delta >= DECISION_BPB:
        return "sigma-MoE behind"
    return "within one seed's noise"


def compare(result: dict) -> dict:
    """sigma minus dense, round-trip val_bpb, at equal wall clock and at equal tokens."""
    runs = {r["name"]: r for r in result["runs"]}

    def delta(sigma: str, dense: str):
        a, b = runs.get(sigma, {}), runs.get(dense, {})
        return a["val_bpb"] - b["val_bpb"] if a.get("ok") and b.get("ok") else None

    tokens_pair = ("sigma_tokens", "dense_time") if "sigma_tokens" in runs else ("sigma_time", "dense_tokens")
    if result.get("equal_tokens") == "same steps at equal time":
        tokens_pair = ("sigma_time", "dense_time")
    out = {}
    for name, (sigma, dense) in {
        "equal_wall_clock": ("sigma_time", "dense_time"),
        "equal_tokens": tokens_pair,
    }.items():
        d = delta(sigma, dense)
        out[name] = dict(sigma=sigma, dense=dense, delta_bpb=d, verdict=verdict(d))
    time_runs = [runs.get("sigma_time", {}), runs.get("dense_time", {})]
    if all(r.get("step_avg_ms") for r in time_runs):
        out["step_time_ratio"] = time_runs[0]["step_avg_ms"] / time_runs[1]["step_avg_ms"]
    return out


def table(result: dict) -> str:
    lines = [
        "| run | arm | ok | steps | ms/step | tokens/param | pre-quant val_bpb | round-trip val_bpb "
        "| artifact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    for r in result["runs"]:
        cells = [
            r["name"],
            r["arm"],
            "yes" if r.get("ok") else "NO",
            num(r.get("steps"), "d"),
            num(r.get("step_avg_ms"), ".1f"),
            num(r.get("tokens_per_param"), ".1f"),
            num(r.get("pre_quant_val_bpb"), ".4f"),
            num(r.get("val_bpb"), ".4f"),
            num(r.get("artifact_bytes"), "d"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, c in result["comparison"].items():
        if name == "step_time_ratio":
            lines.append(f"sigma / dense ms per step: {c:.3f}")
            continue
        d = num(c["delta_bpb"], "+.4f")
        lines.append(f"{name}: {c['sigma']} - {c['dense']} = {d} bpb: {c['verdict']}")
    if result.get("equal_tokens"):
        lines.append(f"equal tokens: {result['equal_tokens']}")
    return "\n".join(lines)


def plan_lines(cpu: bool) -> list[str]:
    s = settings(cpu)
    lines = [f"budget {s['budget']:.0f}s; each time-matched run trains {s['seconds']:g}s"]
    for name, arm in (("dense_time", "dense"), ("sigma_time", "sigma")):
        env = run_env(arm, cpu, s["seconds"])
        lines.append(f"{name}: " + " ".join(f"{k}={v}" for k, v in env.items()))
    lines.append("then the arm with fewer steps again, ITERATIONS = the other's steps (equal tokens)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "sigma_pilot_out"), help="where results go")
    parser.add_argument("--data-path", default="/tmp/proxy", help="the unpacked proxy corpus")
    parser.add_argument(
        "--cpu", action="store_true", help="rehearse at a tiny shape on the CPU (sample data)"
    )
    parser.add_argument("--dry", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.dry:
        print("\n".join(plan_lines(args.cpu)))
        return 0
    s = settings(args.cpu)
    data = str(REPO / "data" / "sample") if args.cpu else args.data_path
    tokenizer = str(Path(data) / ("tokenizer.model" if args.cpu else "proxy_1024_bpe.model"))
    if not Path(tokenizer).is_file():
        print(f"error: --data-path {data}: no {Path(tokenizer).name} (unpack the proxy corpus first)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(s["budget"])
    result = dict(command=sys.argv, cpu=args.cpu, plan=plan_lines(args.cpu), runs=[], device=device_name())
    rows = {}
    for name, arm in (("dense_time", "dense"), ("sigma_time", "sigma")):
        timeout = max(budget.left() - 30.0, 30.0)
        rows[arm] = train(name, arm, run_env(arm, args.cpu, s["seconds"]), data, tokenizer, out, timeout)
        result["runs"].append(rows[arm])
        print(
            f"{name}: ok={rows[arm]['ok']} steps={rows[arm].get('steps')} val_bpb={rows[arm].get('val_bpb')}"
        )
    if all(r["ok"] for r in rows.values()):
        third = equal_tokens_run(rows, budget)
        if third is None:
            result["equal_tokens"] = "same steps at equal time"
        elif third[1]["seconds"] <= 0:
            result["equal_tokens"] = "skipped: no budget left"
        else:
            arm, spec = third
            env = run_env(arm, args.cpu, spec["seconds"], spec["extra"])
            row = train(f"{arm}_tokens", arm, env, data, tokenizer, out, max(budget.left(), 30.0))
            result["runs"].append(row)
            reached = row.get("steps") == spec["target"]
            result["equal_tokens"] = (
                f"{arm} ran to {spec['target']} steps"
                if reached
                else f"{arm} stopped at {row.get('steps')} of {spec['target']} steps (wall-clock cap)"
            )
    result["comparison"] = compare(result)
    (out / "sigma_pilot.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (out / "sigma_pilot.md").write_text(text + "\n")
    print(text)
    return 0 if all(r.get("ok") for r in result["runs"]) and len(result["runs"]) >= 2 else 1


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as err:  # the name is a label; the runs say whether the device works
        return f"unknown ({type(err).__name__})"


if __name__ == "__main__":
    sys.exit(main())
