"""The prepared check for a lent GPU machine: one command, inside a time budget (default 450 s).

    sh tools/gpu_check.sh                       # the GPU machine (installs the wheel, unpacks the proxy data)
    python3 tools/gpu_check.py --out DIR --data-path /tmp/proxy
    python3 tools/gpu_check.py --dry            # the plan, no work
    python3 tools/gpu_check.py --cpu --out DIR  # the whole check at a tiny shape on the CPU (a rehearsal)

In priority order, each step skipped (and said so) when the budget left is below its expected cost:
 1. smoke: every MLP mode compiled (fullgraph, the default shape, the loops on), a few training steps
    each: ms/step, peak memory, graph count; a mode that fails is recorded and the next one runs;
 2. timing: dense, soft and topk with the loops off, so each has ms/step before and after the switch;
 3. a proxy pair: train_gpt.py dense vs soft4, 90 s of training each on the proxy corpus, both at once
    on the one GPU (so the pair shares the machine alike; MICRO_BATCH_TOKENS=49152 so both fit).
--steps picks some of them (e.g. `--steps proxy` to rerun what the budget skipped).
Meanwhile the CPU computes tools/gpu_memory.py's no-GPU estimates of every mode (eager and compiled,
one rank), set against the measured peaks. Writes DIR/gpu_check.json (everything, with the command and
the device) and DIR/gpu_check.md (a short table); the table is also printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # its sibling tools, imported by name
import bench_stack  # noqa: E402
import gpu_memory  # noqa: E402
from common import MOE_PRESETS, import_trainer  # noqa: E402

train_gpt = import_trainer()

# Every MLP mode and routed dispatch; the first three are also timed with the loops off.
MODES = {
    "dense": MOE_PRESETS["dense"],
    "soft4": MOE_PRESETS["soft4"],
    "topk4": MOE_PRESETS["topk4"],
    "topk4_k2": {**MOE_PRESETS["topk4"], "TOP_K": "2"},
    "topk4_capacity": {**MOE_PRESETS["topk4"], "MOE_DISPATCH": "capacity"},
    "shared_routed": MOE_PRESETS["shared_routed"],
}
TIMED = ("dense", "soft4", "topk4")
PROXY_PAIR = ("dense", "soft4")
# Expected seconds per step of the plan (compilation dominates), for the budget; a guess until measured.
COST = {"gpu": {"phase": 40.0, "proxy": 230.0}, "cpu": {"phase": 20.0, "proxy": 90.0}}
# The proxy runs: short, no sliding window (time), zstd (the machine has its wheel, not brotli's).
PROXY_ENV = {
    "VOCAB_SIZE": "1024",
    "MAX_WALLCLOCK_SECONDS": "90",
    "MICRO_BATCH_TOKENS": "49152",
    "VAL_TOKEN_LIMIT": "1048576",
    "EVAL_STRIDE": "0",
    "COMPRESSOR": "zstd",
    "VAL_LOSS_EVERY": "0",
    "SEED": "1337",
}
CPU_PROXY_ENV = {**bench_stack.TINY, "MICRO_BATCH_TOKENS": "1024", "MAX_WALLCLOCK_SECONDS": "8"}
CPU_PROXY_ENV.update(VAL_TOKEN_LIMIT="8192", EVAL_STRIDE="0", COMPRESSOR="zstd", ZSTD_LEVEL="3")
CPU_PROXY_ENV.update(WARMUP_STEPS="1", TRAIN_LOG_EVERY="5", GPTQ_CALIBRATION_BATCHES="2")
CPU_PROXY_ENV["GPTQ_RESERVE_SECONDS"] = "1"
FINAL = re.compile(r"^final_quant_zstd_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", re.M)
STEP = re.compile(r"^step:(\d+)/\d+ train_loss:\S+ train_time:\d+ms step_avg:([\d.]+)ms", re.M)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def knobs(mode: str, cpu: bool) -> dict[str, str]:
    # zstd: the compressor is irrelevant to a training step, and the machine may lack brotli
    return {**(bench_stack.TINY if cpu else {}), "COMPRESSOR": "zstd", **MODES[mode]}


def start_estimates(modes: list[str], out: Path) -> dict[str, subprocess.Popen]:
    """tools/gpu_memory.py for every mode (eager and compiled), one rank, on the CPU, in the background."""
    procs = {}
    for mode in modes:
        args = [f"{k}={v}" for k, v in knobs(mode, False).items()]
        cmd = ["nice", sys.executable, str(REPO / "tools" / "gpu_memory.py"), *args, "--world-size", "1"]
        cmd += ["--json", str(out / f"estimate_{mode}.json")]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        procs[mode] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return procs


def collect_estimates(procs: dict, out: Path, wait: float) -> dict[str, dict]:
    found = {}
    deadline = time.monotonic() + max(wait, 30.0)
    for mode, proc in procs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            found[mode] = dict(error="estimate not finished in time")
            continue
        path = out / f"estimate_{mode}.json"
        if proc.returncode == 0 and path.exists():
            found[mode] = json.loads(path.read_text())
        else:
            found[mode] = dict(error=(proc.stdout.read() if proc.stdout else "")[-500:])
    return found


def measure(mode: str, looping: bool, cpu: bool, device: torch.device) -> dict:
    """Compile the mode's model (one phase), a few steps: ms/step, peak MiB, graphs; errors recorded."""
    row = dict(mode=mode, phase="loops_on" if looping else "loops_off")
    t0 = time.monotonic()
    try:
        h = train_gpt.load_config(knobs(mode, cpu))
        torch.manual_seed(0)
        model = train_gpt.GPT(train_gpt.model_config(h)).to(device)
        model.set_looping(looping)
        optimizers = train_gpt.build_optimizers(model, h)
        torch._dynamo.reset()
        counters.clear()
        backend = "aot_eager" if cpu else "inductor"
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
        step = bench_stack.make_step(model, compiled, optimizers, h, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = bench_stack.time_phase(step, 2 if cpu else 5, 2, device)
        loss_ok = all(torch.isfinite(p).all().item() for p in model.parameters())
        row.update(
            ok=loss_ok and counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"],
            ms_per_step=statistics.median(times),
            tokens_per_s=h.micro_batch_tokens / (statistics.median(times) / 1000),
            graphs=counters["stats"]["unique_graphs"],
            graph_breaks=sum(counters["graph_break"].values()),
            finite_weights=loss_ok,
        )
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        del model, optimizers, compiled, step
    except Exception as err:  # a failing mode is the finding; the next mode still runs
        row.update(
            ok=False, error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-3000:]
        )
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row["seconds"] = time.monotonic() - t0
    return row


