"""The prepared check for a lent GPU machine: one command, everything in priority order, inside a budget.

    sh tools/gpu/gpu_check.sh                       # the GPU machine (installs the wheel, unpacks the data)
    python3 -m tools.gpu.gpu_check --out DIR --data-path /tmp/proxy
    python3 -m tools.gpu.gpu_check --dry            # each step's expected cost and the total vs the budget
    python3 -m tools.gpu.gpu_check --cpu --out DIR  # every step at a tiny shape on the CPU (a rehearsal)

The steps, most important first (a step whose expected cost no longer fits is skipped and marked so):
 1. correctness, at a small shape: the device's compiled bf16 logits against the CPU's fp32 logits for the
    same weights and tokens; compiled against eager on the device; grouped against capacity dispatch
    (top-k, no token dropped); one optimizer step finite; which kernel scaled_dot_product_attention ran;
 2. speed and memory at the default shape and per-GPU micro-batch, compiled (fullgraph): dense with the
    loops off and on, soft4, topk4 and shared_routed (loops on): compile seconds apart from ms/step,
    tokens/s, the loss, peak memory beside train_gpt's own estimate (the one its memory check uses);
 3. the 600 s rule: the GPTQ Hessians at the default shape and calibration batch, timed, against the
    reserve train_gpt.py would set aside;
 4. a score: one dense train_gpt.py run on the proxy corpus to a quantized artifact and its round-trip
    val_bpb, one warm-up step per layer order, one micro-batch per optimizer step, and a wall clock
    that fits the time left.
Each step runs in its own process under a watchdog (killed at twice its expected cost), and the results
are rewritten after every step. Meanwhile the CPU computes tools/gpu/gpu_memory.py's no-GPU estimates
(eager and min-cut compiled, one rank) of the timed modes. Files written to --out (at most four):
gpu_check.json (every result, the estimates, the command and the device), gpu_check.md (the table, also
printed last) and the score run's log (RUN_ID.txt) and events (RUN_ID.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
from torch._dynamo.utils import counters

from tools.common import MOE_PRESETS, REPO, import_trainer
from tools.gpu import bench_stack, gpu_memory

train_gpt = import_trainer()

TINY = bench_stack.TINY  # the CPU rehearsal's shape, and the correctness step's small shape everywhere

SPEED_MODES = ("dense", "soft4", "topk4", "shared_routed")
# Tolerances (relative RMS of the logits). bf16 keeps 8 mantissa bits (unit round-off 2^-9 = 0.002); at the
# small shape CPU bf16 autocast against fp32 measured 0.0034 (dense) and 0.0066 (topk4, where a few tokens
# flip expert). CUDA autocast runs the same matmuls in bf16, so 0.02 is 3-6x that; a wrong kernel, a wrong
# cast or a broken graph errs by O(1). Two bf16 computations of the same thing (compiled against eager,
# grouped against capacity) differ only in summation order and fusion: half of it.
DEVICE_VS_CPU_TOL = 0.02
SAME_DEVICE_TOL = 0.01


class Step(NamedTuple):
    name: str
    what: str
    gpu_s: float  # expected seconds on one H100, process start included: a guess until measured
    cpu_s: float  # the same at the tiny shape on a loaded 2-core CPU (measured there: 80-240 s, rounded up)


PLAN = (
    Step(
        "correctness", "small shape: device bf16 compiled vs CPU fp32, compiled vs eager, dispatch", 50, 200
    ),
    Step("speed_dense_loops_off", "default shape compiled: dense, loops off", 40, 200),
    Step("speed_dense_loops_on", "default shape compiled: dense, loops on", 40, 200),
    Step("speed_soft4", "default shape compiled: soft4, loops on", 40, 200),
    Step("speed_topk4", "default shape compiled: topk4 (grouped), loops on", 40, 200),
    Step("speed_shared_routed", "default shape compiled: shared_routed, loops on", 40, 200),
    Step("calibrate", "GPTQ Hessians at the default shape and batch vs the reserve", 25, 150),
    Step("score", "train_gpt.py dense on the proxy: artifact + round-trip val_bpb", 130, 300),
)
SETUP_GPU_S = 25.0  # gpu_check.sh before this script: the wheel, unpacking the corpus (a guess)
BUDGET_GPU_S = 480.0  # about 8 minutes of one H100, set-up included
BUDGET_CPU_S = 2400.0
# The score run: its fixed costs (process start, two compiles of the training step, the evaluation graph,
# calibration, export, two evaluations) on one H100, a guess; training gets whatever else is left, at most
# SCORE_MAX_TRAIN_S and at least SCORE_MIN_TRAIN_S (else the step is skipped).
SCORE_OVERHEAD_S = {"gpu": 100.0}
SCORE_MIN_TRAIN_S, SCORE_MAX_TRAIN_S = 30.0, 150.0
SCORE_ENV = {
    "VOCAB_SIZE": "1024",
    "TRAIN_BATCH_TOKENS": "98304",  # one micro-batch per step: on one GPU, steps matter more than batch
    "MICRO_BATCH_TOKENS": "98304",
    "WARMUP_STEPS": "1",  # compiling each layer order needs one step; more only delays the clock
    "VAL_TOKEN_LIMIT": "1048576",
    "EVAL_STRIDE": "0",
    "VAL_LOSS_EVERY": "0",
    "TRAIN_LOG_EVERY": "50",
    "COMPRESSOR": "zstd",  # the machine has its wheel, not brotli's
    "SEED": "1337",
}
CPU_SCORE_ENV = {**TINY, "MICRO_BATCH_TOKENS": "1024", "VAL_TOKEN_LIMIT": "8192", "EVAL_STRIDE": "0"}
CPU_SCORE_ENV.update(COMPRESSOR="zstd", ZSTD_LEVEL="3", WARMUP_STEPS="1", TRAIN_LOG_EVERY="5")
CPU_SCORE_ENV.update(GPTQ_CALIBRATION_BATCHES="2", VAL_LOSS_EVERY="0", SEED="1337")
FINAL = re.compile(r"^final_quant_zstd_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", re.M)
STEP_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) train_time:\d+ms step_avg:([\d.]+)ms", re.M)
CALIBRATION_LINE = re.compile(r"^gptq: .* in ([\d.]+)s \(reserve ([\d.]+)s", re.M)
ENDED_LINE = re.compile(r"^training_and_calibration: .*?([\d.]+)s", re.M)
MAX_OUT_FILES = 8  # what a lent machine hands back
# The break-even study's fitted target: the topk4-over-dense step-time ratio below which topk4 beats dense at
# equal wall clock (measured at 3 x 64 on the CPU; the speed table compares the default shape's ratio with it)
BREAKEVEN_MANIFEST = REPO / "records/track_non_record_16mb/2026-12-07_MoE_BreakEven_Study/manifest.json"


def plan_cost(kind: str) -> float:
    return sum(s.gpu_s if kind == "gpu" else s.cpu_s for s in PLAN)


def knobs(mode: str, cpu: bool) -> dict[str, str]:
    # zstd: the compressor is irrelevant to a training step, and the machine may lack brotli
    return {**(TINY if cpu else {}), "COMPRESSOR": "zstd", **MOE_PRESETS[mode]}


# ---- the steps (each in its own process) ----------------------------------------------------------------
def relative_rms(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).square().mean() / b.square().mean().clamp_min(1e-30)).sqrt().item()


def small_model(mode: str, device, **env):
    """The small-shape model of `mode` with every weight perturbed (zero-initialised projections would make
    the comparison trivial), loops on: the path a late training step takes."""
    h = train_gpt.load_config({**knobs(mode, True), **env})
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.set_looping(True)
    return h, model.to(device)


def attention_kernel(model, x) -> list[str]:
    """The aten kernels scaled_dot_product_attention dispatched to in one eager forward (flash, efficient,
    cuDNN or the math fallback)."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        model.logits(x)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "_scaled_dot_product" in n or "attention_math" in n)


