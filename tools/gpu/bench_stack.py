"""Times a full training step (forward, backward, clip, optimizer) of train_gpt.py's model per phase
of the run: before the depth-recurrence switch and after it, as one GPU of an 8-GPU run sees it.

    python3 -m tools.gpu.bench_stack          # CUDA: the default (record) shape, 98,304 tokens per step
    python3 -m tools.gpu.bench_stack MOE_MODE=none --iters 30 --json bench.json
    python3 -m tools.gpu.bench_stack --tiny   # CPU smoke run: a tiny shape, timings mean nothing

KEY=VALUE arguments override knobs as in a real run (e.g. MICRO_BATCH_TOKENS=49152 if the full
per-GPU batch does not fit). Each phase compiles the model with fullgraph=True and dynamic=False
(the warm-up steps pay for it), then reports the median step time, tokens/s on this GPU, the MFU
by train_gpt's FLOP count, peak memory (CUDA), and how many graphs dynamo built: one per phase and
no graph breaks, or the run fails (exit status 1). The last line projects the whole run: the
time-weighted tokens/s per GPU with the loops switched on at ENABLE_LOOPING_AT, against the
goal of 1.0M tokens/s per GPU. train_gpt.py imports zstandard: on a bare GPU machine install the
wheel first (docs/gpu_runs.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from tools.common import import_trainer

train_gpt = import_trainer()

GOAL_TOKENS_PER_S = 1.0e6  # per GPU over the whole run: about the 1.1428 stack's 1.05M on one H100
# A tiny stack with every mechanism on (layers 1-2 looped, lanes in layer 3), for CPU smoke runs.
TINY = {
    "VOCAB_SIZE": "1024",
    "NUM_LAYERS": "4",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "128",
    "TRAIN_BATCH_TOKENS": "2048",
    "MICRO_BATCH_TOKENS": "256",
    "LOOP_START": "1",
    "LOOP_END": "2",
    "PARALLEL_START_LAYER": "3",
    "ROPE_DIMS": "8",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("knobs", nargs="*", metavar="KEY=VALUE", help="knob overrides")
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (a smoke run)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per phase (CUDA 20, tiny 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per phase (compilation)")
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (CUDA inductor, CPU aot_eager)"
    )
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def config(args) -> train_gpt.SimpleNamespace:
    env = dict(TINY) if args.tiny else {}
    for item in args.knobs:
        if "=" not in item:
            raise SystemExit(f"{item!r}: knob overrides are KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    return train_gpt.load_config(env)


def make_step(model, compiled, optimizers, h, device, autocast=None):
    """One optimizer step on one GPU of an 8-GPU run: its micro-batch, forward, backward, clip, step.
    `autocast` (a function of the device) replaces train_gpt's, e.g. to run CPU steps in bf16."""
    autocast = autocast or train_gpt.autocast
    # Training's layout (one packed row with RESPECT_DOC_BOUNDARIES); random tokens hold few BOS, so
    # segments are mostly TRAIN_SEQ_LEN long: the slowest case of document isolation.
    x = torch.randint(0, h.data.vocab_size, train_gpt.train_rows(h.data), device=device)
    y = torch.roll(x, -1, dims=1)

    def step() -> torch.Tensor:
        with autocast(device):
            loss, ce = compiled(x, y, doc_span=h.data.train_seq_len)
        loss.backward()
        if h.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), h.optim.grad_clip_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_gpt.collect_routing_stats(model, h.optim.router_bias_rate, 1)
        return ce

    return step


def wait_and_time(t0: float, device) -> float:
    """Milliseconds since t0, once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - t0)


def time_phase(step, iters: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append(wait_and_time(t0, device))
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    h = config(args)
    iters = args.iters or (20 if device.type == "cuda" else 3)
    backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model).to(device)
    optimizers = train_gpt.build_optimizers(model, h.optim)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    step = make_step(model, compiled, optimizers, h, device)
    peak = train_gpt.peak_flops(device)
    print(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} backend {backend} "
        f"micro_batch {h.data.micro_batch_tokens} tokens x {h.data.train_seq_len} seq, "
        f"moe_mode {h.model.moe_mode}"
    )
    results, ok = [], True
    for looping in sorted({False, h.model.num_loops > 0}):
        model.set_looping(looping)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        graphs_before = counters["stats"]["unique_graphs"]
        times = time_phase(step, iters, args.warmup, device)
        ms = statistics.median(times)
        tokens_per_s = h.data.micro_batch_tokens / (ms / 1000)
        flops = train_gpt.flops_per_token(model, h.data, looping)
        graphs = counters["stats"]["unique_graphs"] - graphs_before
        row = dict(
            phase="loops_on" if looping else "loops_off",
            ms_per_step=ms,
            tokens_per_s=tokens_per_s,
            flops_per_token=flops,
            mfu=tokens_per_s * flops / peak if peak else None,
            graphs=graphs,
        )
        results.append(row)
        ok &= graphs == 1
        mfu = f" mfu:{100 * row['mfu']:.1f}%" if peak else ""
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(device) // 2**20
            mfu += f" peak_mem:{row['peak_mib']}MiB"
        print(
            f"phase:{row['phase']} ms_per_step:{ms:.2f} tok/s:{tokens_per_s:.0f}{mfu} graphs:{graphs} "
            f"(median of {iters}, after {args.warmup} warm-up steps)"
        )
    off_share = h.optim.enable_looping_at if h.model.num_loops > 0 and h.optim.enable_looping_at < 1 else 1.0
    average = off_share * results[0]["tokens_per_s"] + (1 - off_share) * results[-1]["tokens_per_s"]
    print(
        f"run_average tok/s_per_gpu:{average:.0f} goal:{GOAL_TOKENS_PER_S:.0f} "
        f"{'MET' if average >= GOAL_TOKENS_PER_S else 'NOT MET'} (loops from {off_share:.0%} of the wall "
        "clock)"
    )
    if counters["graph_break"]:
        print(f"graph breaks: {dict(counters['graph_break'])}")
        ok = False
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(phases=results, run_average_tokens_per_s=average), indent=1)
        )
    if not ok:
        print("FAILED: expected exactly one graph per phase and no graph breaks")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