def proxy_pair(cpu: bool, data_path: str, out: Path, timeout: float) -> list[dict]:
    """train_gpt.py on the proxy corpus (or, --cpu, the shipped sample) for each mode of the pair, at once."""
    data = str(REPO / "data" / "sample") if cpu else data_path
    tokenizer = str(Path(data) / ("tokenizer.model" if cpu else "proxy_1024_bpe.model"))
    runs, t0 = [], time.monotonic()
    for mode in PROXY_PAIR:
        env = {**os.environ, **(CPU_PROXY_ENV if cpu else PROXY_ENV), **MOE_PRESETS[mode]}
        run_id = f"gpu_check_{mode}_{int(time.time())}"
        env.update(DATA_PATH=data, TOKENIZER_PATH=tokenizer, RUN_ID=run_id, LOG_DIR=str(out / "proxy"))
        env["ARTIFACT_PATH"] = f"/tmp/{run_id}_model.ptz"  # 15 MB: kept off what comes back
        cmd = [sys.executable, str(REPO / "train_gpt.py")]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        knobs_set = {k: env[k] for k in (*PROXY_ENV, "DATA_PATH", *MOE_PRESETS[mode]) if k in env}
        runs.append((dict(mode=mode, run_id=run_id, env=knobs_set), proc))
    rows = []
    for row, proc in runs:
        try:
            stdout, stderr = proc.communicate(timeout=max(timeout - (time.monotonic() - t0), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            rows.append({**row, "ok": False, "error": f"timed out after {timeout:.0f}s"})
            continue
        final, steps = FINAL.search(stdout), STEP.findall(stdout)
        row.update(ok=proc.returncode == 0 and final is not None, returncode=proc.returncode)
        row["seconds"] = time.monotonic() - t0
        if final:
            row.update(val_loss=float(final[1]), val_bpb=float(final[2]))
        if steps:
            row.update(steps=int(steps[-1][0]), step_avg_ms=float(steps[-1][1]))
        if not row["ok"]:
            row["stderr_tail"] = stderr[-2000:]
        rows.append(row)
    return rows


STEPS = ("smoke", "timing", "proxy")


def plan(chosen: tuple[str, ...] = STEPS, modes: tuple[str, ...] = tuple(MODES)) -> list[tuple]:
    """(kind, mode, looping) in priority order."""
    steps = {
        "smoke": [("phase", mode, True) for mode in modes],
        "timing": [("phase", mode, False) for mode in TIMED if mode in modes],
        "proxy": [("proxy", "+".join(PROXY_PAIR), None)],
    }
    return [step for name in STEPS if name in chosen for step in steps[name]]


def table(result: dict) -> str:
    lines = [
        "| mode | loops | ok | ms/step | tok/s | peak MiB | est. compiled MiB | est. eager MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["phases"]:
        est = result["estimates"].get(row["mode"], {})
        phase = next((p for p in est.get("phases", []) if p["phase"] == row["phase"]), {})
        cells = [
            row["mode"],
            row["phase"].removeprefix("loops_"),
            "yes" if row.get("ok") else ("skipped" if row.get("skipped") else "NO"),
            f"{row['ms_per_step']:.1f}" if "ms_per_step" in row else "-",
            f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else "-",
            f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-",
            f"{phase['compiled_peak_mib']:.0f}" if "compiled_peak_mib" in phase else "-",
            f"{phase['peak_mib']:.0f}" if "peak_mib" in phase else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| proxy run | ok | steps | step_avg ms | val_bpb (round trip) |", "|---|---|---|---|---|"]
    for row in result["proxy"]:
        ok = "yes" if row.get("ok") else ("skipped" if row.get("skipped") else "NO")
        bpb = f"{row['val_bpb']:.4f}" if "val_bpb" in row else "-"
        lines.append(
            f"| {row['mode']} | {ok} | {row.get('steps', '-')} | {row.get('step_avg_ms', '-')} | {bpb} |"
        )
    failed = [f"{r['mode']} {r['phase']}: {r['error']}" for r in result["phases"] if r.get("error")]
    return "\n".join(lines + ([""] + ["FAILED " + f for f in failed] if failed else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="where results go")
    parser.add_argument("--data-path", default="/tmp/proxy", help="the unpacked proxy corpus")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for everything")
    parser.add_argument("--cpu", action="store_true", help="rehearse at a tiny shape on the CPU")
    parser.add_argument("--dry", action="store_true", help="print the plan and exit")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"some of {','.join(STEPS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of {','.join(MODES)}")
    args = parser.parse_args(argv)
    cpu = args.cpu or args.dry
    if not args.dry and not cpu and not torch.cuda.is_available():
        print("error: no usable CUDA device: run on the GPU machine, or use --cpu / --dry", file=sys.stderr)
        return 2
    cost = COST["cpu" if args.cpu else "gpu"]
    chosen = tuple(args.steps.split(","))
    if not chosen or set(chosen) - set(STEPS):
        print(
            f"error: --steps={args.steps}: expected a comma-separated subset of {','.join(STEPS)}",
            file=sys.stderr,
        )
        return 2
    modes = tuple(args.modes.split(","))
    if not modes or set(modes) - set(MODES):
        print(
            f"error: --modes={args.modes}: expected a comma-separated subset of {','.join(MODES)}",
            file=sys.stderr,
        )
        return 2
    steps = plan(chosen, modes)
    if args.dry:
        for kind, mode, looping in steps:
            what = f"loops {'on' if looping else 'off'}" if kind == "phase" else "train_gpt.py x2, 90 s"
            env = MODES[mode] if kind == "phase" else {m: MOE_PRESETS[m] for m in PROXY_PAIR}
            print(f"{kind:5} {mode:15} {what:21} ~{cost[kind]:.0f}s {json.dumps(env)}")
        print(f"estimates: tools/gpu_memory.py, every mode, in the background; budget {args.budget:.0f}s")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget, device = Budget(args.budget), torch.device("cpu" if cpu else "cuda")
    estimates = {} if cpu else start_estimates(list(modes), out)
    result = dict(
        command=" ".join([sys.executable, *sys.argv]),
        device="cpu" if cpu else torch.cuda.get_device_name(device),
        torch=torch.__version__,
        budget_s=args.budget,
        phases=[],
        proxy=[],
    )
    for kind, mode, looping in steps:
        if budget.left() < cost[kind]:
            skipped = dict(ok=False, skipped=True)
            if kind == "phase":
                result["phases"].append(
                    dict(mode=mode, phase=f"loops_{'on' if looping else 'off'}", **skipped)
                )
            else:
                result["proxy"] += [dict(mode=m, **skipped) for m in PROXY_PAIR]
            continue
        if kind == "phase":
            result["phases"].append(measure(mode, looping, cpu, device))
            print(json.dumps(result["phases"][-1])[:400], flush=True)
        else:
            result["proxy"] += proxy_pair(cpu, args.data_path, out, budget.left())
            print(json.dumps(result["proxy"][-2:])[:800], flush=True)
    if cpu:  # the tiny shape's eager estimates, in this process (the CPU has no cores to spare)
        result["estimates"] = {
            m: gpu_memory.estimate(train_gpt.load_config(knobs(m, True)), 1, False) for m in modes
        }
    else:
        result["estimates"] = collect_estimates(estimates, out, budget.left())
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 0 if all(r.get("ok") for r in result["phases"] + result["proxy"]) else 1


if __name__ == "__main__":
    sys.exit(main())