def step_correctness(cpu: bool, device) -> dict:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    backend = "aot_eager" if cpu else "inductor"
    checks = {}
    h, model = small_model("dense", device)
    x = torch.randint(
        0, h.data.vocab_size, (2, h.data.train_seq_len), generator=torch.Generator().manual_seed(1)
    )
    x_dev = x.to(device)
    with torch.no_grad():
        reference = model.to("cpu").logits(x).float()  # fp32, eager, on the CPU
        model.to(device)
        with autocast:
            eager = model.logits(x_dev)
            compiled = torch.compile(model.logits, fullgraph=True, dynamic=False, backend=backend)(x_dev)
    checks["device_compiled_vs_cpu_fp32"] = dict(
        rel_rms=relative_rms(compiled, reference), tol=DEVICE_VS_CPU_TOL
    )
    checks["compiled_vs_eager"] = dict(rel_rms=relative_rms(compiled, eager), tol=SAME_DEVICE_TOL)
    # grouped against capacity dispatch: with a capacity of every row per expert nothing is dropped
    outputs = {}
    for dispatch in ("grouped", "capacity"):
        env = dict(MOE_DISPATCH=dispatch, CAPACITY_FACTOR="4")
        _, routed = small_model("topk4", device, **env)
        with torch.no_grad(), autocast:
            outputs[dispatch] = routed.eval().logits(x_dev)
    checks["topk4_grouped_vs_capacity"] = dict(
        rel_rms=relative_rms(outputs["grouped"], outputs["capacity"]), tol=SAME_DEVICE_TOL
    )
    # one optimizer step of a routed mode with balancing on (the router bias moves too)
    h, routed = small_model("topk4", device)
    optimizers = train_gpt.build_optimizers(routed, h.optim)
    y = torch.roll(x_dev, -1, dims=1)
    with autocast:
        loss, _ = routed(x_dev, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
    train_gpt.collect_routing_stats(routed, h.optim.router_bias_rate, 1)
    finite = all(torch.isfinite(p).all().item() for p in routed.parameters())
    checks["optimizer_step_finite"] = dict(ok=finite and bool(torch.isfinite(loss).item()), loss=loss.item())
    for check in checks.values():
        check.setdefault("ok", check.get("rel_rms", 0.0) <= check.get("tol", 0.0))
    return dict(
        ok=all(c["ok"] for c in checks.values()),
        checks=checks,
        attention_kernels=attention_kernel(model, x_dev),
    )


def memory_estimate(h, device, looping: bool) -> int:
    """train_gpt's compiled peak estimate (one rank); the CPU rehearsal traces it on a fake CUDA device."""
    if device.type == "cuda":
        return train_gpt.compiled_peak_bytes(h.model, h.data, h.optim, device, 1, looping)
    with gpu_memory.cuda_autocast_without_gpu():
        return train_gpt.compiled_peak_bytes(h.model, h.data, h.optim, "cuda", 1, looping)


def step_speed(cpu: bool, device, mode: str, looping: bool) -> dict:
    """Compile (first step timed apart), then ms/step, tokens/s, loss, peak memory, graph count."""
    h = train_gpt.load_config(knobs(mode, cpu))
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model).to(device)
    model.set_looping(looping)
    optimizers = train_gpt.build_optimizers(model, h.optim)
    counters.clear()
    backend = "aot_eager" if cpu else "inductor"
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    # grouped_mm runs only in bf16: the CPU rehearsal's steps run under CPU autocast, as a GPU's under CUDA's
    bf16 = lambda device: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    step = bench_stack.make_step(model, compiled, optimizers, h, device, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()  # compiles
    first = bench_stack.wait_and_time(t0, device)
    times = bench_stack.time_phase(step, 1 if cpu else 5, 0 if cpu else 2, device)
    ms = statistics.median(times)
    loss = step().item()
    finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    row = dict(
        mode=mode,
        loops="on" if looping else "off",
        micro_batch_tokens=h.data.micro_batch_tokens,
        compile_s=max(first - ms, 0.0) / 1000,
        ms_per_step=ms,
        tokens_per_s=h.data.micro_batch_tokens / (ms / 1000),
        loss=loss,
        graphs=counters["stats"]["unique_graphs"],
        graph_breaks=sum(counters["graph_break"].values()),
        finite_weights=finite,
        estimate_mib=memory_estimate(h, device, looping) / 2**20,
    )
    row["ok"] = finite and row["graphs"] == 1 and not row["graph_breaks"] and loss == loss
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def step_calibrate(cpu: bool, device) -> dict:
    """collect_hessians as calibrate() runs it (TF32), GPTQ_CALIBRATION_BATCHES micro-batches of the
    default shape, timed, against the reserve train_gpt.py would derive."""
    h = train_gpt.load_config(knobs("dense", cpu))
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model).to(device).eval()
    model.set_looping(True)
    rows = h.data.micro_batch_tokens // h.data.train_seq_len
    n = h.quant.gptq_calibration_batches
    batches = [
        torch.randint(0, h.data.vocab_size, (rows, h.data.train_seq_len), device=device) for _ in range(n)
    ]
    projected = train_gpt.calibration_reserve(model, h.data, h.quant, device, (batches[0], batches[0]))
    t0 = time.perf_counter()
    with train_gpt.hessian_matmuls():
        hessians, _ = train_gpt.collect_hessians(model, ((x, x) for x in batches), 1)
    seconds = train_gpt_wait(t0, device)
    return dict(
        ok=seconds <= projected,
        batches=n,
        micro_batch_tokens=h.data.micro_batch_tokens,
        matrices=len(hessians),
        seconds=seconds,
        reserve_s=projected,
        reserve_rule="calibration_reserve(): one batch timed, scaled to the batches, plus margin",
    )


