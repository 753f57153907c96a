"""Times one MLP sub-layer (forward + backward) for the dense MLP and each MoE mode of train_gpt.py,
and checks that each compiles to one graph that never recompiles across different routings.

    python3 -m tools.gpu.bench_moe   # CUDA: 65,536 tokens x 512, hidden 1536
    python3 -m tools.gpu.bench_moe --modes dense,soft4,topk8 --iters 50 --json bench.json

Every mode is parameter-matched to the dense MLP (experts of hidden/E, built by train_gpt.make_mlp),
runs in bf16 under autocast, compiled with fullgraph=True and dynamic=False, and is timed by the
median of --iters steps after --warmup steps (CUDA events). The dense MLP always runs, as the
reference of the ratio column. After timing, each compiled mode runs a few steps with different
routings (random, skewed, collapsed onto one expert); any recompile or graph break fails the run
(exit status 1). Without CUDA it runs a tiny CPU smoke test whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters

from tools.common import MOE_PRESETS, import_trainer
from tools.common import format_table as layout

train_gpt = import_trainer()

# name -> MoE knobs: the study's presets (tools/common.py) plus dispatch and width variants
# (MOE_DISPATCH=grouped is the trainer's default; stated where a capacity variant sits beside it).
GROUPED, CAPACITY = {"MOE_DISPATCH": "grouped"}, {"MOE_DISPATCH": "capacity"}
MODES: dict[str, dict[str, str]] = {
    **{name: MOE_PRESETS[name] for name in ("dense", "soft2", "soft4")},
    "soft8": {**MOE_PRESETS["soft4"], "NUM_EXPERTS": "8"},
    "topk4": {**MOE_PRESETS["topk4"], **GROUPED},
    "topk8": {**MOE_PRESETS["topk4"], "NUM_EXPERTS": "8", **GROUPED},
    "topk4_cap": {**MOE_PRESETS["topk4"], **CAPACITY},
    "topk8_cap": {**MOE_PRESETS["topk4"], "NUM_EXPERTS": "8", **CAPACITY},
    "topk8_k2": {**MOE_PRESETS["topk4"], "NUM_EXPERTS": "8", "TOP_K": "2", **GROUPED},
    "shared_routed": {**MOE_PRESETS["shared_routed"], **GROUPED},
}
CUDA_SHAPE = dict(tokens=65_536, dim=512, hidden=1536, iters=20)
# grouped_mm compiles on CPU only in bf16 with dims that are multiples of 16: hidden/8 = 16 here.
CPU_SHAPE = dict(tokens=256, dim=64, hidden=128, iters=3)
# Router scales for the recompile check: as initialised, sharply skewed, and zero (every score
# ties, so top-k sends every token to the same experts and the others get no rows).
ROUTER_SCALES = (1.0, 8.0, 0.0)


def build_layer(mode: str, dim: int, hidden: int, device: torch.device) -> nn.Module:
    """The MLP sub-layer train_gpt.py builds for `mode`, with random (not zero) weights and router."""
    env = {
        "MODEL_DIM": str(dim),
        "MLP_MULT": repr(hidden / dim),
        "NUM_HEADS": "1",
        "NUM_KV_HEADS": "1",
        **MODES[mode],
    }
    h = train_gpt.load_config(env)
    if h.model.mlp_hidden != hidden:
        raise SystemExit(
            f"--hidden {hidden} is not MLP_MULT x --dim {dim} for any float MLP_MULT "
            f"(got {h.model.mlp_hidden})"
        )
    layer = train_gpt.make_mlp(h.model, 0).to(device)
    # Zero-initialised projections and router (the training init) would route every token alike.
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=p.size(-1) ** -0.5)
    return layer


def forward_fn(layer: nn.Module):
    def forward(x: torch.Tensor):
        out = layer(x)
        aux = getattr(layer, "aux_terms", [])  # the MoE layer's weighted z- and aux losses of this forward
        return out, (torch.stack(aux).sum() if aux else None)

    return forward


def make_step(layer: nn.Module, compiled: bool, backend: str, device: torch.device):
    """step(x, grad): one forward + backward of the layer, in bf16 autocast, as in training."""
    forward = forward_fn(layer)
    if compiled:
        forward = torch.compile(forward, fullgraph=True, dynamic=False, backend=backend)

    def step(x: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out, aux = forward(x)
        outputs, grads = [out], [grad.to(out.dtype)]
        if aux is not None:
            outputs.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(outputs, grads)

    return step


def median_ms(step, x: torch.Tensor, grad: torch.Tensor, iters: int, device: torch.device) -> float:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(x, grad)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(x, grad)
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@contextlib.contextmanager
def router_scaled(layer: nn.Module, scale: float):
    router = getattr(layer, "router_weight", None)
    if router is None:
        yield
        return
    saved = router.detach().clone()
    with torch.no_grad():
        router.mul_(scale)
    try:
        yield
    finally:
        with torch.no_grad():
            router.copy_(saved)


def vary_routing(
    step, layer: nn.Module, shape: tuple[int, int], grad: torch.Tensor, device: torch.device
) -> None:
    """Steps on fresh inputs under each routing variant: none of them may trigger a recompile."""
    for scale in ROUTER_SCALES:
        with router_scaled(layer, scale):
            step(torch.randn(shape, device=device, requires_grad=True), grad)


def compile_counts() -> dict[str, int]:
    # With fullgraph=True every compilation yields exactly one graph, so graphs - 1 = recompiles.
    graphs = counters["stats"]["unique_graphs"]
    return dict(
        graphs=graphs, recompiles=max(graphs - 1, 0), graph_breaks=sum(counters["graph_break"].values())
    )


def bench_mode(mode: str, args, device: torch.device) -> dict:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = build_layer(mode, args.dim, args.hidden, device)
    shape = (args.tokens, args.dim)
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)  # the output's dtype under autocast
    step = make_step(layer, not args.no_compile, args.backend, device)
    result = dict(mode=mode, **MODES[mode], params=sum(p.numel() for p in layer.parameters()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(x, grad)
    result["ms"] = median_ms(step, x, grad, args.iters, device)
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) // 2**20
    if not args.no_compile:
        vary_routing(step, layer, shape, grad, device)
        result.update(compile_counts())
    return result


def problems(result: dict) -> list[str]:
    if "error" in result:
        return [f"{result['mode']}: {result['error']}"]
    found = [
        f"{result['mode']}: {result[key]} {key.replace('_', ' ')}"
        for key in ("recompiles", "graph_breaks")
        if result.get(key)
    ]
    if result.get("graphs", 1) != 1:
        found.append(f"{result['mode']}: {result['graphs']} graphs (expected exactly 1)")
    return found


def format_table(results: list[dict]) -> str:
    dense_ms = next((r["ms"] for r in results if r["mode"] == "dense" and "ms" in r), None)
    header = ["mode", "params", "ms", "x dense", "graphs", "recompiles", "breaks", "peak MiB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["mode"], "-", "FAILED", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                r["mode"],
                str(r["params"]),
                f"{r['ms']:.3f}",
                f"{r['ms'] / dense_ms:.2f}" if dense_ms else "-",
                *(str(r.get(k, "-")) for k in ("graphs", "recompiles", "graph_breaks", "peak_mib")),
            ]
        )
    return layout(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, help="rows per step (CUDA default 65536, CPU 256)")
    parser.add_argument("--dim", type=int, help="model width (CUDA default 512, CPU 64)")
    parser.add_argument("--hidden", type=int, help="dense MLP hidden size (CUDA default 1536, CPU 128)")
    parser.add_argument(
        "--iters", type=int, help="timed steps; the median is reported (CUDA default 20, CPU 3)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of: {', '.join(MODES)}"
    )
    parser.add_argument("--no-compile", action="store_true", help="eager mode (no compile counts)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    args.modes = ["dense"] + [m for m in modes if m != "dense"]  # the reference of the ratio column
    return args


def describe_setup(args, device: torch.device) -> str:
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "CPU smoke test (no CUDA): timings mean nothing"
    )
    how = "eager" if args.no_compile else f"torch.compile({args.backend}, fullgraph, static shapes)"
    return (
        f"{where}; torch {torch.__version__}; {args.tokens} tokens x {args.dim}, hidden {args.hidden}; "
        f"bf16 autocast, {how}; median of {args.iters} after {args.warmup} warm-up steps"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in (CUDA_SHAPE if device.type == "cuda" else CPU_SHAPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    setup = describe_setup(args, device)
    print(f"bench_moe: {setup}", flush=True)
    results = []
    for mode in args.modes:
        try:
            results.append(bench_mode(mode, args, device))
        except Exception as err:  # a mode that fails to build or compile is reported, not fatal to the others
            results.append(
                dict(mode=mode, error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            )
        done = results[-1]
        print(f"  {mode}: " + (done["error"] if "error" in done else f"{done['ms']:.3f} ms"), flush=True)
    print(format_table(results))
    if args.json:
        shape = dict(tokens=args.tokens, dim=args.dim, hidden=args.hidden)
        args.json.write_text(
            json.dumps(
                dict(setup=setup, shape=shape, compiled=not args.no_compile, results=results), indent=1
            )
        )
    found = [p for r in results for p in problems(r)]
    if found:
        print("FAILED: " + "; ".join(found), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
