"""GPU memory of one training rank estimated without a GPU, from a fake-tensor trace of train_gpt.py's model.

    python3 -m tools.gpu.gpu_memory                  # the default (record) shape, every loop state
    python3 -m tools.gpu.gpu_memory MOE_MODE=soft --json mem.json
    python3 -m tools.gpu.gpu_memory --check-record   # compare with the 2026-04-14 record's logged peak

The model is built on a fake `cuda` device (torch._subclasses.FakeTensorMode: shapes and dtypes, no
data) with CUDA autocast (bf16) forced on, and one micro-batch (MICRO_BATCH_TOKENS) runs forward.
Every tensor autograd saves for backward is counted once per storage (parameters excluded), in the
dtype CUDA autocast gives it (train_gpt.saved_activations, which a COMPILE=0 run on a GPU also uses
to warn about a micro-batch that cannot fit). Attention is a flash-like stand-in (it saves q, k, v,
the output and an fp32 log-sum-exp per row, as FlashAttention, cuDNN and flex_attention do), because
the backend choice of scaled_dot_product_attention cannot be simulated. With RESPECT_DOC_BOUNDARIES
(the default) the micro-batch is one packed row, as training reads it, and the document block mask is
built for real (its index tensors are not counted: a few MiB). The trace is EAGER: torch.compile
(inductor) recomputes cheap elementwise ops in backward and saves fewer tensors, so a compiled run
needs less; --check-record measures by how much.

A second estimate models torch.compile: the joint forward+backward graph is traced through AOTAutograd
and split by the min-cut partitioner inductor uses (it recomputes cheap ops instead of saving them);
what the backward graph receives is what is saved. That trace runs on fake CPU tensors under CPU
autocast with CUDA's fp32 rules registered for the ops this model uses (cpu_autocast_like_cuda): the
autograd engine cannot run on a fake CUDA device without a driver. tests/test_fake_cuda.py checks that
this emulation saves exactly the bytes, per dtype, that the fake CUDA trace saves.

peak = weights, gradients, optimizer state, EMA and DDP buckets (fp32) + saved activations + the
backward working set of the loss (fp32 gradients of the logits: two tokens x vocab buffers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from unittest import mock

import torch
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from tools.common import REPO, import_trainer

train_gpt = import_trainer()

MIB = 2**20
# The 2026-04-14 record: the default shape (11 x 512, loops 3-5 twice more from 35%), 98,304 tokens per
# rank, compiled, FlashAttention 3; its three seeds log the same peak.
RECORD_DIR = "2026-04-14_MultiPhaseGlobalSGD_PhasedTTT"
RECORD_PLACES = (REPO / "tests" / "fixtures" / "real_records", Path("/work/shared/data/real_records"))
PEAK_LINE = re.compile(r"peak memory allocated: (\d+) MiB")


@contextlib.contextmanager
def cuda_autocast_without_gpu():
    """torch.autocast("cuda") turns itself off when CUDA is unavailable; these two checks are all that stop
    it. Autocast's CUDA dtype rules live in the dispatcher and need no GPU, so with them patched a fake
    CUDA trace sees the dtypes a GPU run gets."""
    with (
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):
        yield


# Ops CUDA autocast runs in fp32 that this model uses and CPU autocast leaves alone (torch's autocast_mode.cpp
# lists): cast to fp32, or (the second group) given dtype=float32 as CUDA autocast does.
CUDA_FP32_OPS = (
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "rms_norm",
    "logsumexp",
    "exp",
    "log",
    "rsqrt",
    "reciprocal",
    "softplus",
    "layer_norm",
)
CUDA_FP32_DTYPE_OPS = (
    "softmax.int",
    "log_softmax.int",
    "sum",
    "sum.dim_IntList",
    "linalg_vector_norm",
    "cumsum",
    "prod",
)
REDUCED = (torch.bfloat16, torch.float16)


def aten_op(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


@contextlib.contextmanager
def cpu_autocast_like_cuda():
    """CPU autocast with CUDA autocast's fp32 rules for the ops above (AutocastCPU kernels, gone on exit)."""
    lib = torch.library.Library("aten", "IMPL")
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def to_fp32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in REDUCED else t

    def cast_kernel(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(below_autocast):
                return op(*tree_map(to_fp32, args), **tree_map(to_fp32, kwargs))

        return kernel

    def dtype_kernel(op):
        def kernel(x, *args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(below_autocast):
                given = kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
                if x.dtype in REDUCED and not given:
                    kwargs["dtype"] = torch.float32
                return op(x, *args, **kwargs)

        return kernel

    try:
        for name in CUDA_FP32_OPS:
            lib.impl(name, cast_kernel(aten_op(name)), "AutocastCPU")
        for name in CUDA_FP32_DTYPE_OPS:
            lib.impl(name, dtype_kernel(aten_op(name)), "AutocastCPU")
        yield
    finally:
        lib._destroy()


# Attention as one opaque op for AOTAutograd: the partitioner must save its output and log-sum-exp, as for
# flash attention, not recompute them (an autograd.Function of empty_like would look free to recompute).
@torch.library.custom_op("gpu_memory::flash_like", mutates_args=())
def flash_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@flash_like.register_fake
def _(q, k, v):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("gpu_memory::flash_like_backward", mutates_args=())
def flash_like_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@flash_like_backward.register_fake
def _(grad, q, k, v, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_flash_like(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


flash_like.register_autograd(
    lambda ctx, grad, grad_lse: flash_like_backward(grad, *ctx.saved_tensors), setup_context=_save_flash_like
)


def compiled_saved_activations(h, looping: bool) -> dict[str, int]:
    """Bytes by dtype the min-cut partition of the joint graph saves for backward (parameters excluded)."""
    saved: dict[str, int] = {}

    def backward_compiler(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            # placeholders: saved values, then tangents; primals are parameters and inputs kept as they are
            if node.op == "placeholder" and isinstance(value, torch.Tensor):
                if not node.name.startswith(("tangents", "primals")):
                    dtype = str(value.dtype).removeprefix("torch.")
                    saved[dtype] = saved.get(dtype, 0) + value.numel() * value.element_size()
        return make_boxed_func(gm)

    with FakeTensorMode() as mode:
        model = train_gpt.fake_model(h.model, "cpu").train()
        model.set_looping(looping)
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        x = torch.zeros(train_gpt.train_rows(h.data), dtype=torch.long)

    def loss_of(params, buffers, x):
        return torch.func.functional_call(model, {**params, **buffers}, (x, x, h.data.train_seq_len))[0]

    joint = aot_function(
        loss_of,
        fw_compiler=lambda gm, example_inputs: make_boxed_func(gm),
        bw_compiler=backward_compiler,
        partition_fn=min_cut_rematerialization_partition,
    )
    attention = lambda q, k, v, docs: flash_like(q, k, v)[0]  # noqa: E731
    with cpu_autocast_like_cuda(), mock.patch.object(train_gpt, "causal_attention", attention), mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = joint(params, buffers, x)
        loss.backward()  # the backward graph is compiled (and its inputs counted) on first use
    return saved


def estimate(h, world_size: int = 8, compiled: bool = True) -> dict:
    """Per loop state: saved activations (by dtype) and the peak estimate of one rank, in bytes and MiB."""
    static = train_gpt.static_training_bytes(h.model, h.optim, world_size)
    loss_grads = 8 * h.data.micro_batch_tokens * h.data.vocab_size
    phases = []
    for looping in sorted({False, h.model.num_loops > 0}):
        with cuda_autocast_without_gpu():
            by_dtype = train_gpt.saved_activations(h.model, h.data, "cuda", looping)
        saved = sum(by_dtype.values())
        phase = dict(
            phase="loops_on" if looping else "loops_off",
            saved_bytes=saved,
            saved_by_dtype=by_dtype,
            saved_mib=saved / MIB,
            peak_mib=(static + saved + loss_grads) / MIB,
        )
        if compiled:
            by_dtype = compiled_saved_activations(h, looping)
            saved = sum(by_dtype.values())
            phase.update(
                compiled_saved_bytes=saved,
                compiled_saved_by_dtype=by_dtype,
                compiled_saved_mib=saved / MIB,
                compiled_peak_mib=(static + saved + loss_grads) / MIB,
            )
        phases.append(phase)
    return dict(
        micro_batch_tokens=h.data.micro_batch_tokens,
        moe_mode=h.model.moe_mode,
        moe_dispatch=h.model.moe_dispatch,
        world_size=world_size,
        static_bytes=static,
        loss_grad_bytes=loss_grads,
        phases=phases,
        peak_mib=max(p["peak_mib"] for p in phases),
        compiled_peak_mib=max(p["compiled_peak_mib"] for p in phases) if compiled else None,
    )


def record_peak_mib() -> tuple[int, str]:
    """The 2026-04-14 record's logged `peak memory allocated` (MiB) and the log it came from."""
    for place in RECORD_PLACES:
        for log in sorted((place / RECORD_DIR).glob("train_seed*.log")):
            match = PEAK_LINE.search(log.read_text(errors="replace"))
            if match:
                return int(match.group(1)), str(log)
    raise FileNotFoundError(f"no {RECORD_DIR}/train_seed*.log with a peak memory line in {RECORD_PLACES}")


def config(knobs: list[str]):
    env = {}
    for item in knobs:
        if "=" not in item:
            raise train_gpt.ConfigError(f"{item!r}: knob overrides are KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    return train_gpt.load_config(env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("knobs", nargs="*", metavar="KEY=VALUE", help="knob overrides, as in a run")
    parser.add_argument("--world-size", type=int, default=8, help="ranks of the run (DDP buckets when > 1)")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled (min-cut) estimate")
    parser.add_argument("--check-record", action="store_true", help="compare with the 2026-04-14 record")
    parser.add_argument("--json", help="also write the estimate here")
    args = parser.parse_args(argv)
    try:
        h = config(args.knobs)
    except train_gpt.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = estimate(h, args.world_size, compiled=not args.eager_only)
    print(
        f"moe_mode {h.model.moe_mode} micro_batch {h.data.micro_batch_tokens} tokens: static "
        f"{result['static_bytes'] / MIB:.0f} MiB, loss gradients {result['loss_grad_bytes'] / MIB:.0f} MiB"
    )
    for p in result["phases"]:
        for kind in ("", "compiled_") if not args.eager_only else ("",):
            dtypes = ", ".join(f"{k} {v / MIB:.0f}" for k, v in sorted(p[f"{kind}saved_by_dtype"].items()))
            name = kind.rstrip("_") or "eager"
            print(
                f"{p['phase']} {name}: saved for backward {p[f'{kind}saved_mib']:.0f} MiB ({dtypes}), "
                f"peak ~{p[f'{kind}peak_mib']:.0f} MiB per rank"
            )
    if args.check_record:
        logged, path = record_peak_mib()
        result["record"] = dict(log=path, peak_mib=logged, eager_ratio=result["peak_mib"] / logged)
        line = (
            f"record {RECORD_DIR}: peak memory allocated {logged} MiB; "
            f"eager estimate {result['peak_mib'] / logged:.2f}x"
        )
        if not args.eager_only:
            result["record"]["compiled_ratio"] = result["compiled_peak_mib"] / logged
            line += f", compiled estimate {result['compiled_peak_mib'] / logged:.2f}x"
        print(line + " of it")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