def train_gpt_wait(t0: float, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def score_env(cpu: bool, data_path: str, out: Path, train_s: float) -> dict[str, str]:
    data = str(REPO / "data" / "sample") if cpu else data_path
    tokenizer = str(Path(data) / ("tokenizer.model" if cpu else "proxy_1024_bpe.model"))
    run_id = f"gpu_check_dense_{int(time.time())}"
    env = {**(CPU_SCORE_ENV if cpu else SCORE_ENV), **MOE_PRESETS["dense"]}
    env.update(DATA_PATH=data, TOKENIZER_PATH=tokenizer, RUN_ID=run_id, LOG_DIR=str(out))
    env["ARTIFACT_PATH"] = f"{tempfile.gettempdir()}/{run_id}_model.ptz"  # 15 MB: kept off what comes back
    env["MAX_WALLCLOCK_SECONDS"] = f"{train_s:.0f}"
    return env


def run_score(cpu: bool, data_path: str, out: Path, train_s: float, timeout: float) -> dict:
    env = score_env(cpu, data_path, out, train_s)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "train_gpt.py")],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return dict(ok=False, env=env, error=f"watchdog: killed after {timeout:.0f}s")
    row = dict(env=env, returncode=proc.returncode, seconds=time.monotonic() - t0)
    final, steps = FINAL.search(proc.stdout), STEP_LINE.findall(proc.stdout)
    calibration, ended = CALIBRATION_LINE.search(proc.stdout), ENDED_LINE.search(proc.stdout)
    row["ok"] = proc.returncode == 0 and final is not None
    if final:
        row.update(val_loss=float(final[1]), val_bpb=float(final[2]))
    if steps:
        row.update(steps=int(steps[-1][0]), train_loss=float(steps[-1][1]), step_avg_ms=float(steps[-1][2]))
    if calibration:
        row.update(calibration_s=float(calibration[1]), reserve_s=float(calibration[2]))
    if ended:
        row["training_and_calibration_s"] = float(ended[1])
    if not row["ok"]:
        row["stderr_tail"] = proc.stderr[-2000:]
    return row


def run_one(name: str, cpu: bool) -> dict:
    """One step in this process (the child side of the watchdog)."""
    device = torch.device("cpu" if cpu else "cuda")
    if name == "correctness":
        return step_correctness(cpu, device)
    if name == "calibrate":
        return step_calibrate(cpu, device)
    mode = name.removeprefix("speed_").removesuffix("_loops_off").removesuffix("_loops_on")
    return step_speed(cpu, device, mode, looping=not name.endswith("_loops_off"))


# ---- the parent: plan, watchdog, results after every step ------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_child(name: str, cpu: bool, timeout: float) -> dict:
    """The step in its own process, killed when it outlives `timeout`: a hang costs its slot, not the rest."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "tools.gpu.gpu_check", "--one", name, "--row", str(result)]
        cmd += ["--cpu"] if cpu else []
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr or b"")[-1500:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return dict(ok=False, error=f"watchdog: killed after {timeout:.0f}s", stderr_tail=tail)
        row = json.loads(result.read_text()) if result.exists() else dict(ok=False)
        row["process_s"] = time.monotonic() - t0
        if proc.returncode != 0 or not row.get("ok"):
            row["stderr_tail"] = proc.stderr[-2000:]
        return row


def start_estimates(tmp: Path) -> dict:
    """tools/gpu/gpu_memory.py (eager and min-cut compiled, one rank) of each timed mode, CPU, niced."""
    procs = {}
    for mode in SPEED_MODES:
        args = [f"{k}={v}" for k, v in knobs(mode, False).items()]
        cmd = ["nice", sys.executable, "-m", "tools.gpu.gpu_memory", *args, "--world-size", "1"]
        cmd += ["--json", str(Path(tmp, f"estimate_{mode}.json").resolve())]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        procs[mode] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    return procs


def gather_estimates(procs: dict, tmp: Path, result: dict, final: bool) -> None:
    for mode, proc in procs.items():
        if mode in result["estimates"] or (proc.poll() is None and not final):
            continue
        if proc.poll() is None:
            proc.kill()
            result["estimates"][mode] = dict(error="not finished when the check ended")
            continue
        path = tmp / f"estimate_{mode}.json"
        found = json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else None
        error = dict(error=proc.stderr.read().decode(errors="replace")[-500:]) if not found else None
        result["estimates"][mode] = error or {
            k: found[k] for k in ("peak_mib", "compiled_peak_mib", "static_bytes", "phases")
        }


def cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "-"


def verdict(row: dict) -> str:
    return "skipped" if row.get("skipped") else ("yes" if row.get("ok") else "NO")


def step_time_ratio(steps: dict, row: dict) -> float | None:
    """A speed row's ms/step over dense's with the same layer loops (the routed rows run loops on)."""
    dense = steps.get(f"speed_dense_loops_{row['loops']}", {})
    if not dense.get("ms_per_step") or not row.get("ms_per_step"):
        return None
    return row["ms_per_step"] / dense["ms_per_step"]


def breakeven_line(steps: dict, manifest_path: Path = BREAKEVEN_MANIFEST) -> str | None:
    """topk4's measured step-time ratio beside the break-even study's target; None with nothing measured."""
    topk4 = steps.get("speed_topk4")
    measured = step_time_ratio(steps, topk4) if topk4 else None
    if measured is None:
        return None
    head = f"\ntopk4 step-time ratio (topk4 ms/step over dense loops on): {measured:.3f}; "
    if not manifest_path.is_file():
        return head + f"no break-even target to compare with ({manifest_path} is missing)"
    results = json.loads(manifest_path.read_text())["results"]
    target = results.get("break_even") or {}
    if target.get("step_time_ratio") is None:
        return head + f"the break-even study has no target yet ({manifest_path})"
    low, high = target["step_time_ratio_interval"] or (None, None)
    if low is not None and measured < low:
        reading = "faster than the target's whole interval: top-1 of 4 would beat dense at equal wall clock"
    elif high is not None and measured > high:
        reading = (
            "slower than the target's whole interval: top-1 of 4 would not beat dense at equal wall clock"
        )
    else:
        reading = "inside the target's interval: undecided"
    shown = "" if low is None else f" [{low:.3f}, {high:.3f}]"
    status = "final" if results["complete"] else "interim"
    return head + (
        f"the break-even study's target ({status}; fitted at 3 x 64 on a CPU with the proxy corpus, not "
        f"this shape): {target['step_time_ratio']:.3f}{shown}: {reading}"
    )


def table(result: dict) -> str:
    steps = result["steps"]
    lines = ["| step | ok | what |", "|---|---|---|"]
    for name, row in steps.items():
        detail = row.get("error") or row.get("skip_reason") or ""
        if name == "correctness" and "checks" in row:
            detail = ", ".join(
                f"{k} {c['rel_rms']:.4f}<={c['tol']}" if "rel_rms" in c else f"{k} {c['ok']}"
                for k, c in row["checks"].items()
            )
            detail += f"; sdpa {','.join(row['attention_kernels'])}"
        lines.append(f"| {name} | {verdict(row)} | {detail[:300]} |")
    lines += [
        "",
        "| mode | loops | ok | compile s | ms/step | x dense | tok/s | loss | peak MiB | estimate MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in steps.items():
        if name.startswith("speed_") and "ms_per_step" in row:
            cells = [row["mode"], row["loops"], verdict(row), cell(row, "compile_s", ".1f")]
            ratio = step_time_ratio(steps, row)
            cells += [cell(row, "ms_per_step", ".1f"), "-" if ratio is None else f"{ratio:.3f}"]
            cells += [cell(row, "tokens_per_s", ".0f")]
            cells += [
                cell(row, "loss", ".4f"),
                cell(row, "peak_mib", ".0f"),
                cell(row, "estimate_mib", ".0f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    comparison = breakeven_line(steps)
    if comparison:
        lines.append(comparison)
    cal = steps.get("calibrate", {})
    if "seconds" in cal:
        lines.append(
            f"\ncalibration: {cal['seconds']:.2f}s for {cal['batches']} batches, "
            f"reserve {cal['reserve_s']:.2f}s"
        )
    score = steps.get("score", {})
    if "val_bpb" in score:
        lines.append(
            f"score (proxy, dense, {score['env']['MAX_WALLCLOCK_SECONDS']}s): round-trip val_bpb "
            f"{score['val_bpb']:.4f} after {score.get('steps', '-')} steps"
        )
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_check.md").write_text(table(result) + "\n")


def dry(cpu: bool, budget: float) -> int:
    kind = "cpu" if cpu else "gpu"
    setup = 0.0 if cpu else SETUP_GPU_S
    print(f"{'setup':22} {setup:5.0f}s  gpu_check.sh: wheel, corpus")
    for s in PLAN:
        print(f"{s.name:22} {s.gpu_s if kind == 'gpu' else s.cpu_s:5.0f}s  {s.what}")
    total = setup + plan_cost(kind)
    fits = "fits" if total <= budget else "OVER"
    print(
        f"total {total:.0f}s of the {budget:.0f}s budget ({fits}); "
        "the GPU costs are guesses until a GPU measures them"
    )
    return 0 if total <= budget else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="where results go")
    parser.add_argument("--data-path", default="/tmp/proxy", help="the unpacked proxy corpus")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (set-up included)")
    parser.add_argument("--cpu", action="store_true", help="rehearse every step at a tiny shape on the CPU")
    parser.add_argument("--dry", action="store_true", help="print each step's cost and the total, and exit")
    parser.add_argument("--steps", default=None, help="some of the steps, by name (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: run this step, write --row
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        try:
            row = run_one(args.one, args.cpu)
        except Exception as err:  # the failure is the finding: recorded, the parent goes on
            row = dict(
                ok=False,
                error=f"{type(err).__name__}: {err}"[:2000],
                traceback=traceback.format_exc()[-3000:],
            )
        Path(args.row).write_text(json.dumps(row))
        return 0 if row.get("ok") else 1
    budget_s = args.budget or (BUDGET_CPU_S if args.cpu else BUDGET_GPU_S)
    if args.dry:
        return dry(args.cpu, budget_s)
    names = [s.name for s in PLAN]
    chosen = args.steps.split(",") if args.steps else names
    if set(chosen) - set(names):
        print(
            f"error: --steps={args.steps}: expected a comma-separated subset of {','.join(names)}",
            file=sys.stderr,
        )
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("error: no usable CUDA device: run on the GPU machine, or use --cpu / --dry", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "cpu" if args.cpu else "gpu"
    budget = Budget(budget_s - (0.0 if args.cpu else SETUP_GPU_S))
    result = dict(
        command=" ".join([sys.executable, *sys.argv]),
        device="cpu" if args.cpu else torch.cuda.get_device_name(0),
        capability=None if args.cpu else ".".join(map(str, torch.cuda.get_device_capability(0))),
        torch=torch.__version__,
        budget_s=budget_s,
        plan={s.name: s.gpu_s if kind == "gpu" else s.cpu_s for s in PLAN},
        steps={},
        estimates={},
    )
    estimates_tmp = Path(tempfile.mkdtemp(prefix="gpu_check_estimates_"))
    procs = {} if args.cpu else start_estimates(estimates_tmp)
    for s in PLAN:
        if s.name not in chosen:
            continue
        cost = s.gpu_s if kind == "gpu" else s.cpu_s
        if budget.left() < cost:
            result["steps"][s.name] = dict(ok=False, skipped=True, skip_reason=f"{budget.left():.0f}s left")
        elif s.name == "score":
            result["steps"][s.name] = score_step(args, kind, budget)
        else:
            result["steps"][s.name] = run_child(s.name, args.cpu, min(2 * cost, budget.left()))
        result["steps"][s.name]["budget_left_s"] = budget.left()
        gather_estimates(procs, estimates_tmp, result, final=False)
        write(out, result)
        row = {k: v for k, v in result["steps"][s.name].items() if k != "env"}  # the env is in the JSON
        print(json.dumps({s.name: row})[:1500], flush=True)
    gather_estimates(procs, estimates_tmp, result, final=True)
    write(out, result)
    print(table(result))
    return 0 if all(r.get("ok") for r in result["steps"].values()) else 1


def score_step(args, kind: str, budget: Budget) -> dict:
    corpus = Path(args.data_path if kind == "gpu" else REPO / "data" / "sample")
    if kind == "gpu" and not (corpus / "proxy_1024_bpe.model").exists():
        return dict(ok=False, skipped=True, skip_reason=f"no proxy corpus at {corpus}")
    # the CPU rehearsal's wall clock holds the measured calibration reserve (up to ~30 s on a loaded 2-core
    # CPU) and a few training steps: its point is the path, not the score
    train_s = min(SCORE_MAX_TRAIN_S, budget.left() - SCORE_OVERHEAD_S[kind]) if kind == "gpu" else 60.0
    if train_s < SCORE_MIN_TRAIN_S and kind == "gpu":
        return dict(ok=False, skipped=True, skip_reason=f"{train_s:.0f}s of training would fit")
    return run_score(kind == "cpu", args.data_path, Path(args.out), train_s, budget.left())


if __name__ == "__main__":
    sys.exit(main())
